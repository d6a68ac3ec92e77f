"""The command-line boundary shared by the training scripts.

- :func:`contexts`: ``--gpus 0,1`` / ``--cpus N`` -> list of mx.Context;
- :func:`resume_path`, :func:`prepare_save_dir`, :func:`record_resume`: the
  run directory: default ``runs/<script>-<timestamp>``, a directory that
  already holds a run is refused unless ``--resume`` or ``--overwrite``;
  ``args.json`` is written once, when the run starts, and never rewritten;
  each resume appends a line to ``resumes.jsonl`` (from which step, what
  changed);
- :func:`run_main`: prints any :class:`UserError` as one line
  ``error: <message>`` and exits with status 2 (a run stopped by SIGINT /
  SIGTERM: ``interrupted: ...``, status 130 / 143); ``--traceback`` (or
  ``TRAINING_RUNTIME_TRACEBACK=1``) shows the full stack instead. Other
  exceptions are programming errors and keep their traceback.
"""
import argparse
import datetime
import json
import os
import shutil
import sys

import mxnet as mx

from . import checkpoint, gpus
from .errors import RunInterrupted, UserError, writing
from .loop import ARGS_FILE, CURVES_FILE, METRICS_FILE, PICTURES_DIR, RESUMES_FILE, TEST_FILE
from .progress import STEPS_FILE
from .tensorboard import EVENTS_DIR

#: files that make a directory "hold a run" (and that --overwrite removes)
RUN_FILES = (ARGS_FILE, RESUMES_FILE, METRICS_FILE, STEPS_FILE, CURVES_FILE, TEST_FILE,
             checkpoint.LAST, checkpoint.BEST)
#: folders a run writes, removed with its files by --overwrite (else the new run's logs and
#: pictures would mix with the old run's)
RUN_DIRS = (PICTURES_DIR, EVENTS_DIR)
TRACEBACK_ENV = "TRAINING_RUNTIME_TRACEBACK"


def contexts(args):
    """[gpu(i) for --gpus], else [cpu(0) .. cpu(--cpus - 1)].

    ``--batchnorm sync`` on several CPU contexts is refused: they share MXNet's
    CPU worker threads and SyncBatchNorm deadlocks (see loop.use_sync_batchnorm).
    """
    if args.gpus:
        try:
            ids = [int(i) for i in args.gpus.split(",") if i.strip()]
        except ValueError:
            raise UserError("--gpus: expected comma-separated GPU ids like 0,1, got %r" % args.gpus)
        if mx.context.num_gpus() < max(ids) + 1:
            raise UserError("--gpus: GPU %d requested, this machine has %d GPU(s)"
                            % (max(ids), mx.context.num_gpus()))
        gpus.check_gpus(ids)  # a GPU the installed wheel has no kernels for: refused up front
        return [mx.gpu(i) for i in ids]
    if args.cpus < 1:
        raise UserError("--cpus: expected at least 1, got %d" % args.cpus)
    if args.cpus > 1 and getattr(args, "batchnorm", None) == "sync":
        raise UserError("--batchnorm sync: SyncBatchNorm needs GPUs (--gpus); on CPU contexts it "
                        "deadlocks: use --batchnorm frozen or batch")
    return [mx.cpu(i) for i in range(args.cpus)]


#: what makes a directory hold a run: its progress (a run that failed before its first
#: evaluation left only args.json and may be started again)
PROGRESS_FILES = (checkpoint.LAST, checkpoint.BEST, METRICS_FILE)


def _holds_run(directory):
    return any(os.path.exists(os.path.join(directory, f)) for f in PROGRESS_FILES)


def resume_path(args):
    """The checkpoint file ``--resume`` names (None when not resuming)."""
    if args.resume is None:
        return None
    if args.resume == "last":
        if not args.save_dir:
            raise UserError("--resume: give a checkpoint or run directory, or --save-dir DIR")
        return os.path.join(args.save_dir, checkpoint.LAST)
    if os.path.isdir(args.resume):
        return os.path.join(args.resume, checkpoint.LAST)
    return args.resume


def prepare_save_dir(args, script, config=None, argv=None):
    """Create/validate ``args.save_dir``; for a new run write args.json
    (script, the run definition ``config`` as a dict, the command line and,
    with ``--config FILE``, ``config_file``: FILE's absolute path).
    Returns the directory. With ``--resume FILE`` and no --save-dir, the run
    continues in FILE's directory; a resumed run's args.json is left as it is.
    """
    if args.save_dir is None:
        if args.resume not in (None, "last"):
            args.save_dir = os.path.dirname(os.path.abspath(resume_path(args)))
        else:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            args.save_dir = os.path.join("runs", "%s-%s" % (script, stamp))
    directory = args.save_dir
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite: give one or the other")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise UserError("--save-dir: %s exists and is not a directory" % directory)
    if os.path.isdir(directory) and _holds_run(directory) and not args.resume:
        if not args.overwrite:
            raise UserError("--save-dir: %s already holds a run; pass --resume to continue it "
                            "or --overwrite to replace it" % directory)
        for name in RUN_FILES:
            path = os.path.join(directory, name)
            if os.path.exists(path):
                with writing(path, "remove the old run's file"):
                    os.remove(path)
        for name in RUN_DIRS:
            path = os.path.join(directory, name)
            if os.path.isdir(path):
                with writing(path, "remove the old run's folder"):
                    shutil.rmtree(path)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as err:
        raise UserError("--save-dir: cannot create %s (%s)" % (directory, err))
    count, size = checkpoint.remove_stale_temporaries(directory)
    if count:
        print("removed %d temporary file(s) (%.1f MB) left in %s by an interrupted write"
              % (count, size / 1048576.0, directory))
    if not args.resume:
        path = os.path.join(directory, ARGS_FILE)
        with writing(path), checkpoint.replaced_atomically(path) as tmp:
            with open(tmp, "w") as f:
                written = {"script": script, "config": config, "argv": argv}
                if getattr(args, "config", None):  # --config FILE: where the definition started
                    written["config_file"] = os.path.abspath(args.config)
                json.dump(written, f, indent=1, sort_keys=True)
    return directory


def record_resume(directory, path, step, changes):
    """Append one line to resumes.jsonl: when, from which checkpoint and step,
    and each changed setting as [name, old, new]."""
    line = {"time": datetime.datetime.now().isoformat(timespec="seconds"), "checkpoint": path,
            "from_step": step, "changes": [list(c) for c in changes]}
    path = os.path.join(directory, RESUMES_FILE)
    with writing(path), open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


def run_main(main, argv=None):
    """Run ``main(argv)``; a UserError becomes ``error: <message>`` and exit status 2
    (with ``--traceback`` or TRAINING_RUNTIME_TRACEBACK=1 it is raised as is)."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    show_traceback = "--traceback" in arguments or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
    try:
        return main(argv)
    except UserError as err:
        if show_traceback:
            raise
        message = " ".join(str(err).split())  # always one line
        print("error: %s" % message, file=sys.stderr)
        sys.exit(UserError.exit_code)
    except RunInterrupted as stop:
        print("interrupted: %s" % stop, file=sys.stderr)
        sys.exit(stop.exit_code)


def make_parser(description, epilog=None, prog=None):
    return argparse.ArgumentParser(description=description, epilog=epilog, prog=prog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
