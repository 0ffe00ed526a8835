"""The shapes prompt-following reader: near perfect on rendered ground truth, near chance when the
captions are shuffled against the images (so a high score cannot come from the reader alone)."""

import random

import numpy as np

from ldm.data.shapes import render
from ldm.metrics.shape_following import agreement, read_attributes


def _rendered(n, seed=0):
    rng = random.Random(seed)
    out = [render(rng, 32) for _ in range(n)]
    return [np.asarray(img) for img, _, _ in out], [a for _, _, a in out]


def test_reads_rendered_ground_truth():
    images, attrs = _rendered(200)
    result = agreement(images, attrs)
    assert result["color"] == 1.0 and result["position"] == 1.0 and result["size"] == 1.0
    assert result["shape"] >= 0.95


def test_shuffled_captions_score_near_chance():
    images, attrs = _rendered(400, seed=1)
    shuffled = attrs[1:] + attrs[:1]
    result = agreement(images, shuffled)
    assert result["color"] < 0.3 and result["position"] < 0.3 and result["all"] < 0.05


def test_blank_image_shows_nothing():
    assert read_attributes(np.full((32, 32, 3), 128, np.uint8)) is None
