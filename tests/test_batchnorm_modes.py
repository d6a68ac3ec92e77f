"""--batchnorm frozen / sync reach every BatchNorm class; what sync refuses.

SyncBatchNorm's training forward deadlocks on several CPU contexts (loop.use_sync_batchnorm),
so the synchronised layers are only run in inference mode here (no synchronisation: running
statistics), which checks they are the same layers over the same parameters.
"""
import mxnet as mx
import numpy as np
import pytest
from gluoncv.nn.block import BatchNormCudnnOff
from mxnet import autograd, gluon, nd
from mxnet.gluon import nn
from mxnet.gluon.contrib.nn import SyncBatchNorm

import fgvc_gluon.family  # noqa: F401  (registers every method)
from fgvc_gluon import mcloss
from training_runtime import app, config as run_config
from training_runtime.errors import UserError
from training_runtime.loop import freeze_batchnorm, use_sync_batchnorm

EPS = 1e-5


def _statistics(block):
    """name -> running mean / var of every BatchNorm under ``block`` (numpy copies)."""
    return {k: v.data().asnumpy().copy() for k, v in block.collect_params().items()
            if k.endswith(("running_mean", "running_var"))}


def _randomise_statistics(block, seed=0):
    """Running statistics and gamma / beta away from their initial 0 / 1 (so inference
    outputs depend on them)."""
    rs = np.random.RandomState(seed)
    for name, param in block.collect_params().items():
        if name.endswith(("running_var", "gamma")):
            param.set_data(nd.array(rs.uniform(0.5, 2.0, param.shape)))
        elif name.endswith(("running_mean", "beta")):
            param.set_data(nd.array(rs.normal(size=param.shape)))


class _Flat(nn.HybridBlock):
    """N×C×1×1 -> N×C (feeds the BatchNorm1D of the toy model)."""

    def hybrid_forward(self, F, x):
        return x.reshape((0, -1))


def _toy(extra=()):
    """Conv -> nn.BatchNorm -> GlobalAvgPool -> Dense -> [extra 4-D layers] -> BatchNorm1D: 2×3×6×6 -> 2×4."""
    net = nn.HybridSequential()
    net.add(nn.Conv2D(4, 3, padding=1, in_channels=3), nn.BatchNorm(in_channels=4), *extra,
            nn.GlobalAvgPool2D(), _Flat(), mcloss.BatchNorm1D(in_channels=4))
    net.initialize(mx.init.Xavier())
    _randomise_statistics(net)
    return net


def test_frozen_covers_every_batchnorm_class():
    """nn.BatchNorm, BatchNorm1D, gluoncv's BatchNormCudnnOff, BatchNormReLU, SyncBatchNorm
    all normalise with their running statistics in training: output = numpy's formula,
    statistics unchanged."""
    net = _toy(extra=[BatchNormCudnnOff(in_channels=4), nn.BatchNormReLU(in_channels=4),
                      SyncBatchNorm(in_channels=4, num_devices=1)])
    _randomise_statistics(net, seed=1)
    assert freeze_batchnorm(net) == 5
    before = _statistics(net)
    x = nd.random.normal(shape=(2, 3, 6, 6))
    with autograd.record():
        y = net(x)
    y.backward()
    after = _statistics(net)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    # numpy: every BatchNorm is (x - running_mean) / sqrt(running_var + eps) * gamma + beta
    p = {k: v.data().asnumpy() for k, v in net._collect_params_with_prefix().items()}
    h = net[0](x).asnumpy()

    def bn(h, i, relu=False):
        shape = (1, -1) + (1,) * (h.ndim - 2)
        out = ((h - p["%d.running_mean" % i].reshape(shape)) / np.sqrt(p["%d.running_var" % i].reshape(shape) + EPS)
               * p["%d.gamma" % i].reshape(shape) + p["%d.beta" % i].reshape(shape))
        return np.maximum(out, 0) if relu else out
    h = bn(bn(bn(bn(h, 1), 2), 3, relu=True), 4)
    expected = bn(h.mean(axis=(2, 3)), 7)
    np.testing.assert_allclose(y.asnumpy(), expected, rtol=1e-4, atol=1e-5)


def test_frozen_mcloss_classifier_keeps_its_statistics():
    """train_fgvc.py --method mcloss --batchnorm frozen: the classifier's BatchNorm1D layers
    too (they are nn.BatchNorm subclasses) keep their running statistics over steps."""
    method = mcloss.build_method(4, backbone="resnet18_mc", width=0.25, image_size=32)
    frozen = freeze_batchnorm(method.net)
    method.net.hybridize()
    x, label = nd.random.normal(shape=(4, 3, 32, 32)), nd.array([0, 1, 2, 3])
    method.net(x)  # deferred shapes
    before = _statistics(method.net)
    trainer = gluon.Trainer(method.net.collect_params(), "sgd", {"learning_rate": 0.1})
    for step in range(2):
        with autograd.record():
            loss = method.training_loss(x, label, None, 0)
        loss.backward()
        trainer.step(4)
    after = _statistics(method.net)
    assert any("classifier" in k for k in before)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert frozen == sum(isinstance(b, nn.BatchNorm) for b in _all_blocks(method.net)) == 22


def _all_blocks(block):
    yield block
    for child in block._children.values():
        for found in _all_blocks(child):
            yield found


def test_sync_replaces_every_batchnorm_over_the_same_parameters():
    existing = SyncBatchNorm(in_channels=4, num_devices=2)
    net = _toy(extra=[existing])
    existing.collect_params().initialize(force_reinit=True)
    x = nd.random.normal(shape=(2, 3, 6, 6))
    expected = net(x).asnumpy()
    params = {k: id(v) for k, v in net.collect_params().items()}
    assert use_sync_batchnorm(net, 2) == 2
    assert type(net[1]) is SyncBatchNorm and type(net[5]) is mcloss.SyncBatchNorm1D
    assert net[2] is existing  # already synchronised: left alone
    assert all(b._kwargs["ndev"] == 2 for b in (net[1], net[5]))
    assert {k: id(v) for k, v in net.collect_params().items()} == params
    # inference mode (running statistics: no synchronisation, no deadlock): the same numbers
    np.testing.assert_allclose(net(x).asnumpy(), expected, rtol=1e-5, atol=1e-6)


def test_sync_keeps_frozen_parameters_frozen():
    """grad_req 'null' gamma / beta (a finetune backbone): the SyncBatchNorm is built over
    them and they stay frozen."""
    net = _toy()
    net.collect_params().setattr("grad_req", "null")
    x = nd.random.normal(shape=(2, 3, 6, 6))
    expected = net(x).asnumpy()
    assert use_sync_batchnorm(net, 2) == 2
    assert {k: v.grad_req for k, v in net.collect_params().items()} == \
        dict.fromkeys(net.collect_params().keys(), "null")
    np.testing.assert_allclose(net(x).asnumpy(), expected, rtol=1e-5, atol=1e-6)
    # center=False / scale=False layers keep their settings too
    plain = nn.BatchNorm(in_channels=4, center=False, scale=False)
    holder = nn.HybridSequential()
    holder.add(plain)
    holder.initialize()
    use_sync_batchnorm(holder, 2)
    assert type(holder[0]) is SyncBatchNorm and holder[0]._kwargs["fix_gamma"]
    assert holder[0].beta is plain.beta and plain.beta.grad_req == "null"


class _Custom(nn.BatchNorm):
    def hybrid_forward(self, F, x, gamma, beta, running_mean, running_var):
        return super(_Custom, self).hybrid_forward(F, x, gamma, beta, running_mean, running_var) * 2


@pytest.mark.parametrize("layer, why", ids=["subclass", "gluoncv", "fused_relu"], argvalues=[
    (lambda: _Custom(in_channels=4), "has its own hybrid_forward and no sync_variant"),
    (lambda: BatchNormCudnnOff(in_channels=4), "has its own hybrid_forward and no sync_variant"),
    (lambda: nn.BatchNormReLU(in_channels=4), "normalises axis 1 with a fused ReLU"),
])
def test_sync_refuses_what_it_cannot_synchronise(layer, why):
    bad = layer()
    net = _toy(extra=[bad])
    with pytest.raises(UserError) as err:
        use_sync_batchnorm(net, 2)
    message = str(err.value)
    assert "\n" not in message and message.startswith("--batchnorm sync: BatchNorm layer %s (%s.%s)"
                                                      % (bad.name, type(bad).__module__, type(bad).__name__))
    assert why in message
    assert type(net[1]) is nn.BatchNorm and net[2] is bad  # nothing was replaced


def _build(given, ctx):
    """app.build_task of the fgvc / attr family's run ``given`` on ``ctx``, no pretrained weights."""
    if given.get("method") == "s3n":
        family = fgvc_gluon.family.FAMILY
    else:
        from imbalanced_attr.family import FAMILY as family
    config = run_config.resolve(family, given)
    return app.build_task(family, config, ["a", "b", "c"], ctx, pretrained=False)


def test_attribute_finetune_with_sync_batchnorm_builds():
    """--finetune --batchnorm sync on two devices: the backbone's BatchNorms become
    SyncBatchNorms over the frozen parameters, which stay frozen."""
    task = _build({"finetune": True, "batchnorm": "sync"}, [mx.cpu(0), mx.cpu(1)])
    layers = [b for b in _all_blocks(task.net.backbone) if isinstance(b, nn.BatchNorm)]
    assert layers and all(type(b) is SyncBatchNorm for b in layers)
    assert {p.grad_req for p in task.net.backbone.collect_params().values()} == {"null"}


def test_s3n_refuses_sync_batchnorm():
    """S3N runs its backbone three times per forward: --batchnorm sync is refused (one line),
    before any BatchNorm is touched; frozen is allowed."""
    given = {"method": "s3n", "image_size": 32, "batchnorm": "sync"}
    with pytest.raises(UserError) as err:
        _build(given, [mx.cpu(0), mx.cpu(1)])
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("--batchnorm sync: not supported by --method s3n (its backbone runs 3 times")
    assert message.endswith("; use --batchnorm frozen")
    task = _build(dict(given, batchnorm="frozen"), [mx.cpu(0), mx.cpu(1)])
    assert all(b._kwargs["use_global_stats"] for b in _all_blocks(task.net) if isinstance(b, nn.BatchNorm))
    _build(given, [mx.cpu(0)])  # one device: sync is plain BatchNorm, nothing to refuse
