"""One CPU thread count for every training run of the suite, subprocesses included (`LDM_CPU_THREADS`, read by
conf/callbacks/cpu_threads.yaml): the exact-resume tests compare runs bit for bit, and `callbacks.cpu_threads`
would otherwise follow the machine's load, and a different thread count sums in a different order (README,
"Exact resume"). tests/test_cpu_threads.py builds the callback itself and checks the load-following."""

import os

os.environ.setdefault("LDM_CPU_THREADS", "1")
