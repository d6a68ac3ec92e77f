"""imbalanced_attr.losses: golden parity, gradients, prediction history, class weights."""
import numpy as np
import mxnet as mx
import pytest
from mxnet import autograd, gluon, nd
from scipy.special import expit

from conftest import assert_golden, golden_cases, golden_tolerance, load_golden
from helpers import central_difference
from imbalanced_attr.losses import (WIDER_BATCH_RATIOS, WIDER_CLASS_WEIGHTS, AttentionHistoryLoss,
                                    PredictionHistory, WeightedFocalLoss, batch_ratios_from_labels,
                                    class_weights, history_std_weights)


def loss_and_grad(loss_block, logits, *args, dtype="float32", ctx=None):
    """(per-sample loss, d sum(loss) / d logits) as numpy; extra args are N x C arrays or None."""
    ctx = ctx or mx.cpu()
    x = nd.array(logits, dtype=dtype, ctx=ctx)
    x.attach_grad()
    inputs = [None if a is None else (a if isinstance(a, nd.NDArray) else
                                      nd.array(a, dtype=dtype, ctx=ctx)) for a in args]
    with autograd.record():
        loss = loss_block(x, *inputs)
    loss.backward()
    return loss.asnumpy(), x.grad.asnumpy()


def both_modes(make_block):
    """The block imperative and hybridized (each a fresh instance)."""
    hybrid = make_block()
    hybrid.hybridize()
    return [("imperative", make_block()), ("hybridized", hybrid)]


# ------------------------------------------------------------------ golden: weighted focal loss

FOCAL_CASES = golden_cases("focal_")


@pytest.mark.parametrize("case", FOCAL_CASES)
@pytest.mark.parametrize("plain_bce, loss_key, grad_key", [
    (False, "loss_focal", "grad_logits_focal"),  # published formula; the gradient is a reference
    (True, "loss_bce", "grad_logits_bce"),       # what the original script trained with (IL-1)
])
def test_focal_golden(case, plain_bce, loss_key, grad_key):
    g = load_golden(case)
    for mode, block in both_modes(lambda: WeightedFocalLoss(g["batch_ratios"], plain_bce=plain_bce)):
        loss, grad = loss_and_grad(block, g["logits"], g["labels"])
        assert_golden(loss, g[loss_key], *golden_tolerance(case, loss_key),
                      what="%s %s %s" % (case, mode, loss_key))
        assert_golden(grad, g[grad_key], *golden_tolerance(case, grad_key),
                      what="%s %s %s" % (case, mode, grad_key))


def test_focal_accepts_ndarray_ratios_and_runs_on_two_devices():
    g = load_golden(FOCAL_CASES[0])
    block = WeightedFocalLoss(nd.array(g["batch_ratios"]))
    block.hybridize()
    for ctx in (mx.cpu(0), mx.cpu(1)):
        loss, _ = loss_and_grad(block, g["logits"], g["labels"], ctx=ctx)
        assert_golden(loss, g["loss_focal"], *golden_tolerance(FOCAL_CASES[0], "loss_focal"))


# ------------------------------------------------------------------ golden: history loss + history

HISTORY_CASES = golden_cases("history_")


def batch_rows(g):
    """The dataset rows of the golden batch (position-addressed upstream, clipped at the end)."""
    start = int(g["batch_id"]) * int(g["batch_size"])
    return np.arange(start, min(start + int(g["batch_size"]), g["prediction_history"].shape[1]))


def history_from(g):
    total, num_attr = g["prediction_history"].shape[1:]
    history = PredictionHistory(total, num_attr, length=g["prediction_history"].shape[0])
    history.load_state_dict({"history": g["prediction_history"]})
    return history


@pytest.mark.parametrize("case", HISTORY_CASES)
def test_history_std_weights_golden(case):
    g = load_golden(case)
    rows = batch_rows(g)
    tol = golden_tolerance(case, "std_weights")
    window = g["prediction_history"][:, rows]
    from_numpy = history_std_weights(window)
    assert isinstance(from_numpy, np.ndarray) and from_numpy.dtype == np.float32
    assert_golden(from_numpy, g["std_weights"], *tol, what="numpy")
    from_nd = history_std_weights(nd.array(window))
    assert isinstance(from_nd, nd.NDArray)
    assert_golden(from_nd, g["std_weights"], *tol, what="NDArray")
    weights = history_from(g).std_weights(rows, int(g["epoch_weighted"]))
    assert_golden(weights, g["std_weights"], *tol, what="PredictionHistory.std_weights")


@pytest.mark.parametrize("case", HISTORY_CASES)
def test_history_loss_golden(case):
    g = load_golden(case)
    weights = history_from(g).std_weights(batch_rows(g), int(g["epoch_weighted"]))
    checks = [(False, weights, "loss_weighted", "grad_logits_weighted"),
              (False, None, "loss_unweighted", "grad_logits_unweighted"),
              (True, weights, "loss_bce_default", "grad_logits_bce_default")]
    for plain_bce, std_weights, loss_key, grad_key in checks:
        for mode, block in both_modes(lambda: AttentionHistoryLoss(plain_bce=plain_bce)):
            loss, grad = loss_and_grad(block, g["logits"], g["labels"], std_weights)
            assert_golden(loss, g[loss_key], *golden_tolerance(case, loss_key),
                          what="%s %s %s" % (case, mode, loss_key))
            assert_golden(grad, g[grad_key], *golden_tolerance(case, grad_key),
                          what="%s %s %s" % (case, mode, grad_key))


@pytest.mark.parametrize("case", HISTORY_CASES)
def test_history_update_golden(case):
    g = load_golden(case)
    history = history_from(g)
    recorded = history.update(batch_rows(g), nd.array(g["predictions_new"]), int(g["update_epoch"]))
    assert recorded == (int(g["update_epoch"]) >= 2)
    assert_golden(history.state_dict()["history"], g["prediction_history_after"],
                  *golden_tolerance(case, "prediction_history_after"), what=case)


# ------------------------------------------------------------------ gradients

def float64_block(block):
    block.cast("float64")
    return block


def forward64(block, *args):
    return lambda x: block(nd.array(x, dtype="float64"), *[
        None if a is None else nd.array(a, dtype="float64") for a in args]).asnumpy()


@pytest.mark.parametrize("plain_bce, stable", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("masked", [False, True])
def test_focal_gradient_matches_finite_differences(plain_bce, stable, masked):
    rng = np.random.RandomState(3)
    logits = rng.uniform(-6, 6, (4, 5))
    labels = (rng.rand(4, 5) < 0.4).astype(np.float64)
    mask = (rng.rand(4, 5) < 0.7).astype(np.float64) if masked else None
    block = float64_block(WeightedFocalLoss(rng.uniform(0.05, 1, 5), plain_bce=plain_bce,
                                            stable=stable))
    _, grad = loss_and_grad(block, logits, labels, mask, dtype="float64")
    numeric = central_difference(forward64(block, labels, mask), logits)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("stable", [False, True])
def test_history_gradient_matches_finite_differences(weighted, masked, stable):
    rng = np.random.RandomState(4)
    logits = rng.uniform(-6, 6, (4, 5))
    labels = (rng.rand(4, 5) < 0.4).astype(np.float64)
    weights = history_std_weights(rng.rand(5, 4, 5)) if weighted else None
    mask = (rng.rand(4, 5) < 0.7).astype(np.float64) if masked else None
    block = AttentionHistoryLoss(stable=stable)
    _, grad = loss_and_grad(block, logits, labels, weights, mask, dtype="float64")
    numeric = central_difference(forward64(block, labels, weights, mask), logits)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


def test_plain_bce_gradient_at_zero_logit_is_the_originals():
    # The original's log-sum-exp form: relu'(0) = 0 gives (0.5 - y) / C at x == 0
    # (Gluon's SigmoidBinaryCrossEntropyLoss would give -y / C).
    labels = np.array([[1., 0., 1., 0.], [0., 0., 1., 1.]])
    expected = (0.5 - labels) / labels.shape[1]
    makers = [lambda: WeightedFocalLoss(np.full(4, 0.5), plain_bce=True),
              lambda: AttentionHistoryLoss(plain_bce=True)]
    for make_block in makers:
        for mode, block in both_modes(make_block):
            loss, grad = loss_and_grad(block, np.zeros((2, 4)), labels)
            np.testing.assert_allclose(loss, np.log(2), rtol=1e-6)
            np.testing.assert_array_equal(grad, expected.astype(np.float32), err_msg=mode)


def test_stable_option_equals_default_on_moderate_logits():
    rng = np.random.RandomState(13)
    logits = rng.uniform(-8, 8, (6, 5))
    labels = (rng.rand(6, 5) < .4).astype(np.float64)
    weights = 1 + rng.rand(6, 5)
    ratios = rng.uniform(.05, 1, 5)
    for make_block, extra in [(lambda **kw: float64_block(WeightedFocalLoss(ratios, **kw)), []),
                              (lambda **kw: AttentionHistoryLoss(**kw), [weights])]:
        default = loss_and_grad(make_block(), logits, labels, *extra, dtype="float64")
        for mode, block in both_modes(lambda: make_block(stable=True)):
            stable = loss_and_grad(block, logits, labels, *extra, dtype="float64")
            for a, b in zip(stable, default):
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12, err_msg=mode)


def test_stable_option_keeps_saturated_gradients_finite():
    # The original's naive sigmoid: NaN gradient below x = -88.7, log capped at log(1e-12) above
    # ~16.6. The stable form: BCE gradient (sigmoid(x) - y) * w / C everywhere.
    logits = np.array([[-100., -50., -20., 20., 50., 100.]] * 2, dtype=np.float32)
    labels = np.array([[0.] * 6, [1.] * 6], dtype=np.float32)
    _, naive = loss_and_grad(AttentionHistoryLoss(), logits, labels)
    assert np.isnan(naive[:, 0]).all(), "faithful default: the original's NaN gradient"
    loss, grad = loss_and_grad(AttentionHistoryLoss(stable=True), logits, labels, 2 * np.ones((2, 6)))
    x = logits.astype(np.float64)
    expected = 2 * np.where(labels > 0, -expit(-x), expit(x)) / 6  # sigmoid(x) - y, no cancellation
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-30)
    np.testing.assert_allclose(loss, 2 * np.mean(np.logaddexp(0, np.where(labels > 0, -logits, logits)),
                                                 axis=1), rtol=1e-5)
    focal_loss, focal_grad = loss_and_grad(WeightedFocalLoss(np.full(6, .5), stable=True),
                                           logits, labels)
    assert np.isfinite(focal_loss).all() and np.isfinite(focal_grad).all()
    assert (focal_grad[0, 3:] > 0).all() and (focal_grad[1, :3] < 0).all(), "wrong side pushes back"


def test_plain_bce_ignores_history_weights():
    rng = np.random.RandomState(5)
    logits, labels = rng.randn(3, 4), (rng.rand(3, 4) < .5).astype(np.float32)
    block = AttentionHistoryLoss(plain_bce=True)
    with_weights, _ = loss_and_grad(block, logits, labels, 1 + rng.rand(3, 4))
    without, _ = loss_and_grad(block, logits, labels)
    np.testing.assert_array_equal(with_weights, without)


# ------------------------------------------------------------------ label mask (SPEC quirk 4 option)

def test_label_mask_averages_over_counted_attributes_only():
    rng = np.random.RandomState(6)
    logits, labels = rng.randn(3, 6), (rng.rand(3, 6) < .4).astype(np.float32)
    ratios = rng.uniform(.1, 1, 6).astype(np.float32)
    kept = np.array([0, 2, 3])
    mask = np.zeros((3, 6), np.float32)
    mask[:, kept] = 1
    pairs = [(lambda: WeightedFocalLoss(ratios), lambda: WeightedFocalLoss(ratios[kept])),
             (lambda: AttentionHistoryLoss(), lambda: AttentionHistoryLoss())]
    for make_full, make_subset in pairs:
        subset_loss, subset_grad = loss_and_grad(make_subset(), logits[:, kept], labels[:, kept])
        for mode, block in both_modes(make_full):
            loss, grad = loss_and_grad(block, logits, labels, *(
                [mask] if isinstance(block, WeightedFocalLoss) else [None, mask]))
            np.testing.assert_allclose(loss, subset_loss, rtol=1e-6, err_msg=mode)
            np.testing.assert_allclose(grad[:, kept], subset_grad, rtol=1e-6, err_msg=mode)
            assert not grad[:, [1, 4, 5]].any(), "masked attributes must get no gradient"
    # a sample with nothing counted contributes 0 (and no NaN)
    mask[1] = 0
    loss, grad = loss_and_grad(WeightedFocalLoss(ratios), logits, labels, mask)
    assert loss[1] == 0 and not grad[1].any() and np.isfinite(loss).all()


def test_hybridized_history_loss_switches_from_unweighted_to_weighted():
    # Epochs before weight_epoch pass no weights; later ones do: one hybridized block serves both.
    rng = np.random.RandomState(7)
    logits, labels = rng.randn(3, 4), (rng.rand(3, 4) < .5).astype(np.float32)
    weights = 1 + rng.rand(3, 4).astype(np.float32)
    hybrid = AttentionHistoryLoss()
    hybrid.hybridize()
    imperative = AttentionHistoryLoss()
    for std_weights in (None, weights, None):
        np.testing.assert_array_equal(loss_and_grad(hybrid, logits, labels, std_weights)[0],
                                      loss_and_grad(imperative, logits, labels, std_weights)[0])
    assert not np.allclose(loss_and_grad(imperative, logits, labels, weights)[0],
                           loss_and_grad(imperative, logits, labels)[0])


def test_loss_input_errors():
    focal = WeightedFocalLoss(np.full(4, .5))
    with pytest.raises(ValueError, match="labels"):
        focal(nd.zeros((2, 4)), nd.zeros((2, 3)))
    with pytest.raises(ValueError, match="C = 4"):
        focal(nd.zeros((2, 5)), nd.zeros((2, 5)))
    with pytest.raises(ValueError, match="std_weights"):
        AttentionHistoryLoss()(nd.zeros((2, 4)), nd.zeros((2, 4)), nd.ones((2, 3)))
    with pytest.raises(ValueError, match="batch_ratios"):
        WeightedFocalLoss(np.array([[.5]]))
    with pytest.raises(ValueError, match="batch_ratios"):
        WeightedFocalLoss(np.array([.5, np.inf]))


# ------------------------------------------------------------------ prediction history

def test_prediction_history_schedule():
    history = PredictionHistory(6, 3, length=5, start_epoch=2, weight_epoch=5)
    preds = nd.array(np.full((2, 3), 0.8))
    assert history.update(np.array([1, 4]), preds, epoch=1) is False
    assert not history.state_dict()["history"].any(), "nothing may be recorded before start_epoch"
    assert history.std_weights(np.array([1, 4]), epoch=4) is None
    for epoch in (2, 3, 4):
        assert history.update(np.array([1, 4]), preds, epoch=epoch)
    weights = history.std_weights(np.array([1, 4, 0]), epoch=5).asnumpy()
    # three recorded 0.8 and two unrecorded zeros (quirk 5): v = 0.1536
    var = np.var([0.8, 0.8, 0.8, 0, 0])
    np.testing.assert_allclose(weights[:2], 1 + np.sqrt(var + var ** 2 / 4), rtol=1e-6)
    np.testing.assert_array_equal(weights[2], 1.0)  # never recorded: all zeros, weight 1


def test_prediction_history_is_keyed_by_dataset_index():
    rng = np.random.RandomState(8)
    history = PredictionHistory(10, 2, length=3, start_epoch=0)
    first, second = rng.rand(4, 2).astype(np.float32), rng.rand(4, 2).astype(np.float32)
    history.update(nd.array([7, 2, 9, 0]), nd.array(first), epoch=0)
    history.update(np.array([2, 5, 7, 3]), second, epoch=0)  # shuffled order, overlapping samples
    buffer = history.state_dict()["history"]
    assert buffer.shape == (3, 10, 2)
    np.testing.assert_array_equal(buffer[0, [2, 5, 7, 3]], second)
    np.testing.assert_array_equal(buffer[1, [2, 7]], first[[1, 0]])
    np.testing.assert_array_equal(buffer[0, [9, 0]], first[[2, 3]])
    np.testing.assert_array_equal(buffer[1, [9, 0, 5, 3]], 0)
    assert not buffer[:, [1, 4, 6, 8]].any() and not buffer[2].any()


def test_prediction_history_state_round_trip_and_devices():
    rng = np.random.RandomState(9)
    history = PredictionHistory(8, 3, ctx=mx.cpu(0))
    for epoch in range(2, 6):
        history.update(rng.permutation(8)[:5], nd.array(rng.rand(5, 3), ctx=mx.cpu(1)), epoch)
    state = history.state_dict()
    assert all(isinstance(v, (np.ndarray, int)) for v in state.values())
    restored = PredictionHistory(8, 3, ctx=mx.cpu(1))
    restored.load_state_dict(state)
    rows = nd.array([0, 3, 5, 7], ctx=mx.cpu(1))
    weights = restored.std_weights(rows, epoch=6, ctx=mx.cpu(0))
    assert weights.context == mx.cpu(0)
    np.testing.assert_array_equal(weights.asnumpy(), history.std_weights(rows, epoch=6).asnumpy())
    np.testing.assert_allclose(weights.asnumpy(),
                               history_std_weights(state["history"][:, [0, 3, 5, 7]]), rtol=1e-6)


def test_prediction_history_errors():
    history = PredictionHistory(5, 3)
    with pytest.raises(ValueError, match=r"'history' expected shape \(5, 5, 3\)"):
        history.load_state_dict({"history": np.zeros((5, 6, 3))})
    with pytest.raises(ValueError, match="history"):
        history.load_state_dict({"buffer": np.zeros((5, 5, 3))})
    with pytest.raises(ValueError, match=r"indices in \[0, 5\)"):
        history.update(np.array([1, 5]), np.zeros((2, 3)), epoch=3)
    with pytest.raises(ValueError, match="distinct"):
        history.update(np.array([1, 1]), np.zeros((2, 3)), epoch=3)
    with pytest.raises(ValueError, match="N x 3"):
        history.update(np.array([1, 2]), np.zeros((2, 4)), epoch=3)
    with pytest.raises(ValueError, match="length"):
        PredictionHistory(5, 3, length=1)
    with pytest.raises(ValueError, match="T >= 2"):
        history_std_weights(np.zeros((1, 2, 3)))


def test_history_std_weights_ndarray_matches_numpy():
    rng = np.random.RandomState(10)
    history = rng.rand(5, 7, 4)
    np.testing.assert_allclose(history_std_weights(nd.array(history, dtype="float64")).asnumpy(),
                               history_std_weights(history), rtol=1e-12)
    var = history.var(axis=0)
    np.testing.assert_allclose(history_std_weights(history), 1 + np.sqrt(var + var ** 2 / 4))


# ------------------------------------------------------------------ class weights

@pytest.mark.parametrize("case", golden_cases("classweights_"))
def test_class_weights_golden(case):
    g = load_golden(case)
    weights = class_weights(g["labels"])
    assert weights.dtype == np.float32
    assert_golden(weights, g["weights"], *golden_tolerance(case, "weights"), what=case)
    assert_golden(class_weights(nd.array(g["labels"])), g["weights"],
                  *golden_tolerance(case, "weights"), what=case + " NDArray")


def test_wider_constants_golden():
    g = load_golden("wider_constants.npz")
    assert WIDER_CLASS_WEIGHTS.dtype == np.float32 and WIDER_BATCH_RATIOS.dtype == np.float32
    assert_golden(WIDER_CLASS_WEIGHTS, g["cl_weights"],
                  *golden_tolerance("wider_constants.npz", "cl_weights"), what="cl_weights")
    assert_golden(WIDER_BATCH_RATIOS, g["batch_ratios"],
                  *golden_tolerance("wider_constants.npz", "batch_ratios"), what="batch_ratios")


def test_class_weights_without_positives():
    labels = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 1], [1, 0, 1]])
    weights = class_weights(labels)
    assert weights[1] == np.inf, "faithful: an attribute without positives gets +inf (IL-12)"
    np.testing.assert_array_equal(weights[[0, 2]], [1.0, 1.0])
    with pytest.raises(ValueError, match="attribute longHair has no positive"):
        batch_ratios_from_labels(labels, attribute_names=["Male", "longHair", "Hat"])
    with pytest.raises(ValueError, match="attribute 1 has no positive"):
        class_weights(labels, strict=True)
    with pytest.raises(ValueError, match="0/1"):
        class_weights(labels * 2 - 1, strict=True)
    ratios = batch_ratios_from_labels(np.array([[1, 1], [0, 1], [0, 0], [0, 1]]))
    assert ratios.dtype == np.float32
    np.testing.assert_allclose(ratios, [1 / 3., 1.0], rtol=1e-7)


# ------------------------------------------------------------------ training on real images

def test_focal_loss_trains_a_classifier_on_fashion_mnist(fashion_mnist_dir):
    from imbalanced_attr.fashion_attributes import attribute_labels
    from training_runtime.fashion_mnist import load_split
    images, classes = load_split("train", fashion_mnist_dir)
    x = nd.array(images[:512].reshape(512, -1) / 255.)
    labels = (attribute_labels(classes[:512]) > 0).astype(np.float32)
    mx.random.seed(0)
    net = gluon.nn.Dense(labels.shape[1])
    net.initialize(mx.init.Xavier())
    loss_fn = WeightedFocalLoss(batch_ratios_from_labels(labels))
    loss_fn.hybridize()
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.5})
    y = nd.array(labels)
    losses = []
    for _ in range(40):
        with autograd.record():
            loss = loss_fn(net(x), y)
        loss.backward()
        trainer.step(x.shape[0])
        losses.append(loss.mean().asscalar())
    assert losses[-1] < 0.5 * losses[0], losses
