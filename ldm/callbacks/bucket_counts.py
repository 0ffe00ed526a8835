"""Logs what the bucket planner made of the train data (`ShardDataModule.bucket_report`), once at the start and
per epoch; the data module prints the same at start.

    Trainer(callbacks=[BucketCounts()])     # conf/callbacks/bucket_counts.yaml

At the start: W&B gets a table `data/buckets` (bucket, width, height, images, class images) and a bar chart of it
(`data/bucket_images`); every logger gets `data/bucket_images/<W>x<H>` and `data/too_small`, `data/unreadable`.
Every epoch: `data/carried` (samples of part-filled buckets carried into the next pass), `data/short_batches`,
`data/repeated_batches`. Nothing without buckets.
"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger


class BucketCounts(pl.Callback):
    @staticmethod
    def _report(trainer) -> dict | None:
        datamodule = trainer.datamodule
        return datamodule.bucket_report() if datamodule is not None and hasattr(datamodule, "bucket_report") else None

    def on_train_start(self, trainer, pl_module):
        report = self._report(trainer)
        if report is None or not trainer.is_global_zero:
            return
        classes = report["class_counts"] or [0] * len(report["counts"])
        rows = [[f"{w}x{h}", w, h, n, c] for (w, h), n, c in zip(report["buckets"], report["counts"], classes)]
        scalars = {f"data/bucket_images/{name}": float(n) for name, _, _, n, _ in rows}
        scalars.update({"data/too_small": float(report["too_small"]), "data/unreadable": float(report["unreadable"])})
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
            if isinstance(logger, WandbLogger):
                import wandb  # only with a W&B logger (which needs it too): wandb stays optional elsewhere

                table = wandb.Table(columns=["bucket", "width", "height", "images", "class_images"], data=rows)
                logger.experiment.log({"data/buckets": table, "data/bucket_images": wandb.plot.bar(
                    table, "bucket", "images", title="images per bucket (width x height)")})  # fmt: skip

    def on_train_epoch_start(self, trainer, pl_module):
        report = self._report(trainer)
        if report is None or not trainer.is_global_zero:
            return
        scalars = {"data/carried": float(report["carried"]), "data/short_batches": float(report["short"]),
                   "data/repeated_batches": float(report["repeated"])}  # fmt: skip
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
