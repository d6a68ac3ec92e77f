"""Command-line pieces shared by train_attr.py and train_fgvc.py.

- :func:`add_training_arguments`: the common flags (data, save dir, resume,
  devices, optimisation, checkpoints, smoke-run limits);
- :func:`use_records`: ``--records DIR`` (splits packed by training_runtime.records);
- :func:`contexts`: ``--gpus 0,1`` / ``--cpus N`` -> list of mx.Context;
- :func:`prepare_save_dir`: default ``runs/<script>-<timestamp>``, refuses a
  directory that already holds a run unless ``--resume`` or ``--overwrite``,
  writes ``args.json``;
- :func:`run_main`: prints any :class:`UserError` as one line
  ``error: <message>`` and exits with status 2 (never a traceback).
"""
import argparse
import datetime
import json
import os
import sys

import mxnet as mx

from . import checkpoint
from .errors import UserError

ARGS_FILE = "args.json"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
#: files that make a directory "hold a run" (and that --overwrite removes)
RUN_FILES = (ARGS_FILE, METRICS_FILE, CURVES_FILE, checkpoint.LAST, checkpoint.BEST)


def add_training_arguments(parser, defaults):
    """Add the shared flags; ``defaults`` maps dest -> default (per script/dataset).

    Defaults left as None are filled by the script once the dataset is known
    (see each script's --help).
    """
    d = defaults.get
    g = parser.add_argument_group("run")
    g.add_argument("--data-dir", default=None, help="dataset root (default: the embedded demo data)")
    g.add_argument("--records", default=None, metavar="DIR",
                   help="read each split from DIR/<split>.rec/.idx/.json instead of the images, as "
                        "packed by python -m training_runtime.records --out-dir DIR (the dataset "
                        "name comes from them unless --dataset is given)")
    g.add_argument("--save-dir", default=None,
                   help="output directory (default: runs/<script>-<timestamp>)")
    g.add_argument("--resume", nargs="?", const="last", default=None, metavar="CHECKPOINT",
                   help="continue a run: a checkpoint file, a run directory, or nothing for "
                        "<save-dir>/%s" % checkpoint.LAST)
    g.add_argument("--overwrite", action="store_true",
                   help="reuse a --save-dir that already holds a run (its run files are removed)")
    g.add_argument("--seed", type=int, default=d("seed", 0),
                   help="all randomness is a function of (seed, epoch, step) (default %(default)s)")
    g = parser.add_argument_group("devices")
    g.add_argument("--gpus", default="", help="comma-separated GPU ids, e.g. 0,1 (default: CPU)")
    g.add_argument("--cpus", type=int, default=1,
                   help="number of CPU contexts cpu(0..N-1) when no --gpus (default 1)")
    g.add_argument("--num-workers", type=int, default=d("num_workers", 0),
                   help="data loading processes; exact resume needs 0 (default %(default)s)")
    g.add_argument("--batchnorm", choices=("batch", "sync", "frozen"), default="batch",
                   help="BatchNorm statistics in training: batch = per device (Gluon's usual data "
                        "parallelism; the original ran on one device), sync = SyncBatchNorm over "
                        "the devices (GPUs), frozen = running statistics only (use_global_stats; "
                        "exact across any device split) (default %(default)s)")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d("epochs"), help="number of epochs")
    g.add_argument("--batch-size", type=int, default=d("batch_size"), help="total batch size")
    g.add_argument("--lr", type=float, default=d("lr"), help="base learning rate")
    g.add_argument("--momentum", type=float, default=d("momentum"), help="SGD momentum")
    g.add_argument("--wd", type=float, default=d("wd"), help="weight decay")
    g = parser.add_argument_group("checkpoints and limits")
    g.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="also save the last checkpoint every N steps (default: each epoch)")
    g.add_argument("--max-steps", type=int, default=0, metavar="N",
                   help="stop after N training steps in total (smoke runs); still evaluates and "
                        "writes a checkpoint and metrics")
    g.add_argument("--log-every", type=int, default=20, metavar="K",
                   help="check the loss for NaN/inf and update the progress bar every K steps")
    g = parser.add_argument_group("data")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="drop missing/corrupt images (listed) instead of stopping")
    g.add_argument("--train-limit", type=int, default=None, help="use the first N training images")
    g.add_argument("--val-limit", type=int, default=None, help="use the first N validation images")
    g.add_argument("--test-limit", type=int, default=None, help="use the first N test images")
    return parser


def use_records(args, task):
    """With ``--records DIR``: refuse --data-dir, fill --dataset from DIR's records of ``task``."""
    if args.records is None:
        return
    from . import records
    if args.data_dir is not None:
        raise UserError("--records and --data-dir: give one or the other (the records hold the images)")
    if args.dataset is None:
        args.dataset = records.packed_dataset_name(args.records, task)


def check_positive(args, *names):
    """UserError for a flag that must be a positive number."""
    for name in names:
        value = getattr(args, name)
        if value is None or not value > 0:
            raise UserError("--%s: expected a positive number, got %r" % (name.replace("_", "-"), value))


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
        return [mx.gpu(i) for i in ids]
    if args.cpus < 1:
        raise UserError("--cpus: expected at least 1, got %d" % args.cpus)
    if args.cpus > 1 and getattr(args, "batchnorm", None) == "sync":
        raise UserError("--batchnorm sync: SyncBatchNorm needs GPUs (--gpus); on CPU contexts it "
                        "deadlocks: use --batchnorm frozen or batch")
    return [mx.cpu(i) for i in range(args.cpus)]


def _holds_run(directory):
    return any(os.path.exists(os.path.join(directory, f)) for f in RUN_FILES)


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


def prepare_save_dir(args, script):
    """Create/validate ``args.save_dir`` and write args.json; returns the directory.

    With ``--resume FILE`` and no --save-dir, the run continues in FILE's directory.
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
                os.remove(path)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as err:
        raise UserError("--save-dir: cannot create %s (%s)" % (directory, err))
    with open(os.path.join(directory, ARGS_FILE), "w") as f:
        json.dump(dict(vars(args), script=script), f, indent=1, sort_keys=True)
    return directory


def run_main(main, argv=None):
    """Run ``main(argv)``; a UserError becomes ``error: <message>`` and exit status 2."""
    try:
        return main(argv)
    except UserError as err:
        message = " ".join(str(err).split())  # always one line
        print("error: %s" % message, file=sys.stderr)
        sys.exit(UserError.exit_code)


def make_parser(description, epilog=None):
    return argparse.ArgumentParser(description=description, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
