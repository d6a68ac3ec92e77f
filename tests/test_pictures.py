"""Pictures of what the models learned: --explain, RUN/pictures after every evaluation.

Runs in process (app.main) on tiny real demo data (Fashion-MNIST): a few
steps each, resnet18 at the demo sizes. The maps drawn are checked against
what the networks compute.
"""
import os

import mxnet as mx
import numpy as np
import pytest
from PIL import Image

from helpers import write_corrupt_png
from training_runtime import app
from training_runtime.errors import UserError
from training_runtime.fashion_mnist import load_split

pytestmark = pytest.mark.slow  # end-to-end runs: not in the fast loop (-m "not slow")

TINY = ["--train-limit", "32", "--val-limit", "16", "--test-limit", "16", "--batch-size", "16",
        "--epochs", "1", "--max-steps", "2", "--seed", "1"]


def attr_family():
    from imbalanced_attr.family import FAMILY
    return FAMILY


def fgvc_family():
    from fgvc_gluon.family import FAMILY
    return FAMILY


def assert_real_png(path):
    """A decodable PNG that is not one flat colour."""
    assert os.path.isfile(path), path
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 5 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50


@pytest.fixture(scope="module")
def attr_run(tmp_path_factory, fashion_mnist_dir):
    run = str(tmp_path_factory.mktemp("attr") / "run")
    app.main(attr_family(), TINY + ["--save-dir", run])
    return run


def test_training_writes_the_attention_figure(attr_run):
    assert_real_png(os.path.join(attr_run, "pictures", "attention_epoch0.png"))


def _demo_images(directory, count=3):
    images, _ = load_split("test")
    paths = []
    for i in range(count):
        paths.append(str(directory / ("item%d.png" % i)))
        Image.fromarray(images[i]).convert("RGB").save(paths[-1])
    return paths


def test_explain_writes_one_png_per_image_and_names_bad_input(attr_run, tmp_path, capsys):
    paths = _demo_images(tmp_path)
    bad = write_corrupt_png(tmp_path / "broken.png")
    out = str(tmp_path / "explained")
    with pytest.raises(UserError) as err:  # before the model is loaded
        app.main(attr_family(), ["--explain", paths[0], bad, "--weights", attr_run, "--output", out])
    assert bad in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError) as err:
        app.main(attr_family(), ["--explain", paths[0], "--weights", attr_run, "--output", out,
                                 "--attributes", "footwear,wings"])
    assert str(err.value).startswith("--attributes: unknown attribute 'wings'")
    assert not os.path.exists(out)
    # with --skip-bad-images the readable ones are explained, with the named attributes
    written = app.main(attr_family(), ["--explain"] + paths + [bad, "--weights", attr_run, "--output", out,
                                                              "--attributes", "carried,legwear",
                                                              "--skip-bad-images"])
    assert sorted(os.listdir(out)) == ["item%d_attention.png" % i for i in range(3)]
    assert len(written) == 3
    for path in written:
        assert_real_png(path)
    printed = capsys.readouterr().out
    assert "skipped unreadable image %s" % bad in printed
    assert printed.count("carried") >= 3 and printed.count("legwear") >= 3


def test_explain_refuses_a_file_as_output(attr_run, tmp_path):
    paths = _demo_images(tmp_path, 1)
    target = tmp_path / "file.png"
    target.write_bytes(b"x")
    with pytest.raises(UserError) as err:
        app.main(attr_family(), ["--explain", paths[0], "--weights", attr_run, "--output", str(target)])
    assert str(err.value) == "--output: %s is a file; expected a directory for --explain" % target


def test_attention_maps_are_what_the_model_computes():
    from imbalanced_attr.explain import attention_of
    from imbalanced_attr.model import AttributeModel, aggregate_prediction
    mx.random.seed(0)
    net = AttributeModel(4, backbone="resnet18_v1", input_size=64)
    net.hybridize()
    x = mx.nd.random.normal(shape=(2, 3, 64, 64))
    logits, scores = net(x)
    logits2, scores2, maps = net.attention_maps(x)
    np.testing.assert_allclose(logits2.asnumpy(), logits.asnumpy(), rtol=1e-5, atol=1e-6)
    for mine, model in zip(scores2, scores):
        np.testing.assert_allclose(mine.asnumpy(), model.asnumpy(), rtol=1e-4, atol=1e-5)
    for stage in maps:
        softmax = stage["softmax"].asnumpy()
        assert softmax.shape[:2] == (2, 4) and softmax.shape[2] > 1
        np.testing.assert_allclose(softmax.sum(axis=(2, 3)), 1.0, rtol=1e-5)
        confidence = stage["confidence"].asnumpy()
        assert np.all((confidence >= 0) & (confidence <= 1))
        np.testing.assert_allclose(stage["attention"].asnumpy(), softmax * confidence, rtol=1e-6)
    probs, drawn = attention_of(net, x)
    np.testing.assert_allclose(probs, aggregate_prediction(logits, scores).asnumpy(), rtol=1e-5)
    for stage, overlaid in zip(maps, drawn):
        np.testing.assert_array_equal(overlaid, stage["attention"].asnumpy())


def test_display_images_invert_both_normalisations():
    from imbalanced_attr.data import make_transform
    from imbalanced_attr.explain import display_images
    image = mx.nd.array(np.tile(np.array([10, 128, 250], np.uint8), (40, 40, 1)), dtype="uint8")
    for normalize in ("original", "imagenet"):
        data = make_transform(False, input_size=32, normalize=normalize)(image)
        shown = display_images(data.expand_dims(0).asnumpy(), normalize)[0]
        assert shown.shape == (32, 32, 3)
        assert np.abs(shown.astype(int) - np.array([10, 128, 250])).max() <= 1


# ---------------------------------------------------------------- the fine-grained methods

def test_a_tiny_run_writes_the_method_picture(tmp_path, fashion_mnist_dir):
    """The runtime's hook end to end for the fine-grained family (center loss: the cheapest)."""
    run = str(tmp_path / "run")
    app.main(fgvc_family(), ["--method", "centerloss", "--save-dir", run] + TINY)
    assert_real_png(os.path.join(run, "pictures", "centerloss_epoch0.png"))


@pytest.mark.parametrize("method,options,picture", [
    ("s3n", dict(backbone="resnet18_v1"), "s3n_epoch3.png"),
    ("mcloss", dict(backbone="resnet18_mc", width=0.25), "mcloss_epoch3.png"),
    ("baseline", dict(backbone="resnet18_v1"), "cam_epoch3.png"),
    ("centerloss", dict(backbone="lenet_pp", feat_dim=3), "centerloss_epoch3.png")])
def test_each_method_draws_its_picture(method, options, picture, tmp_path, fashion_mnist_dir):
    """task.pictures on real demo images (what the runtime passes: device slices)."""
    from mxnet import gluon
    from training_runtime.loop import evaluation_batches
    size = 28 if method == "centerloss" else 64
    task = _task(method, size, **options)
    images, labels = load_split("test")
    keep = np.flatnonzero(labels < 4)[:task.picture_images if method != "centerloss" else 40]
    items = [(task.transform(False)(mx.nd.array(np.repeat(images[i][:, :, None], 3, axis=2), dtype="uint8")),
              int(labels[i])) for i in keep]
    batches = evaluation_batches(gluon.data.SimpleDataset(items), [mx.cpu()], 4)
    written = task.pictures(batches, str(tmp_path), 3)
    assert written == [str(tmp_path / picture)]
    assert_real_png(written[0])


def test_the_runtime_gives_the_hook_the_same_images_and_survives_its_failure(tmp_path, capsys):
    from test_toy_method import ToyTask, toy_family
    calls = []

    class Pictured(ToyTask):
        picture_images = 5

        def pictures(self, batches, directory, epoch):
            data = np.concatenate([d.asnumpy() for d, _ in batches])
            calls.append((epoch, directory, data))
            if epoch == 1:
                raise RuntimeError("no canvas")
            return []

    family = toy_family()
    family.methods.get("toy").build = Pictured
    run = str(tmp_path / "run")
    report = app.main(family, ["--save-dir", run, "--epochs", "3"])
    assert "top1" in report and [c[0] for c in calls] == [0, 1, 2]
    assert all(c[1] == os.path.join(run, "pictures") and os.path.isdir(c[1]) for c in calls)
    assert calls[0][2].shape == (5, 3, 8, 8)
    np.testing.assert_array_equal(calls[0][2], calls[2][2])  # the same first images every time
    printed = capsys.readouterr().out
    assert "warning: the pictures of epoch 1 were not written (RuntimeError: no canvas)" in printed
    assert "epoch 2:" in printed


def _task(method, image_size, **options):
    from fgvc_gluon.registry import METHODS
    mx.random.seed(0)
    np.random.seed(0)
    entry = METHODS.get(method)
    task = entry.build_method(4, image_size=image_size, **options)
    task.class_names = ("a", "b", "c", "d")
    return task


def test_the_methods_maps_are_what_the_networks_compute():
    from fgvc_gluon import pictures
    from fgvc_gluon.s3n import evaluation_mode
    x = mx.nd.random.normal(shape=(2, 3, 64, 64))
    # baseline: the CAM averaged over positions is the classifier's logit (linear head)
    task = _task("baseline", 64, smooth_ratio=None)
    cams, logits = pictures.class_activation_maps(task.net, x)
    assert cams.shape == (2, 4, 2, 2)
    np.testing.assert_allclose(cams.mean(axis=(2, 3)), task.predict(x, 0)["classifier"].asnumpy(),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits, task.predict(x, 0)["classifier"].asnumpy(), rtol=1e-4, atol=1e-5)
    # MC-Loss: the class groups are the network's feature channels k*xi .. k*xi+xi-1
    task = _task("mcloss", 64, backbone="resnet18_mc", width=0.25, xi=3)
    features, logits = pictures.mc_channel_maps(task.net, x)
    assert features.shape[1] == 12
    np.testing.assert_array_equal(pictures.class_group(features, 2, 3), features[:, 6:9])
    np.testing.assert_allclose(logits, task.predict(x, 0)["classifier"].asnumpy(), rtol=1e-5, atol=1e-6)
    # S3N: the sampler's raw logits are the network's raw branch (deterministic mode 2)
    task = _task("s3n", 64, backbone="resnet18_v1")
    sampled = pictures.s3n_samples(task.net, x, 2)
    assert sampled["scores"].shape == (2, 31, 31) and sampled["zoom"].shape == (2, 3, 64, 64)
    assert sampled["scores"].min() == 0 and sampled["scores"].max() == 1
    assert sampled["to_zoom"].sum() >= 1
    raw = task.net(x, 2)[1].asnumpy()
    np.testing.assert_allclose(sampled["logits"], raw, rtol=1e-4, atol=1e-5)
    assert evaluation_mode(0) == 1
    # center loss: features are the network's, PCA keeps the two main directions
    task = _task("centerloss", 28, backbone="lenet_pp", feat_dim=5)
    x = mx.nd.random.normal(shape=(6, 3, 28, 28))
    features, centers = pictures.center_features(task, [x[:3], x[3:]])
    np.testing.assert_allclose(features, task.net(x)[0].asnumpy(), rtol=1e-5, atol=1e-6)
    assert centers.shape == (4, 5)
    mean, components = pictures.pca_projection(features)
    np.testing.assert_allclose(components @ components.T, np.eye(2), atol=1e-5)
    projected = (features - mean) @ components.T
    assert projected.var(axis=0)[0] >= projected.var(axis=0)[1]
