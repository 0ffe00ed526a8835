"""Quality curves during training: standard FID (and CLIP score) every K steps or images, right across ranks.

    FIDCallback(every_n_steps=1000, num_images=10_000, cache_dir="data/fid_cache")   # conf/callbacks/ldm.yaml: fid

Each evaluation generates ``num_images`` images (``cpu_num_images`` when training on CPU) for captions read
from the validation shards, image i with caption i and seed ``seed + i`` (the same images every time, however
many ranks: rank r makes images r, r + W, ...), with the EMA weights when EMA is on. FID compares them with
reference statistics of the validation images (computed once, cached on disk, held by rank 0 only, so the
states torchmetrics sums over ranks count every real image once). Logs `val/fid` (W&B summary: its minimum),
`val/clip_score` when a CLIP is given (``clip_model``: an open_clip or HF CLIP directory), `val/images_seen`, `val/fid_seconds` and a sample grid; at the end of
training writes `fid_curve.png` (FID and CLIP score against images seen, training time with evaluations excluded,
and wall time with them included) and `fid/history.json` (the same per row: `train_seconds`, `wall_seconds`).

Cost cap: with ``max_time_fraction`` (default 0.1), an evaluation that falls due is put off to a later due
point while running it would lift the time spent evaluating above that fraction of the time spent training
(its cost taken as the last evaluation's). The first and the final evaluation always run. Each evaluation logs
`val/fid_time_fraction`, the share so far. Rank 0 decides, so all ranks evaluate together.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_info

from ldm.data.webdataset import read_captions
from ldm.metrics.clip_score import make_clip_score
from ldm.metrics.fid import make_fid, set_real_states
from ldm.metrics.generated import cycle_to, rank_share, update_generated
from ldm.metrics.plot import plot_curves
from ldm.metrics.reference import reference_states
from ldm.stages.base import batch_size
from ldm.utils.images import captioned_grid


def within_budget(eval_seconds: float, last_eval_seconds: float | None, train_seconds: float,
                  fraction: float | None) -> bool:
    """Whether one more evaluation (costing about `last_eval_seconds`) keeps evaluation time at most
    `fraction` of training time. No cap, or no evaluation yet to estimate the cost from: yes."""
    if fraction is None or last_eval_seconds is None:
        return True
    return eval_seconds + last_eval_seconds <= fraction * train_seconds


class FIDCallback(pl.Callback):
    def __init__(
        self,
        every_n_steps: int | None = 1000,
        every_n_images: int | None = None,
        num_images: int = 10_000,
        cpu_num_images: int = 64,
        num_reference: int | None = None,
        shards: str | None = None,
        cache_dir: str = "data/fid_cache",
        network: str | None = None,
        clip_model: str | None = None,
        batch_size: int = 50,
        seed: int = 0,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        sampler: str | None = None,
        use_ema: bool = True,
        autocast: bool = True,
        compile: bool = False,
        at_end: bool = True,
        grid_images: int = 16,
        dirname: str = "fid",
        max_time_fraction: float | None = 0.1,
    ):
        self.every_n_steps = every_n_steps
        self.every_n_images = every_n_images
        self.num_images = num_images
        self.cpu_num_images = cpu_num_images
        self.num_reference = num_reference
        self.shards = shards
        self.cache_dir = cache_dir
        self.network = network
        self.clip_model = clip_model
        self.batch_size = batch_size
        self.seed = seed
        self.generate_kwargs = dict(guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                                    sampler=sampler, use_ema=use_ema)
        self.autocast = autocast
        self.compile = compile
        self.at_end = at_end
        self.grid_images = grid_images
        self.dirname = dirname
        if max_time_fraction is not None and not max_time_fraction > 0:
            raise ValueError(f"max_time_fraction must be > 0 or null, got {max_time_fraction}")
        self.max_time_fraction = max_time_fraction
        self.eval_seconds = 0.0  # in all, and the wall time of training (evaluations excluded), kept in checkpoints
        self.train_seconds = 0.0
        self._last_eval_seconds: float | None = None
        self._clock: float | None = None
        self.history: list[dict] = []
        self._last_step = -1
        self.fid = self.clip = None

    # --- set-up: metrics, reference statistics, captions ------------------------------------------
    def on_fit_start(self, trainer, pl_module):
        device = pl_module.device
        n = self.cpu_num_images if device.type == "cpu" else self.num_images
        shards = self.shards or trainer.datamodule.val_shards
        if shards is None:
            raise ValueError("FIDCallback needs validation shards (data.val_shards) or callbacks.fid.shards")
        self.fid = make_fid(self.network).to(device)
        self.clip = make_clip_score(self.clip_model).to(device) if self.clip_model else None
        if trainer.is_global_zero:  # the real side lives on rank 0 only: the sum over ranks counts it once
            states = reference_states(self.fid, shards, pl_module.resolution, self.num_reference or n,
                                      self.cache_dir, self.network, self.batch_size)
            set_real_states(self.fid, states)
        else:
            set_real_states(self.fid, None)
        self.captions = cycle_to(read_captions(shards, n), n)
        if self.compile:
            pl_module.sampling_unet(self.generate_kwargs["use_ema"]).compile()
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                logger.experiment.define_metric("val/fid", summary="min", step_metric="trainer/global_step")
        self._clock = time.perf_counter()  # training time counts from here (reference statistics are done)

    # --- when -----------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        seen = pl_module.images_seen  # this batch included
        before = seen - batch_size(batch) * trainer.world_size
        step = trainer.global_step
        due_steps = bool(self.every_n_steps) and step % self.every_n_steps == 0
        due_images = bool(self.every_n_images) and seen // self.every_n_images > before // self.every_n_images
        if step > 0 and (due_steps or due_images):
            self._tick()
            go = within_budget(self.eval_seconds, self._last_eval_seconds, self.train_seconds, self.max_time_fraction)
            if trainer.strategy.broadcast(go, src=0):  # rank 0's clock decides for all ranks
                self.evaluate(trainer, pl_module)
            else:
                rank_zero_info(f"step {step}: FID evaluation put off ({self.eval_seconds:.0f} s evaluating against "
                               f"{self.train_seconds:.0f} s training; max_time_fraction={self.max_time_fraction})")

    def _tick(self) -> None:
        """Add the wall time since the last tick to training time."""
        now = time.perf_counter()
        if self._clock is not None:
            self.train_seconds += now - self._clock
        self._clock = now

    def on_train_end(self, trainer, pl_module):
        if self.at_end and self._last_step != trainer.global_step:
            self._tick()
            self.evaluate(trainer, pl_module)
        if trainer.is_global_zero and self.history:
            root = Path(trainer.default_root_dir)
            (root / self.dirname).mkdir(parents=True, exist_ok=True)
            (root / self.dirname / "history.json").write_text(json.dumps(self.history, indent=1))
            out = plot_curves(self.history, root / "fid_curve.png")
            self._log_images(trainer, "val/fid_curve", [str(out)], ["FID against images seen"])
            rank_zero_info(f"FID curve -> {out}")

    # --- what -----------------------------------------------------------------------------------
    def _generate(self, pl_module):
        device = pl_module.device
        use_autocast = self.autocast and device.type == "cuda"

        def generate(prompts, seeds):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
                return pl_module.generate(prompts, seed=seeds, **self.generate_kwargs).float()

        return generate

    def evaluate(self, trainer, pl_module) -> dict:
        """Generate this rank's share, reduce over ranks, log on rank 0. Every rank must call it."""
        t0 = time.perf_counter()
        self._last_step = trainer.global_step
        captions, seeds = rank_share(self.captions, self.seed, trainer.global_rank, trainer.world_size)
        self.fid.reset()  # the fake side only (reset_real_features=False)
        if self.clip is not None:
            self.clip.reset()
        first = update_generated(self._generate(pl_module), captions, seeds, self.fid, self.clip,
                                 self.batch_size, keep=self.grid_images if trainer.is_global_zero else 0)
        row = {"step": trainer.global_step, "images_seen": pl_module.images_seen, "train_seconds": self.train_seconds,
               "wall_seconds": self.train_seconds + self.eval_seconds,  # when this evaluation began
               "val/fid": float(self.fid.compute())}  # compute() syncs the sum states of all ranks
        if self.clip is not None:
            row["val/clip_score"] = float(self.clip.compute())
        row["val/fid_seconds"] = time.perf_counter() - t0
        self._last_eval_seconds = row["val/fid_seconds"]
        self.eval_seconds += row["val/fid_seconds"]
        row["val/fid_time_fraction"] = self.eval_seconds / max(self.train_seconds, 1e-9)
        self._clock = time.perf_counter()  # the evaluation is not training time
        self.history.append(row)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in row.items() if k.startswith("val/")})
        if trainer.is_global_zero:
            metrics = {k: v for k, v in row.items() if k.startswith("val/")}
            metrics["val/images_seen"] = float(pl_module.images_seen)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            self._save_grid(trainer, first, rank_share(self.captions, 0, 0, trainer.world_size)[0])
            rank_zero_info(f"step {trainer.global_step}: FID {row['val/fid']:.3f} on {len(self.captions)} images "
                           f"({row['val/fid_seconds']:.1f} s)")
        return row

    def _save_grid(self, trainer, images, captions):
        if images is None:
            return
        out = Path(trainer.default_root_dir) / self.dirname / f"step_{trainer.global_step:06d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        captioned_grid(images.float() / 255, captions[:len(images)]).save(out)
        self._log_images(trainer, "val/samples", [str(out)], [f"step {trainer.global_step}"])

    def _log_images(self, trainer, key, paths, captions):
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=key, images=paths, caption=captions, step=trainer.global_step)

    def state_dict(self):
        return {"history": self.history, "eval_seconds": self.eval_seconds,
                "train_seconds": self.train_seconds, "last_eval_seconds": self._last_eval_seconds}  # fmt: skip

    def load_state_dict(self, state_dict):
        self.history = list(state_dict["history"])
        self.eval_seconds = state_dict.get("eval_seconds", 0.0)
        self.train_seconds = state_dict.get("train_seconds", 0.0)
        self._last_eval_seconds = state_dict.get("last_eval_seconds")
