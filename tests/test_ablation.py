"""The ablation harness (experiments/) and the knobs it varies: loss components, the history
schedule, the strongly imbalanced demo variant."""
import json
import os
import re

import mxnet as mx
import numpy as np
import pytest
from mxnet import nd

from experiments import ablation_attr, common
from imbalanced_attr import fashion_attributes, losses
from imbalanced_attr.data import get_dataset
from imbalanced_attr import task as _registers_attention  # noqa: F401 (registers the method)
from imbalanced_attr.registry import METHODS
from training_runtime.config import ModelConfig

pytestmark = pytest.mark.slow  # end-to-end runs: not in the fast loop (-m "not slow")


def test_quick_ablation_table_and_plot_come_from_real_runs(tmp_path):
    out = str(tmp_path / "quick")
    table, plot = ablation_attr.main(["--quick", "--imbalance", "rare", "--out", out])
    with open(table) as f:
        text = f.read()
    with open(plot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    runs = sorted(os.listdir(os.path.join(out, "runs")))
    # every (imbalance, variant, seed) trained and tested
    for imbalance in ("rare",):
        for variant in ("original", "paper"):
            for seed in (0, 1):
                assert "%s-%s-s%d" % (imbalance, variant, seed) in runs
    # the per-seed rows are the runs' test.json values
    with open(os.path.join(out, "runs", "rare-paper-s1", "test.json")) as f:
        report = json.load(f)
    assert "| `paper` | 1 | %.4f | %.4f |" % (report["mAP"], report["mA"]) in text
    values = [ablation_attr.metrics_of(json.load(open(os.path.join(out, "runs", "rare-%s-s%d" % (v, s),
                                                                   "test.json"))))["mAP"]
              for v in ("paper", "original") for s in (0, 1)]
    mean, std = common.mean_std(values[:2])
    assert "| `paper` | 2 | %s |" % common.fmt(mean, std) in text
    diff = common.paired(values[:2], values[2:])
    assert "`paper` − `original` | %+.4f ± %.4f (%d/2" % (diff["mean"], diff["std"], diff["wins"]) in text
    # resumable: a second invocation trains nothing and writes the same table
    with open(os.path.join(out, "runs.jsonl")) as f:
        logged = f.readlines()
    table2, _ = ablation_attr.main(["--quick", "--imbalance", "rare", "--out", out])
    with open(os.path.join(out, "runs.jsonl")) as f:
        assert f.readlines() == logged
    with open(table2) as f:
        strip = lambda t: re.sub(r"this invocation took [0-9.]+ min", "", t)  # noqa: E731
        assert strip(f.read()) == strip(text)


def test_paired_comparison_and_t_test_by_hand():
    result = common.paired([3.0, 5.0, 7.0], [2.0, 3.0, 4.0])   # differences 1, 2, 3
    assert result["n"] == 3 and result["wins"] == 3
    assert result["mean"] == pytest.approx(2.0) and result["std"] == pytest.approx(1.0)
    assert result["t"] == pytest.approx(2 / (1 / np.sqrt(3)))
    assert result["p"] == pytest.approx(0.0742, abs=2e-4)     # Student's t, 2 dof, two-sided
    assert np.isnan(common.paired([1.0], [0.5])["p"])
    assert common.fmt_paired(result) == "+2.0000 ± 1.0000 (3/3, p 0.07)"
    assert common.fmt_paired(common.paired([1.0, 2.001, 3.0], [0.0, 1.0, 2.0])).endswith("(3/3, p < 0.01)")
    assert common.fmt_paired(common.paired([1.0], [0.5])) == "+0.5000 (1 seed)"
    assert common.mean_std([0.5]) == (0.5, 0.0)


def test_rare_variant_puts_the_rare_attributes_at_their_target_rates():
    train = get_dataset("fashion-mnist-rare", None, "train", limit=3000).label_matrix
    again = get_dataset("fashion-mnist-rare", None, "train", limit=3000).label_matrix
    np.testing.assert_array_equal(train, again)        # deterministic
    rates = dict(zip(fashion_attributes.ATTRIBUTE_NAMES, (train == 1).mean(axis=0)))
    for name, target in fashion_attributes.RARE_RATES.items():
        assert abs(rates[name] - target) < 0.004, (name, rates[name])
    assert rates["upper_body"] > 0.5                 # the classes kept whole dominate
    # evaluation splits keep the natural rates
    natural = get_dataset("fashion-mnist", None, "val", limit=1000).label_matrix
    np.testing.assert_array_equal(get_dataset("fashion-mnist-rare", None, "val", limit=1000).label_matrix,
                                  natural)


def test_unweighted_main_loss_is_the_published_bce():
    rs = np.random.RandomState(0)
    logits = nd.array(rs.normal(scale=3, size=(4, 3)).astype(np.float32))
    labels = nd.array(rs.randint(0, 2, size=(4, 3)).astype(np.float32))
    ratios = np.array([.1, .3, .5], np.float32)
    plain = losses.WeightedFocalLoss(ratios, weighted=False)(logits, labels).asnumpy()
    p = 1 / (1 + np.exp(-logits.asnumpy().astype(np.float64)))
    y = labels.asnumpy()
    expected = -(y * np.log(p + 1e-12) + (1 - y) * np.log(1 - p + 1e-12)).mean(axis=1)
    np.testing.assert_allclose(plain, expected, rtol=1e-5)
    focal = losses.WeightedFocalLoss(ratios)(logits, labels).asnumpy()
    assert np.abs(focal - plain).max() > 1e-3           # the default still weights


def _task(loss, start, weight):
    entry = METHODS.get("attention")
    options = dict(entry.default_options(), loss=loss, history_start=start, history_weight_epoch=weight)
    config = ModelConfig(method="attention", backbone="resnet18_v1", image_size=32, pretrained=False,
                         options=options)
    return entry.build(config, fashion_attributes.ATTRIBUTE_NAMES, [mx.cpu()])


@pytest.mark.parametrize("loss, focal, history", [("focal", True, False), ("history", False, True)])
def test_loss_variants_switch_the_published_components(loss, focal, history):
    train = get_dataset("fashion-mnist", None, "train", limit=64)
    task = _task(loss, start=1, weight=3)
    task.prepare_training(train)
    assert (task.history.start_epoch, task.history.weight_epoch) == (1, 3)
    assert task.main_loss._plain_bce == (loss == "original")
    assert task.main_loss._weighted == (loss != "history")
    calls = []
    original = task.attention_loss.forward
    task.attention_loss.forward = lambda *a: calls.append(a[2]) or original(*a)
    data = nd.array(np.random.RandomState(0).normal(size=(2, 3, 32, 32)).astype(np.float32))
    label = nd.array(np.array([train.labels[0], train.labels[1]], np.float32))
    for epoch in (2, 3):
        calls[:] = []
        task.training_loss(data, label, nd.array([0, 1], dtype="int64"), epoch)
        weighted = [w is not None for w in calls]
        assert weighted == [history and epoch >= 3] * len(calls)
    assert focal == (not task.main_loss._plain_bce and task.main_loss._weighted)


def test_knob_defaults_are_the_originals_schedule():
    entry = METHODS.get("attention")
    defaults = entry.default_options()
    assert (defaults["loss"], defaults["history_start"], defaults["history_weight_epoch"]) == ("paper", 2, 5)
    # a run saved before the knobs existed keeps the original's schedule
    options = dict(defaults)
    del options["history_start"], options["history_weight_epoch"]
    config = ModelConfig(method="attention", backbone="resnet18_v1", image_size=32, pretrained=False,
                         options=options)
    old = entry.build(config, fashion_attributes.ATTRIBUTE_NAMES, [mx.cpu()])
    assert (old.history_start, old.history_weight_epoch) == (2, 5)
