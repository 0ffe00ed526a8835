"""The Hydra callback of every multirun (conf/hydra/default.yaml): checks every job's config before the first starts
(as a single run's is checked: one line naming the key, exit code 1), opens the sweep's index (swept keys, W&B
group, command) and, when the sweep ends, closes it (jobs that died without a word are marked failed), writes the
report (`ldm.sweeps.report`) and fails the command when no job completed. Secrets given on the command line are
redacted in everything a sweep writes and prints: Hydra's `multirun.yaml` and each job's `.hydra/` as Hydra writes
them (`ldm.utils.secrets.redact_hydra_writes`), the index, the launcher's log lines.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import datetime
from pathlib import Path

from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from ldm.run.overrides import added_keys
from ldm.run.validate import ConfigError, validate_config
from ldm.sweeps.report import write_report
from ldm.utils.cli import CarriedError
from ldm.utils.secrets import redact, redact_argv, redact_files, redact_hydra_writes, redact_logging
from ldm.utils.sweep_index import locked, read_index, sweep_group, swept_keys, write_index

log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")


BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


class SweepFailed(RuntimeError):
    """No job of a multirun completed."""


def job_overrides(config: DictConfig) -> list[list[str]]:
    """Each job's overrides, as Hydra's basic sweeper will split them (its `params`, then the command line's); for
    another sweeper (Optuna: it draws the values as it goes), the overrides every job shares."""
    task = list(config.hydra.overrides.task)
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    if OmegaConf.select(config, "hydra.sweeper._target_") == BASIC_SWEEPER:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        params = OmegaConf.select(config, "hydra.sweeper.params") or {}
        parsed = parser.parse_overrides([f"{key}={value}" for key, value in params.items()] + task)
        return [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    return [[o.input_line for o in parser.parse_overrides(task) if not o.is_sweep_override()]]


def check_jobs(config: DictConfig) -> None:
    """Check every job's config before the first job starts, as `ldm.train` checks a single run's (seconds, nothing
    heavy): each composed as Hydra's launcher composes it. ConfigError naming the key (and the job, in a sweep of
    several); Hydra's own composition errors as Hydra raises them."""
    loader = GlobalHydra.instance().config_loader()
    jobs = job_overrides(config)
    swept = set(swept_keys(config.hydra.overrides.task, OmegaConf.select(config, "hydra.sweeper.params")))
    before = HydraConfig.instance().cfg
    try:
        for num, overrides in enumerate(jobs):
            job = loader.load_sweep_config(config, overrides)
            with open_dict(job):
                job.hydra.job.id = job.hydra.job.num = num
                out_dir = os.path.join(str(OmegaConf.select(job, "hydra.sweep.dir")),
                                       str(OmegaConf.select(job, "hydra.sweep.subdir")))  # fmt: skip
            with read_write(job.hydra.runtime), open_dict(job.hydra.runtime):
                job.hydra.runtime.output_dir = os.path.abspath(out_dir)
            HydraConfig.instance().set_config(job)  # ${hydra:...} resolves as in the job
            with read_write(job), open_dict(job):
                del job["hydra"]  # what the task gets
            try:
                validate_config(job, added_keys(overrides))
            except ConfigError as error:
                values = " ".join(o for o in overrides if o.partition("=")[0].lstrip("+~") in swept)
                where = f" (job {num} of {len(jobs)}: {values})" if len(jobs) > 1 else ""
                raise ConfigError(redact(f"{error}{where}")) from None
    finally:
        HydraConfig.instance().cfg = before


class SweepCallback(Callback):
    """Opens the sweep's index (swept keys, W&B group, command) and, at the end, closes it and writes the report."""

    def __init__(self, report: bool = True):
        self.report = report

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        """Before the sweeper writes anything: secrets redacted from what it writes and logs, every job's config
        checked (a mistake stops the command in one line: Hydra only warns about a callback's errors)."""
        redact_logging()  # the launcher prints every job's overrides: `#0 : optim.lr=1e-4 +api_key=...`
        redact_argv()
        redact_hydra_writes()  # multirun.yaml, next, and each job's .hydra/
        try:
            check_jobs(config)
        except Exception as error:  # noqa: BLE001: any error here stops the sweep before it starts
            raise CarriedError(error) from error
        sweep_dir = Path(config.hydra.sweep.dir)
        keys = swept_keys(config.hydra.overrides.task, OmegaConf.select(config, "hydra.sweeper.params"))
        with locked(sweep_dir):
            write_index(sweep_dir, {"name": config.name, "group": sweep_group(config.name, sweep_dir),
                                    "params": keys, "command": " ".join(sys.argv), "started": _now(), "jobs": []})

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        """Each job of a multirun (in its own process with some launchers): this process's logging redacted, and
        the sweep's YAML files once more (Hydra's own are written redacted already, `redact_hydra_writes`; a
        sweeper plugin may write others)."""
        if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
            return
        redact_logging()
        sweep_dir = Path(HydraConfig.get().sweep.dir)
        with locked(sweep_dir):
            redact_files(sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        with locked(sweep_dir):
            index = read_index(sweep_dir)
            for job in index["jobs"]:
                if job["status"] == "running":  # its process died without a word (killed, out of memory)
                    job.update(status="failed", error="the job ended without reporting a result")
            index["finished"] = _now()
            write_index(sweep_dir, index)
        failed = [job for job in index["jobs"] if job["status"] == "failed"]
        log.info(f"sweep {sweep_dir}: {len(index['jobs']) - len(failed)} of {len(index['jobs'])} jobs completed")
        for job in failed:
            log.warning(f"job {job['num']} ({job['name']}) failed: {job['error']}")
        if self.report:
            for path in write_report(sweep_dir):
                log.info(f"report -> {path}")
        with locked(sweep_dir):
            redact_files(sweep_dir)  # the sweeper's own files (multirun.yaml, optimization_results.yaml)
        if len(failed) == len(index["jobs"]):  # a sweep that trained nothing is a failed command
            first = f": job {failed[0]['num']} failed: {failed[0]['error']}" if failed else ""
            raise CarriedError(SweepFailed(redact(f"sweep {sweep_dir}: none of its {len(index['jobs'])} jobs "
                                                  f"completed{first}")))  # fmt: skip
