"""Losses of the ECCV 2018 attribute model, the prediction history and class weights.

Notation: N batch, C attributes, T history length. Labels fed to the losses
are 0/1 (SPEC quirk 4: in training, WIDER's unspecified 0 and negative -1
both count as 0); an optional ``label_mask`` (N x C, 1 = counted) leaves
unspecified labels out of the loss instead.

Faithfulness (see docs/SPEC.md §1.3 and the golden quirks IL-1..IL-13 of
tests/golden/MANIFEST.md, indexed in docs/SPEC.md):

- ``WeightedFocalLoss`` / ``AttentionHistoryLoss`` compute by default the
  PUBLISHED formulas, with p = 1 / (1 + exp(-x)) computed the original's naive
  way (exactly 0 / 1 when saturated, IL-3) and 1e-12 inside the logs (IL-5),
  mean over attributes (IL-6). Unlike the original (IL-2, IL-8) they work under
  ``autograd.record()`` and give gradients to the logits through p.
- ``plain_bce=True`` reproduces what the original script actually trained with
  (IL-1): its own log-sum-exp sigmoid BCE, whose gradient at a logit of exactly
  0 is (0.5 - y) / C (Gluon's SigmoidBinaryCrossEntropyLoss gives -y / C there).
- ``stable=True`` (improvement, off by default) takes p and its logs from
  sigmoid / log-sigmoid ops: the original's naive form has NaN gradients below
  x = -88.7 and caps log(0) at log(1e-12).
- ``PredictionHistory`` is keyed by dataset index, not by batch position
  (SPEC quirk 3), so shuffled loaders and any dataset size work; its schedule
  (record from epoch 2, weight from epoch 5, unrecorded slots are zeros) is the
  original's (quirk 5, IL-10).

Errors: wrong shapes, types and values of the arguments (including labels
that make a class weight infinite, or a malformed history state) raise
ValueError or TypeError naming the function and the argument; the training
task turns those about its data into messages for the user.
"""
import numpy as np
import mxnet as mx
from mxnet import autograd, nd
from mxnet.gluon.loss import Loss


__all__ = ["WeightedFocalLoss", "AttentionHistoryLoss", "history_std_weights",
           "PredictionHistory", "class_weights", "batch_ratios_from_labels",
           "WIDER_CLASS_WEIGHTS", "WIDER_BATCH_RATIOS"]

# The original's epsilon inside log(p + eps) and log(1 - p + eps) (IL-5).
LOG_EPS = 1e-12

# The 14 class weights hard-coded in the original wider_training.train() (IL-4);
# the loss uses batch_ratios = 1 / weights, computed in float32 like nd.array(1 / cl_weights).
WIDER_CLASS_WEIGHTS = np.array(
    [1.0, 3.4595959, 18.472435, 3.3854823, 3.5971165, 1.1370194, 12.584616, 5.7822747,
     10.827924, 1.7478157, 8.8111115, 28.433332, 2.7568319, 18.020712], dtype=np.float32)
WIDER_BATCH_RATIOS = np.float32(1.0) / WIDER_CLASS_WEIGHTS


# ----------------------------------------------------------------------------------------------
# Formula pieces shared by both losses (F is mx.nd or mx.sym).

def _naive_sigmoid(F, logits):
    """p = 1 / (1 + exp(-x)) exactly as the original: 1.0 for x >~ 16.6, 0 for x < -88.7 (IL-3)."""
    return 1. / (1. + F.exp(-logits))


def _probability_terms(F, logits, stable):
    """(p, log p, log(1 - p)) of the logits, each N x C.

    Default: the original's naive sigmoid with 1e-12 inside the logs (IL-3, IL-5);
    its gradient is NaN for x < -88.7 (exp overflows) and the logs are capped at
    log(1e-12) once p rounds to 0 or 1. ``stable``: sigmoid and log-sigmoid ops
    (log p = -softrelu(-x)), finite and uncapped everywhere.
    """
    if stable:
        return (F.sigmoid(logits), -F.Activation(-logits, act_type="softrelu"),
                -F.Activation(logits, act_type="softrelu"))
    p = _naive_sigmoid(F, logits)
    return p, F.log(p + LOG_EPS), F.log(1. - p + LOG_EPS)


def _original_bce(F, logits, labels):
    """The original's default-branch sigmoid BCE per element (IL-1), N x C.

    x - x*y + m + log(exp(-m) + exp(-x - m)) with m = relu(-x); at x == 0 relu's
    gradient is 0, which makes d/dx = 0.5 - y there.
    """
    max_val = F.relu(-logits)
    return logits - logits * labels + max_val + F.log(F.exp(-max_val) + F.exp(-logits - max_val))


def _mean_over_attributes(F, loss, label_mask):
    """(N, C) -> (N,): mean over the non-batch axes (IL-6), or over the counted ones.

    With a mask, a sample with no counted attribute gets loss 0.
    """
    if label_mask is None:
        return F.mean(loss, axis=0, exclude=True)
    counted = F.sum(label_mask, axis=0, exclude=True)
    return F.sum(loss * label_mask, axis=0, exclude=True) / F.maximum(counted, 1.)


def _check_loss_inputs(owner, logits, labels, extra):
    """Clear errors for mismatched NDArray shapes (Symbols are checked by MXNet)."""
    if not isinstance(logits, nd.NDArray):
        return
    if logits.ndim < 2:
        raise ValueError("%s: logits: expected an N x C array, got shape %s" % (owner, logits.shape))
    for name, value in [("labels", labels)] + list(extra):
        if value is not None and isinstance(value, nd.NDArray) and value.size != logits.size:
            raise ValueError("%s: %s: expected shape %s like the logits, got %s"
                             % (owner, name, logits.shape, value.shape))


# ----------------------------------------------------------------------------------------------

class _AttributeLoss(Loss):
    """What both losses share: the plain-BCE mode, the stable option, label reshaping, the mean."""

    def __init__(self, plain_bce, stable, **kwargs):
        super(_AttributeLoss, self).__init__(None, 0, **kwargs)
        self._plain_bce = bool(plain_bce)
        self._stable = bool(stable)

    def _per_sample(self, F, logits, labels, label_mask, published_loss):
        """(N,) loss: ``published_loss(labels)`` (N x C) or the original's BCE, then the mean."""
        labels = F.reshape_like(labels, logits)
        if label_mask is not None:
            label_mask = F.reshape_like(label_mask, logits)
        if self._plain_bce:
            loss = _original_bce(F, logits, labels)
        else:
            loss = published_loss(labels)
        return _mean_over_attributes(F, loss, label_mask)


class WeightedFocalLoss(_AttributeLoss):
    """Class-weighted focal loss of the main (backbone) branch.

    ``loss(logits, labels[, label_mask])`` with logits, labels (and mask) N x C
    NDArrays returns the per-sample loss (N,).

    Default (the published formula, p = naive sigmoid, b = batch_ratios)::

        L = -exp(y + (1 - 2y) b) [(1-p)^gamma y log(p + 1e-12) + p^gamma (1-y) log(1-p + 1e-12)]

    averaged over the C attributes. The weights exp(.) are constants; the focal
    factors are differentiated (matches the golden ``grad_logits_focal``).

    Parameters
    ----------
    batch_ratios : array-like (C,)
        1 / class weight per attribute (``batch_ratios_from_labels`` or
        ``WIDER_BATCH_RATIOS``). Held as a Constant parameter ``batch_ratios``;
        it is placed on each input's context on first use, so no
        ``initialize()`` call is needed.
    gamma : float
        Focal exponent (2 in the original).
    plain_bce : bool
        True: the original script's actual training loss (IL-1), its
        log-sum-exp sigmoid BCE; batch_ratios and gamma are then unused.
    stable : bool
        Improvement, off by default: p and the logs from sigmoid / log-sigmoid
        ops instead of the original's naive 1 / (1 + exp(-x)) with 1e-12, so
        saturated logits keep finite, uncapped gradients (the original's are
        NaN below x = -88.7).
    weighted : bool
        True (default): the published focal and class weighting. False (the
        ablation's "history only" variant, ``--loss history``): the same
        published form without either weighting, i.e. the unweighted BCE
        -(y log(p + 1e-12) + (1-y) log(1-p + 1e-12)); batch_ratios and gamma
        are then unused.

    ``label_mask`` (optional, N x C, 1 = counted, 0 = left out): the loss is the
    mean over the counted attributes of each sample (0 if none is counted); this
    is the "mask unspecified labels in training" option of SPEC quirk 4. When
    hybridized, call an instance always with or always without the mask.
    """

    def __init__(self, batch_ratios, gamma=2.0, plain_bce=False, stable=False, weighted=True,
                 **kwargs):
        super(WeightedFocalLoss, self).__init__(plain_bce, stable, **kwargs)
        self._weighted = bool(weighted)
        ratios = np.asarray(batch_ratios.asnumpy() if isinstance(batch_ratios, nd.NDArray)
                            else batch_ratios, dtype=np.float32)
        if ratios.ndim != 1 or ratios.size == 0 or not np.all(np.isfinite(ratios)):
            raise ValueError("WeightedFocalLoss: batch_ratios: expected a finite 1-D array of "
                             "C values (1 / class weight), got %r" % (ratios,))
        self._gamma = float(gamma)
        self._num_attributes = ratios.size
        # The plain BCE does not use the ratios: no constant then (a hybridized graph would
        # warn about an unused parameter).
        unused = self._plain_bce or not self._weighted
        self.batch_ratios = None if unused else self.params.get_constant("batch_ratios", ratios)

    def forward(self, logits, labels, label_mask=None):
        _check_loss_inputs("WeightedFocalLoss", logits, labels, [("label_mask", label_mask)])
        if isinstance(logits, nd.NDArray):
            if logits.shape[-1] != self._num_attributes:
                raise ValueError("WeightedFocalLoss: logits: expected C = %d attributes (the length "
                                 "of batch_ratios), got shape %s" % (self._num_attributes, logits.shape))
            if self.batch_ratios is not None:
                self._place_constant(logits.context)
        return super(WeightedFocalLoss, self).forward(logits, labels, label_mask)

    def _place_constant(self, ctx):
        """Make the batch_ratios constant available on ``ctx`` (no-op when it already is)."""
        try:
            contexts = self.batch_ratios.list_ctx()
        except RuntimeError:  # not initialized yet
            self.batch_ratios.initialize(ctx=ctx)
            return
        if ctx not in contexts:
            self.batch_ratios.reset_ctx(contexts + [ctx])

    def hybrid_forward(self, F, logits, labels, label_mask=None, batch_ratios=None):
        def focal(labels):
            p, log_p, log_not_p = _probability_terms(F, logits, self._stable)
            if not self._weighted:  # published form without focal / class weighting
                return -(log_p * labels + log_not_p * (1. - labels))
            # exp(1 - b) for a positive, exp(b) for a negative (IL-4); a constant: no gradient.
            weights = F.exp(F.broadcast_add(labels, F.broadcast_mul(
                1 - labels * 2, F.reshape(batch_ratios, (1, -1)))))
            w_p, w_n = F.power(1. - p, self._gamma), F.power(p, self._gamma)
            loss = -(w_p * log_p * labels + w_n * log_not_p * (1. - labels))
            return loss * weights
        return self._per_sample(F, logits, labels, label_mask, focal)


class AttentionHistoryLoss(_AttributeLoss):
    """History-weighted BCE of each attention stage.

    ``loss(logits, labels[, std_weights[, label_mask]])`` (all N x C, positional)
    returns the per-sample loss (N,). Default (published formula, p = naive sigmoid)::

        L = -w (log(p + 1e-12) y + log(1 - p + 1e-12) (1 - y)),  mean over C,

    with w = ``std_weights`` (from ``PredictionHistory.std_weights``; None means
    1, the original's branch before the weighting epoch). w is a constant; the
    gradient flows to the logits through p, as the original's does (IL-3).

    ``plain_bce=True``: the original script's actual training loss (IL-1), its
    log-sum-exp sigmoid BCE; std_weights are then ignored like the original's
    history. ``stable``, ``label_mask``: as in ``WeightedFocalLoss``.
    """

    def __init__(self, plain_bce=False, stable=False, **kwargs):
        super(AttentionHistoryLoss, self).__init__(plain_bce, stable, **kwargs)

    def forward(self, logits, labels, std_weights=None, label_mask=None):
        _check_loss_inputs("AttentionHistoryLoss", logits, labels,
                           [("std_weights", std_weights), ("label_mask", label_mask)])
        if self._plain_bce:
            std_weights = None  # the original's BCE ignores the history (IL-1)
        elif std_weights is None:
            # Weight 1 is exact (x * 1 == x), and a fixed argument structure lets a hybridized
            # instance switch from unweighted to weighted epochs without rebuilding its graph.
            std_weights = logits.ones_like()
        return super(AttentionHistoryLoss, self).forward(logits, labels, std_weights, label_mask)

    def hybrid_forward(self, F, logits, labels, std_weights=None, label_mask=None):
        def weighted_bce(labels):
            _, log_p, log_not_p = _probability_terms(F, logits, self._stable)
            return -F.reshape_like(std_weights, logits) * (
                log_p * labels + log_not_p * (1. - labels))
        return self._per_sample(F, logits, labels, label_mask, weighted_bce)


# ----------------------------------------------------------------------------------------------
# Prediction history

def _std_weights_nd(history, axis):
    """1 + sqrt(v + v^2 / (T - 1)), v = population variance over ``axis`` (length T), NDArray."""
    length = history.shape[axis]
    mean = nd.mean(history, axis=axis, keepdims=True)
    var = nd.mean(nd.square(nd.broadcast_sub(history, mean)), axis=axis)
    return 1. + nd.sqrt(var + nd.square(var) / (length - 1))


def history_std_weights(history):
    """Per-element loss weights from a prediction history (IL-8, IL-9).

    history: (T, N, C) past probabilities, numpy or NDArray (T >= 2).
    Returns (N, C) ``1 + sqrt(v + v^2 / (T - 1))`` with v the variance over T
    (ddof 0): numpy (same float dtype, np.var like the original) for numpy
    input, an NDArray on the same context (no host sync) for NDArray input.
    """
    shape = history.shape if isinstance(history, nd.NDArray) else np.shape(history)
    if len(shape) != 3 or shape[0] < 2:
        raise ValueError("history_std_weights: history: expected a (T, N, C) array with T >= 2, "
                         "got shape %s" % (tuple(shape),))
    if isinstance(history, nd.NDArray):
        return _std_weights_nd(history, axis=0)
    history = np.asarray(history)
    if not np.issubdtype(history.dtype, np.floating):
        history = history.astype(np.float64)
    var = np.var(history, axis=0)
    return 1 + (var + var ** 2 / (history.shape[0] - 1)) ** .5


def _positive_int(value, name, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError("PredictionHistory: %s: expected an integer >= %d, got %r"
                        % (name, minimum, value))
    if value < minimum:
        raise ValueError("PredictionHistory: %s: expected an integer >= %d, got %r"
                         % (name, minimum, value))
    return int(value)


class PredictionHistory(object):
    """The last T predictions of every training sample, keyed by dataset index.

    The buffer is an NDArray on ``ctx`` (float32, zeros at start), so updates
    and weights need no host sync. Schedule (the original's, IL-10):
    ``update`` records only when ``epoch >= start_epoch``; ``std_weights`` is
    None before ``weight_epoch`` and afterwards counts the slots not yet
    recorded as zeros (SPEC quirk 5).

    Parameters
    ----------
    num_samples : int
        Size of the training set (indices run over 0 .. num_samples - 1).
    num_attributes : int
        C.
    length : int
        T, number of predictions kept per sample (>= 2; 5 in the original).
    start_epoch, weight_epoch : int
        First epoch that records (2) and first epoch that weights (5).
    ctx : mx.Context
        Where the buffer lives (default: mx.cpu()).
    """

    def __init__(self, num_samples, num_attributes, length=5, start_epoch=2, weight_epoch=5,
                 ctx=None):
        self.num_samples = _positive_int(num_samples, "num_samples")
        self.num_attributes = _positive_int(num_attributes, "num_attributes")
        self.length = _positive_int(length, "length", minimum=2)
        self.start_epoch = _positive_int(start_epoch, "start_epoch", minimum=0)
        self.weight_epoch = _positive_int(weight_epoch, "weight_epoch", minimum=0)
        self.ctx = ctx if ctx is not None else mx.cpu()
        # Sample-major (num_samples, T, C) so that a batch's rows are one gather / one scatter.
        self._buffer = nd.zeros((self.num_samples, self.length, self.num_attributes),
                                ctx=self.ctx, dtype=np.float32)

    def _rows(self, indices, count=None):
        """Dataset indices (N,) as an int64 NDArray on the buffer's context.

        numpy / list indices are checked (1-D, integer, in range, no repeats);
        NDArray indices are only shape-checked, to avoid a host sync per step.
        """
        if isinstance(indices, nd.NDArray):
            if indices.ndim != 1 or (count is not None and indices.shape[0] != count):
                raise ValueError("PredictionHistory: indices: expected a 1-D array of %s dataset "
                                 "indices, got shape %s" % (count or "N", indices.shape))
            return indices.as_in_context(self.ctx).astype(np.int64, copy=False)
        rows = np.asarray(indices)
        if rows.size and not np.issubdtype(rows.dtype, np.integer):
            raise TypeError("PredictionHistory: indices: expected a 1-D integer array of %s dataset "
                            "indices, got %s of shape %s" % (count or "N", rows.dtype, rows.shape))
        if rows.ndim != 1 or (count is not None and rows.shape[0] != count):
            raise ValueError("PredictionHistory: indices: expected a 1-D integer array of %s dataset "
                             "indices, got %s of shape %s" % (count or "N", rows.dtype, rows.shape))
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_samples):
            raise ValueError("PredictionHistory: indices: expected dataset indices in [0, %d), got "
                            "values from %d to %d" % (self.num_samples, rows.min(), rows.max()))
        if np.unique(rows).size != rows.size:
            raise ValueError("PredictionHistory: indices: expected distinct dataset indices in one "
                             "update, got repeats")
        return nd.array(rows, ctx=self.ctx, dtype=np.int64)

    def update(self, indices, predictions, epoch):
        """Record ``predictions`` (N x C probabilities) of samples ``indices`` (N,).

        Shifts each sample's slots by one (the oldest drops out) and writes
        slot 0 = newest. Does nothing before ``start_epoch``. Returns whether it
        recorded. The predictions are detached (never part of the graph).
        """
        if epoch < self.start_epoch:
            return False
        if not isinstance(predictions, nd.NDArray):
            predictions = nd.array(np.asarray(predictions, dtype=np.float32), ctx=self.ctx)
        if predictions.ndim != 2 or predictions.shape[1] != self.num_attributes:
            raise ValueError("PredictionHistory: predictions: expected N x %d probabilities, got "
                             "shape %s" % (self.num_attributes, predictions.shape))
        rows = self._rows(indices, count=predictions.shape[0])
        with autograd.pause():
            newest = predictions.detach().as_in_context(self.ctx).astype(np.float32, copy=False)
            previous = nd.take(self._buffer, rows, axis=0)  # (N, T, C)
            shifted = nd.concat(newest.expand_dims(1),
                                nd.slice_axis(previous, axis=1, begin=0, end=self.length - 1), dim=1)
            self._buffer[rows] = shifted
        return True

    def std_weights(self, indices, epoch, ctx=None):
        """(N, C) NDArray of loss weights ``1 + std`` for samples ``indices``, or None.

        None before ``weight_epoch`` (the unweighted loss). Returned on ``ctx``
        (default: the buffer's context).
        """
        if epoch < self.weight_epoch:
            return None
        rows = nd.take(self._buffer, self._rows(indices), axis=0)  # (N, T, C)
        weights = _std_weights_nd(rows, axis=1)
        return weights if ctx is None else weights.as_in_context(ctx)

    def state_dict(self):
        """numpy arrays and plain numbers; ``"history"`` is (T, num_samples, C), slot 0 newest."""
        return {"history": self._buffer.transpose((1, 0, 2)).asnumpy(),
                "length": self.length, "num_samples": self.num_samples,
                "num_attributes": self.num_attributes, "start_epoch": self.start_epoch,
                "weight_epoch": self.weight_epoch}

    def load_state_dict(self, state):
        """Restore the buffer from ``state_dict()`` output (the schedule stays as constructed)."""
        expected = (self.length, self.num_samples, self.num_attributes)
        if not isinstance(state, dict) or state.get("history") is None:
            found = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError("PredictionHistory state: expected a dict with a 'history' array of "
                             "shape %s, got %s" % (expected, found))
        history = state["history"]
        history = np.asarray(history.asnumpy() if isinstance(history, nd.NDArray) else history)
        if history.shape != expected:
            raise ValueError("PredictionHistory state: 'history' expected shape %s (T, num_samples, "
                             "num_attributes), got %s" % (expected, history.shape))
        self._buffer = nd.array(history.transpose(1, 0, 2), ctx=self.ctx, dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# Class weights

def class_weights(labels, strict=False, attribute_names=None):
    """The original ``get_classweights`` (IL-12): per attribute r = mean of its labels,
    w = (1 - r) / r if r <= 0.5 else 1; float32 (C,).

    labels: (N, C) 0/1 labels, numpy or NDArray. Faithful by default: an
    attribute without positives gets +inf (numpy division, as the original), and
    non-0/1 labels are used as given (IL-13).

    strict=True (what training uses): raises ValueError for labels other than
    0/1 and for an attribute without positives (its weight would be infinite),
    naming the attribute (``attribute_names[c]`` when given).
    """
    labels = np.asarray(labels.asnumpy() if isinstance(labels, nd.NDArray) else labels)
    if labels.ndim != 2 or labels.shape[0] == 0:
        raise ValueError("class_weights: labels: expected an N x C array with N >= 1, got shape %s"
                         % (labels.shape,))
    if strict:
        if not np.all((labels == 0) | (labels == 1)):
            raise ValueError("class_weights: labels: expected 0/1 values (map WIDER's -1 and 0 to 0 "
                             "first), got values %s" % np.unique(labels)[:10].tolist())
        empty = np.flatnonzero(labels.sum(axis=0) == 0)
        if empty.size:
            name = attribute_names[empty[0]] if attribute_names is not None else empty[0]
            raise ValueError("class_weights: attribute %s has no positive training label (its class "
                             "weight would be infinite): expected at least one positive" % (name,))
    rate = labels.sum(axis=0) / float(labels.shape[0])
    with np.errstate(divide="ignore", invalid="ignore"):
        weights = np.where(rate <= 0.5, (1 - rate) / rate, 1.0)
    return weights.astype(np.float32)


def batch_ratios_from_labels(labels, attribute_names=None):
    """float32 (C,) batch_ratios = 1 / class_weights(labels, strict=True) for WeightedFocalLoss."""
    return np.float32(1.0) / class_weights(labels, strict=True, attribute_names=attribute_names)
