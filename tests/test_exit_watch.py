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
