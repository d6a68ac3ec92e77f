"""The embedded real demo data: Fashion-MNIST read straight from its idx files.

Debian's ``dataset-fashion-mnist`` installs the four ``*-idx?-ubyte.gz`` files
under /usr/share/datasets/fashion-mnist. Gluon's own FashionMNIST class
rejects them and tries to download, so we read the idx format directly.

The attribute demo's labels, derived from the classes, live with the
attribute model (``imbalanced_attr.fashion_attributes``).
"""
import gzip
import os
import struct

import numpy as np

from .errors import UserError

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MISSING_HELP = ("Fashion-MNIST demo data not found in %s: install Debian's package "
                "dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or pass "
                "--data-dir DIR holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz")


def _read_idx(path, expected_dims):
    """Read one idx(.gz) file into a uint8 numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise UserError("%s: expected a readable idx file (%s)" % (path, err))
    if len(raw) < 4:
        raise UserError("%s: expected an idx file, got %d bytes" % (path, len(raw)))
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim != expected_dims:
        raise UserError("%s: expected an idx file of unsigned bytes with %d dimensions"
                        % (path, expected_dims))
    shape = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise UserError("%s: header promises %s values, file holds %d (truncated?)"
                        % (path, "x".join(map(str, shape)), data.size))
    return data.reshape(shape)


def find_files(data_dir=None):
    """Directory holding the four idx files, or a UserError saying how to get them."""
    data_dir = data_dir or DEFAULT_DIR
    for images, labels in SPLIT_FILES.values():
        for name in (images, labels):
            if not os.path.isfile(os.path.join(data_dir, name)):
                raise UserError(MISSING_HELP % data_dir)
    return data_dir


def load_split(split="train", data_dir=None):
    """(images N×28×28 uint8, labels (N,) int32) of one split ('train' or 'test')."""
    data_dir = find_files(data_dir)
    image_file, label_file = (os.path.join(data_dir, f) for f in SPLIT_FILES[split])
    images = _read_idx(image_file, 3)
    labels = _read_idx(label_file, 1).astype(np.int32)
    if len(images) != len(labels):
        raise UserError("%s: %d images but %s has %d labels"
                        % (image_file, len(images), label_file, len(labels)))
    return images, labels


SPLITS = ("train", "val", "trainval", "test")
VAL_SIZE = 10000  # the last 10,000 training images form 'val'


def split_arrays(split, data_dir=None, limit=None):
    """(N×28×28 uint8 images, (N,) int32 class labels) of one split of the demo:
    train = first 50,000 training images, val = last 10,000, trainval = all
    60,000, test = the 10,000 test images; ``limit`` keeps the first N."""
    if split not in SPLITS:
        raise UserError("split: expected one of %s, got %r" % (", ".join(SPLITS), split))
    images, classes = load_split("test" if split == "test" else "train", data_dir)
    cut = len(images) - VAL_SIZE
    if split == "train":
        images, classes = images[:cut], classes[:cut]
    elif split == "val":
        images, classes = images[cut:], classes[cut:]
    if limit is not None:
        images, classes = images[:limit], classes[:limit]
    if len(images) == 0:
        raise UserError("split %r of Fashion-MNIST is empty (limit=%s)" % (split, limit))
    return images, classes
