"""fgvc_gluon.center_loss: golden parity of the upstream custom backward, finite differences, closed-form
centre gradients, method adapter (centers on their own Trainer) and a short Fashion-MNIST run."""
import mxnet as mx
import numpy as np
import pytest
from conftest import assert_golden, golden_cases, golden_tolerance, load_golden
from mxnet import autograd, nd

from fgvc_gluon.center_loss import CenterLoss, build_method
from helpers import central_difference, fashion_mnist_tensors, seed_everything, train_steps

CASES = golden_cases("centerloss_")


def test_all_public_cases_found():
    assert len(CASES) >= 3


def _center_loss_with(centers, size_average):
    loss = CenterLoss(centers.shape[0], centers.shape[1], size_average=size_average)
    loss.initialize()
    loss.centers.set_data(nd.array(centers))
    return loss


def _run(loss, features, labels, scale=1.0):
    """(loss value, d(scale·loss)/d features, centers' gradient)."""
    x = nd.array(features)
    x.attach_grad()
    with autograd.record():
        value = loss(x, nd.array(labels))
        objective = scale * value
    objective.backward()
    return value, x.grad.asnumpy(), loss.centers.grad().asnumpy().copy()


@pytest.mark.parametrize("name", CASES)
def test_center_loss_matches_golden(name):
    case = load_golden(name)
    loss = _center_loss_with(case["centers"], bool(case["size_average"]))
    value, grad_feat, grad_centers = _run(loss, case["feat"], case["labels"])
    assert value.shape == (1,)  # CL-3
    for actual, key in ((value, "loss"), (grad_feat, "grad_feat"), (grad_centers, "grad_centers")):
        assert_golden(actual, case[key], *golden_tolerance(name, key), what="%s %s" % (name, key))
    # CL-2: scaling the loss scales the feature gradient only
    _, grad_feat_scaled, grad_centers_scaled = _run(loss, case["feat"], case["labels"], float(case["loss_scale"]))
    for actual, key in ((grad_feat_scaled, "grad_feat_scaled"), (grad_centers_scaled, "grad_centers_scaled")):
        assert_golden(actual, case[key], *golden_tolerance(name, key), what="%s %s" % (name, key))
    # the centre gradient is the paper's update, not autograd's derivative (CL-1)
    assert not np.allclose(grad_centers, case["grad_centers_autograd"], rtol=1e-3, atol=1e-6)


def _random_problem(seed, batch=9, num_classes=5, dim=3):
    rng = np.random.RandomState(seed)
    labels = rng.choice([0, 1, 3, 4], size=batch)  # class 2 absent
    return (rng.normal(size=(batch, dim)), rng.normal(size=(num_classes, dim)), labels)


@pytest.mark.parametrize("size_average", [True, False])
def test_feature_gradient_matches_finite_differences(size_average):
    features, centers, labels = _random_problem(1)
    loss = _center_loss_with(centers, size_average)
    _, grad_feat, _ = _run(loss, features, labels)
    numeric = central_difference(lambda f: loss(nd.array(f), nd.array(labels)), features, step=1e-2)
    # the loss is quadratic in the features: central differences are exact up to float32 rounding
    np.testing.assert_allclose(grad_feat, numeric, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("size_average", [True, False])
def test_centre_gradient_matches_the_closed_form(size_average):
    features, centers, labels = _random_problem(2)
    loss = _center_loss_with(centers, size_average)
    _, _, grad_centers = _run(loss, features, labels, scale=7.0)  # scale must not matter (CL-2)
    denominator = len(labels) if size_average else 1
    expected = np.zeros_like(centers)
    for j in range(centers.shape[0]):
        members = labels == j
        expected[j] = (centers[j] - features[members]).sum(axis=0) / (1 + members.sum()) / denominator
    assert np.all(expected[2] == 0)
    np.testing.assert_allclose(grad_centers, expected, rtol=1e-5, atol=1e-6)


def test_float_labels_flattened_features_and_errors():
    features, centers, labels = _random_problem(3, dim=4)
    loss = _center_loss_with(centers, True)
    reference = float(loss(nd.array(features), nd.array(labels)).asscalar())
    # CL-4: features are flattened, float labels truncated like .long()
    as_maps = nd.array(features).reshape((len(labels), 2, 2, 1))
    assert float(loss(as_maps, nd.array(labels + 0.6)).asscalar()) == pytest.approx(reference, rel=1e-6)
    with pytest.raises(ValueError, match=r"expected 4 values per sample \(feat_dim\), got 3"):
        loss(nd.zeros((len(labels), 3)), nd.array(labels))
    with pytest.raises(ValueError, match=r"labels: expected shape \(9,\)"):
        loss(nd.array(features), nd.array(labels[:4]))


def test_centers_are_a_named_parameter_of_their_own():
    loss = CenterLoss(10, 2)
    params = loss.collect_params()
    assert list(params.keys()) == [loss.centers.name] and loss.centers.name.endswith("centers")
    assert loss.centers.shape == (10, 2)


def test_method_contract_and_gradient_bookkeeping():
    seed_everything()
    method = build_method(4, loss_weight=0.5)
    net_group, center_group = method.param_groups()
    assert net_group.name == "net" and center_group.name == "centers"
    assert center_group.optimizer_params == {"learning_rate": 0.5, "momentum": 0.0, "wd": 0.0}
    assert center_group.follows_schedule is False and net_group.follows_schedule is True
    assert list(center_group.params.keys()) == [method.center_loss.centers.name]
    assert method.center_loss.centers.name not in net_group.params.keys()
    assert method.defaults["lr"] == 0.001 and method.defaults["lr_factor"] == 0.8
    assert method.defaults["image_size"] == 28

    x, y = nd.random.normal(shape=(6, 3, 28, 28)), nd.array([0, 1, 1, 3, 3, 3])
    features, logits = method.net(x)
    assert features.shape == (6, 2) and logits.shape == (6, 4)
    with autograd.record():
        loss = method.training_loss(x, y, None, 0)
    loss.backward()
    assert loss.shape == (6,)
    # after trainer.step(B) divides by B, the centre gradient is upstream's size_average=True one,
    # not scaled by loss_weight (CL-2)
    centers = method.center_loss.centers.data().asnumpy()
    feats, labels = features.asnumpy(), y.asnumpy()
    expected = np.zeros_like(centers)
    for j in range(4):
        members = labels == j
        expected[j] = (centers[j] - feats[members]).sum(axis=0) / (1 + members.sum()) / len(labels)
    np.testing.assert_allclose(method.center_loss.centers.grad().asnumpy() / len(labels), expected,
                               rtol=1e-4, atol=1e-6)
    # the batch mean of the per-sample loss is CE + λ·L_c (size_average=True)
    ce = mx.gluon.loss.SoftmaxCrossEntropyLoss()(logits, y).mean().asscalar()
    center = ((feats - centers[labels.astype(int)]) ** 2).sum() / 2 / len(labels)
    assert float(loss.mean().asscalar()) == pytest.approx(ce + 0.5 * center, rel=1e-5)
    out = method.predict(x, 0)
    assert list(out) == ["classifier"] and out["classifier"].shape == (6, 4)


def test_two_devices_each_slice_gets_its_own_centre_gradient():
    seed_everything()
    devices = [mx.cpu(0), mx.cpu(1)]
    method = build_method(4, ctx=devices)
    x, y = nd.random.normal(shape=(6, 3, 28, 28)), nd.array([0, 1, 1, 3, 3, 2])
    slices = [(x[:3].as_in_context(devices[0]), y[:3].as_in_context(devices[0])),
              (x[3:].as_in_context(devices[1]), y[3:].as_in_context(devices[1]))]
    with autograd.record():
        losses = [method.training_loss(data, label, None, 0) for data, label in slices]
    autograd.backward(losses)
    centers = method.center_loss.centers.data().asnumpy()
    for (data, label), grad in zip(slices, method.center_loss.centers.list_grad()):
        assert grad.context == data.context
        feats, labels = method.net(data)[0].asnumpy(), label.asnumpy()
        expected = np.zeros_like(centers)
        for j in range(4):  # outside the runner (no begin_step): n_j over the slice's own labels
            members = labels == j
            expected[j] = (centers[j] - feats[members]).sum(axis=0) / (1 + members.sum())
        np.testing.assert_allclose(grad.asnumpy(), expected, rtol=1e-4, atol=1e-6)


def test_model_zoo_backbone_and_errors():
    seed_everything()
    method = build_method(3, backbone="resnet18_v1", image_size=32)
    assert method.defaults["image_size"] == 32 and method.defaults["mean"] == (0.485, 0.456, 0.406)
    method.net.hybridize()
    features, logits = method.net(nd.random.normal(shape=(2, 3, 32, 32)))
    assert features.shape == (2, 512) and logits.shape == (2, 3)
    assert build_method(3, backbone="resnet18_v1", feat_dim=8).center_loss.centers.shape == (3, 8)
    with pytest.raises(ValueError, match=r"^backbone: expected one of lenet_pp, resnet18_v1"):
        build_method(3, backbone="lenet")
    with pytest.raises(ValueError, match=r"^pretrained: the center-loss demo network"):
        build_method(3, pretrained=True)


@pytest.mark.slow
def test_short_training_on_fashion_mnist_lowers_the_loss(fashion_mnist_dir):
    seed_everything()
    method = build_method(4)  # the upstream demo network, 2-D features, 28x28 inputs
    mean, std = method.defaults["mean"][0], method.defaults["std"][0]
    data, labels = fashion_mnist_tensors(fashion_mnist_dir, size=28, mean=mean, std=std)
    method.net.hybridize()
    centers_before = method.center_loss.centers.data().asnumpy().copy()
    losses = train_steps(method, data, labels, steps=24, batch_size=16, lr=0.01)
    assert np.all(np.isfinite(losses))
    assert losses[-8:].mean() < 0.65 * losses[:4].mean(), losses
    assert not np.allclose(method.center_loss.centers.data().asnumpy(), centers_before)
