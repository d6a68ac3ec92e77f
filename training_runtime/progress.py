"""Progress a person can follow: tqdm bars on a terminal, one line every
``--log-every`` steps otherwise, and ``steps.jsonl`` in the run directory.

A logged step's line (stderr not a terminal)::

    epoch 0 step 20/94 (run 20/188): loss 0.6931, lr 0.005, 412.3 samples/s, ETA epoch 0:13 run 0:40

``steps.jsonl`` holds one JSON record per logged step: ``epoch``, ``step``
(counted over the run from 1), ``batch`` (in the epoch, from 1),
``batches`` (of the epoch), ``loss`` (mean per-sample loss of the steps
since the previous logged step), ``lr``, ``samples_per_sec`` (since the
previous logged step, host time), ``eta_epoch`` and ``eta_run`` (seconds),
``time`` (unix). A resumed run drops the records after its checkpoint's step
and a torn last line.
"""
import json
import os
import sys
import time

from tqdm import tqdm

from . import checkpoint
from .errors import UserError, writing

STEPS_FILE = "steps.jsonl"


def format_duration(seconds):
    """``H:MM:SS`` or ``M:SS``; ``?`` when unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return "%d:%02d:%02d" % (h, m, s) if h else "%d:%02d" % (m, s)


def is_terminal(stream=None):
    stream = stream or sys.stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class RecordLog(object):
    """A JSON-lines file of records, appended one by one and truncated on resume.

    A torn last line (a run killed while writing it) is dropped and reported
    through ``log``; a damaged earlier line is a UserError.
    """

    def __init__(self, path, log=print):
        self.path = path
        self.log = log

    def read(self):
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            lines = [line for line in f.read().split("\n") if line.strip()]
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except ValueError:
                if number == len(lines):
                    self.log("%s: dropped a torn last line (a run killed while writing it)" % self.path)
                    break
                raise UserError("%s: line %d: expected one JSON record per line, got %r"
                                % (self.path, number, line[:60]))
        return records

    def keep(self, wanted):
        """Rewrite the file atomically with the records for which ``wanted(record)`` is true."""
        kept = [r for r in self.read() if wanted(r)]
        with writing(self.path), checkpoint.replaced_atomically(self.path) as tmp:
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)

    def append(self, record):
        with writing(self.path):
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()


class StepLog(RecordLog):
    """``steps.jsonl``: one JSON record per logged step (see the module docstring)."""

    def __init__(self, save_dir, log=print):
        super(StepLog, self).__init__(os.path.join(save_dir, STEPS_FILE), log)

    def truncate(self, step):
        """Keep the records of steps <= ``step`` (a resumed run writes the later ones again)."""
        if os.path.exists(self.path):
            self.keep(lambda r: r["step"] <= step)


class EpochProgress(object):
    """The progress of one epoch: a tqdm bar on a terminal, log lines otherwise.

    batches: number of batches of the epoch; initial: batches already done
    (resume); run_steps_left: steps the run will still do from here (for the
    run's ETA; None = unknown).
    """

    def __init__(self, epoch, batches, initial=0, run_step=0, run_steps=None, stream=None,
                 terminal=None):
        self.epoch, self.batches, self.run_steps = epoch, batches, run_steps
        self.stream = stream or sys.stderr
        self.terminal = is_terminal(self.stream) if terminal is None else terminal
        self.bar = tqdm(total=batches, initial=initial, desc="epoch %d" % epoch, file=self.stream,
                        disable=not self.terminal, leave=False, dynamic_ncols=True)
        self.start = self.last_time = time.time()
        self.start_batch = self.last_batch = initial
        self.samples_since = 0

    def update(self, num_samples):
        """After one step of ``num_samples`` samples (no host sync)."""
        self.bar.update(1)
        self.samples_since += num_samples

    def logged(self, batch, step, loss, lr):
        """At a log step: the line (not on a terminal) and the steps.jsonl record."""
        now = time.time()
        elapsed = max(now - self.last_time, 1e-9)
        speed = self.samples_since / elapsed
        per_batch = (now - self.start) / max(batch - self.start_batch, 1)
        eta_epoch = per_batch * (self.batches - batch)
        eta_run = per_batch * (self.run_steps - step) if self.run_steps else None
        self.last_time, self.last_batch, self.samples_since = now, batch, 0
        record = {"epoch": self.epoch, "step": step, "batch": batch, "batches": self.batches,
                  "loss": loss, "lr": lr, "samples_per_sec": round(speed, 3),
                  "eta_epoch": round(eta_epoch, 1),
                  "eta_run": round(eta_run, 1) if eta_run is not None else None, "time": round(now, 3)}
        if self.terminal:
            self.bar.set_postfix(loss="%.4f" % loss, speed="%.1f/s" % speed)
        else:
            run = " (run %d/%d)" % (step, self.run_steps) if self.run_steps else ""
            print("epoch %d step %d/%d%s: loss %.4f, lr %g, %.1f samples/s, ETA epoch %s run %s"
                  % (self.epoch, batch, self.batches, run, loss, lr, speed,
                     format_duration(eta_epoch), format_duration(eta_run)),
                  file=self.stream, flush=True)
        return record

    def close(self):
        self.bar.close()


def start_line(ctx, batch_size):
    """The devices, batch per device and effective batch, logged at start."""
    per = batch_size // len(ctx)
    extra = batch_size % len(ctx)
    per_text = str(per) if not extra else "%d-%d" % (per, per + 1)
    return "devices: %s; batch per device %s, effective batch %d" % (
        ", ".join(str(c) for c in ctx), per_text, batch_size)
