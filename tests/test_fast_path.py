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


def _sgd_steps(optimizer_factory, shapes, steps=3):
    """Trainer steps over parameters of ``shapes`` with fixed random gradients."""
    params = gluon.ParameterDict("p_")
    ps = [params.get("w%d" % i, shape=s) for i, s in enumerate(shapes)]
    params.initialize(mx.init.Zero())
    for i, p in enumerate(ps):
        p.set_data(mx.nd.array(np.random.RandomState(i).standard_normal(p.shape)))
    trainer = gluon.Trainer(params, *optimizer_factory())
    for step in range(steps):
        for i, p in enumerate(ps):
            p.grad()[:] = mx.nd.array(np.random.RandomState(100 + 10 * step + i).standard_normal(p.shape))
            p.data()._fresh_grad = True  # set by hand, not by backward
        trainer.step(2)
    return trainer, [p.data().asnumpy() for p in ps]


def test_fast_sgd_is_bitwise_mxnet_sgd():
    """training_runtime.optim.SGD (single-array kernels for large arrays, 45 small
    arrays per aggregated update) gives exactly mxnet's SGD's parameters."""
    from training_runtime import optim
    shapes = [(300, 300)] + [(3, 4)] * 50 + [(70, 1000), (7,)]  # large, small, large, small
    for settings in ({"learning_rate": 0.01, "momentum": 0.9, "wd": 5e-4},
                     {"learning_rate": 0.1, "momentum": 0.5, "wd": 0.0, "clip_gradient": 0.5},
                     {"learning_rate": 0.1, "momentum": 0.0, "wd": 1e-3}):
        start = _sgd_steps(lambda: ("sgd", settings), shapes, steps=0)[1]
        fast_trainer, fast = _sgd_steps(lambda: (optim.SGD(**settings),), shapes)
        _, plain = _sgd_steps(lambda: ("sgd", settings), shapes)
        assert isinstance(fast_trainer._optimizer, optim.SGD)
        for a, b, s in zip(fast, plain, start):
            assert not np.array_equal(a, s)  # the steps moved every array
            np.testing.assert_array_equal(a, b)


def test_old_checkpoint_optimizer_is_upgraded(tmp_path):
    """A state file with mxnet's SGD loads into a fast trainer as the fast SGD, momentum kept."""
    from training_runtime import optim
    settings = {"learning_rate": 0.01, "momentum": 0.9, "wd": 5e-4}
    shapes = [(300, 300), (3, 4)]
    old, old_params = _sgd_steps(lambda: ("sgd", settings), shapes)
    old.save_states(str(tmp_path / "old.states"))
    new, _ = _sgd_steps(lambda: (optim.SGD(**settings),), shapes, steps=0)
    new.load_states(str(tmp_path / "old.states"))
    assert type(new._optimizer) is mx.optimizer.SGD  # what load_states alone gives
    optim.upgrade(new)
    assert type(new._optimizer) is optim.SGD and new._optimizer.aggregate_num == optim.AGGREGATE
    np.testing.assert_array_equal(new._updaters[0].states[0].asnumpy(),
                                  old._updaters[0].states[0].asnumpy())


def test_amp_is_refused_on_cpu(tmp_path):
    from training_runtime.errors import UserError
    from training_runtime import app
    from imbalanced_attr.family import FAMILY
    import pytest
    with pytest.raises(UserError, match=r"^--amp: float16 mixed precision needs GPUs \(--gpus\); "
                                        r"this run is on cpu\(0\)$"):
        app.main(FAMILY, ["--amp", "--save-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_one_loss_scale_for_all_trainers():
    """LossScaling: the loss times the scale, every trainer's rescale divided by it;
    an overflow in one block's gradients skips all and halves the scale (one step later,
    LossScaler's rule)."""
    from training_runtime.mixed_precision import LossScaling
    blocks = [gluon.nn.Dense(2, in_units=3) for _ in range(2)]
    trainers = []
    for block in blocks:
        block.initialize()
        trainers.append(gluon.Trainer(block.collect_params(), "sgd", {"learning_rate": 0.1}))
    scaling = LossScaling(trainers)
    x = mx.nd.ones((4, 3))
    with autograd.record():
        losses = scaling.scale([(blocks[0](x) + blocks[1](x)).sum(axis=1)])
    losses[0].backward()
    assert [t._scale for t in trainers] == [1.0 / LossScaling.START] * 2
    np.testing.assert_allclose(blocks[0].weight.grad().asnumpy(), 4 * LossScaling.START)
    assert not scaling.overflow()
    blocks[1].bias.grad()[:] = np.inf
    assert scaling.overflow() and scaling.loss_scale == LossScaling.START
    blocks[1].bias.grad()[:] = 0
    assert not scaling.overflow() and scaling.loss_scale == LossScaling.START / 2
