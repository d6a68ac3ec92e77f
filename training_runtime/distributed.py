"""Data parallelism over processes: MXNet's parameter server (``dist_*`` kvstores).

One process-wide dist kvstore (MXNet allows one per process, apache/mxnet#14434)
serves every per-group ``gluon.Trainer``. The trainers are created with no
kvstore of their own and ``update_on_kvstore=False``; after backward the runner
calls :meth:`GradientReducer.reduce`, which pushes every gradient under a key
``"group/parameter"`` (disjoint across trainers: Gluon's own keys 0..n-1 would
collide, apache/mxnet#13054) and pulls back the sum over all workers and
devices into every device's gradient; each trainer then updates locally with
the global batch size. Optimizer states therefore stay on the workers,
identical on all of them (same sums, same updates), so rank 0's checkpoint
holds every trainer's state and ``set_learning_rate`` (the lr schedule) works
unchanged (with update_on_kvstore=True it would not reach the servers,
apache/mxnet#15919). The servers only sum.

Rank and worker count come from the kvstore (``DMLC_*`` environment set by
``python -m training_runtime.launch``). Without a dist kvstore everything here
reports one worker of rank 0 and does nothing.
"""
import mxnet as mx

DIST_KINDS = ("dist_sync", "dist_device_sync", "dist_async")
KINDS = ("device", "local") + DIST_KINDS

_STORE = {}


#: the all_sum name of the step's summed training loss (the logs show the global batch's loss)
LOSS_NAME = "__loss__"


def is_dist(kind):
    return kind in DIST_KINDS


def kvstore(kind):
    """The process-wide kvstore of ``kind`` (created once; None for non-dist kinds)."""
    if not is_dist(kind):
        return None
    if kind == "dist_async":
        raise ValueError("--kvstore dist_async: not supported: the servers only sum gradients "
                         "(the optimizer runs on the workers), which needs synchronous pushes; "
                         "use dist_sync or dist_device_sync")
    if kind not in _STORE:
        if _STORE:
            raise ValueError("--kvstore %s: this process already has a %s kvstore (MXNet allows one)"
                             % (kind, next(iter(_STORE))))
        _STORE[kind] = mx.kv.create(kind)
    return _STORE[kind]


def rank_and_size(kind):
    """(rank, number of workers) of this process for kvstore ``kind``."""
    kv = kvstore(kind)
    if kv is None:
        return 0, 1
    return kv.rank, kv.num_workers


def world_size_mismatch(progress, world_size, path):
    """The reason a checkpoint's progress (``world_size``, written by the runner) cannot be
    resumed by ``world_size`` workers, or None: the global batch (workers x --batch-size)
    and so the data order would change."""
    saved = progress.get("world_size", progress.get("num_workers", 1))
    if saved == world_size:
        return None
    return ("--resume: %s was written by %d worker(s), this run has %d (the global batch, "
            "workers x --batch-size, and so the data order would change)" % (path, saved, world_size))


def configure_trainer(trainer, kind):
    """Set the kvstore a fresh (not yet stepped) Trainer will use; never ``update_on_kvstore``.

    Non-dist kinds: Gluon's own kvstore of that kind (``device`` is Gluon's
    default) sums the gradients over the devices, and each device's updater
    then applies the run's optimizer to its copy (``update_on_kvstore=False``):
    the aggregated multi-array SGD of :mod:`training_runtime.optim` runs with
    every kvstore. Gluon's default with several devices and a ``device`` /
    ``local`` kvstore (update_on_kvstore=True) would instead update one
    parameter at a time through a Python updater on the kvstore's copy and
    broadcast the weights; the numbers are the same within float32 rounding
    (tests/test_stalls.py) and ``Trainer.save_states`` writes the same format in
    both modes (the updater's pickled states and optimizer), so checkpoints of
    either mode resume in the other. Dist kinds: no kvstore of the trainer's own
    (the gradients are reduced by :class:`GradientReducer`) and local updates.
    """
    if is_dist(kind):
        trainer._kvstore_params = {"kvstore": None, "update_on_kvstore": False}
    else:
        trainer._kvstore_params = {"kvstore": kind, "update_on_kvstore": False}
    return trainer


def _sum_key(name, shape):
    """The kvstore key of :meth:`GradientReducer.all_sum` for ``name`` and ``shape``."""
    return "%s/%s" % (name, "x".join(str(d) for d in shape))


def shard_bounds(n, rank, size):
    """(start, stop) of worker ``rank``'s part of a global batch of ``n`` samples over
    ``size`` workers: consecutive, sizes differing by at most one (N // size or
    N // size + 1, the larger ones first)."""
    start = rank * (n // size) + min(rank, n % size)
    return start, start + n // size + (1 if rank < n % size else 0)


def shard(batch, rank, size):
    """The part of the global ``batch`` (list of sample indices) that worker ``rank`` of
    ``size`` trains (:func:`shard_bounds`)."""
    start, stop = shard_bounds(len(batch), rank, size)
    return batch[start:stop]


class GradientReducer(object):
    """Sums every trainer's gradients over all devices and workers through one dist kvstore.

    trainers: ordered dict group name -> Trainer. Keys are ``"group/parameter name"``
    (``"aux/parameter name"`` for ``statistics``, the parameters without gradient:
    BatchNorm's running statistics, frozen layers; default: those of the trainers). :meth:`broadcast` (once, before the first update) makes every
    worker's parameters rank 0's; :meth:`reduce` after every backward pass;
    :meth:`sync_aux` before every evaluation and checkpoint.
    """

    def __init__(self, kv, trainers, statistics=None):
        self.kv = kv
        self.params = [("%s/%s" % (group, p.name), p) for group, trainer in trainers.items()
                       for p in trainer._params if p.grad_req != "null"]
        if statistics is None:
            statistics = [p for trainer in trainers.values() for p in trainer._params
                          if p.grad_req == "null"]
        self.aux = [("aux/%s" % p.name, p) for p in statistics]
        keys = [key for key, _ in self.params + self.aux]
        if len(set(keys)) != len(keys):
            raise ValueError("GradientReducer: duplicate kvstore keys %s"
                             % sorted({k for k in keys if keys.count(k) > 1}))
        self.initialised = False
        self._synced_step = None
        self._sum_buffers = {}
        self._summed_keys = set()  # all_sum keys the kvstore holds

    def ready(self):
        """True when every parameter has its shape (deferred ones get it at the first forward)."""
        return all(p._data is not None for _, p in self.params + self.aux)

    def broadcast(self, check_unchanged=False):
        """Every worker's parameters := rank 0's (all devices); every parameter needs
        its shape. Blocks until the values are here: a worker's first gradient push
        must not overtake its own pull (the server would then answer the pull with
        the round's gradient sum instead of the parameters).

        check_unchanged: raise RuntimeError if a worker's parameters differed from
        rank 0's (after a first forward/backward on the local values: its gradients
        would then not be those of rank 0's parameters).
        """
        before = [p.data().copy() for _, p in self.params] if check_unchanged else None
        both = self.params + self.aux
        keys = [key for key, _ in both]
        loss_key = _sum_key(LOSS_NAME, (1,))
        self.kv.init(keys + [loss_key], [p.data() for _, p in both] + [mx.nd.zeros((1,))])
        self._summed_keys.add(loss_key)
        self.kv.pull(keys, out=[p.list_data() for _, p in both])  # rank 0's values
        for _, p in both:
            for data in p.list_data():
                data.wait_to_read()
        self.initialised = True
        if before is not None:
            changed = [key for (key, p), old in zip(self.params, before)
                       if not (old == p.data()).min().asscalar()]
            if changed:
                raise RuntimeError("worker %d initialised %d parameter(s) differently from rank 0 "
                                   "(e.g. %s): its first step was computed on other values"
                                   % (self.kv.rank, len(changed), changed[0]))

    def sync_aux(self, step=None):
        """Every device of every worker gets rank 0's (first device's) values of the
        parameters without gradient (BatchNorm running statistics, which each device
        and worker updates from its own batches unless --batchnorm frozen): rank 0
        pushes them, the others push zeros, every worker pulls the sum. Exact for any
        number of workers; so the evaluations (hence the lr rule and ``best``) and the
        checkpoints agree on every worker. Every worker must call it (collective);
        ``step``: a second call at the same step does nothing."""
        if not self.initialised or not self.aux or (step is not None and step == self._synced_step):
            return
        self._synced_step = step
        for priority, (key, p) in enumerate(self.aux):
            value = p.data()
            self.kv.push(key, value if self.kv.rank == 0 else mx.nd.zeros_like(value),
                         priority=-priority)
        for priority, (key, p) in enumerate(self.aux):
            self.kv.pull(key, out=p.list_data(), priority=-priority)
        for _, p in self.aux:
            for data in p.list_data():
                data.wait_to_read()

    def all_sum(self, name, value):
        """The sum of ``value`` (an NDArray, float32) over every worker: a collective
        (every worker calls it with the same ``name`` and shape, in the same order).
        A key per name and shape, created at its first use (a barrier). Returns a new
        NDArray on ``value``'s context; no host sync."""
        key = _sum_key(name, value.shape)
        if key not in self._summed_keys:
            # kv.init changes the kvstore's tables (and is a barrier): with nothing in flight
            mx.nd.waitall()
            self.kv.init(key, mx.nd.zeros(value.shape, dtype=value.dtype))
            self._summed_keys.add(key)
        buffer = self._sum_buffers.get(key)
        if buffer is None or buffer.context != value.context:
            buffer = self._sum_buffers[key] = mx.nd.zeros(value.shape, ctx=value.context,
                                                          dtype=value.dtype)
        # one buffer per key, pushed and pulled in place: on the CPU the kvstore keeps the
        # pushed array itself as the key's communication buffer, and a pull still pending
        # on an earlier array would write into it (as gradients do, always the same array)
        value.copyto(buffer)
        self.kv.push(key, buffer)
        self.kv.pull(key, out=buffer)
        return buffer.copy()

    def reduce(self, loss_sum=None):
        """Every device's gradient := the sum of the gradients of every device of every worker.

        Pushes all keys, then pulls them: a pull is issued after the same key's push
        completed, i.e. after every worker pushed it (the dist_sync servers answer a
        push once all workers' pushes of that key are summed). ``loss_sum``: this
        worker's summed loss, shape (1,); returns the sum over the workers (a new
        NDArray on its context, no host sync), or None."""
        if not self.initialised:
            raise RuntimeError("GradientReducer.reduce before broadcast")
        for priority, (key, p) in enumerate(self.params):
            self.kv.push(key, p.list_grad(), priority=-priority)
        for priority, (key, p) in enumerate(self.params):
            self.kv.pull(key, out=p.list_grad(), priority=-priority)
        if loss_sum is None:
            return None
        return self.all_sum(LOSS_NAME, loss_sum.reshape((1,)).astype("float32", copy=False))
