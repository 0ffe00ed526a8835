"""SDXL's parts: the text-encoder pair, its micro-conditioning, and SDXL-shaped models built from scratch.

SDXL (Podell et al. 2023) conditions its U-Net on two frozen CLIP text encoders, OpenAI CLIP ViT-L (768 wide) and
OpenCLIP ViT-bigG (1280 wide, with a text projection): the penultimate hidden states of both are concatenated
token by token into the 2048-wide cross-attention input, and bigG's pooled, projected embedding goes into the
U-Net's added embedding together with the "micro-conditioning" `time_ids` = (original height, original width,
crop top, crop left, target height, target width) of each image (`addition_embed_type="text_time"`).

    text_encoder = sdxl_text_encoders("/models/sdxl-base")   # diffusers layout: text_encoder{,_2}, tokenizer{,_2}
    cond = text_encoder.condition(["a photo of a cat"])      # {"encoder_hidden_states": (1, 77, 2048),
                                                              #  "text_embeds": (1, 1280)}
    save_random_sdxl("/tmp/tiny-sdxl", tiny=True)           # a StableDiffusionXLPipeline directory, random weights

A part stays what diffusers and transformers make it (`CLIPTextModel`, `CLIPTextModelWithProjection`,
`UNet2DConditionModel`, `AutoencoderKL`), so `StableDiffusionXLPipeline.from_pretrained` loads what we save and
the other way round.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ldm.models.freeze import freeze
from ldm.models.text_encoders import TextEncoder, _as_dtype, _check_captions, _clip_layers
from ldm.models.tokenizer import VOCAB_SIZE, clip_tokenizer, write_clip_tokenizer

TIME_IDS = 6  # (original h, original w, crop top, crop left, target h, target w)


def time_ids(original_size: Tensor, crop_top_left: Tensor, target_size: Tensor) -> Tensor:
    """SDXL's micro-conditioning (B, 6) float: original size, crop top-left and target size, each (B, 2) as
    (height, width) / (top, left) pixels, in the order `StableDiffusionXLPipeline._get_add_time_ids` uses."""
    return torch.cat([original_size, crop_top_left, target_size], dim=1).float()


class SDXLTextEncoders(TextEncoder):
    """SDXL's two frozen text encoders as one: `condition(captions)` gives the U-Net's cross-attention states
    (penultimate layers of both, concatenated: (B, L, D1 + D2)) and bigG's pooled projection (B, P)."""

    def __init__(self, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 text_encoder_2: CLIPTextModelWithProjection, tokenizer_2: CLIPTokenizer):  # fmt: skip
        super().__init__()
        if not isinstance(text_encoder_2, CLIPTextModelWithProjection):
            raise TypeError(f"text_encoder_2 must be a CLIPTextModelWithProjection (SDXL's OpenCLIP bigG with its "
                            f"projection), got {type(text_encoder_2).__name__}")  # fmt: skip
        if tokenizer.model_max_length != tokenizer_2.model_max_length:
            raise ValueError(f"tokenizer.model_max_length={tokenizer.model_max_length} differs from tokenizer_2's "
                             f"{tokenizer_2.model_max_length}: SDXL concatenates the two encoders token by token")  # fmt: skip
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2

    @property
    def hidden_size(self) -> int:
        return self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size

    @property
    def pooled_size(self) -> int:
        return self.text_encoder_2.config.projection_dim

    def empty_condition(self) -> dict[str, Tensor]:
        """Zeros (batch 1): SDXL's unconditional input, as its training dropped captions (the SDXL paper's
        embedders zero a dropped embedding) and as `StableDiffusionXLPipeline` samples it
        (`force_zeros_for_empty_prompt`)."""
        device, dtype = self.text_encoder.device, self.text_encoder.dtype
        return {"encoder_hidden_states": torch.zeros(1, self.max_length, self.hidden_size, device=device, dtype=dtype),
                "text_embeds": torch.zeros(1, self.pooled_size, device=device, dtype=dtype)}  # fmt: skip

    @property
    def max_length(self) -> int:
        return self.tokenizer.model_max_length

    def text_models(self) -> dict[str, torch.nn.Module]:
        return {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}

    def unread_layers(self) -> list[torch.nn.Module]:
        """Encoder 1's last layer: SDXL reads its penultimate hidden states (encoder 2's last layer gives the pooled
        embedding)."""
        return [_clip_layers(self.text_encoder)[-1]]

    def _ids(self, tokenizer: CLIPTokenizer, captions: list[str]) -> torch.LongTensor:
        return tokenizer(captions, padding="max_length", max_length=self.max_length, truncation=True,
                         return_tensors="pt").input_ids  # fmt: skip

    def tokenize(self, captions: Sequence[str]) -> torch.LongTensor:
        """(B, 2, L): the ids of both tokenizers (they differ only in padding: "<|endoftext|>" and "!")."""
        captions = _check_captions(captions)
        return torch.stack([self._ids(self.tokenizer, captions), self._ids(self.tokenizer_2, captions)], dim=1)

    def encode_ids(self, input_ids: torch.LongTensor) -> dict[str, Tensor]:
        """(B, 2, L) ids -> {"encoder_hidden_states": (B, L, D1 + D2), "text_embeds": (B, P)}, as
        `StableDiffusionXLPipeline.encode_prompt` computes them (clip_skip None: the penultimate layers)."""
        first = self.text_encoder(input_ids[:, 0], output_hidden_states=True)
        second = self.text_encoder_2(input_ids[:, 1], output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)  # (B, L, 2048)
        return {"encoder_hidden_states": hidden, "text_embeds": second.text_embeds}  # (B, 1280)

    def forward(self, input_ids: torch.LongTensor) -> Tensor:
        return self.encode_ids(input_ids)["encoder_hidden_states"]

    def condition(self, captions: Sequence[str]) -> dict[str, Tensor]:
        device = next(self.parameters()).device
        return self.encode_ids(self.tokenize(captions).to(device))


def sdxl_text_encoders(path: str | Path, torch_dtype: torch.dtype | str | None = None) -> SDXLTextEncoders:
    """The frozen text-encoder pair of an SDXL diffusers directory (or hub id): `text_encoder`, `tokenizer`,
    `text_encoder_2`, `tokenizer_2`; one line naming what is missing when a part is not there."""
    local = Path(str(path))
    if local.is_dir():
        for part in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
            if not (local / part).is_dir():
                raise FileNotFoundError(f"{path} has no {part}/: not an SDXL pipeline directory "
                                        f"(StableDiffusionXLPipeline layout)")  # fmt: skip
    dtype = _as_dtype(torch_dtype)
    kwargs = {} if dtype is None else {"dtype": dtype}
    return freeze(SDXLTextEncoders(
        CLIPTextModel.from_pretrained(str(path), subfolder="text_encoder", **kwargs),
        CLIPTokenizer.from_pretrained(str(path), subfolder="tokenizer"),
        CLIPTextModelWithProjection.from_pretrained(str(path), subfolder="text_encoder_2", **kwargs),
        CLIPTokenizer.from_pretrained(str(path), subfolder="tokenizer_2"),
    ))  # fmt: skip


# --- SDXL-shaped models from scratch -------------------------------------------------------------------
SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0's unet/config.json (2.567 B parameters)
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)  # fmt: skip
TINY_SDXL_UNET = dict(  # the same architecture, small enough for CPU tests
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=64, norm_num_groups=8,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + TIME_IDS * 8,
)  # fmt: skip
SDXL_TEXT = (dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  hidden_act="quick_gelu", projection_dim=768),
             dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  hidden_act="gelu", projection_dim=1280))  # fmt: skip
# two widths, as SDXL's 768 and 1280 (diffusers' from_single_file tells the encoders apart by width), adding up to
# the U-Net's cross_attention_dim; bigG's projection narrower than its width, so a transposed one cannot load
TINY_SDXL_TEXT = (dict(hidden_size=24, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       hidden_act="quick_gelu", projection_dim=24),
                  dict(hidden_size=40, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       hidden_act="gelu", projection_dim=32))  # fmt: skip


def save_random_sdxl(out_dir: str | Path, tiny: bool = True, seed: int = 0, vae_block_out_channels=(8, 16)) -> Path:
    """Write a seeded random SDXL-shaped model in the `StableDiffusionXLPipeline` layout (text_encoder{,_2},
    tokenizer{,_2} with the real CLIP BPE vocabulary, unet, vae, scheduler): the real SDXL shapes
    (tiny=False: 2.567 B U-Net parameters, for benchmarks) or small ones (tiny=True, for CPU tests). The global
    RNG state is left as it was."""
    out_dir = Path(out_dir)
    unet_config = TINY_SDXL_UNET if tiny else SDXL_UNET
    text_configs = TINY_SDXL_TEXT if tiny else SDXL_TEXT
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config)
        encoders = [cls(CLIPTextConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=77, **config))
                    for cls, config in zip((CLIPTextModel, CLIPTextModelWithProjection), text_configs)]  # fmt: skip
        blocks = tuple(vae_block_out_channels) if tiny else (128, 256, 512, 512)
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * len(blocks),
                            up_block_types=("UpDecoderBlock2D",) * len(blocks), block_out_channels=blocks,
                            layers_per_block=1 if tiny else 2, norm_num_groups=4 if tiny else 32,
                            latent_channels=4, scaling_factor=0.13025,
                            sample_size=unet_config["sample_size"] * 2 ** (len(blocks) - 1))  # fmt: skip
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")  # fmt: skip
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                                     tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(pad_token="!"),
                                     unet=unet, scheduler=scheduler)  # fmt: skip
    pipe.save_pretrained(out_dir, safe_serialization=True)  # model_index.json + one folder per part
    write_clip_tokenizer(out_dir / "tokenizer")  # + vocab.json / merges.txt, as SDXL repositories ship them
    write_clip_tokenizer(out_dir / "tokenizer_2", pad_token="!")  # SDXL's tokenizer_2 pads with "!" (id 0)
    return out_dir
