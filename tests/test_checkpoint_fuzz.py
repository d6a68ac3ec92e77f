"""Damaged checkpoints: random bit flips, truncations and malformed records only
ever give a one-line UserError (``<flag>: <path> is not a readable checkpoint
(<reason>)``), and a damaged file that still reads holds exactly the saved
content (every zip entry's CRC-32 is verified)."""
import collections
import json
import os
import random
import re
import zipfile

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

from training_runtime import checkpoint
from training_runtime.errors import UserError
from training_runtime.schedule import PlateauSchedule

META = {"script": "fuzz", "model": "dense", "num_classes": 3}
PROGRESS = {"epoch": 0, "batch_in_epoch": 1, "step": 1, "best": None, "loss_sum": 1.25,
            "loss_count": 1, "epoch_time": 0.5, "batch_size": 4, "seed": 0}
UNREADABLE = r"^--resume: .*%s is not a readable checkpoint \(.+\)$"


def _setup(seed):
    mx.random.seed(seed)
    blocks = collections.OrderedDict(head=gluon.nn.Dense(3, in_units=4))
    blocks["head"].initialize(mx.init.Xavier())
    schedule = PlateauSchedule(0.1)
    trainers = {"head": schedule.attach(gluon.Trainer(
        blocks["head"].collect_params(), "sgd", {"learning_rate": 0.1, "momentum": 0.9}))}
    return blocks, trainers, schedule


def _params(blocks):
    return {k: p.data().asnumpy() for k, p in blocks["head"]._collect_params_with_prefix().items()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(path, bytes, record, arrays, parameters) of one small real checkpoint
    (a Dense block after one SGD step with momentum)."""
    directory = tmp_path_factory.mktemp("fuzz")
    blocks, trainers, schedule = _setup(seed=3)
    with autograd.record():
        loss = blocks["head"](mx.nd.ones((4, 4))).sum()
    loss.backward()
    trainers["head"].step(4)
    random.seed(1)
    np.random.seed(1)  # the saved random states: the same bytes every run
    arrays = checkpoint.capture(blocks, trainers, schedule, PROGRESS, META, workdir=str(directory))
    path = str(directory / "good.ckpt")
    checkpoint.save(path, arrays)
    record, read_arrays = checkpoint.read(path)
    with open(path, "rb") as f:
        data = f.read()
    return path, data, record, read_arrays, _params(blocks)


def _same(result, record, arrays):
    got_record, got_arrays = result
    return got_record == record and sorted(got_arrays) == sorted(arrays) and all(
        got_arrays[k].dtype == arrays[k].dtype and np.array_equal(got_arrays[k], arrays[k])
        for k in arrays)


_SPARE_BLOCKS = {}


def _check_damaged(path, saved, full=True):
    """'error' (a one-line UserError) or 'intact' (read, and with ``full``
    load_parameters and restore, succeed with exactly the saved content);
    anything else fails."""
    _, _, record, arrays, params = saved
    name = re.escape(os.path.basename(path))
    try:
        result = checkpoint.read(path)
    except UserError as err:
        message = str(err)
        assert "\n" not in message
        assert re.match(UNREADABLE % name, message), message
        if "blocks" not in _SPARE_BLOCKS:  # the error comes before any parameter is touched
            _SPARE_BLOCKS["blocks"] = _setup(seed=9)[0]
        with pytest.raises(UserError, match=UNREADABLE.replace("--resume", "--test") % name):
            checkpoint.load_parameters(path, _SPARE_BLOCKS["blocks"], META, flag="--test")
        return "error"
    assert _same(result, record, arrays), "a damaged checkpoint was read with other content"
    if not full:
        return "intact"
    blocks, trainers, schedule = _setup(seed=9)
    checkpoint.load_parameters(path, blocks, META)
    for key, value in params.items():
        np.testing.assert_array_equal(_params(blocks)[key], value)
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        progress, _ = checkpoint.restore(path, blocks, trainers, schedule, META)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    assert progress == PROGRESS
    return "intact"


def _entry_data_offsets(path):
    """name -> (first, end) byte offsets of each zip entry's stored bytes."""
    offsets = {}
    with open(path, "rb") as f, zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            f.seek(info.header_offset + 26)
            name_length, extra_length = np.frombuffer(f.read(4), "<u2")
            first = info.header_offset + 30 + int(name_length) + int(extra_length)
            offsets[info.filename] = (first, first + info.compress_size)
    return offsets


def _header_positions(path, data):
    """Offsets of the bytes that are no entry's array data: the zip local
    headers, each entry's npy header, the central directory and its end
    records (where damage shows as something else than a CRC mismatch)."""
    with zipfile.ZipFile(path) as archive:
        positions = list(range(archive.start_dir, len(data)))
        headers = {info.filename: info.header_offset for info in archive.infolist()}
    for name, (first, _) in _entry_data_offsets(path).items():
        npy_header_length = int(np.frombuffer(data[first + 8:first + 10], "<u2")[0])  # npy v1.0
        positions.extend(range(headers[name], first + 10 + npy_header_length))
    return sorted(positions)


def _flip(data, position, rng):
    """A copy of ``data`` with 1-8 random bits of the byte at ``position`` flipped."""
    damaged = bytearray(data)
    bits = rng.choice(8, rng.randint(1, 9), replace=False)
    damaged[position] ^= int(sum(1 << int(b) for b in bits))
    return damaged


def test_the_checkpoint_reads_back(saved):
    path, _, record, arrays, params = saved
    assert record["progress"] == PROGRESS and record["meta"] == META
    assert _check_damaged(path, saved) == "intact"


def test_random_bit_flips_and_truncations_give_user_errors(saved, tmp_path):
    good, data, _, _, _ = saved
    rng = np.random.RandomState(2018)
    headers = _header_positions(good, data)
    path = str(tmp_path / "damaged.ckpt")
    outcomes = collections.Counter()
    # 200 positions: 100 anywhere (mostly array data and the record), 100 in the headers
    positions = list(rng.randint(len(data), size=100)) + [headers[i] for i in rng.randint(len(headers), size=100)]
    for position in positions:
        with open(path, "wb") as f:
            f.write(_flip(data, position, rng))
        outcomes["flip " + _check_damaged(path, saved)] += 1
    for length in sorted(rng.choice(len(data), 50, replace=False)):
        with open(path, "wb") as f:
            f.write(data[:length])
        outcomes["truncation " + _check_damaged(path, saved)] += 1
    assert outcomes["truncation error"] == 50
    # nearly every flip in data is detected, about three in four in the headers: the rest hit
    # bytes that reading ignores (timestamps, attributes, the local headers' copies of the
    # method, sizes and CRC) and read back the same content (checked by _check_damaged)
    assert outcomes["flip error"] >= 150, outcomes


def test_a_flip_in_every_header_byte_gives_a_user_error_or_the_same_content(saved, tmp_path):
    """Where the zip / npy structure is damaged (compression method, version,
    flags, name and extra lengths, offsets, the npy header's text) the error
    is another exception than a CRC mismatch inside zipfile or numpy; each must
    still be a UserError."""
    good, data, _, _, _ = saved
    rng = np.random.RandomState(7)
    path = str(tmp_path / "header.ckpt")
    outcomes = collections.Counter()
    for position in _header_positions(good, data):
        with open(path, "wb") as f:
            f.write(_flip(data, position, rng))
        outcomes[_check_damaged(path, saved, full=False)] += 1
    assert outcomes["error"] > 0.6 * sum(outcomes.values()), outcomes


def test_a_flip_in_any_entry_is_detected_by_its_crc(saved, tmp_path):
    """numpy reads each entry to its end, where zipfile checks the CRC-32: a
    single flipped bit in parameter data (or any other entry) is an error."""
    good, data, _, _, _ = saved
    offsets = _entry_data_offsets(good)
    assert {"param/head/weight.npy", "param/head/bias.npy", "trainer/head.npy",
            "record.npy", "rng/numpy.npy"} <= set(offsets)
    path = str(tmp_path / "flipped.ckpt")
    for name, (first, end) in sorted(offsets.items()):
        for position in (end - 1, (first + end) // 2):  # the last value and one in the middle
            damaged = bytearray(data)
            damaged[position] ^= 0x01
            with open(path, "wb") as f:
                f.write(damaged)
            with pytest.raises(UserError, match=r"not a readable checkpoint \(BadZipFile: Bad CRC-32 "
                                                r"for file '%s'\)" % re.escape(name)):
                checkpoint.read(path)


def _record_with(record, change):
    record = json.loads(json.dumps(record))
    change(record)
    return record


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def change(record):
        target = record
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return change


def _delete(*keys):
    def change(record):
        target = record
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]
    return change


RECORD_DAMAGE = [
    (_delete("meta"), "record has no 'meta'"),
    (_delete("progress"), "record has no 'progress'"),
    (_delete("schedule"), "record has no 'schedule'"),
    (_delete("extra"), "record has no 'extra'"),
    (_delete("python_random"), "record has no 'python_random'"),
    (_delete("numpy_random"), "record has no 'numpy_random'"),
    (_delete("progress", "step"), "record progress has no 'step'"),
    (_delete("schedule", "lr"), "record schedule has no 'lr'"),
    (_set("meta", ["fuzz"]), "record meta is .*, expected an object"),
    (_set("progress", "step 1"), "record progress is .*, expected an object"),
    (_set("progress", "step", "1"), "record progress.step is \"1\", expected a non-negative integer"),
    (_set("progress", "step", -1), "record progress.step is -1, expected a non-negative integer"),
    (_set("progress", "step", True), "record progress.step is true, expected a non-negative integer"),
    (_set("progress", "epoch", 0.5), "record progress.epoch is 0.5, expected a non-negative integer"),
    (_set("progress", "best", "high"), "record progress.best is \"high\", expected a number or null"),
    (_set("progress", "loss_sum", None), "record progress.loss_sum is null, expected a number"),
    (_set("schedule", "lr", "0.1"), "record schedule.lr is \"0.1\", expected a number"),
    (_set("schedule", "patience", 1.5), "record schedule.patience is 1.5, expected a non-negative"),
    (_set("extra", {"history": 3}), "record extra.history is 3, expected an object"),
    (_set("meta", "labels", [1, 2, 3]), "record meta.labels is .*, expected a list of names"),
    (_set("meta", "num_classes", "3"), "record meta.num_classes is \"3\", expected int"),
    (_set("meta", "config", []), "record meta.config is \\[\\], expected dict"),
    (_set("python_random", "state"), "record python_random is not a random state"),
    (_set("python_random", [3, [1, 2], None]), "record python_random is not a random state"),
    (_set("numpy_random", ["MT19937", 0]), "record numpy_random is .*, expected \\[kind, pos"),
    (_set("numpy_random", ["PCG64", 0, 0, 0.0]), "record numpy_random is not a random state"),
    (_set("numpy_random", 3, "0.0"), "record numpy_random is not a random state"),
]


def _write_variant(tmp_path, saved, record=None, arrays_change=None):
    _, _, saved_record, saved_arrays, _ = saved
    arrays = dict(saved_arrays)
    arrays["record"] = np.array(json.dumps(saved_record if record is None else record))
    if arrays_change is not None:
        arrays_change(arrays)
    path = str(tmp_path / "variant.ckpt")
    checkpoint.save(path, arrays)
    return path


@pytest.mark.parametrize("change, reason", RECORD_DAMAGE)
def test_records_without_keys_or_with_wrong_types(saved, tmp_path, change, reason):
    path = _write_variant(tmp_path, saved, _record_with(saved[2], change))
    with pytest.raises(UserError, match=r"--resume: .*variant\.ckpt is not a readable checkpoint \(%s" % reason):
        checkpoint.read(path)
    with pytest.raises(UserError, match=r"--test: .*variant\.ckpt is not a readable checkpoint"):
        checkpoint.load_parameters(path, _setup(seed=9)[0], META)
    blocks, trainers, schedule = _setup(seed=9)
    with pytest.raises(UserError, match=r"--resume: .*variant\.ckpt is not a readable checkpoint"):
        checkpoint.restore(path, blocks, trainers, schedule, META)


def _put(key, value):
    def change(arrays):
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    return change


ARRAY_DAMAGE = [
    (_put("record", None), "no 'record' entry"),
    (_put("record", np.array(3.0)), "'record' is a float64 array of shape \\(\\), expected a JSON string"),
    (_put("record", np.array(["{}", "{}"])), "'record' is a <U2 array of shape \\(2,\\)"),
    (_put("record", np.array("{'format': 1")), "'record' is not JSON"),
    (_put("record", np.array("[1, 2]")), "'record' is a JSON list, expected an object"),
    (_put("rng/numpy", None), "no 'rng/numpy' entry"),
    (_put("rng/numpy", np.zeros(624)), "'rng/numpy' is a float64 array of shape \\(624,\\), expected uint32"),
    (_put("param/head/weight", np.array(["a", "b"])), "parameter head/weight is a <U1 array, expected numbers"),
    (_put("trainer/head", np.zeros(8)), "optimizer state head is a float64 array of shape \\(8,\\)"),
]


@pytest.mark.parametrize("change, reason", ARRAY_DAMAGE)
def test_missing_or_mistyped_entries(saved, tmp_path, change, reason):
    path = _write_variant(tmp_path, saved, arrays_change=change)
    with pytest.raises(UserError, match=r"--resume: .*variant\.ckpt is not a readable checkpoint \(%s" % reason):
        checkpoint.read(path)
    with pytest.raises(UserError, match=r"not a readable checkpoint"):
        checkpoint.load_parameters(path, _setup(seed=9)[0], META)


def test_other_files_and_formats(saved, tmp_path):
    plain = str(tmp_path / "plain.ckpt")
    with open(plain, "wb") as f:
        np.save(f, np.arange(3))
    with pytest.raises(UserError, match=r"plain\.ckpt is not a readable checkpoint \(not a zip archive"):
        checkpoint.read(plain)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match=r"empty\.ckpt is not a readable checkpoint"):
        checkpoint.read(str(empty))
    # a record of another program (no or another format) keeps its own message
    for record in ({"meta": {}}, dict(saved[2], format="other-1")):
        path = _write_variant(tmp_path, saved, record)
        with pytest.raises(UserError, match=r"variant\.ckpt is not a checkpoint of this program"):
            checkpoint.read(path)
    # a zip without npy entries
    with zipfile.ZipFile(str(tmp_path / "zip.ckpt"), "w") as archive:
        archive.writestr("notes.txt", "hello")
    with pytest.raises(UserError, match=r"zip\.ckpt is not a readable checkpoint \(no 'record' entry\)"):
        checkpoint.read(str(tmp_path / "zip.ckpt"))
