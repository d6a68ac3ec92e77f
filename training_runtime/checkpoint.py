"""Complete, atomic training checkpoints for exact resume.

A checkpoint is one uncompressed ``.npz`` file (read back with
``allow_pickle=False``) holding:

- ``param/<block>/<name>``: every parameter of every block (BatchNorm running
  statistics included), named structurally (``features.0.weight``) so the
  names do not depend on Gluon's global prefix counters;
- ``trainer/<name>``: each Trainer's ``save_states`` bytes (optimizer with its
  momentum buffers) as a uint8 array, every pickled NDArray in them marked as
  ``mx.cpu()`` (see :func:`cpu_state_bytes`);
- ``extra/<name>/<key>``: arrays of extra state dicts (e.g. the prediction
  history); their plain numbers go to the JSON record;
- ``rng/numpy``: numpy's global MT19937 key;
- ``record``: one JSON string with ``meta`` (what the run is: script, model,
  dataset, number of classes; checked on resume), ``progress`` (epoch, step,
  position in the data order, partial epoch sums, best metric...),
  ``schedule`` (the lr state), the python ``random`` state and the rest of
  numpy's.

MXNet's own RNG state cannot be read back, so the runtime makes all
randomness a function of (seed, epoch, step) by reseeding every generator
before each step (``training_runtime.loop.reseed``); the saved python/numpy
states only matter for randomness outside the steps.

Writes are atomic: the file is written under a hidden temporary name in the
same directory, flushed and fsync'ed, then ``os.replace``'d over the old one
and the directory fsync'ed; a crash at any point leaves the previous
checkpoint intact. Free disk space is checked before anything is written.
Parameters that are not finite are never written (:class:`DivergedError`).

Nothing written is bound to a device: parameters and extra arrays are numpy
arrays, and the optimizer states are rewritten to ``mx.cpu()`` (MXNet's
``NDArray`` load would otherwise put them back on the GPU id that wrote them,
so a ``--gpus 0,1`` run could not resume with ``--gpus 0`` elsewhere). On
resume, parameters go to the run's contexts and the optimizer states follow
their weights' contexts at the first update (Gluon's ``Updater`` moves states
loaded by ``set_states`` there).
"""
import contextlib
import io
import json
import os
import random
import pickle
import shutil
import struct
import tempfile
import zipfile

import mxnet as mx
import numpy as np

from . import optim as fast_optim
from .errors import UserError, writing

FORMAT = "training_runtime-checkpoint-1"
LAST, BEST = "last.ckpt", "best.ckpt"
_MB = 1024.0 * 1024.0
SAFETY_BYTES = 1 << 20  # zip headers, JSON record


class DivergedError(UserError):
    """Training produced non-finite values; the last good checkpoint is kept."""


def _param_dict(block):
    """Structural name -> Parameter (the names Block.save_parameters uses)."""
    return block._collect_params_with_prefix()


TRAINER_TEMP_PREFIX = ".trainer-"


def _trainer_state_bytes(trainer, workdir=None):
    """The bytes ``Trainer.save_states`` writes (optimizer + momentum), through a
    temporary file in the system's temporary directory (never the run directory:
    a kill mid-save leaves nothing there; ``workdir`` is ignored), every state
    array marked as ``mx.cpu()`` (:func:`cpu_state_bytes`)."""
    fd, path = tempfile.mkstemp(prefix=TRAINER_TEMP_PREFIX)
    os.close(fd)
    try:
        trainer.save_states(path)
        with open(path, "rb") as f:
            return cpu_state_bytes(f.read())
    finally:
        os.remove(path)


def _load_trainer_state(trainer, data, workdir=None):
    """``Trainer.load_states`` of ``data`` through the system's temporary directory
    (so a checkpoint in a read-only directory can be resumed). The states load on
    ``mx.cpu()`` whatever device wrote them (also a checkpoint of an older version,
    written with device-bound states); the first update moves them to the weights'
    contexts."""
    fd, path = tempfile.mkstemp(prefix=TRAINER_TEMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(cpu_state_bytes(data))
        trainer.load_states(path)
        fast_optim.upgrade(trainer)  # an older checkpoint's mxnet SGD: same numbers, faster kernels
    finally:
        os.remove(path)


# NDArray::Save's magic numbers (mxnet src/ndarray/ndarray.cc): V2, V3 (numpy shapes)
_NDARRAY_MAGICS = (0xF993FAC9, 0xF993FACA)
_CPU_DEVICE_TYPE = 1  # mxnet Context::kCPU; kGPU = 2, kCPUPinned = 3, kCPUShared = 5


def _raw_bytes_on_cpu(raw):
    """An NDArray's raw bytes (``MXNDArraySaveRawBytes``) with its context set to cpu(0).

    Layout: uint32 magic, int32 storage type, [sparse: storage shape], shape
    (int32 ndim + ndim int64), int32 device type, int32 device id, ... Bytes of
    another layout (an older magic, an empty array) are returned unchanged."""
    if len(raw) < 12 or struct.unpack_from("<I", raw, 0)[0] not in _NDARRAY_MAGICS:
        return raw
    pos = 4
    stype = struct.unpack_from("<i", raw, pos)[0]
    pos += 4
    for _ in range(2 if stype != 0 else 1):  # sparse arrays write their storage shape first
        if pos + 4 > len(raw):
            return raw
        ndim = struct.unpack_from("<i", raw, pos)[0]
        pos += 4 + 8 * max(ndim, 0)
    if pos + 8 > len(raw) or struct.unpack_from("<i", raw, pos)[0] not in (1, 2, 3, 5):
        return raw  # no context follows (an array without data)
    out = bytearray(raw)
    struct.pack_into("<ii", out, pos, _CPU_DEVICE_TYPE, 0)
    return out


class _SavedArray(object):
    """A pickled NDArray kept as its (context-rewritten) raw bytes, never loaded
    onto a device; pickles back as the original class."""

    def __init__(self, cls):
        self.cls, self.raw = cls, None

    def __setstate__(self, state):
        raw = state.get("handle")
        self.raw = None if raw is None else _raw_bytes_on_cpu(raw)

    def __reduce__(self):
        return self.cls, (None,), {"handle": self.raw}  # what NDArray.__reduce__ returns


class _StateUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        cls = super(_StateUnpickler, self).find_class(module, name)
        if isinstance(cls, type) and issubclass(cls, mx.nd.NDArray):
            return lambda *args: _SavedArray(cls)  # NDArray subclasses reduce to cls(None)
        return cls


def cpu_state_bytes(data):
    """``Trainer.save_states`` bytes with every pickled NDArray's context set to
    ``mx.cpu()`` (device id 0): a byte-level rewrite, no array is allocated on
    any device. ``NDArray``'s unpickling restores an array on the context it was
    pickled from (a GPU id that may not exist where the run resumes)."""
    return pickle.dumps(_StateUnpickler(io.BytesIO(data)).load())  # protocol as Updater.get_states


def check_free_space(directory, needed_bytes):
    """UserError if ``directory`` has less than ``needed_bytes`` free."""
    free = shutil.disk_usage(directory).free
    if free < needed_bytes:
        raise UserError("not enough disk space in %s: need %.1f MB, have %.1f MB"
                        % (directory, needed_bytes / _MB, free / _MB))


def _write_npz(fileobj, arrays):
    """The payload writer (a separate function so tests can simulate a crash mid-write)."""
    np.savez(fileobj, **arrays)


def temporary_prefix(path):
    """The prefix of :func:`replaced_atomically`'s temporary files for ``path``."""
    return ".%s.tmp-" % os.path.basename(path)


def stale_temporaries(directory):
    """Temporary files a killed write left in ``directory`` (ours: ``.<name>.tmp-*``
    and ``.trainer-*``)."""
    if not os.path.isdir(directory):
        return []
    return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                  if f.startswith(".") and (".tmp-" in f or f.startswith(TRAINER_TEMP_PREFIX)))


def remove_stale_temporaries(directory):
    """Remove :func:`stale_temporaries`; returns (count, bytes) removed."""
    count = size = 0
    for path in stale_temporaries(directory):
        try:
            size += os.path.getsize(path)
            os.remove(path)
            count += 1
        except OSError:
            pass  # gone already, or not ours to remove: the run goes on
    return count, size


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def replaced_atomically(path):
    """Yield a hidden temporary path beside ``path`` for the caller to write.

    When the block succeeds the file is fsync'ed, ``os.replace``'d over
    ``path`` and the directory fsync'ed; when it fails the temporary file is
    removed. A crash at any point leaves the previous ``path`` intact.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path), dir=directory)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 -> the mode of the run's other files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path, arrays, needed_bytes):
    """Write ``arrays`` as an npz at ``path`` atomically, after a disk-space check."""
    check_free_space(os.path.dirname(os.path.abspath(path)), needed_bytes)
    with replaced_atomically(path) as tmp:
        with open(tmp, "wb") as f:
            _write_npz(f, arrays)


def capture(blocks, trainers, schedule, progress, meta, extra=None, workdir="."):
    """Snapshot of the whole training state as a dict of numpy arrays.

    blocks: ordered dict name -> Block; trainers: dict name -> gluon.Trainer;
    schedule: an LRSchedule; progress: JSON-able dict that must hold ``step``;
    meta: JSON-able dict describing the run (compared on resume);
    extra: dict name -> state dict of numpy arrays and plain numbers.
    Raises :class:`DivergedError` if any parameter is not finite.
    """
    param_bytes = sum(int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize
                      for block in blocks.values() for p in _param_dict(block).values())
    # parameters + one momentum buffer each; checked again once the exact size is known
    check_free_space(workdir, 2 * param_bytes + SAFETY_BYTES)
    arrays = {}
    for block_name, block in blocks.items():
        for name, param in _param_dict(block).items():
            value = param.list_data()[0].asnumpy()
            if not np.all(np.isfinite(value)):
                raise DivergedError(
                    "training diverged: parameter %s/%s is not finite at step %d (lower --lr?)"
                    % (block_name, name, progress["step"]))
            arrays["param/%s/%s" % (block_name, name)] = value
    for name, trainer in trainers.items():
        arrays["trainer/" + name] = np.frombuffer(_trainer_state_bytes(trainer, workdir), np.uint8)
    extra_numbers = {}
    for name, state in (extra or {}).items():
        extra_numbers[name] = {}
        for key, value in state.items():
            if isinstance(value, (np.ndarray, mx.nd.NDArray)):
                arrays["extra/%s/%s" % (name, key)] = (
                    value.asnumpy() if isinstance(value, mx.nd.NDArray) else value)
            else:
                extra_numbers[name][key] = value
    np_state = np.random.get_state()
    arrays["rng/numpy"] = np_state[1]
    record = {
        "format": FORMAT, "meta": meta, "progress": progress,
        "schedule": schedule.state_dict(), "extra": extra_numbers,
        "python_random": _jsonable(random.getstate()),
        "numpy_random": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    arrays["record"] = np.array(json.dumps(record))
    return arrays


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def payload_bytes(arrays):
    return sum(a.nbytes for a in arrays.values()) + SAFETY_BYTES


def save(path, arrays):
    """Write a :func:`capture` snapshot to ``path`` atomically."""
    with writing(path):
        atomic_write(path, arrays, payload_bytes(arrays))


def link_atomic(source, destination):
    """Make ``destination`` a copy of the checkpoint ``source`` atomically.

    A hard link (no data written: the best checkpoint is usually the last
    one) placed under a temporary name and ``os.replace``'d; a byte copy
    where links are not supported.
    """
    with writing(destination), replaced_atomically(destination) as tmp:
        os.remove(tmp)  # os.link needs a free name
        try:
            os.link(source, tmp)
        except OSError:
            check_free_space(os.path.dirname(os.path.abspath(destination)),
                             os.path.getsize(source) + SAFETY_BYTES)
            shutil.copyfile(source, tmp)


def read(path, flag="--resume"):
    """(record dict, arrays dict) of a checkpoint file, or a UserError naming ``path``.

    Any damage is reported as ``<flag>: <path> is not a readable checkpoint
    (<reason>)``: bytes that are not an npz archive (every zip entry's CRC-32
    is verified: numpy reads each entry to its end, where zipfile compares the
    checksum), and a record or arrays that lack what :func:`restore` and the
    callers use (``format``, ``meta``, ``progress`` with ``step``, ``schedule``,
    ``extra``, the random states) or hold it with the wrong types.
    """
    if not os.path.isfile(path):
        raise UserError("%s: checkpoint %s not found" % (flag, path))
    try:
        arrays = _read_npz(path)
        record = _read_record(arrays)
        if isinstance(record, dict) and record.get("format") == FORMAT:
            _read_check_contents(record, arrays)
    except _Unreadable as err:
        raise UserError("%s: %s is not a readable checkpoint (%s)" % (flag, path, err)) from err
    if record.get("format") != FORMAT:
        raise UserError("%s: %s is not a checkpoint of this program (format %r, expected %r)"
                        % (flag, path, record.get("format"), FORMAT))
    return record, arrays


class _Unreadable(Exception):
    """Why a checkpoint file cannot be used (the reason in :func:`read`'s message)."""


def _read_npz(path):
    """name -> array of the npz at ``path``; _Unreadable for anything else.

    The bytes are untrusted and decoding them is third-party code (zipfile,
    numpy's header parser) whose failures on damaged input are open-ended:
    BadZipFile, NotImplementedError (a flipped compression method or version),
    EOFError, tokenize.TokenError, struct.error, UnicodeDecodeError, ... Any
    exception raised while decoding is therefore the file's fault.
    """
    try:
        with open(path, "rb") as f:
            if not zipfile.is_zipfile(f):
                raise _Unreadable("not a zip archive (truncated or not a checkpoint)")
            f.seek(0)
            with np.load(f, allow_pickle=False) as data:
                if not isinstance(data, np.lib.npyio.NpzFile):
                    raise _Unreadable("not an npz archive")
                return {k: data[k] for k in data.files}
    except _Unreadable:
        raise
    except MemoryError:
        raise _Unreadable("an entry's header claims more memory than is available")
    except Exception as err:  # noqa: BLE001 -- see the docstring
        raise _Unreadable(_read_reason(err)) from err


def _read_reason(err):
    """One line: the exception's type and the first line of its message, at most ~160 characters."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    name = type(err).__name__
    if not lines:
        return name
    text = lines[0] if len(lines[0]) <= 160 else lines[0][:157] + "..."
    return "%s: %s" % (name, text)


def _read_record(arrays):
    """The JSON record of a checkpoint's arrays (removed from ``arrays``)."""
    if "record" not in arrays:
        raise _Unreadable("no 'record' entry")
    raw = arrays.pop("record")
    if raw.dtype.kind != "U" or raw.shape != ():
        raise _Unreadable("'record' is a %s array of shape %s, expected a JSON string"
                          % (raw.dtype, raw.shape))
    try:
        record = json.loads(str(raw))
    except (ValueError, RecursionError) as err:
        raise _Unreadable("'record' is not JSON: %s" % err) from err
    if not isinstance(record, dict):
        raise _Unreadable("'record' is a JSON %s, expected an object" % type(record).__name__)
    return record


def _read_is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _read_is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# optional entries of meta / progress: the type each must have where present
_READ_META_TYPES = {"script": (str,), "config": (dict,), "labels": (list,), "num_classes": (int,),
                    "backbone": (str, type(None)), "data": (dict, type(None))}
_READ_PROGRESS_INTS = ("epoch", "batch_in_epoch", "loss_count", "batch_size", "seed")
_READ_PROGRESS_NUMBERS = ("loss_sum", "epoch_time")


def _read_check_contents(record, arrays):
    """_Unreadable unless record and arrays hold what restore and the callers use."""
    def expect(where, value, ok, what):
        if not ok(value):
            raise _Unreadable("record %s is %s, expected %s" % (where, _read_short(value), what))

    for key in ("meta", "progress", "schedule", "extra", "python_random", "numpy_random"):
        if key not in record:
            raise _Unreadable("record has no %r" % key)
    for key in ("meta", "progress", "schedule", "extra"):
        expect(key, record[key], lambda v: isinstance(v, dict), "an object")
    for key, types in _READ_META_TYPES.items():
        if key in record["meta"]:
            expect("meta.%s" % key, record["meta"][key],
                   lambda v: isinstance(v, types) and not isinstance(v, bool), types[0].__name__)
    if "labels" in record["meta"]:
        expect("meta.labels", record["meta"]["labels"],
               lambda v: all(isinstance(s, str) for s in v), "a list of names")
    progress = record["progress"]
    if "step" not in progress:
        raise _Unreadable("record progress has no 'step'")
    expect("progress.step", progress["step"], lambda v: _read_is_int(v) and v >= 0,
           "a non-negative integer")
    for key in _READ_PROGRESS_INTS:
        if key in progress:
            expect("progress.%s" % key, progress[key], lambda v: _read_is_int(v) and v >= 0,
                   "a non-negative integer")
    for key in _READ_PROGRESS_NUMBERS:
        if key in progress:
            expect("progress.%s" % key, progress[key], _read_is_number, "a number")
    if "best" in progress:
        expect("progress.best", progress["best"], lambda v: v is None or _read_is_number(v),
               "a number or null")
    schedule = record["schedule"]
    if "lr" not in schedule:
        raise _Unreadable("record schedule has no 'lr'")
    for key in ("lr", "base_lr", "best"):
        if key in schedule:
            expect("schedule.%s" % key, schedule[key], _read_is_number, "a number")
    for key in ("patience", "drops"):
        if key in schedule:
            expect("schedule.%s" % key, schedule[key], lambda v: _read_is_int(v) and v >= 0,
                   "a non-negative integer")
    for name, numbers in record["extra"].items():
        expect("extra.%s" % name, numbers, lambda v: isinstance(v, dict), "an object")
    try:  # the random states must be ones restore can set (checked on private generators)
        random.Random().setstate(_tuples(record["python_random"]))
    except (TypeError, ValueError, OverflowError, IndexError, RecursionError) as err:
        raise _Unreadable("record python_random is not a random state (%s)" % err) from err
    if "rng/numpy" not in arrays:
        raise _Unreadable("no 'rng/numpy' entry")
    state = record["numpy_random"]
    expect("numpy_random", state, lambda v: isinstance(v, list) and len(v) == 4,
           "[kind, pos, has_gauss, gauss]")
    key = arrays["rng/numpy"]
    if key.dtype != np.uint32 or key.shape != (624,):
        raise _Unreadable("'rng/numpy' is a %s array of shape %s, expected uint32 (624,)"
                          % (key.dtype, key.shape))
    try:
        np.random.RandomState().set_state((state[0], key, state[1], state[2], state[3]))
    except (TypeError, ValueError, OverflowError) as err:
        raise _Unreadable("record numpy_random is not a random state (%s)" % err) from err
    for name, value in arrays.items():
        if name.startswith("param/") and value.dtype.kind not in "fiu":
            raise _Unreadable("parameter %s is a %s array, expected numbers" % (name[6:], value.dtype))
        if name.startswith("trainer/") and (value.dtype != np.uint8 or value.ndim != 1):
            raise _Unreadable("optimizer state %s is a %s array of shape %s, expected bytes"
                              % (name[8:], value.dtype, value.shape))


def _read_short(value):
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def run_checkpoint(source):
    """The checkpoint ``source`` names: the file itself, or a run directory's best
    (else last) checkpoint; None when there is none (the caller words the error)."""
    if os.path.isdir(source):
        for name in (BEST, LAST):
            if os.path.isfile(os.path.join(source, name)):
                return os.path.join(source, name)
        return None
    return source if os.path.isfile(source) else None


def _check_meta(path, record, meta, flag):
    saved = record["meta"]
    for key, value in meta.items():
        if saved.get(key) != value:
            raise UserError("%s: %s was written for %s=%r, this run has %s=%r"
                            % (flag, path, key, saved.get(key), key, value))


def _set_params(path, arrays, blocks, flag):
    for block_name, block in blocks.items():
        for name, param in _param_dict(block).items():
            key = "param/%s/%s" % (block_name, name)
            if key not in arrays:
                raise UserError("%s: %s has no parameter %s/%s (different model?)"
                                % (flag, path, block_name, name))
            saved = arrays[key]
            # 0 = a dimension Gluon infers at the first forward (deferred initialisation)
            if len(saved.shape) != len(param.shape) or any(
                    mine not in (0, theirs) for mine, theirs in zip(param.shape, saved.shape)):
                raise UserError("%s: %s holds %s/%s of shape %s, the model expects %s"
                                % (flag, path, block_name, name, saved.shape, param.shape))
            # what Block.load_parameters does: completes deferred shapes and initialises
            param._load_init(mx.nd.array(saved, dtype=saved.dtype), param.list_ctx())


def load_parameters(path, blocks, meta, flag="--test", overlay=None):
    """Only the parameters of a checkpoint (evaluation, prediction); returns its record.

    overlay: the name of an extra state whose arrays ``<block>/<param>`` replace those
    parameters (``ema``: the moving average of --ema); the record's ``overlaid`` is then
    the number of parameters replaced (0: the checkpoint holds none)."""
    record, arrays = read(path, flag)
    _check_meta(path, record, meta, flag)
    if overlay is not None:
        prefix = "extra/%s/" % overlay
        replaced = {"param/" + k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
        replaced = {k: v for k, v in replaced.items() if k in arrays}  # parameters only
        arrays.update(replaced)
        record["overlaid"] = len(replaced)
    _set_params(path, arrays, blocks, flag)
    return record


def restore(path, blocks, trainers, schedule, meta, flag="--resume"):
    """Load a checkpoint into the given objects; returns (progress, extra).

    ``meta`` must equal the checkpoint's (same script, model, dataset, classes);
    every parameter and trainer must be present with the same shapes.
    extra: dict name -> state dict (arrays and numbers) for the caller to load.
    """
    record, arrays = read(path, flag)
    _check_meta(path, record, meta, flag)
    _set_params(path, arrays, blocks, flag)
    workdir = os.path.dirname(os.path.abspath(path))
    for name, trainer in trainers.items():
        if "trainer/" + name not in arrays:
            raise UserError("%s: %s has no optimizer state for %s (different model or options?)"
                            % (flag, path, name))
        _load_trainer_state(trainer, arrays["trainer/" + name].tobytes(), workdir)
    schedule.load_state_dict(record["schedule"])
    random.setstate(_tuples(record["python_random"]))
    kind, pos, has_gauss, gauss = record["numpy_random"]
    np.random.set_state((kind, arrays["rng/numpy"], pos, has_gauss, gauss))
    extra = {name: dict(numbers) for name, numbers in record["extra"].items()}
    for key, value in arrays.items():
        if key.startswith("extra/"):
            _, name, field = key.split("/", 2)
            extra.setdefault(name, {})[field] = value
    return record["progress"], extra
