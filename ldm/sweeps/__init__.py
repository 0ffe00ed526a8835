"""Hydra multiruns: each job recorded in the sweep's index, failures that do not stop the others, the objective an
Optuna sweeper optimises, and the report at the end. A single run never comes here.

    job        run_job(cfg): one job of a multirun (ldm.train calls it only in MULTIRUN mode)
    callback   SweepCallback: the Hydra callback that opens and closes the index, then writes the report
    report     write_report: report.md / report.csv / fid_curves.png from the jobs' metrics.jsonl

The index file and the names it gives jobs live in ldm/utils/sweep_index.py (config resolvers need them below).
May import everything in ldm except the command-line entry points.
"""
