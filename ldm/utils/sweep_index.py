"""A sweep's index (`<sweep_dir>/index.json`) and the names it gives its jobs, as config resolvers.

    python -m ldm.train -m optim.lr=1e-4,3e-4
    # runs/ldm/multirun_<time>/index.json: {"name", "group", "params": ["optim.lr"], "command", "jobs": [...]}

The index is opened when a multirun starts (`ldm.sweeps.callback.SweepCallback`) and every job records itself in
it (`ldm.sweeps.job`). A job's W&B run name and group are declared in the config (conf/logger/wandb.yaml) through
the resolvers registered here, so the `.hydra/config.yaml` a job saves is the config it ran:

    name: ${ldm.run_name:${name}}   # "shapes" in a single run, "shapes-3 optim.lr=0.0001" in job 3 of a sweep
    group: ${ldm.sweep_group:}      # null in a single run, "shapes-multirun_<time>" for every job of a sweep
    sweep: ${ldm.sweep:}            # null in a single run, {"group", "job", "params"} in a sweep's job

This module is plain Python (JSON files, a file lock, Hydra's override parser): nothing heavy.
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import OmegaConf

from ldm.utils.secrets import REDACTED, is_secret_name, redact

INDEX = "index.json"


# --- the index file: written under a lock (jobs may run in parallel) -------------------------------------
@contextmanager
def locked(sweep_dir: Path):
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / ".index.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_index(sweep_dir: str | Path) -> dict:
    path = Path(sweep_dir) / INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{sweep_dir} is not a sweep directory: no {INDEX}")
    return json.loads(path.read_text())


def write_index(sweep_dir: Path, index: dict) -> None:
    """Replace the index (call it under `locked`), secrets redacted (`ldm.utils.secrets`); readers never see half
    a file."""
    tmp = sweep_dir / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(redact(index), indent=1))
    os.replace(tmp, sweep_dir / INDEX)


def update_job(sweep_dir: Path, record: dict) -> None:
    """Add or replace one job's record (keyed by its number)."""
    with locked(sweep_dir):
        index = read_index(sweep_dir) if (sweep_dir / INDEX).is_file() else {"jobs": []}
        jobs = {job["num"]: job for job in index["jobs"]}
        jobs[record["num"]] = record
        index["jobs"] = [jobs[num] for num in sorted(jobs)]
        write_index(sweep_dir, index)


# --- what a sweep varies, and the names that follow -------------------------------------------------------
def swept_keys(task_overrides: list[str], sweeper_params: dict | None = None) -> list[str]:
    """The keys a sweep varies: its sweep overrides (`optim.lr=1e-4,3e-4`) and the keys of a sweeper's `params`
    that the command line does not fix to one value."""
    parsed = OverridesParser.create().parse_overrides(list(task_overrides))
    keys = [o.key_or_group for o in parsed if o.is_sweep_override()]
    fixed = {o.key_or_group for o in parsed if not o.is_sweep_override()}
    return keys + [k for k in (sweeper_params or {}) if k not in keys and k not in fixed]


def job_params(job_overrides: list[str], keys: list[str] | None) -> dict:
    """This job's value of each swept key (None: of every key it overrides): {"optim.lr": 0.0001, ...}."""
    parsed = {o.key_or_group: o for o in OverridesParser.create().parse_overrides(list(job_overrides))}
    return {key: parsed[key].value() for key in (parsed if keys is None else keys) if key in parsed}


def format_params(params: dict) -> str:
    """`optim.lr=0.0001252,diffusion.cfg_dropout=0.1` (floats to 4 significant digits; configs keep them all)."""
    return ",".join(f"{k}={REDACTED}" if is_secret_name(k.rsplit(".", 1)[-1]) else f"{k}={v:.4g}"
                    if isinstance(v, float) else f"{k}={v}" for k, v in params.items())  # fmt: skip


def run_name(base: str, num: int, params: dict) -> str:
    return f"{base}-{num} {format_params(params)}" if params else f"{base}-{num}"


def sweep_group(name: str, sweep_dir: Path) -> str:
    return f"{name}-{sweep_dir.name}"


def current_job() -> dict | None:
    """This process's job of a multirun: {"num", "sweep_dir", "dir", "group", "params", "overrides"}, or None
    outside a multirun. Swept keys come from the index (every override of the job when there is none)."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hydra = HydraConfig.get()
    sweep_dir = Path(hydra.sweep.dir)
    try:
        index = read_index(sweep_dir)
    except FileNotFoundError:  # no SweepCallback in the hydra config
        index = {"params": None}
    overrides = list(hydra.overrides.task)
    return {"num": int(hydra.job.num), "sweep_dir": sweep_dir, "dir": os.path.relpath(hydra.runtime.output_dir, sweep_dir),
            "params": job_params(overrides, index["params"]), "overrides": overrides}  # fmt: skip


# --- resolvers --------------------------------------------------------------------------------------------
def _run_name(base: str) -> str:
    job = current_job()
    return base if job is None else run_name(base, job["num"], job["params"])


def _sweep_group(*, _root_) -> str | None:
    job = current_job()
    return None if job is None else sweep_group(_root_.name, job["sweep_dir"])


def _sweep(*, _root_) -> dict | None:
    job = current_job()
    if job is None:
        return None
    return {"group": sweep_group(_root_.name, job["sweep_dir"]), "job": job["num"], "params": job["params"]}


def register_resolvers() -> None:
    """`${ldm.run_name:BASE}`, `${ldm.sweep_group:}` and `${ldm.sweep:}` (idempotent)."""
    OmegaConf.register_new_resolver("ldm.run_name", _run_name, replace=True)
    OmegaConf.register_new_resolver("ldm.sweep_group", _sweep_group, replace=True)
    OmegaConf.register_new_resolver("ldm.sweep", _sweep, replace=True)
