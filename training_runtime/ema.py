"""``--ema DECAY``: an exponential moving average of the weights (docs/EMA.md).

What timm's ``ModelEmaV2`` (``--model-ema``) and mmengine's ``EMAHook`` keep:
after every training step, for every trainable parameter and every BatchNorm
running statistic (mean, variance) of the task's ``blocks()``,

    ema <- DECAY * ema + (1 - DECAY) * w

starting from the weights the first step starts from (timm: a copy of the
model taken before training). The average lives on the first device, one
NDArray per parameter, updated with NDArray operations only (no host sync),
from the first device's copy of each parameter: the trainable parameters are
the same on every device and worker after every update, so the average is the
same for any device split and number of workers (BatchNorm statistics: each
device and worker keeps its own during training, as without --ema; rank 0's
first device's are the ones evaluated and saved, see :meth:`WeightAverage.swapped`).

Evaluation, the pictures and the final test swap the average in and the
live weights back afterwards. Checkpoints keep the live weights as their
parameters (a resume continues training) and the average as the extra state
``ema`` (arrays ``extra/ema/<block>/<param>``); ``--test``, ``--predict``,
``--explain`` and ``python -m training_runtime.export`` load the average over
the parameters (:data:`CHECKPOINT_NAME`, ``checkpoint.load_parameters(overlay=)``).
"""
import collections
import contextlib

import mxnet as mx
import numpy as np

from .errors import UserError

#: the extra-state name of the average in checkpoints
CHECKPOINT_NAME = "ema"


def averaged_params(blocks):
    """``"<block>/<structural name>" -> Parameter`` that the average follows, in a fixed
    order: every trainable parameter (grad_req not 'null') and the running mean and
    variance of every BatchNorm layer that updates them (not ``use_global_stats``).
    Parameters that never change (frozen layers, frozen statistics) are left out: their
    average would only drift from them by rounding."""
    from .loop import _batchnorms  # the runtime's one list of BatchNorm classes
    moving = set()
    for block in blocks.values():
        for _, _, bn in _batchnorms(block):
            if not bn._kwargs.get("use_global_stats", False):
                moving.update((id(bn.running_mean), id(bn.running_var)))
    found, seen = collections.OrderedDict(), set()
    for block_name, block in blocks.items():
        for name, param in block._collect_params_with_prefix().items():
            if id(param) in seen:
                continue
            if param.grad_req != "null" or id(param) in moving:
                seen.add(id(param))
                found["%s/%s" % (block_name, name)] = param
    return found


class WeightAverage(object):
    """The exponential moving average of :func:`averaged_params` of ``blocks`` (dict
    name -> Block) on ``ctx`` (the run's first device); ``decay`` in (0, 1).

    :meth:`start` copies the current weights (once every parameter has its shape);
    :meth:`update` after every step; :meth:`swapped` for evaluation;
    :meth:`state_dict` / :meth:`load_state_dict` for checkpoints.
    """

    def __init__(self, blocks, decay, ctx):
        decay = float(decay)
        if not 0.0 < decay < 1.0:
            raise ValueError("WeightAverage: decay must be in (0, 1), got %r" % decay)
        self.decay, self.ctx = decay, ctx
        self.params = averaged_params(blocks)
        #: name -> NDArray on ctx (same shape and dtype as the parameter), None before start
        self.averages = None
        self.updates = 0

    @property
    def started(self):
        return self.averages is not None

    def _live(self, param):
        """The first device's value of ``param``, on ``self.ctx``."""
        value = param.list_data()[0]
        return value if value.context == self.ctx else value.as_in_context(self.ctx)

    def ready(self):
        """Every parameter has its data (deferred shapes are known after the first forward)."""
        return all(p._data is not None for p in self.params.values())

    def start(self):
        """ema := the current weights (the first step's starting point)."""
        self.averages = collections.OrderedDict(
            (name, self._live(p).copyto(self.ctx)) for name, p in self.params.items())
        self.updates = 0

    def start_if_ready(self):
        """:meth:`start` unless started, if every parameter has its shape; True if started."""
        if not self.started and self.ready():
            self.start()
        return self.started

    def update(self):
        """ema <- decay * ema + (1 - decay) * w for every parameter (asynchronous)."""
        if not self.started:
            self.start()  # a task whose parameters were not ready before the first step
        rest = 1.0 - self.decay
        for name, param in self.params.items():
            average = self.averages[name]
            average *= self.decay
            average += self._live(param) * rest
        self.updates += 1

    @contextlib.contextmanager
    def swapped(self, sync=None):
        """Within the block every device's copy of each parameter holds the average; the
        live values are put back afterwards (also on an exception). ``sync``: called after
        the swap (--kvstore dist_*: rank 0's BatchNorm statistics to every worker, so every
        worker evaluates what rank 0 saves). Yields True, or False (nothing swapped) before
        the average has started."""
        if not self.started:
            yield False
            return
        saved = []
        try:
            for name, param in self.params.items():
                copies = param.list_data()
                saved.append((copies, [c.copy() for c in copies]))
                for copy in copies:
                    self.averages[name].copyto(copy)
            if sync is not None:
                sync()
            yield True
        finally:
            for copies, backup in saved:
                for copy, value in zip(copies, backup):
                    value.copyto(copy)

    def state_dict(self):
        """The checkpointed state: ``decay``, ``updates`` and the arrays by parameter name
        (none before the start)."""
        state = {"decay": self.decay, "updates": self.updates}
        if self.started:
            state.update(self.averages)
        return state

    def load_state_dict(self, state, source="--resume"):
        """Restore :meth:`state_dict` (numpy arrays from a checkpoint); UserError naming
        ``source`` when it is not this run's average."""
        arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
        saved_decay = state.get("decay")
        if saved_decay is not None and float(saved_decay) != self.decay:
            raise UserError("%s: the checkpoint's --ema is %r, this run has %r"
                            % (source, saved_decay, self.decay))
        if not arrays:
            self.averages, self.updates = None, 0
            return
        averages = collections.OrderedDict()
        for name, param in self.params.items():
            if name not in arrays:
                raise UserError("%s: the checkpoint holds no average (--ema) of parameter %s"
                                % (source, name))
            value = arrays[name]
            shape = param.shape
            if len(value.shape) != len(shape) or any(m not in (0, t) for m, t in zip(shape, value.shape)):
                raise UserError("%s: the checkpoint's average of %s has shape %s, the model expects %s"
                                % (source, name, value.shape, shape))
            averages[name] = mx.nd.array(value, ctx=self.ctx, dtype=value.dtype)
        self.averages = averages
        self.updates = int(state.get("updates", 0))
