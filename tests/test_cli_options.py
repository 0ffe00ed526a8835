"""Every numeric option of ldm.sample, ldm.export, ldm.evaluate and ldm.report is checked by the schema's rule of
the config key it stands for (`ldm.utils.cli.rule_type`): a wrong type, a negative and an out-of-range value each
give argparse's one line naming the option and the value (exit code 2), before anything heavy is imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ldm import evaluate, export, report, sample
from ldm.run.schema import GUIDANCE_INTERVAL, KEYS, STRENGTH

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {"sample": sample, "export": export, "evaluate": evaluate, "report": report}

# (command, option, the rule it must use, wrong values (a word, a negative, out of range), a value it takes)
OPTIONS = [
    ("sample", "--seed", KEYS["seed"], ["abc", "-1", "4294967296", "1.5"], "7"),
    ("sample", "--steps", KEYS["sampling.num_inference_steps"], ["abc", "-1", "0", "1001", "2.5"], "25"),
    ("sample", "--guidance-scale", KEYS["sampling.guidance_scale"], ["abc", "-3", "nan", "inf"], "7.5"),
    ("sample", "--strength", STRENGTH, ["abc", "-0.1", "1.5"], "0.5"),
    ("sample", "--guidance-interval", GUIDANCE_INTERVAL.item, ["abc", "-1", "inf"], "0.5"),
    ("evaluate", "--n", KEYS["callbacks.fid.num_images"], ["abc", "-1", "1"], "8"),
    ("evaluate", "--n-reference", KEYS["callbacks.fid.num_reference"], ["abc", "-1", "1"], "8"),
    ("evaluate", "--resolution", KEYS["data.resolution"], ["abc", "-1", "4"], "32"),
    ("evaluate", "--batch-size", KEYS["callbacks.fid.batch_size"], ["abc", "-1", "0"], "4"),
    ("evaluate", "--seed", KEYS["callbacks.fid.seed"], ["abc", "-1", "4294967296"], "3"),
    ("evaluate", "--guidance-scale", KEYS["callbacks.fid.guidance_scale"], ["abc", "-3"], "2"),
    ("evaluate", "--steps", KEYS["callbacks.fid.num_inference_steps"], ["abc", "-1", "0", "1001"], "10"),
    ("evaluate", "--guidance-interval", GUIDANCE_INTERVAL.item, ["abc", "-1"], "0.5"),
]  # fmt: skip


def _argv(command: str, path: Path, option: str, value: str) -> list[str]:
    before = {"sample": [str(path), "--prompt", "a red circle"], "evaluate": ["checkpoint", str(path), "--shards",
                                                                            str(path.parent)]}[command]  # fmt: skip
    after = ["80"] if option == "--guidance-interval" else []  # LOW HIGH: the value tried is LOW
    return [*before, option, value, *after]


def test_every_numeric_option_is_in_the_table():
    """Each command's options that take a number use a schema rule, and the table below tries each of them."""
    tried = {(command, option) for command, option, *_ in OPTIONS}
    numeric = set()
    for name, module in COMMANDS.items():
        for action in module.parser()._actions:
            assert action.type not in (int, float), f"{name} {action.option_strings}: a plain {action.type.__name__}"
            if getattr(action.type, "__name__", "") == "number":  # rule_type's reader
                numeric.add((name, action.option_strings[-1]))
    assert numeric == tried


@pytest.mark.parametrize("command,option,rule,bad,good", OPTIONS, ids=[f"{c} {o}" for c, o, *_ in OPTIONS])
def test_a_wrong_numeric_option_is_one_line_naming_it(command, option, rule, bad, good, tmp_path, capsys):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"")
    module = COMMANDS[command]
    for value in bad:
        with pytest.raises(SystemExit) as stopped:
            module.parse_args(_argv(command, path, option, value))
        assert stopped.value.code == 2
        err = capsys.readouterr().err.splitlines()
        assert err == [f"error: python -m ldm.{command}: argument {option}: {value}: expected {rule.describe()} "
                       f"(see --help)"], err  # fmt: skip
        assert rule.describe().split()[1] in ("integer", "number")
    args = module.parse_args(_argv(command, path, option, good))
    value = getattr(args, option.lstrip("-").replace("-", "_"))
    value = value[0] if isinstance(value, list) else value  # --guidance-scale (evaluate: a sweep), --guidance-interval
    assert value == float(good) and type(value) is (float if rule.describe().startswith("a number") else int)


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_a_guidance_interval_must_rise(command, tmp_path, capsys):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"")
    with pytest.raises(SystemExit) as stopped:
        COMMANDS[command].parse_args(_argv(command, path, "--guidance-interval", "90"))  # 90 80
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: python -m ldm.{command}: --guidance-interval 90 80: expected LOW < HIGH (noise levels sigma) (see --help)"]


def test_the_option_is_refused_before_anything_heavy_is_imported(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-X", "importtime", "-m", "ldm.sample", str(path), "--prompt", "a", "--steps", "-1"]
    out = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if not line.startswith("import time:")]
    assert lines == ["error: python -m ldm.sample: argument --steps: -1: expected an integer in [1, 1000] (see --help)"]
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert not {"torch", "pytorch_lightning", "diffusers", "transformers", "open_clip", "numpy"} & imported
