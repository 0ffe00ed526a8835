"""LoRA on SDXL's two text encoders (and its U-Net), end to end on the tiny SDXL of tests/test_sdxl.py: `model=sdxl
model/adapter=lora model.adapter.text_encoder=true` through the real Hydra config and Lightning Trainer, then every
export loaded by diffusers' own `StableDiffusionXLPipeline` (`load_lora_weights` for the kohya `lora_te1_` /
`lora_te2_` file and the diffusers file, `from_pretrained` for the merged pipeline), giving the images `ldm.sample`
gives; only the adapters train and are saved, resume is exact, and the files continue a run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import save_file
from test_sdxl import ATOL, PROMPTS, root, sdxl_config  # noqa: F401 (root: the tiny SDXL and its shards)
from transformers import CLIPTextModel

from ldm.diffusion import make_scheduler
from ldm.export import main as export_main
from ldm.models.adapters import has_adapter, is_adapter_key, lora_weights
from ldm.models.formats.kohya import kohya_name
from ldm.run.fit import train
from ldm.run.validate import ConfigError
from ldm.stages.load import load_module
from ldm.training.checkpoint import load_checkpoint

LORA = ["model/adapter=lora", "model.adapter.rank=2", "model.adapter.text_encoder=true"]
KOHYA_KEY = re.compile(r"^lora_(unet|te1|te2)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
TEXT_PARTS = ("text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def te_run(root, tmp_path_factory) -> Path:  # noqa: F811
    """Two steps at a high learning rate with an EMA that moves (decay 0.5): adapters on the U-Net and both encoders."""
    run_dir = tmp_path_factory.mktemp("sdxl_te")
    train(sdxl_config(root, run_dir, *LORA, "optim.lr=0.05", "model.ema_decay=0.5"))
    return run_dir


def generate(module, seed: int = 3) -> torch.Tensor:
    return module.generate(PROMPTS, seed=seed, guidance_scale=4.0, num_inference_steps=3)


def pipe_images(pipe, seed: int = 3) -> torch.Tensor:
    return pipe(PROMPTS, num_inference_steps=3, guidance_scale=4.0, height=16, width=16, output_type="pt",
                generator=torch.Generator().manual_seed(seed)).images.float()  # fmt: skip


def base_pipe(root: Path, module) -> StableDiffusionXLPipeline:  # noqa: F811
    scheduler = make_scheduler(module.sampling["sampler"], module.scheduler_config)  # the run's sampler
    return StableDiffusionXLPipeline.from_pretrained(root / "sdxl", scheduler=scheduler)


def test_only_the_adapters_of_the_unet_and_both_encoders_train_and_are_checkpointed(te_run):
    ckpt = load_checkpoint(te_run / "checkpoints" / "last.ckpt")
    keys = list(ckpt["state_dict"])
    assert [k for k in keys if not is_adapter_key(k) and not k.endswith(".n_averaged")] == []
    assert {k.split(".")[0] for k in keys} == {"unet", "ema", "text_encoder", "ema_text_encoder"}
    for part in TEXT_PARTS:  # both encoders' attention projections, in the model and in its EMA
        for prefix in ("text_encoder", "ema_text_encoder.module"):
            assert any(k.startswith(f"{prefix}.{part}.") and ".q_proj.lora_B." in k for k in keys), (prefix, part)
    # SDXL reads encoder 1's penultimate layer: its last layer's adapters (there, as sd-scripts and diffusers' SDXL
    # scripts put them) get no gradient and are not in the optimizer; every other adapter tensor has both
    module = load_module(te_run / "checkpoints" / "last.ckpt")
    last = f"layers.{module.text_encoder.text_encoder.config.num_hidden_layers - 1}."
    unused = [k for k in keys if k.startswith("text_encoder.text_encoder.") and last in k]
    trained = [k for k in keys if k.startswith(("unet.", "text_encoder."))]
    optimizer = ckpt["optimizer_states"][0]
    assert len(unused) == 8 and len(optimizer["state"]) == len(trained) - len(unused)
    assert sum(len(g["params"]) for g in optimizer["param_groups"]) == len(trained) - len(unused)
    for part, model in module.text_encoder.text_models().items():  # peft starts lora_B at zero: these moved
        weights = lora_weights(model)
        assert len(weights) == 4 * model.config.num_hidden_layers, part
        assert all(w.up.abs().max() > 0 for n, w in weights.items() if not (part == "text_encoder" and last in n)), part
        ema = lora_weights(module.ema_text_encoder.module.text_models()[part])
        assert any(not torch.equal(ema[n].up, weights[n].up) for n in weights), part  # the EMA is an average


def test_kohya_and_diffusers_files_load_in_the_sdxl_pipeline_and_match_ldm_sample(te_run, root, tmp_path):  # noqa: F811
    ckpt = te_run / "checkpoints" / "last.ckpt"
    module = load_module(ckpt)
    ours = generate(module)
    kohya_path = export_main([str(ckpt), str(tmp_path / "sdxl_te.safetensors"), "--format", "kohya"])
    diffusers_path = export_main([str(ckpt), str(tmp_path / "lora"), "--format", "diffusers-lora"])
    with safe_open(str(kohya_path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert all(KOHYA_KEY.match(k) for k in tensors), [k for k in tensors if not KOHYA_KEY.match(k)][:3]
    for prefix, part in (("lora_te1", "text_encoder"), ("lora_te2", "text_encoder_2")):  # sd-scripts' SDXL names
        model = module.text_encoder.text_models()[part]
        expected = {kohya_name(prefix, f"text_model.encoder.layers.{i}.self_attn.{p}")
                    for i in range(model.config.num_hidden_layers) for p in ("q_proj", "k_proj", "v_proj", "out_proj")}  # fmt: skip
        assert {k.split(".")[0] for k in tensors if k.startswith(prefix + "_")} == expected
    with safe_open(str(diffusers_path), "pt") as f:
        assert {k.split(".")[0] for k in f.keys()} == {"unet", "text_encoder", "text_encoder_2"}

    assert (ours - pipe_images(base_pipe(root, module))).abs().max() > 50 * ATOL  # the adapters change the images
    for path in (kohya_path, diffusers_path.parent):
        pipe = base_pipe(root, module)
        pipe.load_lora_weights(str(path))
        assert has_adapter(pipe.text_encoder) and has_adapter(pipe.text_encoder_2), path
        diff = float((ours - pipe_images(pipe)).abs().max())
        assert diff <= ATOL, f"{path.name}: images differ by {diff}"
    # each encoder's adapters count: without them the pipeline's images are not ours
    for prefix in ("lora_te1_", "lora_te2_"):
        save_file({k: v for k, v in tensors.items() if not k.startswith(prefix)}, str(tmp_path / "less.safetensors"))
        pipe = base_pipe(root, module)
        pipe.load_lora_weights(str(tmp_path / "less.safetensors"))
        assert (ours - pipe_images(pipe)).abs().max() > 50 * ATOL, prefix


def test_the_merged_pipeline_fuses_both_encoders_adapters(te_run, tmp_path):
    ckpt = te_run / "checkpoints" / "last.ckpt"
    pipe = StableDiffusionXLPipeline.from_pretrained(export_main([str(ckpt), str(tmp_path / "merged")]))
    for part in ("unet", *TEXT_PARTS):
        assert not any("lora" in k for k in getattr(pipe, part).state_dict()), part
    diff = float((generate(load_module(ckpt)) - pipe_images(pipe)).abs().max())
    assert diff <= ATOL, f"images differ by {diff}"


@pytest.mark.parametrize("fmt", ["kohya", "diffusers-lora"])
def test_a_run_continues_an_sdxl_lora_file_with_both_encoders(te_run, root, tmp_path, fmt):  # noqa: F811
    """`model.adapter.init_from`: one step at lr 0 from the exported file keeps its adapters, bit for bit, in the U-Net
    and in both text encoders."""
    ckpt = te_run / "checkpoints" / "last.ckpt"
    out = export_main([str(ckpt), str(tmp_path / ("lora.safetensors" if fmt == "kohya" else "lora")), "--format", fmt])
    run_dir = tmp_path / "run"
    train(sdxl_config(root, run_dir, *LORA, f"model.adapter.init_from={out}", "optim.lr=0", "trainer.max_steps=1",
                      "model.ema_decay=null", "callbacks.export=null"))  # fmt: skip
    trained, continued = load_module(ckpt), load_module(run_dir / "checkpoints" / "last.ckpt")
    exported, started = trained.adapted_models(use_ema=True), continued.adapted_models(use_ema=False)
    assert exported.keys() == started.keys() == {"unet", *TEXT_PARTS}
    for part in exported:
        a, b = lora_weights(exported[part]), lora_weights(started[part])
        assert a.keys() == b.keys() and len(a) > 0
        for name in a:
            assert torch.equal(a[name].down, b[name].down) and torch.equal(a[name].up, b[name].up), (part, name)


def test_resume_is_exact_for_the_text_encoder_adapters(root, tmp_path):  # noqa: F811
    common = [*LORA, "optim.lr=0.05", "model.ema_decay=0.5", "callbacks.export=null",
              "callbacks.cpu_threads.threads=1"]  # one thread count in all three runs, whatever else the machine runs
    train(sdxl_config(root, tmp_path / "straight", *common, "trainer.max_steps=3"))
    train(sdxl_config(root, tmp_path / "first", *common, "trainer.max_steps=2"))
    train(sdxl_config(root, tmp_path / "resumed", *common, "trainer.max_steps=3",
                      f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}"))  # fmt: skip
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert any(k.startswith("text_encoder.text_encoder_2.") for k in a["state_dict"])
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values(), strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in ("exp_avg", "exp_avg_sq", "step"))


def sd15_kohya_file(path: Path, text_model: CLIPTextModel, metadata: dict | None = None) -> Path:
    """A kohya file as sd-scripts writes one for SD 1.x: `lora_te_` layers of a (768-wide) CLIP text encoder."""
    state = {}
    for i in range(text_model.config.num_hidden_layers):
        key = kohya_name("lora_te", f"text_model.encoder.layers.{i}.self_attn.q_proj")
        width = text_model.config.hidden_size
        state |= {f"{key}.lora_down.weight": torch.zeros(2, width), f"{key}.lora_up.weight": torch.zeros(width, 2),
                  f"{key}.alpha": torch.tensor(2.0)}  # fmt: skip
    save_file(state, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("text_encoder", ["true", "false"])
@pytest.mark.parametrize("metadata", [None, {"ss_base_model_version": "sd_v1"}])
def test_an_sd15_lora_file_on_sdxl_is_one_line(root, tmp_path, text_encoder, metadata):  # noqa: F811
    """A file with SD 1.x's one-encoder names (lora_te_*) continuing an SDXL run: refused in one line, with or without
    the text encoders adapted, with or without sd-scripts' metadata, before anything is built or written."""
    path = sd15_kohya_file(tmp_path / "sd15.safetensors", CLIPTextModel.from_pretrained(root / "sdxl", subfolder="text_encoder"),
                           metadata)  # fmt: skip
    cfg = sdxl_config(root, tmp_path / "run", *LORA, f"model.adapter.text_encoder={text_encoder}",
                      f"model.adapter.init_from={path}")  # fmt: skip
    expected = (r"made for another base model \(ss_base_model_version=sd_v1; this model is sdxl" if metadata else
                r"lora_te_text_model_encoder_layers_0_self_attn_q_proj: made for another base model \(lora_te_: one text "
                r"encoder, SD 1\.x/2\.x")  # fmt: skip
    with pytest.raises(ConfigError, match=rf"^model\.adapter\.init_from={re.escape(str(path))}: {expected}") as caught:
        train(cfg)
    assert "\n" not in str(caught.value) and not (tmp_path / "run").exists()


def test_an_sdxl_file_with_text_encoder_layers_needs_text_encoder_true(te_run, root, tmp_path):  # noqa: F811
    """The run's own kohya file (lora_te1_ / lora_te2_ layers) continuing a U-Net-only run: one line saying what to
    set, not "another base model"."""
    path = te_run / "lora" / "sdxl.safetensors"  # written by the run's export callback
    cfg = sdxl_config(root, tmp_path / "run", *LORA, "model.adapter.text_encoder=false", f"model.adapter.init_from={path}")
    with pytest.raises(ConfigError, match=r"lora_te1_text_model_encoder_layers_0_\w+ adapts the text encoder, which this "
                                          r"run does not adapt \(model\.adapter\.text_encoder=true") as caught:  # fmt: skip
        train(cfg)
    assert "\n" not in str(caught.value)


def test_dropped_captions_are_sdxls_zeros_and_kept_ones_carry_gradients(te_run):
    """Caption dropout with the encoders adapted: dropped rows are zeros (what the pipeline's unconditional half is,
    `force_zeros_for_empty_prompt`), kept rows are the adapted encoders' output, with gradients to their adapters."""
    module = load_module(te_run / "checkpoints" / "last.ckpt")
    module.cfg_dropout = 1.0
    dropped = module.training_condition(PROMPTS)
    assert all(not v.any() for v in dropped.values())
    module.cfg_dropout = 0.0
    kept = module.training_condition(PROMPTS)
    with torch.no_grad():
        expected = module.text_encoder.condition(PROMPTS)
    for key in ("encoder_hidden_states", "text_embeds"):
        torch.testing.assert_close(kept[key], expected[key], rtol=0, atol=0)
    sum(v.sum() for v in kept.values()).backward()
    for part, model in module.text_encoder.text_models().items():
        assert any(p.grad is not None and p.grad.abs().max() > 0 for n, p in model.named_parameters() if "lora_B" in n), part
