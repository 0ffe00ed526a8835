"""A PNG of quality curves: FID (and CLIP score) against images seen.

    plot_curves([{"images_seen": 6400, "val/fid": 80.1, "val/clip_score": 21.0}, ...], "run/fid_curve.png")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def plot_curves(history: Sequence[dict], out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    keys = [k for k in ("val/fid", "val/clip_score") if any(k in row for row in history)]
    fig, axes = plt.subplots(len(keys), 1, figsize=(6, 3 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        rows = [row for row in history if key in row]
        ax.plot([row["images_seen"] for row in rows], [row[key] for row in rows], marker="o")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("images seen")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
