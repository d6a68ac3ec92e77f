"""--amp on the CPU (no GPU here; ``enable`` refuses CPU contexts, so the mechanisms are
tested without it): probabilities and metrics in float32 whatever the logits' dtype,
and LossScaling's arithmetic over several per-block trainers and two devices."""
import collections
import dataclasses
import os
import subprocess
import sys

import mxnet as mx
import numpy as np
from mxnet import gluon

from fgvc_gluon.task import top1_accuracies
from imbalanced_attr.model import aggregate_prediction
from imbalanced_attr.task import AggregatedPrediction
from training_runtime import config, loop
from training_runtime.mixed_precision import LossScaling
from training_runtime.schedule import make_schedule
from training_runtime.task import ParamGroup, TrainingTask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- float32 predictions

class Float16Heads(gluon.HybridBlock):
    """x N×4×C -> (logits N×C, [s₂, s₃, s₄] N×C), float16: what the attribute model
    gives under --amp (its Dense layers run in float16)."""

    def __init__(self, dtype="float16", **kwargs):
        super(Float16Heads, self).__init__(**kwargs)
        self._dtype = dtype

    def hybrid_forward(self, F, x):
        parts = [F.cast(F.reshape(F.slice_axis(x, axis=1, begin=k, end=k + 1), shape=(0, -1)),
                        dtype=self._dtype) for k in range(4)]
        return parts[0], parts[1:]


class PreviousAggregation(gluon.HybridBlock):
    """The aggregation as it was before the float32 cast (the float32 reference)."""

    def __init__(self, net, **kwargs):
        super(PreviousAggregation, self).__init__(**kwargs)
        self.net = net

    def hybrid_forward(self, F, x):
        logits, scores = self.net(x)
        return F.sigmoid(0.25 * (F.add_n(*scores) + logits))


def _near_one_inputs():
    """N=2, C=4 float16 logits and scores with 0.25·sum in 8.5..12: every σ rounds to
    1.0 (or to 1 - 2⁻¹¹) in float16, all distinct in float32. Returns (x N×4×C float16,
    the expected float32 probabilities from the exact float16 values)."""
    rng = np.random.RandomState(0)
    quarter_sum = np.linspace(8.5, 12.0, 8).reshape(2, 4)
    x = np.stack([quarter_sum] * 4, axis=1) + rng.uniform(-0.5, 0.5, (2, 4, 4))
    x = x.astype(np.float16)
    exact = x.astype(np.float64)
    expected = 1.0 / (1.0 + np.exp(-0.25 * exact.sum(axis=1)))
    return x, expected.astype(np.float32)


def test_float16_scores_aggregate_to_unquantised_float32_probabilities():
    x, expected = _near_one_inputs()
    assert len(np.unique(expected)) == expected.size  # distinct in float32 ...
    assert len(np.unique(expected.astype(np.float16))) <= 2  # ... not in float16
    logits, scores = x[:, 0], [x[:, k] for k in (1, 2, 3)]
    outputs = {"nd": aggregate_prediction(mx.nd.array(logits, dtype="float16"),
                                          [mx.nd.array(s, dtype="float16") for s in scores]).asnumpy(),
               "numpy": aggregate_prediction(logits, scores)}
    for hybridize in (False, True):
        block = AggregatedPrediction(Float16Heads())
        if hybridize:
            block.hybridize()
        outputs["block hybridize=%s" % hybridize] = block(mx.nd.array(x, dtype="float16")).asnumpy()
    for name, probs in outputs.items():
        assert probs.dtype == np.float32, name
        np.testing.assert_allclose(probs, expected, rtol=2e-7, atol=0, err_msg=name)


def test_float32_aggregation_is_bitwise_unchanged():
    rng = np.random.RandomState(1)
    x = (rng.randn(3, 4, 5) * 4).astype(np.float32)
    logits, scores = mx.nd.array(x[:, 0]), [mx.nd.array(x[:, k]) for k in (1, 2, 3)]
    before = mx.nd.sigmoid(0.25 * (mx.nd.add_n(*scores) + logits)).asnumpy()
    np.testing.assert_array_equal(aggregate_prediction(logits, scores).asnumpy(), before)
    for hybridize in (False, True):
        new, old = AggregatedPrediction(Float16Heads("float32")), PreviousAggregation(Float16Heads("float32"))
        if hybridize:
            new.hybridize()
            old.hybridize()
        out = new(mx.nd.array(x))
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out.asnumpy(), old(mx.nd.array(x)).asnumpy())
    x64 = x.astype(np.float64)  # float64 callers keep float64
    assert aggregate_prediction(x64[:, 0], [x64[:, k] for k in (1, 2, 3)]).dtype == np.float64


class Float16Logits(object):
    """``predict`` of a fine-grained task under --amp: float16 logits, one peak per row."""

    def __init__(self, num_classes):
        self.num_classes = num_classes

    def predict(self, data, epoch):
        peaks = data.asnumpy().astype(np.int64)
        logits = np.zeros((len(peaks), self.num_classes), np.float16)
        logits[np.arange(len(peaks)), peaks] = 1.0
        return collections.OrderedDict([("main", mx.nd.array(logits, dtype="float16"))])


def test_top1_of_float16_logits_counts_exactly():
    """Class 2049 (float16 holds integers exactly up to 2048) and 3 × 1001 hits (a
    float16 count would round 3003 to 3004): top-1 must be 1.0."""
    task = Float16Logits(2100)
    batches = [(mx.nd.full((1001,), 2049), mx.nd.full((1001,), 2049, dtype="int32"))
               for _ in range(3)]
    accuracies, count = top1_accuracies(task, batches, 0)
    assert count == 3003 and accuracies["main"] == 1.0
    wrong = [(mx.nd.full((5,), 2049), mx.nd.full((5,), 2048, dtype="int32"))]
    assert top1_accuracies(task, wrong, 0)[0]["main"] == 0.0


AMP_SCRIPT = r"""
import mxnet as mx, numpy as np
from mxnet.contrib import amp
amp.init()  # on the CPU: only the operator wrappers (no float16 Dense/Conv here)
from imbalanced_attr.model import aggregate_prediction
from imbalanced_attr.task import AggregatedPrediction
from fgvc_gluon.task import top1_accuracies
import test_mixed_precision as t
x, expected = t._near_one_inputs()
half = mx.nd.array(x, dtype="float16")
assert mx.nd.sigmoid(half).dtype == np.float16  # amp keeps sigmoid in float16
nd = aggregate_prediction(half[:, 0], [half[:, k] for k in (1, 2, 3)])
block = AggregatedPrediction(t.Float16Heads())
block.hybridize()
for probs in (nd, block(half)):
    assert probs.dtype == np.float32, probs.dtype
    np.testing.assert_allclose(probs.asnumpy(), expected, rtol=2e-7, atol=0)
batches = [(mx.nd.full((7,), 2049), mx.nd.full((7,), 2049, dtype="int32"))]
assert top1_accuracies(t.Float16Logits(2100), batches, 0)[0]["main"] == 1.0
print("ok")
"""


def test_float32_predictions_under_amp_operator_lists():
    """The same checks with amp.init()'s operator wrappers active (a subprocess: amp.init
    cannot be undone)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    result = subprocess.run([sys.executable, "-c", AMP_SCRIPT], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


# ---------------------------------------------------------------- loss scaling

CTX = [mx.cpu(0), mx.cpu(1)]


class TwoBlockTask(TrainingTask):
    """Least squares through body (Dense 4→8, BatchNorm, ReLU) and head (Dense 8→1), one
    trainer each (the head at lr × 0.5). ``inject``: an infinite gradient for the head's
    bias on cpu(1) only."""

    metric_name = "neg_mse"

    def __init__(self):
        self.body = gluon.nn.HybridSequential()
        self.body.add(gluon.nn.Dense(8, in_units=4), gluon.nn.BatchNorm(in_channels=8),
                      gluon.nn.Activation("relu"))
        self.head = gluon.nn.Dense(1, in_units=8)
        for block in (self.body, self.head):
            block.initialize(mx.init.Xavier(), ctx=CTX)
        self.inject = False
        self.scales = []

    def blocks(self):
        return collections.OrderedDict([("body", self.body), ("head", self.head)])

    def param_groups(self):
        return [ParamGroup("body", self.body.collect_params()),
                ParamGroup("head", self.head.collect_params(), 0.5)]

    def transform(self, train):
        return lambda x: x

    def begin_step(self, batch):
        self.scales.append(batch.loss_scale)

    def training_loss(self, data, label, index, epoch):
        loss = (self.head(self.body(data)).reshape((-1,)) - label) ** 2
        if self.inject and data.context == mx.cpu(1):
            loss = mx.nd.broadcast_add(loss, self.head.bias.data(data.context) * float("inf"))
        return loss

    def predict(self, data, epoch):
        return collections.OrderedDict([("y", self.head(self.body(data)))])

    def evaluate(self, batches, epoch):
        return {"neg_mse": 0.0}


def _runner(tmp_path, name, amp, source=None):
    task = TwoBlockTask()
    if source is not None:  # identical weights
        mine, theirs = (t.body.collect_params().values() for t in (task, source))
        for a, b in zip(list(mine) + list(task.head.collect_params().values()),
                        list(theirs) + list(source.head.collect_params().values())):
            a.set_data(b.data(CTX[0]))
    run = config.RunConfig(family="test")
    run.optim = config.OptimConfig(lr=0.05, momentum=0.9, wd=1e-4, epochs=1, schedule="step")
    run.runtime = dataclasses.replace(config.RuntimeConfig(batch_size=8), amp=amp)
    rng = np.random.RandomState(0)
    data = gluon.data.ArrayDataset(mx.nd.array(rng.randn(16, 4)), mx.nd.array(rng.randn(16)))
    save_dir = str(tmp_path / name)
    os.makedirs(save_dir)
    return loop.Runner(task, run, CTX, make_schedule(run.optim), save_dir, data, data,
                       {"script": "test"}, log=lambda *a: None)


def _batch(seed):
    rng = np.random.RandomState(seed)
    return (mx.nd.array(rng.randn(8, 4) * 3), mx.nd.array(rng.randn(8) * 3),
            mx.nd.arange(8, dtype="int64"))


def _states(trainer):
    """Every optimizer state array of ``trainer`` (momentum), in index order, as numpy."""
    updater = trainer._kvstore._updater if trainer._update_on_kvstore else trainer._updaters[0]
    out = []
    for key in sorted(updater.states):
        state = updater.states[key]
        out.extend(s.asnumpy() for s in (state if isinstance(state, (list, tuple)) else [state])
                   if s is not None)
    return out


def _snapshot(runner, trained_only=False):
    """(every parameter on every device, every trainer's optimizer states), numpy;
    ``trained_only``: without BatchNorm's running statistics (the forward pass sets them)."""
    params = [d.asnumpy() for t in runner.trainers.values() for p in t._params
              if not (trained_only and p.grad_req == "null") for d in p.list_data()]
    return params, [s for t in runner.trainers.values() for s in _states(t)]


def test_scaled_step_equals_the_unscaled_step(tmp_path):
    """Two steps at a forced scale 2¹⁰ over two trainers and two devices: parameters
    (every copy) and momentum states equal the unscaled run's within rtol 1e-6 (a
    power-of-two scale is exact in float32 arithmetic; measured: bitwise equal)."""
    plain = _runner(tmp_path, "plain", amp=False)
    scaled = _runner(tmp_path, "scaled", amp=True, source=plain.task)
    assert len(plain.trainers) == 2 and plain.trainers["body"]._contexts == CTX
    scaling = scaled.loss_scaling
    scaling.loss_scale = scaling._next = 2.0 ** 10
    for seed in (1, 2):
        plain_sum = plain.train_step(_batch(seed))
        scaled_sum = scaled.train_step(_batch(seed))
        assert scaled_sum.asscalar() == plain_sum.asscalar()  # the reported loss is unscaled
    assert scaled.task.scales == [2.0 ** 10] * 2 and plain.task.scales == [1.0] * 2
    assert [t._scale for t in scaled.trainers.values()] == [2.0 ** -10] * 2
    (p_params, p_states), (s_params, s_states) = _snapshot(plain), _snapshot(scaled)
    assert len(p_states) == 6 and np.abs(p_states[0]).sum() > 0
    for a, b in zip(p_params + p_states, s_params + s_states):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=0)


def test_an_overflow_on_one_device_skips_every_trainer_and_halves_the_scale(tmp_path):
    runner = _runner(tmp_path, "run", amp=True)
    scaling = runner.loss_scaling
    runner.train_step(_batch(1))  # states exist
    before = _snapshot(runner, trained_only=True)
    runner.task.inject = True
    runner.train_step(_batch(2))
    grads = runner.task.head.bias.list_grad()
    assert np.isfinite(grads[0].asnumpy()).all() and not np.isfinite(grads[1].asnumpy()).all()
    after = _snapshot(runner, trained_only=True)
    for a, b in zip(before[0] + before[1], after[0] + after[1]):
        np.testing.assert_array_equal(b, a)  # no trainer updated (the body's grads were finite)
    # LossScaler's rule: the halved scale applies from the step after the next one
    assert (scaling.loss_scale, scaling._next) == (LossScaling.START, LossScaling.START / 2)
    runner.task.inject = False
    runner.train_step(_batch(3))
    runner.train_step(_batch(4))
    assert runner.task.scales == [LossScaling.START] * 3 + [LossScaling.START / 2]
    assert [t._scale for t in runner.trainers.values()] == [2.0 / LossScaling.START] * 2
    changed = _snapshot(runner, trained_only=True)[0]
    assert all(not np.array_equal(a, b) for a, b in zip(before[0], changed))  # updated again


def test_clean_steps_double_the_scale_up_to_the_maximum():
    assert (LossScaling.START, LossScaling.MAX, LossScaling.CLEAN_STEPS) == (2.0 ** 16, 2.0 ** 24, 2000)
    block = gluon.nn.Dense(2, in_units=3)
    block.initialize(ctx=CTX)
    trainers = [gluon.Trainer({k: v}, "sgd", {"learning_rate": 0.1})
                for k, v in block.collect_params().items()]
    scaling = LossScaling(trainers)
    for ctx in CTX:
        with mx.autograd.record():
            loss = scaling.scale([block(mx.nd.ones((2, 3), ctx=ctx)).sum()])[0]
        loss.backward()
    used = []
    for _ in range(2 * LossScaling.CLEAN_STEPS + 1):
        used.append(scaling.loss_scale)
        assert not scaling.overflow()
    # 2000 clean steps at 2¹⁶, then (one step late, LossScaler's rule) 2000 at 2¹⁷
    assert used == [2.0 ** 16] * 2001 + [2.0 ** 17] * 2000
    scaling.CLEAN_STEPS = 3  # the cap, quicker
    scaling.loss_scale = scaling._next = LossScaling.MAX / 2
    scaling._clean = 0
    used = []
    for _ in range(8):
        used.append(scaling.loss_scale)
        scaling.overflow()
    assert used == [LossScaling.MAX / 2] * 4 + [LossScaling.MAX] * 4
    # an overflow (one device's gradient) halves the scale and restarts the clean count
    scaling.loss_scale = scaling._next = 2.0 ** 10
    scaling._clean = 0
    bias_grad = block.bias.list_grad()[1]
    saved, used = bias_grad.copy(), []
    for step in range(7):
        bias_grad[:] = np.nan if step == 2 else saved
        assert scaling.overflow() == (step == 2)
        used.append(scaling.loss_scale)
    assert used == [2.0 ** 10] * 3 + [2.0 ** 9] * 3 + [2.0 ** 10]
