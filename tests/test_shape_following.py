"""The shapes prompt-following reader: near perfect on rendered ground truth, near chance when the
captions are shuffled against the images (so a high score cannot come from the reader alone)."""

import random

import numpy as np

from ldm.data.shapes import render
from ldm.metrics.shape_following import agreement, agreement_by, read_attributes


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


def test_agreement_by_size_isolates_the_group_that_fails():
    images, attrs = _rendered(200, seed=2)
    # the small shapes' images blanked: only their group drops, to 0; the large ones keep the reader's score
    blank = np.full((32, 32, 3), 128, np.uint8)
    damaged = [blank if a["size"] == "small" else img for img, a in zip(images, attrs)]
    before, after = agreement_by(images, attrs), agreement_by(damaged, attrs)
    assert set(after) == {"small", "large"}
    assert sum(n for _, n in after.values()) == 200 and after["small"][1] == sum(a["size"] == "small" for a in attrs)
    assert before["small"][0] >= 0.9 and before["large"][0] >= 0.9
    assert after["small"][0] == 0.0 and after["large"] == before["large"]
