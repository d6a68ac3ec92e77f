"""The training loop: :class:`Runner` trains any :class:`~training_runtime.task.TrainingTask`.

The runner knows no model. It gets the task, the typed run definition
(:class:`training_runtime.config.RunConfig`: it reads the optimisation and
runtime sections), the devices, one lr schedule, the run directory and the
transformed training / evaluation splits. It builds one ``gluon.Trainer``
per parameter group (all sharing the schedule), splits each batch over the
devices (``split_and_load``), calls the task's hooks, checks the loss every
``log_every`` steps without a host sync per step, evaluates after every
epoch, writes ``metrics.jsonl`` and ``curves.png`` and atomic checkpoints,
and resumes exactly.

Determinism and exact resume: the data order of epoch e is a permutation
drawn from (seed, e). Before sample i is read and augmented in epoch e,
python's ``random``, ``numpy.random`` and mxnet's CPU generator are reseeded
from (seed, e, i) (:class:`IndexedDataset`), in whichever process loads it:
the main process (``num_workers`` 0) or a DataLoader worker, so every
``--num-workers`` gives the same batches. After the batch of step s is
loaded and before its forward pass, python, numpy and ``mx.random`` (all
devices) are reseeded from (seed, e, s) (and from (seed, e, EVAL_STEP) before
an evaluation) for the model's own randomness (dropout, masks, random
modes). Everything depends on the position only, never on the history of
the process (MXNet's RNG state cannot be saved). The checkpoint keeps the
number of batches consumed in the epoch; a resumed run skips them. With
``--num-workers`` N one pool of worker processes, forked when the run starts,
serves every epoch and evaluation (:mod:`training_runtime.workers`); the
workers end with the run, even when it is SIGKILLed (Linux).

Callbacks (:class:`Callback`) observe or alter a run at fixed points; the
tests' kill, NaN and fault hooks are callbacks (tests/hooks.py).
"""
import collections
import contextlib
import ctypes
import math
import os
import random
import signal
import sys
import threading
import time

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from mxnet.gluon.contrib.nn import SyncBatchNorm
from tqdm import tqdm

from . import checkpoint, distributed, mixed_precision, plots, workers as data_workers
from .ema import CHECKPOINT_NAME as EMA_NAME, WeightAverage
from . import optim as fast_optim
from .progress import EpochProgress, RecordLog, StepLog, start_line
from .tensorboard import EventLog
from .errors import RunInterrupted, UserError, writing
from .task import ParamGroup  # noqa: F401  (re-exported: its historical home)
from .task import StepBatch

ARGS_FILE = "args.json"
RESUMES_FILE = "resumes.jsonl"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
TEST_FILE = "test.json"
PICTURES_DIR = "pictures"

EVAL_STEP = 2 ** 31 + 1  # reseed position of an evaluation (S3N's early evaluation mode is random)
PICTURE_STEP = EVAL_STEP + 1  # reseed position of the pictures after an evaluation
ITEM_STREAM = EVAL_STEP + 2  # tag of the per-sample augmentation seeds (distinct from the step seeds)


class Callback(object):
    """Hooks into a :class:`Runner`; every method is a no-op by default."""

    def on_losses(self, runner, losses):
        """The per-slice losses of the coming step (inside ``autograd.record()``);
        returns the losses to back-propagate."""
        return losses

    def on_step_end(self, runner):
        """After step ``runner.step`` (counted from 1), before any checkpoint of it."""


def derived_seed(*numbers):
    """A 32-bit seed that is a fixed function of the given non-negative integers."""
    return int(np.random.SeedSequence([int(n) for n in numbers]).generate_state(1)[0])


def reseed(seed, epoch, step):
    """Reseed python, numpy and mxnet (all devices) from (seed, epoch, step)."""
    s = derived_seed(seed, epoch, step)
    random.seed(s)
    np.random.seed(s)
    mx.random.seed(s)


def epoch_order(seed, epoch, num_samples):
    """The shuffled sample order of ``epoch``: a permutation drawn from (seed, epoch)."""
    return np.random.RandomState(derived_seed(seed, epoch, 2 ** 31)).permutation(num_samples)


def reseed_item(seed, epoch, index):
    """Reseed python, numpy and mxnet's CPU generator from (seed, epoch, index):
    the augmentation of one sample (gluon's transforms draw from python's
    ``random`` and from mxnet's CPU generator, ours from python's ``random``)."""
    s = derived_seed(seed, epoch, ITEM_STREAM, index)
    random.seed(s)
    np.random.seed(s)
    mx.random.seed(s, ctx=mx.cpu())


_PR_SET_PDEATHSIG = 1
_armed_pid = None


def _default_sigterm_in_child():
    """In a forked child (a DataLoader worker): SIGTERM back to its default action.
    The runner's Python handler would otherwise be inherited, and a Python handler
    runs only when the main thread next runs; a worker's MXNet engine threads can
    take the signal while its main thread sleeps on the pool's queue lock, and the
    worker then never exits (Pool.terminate sends SIGTERM and hangs in join: seen
    with --num-workers 2, more often with OMP_NUM_THREADS=1)."""
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except ValueError:  # not the child's main thread
        pass


os.register_at_fork(after_in_child=_default_sigterm_in_child)


def die_with_parent(parent_pid):
    """In a process forked by ``parent_pid`` (a DataLoader worker): ask Linux to
    SIGKILL this process when its parent dies (a SIGKILLed run leaves no
    orphan); exit at once if the parent is already gone. Once per process; a
    no-op in ``parent_pid`` itself and on other systems."""
    global _armed_pid
    pid = os.getpid()
    if pid == parent_pid or _armed_pid == pid or not sys.platform.startswith("linux"):
        return
    _armed_pid = pid
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:
        os._exit(1)


class IndexedDataset(gluon.data.Dataset):
    """Items ``(data, label, index)`` of a transformed dataset of ``(data, label)``:
    the sample's dataset index travels with it.

    A key is an index, or ``(epoch, index)``: then python's ``random``,
    ``numpy.random`` and mxnet's CPU generator are first reseeded from
    (seed, epoch, index) (:func:`reseed_item`), so the sample's augmentation
    is the same in the main process and in any DataLoader worker.
    """

    def __init__(self, dataset, seed=0):
        self._dataset = dataset
        self._seed = int(seed)
        self._owner = os.getpid()

    def __len__(self):
        return len(self._dataset)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            epoch, index = key
            die_with_parent(self._owner)
            reseed_item(self._seed, epoch, index)
        else:
            index = key
        data, label = self._dataset[index]
        return data, label, index


def epoch_keys(epoch, batches):
    """The :class:`IndexedDataset` keys of ``batches`` (lists of indices) in ``epoch``."""
    return [[(epoch, i) for i in batch] for batch in batches]


def batch_indices(order, batch_size, start_batch=0, min_batch=1):
    """Consecutive batches of ``order`` from batch ``start_batch`` on.

    The last, smaller batch is kept (the original's round_batch=False) unless
    it has fewer than ``min_batch`` samples (one per device is needed).
    """
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if batches and len(batches[-1]) < min_batch:
        batches.pop()
    return [list(map(int, b)) for b in batches[start_batch:]]


#: every Gluon BatchNorm layer derives from this: nn.BatchNorm and its subclasses
#: (contrib SyncBatchNorm, fgvc_gluon.mcloss.BatchNorm1D, gluoncv's BatchNormCudnnOff),
#: nn.BatchNormReLU
_BATCHNORM = gluon.nn.basic_layers._BatchNorm


def _batchnorms(block):
    """(parent, child name, layer) for every BatchNorm layer (any :data:`_BATCHNORM`
    class) under ``block``, depth first in child order."""
    for name, child in list(block._children.items()):
        if isinstance(child, _BATCHNORM):
            yield block, name, child
        else:
            for found in _batchnorms(child):
                yield found


def freeze_batchnorm(block):
    """Make every BatchNorm under ``block`` normalise with its running statistics
    (``use_global_stats``) in training too; gamma and beta still train.

    The usual answer to small per-device batches, and what makes data
    parallelism exact: with global statistics a sample's output does not
    depend on the other samples on its device. Every BatchNorm class counts (a
    subclass with its own ``hybrid_forward`` must pass ``self._kwargs`` on, as
    SyncBatchNorm, BatchNorm1D and gluoncv's BatchNormCudnnOff do). Call before
    hybridize. Returns the number of layers changed.
    """
    count = 0
    for _, _, bn in _batchnorms(block):
        bn._kwargs["use_global_stats"] = True
        count += 1
    return count


def sync_batchnorm_like(bn, num_devices, cls=SyncBatchNorm):
    """A ``cls`` (SyncBatchNorm or a subclass) with the settings of the BatchNorm ``bn``
    (momentum, eps, center, scale, use_global_stats, initializers), over ``bn``'s own
    parameters (same prefix and Parameter objects).

    SyncBatchNorm asks its ParameterDict for gamma / beta with the grad_req of a
    trainable layer; parameters frozen since (grad_req 'null', e.g. the attribute
    model's ``finetune`` backbone) would fail that check, so they carry the
    declared grad_req while the layer is built and their own afterwards."""
    kw = bn._kwargs
    own = [(p, p._grad_req) for p in (bn.gamma, bn.beta) if p._differentiable]
    for param, _ in own:
        param._grad_req = "write"  # the attribute only: no gradient buffer is allocated
    try:
        return cls(num_devices=num_devices, momentum=kw["momentum"], epsilon=kw["eps"],
                   center=bn.beta._differentiable, scale=not kw["fix_gamma"],
                   use_global_stats=kw["use_global_stats"], gamma_initializer=bn.gamma.init,
                   beta_initializer=bn.beta.init, running_mean_initializer=bn.running_mean.init,
                   running_variance_initializer=bn.running_var.init,
                   prefix=bn.prefix, params=bn.params)
    finally:
        for param, grad_req in own:
            param._grad_req = grad_req


def _sync_replacement(bn, num_devices):
    """The synchronised layer replacing ``bn``, None to keep it (already synchronised),
    or a UserError naming the layer when it cannot be synchronised."""
    if isinstance(bn, SyncBatchNorm):
        return None
    if hasattr(bn, "sync_variant"):
        return bn.sync_variant(num_devices)
    what = "%s (%s.%s)" % (bn.name, type(bn).__module__, type(bn).__name__)
    if type(bn).hybrid_forward is not _BATCHNORM.hybrid_forward:
        raise UserError("--batchnorm sync: BatchNorm layer %s has its own hybrid_forward and no "
                        "sync_variant(num_devices) method; use --batchnorm frozen or batch" % what)
    fused = getattr(bn, "fuse_relu", False)
    if bn._kwargs["axis"] != 1 or fused:
        raise UserError("--batchnorm sync: BatchNorm layer %s normalises axis %d%s; SyncBatchNorm "
                        "normalises axis 1 without a fused ReLU; use --batchnorm frozen or batch"
                        % (what, bn._kwargs["axis"], " with a fused ReLU" if fused else ""))
    return sync_batchnorm_like(bn, num_devices)


def use_sync_batchnorm(block, num_devices):
    """Replace every BatchNorm layer under ``block`` by a ``SyncBatchNorm`` over ``num_devices``.

    The replacement shares the original's parameters (same prefix and
    ParameterDict, their grad_req kept), so initialisation, checkpoints and the
    original's params files are unaffected; batch statistics are then those of
    the whole batch (MXNet averages per-device moments: exact for an even
    split). Layers already synchronised stay; a BatchNorm subclass with its own
    ``hybrid_forward`` (e.g. a reshape around it) provides its replacement with
    a ``sync_variant(num_devices)`` method (see :func:`sync_batchnorm_like`),
    else it is refused (UserError naming it), as are layers of another axis or
    with a fused ReLU; nothing is replaced then. Meant for GPUs: on CPU contexts
    every device shares MXNet's CPU worker threads (MXNET_CPU_WORKER_NTHREADS,
    default 1), and one device's SyncBatchNorm blocks the only worker while it
    waits for the others: a deadlock. Call before the first forward. Returns
    the number of layers replaced.
    """
    plan = [(parent, name, bn, _sync_replacement(bn, num_devices))
            for parent, name, bn in list(_batchnorms(block))]
    replaced = 0
    for parent, name, bn, sync in plan:
        if sync is None:
            continue
        parent._children[name] = sync
        for attr, value in list(vars(parent).items()):
            if value is bn:
                object.__setattr__(parent, attr, sync)
        replaced += 1
    return replaced


def statistics_params(blocks):
    """The parameters without gradient (BatchNorm running statistics, frozen layers) of
    ``blocks`` (dict name -> Block), each once, in a fixed order."""
    seen, found = set(), []
    for block in blocks.values():
        for param in block.collect_params().values():
            if param.grad_req == "null" and id(param) not in seen:
                seen.add(id(param))
                found.append(param)
    return found


def share_first_device(params):
    """Every device's copy of each of ``params`` := the first device's (one set of BatchNorm
    statistics in a process: each device updates its own from its slices, and evaluation
    splits batches over the devices). Asynchronous (no host sync)."""
    for param in params:
        copies = param.list_data() if param._data is not None else []
        for other in copies[1:]:
            copies[0].copyto(other)


def progress_bar(total, desc, initial=0):
    """A tqdm bar on stderr (silent when stderr is not a terminal)."""
    return tqdm(total=total, initial=initial, desc=desc, file=sys.stderr,
                disable=not sys.stderr.isatty(), leave=False, dynamic_ncols=True)


class LossMonitor(object):
    """Train-loss sums and the NaN/inf guard without a host sync every step.

    Each step's summed loss stays on the device; :meth:`check` copies the
    pending values to the host at once (every --log-every steps, before each
    checkpoint and at the end of an epoch) and raises DivergedError naming
    the first step whose loss is not finite.
    """

    def __init__(self, loss_sum=0.0, count=0):
        self.loss_sum, self.count = float(loss_sum), int(count)
        self._pending = []  # (step, device scalar, number of samples)

    def add(self, step, step_loss_sum, num_samples):
        self._pending.append((step, step_loss_sum, num_samples))

    def check(self):
        if not self._pending:
            return
        values = mx.nd.concat(*[v.reshape((1,)) for _, v, _ in self._pending], dim=0).asnumpy()
        for (step, _, n), value in zip(self._pending, values):
            if not np.isfinite(value):
                self._pending = []
                raise checkpoint.DivergedError(
                    "training diverged: the loss is %s at step %d (lower --lr?)" % (value, step))
            self.loss_sum += float(value)
            self.count += n
        self._pending = []

    @property
    def mean(self):
        return self.loss_sum / self.count if self.count else float("nan")


class MetricsLog(RecordLog):
    """metrics.jsonl (one JSON line per epoch) and the training-curves PNG.

    A torn last line (a kill in the middle of an append) is dropped on reading
    and reported through ``log``; a damaged earlier line is a UserError.
    """

    def __init__(self, save_dir, log=print, draw=True):
        super(MetricsLog, self).__init__(os.path.join(save_dir, METRICS_FILE), log)
        self.curves = os.path.join(save_dir, CURVES_FILE)
        #: draw curves.png after every append (--figures all)
        self.draw = draw

    def truncate(self, epoch):
        """Drop the lines of ``epoch`` and later (a resumed run writes them again)."""
        self.keep(lambda r: r["epoch"] < epoch)

    def append(self, record):
        super(MetricsLog, self).append(record)
        if self.draw:
            with writing(self.curves):
                self.plot()

    def plot(self):
        """curves.png (training_runtime.plots.curves); a failure is a logged warning."""
        steps = StepLog(os.path.dirname(self.path), self.log)
        plots.safely(lambda: plots.curves(self.curves, self.read(), steps.read()), log=self.log)


def make_trainer(params, optim, optimizer_params=None):
    """A Trainer with the run's optimizer, momentum and wd (``optim``: an
    OptimConfig), overridden by the group's ``optimizer_params``. Never
    ``update_on_kvstore`` (see :func:`distributed.configure_trainer`): each
    device's updater runs the aggregated optimizer."""
    settings = {"learning_rate": optim.lr, "momentum": optim.momentum, "wd": optim.wd}
    settings.update(optimizer_params or {})
    if optim.optimizer == "sgd":  # mxnet's SGD, same numbers, faster kernels (training_runtime.optim)
        return gluon.Trainer(params, fast_optim.SGD(**settings), update_on_kvstore=False)
    return gluon.Trainer(params, optim.optimizer, settings, update_on_kvstore=False)


def close_workers(loader):
    """End a gluon DataLoader's worker processes now (all its batches were read)
    rather than whenever the loader is garbage-collected."""
    pool, loader._worker_pool = loader._worker_pool, None
    if pool is not None:
        pool.terminate()
        pool.join()


def evaluation_loader(dataset, ctx, batch_size, num_workers=0, workers=None):
    """The loader of ``dataset`` in order by ``batch_size``: through ``workers`` (a
    :class:`~training_runtime.workers.WorkerPool` holding ``dataset``: the run's
    workers), else a DataLoader with ``num_workers`` of its own; batches in pinned
    memory when ``ctx`` are GPUs (:func:`~training_runtime.workers.pinning`)."""
    pin = data_workers.pinning(ctx)
    if workers is not None and workers.serves(dataset) is not None:
        return workers.loader(dataset, batch_indices(range(len(dataset)), batch_size), **pin)
    return gluon.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                 num_workers=num_workers, **pin)


def evaluation_batches(dataset, ctx, batch_size, num_workers=0, desc="eval", workers=None):
    """(data, label) device slices of ``dataset`` in order: what
    ``TrainingTask.evaluate`` and ``test_report`` consume (loader: :func:`evaluation_loader`)."""
    loader = evaluation_loader(dataset, ctx, batch_size, num_workers, workers)
    bar = progress_bar(len(loader), desc)
    for data, label in loader:
        used = ctx[:min(len(ctx), data.shape[0])]
        for pair in zip(gluon.utils.split_and_load(data, used, even_split=False),
                        gluon.utils.split_and_load(label, used, even_split=False)):
            yield pair
        bar.update(1)
    bar.close()


def evaluate(task, dataset, ctx, config, epoch, report=None, workers=None):
    """``task.evaluate`` on ``dataset`` (transformed items) after ``epoch``, with the
    generators reseeded from (seed, epoch, EVAL_STEP) first (S3N evaluates with a
    random mode in its first epochs); with ``report`` (a file) the task's
    ``test_report`` instead. ``workers``: the run's WorkerPool (see evaluation_loader)."""
    reseed(config.runtime.seed, epoch, EVAL_STEP)
    batches = evaluation_batches(dataset, ctx, config.runtime.batch_size, config.data.num_workers,
                                 workers=workers)
    if report is not None:
        return task.test_report(batches, epoch, report)
    return task.evaluate(batches, epoch)


def evaluated_epoch(progress):
    """The epoch whose evaluation a checkpoint follows (0-based)."""
    if progress["batch_in_epoch"] == 0 and progress["epoch"] > 0:
        return progress["epoch"] - 1
    return progress["epoch"]


class Runner(object):
    """Trains a task with checkpoints, logs and exact resume (see the module docstring).

    task: a TrainingTask; config: the RunConfig (optim and runtime sections
    are read); ctx: list of contexts; schedule: an LRSchedule (trainers are
    attached here); save_dir: the run directory; train_set / val_set:
    transformed datasets of (data, label); meta: JSON-able dict stored in
    checkpoints and checked on resume; callbacks: :class:`Callback` objects.
    """

    def __init__(self, task, config, ctx, schedule, save_dir, train_set, val_set, meta,
                 callbacks=(), log=print, extra_record=None):
        self.task, self.config, self.ctx, self.schedule = task, config, ctx, schedule
        self.optim, self.runtime = config.optim, config.runtime
        self.save_dir, self.log, self.meta = save_dir, log, meta
        self.callbacks = list(callbacks)
        self.blocks = task.check_declared()
        self.trainers = collections.OrderedDict()
        for group in task.trainable_groups():
            trainer = make_trainer(group.params, self.optim, group.optimizer_params)
            distributed.configure_trainer(trainer, self.runtime.kvstore)
            self.trainers[group.name] = schedule.attach(trainer, group.lr_mult, group.follows_schedule)
        # data parallelism over processes (--kvstore dist_*): rank 0 of world_size workers
        self.rank, self.world_size = distributed.rank_and_size(self.runtime.kvstore)
        #: BatchNorm running statistics and frozen parameters: one set per run (first device of
        #: rank 0) before every evaluation and checkpoint (:meth:`share_statistics`)
        self.statistics = statistics_params(self.blocks)
        kv = distributed.kvstore(self.runtime.kvstore)
        self.reducer = (distributed.GradientReducer(kv, self.trainers, self.statistics)
                        if kv is not None else None)
        #: --amp: one dynamic loss scale for every trainer (training_runtime.mixed_precision)
        self.loss_scaling = (mixed_precision.LossScaling(self.trainers.values())
                             if self.runtime.amp else None)
        #: --ema: the moving average of the weights on the first device (training_runtime.ema)
        self.ema = WeightAverage(self.blocks, self.optim.ema, ctx[0]) if self.optim.ema else None
        self.metrics = MetricsLog(save_dir, log, draw=self.runtime.figures != "none")
        self.steps_log = StepLog(save_dir, log)
        #: --tensorboard: the same records as TensorBoard scalars (rank 0, as the logs)
        self.tensorboard = (EventLog(save_dir, log) if self.runtime.tensorboard and self.rank == 0
                            else None)
        #: () -> dict merged into every metrics.jsonl record (e.g. skipped-image counts)
        self.extra_record = extra_record or dict
        self._signal = None
        self.train_set = IndexedDataset(train_set, config.runtime.seed)
        self.val_set = val_set
        #: --num-workers N: the run's DataLoader workers, forked once in run() for training and
        #: evaluation, ended when it returns (training_runtime.workers)
        self.workers = None
        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        self.best = -math.inf
        self.monitor = LossMonitor()
        self.epoch_time = 0.0
        self._segment_start = time.time()

    # ---- checkpoints ------------------------------------------------------
    def _progress(self):
        self.monitor.check()
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step,
                "best": self.best if math.isfinite(self.best) else None,
                "loss_sum": self.monitor.loss_sum, "loss_count": self.monitor.count,
                "epoch_time": self._elapsed(), "batch_size": self.runtime.batch_size,
                "seed": self.runtime.seed, "world_size": self.world_size,
                "loss_scaling": self.loss_scaling.state_dict() if self.loss_scaling else None}

    def save(self, best=False, sync=True):
        """Write RUN/last.ckpt (rank 0 only: every worker holds the same state), also as
        best.ckpt with ``best``. --kvstore dist_*: then every worker takes rank 0's
        BatchNorm statistics (what was saved: a resumed run continues as the
        uninterrupted one; after the write, so a dead worker cannot hold it up);
        ``sync=False`` (a signal: the other workers may not reach this point) skips that."""
        if self.rank == 0:
            extra = self.task.extra_state()
            if self.ema is not None:
                if EMA_NAME in extra:
                    raise ValueError("%s.extra_state: the name %r is the runtime's (--ema)"
                                     % (type(self.task).__name__, EMA_NAME))
                extra = dict(extra, **{EMA_NAME: self.ema.state_dict()})
            arrays = checkpoint.capture(self.blocks, self.trainers, self.schedule, self._progress(),
                                        self.meta, extra, workdir=self.save_dir)
            last = os.path.join(self.save_dir, checkpoint.LAST)
            checkpoint.save(last, arrays)
            if best:
                checkpoint.link_atomic(last, os.path.join(self.save_dir, checkpoint.BEST))
        if sync:
            self.share_statistics()

    def share_statistics(self):
        """One set of BatchNorm statistics for the run: every device of every worker takes the
        first device's of rank 0 (what checkpoints save, what evaluation uses, what a resumed
        run starts from; README "Devices and workers"). --kvstore dist_*: a collective."""
        share_first_device(self.statistics)
        if self.reducer is not None:
            self.reducer.sync_aux(self.step)

    def resume(self, path, check_meta=None):
        """Continue from the checkpoint ``path``; ``check_meta``: the meta entries
        that must be equal (default: all of this run's meta but its definition,
        which the caller reconciled)."""
        if check_meta is None:
            check_meta = {k: v for k, v in self.meta.items() if k != "config"}
        progress, extra = checkpoint.restore(path, self.blocks, self.trainers, self.schedule, check_meta)
        mismatch = distributed.world_size_mismatch(progress, self.world_size, path)
        if mismatch:
            raise UserError(mismatch)
        for key in ("batch_size", "seed"):
            if progress[key] != getattr(self.runtime, key):
                raise UserError("--resume: %s was written with --%s %s, this run has %s (the data "
                                "order would change)" % (path, key.replace("_", "-"), progress[key],
                                                          getattr(self.runtime, key)))
        self.schedule.rebase(self.optim.lr)  # a changed --lr applies from here (reported by the caller)
        averaged = extra.pop(EMA_NAME, None)
        if self.ema is not None:
            self.ema.load_state_dict(averaged or {}, "--resume: %s" % path)
        self.task.load_extra_state(extra)
        self.epoch, self.batch_in_epoch = progress["epoch"], progress["batch_in_epoch"]
        self.step = progress["step"]
        self.best = progress["best"] if progress["best"] is not None else -math.inf
        self.monitor = LossMonitor(progress["loss_sum"], progress["loss_count"])
        self.epoch_time = progress["epoch_time"]
        if self.loss_scaling is not None and progress.get("loss_scaling"):
            self.loss_scaling.load_state_dict(progress["loss_scaling"])
        if self.rank == 0:
            self.metrics.truncate(self.epoch)
            self.steps_log.truncate(self.step)
        self.log("resumed from %s at epoch %d, step %d" % (path, self.epoch, self.step))

    # ---- training ---------------------------------------------------------
    def _loader(self, batches):
        """The loader of this process's share of this epoch's remaining ``batches`` (global
        batches, lists of indices; --kvstore dist_*: each worker reads and augments only its
        share, seeded per sample as in one process): one for the epoch, its workers
        prefetch 2 batches each (the run's :attr:`workers` when it has them); batches in
        pinned memory when the contexts are GPUs."""
        shares = [distributed.shard(b, self.rank, self.world_size) for b in batches]
        keys, pin = epoch_keys(self.epoch, shares), data_workers.pinning(self.ctx)
        if self.workers is not None:
            return self.workers.loader(self.train_set, keys, **pin)
        return gluon.data.DataLoader(self.train_set, batch_sampler=keys,
                                     num_workers=self.config.data.num_workers, **pin)

    @contextlib.contextmanager
    def averaged_weights(self):
        """--ema: within the block the model holds the moving average (every device; dist:
        rank 0's BatchNorm statistics on every worker, a collective); yields whether it
        does (False without --ema or before the first step)."""
        if self.ema is None:
            yield False
            return
        sync = None if self.reducer is None else self.reducer.sync_aux
        with self.ema.swapped(sync) as swapped:
            yield swapped

    def train_step(self, batch, global_size=None):
        """Forward/backward on every device slice, then one step of every trainer.

        ``global_size``: the samples of the step over all workers (--kvstore dist_*:
        the gradients are summed over the workers first). Returns the summed loss of
        the step's batch as a device scalar (no host sync; dist: of the global batch).
        """
        data, label, index = batch
        global_size = global_size or data.shape[0]
        offset = distributed.shard_bounds(global_size, self.rank, self.world_size)[0]
        self.task.begin_step(StepBatch(
            self.epoch, self.step, label, index, global_size, offset,
            loss_scale=self.loss_scaling.loss_scale if self.loss_scaling is not None else 1.0,
            all_sum=self.reducer.all_sum if self.reducer is not None else None))
        ctx = self.ctx[:min(len(self.ctx), data.shape[0])]
        slices = [gluon.utils.split_and_load(x, ctx, even_split=False) for x in (data, label, index)]
        if self.ema is not None:
            self.ema.start_if_ready()  # from the weights this (first) step starts from
        with autograd.record():
            losses = [self.task.training_loss(d, l, i, self.epoch) for d, l, i in zip(*slices)]
            for loss, d in zip(losses, slices[0]):
                if loss.shape != (d.shape[0],):
                    raise ValueError("%s.training_loss: expected a per-sample loss of shape (%d,), "
                                     "got %s" % (type(self.task).__name__, d.shape[0], loss.shape))
            for callback in self.callbacks:
                losses = callback.on_losses(self, losses)
            scaled = losses if self.loss_scaling is None else self.loss_scaling.scale(losses)
        for loss in scaled:
            loss.backward()
        step_sum = mx.nd.add_n(*[loss.sum().as_in_context(self.ctx[0]) for loss in losses])
        if self.reducer is not None:
            if not self.reducer.initialised:
                # shapes deferred to the first forward: every worker initialised them from
                # the same seed; checked (the gradients above used the local values)
                self.reducer.broadcast(check_unchanged=True)
            step_sum = self.reducer.reduce(step_sum)  # the global batch's loss
        if self.ema is not None:
            self.ema.start_if_ready()  # deferred shapes: known after the first forward
        # --amp: an overflow anywhere skips every trainer's update (dist: checked on the
        # summed gradients, so every worker decides alike)
        skip = self.loss_scaling is not None and self.loss_scaling.overflow()
        if not skip:
            for trainer in self.trainers.values():
                if self.reducer is not None:
                    trainer.update(global_size)
                else:
                    trainer.step(data.shape[0])
        self.task.after_step(self.epoch)
        if self.ema is not None:
            self.ema.update()  # every step (also one an --amp overflow skipped), as timm
        return step_sum

    def _elapsed(self):
        """Seconds spent in the current epoch (across resumes)."""
        return self.epoch_time + time.time() - self._segment_start

    def _end_epoch(self, partial=False):
        """Evaluate, apply the lr rule (complete epochs only), log; True if the metric improved."""
        self.monitor.check()
        self.share_statistics()  # every device and worker evaluates with the same statistics
        with self.averaged_weights() as averaged:  # --ema: evaluated with the average
            metrics = {k: float(v) if isinstance(v, (int, float, np.number)) else v for k, v in
                       evaluate(self.task, self.val_set, self.ctx, self.config, self.epoch,
                                workers=self.workers).items()}
            if self.rank == 0:  # one writer of RUN/pictures
                self._pictures()
        value = metrics[self.task.metric_name]
        # a partial epoch's evaluation never sets the best of the full epochs
        improved = value > self.best and not partial
        if improved:
            self.best = value
        lr = self.schedule.lr
        if not partial:
            self.schedule.end_epoch(self.epoch, value)
        elapsed = self._elapsed()
        record = {"epoch": self.epoch, "lr": lr, "train_loss": self.monitor.mean,
                  "val": metrics, "time": round(elapsed, 3), "steps": self.step}
        record.update(self.extra_record())
        if averaged:
            record["weights"] = "ema"
        if partial:
            record["partial"] = True
        if self.rank == 0:
            self.metrics.append(record)
            if self.tensorboard is not None:
                self.tensorboard.add_epoch(record)
        self.log("epoch %d%s: lr %g, train loss %.4f, %s, %.1fs" % (
            self.epoch, " (stopped by --max-steps)" if partial else "", lr, self.monitor.mean,
            ", ".join("val %s%s %.4f" % ("(EMA) " if averaged else "", k, v)
                      for k, v in metrics.items() if isinstance(v, float)),
            elapsed))
        return improved

    def _pictures(self):
        """``task.pictures`` on the evaluation split's first ``picture_images`` images into
        RUN/pictures; any failure is a warning (pictures never end a run)."""
        wanted = self.runtime.picture_images
        if wanted is None:
            wanted = int(getattr(self.task, "picture_images", 0) or 0)
        count = min(len(self.val_set), wanted)
        if count <= 0:
            return
        try:
            reseed(self.runtime.seed, self.epoch, PICTURE_STEP)
            directory = os.path.join(self.save_dir, PICTURES_DIR)
            os.makedirs(directory, exist_ok=True)
            subset = gluon.data.SimpleDataset([self.val_set[i] for i in range(count)])
            self.task.pictures(evaluation_batches(subset, self.ctx, self.runtime.batch_size, 0, "pictures"),
                               directory, self.epoch)
        except Exception as err:  # noqa: BLE001  (a picture is never worth a run)
            self.log("warning: the pictures of epoch %d were not written (%s: %s)"
                     % (self.epoch, type(err).__name__, str(err).splitlines()[0] if str(err) else ""))

    def _steps_left(self):
        return self.runtime.max_steps - self.step if self.runtime.max_steps else math.inf

    def checkpoint_bytes(self):
        """An estimate of one checkpoint's size: the parameters plus one optimizer buffer each
        (and their moving average with --ema)."""
        return (3 if self.ema is not None else 2) * sum(int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize
                       for block in self.blocks.values() for p in block.collect_params().values()
                       if all(d > 0 for d in p.shape)) + checkpoint.SAFETY_BYTES

    # ---- signals: finish the step, checkpoint, exit 128 + signal -----------
    def _on_signal(self, signum, frame):
        if os.getpid() != self._pid or self._signal is not None:
            # a forked child that still has the handler (_default_sigterm_in_child resets
            # SIGTERM at fork; SIGINT reaches one only if its forker did not ignore it)
            # or the second signal: leave at once
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self._signal = signum
        self.log("%s received: finishing step %d, then saving a checkpoint (send it again to stop "
                 "at once)" % (signal.Signals(signum).name, self.step + 1))

    def _install_signal_handlers(self):
        self._previous_handlers = {}
        self._pid = os.getpid()
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _restore_signal_handlers(self):
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)

    def _stop_for_signal(self, saved=False):
        """Save at the current step (unless just ``saved``) and raise RunInterrupted
        (after a SIGINT / SIGTERM)."""
        if not saved:
            self.save(sync=False)
        name = signal.Signals(self._signal).name
        raise RunInterrupted(
            "%s: stopped after step %d (epoch %d); the checkpoint is %s: continue with --resume "
            "--save-dir %s" % (name, self.step, self.epoch, os.path.join(self.save_dir, checkpoint.LAST),
                               self.save_dir), 128 + self._signal)

    def run(self):
        """Train until the configured epochs or max_steps, evaluating and checkpointing.

        SIGINT / SIGTERM: the current step finishes, a checkpoint of it is written and
        :class:`RunInterrupted` is raised (exit status 130 / 143); a second signal
        stops at once. A divergence names the last good checkpoint, if any.
        """
        if self.rank == 0:
            checkpoint.check_free_space(self.save_dir, self.checkpoint_bytes())
        self._install_signal_handlers()
        if self.reducer is not None and self.reducer.ready():
            # rank 0's parameters (fresh or restored by --resume) on every worker before the
            # first step; parameters with deferred shapes: after the first forward (train_step)
            self.reducer.broadcast()
        if self.config.data.num_workers > 0:
            # one fork for the whole run (each fork syncs MXNet's engine); the workers end
            # when run() returns or raises, and die with this process if it is killed
            self.workers = data_workers.WorkerPool({"train": self.train_set, "val": self.val_set},
                                                   self.config.data.num_workers)
        try:
            self._run()
        except checkpoint.DivergedError as err:
            last = os.path.join(self.save_dir, checkpoint.LAST)
            if os.path.exists(last):
                step = checkpoint.read(last)[0]["progress"]["step"]
                raise checkpoint.DivergedError("%s; the last good checkpoint (step %d) is kept: %s"
                                               % (err, step, last))
            raise checkpoint.DivergedError("%s; no checkpoint was written yet" % err)
        finally:
            if self.workers is not None:
                self.workers.close()
                self.workers = None
            self._restore_signal_handlers()

    def _run_steps(self):
        """The number of steps the whole run makes (epochs and --max-steps)."""
        per_epoch = len(batch_indices(np.arange(len(self.train_set)),
                                      self.runtime.batch_size * self.world_size, 0,
                                      min_batch=len(self.ctx) * self.world_size))
        total = per_epoch * self.optim.epochs
        return min(total, self.runtime.max_steps) if self.runtime.max_steps else total

    def _run(self):
        runtime = self.runtime
        self.log(start_line(self.ctx, runtime.batch_size))
        run_steps = self._run_steps()
        if self.tensorboard is not None:  # after resume's truncation of the logs
            self.tensorboard.start(self.steps_log, self.metrics, self.step, self.epoch)
        while self.epoch < self.optim.epochs and self._steps_left() > 0:
            self._segment_start = time.time()
            self.schedule.start_epoch(self.epoch)
            order = epoch_order(runtime.seed, self.epoch, len(self.train_set))
            # with W workers a step is a global batch of W x --batch-size samples; worker r
            # trains its consecutive share of it (distributed.shard)
            all_batches = batch_indices(order, runtime.batch_size * self.world_size, 0,
                                        min_batch=len(self.ctx) * self.world_size)
            batches = all_batches[self.batch_in_epoch:]
            batches = batches[:min(len(batches), self._steps_left())]
            bar = EpochProgress(self.epoch, len(all_batches), self.batch_in_epoch, self.step, run_steps)
            logged_sum, logged_count = self.monitor.loss_sum, self.monitor.count
            loader = self._loader(batches)
            batch_iter = iter(loader)
            for global_batch in batches:
                if self._signal is not None:
                    self._stop_for_signal()
                # augmentation was seeded per sample (IndexedDataset); the model's own
                # randomness depends on the step's position only. With W workers each loads
                # its share of the global batch (distributed.shard)
                batch = next(batch_iter)
                reseed(runtime.seed, self.epoch, self.batch_in_epoch)
                global_size = len(global_batch)
                step_sum = self.train_step(batch, global_size)
                self.step += 1
                self.batch_in_epoch += 1
                self.monitor.add(self.step, step_sum, global_size)
                bar.update(batch[0].shape[0])
                for callback in self.callbacks:
                    callback.on_step_end(self)
                if self.step % runtime.log_every == 0:
                    self.monitor.check()
                    count = self.monitor.count - logged_count
                    loss = (self.monitor.loss_sum - logged_sum) / count if count else float("nan")
                    logged_sum, logged_count = self.monitor.loss_sum, self.monitor.count
                    line = bar.logged(self.batch_in_epoch, self.step, loss, self.schedule.lr)
                    if self.rank == 0:  # one steps.jsonl per run
                        self.steps_log.append(line)
                        if self.tensorboard is not None:
                            self.tensorboard.add_step(line)
                if self._signal is not None and self.batch_in_epoch < len(all_batches):
                    self._stop_for_signal()
                if (runtime.checkpoint_every and self.step % runtime.checkpoint_every == 0
                        and self.batch_in_epoch < len(all_batches) and self._steps_left() > 0):
                    self.save()
            # a loader of its own (outside run()) ends its workers here, not whenever it is
            # collected; the run's WorkerPool lives on
            batch_iter.close()
            close_workers(loader)
            bar.close()
            if self.batch_in_epoch < len(all_batches):  # stopped by max_steps mid-epoch
                self._end_epoch(partial=True)
                # best.ckpt exists after any evaluation; a full epoch replaces it later
                self.save(best=not os.path.exists(os.path.join(self.save_dir, checkpoint.BEST)))
                break
            improved = self._end_epoch()
            self.epoch += 1
            self.batch_in_epoch = 0
            self.monitor = LossMonitor()
            self.epoch_time, self._segment_start = 0.0, time.time()
            self.save(best=improved)
            if self._signal is not None and self.epoch < self.optim.epochs:
                self._stop_for_signal(saved=True)
        if self._steps_left() <= 0:
            self.log("stopped after %d steps (--max-steps)" % self.step)
