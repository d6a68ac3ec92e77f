"""The attention-aggregation attribute model (SPEC §1.1, §1.2).

Per tap ("stage" 2, 3, 4 in the original) three heads:

- ``fconv``: Conv1×1→C, sigmoid (attention confidence), N×C×H×W;
- ``fatt``: Conv1×1→512, BN, ReLU; Conv3×3 pad 1→512, BN, ReLU; Conv1×1→C,
  whose C maps are soft-maxed over their H·W positions (``spatial_softmax``);
- ``fsr``: on the attended features ``spatial_softmax(fatt) ⊙ fconv``:
  Conv1×1→256, BN, ReLU; Conv1×1→512, BN, ReLU; Conv k×k (no padding, k = the
  tap's spatial size)→1024, BN, ReLU; Dense(C) → the stage score N×C.

The prediction aggregates the three stage scores and the backbone logits:
σ(0.25·(s₂+s₃+s₄+logits)). Every new layer is initialised
Xavier(gaussian, "in", 2), as in the original's ``models.py``.

Wrong shapes and arguments raise ValueError or TypeError naming the argument
(:func:`spatial_softmax`, and the backbone checks of
:func:`imbalanced_attr.backbones.get_backbone` / ``tap_shapes``).
"""
from collections import OrderedDict

import mxnet as mx
import numpy as np
from mxnet.gluon import HybridBlock, nn

from .backbones import DEFAULT_BACKBONE, XAVIER, get_backbone, tap_shapes

STAGES = (2, 3, 4)


def _namespace_and_array(x, F):
    """(F, x, to_output) for an NDArray, a numpy array or (with F given) a Symbol."""
    if F is not None:
        return F, x, lambda y: y
    if isinstance(x, mx.nd.NDArray):
        return mx.nd, x, lambda y: y
    if isinstance(x, mx.sym.Symbol):
        return mx.sym, x, lambda y: y
    array = np.asarray(x)
    if array.dtype.kind != "f":
        array = array.astype(np.float32)
    return mx.nd, mx.nd.array(array, dtype=array.dtype), lambda y: y.asnumpy()


def spatial_softmax(x, F=None):
    """Softmax of every N×C map over its H·W positions: N×C×H×W → N×C×H×W.

    ``x`` is an NDArray, a numpy array (the result is then numpy) or, inside a
    ``hybrid_forward``, an NDArray/Symbol with ``F`` the namespace. Works for
    non-square maps. Same numerics as the original's
    ``nd.softmax(reshape(x, (N·C, H·W)))`` (quirk IL-14).
    """
    F, x, to_output = _namespace_and_array(x, F)
    if hasattr(x, "ndim") and x.ndim != 4:
        raise ValueError("spatial_softmax: x: expected an N×C×H×W array, got shape %s"
                         % (tuple(x.shape),))
    flat = F.reshape(x, shape=(0, 0, -1))  # N×C×(H·W)
    return to_output(F.reshape_like(F.softmax(flat, axis=-1), x))


def _float32(x, F):
    """``x`` at least float32: a float16 NDArray cast to float32, float32/float64 ones
    unchanged (no copy, no numeric change); a Symbol gets a Cast to float32 (an identity
    on the float32 graphs that are exported)."""
    if isinstance(x, mx.nd.NDArray):
        return x.astype("float32") if x.dtype == np.float16 else x
    return F.cast(x, dtype="float32")


def aggregate_prediction(logits, stage_scores, F=None):
    """σ(0.25·(s₂+s₃+s₄+logits)): N×C probabilities from the backbone logits
    (N×C) and the list of stage scores (three N×C). NDArrays, numpy arrays
    (numpy result) or, with ``F``, Symbols.

    Computed in float32 when the inputs are float16 (--amp: the Dense layers run in
    float16 and amp leaves ``sigmoid`` in its input's type, so the probabilities would
    be float16, with every p > 0.9995 equal to 1.0, and the mAP, the plateau rule and
    the best checkpoint would be decided on those ties)."""
    F, logits, to_output = _namespace_and_array(logits, F)
    if F is mx.nd:
        stage_scores = [s if isinstance(s, mx.nd.NDArray) else mx.nd.array(s, dtype=logits.dtype)
                        for s in stage_scores]
    total = F.add_n(*[_float32(s, F) for s in stage_scores]) + _float32(logits, F)
    return to_output(F.sigmoid(0.25 * total))


def make_fconv(num_classes, in_channels):
    """fconv: Conv1×1→C, sigmoid. N×in_channels×H×W → N×C×H×W in (0, 1)."""
    net = nn.HybridSequential(prefix="fconv_")
    with net.name_scope():
        net.add(nn.Conv2D(num_classes, kernel_size=1, in_channels=in_channels))
        net.add(nn.Activation("sigmoid"))
    return net


class WholeInputConv2D(nn.Conv2D):
    """A k×k "valid" Conv2D whose kernel covers its whole k×k input, computed as
    one matrix product: N×in×k×k → N×channels×1×1.

    Same Parameter as ``nn.Conv2D`` (name ``..._weight``, shape
    (channels, in, k, k), and the bias): the weight is reshaped to
    (channels, in·k·k) inside ``hybrid_forward`` and ``FullyConnected`` runs on
    the flattened input, which is the convolution's sum in another order
    (float32 round-off only). Only valid when the input is exactly k×k (the fsr
    layer's case, checked by the shapes: FullyConnected fails otherwise).
    """

    def hybrid_forward(self, F, x, weight, bias=None):
        flat_weight = F.reshape(weight, shape=(0, -1))  # channels × (in·k·k)
        out = F.FullyConnected(x, flat_weight, bias, no_bias=bias is None,
                               num_hidden=self._channels, flatten=True)
        return F.reshape(out, shape=(0, 0, 1, 1))


def _conv_bn_relu(net, channels, kernel_size, in_channels, padding=0, whole_input=False):
    layer = WholeInputConv2D if whole_input else nn.Conv2D
    net.add(layer(channels, kernel_size=kernel_size, padding=padding, in_channels=in_channels))
    net.add(nn.BatchNorm(in_channels=channels))
    net.add(nn.Activation("relu"))


def make_fatt(num_classes, in_channels):
    """fatt: Conv1×1→512,BN,ReLU; Conv3×3 pad 1→512,BN,ReLU; Conv1×1→C.
    N×in_channels×H×W → N×C×H×W attention logits."""
    net = nn.HybridSequential(prefix="fatt_")
    with net.name_scope():
        _conv_bn_relu(net, 512, 1, in_channels)
        _conv_bn_relu(net, 512, 3, 512, padding=1)
        net.add(nn.Conv2D(num_classes, kernel_size=1, in_channels=512))
    return net


def make_fsr(num_classes, kernel_size, fast=True):
    """fsr: Conv1×1→256,BN,ReLU; Conv1×1→512,BN,ReLU; Conv k×k→1024,BN,ReLU;
    Dense(C). N×C×H×W attended features (k = (H, W)) → N×C stage scores.

    ``fast`` computes the k×k convolution (which covers its whole input) as
    one matrix product over the same parameter (:class:`WholeInputConv2D`);
    ``fast=False`` is the plain ``nn.Conv2D``. Same parameter names and shapes."""
    net = nn.HybridSequential(prefix="fsr_")
    with net.name_scope():
        _conv_bn_relu(net, 256, 1, num_classes)
        _conv_bn_relu(net, 512, 1, 256)
        _conv_bn_relu(net, 1024, kernel_size, 512, whole_input=fast)
        net.add(nn.Dense(num_classes, flatten=True, in_units=1024))
    return net


class StageHeads(HybridBlock):
    """fconv, fatt and fsr of one tap: N×C_tap×H×W → stage score N×C."""

    def __init__(self, num_classes, tap_shape, fast=True, **kwargs):
        super(StageHeads, self).__init__(**kwargs)
        channels, height, width = tap_shape
        with self.name_scope():
            self.fconv = make_fconv(num_classes, channels)
            self.fatt = make_fatt(num_classes, channels)
            self.fsr = make_fsr(num_classes, (height, width), fast=fast)

    def hybrid_forward(self, F, tap):
        attended = spatial_softmax(self.fatt(tap), F) * self.fconv(tap)
        return self.fsr(attended)


class AttributeModel(HybridBlock):
    """Backbone with three attention-head stages.

    ``net(x)``, x N×3×S×S (S = input_size) → ``(logits, [s2, s3, s4])``, all
    N×num_classes: the backbone's new classifier and the fsr outputs of the
    three taps. ``aggregate_prediction(logits, stage_scores)`` is the model's
    prediction. All parameters are initialised at construction on ``ctx``
    (a Context or a list; default cpu), zoo layers from ImageNet weights when
    ``pretrained``.

    ``net.backbone`` is the tap backbone; ``net.blocks()`` the original's
    blocks by file stem (one Trainer each in the original).

    ``fast_heads`` (default True) computes the fsr k×k convolutions as matrix
    products over the same parameters (:class:`WholeInputConv2D`); False is
    the plain ``nn.Conv2D`` path (same names, shapes and files; equal numbers
    within float32 round-off, tests/test_fast_path.py).
    """

    def __init__(self, num_classes, backbone=DEFAULT_BACKBONE, input_size=224, pretrained=False,
                 ctx=None, fast_heads=True, **kwargs):
        super(AttributeModel, self).__init__(**kwargs)
        self.num_classes = num_classes
        self.input_size = input_size
        ctx = [mx.cpu()] if ctx is None else ctx
        with self.name_scope():
            self.backbone = get_backbone(backbone, num_classes, pretrained=pretrained, ctx=ctx)
            shapes = tap_shapes(self.backbone, input_size)
            self.stage_2 = StageHeads(num_classes, shapes[0], fast=fast_heads,
                                      prefix="stage2_")
            self.stage_3 = StageHeads(num_classes, shapes[1], fast=fast_heads,
                                      prefix="stage3_")
            self.stage_4 = StageHeads(num_classes, shapes[2], fast=fast_heads,
                                      prefix="stage4_")
        for stage in self.stage_heads():
            stage.collect_params().initialize(XAVIER, ctx=ctx)

    def stage_heads(self):
        """[StageHeads of stage 2, 3, 4]."""
        return [self.stage_2, self.stage_3, self.stage_4]

    def blocks(self):
        """OrderedDict file stem → Block: 'backbone_resnet' (or 'backbone_densenet'),
        then 'fconv_stage_N', 'fatt_stage_N', 'fsr_stage_N' for N = 2, 3, 4."""
        blocks = OrderedDict([("backbone_" + self.backbone.family, self.backbone)])
        for number, stage in zip(STAGES, self.stage_heads()):
            blocks["fconv_stage_%d" % number] = stage.fconv
            blocks["fatt_stage_%d" % number] = stage.fatt
            blocks["fsr_stage_%d" % number] = stage.fsr
        return blocks

    def attention_maps(self, x):
        """What each stage attends to, computed as :meth:`hybrid_forward` does (NDArrays).

        x: N×3×S×S. Returns ``(logits, scores, maps)``: logits and the three
        stage scores (N×C each, equal to ``net(x)``'s) and, per stage 2, 3, 4,
        a dict with ``softmax`` (``spatial_softmax(fatt(tap))``, N×C×h×w, each
        map summing to 1), ``confidence`` (``fconv(tap)``, N×C×h×w in (0, 1))
        and ``attention`` (their product, the fsr input), h×w the tap's size.
        """
        tap2, tap3, tap4, logits = self.backbone(x)
        scores, maps = [], []
        for stage, tap in zip(self.stage_heads(), (tap2, tap3, tap4)):
            softmax = spatial_softmax(stage.fatt(tap))
            confidence = stage.fconv(tap)
            attention = softmax * confidence
            scores.append(stage.fsr(attention))
            maps.append({"softmax": softmax, "confidence": confidence, "attention": attention})
        return logits, scores, maps

    def hybrid_forward(self, F, x):
        tap2, tap3, tap4, logits = self.backbone(x)
        scores = [stage(tap) for stage, tap in zip(self.stage_heads(), (tap2, tap3, tap4))]
        return logits, scores
