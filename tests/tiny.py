"""Tiny real components for integration tests: shapes shards, a random CLIP and a VAE, saved in the
real formats under one root, plus the real Hydra config composed and shrunk to run on a CPU in seconds."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

from ldm.data.shapes import write_shapes_dataset
from ldm.models.clip import build_open_clip, save_open_clip_dir
from ldm.models.text_encoders import save_random_hf_clip
from ldm.models.vae import build_vae

TINY_UNET = [  # a U-Net built from config; a pretrained one brings its own shape
    "model.unet.sample_size=8",
    "model.unet.block_out_channels=[16,32]",
    "model.unet.norm_num_groups=8",
    "model.unet.attention_head_dim=4",
    "model.unet.cross_attention_dim=32",
]
TINY_OPEN_CLIP = dict(  # merged into ViT-B-32's config; the text width is the tiny U-Net's cross_attention_dim
    embed_dim=16,
    vision_cfg=dict(image_size=16, patch_size=8, width=32, layers=1, head_width=16),
    text_cfg=dict(context_length=16, width=32, heads=2, layers=2),
)
CONF = Path(__file__).resolve().parents[1] / "conf"

TINY = [
    "data.resolution=16",
    "data.batch_size=4",
    "data.num_workers=0",
    "data.shuffle_buffer=8",
    "sampling.num_inference_steps=3",
    "trainer.accelerator=cpu",
    "trainer.max_steps=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "optim.warmup_steps=1",
    "callbacks.sample_grid.every_n_steps=0",
    "callbacks.checkpoint.every_n_train_steps=1",
    "callbacks.throughput.log_every_n_steps=1",
    "callbacks.fid.cpu_num_images=4",  # the FID callback stays on, on a few images
    "callbacks.fid.max_time_fraction=null",  # every due evaluation runs (tiny steps are cheaper than any evaluation)
    "prompts=[a large red circle in the center,a small blue square at the top left]",
]


def make_tiny_root(root: Path) -> Path:
    """root/shapes/{train,val}/*.tar, root/models/clip-tiny/{text_encoder,tokenizer}, root/models/vae-shapes,
    root/models/clip-shapes (an open_clip directory, as stage 0 writes it)."""
    write_shapes_dataset(root / "shapes", n_train=48, n_val=8, size=16, seed=0, samples_per_shard=16)
    save_random_hf_clip(root / "models" / "clip-tiny", hidden_size=32, num_layers=1, num_heads=2)
    save_open_clip_dir(*build_open_clip(**TINY_OPEN_CLIP), root / "models" / "clip-shapes")
    build_vae(block_out_channels=[8, 16], norm_num_groups=4, sample_size=16).save_pretrained(
        root / "models" / "vae-shapes"
    )
    return root


def compose_config(
    root: Path, run_dir: Path, overrides: list[str] = (), experiment: str = "shapes", tiny: bool = True,
    tiny_unet: bool = True,
):
    """The real `train.yaml` with `experiment=...`, pointed at ``root`` and shrunk by TINY; its `${ldm.run_name:...}`
    resolves (as under ldm.train) also in a test that imports nothing else registering it."""
    from ldm.utils.sweep_index import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            config_name="train",
            overrides=[f"experiment={experiment}", f"paths.data_dir={root}", f"paths.output_dir={run_dir}",
                       *(TINY if tiny else []), *(TINY_UNET if tiny and tiny_unet else []), *overrides],
        )


def saved_config(run_dir: Path) -> dict:
    """A run's `.hydra/config.yaml`, resolved in the run's own Hydra context (its `.hydra/hydra.yaml`): the config
    the run saved, as it resolved while the run trained."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import setup_globals
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from ldm.utils.sweep_index import register_resolvers

    setup_globals()  # Hydra's ${hydra:...} and ${now:...}
    register_resolvers()
    hydra = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml")
    hydra.hydra.mode = RunMode[hydra.hydra.mode]
    previous, HydraConfig.instance().cfg = HydraConfig.instance().cfg, hydra
    try:
        return OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"), resolve=True)
    finally:
        HydraConfig.instance().cfg = previous
