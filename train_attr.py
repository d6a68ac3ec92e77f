"""Train, test and apply the imbalanced attribute model (ECCV 2018, SPEC §1).

    python train_attr.py                       # demo: Fashion-MNIST derived attributes, CPU, minutes
    python train_attr.py --data-dir WIDER      # the original's setting (WIDER-Attribute, ResNet-101)
    python train_attr.py --test RUN_DIR        # test mAP, per-attribute APs, mA, acc, prec, rec, F1
    python train_attr.py --predict a.jpg b.jpg --weights RUN_DIR   # CSV of attribute probabilities
    python train_attr.py --records DIR         # splits packed by python -m training_runtime.records

Training follows the original: SGD (momentum 0.9, wd 5e-4, lr 1e-4, batch 24,
250 epochs), one Trainer per block (backbone; fconv, fatt, fsr of each stage)
sharing the plateau lr rule, validation mAP (scikit-learn-style AP) each
epoch, total loss = Σ stages attention loss + main loss. ``--loss paper`` (the
default) uses the published weighted focal loss and history-weighted attention
losses; ``--loss original`` the plain sigmoid BCE the original script
actually ran (SPEC §1.3 quirk 1).

Demo defaults (no --data-dir, or --dataset fashion-mnist): resnet18_v1 at
32×32 without pretraining, 3,000 training and 1,000 validation images,
2 epochs, batch 32, lr 0.005, ImageNet normalisation (unit-scale inputs
for a network trained from scratch); the final test uses 2,000 test images.
About 3 minutes on 2 CPU cores. Any flag overrides them. (At lr 0.05 or 0.01
the published losses diverge within ~100 steps: their naive sigmoid
1/(1+exp(-x)) has a NaN gradient once a logit falls below -88.7, IL-3; the
NaN guard then stops the run.)

Deviations from the original, each an option: history keyed by dataset
index (shuffling is safe; the original indexed by batch position),
``--mask-unspecified`` (leave WIDER's unspecified labels out of the training
loss), ``--normalize imagenet``, ``--batchnorm sync|frozen`` (how BatchNorm
statistics behave when the batch is split over several devices).
"""
import csv
import os
import sys

import mxnet as mx
import numpy as np
from mxnet import gluon

from training_runtime import checkpoint, cli
from training_runtime.errors import UserError
from training_runtime.loop import ParamGroup, Runner, freeze_batchnorm, use_sync_batchnorm
from training_runtime.schedule import PlateauSchedule

SCRIPT = "train_attr"
ORIGINAL_DEFAULTS = dict(epochs=250, batch_size=24, lr=1e-4, momentum=0.9, wd=5e-4,
                         backbone="resnet101_v1", input_size=224, normalize="original",
                         pretrained=True)
DEMO_DEFAULTS = dict(epochs=2, batch_size=32, lr=0.005, momentum=0.9, wd=5e-4,
                     backbone="resnet18_v1", input_size=32, normalize="imagenet",
                     pretrained=False, train_limit=3000, val_limit=1000, test_limit=2000)


def build_parser():
    from imbalanced_attr.backbones import BACKBONES
    from imbalanced_attr.data import DATASETS
    parser = cli.make_parser(__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    cli.add_training_arguments(parser, {})
    g = parser.add_argument_group("attribute model")
    g.add_argument("--dataset", choices=DATASETS, default=None,
                   help="default: fashion-mnist without --data-dir, else wider")
    g.add_argument("--backbone", choices=BACKBONES, default=None,
                   help="default resnet101_v1 (demo: resnet18_v1)")
    g.add_argument("--input-size", type=int, default=None, help="network input side (default 224; demo 32)")
    g.add_argument("--no-pretrained", dest="pretrained", action="store_false", default=None,
                   help="do not load ImageNet weights into the backbone (the demo never does)")
    g.add_argument("--finetune", action="store_true",
                   help="freeze the backbone (no trainer, no loss on its logits): heads only")
    g.add_argument("--loss", choices=("paper", "original"), default="paper",
                   help="paper: weighted focal + history-weighted attention losses; original: "
                        "plain sigmoid BCE on every branch, as the original script ran")
    g.add_argument("--stable-sigmoid", action="store_true",
                   help="compute the losses' sigmoid and logs with sigmoid/log-sigmoid ops (finite "
                        "gradients for any logit) instead of the original's naive 1/(1+exp(-x)), "
                        "whose gradient is NaN below -88.7 (deviation from the original, off by default)")
    g.add_argument("--normalize", choices=("original", "imagenet"), default=None,
                   help="original: 0-255 minus (104, 117, 123); imagenet: mean/std on 0-1 "
                        "(default original; demo imagenet)")
    g.add_argument("--mask-unspecified", action="store_true",
                   help="leave unspecified (0) labels out of the training loss")
    g = parser.add_argument_group("evaluation and prediction")
    g.add_argument("--test", nargs="?", const="", default=None, metavar="WEIGHTS",
                   help="only test: WEIGHTS is a checkpoint, a run directory (its best checkpoint) "
                        "or a directory of the original's .params files (default: --weights)")
    g.add_argument("--predict", nargs="+", default=None, metavar="IMAGE",
                   help="write attribute probabilities of these images to --output (CSV)")
    g.add_argument("--weights", default=None, help="model for --test / --predict (as --test WEIGHTS)")
    g.add_argument("--output", default="predictions.csv", help="CSV written by --predict")
    return parser


def resolve_defaults(args):
    """Fill the flags left unset from the original's or the demo's defaults."""
    if args.dataset is None:
        args.dataset = "wider" if args.data_dir else "fashion-mnist"
    defaults = DEMO_DEFAULTS if args.dataset == "fashion-mnist" else ORIGINAL_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    cli.check_positive(args, "epochs", "batch_size", "lr", "input_size", "log_every")
    if args.momentum < 0 or args.wd < 0:
        raise UserError("--momentum/--wd: expected non-negative values, got %g/%g" % (args.momentum, args.wd))
    return args


# ---------------------------------------------------------------------------- data

def load_split(args, split, limit):
    """The ``split`` of --dataset: its images, or with --records DIR/<split>.rec."""
    if args.records is not None:
        from training_runtime.records import open_split
        return open_split(args.records, split, "attr", args.dataset, limit)
    from imbalanced_attr.data import get_dataset
    opts = {"limit": limit}
    if args.skip_bad_images:
        opts["skip_bad_images"] = True
    return get_dataset(args.dataset, args.data_dir, split, **opts)


def transform(args, train):
    from imbalanced_attr.data import make_transform
    return make_transform(train, input_size=args.input_size, normalize=args.normalize)


def meta_of(args, attribute_names):
    """What a checkpoint must match to be resumed / tested with these flags."""
    return {"script": SCRIPT, "dataset": args.dataset, "backbone": args.backbone,
            "input_size": args.input_size, "num_classes": len(attribute_names),
            "attributes": list(attribute_names)}


def build_model(args, num_classes, ctx):
    from imbalanced_attr.model import AttributeModel
    net = AttributeModel(num_classes, backbone=args.backbone, input_size=args.input_size,
                         pretrained=bool(args.pretrained), ctx=ctx)
    if args.batchnorm == "sync" and len(ctx) > 1:
        use_sync_batchnorm(net, len(ctx))
    elif args.batchnorm == "frozen":
        freeze_batchnorm(net)
    if args.finetune:
        net.backbone.collect_params().setattr("grad_req", "null")
    net.hybridize()
    return net


def predict_probs(net, dataset, ctx, batch_size):
    """Aggregated probabilities σ(0.25·(s₂+s₃+s₄+logits)) of every item: numpy N×C."""
    from imbalanced_attr.model import aggregate_prediction
    loader = gluon.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    outputs = []
    for batch in loader:
        data = batch[0] if isinstance(batch, (list, tuple)) else batch
        used = ctx[:min(len(ctx), data.shape[0])]
        for part in gluon.utils.split_and_load(data, used, even_split=False):
            logits, scores = net(part)
            outputs.append(aggregate_prediction(logits, scores))
    return np.concatenate([o.asnumpy() for o in outputs], axis=0)


def validation_map(labels, probs):
    """The original's train/val mAP: scikit-learn-style AP per attribute with the
    author's protocol (SPEC quirk 4): unspecified (0) ignored, -1 -> 0."""
    from imbalanced_attr.metrics import average_precision
    aps = []
    for c in range(labels.shape[1]):
        specified = labels[:, c] != 0
        aps.append(average_precision((labels[specified, c] == 1).astype(np.float32),
                                     probs[specified, c])[0])
    return float(np.mean(aps)), np.array(aps)


# ---------------------------------------------------------------------------- training task

class AttributeTask(object):
    """The attribute model as a training_runtime.loop task (see its docstring)."""

    metric_name = "mAP"

    def __init__(self, args, ctx, train_set, val_set):
        from imbalanced_attr import losses
        from imbalanced_attr.data import training_targets
        self.args, self.ctx = args, ctx
        self.attribute_names = tuple(train_set.attribute_names)
        num_classes = len(self.attribute_names)
        self.meta = meta_of(args, self.attribute_names)
        self.net = build_model(args, num_classes, ctx)
        self.blocks = self.net.blocks()
        self.groups = [ParamGroup(name, block.collect_params())
                       for name, block in self.blocks.items()
                       if not (args.finetune and block is self.net.backbone)]
        self._targets = training_targets
        targets, _ = training_targets(train_set.label_matrix)
        if args.dataset == "wider":
            ratios = losses.WIDER_BATCH_RATIOS  # hard-coded in the original
        else:
            ratios = losses.batch_ratios_from_labels(targets, self.attribute_names)
        plain = args.loss == "original"
        stable = args.stable_sigmoid
        self.main_loss = losses.WeightedFocalLoss(ratios, plain_bce=plain, stable=stable)
        self.attention_loss = losses.AttentionHistoryLoss(plain_bce=plain, stable=stable)
        self.history = losses.PredictionHistory(len(train_set), num_classes, ctx=ctx[0])
        self.train_set = train_set.transform_first(transform(args, train=True))
        self.val_set = val_set.transform_first(transform(args, train=False))
        self.val_labels = val_set.label_matrix
        self._recorded = []

    def training_loss(self, data, label, index, epoch):
        """Per-sample loss (N,) of one device slice: Σ stages attention loss + main loss."""
        from imbalanced_attr.model import aggregate_prediction
        targets, mask = self._targets(label, self.args.mask_unspecified)
        mask = mask if self.args.mask_unspecified else None
        logits, scores = self.net(data)
        std_weights = None
        if self.args.loss == "paper":
            std_weights = self.history.std_weights(index, epoch, ctx=data.context)
        loss = None
        for score in scores:
            stage_loss = self.attention_loss(score, targets, std_weights, mask)
            loss = stage_loss if loss is None else loss + stage_loss
        if not self.args.finetune:
            loss = loss + self.main_loss(logits, targets, mask)
        # recorded after the step (the original updates the history after the loss)
        self._recorded.append((index, aggregate_prediction(logits.detach(),
                                                           [s.detach() for s in scores])))
        return loss

    def after_step(self, epoch):
        for index, prediction in self._recorded:
            self.history.update(index, prediction, epoch)
        self._recorded = []

    def evaluate(self, epoch):
        probs = predict_probs(self.net, self.val_set, self.ctx, self.args.batch_size)
        mean_ap, _ = validation_map(self.val_labels, probs)
        return {"mAP": mean_ap}

    def extra_state(self):
        return {"history": self.history.state_dict()}

    def load_extra_state(self, extra):
        self.history.load_state_dict(extra["history"])


# ---------------------------------------------------------------------------- test and predict

def test_report(names, labels, probs, out=sys.stdout):
    """Print the original's test mAP, per-attribute APs with positive rates, and mA/acc/prec/rec/F1."""
    from imbalanced_attr.metrics import attribute_metrics, test_map
    mean_ap, aps = test_map(labels, probs)
    extras = attribute_metrics(labels, probs)
    specified = labels != 0
    rates = (labels == 1).sum(axis=0) / np.maximum(specified.sum(axis=0), 1)
    print("test mAP %.4f on %d images (mean positive rate %.4f)" % (mean_ap, len(labels), rates.mean()),
          file=out)
    print("%-16s %8s %14s" % ("attribute", "AP", "positive rate"), file=out)
    for name, ap, rate in zip(names, aps, rates):
        print("%-16s %8.4f %14.4f" % (name, ap, rate), file=out)
    print("mA %.4f  accuracy %.4f  precision %.4f  recall %.4f  F1 %.4f" % (
        extras["mA"], extras["accuracy"], extras["precision"], extras["recall"], extras["f1"]), file=out)
    return dict(extras, mAP=mean_ap, APs=aps.tolist(), positive_rates=rates.tolist())


def weights_path(args, source):
    """(kind, path): a checkpoint file or a directory of the original's .params files."""
    if not source:
        raise UserError("--test/--predict: give the model: --test WEIGHTS or --weights WEIGHTS "
                        "(a checkpoint, a run directory or a directory of .params files)")
    path = checkpoint.run_checkpoint(source)
    if path is not None:
        return "checkpoint", path
    if os.path.isdir(source):
        if any(f.endswith(".params") for f in os.listdir(source)):
            return "original", source
        raise UserError("--weights: %s holds neither %s/%s nor the original's .params files"
                        % (source, checkpoint.BEST, checkpoint.LAST))
    raise UserError("--weights: %s not found" % source)


def load_for_inference(args, ctx, source, attribute_names=None):
    """(net, attribute names) with the weights of ``source`` loaded."""
    kind, path = weights_path(args, source)
    args.pretrained = False  # every weight is loaded: nothing to download
    if kind == "checkpoint":
        record = checkpoint.read(path, "--weights")[0]
        saved = record["meta"]
        if saved.get("script") != SCRIPT:
            raise UserError("--weights: %s is a checkpoint of %s, not of %s"
                            % (path, saved.get("script"), SCRIPT))
        # the architecture comes from the checkpoint unless given on the command line
        args.backbone = args.backbone or saved["backbone"]
        args.input_size = args.input_size or saved["input_size"]
        resolve_defaults(args)
        names = attribute_names or saved["attributes"]
        net = build_model(args, len(names), ctx)
        checkpoint.load_parameters(path, net.blocks(), meta_of(args, names), "--weights")
        return net, names
    resolve_defaults(args)
    if attribute_names is None:
        from imbalanced_attr.data import WIDER_ATTRIBUTES
        if args.dataset != "wider":
            raise UserError("--predict with the original's .params files: the attribute names are "
                            "WIDER's; pass --dataset wider or use --test with --data-dir")
        attribute_names = WIDER_ATTRIBUTES
    from imbalanced_attr.params_io import load_original_params
    net = build_model(args, len(attribute_names), ctx)
    load_original_params(net, path, ctx=ctx)
    return net, attribute_names


def run_test(args, ctx):
    cli.use_records(args, "attr")
    if args.dataset is None:
        args.dataset = "wider" if args.data_dir else "fashion-mnist"
    test_set = load_split(args, "test", args.test_limit if args.test_limit is not None else (
        DEMO_DEFAULTS["test_limit"] if args.dataset == "fashion-mnist" else None))
    net, names = load_for_inference(args, ctx, args.test or args.weights, test_set.attribute_names)
    probs = predict_probs(net, test_set.transform_first(transform(args, train=False)), ctx,
                          args.batch_size)
    return test_report(names, test_set.label_matrix, probs)


class _ImageFiles(gluon.data.Dataset):
    def __init__(self, paths, transform_fn):
        self.paths, self.transform_fn = paths, transform_fn

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from training_runtime.images import load_image
        return self.transform_fn(load_image(self.paths[i]))


def run_predict(args, ctx):
    if args.dataset is None:
        args.dataset = "wider" if args.data_dir else "fashion-mnist"
    net, names = load_for_inference(args, ctx, args.weights or args.test)
    images = _ImageFiles(args.predict, transform(args, train=False))
    probs = predict_probs(net, images, ctx, args.batch_size)
    directory = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(directory):
        raise UserError("--output: directory %s does not exist" % directory)
    with open(args.output, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image"] + list(names))
        for path, row in zip(args.predict, probs):
            writer.writerow([path] + ["%.6f" % p for p in row])
    print("wrote %d predictions to %s" % (len(probs), args.output))


# ---------------------------------------------------------------------------- main

def main(argv=None):
    args = build_parser().parse_args(argv)
    ctx = cli.contexts(args)
    if args.predict is not None:
        return run_predict(args, ctx)
    if args.test is not None:
        return run_test(args, ctx)
    cli.use_records(args, "attr")
    resolve_defaults(args)
    mx.random.seed(args.seed)  # parameter initialisation
    np.random.seed(args.seed)
    train_set = load_split(args, "train", args.train_limit)
    val_set = load_split(args, "val", args.val_limit)
    save_dir = cli.prepare_save_dir(args, SCRIPT)
    task = AttributeTask(args, ctx, train_set, val_set)
    print("training %s (%s, %d attributes) on %d images, validating on %d; %s; saving to %s" % (
        args.backbone, args.dataset, len(task.attribute_names), len(train_set), len(val_set),
        ", ".join(str(c) for c in ctx), save_dir))
    schedule = PlateauSchedule(args.lr)
    runner = Runner(task, args, ctx, schedule, save_dir)
    runner.run()
    test_set = load_split(args, "test", args.test_limit)
    probs = predict_probs(task.net, test_set.transform_first(transform(args, train=False)), ctx,
                          args.batch_size)
    report = test_report(task.attribute_names, test_set.label_matrix, probs)
    import json
    with open(os.path.join(save_dir, "test.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    cli.run_main(main)
