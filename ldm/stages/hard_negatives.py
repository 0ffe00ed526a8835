"""Hard-negative captions for contrastive training: a caption with one attribute phrase swapped for another.

NegCLIP (Yuksekgonul et al. 2023, "When and why vision-language models behave like bags-of-words") adds such
captions as extra negatives, so the text tower has to encode the words a random batch rarely contrasts. Each
group is a list of interchangeable phrases (the 9 positions, the colours, ...); the longest phrase of a group that
occurs in the caption (at word boundaries) is the one replaced.

    swaps = CaptionSwaps({"position": ["at the top", "at the top left", "on the left"]})
    swaps.variants("a red circle at the top left", "position")
    # ['a red circle at the top', 'a red circle at the top left', 'a red circle on the left'], index 1
"""

from __future__ import annotations

import random
import re


class CaptionSwaps:
    def __init__(self, groups: dict[str, list[str]]):
        self.groups = {}
        for name, phrases in groups.items():
            phrases = list(phrases)
            if len(phrases) < 2 or len(set(phrases)) != len(phrases):
                raise ValueError(f"hard-negative group {name!r} needs at least 2 distinct phrases, got {phrases}")
            self.groups[name] = phrases
        # longest first: "at the top left" wins over "at the top" where both match at the same place
        self._patterns = {
            name: re.compile(r"\b(" + "|".join(re.escape(p) for p in sorted(ps, key=len, reverse=True)) + r")\b")
            for name, ps in self.groups.items()
        }

    def variants(self, caption: str, group: str) -> tuple[list[str], int] | None:
        """The caption with its phrase of `group` replaced by each phrase of the group (the group's order), and the
        index of the phrase it holds; None when it holds none."""
        match = self._patterns[group].search(caption)
        if match is None:
            return None
        head, tail = caption[: match.start()], caption[match.end():]
        phrases = self.groups[group]
        return [head + p + tail for p in phrases], phrases.index(match.group(1))

    def negatives(self, captions: list[str], rng: random.Random) -> tuple[list[str], list[int], list[int]]:
        """One negative per (caption, group) where the caption holds a phrase of the group: another phrase drawn at
        random. Returns (negative captions, index of the caption each belongs to, index of its group)."""
        out, owner, group_index = [], [], []
        for i, caption in enumerate(captions):
            for g, name in enumerate(self.groups):
                found = self.variants(caption, name)
                if found is None:
                    continue
                variants, true = found
                pick = rng.randrange(len(variants) - 1)
                out.append(variants[pick + (pick >= true)])  # any phrase but the true one
                owner.append(i)
                group_index.append(g)
        return out, owner, group_index
