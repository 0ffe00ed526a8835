"""A sweep's table and quality curves, from what its jobs wrote locally (works offline, during or after a sweep).

    write_report("runs/ldm/multirun_2026-05-09_10-00-00")     # what `python -m ldm.report DIR` runs
    # -> report.md, report.csv (each job: status, swept values, best and final metrics, objective, error)
    #    fid_curves.png (every job's val/fid against training step on one plot; failed jobs dashed)

Reads the sweep's `index.json` (ldm/utils/sweep_index.py) and each job's `metrics.jsonl` (ldm/utils/metrics_file.py).
A sweep writes its report by itself when it ends; this command rewrites it, e.g. while jobs still run.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from ldm.utils.metrics_file import FILENAME as METRICS
from ldm.utils.metrics_file import read_metrics
from ldm.utils.sweep_index import format_params, read_index

# metric -> which value is best; the ones a run logged appear in the table
DEFAULT_METRICS = {"val/fid": "min", "val/clip_score": "max", "train/loss": "min"}


def _values(rows: list[dict], key: str) -> list[float]:
    return [row[key] for row in rows if row.get(key) is not None]


def job_rows(sweep_dir: str | Path, metrics: dict[str, str] | None = None) -> tuple[list[str], list[dict]]:
    """The report's columns and one row per job (values as numbers or strings; None where there is none)."""
    sweep_dir = Path(sweep_dir)
    index = read_index(sweep_dir)
    metrics = metrics or DEFAULT_METRICS
    logged = {job["num"]: read_metrics(sweep_dir / job["dir"] / METRICS) for job in index["jobs"]}
    params = index.get("params") or sorted({k for job in index["jobs"] for k in job["params"]})
    present = [m for m in metrics if any(_values(rows, m) for rows in logged.values())]
    columns = ["job", "status", *params, *(f"{m} {which}" for m in present for which in ("best", "final")),
               "objective", "name", "error"]
    out = []
    for job in index["jobs"]:
        rows = logged[job["num"]]
        row = {"job": job["num"], "status": job["status"], "name": job.get("name"), "error": job.get("error"),
               "objective": job.get("objective")}
        row.update({p: job["params"].get(p) for p in params})
        for m in present:
            values = _values(rows, m)
            best = (min if metrics[m] == "min" else max)(values) if values else None
            row[f"{m} best"], row[f"{m} final"] = best, values[-1] if values else None
        out.append(row)
    return columns, out


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def write_table(columns: list[str], rows: list[dict], md: Path, csv_path: Path) -> None:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    md.write_text("\n".join(lines) + "\n")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({c: "" if row[c] is None else row[c] for c in columns} for row in rows)


def plot_jobs(sweep_dir: str | Path, out: str | Path, metric: str = "val/fid") -> Path:
    """Every job's ``metric`` against training step on one axes; failed jobs dashed."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    sweep_dir = Path(sweep_dir)
    index = read_index(sweep_dir)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for job in index["jobs"]:
        rows = [row for row in read_metrics(sweep_dir / job["dir"] / METRICS) if row.get(metric) is not None]
        label = f"{job['num']}: {format_params(job['params']) or job['name']}"
        if job["status"] != "completed":
            label += f" ({job['status']})"
        ax.plot([row["step"] for row in rows], [row[metric] for row in rows], marker="o", label=label,
                linestyle="-" if job["status"] == "completed" else "--")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{index.get('group', sweep_dir.name)}: {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None, metric: str = "val/fid") -> list[Path]:
    """report.md, report.csv and fid_curves.png (for ``metric``) in ``out_dir`` (default: the sweep directory)."""
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir or sweep_dir)
    columns, rows = job_rows(sweep_dir)  # first: a folder that is no sweep is refused before anything is made
    out_dir.mkdir(parents=True, exist_ok=True)
    md, csv_path = out_dir / "report.md", out_dir / "report.csv"
    write_table(columns, rows, md, csv_path)
    curves = plot_jobs(sweep_dir, out_dir / f"{metric.split('/')[-1]}_curves.png", metric)
    return [md, csv_path, curves]
