"""Which checkpoint a run continues from: `resume=auto`, a checkpoint file, or a run directory.

    python -m ldm.train experiment=shapes resume=auto      # newest valid checkpoint of the run named `shapes`
    python -m ldm.train experiment=shapes resume=runs/shapes/2025-01-01_10-00-00

`auto` looks at this run's directory and its siblings (run directories are `runs/${name}/<date_time>`,
so siblings are the earlier attempts of the same run name), takes the directory whose checkpoints are
newest, and there the newest checkpoint that loads (`weights_only=True`) and was written by a run of the
same name: a truncated or corrupt one is skipped with a warning and the one before it is used. The run
then continues *in that directory* (checkpoints, samples, logs) and, with W&B, in the same W&B run id.
With `hydra.run.dir` fixed (e.g. per SLURM job) the directory is simply reused. Nothing found: a fresh start.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

from omegaconf import DictConfig, open_dict

from ldm.run.validate import ConfigError
from ldm.training.checkpoint import CheckpointError, read_checkpoint
from ldm.training.loggers import wandb_logger
from ldm.utils.targets import names_target

log = logging.getLogger(__name__)


class ResumeWarning(UserWarning):
    """A checkpoint skipped while looking for one to resume from."""


def checkpoints_of(run_dir: Path) -> list[Path]:
    """`run_dir/checkpoints/*.ckpt`, newest first (temporary files of interrupted saves are left out)."""
    found = [p for p in (Path(run_dir) / "checkpoints").glob("*.ckpt") if p.is_file()]
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"), reverse=True)


def newest_valid(candidates: list[Path], name: str | None = None) -> Path | None:
    """The first checkpoint that loads (and, when `name` is given, was written by a run of that name)."""
    for path in candidates:
        try:
            checkpoint = read_checkpoint(path)
        except CheckpointError as error:
            warnings.warn(f"{error}; trying the previous checkpoint", ResumeWarning, stacklevel=2)
            continue
        run_name = (checkpoint.get("config") or {}).get("name")
        if name is not None and run_name is not None and run_name != name:
            continue
        return path
    return None


def find_auto(output_dir: Path, name: str) -> Path | None:
    """`resume=auto`: the newest valid checkpoint in ``output_dir`` or a sibling run directory."""
    runs = [output_dir] + [d for d in output_dir.parent.glob("*") if d.is_dir() and d != output_dir]
    runs = [d for d in runs if checkpoints_of(d)]
    runs.sort(key=lambda d: checkpoints_of(d)[0].stat().st_mtime_ns, reverse=True)
    for run_dir in runs:
        found = newest_valid(checkpoints_of(run_dir), name)
        if found is not None:
            return found
    return None


def wandb_run_id(run_dir: Path) -> str | None:
    """The id of the newest W&B run logged under ``run_dir/wandb`` (`offline-run-<date>-<id>`, `run-...`)."""
    runs = sorted((Path(run_dir) / "wandb").glob("*run-*-*"), key=lambda p: p.stat().st_mtime_ns)
    for path in reversed(runs):
        match = re.fullmatch(r"(?:offline-)?run-\d{8}_\d{6}-(\w+)", path.name)
        if match:
            return match.group(1)
    return None


def resolve_resume(cfg: DictConfig) -> str | None:
    """The `ckpt_path` for `trainer.fit`. For a checkpoint found elsewhere, points `paths.output_dir` at its
    run directory and the W&B logger at its run id (edits ``cfg`` in place, before anything is built)."""
    resume, ckpt_path = cfg.get("resume"), cfg.get("ckpt_path")
    if resume in (None, False, "", "none", "null"):
        return ckpt_path
    if ckpt_path:
        raise ConfigError(f"resume={resume!r} and ckpt_path={ckpt_path!r}: set only one")
    output_dir = Path(cfg.paths.output_dir)
    if resume == "auto":
        found = find_auto(output_dir, cfg.name)
        if found is None:
            log.info(f"resume=auto: no checkpoint of run {cfg.name!r} near {output_dir}; starting fresh")
            return None
    else:
        target = Path(resume)
        if target.is_dir():
            found = newest_valid(checkpoints_of(target))
            if found is None:
                raise ConfigError(f"resume={resume}: no readable checkpoint in {target / 'checkpoints'}")
        elif not target.is_file():
            raise ConfigError(f"resume={resume}: no such checkpoint file or run directory")
        else:
            read_checkpoint(target)  # a clear error now rather than after building everything
            found = target
    run_dir = found.parent.parent if found.parent.name == "checkpoints" else found.parent
    if run_dir.resolve() != output_dir.resolve():
        with open_dict(cfg):
            cfg.paths.output_dir = str(run_dir)
    wandb_id = wandb_run_id(run_dir)
    if wandb_id and names_target(cfg.get("logger"), wandb_logger):
        with open_dict(cfg):
            cfg.logger.id = wandb_id
            cfg.logger.resume = "allow"
    log.info(f"resuming from {found} in {run_dir}" + (f" (W&B run {wandb_id})" if wandb_id else ""))
    return str(found)
