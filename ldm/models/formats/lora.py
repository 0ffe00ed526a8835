"""What every LoRA file holds, whatever its layout: per part of the model (`unet`, `text_encoder`, and
`text_encoder_2` for two-encoder models), per adapted layer, a `LoraModule` (down, up, alpha).

    weights = {"unet": {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": LoraModule(down, up, 4.0)}}

Module names are those of the adapted model. A transformers CLIP text model names its layers
`text_model.encoder.layers.0...` up to transformers 4 and `encoder.layers.0...` from 5 on (the class was flattened);
files always use the first (`canonical_name`), which is what diffusers and kohya write and read with either version.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from torch import Tensor

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


class LoraFileError(ValueError):
    """A LoRA file that does not fit the model; the message is one line naming the file and the first offending key."""


@dataclass(frozen=True)
class LoraModule:
    """One adapted layer: W + (alpha / rank) * up @ down (Hu et al. 2021)."""

    down: Tensor  # (rank, in) or, for a convolution, (rank, in, k, k)
    up: Tensor  # (out, rank) or (out, rank, 1, 1)
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def canonical_name(part: str, name: str) -> str:
    """A layer's name as LoRA files spell it: text-encoder layers under `text_model.` (transformers 4 naming)."""
    if part in TEXT_ENCODERS and not name.startswith("text_model."):
        return "text_model." + name
    return name


def name_table(part: str, names: Iterable[str]) -> dict[str, str]:
    """canonical name -> the model's own name, for every module of a part."""
    return {canonical_name(part, n): n for n in names if n}


def safetensors_file(path: str | Path, default_name: str | None = None) -> Path:
    """The .safetensors file ``path`` is, or ``default_name`` inside it when it is a directory."""
    path = Path(path)
    if path.is_dir() and default_name:
        path = path / default_name
    if not path.is_file():
        raise LoraFileError(f"{path}: no such LoRA file")
    if path.suffix != ".safetensors":
        raise LoraFileError(f"{path}: not a .safetensors file (LoRA files are read as safetensors only)")
    return path


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as error:  # noqa: BLE001: a truncated or foreign file
        raise LoraFileError(f"{path}: not a readable safetensors file ({error!s:.120})") from None
