"""Frozen text encoders that turn captions into the hidden states the U-Net cross-attends to.

Two families, one interface (`TextEncoder`): `tokenize(captions) -> (B, L)` ids, `forward(ids) -> (B, L, D)`,
`encode(captions)` for both, and `hidden_size` (D) / `max_length` (L).

- `HFCLIPTextEncoder`: a `transformers.CLIPTextModel`, as in Stable Diffusion 1.x (last_hidden_state) and in
  any diffusers model directory (including SD 2.x, whose stored text encoder is already cut to the penultimate layer).
- `OpenCLIPTextEncoder`: the text tower of an `open_clip` model, as in SD 2.x (OpenCLIP ViT-H/14,
  penultimate layer). Convert it for export with `ldm.models.clip_convert.open_clip_to_hf`.

A small run on CPU, nothing downloaded:

    from ldm.models.text_encoders import save_random_hf_clip, hf_clip_text_encoder
    save_random_hf_clip("/tmp/tiny_clip")                   # diffusers layout: text_encoder/ + tokenizer/
    text_encoder = hf_clip_text_encoder("/tmp/tiny_clip")   # frozen
    text_encoder.encode(["a photo of a cat"]).shape         # (1, 77, 64)
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.models.freeze import freeze
from ldm.models.tokenizer import VOCAB_SIZE, write_clip_tokenizer


class TextEncoder(nn.Module):
    """Common interface: captions -> token ids -> per-token hidden states for cross-attention.

    `condition(captions)` is what the U-Net takes, keyed by its keyword arguments: {"encoder_hidden_states":
    (B, L, D)} here, plus {"text_embeds": (B, P)} for a family with a pooled embedding (SDXL,
    `ldm.models.sdxl.SDXLTextEncoders`); `empty_condition()` is the unconditional input classifier-free guidance
    trains and samples with (the empty caption's encoding here; SDXL's zeros)."""

    pooled_size = 0  # P, the width of a pooled embedding the U-Net takes as `text_embeds` (0: none)

    @property
    def hidden_size(self) -> int:
        """D, the width of each token's hidden state (the U-Net's `cross_attention_dim`)."""
        raise NotImplementedError

    @property
    def max_length(self) -> int:
        """L, the number of token positions every caption is padded or truncated to."""
        raise NotImplementedError

    def tokenize(self, captions: Sequence[str]) -> torch.LongTensor:
        """(B,) captions -> (B, L) token ids on the CPU, padded to L and truncated (ending in end-of-text)."""
        raise NotImplementedError

    def forward(self, input_ids: torch.LongTensor) -> torch.FloatTensor:
        """(B, L) token ids -> (B, L, D) hidden states."""
        raise NotImplementedError

    def encode(self, captions: Sequence[str]) -> torch.FloatTensor:
        """(B,) captions -> (B, L, D) hidden states on this module's device."""
        device = next(self.parameters()).device
        return self(self.tokenize(captions).to(device))

    def condition(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """(B,) captions -> the U-Net's text inputs, keyed by its keyword arguments."""
        return {"encoder_hidden_states": self.encode(captions)}

    def empty_condition(self) -> dict[str, torch.Tensor]:
        """The unconditional input (batch 1): the empty caption's encoding, as Stable Diffusion 1.x/2.x use it."""
        return self.condition([""])

    def text_models(self) -> dict[str, nn.Module]:
        """Its transformers CLIP text models by the part name a diffusers pipeline and LoRA files give them
        (`text_encoder`, SDXL's `text_encoder_2`): what LoRA adapts. None here (open_clip has no such model)."""
        return {}

    def unread_layers(self) -> list[nn.Module]:
        """The layers of its text models whose outputs the conditioning never reads (those above the hidden states it
        takes: a CLIP read at its penultimate layer). Adapters there get no gradient; the stage keeps them out of
        training (`LatentDiffusion`), where DDP would otherwise wait for their gradients forever. None here."""
        return []


def _check_captions(captions: Sequence[str]) -> list[str]:
    if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
        raise TypeError(f"captions must be a list of strings, got {type(captions).__name__}: {captions!r:.80}")
    return list(captions)


class HFCLIPTextEncoder(TextEncoder):
    """A `transformers.CLIPTextModel` and its `CLIPTokenizer`.

    clip_skip: 0 returns `last_hidden_state` (SD 1.x). k > 0 returns the hidden states k layers before the
    last, passed through the final layer norm (diffusers' `clip_skip` convention; 1 = penultimate layer).
    """

    def __init__(self, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, clip_skip: int = 0):
        super().__init__()
        num_layers = text_encoder.config.num_hidden_layers
        if not 0 <= clip_skip < num_layers:
            raise ValueError(f"clip_skip={clip_skip} must be in [0, {num_layers - 1}] for a {num_layers}-layer CLIP")
        positions = text_encoder.config.max_position_embeddings
        if tokenizer.model_max_length > positions:
            raise ValueError(
                f"tokenizer.model_max_length={tokenizer.model_max_length} exceeds the text encoder's "
                f"max_position_embeddings={positions}"
            )
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.clip_skip = clip_skip

    @property
    def hidden_size(self) -> int:
        return self.text_encoder.config.hidden_size

    @property
    def max_length(self) -> int:
        return self.tokenizer.model_max_length

    def text_models(self) -> dict[str, nn.Module]:
        return {"text_encoder": self.text_encoder}

    def unread_layers(self) -> list[nn.Module]:
        """The last `clip_skip` layers: their outputs are skipped."""
        layers = _clip_layers(self.text_encoder)
        return list(layers[len(layers) - self.clip_skip:]) if self.clip_skip else []

    def tokenize(self, captions: Sequence[str]) -> torch.LongTensor:
        return self.tokenizer(
            _check_captions(captions), padding="max_length", max_length=self.max_length,
            truncation=True, return_tensors="pt",
        ).input_ids

    def forward(self, input_ids: torch.LongTensor) -> torch.FloatTensor:
        if self.clip_skip == 0:
            return self.text_encoder(input_ids).last_hidden_state  # (B, L, D)
        # hidden_states = (embeddings, layer 1, ..., layer N): skip the last clip_skip layers' outputs.
        hidden = self.text_encoder(input_ids, output_hidden_states=True).hidden_states[-(self.clip_skip + 1)]
        # transformers 5 keeps final_layer_norm on CLIPTextModel itself, 4.x on its .text_model.
        final_layer_norm = getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm
        return final_layer_norm(hidden)


def _clip_layers(text_model: nn.Module) -> nn.ModuleList:
    """A transformers CLIP text model's transformer layers (transformers 5 keeps the encoder on the model itself,
    4.x on its .text_model)."""
    return getattr(text_model, "text_model", text_model).encoder.layers


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"torch_dtype={dtype!r} is not a torch dtype name (e.g. 'float16', 'bfloat16')")
    return getattr(torch, dtype)


def hf_clip_text_encoder(
    path: str | Path,
    subfolder: str | None = "text_encoder",
    tokenizer_subfolder: str | None = "tokenizer",
    torch_dtype: torch.dtype | str | None = None,
    clip_skip: int = 0,
) -> HFCLIPTextEncoder:
    """Load a frozen `HFCLIPTextEncoder` from a diffusers model directory or hub id (same call for both).

    subfolder / tokenizer_subfolder: where the model and the tokenizer live under `path` (None: `path` itself).
    """
    dtype = _as_dtype(torch_dtype)
    model_kwargs = {} if dtype is None else {"dtype": dtype}
    text_encoder = CLIPTextModel.from_pretrained(str(path), subfolder=subfolder or "", **model_kwargs)
    tokenizer = CLIPTokenizer.from_pretrained(str(path), subfolder=tokenizer_subfolder or "")
    return freeze(HFCLIPTextEncoder(text_encoder, tokenizer, clip_skip=clip_skip))


def save_random_hf_clip(
    out_dir: str | Path,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_length: int = 77,
    seed: int = 0,
) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """Save a seeded, randomly initialised CLIP text model + the real CLIP tokenizer in diffusers layout.

    Writes `out_dir/text_encoder` and `out_dir/tokenizer` (loadable with `hf_clip_text_encoder(out_dir)`) and
    returns the in-memory model and tokenizer. For runs that cannot download a pretrained CLIP. The global
    RNG state is left as it was.
    """
    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=max_length,
        hidden_act="quick_gelu",  # as in OpenAI's CLIP ViT-L/14 used by SD 1.x
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(config)
    out_dir = Path(out_dir)
    text_encoder.save_pretrained(out_dir / "text_encoder")
    tokenizer = write_clip_tokenizer(out_dir / "tokenizer", model_max_length=max_length)
    return text_encoder, tokenizer


class OpenCLIPTextEncoder(TextEncoder):
    """The text tower of an open_clip model, returning every token's state after `ln_final`.

    layer="penultimate" (SD 2.x) runs all but the last residual block, "last" runs all of them; the blocks
    that are not run are not kept. The pooled, projected embedding of `encode_text` is never computed.
    Only the text parts of `model` are kept: drop your reference to `model` to free its visual tower.
    """

    def __init__(self, model: nn.Module, tokenizer, layer: Literal["penultimate", "last"] = "penultimate"):
        super().__init__()
        if layer not in ("penultimate", "last"):
            raise ValueError(f"layer={layer!r} must be 'penultimate' or 'last'")
        text = getattr(model, "text", model)  # CustomTextCLIP keeps its tower in .text, CLIP on itself
        for name in ("token_embedding", "positional_embedding", "transformer", "ln_final"):
            if not hasattr(text, name):
                raise TypeError(f"{type(text).__name__} is not an open_clip text transformer: it has no .{name}")
        if getattr(text, "cls_emb", None) is not None:
            raise ValueError(f"{type(text).__name__} appends a CLS embedding; OpenCLIPTextEncoder does not support it")
        blocks = list(text.transformer.resblocks)
        num_blocks = len(blocks) - 1 if layer == "penultimate" else len(blocks)
        if num_blocks < 1:
            raise ValueError(f"layer='penultimate' needs at least 2 residual blocks, the model has {len(blocks)}")
        self.layer = layer
        self.tokenizer = tokenizer
        self.token_embedding = text.token_embedding
        self.positional_embedding = text.positional_embedding  # (L, D) nn.Parameter
        self.resblocks = nn.ModuleList(blocks[:num_blocks])
        self.ln_final = text.ln_final
        self.batch_first = getattr(text.transformer, "batch_first", True)
        self.register_buffer("attn_mask", text.attn_mask, persistent=False)  # (L, L) additive causal, or None

    @property
    def hidden_size(self) -> int:
        return self.positional_embedding.shape[1]

    @property
    def max_length(self) -> int:
        return self.positional_embedding.shape[0]

    def tokenize(self, captions: Sequence[str]) -> torch.LongTensor:
        return self.tokenizer(_check_captions(captions), context_length=self.max_length)

    def forward(self, input_ids: torch.LongTensor) -> torch.FloatTensor:
        if input_ids.shape[1] != self.max_length:
            raise ValueError(f"input_ids has {input_ids.shape[1]} positions, the causal mask expects {self.max_length}")
        dtype = self.resblocks[0].mlp.c_fc.weight.dtype  # open_clip's "cast dtype"
        x = self.token_embedding(input_ids).to(dtype) + self.positional_embedding.to(dtype)  # (B, L, D)
        if not self.batch_first:
            x = x.transpose(0, 1)  # (L, B, D)
        for block in self.resblocks:
            x = block(x, attn_mask=self.attn_mask)
        if not self.batch_first:
            x = x.transpose(0, 1)  # (B, L, D)
        return self.ln_final(x)


def open_clip_text_encoder(
    arch: str,
    pretrained: str | None = None,
    layer: Literal["penultimate", "last"] = "penultimate",
    **model_overrides,
) -> OpenCLIPTextEncoder:
    """Build a frozen `OpenCLIPTextEncoder` with `open_clip.create_model(arch, pretrained, **model_overrides)`.

    pretrained: a checkpoint file (.safetensors or a torch state dict) or an open_clip tag (downloads).
    model_overrides: create_model arguments (precision=..., device=...) or config entries; note that open_clip
    replaces a whole config entry, so `text_cfg={...}` must list every text setting that differs from defaults.
    """
    import open_clip  # imported here: it is slow to import and only this family needs it

    model = open_clip.create_model(arch, pretrained=pretrained, **model_overrides)
    context_length = getattr(model, "text", model).context_length
    tokenizer = open_clip.get_tokenizer(arch, context_length=context_length)
    return freeze(OpenCLIPTextEncoder(model, tokenizer, layer=layer))


def save_open_clip_checkpoint(model: nn.Module, path: str | Path) -> Path:
    """Save a whole open_clip model's weights so `open_clip.create_model(arch, pretrained=path)` loads them.

    A path ending in .safetensors is written with safetensors; anything else as a plain torch state dict
    (loadable with `weights_only=True`, which open_clip uses).
    """
    if isinstance(model, OpenCLIPTextEncoder):
        raise TypeError("save_open_clip_checkpoint needs the whole open_clip model, not an OpenCLIPTextEncoder")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state_dict, str(path))
    else:
        torch.save(state_dict, path)
    return path
