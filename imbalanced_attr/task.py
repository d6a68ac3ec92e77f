"""The attribute model as a training task (``training_runtime.task.TrainingTask``).

Training follows the original (docs/SPEC.md §1.4): SGD (momentum 0.9, wd
5e-4, lr 1e-4, batch 24, 250 epochs), one Trainer per block (backbone; fconv,
fatt, fsr of each stage) sharing the plateau lr rule, validation mAP
(scikit-learn-style AP, the author's protocol) each epoch, total loss =
Σ stages attention loss + main loss (docs/SPEC.md §1.3).

Knobs (the run definition's model options): ``loss`` 'paper' (the published
weighted focal loss and history-weighted attention losses, default) or
'original' (the plain sigmoid BCE the original script actually ran, IL-1),
and the ablation's single components 'focal' (weighted focal main loss,
unweighted attention BCE) and 'history' (unweighted main BCE,
history-weighted attention losses); ``history_start`` / ``history_weight_epoch``
(first epoch, 0-based, that records the prediction history / weights the
attention losses: 2 and 5 as the original, IL-10);
``stable_sigmoid`` (sigmoid / log-sigmoid ops instead of the naive
1/(1+exp(-x)) whose gradient is NaN below -88.7, IL-3); ``normalize``
'original' (Caffe means on 0-255) or 'imagenet'; ``mask_unspecified`` (leave
WIDER's unspecified labels out of the training loss); ``finetune`` (freeze
the backbone: heads only, no loss on its logits).

Shapes: data N×3×S×S float32; labels N×C float32 in {1, -1, 0};
``training_loss`` -> (N,); ``predict`` -> {'probabilities': N×C} =
σ(0.25·(s₂+s₃+s₄+logits)).
"""
import collections
import os
import sys

import mxnet as mx
import numpy as np
from mxnet.gluon import HybridBlock

from training_runtime.images import IMAGENET_MEAN, IMAGENET_STD
from training_runtime import plots
from training_runtime.registry import Knob, MethodEntry
from training_runtime.task import ParamGroup, TrainingTask

from . import losses
from .backbones import BACKBONES
from .data import ORIGINAL_MEAN, WIDER_ATTRIBUTES, make_transform, training_targets
from .metrics import attribute_metrics, average_precision, test_map
from .model import AttributeModel, aggregate_prediction
from .params_io import load_original_params
from .registry import METHODS


def validation_map(labels, probs):
    """The original's train/val mAP: scikit-learn-style AP per attribute with the
    author's protocol (IL-4): unspecified (0) ignored, -1 -> 0. Returns (mAP, APs)."""
    aps = []
    for c in range(labels.shape[1]):
        specified = labels[:, c] != 0
        aps.append(average_precision((labels[specified, c] == 1).astype(np.float32),
                                     probs[specified, c])[0])
    return float(np.mean(aps)), np.array(aps)


def test_report(names, labels, probs, out=sys.stdout):
    """Print the original's test mAP, per-attribute APs with positive rates, and
    mA/acc/prec/rec/F1; returns them as a dict."""
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


class AggregatedPrediction(HybridBlock):
    """The model as ``predict`` applies it: N×3×S×S -> σ(0.25·(s₂+s₃+s₄+logits)), N×C
    float32 (also when the net's outputs are float16, :func:`aggregate_prediction`)."""

    def __init__(self, net, **kwargs):
        super(AggregatedPrediction, self).__init__(**kwargs)
        self.net = net

    def hybrid_forward(self, F, x):
        logits, scores = self.net(x)
        return aggregate_prediction(logits, scores, F)


def normalisation_info(normalize, input_size):
    """The sidecar's description of :func:`make_transform`'s evaluation path."""
    resize = int(round(256 * input_size / 224.0))
    if normalize == "original":
        norm = {"scale": 1.0, "mean": list(ORIGINAL_MEAN), "std": [1.0, 1.0, 1.0],
                "formula": "x = pixel - mean (pixels on 0-255, no std: the original's ImageRecordIter)"}
    else:
        norm = {"scale": 1.0 / 255, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                "formula": "x = (pixel / 255 - mean) / std"}
    return {"size": input_size, "channel_order": "RGB", "layout": "NCHW", "dtype": "float32",
            "resize": "resize to %d×%d (aspect ratio not kept, area interpolation), then the "
                      "center %d×%d crop" % (resize, resize, input_size, input_size),
            "preprocess": [{"op": "resize", "width": resize, "height": resize, "interpolation": "area"},
                           {"op": "center_crop", "width": input_size, "height": input_size}],
            "normalization": dict(norm, name=normalize)}
AP_FILE = "test_ap.png"
PR_FILE = "test_pr.png"


def precision_recall(labels, scores):
    """Precision–recall points of one attribute. labels: (N,) in {-1, 0, 1} (0 =
    unspecified, left out); scores: (N,). Returns (recall (T,), precision (T,)),
    one point per distinct score threshold, highest first, starting at recall 0."""
    keep = labels != 0
    positive, scores = (labels[keep] == 1).astype(np.float64), scores[keep]
    order = np.argsort(-scores, kind="stable")
    positive, ranked = positive[order], scores[order]
    true_pos = np.cumsum(positive)
    last = np.r_[ranked[1:] != ranked[:-1], True] if len(ranked) else np.zeros(0, bool)
    tp, ranks = true_pos[last], np.arange(1, len(ranked) + 1)[last]
    recall = tp / max(positive.sum(), 1.0)
    precision = tp / ranks
    return np.r_[0.0, recall], np.r_[precision[:1] if len(precision) else [1.0], precision]


def write_test_figures(save_dir, names, labels, probs, report, log=print):
    """test_ap.png (AP bars sorted by positive rate) and test_pr.png (precision–recall per
    attribute) in ``save_dir``; labels, probs: (N, C). A failure is a logged warning."""
    aps = report["APs"]
    plots.safely(plots.ap_bars, os.path.join(save_dir, AP_FILE), list(names), aps,
                 report["positive_rates"], log=log)
    curves = {name: precision_recall(labels[:, c], probs[:, c]) + (aps[c],)
              for c, name in enumerate(names)}
    plots.safely(plots.pr_curves, os.path.join(save_dir, PR_FILE), list(names), curves, log=log)


class AttributeTask(TrainingTask):
    """The ECCV 2018 attribute model, its losses and its metrics as a task.

    model: a ``training_runtime.config.ModelConfig`` (backbone, image_size,
    pretrained, options = the knobs above); attribute_names: the C labels;
    ctx: list of contexts.
    """

    metric_name = "mAP"
    picture_images = 4

    def __init__(self, model, attribute_names, ctx):
        options = model.options
        self.attribute_names = tuple(attribute_names)
        self.image_size = int(model.image_size)
        self.loss_mode = options["loss"]
        self.stable = bool(options["stable_sigmoid"])
        self.normalize = options["normalize"]
        self.mask_unspecified = bool(options["mask_unspecified"])
        self.finetune = bool(options["finetune"])
        # .get: runs saved before these knobs existed used the original's schedule
        self.history_start = int(options.get("history_start", 2))
        self.history_weight_epoch = int(options.get("history_weight_epoch", 5))
        self.ctx = ctx
        self.net = AttributeModel(len(self.attribute_names), backbone=model.backbone,
                                  input_size=self.image_size,
                                  pretrained=model.pretrained if isinstance(model.pretrained, str)
                                  else bool(model.pretrained), ctx=ctx)
        if self.finetune:
            self.net.backbone.collect_params().setattr("grad_req", "null")
        self.history = None
        self._recorded = []

    def blocks(self):
        return self.net.blocks()

    def hybridize(self):
        # the whole model as one graph; fixed input shapes, so static memory and shapes
        self.net.hybridize(static_alloc=True, static_shape=True)

    def param_groups(self):
        return [ParamGroup(name, block.collect_params()) for name, block in self.blocks().items()
                if not (self.finetune and block is self.net.backbone)]

    def transform(self, train):
        return make_transform(train, input_size=self.image_size, normalize=self.normalize)

    def prepare_training(self, train_set):
        """Class weights of the focal loss (WIDER: the original's hard-coded ones)
        and the prediction history over the training samples."""
        targets, _ = training_targets(train_set.label_matrix)
        if self.attribute_names == tuple(WIDER_ATTRIBUTES):
            ratios = losses.WIDER_BATCH_RATIOS  # hard-coded in the original
        else:
            ratios = losses.batch_ratios_from_labels(targets, self.attribute_names)
        plain = self.loss_mode == "original"
        self.main_loss = losses.WeightedFocalLoss(ratios, plain_bce=plain, stable=self.stable,
                                                  weighted=self.loss_mode != "history")
        self.attention_loss = losses.AttentionHistoryLoss(plain_bce=plain, stable=self.stable)
        self.history = losses.PredictionHistory(len(train_set), len(self.attribute_names),
                                                start_epoch=self.history_start,
                                                weight_epoch=self.history_weight_epoch, ctx=self.ctx[0])

    def check_evaluation_split(self, dataset):
        """An attribute never specified in an evaluation split has no AP (the validation
        mAP would fail after a whole epoch): refused before training. An attribute
        specified but without positives keeps its documented AP of 0 (scikit-learn 1.3.2)."""
        specified = (np.asarray(dataset.label_matrix) != 0).sum(axis=0)
        never = [name for name, count in zip(self.attribute_names, specified) if count == 0]
        if never:
            raise ValueError("attribute %s is never specified (all labels 0), so its AP is undefined; "
                             "use a larger split (--val-limit / --test-limit) or another split"
                             % ", ".join(never[:3]))

    def training_loss(self, data, label, index, epoch):
        """Per-sample loss (N,) of one device slice: Σ stages attention loss + main loss."""
        targets, mask = training_targets(label, self.mask_unspecified)
        mask = mask if self.mask_unspecified else None
        logits, scores = self.net(data)
        std_weights = None
        if self.loss_mode in ("paper", "history"):
            std_weights = self.history.std_weights(index, epoch, ctx=data.context)
        loss = None
        for score in scores:
            stage_loss = self.attention_loss(score, targets, std_weights, mask)
            loss = stage_loss if loss is None else loss + stage_loss
        if not self.finetune:
            loss = loss + self.main_loss(logits, targets, mask)
        # recorded after the step (the original updates the history after the loss)
        self._recorded.append((index, aggregate_prediction(logits.detach(),
                                                           [s.detach() for s in scores])))
        return loss

    def begin_step(self, batch):
        self._step_batch = batch
        self._recorded = []

    def after_step(self, epoch):
        """Record the step's predictions in the history: those of the whole global batch
        (gathered from every device slice and, with --kvstore dist_*, every worker), so
        the history does not depend on how the batch was split."""
        recorded, self._recorded = self._recorded, []
        if not recorded or epoch < self.history.start_epoch:
            return
        batch = getattr(self, "_step_batch", None)
        if batch is None:  # called outside the runner: the slices' own indices
            for index, prediction in recorded:
                self.history.update(index, prediction, epoch)
            return
        ctx = self.history.ctx
        predictions = mx.nd.concat(*[p.as_in_context(ctx) for _, p in recorded], dim=0)
        self.history.update(batch.global_index, batch.gather("history", predictions), epoch)

    def predict(self, data, epoch):
        logits, scores = self.net(data)
        return collections.OrderedDict([("probabilities", aggregate_prediction(logits, scores))])

    def inference_block(self, epoch):
        """N×3×S×S normalised images -> N×C probabilities (``predict``'s aggregated prediction)."""
        return AggregatedPrediction(self.net, prefix="exported_")

    def export_info(self):
        return {"input": normalisation_info(self.normalize, self.image_size),
                "output": {"name": "probabilities", "activation": "sigmoid (applied)",
                           "meaning": "per attribute, the probability that the person has it: "
                                      "sigmoid(0.25 (s2 + s3 + s4 + logits)); labels = attribute names"}}

    def _labels_and_probs(self, batches, epoch):
        labels, probs = [], []
        for data, label in batches:
            probs.append(self.predict(data, epoch)["probabilities"])
            labels.append(label)
        return (np.concatenate([l.asnumpy() for l in labels]).astype(np.float32),
                np.concatenate([p.asnumpy() for p in probs]))

    def evaluate(self, batches, epoch):
        labels, probs = self._labels_and_probs(batches, epoch)
        return {"mAP": validation_map(labels, probs)[0]}

    def test_report(self, batches, epoch, out=sys.stdout):
        labels, probs = self._labels_and_probs(batches, epoch)
        report = test_report(self.attribute_names, labels, probs, out)
        if getattr(self, "figure_dir", None):
            write_test_figures(self.figure_dir, self.attribute_names, labels, probs, report)
        return report

    def pictures(self, batches, directory, epoch):
        """RUN/pictures/attention_epoch<N>.png (:mod:`imbalanced_attr.explain`)."""
        from .explain import task_pictures
        return task_pictures(self, batches, directory, epoch)

    def extra_state(self):
        return {"history": self.history.state_dict()} if self.history is not None else {}

    def load_extra_state(self, state):
        if "history" in state:
            self.history.load_state_dict(state["history"])

    def load_foreign_weights(self, path):
        """The original's .params files (params_io layout) in directory ``path``."""
        if not any(f.endswith(".params") for f in os.listdir(path)):
            return False
        load_original_params(self.net, path, ctx=self.ctx)
        return True


#: the original's settings (docs/SPEC.md §1.4) as run-definition fields
ORIGINAL_RECIPE = dict(backbone="resnet101_v1", image_size=224, epochs=250, batch_size=24, lr=1e-4,
                       momentum=0.9, wd=5e-4, schedule="plateau")
#: the embedded demo: resnet18_v1 at 32×32 from scratch, minutes on a CPU (README)
DEMO = dict(backbone="resnet18_v1", image_size=32, epochs=2, batch_size=32, lr=0.005,
            normalize="imagenet", train_limit=3000, val_limit=1000, test_limit=2000)

METHODS.register(MethodEntry(
    "attention", build=lambda model, names, ctx: AttributeTask(model, names, ctx),
    knobs=(
        Knob("loss", str, "paper", "paper: weighted focal + history-weighted attention losses; "
             "original: plain sigmoid BCE on every branch, as the original script ran; "
             "focal / history: one published component alone (ablation): focal = weighted focal "
             "main loss + unweighted attention BCE, history = unweighted main BCE + "
             "history-weighted attention losses",
             choices=("paper", "original", "focal", "history")),
        Knob("history_start", int, 2, "first epoch (0-based) that records the prediction history "
             "(the original's 2; scale down for short runs)", minimum=0),
        Knob("history_weight_epoch", int, 5, "first epoch (0-based) whose attention losses are "
             "weighted by the history's std (the original's 5)", minimum=0),
        Knob("stable_sigmoid", bool, False, "compute the losses' sigmoid and logs with sigmoid/"
             "log-sigmoid ops (finite gradients for any logit) instead of the original's naive "
             "1/(1+exp(-x)), whose gradient is NaN below -88.7 (a deviation, off by default)"),
        Knob("normalize", str, "original", "original: 0-255 minus (104, 117, 123); imagenet: mean/std "
             "on 0-1 (demo: imagenet)", choices=("original", "imagenet")),
        Knob("mask_unspecified", bool, False, "leave unspecified (0) labels out of the training loss"),
        Knob("finetune", bool, False, "freeze the backbone (no trainer, no loss on its logits): heads only"),
    ),
    recipe=ORIGINAL_RECIPE, demo=DEMO, pretrained=True, backbones=BACKBONES,
    summary="multi-stage attention heads on a tap backbone (ECCV 2018)",
    foreign_weights="the original's .params files"))
