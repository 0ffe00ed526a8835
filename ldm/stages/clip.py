"""Stage 0: train an open_clip CLIP (vision + text towers) with the contrastive loss, then export it.

Radford et al. 2021: a symmetric cross-entropy over the image-text similarity matrix of a batch, scaled by a
learned temperature (logit scale, clamped at 100). open_clip's own `ClipLoss` computes it; under DDP it gathers
the features of every rank (with gradients), so the negatives are the whole global batch.

    model, model_cfg = build_open_clip("ViT-B-32", embed_dim=64, ...)     # ldm.models.clip
    module = CLIPModule(model, model_cfg)
    trainer.fit(module, datamodule)          # logs train/loss, train/logit_scale, val/i2t_top1, val/t2i_top1
    module.export("data/models/clip-shapes")  # open_clip.create_model_and_transforms("local-dir:...") loads it

caption_groups={"position": [...], ...} logs `val/swap_top1/<group>`: how often a held-out image ranks its own
caption first among the captions that differ from it only in that group's phrase (ldm.stages.hard_negatives);
hard_negative_weight > 0 also trains with those swapped captions as extra negatives (NegCLIP).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ldm.data.transforms import to_model_range
from ldm.models.clip import save_open_clip_dir
from ldm.stages.base import Stage
from ldm.stages.hard_negatives import CaptionSwaps
from ldm.training.compile import compile_options
from ldm.training.optim import configure_optimizers

MAX_LOGIT_SCALE = math.log(100)  # CLIP clips the temperature so logits are scaled by at most 100


def retrieval_top1(image_features: Tensor, text_features: Tensor, captions: list[str]) -> tuple[float, float]:
    """Zero-shot retrieval accuracy among all pairs: image -> text and text -> image top-1, where a hit is a
    retrieved item whose caption is the same string (identical captions are interchangeable)."""
    logits = image_features @ text_features.T  # (N, N), features L2-normalised
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    caption_ids = torch.tensor([ids[c] for c in captions])  # (N,)
    i2t = (caption_ids[logits.argmax(1).cpu()] == caption_ids).float().mean()
    t2i = (caption_ids[logits.argmax(0).cpu()] == caption_ids).float().mean()
    return float(i2t), float(t2i)


class CLIPModule(Stage):
    def __init__(
        self,
        clip: tuple[nn.Module, dict],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_scheduler: Callable[..., Any] | None = None,
        val_max_images: int = 1000,
        caption_groups: dict[str, list[str]] | None = None,
        hard_negative_weight: float = 0.0,
        swap_max_images: int = 250,
        compile: bool | Mapping[str, Any] = False,
    ):
        """clip: (open_clip model, its model config), what `ldm.models.clip.build_open_clip` returns.
        caption_groups: groups of interchangeable caption phrases (see the module docstring), or None.
        hard_negative_weight: weight of the swapped-caption loss (0: the groups only measure).
        swap_max_images: the held-out images `val/swap_top1/*` ranks (each costs one caption per phrase).
        compile: torch.compile of the two towers' transformers (true, or torch.compile's options; see
        `ldm.training.compile`), in `configure_model`."""
        super().__init__()
        import open_clip

        self.model, self.model_cfg = clip
        if not hasattr(self.model, "encode_image") or not hasattr(self.model, "logit_scale"):
            raise TypeError(f"{type(self.model).__name__} is not an open_clip CLIP model")
        if "hf_tokenizer_name" in self.model_cfg.get("text_cfg", {}):
            raise ValueError("CLIPModule trains towers that use open_clip's CLIP BPE tokenizer, not a HF tokenizer")
        text = getattr(self.model, "text", self.model)
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=text.context_length)
        preprocess = open_clip.get_model_preprocess_cfg(self.model)
        self.image_size = preprocess["size"]
        self.register_buffer("mean", torch.tensor(preprocess["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocess["std"]).view(1, 3, 1, 1), persistent=False)
        self.optimizer_factory = optimizer or torch.optim.AdamW
        self.lr_scheduler_factory = lr_scheduler
        self.val_max_images = val_max_images
        self.swaps = CaptionSwaps(caption_groups) if caption_groups else None
        if hard_negative_weight and self.swaps is None:
            raise ValueError("hard_negative_weight > 0 needs caption_groups to swap phrases from")
        self.hard_negative_weight = hard_negative_weight
        self.swap_max_images = swap_max_images
        self._val: list[tuple[Tensor, Tensor, list[str]]] = []
        self.compile_options = compile_options(compile)

    def configure_model(self) -> None:
        # the image tower whole; of the text tower its transformer (open_clip's CLIP keeps the text parts on the
        # model itself, CustomTextCLIP in `.text`); tokenising, pooling and the losses stay outside
        text = self.model.text if hasattr(self.model, "text") else self.model.transformer
        self.compile_parts([self.model.visual, text], self.compile_options)

    # --- the towers ------------------------------------------------------------------------
    def normalize(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) uint8, or float in [-1, 1] (what the data module delivers) -> what open_clip's own
        preprocessing gives."""
        size = self.image_size if isinstance(self.image_size, (tuple, list)) else (self.image_size,) * 2
        if tuple(pixel_values.shape[-2:]) != tuple(size):
            raise ValueError(f"images are {tuple(pixel_values.shape[-2:])} px, the CLIP's image_size is {tuple(size)}:"
                             " set data.resolution to match")
        return ((to_model_range(pixel_values).float() + 1) / 2 - self.mean) / self.std

    def features(self, pixel_values: Tensor, captions: list[str]) -> tuple[Tensor, Tensor]:
        """L2-normalised image and text embeddings, (B, E) each."""
        ids = self.tokenizer(list(captions)).to(self.device)
        image = self.model.encode_image(self.normalize(pixel_values), normalize=True)
        text = self.model.encode_text(ids, normalize=True)
        return image, text

    def contrastive_loss(self, pixel_values: Tensor, captions: list[str], return_features: bool = False):
        """open_clip's ClipLoss; under torch.distributed it uses every rank's features as negatives."""
        from open_clip.loss import ClipLoss

        distributed = dist.is_available() and dist.is_initialized()
        loss_fn = ClipLoss(gather_with_grad=True, rank=dist.get_rank() if distributed else 0,
                           world_size=dist.get_world_size() if distributed else 1)
        image, text = self.features(pixel_values, captions)
        loss = loss_fn(image, text, self.model.logit_scale.exp())
        return (loss, image, text) if return_features else loss

    @torch.no_grad()
    def validation_loss(self, batch: dict, generator: torch.Generator) -> Tensor:
        """The contrastive loss on a held-out batch (`ldm.callbacks.val_loss`); nothing random. Local to the rank:
        every rank holds the same held-out batches."""
        from open_clip.loss import ClipLoss

        image, text = self.features(batch["pixel_values"], batch["caption"])
        return ClipLoss()(image, text, self.model.logit_scale.exp())

    def hard_negative_loss(self, image: Tensor, text: Tensor, captions: list[str], rng: random.Random) -> Tensor:
        """Cross-entropy of each image over its own caption and its swapped-phrase negatives (one per group),
        at the CLIP temperature; local to the rank. image, text: (B, E) L2-normalised."""
        negatives, owner, group = self.swaps.negatives(list(captions), rng)
        b, g = len(captions), len(self.swaps.groups)
        logits = image.new_full((b, 1 + g), float("-inf"))  # (B, 1 + G): own caption, then one per group
        logits[:, 0] = (image * text).sum(-1)
        if negatives:
            neg = self.model.encode_text(self.tokenizer(negatives).to(self.device), normalize=True)  # (M, E)
            owner_t, group_t = torch.tensor(owner, device=self.device), torch.tensor(group, device=self.device)
            logits = logits.index_put((owner_t, group_t + 1), (image[owner_t] * neg).sum(-1))
        target = torch.zeros(b, dtype=torch.long, device=self.device)
        return nn.functional.cross_entropy(self.model.logit_scale.exp() * logits, target)

    # --- training --------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        b = len(batch["caption"])
        loss, image, text = self.contrastive_loss(batch["pixel_values"], batch["caption"], return_features=True)
        if self.hard_negative_weight:
            rng = random.Random(f"{self.global_step}-{self.global_rank}")
            hard = self.hard_negative_loss(image, text, batch["caption"], rng)
            self.log("train/hard_negative_loss", hard, batch_size=b)
            loss = loss + self.hard_negative_weight * hard
        self.log("train/loss", loss, prog_bar=self.progress_bar, batch_size=b)
        self.log("train/logit_scale", self.model.logit_scale.exp(), batch_size=b)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    # --- zero-shot retrieval on the held-out shards ------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if sum(len(c) for _, _, c in self._val) >= self.val_max_images:
            return
        image, text = self.features(batch["pixel_values"], batch["caption"])
        self._val.append((image, text, list(batch["caption"])))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        image = torch.cat([i for i, _, _ in self._val])[: self.val_max_images]
        text = torch.cat([t for _, t, _ in self._val])[: self.val_max_images]
        captions = [c for _, _, cs in self._val for c in cs][: self.val_max_images]
        i2t, t2i = retrieval_top1(image, text, captions)
        # every rank sees the whole val set (ShardDataModule), so every rank computes the same numbers
        self.log_dict({"val/i2t_top1": i2t, "val/t2i_top1": t2i, "val/retrieval_chance": 1 / len(set(captions))},
                      batch_size=len(captions))
        if self.swaps is not None:
            n = min(self.swap_max_images, len(captions))
            self.log_dict({f"val/swap_top1/{k}": v for k, v in self.swap_top1(image[:n], captions[:n]).items()},
                          batch_size=n)
        self._val = []

    @torch.no_grad()
    def swap_top1(self, image: Tensor, captions: list[str]) -> dict[str, float]:
        """Per group: how often an image's own caption ranks first among its variants with each phrase of the
        group (chance: one over the group's size). image: (N, E) L2-normalised."""
        out = {}
        for name in self.swaps.groups:
            found = [(i, self.swaps.variants(c, name)) for i, c in enumerate(captions)]
            found = [(i, v) for i, v in found if v is not None]
            if not found:
                continue
            variants = [c for _, (vs, _) in found for c in vs]
            text = self.model.encode_text(self.tokenizer(variants).to(self.device), normalize=True)
            text = text.view(len(found), -1, text.shape[-1])  # (n, group size, E)
            scores = torch.einsum("ne,nve->nv", image[[i for i, _ in found]], text)
            truth = torch.tensor([t for _, (_, t) in found], device=scores.device)
            out[name] = float((scores.argmax(1) == truth).float().mean())
        return out

    def configure_optimizers(self):
        # CLIP's recipe: no weight decay on gains, biases, embeddings' scale and the temperature
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        return configure_optimizers(groups, self.optimizer_factory, self.lr_scheduler_factory)

    def export(self, out_dir: str | Path) -> Path:
        """An open_clip model directory: `open_clip.create_model_and_transforms(f"local-dir:{out_dir}")`."""
        return save_open_clip_dir(self.model, self.model_cfg, out_dir)
