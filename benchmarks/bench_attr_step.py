"""Time the attribute model's training step against the 2018 original's and a measured floor.

In one process, interleaved round by round (a shared machine's load then
affects every side alike), on random data (N×3×S×S normal, labels in
{1, −1, 0}), SGD momentum 0.9, wd 5e-4:

- ``ours``: the step ``train_attr.py`` runs: ``Runner.train_step`` of a
  Runner over ``app.build_task``'s attribute task (hybridized with
  static_alloc/static_shape, fsr whole-input convolutions as matrix
  products, ``training_runtime.optim.SGD`` per block trainer), with
  ``--loss`` (``paper`` runs at epoch 6: history recorded and weighting on);
  with ``--loss paper`` also ``ours-original`` (the same with ``--loss
  original``): the loss and history's share.
- ``before``: ours as it was before ``training_runtime.optim`` (the same
  Runner with mxnet's SGD in every trainer: multi_sgd_mom_update in groups of 4).
- ``original``: a plain-Gluon re-creation of the original's step (docs/SPEC.md
  §1; written here from the spec, not copied): a ``SymbolBlock`` over the zoo
  ResNet's internal taps, heads as imperative ``nn.Sequential`` blocks,
  one ``gluon.Trainer`` (mxnet's SGD) per block (backbone; fconv, fatt, fsr
  of each stage), plain sigmoid BCE on the three stage scores and the
  logits (quirk IL-1: what the script ran), and per step the host syncs it
  made (the loss's ``asscalar``, the aggregated prediction's and the label's
  ``asnumpy``).
- ``breakdown`` of ours (each piece followed by ``waitall``): forward+backward
  of the task's loss, the backbone trainer's update, the heads' trainers'
  updates; and forward+backward of the backbone alone.
- ``floor``: the ResNet step alone (zoo net with a C-way output, hybridized,
  its own SGD update) + ``sgd_mom_update`` over flat arrays of the heads'
  parameter count (4 equal slices: the same bytes, a quarter of the memory)
  + the fsr whole-input layers as plain matrix products with 2-D weights
  (forward, dW, dX on views of ours' weights: the weight traffic bound).

First (unless ``--no-memory``) the peak resident memory (VmHWM) of a training
step and of an evaluation (``task.predict`` as ``evaluate`` calls it: no
``autograd.record``, predict mode, so no graph is kept), each in its own
process.

    PYTHONPATH=. python benchmarks/bench_attr_step.py --backbone resnet101_v1 \
        --input-size 224 --batch-size 2 --steps 5 --loss original

``--gpus 0`` runs every side on that GPU; ``--amp`` (with ``--gpus``) builds ours with
``--amp`` (training_runtime.mixed_precision); ``--no-original`` / ``--no-before`` /
``--no-floor`` / ``--no-memory`` skip sides (a full CPU run holds about 14 GB).

Last line: ``step_seconds=<median of ours>``.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from mxnet.gluon import nn
from mxnet.gluon.model_zoo import vision

from imbalanced_attr.data import WIDER_ATTRIBUTES
from imbalanced_attr.family import FAMILY
from training_runtime import app, cli, loop, mixed_precision, optim
from training_runtime import config as run_config
from training_runtime.schedule import make_schedule

XAVIER = mx.init.Xavier(rnd_type="gaussian", factor_type="in", magnitude=2)
SGD_SETTINGS = {"learning_rate": 1e-4, "momentum": 0.9, "wd": 5e-4}
CHUNKS = 4  # the floor's fused heads update runs over 4 equal slices (memory)
HISTORY_EPOCH = 6  # --loss paper: the history is recorded (>= 2) and weights the losses (>= 5)


def attribute_names(num_classes):
    if num_classes == len(WIDER_ATTRIBUTES):
        return tuple(WIDER_ATTRIBUTES)
    return tuple("attr%d" % c for c in range(num_classes))


def random_batch(args, seed=0):
    """data N×3×S×S, labels N×C in {1, −1, 0}, dataset indices N."""
    rng = np.random.RandomState(seed)
    data = mx.nd.array(rng.standard_normal((args.batch_size, 3, args.input_size, args.input_size)))
    label = mx.nd.array(rng.choice([1, -1, 0], (args.batch_size, args.num_classes), p=[0.3, 0.6, 0.1]))
    index = mx.nd.array(np.arange(args.batch_size))
    return data, label, index


class _Split(object):
    """What ``prepare_training`` reads of a training split: its size and label matrix."""

    def __init__(self, label_matrix):
        self.label_matrix = label_matrix

    def __len__(self):
        return len(self.label_matrix)


# ---------------------------------------------------------------------------- ours

def build_ours(args, loss, workdir):
    """A Runner over the task train_attr.py builds (app.build_task), at the benchmark's epoch."""
    given = {"data_dir": "/benchmark", "backbone": args.backbone, "image_size": args.input_size,
             "batch_size": args.batch_size, "loss": loss, "pretrained": False,
             "gpus": args.gpus, "amp": args.amp}
    config = run_config.resolve(FAMILY, given)
    names = attribute_names(args.num_classes)
    ctx = cli.contexts(config.runtime)
    if args.amp:  # as run_training does: GPUs only, before the model is built
        mixed_precision.enable(ctx)
    task = app.build_task(FAMILY, config, names, ctx, pretrained=False)
    rng = np.random.RandomState(1)
    split = _Split(rng.choice([1, -1, 0], (64, len(names)), p=[0.3, 0.6, 0.1]).astype(np.float32))
    task.prepare_training(split)
    save_dir = tempfile.mkdtemp(prefix="bench-%s-" % loss, dir=workdir)
    runner = loop.Runner(task, config, ctx, make_schedule(config.optim), save_dir, split, split,
                         {"script": "benchmark"}, log=lambda *a: None)
    runner.epoch = HISTORY_EPOCH if loss == "paper" else 0
    return runner


def ours_step(runner, batch):
    runner.train_step(batch)
    mx.nd.waitall()


def before_step(runner, batch):
    """Ours as it was before training_runtime.optim: the same Runner and parameters with
    every trainer on mxnet's SGD (multi_sgd_mom_update in groups of 4; same numbers)."""
    for trainer in runner.trainers.values():
        trainer._optimizer.__class__ = mx.optimizer.SGD
        trainer._optimizer.aggregate_num = 4
    try:
        ours_step(runner, batch)
    finally:
        for trainer in runner.trainers.values():
            optim.upgrade(trainer)


def ours_breakdown(runner, batch):
    """Seconds of: the task's forward+backward, the backbone trainer, the heads' trainers."""
    data, label, index = batch
    task = runner.task
    start = _now()
    with autograd.record():
        loss = task.training_loss(data, label, index, runner.epoch)
    loss.backward()
    fwd_bwd = _now() - start
    updates = {}
    for name, trainer in runner.trainers.items():
        start = _now()
        trainer.step(data.shape[0])
        updates[name] = _now() - start
    task.after_step(runner.epoch)
    backbone_name = next(iter(task.blocks()))
    backbone = updates.pop(backbone_name)
    return {"forward+backward": fwd_bwd, "update backbone": backbone,
            "update heads": sum(updates.values())}


def backbone_forward_backward(runner, batch):
    """Forward+backward of the task's backbone alone (its four outputs summed)."""
    data = batch[0]
    start = _now()
    with autograd.record():
        outputs = runner.task.net.backbone(data)
        total = mx.nd.add_n(*[o.sum() for o in outputs])
    total.backward()
    return _now() - start


# ---------------------------------------------------------------------------- the original

def _tap_backbone(backbone, num_classes, ctx):
    """The original's backbone (SPEC §1.1): a SymbolBlock over the zoo ResNet's
    internal outputs: the unit of stage 3 the tap table names, the last units of
    stages 3 and 4, and the new C-way logits."""
    from imbalanced_attr.backbones import RESNET_TAP2_UNITS
    zoo = vision.get_model(backbone, classes=num_classes)
    zoo.initialize(XAVIER, ctx=ctx)
    data = mx.sym.var("data")
    out = zoo(data)
    internals = out.get_internals()
    names = internals.list_outputs()
    prefix = zoo.prefix

    def last_activation(stage):
        found = [n for n in names if n.startswith("%sstage%d_activation" % (prefix, stage))]
        return max(found, key=lambda n: int(n[len("%sstage%d_activation" % (prefix, stage)):-len("_output")]))

    tap2 = "%sstage3_activation%d_output" % (prefix, RESNET_TAP2_UNITS[backbone] - 1)
    outputs = [internals[tap2], internals[last_activation(3)], internals[last_activation(4)], out]
    return gluon.SymbolBlock(outputs, data, params=zoo.collect_params())


def _sequential(layers, ctx):
    net = nn.Sequential()
    with net.name_scope():
        for layer in layers:
            net.add(layer)
    net.initialize(XAVIER, ctx=ctx)
    return net


def _conv_bn_relu(channels, kernel, padding=0):
    return [nn.Conv2D(channels, kernel, padding=padding), nn.BatchNorm(), nn.Activation("relu")]


class Original(object):
    """The original's blocks, trainers and step, re-created from docs/SPEC.md §1."""

    def __init__(self, args, ctx):
        self.ctx = ctx
        self.backbone = _tap_backbone(args.backbone, args.num_classes, ctx)
        shapes = [o.shape for o in self.backbone(mx.nd.zeros((1, 3, args.input_size, args.input_size),
                                                                ctx=ctx))[:3]]
        c = args.num_classes
        self.heads = []
        for shape in shapes:
            fconv = _sequential([nn.Conv2D(c, 1), nn.Activation("sigmoid")], ctx)
            fatt = _sequential(_conv_bn_relu(512, 1) + _conv_bn_relu(512, 3, padding=1)
                               + [nn.Conv2D(c, 1)], ctx)
            fsr = _sequential(_conv_bn_relu(256, 1) + _conv_bn_relu(512, 1)
                              + _conv_bn_relu(1024, (shape[2], shape[3])) + [nn.Dense(c, flatten=True)], ctx)
            self.heads.append((fconv, fatt, fsr))
        blocks = [self.backbone] + [b for head in self.heads for b in head]
        self.trainers = [gluon.Trainer(b.collect_params(), "sgd", dict(SGD_SETTINGS)) for b in blocks]

    @staticmethod
    def plain_bce(x, y):
        """Sigmoid BCE on logits (the loss classes' from_sigmoid=False branch), mean over C: (N,)."""
        relu_neg = mx.nd.relu(-x)
        loss = x - x * y + relu_neg + mx.nd.log(mx.nd.exp(-relu_neg) + mx.nd.exp(-x - relu_neg))
        return mx.nd.mean(loss, axis=0, exclude=True)

    def step(self, data, label):
        target = label == 1  # the author's protocol: −1 and 0 train as negatives
        with autograd.record():
            tap2, tap3, tap4, logits = self.backbone(data)
            scores, loss = [], None
            for (fconv, fatt, fsr), tap in zip(self.heads, (tap2, tap3, tap4)):
                att = fatt(tap)
                n, c, h, w = att.shape
                soft = mx.nd.reshape(mx.nd.softmax(mx.nd.reshape(att, (n * c, h * w))), (n, c, h, w))
                score = fsr(soft * fconv(tap))
                scores.append(score)
                stage_loss = self.plain_bce(score, target)
                loss = stage_loss if loss is None else loss + stage_loss
            loss = loss + self.plain_bce(logits, target)
        loss.backward()
        for trainer in self.trainers:
            trainer.step(data.shape[0])
        # the host syncs of the original's loop: the loss, the predictions and the labels
        mx.nd.mean(loss).asscalar()
        (0.25 * (mx.nd.add_n(*scores) + logits)).sigmoid().asnumpy()
        label.asnumpy()
        mx.nd.waitall()


# ---------------------------------------------------------------------------- the floor

class Floor(object):
    """The measured floor: the ResNet step alone, one fused update over the heads'
    parameter count, the fsr whole-input layers as plain matrix products."""

    def __init__(self, args, runner, ctx):
        self.net = vision.get_model(args.backbone, classes=args.num_classes)
        self.net.initialize(XAVIER, ctx=ctx)
        self.net.hybridize(static_alloc=True, static_shape=True)
        self.trainer = gluon.Trainer(self.net.collect_params(), optim.SGD(**SGD_SETTINGS))
        heads = [b for name, b in runner.task.blocks().items() if not name.startswith("backbone")]
        count = sum(int(np.prod(p.shape)) for b in heads for p in b.collect_params().values()
                    if p.grad_req != "null")
        self.heads_parameters = count
        # weight, grad, momentum over CHUNKS equal slices of the heads' count (the same
        # bytes as one flat array; a quarter of the memory)
        self.flat = [mx.nd.ones((-(-count // CHUNKS),), ctx=ctx) for _ in range(3)]
        # the fsr whole-input layers as 2-D matrix products on ours' own weight and gradient
        # memory (NDArray.reshape is a view: no copy; ours' next backward rewrites the gradients)
        self.matmuls = []
        for stage in runner.task.net.stage_heads():
            conv = [layer for layer in stage.fsr._children.values() if isinstance(layer, nn.Conv2D)][-1]
            weight = conv.weight.data().reshape((conv.weight.shape[0], -1))
            grad = conv.weight.grad().reshape(weight.shape)
            x = mx.nd.ones((args.batch_size, weight.shape[1]), ctx=ctx) * 0.01
            self.matmuls.append((x, weight, mx.nd.ones((args.batch_size, weight.shape[0]), ctx=ctx),
                                 grad, mx.nd.zeros(x.shape, ctx=ctx)))
        self.bce = gluon.loss.SigmoidBinaryCrossEntropyLoss()

    def resnet_step(self, data, label):
        start = _now()
        with autograd.record():
            loss = self.bce(self.net(data), label == 1)
        loss.backward()
        self.trainer.step(data.shape[0])
        return _now() - start

    def heads_update(self):
        weight, grad, mom = self.flat
        start = _now()
        for _ in range(CHUNKS):
            mx.nd.sgd_mom_update(weight, grad, mom, out=weight, lr=1e-4, wd=5e-4, momentum=0.9,
                                 rescale_grad=0.5)
        return _now() - start

    def heads_matmuls(self):
        start = _now()
        for x, w, dy, dw, dx in self.matmuls:
            mx.nd.FullyConnected(x, w, no_bias=True, num_hidden=w.shape[0])
            mx.nd.dot(dy, x, transpose_a=True, out=dw)
            mx.nd.dot(dy, w, out=dx)
        return _now() - start


def _now():
    mx.nd.waitall()
    return time.time()


# ---------------------------------------------------------------------------- memory

def _vm_hwm_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def measure_memory(args, phase):
    """In this process: build our task, run two training steps (``train``) or two
    evaluations (``eval``); print JSON with the peak resident memory (MB) after
    building and after the phase."""
    workdir = tempfile.mkdtemp(prefix="bench-attr-mem-")
    runner = build_ours(args, args.loss, workdir)
    batch = random_batch(args)
    built = _vm_hwm_kb()
    for _ in range(2):
        if phase == "train":
            ours_step(runner, batch)
        else:
            assert not autograd.is_recording()
            out = runner.task.predict(batch[0], runner.epoch)["probabilities"]
            out.wait_to_read()
            try:  # no graph was kept: nothing to back-propagate through
                out.backward()
                kept = True
            except mx.base.MXNetError:
                kept = False
            assert not kept, "evaluation recorded a graph"
    mx.nd.waitall()
    print(json.dumps({"phase": phase, "built_mb": built / 1024.0, "peak_mb": _vm_hwm_kb() / 1024.0}))


def memory_report(args):
    results = {}
    for phase in ("train", "eval"):
        command = [sys.executable, os.path.abspath(__file__), "--memory-phase", phase,
                   "--backbone", args.backbone, "--input-size", str(args.input_size),
                   "--batch-size", str(args.batch_size), "--num-classes", str(args.num_classes),
                   "--loss", args.loss, "--gpus", args.gpus] + ["--amp"] * args.amp
        out = subprocess.run(command, stdout=subprocess.PIPE, check=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                                 [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
                                 + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])))
        results[phase] = json.loads(out.stdout.decode().strip().splitlines()[-1])
    for phase, r in results.items():
        print("peak resident memory, %-5s: %.0f MB (model built: %.0f MB, +%.0f MB for the %s)"
              % (phase, r["peak_mb"], r["built_mb"], r["peak_mb"] - r["built_mb"],
                 "training steps" if phase == "train" else "evaluations"))


# ---------------------------------------------------------------------------- main

def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet101_v1")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (after one warm-up round)")
    parser.add_argument("--num-classes", type=int, default=14)
    parser.add_argument("--loss", default="original", choices=("original", "paper"),
                        help="ours' --loss (paper: at epoch %d, history weighting on)" % HISTORY_EPOCH)
    parser.add_argument("--no-original", action="store_true", help="skip the original's step")
    parser.add_argument("--no-before", action="store_true", help="skip ours with mxnet's SGD")
    parser.add_argument("--no-floor", action="store_true", help="skip the floor and the breakdown")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--gpus", default="", help="as train_attr.py's --gpus (default: CPU); every side "
                        "runs on the first device")
    parser.add_argument("--amp", action="store_true", help="ours with --amp (GPUs only)")
    parser.add_argument("--memory-phase", choices=("train", "eval"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_phase:
        return measure_memory(args, args.memory_phase)
    if args.amp and not args.gpus:
        parser.error("--amp: float16 mixed precision needs GPUs (--gpus); this run is on CPU")
    if not args.no_memory:  # first, each in its own process, before this one holds any model
        memory_report(args)
    mx.random.seed(0)
    workdir = tempfile.mkdtemp(prefix="bench-attr-")
    ctx = mx.gpu(int(args.gpus.split(",")[0])) if args.gpus else mx.cpu()
    batch = [x.as_in_context(ctx) for x in random_batch(args)]
    steps = {}
    ours = build_ours(args, args.loss, workdir)
    steps["ours"] = lambda: ours_step(ours, batch)
    if not args.no_before:
        steps["before"] = lambda: before_step(ours, batch)
    if args.loss == "paper":
        plain_loss = build_ours(args, "original", workdir)
        steps["ours-original"] = lambda: ours_step(plain_loss, batch)
    if not args.no_original:
        original = Original(args, ctx)
        steps["original"] = lambda: original.step(batch[0], batch[1])
    pieces = {}
    if not args.no_floor:
        floor = Floor(args, ours, ctx)

        def floor_pieces():
            return {"resnet step": floor.resnet_step(batch[0], batch[1]),
                    "heads fused update": floor.heads_update(),
                    "heads matrix products": floor.heads_matmuls()}

        def breakdown():
            found = ours_breakdown(ours, batch)
            found["backbone forward+backward"] = backbone_forward_backward(ours, batch)
            return found

        pieces = {"floor": floor_pieces, "breakdown": breakdown}
    for step in steps.values():  # warm-up: graphs, allocation, optimizer states
        step()
    for piece in pieces.values():
        piece()
    times = {name: [] for name in list(steps) + ["floor"] * bool(pieces)}
    parts = {name: {} for name in pieces}
    for _ in range(args.steps):
        for name, step in steps.items():
            start = _now()
            step()
            times[name].append(time.time() - start)
        for name, piece in pieces.items():
            for key, value in piece().items():
                parts[name].setdefault(key, []).append(value)
        if pieces:
            times["floor"].append(sum(parts["floor"][key][-1] for key in parts["floor"]))
    load = os.getloadavg()
    medians = {name: float(np.median(t)) for name, t in times.items()}
    print("%s, %d px, batch %d, %d attributes, --loss %s, %d interleaved rounds; load average %.1f %.1f %.1f"
          % (args.backbone, args.input_size, args.batch_size, args.num_classes, args.loss, args.steps,
             load[0], load[1], load[2]))
    for name, value in medians.items():
        print("%-14s median %.3f s/step  (%s)" % (name, value, " ".join("%.3f" % t for t in times[name])))
    for name, found in parts.items():
        print("%s: %s" % (name, ", ".join("%s %.3f s" % (k, float(np.median(v))) for k, v in found.items())))
    if pieces:
        print("heads' parameters: %.1f M" % (floor.heads_parameters / 1e6))
    # ratios: of the medians, and the median of the per-round ratios (the sides of one round
    # ran seconds apart, so a load that changes between rounds cancels out)
    for label, top, bottom in (("original / ours", "original", "ours"), ("before / ours", "before", "ours"),
                               ("original / before", "original", "before"), ("ours / floor", "ours", "floor"),
                               ("loss paper / original", "ours", "ours-original")):
        if top in medians and bottom in medians:
            per_round = np.median(np.array(times[top]) / np.array(times[bottom]))
            print("%-22s %.2f (per-round median %.2f)" % (label + " =", medians[top] / medians[bottom],
                                                          per_round))
    print("step_seconds=%.4f" % medians["ours"])


if __name__ == "__main__":
    main()
