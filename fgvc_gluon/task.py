"""The base of every fine-grained method: :class:`FGVCTask`, a
:class:`training_runtime.task.TrainingTask` that classifies into K classes.

Shapes (one device slice of N samples):

- ``transform(train)``: H×W×3 uint8 image -> 3×S×S float32 (S = ``defaults['image_size']``),
  by :func:`fgvc_gluon.data.make_transform` from the method's ``defaults``;
- ``training_loss(data, label, index, epoch)``: data N×3×S×S float32, label
  (N,) class indices (int from the loader; cast with :meth:`FGVCTask.class_labels`),
  index (N,) dataset indices or None (unused by the fine-grained methods) ->
  per-sample loss (N,);
- ``predict(data, epoch)``: ordered dict branch name -> N×K logits, the main
  branch first (one branch, ``classifier``, except S3N's four);
- ``evaluate(batches, epoch)``: top-1 accuracy of every branch -> ``{'top1': main}``
  plus ``top1_<branch>`` per branch when there are several;
- ``test_report(batches, epoch, out)``: the same, printed, plus ``images``.

A subclass sets ``name``, ``net`` and ``defaults`` and implements
``param_groups``, ``training_loss`` and ``predict``; ``blocks()`` is
``{'net': net}`` unless it has more parameters to checkpoint (the center-loss
centers). Every method module builds its task with ``build_method(num_classes,
**options)`` and registers it with :func:`fgvc_gluon.registry.register_method`.
"""
import collections
import sys

import mxnet as mx
import numpy as np
from mxnet import gluon

from training_runtime.task import ParamGroup, TrainingTask

from .data import make_transform

__all__ = ["FGVCTask", "ParamGroup", "top1_accuracies", "accuracy_metrics", "print_test",
           "optimisation_defaults", "check_int", "check_num_classes"]


def optimisation_defaults(recipe):
    """The ``defaults`` entries that come from a method's recipe: lr, momentum, wd,
    batch_size, epochs, lr_steps (a fresh list), lr_factor."""
    return dict(lr=recipe["lr"], momentum=recipe["momentum"], wd=recipe["wd"],
                batch_size=recipe["batch_size"], epochs=recipe["epochs"],
                lr_steps=list(recipe["lr_steps"]), lr_factor=recipe["lr_factor"])


def check_int(value, name, minimum=None, owner=None):
    """int(value); TypeError unless it is an integer (an int, a numpy integer or an
    integral float), ValueError below ``minimum``; the messages name the argument."""
    where = " for %s" % owner if owner else ""
    bound = " >= %d" % minimum if minimum is not None else ""
    try:
        number = int(value)
        integral = not isinstance(value, (bool, str)) and number == value
    except (TypeError, ValueError, OverflowError):
        integral = False
    if not integral:
        raise TypeError("%s: expected an int%s%s, got %r" % (name, bound, where, value))
    if minimum is not None and number < minimum:
        raise ValueError("%s: expected an int%s%s, got %r" % (name, bound, where, value))
    return number


def check_num_classes(num_classes, owner):
    """int(num_classes); TypeError/ValueError naming ``owner`` unless it is an integer >= 2."""
    return check_int(num_classes, "num_classes", minimum=2, owner=owner)


def top1_accuracies(task, batches, epoch):
    """(ordered dict branch -> top-1 accuracy, number of images) over ``batches``.

    batches: (data N×3×S×S, label (N,) class indices) device slices. The
    correct counts stay on the first slice's device until the end (one host
    copy). ValueError when ``batches`` is empty.
    """
    correct = collections.OrderedDict()
    count, home = 0, None
    for data, label in batches:
        if home is None:
            home = data.context
        target = label.astype("float32", copy=False)
        for branch, logits in task.predict(data, epoch).items():
            # float32 (a no-op for float32 logits): --amp's float16 logits would give
            # float16 class indices from argmax, exact only up to 2048
            logits = logits.astype("float32", copy=False)
            hits = (mx.nd.argmax(logits, axis=1) == target).sum().as_in_context(home)
            correct[branch] = hits if branch not in correct else correct[branch] + hits
        count += data.shape[0]
    if not count:
        raise ValueError("evaluate: batches: expected at least one (data, label) slice, got none")
    counts = mx.nd.concat(*[c.reshape((1,)) for c in correct.values()], dim=0).asnumpy()
    return collections.OrderedDict(zip(correct, (counts.astype(np.float64) / count).tolist())), count


def accuracy_metrics(accuracies):
    """{'top1': main branch} plus 'top1_<branch>' for each branch when there are several."""
    metrics = {"top1": next(iter(accuracies.values()))}
    if len(accuracies) > 1:
        metrics.update(("top1_%s" % branch, value) for branch, value in accuracies.items())
    return metrics


def print_test(accuracies, num_images, what=None, out=sys.stdout):
    """'test top-1 <main> on <n> images' (+ ' (<what>)' when given), then one line per
    branch when there are several."""
    main = next(iter(accuracies))
    print("test top-1 %.4f on %d images%s" % (accuracies[main], num_images,
                                              " (%s)" % what if what else ""), file=out)
    if len(accuracies) > 1:
        for branch, value in accuracies.items():
            print("  %-14s top-1 %.4f" % (branch, value), file=out)


class InferenceBranch(gluon.HybridBlock):
    """Export helper: x N×3×S×S -> ``fn(F, x, *parts)`` N×K, the ``parts`` (the task's
    own, loaded blocks) registered as children so that ``export`` saves their parameters."""

    def __init__(self, fn, *parts, **kwargs):
        super(InferenceBranch, self).__init__(**kwargs)
        self._fn = fn
        self._parts = parts
        for i, part in enumerate(parts):
            self.register_child(part, "part%d" % i)

    def hybrid_forward(self, F, x):
        return self._fn(F, x, *self._parts)


def eval_resize_steps(defaults):
    """The evaluation resize and crop of :func:`fgvc_gluon.data.make_transform` as the
    sidecar's machine-readable ``preprocess`` steps (scripts/onnx_predict.py applies them)."""
    size, resize = int(defaults["image_size"]), defaults.get("resize")
    if resize is None:
        return [{"op": "resize", "width": size, "height": size, "interpolation": "bilinear"}]
    if np.isscalar(resize):
        first = {"op": "resize_short", "size": int(resize), "interpolation": "bilinear"}
    else:
        first = {"op": "resize", "width": int(resize[0]), "height": int(resize[1]),
                 "interpolation": "bilinear"}
    return [first, {"op": "center_crop", "width": size, "height": size}]


def eval_resize_text(defaults):
    """The evaluation resize of :func:`fgvc_gluon.data.make_transform`, in words."""
    size, resize = int(defaults["image_size"]), defaults.get("resize")
    if resize is None:
        return "resize to %d×%d (aspect ratio not kept, bilinear)" % (size, size)
    if np.isscalar(resize):
        return "resize the short side to %d (bilinear), then the center %d×%d crop" % (int(resize), size, size)
    return "resize to %d×%d (width×height, bilinear), then the center %d×%d crop" % (
        int(resize[0]), int(resize[1]), size, size)


class FGVCTask(TrainingTask):
    """Base class: a classification network plus how it is trained and evaluated.

    Subclasses set ``name``, ``net`` and ``defaults`` and implement
    ``param_groups``, ``training_loss`` and ``predict``.
    """

    metric_name = "top1"
    picture_images = 4
    name = None
    net = None
    #: upstream training settings (the optimisation ones come from the method's RECIPE), keys:
    #:   lr, momentum, wd, batch_size, epochs,
    #:   lr_steps (list of epochs where the lr is multiplied by lr_factor), lr_factor,
    #:   image_size (int: side of the network input, train and eval),
    #:   resize (int or None: eval resizes the short side to this, then center-crops
    #:           image_size; a (w, h) pair resizes to exactly that first; None resizes
    #:           straight to image_size),
    #:   train_crop ('random_resized' | 'pad_random' | 'resize' | 'resize_random': resize to the
    #:               ``resize`` pair, then a random image_size crop),
    #:   crop_scale ((lo, hi) area fraction for 'random_resized'),
    #:   pad (int, zero padding for 'pad_random'; the image is first resized to image_size),
    #:   flip (bool, random horizontal flip in training),
    #:   mean, std (3-tuples on 0-1 pixels).
    #: fgvc_gluon.data.make_transform(defaults, train) turns these into gluon transforms.
    defaults = {}

    # ---- the contract ------------------------------------------------------------------
    def blocks(self):
        """OrderedDict name -> Block of what a checkpoint holds: ``net`` (subclasses add
        their other parameter-holding blocks by attribute name)."""
        return collections.OrderedDict([("net", self.net)])

    def transform(self, train):
        """H×W×3 uint8 image -> 3×S×S float32 network input (see ``defaults``)."""
        return make_transform(self.defaults, train)

    def training_loss(self, data, label, index, epoch):
        """Per-sample loss (N,) of one device slice, inside ``autograd.record()``.

        data: N×3×S×S float32; label: (N,) class indices (any numeric dtype);
        index: (N,) dataset indices or None (unused); epoch: 0-based.
        """
        raise NotImplementedError

    def predict(self, data, epoch):
        """Evaluation logits: ordered dict branch name -> N×K (main branch first)."""
        raise NotImplementedError

    def evaluate(self, batches, epoch):
        """{'top1': main branch's accuracy} (+ 'top1_<branch>' per branch when several)."""
        return accuracy_metrics(top1_accuracies(self, batches, epoch)[0])

    def test_report(self, batches, epoch, out=sys.stdout):
        """Print the test accuracies to ``out`` (the runtime prints which model, epoch and
        split first); returns :meth:`evaluate`'s dict plus ``images``."""
        accuracies, count = top1_accuracies(self, batches, epoch)
        print_test(accuracies, count, out=out)
        return dict(accuracy_metrics(accuracies), images=count)

    def inference_block(self, epoch):
        """N×3×S×S normalised images -> N×K logits of the main branch (``predict``'s first
        entry); subclasses return ``InferenceBranch(fn, *blocks)``."""
        return None

    def export_info(self):
        """Sidecar: the evaluation transform of ``defaults`` and the main branch's logits."""
        d = self.defaults
        return {"input": {"size": int(d["image_size"]), "channel_order": "RGB", "layout": "NCHW",
                          "dtype": "float32", "resize": eval_resize_text(d),
                          "preprocess": eval_resize_steps(d),
                          "normalization": {"scale": 1.0 / 255, "mean": list(d.get("mean")),
                                            "std": list(d.get("std")),
                                            "formula": "x = (pixel / 255 - mean) / std"}},
                "output": {"name": next(iter(self.output_names())), "activation": "logits (no softmax)",
                           "meaning": "per class, the logit of the main branch; softmax gives the "
                                      "class probabilities, argmax the predicted class; labels = "
                                      "class names"}}

    def output_names(self):
        """The branch names of ``predict`` (main first)."""
        return getattr(self, "BRANCHES", ("classifier",))

    # ---- helpers -----------------------------------------------------------------------
    @staticmethod
    def class_labels(label):
        """Class indices as float32 (what the losses and ``pick`` expect): (N,) -> (N,)."""
        return label.astype("float32", copy=False)

    def loss_blocks(self):
        """Blocks outside ``blocks()`` that the loss runs (e.g. the cross entropy);
        hybridized with the networks. Declared by each method."""
        return ()

    def hybridize(self):
        """Hybridize ``blocks()`` and ``loss_blocks()`` (recursive: a plain Block's
        HybridBlock children are hybridized) with static memory and shapes: the
        input shapes are fixed by --image-size and --batch-size, so each graph's
        memory is planned once (a smaller last batch, an evaluation or S3N's
        deferred shapes plan again for their shapes; the numbers do not change:
        tests/test_stalls.py)."""
        for block in list(self.blocks().values()) + list(self.loss_blocks()):
            block.hybridize(static_alloc=True, static_shape=True)
