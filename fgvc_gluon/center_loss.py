"""Center loss (Wen et al., ECCV 2016) as ported by jxgu1016/MNIST_center_loss_pytorch.

``L_c = Σ_i ||x_i − c_{y_i}||² / 2 / B`` (B = batch size, or 1 with
``size_average=False``), returned with shape (1,) like upstream (CL-3).
The gradients are upstream's custom backward, not autograd's:

- features: ``g · (x_i − c_{y_i}) / B`` (g = incoming gradient);
- centers: ``Σ_{i: y_i=j} (c_j − x_i) / (1 + n_j) / B`` with n_j the count of
  class j in the batch (counts start at ONE: the paper's Eq. 4 update, CL-1),
  0 for classes absent from the batch, and the incoming gradient IGNORED
  (CL-2): ``λ · loss`` scales the feature gradient only.

Upstream's argument order is ``forward(label, feat)``; ours is
``(features, labels)`` (CL-4: features are flattened to B × D; float labels are
truncated to integers, as ``.long()`` does, by ``take`` / ``one_hot``).

Method (upstream demo): a network producing (features, logits), softmax cross
entropy + λ·center loss (λ = ``loss_weight`` = 1), the centers on their own
plain SGD at lr 0.5 (no momentum, no weight decay, fixed lr); the network on
SGD lr 0.001, momentum 0.9, wd 5e-4, lr ×0.8 every 20 epochs, 100 epochs,
batch 128, MNIST normalisation (0.1307, 0.3081), no augmentation. The demo
network (``backbone='lenet_pp'``, LeNet++ of the paper) has three stages of
two 5×5 convs (32, 64, 128 channels) with PReLU and a 2×2 max-pool, then
Dense(feat_dim=2) + PReLU as the features and a bias-free Dense(classes)
(upstream's Oct. 2018 update) as the classifier. Model-zoo backbones
(:data:`fgvc_gluon.zoo.BACKBONES`) use their ``features`` followed by the
same embedding and classifier; their feat_dim defaults to 512 (2 is the demo's
choice for plotting) and their image size to 448.

Shapes: images N×3×S×S (S = 28 for lenet_pp) -> ``net`` -> (features
N×feat_dim, logits N×K); :class:`CenterLoss` (features B×D, labels (B,)) ->
(1,); training_loss -> (N,); predict -> the logits (one branch,
``classifier``). The upstream settings are :data:`RECIPE`; ``defaults`` keys
are those of :class:`fgvc_gluon.task.FGVCTask`, as in the mcloss and baseline
methods. Wrong shapes and arguments raise ValueError naming the argument.

Gradient bookkeeping in the method: the centers' gradient ignores the incoming
gradient and is already divided by B, while the runtime calls
``trainer.step(B)`` (which divides by B again). The method therefore uses
``size_average=False`` (no division inside) and adds ``λ·||x_i − c_{y_i}||²/2``
to sample i's cross entropy, so after ``step(B)`` both gradients equal
upstream's ``size_average=True`` ones for the whole global batch of B
samples (B = ``StepBatch.global_size``, whatever the device slices and
workers: each slice adds its own samples' terms, and the centres' surrogate
is summed over the slices). The counts n_j are those of the whole global
batch (``begin_step`` counts ``StepBatch.global_label``; upstream counts over
its whole batch, CL-1), so the numbers do not depend on how the batch is
split over devices or workers. Outside the runner (no ``begin_step``) a slice
counts n_j over its own samples. ``--amp``: ``MakeLoss`` ignores the incoming
gradient, hence the loss scale too, while every trainer divides by it: the
centres' surrogate gradient is multiplied by ``StepBatch.loss_scale``, so the
centres' update does not depend on the loss scale.
"""
from collections import OrderedDict

import mxnet as mx
from mxnet import gluon, nd
from mxnet.gluon import nn

from training_runtime.images import IMAGENET_MEAN, IMAGENET_STD
from training_runtime.registry import Knob
from training_runtime.task import class_counts

from .registry import register_method
from .task import FGVCTask, InferenceBranch, ParamGroup, check_int, check_num_classes, optimisation_defaults
from .zoo import BACKBONES as ZOO_BACKBONES
from .zoo import check_backbone, initialize_new_layers, model_zoo_network

DEMO_BACKBONE = "lenet_pp"
BACKBONES = (DEMO_BACKBONE,) + ZOO_BACKBONES
DEMO_FEAT_DIM = 2
ZOO_FEAT_DIM = 512
DEMO_IMAGE_SIZE, ZOO_IMAGE_SIZE = 28, 448
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
#: upstream settings (jxgu1016/MNIST_center_loss_pytorch) as run-definition fields; image_size
#: None = derived from the backbone (28 for lenet_pp, 448 for a model-zoo network)
RECIPE = dict(backbone=DEMO_BACKBONE, image_size=None, lr=0.001, momentum=0.9, wd=5e-4,
              batch_size=128, epochs=100, schedule="step", lr_steps=[20, 40, 60, 80], lr_factor=0.8)


def _center_loss_terms(features, centers, labels, denominator, counts=None, grad_scale=1.0):
    """Per-sample ||x_i − c_{y_i}||²/2/denominator, shape (B,), whose autograd gradients
    (of their sum) are upstream's.

    features B × D, centers K × D, labels (B,); counts: (K,) NDArray of the class counts
    n_j on the features' context (the whole batch's, e.g. over every device slice), or
    None: counted over ``labels``; grad_scale: the factor of the centres' gradient (the
    loss scale of ``--amp``; see below). Built from ordinary recorded ops (no custom
    autograd.Function, whose Python callbacks run on MXNet's engine thread):

    - the value and the feature gradient come from ||x_i − stop(c_{y_i})||²/2/denominator,
      so the features get g·(x − c_y)/denominator;
    - the centers get their gradient through ``MakeLoss``, whose backward is
      ``grad_scale`` whatever the incoming gradient g (CL-2), applied to the surrogate
      Σ_i ||stop(x_i) − c_{y_i}||² / (2·(1 + n_{y_i})·denominator), whose
      derivative is Σ_{i: y_i=j} (c_j − x_i)/(1 + n_j)/denominator (CL-1);
      ``surrogate − stop(surrogate)`` (a (1,) zero, broadcast) adds 0 to the values.
    """
    centers_batch = nd.take(centers, labels)  # B × D
    scale = 1.0 / (2.0 * denominator)
    feature_term = nd.sum(nd.square(features - nd.BlockGrad(centers_batch)), axis=1) * scale  # (B,)
    if counts is None:
        counts = nd.sum(nd.one_hot(labels, centers.shape[0]), axis=0)  # (K,): n_j of the slice
    per_sample_counts = nd.BlockGrad(1.0 + nd.take(counts, labels))  # (B,): 1 + n_{y_i}
    squared = nd.sum(nd.square(nd.BlockGrad(features) - centers_batch), axis=1)  # (B,)
    # MakeLoss passes grad_scale backwards (not the incoming gradient), so everything the
    # centres' gradient needs is inside it
    surrogate = nd.MakeLoss(nd.sum(squared / per_sample_counts).reshape((1,)) * scale,
                            grad_scale=float(grad_scale))
    return nd.broadcast_add(feature_term, surrogate - nd.BlockGrad(surrogate))


class CenterLoss(gluon.Block):
    """``loss(features B×D (or B×...), labels (B,))`` → shape (1,), with upstream's gradients.

    The centers are ``self.centers`` (K × D, N(0, 1) init like torch.randn),
    a Parameter named ``<prefix>centers`` so they can go on their own Trainer.
    """

    def __init__(self, num_classes, feat_dim, size_average=True, **kwargs):
        super(CenterLoss, self).__init__(**kwargs)
        self.num_classes, self.feat_dim = int(num_classes), int(feat_dim)
        self.size_average = bool(size_average)
        with self.name_scope():
            self.centers = self.params.get("centers", shape=(self.num_classes, self.feat_dim),
                                           init=mx.init.Normal(1.0))

    def _checked(self, features, labels, counts, grad_scale):
        batch = features.shape[0]
        features = features.reshape((batch, -1))
        if features.shape[1] != self.feat_dim:
            raise ValueError("CenterLoss features: expected %d values per sample (feat_dim), got %d"
                             % (self.feat_dim, features.shape[1]))
        if labels.shape != (batch,):
            raise ValueError("CenterLoss labels: expected shape (%d,), got %s" % (batch, labels.shape))
        if counts is not None:
            if not isinstance(counts, nd.NDArray):
                counts = nd.array(counts, dtype="float32")
            if counts.shape != (self.num_classes,):
                raise ValueError("CenterLoss counts: expected shape (%d,) (num_classes), got %s"
                                 % (self.num_classes, counts.shape))
            counts = counts.as_in_context(features.context).astype(features.dtype, copy=False)
        if not float(grad_scale) > 0:
            raise ValueError("CenterLoss grad_scale: expected a positive number, got %r" % (grad_scale,))
        return features, counts, batch if self.size_average else 1

    def per_sample(self, features, labels, counts=None, grad_scale=1.0):
        """Per-sample terms (B,) whose sum is :meth:`forward`'s value, with its gradients.

        counts: (K,) class counts n_j of the whole batch (numpy or NDArray; the runtime's
        global batch, ``StepBatch.global_label``), default None: counted over ``labels``;
        grad_scale: multiplies the centres' gradient (``StepBatch.loss_scale`` under --amp).
        """
        features, counts, denominator = self._checked(features, labels, counts, grad_scale)
        return _center_loss_terms(features, self.centers.data(features.context), labels, denominator,
                                  counts, grad_scale)

    def forward(self, features, labels, counts=None, grad_scale=1.0):
        """Shape (1,); ``counts`` and ``grad_scale`` as in :meth:`per_sample` (positional)."""
        return nd.sum(self.per_sample(features, labels, counts, grad_scale)).reshape((1,))


class CenterLossNetwork(gluon.HybridBlock):
    """backbone → Dense(feat_dim) + PReLU (features) → bias-free Dense(classes) (logits).

    ``net(x)`` → (features N × feat_dim, logits N × classes).
    """

    def __init__(self, backbone, num_classes, feat_dim, **kwargs):
        super(CenterLossNetwork, self).__init__(**kwargs)
        with self.name_scope():
            self.backbone = backbone
            self.embedding = nn.HybridSequential(prefix="embedding_")
            with self.embedding.name_scope():
                self.embedding.add(nn.Flatten(), nn.Dense(feat_dim), nn.PReLU())
            self.output = nn.Dense(num_classes, use_bias=False, prefix="output_")

    def hybrid_forward(self, F, x):
        features = self.embedding(self.backbone(x))
        return features, self.output(features)


def lenet_plus_plus():
    """The upstream demo's conv stack: 3 × (two 5×5 convs + PReLU, 2×2 max-pool)."""
    body = nn.HybridSequential(prefix="lenet_pp_")
    with body.name_scope():
        for channels in (32, 64, 128):
            body.add(nn.Conv2D(channels, 5, padding=2), nn.PReLU(),
                     nn.Conv2D(channels, 5, padding=2), nn.PReLU(),
                     nn.MaxPool2D(pool_size=2, strides=2))
    return body


class CenterLossMethod(FGVCTask):
    """Softmax CE + λ·center loss; the centers on their own fixed-lr SGD Trainer."""

    name = "centerloss"  # the registered method name
    picture_images = 1000

    def __init__(self, net, center_loss, loss_weight, center_lr, image_size, normalisation):
        self.net = net
        self.center_loss = center_loss
        self.loss_weight = float(loss_weight)
        self.center_lr = float(center_lr)
        self._ce = gluon.loss.SoftmaxCrossEntropyLoss()
        self._step = None  # (class counts (K,), loss scale) of the current step (begin_step)
        mean, std = normalisation
        self.defaults = dict(
            optimisation_defaults(RECIPE),
            image_size=image_size, resize=None, train_crop="resize", crop_scale=None,
            pad=0, flip=False, mean=mean, std=std)

    def blocks(self):
        """``net`` and ``center_loss`` (the centers): the names train_fgvc.py always used."""
        return OrderedDict([("net", self.net), ("center_loss", self.center_loss)])

    def loss_blocks(self):
        return (self._ce,)

    def param_groups(self):
        return [ParamGroup("net", self.net.collect_params()),
                ParamGroup("centers", self.center_loss.collect_params(), lr_mult=1.0,
                           optimizer_params={"learning_rate": self.center_lr, "momentum": 0.0, "wd": 0.0},
                           follows_schedule=False)]

    def begin_step(self, batch):
        """The class counts n_j of the whole global batch (CL-1) and the loss scale."""
        self._step = (class_counts(batch.global_label, self.center_loss.num_classes), batch.loss_scale)

    def after_step(self, epoch):
        self._step = None

    def training_loss(self, data, label, index, epoch):
        """Per-sample CE_i + λ·||x_i − c_{y_i}||²/2, (N,): after ``step(B)`` the gradients are
        upstream's for the global batch of B samples (module docstring)."""
        label = self.class_labels(label)
        features, logits = self.net(data)
        counts, loss_scale = self._step if self._step is not None else (None, 1.0)
        # size_average=False: ||x_i − c||²/2 per sample; the centres' gradient is already Σ/(1 + n_j)
        center = self.center_loss.per_sample(features, label, counts, loss_scale)
        return self._ce(logits, label) + self.loss_weight * center

    def predict(self, data, epoch):
        return OrderedDict([("classifier", self.net(data)[1])])

    def inference_block(self, epoch):
        return InferenceBranch(lambda F, x, net: net(x)[1], self.net, prefix="exported_")

    def pictures(self, batches, directory, epoch):
        """RUN/pictures/centerloss_epoch<N>.png: features by class with the centers (PCA above 2-D)
        (:mod:`fgvc_gluon.pictures`)."""
        from .pictures import centerloss_pictures
        return centerloss_pictures(self, batches, directory, epoch)


def build_method(num_classes, backbone=RECIPE["backbone"], feat_dim=None, loss_weight=1.0, center_lr=0.5,
                 image_size=None, pretrained=False, ctx=None):
    """Center-loss method; feat_dim defaults to 2 for 'lenet_pp' (demo) and 512 for model-zoo backbones.

    image_size defaults to 28 (MNIST) for the demo network and 448 otherwise;
    loss_weight is λ (>= 0), center_lr the centers' fixed lr (>= 0).
    Everything is initialised on ``ctx`` (default cpu).
    """
    num_classes = check_num_classes(num_classes, "center_loss")
    check_backbone(backbone, BACKBONES, "center_loss")
    if backbone == DEMO_BACKBONE:
        if pretrained:
            raise ValueError("pretrained: the center-loss demo network (lenet_pp) has no pretrained weights")
        body = lenet_plus_plus()
        default_feat_dim, default_size = DEMO_FEAT_DIM, DEMO_IMAGE_SIZE
        normalisation = ((MNIST_MEAN,) * 3, (MNIST_STD,) * 3)
    else:
        body = model_zoo_network(backbone, pretrained).features
        default_feat_dim, default_size = ZOO_FEAT_DIM, ZOO_IMAGE_SIZE
        normalisation = (IMAGENET_MEAN, IMAGENET_STD)
    feat_dim = default_feat_dim if feat_dim is None else check_int(feat_dim, "feat_dim", minimum=1)
    image_size = default_size if image_size is None else check_int(image_size, "image_size", minimum=1)
    for name, value in (("loss_weight", loss_weight), ("center_lr", center_lr)):
        if not float(value) >= 0:
            raise ValueError("%s: expected a non-negative number, got %r" % (name, value))
    net = CenterLossNetwork(body, num_classes, feat_dim)
    initialize_new_layers(net, [net.embedding, net.output], pretrained, ctx)
    center_loss = CenterLoss(num_classes, feat_dim, size_average=False)
    center_loss.initialize(ctx=ctx or mx.cpu())
    return CenterLossMethod(net, center_loss, loss_weight, center_lr, image_size, normalisation)


register_method(
    "centerloss", build_method,
    knobs=[Knob("center_weight", float, 1.0, "lambda, the weight of the center loss", minimum=0.0,
                keyword="loss_weight"),
           Knob("center_lr", float, 0.5, "fixed lr of the centers (plain SGD)", minimum=0.0),
           Knob("feat_dim", int, None, "feature dimension (default: 2 for lenet_pp, 512 for "
                                       "model-zoo backbones)", minimum=1)],
    recipe=RECIPE,
    demo=dict(backbone=DEMO_BACKBONE, image_size=DEMO_IMAGE_SIZE, lr=0.01),
    pretrained=False,
    backbones=BACKBONES,
    summary="center loss (ECCV 2016): softmax CE + lambda center loss, LeNet++ with 2-D features")
