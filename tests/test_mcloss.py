"""fgvc_gluon.mcloss: golden parity (L_dis, L_div, gradients, upstream mask replay), finite differences,
mask rule, errors, networks, method adapter and a short training run on Fashion-MNIST."""
import random

import mxnet as mx
import numpy as np
import pytest
from conftest import assert_golden, golden_cases, golden_tolerance, load_golden
from mxnet import autograd, nd
from mxnet.gluon import nn

from fgvc_gluon import mcloss
from fgvc_gluon.mcloss import MCLoss, build_method, mc_loss, upstream_mask
from helpers import central_difference, fashion_mnist_tensors, seed_everything, train_steps

CASES = golden_cases("mcloss_")
ALPHA, BETA = 1.5, 20.0  # the golden grad_x_total uses upstream's get_params defaults


def test_all_public_cases_found():
    assert len(CASES) >= 4


def _golden_losses_and_grads(case):
    """(L_dis, L_div, d L_dis/dx, d L_div/dx) of our mc_loss on the case's inputs."""
    grads = []
    for part in (0, 1):
        x = nd.array(case["x"])
        x.attach_grad()
        with autograd.record():
            parts = mc_loss(x, case["targets"], int(case["cnum"]), case["mask"])
        parts[part].backward()
        grads.append(x.grad.asnumpy())
    return parts[0], parts[1], grads[0], grads[1]


@pytest.mark.parametrize("name", CASES)
def test_mc_loss_matches_golden(name):
    case = load_golden(name)
    l_dis, l_div, grad_dis, grad_div = _golden_losses_and_grads(case)
    assert l_dis.shape == (1,) and l_div.shape == (1,)
    for actual, key in ((l_dis.asnumpy().reshape(()), "loss_dis"), (l_div.asnumpy().reshape(()), "loss_div"),
                        (grad_dis, "grad_x_dis"), (grad_div, "grad_x_div")):
        assert_golden(actual, case[key], *golden_tolerance(name, key), what="%s %s" % (name, key))


@pytest.mark.parametrize("name", CASES)
def test_mc_loss_block_total_and_gradient_match_golden(name):
    case = load_golden(name)
    num_classes, xi = int(case["num_classes"]), int(case["cnum"])
    block = MCLoss(num_classes, xi, alpha=ALPHA, beta=BETA)
    x = nd.array(case["x"])
    x.attach_grad()
    with autograd.record():
        total = block(x, nd.array(case["targets"]), case["mask"])
    total.backward()
    assert_golden(block.loss_dis.asnumpy().reshape(()), case["loss_dis"], *golden_tolerance(name, "loss_dis"))
    assert_golden(block.loss_div.asnumpy().reshape(()), case["loss_div"], *golden_tolerance(name, "loss_div"))
    expected_total = ALPHA * float(case["loss_dis"]) + BETA * float(case["loss_div"])
    assert abs(float(total.asscalar()) - expected_total) <= 1e-5 * abs(expected_total) + 1e-5
    assert_golden(x.grad, case["grad_x_total"], *golden_tolerance(name, "grad_x_total"), what=name)


@pytest.mark.parametrize("name", CASES)
def test_upstream_mask_replays_python_random(name):
    case = load_golden(name)
    replay = upstream_mask(int(case["num_classes"]), int(case["cnum"]), case["x"].shape[0],
                           rng=random.Random(int(case["mask_seed"])))
    assert_golden(replay, case["mask"], 0, 0, what=name)


def test_upstream_mask_default_is_global_random_like_upstream():
    case = load_golden("mcloss_public_04_upstream_mask_c200.npz")
    assert int(case["mask_seed"]) == 42
    random.seed(42)
    assert_golden(upstream_mask(200, 3, 2), case["mask"], 0, 0)


def test_negative_features_let_the_masked_zero_win_the_max():
    # MC-3: in a group of signed features the dropped channel contributes 0 to the max
    x = nd.array(np.full((1, 4, 2, 2), -1.0, np.float32))
    mask = np.array([1, 0, 1, 1], np.float32).reshape(1, 4, 1, 1)  # class 0 keeps channel 0 only
    l_dis, _ = mc_loss(x, [1], 2, mask)
    # class 0 scores max(-1, 0) = 0, class 1 scores -1: CE(label 1) = log(1 + e)
    assert abs(float(l_dis.asscalar()) - np.log1p(np.e)) < 1e-5


def test_first_maximum_alone_gets_the_gradient_on_ties():
    # upstream max_pool2d sends the gradient of a tie to the first channel only
    x = nd.array(np.ones((1, 2, 2, 2), np.float32))
    x.attach_grad()
    with autograd.record():
        l_dis, _ = mc_loss(x, [0], 2, np.ones((1, 2, 1, 1), np.float32))
    l_dis.backward()
    grad = x.grad.asnumpy()
    assert np.all(grad[0, 1] == 0) and np.all(grad[0, 0] != 0)


def test_gradient_matches_finite_differences():
    rng = np.random.RandomState(3)
    n, c, xi, h, w = 2, 3, 3, 3, 4  # non-square maps on purpose
    x0 = rng.normal(size=(n, c * xi, h, w))
    labels = np.array([2, 0])
    mask = upstream_mask(c, xi, n, rng=random.Random(5))

    def objective(x):
        l_dis, l_div = mc_loss(nd.array(x, dtype=np.float64), labels, xi, mask.astype(np.float64))
        return float((ALPHA * l_dis + BETA * l_div).asscalar())

    x = nd.array(x0, dtype=np.float64)
    x.attach_grad()
    with autograd.record():
        l_dis, l_div = mc_loss(x, labels, xi, mask.astype(np.float64))
        total = ALPHA * l_dis + BETA * l_div
    total.backward()
    numeric = central_difference(objective, x0, 1e-6)
    np.testing.assert_allclose(x.grad.asnumpy(), numeric, rtol=1e-5, atol=1e-7)


def test_channel_count_errors_name_the_expected_count():
    x = np.zeros((2, 29, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"mc_loss features: expected 30 channels"):
        mc_loss(x, [0, 1], 3, np.ones((2, 30, 1, 1), np.float32))
    with pytest.raises(ValueError, match=r"mc_loss mask: expected N x \(c\*xi\) x 1 x 1 with xi=4"):
        mc_loss(x, [0, 1], 4, np.ones((2, 30, 1, 1), np.float32))
    with pytest.raises(ValueError, match=r"expected 30 channels \(num_classes\*xi = 10 x 3\), got 29"):
        MCLoss(10, 3)(nd.array(x), nd.array([0, 1]))


def test_mask_rule_keeps_exactly_keep_channels_per_class_for_every_sample():
    for xi, keep, expected_keep in ((3, None, 2), (2, None, 1), (5, None, 3), (4, 1, 1)):
        block = MCLoss(7, xi, keep=keep, seed=11)
        assert block.keep == expected_keep
        masks = [block.draw_mask(batch=4) for _ in range(20)]
        for mask in masks:
            assert mask.shape == (4, 7 * xi, 1, 1) and mask.dtype == np.float32
            assert np.all(mask == mask[:1])  # one mask shared by the batch (MC-2)
            assert set(np.unique(mask)) <= {0.0, 1.0}
            assert np.all(mask[0, :, 0, 0].reshape(7, xi).sum(axis=1) == expected_keep)
        # redrawn: every channel is sometimes dropped, and draws differ
        assert len({m.tobytes() for m in masks}) > 1
        assert np.all(np.max([m[0, :, 0, 0] for m in masks], axis=0) == 1)
        if expected_keep < xi:
            assert np.all(np.min([m[0, :, 0, 0] for m in masks], axis=0) == 0)
    again = MCLoss(7, 3, seed=11)
    np.testing.assert_array_equal(MCLoss(7, 3, seed=11).draw_mask(), again.draw_mask())
    with pytest.raises(ValueError, match="keep"):
        MCLoss(7, 3, keep=4)


def test_forward_draws_a_fresh_mask_each_call_and_follows_numpy_seed():
    features = nd.random.uniform(shape=(2, 12, 3, 3))
    labels = nd.array([1, 3])

    def two_masks():
        np.random.seed(123)
        block = MCLoss(4, 3)
        block(features, labels)
        first = block.last_mask.asnumpy()
        block(features, labels)
        return first, block.last_mask.asnumpy()

    first, second = two_masks()
    assert first.shape == (1, 12, 1, 1) and not np.array_equal(first, second)
    replay_first, replay_second = two_masks()
    np.testing.assert_array_equal(first, replay_first)
    np.testing.assert_array_equal(second, replay_second)


def test_hybridized_loss_matches_imperative():
    case = load_golden(CASES[0])
    block = MCLoss(int(case["num_classes"]), int(case["cnum"]))
    args = (nd.array(case["x"]), nd.array(case["targets"]))
    imperative = block(*args, case["mask"]).asscalar()
    block.hybridize()
    assert abs(block(*args, case["mask"]).asscalar() - imperative) < 1e-6


@pytest.mark.parametrize("builder", [mcloss.vgg16_bn_mc, mcloss.resnet18_mc])
def test_small_networks_shapes_and_hybridize(builder):
    seed_everything()
    net = builder(4, xi=3, width=0.125)
    x = nd.random.normal(shape=(2, 3, 32, 32))
    with autograd.train_mode():
        logits, features = net(x)
    assert logits.shape == (2, 4) and features.shape == (2, 12, 2, 2)
    eval_logits = net(x)
    assert isinstance(eval_logits, nd.NDArray) and eval_logits.shape == (2, 4)
    net.hybridize()
    np.testing.assert_allclose(net(x).asnumpy(), eval_logits.asnumpy(), rtol=1e-4, atol=1e-5)
    with autograd.train_mode():
        hybrid_logits, hybrid_features = net(x)
    np.testing.assert_allclose(hybrid_features.asnumpy(), features.asnumpy(), rtol=1e-4, atol=1e-5)


def test_full_size_networks_give_upstream_shapes():
    # upstream: 200 classes x xi=3 = 600 channels on 14x14 maps for 224 inputs
    x = nd.random.normal(shape=(1, 3, 224, 224))
    for builder in (mcloss.resnet18_mc, mcloss.vgg16_bn_mc):
        net = builder(200, xi=3)
        with autograd.train_mode():
            logits, features = net(x)
        assert logits.shape == (1, 200) and features.shape == (1, 600, 14, 14), builder.__name__
    # VGG classifier sees the 600 x 7 x 7 max-pooled maps
    assert net.classifier[3].weight.shape == (512, 600 * 7 * 7)


def test_build_method_errors():
    with pytest.raises(ValueError, match=r"^backbone: expected one of vgg16_bn_mc, resnet18_mc"):
        build_method(4, backbone="resnet50_v1")
    with pytest.raises(ValueError, match=r"^pretrained: the MC-Loss networks are trained from scratch"):
        build_method(4, pretrained=True)
    with pytest.raises(ValueError, match=r"^image_size: expected an int >= 32"):
        build_method(4, image_size=16)


def test_method_contract():
    seed_everything()
    method = build_method(4, backbone="resnet18_mc", width=0.125, image_size=32, seed=0)
    assert method.defaults["lr"] == 0.1 and method.defaults["lr_steps"] == [149, 224]
    assert method.defaults["image_size"] == 32 and method.defaults["mean"] == (0.5, 0.5, 0.5)
    [group] = method.param_groups()
    assert set(group.params.keys()) == set(method.net.collect_params().keys())
    x, y = nd.random.normal(shape=(3, 3, 32, 32)), nd.array([0, 1, 3])
    with autograd.record():
        loss = method.training_loss(x, y, None, 0)
    assert loss.shape == (3,)
    # per-sample loss: its mean is CE + alpha*L_dis + beta*L_div of the same mask
    with autograd.train_mode():
        logits, features = method.net(x)
    l_dis, l_div = mc_loss(features, y, 3, method.mc_loss.last_mask)
    ce = float(mx.gluon.loss.SoftmaxCrossEntropyLoss()(logits, y).mean().asscalar())
    expected = ce + ALPHA * float(l_dis.asscalar()) + BETA * float(l_div.asscalar())
    assert abs(float(loss.mean().asscalar()) - expected) < 1e-4 * abs(expected)
    out = method.predict(x, 0)
    assert list(out) == ["classifier"] and out["classifier"].shape == (3, 4)


def test_method_on_two_devices():
    seed_everything()
    devices = [mx.cpu(0), mx.cpu(1)]
    method = build_method(3, backbone="vgg16_bn_mc", width=0.125, image_size=32, ctx=devices)
    x, y = nd.random.normal(shape=(4, 3, 32, 32)), nd.array([0, 1, 2, 1])
    with autograd.record():
        losses = [method.training_loss(x[i:i + 2].as_in_context(dev), y[i:i + 2].as_in_context(dev), None, 0)
                  for i, dev in zip((0, 2), devices)]
    autograd.backward(losses)
    assert [loss.context for loss in losses] == devices
    weight = method.net.features[0].weight
    assert all(np.abs(g.asnumpy()).sum() > 0 for g in weight.list_grad())


def test_short_training_on_fashion_mnist_lowers_the_loss(fashion_mnist_dir):
    seed_everything()
    data, labels = fashion_mnist_tensors(fashion_mnist_dir)
    method = build_method(4, backbone="resnet18_mc", width=0.25, image_size=32)
    method.net.hybridize()
    losses = train_steps(method, data, labels, steps=32, batch_size=32, lr=0.01)
    assert np.all(np.isfinite(losses))
    assert losses[-8:].mean() < 0.3 * losses[:4].mean(), losses
    # the classifier itself learned (4 classes: chance is 0.25), not only the L_div term
    accuracy = float((method.predict(data, 0)["classifier"].argmax(axis=1) == labels).mean().asscalar())
    assert accuracy > 0.7, accuracy


def test_batchnorm1d_equals_gluon_batchnorm_on_features():
    # BatchNorm1D runs 2-D input as N×C×1×1 (oneDNN crash work-around): same numbers
    x = nd.random.normal(shape=(6, 5))
    reference, ours = nn.BatchNorm(), mcloss.BatchNorm1D()
    for block in (reference, ours):
        block.initialize()
    for record in (True, False):
        with autograd.record(train_mode=record):
            expected, actual = reference(x), ours(x)
        np.testing.assert_allclose(actual.asnumpy(), expected.asnumpy(), rtol=1e-5, atol=1e-6)
    assert sorted(k.split("_", 1)[1] for k in ours.collect_params()) == \
        sorted(k.split("_", 1)[1] for k in reference.collect_params())
