"""--tensorboard: RUN/tensorboard event files, read back with a reader written here
(framing checked with a bitwise CRC-32C, events decoded by the protobuf library from
an Event / Summary descriptor built in the test: protobuf comes with onnx, a test
extra), the same numbers as steps.jsonl and metrics.jsonl, one history after a
crash and resume and after --max-steps then --resume."""
import json
import math
import os
import struct

import numpy as np
import pytest

from training_runtime import checkpoint, loop, progress, tensorboard
from test_runner import StopAt, make_runner

# ---- an independent reader ------------------------------------------------------------


def crc32c_bitwise(data):
    """CRC-32C bit by bit (the writer uses a byte table)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def unmask(masked):
    rotated = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rotated << 15) | (rotated >> 17)) & 0xFFFFFFFF


def read_records(path):
    """The payloads of a TFRecord file; every length and payload CRC checked."""
    with open(path, "rb") as f:
        data = f.read()
    payloads, pos = [], 0
    while pos < len(data):
        header = data[pos:pos + 8]
        length = struct.unpack("<Q", header)[0]
        assert unmask(struct.unpack("<I", data[pos + 8:pos + 12])[0]) == crc32c_bitwise(header)
        payload = data[pos + 12:pos + 12 + length]
        assert len(payload) == length, "truncated record"
        assert unmask(struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0]) == crc32c_bitwise(payload)
        payloads.append(payload)
        pos += 16 + length
    assert pos == len(data)
    return payloads


def event_class():
    """tensorflow.Event's fields we expect (event.proto / summary.proto numbers), proto2 so
    that explicitly written zeros survive a re-serialisation."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    F = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="tb_test_event.proto", package="tbtest", syntax="proto2")

    def message(name, *fields):
        m = proto.message_type.add(name=name)
        for field_name, number, kind, label, type_name in fields:
            m.field.add(name=field_name, number=number, type=kind, label=label, type_name=type_name)

    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    message("Value", ("tag", 1, F.TYPE_STRING, opt, None), ("simple_value", 2, F.TYPE_FLOAT, opt, None))
    message("Summary", ("value", 1, F.TYPE_MESSAGE, rep, ".tbtest.Value"))
    message("SessionLog", ("status", 1, F.TYPE_INT32, opt, None))  # an enum: 1 = START
    message("Event", ("wall_time", 1, F.TYPE_DOUBLE, opt, None), ("step", 2, F.TYPE_INT64, opt, None),
            ("file_version", 3, F.TYPE_STRING, opt, None), ("summary", 5, F.TYPE_MESSAGE, opt, ".tbtest.Summary"),
            ("session_log", 7, F.TYPE_MESSAGE, opt, ".tbtest.SessionLog"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tbtest.Event"))


def read_events(path, session_start=True):
    """[(wall_time, step, {tag: value})] after the file_version event (and, in a run's
    file, the SessionLog START at step 0 that makes TensorBoard forget older files)."""
    Event = event_class()
    events = []
    for payload in read_records(path):
        event = Event.FromString(payload)
        assert event.SerializeToString() == payload  # only these fields, canonical order
        events.append(event)
    assert events[0].file_version == "brain.Event:2" and not events[0].HasField("summary")
    if session_start:
        assert events[1].session_log.status == 1 and events[1].step == 0
        assert events[1].wall_time == events[0].wall_time and not events[1].HasField("summary")
    rest = events[2 if session_start else 1:]
    assert all(e.HasField("summary") and not e.HasField("session_log") for e in rest)
    return [(e.wall_time, e.step, {v.tag: v.simple_value for v in e.summary.value}) for e in rest]


def the_event_file(save_dir, emptied=0):
    """The one event file with events (beside ``emptied`` files a resume emptied)."""
    files = tensorboard.event_files(os.path.join(str(save_dir), tensorboard.EVENTS_DIR))
    full = [f for f in files if os.path.getsize(f)]
    assert len(full) == 1 and len(files) == 1 + emptied, files
    assert not [n for n in os.listdir(os.path.dirname(files[0])) if "tmp" in n]
    return full[0]


def series(events, tag):
    """[(step, value)] of ``tag`` in file order."""
    return [(step, values[tag]) for _, step, values in events if tag in values]


def jsonl(save_dir, name):
    return [json.loads(line) for line in open(os.path.join(str(save_dir), name))]


def f32(x):
    return float(np.float32(x))


# ---- tests ----------------------------------------------------------------------------


def test_events_decode_with_protobuf_and_crc_check_value(tmp_path):
    assert crc32c_bitwise(b"123456789") == tensorboard.crc32c(b"123456789") == 0xE3069283
    path = str(tmp_path / "events.out.tfevents.1")
    with open(path, "wb") as f:
        f.write(tensorboard.tfrecord(tensorboard.encode_event(1.5, 0, file_version=b"brain.Event:2")))
        f.write(tensorboard.tfrecord(tensorboard.encode_event(
            1796644800.25, 300, [("train/loss", 0.6931), ("val/top1", 0.0), ("big", 1e300)])))
        f.write(tensorboard.tfrecord(tensorboard.encode_event(2.0, 2 ** 40, [("x", -3.0)])))
    events = read_events(path, session_start=False)
    assert events[0][:2] == (1796644800.25, 300)
    assert events[0][2] == {"train/loss": f32(0.6931), "val/top1": 0.0, "big": math.inf}
    assert events[1] == (2.0, 2 ** 40, {"x": -3.0})


def test_runner_scalars_match_the_logs_and_a_resume_writes_no_step_twice(tmp_path):
    """LinearTask (40 samples / batch 8: 5 steps an epoch, 3 epochs), log every step. A
    crash at step 5 after steps 1-4 were logged, with the checkpoint at step 3: the
    resumed file holds steps 1-15 once each, the numbers of steps.jsonl, metrics.jsonl
    and of the uninterrupted run (resume is exact)."""
    assert make_runner(tmp_path / "off").tensorboard is None  # off by default
    reference = make_runner(tmp_path / "ref", log_every=1, tensorboard=True, figures="none")
    reference.run()
    ref = read_events(the_event_file(tmp_path / "ref"))

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        make_runner(run, callbacks=[StopAt(5)], log_every=1, checkpoint_every=3, tensorboard=True, figures="none").run()
    assert [s for s, _ in series(read_events(the_event_file(run)), "train/loss")] == [1, 2, 3, 4]
    resumed = make_runner(run, log_every=1, checkpoint_every=3, tensorboard=True, figures="none")
    resumed.resume(str(run / checkpoint.LAST))
    assert resumed.step == 3
    resumed.run()
    events = read_events(the_event_file(run, emptied=1))

    steps = jsonl(run, progress.STEPS_FILE)
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("train/samples_per_sec", "samples_per_sec")):
        assert series(events, tag) == [(r["step"], f32(r[key])) for r in steps], tag
    assert [s for s, _ in series(events, "train/loss")] == list(range(1, 16))
    assert [e[0] for e in events if "train/loss" in e[2]] == [r["time"] for r in steps]
    metrics = jsonl(run, loop.METRICS_FILE)
    assert series(events, "val/neg_mse") == [(r["steps"], f32(r["val"]["neg_mse"])) for r in metrics]
    assert series(events, "train/epoch_loss") == [(r["steps"], f32(r["train_loss"])) for r in metrics]
    assert [s for s, _ in series(events, "val/neg_mse")] == [5, 10, 15]
    assert [step for _, step, _ in events] == sorted(step for _, step, _ in events)  # never back
    # the uninterrupted run's numbers
    np.testing.assert_allclose([v for _, v in series(events, "train/loss")],
                               [v for _, v in series(ref, "train/loss")], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in series(events, "val/neg_mse")],
                               [v for _, v in series(ref, "val/neg_mse")], rtol=1e-6)


def test_train_fgvc_max_steps_then_resume_drops_the_partial_evaluation(tmp_path, fashion_mnist_dir):
    """16 images, batch 8: 2 steps an epoch, 2 epochs. --max-steps 3 stops in epoch 1
    (a partial evaluation at step 3); --resume finishes: the partial point is gone."""
    import train_fgvc
    save_dir = str(tmp_path / "run")
    args = ["--method", "baseline", "--backbone", "resnet18_v1", "--train-limit", "16", "--val-limit", "8",
            "--test-limit", "8", "--batch-size", "8", "--epochs", "2", "--image-size", "32",
            "--picture-images", "0", "--figures", "none", "--log-every", "1", "--save-dir", save_dir]
    train_fgvc.main(args + ["--tensorboard", "--max-steps", "3"])
    assert json.load(open(os.path.join(save_dir, "args.json")))["config"]["runtime"]["tensorboard"] is True
    stopped = read_events(the_event_file(save_dir))
    assert [s for s, _ in series(stopped, "val/top1")] == [2, 3]  # epoch 0, then the partial one
    train_fgvc.main(args + ["--resume", "--max-steps", "0"])  # the saved definition keeps --tensorboard
    events = read_events(the_event_file(save_dir, emptied=1))
    assert [s for s, _ in series(events, "train/loss")] == [1, 2, 3, 4]
    metrics = jsonl(save_dir, loop.METRICS_FILE)
    assert [r["steps"] for r in metrics] == [2, 4]
    assert series(events, "val/top1") == [(r["steps"], f32(r["val"]["top1"])) for r in metrics]


def test_start_writes_the_history_a_run_keeps_from_the_logs(tmp_path):
    """--tensorboard turned on at a resume from step 4 / epoch 1 (2 steps an epoch, steps
    logged at 2, 4, 5): the file holds steps 2 and 4 and epoch 0's evaluation, at the time
    of its last logged step; a new run (step 0) beside an old run's logs holds nothing."""
    save_dir = str(tmp_path)
    steps, metrics = progress.StepLog(save_dir), loop.MetricsLog(save_dir, draw=False)
    for step, time_ in ((2, 100.5), (4, 130.25), (5, 140.0)):
        steps.append({"epoch": (step - 1) // 2, "step": step, "loss": 1.0 / step, "lr": 0.1,
                      "samples_per_sec": 50.0 + step, "time": time_})
    metrics.append({"epoch": 0, "lr": 0.1, "train_loss": 0.75, "val": {"top1": 0.5, "note": "x"}, "steps": 2})
    metrics.append({"epoch": 1, "lr": 0.1, "train_loss": 0.5, "val": {"top1": 0.625}, "steps": 4})
    log = tensorboard.EventLog(save_dir, log=lambda *a: None)
    log.start(steps, metrics, step=4, epoch=1)
    events = read_events(the_event_file(save_dir))
    assert events == [(100.5, 2, {"train/loss": 0.5, "train/lr": f32(0.1), "train/samples_per_sec": 52.0}),
                      (100.5, 2, {"val/top1": 0.5, "train/epoch_loss": 0.75}),
                      (130.25, 4, {"train/loss": 0.25, "train/lr": f32(0.1), "train/samples_per_sec": 54.0})]
    log.add_step({"step": 5, "loss": 0.125, "lr": 0.1, "samples_per_sec": 8.0, "time": 150.0})
    assert read_events(the_event_file(save_dir))[-1] == (150.0, 5, {"train/loss": 0.125, "train/lr": f32(0.1),
                                                                   "train/samples_per_sec": 8.0})
    tensorboard.EventLog(save_dir, log=lambda *a: None).start(steps, metrics, step=0, epoch=0)
    assert read_events(the_event_file(save_dir, emptied=1)) == []
