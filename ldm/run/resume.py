"""Which checkpoint a run continues from: `resume=auto`, a checkpoint file, or a run directory.

    python -m ldm.train experiment=shapes resume=auto         # newest good checkpoint of the run named `shapes`
    python -m ldm.train experiment=shapes resume=auto_or_new  # the same, or a fresh start when none is good
    python -m ldm.train experiment=shapes resume=runs/shapes/2025-01-01_10-00-00

`auto` looks at this run's directory and its siblings (run directories are `runs/${name}/<date_time>`,
so siblings are the earlier attempts of the same run name), newest checkpoints first, and takes the first one a
run can continue from: it loads (`weights_only=True`, its `.sha256` matches), was written by a run of the same
name and the same stage, and holds weights, optimizer state and loop counters. Any other is skipped with a warning
naming why, and the one before it is tried. The run then continues *in that directory* (checkpoints, samples,
logs) and, with W&B, in the same W&B run id; temporary files that interrupted saves left there are removed (never
a checkpoint). Nothing found: a fresh start. Checkpoints found but none good: `auto` stops in one line naming
them (a run meant to continue does not silently restart); `auto_or_new` starts fresh, saying so.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

from omegaconf import DictConfig, open_dict
from pytorch_lightning.utilities import rank_zero_only

from ldm.run.validate import ConfigError
from ldm.training.checkpoint import CheckpointError, read_checkpoint, stale_temporaries
from ldm.training.loggers import wandb_logger
from ldm.utils.targets import names_target

log = logging.getLogger(__name__)
AUTO = ("auto", "auto_or_new")


class ResumeWarning(UserWarning):
    """A checkpoint skipped while looking for one to resume from."""


def checkpoints_of(run_dir: Path) -> list[Path]:
    """`run_dir/checkpoints/*.ckpt`, newest first (temporary files of interrupted saves are left out)."""
    found = [p for p in (Path(run_dir) / "checkpoints").glob("*.ckpt") if p.is_file()]
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"), reverse=True)


def _saved_config(checkpoint: dict) -> dict:
    return checkpoint["config"] if isinstance(checkpoint.get("config"), dict) else {}


def run_name_of(checkpoint: dict) -> str | None:
    """The `name` of the run that wrote a checkpoint (None when its config does not say)."""
    return _saved_config(checkpoint).get("name")


def why_not_restorable(checkpoint: dict, stage: str | None = None) -> str | None:
    """Why a run training ``stage`` (its model `_target_`) cannot continue from a loaded checkpoint; None if it can."""
    model = _saved_config(checkpoint).get("model")
    saved_stage = model.get("_target_") if isinstance(model, dict) else None
    if stage is not None and saved_stage not in (None, stage):
        return f"a checkpoint of {saved_stage}, not {stage}"
    if not checkpoint.get("state_dict"):
        return "its state_dict is empty"
    missing = [key for key in ("optimizer_states", "loops", "global_step") if key not in checkpoint]
    if missing:
        return f"it lacks {', '.join(missing)} (not a training checkpoint)"
    return None


def newest_good(candidates: list[Path], name: str | None = None, stage: str | None = None,
                rejected: list[str] | None = None) -> Path | None:  # fmt: skip
    """The first checkpoint a run can continue from (`why_not_restorable`); the others are warned about (and, with
    ``rejected``, listed there as "path (why)"). Checkpoints of another run name are passed over silently."""
    for path in candidates:
        try:
            checkpoint = read_checkpoint(path)
        except (CheckpointError, OSError) as error:
            reason = str(error)
        else:
            if name is not None and run_name_of(checkpoint) not in (None, name):
                continue  # another run's checkpoint: not ours to judge
            reason = why_not_restorable(checkpoint, stage)
        if reason is None:
            return path
        warnings.warn(f"cannot resume from {path}: {reason}; trying the previous checkpoint", ResumeWarning,
                      stacklevel=2)  # fmt: skip
        if rejected is not None:
            rejected.append(f"{path} ({reason})")
    return None


def find_auto(output_dir: Path, name: str, stage: str | None = None, rejected: list[str] | None = None) -> Path | None:
    """`resume=auto`: the newest good checkpoint in ``output_dir`` or a sibling run directory."""
    runs = [output_dir] + [d for d in output_dir.parent.glob("*") if d.is_dir() and d != output_dir]
    runs = [d for d in runs if checkpoints_of(d)]
    runs.sort(key=lambda d: checkpoints_of(d)[0].stat().st_mtime_ns, reverse=True)
    for run_dir in runs:
        found = newest_good(checkpoints_of(run_dir), name, stage, rejected)
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


def _checked(path: Path, key: str, stage: str | None) -> Path:
    """An explicitly named checkpoint, read now: a clear error rather than one after everything is built."""
    try:
        reason = why_not_restorable(read_checkpoint(path), stage)
    except FileNotFoundError:
        raise ConfigError(f"{key}={path}: no such checkpoint file") from None
    if reason is not None:
        raise CheckpointError(f"{key}={path}: cannot resume from it: {reason}")
    return path


def remove_stale_temporaries(folder: Path) -> None:
    """Delete what interrupted saves left in the checkpoint folder a run resumes from (rank 0 only: it alone writes
    checkpoints); never a checkpoint."""
    if rank_zero_only.rank != 0:
        return
    for path in stale_temporaries(folder):
        path.unlink(missing_ok=True)
        log.info(f"removed {path}: a temporary file an interrupted checkpoint save left")


def resolve_resume(cfg: DictConfig) -> str | None:
    """The `ckpt_path` for `trainer.fit`. For a checkpoint found elsewhere, points `paths.output_dir` at its
    run directory and the W&B logger at its run id (edits ``cfg`` in place, before anything is built)."""
    resume, ckpt_path = cfg.get("resume"), cfg.get("ckpt_path")
    stage = (cfg.get("model") or {}).get("_target_")
    if resume in (None, False, "", "none", "null"):
        if not ckpt_path:
            return None
        found = _checked(Path(ckpt_path), "ckpt_path", stage)
        remove_stale_temporaries(found.parent)  # the run writes elsewhere, but a kill there left them
        return str(found)
    if ckpt_path:
        raise ConfigError(f"resume={resume!r} and ckpt_path={ckpt_path!r}: set only one")
    output_dir = Path(cfg.paths.output_dir)
    if resume in AUTO:
        rejected: list[str] = []
        found = find_auto(output_dir, cfg.name, stage, rejected)
        if found is None and rejected and resume == "auto":
            raise CheckpointError(f"resume=auto found {len(rejected)} checkpoint(s) of run {cfg.name!r} but can "
                                  f"continue from none: {'; '.join(rejected)}. Fix or move them, or start fresh "
                                  f"with resume=auto_or_new")  # fmt: skip
        if found is None:
            what = f"none of the {len(rejected)} checkpoints found is good" if rejected else "no checkpoint"
            log.info(f"resume={resume}: {what} of run {cfg.name!r} near {output_dir}; starting fresh")
            return None
    else:
        target = Path(resume)
        if target.is_dir():
            rejected = []
            found = newest_good(checkpoints_of(target), None, stage, rejected)
            if found is None:
                detail = f": {'; '.join(rejected)}" if rejected else ""
                raise ConfigError(f"resume={resume}: no checkpoint to continue from in {target / 'checkpoints'}{detail}")
        elif not target.is_file():
            raise ConfigError(f"resume={resume}: no such checkpoint file or run directory")
        else:
            found = _checked(target, "resume", stage)
    run_dir = found.parent.parent if found.parent.name == "checkpoints" else found.parent
    if run_dir.resolve() != output_dir.resolve():
        with open_dict(cfg):
            cfg.paths.output_dir = str(run_dir)
    remove_stale_temporaries(found.parent)
    wandb_id = wandb_run_id(run_dir)
    if wandb_id and names_target(cfg.get("logger"), wandb_logger):
        with open_dict(cfg):
            cfg.logger.id = wandb_id
            cfg.logger.resume = "allow"
    log.info(f"resuming from {found} in {run_dir}" + (f" (W&B run {wandb_id})" if wandb_id else ""))
    return str(found)
