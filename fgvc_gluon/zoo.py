"""Model-zoo backbones: the one place that names and builds them, with their ImageNet weights.

- :data:`ZOO`: every model-zoo network a method may use, by name: MXNet Gluon's
  (``mxnet.gluon.model_zoo.vision``: ``resnet*_v1`` / ``_v2``, DenseNets, VGGs,
  MobileNets, Inception v3, AlexNet) and GluonCV's ``resnet*_v1b`` (torchvision's
  ResNet layout: a downsampling bottleneck has its stride in the 3×3 conv, where
  Gluon's ``resnet*_v1`` has it in the first 1×1 conv; the same shapes everywhere).
  :data:`BACKBONES` their names; :data:`RESNET_BACKBONES` the ResNets (S3N needs
  the N×F×h×w maps of the last stage).
- :func:`model_zoo_network`: a model-zoo network by name, seen in MXNet's layout:
  ``features`` (N×3×S×S -> N×F pooled vector) then ``output`` (N×F -> N×1000);
  ImageNet weights with ``pretrained`` (True: the model store, a path: that file,
  checked by :func:`training_runtime.pretrained.load_weights`). ValueError for an
  unknown name, UserError when the weights cannot be found or do not fit.
- :func:`initialize_new_layers`, :func:`classifier_network`: new layers on a
  (pretrained or not) network, initialised with :data:`NEW_LAYER_INIT`.
"""
import mxnet as mx
from mxnet.gluon import HybridBlock, nn
from mxnet.gluon.model_zoo import vision

from training_runtime import pretrained as imagenet
from training_runtime.registry import Registry

__all__ = ["ZOO", "BACKBONES", "RESNET_BACKBONES", "NEW_LAYER_INIT", "ZooEntry", "model_zoo_network",
           "initialize_new_layers", "classifier_network", "check_backbone", "features_without_pool"]


class ZooEntry(object):
    """A model-zoo network: its ``name``, its ``store`` ('mxnet' or 'gluoncv': whose model store
    holds its weights) and ``make()`` -> the uninitialised network in the layout of its weight
    files; ``as_features_output(net)`` -> the same blocks as ``features`` + ``output``."""

    def __init__(self, name, store, make, as_features_output=None):
        self.name, self.store, self.make = name, store, make
        self.as_features_output = as_features_output or (lambda net: net)


class ResNetV1bLayout(HybridBlock):
    """GluonCV's ResNetV1b (torchvision's layout) seen as MXNet's model zoo: ``features`` (its
    conv1 ... layer4, global pool, flatten: N×3×S×S -> N×F) then ``output`` (its ``fc``: N×F ->
    N×1000). The blocks (and their Parameters) are the ResNetV1b's own."""

    def __init__(self, zoo, **kwargs):
        super(ResNetV1bLayout, self).__init__(prefix=zoo.prefix, **kwargs)
        with self.name_scope():
            self.features = nn.HybridSequential(prefix="")
            self.features.add(zoo.conv1, zoo.bn1, zoo.relu, zoo.maxpool, zoo.layer1, zoo.layer2,
                              zoo.layer3, zoo.layer4, zoo.avgpool, zoo.flat)
            self.output = zoo.fc

    def hybrid_forward(self, F, x):
        return self.output(self.features(x))


def _vision(name):
    return lambda: vision.get_model(name)


def _gluoncv_v1b(depth):
    def make():
        from gluoncv.model_zoo import resnetv1b   # imported on use: GluonCV's import is not free
        return getattr(resnetv1b, "resnet%d_v1b" % depth)()
    return make


#: the model-zoo networks, by name (registered below)
ZOO = Registry("model-zoo backbone")
for _name in (["resnet%d_v%d" % (depth, version) for version in (1, 2) for depth in (18, 34, 50, 101, 152)]
              + ["densenet%d" % depth for depth in (121, 161, 169, 201)]
              + ["vgg%d%s" % (depth, bn) for depth in (11, 13, 16, 19) for bn in ("", "_bn")]
              + ["mobilenet%s" % m for m in ("0.25", "0.5", "0.75", "1.0")]
              + ["mobilenetv2_%s" % m for m in ("0.25", "0.5", "0.75", "1.0")]
              + ["inceptionv3", "alexnet"]):
    ZOO.register(ZooEntry(_name, "mxnet", _vision(_name)))
for _depth in (18, 34, 50, 101, 152):
    ZOO.register(ZooEntry("resnet%d_v1b" % _depth, "gluoncv", _gluoncv_v1b(_depth), ResNetV1bLayout))

#: model-zoo networks whose ``features`` end in a pooled (or fully connected) vector
BACKBONES = ZOO.names()
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
    """Model-zoo network ``backbone`` as ``features`` + ``output`` (see the module docstring).

    pretrained: False (not initialised), True (the model store's ImageNet weights) or the
    path of a ``.params`` file in the model zoo's layout; the weights are loaded on the cpu.
    ValueError for a name outside :data:`BACKBONES`; UserError when the weights cannot be
    downloaded, read or do not fit the network.
    """
    check_backbone(backbone, BACKBONES)
    entry = ZOO.get(backbone)
    net = entry.make()
    if pretrained:
        imagenet.load_weights(net, backbone, pretrained, entry.store)
    return entry.as_features_output(net)


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
        for layer in new_layers:
            layer.initialize(NEW_LAYER_INIT, ctx=ctx)
        # after the new layers: reset_ctx refuses a Parameter that is not initialised
        net.collect_params().reset_ctx(ctx)
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
