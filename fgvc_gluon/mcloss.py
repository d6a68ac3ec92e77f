"""Mutual-Channel loss (Chang et al., TIP 2020), ported from PRIS-CV/Mutual-Channel-Loss.

The loss looks at the last conv features F (N × C × H × W), whose channels
are grouped consecutively per class: ξ per class (C = c·ξ, channel k belongs
to class k // ξ), or per-class groups of unequal size given as runs of
``(count, ξ)`` in channel order (upstream MC_ResNet50.py: 2048 channels,
``((152, 10), (48, 11))``, :func:`near_equal_groups`). Each run is one
reshaped block (no loop over the classes).

- CCMP (cross-channel max pooling): max over the ξ channels of each group.
  Ties go to the FIRST channel of the group, like upstream's max_pool2d over
  the transposed channels (MC-6): we use argmax + pick, so the gradient flows
  to one channel only, as in PyTorch.
- L_dis: F ⊙ mask → CCMP → global average → softmax cross entropy (mean over
  the batch). Dropped channels are multiplied by 0, not removed, so a zero
  takes part in the max (MC-3: for negative features the dropped channel wins).
  With runs, the runs' pooled classes are concatenated in order first.
- L_div: softmax of every channel over its H·W positions (UNMASKED features,
  MC-4) → CCMP → sum over positions → mean over (N, c) → ``1 − mean/ξ``;
  with several runs, the SUM over the runs of each run's ``1 − mean/ξ``
  (upstream MC_ResNet50.py adds its two groups' terms), so one run is the
  equal-ξ term exactly.
- Training objective: CE(classifier) + α·L_dis + β·L_div; α = 1.5, β = 20
  (CUB-200-2011.py, VGG16 / ResNet-18) or α = 0.0005, β = 0.005
  (MC_ResNet50.py's ``CE + 0.0005·(L_dis + 10·L_div)``), :data:`LOSS_WEIGHTS`
  per backbone, chosen when the ``alpha`` / ``beta`` knobs are None.

Mask (MC-1, MC-2): upstream's ``Mask()`` keeps 2 of 3 channels per class for
exactly 200 classes (MC_ResNet50.py: 6 of 10, then 7 of 11), drawing with
Python's global ``random``, one mask shared by the whole batch and redrawn
every call. :class:`MCLoss` generalises the rule: per class ``keep`` of ξ
channels (default ``ceil(ξ/2)``, i.e. 2 of 3 as upstream; one count per run
for groups, resnet50_mc: :func:`resnet50_keep`, ξ − ⌊2ξ/5⌋), one mask for the
batch, redrawn each call, drawn with numpy: by default from numpy's
global generator, which the training runtime reseeds from (seed, epoch, step)
before every step (training_runtime.loop.reseed), so the masks are
reproducible and an exact resume replays them; ``seed=`` gives the block its
own ``numpy.random.RandomState`` instead. :func:`upstream_mask` replays upstream's Python-``random``
procedure exactly (golden case mcloss_public_04; for runs, one list per run).

Differences from upstream that never change the numbers of the upstream
configuration: the average pool is global (upstream's AvgPool2d(height) is
global only when height == H, MC-5) and maps need not be square; the ResNet
classifiers max-pool globally (upstream's MaxPool2d(14) is global for 224
inputs with ResNet-18 and 448 with ResNet-50).

In the method (:class:`MCLossMethod`) the mask is drawn ONCE per step, in
``begin_step`` (after the runtime's per-step reseeding, identically on every
worker), and used for every device slice of that step: one mask for the whole
global batch, as upstream, so the numbers do not depend on how the batch is
split over devices or workers. :class:`MCLoss` on its own still draws a fresh
mask on every call without a ``mask`` argument.

Networks (VGG16 / ResNet-18: upstream trains them from scratch; initialised
like PyTorch's defaults, except that Conv/Dense biases start at 0):

- :func:`vgg16_bn_mc`: VGG16-BN with the last conv of blocks 4 and 5 widened
  to c·ξ channels (``[64,64,M,128,128,M,256,256,256,M,512,512,cξ,M,512,512,cξ]``),
  no pool after block 5 (14×14 for 224 inputs); classifier branch
  max-pool 2 → flatten → BN → Dense 512 → BN → ELU → Dense c.
- :func:`resnet18_mc`: ResNet-18 whose last stage has c·ξ channels and
  stride 1 (14×14 for 224 inputs); classifier branch global max-pool → BN →
  Dense 512 → BN → ELU → Dense c.
- :func:`resnet50_mc`: upstream MC_ResNet50.py (commit 9e495cc): torchvision's
  ResNet-50 layout (stride in the 3×3 conv of a downsampling bottleneck), i.e.
  GluonCV's ``resnet50_v1b`` (ImageNet weights with ``pretrained``;
  ``--backbone resnet50_v1_mc``: the same on Gluon's ``resnet50_v1``, stride
  in the first 1×1 conv, with Gluon's weights) up to its last stage, no extra layer: its 2048 channels (14×14 at 448) are
  split by :func:`near_equal_groups` (ξ = 2048 // c for the first classes,
  +1 for the last 2048 mod c; error for c > 2048); the classifier branch as
  resnet18_mc's. Trained with two parameter groups, ``backbone`` and
  ``classifier`` at ×10 its lr (upstream 0.01 / 0.1).

``width`` scales every conv width except the c·ξ MC layers (small test nets;
resnet50_mc: every width, its groups split the scaled last stage; 1 for
``pretrained``). All return ``(logits N×c, features N×C×H×W)`` in training
mode (``autograd.is_training()``) and logits alone otherwise.

Method (:class:`MCLossMethod`, registered as 'mcloss'): images N×3×S×S ->
``net`` -> logits N×c (and, in training, the N×C×H×W features); per-sample
loss CE_i + α·L_dis_i + β·L_div_i, (N,). Upstream settings (:data:`RECIPE`,
also the ``defaults`` keys of :class:`fgvc_gluon.task.FGVCTask`): vgg16_bn_mc
at 224 from scratch, SGD lr 0.1, momentum 0.9, wd 5e-4, batch 32, 300 epochs,
lr ×0.1 at 0-based epochs 149 and 224 (upstream's 1-based ``epoch == 150`` /
``epoch == 225``), input resized to 224×224 (``resize`` None), ``train_crop``
'pad_random' with ``pad`` 4, flip, mean = std = (0.5, 0.5, 0.5).
``--backbone resnet50_mc`` runs MC_ResNet50.py's recipe instead
(:data:`RESNET50_RECIPE`, registered as the backbone's own recipe, so the
command line layers it over :data:`RECIPE`): ImageNet weights, 448 px
(train: resize 600×600, random 448 crop, flip; eval: resize 600×600, center
crop; 600 scales as 600/448 at other sizes), mean = std = 0.5, batch 64,
lr 0.01 for the backbone and ×10 for the classifier, momentum 0.9, wd 5e-4,
300 epochs of the ``cosine`` schedule (training_runtime.schedule.CosineSchedule,
upstream's ``cosine_anneal_schedule`` at the 1-based epoch), α 0.0005, β 0.005.
docs/REPRODUCE.md §2 lists the deviations from that script.

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
from mxnet.gluon.model_zoo import vision
from mxnet.gluon.model_zoo.vision.resnet import BasicBlockV1

from training_runtime.registry import Knob

from .registry import register_method
from .data import s3n_test_resize
from .task import FGVCTask, InferenceBranch, ParamGroup, check_int, check_num_classes, optimisation_defaults
from .zoo import features_without_pool, model_zoo_network

#: MC backbone -> the model-zoo ResNet-50 it is built on (fgvc_gluon.zoo): upstream's torchvision
#: layout (GluonCV's resnet50_v1b), or Gluon's own v1
RESNET50_ZOO_NAMES = {"resnet50_mc": "resnet50_v1b", "resnet50_v1_mc": "resnet50_v1"}
BACKBONES = ("vgg16_bn_mc", "resnet18_mc") + tuple(RESNET50_ZOO_NAMES)
#: upstream settings (PRIS-CV/Mutual-Channel-Loss, CUB) as run-definition fields
RECIPE = dict(backbone="vgg16_bn_mc", image_size=224, lr=0.1, momentum=0.9, wd=5e-4, batch_size=32,
              epochs=300, schedule="step", lr_steps=[149, 224], lr_factor=0.1)
#: upstream MC_ResNet50.py (commit 9e495cc): ImageNet ResNet-50, 448 px, batch 64, SGD 0.9 / 5e-4,
#: 300 epochs of cosine lr; --lr is the backbone's (upstream 0.01), the classifier's is x10 (0.1)
RESNET50_RECIPE = dict(backbone="resnet50_mc", image_size=448, lr=0.01, momentum=0.9, wd=5e-4,
                       batch_size=64, epochs=300, schedule="cosine", lr_steps=[], lr_factor=0.1)
#: the run-definition values of --backbone resnet50_mc (layered over RECIPE)
RESNET50_RUN = dict(RESNET50_RECIPE, pretrained=True)
#: ... and of --backbone resnet50_v1_mc (the same recipe on Gluon's ResNet-50 v1)
RESNET50_V1_RUN = dict(RESNET50_RUN, backbone="resnet50_v1_mc")
RESNET50_CLASSIFIER_LR_MULT = 10.0
#: backbone -> upstream (alpha, beta) of CE + alpha L_dis + beta L_div: CUB-200-2011.py's get_params
#: (alpha_1 1.5, beta_1 20); MC_ResNet50.py's ``CE + 0.0005 * (L_dis + 10 L_div)``
LOSS_WEIGHTS = {"vgg16_bn_mc": (1.5, 20.0), "resnet18_mc": (1.5, 20.0), "resnet50_mc": (0.0005, 0.005),
                "resnet50_v1_mc": (0.0005, 0.005)}
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


def normalize_groups(xi):
    """The channel groups as a tuple of runs ``((count, ξ), ...)``.

    xi: an int ξ (one run, its count taken from the channels: returned as
    ``((None, ξ),)``) or a sequence of ``(count, ξ)`` pairs: ``count``
    consecutive classes with ξ channels each, the runs in channel order
    (upstream ResNet-50: ``((152, 10), (48, 11))``). TypeError / ValueError
    naming ``xi`` otherwise.
    """
    if isinstance(xi, (int, np.integer)) and not isinstance(xi, bool):
        if xi < 1:
            raise ValueError("mc_loss xi: expected a positive channel count per class, got %d" % xi)
        return ((None, int(xi)),)
    try:
        runs = tuple((int(count), int(size)) for count, size in xi)
        exact = all(int(c) == c and int(z) == z for c, z in xi)
    except (TypeError, ValueError):
        raise TypeError("mc_loss xi: expected an int or (count, xi) pairs, got %r" % (xi,))
    if not runs or not exact or any(count < 1 or size < 1 for count, size in runs):
        raise ValueError("mc_loss xi: expected (count, xi) pairs of positive ints, got %r" % (xi,))
    return runs


def _runs_for(groups, num_classes):
    """``groups`` with the count of a single ``(None, ξ)`` run filled in."""
    if groups[0][0] is None:
        return ((int(num_classes), groups[0][1]),)
    return groups


def near_equal_groups(channels, num_classes):
    """Split ``channels`` into ``num_classes`` consecutive groups of near-equal size.

    ξ = channels // c for the first c − r classes and ξ + 1 for the last r =
    channels % c (upstream ResNet-50, 2048 channels and 200 classes: 152 × 10
    then 48 × 11); one run when c divides the channels. ValueError when there
    are fewer channels than classes.
    """
    channels, num_classes = int(channels), int(num_classes)
    if num_classes < 1 or channels < num_classes:
        raise ValueError("num_classes: %d channels cannot be split into %d per-class groups "
                         "(at least one channel per class)" % (channels, num_classes))
    base, extra = divmod(channels, num_classes)
    runs = ((num_classes - extra, base), (extra, base + 1))
    return tuple(run for run in runs if run[0])


def _mc_terms(F, features, labels, mask, groups):
    """Per-sample (L_dis_i, L_div_i), each (N,); their batch means are L_dis, L_div.

    features N×C×H×W, labels (N,) float class indices, mask (N or 1)×C×1×1;
    groups: the runs ``((count, ξ), ...)`` (C = Σ count·ξ). With several runs
    each run is one reshaped block (CCMP per run, the pooled classes
    concatenated in order) and L_div is the SUM of the runs' terms
    ``1 − mean/ξ_run`` (upstream ResNet-50 adds its two groups' terms).
    """
    masked = F.broadcast_mul(features, mask)
    if len(groups) == 1:   # the equal-ξ path, unchanged
        xi = groups[0][1]
        pooled = channel_max_pool(F, masked, xi)                       # N×c×H×W
        class_scores = F.mean(pooled, axis=(2, 3))                     # GAP: N×c
        l_dis = -F.pick(F.log_softmax(class_scores, axis=1), labels, axis=1)
        spatial = F.softmax(features.reshape((0, 0, -1)), axis=-1)     # N×cξ×HW
        peak_mass = F.sum(channel_max_pool(F, spatial, xi), axis=2)    # N×c
        l_div = 1.0 - F.mean(peak_mass, axis=1) / xi
        return l_dis, l_div
    spatial = F.softmax(features.reshape((0, 0, -1)), axis=-1)         # N×C×HW
    pooled, l_div, start = [], None, 0
    for count, xi in groups:                                           # one block per run
        end = start + count * xi
        pooled.append(channel_max_pool(F, F.slice_axis(masked, axis=1, begin=start, end=end), xi))
        peak_mass = F.sum(channel_max_pool(F, F.slice_axis(spatial, axis=1, begin=start, end=end), xi),
                          axis=2)                                      # N×count
        term = 1.0 - F.mean(peak_mass, axis=1) / xi
        l_div = term if l_div is None else l_div + term
        start = end
    class_scores = F.mean(F.concat(*pooled, dim=1), axis=(2, 3))       # N×c
    l_dis = -F.pick(F.log_softmax(class_scores, axis=1), labels, axis=1)
    return l_dis, l_div


class _MCTerms(gluon.HybridBlock):
    """Hybridizable (features, labels, mask) → per-sample (L_dis_i, L_div_i)."""

    def __init__(self, groups, **kwargs):
        super(_MCTerms, self).__init__(**kwargs)
        self._groups = tuple(groups)

    def hybrid_forward(self, F, features, labels, mask):
        return _mc_terms(F, features, labels, mask, self._groups)


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

    features: N × C × H × W (NDArray of any float dtype, or numpy → float32).
    xi: an int ξ (C = c·ξ, channel k belongs to class k // ξ) or per-class
    groups as ``(count, ξ)`` runs (see :func:`normalize_groups`; C = Σ count·ξ).
    labels: (N,) class indices in [0, c).
    mask: N × C × 1 × 1 of 0/1 (or 1 × C × 1 × 1, broadcast).
    Returns two NDArrays of shape (1,) (MXNet's scalars), recorded by autograd.
    """
    ctx = features.context if isinstance(features, nd.NDArray) else mx.cpu()
    features = _as_nd(features, ctx, "features")
    labels = _as_nd(labels, ctx, "labels").astype(features.dtype)
    mask = _as_nd(mask, ctx, "mask").astype(features.dtype)
    groups = normalize_groups(xi)
    if groups[0][0] is None:
        xi = groups[0][1]
        if len(mask.shape) != 4 or mask.shape[1] % xi or mask.shape[2:] != (1, 1):
            raise ValueError("mc_loss mask: expected N x (c*xi) x 1 x 1 with xi=%d, got shape %s"
                             % (xi, mask.shape))
        groups = _runs_for(groups, mask.shape[1] // xi)
        how = "c*xi = %d classes x xi=%d, from the mask" % (groups[0][0], xi)
    else:
        how = "the groups %s" % (groups,)
    channels = sum(count * size for count, size in groups)
    if len(mask.shape) != 4 or mask.shape[1] != channels or mask.shape[2:] != (1, 1):
        raise ValueError("mc_loss mask: expected N x %d x 1 x 1 (%s), got shape %s"
                         % (channels, how, mask.shape))
    _check_features(features, channels, how)
    if labels.shape != (features.shape[0],):
        raise ValueError("mc_loss labels: expected shape (%d,), got %s"
                         % (features.shape[0], labels.shape))
    l_dis, l_div = _mc_terms(nd, features, labels, mask, groups)
    return l_dis.mean(), l_div.mean()


def default_keep(xi):
    """Channels kept per class: ceil(ξ/2) (upstream VGG16 / ResNet-18: 2 of 3)."""
    return int(math.ceil(xi / 2.0))


def resnet50_keep(xi):
    """Channels kept per class by the resnet50_mc recipe: ξ − ⌊2ξ/5⌋ (upstream
    MC_ResNet50.py: 6 of 10 and 7 of 11; also 2 of 3 like :func:`default_keep`)."""
    return int(xi) - (2 * int(xi)) // 5


def _keeps(groups, keep):
    """Per run, the channels the mask keeps: ``keep`` None (ceil(ξ/2)), an int (every run)
    or a sequence with one entry per run (each an int, or None for ceil(ξ/2))."""
    if keep is None or isinstance(keep, (int, np.integer)):
        keep = [keep] * len(groups)
    keep = list(keep)
    if len(keep) != len(groups):
        raise ValueError("MCLoss keep: expected one count per group run (%d), got %r" % (len(groups), keep))
    keeps = tuple(default_keep(size) if k is None else int(k) for (_, size), k in zip(groups, keep))
    for (_, size), k in zip(groups, keeps):
        if not 1 <= k <= size:
            raise ValueError("MCLoss keep: expected 1 <= keep <= xi=%d, got %d" % (size, k))
    return keeps


def upstream_mask(num_classes, xi, batch, rng=random, keep=None):
    """Replay upstream's ``Mask()`` draw: float32 batch × C × 1 × 1.

    Upstream shuffles ONE list ``[1]*keep + [0]*(ξ-keep)`` in place with
    ``random.shuffle`` once per class and concatenates the successive states;
    every sample gets the same mask. With groups (``xi`` as ``(count, ξ)``
    runs, ``keep`` one count per run) each run has its own list, shuffled
    once per class of the run, the runs in order (MC_ResNet50.py: ``foo``
    152 times, then ``foo2`` 48 times). ``rng`` is a ``random.Random``
    (default: the ``random`` module's global generator, as upstream).
    """
    groups = _runs_for(normalize_groups(xi), num_classes)
    row = []
    for (count, size), kept in zip(groups, _keeps(groups, keep)):
        pattern = [1] * kept + [0] * (size - kept)
        for _ in range(count):
            rng.shuffle(pattern)
            row += pattern
    mask = np.array(row, np.float32).reshape(1, len(row), 1, 1)
    return np.repeat(mask, batch, axis=0)


class MCLoss(gluon.Block):
    """α·L_dis + β·L_div with a fresh channel mask each call.

    ``loss(features, labels)`` → shape (1,); features N × C × H × W (C = c·ξ,
    or Σ count·ξ for groups), labels (N,). ``loss(features, labels, mask)``
    with a (N or 1) × C × 1 × 1 0/1 mask replaces the random draw (tests;
    positional: gluon's ``Block.__call__`` takes no keyword arguments).
    ``xi``: an int ξ for every class, or the per-class groups as ``(count, ξ)``
    runs in channel order (their counts sum to ``num_classes``);
    ``keep``: channels the mask keeps per class: None (ceil(ξ/2)), an int, or
    one per run. After a call, ``loss_dis``, ``loss_div`` (shape (1,)) and
    ``last_mask`` hold the parts. :meth:`terms` gives the per-sample parts for
    per-sample losses.

    Attributes: ``groups`` (the runs), ``keeps`` (per run), ``channels`` (C);
    ``xi`` and ``keep`` are ints for equal groups and None / a tuple otherwise.
    """

    def __init__(self, num_classes, xi, alpha=1.5, beta=20.0, keep=None, seed=None, **kwargs):
        super(MCLoss, self).__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.groups = _runs_for(normalize_groups(xi), self.num_classes)
        if sum(count for count, _ in self.groups) != self.num_classes:
            raise ValueError("MCLoss xi: the groups %s cover %d classes, expected num_classes=%d"
                             % (self.groups, sum(c for c, _ in self.groups), self.num_classes))
        self.channels = sum(count * size for count, size in self.groups)
        equal = len(self.groups) == 1
        self.xi = self.groups[0][1] if equal else None
        self.alpha, self.beta = float(alpha), float(beta)
        self.keeps = _keeps(self.groups, keep)
        self.keep = self.keeps[0] if equal else self.keeps
        # numpy's global generator follows the runtime's per-step reseeding (exact resume)
        self._rng = np.random if seed is None else np.random.RandomState(seed)
        self.loss_dis = self.loss_div = self.last_mask = None
        starts, start = [], 0
        for count, size in self.groups:
            starts += [(start + i * size, size) for i in range(count)]
            start += count * size
        self._class_starts = tuple(starts)
        with self.name_scope():
            self.mc_terms = _MCTerms(self.groups)

    def class_channels(self, k):
        """(first channel, ξ) of class ``k``'s group."""
        return self._class_starts[int(k)]

    def _describe(self):
        if self.xi is not None:
            return "num_classes*xi = %d x %d" % (self.num_classes, self.xi)
        return "groups %s" % ", ".join("%d x %d" % run for run in self.groups)

    def draw_mask(self, batch=1):
        """New mask, float32 batch × C × 1 × 1: per class ``keep`` random ones (its run's),
        the same for every sample. One vectorised draw per run."""
        parts = []
        for (count, size), kept in zip(self.groups, self.keeps):
            ranks = self._rng.random_sample((count, size)).argsort(axis=1)
            parts.append((ranks < kept).astype(np.float32).reshape(-1))
        mask = (parts[0] if len(parts) == 1 else np.concatenate(parts)).reshape(1, -1, 1, 1)
        return np.repeat(mask, batch, axis=0)

    def terms(self, features, labels, mask=None):
        """Per-sample (L_dis_i, L_div_i), each (N,), drawing a new mask unless one is given."""
        _check_features(features, self.channels, self._describe())
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

    def sync_variant(self, num_devices):
        """This layer synchronised over ``num_devices`` (``--batchnorm sync``): a
        :class:`SyncBatchNorm1D` over the same parameters."""
        from training_runtime.loop import sync_batchnorm_like  # only --batchnorm sync needs it
        return sync_batchnorm_like(self, num_devices, SyncBatchNorm1D)


class SyncBatchNorm1D(gluon.contrib.nn.SyncBatchNorm):
    """SyncBatchNorm of N×C features (statistics over every device's rows), computed as
    N×C×1×1 like :class:`BatchNorm1D`, whose ``--batchnorm sync`` replacement it is."""

    def hybrid_forward(self, F, x, gamma, beta, running_mean, running_var):
        y = super(SyncBatchNorm1D, self).hybrid_forward(
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


#: ResNet-50 v1 stage output widths (stem, stages 1-4) and blocks per stage, as the model zoo's
RESNET50_CHANNELS = (64, 256, 512, 1024, 2048)
RESNET50_LAYERS = (3, 4, 6, 3)
RESNET50_ZOO_NAME = RESNET50_ZOO_NAMES["resnet50_mc"]


def _scaled_resnet50_v1b(channels):
    """A ResNet-50 of torchvision's layout with stage widths ``channels`` (stem, stages 1-4), made
    of GluonCV's BottleneckV1b (stride in the 3×3 conv): ``features`` N×3×S×S → N×F×S/32×S/32
    (small test nets; not initialised)."""
    from gluoncv.model_zoo.resnetv1b import BottleneckV1b  # imported on use
    features = nn.HybridSequential(prefix="resnetv1b_")
    with features.name_scope():
        features.add(nn.Conv2D(channels[0], 7, strides=2, padding=3, use_bias=False),
                     nn.BatchNorm(), nn.Activation("relu"), nn.MaxPool2D(3, strides=2, padding=1))
        for index, (width, blocks) in enumerate(zip(channels[1:], RESNET50_LAYERS)):
            stage = nn.HybridSequential(prefix="layers%d_" % (index + 1))
            with stage.name_scope():
                for block in range(blocks):
                    strides = 2 if index > 0 and block == 0 else 1
                    downsample = None
                    if block == 0:  # the first bottleneck of a stage changes the width
                        downsample = nn.HybridSequential(prefix="down%d_" % (index + 1))
                        downsample.add(nn.Conv2D(width, 1, strides=strides, use_bias=False), nn.BatchNorm())
                    stage.add(BottleneckV1b(width // 4, strides, downsample=downsample, norm_layer=nn.BatchNorm))
            features.add(stage)
    return features


def resnet50_features(width=1.0, pretrained=False, zoo_name=RESNET50_ZOO_NAME):
    """The model-zoo ResNet-50 ``zoo_name`` (resnet50_v1b: torchvision's layout, resnet50_v1:
    Gluon's) up to its last stage (no global pool): N×3×S×S → N×F×S/32×S/32.

    F = 2048 at ``width`` 1 (the zoo's network, with its ImageNet weights if
    ``pretrained``: True or a weights file); other widths scale every stage (F =
    round(2048·width), small test nets of the same layout, never pretrained). Not
    initialised unless pretrained. Returns (features HybridSequential, F).
    """
    if width == 1.0:
        zoo = model_zoo_network(zoo_name, pretrained)
        return features_without_pool(zoo), RESNET50_CHANNELS[-1]
    if pretrained:
        raise ValueError("width: the ImageNet weights are those of the full ResNet-50 (width 1), got %r"
                         % (width,))
    channels = tuple(_scaled(c, width) for c in RESNET50_CHANNELS)
    channels = (channels[0],) + tuple(max(4, c) for c in channels[1:])  # bottlenecks use c // 4
    if zoo_name == "resnet50_v1b":
        return _scaled_resnet50_v1b(channels), channels[-1]
    zoo = vision.resnet.ResNetV1(vision.resnet.BottleneckV1, list(RESNET50_LAYERS), list(channels))
    return features_without_pool(zoo), channels[-1]


def resnet50_mc(num_classes, width=1.0, pretrained=False, ctx=None, zoo_name=RESNET50_ZOO_NAME):
    """Upstream MC_ResNet50.py's network: the model-zoo ResNet-50 ``zoo_name`` (default
    torchvision's layout, GluonCV's resnet50_v1b) up to its last stage, with no
    extra layer (its F = 2048 channels are the MC channels, split by :func:`near_equal_groups`)
    and the classifier global max-pool → BN → Dense 512 → BN → ELU → Dense c; initialised on
    ``ctx`` (the backbone only when not ``pretrained``). Returns (net, groups)."""
    body, channels = resnet50_features(width, pretrained, zoo_name)
    groups = near_equal_groups(channels, num_classes)
    net = MCNetwork(body, _classifier_head(num_classes, nn.GlobalMaxPool2D()))
    ctx = ctx or mx.cpu()
    if pretrained:
        net.features.collect_params().reset_ctx(ctx)   # the zoo loads its weights on the cpu
    else:
        net.features.initialize(_RESNET_CONV_INIT, ctx=ctx)
    net.classifier.initialize(_TORCH_DEFAULT_INIT, ctx=ctx)
    return net, groups


_NETWORKS = {"vgg16_bn_mc": vgg16_bn_mc, "resnet18_mc": resnet18_mc}


# ---------------------------------------------------------------- method adapter

class MCLossMethod(FGVCTask):
    """CE(classifier) + α·L_dis + β·L_div.

    One Trainer for the whole net (upstream VGG16 / ResNet-18: one lr), or with
    ``classifier_lr_mult`` two: ``backbone`` (the features) and ``classifier``
    at that multiple of its lr (resnet50_mc: ×10, upstream's 0.1 / 0.01).
    ``recipe``: the run-definition values the ``defaults`` come from;
    ``transform``: the ``defaults`` entries of the input pipeline.
    """

    name = "mcloss"

    def __init__(self, net, mc_loss_block, image_size, recipe=RECIPE, transform=None,
                 classifier_lr_mult=None):
        self.net = net
        self.mc_loss = mc_loss_block
        self.classifier_lr_mult = classifier_lr_mult
        self._ce = gluon.loss.SoftmaxCrossEntropyLoss()
        self._step_mask = None  # the current step's mask, numpy 1 × C × 1 × 1 (begin_step)
        self.defaults = dict(
            optimisation_defaults(recipe),
            image_size=image_size, resize=None, train_crop="pad_random", crop_scale=None,
            pad=4, flip=True, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        self.defaults.update(transform or {})

    def loss_blocks(self):
        return (self.mc_loss, self._ce)

    def param_groups(self):
        if self.classifier_lr_mult is None:
            return [ParamGroup("net", self.net.collect_params())]
        return [ParamGroup("backbone", self.net.features.collect_params()),
                ParamGroup("classifier", self.net.classifier.collect_params(),
                           lr_mult=self.classifier_lr_mult)]

    def begin_step(self, batch):
        """Draw the step's one mask (1 × C × 1 × 1) for every device slice of the step."""
        self._step_mask = self.mc_loss.draw_mask()

    def after_step(self, epoch):
        self._step_mask = None

    def training_loss(self, data, label, index, epoch):
        """Per-sample CE_i + α·L_dis_i + β·L_div_i, (N,): its batch mean is upstream's loss.
        The mask is the step's (``begin_step``); outside the runner a fresh one per call."""
        label = self.class_labels(label)
        logits, feature_maps = self.net(data)
        l_dis, l_div = self.mc_loss.terms(feature_maps, label, self._step_mask)
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


def build_method(num_classes, backbone=RECIPE["backbone"], xi=None, alpha=None, beta=None,
                 image_size=RECIPE["image_size"], pretrained=False, width=1.0, keep=None, seed=None,
                 ctx=None):
    """MC-Loss method: ``backbone`` in BACKBONES, initialised on ``ctx``.

    xi: channels per class (>= 1; None: 3) of the c·ξ-channel MC layers of
    vgg16_bn_mc / resnet18_mc; resnet50_mc has no MC layer: its F channels
    are split by :func:`near_equal_groups` (``xi`` must be None).
    alpha, beta: weights of L_dis and L_div (None: the backbone's upstream
    ones, :data:`LOSS_WEIGHTS`). image_size: >= 32; width: multiplier (> 0)
    of the non-MC conv widths (resnet50_mc: of every width, 1 for
    ``pretrained``); keep: channels kept per class by the mask (None: ceil(ξ/2),
    resnet50_mc :func:`resnet50_keep`; an int, or one per group run); seed:
    the mask generator's own seed (default numpy's global generator).
    ``pretrained`` (ImageNet weights: True, the model store's; a path, that
    file) only for resnet50_mc / resnet50_v1_mc: the c·ξ-channel layers of the
    others have no model-zoo weights.
    """
    num_classes = check_num_classes(num_classes, "mcloss")
    if backbone not in BACKBONES:
        raise ValueError("backbone: expected one of %s for mcloss, got %r"
                         % (", ".join(BACKBONES), backbone))
    if pretrained and backbone not in RESNET50_ZOO_NAMES:
        raise ValueError("pretrained: the MC-Loss networks are trained from scratch as upstream "
                         "(%s: their c*xi-channel layers have no model-zoo weights; only resnet50_mc "
                         "and resnet50_v1_mc load ImageNet weights), got backbone %r" % (", ".join(sorted(_NETWORKS)), backbone))
    image_size = check_int(image_size, "image_size", minimum=MIN_IMAGE_SIZE, owner=backbone)
    if not width > 0:
        raise ValueError("width: expected a positive width multiplier, got %r" % (width,))
    weights = LOSS_WEIGHTS[backbone]
    alpha = weights[0] if alpha is None else alpha
    beta = weights[1] if beta is None else beta
    if backbone in RESNET50_ZOO_NAMES:
        if xi is not None:
            raise ValueError("xi: resnet50_mc splits its ResNet-50 channels into near-equal per-class "
                             "groups (no MC layer); xi cannot be set, got %r" % (xi,))
        net, groups = resnet50_mc(num_classes, width, pretrained, ctx=ctx,
                                  zoo_name=RESNET50_ZOO_NAMES[backbone])
        if keep is None:
            keep = tuple(resnet50_keep(size) for _, size in groups)
        block = MCLoss(num_classes, groups, alpha=alpha, beta=beta, keep=keep, seed=seed)
        side = s3n_test_resize(image_size)[0]   # 600 for 448, scaled like upstream's 600 / 448
        return MCLossMethod(net, block, image_size, recipe=RESNET50_RECIPE,
                            transform=dict(resize=(side, side), train_crop="resize_random", pad=0),
                            classifier_lr_mult=RESNET50_CLASSIFIER_LR_MULT)
    xi = 3 if xi is None else check_int(xi, "xi", minimum=1)
    net = _NETWORKS[backbone](num_classes, xi, width, ctx=ctx)
    block = MCLoss(num_classes, xi, alpha=alpha, beta=beta, keep=keep, seed=seed)
    return MCLossMethod(net, block, image_size)


register_method(
    "mcloss", build_method,
    knobs=[Knob("xi", int, None, "channels per class of the MC layers (default 3; resnet50_mc: none, "
                "its 2048 channels split into near-equal groups, 152x10 + 48x11 for 200 classes)",
                minimum=1),
           Knob("alpha", float, None, "weight of L_dis (default: the backbone's upstream one, 1.5; "
                "resnet50_mc 0.0005)", minimum=0.0),
           Knob("beta", float, None, "weight of L_div (default: the backbone's upstream one, 20; "
                "resnet50_mc 0.005 = 0.0005 x 10, on the sum of its two groups' terms)", minimum=0.0),
           Knob("width", float, 1.0, "width multiplier of the non-MC convs (> 0; demo 0.25; "
                "resnet50_mc: of every conv, 1 with --pretrained)", minimum=0.01)],
    recipe=RECIPE,
    demo=dict(backbone="resnet18_mc", width=0.25, image_size=32, lr=0.05),
    pretrained=False,
    backbones=BACKBONES,
    backbone_recipes={"resnet50_mc": RESNET50_RUN, "resnet50_v1_mc": RESNET50_V1_RUN},
    summary="Mutual-Channel loss (TIP 2020): CE + alpha L_dis + beta L_div on c*xi-channel features "
            "(resnet50_mc: ImageNet ResNet-50, its 2048 channels in per-class groups)")
