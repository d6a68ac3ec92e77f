"""``--tensorboard``: the run's scalars as TensorBoard event files in RUN/tensorboard/.

What is written (rank 0 only), the same numbers as the JSON logs:

- every logged step (a ``steps.jsonl`` record): ``train/loss``, ``train/lr``,
  ``train/samples_per_sec`` at the run's step;
- every evaluation (a ``metrics.jsonl`` record): ``val/<metric>`` for each
  numeric metric and ``train/epoch_loss`` (the epoch's mean training loss) at
  the step the evaluation followed (``steps``), so training and validation
  curves share TensorBoard's step axis.

The file is written here without TensorFlow, tensorboardX or protobuf: an
event file is a sequence of TFRecords (uint64 length, masked CRC-32C of the
length, the bytes, masked CRC-32C of the bytes; all little-endian) whose
payloads are serialized ``tensorflow.Event`` messages; the first holds
``file_version = "brain.Event:2"``, every other one a ``Summary`` of
``Value(tag, simple_value)``. Only the few protobuf fields below are encoded
(field numbers of tensorboard/compat/proto/event.proto and summary.proto).

Resume: the event file is a view of ``steps.jsonl`` and ``metrics.jsonl``.
When a run starts (:meth:`EventLog.start`) it is rebuilt from the records a
resumed run keeps (steps up to the checkpoint's step, the epochs before the
checkpoint's epoch: the logs' own truncation) into a new file, and the older
event files are then emptied (removed at the following start), so the
directory always holds one history with no point twice, including after
``--max-steps`` stops (its partial evaluation is dropped, as in metrics.jsonl)
and kills. A TensorBoard left running reads the new file as a restart: the
file opens with ``SessionLog(START)`` at step 0 (its Python loader then drops
every point read before; its Rust loader drops a series' later points when
its steps go back). Turning
``--tensorboard`` on at a resume writes the run's history so far.
"""
import bisect
import glob
import math
import os
import socket
import struct
import tempfile
import time

from .errors import writing

EVENTS_DIR = "tensorboard"
FILE_MARK = "events.out.tfevents."
FILE_VERSION = b"brain.Event:2"
_TEMPORARY_PREFIX = ".rebuild.tmp-"  # no "tfevents" in it: TensorBoard ignores a half-written file
_FLOAT_MAX = struct.unpack("<f", b"\xff\xff\x7f\x7f")[0]


def _crc32c_table():
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli, reflected
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data):
    """CRC-32C (Castagnoli) of ``data`` (bytes)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data):
    """TFRecord's masked CRC-32C: rotated right by 15 bits plus a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(payload):
    """One TFRecord: length, its masked CRC, the payload, its masked CRC."""
    length = struct.pack("<Q", len(payload))
    return length + struct.pack("<I", masked_crc(length)) + payload + struct.pack("<I", masked_crc(payload))


def _varint(number):
    out = bytearray()
    while True:
        bits = number & 0x7F
        number >>= 7
        if number:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _bytes_field(number, payload):
    """A length-delimited field (wire type 2): strings, bytes, embedded messages."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _float32(value):
    # simple_value is a float: out-of-range finite numbers become +-inf instead of an error
    if math.isfinite(value) and abs(value) > _FLOAT_MAX:
        value = math.copysign(math.inf, value)
    return struct.pack("<f", value)


def encode_event(wall_time, step, scalars=None, file_version=None, session_start=False):
    """A serialized ``Event``: wall_time (field 1, double), step (2, int64), then
    file_version (3, string), or session_log (7) ``SessionLog(status=1 (START))``, or
    summary (5): ``Summary.value`` (1) per (tag, value) of ``scalars``, each
    ``Value(tag=1, simple_value=2 (float))``."""
    out = b"\x09" + struct.pack("<d", wall_time) + _varint(2 << 3) + _varint(int(step))
    if file_version is not None:
        return out + _bytes_field(3, file_version)
    if session_start:
        return out + _bytes_field(7, b"\x08\x01")
    values = b"".join(_bytes_field(1, _bytes_field(1, tag.encode("utf-8")) + b"\x15" + _float32(value))
                      for tag, value in scalars)
    return out + _bytes_field(5, values)


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def step_scalars(record):
    """(step, [(tag, value)]) of a steps.jsonl record."""
    pairs = [("train/loss", record.get("loss")), ("train/lr", record.get("lr")),
             ("train/samples_per_sec", record.get("samples_per_sec"))]
    return record["step"], [(tag, float(v)) for tag, v in pairs if _number(v)]


def epoch_scalars(record):
    """(step, [(tag, value)]) of a metrics.jsonl record: its numeric validation metrics
    and the epoch's mean training loss, at the step the evaluation followed."""
    pairs = [("val/%s" % name, v) for name, v in sorted((record.get("val") or {}).items())]
    pairs.append(("train/epoch_loss", record.get("train_loss")))
    return record["steps"], [(tag, float(v)) for tag, v in pairs if _number(v)]


def event_files(directory):
    """The event files of ``directory``, in TensorBoard's (name) order."""
    return sorted(glob.glob(os.path.join(directory, "*tfevents*")))


class EventLog(object):
    """RUN/tensorboard/events.out.tfevents.*: :meth:`start` once when a run starts,
    then :meth:`add_step` / :meth:`add_epoch` beside the JSON logs' appends."""

    def __init__(self, save_dir, log=print):
        self.save_dir, self.log = save_dir, log
        self.directory = os.path.join(save_dir, EVENTS_DIR)
        self.path = None

    def start(self, steps_log, metrics_log, step, epoch):
        """Write a new event file holding the history a run starting at ``step`` / ``epoch``
        keeps (the records of ``steps_log`` (steps.jsonl) of steps <= step, of
        ``metrics_log`` (metrics.jsonl) of epochs before ``epoch``; a new run: none, even
        beside an old run's logs), then remove the older event files."""
        steps = [r for r in steps_log.read() if r["step"] <= step]
        epochs = [r for r in metrics_log.read() if r["epoch"] < epoch]
        events = []  # (step, order, wall_time, scalars): a step's log before its evaluation, as live
        for r in steps:
            s, scalars = step_scalars(r)
            events.append((s, 0, r["time"], scalars))
        logged = sorted((e[0], e[2]) for e in events)
        for r in epochs:
            s, scalars = epoch_scalars(r)
            # metrics.jsonl keeps no clock time: the last logged step's before it is the closest known
            before = bisect.bisect_right(logged, (s, math.inf))
            events.append((s, 1, logged[before - 1][1] if before else time.time(), scalars))
        events.sort(key=lambda e: (e[0], e[1]))  # TensorBoard reads a step going back as a restart
        begin = min([e[2] for e in events] or [time.time()])
        with writing(self.directory):
            os.makedirs(self.directory, exist_ok=True)
            old = event_files(self.directory)
            for stale in glob.glob(os.path.join(self.directory, _TEMPORARY_PREFIX + "*")):
                os.remove(stale)  # a rebuild a kill interrupted
            path = self._new_name(old)
            fd, tmp = tempfile.mkstemp(prefix=_TEMPORARY_PREFIX, dir=self.directory)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(tfrecord(encode_event(begin, 0, file_version=FILE_VERSION)))
                    # a restart from step 0 (the history follows): TensorBoard's Python loader
                    # drops what it read from the older files (it ignores a run's first START)
                    f.write(tfrecord(encode_event(begin, 0, session_start=True)))
                    for s, _, wall, scalars in events:
                        f.write(tfrecord(encode_event(wall, s, scalars)))
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise
            for name in old:  # their points are in the new file, up to the resumed step
                if os.path.getsize(name) == 0:
                    os.remove(name)  # emptied by an earlier start: every reader has moved on
                else:
                    # emptied, not removed: a running TensorBoard's loader (--load_fast=false)
                    # stops at a removed file; at an empty one it goes on to the next file
                    open(name, "wb").close()
        self.path = path
        if old:
            self.log("tensorboard: %s rebuilt from the logs (%d steps, %d evaluations)"
                     % (path, len(steps), len(epochs)))

    def _new_name(self, old):
        base = os.path.join(self.directory, "%s%010d.%s.%d" % (FILE_MARK, int(time.time()),
                                                               socket.gethostname(), os.getpid()))
        serial = 0
        while "%s.%d" % (base, serial) in old:
            serial += 1
        return "%s.%d" % (base, serial)

    def _append(self, wall_time, step, scalars):
        if self.path is None:
            raise RuntimeError("EventLog.start was not called")
        with writing(self.path):
            with open(self.path, "ab") as f:  # flushed at once: a running TensorBoard sees it
                f.write(tfrecord(encode_event(wall_time, step, scalars)))

    def add_step(self, record):
        """A steps.jsonl record (training_runtime.progress.EpochProgress.logged)."""
        step, scalars = step_scalars(record)
        self._append(record["time"], step, scalars)

    def add_epoch(self, record):
        """A metrics.jsonl record (training_runtime.loop.Runner._end_epoch)."""
        step, scalars = epoch_scalars(record)
        self._append(time.time(), step, scalars)

