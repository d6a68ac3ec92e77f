"""The runtime in process with a fake task: Runner, callbacks, loss monitor, batch
order, exact resume, the run definition and the registries. No model package."""
import collections
import dataclasses
import json
import os

import mxnet as mx
import numpy as np
import pytest
from mxnet import gluon

from training_runtime import checkpoint, config, loop, registry
from training_runtime.errors import UserError
from training_runtime.schedule import make_schedule
from training_runtime.task import ParamGroup, TrainingTask


class LinearTask(TrainingTask):
    """Least squares y = x·w on fixed random data: a task as small as the contract allows."""

    metric_name = "neg_mse"

    def __init__(self, per_sample=True):
        self.net = gluon.nn.Dense(1, in_units=4)
        self.net.initialize(mx.init.Xavier())
        self.per_sample = per_sample
        self.after_steps = 0

    def blocks(self):
        return collections.OrderedDict([("net", self.net)])

    def param_groups(self):
        return [ParamGroup("net", self.net.collect_params())]

    def transform(self, train):
        return lambda x: x

    def training_loss(self, data, label, index, epoch):
        error = (self.net(data).reshape((-1,)) - label) ** 2
        return error if self.per_sample else error.mean().reshape((1,))

    def after_step(self, epoch):
        self.after_steps += 1

    def predict(self, data, epoch):
        return collections.OrderedDict([("y", self.net(data))])

    def evaluate(self, batches, epoch):
        total, count = 0.0, 0
        for data, label in batches:
            total += float(((self.predict(data, epoch)["y"].reshape((-1,)) - label) ** 2).sum().asscalar())
            count += data.shape[0]
        return {"neg_mse": -total / count}


def linear_data(n=40, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(n, 4).astype(np.float32)
    y = x.dot(np.array([1.0, -2.0, 0.5, 3.0], np.float32))
    return gluon.data.ArrayDataset(mx.nd.array(x), mx.nd.array(y))


def make_config(**runtime):
    run = config.RunConfig(family="test")
    run.optim = config.OptimConfig(lr=0.05, momentum=0.9, wd=0.0, epochs=3, schedule="step")
    run.runtime = dataclasses.replace(config.RuntimeConfig(batch_size=8, log_every=2), **runtime)
    return run


def make_runner(save_dir, task=None, callbacks=(), **runtime):
    os.makedirs(str(save_dir), exist_ok=True)
    mx.random.seed(0)
    task = task or LinearTask()
    run = make_config(**runtime)
    data = linear_data()
    return loop.Runner(task, run, [mx.cpu()], make_schedule(run.optim), str(save_dir), data, data,
                       {"script": "test"}, callbacks, log=lambda *a: None)


def params(runner):
    """Structural name -> value (Gluon's global name counters differ between instances)."""
    return {k: v.data().asnumpy() for k, v in runner.task.net._collect_params_with_prefix().items()}


def test_runner_trains_a_task_and_writes_its_files(tmp_path):
    runner = make_runner(tmp_path)
    runner.run()
    records = [json.loads(line) for line in open(tmp_path / loop.METRICS_FILE)]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert records[-1]["train_loss"] < 0.5 * records[0]["train_loss"]
    assert records[-1]["val"]["neg_mse"] > records[0]["val"]["neg_mse"]
    assert runner.step == 15 and runner.task.after_steps == 15  # 40 samples / 8 per batch x 3
    assert {checkpoint.LAST, checkpoint.BEST, loop.CURVES_FILE} <= set(os.listdir(tmp_path))


def test_a_batch_mean_loss_is_refused(tmp_path):
    runner = make_runner(tmp_path, LinearTask(per_sample=False))
    with pytest.raises(ValueError, match=r"expected a per-sample loss of shape \(8,\), got \(1,\)"):
        runner.run()


class Recorder(loop.Callback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, runner):
        self.steps.append(runner.step)


class StopAt(loop.Callback):
    """Stands in for a crash: leaves the loop right after step ``step``."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, runner):
        if runner.step == self.step:
            raise KeyboardInterrupt


def test_callbacks_see_every_step_and_can_change_the_loss(tmp_path):
    recorder = Recorder()

    class NanAt3(loop.Callback):
        def on_losses(self, runner, losses):
            return [l * float("nan") for l in losses] if runner.step + 1 == 3 else losses

    runner = make_runner(tmp_path, callbacks=[recorder, NanAt3()], checkpoint_every=2)
    with pytest.raises(checkpoint.DivergedError, match="the loss is nan at step 3"):
        runner.run()
    assert recorder.steps[:3] == [1, 2, 3]
    # the last good checkpoint (step 2) is kept
    assert checkpoint.read(str(tmp_path / checkpoint.LAST))[0]["progress"]["step"] == 2


def test_in_process_resume_is_exact(tmp_path):
    reference = make_runner(tmp_path / "ref", checkpoint_every=3)
    reference.run()
    crashed = make_runner(tmp_path / "run", callbacks=[StopAt(7)], checkpoint_every=3)
    with pytest.raises(KeyboardInterrupt):
        crashed.run()
    resumed = make_runner(tmp_path / "run", checkpoint_every=3)
    resumed.resume(str(tmp_path / "run" / checkpoint.LAST))
    assert resumed.step == 6
    resumed.run()
    for name, value in params(reference).items():
        np.testing.assert_array_equal(params(resumed)[name], value)


def test_resume_with_a_new_lr_rebases_the_schedule(tmp_path):
    first = make_runner(tmp_path, max_steps=5)
    first.run()
    changed = make_runner(tmp_path)
    changed.optim.lr = 0.01
    changed.resume(str(tmp_path / checkpoint.LAST))
    assert changed.schedule.lr == pytest.approx(0.01)
    assert all(t.learning_rate == pytest.approx(0.01) for t in changed.trainers.values())


def test_loss_monitor_sums_on_the_host_only_when_checked():
    monitor = loop.LossMonitor()
    monitor.add(1, mx.nd.array([2.0]), 4)
    monitor.add(2, mx.nd.array([6.0]), 4)
    assert monitor.count == 0  # nothing copied yet
    monitor.check()
    assert monitor.mean == 1.0
    monitor.add(3, mx.nd.array([float("inf")]), 4)
    with pytest.raises(checkpoint.DivergedError, match="at step 3"):
        monitor.check()


def test_batch_order_depends_on_seed_and_epoch_only():
    a, b = loop.epoch_order(1, 0, 10), loop.epoch_order(1, 0, 10)
    np.testing.assert_array_equal(a, b)
    assert sorted(a) == list(range(10))
    assert not np.array_equal(a, loop.epoch_order(1, 1, 10))
    assert not np.array_equal(a, loop.epoch_order(2, 0, 10))
    batches = loop.batch_indices(np.arange(10), 4)
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert loop.batch_indices(np.arange(9), 4, min_batch=2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert loop.batch_indices(np.arange(10), 4, start_batch=2) == [[8, 9]]


# ---------------------------------------------------------------------------- run definition

def toy_family():
    methods = registry.Registry("method")
    methods.register(registry.MethodEntry(
        "toy", build=None, knobs=[registry.Knob("depth", int, 3, "layers", minimum=1),
                                  registry.Knob("shared", float, 0.5, "a knob two methods take",
                                                minimum=0.0, maximum=1.0, none_flag_value=1.0)],
        recipe=dict(backbone="big", image_size=224, lr=0.1, momentum=0.9, wd=1e-4, batch_size=16,
                    epochs=30, schedule="step", lr_steps=[20]),
        demo=dict(backbone="small", image_size=32, epochs=2), backbones=("big", "small")))
    methods.register(registry.MethodEntry(
        "other", build=None, knobs=[registry.Knob("width", float, 1.0, "width", minimum=0.1)],
        recipe=dict(backbone="big", image_size=64, lr=0.2, momentum=0.0, wd=0.0, batch_size=8,
                    epochs=5, schedule="plateau")))
    datasets = registry.Registry("dataset")
    datasets.register(registry.DatasetEntry("demo", None, splits=("train", "val", "test"), demo=True))
    datasets.register(registry.DatasetEntry("real", None, splits=("trainval", "test", "test")))
    return registry.TaskFamily("toyfam", "train_toy", methods, datasets, default_dataset="real")


def test_resolution_layers_defaults_recipe_demo_and_flags():
    family = toy_family()
    demo = config.resolve(family, {})
    assert (demo.data.dataset, demo.model.backbone, demo.model.image_size, demo.optim.epochs) == (
        "demo", "small", 32, 2)
    assert demo.optim.lr == 0.1 and demo.model.pretrained is False
    assert demo.model.options == {"depth": 3, "shared": 0.5}
    real = config.resolve(family, {"data_dir": "/data", "depth": 5, "lr": 0.01})
    assert (real.data.dataset, real.data.train_split, real.data.val_split) == ("real", "trainval", "test")
    assert (real.model.backbone, real.model.options["depth"], real.optim.lr) == ("big", 5, 0.01)
    assert config.resolve(family, {"shared": 1.0}).model.options["shared"] is None  # the None value
    assert config.RunConfig.from_dict(json.loads(json.dumps(real.to_dict()))) == real


@pytest.mark.parametrize("given, message", [
    ({"depth": 0}, "--depth: expected at least 1, got 0"),
    ({"width": 2.0}, "--width: only for --method other"),
    ({"lr": float("inf")}, "--lr: expected a finite number"),
    ({"lr": -1.0}, "--lr: expected a positive number"),
    ({"seed": -1}, "--seed: expected at least 0"),
    ({"method": "nope"}, "--method: expected one of toy, other"),
    ({"records": "x", "data_dir": "y"}, "--records and --data-dir"),
])
def test_resolution_refuses_bad_values_with_the_flag(given, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        config.resolve(toy_family(), given)


def test_reconcile_applies_resumable_settings_and_refuses_the_rest():
    family = toy_family()
    saved = config.resolve(family, {})
    run, changes = config.reconcile(saved, {"lr": 0.01, "epochs": 9, "depth": 3}, family, "resume", "ck")
    assert (run.optim.lr, run.optim.epochs) == (0.01, 9)
    assert changes == [("epochs", 2, 9), ("lr", 0.1, 0.01)]
    assert "--lr 0.1 -> 0.01" in config.describe_changes(changes)
    with pytest.raises(UserError, match="--momentum 0.5: ck was trained with --momentum 0.9; this "
                                        "setting cannot change for --resume"):
        config.reconcile(saved, {"momentum": 0.5}, family, "resume", "ck")
    with pytest.raises(UserError, match="--depth 4: ck was trained with --depth 3"):
        config.reconcile(saved, {"depth": 4}, family, "test", "ck")
    tested, _ = config.reconcile(saved, {"test_limit": 5, "batch_size": 3}, family, "test", "ck")
    assert (tested.data.test_limit, tested.runtime.batch_size, tested.model.backbone) == (5, 3, "small")


def test_the_command_line_is_generated_from_the_definition():
    import argparse
    family = toy_family()
    parser = config.add_arguments(argparse.ArgumentParser(), family)
    given = config.given_values(parser.parse_args(["--lr", "0.5", "--depth", "7", "--no-pretrained",
                                                   "--lr-steps", "3", "4", "--input-size", "48"]), family)
    assert given == {"lr": 0.5, "depth": 7, "pretrained": False, "lr_steps": [3, 4], "image_size": 48}
    assert config.given_values(parser.parse_args([]), family) == {}
    help_text = parser.format_help()
    for flag in ("--batch-size", "--checkpoint-every", "--batchnorm", "--depth", "--width", "--shared"):
        assert flag in help_text


def test_registry_names_the_choices():
    family = toy_family()
    with pytest.raises(KeyError, match="unknown method 'x'; expected one of toy, other"):
        family.methods.get("x")
    with pytest.raises(ValueError, match="registered twice"):
        family.methods.register(family.methods.get("toy"))
    assert set(registry.families()) == {"attr", "fgvc"}  # the installed entry points


def test_free_space_is_checked_before_the_first_step(tmp_path, monkeypatch):
    import shutil
    runner = make_runner(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 ** 9, 10 ** 9 - 10, 10))
    with pytest.raises(UserError, match="not enough disk space in %s" % tmp_path):
        runner.run()
    assert runner.step == 0


class OverflowAt(loop.Callback):
    """Gives the given steps an infinite scaled gradient and a finite loss (an --amp overflow:
    every trainer skips the step): + (l - stop(l)) * 3e38 adds 0 to the value."""

    def __init__(self, *steps):
        self.steps = steps

    def on_losses(self, runner, losses):
        if runner.step + 1 not in self.steps:
            return losses
        return [l + (l - l.detach()) * 3e38 for l in losses]


def test_amp_loss_scale_resumes_exactly(tmp_path):
    """--amp's dynamic scale (LossScaling, exercised on CPU: its arithmetic needs no float16) is
    checkpointed: after overflows at steps 2 and 4 the scale is 2**14; a run stopped at step 6
    resumes with it (before: 2**16 again) and ends equal to the uninterrupted run."""
    reference = make_runner(tmp_path / "ref", callbacks=[OverflowAt(2, 4)], checkpoint_every=3,
                            amp=True)
    reference.run()
    crashed = make_runner(tmp_path / "run", callbacks=[OverflowAt(2, 4), StopAt(7)],
                          checkpoint_every=3, amp=True)
    with pytest.raises(KeyboardInterrupt):
        crashed.run()
    saved = checkpoint.read(str(tmp_path / "run" / checkpoint.LAST))[0]["progress"]["loss_scaling"]
    assert saved["next"] == 2.0 ** 14
    resumed = make_runner(tmp_path / "run", checkpoint_every=3, amp=True)
    resumed.resume(str(tmp_path / "run" / checkpoint.LAST))
    assert resumed.loss_scaling.state_dict() == saved
    resumed.run()
    assert resumed.loss_scaling.state_dict() == reference.loss_scaling.state_dict()
    for name, value in params(reference).items():
        np.testing.assert_array_equal(params(resumed)[name], value)


def test_each_worker_loads_only_its_share_of_the_global_batch(tmp_path):
    """--kvstore dist_*: worker r of W reads (and augments) only its consecutive share of every
    global batch (distributed.shard), not the whole batch."""
    runner = make_runner(tmp_path)
    runner.rank, runner.world_size = 1, 2
    batches = [[5, 1, 7, 3, 9], [0, 2, 4, 6]]
    keys = list(runner._loader(batches)._batch_sampler)
    assert keys == [[(0, 3), (0, 9)], [(0, 4), (0, 6)]]
