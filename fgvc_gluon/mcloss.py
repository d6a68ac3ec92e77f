"""Mutual-Channel loss (Chang et al., TIP 2020), ported from PRIS-CV/Mutual-Channel-Loss.

The loss looks at the last conv features F (N × c·ξ × H × W), whose channels
are grouped consecutively, ξ per class (channel k belongs to class k // ξ).

- CCMP (cross-channel max pooling): max over the ξ channels of each group.
  Ties go to the FIRST channel of the group, like upstream's max_pool2d over
  the transposed channels (MC-6): we use argmax + pick, so the gradient flows
  to one channel only, as in PyTorch.
- L_dis: F ⊙ mask → CCMP → global average → softmax cross entropy (mean over
  the batch). Dropped channels are multiplied by 0, not removed, so a zero
  takes part in the max (MC-3: for negative features the dropped channel wins).
- L_div: softmax of every channel over its H·W positions (UNMASKED features,
  MC-4) → CCMP → sum over positions → mean over (N, c) → ``1 − mean/ξ``.
- Training objective: CE(classifier) + α·L_dis + β·L_div, α = 1.5, β = 20.

Mask (MC-1, MC-2): upstream's ``Mask()`` keeps 2 of 3 channels per class for
exactly 200 classes, drawing with Python's global ``random``, one mask shared
by the whole batch and redrawn every call. :class:`MCLoss` generalises the
rule: per class ``keep`` of ξ channels (default ``ceil(ξ/2)``, i.e. 2 of 3 as
upstream), one mask for the batch, redrawn each call, drawn with numpy: by default from numpy's
global generator, which the training runtime reseeds from (seed, epoch, step)
before every step (training_runtime.loop.reseed), so the masks are
reproducible and an exact resume replays them; ``seed=`` gives the block its
own ``numpy.random.RandomState`` instead. :func:`upstream_mask` replays upstream's Python-``random``
procedure exactly (golden case mcloss_public_04).

Differences from upstream that never change the numbers of the upstream
configuration: the average pool is global (upstream's AvgPool2d(height) is
global only when height == H, MC-5) and maps need not be square; the ResNet-18
classifier max-pools globally (upstream's MaxPool2d(14) is global for 224
inputs). On several devices each device slice draws its own mask (upstream
draws one per step); masks are i.i.d. either way.

Networks (upstream trains them from scratch; initialised like PyTorch's
defaults, except that Conv/Dense biases start at 0):

- :func:`vgg16_bn_mc`: VGG16-BN with the last conv of blocks 4 and 5 widened
  to c·ξ channels (``[64,64,M,128,128,M,256,256,256,M,512,512,cξ,M,512,512,cξ]``),
  no pool after block 5 (14×14 for 224 inputs); classifier branch
  max-pool 2 → flatten → BN → Dense 512 → BN → ELU → Dense c.
- :func:`resnet18_mc`: ResNet-18 whose last stage has c·ξ channels and
  stride 1 (14×14 for 224 inputs); classifier branch global max-pool → BN →
  Dense 512 → BN → ELU → Dense c.

``width`` scales every conv width except the c·ξ MC layers (small test nets).
Both return ``(logits N×c, features N×cξ×H×W)`` in training mode
(``autograd.is_training()``) and logits alone otherwise.

Method (:class:`MCLossMethod`, registered as 'mcloss'): images N×3×S×S ->
``net`` -> logits N×c (and, in training, the N×cξ×H×W features); per-sample
loss CE_i + α·L_dis_i + β·L_div_i, (N,). Upstream settings (:data:`RECIPE`,
also the ``defaults`` keys of :class:`fgvc_gluon.task.FGVCTask`): vgg16_bn_mc
at 224 from scratch, SGD lr 0.1, momentum 0.9, wd 5e-4, batch 32, 300 epochs,
lr ×0.1 at 0-based epochs 149 and 224 (upstream's 1-based ``epoch == 150`` /
``epoch == 225``), input resized to 224×224 (``resize`` None), ``train_crop``
'pad_random' with ``pad`` 4, flip, mean = std = (0.5, 0.5, 0.5).

Errors: wrong shapes, types and out-of-range arguments raise ValueError or
TypeError naming the argument.
"""
import math
import random
from collections import OrderedDict

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon, nd
from mxnet.gluon import nn
from mxnet.gluon.model_zoo.vision.resnet import BasicBlockV1

from training_runtime.registry import Knob

from .registry import register_method
from .task import FGVCTask, InferenceBranch, ParamGroup, check_int, check_num_classes, optimisation_defaults

BACKBONES = ("vgg16_bn_mc", "resnet18_mc")
#: upstream settings (PRIS-CV/Mutual-Channel-Loss, CUB) as run-definition fields
RECIPE = dict(backbone="vgg16_bn_mc", image_size=224, lr=0.1, momentum=0.9, wd=5e-4, batch_size=32,
              epochs=300, schedule="step", lr_steps=[149, 224], lr_factor=0.1)
MIN_IMAGE_SIZE = 32
MC = "MC"  # placeholder for the c·ξ-channel layers in the VGG layout
VGG16_MC_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, MC, "M", 512, 512, MC)
CLASSIFIER_HIDDEN = 512  # upstream model_bn(feature_size=512)


# ---------------------------------------------------------------- the loss

def channel_max_pool(F, x, xi):
    """CCMP: N × (c·ξ) × ... → N × c × ..., max over consecutive groups of ξ channels.

    argmax + pick: the first maximum wins and alone gets the gradient, as in
    upstream's max_pool2d (a plain ``max`` would share it among ties).
    """
    grouped = x.reshape((0, -4, -1, xi, -2))  # N × c × ξ × ...
    return F.pick(grouped, F.argmax(grouped, axis=2), axis=2)


def _mc_terms(F, features, labels, mask, xi):
    """Per-sample (L_dis_i, L_div_i), each (N,); their batch means are L_dis, L_div.

    features N×cξ×H×W, labels (N,) float class indices, mask (N or 1)×cξ×1×1.
    """
    pooled = channel_max_pool(F, F.broadcast_mul(features, mask), xi)  # N×c×H×W
    class_scores = F.mean(pooled, axis=(2, 3))                         # GAP: N×c
    l_dis = -F.pick(F.log_softmax(class_scores, axis=1), labels, axis=1)
    spatial = F.softmax(features.reshape((0, 0, -1)), axis=-1)         # N×cξ×HW
    peak_mass = F.sum(channel_max_pool(F, spatial, xi), axis=2)        # N×c
    l_div = 1.0 - F.mean(peak_mass, axis=1) / xi
    return l_dis, l_div


class _MCTerms(gluon.HybridBlock):
    """Hybridizable (features, labels, mask) → per-sample (L_dis_i, L_div_i)."""

    def __init__(self, xi, **kwargs):
        super(_MCTerms, self).__init__(**kwargs)
        self._xi = xi

    def hybrid_forward(self, F, features, labels, mask):
        return _mc_terms(F, features, labels, mask, self._xi)


def _as_nd(array, ctx, what):
    if isinstance(array, nd.NDArray):
        return array.as_in_context(ctx)
    try:
        return nd.array(np.asarray(array), ctx=ctx, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise TypeError("mc_loss %s: expected a numeric array (%s)" % (what, err))


def _check_features(features, expected_channels, how):
    if len(features.shape) != 4:
        raise ValueError("mc_loss features: expected N x C x H x W, got shape %s"
                         % (features.shape,))
    if features.shape[1] != expected_channels:
        raise ValueError("mc_loss features: expected %d channels (%s), got %d"
                         % (expected_channels, how, features.shape[1]))


def mc_loss(features, labels, xi, mask):
    """(L_dis, L_div) of upstream's ``supervisor(x, targets, height=H, cnum=xi)``.

    features: N × (c·ξ) × H × W (NDArray of any float dtype, or numpy → float32;
    channel k belongs to class k // ξ).
    labels: (N,) class indices in [0, c).
    mask: N × (c·ξ) × 1 × 1 of 0/1 (or 1 × (c·ξ) × 1 × 1, broadcast).
    Returns two NDArrays of shape (1,) (MXNet's scalars), recorded by autograd.
    """
    ctx = features.context if isinstance(features, nd.NDArray) else mx.cpu()
    features = _as_nd(features, ctx, "features")
    labels = _as_nd(labels, ctx, "labels").astype(features.dtype)
    mask = _as_nd(mask, ctx, "mask").astype(features.dtype)
    xi = int(xi)
    if xi < 1:
        raise ValueError("mc_loss xi: expected a positive channel count per class, got %d" % xi)
    if len(mask.shape) != 4 or mask.shape[1] % xi or mask.shape[2:] != (1, 1):
        raise ValueError("mc_loss mask: expected N x (c*xi) x 1 x 1 with xi=%d, got shape %s"
                         % (xi, mask.shape))
    num_classes = mask.shape[1] // xi
    _check_features(features, num_classes * xi, "c*xi = %d classes x xi=%d, from the mask" % (num_classes, xi))
    if labels.shape != (features.shape[0],):
        raise ValueError("mc_loss labels: expected shape (%d,), got %s"
                         % (features.shape[0], labels.shape))
    l_dis, l_div = _mc_terms(nd, features, labels, mask, xi)
    return l_dis.mean(), l_div.mean()


def default_keep(xi):
    """Channels kept per class: ceil(ξ/2) (upstream: 2 of 3)."""
    return int(math.ceil(xi / 2.0))


def upstream_mask(num_classes, xi, batch, rng=random, keep=None):
    """Replay upstream's ``Mask()`` draw: float32 batch × (c·ξ) × 1 × 1.

    Upstream shuffles ONE list ``[1]*keep + [0]*(ξ-keep)`` in place with
    ``random.shuffle`` once per class and concatenates the successive states;
    every sample gets the same mask. ``rng`` is a ``random.Random`` (default:
    the ``random`` module's global generator, as upstream).
    """
    keep = default_keep(xi) if keep is None else keep
    pattern = [1] * keep + [0] * (xi - keep)
    row = []
    for _ in range(num_classes):
        rng.shuffle(pattern)
        row += pattern
    mask = np.array(row, np.float32).reshape(1, num_classes * xi, 1, 1)
    return np.repeat(mask, batch, axis=0)


class MCLoss(gluon.Block):
    """α·L_dis + β·L_div with a fresh channel mask each call.

    ``loss(features, labels)`` → shape (1,); features N × (c·ξ) × H × W,
    labels (N,). ``loss(features, labels, mask)`` with a (N or 1) × cξ × 1 × 1
    0/1 mask replaces the random draw (tests; positional: gluon's ``Block.__call__``
    takes no keyword arguments).
    After a call, ``loss_dis``, ``loss_div`` (shape (1,)) and ``last_mask`` hold
    the parts. :meth:`terms` gives the per-sample parts for per-sample losses.
    """

    def __init__(self, num_classes, xi, alpha=1.5, beta=20.0, keep=None, seed=None, **kwargs):
        super(MCLoss, self).__init__(**kwargs)
        self.num_classes, self.xi = int(num_classes), int(xi)
        self.alpha, self.beta = float(alpha), float(beta)
        self.keep = default_keep(self.xi) if keep is None else int(keep)
        if not 1 <= self.keep <= self.xi:
            raise ValueError("MCLoss keep: expected 1 <= keep <= xi=%d, got %d" % (self.xi, self.keep))
        # numpy's global generator follows the runtime's per-step reseeding (exact resume)
        self._rng = np.random if seed is None else np.random.RandomState(seed)
        self.loss_dis = self.loss_div = self.last_mask = None
        with self.name_scope():
            self.mc_terms = _MCTerms(self.xi)

    def draw_mask(self, batch=1):
        """New mask, float32 batch × (c·ξ) × 1 × 1: per class ``keep`` random ones, same for every sample."""
        ranks = self._rng.random_sample((self.num_classes, self.xi)).argsort(axis=1)
        mask = (ranks < self.keep).astype(np.float32).reshape(1, -1, 1, 1)
        return np.repeat(mask, batch, axis=0)

    def terms(self, features, labels, mask=None):
        """Per-sample (L_dis_i, L_div_i), each (N,), drawing a new mask unless one is given."""
        _check_features(features, self.num_classes * self.xi,
                        "num_classes*xi = %d x %d" % (self.num_classes, self.xi))
        if mask is None:
            mask = self.draw_mask()
        if not isinstance(mask, nd.NDArray):
            mask = nd.array(mask, ctx=features.context, dtype=features.dtype)
        self.last_mask = mask
        return self.mc_terms(features, labels.astype(features.dtype), mask.as_in_context(features.context))

    def forward(self, features, labels, mask=None):
        l_dis, l_div = self.terms(features, labels, mask)
        self.loss_dis, self.loss_div = l_dis.mean(), l_div.mean()
        return self.alpha * self.loss_dis + self.beta * self.loss_div


# ---------------------------------------------------------------- networks

class MCNetwork(gluon.Block):
    """features → classifier; (logits, features) in training, logits otherwise.

    A plain Block around two HybridBlocks: the output arity depends on the
    training flag, which a cached (hybridized) graph could not follow.
    """

    def __init__(self, features, classifier, **kwargs):
        super(MCNetwork, self).__init__(**kwargs)
        with self.name_scope():
            self.features = features
            self.classifier = classifier

    def forward(self, x):
        feature_maps = self.features(x)
        logits = self.classifier(feature_maps)
        if autograd.is_training():
            return logits, feature_maps
        return logits


def _scaled(channels, width):
    return max(1, int(round(channels * width)))


class BatchNorm1D(nn.BatchNorm):
    """BatchNorm of N×C features (PyTorch's BatchNorm1d), computed as N×C×1×1.

    MXNet 1.9.1's oneDNN inference kernel for 2-D BatchNorm input crashes the
    process (segfault) after other oneDNN work in the same process; the 4-D
    path gives the same numbers and is safe. Parameter names are BatchNorm's.
    """

    def hybrid_forward(self, F, x, gamma, beta, running_mean, running_var):
        y = super(BatchNorm1D, self).hybrid_forward(
            F, x.reshape((0, 0, 1, 1)), gamma, beta, running_mean, running_var)
        return y.reshape((0, -1))


def _classifier_head(num_classes, pool):
    head = nn.HybridSequential(prefix="classifier_")
    with head.name_scope():
        head.add(pool, nn.Flatten(), BatchNorm1D(),
                 nn.Dense(CLASSIFIER_HIDDEN), BatchNorm1D(), nn.ELU(),
                 nn.Dense(num_classes))
    return head


# PyTorch defaults: Conv2d / Linear weights U(±1/sqrt(fan_in)) (kaiming_uniform a=√5)
_TORCH_DEFAULT_INIT = mx.init.Xavier(rnd_type="uniform", factor_type="in", magnitude=1)
# upstream ResNet: conv weights N(0, sqrt(2 / (k·k·out_channels)))
_RESNET_CONV_INIT = mx.init.MSRAPrelu(factor_type="out", slope=0.0)


def vgg16_bn_mc(num_classes, xi=3, width=1.0, ctx=None):
    """Upstream ``model_bn`` (VGG16-BN with c·ξ-channel MC layers), initialised on ``ctx``."""
    features = nn.HybridSequential(prefix="features_")
    with features.name_scope():
        for entry in VGG16_MC_LAYOUT:
            if entry == "M":
                features.add(nn.MaxPool2D(pool_size=2, strides=2))
                continue
            channels = num_classes * xi if entry == MC else _scaled(entry, width)
            features.add(nn.Conv2D(channels, 3, padding=1), nn.BatchNorm(), nn.Activation("relu"))
    net = MCNetwork(features, _classifier_head(num_classes, nn.MaxPool2D(pool_size=2, strides=2)))
    net.initialize(_TORCH_DEFAULT_INIT, ctx=ctx)
    return net


def resnet18_mc(num_classes, xi=3, width=1.0, ctx=None):
    """Upstream ResNet-18 variant: stage 4 with c·ξ channels and stride 1, initialised on ``ctx``."""
    stem_width = _scaled(64, width)
    stages = ((_scaled(64, width), 1), (_scaled(128, width), 2), (_scaled(256, width), 2),
              (num_classes * xi, 1))
    features = nn.HybridSequential(prefix="features_")
    with features.name_scope():
        features.add(nn.Conv2D(stem_width, 7, strides=2, padding=3, use_bias=False),
                     nn.BatchNorm(), nn.Activation("relu"),
                     nn.MaxPool2D(pool_size=3, strides=2, padding=1))
        in_channels = stem_width
        for index, (channels, stride) in enumerate(stages):
            stage = nn.HybridSequential(prefix="stage%d_" % (index + 1))
            with stage.name_scope():
                downsample = stride != 1 or in_channels != channels
                stage.add(BasicBlockV1(channels, stride, downsample, in_channels=in_channels),
                          BasicBlockV1(channels, 1, False, in_channels=channels))
            features.add(stage)
            in_channels = channels
    net = MCNetwork(features, _classifier_head(num_classes, nn.GlobalMaxPool2D()))
    net.features.initialize(_RESNET_CONV_INIT, ctx=ctx)
    net.classifier.initialize(_TORCH_DEFAULT_INIT, ctx=ctx)
    return net


_NETWORKS = {"vgg16_bn_mc": vgg16_bn_mc, "resnet18_mc": resnet18_mc}


# ---------------------------------------------------------------- method adapter

class MCLossMethod(FGVCTask):
    """CE(classifier) + α·L_dis + β·L_div; one Trainer for the whole net (upstream's groups share one lr)."""

    name = "mcloss"

    def __init__(self, net, mc_loss_block, image_size):
        self.net = net
        self.mc_loss = mc_loss_block
        self._ce = gluon.loss.SoftmaxCrossEntropyLoss()
        self.defaults = dict(
            optimisation_defaults(RECIPE),
            image_size=image_size, resize=None, train_crop="pad_random", crop_scale=None,
            pad=4, flip=True, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

    def loss_blocks(self):
        return (self.mc_loss, self._ce)

    def param_groups(self):
        return [ParamGroup("net", self.net.collect_params())]

    def training_loss(self, data, label, index, epoch):
        """Per-sample CE_i + α·L_dis_i + β·L_div_i, (N,): its batch mean is upstream's loss."""
        label = self.class_labels(label)
        logits, feature_maps = self.net(data)
        l_dis, l_div = self.mc_loss.terms(feature_maps, label)
        return self._ce(logits, label) + self.mc_loss.alpha * l_dis + self.mc_loss.beta * l_div

    def predict(self, data, epoch):
        return OrderedDict([("classifier", self.net(data))])

    def inference_block(self, epoch):
        """The evaluation path of MCNetwork (logits only) as one HybridBlock."""
        return InferenceBranch(lambda F, x, features, classifier: classifier(features(x)),
                               self.net.features, self.net.classifier, prefix="exported_")

    def pictures(self, batches, directory, epoch):
        """RUN/pictures/mcloss_epoch<N>.png: the channel groups of the true and the predicted class
        (:mod:`fgvc_gluon.pictures`)."""
        from .pictures import mcloss_pictures
        return mcloss_pictures(self, batches, directory, epoch)


def build_method(num_classes, backbone=RECIPE["backbone"], xi=3, alpha=1.5, beta=20.0,
                 image_size=RECIPE["image_size"], pretrained=False, width=1.0, keep=None, seed=None,
                 ctx=None):
    """MC-Loss method: ``backbone`` in BACKBONES, c·ξ = num_classes·xi MC channels, initialised on ``ctx``.

    xi: channels per class (>= 1); alpha, beta: weights of L_dis and L_div;
    image_size: >= 32; width: multiplier (> 0) of the non-MC conv widths;
    keep: channels kept per class by the mask (default ceil(xi/2)); seed: the
    mask generator's own seed (default numpy's global generator). The
    networks have no ImageNet weights: ``pretrained`` must be False.
    """
    num_classes = check_num_classes(num_classes, "mcloss")
    if backbone not in _NETWORKS:
        raise ValueError("backbone: expected one of %s for mcloss, got %r"
                         % (", ".join(BACKBONES), backbone))
    if pretrained:
        raise ValueError("pretrained: the MC-Loss networks are trained from scratch as upstream "
                         "(their c*xi-channel layers have no model-zoo weights)")
    image_size = check_int(image_size, "image_size", minimum=MIN_IMAGE_SIZE, owner=backbone)
    xi = check_int(xi, "xi", minimum=1)
    if not width > 0:
        raise ValueError("width: expected a positive width multiplier, got %r" % (width,))
    net = _NETWORKS[backbone](num_classes, xi, width, ctx=ctx)
    block = MCLoss(num_classes, xi, alpha=alpha, beta=beta, keep=keep, seed=seed)
    return MCLossMethod(net, block, image_size)


register_method(
    "mcloss", build_method,
    knobs=[Knob("xi", int, 3, "channels per class", minimum=1),
           Knob("alpha", float, 1.5, "weight of L_dis", minimum=0.0),
           Knob("beta", float, 20.0, "weight of L_div", minimum=0.0),
           Knob("width", float, 1.0, "width multiplier of the non-MC convs (> 0; demo 0.25)",
                minimum=0.01)],
    recipe=RECIPE,
    demo=dict(backbone="resnet18_mc", width=0.25, image_size=32, lr=0.05),
    pretrained=False,
    backbones=BACKBONES,
    summary="Mutual-Channel loss (TIP 2020): CE + alpha L_dis + beta L_div on c*xi-channel features")
