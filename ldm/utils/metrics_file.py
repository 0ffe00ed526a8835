"""A run's `metrics.jsonl`: one JSON object per line, written by `ldm.callbacks.metrics_log.MetricsLog`.

    rows = read_metrics("runs/x/metrics.jsonl")   # [{"step": 10, "train/loss": 0.12}, ...]

Plain JSON (no torch): a sweep's report and `python -m ldm.report` read it without importing the training stack.
"""

from __future__ import annotations

import json
from pathlib import Path

FILENAME = "metrics.jsonl"  # where conf/callbacks/metrics_log.yaml puts it in every run directory


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a `metrics.jsonl` (none when the file does not exist); a torn last line is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # the line a killed run was writing
    return rows
