"""A new method is one module plus its registration: a toy task family is trained,
resumed and tested through the shared command line (training_runtime.app), with
its flags, recipe, checkpoints and refusals, and no script or table of its own."""
import collections
import json
import os

import mxnet as mx
import numpy as np
import pytest
from mxnet import gluon

from training_runtime import app, checkpoint
from training_runtime.errors import UserError
from training_runtime.registry import DatasetEntry, Knob, MethodEntry, Registry, TaskFamily
from training_runtime.task import ParamGroup, TrainingTask

CLASSES = ("red", "green", "blue")


class Brightness(gluon.data.Dataset):
    """Noisy 8×8 RGB images whose class is their brightest channel."""

    def __init__(self, split, limit=None):
        rng = np.random.RandomState({"train": 0, "val": 1, "test": 2}[split])
        count = min(limit or 60, 60)
        self.labels = rng.randint(0, 3, count)
        images = rng.randint(0, 120, (count, 8, 8, 3))
        images[np.arange(count), :, :, self.labels] += 100
        self.images = images.astype(np.uint8)
        self.class_names = CLASSES

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return mx.nd.array(self.images[i], dtype=np.uint8), int(self.labels[i])


class ToyTask(TrainingTask):
    """Linear softmax classifier on the pixels; one knob (input scale)."""

    metric_name = "top1"

    def __init__(self, model, names, ctx):
        self.scale = model.options["scale"]
        self.net = gluon.nn.Dense(len(names), in_units=192)
        self.net.initialize(mx.init.Xavier(), ctx=ctx)
        self.ce = gluon.loss.SoftmaxCrossEntropyLoss()

    def blocks(self):
        return collections.OrderedDict([("net", self.net)])

    def param_groups(self):
        return [ParamGroup("net", self.net.collect_params())]

    def transform(self, train):
        return lambda image: image.astype("float32").transpose((2, 0, 1)) * (self.scale / 255.0)

    def training_loss(self, data, label, index, epoch):
        return self.ce(self.net(data), label.astype("float32"))

    def predict(self, data, epoch):
        return collections.OrderedDict([("logits", self.net(data))])

    def evaluate(self, batches, epoch):
        hits = count = 0
        for data, label in batches:
            hits += int((self.net(data).argmax(axis=1) == label.astype("float32")).sum().asscalar())
            count += data.shape[0]
        return {"top1": hits / count}


def toy_family():
    methods, datasets = Registry("method"), Registry("dataset")
    methods.register(MethodEntry(
        "toy", build=ToyTask, knobs=[Knob("scale", float, 1.0, "input scale", minimum=0.01)],
        recipe=dict(backbone="linear", image_size=8, lr=0.05, momentum=0.9, wd=0.0, batch_size=10,
                    epochs=2, schedule="step"),
        backbones=("linear",)))
    datasets.register(DatasetEntry("brightness", lambda data_dir, split, limit=None, **_: Brightness(split, limit),
                                   splits=("train", "val", "test"), demo=True))
    return TaskFamily("toy", "train_toy", methods, datasets, default_dataset="brightness")


def run(argv):
    return app.main(toy_family(), argv, "Train the toy method.\n\nA test family.")


def test_a_registered_method_trains_resumes_and_tests_through_the_shared_cli(tmp_path, capsys):
    save_dir = str(tmp_path / "run")
    report = run(["--save-dir", save_dir])
    records = [json.loads(line) for line in open(os.path.join(save_dir, "metrics.jsonl"))]
    assert len(records) == 2 and records[1]["train_loss"] < records[0]["train_loss"]
    assert report["top1"] > 0.6  # the brightest channel is easy to learn; chance is 1/3
    args = json.load(open(os.path.join(save_dir, "args.json")))
    assert args["config"]["model"] == {"method": "toy", "backbone": "linear", "image_size": 8,
                                       "pretrained": False, "options": {"scale": 1.0}}
    run(["--save-dir", save_dir, "--resume", "--epochs", "3"])
    assert "resume: applied --epochs 2 -> 3 (from step 12)" in capsys.readouterr().out
    assert checkpoint.read(os.path.join(save_dir, "last.ckpt"))[0]["progress"]["epoch"] == 3
    tested = run(["--test", save_dir])
    assert 0 <= tested["top1"] <= 1
    with pytest.raises(UserError, match="--scale 2.0: .* was trained with --scale 1.0"):
        run(["--test", save_dir, "--scale", "2"])
    with pytest.raises(UserError, match="--scale: expected at least 0.01, got 0.0"):
        run(["--save-dir", str(tmp_path / "bad"), "--scale", "0"])


def test_the_help_lists_the_registered_knob_and_recipe(capsys):
    with pytest.raises(SystemExit):
        run(["--help"])
    text = capsys.readouterr().out
    assert "--scale" in text and "toy knobs" in text
    assert "upstream: backbone=linear, batch_size=10, epochs=2" in text
