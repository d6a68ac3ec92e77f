"""imbalanced_attr.backbones / imbalanced_attr.model: spatial softmax parity with
the original (golden attention_* cases, quirk IL-14), head structure and
initialisation, tap shapes, hybridisation, and a short training run on real
images."""
import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon
from mxnet.gluon import HybridBlock

from conftest import assert_golden, golden_cases, golden_tolerance, load_golden
from helpers import central_difference
from imbalanced_attr import fashion_attributes
from imbalanced_attr.backbones import BACKBONES, get_backbone, tap_shapes
from imbalanced_attr.model import (AttributeModel, StageHeads, aggregate_prediction,
                                   spatial_softmax)
from training_runtime import fashion_mnist
from training_runtime.errors import UserError

ATTENTION_CASES = golden_cases("attention_")
NUM_CLASSES = 14


def _numpy_spatial_softmax(x):
    """Reference in float64: softmax over each map's H·W positions."""
    flat = x.reshape(x.shape[0], x.shape[1], -1).astype(np.float64)
    e = np.exp(flat - flat.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).reshape(x.shape)


class _SoftmaxBlock(HybridBlock):
    def hybrid_forward(self, F, x):
        return spatial_softmax(x, F)


def test_attention_golden_cases_exist():
    assert len(ATTENTION_CASES) >= 3, ATTENTION_CASES


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_spatial_softmax_matches_original(case):
    data = load_golden(case)
    expected = data["spatial_softmax"]
    rtol, atol = golden_tolerance(case, "spatial_softmax")
    x = data["output_att"]

    from_numpy = spatial_softmax(x)
    assert isinstance(from_numpy, np.ndarray) and from_numpy.dtype == np.float32
    assert_golden(from_numpy, expected, rtol, atol, case + " (numpy input)")

    from_nd = spatial_softmax(mx.nd.array(x))
    assert isinstance(from_nd, mx.nd.NDArray)
    assert_golden(from_nd, expected, rtol, atol, case + " (NDArray input)")

    block = _SoftmaxBlock()
    block.hybridize()
    assert_golden(block(mx.nd.array(x)), expected, rtol, atol, case + " (hybridized)")


def test_spatial_softmax_non_square_and_rejects_bad_rank():
    x = np.random.RandomState(0).randn(2, 3, 5, 7).astype(np.float32) * 3
    out = spatial_softmax(x)
    np.testing.assert_allclose(out, _numpy_spatial_softmax(x), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out.sum(axis=(2, 3)), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="spatial_softmax: x: expected an N×C×H×W array"):
        spatial_softmax(np.zeros((3, 4, 5), np.float32))


def test_spatial_softmax_gradient_matches_finite_differences():
    rng = np.random.RandomState(1)
    x = rng.randn(2, 2, 3, 4)
    weights = rng.randn(2, 2, 3, 4)

    def objective(values):
        return float((_numpy_spatial_softmax(values) * weights).sum())

    x_nd = mx.nd.array(x, dtype="float64")
    x_nd.attach_grad()
    with autograd.record():
        loss = (spatial_softmax(x_nd) * mx.nd.array(weights, dtype="float64")).sum()
    loss.backward()
    numeric = central_difference(objective, x, step=1e-6)
    np.testing.assert_allclose(x_nd.grad.asnumpy(), numeric, rtol=1e-6, atol=1e-8)


def test_aggregate_prediction_is_sigmoid_of_quarter_sum():
    rng = np.random.RandomState(2)
    logits, s2, s3, s4 = (rng.randn(4, 6).astype(np.float32) * 4 for _ in range(4))
    expected = 1.0 / (1.0 + np.exp(-0.25 * (s2.astype(np.float64) + s3 + s4 + logits)))
    from_nd = aggregate_prediction(mx.nd.array(logits), [mx.nd.array(s) for s in (s2, s3, s4)])
    np.testing.assert_allclose(from_nd.asnumpy(), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(aggregate_prediction(logits, [s2, s3, s4]), expected,
                               rtol=1e-6, atol=1e-7)


def test_stage_heads_compose_fconv_fatt_fsr_on_non_square_tap():
    num_classes, tap_shape = 3, (8, 4, 5)
    heads = StageHeads(num_classes, tap_shape)
    heads.initialize(mx.init.Xavier(rnd_type="gaussian", factor_type="in", magnitude=2))
    shapes = {name[len(heads.prefix):]: p.shape for name, p in heads.collect_params().items()}
    assert shapes["fconv_conv0_weight"] == (3, 8, 1, 1)
    assert shapes["fatt_conv0_weight"] == (512, 8, 1, 1)
    assert shapes["fatt_conv1_weight"] == (512, 512, 3, 3)
    assert shapes["fatt_conv2_weight"] == (3, 512, 1, 1)
    assert shapes["fsr_conv0_weight"] == (256, 3, 1, 1)
    assert shapes["fsr_conv1_weight"] == (512, 256, 1, 1)
    assert shapes["fsr_conv2_weight"] == (1024, 512, 4, 5)  # kernel = the tap's H×W
    assert shapes["fsr_dense0_weight"] == (3, 1024)

    tap = mx.nd.random.normal(shape=(2,) + tap_shape)
    confidence = heads.fconv(tap).asnumpy()
    assert confidence.min() > 0 and confidence.max() < 1  # sigmoid output
    attention = _numpy_spatial_softmax(heads.fatt(tap).asnumpy())
    expected = heads.fsr(mx.nd.array(attention * confidence)).asnumpy()
    np.testing.assert_allclose(heads(tap).asnumpy(), expected, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def resnet101_model():
    """The default full-size model (ResNet-101, 224×224), built once."""
    mx.random.seed(3)
    return AttributeModel(NUM_CLASSES)


@pytest.mark.slow
def test_resnet101_model_shapes_at_224(resnet101_model):
    net = resnet101_model
    x = mx.nd.random.uniform(-1, 1, shape=(1, 3, 224, 224))
    tap2, tap3, tap4, backbone_logits = net.backbone(x)
    assert tap2.shape == (1, 1024, 14, 14)
    assert tap3.shape == (1, 1024, 14, 14)
    assert tap4.shape == (1, 2048, 7, 7)
    assert backbone_logits.shape == (1, NUM_CLASSES)
    logits, scores = net(x)
    assert logits.shape == (1, NUM_CLASSES)
    assert [s.shape for s in scores] == [(1, NUM_CLASSES)] * 3
    np.testing.assert_array_equal(logits.asnumpy(), backbone_logits.asnumpy())
    kernels = [net.blocks()["fsr_stage_%d" % n][6].weight.shape[2:] for n in (2, 3, 4)]
    assert kernels == [(14, 14), (14, 14), (7, 7)]
    prediction = aggregate_prediction(logits, scores).asnumpy()
    # (an untrained deep net in inference mode saturates: 0 and 1 are possible)
    assert prediction.shape == (1, NUM_CLASSES) and np.all((prediction >= 0) & (prediction <= 1))


def test_resnet101_model_blocks_and_initialisation(resnet101_model):
    net = resnet101_model
    blocks = net.blocks()
    assert list(blocks) == ["backbone_resnet"] + ["%s_stage_%d" % (head, n) for n in (2, 3, 4)
                                                   for head in ("fconv", "fatt", "fsr")]
    assert blocks["backbone_resnet"] is net.backbone
    # every parameter belongs to exactly one block (one Trainer per block)
    per_block = [set(b.collect_params().keys()) for b in blocks.values()]
    assert sum(len(p) for p in per_block) == len(set().union(*per_block))
    assert set().union(*per_block) == set(net.collect_params().keys())
    # Xavier(gaussian, "in", 2): std = sqrt(2 / fan_in), zero biases
    big_conv = blocks["fsr_stage_2"][6]
    weight = big_conv.weight.data()[:64].asnumpy()  # 6.4M samples: std within ~0.1%
    assert abs(weight.std() / np.sqrt(2.0 / (512 * 14 * 14)) - 1) < 0.01
    assert abs(weight.mean()) < 1e-4
    assert not big_conv.bias.data().asnumpy().any()
    output = net.backbone.output.weight.data().asnumpy()
    assert output.shape == (NUM_CLASSES, 2048)
    assert abs(output.std() / np.sqrt(2.0 / 2048) - 1) < 0.05


@pytest.mark.parametrize("name, taps", [
    ("resnet18_v1", [(256, 4, 4), (256, 4, 4), (512, 2, 2)]),
    ("resnet34_v1", [(256, 4, 4), (256, 4, 4), (512, 2, 2)]),
    ("resnet50_v1", [(1024, 4, 4), (1024, 4, 4), (2048, 2, 2)]),
    ("densenet201", [(896, 4, 4), (1408, 2, 2), (1920, 2, 2)]),
])
def test_small_input_tap_shapes(name, taps):
    backbone = get_backbone(name, 5)
    assert tap_shapes(backbone, 64) == taps
    out = backbone(mx.nd.random.uniform(shape=(2, 3, 64, 64)))
    assert [o.shape for o in out] == [(2,) + t for t in taps] + [(2, 5)]


@pytest.mark.parametrize("name", ["resnet18_v1", "densenet201"])
def test_hybridized_model_equals_imperative(name):
    mx.random.seed(4)
    net = AttributeModel(5, backbone=name, input_size=32)
    x = mx.nd.random.uniform(-1, 1, shape=(2, 3, 32, 32))
    logits, scores = net(x)
    assert logits.shape == (2, 5) and [s.shape for s in scores] == [(2, 5)] * 3
    net.hybridize()
    hybrid_logits, hybrid_scores = net(x)
    assert isinstance(hybrid_scores, list) and len(hybrid_scores) == 3
    for imperative, hybrid in zip([logits] + scores, [hybrid_logits] + hybrid_scores):
        np.testing.assert_allclose(hybrid.asnumpy(), imperative.asnumpy(), rtol=1e-5, atol=1e-6)
    # the stage scores really differ from each other and from the logits
    assert not np.allclose(scores[0].asnumpy(), scores[1].asnumpy())


def test_bad_arguments_raise_value_and_type_errors():
    with pytest.raises(ValueError, match="backbone: unknown backbone 'vgg16', expected one of "
                                         + ", ".join(BACKBONES)):
        get_backbone("vgg16", 3)
    with pytest.raises(ValueError, match="num_classes: expected a positive integer"):
        AttributeModel(0, backbone="resnet18_v1", input_size=64)
    with pytest.raises(TypeError, match="input_size: expected a positive integer"):
        AttributeModel(3, backbone="resnet18_v1", input_size="64")


def test_unavailable_pretrained_weights_raise_a_user_error(monkeypatch):
    from mxnet.gluon.model_zoo import model_store

    def offline(name, root=None):
        raise OSError("Failed to resolve 'apache-mxnet.s3-accelerate.dualstack.amazonaws.com'")

    monkeypatch.setattr(model_store, "get_model_file", offline)
    with pytest.raises(UserError, match=r"--pretrained: could not load the model-zoo weights "
                                        r"of resnet18_v1 \(OSError: Failed to resolve"):
        get_backbone("resnet18_v1", 3, pretrained=True)


@pytest.mark.slow
def test_training_steps_lower_the_loss_on_fashion_mnist(fashion_mnist_dir):
    """One SGD Trainer per block as in the original; plain sigmoid BCE on all branches."""
    mx.random.seed(5)
    images, classes = fashion_mnist.load_split("train", fashion_mnist_dir)
    images, classes = images[:16], classes[:16]
    labels = mx.nd.array((fashion_attributes.attribute_labels(classes) > 0).astype(np.float32))
    # 28×28 grey → 3×32×32, scaled to about [-1, 1]
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2))).astype(np.float32) / 127.5 - 1
    data = mx.nd.array(np.repeat(padded[:, None], 3, axis=1))

    net = AttributeModel(labels.shape[1], backbone="resnet18_v1", input_size=32)
    net.hybridize()
    trainers = [gluon.Trainer(block.collect_params(), "sgd",
                              {"learning_rate": 0.05, "momentum": 0.9, "wd": 5e-4})
                for block in net.blocks().values()]
    bce = gluon.loss.SigmoidBinaryCrossEntropyLoss()

    def step():
        with autograd.record():
            logits, scores = net(data)
            loss = bce(logits, labels) + sum(bce(s, labels) for s in scores)
        loss.backward()
        for trainer in trainers:
            trainer.step(data.shape[0])
        return float(loss.mean().asscalar())

    losses = [step() for _ in range(15)]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.5 * losses[0], losses
