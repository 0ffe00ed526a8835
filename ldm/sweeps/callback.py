"""The Hydra callback of every multirun (conf/hydra/default.yaml): opens the sweep's index when the sweep starts
(swept keys, W&B group, command) and, when it ends, closes it (jobs that died without a word are marked failed)
and writes the report (`ldm.sweeps.report`). Secrets given on the command line are redacted in everything a sweep
writes and prints: the index, Hydra's `multirun.yaml` (as each job starts, and at the end), the launcher's log lines.
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ldm.sweeps.report import write_report
from ldm.utils.secrets import redact_argv, redact_files, redact_logging
from ldm.utils.sweep_index import locked, read_index, sweep_group, swept_keys, write_index

log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")


class SweepCallback(Callback):
    """Opens the sweep's index (swept keys, W&B group, command) and, at the end, closes it and writes the report."""

    def __init__(self, report: bool = True):
        self.report = report

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        redact_logging()  # the launcher prints every job's overrides: `#0 : optim.lr=1e-4 +api_key=...`
        redact_argv()
        sweep_dir = Path(config.hydra.sweep.dir)
        keys = swept_keys(config.hydra.overrides.task, OmegaConf.select(config, "hydra.sweeper.params"))
        with locked(sweep_dir):
            write_index(sweep_dir, {"name": config.name, "group": sweep_group(config.name, sweep_dir),
                                    "params": keys, "command": " ".join(sys.argv), "started": _now(), "jobs": []})

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        """Each job of a multirun (in its own process with some launchers): the sweeper has written `multirun.yaml`
        by now, with the command line in clear; redact it, and this process's logging."""
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
