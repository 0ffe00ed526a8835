"""CPU threads follow the cores other processes leave free: the accounting (this process tree's CPU time from
/proc against the kernel's own count, `time.process_time`, and a child's own), the thread rule, and the callback
switching torch's thread count as the others' load changes."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from ldm.callbacks.cpu_threads import CPUThreads
from ldm.utils import cpu
from ldm.utils.cpu import CPUSample, own_busy_seconds, threads_for

pytestmark = pytest.mark.skipif(CPUSample.now() is None, reason="needs Linux /proc")


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_own_busy_time_is_this_process_cpu_time():
    before, process_before = own_busy_seconds(), time.process_time()
    _spin(0.3)
    tick = 1 / cpu.CLOCK_TICKS
    assert own_busy_seconds() - before == pytest.approx(time.process_time() - process_before, abs=3 * tick)


def test_own_busy_time_counts_live_children():
    # a child (a dataloader worker, say) spins, reports its own CPU time, then waits alive
    child = subprocess.Popen([sys.executable, "-c", "import time\nend = time.process_time() + 0.4\n"
                              "while time.process_time() < end: pass\nprint(time.process_time(), flush=True)\n"
                              "time.sleep(5)"], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        before = own_busy_seconds()  # the child has barely started
        child_cpu = float(child.stdout.readline())
        assert own_busy_seconds() - before >= child_cpu - 0.1
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize(("cores", "others", "expected"), [(2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.0, 1),
                                                           (2, 2.0, 1), (16, 3.2, 13), (1, 0.0, 1)])  # fmt: skip
def test_one_thread_per_free_core(cores, others, expected):
    assert threads_for(cores, others) == expected


def test_others_busy_is_machine_minus_own_over_wall():
    a = CPUSample(wall=10.0, machine=100.0, own=5.0)
    b = CPUSample(wall=12.0, machine=103.0, own=6.0)  # 3 busy core-seconds in 2 s, 1 of them ours
    assert a.others_busy(b) == pytest.approx(1.0)


def test_callback_follows_the_others_load(monkeypatch):
    samples = iter([CPUSample(0.0, 0.0, 0.0), CPUSample(0.5, 0.6, 0.0),  # start-up: the others use 1.2 cores
                    CPUSample(20.0, 25.0, 19.0),  # 19.5 s later: the others used 0.3 cores: both threads
                    CPUSample(40.0, 60.0, 34.0)])  # then 1.0 core: one thread  # fmt: skip
    monkeypatch.setattr(CPUSample, "now", classmethod(lambda cls: next(samples)))
    monkeypatch.setattr(cpu, "available_cores", lambda: 2)
    monkeypatch.setattr("ldm.callbacks.cpu_threads.available_cores", lambda: 2)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    monkeypatch.setattr(time, "monotonic", lambda: 1e9)  # always due

    class Module:
        device = torch.device("cpu")

        def log(self, *args, **kwargs):
            pass

    previous = torch.get_num_threads()
    try:
        callback = CPUThreads(every_n_seconds=10)
        callback.on_fit_start(None, Module())
        assert torch.get_num_threads() == 1
        callback.on_train_batch_end(None, Module(), None, None, 0)
        assert torch.get_num_threads() == 2
        callback.on_train_batch_end(None, Module(), None, None, 0)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)


def test_environment_fixes_the_count(monkeypatch):
    """`LDM_CPU_THREADS` fixes callbacks.cpu_threads.threads (what tests/conftest.py sets for bit-exact resume);
    unset, the count follows the load (null)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from tiny import CONF

    for value, expected in (("3", 3), (None, None)):
        if value is None:
            monkeypatch.delenv("LDM_CPU_THREADS", raising=False)
        else:
            monkeypatch.setenv("LDM_CPU_THREADS", value)
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="train")
        assert cfg.callbacks.cpu_threads.threads == expected
        assert instantiate(cfg.callbacks.cpu_threads).fixed == expected
