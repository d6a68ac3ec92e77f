"""--ema DECAY (training_runtime.ema): the moving average against numpy, evaluation with it,
exact resume, invariance across devices, --test / --predict load it, off by default.

In process: the toy tasks of tests/test_runner.py (and one with a BatchNorm layer) and
one tiny real run of the fine-grained baseline on the demo data."""
import dataclasses
import json
import os

import mxnet as mx
import numpy as np
import pytest
from mxnet import gluon

from test_runner import LinearTask, StopAt, linear_data, make_config, toy_family
from training_runtime import app, checkpoint, config, loop
from training_runtime.errors import UserError
from training_runtime.schedule import make_schedule

EPS = 1e-5  # Gluon's BatchNorm epsilon


class NormTask(LinearTask):
    """y = dense2(BatchNorm(dense1(x))): trainable weights and BatchNorm running statistics."""

    def __init__(self):
        self.net = gluon.nn.HybridSequential()
        self.net.add(gluon.nn.Dense(3, in_units=4), gluon.nn.BatchNorm(in_channels=3, momentum=0.5),
                     gluon.nn.Dense(1, in_units=3))
        self.net.initialize(mx.init.Xavier())
        self.per_sample = True
        self.after_steps = 0


def numpy_forward(values, x):
    """NormTask's network in evaluation mode from ``values`` (structural name -> array)."""
    h = x.dot(values["0.weight"].T) + values["0.bias"]
    h = (h - values["1.running_mean"]) / np.sqrt(values["1.running_var"] + EPS)
    h = h * values["1.gamma"] + values["1.beta"]
    return (h.dot(values["2.weight"].T) + values["2.bias"]).reshape(-1)


def live(task):
    return {k: p.data().asnumpy().copy() for k, p in task.net._collect_params_with_prefix().items()}


def averages(runner):
    return {k.split("/", 1)[1]: v.asnumpy() for k, v in runner.ema.averages.items()}


class Snapshots(loop.Callback):
    """The live weights after every step."""

    def __init__(self):
        self.values = []

    def on_step_end(self, runner):
        self.values.append(live(runner.task))


def runner_for(save_dir, task, ctx=(mx.cpu(),), callbacks=(), ema=0.7, epochs=1, **runtime):
    os.makedirs(str(save_dir), exist_ok=True)
    run = make_config(**dict(dict(figures="none"), **runtime))
    run.optim = dataclasses.replace(run.optim, ema=ema, epochs=epochs)
    data = linear_data()
    return loop.Runner(task, run, list(ctx), make_schedule(run.optim), str(save_dir), data, data,
                       {"script": "test"}, callbacks, log=lambda *a: None)


def metrics(save_dir):
    return [json.loads(line) for line in open(os.path.join(str(save_dir), loop.METRICS_FILE))]


def test_the_average_follows_the_formula_and_is_what_is_evaluated(tmp_path):
    mx.random.seed(0)
    task = NormTask()
    first = live(task)  # the weights the first step starts from
    snapshots = Snapshots()
    runner = runner_for(tmp_path, task, callbacks=[snapshots], ema=0.7)
    assert sorted(runner.ema.params) == sorted("net/" + k for k in first)  # weights and statistics
    runner.run()
    assert len(snapshots.values) == 5 and runner.ema.updates == 5
    expected = dict(first)
    for step in snapshots.values:
        expected = {k: 0.7 * expected[k] + (1 - 0.7) * step[k] for k in expected}
    got = averages(runner)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert not np.allclose(got["1.running_mean"], snapshots.values[-1]["1.running_mean"])
    # the live weights are back after the evaluation (training goes on from them)
    for name, value in live(task).items():
        np.testing.assert_array_equal(value, snapshots.values[-1][name], err_msg=name)
    # the evaluation: the averaged weights' network, computed here in numpy
    data = linear_data()
    x = np.stack([data[i][0].asnumpy() for i in range(len(data))])
    y = np.array([float(data[i][1]) for i in range(len(data))], np.float32)
    record = metrics(tmp_path)[-1]
    assert record["weights"] == "ema"
    assert record["val"]["neg_mse"] == pytest.approx(-np.mean((numpy_forward(expected, x) - y) ** 2),
                                                     rel=1e-5)
    assert record["val"]["neg_mse"] != pytest.approx(
        -np.mean((numpy_forward(snapshots.values[-1], x) - y) ** 2), rel=1e-3)


def test_training_is_unchanged_and_nothing_is_added_without_ema(tmp_path):
    mx.random.seed(0)
    with_ema = runner_for(tmp_path / "ema", NormTask(), ema=0.7, epochs=2)
    with_ema.run()
    mx.random.seed(0)
    plain = runner_for(tmp_path / "plain", NormTask(), ema=None, epochs=2)
    assert plain.ema is None and config.OptimConfig().ema is None
    plain.run()
    for name, value in live(plain.task).items():  # the swaps never touch training
        np.testing.assert_array_equal(live(with_ema.task)[name], value, err_msg=name)
    arrays = checkpoint.read(str(tmp_path / "plain" / checkpoint.LAST))[1]
    assert not [k for k in arrays if k.startswith("extra/")]
    assert all("weights" not in r for r in metrics(tmp_path / "plain"))
    assert [r["train_loss"] for r in metrics(tmp_path / "plain")] == \
        [r["train_loss"] for r in metrics(tmp_path / "ema")]


def test_resume_restores_the_average_exactly(tmp_path):
    mx.random.seed(0)
    reference = runner_for(tmp_path / "ref", NormTask(), epochs=2, checkpoint_every=3)
    reference.run()
    mx.random.seed(0)
    crashed = runner_for(tmp_path / "run", NormTask(), epochs=2, checkpoint_every=3,
                         callbacks=[StopAt(7)])
    with pytest.raises(KeyboardInterrupt):
        crashed.run()
    saved = checkpoint.read(str(tmp_path / "run" / checkpoint.LAST))[1]
    assert saved["extra/ema/net/1.running_var"].shape == (3,)
    mx.random.seed(5)  # another initialisation: everything comes from the checkpoint
    resumed = runner_for(tmp_path / "run", NormTask(), epochs=2, checkpoint_every=3)
    resumed.resume(str(tmp_path / "run" / checkpoint.LAST))
    assert resumed.step == 6 and resumed.ema.updates == 6
    resumed.run()
    for name, value in averages(reference).items():
        np.testing.assert_array_equal(averages(resumed)[name], value, err_msg=name)
    for name, value in live(reference.task).items():
        np.testing.assert_array_equal(live(resumed.task)[name], value, err_msg=name)
    assert [r["val"] for r in metrics(tmp_path / "run")] == [r["val"] for r in metrics(tmp_path / "ref")]


def test_the_average_does_not_depend_on_the_device_split(tmp_path):
    results = []
    for name, ctx in (("one", [mx.cpu(0)]), ("two", [mx.cpu(0), mx.cpu(1)])):
        mx.random.seed(0)
        task = LinearTask()
        task.net.collect_params().reset_ctx(ctx)
        runner = runner_for(tmp_path / name, task, ctx=ctx, ema=0.8, epochs=2)
        runner.run()
        results.append((averages(runner), [r["val"]["neg_mse"] for r in metrics(tmp_path / name)]))
    (one, val_one), (two, val_two) = results
    for name, value in one.items():
        np.testing.assert_allclose(two[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    # both devices evaluated the average (a half-swapped model would differ)
    np.testing.assert_allclose(val_two, val_one, rtol=1e-5)


def test_the_flag_is_range_checked_and_documented():
    family = toy_family()
    for value, message in ((1.0, "--ema: expected less than 1, got 1.0"),
                           (0.0, "--ema: expected a positive number, got 0.0"),
                           (float("nan"), "--ema: expected a finite number")):
        with pytest.raises(UserError, match=message):
            config.resolve(family, {"ema": value})
    assert config.resolve(family, {"ema": 0.999}).optim.ema == 0.999
    assert config.resolve(family, {}).optim.ema is None
    parser = app.build_parser(family, "toy\n\nscript")
    assert "--ema DECAY" in parser.format_help()
    assert parser.parse_args(["--ema", "0.5"]).ema == 0.5


def test_test_loads_the_average(tmp_path, fashion_mnist_dir, capsys, monkeypatch):
    from fgvc_gluon.family import FAMILY
    run = str(tmp_path / "run")
    report = app.main(FAMILY, ["--method", "baseline", "--train-limit", "16", "--val-limit", "8",
                               "--test-limit", "8", "--batch-size", "8", "--epochs", "1",
                               "--max-steps", "2", "--seed", "1", "--figures", "none",
                               "--picture-images", "0", "--ema", "0.5", "--save-dir", run])
    out = capsys.readouterr().out
    assert "val (EMA) top1" in out and "with the moving average of the weights (--ema 0.5)" in out
    with open(os.path.join(run, loop.TEST_FILE)) as f:
        assert json.load(f)["weights"] == "ema"
    built = []
    build_task = app.build_task
    monkeypatch.setattr(app, "build_task", lambda *a, **k: built.append(build_task(*a, **k)) or built[-1])
    # --test, --predict, --explain and export share this loader (app._inference_task)
    tested = app.main(FAMILY, ["--test", run])
    assert tested == report
    assert "weights: the moving average (--ema 0.5) of %s" % os.path.join(run, checkpoint.BEST) \
        in capsys.readouterr().out
    arrays = checkpoint.read(os.path.join(run, checkpoint.BEST))[1]
    loaded = {"net/" + k: p.data().asnumpy() for k, p in built[0].net._collect_params_with_prefix().items()}
    averaged = [k for k in loaded if "extra/ema/" + k in arrays]
    assert averaged
    for key, value in loaded.items():  # the average where there is one, else the parameter
        np.testing.assert_array_equal(value, arrays[("extra/ema/" if key in averaged else "param/") + key],
                                      err_msg=key)
    # the average is not the live weights
    assert any(not np.array_equal(arrays["extra/ema/" + k], arrays["param/" + k]) for k in averaged)
