"""SDXL end to end on tiny SDXL-shaped parts saved in the real `StableDiffusionXLPipeline` layout (random weights):
`model=sdxl` through the real Hydra config and Lightning Trainer on bucketed shards of mixed aspect ratios, the size
and crop conditioning traced from the loader into the U-Net, exact resume, and the exports loaded by diffusers' own
`StableDiffusionXLPipeline.from_pretrained` and `load_lora_weights`, giving the images `ldm.sample` gives."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from diffusers import StableDiffusionXLPipeline
from hydra import compose, initialize_config_dir
from PIL import Image
from safetensors import safe_open
from tiny import CONF

from ldm.data.shards import write_shards
from ldm.diffusion import make_scheduler
from ldm.export import main as export_main
from ldm.models.sdxl import save_random_sdxl, sdxl_text_encoders, time_ids
from ldm.run.fit import train
from ldm.run.validate import ConfigError, validate_config
from ldm.stages.load import load_module
from ldm.training.checkpoint import load_checkpoint

PROMPTS = ["a red circle on the left", "a blue square at the top"]
ATOL = 2e-4  # as tests/test_train.py's export check: float32 rounding through different code paths
SIZES = [(40, 24), (24, 40), (32, 32), (28, 20), (20, 28), (48, 32)]  # (width, height)
BUCKETS = "[[16,16],[24,16],[16,24]]"  # (width, height), multiples of 4: the tiny VAE's 2 x the U-Net's 2 levels


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A tiny SDXL directory and a captioned set of mixed aspect ratios (12 images, 3 shards)."""
    root = tmp_path_factory.mktemp("sdxl")
    save_random_sdxl(root / "sdxl", tiny=True)
    rng = np.random.default_rng(0)
    samples = []
    for i in range(12):
        w, h = SIZES[i % len(SIZES)]
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        samples.append((f"{i:06d}", buffer.getvalue(), PROMPTS[i % 2]))
    write_shards(samples, root / "shards", samples_per_shard=4, image_format="keep", progress=False)
    return root


def sdxl_config(root: Path, run_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=[
            "model=sdxl", f"model.unet.path={root / 'sdxl'}", "data=shards", f"data.train_shards={root / 'shards'}",
            "data.resolution=16", f"data.buckets={BUCKETS}", "data.batch_size=2", "data.num_workers=0",
            "data.shuffle_buffer=4", "sampling.num_inference_steps=3", "trainer.accelerator=cpu",
            "trainer.max_steps=2", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", "optim.warmup_steps=1", "logger=csv", "callbacks.fid=null",
            "callbacks.sample_grid.every_n_steps=0", "callbacks.checkpoint.every_n_train_steps=1",
            "name=sdxl", "prompts=[a red circle on the left]",
            f"paths.output_dir={run_dir}", f"paths.data_dir={root}", *overrides])  # fmt: skip


class TraceTimeIds(pl.Callback):
    """Records each training batch's geometry and the time ids the U-Net received for it."""

    def __init__(self):
        self.batches, self.received, self.stepping = [], [], False

    def on_fit_start(self, trainer, pl_module):
        pl_module.unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if self.stepping:  # the training step's forward (not sampling, not the largest-bucket warm-up after it)
            self.received.append(kwargs["added_cond_kwargs"]["time_ids"].detach().clone())

    def on_after_backward(self, trainer, pl_module):
        self.stepping = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.stepping = True
        self.batches.append({k: batch[k].clone() for k in ("original_size", "crop_top_left", "target_size")}
                            | {"shape": tuple(batch["pixel_values"].shape)})  # fmt: skip


@pytest.fixture(scope="module")
def trained(root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    trace = TraceTimeIds()
    from ldm.run import fit

    real = fit.instantiate

    def instantiate(config, *args, **kwargs):  # the trace joins the configured callbacks
        if "callbacks" in kwargs:
            kwargs["callbacks"] = [trace, *kwargs["callbacks"]]
        return real(config, *args, **kwargs)

    fit.instantiate = instantiate
    try:
        metrics = train(sdxl_config(root, run_dir))
    finally:
        fit.instantiate = real
    return run_dir, metrics, trace


def test_a_bucketed_fit_conditions_on_each_samples_real_size_and_crop(trained):
    run_dir, metrics, trace = trained
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert len(trace.batches) == len(trace.received) == 2
    for batch, ids in zip(trace.batches, trace.received):
        b, _, h, w = batch["shape"]
        assert ids.shape == (b, 6)
        expected = time_ids(batch["original_size"], batch["crop_top_left"], batch["target_size"])
        torch.testing.assert_close(ids, expected, rtol=0, atol=0)
        assert (batch["target_size"] == torch.tensor([h, w])).all()  # the bucket the batch holds
        assert (batch["original_size"] >= batch["target_size"]).all()  # covered, never upscaled
        assert (batch["crop_top_left"] >= 0).all() and (
            batch["crop_top_left"] + batch["target_size"] <= batch["original_size"]).all()  # fmt: skip
    assert {tuple(b["shape"][2:]) for b in trace.batches} <= {(16, 16), (16, 24), (24, 16)}
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert not any(k.startswith(("vae.", "text_encoder.")) for k in checkpoint["state_dict"])


def test_export_loads_in_stable_diffusion_xl_pipeline_and_matches_ldm_sample(trained, tmp_path):
    run_dir, _, _ = trained
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    export_main([str(ckpt), str(tmp_path / "pipe")])
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "pipe")
    assert pipe.config.force_zeros_for_empty_prompt
    module = load_module(ckpt)
    for w in (1.0, 4.0):
        expected = pipe(PROMPTS, num_inference_steps=4, guidance_scale=w, height=16, width=16, output_type="pt",
                        generator=torch.Generator().manual_seed(3)).images  # (B, 3, 16, 16)
        ours = module.generate(PROMPTS, seed=3, guidance_scale=w, num_inference_steps=4)
        torch.testing.assert_close(ours, expected.float(), atol=ATOL, rtol=0)
    # a non-square size: the pipeline's default micro-conditioning (original = target = the size, no crop)
    expected = pipe(PROMPTS[:1], num_inference_steps=3, guidance_scale=3.0, height=24, width=16, output_type="pt",
                    generator=torch.Generator().manual_seed(5)).images
    ours = module.generate(PROMPTS[:1], seed=5, guidance_scale=3.0, num_inference_steps=3, size=(24, 16))
    torch.testing.assert_close(ours, expected.float(), atol=ATOL, rtol=0)


def test_the_text_encoder_pair_is_what_the_pipeline_encodes(root):
    pipe = StableDiffusionXLPipeline.from_pretrained(root / "sdxl")
    ours = sdxl_text_encoders(root / "sdxl").condition(PROMPTS)
    hidden, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                                   do_classifier_free_guidance=True)  # fmt: skip
    torch.testing.assert_close(ours["encoder_hidden_states"], hidden, rtol=0, atol=0)
    torch.testing.assert_close(ours["text_embeds"], pooled, rtol=0, atol=0)
    assert not negative.any() and not negative_pooled.any()  # force_zeros_for_empty_prompt: what dropout trains


def test_resume_is_exact(root, tmp_path):
    straight = tmp_path / "straight"
    train(sdxl_config(root, straight, "trainer.max_steps=3"))
    first = tmp_path / "first"
    train(sdxl_config(root, first, "trainer.max_steps=2"))
    resumed = tmp_path / "resumed"
    train(sdxl_config(root, resumed, "trainer.max_steps=3", f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}"))
    a = load_checkpoint(straight / "checkpoints" / "last.ckpt")["state_dict"]
    b = load_checkpoint(resumed / "checkpoints" / "last.ckpt")["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_exports_load_with_load_lora_weights(root, tmp_path):
    run_dir = tmp_path / "run"
    train(sdxl_config(root, run_dir, "model/adapter=lora", "model.adapter.rank=2", "optim.lr=0.05", "trainer.max_steps=3",
                                 "model.ema_decay=null"))  # fmt: skip
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    module = load_module(ckpt)
    ours = module.generate(PROMPTS, seed=3, guidance_scale=4.0, num_inference_steps=3)
    scheduler = make_scheduler(module.sampling["sampler"], module.scheduler_config)  # the run's sampler
    base = StableDiffusionXLPipeline.from_pretrained(root / "sdxl", scheduler=scheduler)
    plain = base(PROMPTS, num_inference_steps=3, guidance_scale=4.0, height=16, width=16, output_type="pt",
                 generator=torch.Generator().manual_seed(3)).images
    assert (ours - plain.float()).abs().max() > 50 * ATOL  # the adapters change the images
    for fmt, out in (("diffusers-lora", tmp_path / "lora"), ("kohya", tmp_path / "kohya.safetensors")):
        export_main([str(ckpt), str(out), "--format", fmt])
        pipe = StableDiffusionXLPipeline.from_pretrained(root / "sdxl", scheduler=scheduler)
        pipe.load_lora_weights(str(out))
        images = pipe(PROMPTS, num_inference_steps=3, guidance_scale=4.0, height=16, width=16, output_type="pt",
                      generator=torch.Generator().manual_seed(3)).images
        diff = float((ours - images.float()).abs().max())
        assert diff <= ATOL, f"{fmt}: images differ by {diff}"
    # kohya's SDXL naming: the U-Net's layers by their openaimodel names (sd-scripts' sdxl_original_unet), e.g.
    # lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q; every key one of a layer's three tensors
    with safe_open(str(tmp_path / "kohya.safetensors"), "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    layer = r"lora_unet_(input_blocks_\d+_1|middle_block_1|output_blocks_\d+_1)_transformer_blocks_\d+_attn[12]_to_(q|k|v|out_0)"
    assert keys and all(re.fullmatch(layer + r"\.(lora_down\.weight|lora_up\.weight|alpha)", k) for k in keys), keys[:3]
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_network_dim"] == "2"
    # and such a file continues a run (the adapters it holds, bit for bit)
    again = tmp_path / "again"
    train(sdxl_config(root, again, "model/adapter=lora", "model.adapter.rank=2", "model.ema_decay=null", "optim.lr=0",
                      f"model.adapter.init_from={tmp_path / 'kohya.safetensors'}", "trainer.max_steps=1"))  # fmt: skip
    first, second = load_module(ckpt), load_module(again / "checkpoints" / "last.ckpt")
    lora = {k: v for k, v in first.state_dict().items() if "lora_" in k and k.startswith("unet.")}
    assert lora and all(torch.equal(v, second.state_dict()[k]) for k, v in lora.items())


def test_sdxl_mistakes_are_one_line_in_seconds(root, tmp_path):
    broken = tmp_path / "broken"
    save_random_sdxl(broken, tiny=True)
    import shutil

    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(ConfigError, match=r"^model\.text_encoder\.path=.*: no text_encoder_2/config\.json"):
        validate_config(sdxl_config(root, tmp_path / "r1", f"model.text_encoder.path={broken}"))
    with pytest.raises(ConfigError, match=r"^model\.unet takes SDXL's pooled text embedding"):
        validate_config(sdxl_config(root, tmp_path / "r2", "model/text_encoder=hf_clip",
                                    f"model.text_encoder.path={root / 'sdxl'}"))  # fmt: skip
