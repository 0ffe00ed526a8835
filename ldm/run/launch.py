"""Start a job's DDP ranks as fresh processes that run the job's resolved config, not its command line.

    nprocs = ranks_to_launch(cfg.trainer)           # 2 for trainer.devices=2 trainer.strategy=ddp
    metrics = launch(cfg, run_dir, nprocs)          # rank 0's train() result; raises RanksFailed
    python -m ldm.run.rank RUN_DIR/launch/config.yaml   # one rank (what torchrun runs nprocs times)

Lightning's subprocess DDP launcher starts ranks > 0 by running `sys.argv` again. Under a Hydra multirun that is
the whole sweep command line: each job relaunches the sweep, and every rank composes its own config (its own
`${now}`, its own output directory). Here the job process resolves its config once, writes it into its run
directory and starts all ranks with torchrun (`torch.distributed.run --standalone`): a free port per job, so
jobs running in parallel do not collide, and when one rank fails torchrun stops the others instead of leaving
them waiting in a collective. Each rank's Lightning sees the torchelastic environment and starts nothing.
Where a cluster already made one process per rank (SLURM tasks, a torchrun of your own), nothing is launched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from lightning_fabric.plugins.environments import LSFEnvironment, SLURMEnvironment, TorchElasticEnvironment
from omegaconf import DictConfig, OmegaConf

# Lightning strategies whose launcher starts ranks in new processes by running the command line again
_RELAUNCHING = ("auto", "ddp", "fsdp", "deepspeed")
_IN_PROCESS = ("spawn", "fork", "notebook")  # ddp_spawn, ddp_fork, ...: they start ranks from the process


class RanksFailed(RuntimeError):
    """A rank of a launched job failed; the message is that rank's error."""


def _processes_exist() -> bool:
    """A cluster or a launcher already started one process per rank (Lightning will not start more)."""
    return "LOCAL_RANK" in os.environ or any(env.detect() for env in (SLURMEnvironment, TorchElasticEnvironment,
                                                                       LSFEnvironment))


def _num_devices(accelerator: str, devices) -> int:
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator in ("gpu", "cuda"):
        from lightning_fabric.accelerators import CUDAAccelerator

        ids = CUDAAccelerator.parse_devices("auto" if devices == "auto" else devices)
        return len(ids) if ids else 0
    if accelerator == "cpu":
        return 1 if devices == "auto" else int(devices)
    return 1  # mps, xla, ...: one process here


def ranks_to_launch(trainer: DictConfig) -> int:
    """How many rank processes this job must start itself: 0 when Lightning runs it in this process."""
    strategy = trainer.get("strategy", "auto")
    name = strategy if isinstance(strategy, str) else str(strategy.get("start_method", "popen"))
    if _processes_exist() or any(word in name for word in _IN_PROCESS):
        return 0
    if isinstance(strategy, str) and not strategy.startswith(_RELAUNCHING):
        return 0
    n = _num_devices(str(trainer.get("accelerator", "auto")), trainer.get("devices", "auto"))
    return n if n > 1 else 0  # several nodes need a cluster (SLURM) or a torchrun per node: processes exist


def launch(cfg: DictConfig, run_dir: str | Path, nprocs: int) -> dict[str, float]:
    """Run ``cfg`` on ``nprocs`` ranks started by torchrun; rank 0's metrics, or RanksFailed with a rank's error."""
    out = Path(run_dir) / "launch"
    out.mkdir(parents=True, exist_ok=True)
    for old in (*out.glob("error_rank*.txt"), out / "result.json"):
        old.unlink(missing_ok=True)
    config_path = out / "config.yaml"
    OmegaConf.save(OmegaConf.to_container(cfg, resolve=True), config_path)  # ${hydra:...}, ${now:...} fixed here
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nprocs}",
               "--log-dir", str(out / "logs"), "--tee", "3", "--monitor-interval", "0.5",
               "-m", "ldm.run.rank", str(config_path)]
    code = subprocess.run(command).returncode
    if code != 0:
        errors = sorted(out.glob("error_rank*.txt"), key=lambda p: p.stat().st_mtime)  # the first is the cause
        if errors:
            rank = errors[0].stem.removeprefix("error_rank")
            last = errors[0].read_text().strip().splitlines()[-1]
            raise RanksFailed(f"rank {rank} of {nprocs}: {last}")
        raise RanksFailed(f"torchrun exited with code {code} (rank logs: {out / 'logs'})")
    return json.loads((out / "result.json").read_text())
