"""Aspect-ratio buckets: the (width, height) each image trains at, so portraits and landscapes keep their framing.

    >>> generate_buckets(512 * 512, step=64, max_aspect=2.0)
    [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]
    >>> buckets = parse_buckets({"max_aspect": 2.0}, resolution=512)       # the same: area 512 x 512, step 64
    >>> assign_bucket((3000, 2000), buckets, upscale=False)                 # 3:2 -> 640x384 (nearest aspect ratio)
    4
    >>> assign_bucket((300, 200), buckets, upscale=False) is None           # too small: never upscaled
    True

`data.buckets` takes three forms (`parse_buckets`): null (off: square crops at `data.resolution`), a list of
[width, height], or a mapping {area, step, max_aspect} generating every bucket of at most `area` pixels (default
`data.resolution` squared) with sides that are multiples of `step` (64) and an aspect ratio of at most
`max_aspect` (2.0), both orientations. An image goes to the bucket whose aspect ratio is nearest its own (in log
space, so 2:1 and 1:2 are equally far from 1:1); among buckets of that aspect ratio, the largest it covers. It is
resized to cover the bucket and cropped; an image smaller than every such bucket is too small: it is left out and
counted, or upscaled into the smallest of them with `upscale`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

Size = tuple[int, int]  # (width, height), PIL's order

DEFAULT_STEP = 64
DEFAULT_MAX_ASPECT = 2.0


class BucketError(ValueError):
    """A bucket specification that cannot work; the message is one line naming the value at fault."""


def generate_buckets(area: int, step: int = DEFAULT_STEP, max_aspect: float = DEFAULT_MAX_ASPECT) -> list[Size]:
    """Every (w, h) with w, h multiples of `step`, w * h <= `area` and the larger as large as the area allows for
    the smaller, with max(w/h, h/w) <= `max_aspect`; both orientations; sorted by aspect ratio (w/h)."""
    if step <= 0:
        raise BucketError(f"data.buckets.step={step} must be positive")
    if max_aspect < 1:
        raise BucketError(f"data.buckets.max_aspect={max_aspect} is below 1: an aspect ratio is long side / short side")
    if area < step * step:
        raise BucketError(f"data.buckets.area={area} is below one {step}x{step} step")
    buckets = set()
    short = step
    while short * short <= area:
        long = area // short // step * step  # the longest side the area allows, a multiple of the step
        if long / short <= max_aspect + 1e-9:
            buckets.update({(short, long), (long, short)})
        short += step
    return sorted(buckets, key=lambda size: size[0] / size[1])


def parse_buckets(spec, resolution: int) -> list[Size] | None:
    """`data.buckets` -> sorted list of (width, height), or None when off (see the module docstring)."""
    if spec is None or spec is False or (isinstance(spec, str) and spec.lower() in ("off", "none", "null")):
        return None
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"area", "step", "max_aspect"}
        if unknown:
            raise BucketError(f"data.buckets: unknown keys {sorted(unknown)}; expected area, step, max_aspect")
        area = spec.get("area") or resolution * resolution
        return generate_buckets(int(area), int(spec.get("step") or DEFAULT_STEP),
                                float(spec.get("max_aspect") or DEFAULT_MAX_ASPECT))  # fmt: skip
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        buckets = []
        for size in spec:
            if (not isinstance(size, Sequence) or isinstance(size, str) or len(size) != 2
                    or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):  # fmt: skip
                raise BucketError(f"data.buckets: {size!r} is not a [width, height] pair of positive integers")
            buckets.append((int(size[0]), int(size[1])))
        if not buckets:
            raise BucketError("data.buckets is an empty list: give [width, height] pairs, or null for square crops")
        if len(set(buckets)) != len(buckets):
            raise BucketError(f"data.buckets lists a size twice: {buckets}")
        return sorted(buckets, key=lambda size: (size[0] / size[1], size[0] * size[1]))
    raise BucketError(f"data.buckets={spec!r}: expected null, a list of [width, height], or "
                      f"{{area, step, max_aspect}}")  # fmt: skip


def check_multiple(buckets: Sequence[Size], factor: int, what: str = "the VAE's downsampling factor") -> None:
    """BucketError when a bucket side is not a multiple of `factor`."""
    for w, h in buckets:
        if w % factor or h % factor:
            raise BucketError(f"data.buckets: {w}x{h} is not a multiple of {what} {factor}")


def cover_scale(size: Size, target: Size) -> float:
    """The scale that makes an image of `size` cover `target` (> 1: it must be upscaled)."""
    return max(target[0] / size[0], target[1] / size[1])


def assign_bucket(size: Size, buckets: Sequence[Size], upscale: bool = False) -> int | None:
    """Index of the bucket an image of `size` (width, height) trains in, or None when it is too small for every
    bucket of its nearest aspect ratio and `upscale` is off."""
    w, h = size
    if w <= 0 or h <= 0:
        return None
    aspect = math.log(w / h)
    distance = [abs(aspect - math.log(bw / bh)) for bw, bh in buckets]
    nearest = min(distance)
    candidates = [i for i, d in enumerate(distance) if d <= nearest + 1e-9]  # one aspect ratio, maybe several sizes
    covered = [i for i in candidates if cover_scale(size, buckets[i]) <= 1]
    if covered:
        return max(covered, key=lambda i: buckets[i][0] * buckets[i][1])
    if upscale:
        return min(candidates, key=lambda i: buckets[i][0] * buckets[i][1])
    return None


def describe(buckets: Sequence[Size], counts: Sequence[int]) -> str:
    """'384x640: 12, 512x512: 40, ...' (buckets holding no image left out)."""
    return ", ".join(f"{w}x{h}: {n}" for (w, h), n in zip(buckets, counts) if n) or "none"
