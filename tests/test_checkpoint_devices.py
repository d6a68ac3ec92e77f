"""Checkpoints hold nothing device-bound: a run on two devices resumes on one other device.

mx.cpu(1), mx.cpu(2) stand in for two GPUs and mx.cpu(3) for the one device of the
resumed run. MXNet reads a CPU array back on cpu(0) whatever CPU id wrote it, so the
context written is read here from the raw bytes (:func:`_written_context`); on a GPU
machine the same bytes would put the array back on the GPU id they name.
"""
import collections
import io
import pickle
import struct

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

from training_runtime import checkpoint
from training_runtime import optim as fast_optim
from training_runtime.schedule import PlateauSchedule

META = {"script": "test", "model": "mlp", "num_classes": 3}
TRAIN_CTX = [mx.cpu(1), mx.cpu(2)]
RESUME_CTX = [mx.cpu(3)]


def _written_context(raw):
    """(device type, device id) stored in an NDArray's raw bytes (MXNDArraySaveRawBytes:
    magic, storage type, [storage shape], shape, then the context; dense arrays here)."""
    magic, stype, ndim = struct.unpack_from("<Iii", raw, 0)
    assert magic in (0xF993FAC9, 0xF993FACA) and stype == 0
    return struct.unpack_from("<ii", raw, 12 + 8 * ndim)


class _Recorder(pickle.Unpickler):
    """Unpickles optimizer states without loading any NDArray: records their raw bytes."""

    def __init__(self, data):
        super(_Recorder, self).__init__(io.BytesIO(data))
        self.raw = []

    def find_class(self, module, name):
        cls = super(_Recorder, self).find_class(module, name)
        if isinstance(cls, type) and issubclass(cls, mx.nd.NDArray):
            recorder = self

            class Stub(object):
                def __init__(self, *args):
                    pass

                def __setstate__(self, state):
                    recorder.raw.append(state["handle"])
            return Stub
        return cls


def test_context_parser_reads_the_device():
    """The parser above reads the id that wrote the array (so the tests below can fail)."""
    for ctx in (mx.cpu(0), mx.cpu(3)):
        raw = mx.nd.ones((2, 5), ctx=ctx).__getstate__()["handle"]
        assert _written_context(raw) == (1, ctx.device_id)


def _setup(ctx, seed, update_on_kvstore):
    mx.random.seed(seed)
    blocks = collections.OrderedDict()
    blocks["net"] = gluon.nn.HybridSequential()
    blocks["net"].add(gluon.nn.Dense(8, in_units=4, activation="relu"), gluon.nn.Dense(3, in_units=8))
    blocks["net"].initialize(mx.init.Xavier(), ctx=ctx)
    schedule = PlateauSchedule(0.1)
    # the runtime's trainer: its SGD, Gluon's "device" kvstore (update_on_kvstore by default
    # with several devices: the states live in the kvstore's updater) or one updater per device
    trainer = schedule.attach(gluon.Trainer(
        blocks["net"].collect_params(), fast_optim.SGD(learning_rate=0.1, momentum=0.9, wd=5e-4),
        update_on_kvstore=update_on_kvstore))
    return blocks, {"net": trainer}, schedule


def _step(blocks, trainers, ctx, step):
    rs = np.random.RandomState(step)
    x = gluon.utils.split_and_load(mx.nd.array(rs.rand(4, 4)), ctx)
    y = gluon.utils.split_and_load(mx.nd.array(rs.randint(0, 3, 4)), ctx)
    with autograd.record():
        losses = [gluon.loss.SoftmaxCrossEntropyLoss()(blocks["net"](a), b) for a, b in zip(x, y)]
    autograd.backward(losses)
    trainers["net"].step(4)


def _params(blocks):
    return {k: p.list_data()[0].asnumpy() for k, p in blocks["net"]._collect_params_with_prefix().items()}


def _trained_checkpoint(tmp_path, update_on_kvstore):
    blocks, trainers, schedule = _setup(TRAIN_CTX, 0, update_on_kvstore)
    _step(blocks, trainers, TRAIN_CTX, 0)
    path = str(tmp_path / checkpoint.LAST)
    checkpoint.save(path, checkpoint.capture(blocks, trainers, schedule, {"step": 1}, META,
                                             workdir=str(tmp_path)))
    return path, blocks, trainers


@pytest.mark.parametrize("update_on_kvstore", [None, False])
def test_every_written_array_is_on_cpu0(tmp_path, update_on_kvstore):
    path, _, trainers = _trained_checkpoint(tmp_path, update_on_kvstore)
    if update_on_kvstore is None:
        assert trainers["net"]._update_on_kvstore  # the kvstore-updater path is covered
    with np.load(path, allow_pickle=False) as data:  # no pickled object anywhere but the states
        arrays = {k: data[k] for k in data.files}
    params = [k for k in arrays if k.startswith("param/")]
    assert len(params) == 4 and all(arrays[k].dtype == np.float32 for k in params)
    recorder = _Recorder(arrays["trainer/net"].tobytes())
    states, optimizer = recorder.load()
    assert isinstance(optimizer, fast_optim.SGD) and len(states) == 4
    assert len(recorder.raw) == 4  # one momentum buffer per parameter
    assert [_written_context(raw) for raw in recorder.raw] == [(1, 0)] * 4


@pytest.mark.parametrize("update_on_kvstore", [None, False])
def test_two_device_run_resumes_on_another_device(tmp_path, update_on_kvstore):
    path, blocks, trainers = _trained_checkpoint(tmp_path, update_on_kvstore)
    _step(blocks, trainers, TRAIN_CTX, 1)  # the uninterrupted run's next step
    expected = _params(blocks)

    blocks2, trainers2, schedule2 = _setup(RESUME_CTX, 1, update_on_kvstore)
    checkpoint.restore(path, blocks2, trainers2, schedule2, META)
    _step(blocks2, trainers2, RESUME_CTX, 1)
    for param in blocks2["net"].collect_params().values():
        assert param.list_ctx() == RESUME_CTX
    updater = trainers2["net"]._updaters[0]  # one device: no kvstore, the trainer's updater
    assert [s.context for s in updater.states.values()] == RESUME_CTX * 4
    actual = _params(blocks2)
    # one device sums the batch's gradient itself, two devices through the kvstore: rounding only
    for key in expected:
        np.testing.assert_allclose(actual[key], expected[key], rtol=1e-6, atol=1e-7, err_msg=key)

    # the momentum mattered: without the optimizer state the step lands elsewhere
    blocks3, trainers3, schedule3 = _setup(RESUME_CTX, 1, update_on_kvstore)
    checkpoint.restore(path, blocks3, {}, schedule3, META)
    _step(blocks3, trainers3, RESUME_CTX, 1)
    assert np.abs(_params(blocks3)["0.weight"] - expected["0.weight"]).max() > 1e-3


def _on_gpu(array, device_id):
    """(class, raw bytes, offset of the context) of ``array`` as if gpu(``device_id``)
    had written it (device type 2 in its raw bytes)."""
    raw = bytearray(array.__getstate__()["handle"])
    stype = struct.unpack_from("<i", raw, 4)[0]
    pos = 8
    for _ in range(2 if stype else 1):
        pos += 4 + 8 * struct.unpack_from("<i", raw, pos)[0]
    struct.pack_into("<ii", raw, pos, 2, device_id)
    return type(array), raw, pos


def test_device_bound_states_of_older_checkpoints_are_rewritten():
    """What an older checkpoint holds (states pickled on gpu(1)): dense, sparse and
    multi-precision tuple states come back on cpu(0) with their values."""
    dense = mx.nd.array(np.arange(6, dtype=np.float32).reshape(2, 3))
    sparse = mx.nd.array([[0, 0], [1, 2], [0, 0]]).tostype("row_sparse")
    marked = []
    for array in (dense, sparse):
        cls, raw, pos = _on_gpu(array, 1)
        assert struct.unpack_from("<ii", raw, pos) == (2, 1)
        marked.append((cls, raw, pos))

    class Marked(object):  # pickles as the NDArray class with the GPU-marked bytes
        def __init__(self, cls, raw):
            self.cls, self.raw = cls, raw

        def __reduce__(self):
            return self.cls, (None,), {"handle": self.raw}

    states = {0: Marked(*marked[0][:2]), 1: (Marked(*marked[1][:2]), None)}
    rewritten = checkpoint.cpu_state_bytes(pickle.dumps((states, "optimizer")))
    recorder = _Recorder(rewritten)
    recorder.load()
    contexts = [struct.unpack_from("<ii", raw, pos) for raw, (_, _, pos) in zip(recorder.raw, marked)]
    assert contexts == [(1, 0), (1, 0)]
    loaded, optimizer = pickle.loads(rewritten)
    assert optimizer == "optimizer" and loaded[1][1] is None
    np.testing.assert_array_equal(loaded[0].asnumpy(), dense.asnumpy())
    assert loaded[1][0].stype == "row_sparse"
    np.testing.assert_array_equal(loaded[1][0].asnumpy(), sparse.asnumpy())
