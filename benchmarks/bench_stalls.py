"""What two of the stall fixes save on CPU contexts (docs/GPU.md "Stalls").

1. Optimizer step of a ResNet-18-sized parameter set (Gluon's resnet18_v1, 11.7 M
   parameters, 62 arrays) on two devices (cpu(0), cpu(1) stand in for GPUs), Gluon's
   ``device`` kvstore: the former ``update_on_kvstore=True`` (one Python updater call per
   parameter on the kvstore's copy, then the weights broadcast) against the runtime's
   ``update_on_kvstore=False`` (gradients summed, then each device's aggregated SGD).
   The gradients are set once; each timed step is ``Trainer.step`` + ``waitall``. On CPU
   contexts the local updates are slower (measured 0.64x: both "devices" share the same cores
   and memory, so the update is computed twice instead of once plus a copy); on GPUs each
   device updates its own copy in parallel, in aggregated kernels, without Python per key.
2. Data loading of a run of E epochs of B batches, each followed by an evaluation of V
   batches, with W workers: a DataLoader (a new pool of workers) per epoch and per
   evaluation, as before, against one :class:`~training_runtime.workers.WorkerPool` for the
   whole run. Items are 3×S×S float32 arrays made by a light transform, so the fork and
   start-up of the workers shows.

Usage: python benchmarks/bench_stalls.py [--steps 20] [--epochs 4] [--batches 6]
       [--eval-batches 3] [--workers 2] [--batch-size 16] [--image-size 64]
Prints seconds per configuration and the ratios (all measured in the same run).
"""
import argparse
import time

import mxnet as mx
import numpy as np
from mxnet import gluon

from training_runtime import config, distributed, loop
from training_runtime import optim as fast_optim
from training_runtime.workers import WorkerPool

CTX = [mx.cpu(0), mx.cpu(1)]


def _trainer_step_seconds(update_on_kvstore, steps):
    net = gluon.model_zoo.vision.resnet18_v1(classes=200)
    net.initialize(mx.init.Xavier(), ctx=CTX)
    net(mx.nd.zeros((2, 3, 32, 32), ctx=CTX[0]))
    net(mx.nd.zeros((2, 3, 32, 32), ctx=CTX[1]))
    params = net.collect_params()
    if update_on_kvstore:  # the former default
        trainer = gluon.Trainer(params, fast_optim.SGD(learning_rate=0.01, momentum=0.9, wd=1e-4),
                                kvstore="device")
    else:
        trainer = loop.make_trainer(params, config.OptimConfig(lr=0.01, momentum=0.9, wd=1e-4))
        distributed.configure_trainer(trainer, "device")
    rng = np.random.RandomState(0)
    for p in params.values():
        if p.grad_req != "null":
            for g in p.list_grad():
                g[:] = mx.nd.array(rng.normal(0, 1e-3, p.shape), ctx=g.context)
    trained = [p for p in params.values() if p.grad_req != "null"]

    def step():
        for p in trained:  # the gradients are "fresh" as after a backward
            for d in p._data or ():
                d._fresh_grad = True
        trainer.step(32)

    step()  # states, kvstore
    mx.nd.waitall()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    mx.nd.waitall()
    return (time.perf_counter() - start) / steps


class _Items(gluon.data.Dataset):
    def __init__(self, n, size):
        self.n, self.size = n, size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        x = np.random.uniform(size=(3, self.size, self.size)).astype(np.float32)
        return mx.nd.array(x), np.float32(i % 7)


def _loading_seconds(persistent, args):
    train = loop.IndexedDataset(_Items(args.batches * args.batch_size, args.image_size), seed=0)
    val = _Items(args.eval_batches * args.batch_size, args.image_size)
    pool = WorkerPool({"train": train, "val": val}, args.workers) if persistent else None
    start = time.perf_counter()
    try:
        for epoch in range(args.epochs):
            order = loop.epoch_order(0, epoch, len(train))
            keys = loop.epoch_keys(epoch, loop.batch_indices(order, args.batch_size))
            loader = (pool.loader(train, keys) if persistent else
                      gluon.data.DataLoader(train, batch_sampler=keys, num_workers=args.workers))
            for batch in loader:
                batch[0].wait_to_read()
            loop.close_workers(loader)
            evaluation = loop.evaluation_loader(val, [mx.cpu()], args.batch_size, args.workers, pool)
            for batch in evaluation:
                batch[0].wait_to_read()
            loop.close_workers(evaluation)
    finally:
        if pool is not None:
            pool.close()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--eval-batches", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()

    on_kv = _trainer_step_seconds(True, args.steps)
    local = _trainer_step_seconds(False, args.steps)
    print("1. trainer step, resnet18_v1 parameters, 2 devices, kvstore device:")
    print("   update_on_kvstore=True  %.4f s/step" % on_kv)
    print("   update_on_kvstore=False %.4f s/step  (ratio %.2fx)" % (local, on_kv / local))

    per_loader = _loading_seconds(False, args)
    one_pool = _loading_seconds(True, args)
    print("2. loading %d epochs x %d batches + %d evaluation batches each, %d workers:"
          % (args.epochs, args.batches, args.eval_batches, args.workers))
    print("   a pool per loader    %.3f s" % per_loader)
    print("   one pool for the run %.3f s  (ratio %.2fx)" % (one_pool, per_loader / one_pool))


if __name__ == "__main__":
    main()
