"""MC-Loss with per-class channel groups of unequal size (upstream MC_ResNet50.py: 152 classes × 10
channels then 48 × 11), the resnet50_mc network and recipe, and the cosine lr schedule.

The references here are straightforward numpy loops over the classes (the port handles each run of
equal ξ as one reshaped block).
"""
import math
import random

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, nd

import fgvc_gluon.family  # noqa: F401  (registers every method)
from fgvc_gluon import mcloss
from fgvc_gluon.data import make_transform
from fgvc_gluon.family import FAMILY
from fgvc_gluon.mcloss import (MCLoss, build_method, mc_loss, near_equal_groups, normalize_groups,
                               resnet50_keep, upstream_mask)
from helpers import central_difference, seed_everything
from training_runtime import app
from training_runtime import config as run_config
from training_runtime.config import OptimConfig
from training_runtime.registry import MethodEntry
from training_runtime.schedule import CosineSchedule, make_schedule

UPSTREAM_GROUPS = ((152, 10), (48, 11))


# ---------------------------------------------------------------- numpy reference

def reference_terms(x, labels, groups, mask):
    """Per-sample (L_dis_i, L_div_i) by loops over the classes: x N×C×H×W float64, groups (count, ξ) runs."""
    n = x.shape[0]
    masked = x * mask
    flat = x.reshape(n, x.shape[1], -1)
    spatial = np.exp(flat - flat.max(axis=2, keepdims=True))
    spatial /= spatial.sum(axis=2, keepdims=True)
    scores, div = [], np.zeros(n)
    start = 0
    for count, xi in groups:
        peaks = []
        for _ in range(count):
            block = masked[:, start:start + xi]                       # N×ξ×H×W
            scores.append(block.max(axis=1).mean(axis=(1, 2)))       # CCMP, then GAP: (N,)
            peaks.append(spatial[:, start:start + xi].max(axis=1).sum(axis=1))
            start += xi
        div += 1.0 - np.mean(peaks, axis=0) / xi                     # this run's term, summed over runs
    scores = np.stack(scores, axis=1)                                 # N×c
    log_p = scores - scores.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    dis = -log_p[np.arange(n), labels]
    return dis, div


def _case(groups, n=3, h=3, w=4, seed=0):
    rng = np.random.RandomState(seed)
    channels = sum(c * xi for c, xi in groups)
    classes = sum(c for c, _ in groups)
    x = rng.normal(size=(n, channels, h, w))
    labels = rng.randint(0, classes, size=n)
    mask = upstream_mask(classes, groups, 1, rng=random.Random(seed), keep=[max(1, xi - 1) for _, xi in groups])
    return x, labels, mask


@pytest.mark.parametrize("groups", [((3, 2), (2, 3)), ((1, 4), (3, 1), (2, 2)), ((4, 3),)])
def test_unequal_groups_match_the_numpy_loop(groups):
    x, labels, mask = _case(groups)
    expected_dis, expected_div = reference_terms(x, labels, groups, mask)
    l_dis, l_div = mc_loss(x.astype(np.float32), labels, groups, mask)
    np.testing.assert_allclose(l_dis.asscalar(), expected_dis.mean(), rtol=1e-5)
    np.testing.assert_allclose(l_div.asscalar(), expected_div.mean(), rtol=1e-5)
    block = MCLoss(sum(c for c, _ in groups), groups, alpha=0.0005, beta=0.005)
    dis_i, div_i = block.terms(nd.array(x, dtype=np.float64), nd.array(labels, dtype=np.float64),
                               mask.astype(np.float64))
    np.testing.assert_allclose(dis_i.asnumpy(), expected_dis, rtol=1e-10)
    np.testing.assert_allclose(div_i.asnumpy(), expected_div, rtol=1e-10)
    total = block(nd.array(x), nd.array(labels), mask)
    np.testing.assert_allclose(total.asscalar(), 0.0005 * expected_dis.mean() + 0.005 * expected_div.mean(),
                               rtol=1e-5)
    block.hybridize()
    np.testing.assert_allclose(block(nd.array(x), nd.array(labels), mask).asscalar(), total.asscalar(),
                               rtol=1e-6)


def test_upstream_size_groups_match_the_numpy_loop():
    # 2048 channels, 152 x 10 + 48 x 11 (upstream), on 2 x 2 maps
    x, labels, _ = _case(UPSTREAM_GROUPS, n=2, h=2, w=2, seed=4)
    mask = upstream_mask(200, UPSTREAM_GROUPS, 1, rng=random.Random(1), keep=(6, 7))
    expected_dis, expected_div = reference_terms(x, labels, UPSTREAM_GROUPS, mask)
    l_dis, l_div = mc_loss(x, labels, UPSTREAM_GROUPS, mask)
    np.testing.assert_allclose(l_dis.asscalar(), expected_dis.mean(), rtol=1e-5)
    np.testing.assert_allclose(l_div.asscalar(), expected_div.mean(), rtol=1e-5)


def test_unequal_groups_gradient_matches_finite_differences():
    groups = ((2, 2), (1, 3))
    x0, labels, mask = _case(groups, n=2, h=2, w=3, seed=7)
    mask = mask.astype(np.float64)

    def objective(x):
        l_dis, l_div = mc_loss(nd.array(x, dtype=np.float64), labels, groups, mask)
        return float((1.5 * l_dis + 20.0 * l_div).asscalar())

    x = nd.array(x0, dtype=np.float64)
    x.attach_grad()
    with autograd.record():
        l_dis, l_div = mc_loss(x, labels, groups, mask)
        total = 1.5 * l_dis + 20.0 * l_div
    total.backward()
    np.testing.assert_allclose(x.grad.asnumpy(), central_difference(objective, x0, 1e-6), rtol=1e-5, atol=1e-7)


def test_equal_groups_are_the_old_path():
    x, labels, _ = _case(((5, 3),), seed=2)
    x = x.astype(np.float32)
    mask = upstream_mask(5, 3, 3, rng=random.Random(3))
    old = [v.asnumpy() for v in mc_loss(x, labels, 3, mask)]
    for groups in (((5, 3),), [(5, 3)]):
        new = [v.asnumpy() for v in mc_loss(x, labels, groups, mask)]
        for a, b in zip(old, new):
            np.testing.assert_array_equal(a, b)
    # as two runs of the same ξ: the same L_dis; L_div is the sum of the two runs' terms
    dis, div = mc_loss(x, labels, ((2, 3), (3, 3)), mask)
    np.testing.assert_allclose(dis.asnumpy(), old[0], rtol=1e-6)
    np.testing.assert_allclose(div.asscalar(), reference_terms(x.astype(np.float64), labels, ((2, 3), (3, 3)),
                                                               mask[:1])[1].mean(), rtol=1e-5)
    # the block: same attributes and the same masks from the same seed
    equal, grouped = MCLoss(5, 3, seed=9), MCLoss(5, ((5, 3),), seed=9)
    assert (equal.xi, equal.keep, equal.groups) == (grouped.xi, grouped.keep, grouped.groups) == (3, 2, ((5, 3),))
    np.testing.assert_array_equal(equal.draw_mask(2), grouped.draw_mask(2))


def test_mask_keeps_exactly_the_count_of_each_group():
    block = MCLoss(200, UPSTREAM_GROUPS, keep=(6, 7), seed=3)
    assert (block.xi, block.keep, block.channels) == (None, (6, 7), 2048)
    masks = [block.draw_mask(batch=2) for _ in range(40)]
    for mask in masks:
        assert mask.shape == (2, 2048, 1, 1) and np.all(mask == mask[:1])
        row = mask[0, :, 0, 0]
        assert np.all(row[:1520].reshape(152, 10).sum(axis=1) == 6)
        assert np.all(row[1520:].reshape(48, 11).sum(axis=1) == 7)
    assert np.all(np.max([m[0, :, 0, 0] for m in masks], axis=0) == 1)
    assert np.all(np.min([m[0, :, 0, 0] for m in masks], axis=0) == 0)
    # defaults: ceil(ξ/2) per run; resnet50_mc's rule ξ - floor(2ξ/5) gives upstream's 6 of 10, 7 of 11
    assert MCLoss(5, ((3, 4), (2, 5))).keep == (2, 3)
    assert [resnet50_keep(xi) for xi in (3, 10, 11, 20, 21)] == [2, 6, 7, 12, 13]
    assert MCLoss(5, ((3, 4), (2, 5)), keep=4).keep == (4, 4)
    with pytest.raises(ValueError, match="keep"):
        MCLoss(5, ((3, 4), (2, 5)), keep=5)
    with pytest.raises(ValueError, match="one count per group run"):
        MCLoss(5, ((3, 4), (2, 5)), keep=(1, 2, 3))


def test_upstream_mask_replays_the_two_lists_of_mc_resnet50():
    # MC_ResNet50.py Mask(): foo = 6 ones + 4 zeros shuffled in place once per class of the first
    # 152, then foo2 = 7 ones + 4 zeros once per class of the last 48; one row for the batch
    rng = random.Random(42)
    foo, foo2, row = [1] * 6 + [0] * 4, [1] * 7 + [0] * 4, []
    for _ in range(152):
        rng.shuffle(foo)
        row += foo
    for _ in range(48):
        rng.shuffle(foo2)
        row += foo2
    expected = np.tile(np.array(row, np.float32).reshape(1, 2048, 1, 1), (3, 1, 1, 1))
    np.testing.assert_array_equal(upstream_mask(200, UPSTREAM_GROUPS, 3, rng=random.Random(42), keep=(6, 7)),
                                  expected)


def test_group_helpers_and_errors():
    assert near_equal_groups(2048, 200) == UPSTREAM_GROUPS
    assert near_equal_groups(2048, 128) == ((128, 16),)
    assert near_equal_groups(2048, 3) == ((1, 682), (2, 683))
    assert near_equal_groups(10, 10) == ((10, 1),)
    with pytest.raises(ValueError, match="2048 channels cannot be split into 2049"):
        near_equal_groups(2048, 2049)
    assert normalize_groups(3) == ((None, 3),) and normalize_groups([(2, 3.0)]) == ((2, 3),)
    for bad, error in ((0, ValueError), ([(2, 0)], ValueError), ([], ValueError), ("ab", TypeError)):
        with pytest.raises(error, match="xi"):
            normalize_groups(bad)
    with pytest.raises(ValueError, match="cover 5 classes, expected num_classes=6"):
        MCLoss(6, ((3, 4), (2, 5)))
    with pytest.raises(ValueError, match=r"expected 22 channels \(groups 3 x 4, 2 x 5\), got 21"):
        MCLoss(5, ((3, 4), (2, 5)))(nd.zeros((1, 21, 2, 2)), nd.array([0]))
    with pytest.raises(ValueError, match=r"mc_loss mask: expected N x 22 x 1 x 1"):
        mc_loss(np.zeros((1, 22, 2, 2)), [0], ((3, 4), (2, 5)), np.ones((1, 21, 1, 1)))
    assert MCLoss(5, ((3, 4), (2, 5))).class_channels(3) == (12, 5)


# ---------------------------------------------------------------- resnet50_mc

def test_resnet50_mc_full_network_shapes():
    # the only full ResNet-50 here: 64 px, batch 1, no ImageNet weights
    seed_everything()
    method = build_method(200, backbone="resnet50_mc", image_size=64)
    assert method.mc_loss.groups == UPSTREAM_GROUPS and method.mc_loss.keep == (6, 7)
    assert (method.mc_loss.alpha, method.mc_loss.beta) == (0.0005, 0.005)
    x = nd.random.normal(shape=(1, 3, 64, 64))
    with autograd.train_mode():
        logits, features = method.net(x)
    assert logits.shape == (1, 200) and features.shape == (1, 2048, 2, 2)
    assert method.net(x).shape == (1, 200)
    # upstream classifier: BN(2048) -> Dense 512 -> BN -> ELU -> Dense 200
    assert method.net.classifier[3].weight.shape == (512, 2048)
    assert method.net.classifier[6].weight.shape == (200, 512)
    groups = method.param_groups()
    assert [(g.name, g.lr_mult) for g in groups] == [("backbone", 1.0), ("classifier", 10.0)]
    backbone, classifier = (set(g.params.keys()) for g in groups)
    assert not backbone & classifier and backbone | classifier == set(method.net.collect_params().keys())
    assert len(classifier) == 12   # BN(2048), BN(512): 4 each; two Dense: weight and bias


def test_resnet50_mc_method_small():
    seed_everything()
    method = build_method(3, backbone="resnet50_mc", width=0.125, image_size=32, seed=0)
    assert method.mc_loss.groups == ((2, 85), (1, 86)) and method.mc_loss.keep == (51, 52)
    d = method.defaults
    assert (d["lr"], d["batch_size"], d["epochs"], d["wd"]) == (0.01, 64, 300, 5e-4)
    assert (d["resize"], d["train_crop"], d["mean"], d["std"]) == ((43, 43), "resize_random", (0.5,) * 3, (0.5,) * 3)
    assert build_method(3, backbone="resnet50_mc", image_size=448, width=0.125).defaults["resize"] == (600, 600)
    x, y = nd.random.normal(shape=(2, 3, 32, 32)), nd.array([0, 2])
    with autograd.record():
        loss = method.training_loss(x, y, None, 0)
    assert loss.shape == (2,)
    loss.backward()
    for group in method.param_groups():
        grads = [p.grad() for p in group.params.values() if p.grad_req != "null"]
        assert all(np.any(g.asnumpy() != 0) for g in grads), group.name
    with autograd.train_mode():
        logits, features = method.net(x)
    l_dis, l_div = mc_loss(features, y, method.mc_loss.groups, method.mc_loss.last_mask)
    ce = float(mx.gluon.loss.SoftmaxCrossEntropyLoss()(logits, y).mean().asscalar())
    expected = ce + 0.0005 * float(l_dis.asscalar()) + 0.005 * float(l_div.asscalar())
    assert abs(float(loss.mean().asscalar()) - expected) < 1e-5 * abs(expected)
    # the CLI's None knobs mean the backbone's weights; explicit ones win
    assert build_method(3, backbone="resnet50_mc", width=0.125, alpha=1.5, beta=20.0).mc_loss.beta == 20.0
    assert build_method(3, width=0.125).mc_loss.alpha == 1.5 and build_method(3, width=0.125).mc_loss.xi == 3


def test_resnet50_mc_errors():
    with pytest.raises(ValueError, match="^xi: resnet50_mc splits"):
        build_method(3, backbone="resnet50_mc", xi=3, width=0.125)
    with pytest.raises(ValueError, match="^width: the ImageNet weights"):
        build_method(3, backbone="resnet50_mc", width=0.5, pretrained=True)
    with pytest.raises(ValueError, match="cannot be split into 300"):
        build_method(300, backbone="resnet50_mc", width=0.125)
    with pytest.raises(ValueError, match="^pretrained: "):
        build_method(3, backbone="resnet18_mc", pretrained=True)


def test_resize_random_train_crop():
    random.seed(0)
    image = mx.nd.array(np.random.RandomState(0).randint(0, 255, (20, 30, 3)), dtype=np.uint8)
    defaults = dict(image_size=16, resize=(24, 24), train_crop="resize_random", flip=False,
                    mean=(0.5,) * 3, std=(0.5,) * 3)
    resized = (mx.image.imresize(image, 24, 24).asnumpy().astype(np.float32) / 255 - 0.5) / 0.5
    out = make_transform(defaults, train=True)(image).asnumpy().transpose(1, 2, 0)
    assert out.shape == (16, 16, 3)
    assert any(np.allclose(resized[y:y + 16, x:x + 16], out) for y in range(9) for x in range(9))
    from training_runtime.errors import UserError
    with pytest.raises(UserError, match="resize_random"):
        make_transform(dict(defaults, resize=None), train=True)


# ---------------------------------------------------------------- recipe and command line

def test_backbone_recipe_resolution_and_help():
    run = run_config.resolve(FAMILY, {"method": "mcloss", "backbone": "resnet50_mc", "data_dir": "/cub"})
    assert (run.model.image_size, run.model.pretrained, run.runtime.batch_size) == (448, True, 64)
    assert (run.optim.lr, run.optim.schedule, run.optim.epochs, run.optim.momentum, run.optim.wd) == \
        (0.01, "cosine", 300, 0.9, 5e-4)
    assert run.model.options == {"xi": None, "alpha": None, "beta": None, "width": 1.0}
    default = run_config.resolve(FAMILY, {"method": "mcloss", "data_dir": "/cub"})
    assert (default.model.backbone, default.model.image_size, default.optim.schedule, default.optim.lr_steps,
            default.model.pretrained) == ("vgg16_bn_mc", 224, "step", [149, 224], False)
    given = run_config.resolve(FAMILY, {"method": "mcloss", "backbone": "resnet50_mc", "data_dir": "/cub",
                                        "batch_size": 32, "schedule": "step"})
    assert (given.runtime.batch_size, given.optim.schedule, given.model.image_size) == (32, "step", 448)
    demo = run_config.resolve(FAMILY, {"method": "mcloss", "backbone": "resnet50_mc"})
    assert (demo.model.pretrained, demo.model.image_size, demo.optim.schedule) == (False, 32, "step")
    text = app.recipes_text(FAMILY)
    assert "upstream with --backbone resnet50_mc: batch_size=64, epochs=300, image_size=448, lr=0.01" in text
    assert "pretrained=True, schedule=cosine" in text
    with pytest.raises(ValueError, match="unknown backbones"):
        MethodEntry("x", None, backbones=("a",), backbone_recipes={"b": {}})


# ---------------------------------------------------------------- cosine schedule

def test_cosine_schedule_follows_upstream_formula_and_log():
    s = CosineSchedule(0.1, 300)
    for epoch in (0, 1, 150, 298, 299):
        t = epoch + 1
        assert s.lr_for_epoch(epoch) == float(0.1 / 2 * (math.cos(math.pi * (t % 300) / 300) + 1))
    # the classifier lrs printed in upstream's MC_ResNet50.out before epochs 1, 2, 299 and 300
    logged = {0: 0.09999725846827562, 1: 0.09998903417374227, 298: 2.741531724392843e-06, 299: 0.1}
    for epoch, lr in logged.items():
        assert s.lr_for_epoch(epoch) == pytest.approx(lr, rel=1e-12, abs=1e-18)
    # the backbone at lr 0.01 with the classifier x10: the same curve
    backbone = CosineSchedule(0.01, 300)
    assert backbone.lr_for_epoch(298) * 10 == pytest.approx(logged[298], rel=1e-12)
    assert s.lr == s.lr_for_epoch(0)
    s.start_epoch(149)
    state = s.state_dict()
    assert state == {"lr": s.lr_for_epoch(149), "base_lr": 0.1}
    again = CosineSchedule(0.1, 300)
    again.load_state_dict(state)
    assert again.lr == s.lr and again.start_epoch(150) == s.lr_for_epoch(150)
    made = make_schedule(OptimConfig(lr=0.02, epochs=4, schedule="cosine"))
    assert isinstance(made, CosineSchedule) and made.period == 4
    assert [made.lr_for_epoch(e) for e in range(4)] == pytest.approx([0.01 * (math.cos(math.pi * t / 4) + 1)
                                                                      for t in (1, 2, 3, 0)])
    with pytest.raises(ValueError, match="cosine"):
        make_schedule(OptimConfig(lr=0.02, epochs=4, schedule="linear"))


@pytest.mark.slow
def test_resnet50_mc_unavailable_imagenet_weights_are_a_one_line_error(tmp_path, fashion_mnist_dir):
    """--backbone resnet50_mc loads ImageNet weights as upstream: without the files and without
    network, one clear line naming the model-zoo network, status 2."""
    from resume_harness import run_script
    env = {"MXNET_HOME": str(tmp_path / "mxnet"), "MXNET_GLUON_REPO": "http://127.0.0.1:9/"}
    proc = run_script("train_fgvc.py", ["--method", "mcloss", "--backbone", "resnet50_mc", "--pretrained",
                                        "--width", "1", "--image-size", "32", "--max-steps", "1",
                                        "--train-limit", "4", "--figures", "none",
                                        "--save-dir", str(tmp_path / "run")], env=env, expect=2)
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --pretrained: ") and "resnet50_v1" in last, last
