"""Helpers for end-to-end tests of the training scripts (run in subprocesses).

- :func:`run_script`: run ``<repo>/<script>`` with arguments (and fault-injection
  callbacks of tests/hooks.py), check its exit status;
- :func:`params_of` / :func:`max_param_diff`: the parameters stored in a checkpoint;
- :func:`metrics_without_time`: metrics.jsonl lines minus the wall-clock field;
- :func:`kill_and_resume`: SIGKILL a run after a given step (the runtime's
  :class:`hooks.KillAtStep` callback), restart it with ``--resume`` and
  return the resumed run's directory and the step of the checkpoint it
  restarted from.
"""
import json
import os
import subprocess
import sys

import numpy as np

from training_runtime import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


HOOKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hooks.py")


def run_script(script, args, env=None, expect=0, timeout=300, kill_at_step=None, nan_at_step=None,
               signal_at_step=None, signal="SIGTERM", signal_count=1):
    """Run ``python <ROOT>/<script> args`` from ROOT (through tests/hooks.py when a
    fault is to be injected); assert the exit status unless expect is None."""
    full_env = dict(os.environ, **(env or {}))
    command = [sys.executable, os.path.join(ROOT, script)]
    if kill_at_step or nan_at_step or signal_at_step:
        command = [sys.executable, HOOKS]
        for flag, value in (("--kill-at-step", kill_at_step), ("--nan-at-step", nan_at_step),
                            ("--signal-at-step", signal_at_step)):
            if value:
                command += [flag, str(value)]
        if signal_at_step:
            command += ["--signal", signal, "--signal-count", str(signal_count)]
        command.append(os.path.join(ROOT, script))
    proc = subprocess.run(command + list(args), cwd=ROOT,
                          env=full_env, capture_output=True, text=True, timeout=timeout)
    if expect is not None:
        assert proc.returncode == expect, "exit %d\nstdout:\n%s\nstderr:\n%s" % (
            proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def params_of(path):
    """(record, {'param/<block>/<name>': numpy array}) of a checkpoint file."""
    record, arrays = checkpoint.read(path)
    return record, {k: v for k, v in arrays.items() if k.startswith("param/")}


def max_param_diff(a, b):
    """Largest absolute difference between two parameter dicts with the same keys."""
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)


def metrics_without_time(save_dir):
    """metrics.jsonl of a run as a list of dicts without the 'time' field."""
    with open(os.path.join(save_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in f if line.strip()]


def kill_and_resume(script, args, save_dir, kill_at):
    """Run ``script args --save-dir save_dir``, SIGKILLed right after step ``kill_at``,
    then the same command with ``--resume``. Returns the step of the checkpoint the
    resumed run started from."""
    args = list(args) + ["--save-dir", save_dir]
    killed = run_script(script, args, kill_at_step=kill_at, expect=None)
    assert killed.returncode == -9, "expected SIGKILL, got exit %d\n%s" % (
        killed.returncode, killed.stderr[-2000:])
    saved_step = checkpoint.read(os.path.join(save_dir, checkpoint.LAST))[0]["progress"]["step"]
    assert saved_step < kill_at
    resumed = run_script(script, args + ["--resume"])
    assert "resumed from" in resumed.stdout
    return saved_step
