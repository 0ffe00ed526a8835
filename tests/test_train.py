"""End to end on tiny real components: Hydra config -> real Lightning Trainer on real shards ->
checkpoint -> resume, sampling and a diffusers pipeline export that StableDiffusionPipeline loads."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from tiny import compose_config, make_tiny_root

from ldm.diffusion import make_scheduler
from ldm.run.fit import train
from ldm.stages.load import load_module
from ldm.training.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return make_tiny_root(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose_config(tiny_root, run_dir, ["logger=csv"])
    metrics = train(cfg)
    return run_dir, metrics


def test_fit_logs_and_writes_checkpoint_without_frozen_parts(trained):
    run_dir, metrics = trained
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2
    keys = ckpt["state_dict"].keys()
    assert any(k.startswith("unet.") for k in keys) and any(k.startswith("ema.") for k in keys)
    assert not any(k.startswith(("vae.", "text_encoder.")) for k in keys)
    assert ckpt["config"]["model"]["_target_"].endswith("LatentDiffusion")
    # only the U-Net has optimizer state
    n_unet = sum(1 for k in keys if k.startswith("unet."))
    assert len(ckpt["optimizer_states"][0]["state"]) == n_unet
    assert (run_dir / "samples" / "step_000002.png").is_file()
    assert (run_dir / "csv").is_dir()


def test_resume_continues_step_count(trained, tiny_root, tmp_path):
    run_dir, _ = trained
    cfg = compose_config(tiny_root, tmp_path, ["logger=none", "trainer.max_steps=3",
                                                f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"])
    train(cfg)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 3


def test_frozen_parts_are_frozen(trained):
    run_dir, _ = trained
    module = load_module(run_dir / "checkpoints" / "last.ckpt")
    module.train()
    for part in (module.vae, module.text_encoder):
        assert not part.training
        assert not any(p.requires_grad for p in part.parameters())


def test_export_loads_in_diffusers_and_matches_ldm_sample(trained, tmp_path):
    from ldm.export import main as export_main
    from ldm.sample import main as sample_main

    run_dir, _ = trained
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    export_main([str(ckpt), str(tmp_path / "pipe")])
    assert (tmp_path / "pipe" / "model_index.json").is_file()
    assert list((tmp_path / "pipe" / "unet").glob("*.safetensors"))

    prompts = ["a large red circle in the center", "a small blue square at the top left"]
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    for w in (1.0, 4.0):
        expected = pipe(prompts, num_inference_steps=4, guidance_scale=w, output_type="pt",
                        generator=torch.Generator().manual_seed(3)).images  # (B, 3, 16, 16)
        module = load_module(ckpt)
        ours = module.generate(prompts, seed=3, guidance_scale=w, num_inference_steps=4)
        torch.testing.assert_close(ours, expected.float(), atol=2e-4, rtol=0)

    out = sample_main([str(ckpt), "--prompt", prompts[0], "--steps", "2", "--out", str(tmp_path / "s.png")])
    assert out.is_file()


def test_negative_prompt_and_img2img_match_the_diffusers_pipelines(trained, tmp_path):
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    from ldm.export import main as export_main
    from ldm.sample import main as sample_main

    run_dir, _ = trained
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    export_main([str(ckpt), str(tmp_path / "pipe")])
    module = load_module(ckpt)
    prompts = ["a large red circle in the center", "a small blue square at the top left"]
    negative = "a small green triangle at the bottom"
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    expected = pipe(prompts, negative_prompt=[negative] * 2, num_inference_steps=4, guidance_scale=4.0, output_type="pt",
                    generator=torch.Generator().manual_seed(3)).images
    ours = module.generate(prompts, seed=3, guidance_scale=4.0, num_inference_steps=4, negative_prompt=negative)
    torch.testing.assert_close(ours, expected.float(), atol=2e-4, rtol=0)
    plain = module.generate(prompts, seed=3, guidance_scale=4.0, num_inference_steps=4)
    assert (ours - plain).abs().max() > 1e-3  # the negative prompt changed the images

    # img2img from a PNG through the command line, against diffusers' img2img pipeline on the export
    rng = torch.Generator().manual_seed(0)
    pixels = (torch.rand(module.resolution, module.resolution, 3, generator=rng) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(tmp_path / "init.png")
    img2img = StableDiffusionImg2ImgPipeline.from_pretrained(tmp_path / "pipe")
    for sampler in ("lms", "ddim"):
        sample_main([str(ckpt), "--prompt", prompts[0], "--prompt", prompts[1], "--init-image", str(tmp_path / "init.png"),
                     "--strength", "0.75", "--seed", "5", "--steps", "4", "--guidance-scale", "4", "--sampler", sampler,
                     "--out", str(tmp_path / "grid.png"), "--out-dir", str(tmp_path / sampler)])  # fmt: skip
        img2img.scheduler = make_scheduler(sampler, module.scheduler_config)
        expected = img2img(prompts, image=Image.open(tmp_path / "init.png"), strength=0.75, num_inference_steps=4,
                           guidance_scale=4.0, generator=torch.Generator().manual_seed(5), output_type="np").images
        for i in range(2):
            written = np.asarray(Image.open(tmp_path / sampler / f"{i:04d}.png")).astype(int)
            assert np.abs(written - np.round(expected[i] * 255).astype(int)).max() <= 1  # PNG rounding
    # strength matters: a small strength stays close to the init image as the VAE gives it back (the tiny VAE
    # cannot reproduce noise pixels; the image strength 0 would give), a large one does not
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1
    near, far = (module.generate(prompts[:1], seed=5, num_inference_steps=4, strength=s, init_image=x)
                 for s in (0.25, 1.0))  # fmt: skip
    init = module.decode_latents(module.encode_init_image(x, 1, torch.Generator().manual_seed(5)))
    assert (near - init).abs().mean() < (far - init).abs().mean()  # 0.052 against 0.121 here


def test_wandb_offline_run_holds_config_metrics_and_samples(tiny_root, tmp_path, monkeypatch, caplog):
    from wandb_offline import config, history, run_files

    caplog.set_level(logging.INFO)

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = compose_config(tiny_root, tmp_path, ["logger=wandb", "callbacks.sample_grid.every_n_steps=1"])
    train(cfg)
    (run_file,) = run_files(tmp_path / "wandb")
    logged = config(run_file)
    assert logged["model"]["_target_"] == "ldm.stages.latent_diffusion.LatentDiffusion"
    assert logged["diffusion"]["cfg_dropout"] == 0.1
    rows = history(run_file)
    metrics = {k for row in rows for k in row}
    assert {"train/loss", "train/lr", "train/images_per_sec", "train/images_seen", "samples/captions"} <= metrics
    elapsed = [row["train/elapsed_seconds"] for row in rows if "train/elapsed_seconds" in row]
    assert elapsed and all(0 < a <= b for a, b in zip(elapsed, elapsed[1:]))  # wall time since the fit started
    startup = [m for m in caplog.messages if m.startswith("start-up: ")]  # where start-up went, said once each
    assert [m.split(" took ")[0].split(" began ")[0] for m in startup] == ["start-up: the training loop",
                                                                        "start-up: the first step"], startup
    samples = [row for row in rows if "samples/captions" in row]
    assert len(samples) == 3  # steps 1, 2 and the end of training
    assert samples[-1]["samples/captions"] == list(cfg.prompts)
    assert samples[-1]["samples/count"] == len(cfg.prompts)
