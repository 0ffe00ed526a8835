"""A PNG of quality curves: FID (and CLIP score) against images seen and, where rows have them, training time and
wall time (training and the evaluations before the row's).

    plot_curves([{"images_seen": 6400, "train_seconds": 61.2, "val/fid": 80.1, "val/clip_score": 21.0}, ...],
                "run/fid_curve.png")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def plot_curves(history: Sequence[dict], out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    keys = [k for k in ("val/fid", "val/clip_score") if any(k in row for row in history)]
    xs = [("images_seen", "images seen")]
    if all("train_seconds" in row for row in history):
        xs.append(("train_seconds", "training time (s, evaluations excluded)"))
    if all("wall_seconds" in row for row in history):
        xs.append(("wall_seconds", "wall time (s, evaluations included)"))
    fig, axes = plt.subplots(len(keys), len(xs), figsize=(6 * len(xs), 3 * len(keys)), sharex="col", squeeze=False)
    for column, (x, label) in enumerate(xs):
        for ax, key in zip(axes[:, column], keys):
            rows = [row for row in history if key in row]
            ax.plot([row[x] for row in rows], [row[key] for row in rows], marker="o")
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
        axes[-1, column].set_xlabel(label)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
