"""The training scripts' main program, written once for every task family.

``train_attr.py`` and ``train_fgvc.py`` are ``app.main(FAMILY, argv)`` of their
family (``training_runtime.registry.TaskFamily``). Three actions:

- train (default): resolve the run definition from the flags (or, with
  ``--resume``, rebuild it from the checkpoint and reconcile the flags with
  it), load the splits, build the task through the method registry, train
  with :class:`training_runtime.loop.Runner`, then test and write test.json;
- ``--test WEIGHTS``: rebuild model and preprocessing from the checkpoint's
  run definition and report on the test split (the same numbers as the run's
  own final test);
- ``--predict IMAGE...``: the main output of every image as CSV.

WEIGHTS is a checkpoint, a run directory (its best, else last checkpoint)
or, where the task can import them (``TrainingTask.load_foreign_weights``),
a directory of another program's weight files.
"""
import csv
import json
import os
import sys

import mxnet as mx
import numpy as np
from mxnet import gluon

from . import checkpoint, cli, config as run_config, records
from .errors import UserError, writing
from .fingerprint import describe_difference, fingerprint
from .images import load_image
from . import distributed, mixed_precision
from .loop import (TEST_FILE, Runner, evaluate, evaluated_epoch, evaluation_batches, freeze_batchnorm,
                   use_sync_batchnorm)
from .schedule import make_schedule
from .ema import CHECKPOINT_NAME as EMA_NAME


PREDICTIONS = "predictions.csv"  # --predict's default --output


# ---------------------------------------------------------------------------- parser

def recipes_text(family):
    """The --help epilog: each method's upstream recipe and demo overrides."""
    lines = ["Recipes (the defaults; any flag overrides them; the demo values apply on the "
             "embedded demo data, %s):" % family.demo_dataset]
    for entry in family.methods.values():
        upstream = dict(entry.recipe, pretrained=entry.pretrained)
        lines.append("  %s%s" % (entry.name, ": " + entry.summary if entry.summary else ""))
        lines.append("    upstream: " + ", ".join("%s=%s" % kv for kv in sorted(upstream.items())))
        for backbone, values in sorted(getattr(entry, "backbone_recipes", {}).items()):
            lines.append("    upstream with --backbone %s: " % backbone
                         + ", ".join("%s=%s" % kv for kv in sorted(values.items()) if kv[0] != "backbone"))
        if entry.backbones:
            lines.append("    backbones: " + ", ".join(entry.backbones))
        if entry.knobs:
            lines.append("    knobs:    " + ", ".join("%s=%s" % (k.name, k.default) for k in entry.knobs))
        if entry.demo:
            lines.append("    demo:     " + ", ".join("%s=%s" % kv for kv in sorted(entry.demo.items())))
    lines.append("Datasets: " + "; ".join(
        "%s (splits %s)" % (d.name, "/".join(d.splits)) for d in family.datasets.values()))
    return "\n".join(lines)


def build_parser(family, doc):
    """The script's parser: the run-definition flags plus the actions."""
    summary, _, rest = doc.strip().partition("\n\n")
    parser = cli.make_parser(summary, epilog=rest + "\n\n" + recipes_text(family),
                             prog=family.script + ".py")
    g = parser.add_argument_group("run definition file (docs/CONFIG.md)")
    g.add_argument("--config", default=None, metavar="FILE",
                   help="start a new run from FILE: a JSON object of run-definition fields by flag name "
                        "(e.g. {\"lr\": 0.01, \"epochs\": 3}), the sections --print-config writes, or "
                        "a run's args.json (to run it again); YAML if FILE ends in .yaml/.yml. Layers: "
                        "the recipe <- the demo's values <- FILE <- the flags given. Not with --resume, "
                        "--test, --predict (their definition is the checkpoint's)")
    g.add_argument("--print-config", action="store_true",
                   help="print the resolved run definition as JSON (a --config file) and exit without "
                        "any work (with --resume: the definition the resume would use)")
    g = parser.add_argument_group("run directory")
    g.add_argument("--save-dir", default=None,
                   help="output directory (default: runs/%s-<timestamp>)" % family.script)
    g.add_argument("--resume", nargs="?", const="last", default=None, metavar="CHECKPOINT",
                   help="continue a run: a checkpoint file, a run directory, or nothing for "
                        "<save-dir>/%s; the run definition comes from the checkpoint (--lr, --epochs, "
                        "--max-steps, devices, --checkpoint-every may change and are reported)"
                        % checkpoint.LAST)
    g.add_argument("--overwrite", action="store_true",
                   help="reuse a --save-dir that already holds a run (its run files are removed)")
    g.add_argument("--traceback", action="store_true",
                   help="show the full Python stack of an error (also TRAINING_RUNTIME_TRACEBACK=1)")
    g = parser.add_argument_group("test and prediction")
    g.add_argument("--test", nargs="?", const="", default=None, metavar="WEIGHTS",
                   help="only test: WEIGHTS is a checkpoint or a run directory (its best checkpoint); "
                        "model and preprocessing come from its run definition (default: --weights)")
    g.add_argument("--predict", nargs="+", default=None, metavar="IMAGE",
                   help="write the model's main output for these images to --output (CSV)")
    g.add_argument("--weights", default=None, help="model for --test / --predict (as --test WEIGHTS)")
    g.add_argument("--output", default=None,
                   help="CSV written by --predict (default %s); a family action's output" % PREDICTIONS)
    for action in family.actions:
        action.add_arguments(g)
    run_config.add_arguments(parser, family, method_flag=len(family.methods) > 1)
    return parser


def main(family, argv=None, doc="", callbacks=()):
    """Parse ``argv`` and run the action; returns the test report (train, --test)."""
    args = build_parser(family, doc).parse_args(argv)
    given = run_config.given_values(args, family)
    inference = [flag for flag, on in (("--resume", args.resume is not None), ("--test", args.test is not None),
                                       ("--predict", args.predict is not None), ("--weights", args.weights))
                 if on] + ["a checkpoint action" for action in family.actions if action.requested(args)]
    if args.config is not None:
        if inference:
            raise UserError("--config: not with %s: its run definition is the checkpoint's (flags such as "
                            "--lr, --epochs change what may change); to run a definition again as a new "
                            "run: --config RUN/args.json --save-dir NEW" % inference[0])
        # the file's values under the flags' (run_config.resolve layers recipe and demo below them)
        given = run_config.read_config_file(args.config, family).under(family, given)
    if args.print_config:
        if inference and inference != ["--resume"]:
            raise UserError("--print-config: with a new run or --resume, not with %s" % inference[0])
        return print_config(family, args, given)
    for action in family.actions:
        if action.requested(args):
            return action.run(family, args, given)
    if args.predict is not None:
        return run_predict(family, args, given)
    if args.test is not None:
        return run_test(family, args, given)
    return run_training(family, args, given, argv, callbacks)


def print_config(family, args, given):
    """--print-config: print the run definition a training run (or --resume) would use, as
    JSON in the shape --config reads (RunConfig.to_dict); returns that dict. Reads nothing
    but the --config file and, for --resume, the checkpoint."""
    resume_file = cli.resume_path(args)
    if resume_file:
        record = checkpoint.read(resume_file, "--resume")[0]
        saved = saved_config(record, family, resume_file, "--resume")
        config = run_config.reconcile(saved, given, family, "resume", resume_file)[0]
    else:
        config = run_config.resolve(family, given)
    definition = config.to_dict()
    print(json.dumps(definition, indent=1))
    return definition


# ---------------------------------------------------------------------------- pieces

def label_names(dataset):
    """A reader's label names: ``attribute_names`` or ``class_names``."""
    names = getattr(dataset, "attribute_names", None)
    return tuple(names if names is not None else dataset.class_names)


def load_split(family, config, split, limit, flag):
    """The ``split`` of the configured dataset (its images, or the packed records);
    a reader's bad-split error names ``flag``."""
    data = config.data
    if data.records is not None:
        return records.open_split(data.records, split, family.name, data.dataset, limit)
    entry = family.datasets.get(data.dataset)
    opts = {"limit": limit}
    if data.skip_bad_images:
        opts["skip_bad_images"] = True
    try:
        return entry.reader(data.data_dir, split, **opts)
    except UserError as err:
        if str(err).startswith("split:"):
            raise UserError("%s: %s" % (flag, str(err)[len("split: "):]))
        raise


def check_same_labels(names, dataset, what):
    """UserError when ``dataset``'s label names are not ``names``."""
    theirs = label_names(dataset)
    if len(theirs) != len(names):
        raise UserError("%s has %d labels, expected %d (%s)" % (what, len(theirs), len(names),
                                                                   ", ".join(names[:5])))
    for mine, other in zip(names, theirs):
        if mine != other:
            raise UserError("%s: label %r where %r was expected (the label names must match)"
                            % (what, other, mine))


def build_task(family, config, names, ctx, pretrained):
    """The task of ``config`` for labels ``names`` on ``ctx``: BatchNorm mode applied,
    every block hybridized. A method's ValueError becomes a UserError naming it.
    pretrained: False, True (the model store's ImageNet weights) or a weights file."""
    entry = family.methods.get(config.model.method)
    pretrained = pretrained if isinstance(pretrained, str) else bool(pretrained)
    model = run_config.dataclasses.replace(config.model, pretrained=pretrained)
    if model.backbone not in entry.backbones and entry.backbones:
        raise UserError("--backbone: expected one of %s for %s, got %r"
                        % (", ".join(entry.backbones), entry.name, model.backbone))
    try:
        task = entry.build(model, tuple(names), ctx)
    except ValueError as err:
        raise UserError("--method %s: %s" % (entry.name, err))
    blocks = task.check_declared()
    if config.runtime.batchnorm == "sync" and len(ctx) > 1 and task.sync_batchnorm_unsafe:
        raise UserError("--batchnorm sync: not supported by --method %s (%s); use --batchnorm frozen"
                        % (entry.name, task.sync_batchnorm_unsafe))
    for block in blocks.values():
        if config.runtime.batchnorm == "sync" and len(ctx) > 1:
            use_sync_batchnorm(block, len(ctx))
        elif config.runtime.batchnorm == "frozen":
            freeze_batchnorm(block)
    task.hybridize()
    return task


def saved_config(record, family, path, flag):
    """The run definition stored in a checkpoint record; UserError if it is another script's."""
    meta = record["meta"]
    if meta.get("script") != family.script:
        raise UserError("%s: %s is a checkpoint of %s, not of %s"
                        % (flag, path, meta.get("script"), family.script))
    if "config" not in meta:
        raise UserError("%s: %s holds no run definition (written by an older version of %s); "
                        "retrain or test it with that version" % (flag, path, family.script))
    try:
        return run_config.RunConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as err:
        raise UserError("%s: %s holds a malformed run definition (%s)" % (flag, path, err))


def checkpoint_meta(family, config, names, train_set):
    """What a checkpoint stores to identify the run: the script, the whole run
    definition, the label names (checked on resume and test) and the training
    split's fingerprint (checked on resume)."""
    return {"script": family.script, "config": config.to_dict(), "labels": list(names),
            "num_classes": len(names), "backbone": config.model.backbone,
            "data": fingerprint(train_set)}


def check_resumed_data(record, train_set, path, data):
    """UserError when the training split differs from the one the checkpoint was trained on."""
    saved = record["meta"].get("data")
    if saved is None:
        return
    difference = describe_difference(saved, fingerprint(train_set))
    if difference:
        raise UserError("--resume: the training split %s of %s now has %s (images added, removed or "
                        "relabelled?); resuming would change the data order: restore the data or start "
                        "a new run (%s)" % (data.train_split, data.dataset, difference, path))


def skipped_images(**splits):
    """{split: number of bad images skipped} of the splits that skipped any."""
    return {name: int(getattr(split, "num_skipped", 0)) for name, split in splits.items()
            if getattr(split, "num_skipped", 0)}


def write_json(path, value):
    with writing(path), open(path, "w") as f:
        json.dump(value, f, indent=1)


# ---------------------------------------------------------------------------- train

def run_training(family, args, given, argv, callbacks=()):
    resume_file = cli.resume_path(args)
    changes = []
    if resume_file:
        record = checkpoint.read(resume_file, "--resume")[0]
        saved = saved_config(record, family, resume_file, "--resume")
        config, changes = run_config.reconcile(saved, given, family, "resume", resume_file)
    else:
        config = run_config.resolve(family, given)
    ctx = cli.contexts(config.runtime)
    if config.runtime.amp:  # GPUs only; before the model is built (amp.init wraps the operators)
        mixed_precision.enable(ctx)
    rank = distributed_rank(config.runtime.kvstore)
    if resume_file:  # refused before any work (Runner.resume checks it too)
        mismatch = distributed.world_size_mismatch(
            record["progress"], distributed.rank_and_size(config.runtime.kvstore)[1], resume_file)
        if mismatch:
            raise UserError(mismatch)
    mx.random.seed(config.runtime.seed)  # parameter initialisation
    np.random.seed(config.runtime.seed)
    data = config.data
    train_set = load_split(family, config, data.train_split, data.train_limit, "--train-split")
    val_set = load_split(family, config, data.val_split, data.val_limit, "--val-split")
    names = label_names(train_set)
    if len(label_names(val_set)) != len(names):
        raise UserError("--val-split: split %r of %s has %d classes, the training split %r has %d"
                        % (data.val_split, data.dataset, len(label_names(val_set)), data.train_split,
                           len(names)))
    check_same_labels(names, val_set, "--val-split %s" % data.val_split)
    # the test split too is read and checked before any training
    test_set = load_split(family, config, data.test_split, data.test_limit, "--test-split")
    check_same_labels(names, test_set, "--test-split %s" % data.test_split)
    if resume_file:
        check_resumed_data(record, train_set, resume_file, data)
    # built before the run directory: a refused combination (e.g. S3N with --batchnorm sync)
    # writes nothing
    task = build_task(family, config, names, ctx, False if resume_file else config.model.pretrained)
    if rank == 0:
        save_dir = cli.prepare_save_dir(args, family.script, config.to_dict(),
                                        list(sys.argv[1:] if argv is None else argv))
    else:  # the other workers write nothing (rank 0 holds the same state)
        save_dir = os.path.abspath(args.save_dir or os.path.dirname(resume_file or "") or ".")
    for split, flag in ((val_set, "--val-split %s" % data.val_split),
                        (test_set, "--test-split %s" % data.test_split)):
        try:
            task.check_evaluation_split(split)
        except ValueError as err:
            raise UserError("%s of %s: %s" % (flag, data.dataset, err))
    try:
        task.prepare_training(train_set)
    except ValueError as err:  # e.g. an attribute without positives: the data's fault
        raise UserError("--train-split %s of %s: %s" % (data.train_split, data.dataset, err))
    runner = Runner(task, config, ctx, make_schedule(config.optim), save_dir,
                    train_set.transform_first(task.transform(True)),
                    val_set.transform_first(task.transform(False)),
                    checkpoint_meta(family, config, names, train_set), callbacks,
                    extra_record=lambda: {"skipped_images": skipped_images(train=train_set, val=val_set)})
    skipped = skipped_images(train=train_set, val=val_set, test=test_set)
    if skipped:
        print("skipping bad images (--skip-bad-images): %s" % ", ".join(
            "%d in %s" % (n, name) for name, n in skipped.items()))
    print("training %s (%s, %s, %d labels) on %d images, validating on %d; %s; saving to %s" % (
        config.model.method, config.model.backbone, data.dataset, len(names), len(train_set),
        len(val_set), ", ".join(str(c) for c in ctx), save_dir))
    if resume_file:
        runner.resume(resume_file)
        if rank == 0:
            cli.record_resume(save_dir, resume_file, runner.step, changes)
        if changes:
            print("resume: applied %s (from step %d)" % (run_config.describe_changes(changes), runner.step))
    runner.run()
    epoch = evaluated_epoch({"epoch": runner.epoch, "batch_in_epoch": runner.batch_in_epoch})
    # where test_report may write its figures (training_runtime.plots); rank 0 only
    task.figure_dir = save_dir if rank == 0 and config.runtime.figures != "none" else None
    with runner.averaged_weights() as averaged:  # --ema: the test of the moving average
        print("final test of %s after epoch %d on %s (%d images)%s" % (
            config.model.method, epoch, data.test_split, len(test_set),
            ", with the moving average of the weights (--ema %g)" % config.optim.ema if averaged else ""))
        report = evaluate(task, test_set.transform_first(task.transform(False)), ctx, config, epoch,
                          report=sys.stdout)
    if rank == 0:
        written = dict(report, epoch=epoch, skipped_images=skipped_images(test=test_set))
        if averaged:
            written["weights"] = "ema"
        write_json(os.path.join(save_dir, TEST_FILE), written)
    return report


def distributed_rank(kind):
    """This worker's rank for ``--kvstore kind`` (0 without a dist kvstore); creating a
    dist kvstore waits for every process of the launcher."""
    if distributed.is_dist(kind) and "DMLC_ROLE" not in os.environ:
        raise UserError("--kvstore %s: start the run with python -m training_runtime.launch "
                        "--workers N --servers M -- python SCRIPT ... (no DMLC_ROLE in the "
                        "environment)" % kind)
    try:
        return distributed.rank_and_size(kind)[0]
    except ValueError as err:
        raise UserError(str(err))


# ---------------------------------------------------------------------------- test and predict

def _inference_task(family, args, given, flag, purpose):
    """(task, config, names, epoch, source) for --test / --predict."""
    source = args.test or args.weights
    if not source:
        raise UserError("%s: give the model: --test WEIGHTS or --weights WEIGHTS (a checkpoint or a "
                        "run directory)" % flag)
    path = checkpoint.run_checkpoint(source)
    if path is None:
        if not os.path.isdir(source):
            raise UserError("%s: %s not found" % (flag, source))
        entry = family.methods.get(given.get("method") or family.methods.names()[0])
        if entry.foreign_weights is None:
            raise UserError("%s: %s holds neither %s nor %s" % (flag, source, checkpoint.BEST, checkpoint.LAST))
        return _foreign_task(family, given, source, flag, entry.foreign_weights)
    record = checkpoint.read(path, flag)[0]
    saved = saved_config(record, family, path, flag)
    config, _ = run_config.reconcile(saved, given, family, purpose, path)
    names = tuple(record["meta"]["labels"])
    ctx = cli.contexts(config.runtime)
    task = build_task(family, config, names, ctx, pretrained=False)
    averaged = config.optim.ema is not None  # --ema: its moving average is the model (docs/EMA.md)
    loaded = checkpoint.load_parameters(path, task.blocks(), {"script": family.script}, flag,
                                        overlay=EMA_NAME if averaged else None)
    if averaged:
        print("weights: %s of %s" % ("the moving average (--ema %g)" % config.optim.ema
                                      if loaded["overlaid"] else
                                      "the trained weights (--ema: no step was averaged yet)", path))
    return task, config, names, evaluated_epoch(record["progress"]), path


def _foreign_task(family, given, directory, flag, what):
    """A task with another program's weight files (the run definition from the flags)."""
    config = run_config.resolve(family, dict(given, pretrained=False))
    entry = family.datasets.get(config.data.dataset)
    names = entry.label_names
    if names is None:
        names = label_names(load_split(family, config, config.data.test_split, 1, "--test-split"))
    ctx = cli.contexts(config.runtime)
    task = build_task(family, config, names, ctx, pretrained=False)
    if not task.load_foreign_weights(directory):
        raise UserError("%s: %s holds neither %s nor %s nor %s"
                        % (flag, directory, checkpoint.BEST, checkpoint.LAST, what))
    return task, config, tuple(names), 0, directory


def run_test(family, args, given):
    """Report of a trained model on the test split; returns the report dict."""
    flag = "--test" if args.test is not None and not args.weights else "--weights"
    task, config, names, epoch, source = _inference_task(family, args, given, flag, "test")
    data = config.data
    test_set = load_split(family, config, data.test_split, data.test_limit, "--test-split")
    check_same_labels(names, test_set, "--test-split %s" % data.test_split)
    print("testing %s (%s, %s after epoch %d) on %s (%d images)" % (
        source, config.model.method, config.model.backbone, epoch, data.test_split, len(test_set)))
    ctx = cli.contexts(config.runtime)
    return evaluate(task, test_set.transform_first(task.transform(False)), ctx, config, epoch,
                    report=sys.stdout)


class ImageFiles(gluon.data.Dataset):
    """Items (transformed image, its position) of image files given by path, decoded
    once up front: a bad file is a UserError naming it, or with ``skip_bad_images``
    left out (``skipped`` lists it)."""

    def __init__(self, paths, transform_fn, skip_bad_images=False):
        self.paths, self.images, self.skipped = [], [], []
        for path in paths:
            try:
                self.images.append(load_image(path))
            except UserError:
                if not skip_bad_images:
                    raise
                self.skipped.append(path)
                continue
            self.paths.append(path)
        self.transform_fn = transform_fn

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform_fn(self.images[i]), i


def run_predict(family, args, given):
    """CSV: one row per image, the task's main output per label."""
    task, config, names, epoch, _ = _inference_task(family, args, given, "--weights", "test")
    args.output = args.output or PREDICTIONS
    directory = os.path.dirname(os.path.abspath(args.output))
    if os.path.isdir(args.output):
        raise UserError("--output: %s is a directory; expected the path of a CSV file" % args.output)
    if not os.path.isdir(directory):
        raise UserError("--output: directory %s does not exist" % directory)
    ctx = cli.contexts(config.runtime)
    rows = []
    images = ImageFiles(args.predict, task.transform(False), config.data.skip_bad_images)
    for path in images.skipped:
        print("skipped unreadable image %s (--skip-bad-images)" % path)
    if not len(images):
        raise UserError("--predict: none of the %d images could be read" % len(args.predict))
    for data, _ in evaluation_batches(images, ctx, config.runtime.batch_size, 0, "predict"):
        rows.append(next(iter(task.predict(data, epoch).values())).asnumpy())
    scores = np.concatenate(rows, axis=0)
    with writing(args.output), open(args.output, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image"] + list(names))
        for path, row in zip(images.paths, scores):
            writer.writerow([path] + ["%.6f" % p for p in row])
    print("wrote %d predictions to %s" % (len(scores), args.output))
    return scores
