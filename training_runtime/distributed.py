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


def configure_trainer(trainer, kind):
    """Set the kvstore a fresh (not yet stepped) Trainer will use.

    Non-dist kinds: Gluon's own kvstore of that kind (``device`` is Gluon's
    default, today's behaviour). Dist kinds: none (the gradients are reduced by
    :class:`GradientReducer`) and local updates.
    """
    if is_dist(kind):
        trainer._kvstore_params = {"kvstore": None, "update_on_kvstore": False}
    else:
        trainer._kvstore_params = {"kvstore": kind, "update_on_kvstore": None}
    return trainer


def shard(batch, rank, size):
    """The part of the global ``batch`` (list of sample indices) that worker ``rank`` of
    ``size`` trains: consecutive, sizes differing by at most one (a global batch of
    N samples gives each worker N // size or N // size + 1)."""
    n = len(batch)
    start = rank * (n // size) + min(rank, n % size)
    return batch[start:start + n // size + (1 if rank < n % size else 0)]


class GradientReducer(object):
    """Sums every trainer's gradients over all devices and workers through one dist kvstore.

    trainers: ordered dict group name -> Trainer. Keys are ``"group/parameter name"``.
    On the first call the parameters are broadcast from rank 0 (kv.init stores rank
    0's values; every worker pulls them), so all workers start identical.
    """

    def __init__(self, kv, trainers):
        self.kv = kv
        self.params = [("%s/%s" % (group, p.name), p) for group, trainer in trainers.items()
                       for p in trainer._params if p.grad_req != "null"]
        self._initialised = False

    def broadcast(self):
        """Every worker's parameters := rank 0's (all devices). Call once, after every
        parameter has its shape (after the first forward)."""
        for key, p in self.params:
            self.kv.init(key, p.data())
        for key, p in self.params:
            self.kv.pull(key, out=p.list_data())
        self._initialised = True

    def reduce(self):
        """Every device's gradient := the sum of the gradients of every device of every worker."""
        if not self._initialised:
            raise RuntimeError("GradientReducer.reduce before broadcast")
        for priority, (key, p) in enumerate(self.params):
            self.kv.push(key, p.list_grad(), priority=-priority)
        for priority, (key, p) in enumerate(self.params):
            self.kv.pull(key, out=p.list_grad(), priority=-priority)
