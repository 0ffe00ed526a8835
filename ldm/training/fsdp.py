"""FSDP for latent diffusion: the U-Net sharded across ranks, everything else left whole on every rank.

    python -m ldm.train experiment=... trainer.devices=8 +trainer/strategy=fsdp      # conf/trainer/strategy/fsdp.yaml
    Trainer(strategy=ShardedUNetStrategy(block_classes=["diffusers.models.resnet.ResnetBlock2D"]), devices=8)

Lightning's FSDPStrategy wraps the whole LightningModule in one FSDP root, which would also flatten and shard the
frozen VAE and text encoder and the EMA copy. This strategy wraps only `module.unet` (the parameters the optimizer
holds): one FSDP unit per block class named in `block_classes` (ResnetBlock2D, Transformer2DModel) plus the U-Net's
own root unit, so parameters, gradients and AdamW moments are split across ranks, with Lightning's FSDP mixed
precision (`FSDPPrecision`: under bf16-mixed, parameters are gathered and gradients reduced in bf16).
The rest stays an ordinary module on every rank: the frozen parts, and the EMA, which the module updates from the
gathered full weights (`LatentDiffusion.optimizer_step`), so sampling, FID and export read it locally, on any rank.

Checkpoints are full state dicts assembled on rank 0 (for models of Stable Diffusion size a file is a few GiB):
the same keys and optimizer layout as a one-process run, written by the trainer's CheckpointIO (atomic, sha256),
read back with weights_only=True, and loadable by `ldm.sample`, `ldm.export` and one-process training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class
from pytorch_lightning.strategies import FSDPStrategy
from pytorch_lightning.trainer.states import TrainerFn
from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, OptimStateKeyType, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP


def full_state_dict(module: torch.nn.Module, rank0_only: bool, device: torch.device):
    """The context in which every FSDP unit inside ``module`` reads and writes full (unsharded) tensors, copied to
    the CPU from an accelerator. Not "offloaded" when already on the CPU: there (torch 2.15, gloo) FSDP's offload
    hands back one buffer for every state of a parameter, so a saved AdamW `exp_avg` reads as `exp_avg_sq`."""
    offload = device.type != "cpu"
    return FSDP.state_dict_type(module, StateDictType.FULL_STATE_DICT,
                                FullStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
                                FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only))  # fmt: skip


def full_params(module: torch.nn.Module):
    """A context in which ``module``'s parameters hold their full values on every rank (a collective: every rank
    enters it); a no-op for a module that is not sharded. Changes made inside are not written back."""
    if isinstance(module, FSDP):
        return FSDP.summon_full_params(module, writeback=False)
    return contextlib.nullcontext()


def full_optimizer_state(sharded: FSDP, optimizer: torch.optim.Optimizer, device: torch.device) -> dict[str, Any]:
    """The optimizer's state gathered from all ranks (a collective) in torch.optim's one-process layout: keyed by
    position in ``sharded.parameters()``; the full state on rank 0, {} elsewhere."""
    with full_state_dict(sharded, True, device):
        state = FSDP.optim_state_dict(sharded, optimizer)
    if torch.distributed.get_rank() != 0:
        return {}
    return FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, sharded)


def load_full_optimizer_state(sharded: FSDP, optimizer: torch.optim.Optimizer, state: Mapping[str, Any],
                              device: torch.device) -> None:
    """Load a full optimizer state (`full_optimizer_state`'s, or a one-process run's) into this rank's shards;
    every rank passes the full state."""
    with full_state_dict(sharded, False, device):
        if state["state"] and all(isinstance(k, int) for k in state["state"]):
            state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_NAME, sharded)
        optimizer.load_state_dict(FSDP.optim_state_dict_to_load(sharded, optimizer, state))


class ShardedUNetStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy (FSDP1, `use_orig_params`), sharding only the submodule named `sharded_module`.

    block_classes: dotted names of the classes that become their own FSDP unit (the wrap policy).
    Other arguments are FSDPStrategy's (sharding_strategy, cpu_offload, activation_checkpointing_policy, ...);
    `state_dict_type` must stay "full"."""

    strategy_name = "fsdp_unet"

    def __init__(self, block_classes: Sequence[str] = (), sharded_module: str = "unet", **kwargs: Any):
        if kwargs.get("state_dict_type", "full") != "full":
            raise ValueError(f"trainer.strategy.state_dict_type={kwargs['state_dict_type']!r}: only 'full' "
                             f"checkpoints are written (one file, readable by ldm.sample and ldm.export)")  # fmt: skip
        classes = {get_class(name) for name in block_classes}
        super().__init__(auto_wrap_policy=classes or None, **kwargs)
        self.sharded_module = sharded_module

    def _sharded(self) -> FSDP:
        return getattr(self.lightning_module, self.sharded_module)

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        inner = getattr(model, self.sharded_module, None)
        if not isinstance(inner, torch.nn.Module):
            raise TypeError(f"{type(model).__name__} has no submodule {self.sharded_module!r} to shard "
                            f"(trainer.strategy.sharded_module)")  # fmt: skip
        model.to(self.root_device)  # what stays whole (frozen parts, EMA, buffers); FSDP shards the rest from here
        sharded = FSDP(
            inner,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=self.root_device,  # a torch.device: FSDP also runs on CPU (gloo) with it, not with None
            **self.kwargs,
        )
        setattr(model, self.sharded_module, sharded)
        if self._activation_checkpointing_kwargs:
            from lightning_fabric.strategies.fsdp import _setup_activation_checkpointing

            _setup_activation_checkpointing(sharded, self._activation_checkpointing_kwargs)
        return model

    # --- checkpoints: full state dicts, the optimizer keyed as in a one-process run ---------------------
    def lightning_module_state_dict(self) -> dict[str, Any]:
        with full_state_dict(self.model, True, self.root_device):  # every rank gathers; rank 0 keeps the tensors
            return self.model.state_dict()

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        return full_optimizer_state(self._sharded(), getattr(optimizer, "_optimizer", optimizer), self.root_device)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Read the file as the trainer's CheckpointIO reads it (weights only), load the optimizer states into the
        shards; the weights follow in `load_model_state_dict`, after the module's `on_load_checkpoint`."""
        path = Path(self.broadcast(str(checkpoint_path)))
        if path.is_dir():
            raise ValueError(f"{path} is a directory: {type(self).__name__} resumes from full (one-file) checkpoints")
        checkpoint = self.checkpoint_io.load_checkpoint(path)
        states = checkpoint.get("optimizer_states")
        if states is None or self.lightning_module.trainer.state.fn != TrainerFn.FITTING:
            return checkpoint
        if len(states) != len(self.optimizers):
            raise RuntimeError(f"{path} holds {len(states)} optimizer states, the run has {len(self.optimizers)}")
        for optimizer, state in zip(self.optimizers, states):
            load_full_optimizer_state(self._sharded(), optimizer, state, self.root_device)
        return checkpoint

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        with full_state_dict(self.model, False, self.root_device):  # every rank reads the full tensors, keeps its shard
            self.model.load_state_dict(checkpoint["state_dict"], strict=strict)
