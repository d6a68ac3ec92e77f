"""S3N, Selective Sparse Sampling (Ding et al., ICCV 2019), ported to Gluon.

Upstream: ``Yao-DD/S3N`` (PyTorch 0.4.1), ``sss_net.py`` and ``losses.py``.
Design reference: ``docs/SPEC.md`` §2.2; the quirks S3N-1 … S3N-16 are those of
``tests/golden/MANIFEST.md`` (indexed in ``docs/SPEC.md``).

What lives here
---------------
- :func:`make_gaussian`, :func:`gaussian_kernel`, :func:`find_peaks`,
  :func:`create_grid`: the upstream helpers, one to one.
- :func:`generate_map`: class response maps → (zoomed, complementary) images.
  Vectorised over the batch and over the peaks: every one of the 31×31 grid
  positions is a candidate peak; a 0/1 peak mask decides which ones count.
  The Gaussian of a peak is separable, so the sum over peaks of
  ``w_i · K_i`` is one batched matrix product per map (see
  :func:`_sparse_attention`).
- :func:`resize_align_corners`: the bilinear align_corners resizes (CAMs h×w →
  31×31, sampling grid 31×31 → S×S) as two matrix products with the
  interpolation matrices, several times faster on CPU than
  ``contrib.BilinearResize2D`` (kept as ``resize_impl='mxnet'``, see
  :data:`RESIZE_IMPLS`).
- The sampling itself (:func:`bilinear_sample`): on CPU a multi-threaded
  kernel of our own (:mod:`fgvc_gluon.native`, built on first use), because
  MXNet 1.9.1's CPU ``BilinearSampler`` runs on one thread; the same formula,
  equal to float32 rounding; ``BilinearSampler`` on GPUs, without a C++
  compiler, and in exported graphs (see :data:`SAMPLER_IMPLS`).
- :class:`S3N`: the whole network (a HybridBlock; ``net(x, p[, uniforms])``).
- :func:`keyed_uniforms`: mode 1's U(0, 1) numbers per sample, keyed by (base, key).
- :func:`multi_smooth_loss`, :func:`smooth_loss`: the upstream criterion (they
  live in :mod:`fgvc_gluon.losses`, re-exported here).
- :class:`S3NMethod` / :func:`build_method`: the :class:`~fgvc_gluon.task.FGVCTask`
  registered as 's3n' (upstream settings in :data:`RECIPE`).

Shapes: images N×3×S×S; backbone features N×F×h×w; class response maps and
saliency maps on the 31×31 grid; the network returns four N×K logits
(concat, raw, zoom, complementary); training_loss -> (N,); predict -> the
four branches, ``concat`` first. Wrong shapes, types and arguments raise
ValueError or TypeError naming the argument.

Behaviour that differs from upstream (each documented where it happens)
-----------------------------------------------------------------------
- Crash cases (S3N-1, S3N-2): a decide map without peaks, and a constant decide
  map (0/0 in the min-max normalisation), raise NameError upstream. Here both
  give maps of only ``base_ratio`` for Q_d and Q_c (the "fixed" upstream
  behaviour of the golden cases); a constant map is treated as having no peak.
- Mode p = 1 compares each peak's score with a U(0, 1) number of its own,
  one per grid position (N×961 ``uniforms``), instead of Python's
  ``random.uniform`` once per peak; the distribution of the decisions is the
  same. The method (:class:`S3NMethod`) computes them on the host
  (:func:`keyed_uniforms`): in training from a per-step base drawn from
  numpy (the runtime reseeds numpy before every step) and each sample's
  dataset index, in an evaluation from a per-evaluation base (numpy, reseeded
  before every evaluation) and the sample's position in the evaluation split.
  A sample's decisions therefore do not depend on how the batch is split over
  devices or workers. Without ``uniforms`` (:func:`generate_map`, ``net(x, 1)``,
  ``predict`` outside an evaluation, the exported graph) they are drawn from
  MXNet's random generator (``mx.random.seed`` makes them reproducible), one
  draw per call: a single exported graph sees whole batches.
- The class response maps, and the decide maps and peaks made from them, are
  computed in the network's dtype (float32 under ``--amp``, whose float16
  convolution gives the maps: they are cast back before map generation).
- The class response maps use the raw classifier's weights directly (no
  ``map_origin`` copy); the maps carry no gradient, as upstream (no_grad).
"""
import contextlib
import numbers
import sys
from collections import OrderedDict

import mxnet as mx
import numpy as np
from mxnet import gluon, nd
from mxnet.gluon import nn

from training_runtime.images import IMAGENET_MEAN, IMAGENET_STD
from training_runtime.registry import Knob

from .data import s3n_test_resize
from .losses import SMOOTH_RATIO, multi_smooth_loss, smooth_loss, smooth_ratio_knob
from .registry import register_method
from .task import FGVCTask, InferenceBranch, ParamGroup, check_int, check_num_classes, optimisation_defaults
from .zoo import RESNET_BACKBONES, check_backbone, features_without_pool, model_zoo_network

GRID_SIZE = 31            # side of the class response maps and saliency maps (S3N-10)
PADDING = 30              # replicate padding before the sampler's Gaussian filter
GLOBAL_SIZE = GRID_SIZE + 2 * PADDING
FILTER_SIZE = 2 * PADDING + 1
FILTER_FWHM = 13
GATE_THRESHOLD = -0.2     # sum of p log p over the top-5 classes (S3N-13)
GATE_TOP = 5
#: how S3N's bilinear align_corners resizes run (the CAMs h×w → 31×31 and the 31×31 sampling grid
#: → image size, as upstream's F.interpolate; both equal to float32 rounding): 'matmul' = two matrix
#: products with the interpolation matrices (fast, default), 'mxnet' = contrib.BilinearResize2D
#: (the former path)
RESIZE_IMPLS = ("matmul", "mxnet")
#: how the images are sampled at the grid: 'native' = fgvc_gluon.native's OpenMP kernel (CPU only),
#: 'mxnet' = BilinearSampler (one thread on CPU; MXNet's GPU kernel), 'auto' = native on CPU
#: contexts when it builds, else mxnet. Both give the same numbers to float32 rounding.
SAMPLER_IMPLS = ("auto", "native", "mxnet")
MODES = (0, 1, 2)
#: the backbones S3N accepts: the model-zoo ResNets (their last stage gives the N×F×h×w maps)
BACKBONES = RESNET_BACKBONES
#: upstream settings (Yao-DD/S3N demo/cub_s3n.yml) as run-definition fields; the backbone is
#: torchvision's ResNet-50 layout (GluonCV's resnet50_v1b; Gluon's resnet50_v1 is selectable)
RECIPE = dict(backbone="resnet50_v1b", image_size=448, lr=0.001, momentum=0.9, wd=1e-4, batch_size=16,
              epochs=60, schedule="step", lr_steps=[39], lr_factor=0.1)

__all__ = ["make_gaussian", "gaussian_kernel", "mean_threshold", "find_peaks", "create_grid", "generate_map",
           "multi_smooth_loss", "smooth_loss", "resize_align_corners", "RESIZE_IMPLS", "SAMPLER_IMPLS",
           "resolve_sampler_impl", "bilinear_sample", "keyed_uniforms", "S3N", "S3NMethod",
           "build_method", "BACKBONES", "RECIPE"]


# ----------------------------------------------------------------------------------------------
# Upstream helpers
# ----------------------------------------------------------------------------------------------

def make_gaussian(size, fwhm=3, center=None):
    """Upstream ``makeGaussian``: float64 numpy (size, size) (S3N-12).

    ``exp(-4 ln2 ((col - x0)^2 + (row - y0)^2) / fwhm^2)``; ``center=(x0, y0)``
    with x0 the column; None → ``size // 2`` for both.
    """
    if not isinstance(size, numbers.Integral) or size < 1:
        raise (ValueError if isinstance(size, numbers.Integral) else TypeError)(
            "make_gaussian size: expected a positive int, got %r" % (size,))
    cols = np.arange(0, size, 1, float)
    rows = cols[:, np.newaxis]
    if center is None:
        x0 = y0 = size // 2
    else:
        x0, y0 = center[0], center[1]
    return np.exp(-4 * np.log(2) * ((cols - x0) ** 2 + (rows - y0) ** 2) / fwhm ** 2)


def gaussian_kernel(theta, size, offset=None):
    """Upstream ``kernel_generate`` (S3N-11): size×size float32 NDArray, peak value 1.

    theta: NDArray (1,) (or a float), sigma = theta·size; offset = (x, y) =
    (column, row) of the centre, None → size // 2. The result is normalised by
    its max like upstream (the 1/(2πσ²) factor cancels there), and is
    differentiable with respect to theta.
    """
    if not isinstance(size, numbers.Integral) or size < 1:
        raise (ValueError if isinstance(size, numbers.Integral) else TypeError)(
            "gaussian_kernel size: expected a positive int, got %r" % (size,))
    if not isinstance(theta, nd.NDArray):
        theta = nd.array(np.reshape(np.asarray(theta, np.float32), (1,)))
    cols, rows = np.meshgrid(np.arange(0, size), np.arange(0, size))
    if offset is None:
        offset_x = offset_y = size // 2
    else:
        offset_x, offset_y = offset
    # built in float64 and cast, as upstream
    factor = nd.array(-(np.power(cols - offset_x, 2) + np.power(rows - offset_y, 2)) / 2,
                      ctx=theta.context, dtype=theta.dtype)
    sigma2 = nd.square(theta.reshape((1, 1)) * size)
    kernel = nd.exp(nd.broadcast_div(factor, sigma2))
    return nd.broadcast_div(kernel, nd.max(kernel).reshape((1, 1)))


def _peak_mask(F, maps, win_size, height, width):
    """Local maxima of N×C×H×W ``maps`` as a 0/1 map of the same shape (S3N-8).

    Like torch's max_pool2d argmax with −inf padding: a position is a peak if
    it is ≥ every neighbour in its window and > those that come before it in
    the window's row-major scan order (the first maximum wins ties, so a
    plateau yields one peak).
    """
    half = (win_size - 1) // 2
    padded = F.pad(maps, mode="constant", constant_value=-np.inf,
                   pad_width=(0, 0, 0, 0, half, half, half, half))
    peak = None
    for dy in range(win_size):
        for dx in range(win_size):
            if dy == half and dx == half:
                continue
            neighbour = F.slice(padded, begin=(None, None, dy, dx),
                                end=(None, None, dy + height, dx + width))
            before_centre = (dy, dx) < (half, half)
            wins = (maps > neighbour) if before_centre else (maps >= neighbour)
            peak = wins if peak is None else peak * wins
    if peak is None:                      # win_size 1: every position is its own maximum
        peak = F.ones_like(maps)
    return peak


def mean_threshold(maps, F=nd):
    """Upstream ``_mean_filter``: the spatial mean of each map, N×C×H×W → N×C×1×1."""
    return F.mean(maps, axis=(2, 3), keepdims=True)


def _above_mean(F, maps):
    """The mean filter's test: value ≥ the map's spatial mean, N×C×H×W 0/1."""
    return F.broadcast_greater_equal(maps, mean_threshold(maps, F))


def find_peaks(maps, win_size=3, mean_filter=True):
    """Upstream ``peak_stimulation`` (S3N-8, S3N-9).

    maps: N×C×H×W (numpy or NDArray). Returns ``(peaks, aggregation)``:
    peaks an int64 numpy array of rows (sample, channel, row, col) in
    torch.nonzero (row-major) order; aggregation an N×C NDArray, the mean of
    ``maps`` over the peaks of each map (0/0 = NaN for a map without peaks,
    as upstream). Under ``autograd.record()`` the gradient of aggregation is
    upstream's custom one, ``peak_map · g / (num_peaks + 1e-6)``.
    """
    if not isinstance(win_size, numbers.Integral) or win_size < 1 or win_size % 2 == 0:
        raise (ValueError if isinstance(win_size, numbers.Integral) else TypeError)(
            "find_peaks win_size: expected an odd positive int, got %r" % (win_size,))
    if not isinstance(maps, nd.NDArray):
        maps = nd.array(np.asarray(maps, np.float32))
    if maps.ndim != 4:
        raise ValueError("find_peaks maps: expected N×C×H×W, got shape %s" % (maps.shape,))
    height, width = maps.shape[2:]
    values = maps.detach()
    peak_map = _peak_mask(nd, values, win_size, height, width)
    if mean_filter:
        peak_map = peak_map * _above_mean(nd, values)
    peaks = np.argwhere(peak_map.asnumpy() > 0).astype(np.int64)
    counts = nd.sum(peak_map, axis=(2, 3))
    peak_sum = nd.sum(maps * peak_map, axis=(2, 3))
    # forward: sum / count; backward: upstream divides by count + 1e-6 (S3N-9)
    differentiable = peak_sum / (counts + 1e-6)
    aggregation = differentiable + nd.stop_gradient(peak_sum / counts - differentiable)
    return peaks, aggregation


# ----------------------------------------------------------------------------------------------
# The sampler ("learning to zoom") and the sparse attention maps
# ----------------------------------------------------------------------------------------------

def _default_filter(ctx, dtype):
    """The sampler's initial 1×1×61×61 Gaussian filter, makeGaussian(61, fwhm=13)."""
    weights = make_gaussian(FILTER_SIZE, fwhm=FILTER_FWHM).reshape(1, 1, FILTER_SIZE, FILTER_SIZE)
    return nd.array(weights, ctx=ctx, dtype=dtype)


def _filtered_moments(F, saliency_padded, filter_weight):
    """Upstream's ``self.filter`` applied to x, P_x·x and P_y·x: N×3×31×31 (S3N-7).

    x: N×1×91×91 padded saliency; P_x, P_y: the column and row coordinates
    (j − 30)/30, (i − 30)/30; filter: 1×1×61×61 (Conv2d, no bias, no
    padding). MXNet's CPU convolution is very slow for a 61×61 kernel, so the
    three filterings are ONE matrix product: with
    rows[n, oy, (ky, ix)] = x[n, oy + ky, ix] and the Toeplitz matrix
    T[(ky, ix), ox] = w[ky, ix − ox] (0 outside the kernel),
    filter(x) = rows·T, filter(P_x·x) = rows·(T ⊙ P_x[ix]) and, as
    P_y[oy + ky] = oy/30 + (ky − 30)/30,
    filter(P_y·x) = rows·(T ⊙ (ky − 30)/30) + oy/30 · filter(x).
    Gradients reach both the saliency and the filter.
    """
    scale = GRID_SIZE - 1.0
    index = F.contrib.arange_like(saliency_padded, axis=2)                             # 0..90
    out_index = F.slice_axis(index, axis=0, begin=0, end=GRID_SIZE)                    # 0..30
    kernel_index = F.slice_axis(index, axis=0, begin=0, end=FILTER_SIZE)               # 0..60
    # 31 row bands as slices: several times faster on CPU than one take with row_index
    rows = F.reshape(F.concat(*[F.slice_axis(saliency_padded, axis=2, begin=oy, end=oy + FILTER_SIZE)
                                for oy in range(GRID_SIZE)], dim=1),      # N×31×61×91
                     (-1, FILTER_SIZE * GLOBAL_SIZE))                      # (N·31)×(61·91)
    kx = F.broadcast_sub(F.reshape(index, (-1, 1)), F.reshape(out_index, (1, -1)))      # 91×31
    inside = (kx >= 0) * (kx < FILTER_SIZE)
    flat_index = F.broadcast_add(F.reshape(kernel_index * FILTER_SIZE, (-1, 1, 1)),
                                 F.expand_dims(F.clip(kx, 0, FILTER_SIZE - 1), axis=0))  # 61×91×31
    toeplitz = F.broadcast_mul(F.take(F.reshape(filter_weight, (-1,)), flat_index),
                               F.expand_dims(inside, axis=0))
    column_coord = F.reshape((index - PADDING) / scale, (1, -1, 1))                    # P_x[ix]
    row_offset = F.reshape((kernel_index - PADDING) / scale, (-1, 1, 1))              # (ky − 30)/30
    toeplitz = F.concat(toeplitz, F.broadcast_mul(toeplitz, column_coord),
                        F.broadcast_mul(toeplitz, row_offset), dim=2)                   # 61×91×93
    moments = F.dot(rows, F.reshape(toeplitz, (FILTER_SIZE * GLOBAL_SIZE, 3 * GRID_SIZE)))
    moments = F.transpose(F.reshape(moments, (-1, GRID_SIZE, 3, GRID_SIZE)), axes=(0, 2, 1, 3))
    weight_sum = F.slice_axis(moments, axis=1, begin=0, end=1)
    sum_x = F.slice_axis(moments, axis=1, begin=1, end=2)
    row_coord = F.reshape(out_index / scale, (1, 1, -1, 1))
    sum_y = F.slice_axis(moments, axis=1, begin=2, end=3) + F.broadcast_mul(weight_sum, row_coord)
    return weight_sum, sum_x, sum_y


def _saliency_grid(F, saliency_padded, filter_weight, like=None, out_size=None, resize_impl="matmul",
                   dtype="float32"):
    """Sampling grid of ``create_grid`` in BilinearSampler layout N×2×S×S, (x, y) channels.

    saliency_padded: N×1×91×91 (replicate-padded 31×31 saliency);
    filter_weight: 1×1×61×61; the grid is resized to ``out_size`` (int or
    (h, w)) or to the spatial size of ``like`` (bilinear, align_corners), by
    ``resize_impl``: 'matmul' (:func:`resize_align_corners`) or 'mxnet'
    (``contrib.BilinearResize2D``), see :data:`RESIZE_IMPLS`.
    """
    weight_sum, sum_x, sum_y = _filtered_moments(F, saliency_padded, filter_weight)
    mean_xy = F.broadcast_div(F.concat(sum_x, sum_y, dim=1), weight_sum)   # saliency-weighted mean
    grid = F.clip(mean_xy * 2 - 1, -1, 1)
    if out_size is None and like is not None and isinstance(like, nd.NDArray):
        out_size = like.shape[2:]
    if out_size is not None:
        height, width = (out_size, out_size) if isinstance(out_size, numbers.Integral) else out_size
        if resize_impl == "matmul":
            return resize_align_corners(F, grid, int(height), int(width), dtype)
        return F.contrib.BilinearResize2D(grid, height=height, width=width, align_corners=True)
    return F.contrib.BilinearResize2D(grid, like, mode="like", align_corners=True)


def _interpolation_matrix(F, like_axis, out_size, dtype):
    """Bilinear align_corners interpolation along one axis as an n×out_size matrix Rᵀ.

    like_axis: a 1-D array of length n (only its length is used, so the
    matrix can be built inside a symbol graph). Column i holds the weights of
    output position i: the source position is src_i = i·(n − 1)/(out_size − 1)
    and Rᵀ[k, i] = max(0, 1 − |src_i − k|), i.e. 1 − λ at floor(src_i) and λ
    at floor(src_i) + 1, as BilinearResize2D computes them.
    """
    source = F.contrib.arange_like(like_axis, axis=0)                          # 0..n−1
    step = F.max(source) / float(max(out_size - 1, 1))                         # (n − 1)/(out − 1)
    positions = F.broadcast_mul(F.arange(0, out_size, dtype=dtype), F.reshape(step, (1,)))
    distance = F.abs(F.broadcast_sub(F.reshape(source, (-1, 1)), F.reshape(positions, (1, -1))))
    return F.stop_gradient(F.relu(1 - distance))                                # n×out_size


def resize_align_corners(F, x, height, width, dtype="float32"):
    """Bilinear resize (align_corners=True) of N×C×h×w ``x`` to N×C×height×width.

    The interpolation of ``contrib.BilinearResize2D(align_corners=True)``
    (equal to float32 rounding), computed as two matrix products with the
    separable interpolation matrices: out[n, c] = R_h · x[n, c] · R_wᵀ
    (R_h height×h, R_w width×w). On this CPU it is several times faster than
    BilinearResize2D, forward and backward, for the 31→448 sampling grids.
    Works for nd and sym: h and w need not be known when the graph is built.
    """
    first = F.slice_axis(F.slice_axis(x, axis=0, begin=0, end=1), axis=1, begin=0, end=1)   # 1×1×h×w
    rows = F.reshape(F.slice_axis(first, axis=3, begin=0, end=1), (-1,))                   # h
    cols = F.reshape(F.slice_axis(first, axis=2, begin=0, end=1), (-1,))                   # w
    by_column = F.dot(F.transpose(x, axes=(0, 1, 3, 2)),
                      _interpolation_matrix(F, rows, height, dtype))           # N×C×w×height
    return F.dot(F.transpose(by_column, axes=(0, 1, 3, 2)),
                 _interpolation_matrix(F, cols, width, dtype))                 # N×C×height×width


def _check_resize_impl(resize_impl, owner):
    if resize_impl not in RESIZE_IMPLS:
        raise ValueError("%s resize_impl: expected one of %s, got %r" % (owner, ", ".join(RESIZE_IMPLS),
                                                                         resize_impl))
    return resize_impl


def resolve_sampler_impl(sampler_impl, contexts=None, owner="S3N"):
    """'native' or 'mxnet' for ``sampler_impl`` in :data:`SAMPLER_IMPLS` on ``contexts``
    (a Context or a list, default cpu). 'native' on a GPU context or without the built
    kernel raises ValueError saying why."""
    from . import native
    if sampler_impl not in SAMPLER_IMPLS:
        raise ValueError("%s sampler_impl: expected one of %s, got %r"
                         % (owner, ", ".join(SAMPLER_IMPLS), sampler_impl))
    if sampler_impl == "mxnet":
        return "mxnet"
    contexts = contexts if isinstance(contexts, (list, tuple)) else [contexts or mx.cpu()]
    on_cpu = all(ctx.device_type == "cpu" for ctx in contexts)
    if sampler_impl == "auto":
        return "native" if on_cpu and native.bilinear_sampler_available() else "mxnet"
    if not on_cpu:
        raise ValueError("%s sampler_impl 'native': the native sampler runs on CPU only, got %s"
                         % (owner, contexts))
    if not native.bilinear_sampler_available():
        raise ValueError("%s sampler_impl 'native': unavailable (%s)" % (owner, native.unavailable_reason()))
    return "native"


def _sampler_for_dtype(sampler_impl, dtype):
    """A resolved ``sampler_impl`` for data of ``dtype``: the native kernel is float32 only."""
    return "mxnet" if sampler_impl == "native" and np.dtype(dtype).name != "float32" else sampler_impl


def bilinear_sample(F, images, grid, sampler_impl="mxnet"):
    """BilinearSampler(images N×C×H×W, grid N×2×H'×W' (x, y) in [-1, 1]) -> N×C×H'×W'.

    ``sampler_impl`` is a resolved one ('native' or 'mxnet', :func:`resolve_sampler_impl`).
    """
    if sampler_impl == "native":
        return F.s3n_bilinear_sampler(images, grid)
    return F.BilinearSampler(images, grid)


def create_grid(saliency_padded, input_size, filter_weight=None, resize_impl="matmul"):
    """Upstream ``S3N.create_grid`` (S3N-7): N×1×91×91 padded saliency → N×S×S×2 grid.

    The last axis is (x, y) in [−1, 1]. ``input_size`` is the grid side S
    (int, or (h, w)); ``filter_weight`` (1×1×61×61) defaults to the initial
    makeGaussian(61, fwhm=13) filter; ``resize_impl``: see :data:`RESIZE_IMPLS`.
    """
    _check_resize_impl(resize_impl, "create_grid")
    if not isinstance(saliency_padded, nd.NDArray):
        saliency_padded = nd.array(np.asarray(saliency_padded, np.float32))
    if saliency_padded.ndim != 4 or saliency_padded.shape[1:] != (1, GLOBAL_SIZE, GLOBAL_SIZE):
        raise ValueError("create_grid saliency_padded: expected N×1×%d×%d, got shape %s"
                         % (GLOBAL_SIZE, GLOBAL_SIZE, saliency_padded.shape))
    if filter_weight is None:
        filter_weight = _default_filter(saliency_padded.context, saliency_padded.dtype)
    grid = _saliency_grid(nd, saliency_padded,
                          _as_data(filter_weight, saliency_padded.context, saliency_padded.dtype),
                          out_size=int(input_size) if np.isscalar(input_size) else tuple(input_size),
                          resize_impl=resize_impl, dtype=np.dtype(saliency_padded.dtype).name)
    return nd.transpose(grid, axes=(0, 2, 3, 1))


def _decide_maps(F, class_response_maps, num_classes, dtype):
    """Gate (S3N-13) and min-max normalisation of the class response maps.

    class_response_maps: N×K×31×31 (no gradient). Returns ``(scores, valid)``:
    scores N×961, the normalised decide map flattened row-major; valid (N,)
    1 where the decide map is not constant (a constant one has no peak,
    S3N-2: upstream divides 0 by 0 there).
    """
    top = min(GATE_TOP, num_classes)
    flat = F.reshape(class_response_maps, (0, 0, -1))                      # N×K×961
    # the spatial mean as a matrix product with 1/961 (MXNet's CPU mean is ~10× slower here)
    column = F.ones_like(F.slice_axis(F.slice_axis(flat, axis=0, begin=0, end=1), axis=1, begin=0, end=1))
    mean = F.dot(F.reshape(flat, (-1, GRID_SIZE ** 2)), F.reshape(column, (-1, 1)) / float(GRID_SIZE ** 2))
    probs = F.softmax(F.reshape(mean, (-1, num_classes)), axis=1)           # N×K
    top_probs, top_classes = F.topk(probs, axis=1, k=top, ret_typ="both", dtype=dtype)  # N×top
    gate = F.sum(top_probs * F.log(top_probs), axis=1)                      # N
    # one-hot selection of the top maps (exact: x·1 + 0s) instead of a per-sample gather
    top_maps = F.batch_dot(F.one_hot(top_classes, depth=num_classes, dtype=dtype), flat)  # N×top×961
    first_map = F.reshape(F.slice_axis(top_maps, axis=1, begin=0, end=1), (0, -1))
    decide = F.where(gate > GATE_THRESHOLD, first_map, F.mean(top_maps, axis=1))
    low = F.min(decide, axis=1, keepdims=True)
    span = F.max(decide, axis=1, keepdims=True) - low
    valid = span > 0
    scores = F.broadcast_div(F.broadcast_sub(decide, low), F.where(valid, span, F.ones_like(span)))
    return scores, F.reshape(valid, (-1,))


def _sparse_attention(F, scores, selected, weights_fn, theta_arg, scale, base_ratio):
    """Q = base_ratio + Σ_peaks w_i · K_i for every sample at once: N×31×31.

    scores, selected: N×961 (selected 0/1 marks the peaks that enter this
    map); weights_fn(scores) gives w_i, theta_arg(scores) the argument of the
    learnable scale (sqrt(s) or s), scale (1,) the radius. The kernel of a
    peak at (x_i, y_i) is exp(−((c − x_i)² + (r − y_i)²) / (2σ_i²)) with
    σ_i = scale · theta_arg(s_i) · 31, normalised to peak 1 (the
    ``gaussian_kernel`` formula); it factorises into a row and a column
    Gaussian, so the sum over the 961 candidate positions is one batched
    matrix product (N×961×31)ᵀ·(N×961×31).
    """
    is_selected = selected > 0
    # unselected positions get a harmless score of 1 so that σ² stays finite (no NaN in grads)
    safe = F.where(is_selected, scores, F.ones_like(scores))
    weights = F.where(is_selected, weights_fn(safe), F.zeros_like(safe))          # N×961
    sigma2 = F.square(F.broadcast_mul(theta_arg(safe), scale) * GRID_SIZE)          # N×961
    position = F.contrib.arange_like(scores, axis=1)                               # 961
    peak_row = F.floor(position / GRID_SIZE)
    peak_col = position - peak_row * GRID_SIZE
    axis = F.reshape(F.contrib.arange_like(F.slice_axis(scores, axis=1, begin=0, end=GRID_SIZE),
                                           axis=1), (1, GRID_SIZE))
    half_sq_row = -F.square(F.broadcast_sub(axis, F.reshape(peak_row, (-1, 1)))) / 2   # 961×31
    half_sq_col = -F.square(F.broadcast_sub(axis, F.reshape(peak_col, (-1, 1)))) / 2
    sigma2 = F.expand_dims(sigma2, axis=2)                                          # N×961×1
    gauss_row = F.exp(F.broadcast_div(F.expand_dims(half_sq_row, axis=0), sigma2))  # N×961×31
    gauss_col = F.exp(F.broadcast_div(F.expand_dims(half_sq_col, axis=0), sigma2))
    weighted_row = F.broadcast_mul(gauss_row, F.expand_dims(weights, axis=2))
    return F.batch_dot(weighted_row, gauss_col, transpose_a=True) + base_ratio        # N×31×31


def _mode_selection(F, scores, peaks, mode, dtype, uniforms=None):
    """Which peaks enter Q_d and Q_c for the mode array ``mode`` (1,) ∈ {0, 1, 2} (S3N-4).

    0: every peak into both; 1: a peak goes to Q_d if s > U(0, 1), else to
    Q_c (U: ``uniforms`` N×961, one per position; None: drawn here by MXNet's
    RNG); 2: the first highest-score peak to Q_d, the first lowest-score one
    to Q_c. Returns (to_zoom, to_complement, is_mode2), N×961 0/1 maps and a
    (1,) flag.
    """
    is_mode = [F.reshape(mode == value, (1, 1)) for value in MODES]
    if uniforms is None:
        uniforms = F.random.uniform_like(scores)
    to_zoom_random = peaks * (scores > uniforms)
    below = F.ones_like(scores) * -1.0      # scores are in [0, 1]: −1 / 2 never win
    above = F.ones_like(scores) * 2.0
    highest = F.one_hot(F.argmax(F.where(peaks > 0, scores, below), axis=1), depth=GRID_SIZE ** 2,
                        dtype=dtype)
    lowest = F.one_hot(F.argmin(F.where(peaks > 0, scores, above), axis=1), depth=GRID_SIZE ** 2,
                       dtype=dtype)
    to_zoom = (F.broadcast_mul(peaks, is_mode[0]) + F.broadcast_mul(to_zoom_random, is_mode[1])
               + F.broadcast_mul(highest * peaks, is_mode[2]))
    to_complement = (F.broadcast_mul(peaks, is_mode[0])
                     + F.broadcast_mul(peaks - to_zoom_random, is_mode[1])
                     + F.broadcast_mul(lowest * peaks, is_mode[2]))
    return to_zoom, to_complement, is_mode[2]


def _generate(F, images, class_response_maps, mode, radius, radius_inv, filter_weight,
              num_classes, base_ratio, out_size=None, dtype="float32", resize_impl="matmul",
              sampler_impl="mxnet", uniforms=None):
    """Core of :func:`generate_map`, written for both nd and sym (HybridBlock) use.

    images N×3×H×W, class_response_maps N×K×31×31, mode (1,), radius and
    radius_inv (1,), filter_weight 1×1×61×61, uniforms N×961 U(0, 1) of mode 1
    (None: drawn by MXNet's RNG). Returns a dict: ``zoom`` and
    ``complement`` (N×3×S×S), ``scores`` / ``peaks`` / ``to_zoom`` /
    ``to_complement`` (N×961: normalised decide map, 0/1 masks), ``xs`` /
    ``xs_inv`` (N×31×31 saliency), ``grid`` / ``grid_inv`` (N×2×S×S). ``sampler_impl``:
    'native' or 'mxnet' (resolved, see :func:`resolve_sampler_impl`).
    """
    class_response_maps = F.stop_gradient(class_response_maps)
    scores, valid = _decide_maps(F, class_response_maps, num_classes, dtype)
    maps = F.reshape(scores, (-1, 1, GRID_SIZE, GRID_SIZE))
    peaks = _peak_mask(F, maps, 3, GRID_SIZE, GRID_SIZE) * _above_mean(F, maps)
    peaks = F.broadcast_mul(F.reshape(peaks, (-1, GRID_SIZE ** 2)), F.reshape(valid, (-1, 1)))
    to_zoom, to_complement, is_mode2 = _mode_selection(F, scores, peaks, mode, dtype, uniforms)
    mode2 = F.broadcast_like(is_mode2, scores) > 0
    # p = 2 passes s, not sqrt(s), to the zoom radius (S3N-4)
    xs = _sparse_attention(F, scores, to_zoom, lambda s: s,
                           lambda s: F.where(mode2, s, F.sqrt(s)), radius, base_ratio)
    xs_inv = _sparse_attention(F, scores, to_complement, lambda s: 1 / s, F.sqrt,
                               radius_inv, base_ratio)
    result = {"scores": scores, "peaks": peaks, "to_zoom": to_zoom, "to_complement": to_complement,
              "xs": xs, "xs_inv": xs_inv}
    for name, saliency in (("", xs), ("_inv", xs_inv)):
        padded = F.pad(F.expand_dims(saliency, axis=1), mode="edge",
                       pad_width=(0, 0, 0, 0, PADDING, PADDING, PADDING, PADDING))
        grid = _saliency_grid(F, padded, filter_weight, like=images, out_size=out_size,
                              resize_impl=resize_impl, dtype=dtype)
        result["grid" + name] = grid
        result["zoom" if not name else "complement"] = bilinear_sample(F, images, grid, sampler_impl)
    return result


def _as_data(value, ctx, dtype="float32"):
    """NDArray of a gluon Parameter (on ``ctx``) or an NDArray/number as (1,), in ``dtype``."""
    if isinstance(value, gluon.Parameter):
        value = value.data(ctx)
    if isinstance(value, nd.NDArray):
        return value.as_in_context(ctx).astype(dtype, copy=False)
    return nd.array(np.reshape(np.asarray(value), (1,)), ctx=ctx, dtype=dtype)


def keyed_uniforms(base, keys, stream=0):
    """U(0, 1) numbers of mode p = 1, one row per key: float32 numpy len(keys) × 961.

    Row r depends only on (base, stream, keys[r]), so a sample's numbers are the same
    whichever batch or device slice it is in: it is the block of 961 outputs of one
    PCG64 stream (seeded by ``SeedSequence([base, stream])``) that starts at output
    ``keys[r]·961`` (``advance``: the blocks of distinct keys never overlap), each
    output's top 24 bits as a float32 in [0, 1). base: an int (drawn per step / per
    evaluation); keys: non-negative ints (dataset indices in training, positions in the
    evaluation split); stream: an int separating uses (0 training, 1 evaluation).
    """
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    cells = GRID_SIZE ** 2
    generator = np.random.PCG64(np.random.SeedSequence([int(base), int(stream)]))
    start = generator.state
    rows = np.empty((len(keys), cells), np.float32)
    for r, key in enumerate(keys):
        if key < 0:
            raise ValueError("keyed_uniforms keys: expected non-negative ints, got %d" % key)
        generator.state = start
        generator.advance(int(key) * cells)
        rows[r] = (generator.random_raw(cells) >> np.uint64(40)).astype(np.float32)
    return rows * np.float32(2.0 ** -24)


def _check_uniforms(uniforms, batch, ctx, dtype, owner):
    """``uniforms`` (numpy or NDArray, batch × 961) as an NDArray on ``ctx`` in ``dtype``."""
    if not isinstance(uniforms, nd.NDArray):
        uniforms = nd.array(np.asarray(uniforms, np.float32), ctx=ctx, dtype=dtype)
    if uniforms.shape != (batch, GRID_SIZE ** 2):
        raise ValueError("%s uniforms: expected %d×%d (one U(0, 1) per sample and grid position), "
                         "got shape %s" % (owner, batch, GRID_SIZE ** 2, uniforms.shape))
    return uniforms.as_in_context(ctx).astype(dtype, copy=False)


def generate_map(images, class_response_maps, p, base_ratio, radius, radius_inv,
                 filter_weight=None, return_details=False, resize_impl="matmul", sampler_impl="auto",
                 uniforms=None):
    """Upstream ``S3N.generate_map``: (zoomed, complementary) images, each N×3×S×S.

    images: N×3×S×S NDArray (gradients flow to it); class_response_maps:
    N×K×31×31 (no gradient, as upstream); p ∈ {0, 1, 2} the mode (S3N-4;
    p = 1 draws from MXNet's RNG: seed with ``mx.random.seed``);
    base_ratio: float; radius, radius_inv: NDArrays of shape (1,) or gluon
    Parameters (gradients flow to them); filter_weight: the sampler's
    1×1×61×61 filter (Parameter/NDArray), default makeGaussian(61, fwhm=13).
    A decide map without peaks (a constant one, S3N-1/2) gives saliency maps
    of only base_ratio. With ``return_details`` also returns a dict of the
    intermediates (see :func:`_generate`). ``resize_impl``: how the 31×31
    grid is resized to S×S, see :data:`RESIZE_IMPLS`; ``sampler_impl``: how the images
    are sampled, see :data:`SAMPLER_IMPLS`; ``uniforms``: N×961 U(0, 1) numbers of mode
    1 (numpy or NDArray, e.g. :func:`keyed_uniforms`), default drawn from MXNet's RNG.
    """
    _check_resize_impl(resize_impl, "generate_map")
    if not isinstance(images, nd.NDArray) or images.ndim != 4:
        raise (ValueError if isinstance(images, nd.NDArray) else TypeError)(
            "generate_map images: expected an N×C×H×W NDArray, got %r"
            % (getattr(images, "shape", type(images)),))
    if not isinstance(class_response_maps, nd.NDArray):
        class_response_maps = nd.array(np.asarray(class_response_maps), dtype=images.dtype)
    crm_shape = class_response_maps.shape
    if (len(crm_shape) != 4 or crm_shape[0] != images.shape[0]
            or crm_shape[2:] != (GRID_SIZE, GRID_SIZE)):
        raise ValueError("generate_map class_response_maps: expected %d×K×%d×%d, got shape %s"
                         % (images.shape[0], GRID_SIZE, GRID_SIZE, crm_shape))
    if p not in MODES:
        raise ValueError("generate_map p: expected 0, 1 or 2, got %r" % (p,))
    ctx, dtype = images.context, np.dtype(images.dtype).name
    sampler_impl = _sampler_for_dtype(resolve_sampler_impl(sampler_impl, ctx, "generate_map"), dtype)
    if filter_weight is None:
        filter_weight = _default_filter(ctx, dtype)
    if uniforms is not None:
        uniforms = _check_uniforms(uniforms, images.shape[0], ctx, dtype, "generate_map")
    result = _generate(nd, images, _as_data(class_response_maps, ctx, dtype),
                       nd.array([p], ctx=ctx, dtype=dtype),
                       _as_data(radius, ctx, dtype), _as_data(radius_inv, ctx, dtype),
                       _as_data(filter_weight, ctx, dtype), crm_shape[1], float(base_ratio),
                       dtype=dtype, resize_impl=resize_impl, sampler_impl=sampler_impl,
                       uniforms=uniforms)
    if return_details:
        return result["zoom"], result["complement"], result
    return result["zoom"], result["complement"]


# ----------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------

def _zoo_features(backbone, pretrained):
    """Model-zoo ResNet features without the global pooling, and their channel count."""
    check_backbone(backbone, BACKBONES, "S3N")
    features = features_without_pool(model_zoo_network(backbone, pretrained))
    depth = int(backbone[len("resnet"):].split("_")[0])
    return features, (512 if depth < 50 else 2048)


class S3N(gluon.HybridBlock):
    """The S3N network (SPEC §2.2, S3N-16): ``net(x, p[, uniforms])`` → (concat, raw, zoom,
    complementary).

    x: N×3×S×S images; p: mode 0/1/2 (int, or an NDArray (1,)); ``net(x, p, uniforms)``
    gives mode 1 its N×961 U(0, 1) numbers (see :meth:`forward`); outputs four
    N×num_classes logits. The backbone features (N×F×h×w) are applied three
    times with shared weights (raw, zoomed, complementary images); the class
    response maps are the raw classifier's weights applied as a 1×1 conv to
    the raw features (no gradient), resized to 31×31 (align_corners).
    ``backbone`` is a model-zoo ResNet name or a HybridBlock mapping images to
    N×F×h×w features (then pass ``num_features=F``). ``radius``,
    ``radius_inv`` and ``filter`` (the sampler's 61×61 Gaussian) are
    Parameters. ``image_size`` is the side of the zoomed images
    (upstream's task_input_size). ``resize_impl``: how the sampling grid is
    resized to image_size, see :data:`RESIZE_IMPLS`; ``sampler_impl``: how the
    images are sampled (:data:`SAMPLER_IMPLS`), resolved for ``ctx`` (the
    contexts the network will run on, default cpu) into ``self.sampler_impl``.
    """

    def __init__(self, num_classes, backbone=RECIPE["backbone"], pretrained=False, image_size=448,
                 radius=0.09, radius_inv=0.3, base_ratio=0.09, num_features=None, resize_impl="matmul",
                 sampler_impl="auto", ctx=None, **kwargs):
        super(S3N, self).__init__(**kwargs)
        self.resize_impl = _check_resize_impl(resize_impl, "S3N")
        self.sampler_impl = resolve_sampler_impl(sampler_impl, ctx)
        for name, value, minimum in (("num_classes", num_classes, 2), ("image_size", image_size, 1)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise TypeError("%s: expected an int >= %d for S3N, got %r" % (name, minimum, value))
            if value < minimum:
                raise ValueError("%s: expected an int >= %d for S3N, got %r" % (name, minimum, value))
        self.num_classes = num_classes
        self.image_size = image_size
        self.dtype = "float32"
        self.base_ratio = float(base_ratio)
        with self.name_scope():
            if isinstance(backbone, gluon.Block):
                if not num_features:
                    raise ValueError("S3N num_features: expected the channel count of the custom backbone")
                self.features = backbone
            else:
                self.features, zoo_features = _zoo_features(backbone, pretrained)
                num_features = num_features or zoo_features
            self.num_features = num_features
            self.radius = self.params.get("radius", shape=(1,), init=mx.init.Constant(radius))
            self.radius_inv = self.params.get("radius_inv", shape=(1,),
                                              init=mx.init.Constant(radius_inv))
            gaussian = make_gaussian(FILTER_SIZE, fwhm=FILTER_FWHM).astype(np.float32)
            self.filter = self.params.get("filter", shape=(1, 1, FILTER_SIZE, FILTER_SIZE),
                                          init=mx.init.Constant(gaussian.reshape(1, 1, FILTER_SIZE,
                                                                                 FILTER_SIZE)))
            # the raw classifier is held directly: its weights also make the class response maps
            self.raw_classifier_weight = self.params.get("raw_classifier_weight",
                                                         shape=(num_classes, num_features))
            self.raw_classifier_bias = self.params.get("raw_classifier_bias", shape=(num_classes,),
                                                       init="zeros")
            self.sampler_buffer = self._buffer("sampler_buffer_")
            self.sampler_classifier = nn.Dense(num_classes, in_units=num_features,
                                               prefix="sampler_classifier_")
            self.sampler_buffer1 = self._buffer("sampler_buffer1_")
            self.sampler_classifier1 = nn.Dense(num_classes, in_units=num_features,
                                                prefix="sampler_classifier1_")
            self.con_classifier = nn.Dense(num_classes, in_units=3 * num_features,
                                           prefix="con_classifier_")

    def _buffer(self, prefix):
        """Conv 3×3/2 (F → F, no bias) + BN + ReLU after the sampled branches' features."""
        block = nn.HybridSequential(prefix=prefix)
        with block.name_scope():
            block.add(nn.Conv2D(self.num_features, 3, strides=2, padding=1, use_bias=False,
                                in_channels=self.num_features),
                      nn.BatchNorm(in_channels=self.num_features),
                      nn.Activation("relu"))
        return block

    def cast(self, dtype):
        """Cast parameters (and the sampler's index arithmetic) to ``dtype``."""
        self.dtype = np.dtype(dtype).name
        self.sampler_impl = _sampler_for_dtype(self.sampler_impl, self.dtype)
        super(S3N, self).cast(dtype)

    def forward(self, x, p=0, uniforms=None):
        """Accept the mode as a Python int (converted to an NDArray (1,) on x's device).

        uniforms: N×961 U(0, 1) numbers of mode 1 (numpy or NDArray, e.g.
        :func:`keyed_uniforms`). With NDArrays the graph always takes them as an
        input (a hybridized graph has one input format): when not given, mode 1
        (or a mode given as an NDArray) draws them from MXNet's RNG and modes 0 / 2
        pass zeros, which they never read. With Symbols (export) and no
        ``uniforms`` the graph draws them itself (``random.uniform_like``).
        """
        if not isinstance(x, nd.NDArray):
            return super(S3N, self).forward(x, p) if uniforms is None else \
                super(S3N, self).forward(x, p, uniforms)
        mode = None
        if not isinstance(p, nd.NDArray):
            if p not in MODES:
                raise ValueError("S3N p: expected 0, 1 or 2, got %r" % (p,))
            mode = p
            p = nd.array([p], ctx=x.context, dtype=x.dtype)
        shape, dtype = (x.shape[0], GRID_SIZE ** 2), self.dtype
        if uniforms is not None:
            uniforms = _check_uniforms(uniforms, x.shape[0], x.context, dtype, "S3N")
        elif mode in (0, 2):
            uniforms = nd.zeros(shape, ctx=x.context, dtype=dtype)
        else:
            uniforms = nd.random.uniform(shape=shape, ctx=x.context, dtype=dtype)
        return super(S3N, self).forward(x, p, uniforms)

    def class_response_maps(self, F, features, weight, bias):
        """N×F×h×w features → N×K×31×31 CAMs of the raw classifier (no gradient), in the
        network's dtype (float32 unless cast: under --amp the float16 convolution's maps are
        cast back, so the decide maps and peaks are float32; a no-op otherwise)."""
        weight = F.stop_gradient(F.reshape(weight, (0, 0, 1, 1)))
        maps = F.Convolution(features, weight, F.stop_gradient(bias), kernel=(1, 1),
                             num_filter=self.num_classes)
        if self.resize_impl == "matmul":
            maps = resize_align_corners(F, maps, GRID_SIZE, GRID_SIZE, self.dtype)
        else:
            maps = F.contrib.BilinearResize2D(maps, height=GRID_SIZE, width=GRID_SIZE, align_corners=True)
        return F.stop_gradient(F.cast(maps, dtype=self.dtype))

    def hybrid_forward(self, F, x, p, uniforms=None, radius=None, radius_inv=None, filter=None,
                       raw_classifier_weight=None, raw_classifier_bias=None):
        feature_raw = self.features(x)
        pooled_raw = F.mean(feature_raw, axis=(2, 3))
        raw = F.FullyConnected(pooled_raw, raw_classifier_weight, raw_classifier_bias,
                               num_hidden=self.num_classes)
        maps = self.class_response_maps(F, feature_raw, raw_classifier_weight, raw_classifier_bias)
        sampled = _generate(F, x, maps, p, radius, radius_inv, filter, self.num_classes,
                            self.base_ratio, out_size=self.image_size, dtype=self.dtype,
                            resize_impl=self.resize_impl, sampler_impl=self.sampler_impl,
                            uniforms=uniforms)
        pooled_zoom = F.mean(self.sampler_buffer(self.features(sampled["zoom"])), axis=(2, 3))
        pooled_comp = F.mean(self.sampler_buffer1(self.features(sampled["complement"])), axis=(2, 3))
        zoom = self.sampler_classifier(pooled_zoom)
        comp = self.sampler_classifier1(pooled_comp)
        concat = self.con_classifier(F.concat(pooled_raw, pooled_zoom, pooled_comp, dim=1))
        return concat, raw, zoom, comp

    def param_groups(self):
        """Upstream's ``finetune`` groups (demo/cub_s3n.yml): OrderedDict name → [Parameter].

        'classifier' (the four classifiers, lr ×10), 'radius' (radius and
        radius_inv, ×1e-4), 'filter' (the sampler's Gaussian, ×1e-4), 'rest'
        (backbone and sampler buffers, ×1): see ``LR_MULTIPLIERS``.
        """
        classifier = [self.raw_classifier_weight, self.raw_classifier_bias]
        for block in (self.sampler_classifier, self.sampler_classifier1, self.con_classifier):
            classifier.extend(block.collect_params().values())
        groups = OrderedDict((("classifier", classifier), ("radius", [self.radius, self.radius_inv]),
                              ("filter", [self.filter])))
        grouped = set(id(param) for params in groups.values() for param in params)
        groups["rest"] = [param for param in self.collect_params().values() if id(param) not in grouped]
        return groups


class RawBranch(gluon.HybridBlock):
    """S3N's raw branch alone: N×3×S×S -> N×K logits (``net(x, p)[1]``, the same for every p)."""

    def __init__(self, net):
        # net's parameter dict is shared: the raw classifier's Parameters are net's own
        super(RawBranch, self).__init__(prefix=net.prefix, params=net.params)
        self._num_classes = net.num_classes
        with self.name_scope():
            self.raw_classifier_weight = self.params.get("raw_classifier_weight",
                                                         shape=net.raw_classifier_weight.shape)
            self.raw_classifier_bias = self.params.get("raw_classifier_bias",
                                                       shape=net.raw_classifier_bias.shape)
        self.features = net.features

    def hybrid_forward(self, F, x, raw_classifier_weight, raw_classifier_bias):
        pooled = F.mean(self.features(x), axis=(2, 3))
        return F.FullyConnected(pooled, raw_classifier_weight, raw_classifier_bias,
                                num_hidden=self._num_classes)


# ----------------------------------------------------------------------------------------------
# Method adapter
# ----------------------------------------------------------------------------------------------

LR_MULTIPLIERS = OrderedDict((("classifier", 10.0), ("radius", 1e-4), ("filter", 1e-4), ("rest", 1.0)))
STAGE_EPOCH = 20   # three_stage hook: epochs (0-based) <= 20 use the first mode


def training_mode(epoch):
    """Upstream three_stage, training: p = 0 for epochs ≤ 20 (0-based), then 1."""
    return 0 if epoch <= STAGE_EPOCH else 1


def evaluation_mode(epoch):
    """Upstream three_stage, evaluation: p = 1 (random!) for epochs ≤ 20, then 2."""
    return 1 if epoch <= STAGE_EPOCH else 2


def _random_base():
    """A base of :func:`keyed_uniforms` drawn from numpy's global generator (which the
    runtime reseeds before every step and every evaluation, identically on every worker)."""
    return int(np.random.randint(0, 2 ** 32, dtype=np.int64))


class S3NMethod(FGVCTask):
    """S3N as a task: the network, its parameter groups, loss and branches.

    Mode p = 1's random decisions are per sample and do not depend on the device
    split (module docstring): training rows are keyed by (the step's base,
    dataset index), drawn when the runtime calls ``begin_step``; evaluation rows
    by (the evaluation's base, position in the split), counted over the slices of
    an :meth:`evaluate` / :meth:`test_report` / :meth:`pictures` call in order.
    ``training_loss`` without ``begin_step`` (or without indices) and ``predict``
    outside an evaluation draw from MXNet's RNG, as the exported graph does.
    """

    name = "s3n"
    BRANCHES = ("concat", "raw", "zoom", "complementary")
    sync_batchnorm_unsafe = ("its backbone runs 3 times per forward (raw, zoom and complementary "
                             "views) and SyncBatchNorm pairs the devices' calls by arrival order")

    def __init__(self, net, smooth_ratio=SMOOTH_RATIO, loss_weight=None, image_size=RECIPE["image_size"]):
        self.net = net
        self.smooth_ratio = smooth_ratio
        self.loss_weight = loss_weight
        self._step_base = None     # keyed_uniforms base of the current training step (begin_step)
        self._evaluation = None    # [base, next position] during an evaluation
        # upstream update_lr(epoch_step=40) fires at the start of 0-based epoch 39: lr_steps [39]
        self.defaults = dict(optimisation_defaults(RECIPE))
        self.defaults.update({
            "image_size": image_size,
            "resize": s3n_test_resize(image_size),
            "train_crop": "random_resized", "crop_scale": (0.5, 1.0), "flip": True,
            "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
        })

    def param_groups(self):
        return [ParamGroup(name, params, LR_MULTIPLIERS[name])
                for name, params in self.net.param_groups().items() if params]

    def training_loss(self, data, label, index, epoch):
        """Per-sample multi_smooth_loss (N,) of the four outputs, mode p by the schedule.

        Upstream's loss is the batch mean of this; ``trainer.step(batch_size)``
        on the sum of the per-sample losses gives the same update.
        """
        label = self.class_labels(label)
        mode, uniforms = training_mode(epoch), None
        if mode == 1 and self._step_base is not None and index is not None:
            uniforms = keyed_uniforms(self._step_base, index.asnumpy(), stream=0)
        outputs = self.net(data, mode, uniforms)
        return multi_smooth_loss(outputs, label, self.smooth_ratio, self.loss_weight, per_sample=True)

    def begin_step(self, batch):
        """Mode 1 (epochs > 20): draw the step's base of the per-sample uniforms."""
        self._step_base = _random_base() if training_mode(batch.epoch) == 1 else None

    def after_step(self, epoch):
        self._step_base = None

    @contextlib.contextmanager
    def _evaluation_stream(self):
        """Within: ``predict`` numbers its samples from 0 under a base drawn now."""
        self._evaluation = [_random_base(), 0]
        try:
            yield
        finally:
            self._evaluation = None

    def evaluation_uniforms(self, data, epoch):
        """N×961 uniforms of the next N samples of the current evaluation (``data`` N×...),
        or None (no evaluation under way, or a mode other than 1); advances the count."""
        if self._evaluation is None:
            return None
        base, start = self._evaluation
        self._evaluation[1] += data.shape[0]
        if evaluation_mode(epoch) != 1:
            return None
        return keyed_uniforms(base, np.arange(start, start + data.shape[0]), stream=1)

    def predict(self, data, epoch):
        outputs = self.net(data, evaluation_mode(epoch), self.evaluation_uniforms(data, epoch))
        return OrderedDict(zip(self.BRANCHES, outputs))

    def evaluate(self, batches, epoch):
        with self._evaluation_stream():
            return super(S3NMethod, self).evaluate(batches, epoch)

    def test_report(self, batches, epoch, out=sys.stdout):
        with self._evaluation_stream():
            return super(S3NMethod, self).test_report(batches, epoch, out)

    def inference_block(self, epoch):
        """N×3×S×S -> the concat logits N×K at ``evaluation_mode(epoch)`` (the mode a
        constant of the graph; mode 1, epochs <= 20, draws its uniforms inside the graph from
        MXNet's RNG, as ``predict`` outside an evaluation does: an exported graph sees whole
        batches, so no device split is involved; modes 0 and 2 get N×961 zeros, which they
        never read, so that their graph holds no random operator and is deterministic).
        The graph samples with MXNet's BilinearSampler (``net.sampler_impl`` is set to
        'mxnet'), so that the exported files load without this package's native kernel
        (and BilinearSampler has an ONNX translation, training_runtime.onnx_ops)."""
        mode = float(evaluation_mode(epoch))
        self.net.sampler_impl = "mxnet"

        def concat(F, x, net):
            first = F.slice_axis(F.reshape(x, (-1,)), axis=0, begin=0, end=1)  # (1,)
            if mode == 1:
                return net(x, F.ones_like(first) * mode)[0]
            column = F.zeros_like(F.slice_axis(F.reshape(x, (0, -1)), axis=1, begin=0, end=1))  # N×1
            uniforms = F.broadcast_axis(column, axis=1, size=GRID_SIZE ** 2)                  # N×961
            return net(x, F.ones_like(first) * mode, uniforms)[0]
        return InferenceBranch(concat, self.net, prefix="exported_")

    def inference_subnetwork(self, epoch):
        return ("raw", RawBranch(self.net),
                "the raw branch only (backbone, global average pool, raw classifier): N×K logits "
                "of predict's 'raw' output; the sampler, zoom and complementary branches are missing")

    def pictures(self, batches, directory, epoch):
        """RUN/pictures/s3n_epoch<N>.png: inputs, class response maps with peaks, zoomed and complementary samples
        (:mod:`fgvc_gluon.pictures`)."""
        from .pictures import s3n_pictures
        with self._evaluation_stream():  # mode 1: the same decisions whatever the device split
            return s3n_pictures(self, batches, directory, epoch)


def build_method(num_classes, backbone=RECIPE["backbone"], pretrained=False, image_size=RECIPE["image_size"],
                 radius=0.09, radius_inv=0.3, base_ratio=0.09, smooth_ratio=SMOOTH_RATIO,
                 loss_weight=None, ctx=None, hybridize=True, sampler_impl="auto"):
    """S3N as an :class:`~fgvc_gluon.task.FGVCTask`, initialised on ``ctx`` (a context or a list;
    default cpu).

    New layers (and the backbone when not pretrained) are initialised Xavier
    (gaussian, 'in', magnitude 2); radius, radius_inv and filter start at
    their upstream values (CUB config: 0.09, 0.3, makeGaussian(61, 13)).
    radius, radius_inv: > 0; base_ratio: >= 0; smooth_ratio: [0, 1] or None
    (plain cross entropy on the smoothed branches); loss_weight: branch index
    -> weight (see :func:`multi_smooth_loss`); sampler_impl: see :data:`SAMPLER_IMPLS`
    (resolved for ``ctx``).
    """
    num_classes = check_num_classes(num_classes, "S3N")
    image_size = check_int(image_size, "image_size", minimum=1, owner="S3N")
    for name, value in (("radius", radius), ("radius_inv", radius_inv)):
        if not float(value) > 0:
            raise ValueError("%s: expected a positive initial scale, got %r" % (name, value))
    if not float(base_ratio) >= 0:
        raise ValueError("base_ratio: expected a non-negative value, got %r" % (base_ratio,))
    if smooth_ratio is not None and not 0.0 <= float(smooth_ratio) <= 1.0:
        raise ValueError("smooth_ratio: expected a value in [0, 1] or None, got %r" % (smooth_ratio,))
    net = S3N(num_classes, backbone=backbone, pretrained=pretrained, image_size=image_size,
              radius=radius, radius_inv=radius_inv, base_ratio=base_ratio, sampler_impl=sampler_impl,
              ctx=ctx)
    ctx = ctx or mx.cpu()
    net.initialize(mx.init.Xavier(rnd_type="gaussian", factor_type="in", magnitude=2), ctx=ctx)
    net.collect_params().reset_ctx(ctx)    # pretrained backbone weights are loaded on cpu only
    if hybridize:
        net.hybridize()
    return S3NMethod(net, smooth_ratio=smooth_ratio, loss_weight=loss_weight, image_size=image_size)


register_method(
    "s3n", build_method,
    knobs=[Knob("radius", float, 0.09, "initial radius (> 0)", minimum=1e-6),
           Knob("radius_inv", float, 0.3, "initial radius_inv (> 0)", minimum=1e-6),
           Knob("base_ratio", float, 0.09, "base ratio of the maps", minimum=0.0),
           smooth_ratio_knob(),
           Knob("sampler_impl", str, "auto", "image sampler: auto (native on CPU when it builds), "
                "native (fgvc_gluon.native's multi-threaded CPU kernel) or mxnet (BilinearSampler); "
                "same numbers to float32 rounding", choices=SAMPLER_IMPLS)],
    recipe=RECIPE,
    demo=dict(backbone="resnet18_v1", image_size=48, lr=0.001, train_limit=1000, val_limit=500),
    pretrained=True,
    backbones=BACKBONES,
    summary="Selective Sparse Sampling (ICCV 2019): zoomed and complementary views of a ResNet, "
            "four classifiers")
