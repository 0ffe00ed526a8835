"""ldm.data.workers: a loader's persistent workers are stopped at once at the end of a fit, not joined 5 s each.

The stand-in for a worker that does not exit when asked (what the GPU host's runs showed: the main thread joining
loader workers for 45-82 s after the last step) is a worker with a non-daemon thread still running: Python waits for
it before the worker process can end, so torch's shutdown waits its 5 s timeout and terminates it."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from ldm.data.workers import WorkerLoaders, stop_workers


class Lingering(torch.utils.data.IterableDataset):
    def __iter__(self):
        threading.Thread(target=time.sleep, args=(60,)).start()  # non-daemon: the worker cannot exit before it ends
        yield from range(1000)


def started_loader(workers: int = 2):
    loader = torch.utils.data.DataLoader(Lingering(), batch_size=None, num_workers=workers, persistent_workers=True)
    next(iter(loader))
    return loader


def test_torch_alone_waits_for_a_worker_that_does_not_exit():
    # the symptom, reproduced: shutting the iterator down takes torch's 5 s timeout per such worker
    loader = started_loader(workers=1)
    t0 = time.perf_counter()
    loader._iterator._shutdown_workers()
    assert time.perf_counter() - t0 >= 4.5


def test_stop_workers_stops_them_at_once():
    loader = started_loader()
    workers = list(loader._iterator._workers)
    t0 = time.perf_counter()
    assert stop_workers(loader) == 2
    assert time.perf_counter() - t0 < 3.0
    assert not any(w.is_alive() for w in workers) and loader._iterator is None
    time.sleep(0.5)  # torch's SIGCHLD handler would raise here ("worker ... killed by signal") had it still watched them
    assert stop_workers(loader) == 0  # nothing left; a loader never iterated has nothing either
    assert stop_workers(torch.utils.data.DataLoader(range(4), num_workers=2)) == 0


def test_a_data_module_teardown_stops_the_workers_of_every_loader_it_made(tmp_path):
    from tiny import compose_config, make_tiny_root
    from hydra.utils import instantiate

    cfg = compose_config(make_tiny_root(tmp_path / "tiny"), tmp_path / "run", ["data.num_workers=2"])
    data = instantiate(cfg.data, _convert_="all")
    loaders = [data.train_dataloader(), data.val_dataloader()]
    for loader in loaders:
        next(iter(loader))
    inner = [loader.loader.pipeline[0] for loader in loaders]  # EpochLoader > WebLoader > DataLoader
    workers = [w for loader in inner for w in loader._iterator._workers]
    assert len(workers) >= 3 and all(w.is_alive() for w in workers)  # 2 train, 1-2 val (one per val shard)
    data.teardown("fit")
    assert not any(w.is_alive() for w in workers)


@pytest.mark.parametrize("n", [0, 3])
def test_worker_loaders_holds_loaders_weakly(n):
    loaders = WorkerLoaders()
    kept = [loaders.add(torch.utils.data.DataLoader(range(4))) for _ in range(n)]
    assert loaders.stop() == 0 and len(kept) == n


class Large(torch.utils.data.IterableDataset):
    def __iter__(self):
        while True:
            yield torch.ones(2**20)  # 4 MB: handed to the main process as a shared-memory file descriptor


@pytest.mark.gpu
def test_stopping_workers_does_not_cut_a_pinned_batch_in_half():
    # with pin_memory, a thread receives the workers' batches; a worker terminated while the thread takes its
    # batch's descriptor used to leave a ConnectionResetError traceback from that thread (session 25, stage 1)
    errors, hook = [], threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value)
    try:
        for _ in range(10):
            loader = torch.utils.data.DataLoader(Large(), batch_size=None, num_workers=4, persistent_workers=True,
                                                 pin_memory=True)  # fmt: skip
            it = iter(loader)
            assert next(it).is_pinned()
            time.sleep(0.1)  # the workers fill their prefetch queue meanwhile
            assert stop_workers(loader) == 4
    finally:
        threading.excepthook = hook
    assert errors == []
