"""S3N's classification losses (``Yao-DD/S3N`` ``losses.py``), used by S3N and the baseline.

- :func:`smooth_loss`: logits N×K, labels (N,) -> per-sample (N,) cross
  entropy against the label-smoothed target (``smooth_ratio`` on the label,
  ``(1 − smooth_ratio)/(K − 1)`` on every other class);
- :func:`multi_smooth_loss`: a sequence of N×K logits (S3N's branches) ->
  the weighted sum of their losses, batch mean (1,) as upstream (S3N-14) or
  per sample (N,).

``smooth_ratio=None`` means no smoothing (plain softmax cross entropy); a
ratio of 1 gives the same numbers (the smoothed target is then one-hot).
Labels are class indices of any numeric dtype (float32 in the methods).
"""
from mxnet import nd

from training_runtime.registry import Knob

__all__ = ["SMOOTH_RATIO", "smooth_loss", "multi_smooth_loss", "cross_entropy", "smooth_ratio_knob"]

SMOOTH_RATIO = 0.85   # S3N's label smoothing target (its CUB configs)


def cross_entropy(logits, labels):
    """Plain softmax cross entropy per sample: logits N×K, labels (N,) -> (N,)."""
    return -nd.pick(nd.log_softmax(logits, axis=1), labels, axis=1)


def smooth_loss(logits, labels, smooth_ratio=SMOOTH_RATIO):
    """Upstream ``smooth_loss`` per sample: logits N×K, labels (N,) → (N,).

    Cross entropy against the target smooth_ratio on the label and
    (1 − smooth_ratio)/(K − 1) on every other class. Upstream takes K from
    ``len(input[1])`` (the second ROW, whose length is K) and so fails for a
    batch of one (S3N-15); we take K from the class axis. ``smooth_ratio``
    None: plain cross entropy.
    """
    if smooth_ratio is None:
        return cross_entropy(logits, labels)
    num_classes = logits.shape[1]
    target = nd.one_hot(labels, num_classes)
    target = smooth_ratio * target + (1 - smooth_ratio) * (1 - target) / (num_classes - 1)
    return -nd.sum(nd.log_softmax(logits, axis=1) * target, axis=1)


def multi_smooth_loss(outputs, labels, smooth_ratio=SMOOTH_RATIO, loss_weight=None, per_sample=False):
    """Upstream ``multi_smooth_loss`` (S3N-14): Σ_i w_i · loss_i over the outputs.

    outputs: sequence of N×K logits (S3N's order: concat, raw, zoom,
    complementary); labels: (N,) class indices. Outputs at index 1 and at the
    last index use label smoothing (target smooth_ratio, every other class
    (1 − smooth_ratio)/(K − 1); None: none); the others plain softmax cross
    entropy. loss_weight: dict branch index (int, or a str passed through
    int() as upstream) → weight, default 1. Returns the batch mean, shape
    (1,), as upstream; with ``per_sample=True`` the (N,) per-sample losses
    whose mean is that value.

    TypeError for outputs that are not a tuple/list or a non-integer branch
    key; ValueError for fewer than 2 outputs or a branch index out of range.
    """
    if not isinstance(outputs, (tuple, list)):
        raise TypeError("multi_smooth_loss outputs: expected a tuple of at least 2 logit arrays, got %s"
                        % type(outputs).__name__)
    if len(outputs) < 2:
        raise ValueError("multi_smooth_loss outputs: expected a tuple of at least 2 logit arrays, got %d"
                         % len(outputs))
    weights = [1.0] * len(outputs)
    for key, value in (loss_weight or {}).items():
        try:
            index = int(key)
        except (TypeError, ValueError):
            raise TypeError("multi_smooth_loss loss_weight: expected int branch indices, got %r" % (key,))
        if not 0 <= index < len(outputs):
            raise ValueError("multi_smooth_loss loss_weight: branch index %d out of range 0..%d"
                             % (index, len(outputs) - 1))
        weights[index] = float(value)
    smoothed = {1, len(outputs) - 1}
    total = 0
    for index, logits in enumerate(outputs):
        if index in smoothed:
            branch = smooth_loss(logits, labels, smooth_ratio)
        else:
            branch = cross_entropy(logits, labels)
        total = total + weights[index] * branch
    return total if per_sample else nd.mean(total).reshape((1,))


def smooth_ratio_knob():
    """The ``smooth_ratio`` knob of the methods trained with these losses (baseline, s3n):
    a value in [0, 1], default 0.85; 1 on the command line means None (plain cross
    entropy, the same numbers as a ratio of 1)."""
    return Knob("smooth_ratio", float, SMOOTH_RATIO,
                "label smoothing target of S3N's smooth loss (1 = plain cross entropy)",
                minimum=0.0, maximum=1.0, allow_none=True, none_flag_value=1)
