"""Checkpoints: complete round trip, atomic writes, crash while saving, disk space, bad files."""
import collections
import os
import random
import shutil

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

from training_runtime import checkpoint
from training_runtime.errors import UserError
from training_runtime.schedule import PlateauSchedule

META = {"script": "test", "model": "mlp", "num_classes": 3}


def _setup(seed=0):
    """Two blocks, one trainer each (SGD with momentum), a plateau schedule."""
    mx.random.seed(seed)
    blocks = collections.OrderedDict()
    blocks["body"] = gluon.nn.HybridSequential()
    blocks["body"].add(gluon.nn.Dense(8, in_units=4, activation="relu"), gluon.nn.BatchNorm(in_channels=8))
    blocks["head"] = gluon.nn.Dense(3, in_units=8)
    trainers = collections.OrderedDict()
    schedule = PlateauSchedule(0.1)
    for name, block in blocks.items():
        block.initialize(mx.init.Xavier())
        trainers[name] = schedule.attach(gluon.Trainer(
            block.collect_params(), "sgd", {"learning_rate": 0.1, "momentum": 0.9, "wd": 5e-4}))
    return blocks, trainers, schedule


def _steps(blocks, trainers, n, start=0):
    for step in range(start, start + n):
        rs = np.random.RandomState(step)
        x = mx.nd.array(rs.rand(6, 4))
        y = mx.nd.array(rs.randint(0, 3, 6))
        with autograd.record():
            loss = gluon.loss.SoftmaxCrossEntropyLoss()(blocks["head"](blocks["body"](x)), y)
        loss.backward()
        for trainer in trainers.values():
            trainer.step(6)


def _params(blocks):
    return {"%s/%s" % (b, k): p.data().asnumpy()
            for b, block in blocks.items() for k, p in block._collect_params_with_prefix().items()}


def _save(tmp_path, blocks, trainers, schedule, step, name=checkpoint.LAST, extra=None):
    arrays = checkpoint.capture(blocks, trainers, schedule, {"step": step, "epoch": 0}, META,
                                extra=extra, workdir=str(tmp_path))
    path = str(tmp_path / name)
    checkpoint.save(path, arrays)
    return path


def test_round_trip_continues_exactly(tmp_path):
    blocks, trainers, schedule = _setup()
    _steps(blocks, trainers, 3)
    schedule.end_epoch(0, 0.4)
    schedule.end_epoch(1, 0.3)
    history = {"history": np.arange(12, dtype=np.float32).reshape(2, 2, 3), "count": 2}
    random.seed(5)
    np.random.seed(7)
    path = _save(tmp_path, blocks, trainers, schedule, 3, extra={"history": history})
    expected_random, expected_np = random.random(), np.random.rand()
    _steps(blocks, trainers, 4, start=3)
    expected = _params(blocks)

    blocks2, trainers2, schedule2 = _setup(seed=1)  # different initial values
    progress, extra = checkpoint.restore(path, blocks2, trainers2, schedule2, META)
    assert progress == {"step": 3, "epoch": 0}
    assert schedule2.state_dict() == schedule.state_dict()
    np.testing.assert_array_equal(extra["history"]["history"], history["history"])
    assert extra["history"]["count"] == 2
    assert (random.random(), np.random.rand()) == (expected_random, expected_np)
    _steps(blocks2, trainers2, 4, start=3)  # momentum restored: identical continuation
    actual = _params(blocks2)
    for key in expected:
        np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)


def test_momentum_is_part_of_the_checkpoint(tmp_path):
    """Without the trainer states the continuation differs (the test above can fail)."""
    blocks, trainers, schedule = _setup()
    _steps(blocks, trainers, 3)
    path = _save(tmp_path, blocks, trainers, schedule, 3)
    _steps(blocks, trainers, 2, start=3)
    blocks2, trainers2, schedule2 = _setup(seed=1)
    checkpoint.restore(path, blocks2, {}, schedule2, META)  # parameters only
    _steps(blocks2, trainers2, 2, start=3)
    assert not np.allclose(_params(blocks2)["head/weight"], _params(blocks)["head/weight"])


def _visible(tmp_path):
    return sorted(os.listdir(str(tmp_path)))


def test_crash_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    blocks, trainers, schedule = _setup()
    path = _save(tmp_path, blocks, trainers, schedule, 1)
    before = open(path, "rb").read()
    _steps(blocks, trainers, 2)

    def crashing_writer(fileobj, arrays):
        fileobj.write(b"PK\x03\x04 partial payload")
        raise IOError("simulated crash mid-write")

    monkeypatch.setattr(checkpoint, "_write_npz", crashing_writer)
    with pytest.raises(IOError, match="simulated"):
        _save(tmp_path, blocks, trainers, schedule, 3)
    assert open(path, "rb").read() == before
    assert _visible(tmp_path) == [checkpoint.LAST]  # no partial or temporary file left
    monkeypatch.undo()
    progress, _ = checkpoint.restore(path, *_setup(seed=2), meta=META)
    assert progress["step"] == 1


def test_no_partial_file_is_visible_during_the_write(tmp_path, monkeypatch):
    blocks, trainers, schedule = _setup()
    path = _save(tmp_path, blocks, trainers, schedule, 1)
    seen = []
    real_writer = checkpoint._write_npz

    def spying_writer(fileobj, arrays):
        real_writer(fileobj, arrays)
        seen.append((open(path, "rb").read(), [f for f in _visible(tmp_path) if not f.startswith(".")]))

    before = open(path, "rb").read()
    monkeypatch.setattr(checkpoint, "_write_npz", spying_writer)
    _save(tmp_path, blocks, trainers, schedule, 2)
    assert seen[0] == (before, [checkpoint.LAST])  # the old file until os.replace
    assert _visible(tmp_path) == [checkpoint.LAST]
    assert checkpoint.read(path)[0]["progress"]["step"] == 2


def test_disk_space_is_checked_before_touching_anything(tmp_path, monkeypatch):
    blocks, trainers, schedule = _setup()
    path = _save(tmp_path, blocks, trainers, schedule, 1)
    before = open(path, "rb").read()
    usage = shutil.disk_usage(str(tmp_path))
    monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                        lambda d: usage._replace(free=1024 * 1024 // 2))
    with pytest.raises(UserError, match=r"not enough disk space in .*: need [0-9.]+ MB, have 0\.5 MB"):
        _save(tmp_path, blocks, trainers, schedule, 2)
    assert open(path, "rb").read() == before
    assert _visible(tmp_path) == [checkpoint.LAST]


def test_non_finite_parameters_are_never_saved(tmp_path):
    blocks, trainers, schedule = _setup()
    path = _save(tmp_path, blocks, trainers, schedule, 1)
    before = open(path, "rb").read()
    weight = blocks["head"].weight
    weight.set_data(weight.data() * float("nan"))
    with pytest.raises(checkpoint.DivergedError, match="not finite at step 7"):
        _save(tmp_path, blocks, trainers, schedule, 7)
    assert open(path, "rb").read() == before


def test_missing_corrupt_and_incompatible_checkpoints(tmp_path):
    blocks, trainers, schedule = _setup()
    path = _save(tmp_path, blocks, trainers, schedule, 1)
    with pytest.raises(UserError, match="--resume: .*nowhere.ckpt not found"):
        checkpoint.restore(str(tmp_path / "nowhere.ckpt"), blocks, trainers, schedule, META)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        checkpoint.restore(str(bad), blocks, trainers, schedule, META)
    with pytest.raises(UserError, match="num_classes=3, this run has num_classes=5"):
        checkpoint.restore(path, blocks, trainers, schedule, dict(META, num_classes=5))
    other = collections.OrderedDict(body=blocks["body"], head=gluon.nn.Dense(5, in_units=8))
    other["head"].initialize()
    with pytest.raises(UserError, match="head/weight of shape \\(3, 8\\), the model expects \\(5, 8\\)"):
        checkpoint.restore(path, other, {}, schedule, META)


def test_best_is_an_atomic_link_that_survives_rewriting_last(tmp_path):
    blocks, trainers, schedule = _setup()
    last = _save(tmp_path, blocks, trainers, schedule, 1)
    best = str(tmp_path / checkpoint.BEST)
    checkpoint.link_atomic(last, best)
    _steps(blocks, trainers, 1)
    _save(tmp_path, blocks, trainers, schedule, 2)  # a new file replaces last
    assert checkpoint.read(best)[0]["progress"]["step"] == 1
    assert checkpoint.read(last)[0]["progress"]["step"] == 2
    assert _visible(tmp_path) == [checkpoint.BEST, checkpoint.LAST]


def test_parameters_with_deferred_shapes_load_from_a_checkpoint(tmp_path):
    # a freshly built network whose in_units Gluon infers at the first forward
    blocks, trainers, schedule = _setup()
    _steps(blocks, trainers, 2)
    path = _save(tmp_path, blocks, trainers, schedule, step=2)
    fresh = collections.OrderedDict()
    fresh["body"] = gluon.nn.HybridSequential()
    fresh["body"].add(gluon.nn.Dense(8, activation="relu"), gluon.nn.BatchNorm())
    fresh["head"] = gluon.nn.Dense(3)
    for block in fresh.values():
        block.initialize()
    assert fresh["head"].weight.shape == (3, 0)
    checkpoint.load_parameters(path, fresh, META)
    saved, loaded = _params(blocks), _params(fresh)
    assert saved.keys() == loaded.keys()
    for key in saved:
        np.testing.assert_array_equal(loaded[key], saved[key], err_msg=key)
    # a known dimension that differs is still refused
    wrong = collections.OrderedDict(body=gluon.nn.HybridSequential(), head=gluon.nn.Dense(3, in_units=5))
    wrong["body"].add(gluon.nn.Dense(8, activation="relu"), gluon.nn.BatchNorm())
    for block in wrong.values():
        block.initialize()
    with pytest.raises(UserError, match=r"head/weight of shape \(3, 8\), the model expects \(3, 5\)"):
        checkpoint.load_parameters(path, wrong, META)
