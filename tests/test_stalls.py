"""No avoidable stalls (docs/GPU.md "Stalls"), tested on CPU contexts standing in for GPUs:
trainers never update on the kvstore (same numbers as Gluon's default, checkpoints of
either mode resume), the FGVC graphs hybridize with static memory, loaders pin their
batches exactly for GPU contexts, and one pool of DataLoader workers serves a whole run."""
import collections
import dataclasses
import os

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

from training_runtime import checkpoint, config, distributed, loop
from training_runtime import optim as fast_optim
from training_runtime.schedule import PlateauSchedule, make_schedule

CTX = [mx.cpu(0), mx.cpu(1)]
META = {"script": "test"}


# ---------------------------------------------------------------- 1. no update on the kvstore

def _net(seed):
    """Dense 256→300 (76 800 weights: the single-array kernel) and 300→3 (the aggregated one)."""
    mx.random.seed(seed)
    # a fixed prefix: the same parameter names (a Trainer orders its states by sorted name)
    # whatever Gluon's global name counters are
    net = gluon.nn.HybridSequential(prefix="stalls_")
    with net.name_scope():
        net.add(gluon.nn.Dense(300, in_units=256, activation="relu"), gluon.nn.Dense(3, in_units=300))
    net.initialize(mx.init.Xavier(), ctx=CTX)
    return net


def _trainer(net, kvstore, runtime):
    """``runtime``: the runner's trainer (make_trainer + configure_trainer); else Gluon's
    default as the runtime made it before (update_on_kvstore=None: True with 2 devices)."""
    optim = config.OptimConfig(lr=0.1, momentum=0.9, wd=5e-4)
    if runtime:
        trainer = loop.make_trainer(net.collect_params(), optim)
        distributed.configure_trainer(trainer, kvstore)
    else:
        trainer = gluon.Trainer(net.collect_params(), fast_optim.SGD(learning_rate=0.1, momentum=0.9,
                                                                      wd=5e-4), kvstore=kvstore)
    schedule = PlateauSchedule(0.1)
    return schedule.attach(trainer), schedule


def _step(net, trainer, step):
    rs = np.random.RandomState(step)
    x = gluon.utils.split_and_load(mx.nd.array(rs.rand(8, 256)), CTX)
    y = gluon.utils.split_and_load(mx.nd.array(rs.randint(0, 3, 8)), CTX)
    with autograd.record():
        losses = [gluon.loss.SoftmaxCrossEntropyLoss()(net(a), b) for a, b in zip(x, y)]
    autograd.backward(losses)
    trainer.step(8)


def _states(trainer):
    updater = trainer._kvstore._updater if trainer._update_on_kvstore else trainer._updaters[0]
    return [updater.states[k].asnumpy() for k in sorted(updater.states)]


def _weights(net):
    """Every parameter's copy on every device, in order."""
    return [d.asnumpy() for p in net.collect_params().values() for d in p.list_data()]


@pytest.mark.parametrize("kvstore", ["device", "local"])
def test_local_updates_equal_the_kvstore_updates(kvstore):
    old_net, new_net = _net(0), _net(0)
    old, _ = _trainer(old_net, kvstore, runtime=False)
    new, _ = _trainer(new_net, kvstore, runtime=True)
    for step in range(3):
        _step(old_net, old, step)
        _step(new_net, new, step)
    assert old._update_on_kvstore and new._kvstore is not None and new._update_on_kvstore is False
    assert len(new._updaters) == 2 and all(u.aggregate_updates for u in new._updaters)
    old_states, new_states = _states(old), _states(new)
    assert len(new_states) == 4 and np.abs(new_states[0]).sum() > 0
    for a, b in zip(_weights(old_net) + old_states, _weights(new_net) + new_states):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    # every device's updater holds the same states (one per device, same updates)
    for a, b in zip(new_states, [new._updaters[1].states[k].asnumpy() for k in sorted(new._updaters[1].states)]):
        np.testing.assert_array_equal(a, b)


def test_a_checkpoint_written_with_kvstore_updates_resumes_with_local_ones(tmp_path):
    """An older run's checkpoint (update_on_kvstore=True: the kvstore updater's states) resumes
    in today's trainer (one updater per device) as the uninterrupted older run continues;
    and a checkpoint of today's trainer resumes in the older mode."""
    for writer_runtime in (False, True):
        net, _ = _net(0), None
        trainer, schedule = _trainer(net, "device", runtime=writer_runtime)
        _step(net, trainer, 0)
        _step(net, trainer, 1)
        path = str(tmp_path / ("%d.ckpt" % writer_runtime))
        blocks = collections.OrderedDict([("net", net)])
        checkpoint.save(path, checkpoint.capture(blocks, {"net": trainer}, schedule, {"step": 2}, META,
                                                 workdir=str(tmp_path)))
        _step(net, trainer, 2)  # the uninterrupted run
        expected = _weights(net) + _states(trainer)

        net2 = _net(5)  # other weights: the checkpoint must set them
        trainer2, schedule2 = _trainer(net2, "device", runtime=not writer_runtime)
        checkpoint.restore(path, collections.OrderedDict([("net", net2)]), {"net": trainer2}, schedule2, META)
        assert isinstance(trainer2._optimizer, fast_optim.SGD)
        _step(net2, trainer2, 2)
        assert bool(trainer2._update_on_kvstore) == writer_runtime
        for a, b in zip(expected, _weights(net2) + _states(trainer2)):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- 3. static graphs (FGVC)

def _fgvc_case(name, static):
    """The method ``name`` at its demo backbone and size, 3 classes, hybridized as the
    runtime does (``static``) or as it did (plain ``hybridize()`` of the same blocks)."""
    import fgvc_gluon.family  # noqa: F401  (registers the methods)
    from fgvc_gluon.registry import METHODS
    from training_runtime.config import ModelConfig
    entry = METHODS.get(name)
    mx.random.seed(0)
    np.random.seed(0)
    options = {knob.name: entry.demo.get(knob.name, knob.default) for knob in entry.knobs}
    size = min(entry.demo["image_size"], 32)  # S3N's demo 48 px: 3 backbone passes, slow here
    task = entry.build(ModelConfig(method=name, backbone=entry.demo["backbone"], image_size=size,
                                   pretrained=False, options=options), ("a", "b", "c"), mx.cpu())
    if static:
        task.hybridize()
    else:
        for block in list(task.blocks().values()) + list(task.loss_blocks()):
            block.hybridize()
    return task, size


def _fgvc_trace(task, size):
    """Losses, every gradient and the evaluation outputs over a batch of 2, then the
    smaller last batch (1), then 2 again; the first evaluation's outputs are read again
    at the end (static memory must not overwrite an output already returned)."""
    out = []
    params = [p for g in task.param_groups() for p in
              (g.params.values() if hasattr(g.params, "values") else g.params)]
    first = None
    for step, n in enumerate((2, 1, 2)):
        rs = np.random.RandomState(step)
        data = mx.nd.array(rs.normal(size=(n, 3, size, size)).astype(np.float32))
        label = mx.nd.array(rs.randint(0, 3, n), dtype="int64")
        index = mx.nd.arange(n, dtype="int64")
        loop.reseed(0, 0, step)  # MC-Loss draws its mask from numpy
        with autograd.record():
            loss = task.training_loss(data, label, index, 0)
        loss.backward()
        out.append(loss.asnumpy())
        out.extend(p.grad().asnumpy() for p in params if p.grad_req != "null")
        loop.reseed(0, 1, step)
        predictions = task.predict(data, 30)  # past S3N's random evaluation epochs
        if first is None:
            first = predictions
        out.extend(v.asnumpy() for v in predictions.values())
    out.extend(v.asnumpy() for v in first.values())
    return out


@pytest.mark.parametrize("name", ["baseline", "mcloss", pytest.param("s3n", marks=pytest.mark.slow),
                                  "centerloss"])  # S3N: about 10 s on 2 cores
def test_static_graphs_give_the_same_numbers(name):
    static, size = _fgvc_case(name, True)
    flags = [dict(b._flags) for block in static.blocks().values()
             for b in [block] + [c for c in block._children.values()] if isinstance(b, gluon.HybridBlock)]
    assert flags and all(f.get("static_alloc") and f.get("static_shape") for f in flags)
    reference = _fgvc_trace(*_fgvc_case(name, False))
    actual = _fgvc_trace(static, size)
    assert len(actual) == len(reference) > 6
    for a, b in zip(reference, actual):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- 2. pinned memory for GPUs

def test_loaders_pin_memory_exactly_for_gpu_contexts(tmp_path):
    """Built for fake GPU contexts, never run (no GPU here): the training loader (its own or
    the run's workers') and the evaluation loaders pin on the first GPU; CPU contexts never."""
    from test_runner import linear_data, make_runner
    from training_runtime.workers import WorkerPool
    runner = make_runner(tmp_path)
    data, batches = linear_data(), [[0, 1, 2], [3, 4]]
    built = [(runner._loader(batches), False, 0),
             (loop.evaluation_loader(data, [mx.cpu(0), mx.cpu(1)], 4), False, 0)]
    runner.ctx = [mx.gpu(1), mx.gpu(0)]
    built += [(runner._loader(batches), True, 1),
              (loop.evaluation_loader(data, [mx.gpu(2)], 4), True, 2)]
    pool = WorkerPool({"train": runner.train_set, "val": data}, 2)
    runner.workers = pool
    built += [(runner._loader(batches), True, 1),
              (loop.evaluation_loader(data, runner.ctx, 4, workers=pool), True, 1),
              (loop.evaluation_loader(data, [mx.cpu()], 4, workers=pool), False, 0)]
    assert type(built[-1][0]).__name__ == "PoolLoader" and pool.pids() == []  # nothing forked
    for loader, pinned, device in built:
        assert (loader._pin_memory, loader._pin_device_id) == (pinned, device)


# ---------------------------------------------------------------- 4. one worker pool per run

class _Noisy(gluon.data.Dataset):
    """Linear data plus augmentation noise from numpy's generator (reseeded per sample by
    IndexedDataset); touches ``<directory>/<split>-<pid>`` to show which process read it."""

    def __init__(self, split, directory, noise):
        from test_runner import linear_data
        self.data, self.split, self.directory, self.noise = linear_data(), split, directory, noise

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        open(os.path.join(self.directory, "%s-%d" % (self.split, os.getpid())), "a").close()
        x, y = self.data[index]
        if self.noise:
            x = x + mx.nd.array(np.random.normal(0, 0.1, x.shape))
        return x, y


def _worker_runner(save_dir, num_workers, callbacks=()):
    from test_runner import LinearTask, make_config
    os.makedirs(str(save_dir), exist_ok=True)
    seen = os.path.join(str(save_dir), "seen")
    os.makedirs(seen, exist_ok=True)
    mx.random.seed(0)
    run = make_config(checkpoint_every=3, picture_images=0, figures="none")  # pictures: main process
    run.optim = dataclasses.replace(run.optim, epochs=2)
    run.data = dataclasses.replace(run.data, num_workers=num_workers)
    runner = loop.Runner(LinearTask(), run, [mx.cpu()], make_schedule(run.optim), str(save_dir),
                         _Noisy("train", seen, True), _Noisy("val", seen, False), {"script": "test"},
                         callbacks, log=lambda *a: None)
    return runner, seen


class _Pids(loop.Callback):
    def __init__(self):
        self.seen = []

    def on_step_end(self, runner):
        self.seen.append(tuple(runner.workers.pids()))


def _readers(seen):
    """{split: set of pids that read it}."""
    out = collections.defaultdict(set)
    for name in os.listdir(seen):
        split, pid = name.rsplit("-", 1)
        out[split].add(int(pid))
    return out


def test_one_pool_of_workers_serves_the_whole_run(tmp_path):
    """Two epochs and two evaluations with --num-workers 2: two processes read everything
    (a pool per epoch and per evaluation would be up to eight), none is left after the run,
    and the parameters are bitwise those of --num-workers 0 (per-sample augmentation seeds)."""
    pids = _Pids()
    runner, seen = _worker_runner(tmp_path / "w2", 2, [pids])
    runner.run()
    readers = _readers(seen)
    workers = set(pids.seen[0])
    assert len(workers) == 2 and os.getpid() not in workers
    assert set(pids.seen) == {pids.seen[0]} and len(pids.seen) == 10  # 5 steps x 2 epochs
    assert readers["train"] <= workers and readers["val"] <= workers and readers["val"]
    assert runner.workers is None
    for pid in workers:  # ended (and reaped) when run() returned
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    reference, seen0 = _worker_runner(tmp_path / "w0", 0)
    reference.run()
    assert set(_readers(seen0)["train"]) == {os.getpid()}
    from test_runner import params
    for name, value in params(reference).items():
        np.testing.assert_array_equal(params(runner)[name], value)
    # a run stopped mid-epoch (its workers end with it) resumes with new workers, exactly
    from test_runner import StopAt
    crashed, _ = _worker_runner(tmp_path / "crash", 2, [StopAt(7)])
    with pytest.raises(KeyboardInterrupt):
        crashed.run()
    assert crashed.workers is None
    resumed, _ = _worker_runner(tmp_path / "crash", 2)
    resumed.resume(str(tmp_path / "crash" / checkpoint.LAST))
    assert resumed.step == 6
    resumed.run()
    for name, value in params(reference).items():
        np.testing.assert_array_equal(params(resumed)[name], value)
