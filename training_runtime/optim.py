"""SGD with the same numbers as ``mxnet.optimizer.SGD``, faster on large arrays.

MXNet 1.9.1's SGD updates every dense float32 array with
``multi_sgd_mom_update`` (groups of ``MXNET_OPTIMIZER_AGGREGATION_SIZE``,
default 4, even one array alone). On CPU that kernel runs at about half the
memory bandwidth of the single-array ``sgd_mom_update`` (measured: 1.0 s vs
0.52 s for one 1024×512×14×14 array with momentum), and the attribute
model's heads hold 241 M parameters. Both kernels compute, per element,

    mom = momentum·mom − lr·wd·w − lr·rescale_grad·g;  w = w + mom

in the same float32 operations, so the results are bitwise equal
(tests/test_fast_path.py checks Trainer steps of both). Without momentum
``sgd_update`` rounds differently ((1 − lr·wd)·w − lr·rescale_grad·g), so
momentum 0 keeps SGD's own path.

:class:`SGD` sends every array of at least :data:`LARGE` elements to the
single-array kernel and aggregates the small ones into one
``multi_sgd_mom_update`` per :attr:`aggregate_num` arrays (here
:data:`AGGREGATE`, set per optimizer instead of through the process-wide
environment variable). Anything else (float16 / multi_precision, sparse
arrays, no momentum) is ``mxnet.optimizer.SGD``'s own path. Hyperparameters, states,
``Trainer.save_states`` files and lr/wd multipliers are SGD's.
"""
import mxnet as mx
import numpy as np

#: arrays with at least this many elements get their own ``sgd_mom_update``
LARGE = 1 << 16
#: small arrays per ``multi_sgd_mom_update`` (MXNet's kernel takes at most 60)
AGGREGATE = 45


class SGD(mx.optimizer.SGD):
    """``mxnet.optimizer.SGD`` (same arguments and numbers) with single-array kernels
    for large dense float32 arrays and larger aggregation for the small ones."""

    def __init__(self, **kwargs):
        super(SGD, self).__init__(**kwargs)
        self.aggregate_num = AGGREGATE

    def _update_impl(self, indices, weights, grads, states, multi_precision=False):
        if not isinstance(indices, (tuple, list)):
            indices, weights, grads, states = [indices], [weights], [grads], [states]
        dense = all(w.stype == "default" and g.stype == "default" and w.dtype == np.float32
                    for w, g in zip(weights, grads))
        if multi_precision or self.momentum == 0 or not dense:
            return super(SGD, self)._update_impl(indices, weights, grads, states, multi_precision)
        large = [i for i, w in enumerate(weights) if w.size >= LARGE]
        small = [i for i in range(len(weights)) if weights[i].size < LARGE]
        if small:
            pick = lambda seq: [seq[i] for i in small]  # noqa: E731
            super(SGD, self)._update_impl(pick(indices), pick(weights), pick(grads), pick(states))
        if not large:
            return
        big_indices = [indices[i] for i in large]
        self._update_count(big_indices)
        lrs, wds = self._get_lrs(big_indices), self._get_wds(big_indices)
        kwargs = {"rescale_grad": self.rescale_grad}
        if self.clip_gradient:
            kwargs["clip_gradient"] = self.clip_gradient
        for i, lr, wd in zip(large, lrs, wds):
            mx.nd.sgd_mom_update(weights[i], grads[i], states[i], out=weights[i], lr=lr, wd=wd,
                                 momentum=self.momentum, **kwargs)


def upgrade(trainer):
    """After ``Trainer.load_states`` (which unpickles the saved optimizer): a plain
    ``mxnet.optimizer.SGD`` from an older checkpoint becomes :class:`SGD` (same
    state and numbers). Returns the trainer."""
    optimizer = trainer._optimizer
    if type(optimizer) is mx.optimizer.SGD:
        optimizer.__class__ = SGD
        optimizer.aggregate_num = AGGREGATE
        for updater in trainer._updaters:
            updater.aggregate_updates = True
    return trainer
