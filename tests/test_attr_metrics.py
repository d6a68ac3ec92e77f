"""imbalanced_attr.metrics: golden mAP parity, scikit-learn cross-check, PETA / PA-100K metrics."""
import warnings

import numpy as np
import pytest
from mxnet import nd
from sklearn.metrics import average_precision_score

from conftest import assert_golden, golden_cases, golden_tolerance, load_golden
from imbalanced_attr import metrics  # module import: pytest would collect a bare `test_map`


def check_golden_map(case, compute):
    g = load_golden(case)
    for convert in (np.asarray, nd.array):
        mean_ap, aps = compute(convert(g["labels"]), convert(g["predictions"]))
        assert isinstance(mean_ap, float) and isinstance(aps, np.ndarray)
        assert_golden(np.float64(mean_ap), g["mAP"], *golden_tolerance(case, "mAP"), what=case + " mAP")
        assert_golden(aps, g["APs"], *golden_tolerance(case, "APs"), what=case + " APs")


@pytest.mark.parametrize("case", golden_cases("map_test_"))
def test_test_map_golden(case):
    check_golden_map(case, metrics.test_map)


@pytest.mark.parametrize("case", golden_cases("map_sklearn_"))
def test_average_precision_golden(case):
    check_golden_map(case, metrics.average_precision)


# ------------------------------------------------------------------ test_map (VOC AP, 1/-1/0)

def voc_ap_by_loop(labels, scores):
    """Reference: walk the ranking, precision envelope over later ranks, mean at the positives."""
    order = scores.argsort()[::-1]
    tp = fp = 0
    precisions, is_positive = [], []
    for label in labels[order]:
        tp += label == 1
        fp += label == -1
        precisions.append(tp / (tp + fp) if tp + fp else np.nan)
        is_positive.append(label == 1)
    if tp == 0:
        return np.nan
    at_positives = [np.nanmax(precisions[k:]) for k, pos in enumerate(is_positive) if pos]
    return np.sum(at_positives) / tp


def test_test_map_hand_example():
    labels = np.array([[1, 0], [-1, 1], [1, -1], [0, 1], [-1, 0]])
    scores = np.array([[.9, .9], [.8, .8], [.7, .7], [.6, .2], [.5, .1]])
    mean_ap, aps = metrics.test_map(labels, scores)
    # attribute 0: precisions 1, .5, 2/3 at the ranks; envelope at the positives 1 and 2/3.
    # attribute 1: an unspecified label on top (precision 0/0 there), then 1, .5, 2/3.
    np.testing.assert_allclose(aps, [(1 + 2 / 3.) / 2, (1 + 2 / 3.) / 2], rtol=1e-12)
    assert mean_ap == pytest.approx(5 / 6., rel=1e-12)


def test_test_map_matches_loop_reference_and_nan_without_positives():
    rng = np.random.RandomState(11)
    labels = rng.choice([-1, 0, 1], size=(40, 6), p=[.5, .2, .3])
    labels[:, 5] = rng.choice([-1, 0], size=40)  # no positive: AP NaN (IL-16)
    scores = rng.rand(40, 6)
    mean_ap, aps = metrics.test_map(labels, scores)
    reference = [voc_ap_by_loop(labels[:, c], scores[:, c]) for c in range(6)]
    np.testing.assert_allclose(aps, reference, rtol=1e-12, equal_nan=True)
    assert np.isnan(aps[5]) and np.isnan(mean_ap)
    assert np.isfinite(aps[:5]).all()


# ------------------------------------------------------------------ average_precision (sklearn)

def test_average_precision_matches_sklearn_with_ties():
    rng = np.random.RandomState(12)
    for trial in range(30):
        n = rng.randint(1, 40)
        labels = (rng.rand(n, 5) < rng.uniform(0.05, 0.9)).astype(np.float32)
        labels[:, 4] = 0 if trial % 3 == 0 else labels[:, 4]  # no positive: sklearn 1.3.2 gives 0
        scores = np.round(rng.rand(n, 5), 1).astype(np.float32)  # many ties
        mean_ap, aps = metrics.average_precision(labels, scores)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn warns about the no-positive column
            expected = np.array([average_precision_score(labels[:, c], scores[:, c])
                                 for c in range(5)])
        np.testing.assert_allclose(aps, expected, rtol=1e-12, atol=1e-15)
        assert mean_ap == pytest.approx(expected.mean(), rel=1e-12)


def test_average_precision_groups_tied_scores():
    # one tie group holding one positive and one negative: precision 1/2 at its end, not 1
    _, aps = metrics.average_precision(np.array([0, 1, 1]), np.array([.5, .5, .1]))
    np.testing.assert_allclose(aps, [(1 / 2. + 2 / 3.) / 2])


def test_metric_input_errors():
    with pytest.raises(ValueError, match="average_precision: labels: expected values in \\[0, 1\\]"):
        metrics.average_precision(np.array([[1, -1]]), np.array([[.1, .2]]))
    with pytest.raises(ValueError, match="test_map: labels"):
        metrics.test_map(np.array([[2, 1]]), np.array([[.1, .2]]))
    with pytest.raises(ValueError, match="scores: expected the labels' shape"):
        metrics.test_map(np.ones((3, 2)), np.ones((3, 3)))
    with pytest.raises(ValueError, match="finite"):
        metrics.average_precision(np.ones((2, 1)), np.array([[np.nan], [1.]]))
    with pytest.raises(ValueError, match="probs"):
        metrics.attribute_metrics(np.ones((2, 2)), np.ones(2))


# ------------------------------------------------------------------ attribute_metrics

GT = np.array([[1, 0, 1, 0],
               [0, 1, 0, 0],
               [1, 1, 0, 0]])
PROBS = np.array([[.9, .6, .2, .1],
                  [.3, .7, .4, .5],   # .5 is not above the threshold
                  [.8, .1, .0, .2]])


def test_attribute_metrics_hand_example():
    result = metrics.attribute_metrics(GT, PROBS)
    assert set(result) == {"mA", "accuracy", "precision", "recall", "f1"}
    assert all(isinstance(v, float) for v in result.values())
    # per attribute (TPR + TNR) / 2: (1+1)/2, (.5+0)/2, (0+1)/2, TNR only = 1
    np.testing.assert_allclose(metrics.label_accuracies(GT, PROBS), [1, .25, .5, 1])
    assert result["mA"] == pytest.approx(2.75 / 4)
    # instances: |Y&P| / |Y|P| = 1/3, 1, 1/2; / |P| = 1/2, 1, 1; / |Y| = 1/2, 1, 1/2
    assert result["accuracy"] == pytest.approx((1 / 3. + 1 + .5) / 3)
    assert result["precision"] == pytest.approx(2.5 / 3)
    assert result["recall"] == pytest.approx(2 / 3.)
    assert result["f1"] == pytest.approx(2 * (2.5 / 3) * (2 / 3.) / (2.5 / 3 + 2 / 3.))
    assert metrics.attribute_metrics(nd.array(GT), nd.array(PROBS)) == result


def test_attribute_metrics_ignores_unspecified_wider_labels():
    signed = GT * 2 - 1
    signed[0, 1] = 0  # unspecified, predicted positive: counts nowhere
    result = metrics.attribute_metrics(signed, PROBS)
    # attribute 1 keeps only its TPR .5; sample 0 has P = {0}: 1/2, 1, 1/2
    assert result["mA"] == pytest.approx((1 + .5 + .5 + 1) / 4)
    assert result["accuracy"] == pytest.approx((.5 + 1 + .5) / 3)
    assert result["precision"] == pytest.approx(1.0)
    assert result["recall"] == pytest.approx(2 / 3.)
    assert result["f1"] == pytest.approx(.8)


def test_attribute_metrics_edge_cases():
    labels = np.array([[0, 0], [1, 0]])
    probs = np.array([[.1, .2], [.9, .1]])
    # sample 0 has empty ground truth and prediction: left out of every instance mean
    result = metrics.attribute_metrics(labels, probs)
    assert (result["accuracy"], result["precision"], result["recall"], result["f1"]) == (1, 1, 1, 1)
    # nothing predicted at all: precision undefined -> NaN, recall 0
    result = metrics.attribute_metrics(labels, np.zeros((2, 2)))
    assert np.isnan(result["precision"]) and result["recall"] == 0 and np.isnan(result["f1"])
    # an attribute with only unspecified labels is left out of mA
    signed, probs = np.array([[1, 0], [-1, 0]]), np.array([[.9, .2], [.8, .1]])
    np.testing.assert_array_equal(metrics.label_accuracies(signed, probs), [.5, np.nan])
    assert metrics.attribute_metrics(signed, probs)["mA"] == pytest.approx(0.5)


# ---------------------------------------------------------------- PA-100K / PETA protocol
# The field's protocol as Rethinking_of_PAR (valencebond/Rethinking_of_PAR,
# metrics/pedestrian_metrics.py) computes it: threshold 0.5; mA = mean over attributes of
# (TPR + TNR) / 2; per sample accuracy |Y&P| / |Y|P|, precision |Y&P| / |P|, recall
# |Y&P| / |Y|, each averaged over the samples; F1 = 2 P R / (P + R) of those means (not the
# mean of per-sample F1s).

PAR_LABELS = np.array([[1, 0, 1, 0],
                       [0, 1, 0, 1],
                       [1, 1, 0, 0]])
PAR_PROBS = np.array([[.9, .6, .4, .1],     # predicted {0, 1}
                      [.2, .7, .8, .9],     # predicted {1, 2, 3}
                      [.7, .3, .2, .6]])    # predicted {0, 3}


def test_attribute_metrics_pa100k_protocol_worked_case():
    result = metrics.attribute_metrics(PAR_LABELS, PAR_PROBS)
    # attribute 0: TPR 2/2, TNR 1/1 -> 1; 1: TPR 1/2, TNR 0/1 -> .25; 2: TPR 0/1, TNR 1/2 -> .25;
    # 3: TPR 1/1, TNR 1/2 -> .75
    np.testing.assert_allclose(metrics.label_accuracies(PAR_LABELS, PAR_PROBS), [1, .25, .25, .75])
    assert result["mA"] == pytest.approx(2.25 / 4)
    # sample 0: Y {0,2}, P {0,1}: |Y&P| 1, |Y|P| 3 -> acc 1/3, prec 1/2, rec 1/2
    # sample 1: Y {1,3}, P {1,2,3}: 2, 3 -> 2/3, 2/3, 1;  sample 2: Y {0,1}, P {0,3}: 1/3, 1/2, 1/2
    assert result["accuracy"] == pytest.approx(4 / 9.)
    assert result["precision"] == pytest.approx(5 / 9.)
    assert result["recall"] == pytest.approx(2 / 3.)
    assert result["f1"] == pytest.approx(20 / 33.)          # 2 (5/9)(2/3) / (5/9 + 2/3), not mean F1_i
    per_sample_f1 = np.mean([2 * p * r / (p + r) for p, r in ((.5, .5), (2 / 3., 1), (.5, .5))])
    assert abs(result["f1"] - per_sample_f1) > 1e-3


def _par_reference(labels, probs, eps=1e-20):
    """The protocol with Rethinking_of_PAR's eps guards, written from its definition."""
    predicted, positive = probs > .5, labels == 1
    tpr = (predicted & positive).sum(0) / (positive.sum(0) + eps)
    tnr = (~predicted & ~positive).sum(0) / ((~positive).sum(0) + eps)
    inter = (predicted & positive).sum(1)
    acc = np.mean(inter / ((predicted | positive).sum(1) + eps))
    prec = np.mean(inter / (predicted.sum(1) + eps))
    rec = np.mean(inter / (positive.sum(1) + eps))
    return dict(mA=np.mean((tpr + tnr) / 2), accuracy=acc, precision=prec, recall=rec,
                f1=2 * prec * rec / (prec + rec + eps))


def test_attribute_metrics_equals_the_par_protocol_on_random_predictions():
    rs = np.random.RandomState(3)
    labels = (rs.rand(200, 26) < .3).astype(int)
    probs = np.clip(labels * .35 + rs.rand(200, 26) * .65, 0, 1)
    # the protocol's eps only differs from ours for a sample with no positive label or no
    # predicted positive (ours leaves that undefined ratio out, it counts 0); none here
    assert (labels.sum(1) > 0).all() and ((probs > .5).sum(1) > 0).all()
    assert ((labels == 1).sum(0) > 0).all() and ((labels == 0).sum(0) > 0).all()
    ours, reference = metrics.attribute_metrics(labels, probs), _par_reference(labels, probs)
    for key in reference:
        assert ours[key] == pytest.approx(reference[key], rel=1e-12), key
