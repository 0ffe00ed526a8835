"""Hydra sweeps: one W&B group per sweep, one run per job named by its swept values, an index of the jobs,
failed jobs that do not stop the others, and the value an Optuna sweeper optimises.

    python -m ldm.train -m optim.lr=1e-4,3e-4 diffusion.cfg_dropout=0.05,0.1
    # runs/ldm/multirun_<time>/index.json      the swept keys, the W&B group, every job: params, status, metrics
    # runs/ldm/multirun_<time>/{0,1,2,3}/      one run directory per job (metrics.jsonl, checkpoints, wandb/)
    # runs/ldm/multirun_<time>/report.{md,csv} and fid_curves.png, written at the end (python -m ldm.report)

`SweepCallback` (a Hydra callback, conf/hydra/default.yaml) writes the index when the sweep starts and closes it
when it ends; `run_job` wraps the training of each job (ldm/train.py): it names the W&B run, adds the metrics
log, starts DDP ranks itself (ldm/launch.py), records the outcome and returns the configured objective.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import sys
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.utilities import rank_zero_only

from ldm.launch import launch, ranks_to_launch
from ldm.lightning.metrics_log import read_metrics
from ldm.validate import validate_config

log = logging.getLogger(__name__)

INDEX = "index.json"
METRICS = "metrics.jsonl"


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")


# --- the index: <sweep_dir>/index.json, written under a lock (jobs may run in parallel) ------------------
@contextmanager
def _locked(sweep_dir: Path):
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


def _write_index(sweep_dir: Path, index: dict) -> None:
    tmp = sweep_dir / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, sweep_dir / INDEX)  # readers never see half a file


def _update_job(sweep_dir: Path, record: dict) -> None:
    with _locked(sweep_dir):
        index = read_index(sweep_dir) if (sweep_dir / INDEX).is_file() else {"jobs": []}
        jobs = {job["num"]: job for job in index["jobs"]}
        jobs[record["num"]] = record
        index["jobs"] = [jobs[num] for num in sorted(jobs)]
        _write_index(sweep_dir, index)


# --- what a sweep varies --------------------------------------------------------------------------------
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
    return ",".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def run_name(base: str, num: int, params: dict) -> str:
    return f"{base}-{num} {format_params(params)}" if params else f"{base}-{num}"


class SweepCallback(Callback):
    """Opens the sweep's index (swept keys, W&B group, command) and, at the end, closes it and writes the report."""

    def __init__(self, report: bool = True):
        self.report = report

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        keys = swept_keys(config.hydra.overrides.task, OmegaConf.select(config, "hydra.sweeper.params"))
        with _locked(sweep_dir):
            _write_index(sweep_dir, {"name": config.name, "group": f"{config.name}-{sweep_dir.name}",
                                     "params": keys, "command": " ".join(sys.argv), "started": _now(), "jobs": []})

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        with _locked(sweep_dir):
            index = read_index(sweep_dir)
            for job in index["jobs"]:
                if job["status"] == "running":  # its process died without a word (killed, out of memory)
                    job.update(status="failed", error="the job ended without reporting a result")
            index["finished"] = _now()
            _write_index(sweep_dir, index)
        failed = [job for job in index["jobs"] if job["status"] == "failed"]
        log.info(f"sweep {sweep_dir}: {len(index['jobs']) - len(failed)} of {len(index['jobs'])} jobs completed")
        for job in failed:
            log.warning(f"job {job['num']} ({job['name']}) failed: {job['error']}")
        if self.report:
            from ldm.report import write_report

            for path in write_report(sweep_dir):
                log.info(f"report -> {path}")


# --- one job ---------------------------------------------------------------------------------------------
def check_objective(objective: DictConfig | dict | None) -> bool:
    """Whether a run has an objective; a clear error for a bad one (before training, not after)."""
    if not objective or not objective.get("metric"):
        return False
    if objective.get("reduce") not in ("best", "last"):
        raise ValueError(f"objective.reduce must be best or last, got {objective.get('reduce')!r}")
    if objective.get("direction") not in ("minimize", "maximize"):
        raise ValueError(f"objective.direction must be minimize or maximize, got {objective.get('direction')!r}")
    return True


def objective_value(objective: DictConfig | dict | None, final: dict, rows: list[dict]) -> float | None:
    """The value a sweeper optimises: ``objective.metric``'s best (``reduce: best``) or last value in the run."""
    if not check_objective(objective):
        return None
    metric, reduce, direction = objective["metric"], objective["reduce"], objective["direction"]
    values = [row[metric] for row in rows if row.get(metric) is not None]
    if metric in final:
        values.append(final[metric])
    if not values:
        logged = sorted({k for row in rows for k in row} | set(final))
        raise ValueError(f"objective.metric {metric!r} was never logged (logged: {', '.join(logged)})")
    if reduce == "last":
        return float(values[-1])
    return float(min(values) if direction == "minimize" else max(values))


def _worst(objective) -> float | None:
    if not check_objective(objective):
        return None
    return -math.inf if objective.get("direction") == "maximize" else math.inf


def _sweep_job(cfg: DictConfig) -> dict | None:
    """This job's place in its sweep (None outside a multirun)."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hydra = HydraConfig.get()
    sweep_dir = Path(hydra.sweep.dir)
    try:
        sweep = read_index(sweep_dir)
    except FileNotFoundError:  # no SweepCallback in the hydra config: every override of the job is a parameter
        sweep = {"group": f"{cfg.name}-{sweep_dir.name}", "params": None}
    overrides = list(hydra.overrides.task)
    return {"num": int(hydra.job.num), "dir": os.path.relpath(hydra.runtime.output_dir, sweep_dir),
            "sweep_dir": sweep_dir, "group": sweep["group"], "params": job_params(overrides, sweep["params"]),
            "overrides": overrides}


def _train(cfg: DictConfig, train_fn: Callable[[DictConfig], dict]) -> dict:
    nprocs = ranks_to_launch(cfg.trainer)
    if nprocs:
        validate_config(cfg)  # a config mistake in one line here, before any rank starts (each rank checks again)
        return launch(cfg, cfg.paths.output_dir, nprocs)
    return train_fn(cfg)


def run_job(cfg: DictConfig, train_fn: Callable[[DictConfig], dict]) -> float | None:
    """Train one run or one job of a sweep; returns ``cfg.objective`` (worst possible when a sweep job fails)."""
    job = _sweep_job(cfg)
    with open_dict(cfg):
        if cfg.get("callbacks") is None:
            cfg.callbacks = {}
        if "metrics_log" not in cfg.callbacks:
            cfg.callbacks.metrics_log = {"_target_": "ldm.lightning.metrics_log.MetricsLog",
                                         "path": "${paths.output_dir}/" + METRICS}
        if job is not None:
            name = run_name(cfg.name, job["num"], job["params"])
            cfg.sweep = {"group": job["group"], "job": job["num"], "params": job["params"]}
            if cfg.get("logger") and "group" in cfg.logger:  # W&B: the sweep is a group, each job a named run
                cfg.logger.group = cfg.logger.group or job["group"]
                cfg.logger.name = name
    objective = cfg.get("objective")
    check_objective(objective)
    if job is None:
        metrics = _train(cfg, train_fn)
        return objective_value(objective, metrics, read_metrics(Path(cfg.paths.output_dir) / METRICS))

    is_rank_zero = rank_zero_only.rank == 0  # under SLURM every task of a job runs this; one records it
    sweep_dir = job.pop("sweep_dir")
    record = {**job, "name": name, "status": "running", "started": _now()}
    if is_rank_zero:
        _update_job(sweep_dir, record)
    try:
        metrics = _train(cfg, train_fn)
        value = objective_value(objective, metrics, read_metrics(Path(cfg.paths.output_dir) / METRICS))
    except Exception as e:  # the sweep goes on: this job is marked failed and returns the worst objective
        log.error(f"job {job['num']} ({name}) failed", exc_info=True)
        (Path(cfg.paths.output_dir) / "error.txt").write_text(traceback.format_exc())
        record.update(status="failed", error=f"{type(e).__name__}: {e}".splitlines()[0], finished=_now())
        value = _worst(objective)
    else:
        record.update(status="completed", finished=_now(), metrics=metrics, objective=value)
    if is_rank_zero:
        _update_job(sweep_dir, record)
    return value
