"""One CPU thread count for every training run of the suite, subprocesses included (`LDM_CPU_THREADS`, read by
conf/callbacks/cpu_threads.yaml): the exact-resume tests compare runs bit for bit, and `callbacks.cpu_threads`
would otherwise follow the machine's load, and a different thread count sums in a different order (README,
"Exact resume"). tests/test_cpu_threads.py builds the callback itself and checks the load-following.

Each test starts at the process's own thread count: a run in one test (the callback sets the count) does not leave
another test's in-process reference computed with other sums than its subprocesses (the data-parallel checks)."""

import os

os.environ.setdefault("LDM_CPU_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _same_torch_threads():
    torch.set_num_threads(_THREADS)
    yield
    torch.set_num_threads(_THREADS)
