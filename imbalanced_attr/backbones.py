"""Tap backbones: a model-zoo network that returns three feature maps and new logits.

The original (``models.getResNet``) builds a ``SymbolBlock`` over internal
outputs looked up by name in the symbolic graph of Gluon's ``resnet101_v1``
(SPEC §1.1). Here the same four tensors come from a ``TapBackbone`` composed of
the model-zoo net's own children, split where the taps are:

============  ===============================  ================================
family        tap2 / tap3 / tap4               original's internal names
============  ===============================  ================================
resnet*_v1,   output of unit k of stage 3 /    ``stage3_activation19`` (k = 20
resnet*_v1b   end of stage 3 / end of stage 4  for ResNet-101), ``stage3_
                                               activation22``, ``stage4_
                                               activation2``
densenet201   transition-3 conv (before its    ``conv3`` (``conv3_fwd``),
              2×2 average pool) / output of    ``stage4_concat15``, (none:
              dense layer 16 of block 4 /      the original's DenseNet had
              final BN+ReLU of the features    only two taps)
============  ===============================  ================================

``resnet*_v1b`` are GluonCV's ResNets in torchvision's layout (the stride of a
downsampling bottleneck in its 3×3 conv, not its first 1×1): the same units
per stage, so the same taps and shapes (the original used ``resnet101_v1``).

Logits are a NEW ``Dense(C)`` (Xavier gaussian, factor "in", magnitude 2) on
the globally average-pooled last features, in place of the 1000-way output;
its parameters are named ``dense1_*`` in the original's files.

Because the zoo blocks are reused as they are, their parameter names keep the
zoo prefix (``resnetv1N_…`` / ``densenetN_…``); ``TapBackbone.zoo_prefix``
records it so that ``params_io`` can write the original's names.

Errors: an unknown backbone name, a bad ``num_classes`` or ``input_size``
raise ValueError / TypeError naming the argument; ImageNet weights that cannot
be downloaded, or a ``--pretrained FILE`` that does not fit the network, are a
UserError (``training_runtime.pretrained``).
"""
import functools

import mxnet as mx
from mxnet.base import MXNetError
from mxnet.gluon import HybridBlock, nn
from mxnet.gluon.model_zoo import vision

from training_runtime import pretrained as imagenet
from training_runtime.registry import Registry

# Xavier(gaussian, "in", 2): the initialiser of every new layer in the original.
XAVIER = mx.init.Xavier(rnd_type="gaussian", factor_type="in", magnitude=2)

# tap2 = output of this many units of stage 3 (ResNet-101: the 20th of 23
# bottlenecks, the original's ``stage3_activation19``); the small ResNets use
# a late unit of their stage 3 (2 units for resnet18, 6 for resnet34/50).
RESNET_TAP2_UNITS = {
    "resnet18_v1": 1,
    "resnet34_v1": 5,
    "resnet50_v1": 5,
    "resnet101_v1": 20,
}
# GluonCV's torchvision-layout ResNets: the same units per stage, so the same taps
RESNET_V1B_TAP2_UNITS = {name + "b": units for name, units in RESNET_TAP2_UNITS.items()}
# DenseNet: tap3 = output of this many dense layers of block 4 (the
# original's ``stage4_concat15`` is the concat closing layer 16).
DENSENET_TAP3_LAYERS = {"densenet201": 16}



class TapBackboneEntry(object):
    """A registered tap backbone: its model-zoo ``name``, its ``family`` ('resnet' or
    'densenet': the original's file stem), ``split(zoo)`` -> the three tap parts,
    ``make(prefix=None)`` -> the uninitialised zoo network (the layout of its weight
    files) and ``store`` ('mxnet' or 'gluoncv': whose model store has its ImageNet weights)."""

    def __init__(self, name, family, split, make=None, store="mxnet"):
        self.name, self.family, self.split, self.store = name, family, split, store
        self.make = make or functools.partial(vision.get_model, name)


#: the tap backbones, by model-zoo name (registered below)
TAP_BACKBONES = Registry("tap backbone")
DEFAULT_BACKBONE = "resnet101_v1"


class TapBackbone(HybridBlock):
    """Backbone split at the taps: ``x`` N×3×H×W → ``(tap2, tap3, tap4, logits)``.

    tap2/tap3/tap4 are N×C_k×H_k×W_k feature maps (ResNet-101 at 224:
    1024×14×14, 1024×14×14, 2048×7×7), logits N×num_classes.

    Parameters
    ----------
    family : 'resnet' or 'densenet' (the original's file is ``backbone_<family>.params``).
    to_tap2, to_tap3, to_tap4 : consecutive HybridBlocks of the zoo features.
    num_classes : size of the new output layer.
    zoo_prefix : prefix of the zoo net the parts come from (stripped in the
        original's parameter files).
    """

    def __init__(self, family, to_tap2, to_tap3, to_tap4, num_classes, zoo_prefix, **kwargs):
        super(TapBackbone, self).__init__(**kwargs)
        self.family = family
        self.zoo_prefix = zoo_prefix
        with self.name_scope():
            self.to_tap2 = to_tap2
            self.to_tap3 = to_tap3
            self.to_tap4 = to_tap4
            self.pool = nn.GlobalAvgPool2D()
            # in_units is filled in by complete_param_shapes (1920 / 512 / 2048)
            self.output = nn.Dense(num_classes, flatten=True)

    def hybrid_forward(self, F, x):
        tap2 = self.to_tap2(x)
        tap3 = self.to_tap3(tap2)
        tap4 = self.to_tap4(tap3)
        logits = self.output(self.pool(tap4))
        return tap2, tap3, tap4, logits


def _sequence(blocks):
    """A HybridSequential (adding no name prefix) over existing blocks."""
    seq = nn.HybridSequential(prefix="")
    seq.add(*blocks)
    return seq


def _children(block):
    return list(block._children.values())


def _resnet_parts(zoo, tap2_units):
    """Split a zoo ResNet v1: features = [conv, bn, relu, pool, stage1..4, gap]."""
    layers = _children(zoo.features)
    assert len(layers) == 9, "unexpected model-zoo ResNet layout (%d feature blocks)" % len(layers)
    stage3_units = _children(layers[6])
    assert 0 < tap2_units < len(stage3_units)
    to_tap2 = _sequence(layers[:6] + stage3_units[:tap2_units])
    to_tap3 = _sequence(stage3_units[tap2_units:])
    to_tap4 = layers[7]
    return to_tap2, to_tap3, to_tap4


def _densenet_parts(zoo, tap3_layers):
    """Split a zoo DenseNet: features = [conv, bn, relu, pool, block1, trans1,
    block2, trans2, block3, trans3, block4, bn, relu, avgpool7, flatten]; a
    transition is [bn, relu, conv, avgpool2].

    The zoo's AvgPool2D(7)+Flatten is replaced by a global average pool (the
    same at 224×224, and valid at any input size).
    """
    layers = _children(zoo.features)
    assert len(layers) == 15, "unexpected model-zoo DenseNet layout (%d feature blocks)" % len(layers)
    transition3 = _children(layers[9])
    block4 = _children(layers[10])
    assert 0 < tap3_layers < len(block4)
    to_tap2 = _sequence(layers[:9] + transition3[:3])
    to_tap3 = _sequence(transition3[3:] + block4[:tap3_layers])
    to_tap4 = _sequence(block4[tap3_layers:] + layers[11:13])
    return to_tap2, to_tap3, to_tap4


def _resnet_v1b_parts(zoo, tap2_units):
    """Split a GluonCV ResNetV1b: [conv1, bn1, relu, maxpool, layer1..4, avgpool, flat, fc]."""
    stage3_units = _children(zoo.layer3)
    assert 0 < tap2_units < len(stage3_units)
    to_tap2 = _sequence([zoo.conv1, zoo.bn1, zoo.relu, zoo.maxpool, zoo.layer1, zoo.layer2]
                        + stage3_units[:tap2_units])
    return to_tap2, _sequence(stage3_units[tap2_units:]), zoo.layer4


def _make_v1b(name, prefix=None):
    """GluonCV's ``name`` (its parameters are always prefixed ``resnetv1b_``)."""
    from gluoncv.model_zoo import resnetv1b  # imported on use
    return getattr(resnetv1b, name)()


for _name, _units in sorted(RESNET_TAP2_UNITS.items()):
    TAP_BACKBONES.register(TapBackboneEntry(_name, "resnet", functools.partial(_resnet_parts, tap2_units=_units)))
for _name, _units in sorted(RESNET_V1B_TAP2_UNITS.items()):
    TAP_BACKBONES.register(TapBackboneEntry(_name, "resnet", functools.partial(_resnet_v1b_parts, tap2_units=_units),
                                            make=functools.partial(_make_v1b, _name), store="gluoncv"))
for _name, _layers in sorted(DENSENET_TAP3_LAYERS.items()):
    TAP_BACKBONES.register(TapBackboneEntry(_name, "densenet",
                                            functools.partial(_densenet_parts, tap3_layers=_layers)))
BACKBONES = TAP_BACKBONES.names()


def _as_context_list(ctx):
    if ctx is None:
        return [mx.cpu()]
    return list(ctx) if isinstance(ctx, (list, tuple)) else [ctx]


def complete_param_shapes(block, data_shape):
    """Infer the shapes of ``block`` symbolically for an input of ``data_shape``.

    Fills in the unknown (deferred) dimensions of the block's parameters, so
    that ``initialize`` allocates them at once, and returns the list of output
    shapes. No data is computed. Raises ``MXNetError`` if the input is too
    small for the network.
    """
    data = mx.sym.var("data")
    out = block(data)
    if isinstance(out, (list, tuple)):
        out = mx.sym.Group(list(out))
    arg_shapes, out_shapes, aux_shapes = out.infer_shape(data=data_shape)
    params = block.collect_params()
    names = out.list_arguments() + out.list_auxiliary_states()
    for name, shape in zip(names, arg_shapes + aux_shapes):
        if name in params:
            params[name].shape = shape
    return [tuple(s) for s in out_shapes]


def _check_positive_int(value, name):
    """TypeError unless ``value`` is an int (not a bool), ValueError unless it is >= 1."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError("%s: expected a positive integer, got %r" % (name, value))
    if value < 1:
        raise ValueError("%s: expected a positive integer, got %r" % (name, value))


def get_backbone(name, num_classes, pretrained=False, ctx=None):
    """Build the tap backbone ``name`` (one of ``BACKBONES``), initialised on ``ctx``.

    pretrained: True loads the model store's ImageNet weights (cached in
    $MXNET_HOME/models, default ~/.mxnet/models, or downloadable), a path loads
    that ``.params`` file of the model zoo's layout (checked names and shapes,
    :func:`training_runtime.pretrained.load_weights`; a UserError otherwise);
    False: the zoo layers are initialised Xavier(gaussian, "in", 2) like the
    new layers. The new output layer is always initialised Xavier(gaussian, "in", 2).
    """
    if name not in TAP_BACKBONES:
        raise ValueError("backbone: unknown backbone %r, expected one of %s"
                         % (name, ", ".join(BACKBONES)))
    entry = TAP_BACKBONES.get(name)
    _check_positive_int(num_classes, "num_classes")
    contexts = _as_context_list(ctx)
    zoo = entry.make()
    if pretrained:
        imagenet.load_weights(zoo, name, pretrained, entry.store, ctx=contexts)
    backbone = TapBackbone(entry.family, *entry.split(zoo), num_classes=num_classes,
                           zoo_prefix=zoo.prefix)
    # channel counts do not depend on the spatial size: any valid size will do
    complete_param_shapes(backbone, (1, 3, 224, 224))
    if not pretrained:
        backbone.collect_params().initialize(XAVIER, ctx=contexts)
    else:
        backbone.output.collect_params().initialize(XAVIER, ctx=contexts)
    return backbone


def tap_shapes(backbone, input_size):
    """[(C, H, W)] of tap2, tap3, tap4 for a square input of side ``input_size``."""
    _check_positive_int(input_size, "input_size")
    try:
        shapes = complete_param_shapes(backbone, (1, 3, input_size, input_size))
    except MXNetError:
        shapes = None
    if shapes is None or any(min(s[1:]) < 1 for s in shapes[:3]):
        raise ValueError("input_size: %d is too small for this backbone (its stage-4 tap would be "
                         "empty); expected a larger input_size" % input_size)
    return [s[1:] for s in shapes[:3]]
