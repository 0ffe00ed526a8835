"""One job of a Hydra multirun: recorded in the sweep's index, a failure that does not stop the others, and the
value an Optuna sweeper optimises.

    python -m ldm.train -m optim.lr=1e-4,3e-4 diffusion.cfg_dropout=0.05,0.1
    # runs/ldm/multirun_<time>/index.json      the swept keys, the W&B group, every job: params, status, metrics
    # runs/ldm/multirun_<time>/{0,1,2,3}/      one run directory per job (metrics.jsonl, checkpoints, wandb/)
    # runs/ldm/multirun_<time>/report.{md,csv} and fid_curves.png, written at the end (python -m ldm.report)

Only multiruns come here (`ldm.train` sends a single run straight to `ldm.run.fit.run`). The job's W&B name and
group are in its config already (`${ldm.run_name:...}`, `${ldm.sweep_group:}`: ldm/utils/sweep_index.py), and its
metrics log is a declared callback (conf/callbacks/metrics_log.yaml): nothing here edits the config.
"""

from __future__ import annotations

import logging
import math
import traceback
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_only

from ldm.run.fit import run
from ldm.utils.cli import log_to_files, one_line
from ldm.utils.metrics_file import FILENAME as METRICS
from ldm.utils.metrics_file import read_metrics
from ldm.utils.secrets import redact
from ldm.utils.sweep_index import current_job, run_name, sweep_group, update_job

log = logging.getLogger(__name__)

def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")


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


def run_job(cfg: DictConfig) -> float | None:
    """Run one job of a multirun; returns ``cfg.objective`` (worst possible when the job fails, so the sweep goes on).

    The job is recorded in the sweep's index as running, then completed (its final metrics and objective) or
    failed (the error's first line; the traceback in the job's `error.txt`)."""
    job = current_job()
    if job is None:
        raise RuntimeError("run_job runs a job of a multirun (python -m ldm.train -m ...); this is a single run")
    objective = cfg.get("objective")
    check_objective(objective)
    is_rank_zero = rank_zero_only.rank == 0  # under SLURM every task of a job runs this; one records it
    sweep_dir = job.pop("sweep_dir")
    record = {**job, "group": sweep_group(cfg.name, sweep_dir), "name": run_name(cfg.name, job["num"], job["params"]),
              "status": "running", "started": _now()}  # fmt: skip
    if is_rank_zero:
        update_job(sweep_dir, record)
    try:
        metrics = run(cfg)
        value = objective_value(objective, metrics, read_metrics(Path(cfg.paths.output_dir) / METRICS))
    except Exception as e:  # the sweep goes on: this job is marked failed and returns the worst objective
        log.error(f"job {job['num']} ({record['name']}) failed: {one_line(e)}")  # the traceback: error.txt, train.log
        log_to_files(f"job {job['num']} failed", e)
        (Path(cfg.paths.output_dir) / "error.txt").write_text(redact(traceback.format_exc()))
        record.update(status="failed", error=f"{type(e).__name__}: {e}".splitlines()[0], finished=_now())
        value = _worst(objective)
    else:
        record.update(status="completed", finished=_now(), metrics=metrics, objective=value)
    if is_rank_zero:
        update_job(sweep_dir, record)
    return value
