"""The package's shape: import layers enforced by import-linter (and the contracts catch a forbidden import), no
import inside a function to dodge a cycle, and a single run's saved config is the config it trained with."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tiny import TINY, TINY_UNET, make_tiny_root, saved_config

from ldm.training.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    lint = Path(sys.executable).with_name("lint-imports")  # import-linter's command, in this environment
    return subprocess.run([str(lint)], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_import_contracts_hold():
    out = lint_imports(ROOT)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "0 broken" in out.stdout


def test_an_upward_import_breaks_the_contracts(tmp_path):
    shutil.copytree(ROOT / "ldm", tmp_path / "ldm")
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / "ldm" / "data" / "format.py", "a") as f:  # data is a bottom layer; sweeps is near the top
        f.write("\nimport ldm.sweeps.job  # noqa\n")
    out = lint_imports(tmp_path)
    assert out.returncode != 0
    assert "BROKEN" in out.stdout and "ldm.data.format -> ldm.sweeps.job" in out.stdout


ENTRY_POINTS = {"train.py", "sample.py", "export.py", "evaluate.py", "report.py"}


def test_no_ldm_import_inside_a_function():
    """Every import of ldm's own modules sits at the top of its module: none is put off to dodge an import loop.
    The command-line entry points alone import the heavy layers inside `main`, after the light checks of their
    arguments (a mistake is said in seconds, not after torch and the model libraries are imported); nothing
    imports an entry point, so no loop can hide there."""
    late = []
    for path in (ROOT / "ldm").rglob("*.py"):
        if path.parent == ROOT / "ldm" and path.name in ENTRY_POINTS:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("ldm"):
                        late.append(f"{path.relative_to(ROOT)}:{inner.lineno}")
                    if isinstance(inner, ast.Import) and any(a.name.startswith("ldm") for a in inner.names):
                        late.append(f"{path.relative_to(ROOT)}:{inner.lineno}")
    assert late == []


def test_a_single_run_saves_the_config_it_trained_with(tmp_path):
    """`.hydra/config.yaml`, resolved in the run's Hydra context, equals the config the Trainer was built from
    (what the run wrote into its checkpoint): nothing is added or changed after Hydra saved it."""
    root = make_tiny_root(tmp_path / "tiny")
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true")
    out = subprocess.run([sys.executable, "-m", "ldm.train", "experiment=shapes", f"paths.data_dir={root}", *TINY,
                          *TINY_UNET, "trainer.max_steps=1", "logger=wandb", "callbacks.export=null",
                          "callbacks.fid=null", f"hydra.run.dir={run_dir}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    trained = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["config"]
    saved = saved_config(run_dir)
    assert saved == trained
    assert saved["callbacks"]["metrics_log"]["path"] == f"{run_dir}/metrics.jsonl"  # declared, not added
    assert saved["logger"]["name"] == "shapes" and saved["logger"]["group"] is None and saved["sweep"] is None
    assert (run_dir / "metrics.jsonl").is_file()
