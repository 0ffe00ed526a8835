"""SDXL on 2 ranks (gloo on CPU), its U-Net taking the pooled text embedding and the size/crop `time_ids` into its
added embedding.

- Two FSDP ranks (tests/test_fsdp.py's harness, SDXL's tiny U-Net) each taking half of a batch give the gradients,
  weights, EMA and optimizer state of one process on the whole batch.
- Real `ldm.train` runs of the tiny SDXL of tests/test_sdxl.py (two text encoders, bucketed shards of mixed sizes).
  Under FSDP (`+trainer/strategy=fsdp`) a fine-tune ends with the checkpoint of the same run under DDP
  (`+trainer/strategy=ddp`): weights, EMA and AdamW moments, the added embedding's included, with a clipping
  threshold that binds; the FSDP run's exported pipeline loads in `StableDiffusionXLPipeline` holding its EMA.
- LoRA on the U-Net and both text encoders under Lightning's own DDP (what `trainer.devices=2` picks: no static
  graph, so a trainable parameter without a gradient would stall it): both ranks end with the same adapters, only
  adapters are checkpointed, and encoder 1's last layer (SDXL reads its penultimate one) does not train.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from test_fsdp import _assert_same_checkpoint, _check
from test_sdxl import root, sdxl_config  # noqa: F401 (root: the tiny SDXL and its shards)

from ldm.models.adapters import is_adapter_key
from ldm.run.fit import run
from ldm.training.checkpoint import read_checkpoint

pytestmark = pytest.mark.slow  # four pairs of rank processes, ~30 s each: ~2.5 min on 2 busy cores (as test_fsdp's runs)


def test_two_fsdp_gloo_ranks_equal_one_process_on_the_doubled_batch(tmp_path):
    _check(tmp_path, "gloo", False, "cpu", checkpointing=True, sdxl=True)

TWO_RANKS = ["trainer.devices=2", "model.ema_decay=0.5"]  # an EMA that moves in 2 steps


def test_sdxl_under_fsdp_ends_with_the_checkpoint_of_ddp_and_exports(root, tmp_path):  # noqa: F811
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    clip = "trainer.gradient_clip_val=0.01"  # binds: a norm over one rank's shard would differ
    run(sdxl_config(root, fsdp, *TWO_RANKS, clip, "+trainer/strategy=fsdp"))
    run(sdxl_config(root, ddp, *TWO_RANKS, clip, "+trainer/strategy=ddp"))
    got, want = (read_checkpoint(r / "checkpoints" / "last.ckpt") for r in (fsdp, ddp))
    _assert_same_checkpoint(got, want)
    state = got["state_dict"]
    assert not any(k.startswith(("vae.", "text_encoder.")) for k in state)  # frozen parts left out
    base = UNet2DConditionModel.from_pretrained(root / "sdxl", subfolder="unet").state_dict()
    added = [k for k in base if k.startswith("add_embedding.")]  # SDXL's pooled-text and time-ids embedding
    assert added and all(not torch.equal(state[f"{p}.{k}"], base[k]) for k in added for p in ("unet", "ema.module"))
    first = read_checkpoint(fsdp / "checkpoints" / "epoch=0-step=1.ckpt")["optimizer_states"][0]["state"]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s["exp_avg"]) for s in first.values()]))
    torch.testing.assert_close(norm.item(), 0.1 * 0.01, rtol=1e-5, atol=0)  # (1 - beta1) * the clipped gradient
    unet = StableDiffusionXLPipeline.from_pretrained(fsdp / "pipeline").unet  # the run's own export
    for name, value in unet.state_dict().items():
        torch.testing.assert_close(value, state[f"ema.module.{name}"], rtol=0, atol=0)


def test_lora_on_the_unet_and_both_text_encoders_under_lightnings_ddp(root, tmp_path, monkeypatch):  # noqa: F811
    run_dir, ranks = tmp_path / "run", tmp_path / "trained"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    run(sdxl_config(root, run_dir, *TWO_RANKS, "model/adapter=lora", "model.adapter.rank=2", "optim.lr=0.05",
                    "model.adapter.text_encoder=true", "+callbacks.ranks._target_=data_parallel.SaveTrainable",
                    f"+callbacks.ranks.path={ranks}"))  # fmt: skip (no +trainer/strategy: Lightning's DDP)
    rank0, rank1 = (torch.load(f"{ranks}.{rank}") for rank in (0, 1))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # gradients averaged
    assert {k.split(".")[1] for k in rank0 if k.startswith("text_encoder.")} == {"text_encoder", "text_encoder_2"}
    assert all(map(is_adapter_key, rank0))
    checkpoint = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    state = checkpoint["state_dict"]
    assert all(is_adapter_key(k) or k.endswith(".n_averaged") for k in state)
    unread = [k for k in state if k.startswith("text_encoder.text_encoder.") and ".layers.1." in k]  # 2 layers
    assert len(unread) == 8 and not any(k in rank0 for k in unread)  # not trained: DDP waits for no gradient there
    assert all(not state[k].any() for k in unread if "lora_B" in k)  # (peft starts lora_B at zero)
    assert sum(len(g["params"]) for g in checkpoint["optimizer_states"][0]["param_groups"]) == len(rank0)
    for key, value in rank0.items():
        if "lora_B" in key:  # every trained adapter moved
            assert state[key].any() and torch.equal(state[key], value), key
