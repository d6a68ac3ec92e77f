"""Gluon model-zoo backbones: the one place that names and builds them.

- :data:`BACKBONES`: the model-zoo networks whose ``features`` end in a pooled
  (or fully connected) vector, N×3×S×S -> N×F (baseline, center loss);
  :data:`RESNET_BACKBONES` the ResNets among them (S3N needs the N×F×h×w
  maps of the last stage).
- :func:`model_zoo_network`: a model-zoo network by name; ValueError for an
  unknown name, UserError when ImageNet weights cannot be loaded (a file or
  network problem of the environment, worded for the command line: "--pretrained:
  ... put them in ~/.mxnet/models").
- :func:`initialize_new_layers`, :func:`classifier_network`: new layers on a
  (pretrained or not) network, initialised with :data:`NEW_LAYER_INIT`.
"""
import mxnet as mx
from mxnet.gluon import nn
from mxnet.gluon.model_zoo import vision

from training_runtime.errors import UserError

__all__ = ["BACKBONES", "RESNET_BACKBONES", "NEW_LAYER_INIT", "model_zoo_network",
           "initialize_new_layers", "classifier_network", "check_backbone"]

#: model-zoo networks whose ``features`` end in a pooled (or fully connected) vector
BACKBONES = tuple(
    ["resnet%d_v%d" % (depth, version) for version in (1, 2) for depth in (18, 34, 50, 101, 152)]
    + ["densenet%d" % depth for depth in (121, 161, 169, 201)]
    + ["vgg%d%s" % (depth, bn) for depth in (11, 13, 16, 19) for bn in ("", "_bn")]
    + ["mobilenet%s" % m for m in ("0.25", "0.5", "0.75", "1.0")]
    + ["mobilenetv2_%s" % m for m in ("0.25", "0.5", "0.75", "1.0")]
    + ["inceptionv3", "alexnet"])
#: the ResNets of :data:`BACKBONES`
RESNET_BACKBONES = tuple(name for name in BACKBONES if name.startswith("resnet"))
#: initialiser of every new layer (and of a backbone trained from scratch)
NEW_LAYER_INIT = mx.init.Xavier()


def check_backbone(backbone, choices, owner=None):
    """ValueError naming the argument unless ``backbone`` is one of ``choices``."""
    if not isinstance(backbone, str) or backbone not in choices:
        raise ValueError("backbone: expected one of %s%s, got %r"
                         % (", ".join(choices), " for %s" % owner if owner else "", backbone))
    return backbone


def model_zoo_network(backbone, pretrained=False):
    """Gluon model-zoo network ``backbone`` (ImageNet weights if ``pretrained``),
    not initialised unless pretrained.

    ValueError for a name outside :data:`BACKBONES`; UserError when the
    weights cannot be downloaded or read.
    """
    check_backbone(backbone, BACKBONES)
    try:
        return vision.get_model(backbone, pretrained=pretrained)
    except Exception as err:  # a download failure surfaces as many error types
        if not pretrained:
            raise
        raise UserError("--pretrained: could not load the model-zoo weights of %s (%s: %s); "
                        "put them in ~/.mxnet/models or train without --pretrained"
                        % (backbone, type(err).__name__, str(err).splitlines()[0] if str(err) else ""))


def features_without_pool(network):
    """``network.features`` (a model-zoo ResNet) without its trailing global pool / flatten:
    a HybridSequential of the same layers (same parameters and names), N×3×S×S → N×F×h×w."""
    layers = list(network.features)
    while layers and isinstance(layers[-1], (nn.GlobalAvgPool2D, nn.Flatten)):
        layers.pop()
    features = nn.HybridSequential(prefix="")
    for layer in layers:
        features.add(layer)
    return features


def initialize_new_layers(net, new_layers, pretrained, ctx=None):
    """Initialise ``new_layers`` (all of ``net`` unless ``pretrained``) and put ``net`` on ``ctx``
    (a context or a list; default cpu)."""
    ctx = ctx or mx.cpu()
    if pretrained:
        net.collect_params().reset_ctx(ctx)
        for layer in new_layers:
            layer.initialize(NEW_LAYER_INIT, ctx=ctx)
    else:
        net.initialize(NEW_LAYER_INIT, ctx=ctx)


def classifier_network(num_classes, backbone="resnet50_v1", pretrained=False, ctx=None):
    """Model-zoo ``backbone`` with a new ``output`` Dense(num_classes), initialised on ``ctx``:
    N×3×S×S -> N×num_classes logits."""
    net = model_zoo_network(backbone, pretrained)
    with net.name_scope():
        net.output = nn.Dense(num_classes, prefix="new_output_")
    initialize_new_layers(net, [net.output], pretrained, ctx)
    return net
