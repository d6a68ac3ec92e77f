"""Attribute metrics: the original's test mAP, scikit-learn-style AP, PETA / PA-100K metrics.

All functions take (N, C) labels and scores as numpy arrays or NDArrays (a 1-D
input is one attribute) and return Python floats and numpy float64 arrays.

- ``test_map``: the original ``evaluate_mAP(testingFlag=True)`` (IL-15..17),
  labels 1 / -1 / 0 (0 = unspecified, ignored).
- ``average_precision``: the original ``evaluate_mAP(testingFlag=False)``, i.e.
  scikit-learn's ``average_precision_score`` per attribute (IL-18), labels 0/1.
- ``attribute_metrics``: mA and the instance-based accuracy / precision /
  recall / F1 of the pedestrian-attribute papers (PETA, PA-100K).

Wrong shapes and label values raise ValueError naming the function and the argument.
"""
import numpy as np
from mxnet import nd

__all__ = ["test_map", "average_precision", "attribute_metrics", "label_accuracies"]


def _as_columns(labels, scores, caller, scores_name="scores"):
    """numpy (N, C) labels and scores with the same shape; 1-D inputs become one column."""
    arrays = []
    for name, value in (("labels", labels), (scores_name, scores)):
        value = np.asarray(value.asnumpy() if isinstance(value, nd.NDArray) else value)
        if value.ndim == 1:
            value = value[:, None]
        if value.ndim != 2 or value.shape[0] == 0:
            raise ValueError("%s: %s: expected an N x C array with N >= 1, got shape %s"
                             % (caller, name, value.shape))
        arrays.append(value)
    labels, scores = arrays
    if labels.shape != scores.shape:
        raise ValueError("%s: %s: expected the labels' shape %s, got %s"
                         % (caller, scores_name, labels.shape, scores.shape))
    if not np.all(np.isfinite(scores)):
        raise ValueError("%s: %s: expected finite values, got NaN or inf" % (caller, scores_name))
    return labels, scores


def _check_values(labels, allowed, caller, hint):
    if not np.all(np.isin(labels, allowed)):
        raise ValueError("%s: labels: expected values in %s%s, got %s"
                         % (caller, sorted(allowed), hint, np.unique(labels)[:10].tolist()))


def test_map(labels, scores):
    """The original test-time mAP (``evaluate_mAP(testingFlag=True)``).

    labels: (N, C) in {1, -1, 0}; scores: (N, C). Per attribute, rank by
    decreasing score (numpy's ``argsort()[::-1]``, as the original, so tied
    scores are ordered as numpy's default sort leaves them); label 1 is a true
    positive, -1 a false positive, 0 is ignored; AP = VOC all-point AP (sum over
    the ranks of the positives of the precision envelope / number of positives).
    An attribute without positives gets AP = NaN, and then mAP is NaN (IL-16).

    Returns (mAP float, APs float64 (C,)); mAP = unweighted mean (IL-17).
    """
    labels, scores = _as_columns(labels, scores, "test_map")
    _check_values(labels, (-1, 0, 1), "test_map", " (1 positive, -1 negative, 0 unspecified)")
    order = np.argsort(scores, axis=0)[::-1]
    ranked = np.take_along_axis(labels, order, axis=0)
    true_pos = np.cumsum(ranked == 1, axis=0)
    false_pos = np.cumsum(ranked == -1, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        # 0/0 = NaN only above the first specified label; those ranks never add recall.
        precision = true_pos / (true_pos + false_pos)
        envelope = np.fmax.accumulate(precision[::-1], axis=0)[::-1]
        aps = np.where(ranked == 1, envelope, 0.0).sum(axis=0) / true_pos[-1]
    return float(np.sum(aps) / aps.size), aps


def average_precision(labels, scores):
    """scikit-learn's ``average_precision_score`` per attribute, vectorised.

    labels: (N, C) in {0, 1}; scores: (N, C). AP = sum over thresholds of
    (R_k - R_{k-1}) P_k, tied scores forming one threshold. An attribute
    without positives gets 0.0, as scikit-learn 1.3.2 (which warns and sets
    recall to one; 2018-era versions gave NaN, IL-18).

    Returns (mAP float, APs float64 (C,)).
    """
    labels, scores = _as_columns(labels, scores, "average_precision")
    _check_values(labels, (0, 1), "average_precision",
                  " (map WIDER's unspecified 0 out and -1 to 0 first)")
    n = labels.shape[0]
    order = np.argsort(scores, axis=0, kind="stable")[::-1]
    ranked_scores = np.take_along_axis(scores, order, axis=0)
    ranked = np.take_along_axis(labels, order, axis=0).astype(np.float64)
    true_pos = np.cumsum(ranked, axis=0)
    precision = true_pos / np.arange(1, n + 1)[:, None]
    # Each positive contributes (1 / #positives) * the precision at the last rank of its tie group.
    group_end = np.ones(ranked_scores.shape, dtype=bool)
    group_end[:-1] = ranked_scores[1:] != ranked_scores[:-1]
    end_rank = np.where(group_end, np.arange(n)[:, None], n - 1)
    end_rank = np.minimum.accumulate(end_rank[::-1], axis=0)[::-1]
    precision_at_end = np.take_along_axis(precision, end_rank, axis=0)
    num_pos = true_pos[-1]
    aps = (ranked * precision_at_end).sum(axis=0) / np.maximum(num_pos, 1.0)
    return float(np.sum(aps) / aps.size), aps


def _binary_targets(labels, caller):
    """(positive, specified) boolean masks for 0/1 or 1/-1/0 labels (see attribute_metrics)."""
    _check_values(labels, (-1, 0, 1), caller, " (0/1, or 1/-1/0 with 0 unspecified)")
    positive = labels == 1
    if np.any(labels == -1):
        return positive, labels != 0
    return positive, np.ones(labels.shape, dtype=bool)


def _rate_means(predicted, positive, specified):
    """Per attribute, the mean of the defined rates among TPR and TNR (NaN if neither is)."""
    negative = specified & ~positive
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.stack([(predicted & positive).sum(axis=0) / positive.sum(axis=0),
                          (~predicted & negative).sum(axis=0) / negative.sum(axis=0)])
        defined = ~np.isnan(rates)
        return np.where(defined, rates, 0.0).sum(axis=0) / defined.sum(axis=0)


def label_accuracies(labels, probs, threshold=0.5):
    """Per-attribute label-based accuracy (TPR + TNR) / 2, float64 (C,).

    Predicted positive iff ``probs > threshold``. Only specified labels count
    (see ``attribute_metrics``). When an attribute has no positive (or no
    negative) label, its accuracy is the one rate that exists; NaN when it has
    no specified label at all.
    """
    labels, probs = _as_columns(labels, probs, "label_accuracies", "probs")
    positive, specified = _binary_targets(labels, "label_accuracies")
    return _rate_means(probs > threshold, positive, specified)


def _mean_ratio(numerator, denominator):
    """Mean of numerator / denominator over the entries with denominator > 0 (NaN if none)."""
    counted = denominator > 0
    return float(np.mean(numerator[counted] / denominator[counted])) if counted.any() else np.nan


def attribute_metrics(labels, probs, threshold=0.5):
    """PETA / PA-100K metrics: mA and instance-based accuracy, precision, recall, F1.

    labels: (N, C) either 0/1, or WIDER-style 1 / -1 / 0 (recognised by the
    presence of a -1) where 0 = unspecified: an unspecified entry counts in
    neither mA nor the instance sets. probs: (N, C) probabilities; predicted
    positive iff ``probs > threshold``.

    - mA: mean over attributes of (TPR + TNR) / 2 (``label_accuracies``;
      attributes with no specified label are left out).
    - Instance-based (Li et al., PA-100K protocol), per sample i with Y_i the
      positive labels and P_i the predicted positives:
      accuracy = mean |Y_i & P_i| / |Y_i | P_i|, precision = mean |Y_i & P_i| / |P_i|,
      recall = mean |Y_i & P_i| / |Y_i|, F1 = 2 precision recall / (precision + recall)
      from those means. Edge cases: a sample whose denominator set is empty
      (nothing predicted for precision, no positive label for recall, both for
      accuracy) is left out of that mean, since its ratio is undefined; a mean
      over no sample is NaN (and then F1 is NaN); F1 is 0 when precision +
      recall is 0.

    Returns a dict of Python floats with keys mA, accuracy, precision, recall, f1.
    """
    labels, probs = _as_columns(labels, probs, "attribute_metrics", "probs")
    positive, specified = _binary_targets(labels, "attribute_metrics")
    predicted = (probs > threshold) & specified
    accuracies = _rate_means(predicted, positive, specified)
    accuracies = accuracies[~np.isnan(accuracies)]
    hits = (predicted & positive).sum(axis=1)
    num_true, num_pred = positive.sum(axis=1), predicted.sum(axis=1)
    precision, recall = _mean_ratio(hits, num_pred), _mean_ratio(hits, num_true)
    if np.isnan(precision + recall):
        f1 = np.nan
    else:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"mA": float(np.mean(accuracies)) if accuracies.size else np.nan,
            "accuracy": _mean_ratio(hits, num_true + num_pred - hits),
            "precision": precision, "recall": recall, "f1": float(f1)}
