"""The 'baseline' method: a Gluon model-zoo network fine-tuned with a new output layer.

There is no single upstream for a plain fine-tuned classifier; we follow the
baseline that S3N ships (``Yao-DD/S3N`` demo/cub_baseline.yml), so that the
baseline and S3N are trained alike: ResNet-50 (torchvision's layout, GluonCV's
``resnet50_v1b``, as upstream; ``--backbone resnet50_v1`` for Gluon's) at 448×448, SGD momentum 0.9,
wd 1e-4, batch 16, 30 epochs, base lr 0.001 with lr ×10 for the new
classifier, lr ×0.1 from epoch 20, train random-resized crop (scale 0.5–1)
plus flip, ImageNet mean/std (:data:`RECIPE`). The loss is S3N's ``smooth_loss`` (label smoothing,
``smooth_ratio`` 0.85, :func:`fgvc_gluon.losses.smooth_loss`; upstream's fails
for a batch of one, S3N-15, ours does not); ``smooth_ratio=None`` (the
``--smooth-ratio 1`` of the command line) trains with plain softmax cross
entropy instead, the same numbers as a ratio of 1.

Shapes: images N×3×S×S -> ``net`` -> N×K logits (one branch, ``classifier``);
training_loss -> (N,).

``defaults`` keys are those documented in :class:`fgvc_gluon.task.FGVCTask` (lr,
momentum, wd, batch_size, epochs, lr_steps, lr_factor, image_size, resize,
train_crop, crop_scale, pad, flip, mean, std), the same keys as the mcloss and
center_loss methods.

The model-zoo helpers live in :mod:`fgvc_gluon.zoo`; ``BACKBONES``,
``model_zoo_network``, ``initialize_new_layers`` and ``classifier_network``
are re-exported here under their old import path.
"""
from collections import OrderedDict

from mxnet import gluon

from training_runtime.images import IMAGENET_MEAN, IMAGENET_STD

from .data import s3n_test_resize
from .losses import SMOOTH_RATIO, smooth_loss, smooth_ratio_knob
from .registry import register_method
from .task import FGVCTask, InferenceBranch, ParamGroup, check_int, check_num_classes, optimisation_defaults
from .zoo import (BACKBONES, NEW_LAYER_INIT, check_backbone, classifier_network,
                  initialize_new_layers, model_zoo_network)

__all__ = ["RECIPE", "BaselineMethod", "build_method",
           # re-exported from fgvc_gluon.zoo (their old import path)
           "BACKBONES", "NEW_LAYER_INIT", "model_zoo_network", "initialize_new_layers",
           "classifier_network"]

#: upstream settings (S3N's cub_baseline.yml) as run-definition fields
RECIPE = dict(backbone="resnet50_v1b", image_size=448, lr=0.001, momentum=0.9, wd=1e-4, batch_size=16,
              epochs=30, schedule="step", lr_steps=[20], lr_factor=0.1)


class BaselineMethod(FGVCTask):
    """Softmax cross entropy (S3N's smoothed one) on a fine-tuned model-zoo network.

    Two Trainers: ``backbone`` (lr × 1) and ``classifier`` (the new output, lr × 10).
    """

    name = "baseline"

    def __init__(self, net, image_size, smooth_ratio=SMOOTH_RATIO):
        self.net = net
        self.smooth_ratio = smooth_ratio
        self._ce = gluon.loss.SoftmaxCrossEntropyLoss()
        self.defaults = dict(
            optimisation_defaults(RECIPE),
            image_size=image_size, resize=s3n_test_resize(image_size), train_crop="random_resized",
            crop_scale=(0.5, 1.0), pad=0, flip=True, mean=IMAGENET_MEAN, std=IMAGENET_STD)

    def loss_blocks(self):
        return (self._ce,)

    def param_groups(self):
        return [ParamGroup("backbone", self.net.features.collect_params()),
                ParamGroup("classifier", self.net.output.collect_params(), lr_mult=10.0)]

    def training_loss(self, data, label, index, epoch):
        """Per-sample loss (N,): S3N's label-smoothed cross entropy, or plain CE."""
        label = self.class_labels(label)
        logits = self.net(data)
        if self.smooth_ratio is None:
            return self._ce(logits, label)
        return smooth_loss(logits, label, self.smooth_ratio)

    def predict(self, data, epoch):
        return OrderedDict([("classifier", self.net(data))])

    def inference_block(self, epoch):
        return InferenceBranch(lambda F, x, net: net(x), self.net, prefix="exported_")

    def pictures(self, batches, directory, epoch):
        """RUN/pictures/cam_epoch<N>.png: class activation maps of the true and the predicted class
        (:mod:`fgvc_gluon.pictures`)."""
        from .pictures import cam_pictures
        return cam_pictures(self, batches, directory, epoch)


def build_method(num_classes, backbone=RECIPE["backbone"], image_size=RECIPE["image_size"],
                 pretrained=False, ctx=None, smooth_ratio=SMOOTH_RATIO):
    """Baseline method: ``backbone`` from BACKBONES with a new num_classes output, initialised on ``ctx``.

    smooth_ratio: S3N baseline's label smoothing (0.85), in [0, 1]; None for
    plain cross entropy.
    """
    num_classes = check_num_classes(num_classes, "baseline")
    check_backbone(backbone, BACKBONES, "baseline")
    if smooth_ratio is not None and not 0.0 <= float(smooth_ratio) <= 1.0:
        raise ValueError("smooth_ratio: expected a value in [0, 1] or None, got %r" % (smooth_ratio,))
    image_size = check_int(image_size, "image_size", minimum=1)
    return BaselineMethod(classifier_network(num_classes, backbone, pretrained, ctx), image_size,
                          smooth_ratio)


register_method(
    "baseline", build_method,
    knobs=[smooth_ratio_knob()],
    recipe=RECIPE,
    demo=dict(backbone="resnet18_v1", image_size=32, lr=0.0005),
    pretrained=True,
    backbones=BACKBONES,
    summary="fine-tuned model-zoo classifier (S3N's baseline: ResNet-50, smoothed CE, new output x10 lr)")
