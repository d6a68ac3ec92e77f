"""The training loop shared by train_attr.py and train_fgvc.py.

A script describes its model as a *task* (any object with these members) and
hands it to :class:`Runner`:

- ``blocks``: ordered dict name -> Block, everything that is checkpointed;
- ``groups``: list of :class:`ParamGroup`
  ``(name, params, lr_mult, optimizer_params, follows_schedule)``, one
  ``gluon.Trainer`` each (all SGD, sharing one :mod:`schedule`);
- ``train_set``: a Dataset of ``(data, label)`` items (already transformed);
  the runner wraps it with :class:`IndexedDataset` so batches carry the
  dataset index of each sample;
- ``training_loss(data, label, index, epoch)``: per-sample loss (N,) of one
  device slice, called inside ``autograd.record()``;
- ``after_step(epoch)``: called after the trainers stepped (e.g. to record
  predictions kept by ``training_loss``);
- ``evaluate(epoch)`` -> dict of float metrics; ``metric_name`` names the
  one that drives the plateau rule and the ``best`` checkpoint;
- ``extra_state()`` / ``load_extra_state(dict)``: more state to checkpoint;
- ``meta``: dict identifying the run (checked on resume).

Determinism and exact resume: the data order of epoch e is a permutation
drawn from (seed, e); before step s of epoch e, python's ``random``,
``numpy.random`` and ``mx.random`` are reseeded from (seed, e, s) — so
augmentation and dropout depend only on the position, never on the history
of the process (MXNet's RNG state cannot be saved). The checkpoint keeps the
number of batches consumed in the epoch; a resumed run skips them. With
``--num-workers`` > 0 the augmentation runs in worker processes and is not
reproducible.

Test hooks (environment variables, for the kill-and-resume and NaN-guard
tests): ``TRAINING_RUNTIME_KILL_AT_STEP=k`` makes the process SIGKILL itself
right after step k (before any checkpoint of that step);
``TRAINING_RUNTIME_NAN_AT_STEP=k`` turns the loss of step k into NaN before
the backward pass (so the parameters become NaN too).
"""
import collections
from collections import namedtuple
import json
import math
import os
import random
import signal
import sys
import time

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from . import checkpoint
from .cli import CURVES_FILE, METRICS_FILE, resume_path
from .errors import UserError

ParamGroup = namedtuple("ParamGroup", "name params lr_mult optimizer_params follows_schedule")
ParamGroup.__new__.__defaults__ = (1.0, None, True)
ParamGroup.__doc__ = """One Trainer's worth of parameters.

name: str, used for the trainer-state entry in checkpoints.
params: gluon ParameterDict (or list of Parameters).
lr_mult: learning rate = schedule lr * lr_mult (S3N's per-group multipliers).
optimizer_params: dict overriding the optimizer settings for this group
    (e.g. the center-loss centers: {'learning_rate': 0.5, 'momentum': 0, 'wd': 0}).
follows_schedule: False keeps this group's learning rate fixed.
"""


KILL_ENV = "TRAINING_RUNTIME_KILL_AT_STEP"
NAN_ENV = "TRAINING_RUNTIME_NAN_AT_STEP"


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


class IndexedDataset(gluon.data.Dataset):
    """Items ``(data, label, index)``: the sample's dataset index travels with it."""

    def __init__(self, dataset):
        self._dataset = dataset

    def __len__(self):
        return len(self._dataset)

    def __getitem__(self, index):
        data, label = self._dataset[index]
        return data, label, index


def batch_indices(order, batch_size, start_batch=0, min_batch=1):
    """Consecutive batches of ``order`` from batch ``start_batch`` on.

    The last, smaller batch is kept (the original's round_batch=False) unless
    it has fewer than ``min_batch`` samples (one per device is needed).
    """
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if batches and len(batches[-1]) < min_batch:
        batches.pop()
    return [list(map(int, b)) for b in batches[start_batch:]]


def _batchnorms(block):
    """(parent, child name, BatchNorm) for every plain nn.BatchNorm under ``block``."""
    for name, child in list(block._children.items()):
        if type(child) is gluon.nn.BatchNorm:
            yield block, name, child
        else:
            for found in _batchnorms(child):
                yield found


def freeze_batchnorm(block):
    """Make every BatchNorm under ``block`` normalise with its running statistics
    (``use_global_stats``) in training too; gamma and beta still train.

    The usual answer to small per-device batches, and what makes data
    parallelism exact: with global statistics a sample's output does not
    depend on the other samples on its device. Call before hybridize.
    Returns the number of layers changed.
    """
    count = 0
    for _, _, bn in _batchnorms(block):
        bn._kwargs["use_global_stats"] = True
        count += 1
    return count


def use_sync_batchnorm(block, num_devices):
    """Replace every ``nn.BatchNorm`` under ``block`` by a ``SyncBatchNorm``.

    The replacement shares the original's parameters (same prefix and
    ParameterDict), so initialisation, checkpoints and the original's params
    files are unaffected; batch statistics are then those of the whole batch
    (MXNet averages per-device moments: exact for an even split). Meant for
    GPUs: on CPU contexts every device shares MXNet's CPU worker threads
    (MXNET_CPU_WORKER_NTHREADS, default 1), and one device's SyncBatchNorm
    blocks the only worker while it waits for the others: a deadlock.
    Call before the first forward. Returns the number of layers replaced.
    """
    from mxnet.gluon.contrib.nn import SyncBatchNorm
    replaced = 0
    for parent, name, bn in _batchnorms(block):
        kw = bn._kwargs
        if kw["axis"] != 1:
            continue  # SyncBatchNorm normalises axis 1 only
        sync = SyncBatchNorm(num_devices=num_devices, momentum=kw["momentum"], epsilon=kw["eps"],
                             scale=not kw["fix_gamma"], use_global_stats=kw["use_global_stats"],
                             prefix=bn.prefix, params=bn.params)
        parent._children[name] = sync
        for attr, value in list(vars(parent).items()):
            if value is bn:
                object.__setattr__(parent, attr, sync)
        replaced += 1
    return replaced


def progress_bar(total, desc, initial=0):
    """A tqdm bar on stderr (silent when stderr is not a terminal)."""
    from tqdm import tqdm
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
                    "training diverged: the loss is %s at step %d (lower --lr?); the last good "
                    "checkpoint is kept" % (value, step))
            self.loss_sum += float(value)
            self.count += n
        self._pending = []

    @property
    def mean(self):
        return self.loss_sum / self.count if self.count else float("nan")


class MetricsLog(object):
    """metrics.jsonl (one JSON line per epoch) and the training-curves PNG."""

    def __init__(self, save_dir):
        self.path = os.path.join(save_dir, METRICS_FILE)
        self.curves = os.path.join(save_dir, CURVES_FILE)

    def read(self):
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate(self, epoch):
        """Drop the lines of ``epoch`` and later (a resumed run writes them again)."""
        keep = [r for r in self.read() if r["epoch"] < epoch]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)

    def append(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        self.plot()

    def plot(self):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        records = self.read()
        epochs = [r["epoch"] for r in records]
        metric_keys = sorted({k for r in records for k, v in r.get("val", {}).items()
                              if isinstance(v, (int, float))})
        fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
        ax_loss.plot(epochs, [r["train_loss"] for r in records], "o-", label="train loss")
        ax_loss.set_xlabel("epoch")
        ax_loss.legend()
        for key in metric_keys:
            ax_metric.plot(epochs, [r["val"].get(key, float("nan")) for r in records], "o-", label=key)
        ax_metric.set_xlabel("epoch")
        if metric_keys:
            ax_metric.legend()
        fig.tight_layout()
        fig.savefig(self.curves)
        plt.close(fig)


def make_trainer(params, args, optimizer_params=None):
    """SGD Trainer with the run's momentum / wd, overridden by ``optimizer_params``."""
    settings = {"learning_rate": args.lr, "momentum": args.momentum, "wd": args.wd}
    settings.update(optimizer_params or {})
    return gluon.Trainer(params, "sgd", settings)


class Runner(object):
    """Trains a task (see the module docstring) with checkpoints, logs and resume.

    args: the parsed flags of :func:`training_runtime.cli.add_training_arguments`;
    ctx: list of contexts; schedule: an LRSchedule (trainers are attached here).
    """

    def __init__(self, task, args, ctx, schedule, save_dir, log=print):
        self.task, self.args, self.ctx, self.schedule = task, args, ctx, schedule
        self.save_dir, self.log = save_dir, log
        self.trainers = collections.OrderedDict()
        for group in task.groups:
            name, params, lr_mult, optimizer_params, follows = group
            trainer = make_trainer(params, args, optimizer_params)
            self.trainers[name] = schedule.attach(trainer, lr_mult, follows)
        self.metrics = MetricsLog(save_dir)
        self.train_set = IndexedDataset(task.train_set)
        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        self.best = -math.inf
        self.monitor = LossMonitor()
        self.epoch_time = 0.0
        self._kill_at = int(os.environ.get(KILL_ENV) or 0)
        self._nan_at = int(os.environ.get(NAN_ENV) or 0)

    # ---- checkpoints ------------------------------------------------------
    def _progress(self):
        self.monitor.check()
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step,
                "best": self.best if math.isfinite(self.best) else None,
                "loss_sum": self.monitor.loss_sum, "loss_count": self.monitor.count,
                "epoch_time": self._elapsed(), "batch_size": self.args.batch_size,
                "seed": self.args.seed}

    def save(self, best=False):
        arrays = checkpoint.capture(self.task.blocks, self.trainers, self.schedule, self._progress(),
                                    self.task.meta, self.task.extra_state(), workdir=self.save_dir)
        last = os.path.join(self.save_dir, checkpoint.LAST)
        checkpoint.save(last, arrays)
        if best:
            checkpoint.link_atomic(last, os.path.join(self.save_dir, checkpoint.BEST))

    def resume(self):
        path = resume_path(self.args)
        progress, extra = checkpoint.restore(path, self.task.blocks, self.trainers, self.schedule,
                                             self.task.meta)
        for key in ("batch_size", "seed"):
            if progress[key] != getattr(self.args, key):
                raise UserError("--resume: %s was written with --%s %s, this run has %s (the data "
                                "order would change)" % (path, key.replace("_", "-"), progress[key],
                                                          getattr(self.args, key)))
        self.task.load_extra_state(extra)
        self.epoch, self.batch_in_epoch = progress["epoch"], progress["batch_in_epoch"]
        self.step = progress["step"]
        self.best = progress["best"] if progress["best"] is not None else -math.inf
        self.monitor = LossMonitor(progress["loss_sum"], progress["loss_count"])
        self.epoch_time = progress["epoch_time"]
        self.metrics.truncate(self.epoch)
        self.log("resumed from %s at epoch %d, step %d" % (path, self.epoch, self.step))

    # ---- training ---------------------------------------------------------
    def _loader(self, batches):
        return gluon.data.DataLoader(self.train_set, batch_sampler=batches,
                                     num_workers=self.args.num_workers)

    def train_step(self, batch):
        """Forward/backward on every device slice, then one step of every trainer."""
        data, label, index = batch
        ctx = self.ctx[:min(len(self.ctx), data.shape[0])]
        slices = [gluon.utils.split_and_load(x, ctx, even_split=False) for x in (data, label, index)]
        with autograd.record():
            losses = [self.task.training_loss(d, l, i, self.epoch) for d, l, i in zip(*slices)]
            if self._nan_at == self.step + 1:
                losses = [loss * float("nan") for loss in losses]
        for loss in losses:
            loss.backward()
        for trainer in self.trainers.values():
            trainer.step(data.shape[0])
        self.task.after_step(self.epoch)
        step_sum = mx.nd.add_n(*[loss.sum().as_in_context(self.ctx[0]) for loss in losses])
        return step_sum

    def _elapsed(self):
        """Seconds spent in the current epoch (across resumes)."""
        return self.epoch_time + time.time() - self._segment_start

    def _end_epoch(self, partial=False):
        """Evaluate, apply the lr rule (complete epochs only), log; True if the metric improved."""
        self.monitor.check()
        metrics = {k: float(v) if isinstance(v, (int, float, np.number)) else v
                   for k, v in self.task.evaluate(self.epoch).items()}
        value = metrics[self.task.metric_name]
        improved = value > self.best
        if improved:
            self.best = value
        lr = self.schedule.lr
        if not partial:
            self.schedule.end_epoch(self.epoch, value)
        elapsed = self._elapsed()
        record = {"epoch": self.epoch, "lr": lr, "train_loss": self.monitor.mean,
                  "val": metrics, "time": round(elapsed, 3), "steps": self.step}
        if partial:
            record["partial"] = True
        self.metrics.append(record)
        self.log("epoch %d%s: lr %g, train loss %.4f, %s, %.1fs" % (
            self.epoch, " (stopped by --max-steps)" if partial else "", lr, self.monitor.mean,
            ", ".join("val %s %.4f" % (k, v) for k, v in metrics.items() if isinstance(v, float)),
            elapsed))
        return improved

    def _steps_left(self):
        return self.args.max_steps - self.step if self.args.max_steps else math.inf

    def run(self):
        """Train until --epochs or --max-steps, evaluating and checkpointing."""
        args = self.args
        self._segment_start = time.time()
        if args.resume:
            self.resume()
        while self.epoch < args.epochs and self._steps_left() > 0:
            self._segment_start = time.time()
            self.schedule.start_epoch(self.epoch)
            order = epoch_order(args.seed, self.epoch, len(self.train_set))
            all_batches = batch_indices(order, args.batch_size, 0, min_batch=len(self.ctx))
            batches = all_batches[self.batch_in_epoch:]
            batches = batches[:min(len(batches), self._steps_left())]
            bar = progress_bar(len(all_batches), "epoch %d" % self.epoch, self.batch_in_epoch)
            batch_iter = iter(self._loader(batches))
            for _ in batches:
                # the step's randomness (augmentation included: with num_workers 0 the
                # batch is loaded after the reseed) depends on the position only
                reseed(args.seed, self.epoch, self.batch_in_epoch)
                batch = next(batch_iter)
                step_sum = self.train_step(batch)
                self.step += 1
                self.batch_in_epoch += 1
                self.monitor.add(self.step, step_sum, batch[0].shape[0])
                bar.update(1)
                if self._kill_at == self.step:
                    os.kill(os.getpid(), signal.SIGKILL)
                if self.step % args.log_every == 0:
                    self.monitor.check()
                    bar.set_postfix(loss="%.4f" % self.monitor.mean)
                if (args.checkpoint_every and self.step % args.checkpoint_every == 0
                        and self.batch_in_epoch < len(all_batches) and self._steps_left() > 0):
                    self.save()
            bar.close()
            if self.batch_in_epoch < len(all_batches):  # stopped by --max-steps mid-epoch
                self._end_epoch(partial=True)
                self.save()
                break
            improved = self._end_epoch()
            self.epoch += 1
            self.batch_in_epoch = 0
            self.monitor = LossMonitor()
            self.epoch_time, self._segment_start = 0.0, time.time()
            self.save(best=improved)
        if self._steps_left() <= 0:
            self.log("stopped after %d steps (--max-steps)" % self.step)
