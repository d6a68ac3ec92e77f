"""Robust image loading shared by every dataset reader.

``load_image(path)`` returns an H×W×3 uint8 RGB NDArray (mxnet's OpenCV
decoder, ``mx.image.imdecode``) or raises :class:`UserError` naming the file:
missing, empty, not an image, corrupt, or TRUNCATED. Decoders happily return
a partial (grey-filled) picture for a truncated JPEG, so before decoding we
check the container is complete (:func:`check_image_bytes`):

- JPEG must start with SOI ``FF D8`` and end with EOI ``FF D9`` (trailing
  zero / whitespace padding, which some writers append, is tolerated);
- PNG must end with its ``IEND`` chunk; GIF with the ``;`` trailer;
- other formats (BMP, ...) are left to the decoder.

:class:`ImageListDataset` is the base of every file-based reader: a list of
paths, labels and optional crop boxes. With ``skip_bad_images=True`` the
files are verified UP FRONT at construction with the cheap check above
(exists, non-empty, recognised and complete container: no decoding), and bad
ones are dropped from the list and recorded in ``.skipped``. Dropping at
construction keeps the dataset length and order fixed for the whole run (what
exact resume needs: the same index always means the same image). A file that
passes the cheap check but still fails to decode is reported when it is
loaded; with ``skip_bad_images=True`` it is then replaced by the next
loadable item (deterministic: index + 1, + 2, ... modulo the length) and
appended to ``.skipped`` (in the loading process; a DataLoader worker's list
is its own, the warning is printed either way).
"""
import json
import os
import warnings

import numpy as np
import mxnet as mx
from mxnet.gluon.data import Dataset
from scipy.io import loadmat

from .errors import UserError

JPEG_SOI = b"\xff\xd8"
JPEG_EOI = b"\xff\xd9"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_IEND = b"IEND\xaeB`\x82"
GIF_SIGNATURES = (b"GIF87a", b"GIF89a")
# bytes some encoders/copy tools leave after the end marker
TRAILING_PADDING = b"\x00\r\n\t "
# ImageNet statistics of 0-1 RGB pixels (model-zoo weights expect them)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEAD_BYTES, TAIL_BYTES = 16, 4096  # what check_image reads of a file


def check_image_bytes(data):
    """Cheap completeness check of an encoded image.

    Returns None when the bytes look like a complete image (or a format we do
    not inspect), else a short reason string ("truncated JPEG: no end marker
    FFD9", ...). Never decodes.
    """
    if len(data) == 0:
        return "empty file"
    if data[:2] == JPEG_SOI:
        if not data.rstrip(TRAILING_PADDING).endswith(JPEG_EOI):
            return "truncated JPEG: the file does not end with the end-of-image marker FFD9"
        return None
    if data[:8] == PNG_SIGNATURE:
        if not data.rstrip(TRAILING_PADDING).endswith(PNG_IEND):
            return "truncated PNG: the file does not end with the IEND chunk"
        return None
    if data[:6] in GIF_SIGNATURES:
        if not data.rstrip(TRAILING_PADDING).endswith(b";"):
            return "truncated GIF: the file does not end with the trailer byte 3B"
        return None
    return None


def _read_bytes(path):
    if not os.path.isfile(path):
        raise UserError("%s: image file not found" % path)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise UserError("%s: expected a readable image file (%s)" % (path, err))


def check_image(path):
    """None when ``path`` exists and passes :func:`check_image_bytes`, else the reason."""
    if not os.path.isfile(path):
        return "image file not found"
    try:
        # only the signature and the end marker matter: read head and tail, not the file
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(0)
            if size <= HEAD_BYTES + TAIL_BYTES:
                data = f.read()
            else:
                head = f.read(HEAD_BYTES)
                f.seek(size - TAIL_BYTES)
                data = head + f.read()
    except OSError as err:
        return "unreadable (%s)" % err
    return check_image_bytes(data)


def decode_image(data, source="<bytes>"):
    """Encoded bytes -> H×W×3 uint8 RGB NDArray, UserError naming ``source`` if bad."""
    reason = check_image_bytes(data)
    if reason is not None:
        raise UserError("%s: expected a complete image file, got %s" % (source, reason))
    try:
        image = mx.image.imdecode(data, flag=1, to_rgb=True)
    except mx.base.MXNetError:
        image = None
    if image is None or image.ndim != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise UserError("%s: expected a JPEG/PNG/BMP/GIF image, the decoder could not read it "
                        "(corrupt or not an image)" % source)
    return image


def load_image(path):
    """Read ``path`` into an H×W×3 uint8 RGB NDArray (grey images are replicated).

    Raises UserError naming the file when it is missing, empty, truncated or
    cannot be decoded.
    """
    return decode_image(_read_bytes(path), source=path)


def crop_box(image, box, source="<image>"):
    """Crop ``box`` = (x, y, w, h) in pixels (floats are rounded), clipped to the image.

    image: H×W×3 NDArray; returns h'×w'×3. UserError when the clipped box is empty.
    """
    height, width = image.shape[:2]
    x, y, w, h = (float(v) for v in box)
    x0, y0 = max(int(round(x)), 0), max(int(round(y)), 0)
    x1, y1 = min(int(round(x + w)), width), min(int(round(y + h)), height)
    if x1 <= x0 or y1 <= y0:
        raise UserError("%s: crop box [x, y, w, h] = %s lies outside the %dx%d image"
                        % (source, list(box), width, height))
    return image[y0:y1, x0:x1]


class ImageListDataset(Dataset):
    """Images listed by path, with labels and optional crop boxes.

    Items are ``(image, label)``: image H×W×3 uint8 RGB NDArray (cropped to
    the item's box when boxes are given), label as stored (a float32 vector
    for attributes, an int for classes).

    Parameters
    ----------
    paths : list of str, image files.
    labels : list/array, one label per path.
    boxes : None or list of (x, y, w, h) (None entries = whole image).
    skip_bad_images : bool, default False. False: a bad image raises
        UserError when loaded. True: verify every file up front (cheap check,
        see module doc), drop the bad ones and record them in ``skipped``;
        an image that still fails at load time is replaced by the next good
        index and recorded too.
    source : str, the annotation file the list came from (for messages).
    limit : None or int, keep only the first ``limit`` items (before verification).
    """

    def __init__(self, paths, labels, boxes=None, skip_bad_images=False, source=None, limit=None):
        if len(paths) != len(labels):
            raise ValueError("%d paths but %d labels" % (len(paths), len(labels)))
        if boxes is not None and len(boxes) != len(paths):
            raise ValueError("%d paths but %d boxes" % (len(paths), len(boxes)))
        if limit is not None:
            paths, labels = paths[:limit], labels[:limit]
            boxes = None if boxes is None else boxes[:limit]
        self.source = source
        self.skip_bad_images = skip_bad_images
        #: list of (path, reason) of the images left out
        self.skipped = []
        keep = list(range(len(paths)))
        if skip_bad_images:
            keep = []
            for i, path in enumerate(paths):
                reason = check_image(path)
                if reason is None:
                    keep.append(i)
                else:
                    self.skipped.append((path, reason))
        self.paths = [paths[i] for i in keep]
        self.labels = [labels[i] for i in keep]
        self.boxes = None if boxes is None else [boxes[i] for i in keep]
        if skip_bad_images and self.skipped:
            warnings.warn("%s: skipped %d bad image(s), e.g. %s (%s)"
                          % (source or "image list", len(self.skipped), *self.skipped[0]))
        if not self.paths:
            raise UserError("%s: expected at least one usable image, got none%s"
                            % (source or "image list",
                               " (%d skipped as bad)" % len(self.skipped) if self.skipped else ""))

    @property
    def num_skipped(self):
        """How many images were left out (up front or at load time)."""
        return len(self.skipped)

    def __len__(self):
        return len(self.paths)

    def _load(self, idx):
        image = load_image(self.paths[idx])
        if self.boxes is not None and self.boxes[idx] is not None:
            image = crop_box(image, self.boxes[idx], source=self.paths[idx])
        return image

    def __getitem__(self, idx):
        if not self.skip_bad_images:
            return self._load(idx), self.labels[idx]
        for step in range(len(self.paths)):
            j = (idx + step) % len(self.paths)
            try:
                return self._load(j), self.labels[j]
            except UserError as err:
                self.skipped.append((self.paths[j], str(err)))
                warnings.warn("skipping bad image at load time: %s" % err)
        raise UserError("%s: no loadable image left" % (self.source or "image list"))


class ArrayImageDataset(Dataset):
    """In-memory grey or colour images (N×H×W or N×H×W×3 uint8 numpy) with labels.

    Items are ``(H×W×3 uint8 NDArray, label)``; grey images are replicated to
    three channels on access (not up front, to keep memory at one byte per pixel).
    """

    def __init__(self, images, labels):
        if len(images) != len(labels):
            raise ValueError("%d images but %d labels" % (len(images), len(labels)))
        self.images = images
        self.labels = labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, idx):
        image = self.images[idx]
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        return mx.nd.array(image, dtype=np.uint8), self.labels[idx]


# ----------------------------------------------------------------------------- annotation files
# Small helpers every dataset reader (imbalanced_attr.data, fgvc_gluon.data) uses
# to open its annotation files with UserError messages naming the file.

def check_split(split, choices):
    """UserError unless ``split`` is one of ``choices``."""
    if split not in choices:
        raise UserError("split: expected one of %s, got %r" % (", ".join(choices), split))


def require_root(root, name):
    """The dataset directory ``root`` (UserError when missing or not given)."""
    if root is None:
        raise UserError("--data-dir: required for dataset %s" % name)
    if not os.path.isdir(root):
        raise UserError("%s: dataset directory not found" % root)
    return root


def open_text(path):
    """Open an annotation text file, UserError when it does not exist."""
    if not os.path.isfile(path):
        raise UserError("%s: file not found" % path)
    return open(path, "r")


def first_existing(candidates, what):
    """The first existing path of ``candidates``, else UserError listing them all."""
    for path in candidates:
        if os.path.exists(path):
            return path
    raise UserError("%s: not found (looked for %s)" % (what, ", ".join(candidates)))


def load_mat(path):
    """scipy.io.loadmat with UserError for a missing or unreadable file."""
    if not os.path.isfile(path):
        raise UserError("%s: file not found" % path)
    try:
        return loadmat(path)
    except Exception as err:  # scipy raises ValueError/TypeError/MatReadError on bad files
        raise UserError("%s: expected a MATLAB .mat file (%s)" % (path, err))


def load_json(path, expected):
    """json.load of ``path``; UserError naming the file and ``expected`` when it is not JSON."""
    try:
        with open_text(path) as f:
            return json.load(f)
    except ValueError as err:
        raise UserError("%s: expected %s (%s)" % (path, expected, err))


def mat_strings(cell):
    """Strings of a MATLAB cell/char array (any nesting, as loadmat returns them), in order."""
    if isinstance(cell, str):
        return [cell]
    if isinstance(cell, bytes):
        return [cell.decode()]
    array = np.asarray(cell)
    if array.dtype.kind in "US":
        return [str(v) for v in array.ravel()]
    out = []
    for item in array.ravel():
        out.extend(mat_strings(item))
    return out
