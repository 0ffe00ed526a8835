"""Stop a DataLoader's worker processes now, rather than as torch does when the loader is dropped.

    stop_workers(loader)     # a loader with persistent workers, after its last batch was taken
    loaders = WorkerLoaders(); loader = loaders.add(DataLoader(...)); loaders.stop()   # a data module's teardown

A loader with persistent workers keeps them until its iterator is garbage collected, at interpreter exit for a
training run. torch then asks each worker to finish and joins it with a 5 s timeout (`MP_STATUS_CHECK_INTERVAL`)
before terminating it: a worker that does not exit at once costs 5 s, one after another. On the GPU host every
`ldm.train` process outlived its last step by 45-82 s, its main thread joining loader workers
(`_MultiProcessingDataLoaderIter._shutdown_workers`; docs/benchmarks.md, session 12): 8-16 workers x 5 s. A worker
at the end of a fit holds nothing to keep (it only reads), so here it is terminated (SIGTERM, what torch does after
its timeout) and then joined, after the pin-memory thread (GPU runs) is stopped as torch's shutdown stops it first;
the iterator's own shutdown then finds them gone and closes the queues as usual.
"""

from __future__ import annotations

import warnings
import weakref

import torch


def stop_workers(loader) -> int:
    """Terminate ``loader``'s live worker processes and shut its iterator down; returns how many were stopped
    (0: no multi-process iterator, e.g. `num_workers=0` or never iterated). ``loader``: a torch DataLoader, or a
    webdataset WebLoader (a pipeline whose first stage is one)."""
    if not isinstance(loader, torch.utils.data.DataLoader):
        return sum(stop_workers(stage) for stage in getattr(loader, "pipeline", [])
                   if isinstance(stage, torch.utils.data.DataLoader))  # fmt: skip
    it = getattr(loader, "_iterator", None)
    if not isinstance(it, torch.utils.data.dataloader._MultiProcessingDataLoaderIter):
        return 0
    if getattr(it, "_worker_pids_set", False):  # as torch's own shutdown does before it terminates a worker: else its
        torch.utils.data._utils.signal_handling._remove_worker_pids(id(it))  # SIGCHLD handler raises "DataLoader
        it._worker_pids_set = False  # worker ... is killed by signal" in the main thread, wherever it is
    _stop_pin_memory_thread(it)
    workers = [w for w in getattr(it, "_workers", []) if w.is_alive()]
    for w in workers:
        w.terminate()
    for w in workers:
        w.join(timeout=5.0)
    it._shutdown_workers()  # pin-memory thread, queues; the workers it joins are gone
    loader._iterator = None
    return len(workers)


class WorkerLoaders:
    """The loaders a data module made (weakly held): `stop()` stops all their workers (the module's teardown)."""

    def __init__(self):
        self._loaders = weakref.WeakSet()

    def add(self, loader):
        self._loaders.add(loader)
        return loader

    def stop(self) -> int:
        """Stop every loader's workers; a loader that cannot be stopped so (another torch's internals) is left to
        torch's own shutdown, with a warning: a finished run is never failed by this."""
        stopped = 0
        for loader in list(self._loaders):
            try:
                stopped += stop_workers(loader)
            except Exception as error:  # noqa: BLE001 - the run's work is done; torch still shuts them down at exit
                warnings.warn(f"could not stop the data loader's workers early ({error!r}); torch will at exit")
        self._loaders = weakref.WeakSet()
        return stopped


def _stop_pin_memory_thread(it, timeout: float = 5.0) -> None:
    """Stop the iterator's pin-memory thread (GPU runs) before its workers, as torch's own shutdown does: a worker
    terminated while that thread is receiving its batch's shared-memory handle leaves a `ConnectionResetError`
    traceback from the thread (seen at the end of stage 1 on the H200 machine, session 25). ``timeout``: a thread
    that does not finish its batch by then is left to `_shutdown_workers`."""
    thread = getattr(it, "_pin_memory_thread", None)
    if thread is None or not thread.is_alive():
        return
    it._pin_memory_thread_done_event.set()
    it._worker_result_queue.put((None, None))  # wakes a thread waiting on an empty queue
    thread.join(timeout=timeout)
