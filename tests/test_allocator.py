"""The CUDA allocator default of a training process (ldm/training/allocator.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ldm.training.allocator import DEFAULT, ENV_NAMES, default_allocator_settings


def test_expandable_segments_unless_the_user_chose():
    environ: dict[str, str] = {}
    assert default_allocator_settings(environ) == (None if torch.cuda.is_initialized() else DEFAULT)
    if not torch.cuda.is_initialized():
        assert environ == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    for name in ENV_NAMES:
        for value in ("max_split_size_mb:128", ""):  # the user's value, even an empty one, stays
            environ = {name: value}
            assert default_allocator_settings(environ) is None
            assert environ == {name: value}


def test_a_run_sets_it_before_building_anything(tmp_path, monkeypatch):
    """`ldm.run.fit.train` sets it before its first step that builds models or data (`check_adapter`)."""
    from tiny import compose_config, make_tiny_root

    from ldm.run import fit

    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    seen = []

    class Stop(Exception):
        pass

    def first_builder(cfg):
        seen.append(os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
        raise Stop

    monkeypatch.setattr(fit, "check_adapter", first_builder)
    cfg = compose_config(make_tiny_root(tmp_path / "root"), tmp_path / "run", ["logger=csv"])
    with pytest.raises(Stop):
        fit.train(cfg)
    assert seen == [None if torch.cuda.is_initialized() else DEFAULT]


@pytest.mark.gpu
def test_the_allocator_grows_expandable_segments():
    """In a fresh process: after the default, the first CUDA tensor lives in an expandable segment."""
    code = (
        "import torch\n"
        "from ldm.training.allocator import default_allocator_settings\n"
        "assert default_allocator_settings() is not None\n"
        "x = torch.empty(64 << 20, dtype=torch.uint8, device='cuda')\n"
        "print(all(s['is_expandable'] for s in torch.cuda.memory._snapshot()['segments']))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "True"
