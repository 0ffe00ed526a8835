"""Tag captions ("1girl, red hair, smiling, outdoors"): keep the first tags, shuffle and drop the others, prefix a
trigger word. Randomness comes from the sample's own RNG (seeded by seed, pass, shard and key), so a caption is the
same wherever and whenever that visit is replayed (exact resume).

    >>> import random
    >>> tags = CaptionProcessor(keep_tokens=1, shuffle_tags=True, trigger="sks")
    >>> tags("portrait of a woman, red hair, smiling, outdoors", random.Random(0))
    'sks, portrait of a woman, red hair, outdoors, smiling'

    data.captions: {keep_tokens: 1, shuffle_tags: true, tag_dropout: 0.1, trigger: sks}

keep_tokens (kohya's name): how many leading tags stay in place and are never dropped. tag_dropout: each other tag
is left out with this probability. trigger: a word put first (before the kept tags, never dropped) unless the
caption already starts with it. Captions are split at `separator` and joined with the separator and a space.
Sentence captions go through unchanged unless an option is set (a trigger then is prefixed as a tag).
"""

from __future__ import annotations

import random


class CaptionProcessor:
    def __init__(self, keep_tokens: int = 0, shuffle_tags: bool = False, tag_dropout: float = 0.0,
                 trigger: str | None = None, separator: str = ","):  # fmt: skip
        if keep_tokens < 0:
            raise ValueError(f"data.captions.keep_tokens={keep_tokens} must be >= 0")
        if not 0.0 <= tag_dropout < 1.0:
            raise ValueError(f"data.captions.tag_dropout={tag_dropout} must be in [0, 1)")
        if not separator:
            raise ValueError("data.captions.separator must not be empty")
        self.keep_tokens, self.shuffle_tags, self.tag_dropout = keep_tokens, shuffle_tags, tag_dropout
        self.trigger = trigger.strip() if trigger else None
        self.separator = separator

    @property
    def active(self) -> bool:
        """Whether captions change at all (keep_tokens alone changes nothing)."""
        return self.shuffle_tags or self.tag_dropout > 0 or self.trigger is not None

    def __call__(self, caption: str, rng: random.Random) -> str:
        if not self.active:
            return caption
        tags = [tag.strip() for tag in caption.split(self.separator)]
        tags = [tag for tag in tags if tag]
        kept, rest = tags[: self.keep_tokens], tags[self.keep_tokens :]
        if self.tag_dropout > 0:
            rest = [tag for tag in rest if rng.random() >= self.tag_dropout]
        if self.shuffle_tags:
            rng.shuffle(rest)
        if self.trigger is not None and (not tags or tags[0] != self.trigger):
            kept = [self.trigger, *kept]
        return f"{self.separator} ".join(kept + rest)


def caption_processor(captions: dict | None) -> CaptionProcessor | None:
    """`data.captions` (a mapping of CaptionProcessor's arguments, or null) -> a processor, or None when it would
    change nothing."""
    if not captions:
        return None
    processor = CaptionProcessor(**captions)
    return processor if processor.active else None
