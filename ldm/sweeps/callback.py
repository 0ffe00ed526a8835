"""The Hydra callback of every multirun (conf/hydra/default.yaml): opens the sweep's index when the sweep starts
(swept keys, W&B group, command) and, when it ends, closes it (jobs that died without a word are marked failed)
and writes the report (`ldm.sweeps.report`).
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ldm.sweeps.report import write_report
from ldm.utils.sweep_index import locked, read_index, sweep_group, swept_keys, write_index

log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")


class SweepCallback(Callback):
    """Opens the sweep's index (swept keys, W&B group, command) and, at the end, closes it and writes the report."""

    def __init__(self, report: bool = True):
        self.report = report

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        keys = swept_keys(config.hydra.overrides.task, OmegaConf.select(config, "hydra.sweeper.params"))
        with locked(sweep_dir):
            write_index(sweep_dir, {"name": config.name, "group": sweep_group(config.name, sweep_dir),
                                    "params": keys, "command": " ".join(sys.argv), "started": _now(), "jobs": []})

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
