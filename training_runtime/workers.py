"""DataLoader worker processes that live for the whole run, and pinned host memory for GPUs.

A ``gluon.data.DataLoader`` with ``num_workers`` > 0 forks its own pool of
processes when it is built. The runner used to build one per epoch and one
per evaluation, and every fork stops MXNet's engine (its ``pthread_atfork``
handler waits for every queued operation: a device sync) and pays the
workers' start-up again. :class:`WorkerPool` forks ``num_workers`` processes
once, when a run starts, holding every split the run reads (training and
validation), and serves each epoch's and each evaluation's batches through
gluon's own multi-worker iterator (``_MultiWorkerIter``: same prefetch, same
shared-memory batches, same timeout). Keys are ``(split, key)``; the
training split's keys stay ``(epoch, index)`` (``loop.IndexedDataset``
reseeds per sample), so any worker gives the same batches as the main
process and a resumed run the same as the uninterrupted one.

The workers are armed with ``loop.die_with_parent`` when they start (a
SIGKILLed run leaves none), get SIGTERM's default action at fork
(``loop._default_sigterm_in_child``) and ignore SIGINT (as gluon's own
pool), and :meth:`WorkerPool.close` ends them when the run ends (the final
test builds its own loader afterwards). A worker that dies is replaced by
``multiprocessing.Pool`` itself (a new fork).

:func:`pinning`: the loaders' ``pin_memory`` / ``pin_device_id`` for the
run's contexts: batches are copied into page-locked host memory when the
contexts are GPUs (the host-to-device copies of ``split_and_load`` are then
DMA transfers that need no staging copy), never on CPU contexts.
"""
import multiprocessing
import os
import signal
import threading

import mxnet as mx
from mxnet.gluon.data import dataloader as _gluon_loader
from mxnet.util import is_np_array, is_np_shape


def pinning(ctx):
    """``{"pin_memory", "pin_device_id"}`` for a DataLoader feeding ``ctx`` (a list of
    contexts): pinned memory on the first GPU's id when the contexts are GPUs."""
    gpus = [c for c in ctx if c.device_type == "gpu"]
    return {"pin_memory": bool(gpus), "pin_device_id": gpus[0].device_id if gpus else 0}


class _Splits(object):
    """What every worker holds: split name -> dataset; a key is ``(name, key)``."""

    def __init__(self, datasets):
        self.datasets = dict(datasets)

    def __getitem__(self, key):
        name, item = key
        return self.datasets[name][item]


def _start_worker(splits, parent_pid, np_shape, np_array):
    """A worker's initializer: die with the run, then gluon's (the dataset as the
    worker's global, numpy semantics as in the parent)."""
    from .loop import die_with_parent  # the loop imports this module
    die_with_parent(parent_pid)
    _gluon_loader._worker_initializer(splits, np_shape, np_array)


class WorkerPool(object):
    """``num_workers`` DataLoader worker processes over the named ``datasets`` (dict
    name -> Dataset), forked on first use and kept until :meth:`close`."""

    def __init__(self, datasets, num_workers, timeout=120):
        if num_workers < 1:
            raise ValueError("WorkerPool: expected at least 1 worker, got %d" % num_workers)
        self.num_workers, self.timeout = int(num_workers), timeout
        self._splits = _Splits(datasets)
        self._pool = None

    def serves(self, dataset):
        """The name of ``dataset`` (the same object) among the pool's, or None."""
        for name, held in self._splits.datasets.items():
            if held is dataset:
                return name
        return None

    def _started(self):
        if self._pool is None:
            mx.nd.waitall()  # as gluon's DataLoader: nothing in flight while forking
            main = threading.current_thread() is threading.main_thread()
            sigint = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
            try:
                self._pool = multiprocessing.Pool(
                    self.num_workers, initializer=_start_worker,
                    initargs=(self._splits, os.getpid(), is_np_shape(), is_np_array()))
            finally:
                if main:
                    signal.signal(signal.SIGINT, sigint)
        return self._pool

    def pids(self):
        """The worker processes' ids (empty before the first use and after :meth:`close`)."""
        return [] if self._pool is None else sorted(p.pid for p in self._pool._pool)

    def loader(self, dataset, batches, pin_memory=False, pin_device_id=0):
        """A loader of ``batches`` (lists of keys of ``dataset``, one of the pool's) that
        iterates like a DataLoader with this pool's workers (prefetch 2 per worker)."""
        name = self.serves(dataset)
        if name is None:
            raise ValueError("WorkerPool.loader: the dataset is not one of %s"
                             % sorted(self._splits.datasets))
        return PoolLoader(self, name, batches, pin_memory, pin_device_id)

    def close(self):
        """End the workers now (idempotent)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.terminate()
            pool.join()


class PoolLoader(object):
    """The batches of one split through a :class:`WorkerPool` (one pass per ``iter``)."""

    def __init__(self, workers, name, batches, pin_memory, pin_device_id):
        self._workers, self._name = workers, name
        self._batch_sampler = [list(b) for b in batches]  # DataLoader's name: the keys
        self._pin_memory, self._pin_device_id = bool(pin_memory), int(pin_device_id)
        self._worker_pool = None  # nothing of its own to close (loop.close_workers)

    def __len__(self):
        return len(self._batch_sampler)

    def __iter__(self):
        keys = [[(self._name, key) for key in batch] for batch in self._batch_sampler]
        batches = _gluon_loader._MultiWorkerIter(
            self._workers._started(), _gluon_loader.default_mp_batchify_fn, keys,
            pin_memory=self._pin_memory, pin_device_id=self._pin_device_id,
            worker_fn=_gluon_loader._worker_fn, prefetch=2 * self._workers.num_workers,
            timeout=self._workers.timeout)
        for batch in batches:
            yield batch
