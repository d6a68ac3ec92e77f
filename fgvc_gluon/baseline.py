"""The 'baseline' method: a Gluon model-zoo network fine-tuned with a new output layer.

There is no single upstream for a plain fine-tuned classifier; we follow the
baseline that S3N ships (``Yao-DD/S3N`` demo/cub_baseline.yml), so that the
baseline and S3N are trained alike: ResNet-50 at 448×448, SGD momentum 0.9,
wd 1e-4, batch 16, 30 epochs, base lr 0.001 with lr ×10 for the new
classifier, lr ×0.1 from epoch 20, train random-resized crop (scale 0.5–1)
plus flip, ImageNet mean/std. The loss is S3N's ``smooth_loss`` (label smoothing,
``smooth_ratio`` 0.85, :func:`fgvc_gluon.s3n.smooth_loss`; upstream's fails
for a batch of one, S3N-15, ours does not); ``smooth_ratio=None`` trains with
plain softmax cross entropy instead.

``defaults`` keys are those documented in :mod:`fgvc_gluon.method` (lr,
momentum, wd, batch_size, epochs, lr_steps, lr_factor, image_size, resize,
train_crop, crop_scale, pad, flip, mean, std), the same keys as the mcloss and
center_loss methods.

:func:`model_zoo_network` is the one place that builds a model-zoo backbone
(center_loss uses it too): it validates the name and turns a failed weight
download into a UserError.
"""
from collections import OrderedDict

import mxnet as mx
from mxnet import gluon
from mxnet.gluon import nn
from mxnet.gluon.model_zoo import vision

from training_runtime.errors import UserError
from training_runtime.images import IMAGENET_MEAN, IMAGENET_STD

from .data import s3n_test_resize
from .s3n import smooth_loss
from .method import FGVCMethod, ParamGroup

# model-zoo networks whose ``features`` end in a pooled (or fully connected) vector
BACKBONES = tuple(
    ["resnet%d_v%d" % (depth, version) for version in (1, 2) for depth in (18, 34, 50, 101, 152)]
    + ["densenet%d" % depth for depth in (121, 161, 169, 201)]
    + ["vgg%d%s" % (depth, bn) for depth in (11, 13, 16, 19) for bn in ("", "_bn")]
    + ["mobilenet%s" % m for m in ("0.25", "0.5", "0.75", "1.0")]
    + ["mobilenetv2_%s" % m for m in ("0.25", "0.5", "0.75", "1.0")]
    + ["inceptionv3", "alexnet"])
NEW_LAYER_INIT = mx.init.Xavier()


def model_zoo_network(backbone, pretrained=False):
    """Gluon model-zoo network ``backbone`` (ImageNet weights if ``pretrained``), not initialised unless pretrained."""
    if backbone not in BACKBONES:
        raise UserError("--backbone: expected one of %s, got %r" % (", ".join(BACKBONES), backbone))
    try:
        return vision.get_model(backbone, pretrained=pretrained)
    except Exception as err:  # a download failure surfaces as many error types
        if not pretrained:
            raise
        raise UserError("--pretrained: could not load the model-zoo weights of %s (%s: %s); "
                        "put them in ~/.mxnet/models or train without --pretrained"
                        % (backbone, type(err).__name__, str(err).splitlines()[0] if str(err) else ""))


def initialize_new_layers(net, new_layers, pretrained, ctx=None):
    """Initialise ``new_layers`` (all of ``net`` unless ``pretrained``) and put ``net`` on ``ctx``."""
    ctx = ctx or mx.cpu()
    if pretrained:
        net.collect_params().reset_ctx(ctx)
        for layer in new_layers:
            layer.initialize(NEW_LAYER_INIT, ctx=ctx)
    else:
        net.initialize(NEW_LAYER_INIT, ctx=ctx)


def classifier_network(num_classes, backbone="resnet50_v1", pretrained=False, ctx=None):
    """Model-zoo ``backbone`` with a new ``output`` Dense(num_classes), initialised on ``ctx``."""
    net = model_zoo_network(backbone, pretrained)
    with net.name_scope():
        net.output = nn.Dense(num_classes, prefix="new_output_")
    initialize_new_layers(net, [net.output], pretrained, ctx)
    return net


class BaselineMethod(FGVCMethod):
    """Softmax cross entropy on a fine-tuned model-zoo network.

    Two Trainers: ``backbone`` (lr × 1) and ``classifier`` (the new output, lr × 10).
    """

    name = "baseline"

    def __init__(self, net, image_size, smooth_ratio=0.85):
        self.net = net
        self.smooth_ratio = smooth_ratio
        self._ce = gluon.loss.SoftmaxCrossEntropyLoss()
        self.defaults = dict(
            lr=0.001, momentum=0.9, wd=1e-4, batch_size=16, epochs=30,
            lr_steps=[20], lr_factor=0.1,
            image_size=image_size, resize=s3n_test_resize(image_size), train_crop="random_resized", crop_scale=(0.5, 1.0),
            pad=0, flip=True, mean=IMAGENET_MEAN, std=IMAGENET_STD)

    def param_groups(self):
        return [ParamGroup("backbone", self.net.features.collect_params()),
                ParamGroup("classifier", self.net.output.collect_params(), lr_mult=10.0)]

    def training_loss(self, data, label, epoch):
        """Per-sample loss (N,): S3N's label-smoothed cross entropy, or plain CE."""
        logits = self.net(data)
        if self.smooth_ratio is None:
            return self._ce(logits, label)
        return smooth_loss(logits, label, self.smooth_ratio)

    def predict(self, data, epoch):
        return OrderedDict([("classifier", self.net(data))])


def build_method(num_classes, backbone="resnet50_v1", image_size=448, pretrained=False, ctx=None,
                 smooth_ratio=0.85):
    """Baseline method: ``backbone`` from BACKBONES with a new num_classes output, initialised on ``ctx``.

    smooth_ratio: S3N baseline's label smoothing (0.85); None for plain cross entropy.
    """
    if int(num_classes) < 2:
        raise UserError("baseline: expected at least 2 classes, got %d" % num_classes)
    return BaselineMethod(classifier_network(int(num_classes), backbone, pretrained, ctx), int(image_size),
                          smooth_ratio)
