"""No method's numbers depend on how the global batch is split over devices.

For centerloss (class counts n_j of the whole batch), mcloss (one channel mask per
step) and s3n (mode 1's per-sample uniforms): the task is built twice with the same
weights, BatchNorm frozen (running statistics: a sample's output then does not depend
on its slice), and trained for 2 steps of a global batch of 8 through
``training_runtime.loop.Runner.train_step`` (which calls ``begin_step`` with the
step's StepBatch) on [cpu(0)] and on [cpu(0), cpu(1)] (4 + 4 samples); the parameters
must agree to float32 rounding (measured worst |difference|: 1e-6 centerloss, 2e-5
mcloss (on a weight above 1.6), 2e-7 s3n; before the fix 0.17, 85 and 0.09). For s3n
also the outputs of an evaluation in mode 1 (epoch <= 20), over 10 images in batches of
8 + 2 (7e-7; before 0.45). And --amp's loss scale leaves the centre-loss update
unchanged (LossScaling with a forced scale of 2**10: equal; before 0.1 apart).
"""
import dataclasses
import tempfile

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon, nd
from mxnet.gluon import nn

import fgvc_gluon.family  # noqa: F401  (registers every method)
from fgvc_gluon import s3n
from fgvc_gluon.center_loss import CenterLoss
from fgvc_gluon.registry import METHODS
from training_runtime import config, loop
from training_runtime.config import ModelConfig
from training_runtime.schedule import make_schedule

LABELS = ("first", "second", "third")
BATCH, STEPS, SEED = 8, 2, 5
ONE, TWO = [mx.cpu(0)], [mx.cpu(0), mx.cpu(1)]
RTOL, ATOL = 1e-5, 1e-6  # float32 rounding: the two devices' gradients are summed in another order


def freeze_every_batchnorm(block):
    """loop.freeze_batchnorm, and also BatchNorm subclasses (MC-Loss's BatchNorm1D)."""
    loop.freeze_batchnorm(block)
    for child in block._children.values():
        if isinstance(child, nn.BatchNorm):
            child._kwargs["use_global_stats"] = True
        freeze_every_batchnorm(child)


def registry_task(method, ctx):
    """The registered method at its demo backbone and size, 3 classes, on ``ctx``."""
    entry = METHODS.get(method)
    options = {knob.name: entry.demo.get(knob.name, knob.default) for knob in entry.knobs}
    model = ModelConfig(method=method, backbone=entry.demo["backbone"], image_size=entry.demo["image_size"],
                        pretrained=False, options=options)
    return entry.build(model, LABELS, ctx), entry.demo["image_size"]


def tiny_s3n(ctx):
    """S3N on a two-conv backbone (8×8 maps at 32 px: several peaks per decide map)."""
    features = nn.HybridSequential(prefix="tiny_")
    with features.name_scope():
        features.add(nn.Conv2D(8, 3, strides=2, padding=1), nn.BatchNorm(), nn.Activation("relu"),
                     nn.Conv2D(16, 3, strides=2, padding=1), nn.BatchNorm(), nn.Activation("relu"))
    net = s3n.S3N(len(LABELS), backbone=features, num_features=16, image_size=32, ctx=ctx)
    net.initialize(mx.init.Xavier(rnd_type="gaussian", factor_type="in", magnitude=2), ctx=ctx)
    return s3n.S3NMethod(net, image_size=32), 32


def prepared(build, ctx, size, reference=None):
    """The task frozen, hybridized and initialised; with ``reference``, its weights."""
    mx.random.seed(0)
    np.random.seed(0)
    task, _ = build(ctx)
    for block in task.blocks().values():
        freeze_every_batchnorm(block)
    task.hybridize()
    task.predict(nd.zeros((1, 3, size, size)), 30)  # finishes deferred initialisation
    if reference is not None:
        for name, block in task.blocks().items():
            source = reference.blocks()[name]._collect_params_with_prefix()
            for key, param in block._collect_params_with_prefix().items():
                param.set_data(source[key].data())
    return task


def runner_for(task, ctx, tmp_path, amp=False):
    run = config.RunConfig(family="fgvc")
    run.optim = config.OptimConfig(lr=0.05, momentum=0.9, wd=5e-4, epochs=40, schedule="step")
    run.runtime = dataclasses.replace(config.RuntimeConfig(batch_size=BATCH, seed=SEED, figures="none"),
                                      amp=amp)
    dummy = gluon.data.ArrayDataset(nd.zeros((BATCH, 1)), nd.zeros((BATCH,)))
    save_dir = tempfile.mkdtemp(dir=str(tmp_path))
    return loop.Runner(task, run, ctx, make_schedule(run.optim), save_dir, dummy, dummy,
                       {"script": "test"}, log=lambda *a: None)


def batches(size):
    """STEPS global batches (data, int64 labels, int64 dataset indices); the classes are
    unevenly spread over the two halves (per-slice class counts differ)."""
    rng = np.random.RandomState(1)
    labels = [[0, 0, 0, 1, 1, 2, 2, 2], [1, 2, 2, 2, 0, 0, 1, 0]]
    return [(nd.array(rng.normal(size=(BATCH, 3, size, size)).astype(np.float32)),
             nd.array(labels[s], dtype="int64"), nd.array(np.arange(BATCH) + 37 * s, dtype="int64"))
            for s in range(STEPS)]


def train(task, ctx, data, epoch, tmp_path, loss_scale=None):
    runner = runner_for(task, ctx, tmp_path, amp=loss_scale is not None)
    if loss_scale is not None:
        runner.loss_scaling.loss_scale = runner.loss_scaling._next = loss_scale
    runner.epoch = epoch
    for step, batch in enumerate(data):
        loop.reseed(SEED, epoch, step)  # what Runner._run does before each step
        runner.train_step(batch, BATCH)
        runner.step += 1
        runner.batch_in_epoch += 1
    return snapshot(task)


def snapshot(task):
    """Structural name -> value (first device) of every parameter of ``task.blocks()``."""
    return {"%s/%s" % (name, key): param.data(mx.cpu(0)).asnumpy()
            for name, block in task.blocks().items()
            for key, param in block._collect_params_with_prefix().items()}


def worst(a, b):
    """The largest |a - b| over every parameter."""
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def worst_relative(a, b):
    """The largest |a - b| / (|a| + 1e-3) over every parameter."""
    return max(float((np.abs(a[k] - b[k]) / (np.abs(a[k]) + 1e-3)).max()) for k in a)


def assert_same(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=RTOL, atol=ATOL, err_msg=key)


BUILDS = {"centerloss": lambda ctx: registry_task("centerloss", ctx),
          "mcloss": lambda ctx: registry_task("mcloss", ctx),
          "s3n": tiny_s3n}
SIZES = {"centerloss": 28, "mcloss": 32, "s3n": 32}
TRAIN_EPOCH = {"centerloss": 0, "mcloss": 0, "s3n": 21}  # s3n trains in mode 1 after epoch 20


@pytest.mark.parametrize("method", sorted(BUILDS))
def test_two_steps_on_one_or_two_devices_give_the_same_parameters(method, tmp_path):
    build, size = BUILDS[method], SIZES[method]
    one = prepared(build, ONE, size)
    two = prepared(build, TWO, size, reference=one)
    before = snapshot(one)
    data = batches(size)
    after_one = train(one, ONE, data, TRAIN_EPOCH[method], tmp_path)
    after_two = train(two, TWO, data, TRAIN_EPOCH[method], tmp_path)
    assert worst(before, after_one) > 1e-4  # the steps changed the weights
    print("%s: worst |one - two| = %.3g (relative %.3g)"
          % (method, worst(after_one, after_two), worst_relative(after_one, after_two)))
    assert_same(after_one, after_two)


def evaluation_outputs(task, ctx, images, labels, epoch):
    """The concat logits of ``loop.evaluate`` (batches of 8, split over ``ctx``), in order."""
    run = config.RunConfig(family="fgvc")
    run.runtime = config.RuntimeConfig(batch_size=BATCH, seed=SEED)
    outputs, predict = [], task.predict

    def recording(data, at):
        result = predict(data, at)
        outputs.append(result["concat"].asnumpy())
        return result
    task.predict = recording
    try:
        loop.evaluate(task, gluon.data.ArrayDataset(images, labels), ctx, run, epoch)
    finally:
        del task.predict
    return np.concatenate(outputs)


def test_s3n_mode1_evaluation_is_the_same_on_one_or_two_devices():
    one = prepared(tiny_s3n, ONE, 32)
    two = prepared(tiny_s3n, TWO, 32, reference=one)
    rng = np.random.RandomState(2)
    images = nd.array(rng.normal(size=(10, 3, 32, 32)).astype(np.float32))
    labels = nd.array(rng.randint(0, 3, size=10), dtype="int64")
    assert s3n.evaluation_mode(0) == s3n.evaluation_mode(1) == 1
    first = evaluation_outputs(one, ONE, images, labels, 0)
    assert first.shape == (10, 3)
    # mode 1 is random here: another evaluation (epoch 1 reseeds otherwise) decides otherwise
    assert np.abs(evaluation_outputs(one, ONE, images, labels, 1) - first).max() > 1e-4
    np.testing.assert_array_equal(evaluation_outputs(one, ONE, images, labels, 0), first)
    split = evaluation_outputs(two, TWO, images, labels, 0)
    print("s3n evaluation: worst |one - two| = %.3g" % np.abs(first - split).max())
    np.testing.assert_allclose(split, first, rtol=RTOL, atol=ATOL)


def test_s3n_uniforms_are_keyed_by_sample():
    rows = s3n.keyed_uniforms(9, [4, 7, 11])
    assert rows.shape == (3, 961) and rows.dtype == np.float32
    assert 0.0 <= rows.min() and rows.max() < 1.0
    np.testing.assert_array_equal(s3n.keyed_uniforms(9, [11, 4])[0], rows[2])  # any batch, any order
    assert not np.array_equal(s3n.keyed_uniforms(10, [4])[0], rows[0])
    assert not np.array_equal(s3n.keyed_uniforms(9, [4], stream=1)[0], rows[0])
    many = s3n.keyed_uniforms(9, np.arange(200))  # U(0, 1): mean 1/2, variance 1/12, no repeats
    assert abs(many.mean() - 0.5) < 0.005 and abs(many.var() - 1.0 / 12) < 0.002
    assert len(np.unique(many)) > 0.99 * many.size
    np.testing.assert_array_equal(many[[4, 11]], rows[[0, 2]])


def test_center_loss_block_takes_the_batch_counts_and_a_gradient_scale():
    """CenterLoss on two slices of one batch with the batch's counts: the centres' gradients
    sum to the closed form (c_j − x_i summed over the batch, / (1 + n_j) of the batch);
    grad_scale multiplies them and leaves the value and the feature gradient alone."""
    rng = np.random.RandomState(4)
    features, centers = rng.normal(size=(8, 3)), rng.normal(size=(3, 3))
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    counts = np.bincount(labels, minlength=3).astype(np.float32)
    loss = CenterLoss(3, 3, size_average=False)
    loss.initialize()
    loss.centers.set_data(nd.array(centers))
    expected = np.zeros_like(centers)
    for j in range(3):
        expected[j] = (centers[j] - features[labels == j]).sum(axis=0) / (1 + counts[j])
    results = {}
    for scale in (1.0, 8.0):
        x = nd.array(features)
        x.attach_grad()
        with autograd.record():
            parts = [loss.per_sample(x[a:b], nd.array(labels[a:b]), counts, scale) for a, b in ((0, 4), (4, 8))]
            value = nd.concat(*parts, dim=0)
        value.backward()
        results[scale] = value.asnumpy(), x.grad.asnumpy(), loss.centers.grad().asnumpy().copy()
    value, feature_grad, centre_grad = results[1.0]
    np.testing.assert_allclose(value, ((features - centers[labels]) ** 2).sum(axis=1) / 2, rtol=1e-5)
    np.testing.assert_allclose(feature_grad, features - centers[labels], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(centre_grad, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(results[8.0][0], value)
    np.testing.assert_array_equal(results[8.0][1], feature_grad)
    np.testing.assert_allclose(results[8.0][2], 8.0 * expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"^CenterLoss counts: expected shape \(3,\)"):
        loss(nd.array(features), nd.array(labels), counts[:2])


def test_centerloss_update_does_not_depend_on_the_loss_scale(tmp_path):
    """--amp: the trainers divide by the loss scale; the centres' MakeLoss gradient ignores
    the incoming gradient, so it is multiplied by StepBatch.loss_scale."""
    plain = prepared(BUILDS["centerloss"], ONE, 28)
    scaled = prepared(BUILDS["centerloss"], ONE, 28, reference=plain)
    data = batches(28)[:1]
    before = snapshot(plain)
    expected = train(plain, ONE, data, 0, tmp_path)
    actual = train(scaled, ONE, data, 0, tmp_path, loss_scale=2.0 ** 10)
    centers = [k for k in expected if k.startswith("center_loss/")]
    assert centers and worst({k: before[k] for k in centers}, {k: expected[k] for k in centers}) > 1e-3
    print("centerloss --amp: worst |plain - scaled| = %.3g" % worst(expected, actual))
    assert_same(expected, actual)
