"""The TrainingTask contract of every registered fine-grained method, and the dataset registry.

One generic module, parametrised over ``fgvc_gluon.registry.METHODS``: each
method is built through its registry entry (``entry.build(ModelConfig, label
names, ctx)``) at its demo size, with 3 classes and no ImageNet weights, on
the cpu; then

(a) ``predict`` gives an ordered dict of N×K outputs; (b) ``training_loss``
is (N,) exactly; (c) after ``backward`` every trainable parameter of
``param_groups`` has a non-zero gradient; (d) every grouped parameter is in
``blocks()``, whose names are the ones train_fgvc.py always checkpointed; (e)
a checkpoint of ``blocks()`` loads into a freshly built task and gives the
same predictions; (f) the knob defaults are build_method's signature
defaults, and the recipe's settings are the method's ``defaults``.
"""
import collections
import io

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon, nd

import fgvc_gluon.family  # noqa: F401  (registers every method and dataset)
from fgvc_gluon import data as fgvc_data
from fgvc_gluon.registry import DATASETS, DEMO_COMMON, METHODS, signature_defaults
from fgvc_gluon.task import FGVCTask
from training_runtime import checkpoint
from training_runtime.config import ModelConfig
from training_runtime.errors import UserError
from training_runtime.schedule import StepSchedule

LABELS = ("first", "second", "third")
EVAL_EPOCH = 30           # past S3N's random evaluation mode (epochs <= 20): deterministic
OPTIMISATION = ("lr", "momentum", "wd", "batch_size", "epochs", "lr_steps", "lr_factor")


def build(entry, seed=0):
    """The method at its demo backbone and size, 3 classes, from scratch, on the cpu."""
    mx.random.seed(seed)
    np.random.seed(seed)
    options = {knob.name: entry.demo.get(knob.name, knob.default) for knob in entry.knobs}
    config = ModelConfig(method=entry.name, backbone=entry.demo["backbone"],
                         image_size=entry.demo["image_size"], pretrained=False, options=options)
    return entry.build(config, LABELS, mx.cpu())


def batch(entry, seed=0):
    """(data 2×3×S×S, int64 labels as the loader gives them, int64 dataset indices)."""
    size = entry.demo["image_size"]
    data = nd.array(np.random.RandomState(seed).normal(size=(2, 3, size, size)).astype(np.float32))
    return data, nd.array([0, 2], dtype="int64"), nd.array([5, 7], dtype="int64")


def group_params(task):
    for group in task.param_groups():
        params = group.params.values() if hasattr(group.params, "values") else group.params
        for param in params:
            yield group.name, param


def legacy_block_names(task):
    """The checkpointed names of train_fgvc.method_blocks: 'net', then the other Block
    attributes by name. (It also listed blocks without parameters, e.g. the losses'
    ``_ce``: an empty ParameterDict is truthy; they contributed no arrays.)"""
    names = ["net"]
    for name, value in sorted(vars(task).items()):
        if (isinstance(value, gluon.Block) and value is not task.net
                and list(value.collect_params().keys())):
            names.append(name)
    return names


def reseeded_predict(task, data, epoch, seed=7):
    mx.random.seed(seed)
    np.random.seed(seed)
    return collections.OrderedDict((k, v.asnumpy()) for k, v in task.predict(data, epoch).items())


@pytest.fixture(scope="module", params=METHODS.names())
def entry(request):
    return METHODS.get(request.param)


def test_registration_order_and_family():
    family = fgvc_gluon.family.FAMILY
    assert METHODS.names() == ("baseline", "mcloss", "s3n", "centerloss")  # baseline: the default
    assert (family.name, family.script, family.default_dataset) == ("fgvc", "train_fgvc", "cub")
    assert family.methods is METHODS and family.datasets is DATASETS
    assert family.demo_dataset == "fashion-mnist"


def test_predict_loss_gradients_and_blocks(entry):
    task = build(entry)
    assert isinstance(task, FGVCTask) and task.metric_name == "top1"
    data, label, index = batch(entry)
    # (a) predictions: an ordered dict of N×K, the main branch first
    out = task.predict(data, 0)
    assert isinstance(out, collections.OrderedDict) and len(out) >= 1
    assert all(v.shape == (2, len(LABELS)) for v in out.values()), {k: v.shape for k, v in out.items()}
    # (b) the per-sample loss of a slice, labels as int64 from the loader
    with autograd.record():
        loss = task.training_loss(data, label, index, 0)
    assert loss.shape == (2,)
    loss.backward()
    # (c) every trainable parameter of every group gets a gradient (BatchNorm running
    # statistics have grad_req 'null' and are skipped)
    trainable = [(name, p) for name, p in group_params(task) if p.grad_req != "null"]
    assert trainable
    without = ["%s/%s" % (name, p.name) for name, p in trainable
               if not np.any(p.grad().asnumpy() != 0)]
    assert not without, "no gradient reaches %s" % without
    # (d) every grouped parameter is checkpointed; the block names are the old ones
    blocks = task.check_declared()
    assert list(blocks) == legacy_block_names(task)
    names = [p.name for _, p in group_params(task)]
    assert len(names) == len(set(names)), "a parameter is in two groups"


def test_checkpoint_round_trip(entry, tmp_path):
    task = build(entry, seed=0)
    data, label, index = batch(entry)
    with autograd.record():   # moves the BatchNorm statistics away from their initial values
        task.training_loss(data, label, index, 0).backward()
    expected = reseeded_predict(task, data, 0)
    expected_late = reseeded_predict(task, data, EVAL_EPOCH)
    arrays = checkpoint.capture(task.blocks(), {}, StepSchedule(0.1), {"step": 0}, {},
                                workdir=str(tmp_path))
    saved_blocks = {key.split("/")[1] for key in arrays if key.startswith("param/")}
    assert saved_blocks == set(task.blocks())
    path = str(tmp_path / "method.ckpt")
    checkpoint.save(path, arrays)

    fresh = build(entry, seed=1)
    before = reseeded_predict(fresh, data, EVAL_EPOCH)
    assert not all(np.allclose(before[k], expected_late[k]) for k in before), "seeds 0 and 1 agree"
    checkpoint.load_parameters(path, fresh.blocks(), {})
    for epoch, reference in ((0, expected), (EVAL_EPOCH, expected_late)):
        # epoch 0: S3N's random evaluation mode, the same draws after the same reseed
        got = reseeded_predict(fresh, data, epoch)
        assert list(got) == list(reference)
        for branch in got:
            np.testing.assert_allclose(got[branch], reference[branch], rtol=1e-6, atol=1e-6,
                                       err_msg="%s epoch %d" % (branch, epoch))


def test_evaluate_and_test_report(entry):
    task = build(entry)
    data, label, _ = batch(entry)
    batches = [(data, label), (data[:1], label[:1])]
    outputs = task.predict(data, EVAL_EPOCH)
    expected = collections.OrderedDict()
    for branch, logits in outputs.items():
        predicted = logits.asnumpy().argmax(axis=1)
        hits = (predicted == label.asnumpy()).sum() + (predicted[0] == label.asnumpy()[0])
        expected[branch] = hits / 3.0
    metrics = task.evaluate(iter(batches), EVAL_EPOCH)
    main = next(iter(expected))
    wanted = {"top1": expected[main]}
    if len(expected) > 1:
        wanted.update(("top1_%s" % b, v) for b, v in expected.items())
    assert set(metrics) == set(wanted)
    for key in wanted:
        assert metrics[key] == pytest.approx(wanted[key]) and isinstance(metrics[key], float)
    out = io.StringIO()
    report = task.test_report(iter(batches), EVAL_EPOCH, out)
    assert report == dict(metrics, images=3)
    lines = out.getvalue().splitlines()
    assert lines[0] == "test top-1 %.4f on 3 images" % expected[main]
    assert len(lines) == (1 + len(expected) if len(expected) > 1 else 1)
    with pytest.raises(ValueError, match="batches"):
        task.evaluate(iter([]), 0)


def test_knobs_recipe_and_demo_agree_with_build_method(entry):
    defaults = signature_defaults(entry.build_method)
    for knob in entry.knobs:
        assert knob.keyword in defaults, knob.name
        assert knob.default == defaults[knob.keyword], (knob.name, knob.default, defaults[knob.keyword])
        assert knob.check(knob.default) == knob.default
    assert defaults["backbone"] == entry.recipe["backbone"]
    if defaults["image_size"] is not None:   # center loss derives it from the backbone
        assert defaults["image_size"] == entry.recipe["image_size"]
    assert entry.recipe["schedule"] == "step"
    assert entry.recipe["backbone"] in entry.backbones and entry.demo["backbone"] in entry.backbones
    for key, value in DEMO_COMMON.items():
        if key not in ("train_limit", "val_limit"):   # S3N's demo uses fewer images
            assert entry.demo[key] == value, key
    task = build(entry)
    # one home for the upstream numbers: the recipe is the method's ``defaults``
    assert {k: task.defaults[k] for k in OPTIMISATION} == {k: entry.recipe[k] for k in OPTIMISATION}
    assert task.defaults["image_size"] == entry.demo["image_size"]
    assert task.defaults["lr_steps"] is not entry.recipe["lr_steps"]


def test_smooth_ratio_one_means_plain_cross_entropy():
    for name in ("baseline", "s3n"):
        knob = METHODS.get(name).knob("smooth_ratio")
        assert knob.check(1) is None and knob.check(0.85) == 0.85
        with pytest.raises(ValueError):
            knob.check(1.5)


@pytest.mark.parametrize("name", fgvc_data.DATASETS)
def test_dataset_entries(name):
    entry = DATASETS.get(name)
    splits = {"fashion-mnist": ("train", "val", "test"), "aircraft": ("trainval", "test", "test"),
              "flowers": ("trainval", "test", "test")}
    assert entry.splits == splits.get(name, ("train", "test", "test"))
    assert entry.demo == (name == "fashion-mnist")
    assert entry.summary
    if name != "fashion-mnist":   # the reader is get_dataset: a missing root is the user's error
        with pytest.raises(UserError):
            entry.reader(None, entry.splits[0])


def test_dataset_registry_order_and_demo_reader(fashion_mnist_dir):
    assert DATASETS.names() == fgvc_data.DATASETS
    val = DATASETS.get("fashion-mnist").reader(fashion_mnist_dir, "val", limit=5)
    assert len(val) == 5 and val.num_classes == 10
    image, label = val[0]
    assert image.shape == (28, 28, 3) and isinstance(label, int)
