"""Time the attribute model's training step: the fast path (fsr whole-input
convolutions as matrix products, hybridized with static_alloc/static_shape)
against the plain path standing in for the original's step (nn.Conv2D fsr,
imperative, one Trainer per block, plain BCE, SGD momentum 0.9 wd 5e-4),
interleaved in one run so a shared machine's load affects both alike.

PARTIAL (see the helper report): it times the model and per-block trainers
directly, not yet ``Runner.train_step`` on ``app.build_task``'s task, and has
no breakdown / floor / memory yet.

    PYTHONPATH=. python benchmarks/bench_attr_step.py --backbone resnet101_v1 \
        --input-size 224 --batch-size 2 --steps 5

Last line: ``step_seconds=<median of ours>``.
"""
import argparse
import time

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from imbalanced_attr.model import AttributeModel, aggregate_prediction


def build(fast, args):
    net = AttributeModel(args.num_classes, backbone=args.backbone, input_size=args.input_size,
                         fast_heads=fast)
    if fast:
        net.hybridize(static_alloc=True, static_shape=True)
    trainers = [gluon.Trainer(block.collect_params(), "sgd",
                              {"learning_rate": 0.01, "momentum": 0.9, "wd": 5e-4})
                for block in net.blocks().values()]
    return net, trainers


def step(net, trainers, bce, data, label):
    with autograd.record():
        logits, scores = net(data)
        loss = bce(aggregate_prediction(logits, scores), label)
    loss.backward()
    for trainer in trainers:
        trainer.step(data.shape[0])
    mx.nd.waitall()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet101_v1")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--num-classes", type=int, default=14)
    args = parser.parse_args()
    rng = np.random.RandomState(0)
    data = mx.nd.array(rng.standard_normal((args.batch_size, 3, args.input_size, args.input_size)))
    label = mx.nd.array(rng.randint(0, 2, (args.batch_size, args.num_classes)))
    bce = gluon.loss.SigmoidBinaryCrossEntropyLoss(from_sigmoid=True)
    sides = {"plain": build(False, args), "ours": build(True, args)}
    for net, trainers in sides.values():  # warm-up (graph building, allocation)
        step(net, trainers, bce, data, label)
    times = {name: [] for name in sides}
    for _ in range(args.steps):
        for name, (net, trainers) in sides.items():
            start = time.time()
            step(net, trainers, bce, data, label)
            times[name].append(time.time() - start)
    medians = {name: float(np.median(t)) for name, t in times.items()}
    for name, value in medians.items():
        print("%-6s median %.3f s/step  (%s)" % (name, value, " ".join("%.3f" % t for t in times[name])))
    print("ratio plain/ours = %.2f" % (medians["plain"] / medians["ours"]))
    print("step_seconds=%.4f" % medians["ours"])


if __name__ == "__main__":
    main()
