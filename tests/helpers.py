"""Helpers shared by several test modules (import them with ``from helpers import ...``).

- Fashion-MNIST training: :func:`fashion_mnist_tensors`, :func:`make_trainers`,
  :func:`train_steps`, :func:`seed_everything` (the short real-image training
  checks of the FGVC methods).
- Tiny images on disk: :func:`solid_image`, :func:`blocks_image`,
  :func:`coordinate_image`, :func:`write_image`, :func:`write_jpeg`; a bad one:
  :func:`corrupt_png_bytes` / :func:`write_corrupt_png` (passes the quick byte check, fails to decode).
- Gradients: :func:`central_difference`.

The golden reference cases and the fixtures stay in ``conftest.py``.
"""
import os
import struct
import zlib

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon, nd
from PIL import Image

from training_runtime.fashion_mnist import load_split

# ------------------------------------------------------------ Fashion-MNIST training


def fashion_mnist_tensors(data_dir, classes=(0, 1, 7, 8), per_class=64, size=32, mean=0.5, std=0.5,
                          shuffle=True):
    """Real images: N×3×size×size float32 (grayscale replicated, resized, normalised) and labels 0..len(classes)-1.

    The first ``per_class`` training images of each class in ``classes`` (ascending
    order); ``shuffle`` mixes them with a fixed seed, else they stay grouped by class.
    """
    images, labels = load_split("train", data_dir)
    picked = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in classes])
    if shuffle:
        np.random.RandomState(0).shuffle(picked)
    gray = nd.array(images[picked][:, None].astype(np.float32) / 255.0)
    resized = nd.contrib.BilinearResize2D(gray, height=size, width=size)
    data = (nd.tile(resized, (1, 3, 1, 1)) - mean) / std
    remap = {c: i for i, c in enumerate(classes)}
    return data, nd.array([remap[int(c)] for c in labels[picked]])


def make_trainers(method, lr, momentum=0.9, wd=5e-4):
    """One gluon.Trainer per ParamGroup, as train_fgvc.py does."""
    trainers = []
    for group in method.param_groups():
        params = {"learning_rate": lr * group.lr_mult, "momentum": momentum, "wd": wd}
        params.update(group.optimizer_params or {})
        trainers.append(gluon.Trainer(group.params, "sgd", params))
    return trainers


def train_steps(method, data, labels, steps, batch_size, lr):
    """SGD on ``method.training_loss``; returns the batch-mean loss of every step."""
    trainers = make_trainers(method, lr)
    losses = []
    num = data.shape[0]
    for step in range(steps):
        start = (step * batch_size) % num
        x, y = data[start:start + batch_size], labels[start:start + batch_size]
        with autograd.record():
            loss = method.training_loss(x, y, None, 0)
        loss.backward()
        for trainer in trainers:
            trainer.step(x.shape[0])
        losses.append(float(loss.mean().asscalar()))
    return np.array(losses)


def seed_everything(seed=0):
    mx.random.seed(seed)
    np.random.seed(seed)


# ------------------------------------------------------------ tiny images


def solid_image(height, width, colour):
    """height×width×3 uint8 image of one colour."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:] = colour
    return image


def blocks_image(height, width, colours):
    """Image split into vertical bands of solid colours (robust to JPEG)."""
    image = np.zeros((height, width, 3), np.uint8)
    bounds = np.linspace(0, width, len(colours) + 1).astype(int)
    for colour, x0, x1 in zip(colours, bounds[:-1], bounds[1:]):
        image[:, x0:x1] = colour
    return image


def coordinate_image(height, width, blue):
    """R = column % 256, G = row % 256, B = ``blue``: every pixel says where it is (exact with PNG)."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:, :, 0] = np.arange(width)[None, :] % 256
    image[:, :, 1] = np.arange(height)[:, None] % 256
    image[:, :, 2] = blue
    return image


def write_image(path, array, fmt="JPEG", **options):
    """Save ``array`` (H×W×3 uint8) with PIL, creating the parent directories; returns the path as str."""
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    Image.fromarray(array).save(str(path), fmt, **options)
    return str(path)


def write_jpeg(path, array, quality=95):
    """:func:`write_image` as a JPEG of the given quality."""
    return write_image(path, array, "JPEG", quality=quality)


def _png_chunk(kind, payload):
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xffffffff))


def corrupt_png_bytes(height=16, width=16):
    """A PNG whose header and IEND are valid (it passes images.check_image_bytes) but whose
    image data (IDAT, correct CRC) is not zlib data: only decoding it fails."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", b"not zlib data " * 8) + _png_chunk(b"IEND", b""))


def write_corrupt_png(path, height=16, width=16):
    """Write :func:`corrupt_png_bytes` to ``path`` (parents created); returns the path as str."""
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(str(path), "wb") as f:
        f.write(corrupt_png_bytes(height, width))
    return str(path)


# ------------------------------------------------------------ gradients


def central_difference(f, x, step=1e-6, indices=None):
    """d sum(f(x)) / dx by central differences, as a float64 array shaped like ``x``.

    ``f`` takes an array shaped like ``x`` (same dtype) and returns a number, a
    numpy array or an NDArray (summed). ``indices`` (index tuples or flat
    indices) restricts the differences to those entries; the others stay 0.
    """
    x = np.array(x)
    grad = np.zeros(x.shape, np.float64)
    if indices is None:
        indices = np.ndindex(*x.shape)
    for index in indices:
        if not isinstance(index, tuple):
            index = np.unravel_index(index, x.shape)
        plus, minus = x.copy(), x.copy()
        plus[index] += step
        minus[index] -= step
        grad[index] = (_total(f(plus)) - _total(f(minus))) / (2 * step)
    return grad


def _total(value):
    if hasattr(value, "asnumpy"):
        value = value.asnumpy()
    return float(np.sum(value))
