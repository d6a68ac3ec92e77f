"""The fast path of the attribute model (fsr k×k convolutions as matrix
products over the same parameters, hybridized with static_alloc/static_shape)
trains to the same numbers as the plain path (nn.Conv2D fsr, imperative) within
float32 tolerance, with the same parameter names and shapes."""
import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from imbalanced_attr.model import AttributeModel, WholeInputConv2D, aggregate_prediction

NUM_CLASSES = 5
SIZE = 64


def _model(fast):
    mx.random.seed(7)
    return AttributeModel(NUM_CLASSES, backbone="resnet18_v1", input_size=SIZE, fast_heads=fast,
                          prefix="attributemodel_")


def _train(net, hybridize, data, label, steps=3):
    if hybridize:
        net.hybridize(static_alloc=True, static_shape=True)
    trainers = [gluon.Trainer(block.collect_params(), "sgd",
                              {"learning_rate": 0.01, "momentum": 0.9, "wd": 5e-4})
                for block in net.blocks().values()]
    bce = gluon.loss.SigmoidBinaryCrossEntropyLoss(from_sigmoid=True)
    losses = []
    for _ in range(steps):
        with autograd.record():
            logits, scores = net(data)
            loss = bce(aggregate_prediction(logits, scores), label)
        loss.backward()
        for trainer in trainers:
            trainer.step(data.shape[0])
        losses.append(loss.sum().asscalar())
    return losses, {name: p.data().asnumpy() for name, p in net.collect_params().items()}


def test_fast_fsr_layer_is_the_whole_input_convolution():
    fast, plain = _model(True), _model(False)
    layers = [type(b) for b in fast.stage_2.fsr._children.values()]
    assert WholeInputConv2D in layers
    assert WholeInputConv2D not in [type(b) for b in plain.stage_2.fsr._children.values()]
    assert ({n: p.shape for n, p in fast.collect_params().items()}
            == {n: p.shape for n, p in plain.collect_params().items()})


def test_fast_path_steps_equal_plain_path():
    rng = np.random.RandomState(0)
    data = mx.nd.array(rng.standard_normal((4, 3, SIZE, SIZE)))
    label = mx.nd.array(rng.randint(0, 2, (4, NUM_CLASSES)))
    fast, plain = _model(True), _model(False)
    # batch 4: at batch 2 the BatchNorms over two 1×1 values amplify round-off chaotically
    for name, p in plain.collect_params().items():  # identical starting point
        fast.collect_params()[name].set_data(p.data())
    fast_losses, fast_params = _train(fast, True, data, label)
    plain_losses, plain_params = _train(plain, False, data, label)
    np.testing.assert_allclose(fast_losses, plain_losses, rtol=1e-4, atol=1e-5)
    assert fast_losses[-1] != fast_losses[0]  # the steps did move the parameters
    for name, value in plain_params.items():
        np.testing.assert_allclose(fast_params[name], value, rtol=1e-3, atol=1e-5, err_msg=name)
