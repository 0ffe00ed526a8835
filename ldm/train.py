"""Train a stage (CLIP, VAE or latent diffusion) from a Hydra config.

    python -m ldm.train experiment=shapes                      # the built-in default (see `make train`)
    python -m ldm.train experiment=shapes trainer.max_steps=50 logger=csv
    python -m ldm.train experiment=shapes ckpt_path=runs/.../checkpoints/last.ckpt   # resume
    python -m ldm.train experiment=shapes resume=auto     # continue the newest valid checkpoint of this run
    python -m ldm.train -m experiment=shapes optim.lr=1e-4,3e-4                     # a sweep (ldm/sweeps/)

Every run writes its checkpoints, samples and resolved config under its own Hydra run directory. A single run
is checked (`ldm.run.validate`: every key against its schema, model configs, shards) before torch, Lightning
and the model libraries are imported, then goes to `ldm.run.fit.run`; only a multirun's jobs go through the
sweep code (`ldm.sweeps.job`). Any stop is one line (`error: ...`, exit 1); HYDRA_FULL_ERROR=1 shows tracebacks.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from ldm.run.overrides import UsageError, added_keys, command_line, explain_hydra_error, quote_shard_patterns
from ldm.run.validate import validate_config
from ldm.utils.cli import full_errors, run_command, silence_notices, warnings_to_log_files
from ldm.utils.secrets import redact_argv, redact_files, redact_hydra_writes, redact_logging
from ldm.utils.sweep_index import register_resolvers

register_resolvers()  # ${ldm.run_name:...} and friends in conf/ (the checks resolve the config)
redact_hydra_writes()  # Hydra writes .hydra/*.yaml (and multirun.yaml) before a job runs: redacted as written


@contextmanager
def _environ(name: str, value: str | None):
    """Set (or, for None, unset) an environment variable for the block (processes started inside inherit it)."""
    def put(v: str | None) -> None:
        if v is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = v

    before = os.environ.get(name)
    put(value)
    try:
        yield
    finally:
        put(before)


USER_FULL_ERROR = os.environ.get("HYDRA_FULL_ERROR")  # main() sets it for Hydra; this is what the user set
FULL_ERRORS = full_errors()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def task(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    redact_argv()
    redact_logging()  # Hydra's console and train.log: no secret in what a run prints
    warnings_to_log_files()  # skipped samples, conversions, put-off evaluations: in train.log as well as on stderr
    silence_notices()  # "install litlogger", "install accelerate": not in every run's output
    if hydra_cfg.output_subdir:
        redact_files(Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir)
    with _environ("HYDRA_FULL_ERROR", USER_FULL_ERROR):  # what the user set, for the processes this run starts
        if hydra_cfg.mode == RunMode.MULTIRUN:
            # imported here, not at the top: torch, Lightning and the model libraries take 10-40 s to import, and
            # a single run's config mistake must be reported before that (see `_run`)
            from ldm.sweeps.job import run_job

            return run_job(cfg)  # index entry, failure capture, the sweeper's objective (each job is checked there)
        code = run_command(_run, cfg, added_keys(hydra_cfg.overrides.task), full=FULL_ERRORS)
    if code:
        sys.exit(code)  # past Hydra, which would add a line of its own for an error
    return None


def _run(cfg: DictConfig, added: set[str]) -> None:
    validate_config(cfg, added)  # seconds: nothing heavy is imported yet
    from ldm.callbacks.preemption import Preempted  # the heavy imports, only now (see above)
    from ldm.run.fit import run

    try:
        run(cfg)
    except Preempted as preempted:
        sys.exit(preempted.exit_code)


def main() -> None:
    """`python -m ldm.train ...`: Hydra raises its own errors here (HYDRA_FULL_ERROR), to be said in one line."""
    try:
        sys.argv[:] = command_line(sys.argv)  # an unknown option in one line, not argparse's usage text
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)  # a usage mistake, as argparse's
    quote_shard_patterns(sys.argv)
    with _environ("HYDRA_FULL_ERROR", "1"):
        code = run_command(task, explain=lambda error: explain_hydra_error(error, sys.argv), full=FULL_ERRORS)
    sys.exit(code)


if __name__ == "__main__":
    main()
