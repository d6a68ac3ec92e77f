"""Fault-injection callbacks for the runner (training_runtime.loop.Callback), and a
command line that runs a training script with them installed.

    python tests/hooks.py --kill-at-step 5 --nan-at-step 3 -- train_attr.py ARGS...

- :class:`KillAtStep`: the process SIGKILLs itself right after step k (before
  any checkpoint of that step) — the kill-and-resume tests (``KILL_CHILDREN_FILE``:
  where to list its child processes first; ``--kill-rank R``: only in the
  distributed worker of rank R, once its own step's pushes are out and rank 0
  has saved a checkpoint of step k, so what the survivors do is deterministic);
- :class:`NanAtStep`: the loss of step k becomes NaN before the backward pass
  (so the parameters become NaN too) — the NaN-guard tests;
- :class:`SignalAtStep`: the process sends itself a signal (SIGTERM, SIGINT) right
  after step k, ``count`` times — the pre-emption tests.
"""
import argparse
import json
import os
import runpy
import signal
import sys

from training_runtime import cli
from training_runtime.loop import Callback


def child_pids(pid):
    """Process ids whose parent is ``pid`` (from /proc)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(name))
    return found


class KillAtStep(Callback):
    """With the environment variable KILL_CHILDREN_FILE set, the ids of the
    process's children (DataLoader workers) are written there (JSON) first."""

    def __init__(self, step, rank=None):
        self.step = int(step)
        self.rank = rank

    def on_step_end(self, runner):
        if runner.step == self.step and self.rank in (None, runner.rank):
            if self.rank is not None:
                wait_for_checkpoint(runner, self.step)
            if os.environ.get("KILL_CHILDREN_FILE"):
                with open(os.environ["KILL_CHILDREN_FILE"], "w") as f:
                    json.dump(child_pids(os.getpid()), f)
            os.kill(os.getpid(), signal.SIGKILL)


def wait_for_checkpoint(runner, step, timeout=120):
    """Wait until this worker's engine work is done (its gradient pushes are out) and
    RUN/last.ckpt holds step ``step`` or later (written by rank 0)."""
    import time
    import mxnet as mx
    from training_runtime import checkpoint
    mx.nd.waitall()
    path = os.path.join(runner.save_dir, checkpoint.LAST)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path):
            try:
                if checkpoint.read(path)[0]["progress"]["step"] >= step:
                    return
            except Exception:  # noqa: BLE001  (replaced while read: try again)
                pass
        time.sleep(0.05)
    raise RuntimeError("no checkpoint of step %d in %s after %ds" % (step, path, timeout))


class NanAtStep(Callback):
    def __init__(self, step):
        self.step = int(step)

    def on_losses(self, runner, losses):
        if runner.step + 1 == self.step:
            return [loss * float("nan") for loss in losses]
        return losses


class SignalAtStep(Callback):
    def __init__(self, step, signum, count=1):
        self.step, self.signum, self.count = int(step), int(signum), int(count)

    def on_step_end(self, runner):
        if runner.step == self.step:
            for _ in range(self.count):
                os.kill(os.getpid(), self.signum)


def callbacks_from(kill_at_step=None, nan_at_step=None, signal_at_step=None, signal_name="SIGTERM",
                   signal_count=1, kill_rank=None):
    found = []
    if signal_at_step:
        found.append(SignalAtStep(signal_at_step, getattr(signal, signal_name), signal_count))
    if kill_at_step:
        found.append(KillAtStep(kill_at_step, kill_rank))
    if nan_at_step:
        found.append(NanAtStep(nan_at_step))
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kill-at-step", type=int, default=None)
    parser.add_argument("--kill-rank", type=int, default=None,
                        help="--kill-at-step in the distributed worker of this rank only")
    parser.add_argument("--nan-at-step", type=int, default=None)
    parser.add_argument("--signal-at-step", type=int, default=None)
    parser.add_argument("--signal", default="SIGTERM", choices=("SIGTERM", "SIGINT"))
    parser.add_argument("--signal-count", type=int, default=1)
    parser.add_argument("script", help="train_attr.py or train_fgvc.py")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    options = parser.parse_args()
    script = runpy.run_path(options.script)  # its main(argv, callbacks)
    callbacks = callbacks_from(options.kill_at_step, options.nan_at_step, options.signal_at_step,
                               options.signal, options.signal_count, options.kill_rank)
    sys.argv = [options.script] + options.args
    cli.run_main(lambda argv: script["main"](argv, callbacks=callbacks), options.args)


if __name__ == "__main__":
    main()
