"""Train and test the fine-grained methods: a fine-tuned baseline, MC-Loss, S3N, center loss.

    python train_fgvc.py --method mcloss                        # demo: Fashion-MNIST, CPU, minutes
    python train_fgvc.py --method s3n --dataset cub-s3n --data-dir CUB   # S3N's upstream setting
    python train_fgvc.py --test RUN_DIR                         # top-1 on the test split (per branch for S3N)
    python train_fgvc.py --method mcloss --records DIR          # splits packed by training_runtime.records

Every method is an fgvc_gluon FGVCMethod (fgvc_gluon/method.py): one SGD
Trainer per parameter group (lr = schedule lr x the group's multiplier; the
center-loss centers keep their own fixed lr), the step lr rule of the method,
evaluation every epoch (top-1 of the main branch drives the best checkpoint;
S3N also reports each branch), metrics.jsonl, curves.png, best/last
checkpoints and exact resume (training_runtime, shared with train_attr.py).

Upstream defaults (with --data-dir; any flag overrides them). Model, schedule
and preprocessing come from the method (its build_method defaults and its
``defaults``); ImageNet weights are loaded for baseline and s3n as upstream:
  baseline    resnet50_v1 at 448, S3N's label-smoothed loss (0.85), lr 0.001 (x10 new classifier),
              momentum 0.9, wd 1e-4, batch 16, 30 epochs, x0.1 from epoch 20 (S3N's baseline
              config); random-resized crop (0.5-1) + flip, test resize 600x600 + center crop
  mcloss      vgg16_bn_mc (c*xi MC channels, from scratch) at 224, xi 3, alpha 1.5, beta 20,
              lr 0.1, momentum 0.9, wd 5e-4, batch 32, 300 epochs, x0.1 at epochs 149 and 224;
              resize 224 + pad-4 random crop + flip, mean = std = 0.5
  s3n         resnet50_v1 at 448, radius 0.09, radius-inv 0.3, base-ratio 0.09, lr 0.001 (x10
              classifiers, x1e-4 radius and filter), momentum 0.9, wd 1e-4, batch 16, 60 epochs,
              x0.1 from epoch 39; random-resized crop (0.5-1) + flip, test resize 600x600 + center
              crop (600 scales with --image-size)
  centerloss  lenet_pp (2-D features) at 28, center weight 1, centers on plain SGD at lr 0.5,
              net lr 0.001, momentum 0.9, wd 5e-4, batch 128, 100 epochs, x0.8 every 20 epochs
Epochs are 0-based. Splits: cub, cub-s3n, cars, folder train on 'train', aircraft
and flowers on 'trainval'; all evaluate on 'test' every epoch, as the upstream
scripts do (--train-split / --val-split change this).

Demo defaults (no --data-dir, or --dataset fashion-mnist): the 10 Fashion-MNIST
classes, 3,000 training and 1,000 validation images, 3 epochs, batch 32, no lr
steps, no pretraining, final test on 2,000 test images; per method:
  baseline    resnet18_v1 at 32, lr 0.0005 (x10 classifier)      ~1 min, test top-1 ~0.66
  mcloss      resnet18_mc, width 0.25, at 32, lr 0.05            ~20 s,  test top-1 ~0.62
  s3n         resnet18_v1 at 48, lr 0.001 (x10 classifiers),     ~3 min, test top-1 ~0.66
              1,000 training and 500 validation images
  centerloss  lenet_pp at 28, lr 0.01                            ~1.5 min, test top-1 ~0.39 (2-D features)
(times on 2 CPU cores). The lrs are lower than upstream's where the networks
train from scratch with a x10 classifier: at lr 0.01 baseline and s3n diverge.

Deviations from the upstream scripts: on several devices each device slice
draws its own MC-Loss mask and counts its own center-loss class counts (see
the method modules); --batchnorm frozen|sync (BatchNorm statistics with
several devices; default batch = per device, as Gluon does); all randomness
is a function of (--seed, epoch, step) for exact resume, evaluation included
(S3N evaluates with its random mode p=1 up to epoch 20).
"""
import collections
import inspect
import json
import os

import mxnet as mx
import numpy as np
from mxnet import gluon

from training_runtime import checkpoint, cli
from training_runtime.errors import UserError
from training_runtime.loop import Runner, freeze_batchnorm, progress_bar, reseed, use_sync_batchnorm
from training_runtime.schedule import StepSchedule

SCRIPT = "train_fgvc"
METHOD_MODULES = collections.OrderedDict([
    ("baseline", "fgvc_gluon.baseline"), ("mcloss", "fgvc_gluon.mcloss"),
    ("s3n", "fgvc_gluon.s3n"), ("centerloss", "fgvc_gluon.center_loss")])
#: upstream loads ImageNet weights into these methods' backbones (the others train from scratch)
UPSTREAM_PRETRAINED = {"baseline": True, "mcloss": False, "s3n": True, "centerloss": False}
#: method knob flag (dest) -> (the methods that take it, build_method keyword)
METHOD_KNOBS = collections.OrderedDict([
    ("xi", (("mcloss",), "xi")), ("alpha", (("mcloss",), "alpha")), ("beta", (("mcloss",), "beta")),
    ("width", (("mcloss",), "width")),
    ("radius", (("s3n",), "radius")), ("radius_inv", (("s3n",), "radius_inv")),
    ("base_ratio", (("s3n",), "base_ratio")), ("smooth_ratio", (("baseline", "s3n"), "smooth_ratio")),
    ("center_weight", (("centerloss",), "loss_weight")), ("center_lr", (("centerloss",), "center_lr")),
    ("feat_dim", (("centerloss",), "feat_dim"))])
#: build_method keywords that are runtime plumbing, not part of the model's identity
NOT_OPTIONS = ("num_classes", "ctx", "pretrained", "hybridize", "seed")
#: (train split, split evaluated every epoch) per dataset
SPLITS = {"fashion-mnist": ("train", "val"), "aircraft": ("trainval", "test"),
          "flowers": ("trainval", "test")}
DEFAULT_SPLITS = ("train", "test")
DEMO_COMMON = dict(epochs=3, batch_size=32, lr_steps=[], lr_factor=0.1,
                   pretrained=False, train_limit=3000, val_limit=1000, test_limit=2000)
DEMO_METHOD = {
    "baseline": dict(backbone="resnet18_v1", image_size=32, lr=0.0005),
    "mcloss": dict(backbone="resnet18_mc", width=0.25, image_size=32, lr=0.05),
    "s3n": dict(backbone="resnet18_v1", image_size=48, lr=0.001, train_limit=1000, val_limit=500),
    "centerloss": dict(backbone="lenet_pp", image_size=28, lr=0.01),
}
EVAL_STEP = 2 ** 31 + 1  # reseed position of an evaluation (S3N's early evaluation mode is random)


def build_parser():
    from fgvc_gluon.data import DATASETS
    parser = cli.make_parser(__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    cli.add_training_arguments(parser, {})
    g = parser.add_argument_group("method and data")
    g.add_argument("--method", default="baseline", metavar="{%s}" % ",".join(METHOD_MODULES),
                   help="fine-grained method (default %(default)s)")
    g.add_argument("--dataset", choices=DATASETS, default=None,
                   help="default: fashion-mnist without --data-dir, else cub")
    g.add_argument("--backbone", default=None, help="network (default: the method's upstream one; demo: small)")
    g.add_argument("--image-size", type=int, default=None, help="network input side")
    g.add_argument("--pretrained", dest="pretrained", action="store_true", default=None,
                   help="load ImageNet weights into the backbone (default for baseline and s3n "
                        "with --data-dir; needs the model-zoo files)")
    g.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                   help="train the backbone from scratch")
    g.add_argument("--lr-steps", type=int, nargs="*", default=None, metavar="EPOCH",
                   help="0-based epochs where the lr is multiplied by --lr-factor (default: the method's)")
    g.add_argument("--lr-factor", type=float, default=None, help="lr multiplier at each --lr-steps epoch")
    g.add_argument("--train-split", default=None, help="split to train on (see above)")
    g.add_argument("--val-split", default=None, help="split evaluated after every epoch (see above)")
    g = parser.add_argument_group("method knobs (default: the method's upstream values)")
    g.add_argument("--xi", type=int, default=None, help="mcloss: channels per class")
    g.add_argument("--alpha", type=float, default=None, help="mcloss: weight of L_dis")
    g.add_argument("--beta", type=float, default=None, help="mcloss: weight of L_div")
    g.add_argument("--width", type=float, default=None,
                   help="mcloss: width multiplier of the non-MC convs (demo 0.25)")
    g.add_argument("--radius", type=float, default=None, help="s3n: initial radius")
    g.add_argument("--radius-inv", type=float, default=None, help="s3n: initial radius_inv")
    g.add_argument("--base-ratio", type=float, default=None, help="s3n: base ratio of the maps")
    g.add_argument("--smooth-ratio", type=float, default=None,
                   help="baseline, s3n: label smoothing target of S3N's smooth loss (0.85; "
                        "1 = plain cross entropy)")
    g.add_argument("--center-weight", type=float, default=None, help="centerloss: lambda")
    g.add_argument("--center-lr", type=float, default=None, help="centerloss: fixed lr of the centers")
    g.add_argument("--feat-dim", type=int, default=None, help="centerloss: feature dimension")
    g = parser.add_argument_group("evaluation")
    g.add_argument("--test", nargs="?", const="", default=None, metavar="WEIGHTS",
                   help="only test: WEIGHTS is a checkpoint or a run directory (its best checkpoint); "
                        "the method and model come from the checkpoint")
    return parser


# ---------------------------------------------------------------------------- methods and defaults

def method_module(name):
    """The fgvc_gluon module of ``--method name``."""
    import importlib
    if name not in METHOD_MODULES:
        raise UserError("--method: expected one of %s, got %r" % (", ".join(METHOD_MODULES), name))
    return importlib.import_module(METHOD_MODULES[name])


def check_knobs(args):
    """UserError for a method knob given with another --method."""
    for dest, (methods, _) in METHOD_KNOBS.items():
        if getattr(args, dest) is not None and args.method not in methods:
            raise UserError("--%s: only for --method %s (this run is --method %s)"
                            % (dest.replace("_", "-"), " or ".join(methods), args.method))


def build_options(args):
    """The build_method keywords of this run: upstream defaults (the signature's)
    overridden by the flags given. JSON-able; identifies the model in checkpoints."""
    signature = inspect.signature(method_module(args.method).build_method)
    options = {name: p.default for name, p in signature.parameters.items()
               if name not in NOT_OPTIONS and p.default is not inspect.Parameter.empty}
    given = {"backbone": args.backbone, "image_size": args.image_size}
    given.update({keyword: getattr(args, dest) for dest, (methods, keyword) in METHOD_KNOBS.items()
                  if args.method in methods})
    options.update({k: v for k, v in given.items() if v is not None})
    return options


def resolve_defaults(args):
    """Fill the flags left unset from the demo's or the method's upstream settings.

    Model flags are filled here; the optimisation flags (lr, momentum, ...)
    are filled by :func:`fill_from_method` once the method's ``defaults`` exist.
    """
    method_module(args.method)
    check_knobs(args)
    if args.dataset is None:
        args.dataset = "cub" if args.data_dir else "fashion-mnist"
    if args.dataset == "fashion-mnist":
        for key, value in dict(DEMO_COMMON, **DEMO_METHOD[args.method]).items():
            if getattr(args, key, None) is None:
                setattr(args, key, value)
    elif args.pretrained is None:
        args.pretrained = UPSTREAM_PRETRAINED[args.method]
    train_split, val_split = SPLITS.get(args.dataset, DEFAULT_SPLITS)
    args.train_split = args.train_split or train_split
    args.val_split = args.val_split or val_split
    for name in ("image_size", "train_limit", "val_limit", "test_limit"):
        if getattr(args, name) is not None:
            cli.check_positive(args, name)
    return args


def fill_from_method(args, defaults):
    """Optimisation flags left unset <- the method's upstream ``defaults``; then validate."""
    for key in ("epochs", "batch_size", "lr", "momentum", "wd", "lr_steps", "lr_factor"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    cli.check_positive(args, "epochs", "batch_size", "lr", "lr_factor", "log_every")
    if args.momentum < 0 or args.wd < 0:
        raise UserError("--momentum/--wd: expected non-negative values, got %g/%g" % (args.momentum, args.wd))


def build_method(args, num_classes, ctx, options):
    """The FGVCMethod on ``ctx`` with --batchnorm applied and every block hybridized."""
    method = method_module(args.method).build_method(
        num_classes, ctx=ctx, pretrained=bool(args.pretrained), **options)
    if args.batchnorm == "sync" and len(ctx) > 1:
        use_sync_batchnorm(method.net, len(ctx))
    elif args.batchnorm == "frozen":
        freeze_batchnorm(method.net)
    for block in vars(method).values():
        if isinstance(block, gluon.Block):
            block.hybridize()  # recursive: a plain Block's HybridBlock children are hybridized
    return method


def method_blocks(method):
    """Ordered dict name -> Block of everything a checkpoint must hold: ``net`` and any
    other Block of the method with parameters (e.g. the center-loss centers)."""
    blocks = collections.OrderedDict([("net", method.net)])
    for name, value in sorted(vars(method).items()):
        if isinstance(value, gluon.Block) and value is not method.net and value.collect_params():
            blocks[name] = value
    held = set(id(p) for block in blocks.values() for p in block.collect_params().values())
    for group in method.param_groups():
        params = group.params.values() if hasattr(group.params, "values") else group.params
        missing = [p.name for p in params if id(p) not in held]
        if missing:
            raise RuntimeError("%s: parameter group %s holds parameters outside the method's blocks: %s"
                               % (method.name, group.name, ", ".join(missing[:3])))
    return blocks


def meta_of(args, options, dataset):
    """What a checkpoint must match to be resumed / tested with these flags."""
    return dict({"script": SCRIPT, "method": args.method, "dataset": args.dataset,
                 "num_classes": dataset.num_classes, "classes": list(dataset.class_names)}, **options)


# ---------------------------------------------------------------------------- data and evaluation

def load_split(args, split, limit, flag):
    """The ``split`` of --dataset (images, or DIR/<split>.rec with --records DIR);
    a reader's bad-split error names ``flag``."""
    if args.records is not None:
        from training_runtime.records import open_split
        return open_split(args.records, split, "fgvc", args.dataset, limit)
    from fgvc_gluon.data import get_dataset
    opts = {"limit": limit}
    if args.skip_bad_images:
        opts["skip_bad_images"] = True
    try:
        return get_dataset(args.dataset, args.data_dir, split, **opts)
    except UserError as err:
        if str(err).startswith("split:"):
            raise UserError("%s: %s" % (flag, str(err)[len("split: "):]))
        raise


def evaluated_epoch(progress):
    """The epoch whose evaluation a checkpoint follows (0-based)."""
    if progress["batch_in_epoch"] == 0 and progress["epoch"] > 0:
        return progress["epoch"] - 1
    return progress["epoch"]


def top1_accuracy(method, dataset, ctx, batch_size, epoch, seed, num_workers=0):
    """Top-1 accuracy of every branch of ``method.predict``: ordered dict branch -> float.

    dataset: transformed items (3×S×S float32, class index). Correct counts
    stay on the device until the end (one host copy). The mxnet/numpy
    generators are reseeded from (seed, epoch) first: S3N evaluates with a
    random mode in its first epochs.
    """
    reseed(seed, epoch, EVAL_STEP)
    loader = gluon.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                   num_workers=num_workers)
    correct = collections.OrderedDict()
    bar = progress_bar(len(loader), "eval")
    for data, label in loader:
        used = ctx[:min(len(ctx), data.shape[0])]
        for part, part_label in zip(gluon.utils.split_and_load(data, used, even_split=False),
                                    gluon.utils.split_and_load(label, used, even_split=False)):
            target = part_label.astype("float32")
            for branch, logits in method.predict(part, epoch).items():
                hits = (mx.nd.argmax(logits, axis=1) == target).sum().as_in_context(ctx[0])
                correct[branch] = hits if branch not in correct else correct[branch] + hits
        bar.update(1)
    bar.close()
    counts = mx.nd.concat(*[c.reshape((1,)) for c in correct.values()], dim=0).asnumpy()
    return collections.OrderedDict(zip(correct, (counts.astype(np.float64) / len(dataset)).tolist()))


def accuracy_metrics(accuracies):
    """{'top1': main branch} plus 'top1_<branch>' for each branch when there are several."""
    metrics = {"top1": next(iter(accuracies.values()))}
    if len(accuracies) > 1:
        metrics.update(("top1_%s" % branch, value) for branch, value in accuracies.items())
    return metrics


def print_test(accuracies, num_images, what):
    main = next(iter(accuracies))
    print("test top-1 %.4f on %d images (%s)" % (accuracies[main], num_images, what))
    if len(accuracies) > 1:
        for branch, value in accuracies.items():
            print("  %-14s top-1 %.4f" % (branch, value))


# ---------------------------------------------------------------------------- training task

class FGVCTask(object):
    """An FGVCMethod as a training_runtime.loop task (see its docstring)."""

    metric_name = "top1"

    def __init__(self, args, ctx, method, meta, train_set, val_set):
        from fgvc_gluon.data import make_transform
        self.args, self.ctx, self.method, self.meta = args, ctx, method, meta
        self.blocks = method_blocks(method)
        self.groups = method.param_groups()
        self.train_set = train_set.transform_first(make_transform(method.defaults, train=True))
        self.val_set = val_set.transform_first(make_transform(method.defaults, train=False))

    def training_loss(self, data, label, index, epoch):
        """Per-sample loss (N,) of one device slice (labels as float32 class indices)."""
        return self.method.training_loss(data, label.astype("float32"), epoch)

    def after_step(self, epoch):
        pass

    def evaluate(self, epoch):
        accuracies = top1_accuracy(self.method, self.val_set, self.ctx, self.args.batch_size, epoch,
                                   self.args.seed, self.args.num_workers)
        return accuracy_metrics(accuracies)

    def extra_state(self):
        return {}

    def load_extra_state(self, extra):
        pass


# ---------------------------------------------------------------------------- test only

def checkpoint_for_test(source):
    """The checkpoint file of ``--test WEIGHTS`` (a file, or a run directory's best/last)."""
    if not source:
        raise UserError("--test: give the model: --test WEIGHTS (a checkpoint or a run directory)")
    path = checkpoint.run_checkpoint(source)
    if path is None and os.path.isdir(source):
        raise UserError("--test: %s holds neither %s nor %s" % (source, checkpoint.BEST, checkpoint.LAST))
    if path is None:
        raise UserError("--test: %s not found" % source)
    return path


def run_test(args, ctx):
    """Top-1 (per branch) of a checkpoint on the test split; the model comes from the checkpoint."""
    from fgvc_gluon.data import make_transform
    path = checkpoint_for_test(args.test)
    record = checkpoint.read(path, "--test")[0]
    saved = record["meta"]
    if saved.get("script") != SCRIPT:
        raise UserError("--test: %s is a checkpoint of %s, not of %s" % (path, saved.get("script"), SCRIPT))
    args.method = saved["method"]
    cli.use_records(args, "fgvc")
    args.dataset = args.dataset or saved["dataset"]
    signature = inspect.signature(method_module(args.method).build_method)
    options = {k: saved[k] for k in signature.parameters if k in saved and k not in NOT_OPTIONS}
    args.pretrained = False  # every weight comes from the checkpoint
    test_set = load_split(args, "test", args.test_limit if args.test_limit is not None else (
        DEMO_COMMON["test_limit"] if args.dataset == "fashion-mnist" else None), "--test")
    if args.batch_size is None:
        args.batch_size = 32
    method = build_method(args, saved["num_classes"], ctx, options)
    checkpoint.load_parameters(path, method_blocks(method),
                               {"script": SCRIPT, "method": args.method,
                                "num_classes": test_set.num_classes}, "--test")
    epoch = evaluated_epoch(record["progress"])
    accuracies = top1_accuracy(method, test_set.transform_first(make_transform(method.defaults, False)),
                               ctx, args.batch_size, epoch, args.seed, args.num_workers)
    print_test(accuracies, len(test_set), "%s, %s after epoch %d" % (args.method, path, epoch))
    return accuracies


# ---------------------------------------------------------------------------- main

def main(argv=None):
    args = build_parser().parse_args(argv)
    ctx = cli.contexts(args)
    if args.test is not None:
        return run_test(args, ctx)
    cli.use_records(args, "fgvc")
    resolve_defaults(args)
    options = build_options(args)
    if args.resume:
        args.pretrained = False  # every weight comes from the checkpoint
    mx.random.seed(args.seed)  # parameter initialisation
    np.random.seed(args.seed)
    train_set = load_split(args, args.train_split, args.train_limit, "--train-split")
    val_set = load_split(args, args.val_split, args.val_limit, "--val-split")
    if val_set.num_classes != train_set.num_classes:
        raise UserError("--val-split: split %r of %s has %d classes, the training split %r has %d"
                        % (args.val_split, args.dataset, val_set.num_classes, args.train_split,
                           train_set.num_classes))
    method = build_method(args, train_set.num_classes, ctx, options)
    fill_from_method(args, method.defaults)
    save_dir = cli.prepare_save_dir(args, SCRIPT)
    task = FGVCTask(args, ctx, method, meta_of(args, options, train_set), train_set, val_set)
    print("training %s (%s, %s, %d classes) on %d images, validating on %d; %s; saving to %s" % (
        args.method, options.get("backbone"), args.dataset, train_set.num_classes, len(train_set),
        len(val_set), ", ".join(str(c) for c in ctx), save_dir))
    schedule = StepSchedule(args.lr, args.lr_steps, args.lr_factor)
    runner = Runner(task, args, ctx, schedule, save_dir)
    runner.run()
    from fgvc_gluon.data import make_transform
    test_set = load_split(args, "test", args.test_limit, "--test")
    epoch = evaluated_epoch({"epoch": runner.epoch, "batch_in_epoch": runner.batch_in_epoch})
    accuracies = top1_accuracy(method, test_set.transform_first(make_transform(method.defaults, False)),
                               ctx, args.batch_size, epoch, args.seed, args.num_workers)
    print_test(accuracies, len(test_set), "%s, final parameters" % args.method)
    report = dict(accuracy_metrics(accuracies), images=len(test_set), epoch=epoch)
    with open(os.path.join(save_dir, "test.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    cli.run_main(main)
