"""Write (or rewrite, while jobs still run) a sweep's report: report.md, report.csv and the FID curves.

    python -m ldm.report runs/ldm/multirun_2026-05-09_10-00-00
    # -> report.md, report.csv (each job: status, swept values, best and final metrics, objective, error)
    #    fid_curves.png (every job's val/fid against training step on one plot; failed jobs dashed)
"""

from __future__ import annotations

import sys
from pathlib import Path

from ldm.sweeps.report import write_report
from ldm.utils.cli import ArgumentParser, run_command


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m ldm.report", description=__doc__.split("\n")[0])
    p.add_argument("sweep_dir", help="a sweep directory (holds index.json)")
    p.add_argument("--out", default=None, help="where to write (default: the sweep directory)")
    p.add_argument("--metric", default="val/fid", help="the metric plotted for every job")
    return p


def main(argv=None) -> list[Path]:
    args = parser().parse_args(argv)
    paths = write_report(args.sweep_dir, args.out, args.metric)
    for path in paths:
        print(path)
    return paths


def cli() -> None:
    sys.exit(run_command(main))


if __name__ == "__main__":
    cli()
