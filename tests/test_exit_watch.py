"""LDM_EXIT_STACKS (ldm/utils/exit_watch.py): where a process spends the time after its work."""

from __future__ import annotations

import os
import subprocess
import sys


def test_exit_watch_dumps_the_stacks_of_a_process_that_lingers():
    """LDM_EXIT_STACKS: a process still alive after its work writes every thread's stack, with the waiting frame."""
    code = (
        "import time\n"
        "from ldm.utils.exit_watch import watch_exit\n"
        "assert watch_exit() == 0.5\n"
        "def waiting_for_workers():\n"
        "    time.sleep(2.0)\n"
        "waiting_for_workers()\n"
    )
    env = {**os.environ, "LDM_EXIT_STACKS": "0.5"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert "LDM_EXIT_STACKS: work done at" in out.stderr
    assert out.stderr.count("waiting_for_workers") >= 2  # dumped at 0.5, 1.0, 1.5 s while it slept (2 at least on a busy machine), each naming the frame
    silent = subprocess.run([sys.executable, "-c", "from ldm.utils.exit_watch import watch_exit; print(watch_exit())"],
                            capture_output=True, text=True, check=True,
                            env={k: v for k, v in env.items() if k != "LDM_EXIT_STACKS"})  # fmt: skip
    assert silent.stdout.strip() == "None" and silent.stderr == ""


def test_bench_stops_a_run_that_lingers_after_its_timing_and_logs_where_it_waited(tmp_path):
    """scripts/bench_train.py: a run alive `grace` s after writing its timing is stopped with its process group
    (its LDM_EXIT_STACKS dumps already in the log); the measurement counts (exit code 0)."""
    import importlib.util
    import time
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_train", Path(__file__).parents[1] / "scripts" / "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    timing = tmp_path / "timing.json"
    code = (
        "import pathlib, sys, time\n"
        "from ldm.utils.exit_watch import watch_exit\n"
        "def lingering_teardown():\n"
        "    time.sleep(60)\n"
        f"pathlib.Path({str(timing)!r}).write_text('{{}}')\n"
        "watch_exit()\n"
        "lingering_teardown()\n"
    )
    env = {**os.environ, "LDM_EXIT_STACKS": "0.5"}
    with open(tmp_path / "run.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
        t0 = time.monotonic()
        assert bench.wait_or_stop_after_timing(proc, timing, 2.0, log) == 0
    assert time.monotonic() - t0 < 30  # not the 60 s sleep
    text = (tmp_path / "run.log").read_text()
    assert "lingering_teardown" in text and "stopped" in text
