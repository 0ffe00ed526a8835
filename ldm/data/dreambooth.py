"""DreamBooth data: instance images of a subject plus class ("regularisation") images of its class, which keep the
model's prior (Ruiz et al. 2023, "DreamBooth", sec. 3.3: the class-specific prior preservation loss).

    data.train_shards=data/sks                 # the instance photos ("a photo of sks dog")
    data.dreambooth='{class_prompt: "a photo of a dog", num_class_images: 200, prior_loss_weight: 1.0}'

Every training batch then holds `data.batch_size` instance samples and as many class samples of the same bucket
(`ldm.data.plan`); the class samples' loss is weighted by `prior_loss_weight` (batches carry a per-sample
`loss_weight`). When `class_shards` holds fewer than `num_class_images` images, the missing ones are generated with
the base model before training (`ldm.run.class_images`), at the sizes of the buckets the instance images fill (in
proportion), and written there as shards: the next run reuses them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ldm.data.buckets import Size


@dataclass(frozen=True)
class DreamBooth:
    class_prompt: str
    class_shards: str
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    sample_batch_size: int = 4  # images generated per batch

    def __post_init__(self):
        if not self.class_prompt or not self.class_prompt.strip():
            raise ValueError("data.dreambooth.class_prompt must be set (e.g. 'a photo of a dog')")
        if self.num_class_images < 1:
            raise ValueError(f"data.dreambooth.num_class_images={self.num_class_images} must be at least 1")
        if self.prior_loss_weight < 0:
            raise ValueError(f"data.dreambooth.prior_loss_weight={self.prior_loss_weight} must be >= 0")
        if self.sample_batch_size < 1:
            raise ValueError(f"data.dreambooth.sample_batch_size={self.sample_batch_size} must be at least 1")


def class_image_sizes(buckets: list[Size], instance_counts: list[int], missing: int,
                      have: list[int] | None = None) -> list[Size]:  # fmt: skip
    """The (width, height) of each of `missing` class images to generate: the buckets the instance images fill, in
    proportion to their instance counts (largest remainders), counting the class images there already (`have`)."""
    have = have or [0] * len(buckets)
    total = sum(have) + missing
    instances = sum(instance_counts)
    if instances == 0 or missing <= 0:
        return []
    want = [total * n / instances for n in instance_counts]
    need = [max(0.0, w - h) for w, h in zip(want, have)]
    scale = missing / sum(need) if sum(need) else 0.0
    shares = [n * scale for n in need]
    counts = [int(s) for s in shares]
    by_remainder = sorted(range(len(buckets)), key=lambda b: shares[b] - counts[b], reverse=True)
    for b in by_remainder[: missing - sum(counts)]:
        counts[b] += 1
    return [buckets[b] for b in range(len(buckets)) for _ in range(counts[b])]
