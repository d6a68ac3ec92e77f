"""fgvc_gluon.baseline: model-zoo classifier method, backbone validation, short real-image training.

The Fashion-MNIST training helpers (``fashion_mnist_tensors``, ``train_steps``) are in helpers.py.
"""
import numpy as np
import pytest
from mxnet import autograd, nd

from fgvc_gluon import baseline
from helpers import fashion_mnist_tensors, seed_everything, train_steps
from training_runtime.errors import UserError

# ------------------------------------------------------------ baseline tests


def test_backbone_names_and_unknown_name_error():
    assert "resnet50_v1" in baseline.BACKBONES and "resnet152_v1" in baseline.BACKBONES
    with pytest.raises(ValueError,
                       match=r"^backbone: expected one of .*resnet18_v1.* for baseline, got 'resnet51_v1'"):
        baseline.build_method(5, backbone="resnet51_v1")


def test_pretrained_without_weights_is_a_user_error(tmp_path, monkeypatch):
    # an empty model store and no network: the download fails, the user gets one clear line
    monkeypatch.setenv("MXNET_HOME", str(tmp_path))
    monkeypatch.setenv("MXNET_GLUON_REPO", "http://127.0.0.1:9/")
    with pytest.raises(UserError, match=r"--pretrained: could not load the model-zoo weights of resnet18_v1"):
        baseline.build_method(5, backbone="resnet18_v1", pretrained=True)


def test_method_contract_and_shapes():
    seed_everything()
    method = baseline.build_method(7, backbone="resnet18_v1", image_size=32)
    groups = method.param_groups()
    assert [g.name for g in groups] == ["backbone", "classifier"]
    assert groups[1].lr_mult == 10.0
    grouped = set(groups[0].params.keys()) | set(groups[1].params.keys())
    assert grouped == set(method.net.collect_params().keys())
    assert method.net.output.weight.shape[0] == 7
    x = nd.random.normal(shape=(3, 3, 32, 32))
    with autograd.record():
        loss = method.training_loss(x, nd.array([0, 3, 6]), None, 0)
    assert loss.shape == (3,)
    out = method.predict(x, 0)
    assert list(out) == ["classifier"] and out["classifier"].shape == (3, 7)
    for key in ("lr", "momentum", "wd", "batch_size", "epochs", "lr_steps", "lr_factor", "image_size",
                "resize", "train_crop", "crop_scale", "pad", "flip", "mean", "std"):
        assert key in method.defaults, key
    assert method.defaults["image_size"] == 32
    full = baseline.build_method(3, backbone="resnet18_v1").defaults
    # S3N's fetch_data: test images resized to 600x600 (aspect not kept), center crop 448
    assert full["image_size"] == 448 and full["resize"] == (600, 600)


def test_loss_is_s3n_label_smoothing_by_default_and_plain_ce_as_option():
    seed_everything()
    x, labels = nd.random.normal(shape=(1, 3, 32, 32)), nd.array([2])  # a batch of one works
    target = np.full(5, 0.15 / 4)
    target[2] = 0.85
    smoothed = baseline.build_method(5, backbone="resnet18_v1", image_size=32)
    log_probs = nd.log_softmax(smoothed.net(x), axis=1).asnumpy()[0]
    np.testing.assert_allclose(smoothed.training_loss(x, labels, None, 0).asnumpy(),
                               [-(log_probs * target).sum()], rtol=1e-5)
    plain = baseline.build_method(5, backbone="resnet18_v1", image_size=32, smooth_ratio=None)
    log_probs = nd.log_softmax(plain.net(x), axis=1).asnumpy()[0]
    np.testing.assert_allclose(plain.training_loss(x, labels, None, 0).asnumpy(), [-log_probs[2]], rtol=1e-5)


def test_hybridized_forward_matches_imperative():
    seed_everything()
    method = baseline.build_method(4, backbone="resnet18_v1", image_size=32)
    x = nd.random.normal(shape=(2, 3, 32, 32))
    imperative = method.predict(x, 0)["classifier"].asnumpy()
    method.net.hybridize()
    hybrid = method.predict(x, 0)["classifier"].asnumpy()
    np.testing.assert_allclose(hybrid, imperative, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_short_training_on_fashion_mnist_lowers_the_loss(fashion_mnist_dir):
    seed_everything()
    data, labels = fashion_mnist_tensors(fashion_mnist_dir)
    method = baseline.build_method(4, backbone="resnet18_v1", image_size=32)
    method.net.hybridize()
    losses = train_steps(method, data, labels, steps=32, batch_size=32, lr=method.defaults["lr"])
    assert np.all(np.isfinite(losses))
    # label smoothing 0.85 over 4 classes: the loss cannot go below the target's entropy
    target = np.array([0.85] + [0.05] * 3)
    floor = -(target * np.log(target)).sum()
    assert losses[-8:].mean() - floor < 0.5 * (losses[:4].mean() - floor), losses
