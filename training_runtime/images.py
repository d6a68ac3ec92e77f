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
passes the cheap check but still fails to decode (e.g. a PNG with corrupt
image data that still ends with IEND) is reported when it is loaded: decoding
is synchronous (:func:`decode_image` waits for mxnet's decoder), so the error
names the file. With ``skip_bad_images=True`` such an item is replaced by the
next loadable item (deterministic: index + 1, + 2, ... modulo the length),
its index is remembered in ``.bad_indices`` (never tried again) and it is
appended to ``.skipped`` once, with one warning (in the loading process; a
DataLoader worker's list is its own, the warning is printed either way).

Annotation text files are read by :func:`open_text`: UTF-8, a leading BOM
stripped, and a UserError naming the file and the byte offset for any other
encoding. :func:`mat_strings`, :func:`mat_numbers` and :func:`mat_integers`
read MATLAB variables with UserErrors naming the file and the variable.
"""
import codecs
import io
import json
import math
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


def _decoder_reason(err):
    """The useful last line of an MXNetError from the image decoder (one line, short)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if last.startswith("MXNetError:"):
        last = last[len("MXNetError:"):].strip()
    if "Invalid image file." in last:
        last = last.split("Invalid image file.", 1)[1].strip() or "decoding failed"
    return last[:120] or "decoding failed"


def decode_image(data, source="<bytes>"):
    """Encoded bytes -> H×W×3 uint8 RGB NDArray, UserError naming ``source`` if bad.

    Decoding is finished here (``wait_to_read``): mxnet decodes asynchronously,
    and a file whose header is fine but whose image data is corrupt (a PNG with
    a damaged IDAT that still ends with IEND) would otherwise fail later, in
    whatever operation first reads the array, with no file named.
    """
    reason = check_image_bytes(data)
    if reason is not None:
        raise UserError("%s: expected a complete image file, got %s" % (source, reason))
    detail = ""
    try:
        image = mx.image.imdecode(data, flag=1, to_rgb=True)
        image.wait_to_read()
    except mx.base.MXNetError as err:
        image, detail = None, " (decoder: %s)" % _decoder_reason(err)
    if image is None or image.ndim != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise UserError("%s: expected a JPEG/PNG/BMP/GIF image, the decoder could not read it "
                        "(corrupt or not an image)%s" % (source, detail))
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
        #: index -> reason of the items found undecodable at load time (skip_bad_images=True)
        self.bad_indices = {}
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
        count = len(self.paths)
        if not -count <= idx < count:
            raise IndexError("image index %d out of range (%d images)" % (idx, count))
        idx %= count
        # an undecodable item is replaced by the next one (modulo the length) that loads:
        # deterministic, so the same index always gives the same image (exact resume)
        for step in range(count):
            j = (idx + step) % count
            if j in self.bad_indices:
                continue
            try:
                return self._load(j), self.labels[j]
            except UserError as err:
                self.bad_indices[j] = str(err)
                self.skipped.append((self.paths[j], str(err)))
                warnings.warn("skipping bad image at load time (item %d is replaced by the next "
                              "loadable one): %s" % (j, err))
        raise UserError("%s: no loadable image left (%d of %d failed to load)"
                        % (self.source or "image list", len(self.bad_indices), count))


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


def _encoding_guess(data):
    """A guess at the encoding of bytes that are not UTF-8, for the error message."""
    if data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) or data[:4] in (
            codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE):
        return "UTF-16/32?"
    if data.count(b"\x00") > len(data) // 8:
        return "UTF-16 or binary?"
    return "Latin-1?"


def read_text(path):
    """The text of an annotation file: UTF-8, a leading byte-order mark (utf-8-sig) dropped.

    UserError when the file is missing, unreadable or not UTF-8:
    ``<file>: expected UTF-8 text, got undecodable bytes at offset N (Latin-1?) on line L``.
    """
    if not os.path.isfile(path):
        raise UserError("%s: file not found" % path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise UserError("%s: expected a readable text file (%s)" % (path, err))
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = start + err.start
        raise UserError("%s: expected UTF-8 text, got undecodable bytes at offset %d (%s) on "
                        "line %d" % (path, offset, _encoding_guess(data),
                                     data.count(b"\n", 0, offset) + 1))
    # universal newlines, as open(path, "r") gives them
    return text.replace("\r\n", "\n").replace("\r", "\n")


def open_text(path):
    """An annotation text file as a file-like object of its text (:func:`read_text`).

    UserError when it does not exist or is not UTF-8 (a leading BOM is dropped).
    """
    return io.StringIO(read_text(path))


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


def describe_mat(value):
    """A short description of what loadmat returned for a variable ("a 1x26 double array", ...)."""
    if isinstance(value, (str, bytes)):
        return "the text %r" % (value[:40],)
    array = np.asarray(value)
    shape = "x".join(str(n) for n in array.shape) or "scalar"
    if array.dtype.names is not None:
        return "a %s struct" % shape
    if array.dtype.kind == "O":
        return "a %s cell array" % shape
    if array.dtype.kind in "US":
        return "text of shape %s" % shape
    return "a %s %s array" % (shape, array.dtype.name)


def _mat_error(source, message):
    if source is None:
        return ValueError(message)
    return UserError("%s: %s" % (source, message))


def mat_strings(cell, source=None):
    """Strings of a MATLAB cell/char array (any nesting, as loadmat returns them), in order.

    Every element of a cell gives one string (an empty char array gives "").
    ``source`` ("<file>: <variable>") names the variable in the UserError raised
    when the array holds something other than text (numbers, structs); without
    it that is a ValueError.
    """
    if isinstance(cell, str):
        return [cell]
    if isinstance(cell, bytes):
        return [cell.decode("utf-8", "replace")]
    array = np.asarray(cell)
    if array.dtype.kind in "US":
        return [str(v) for v in array.ravel()]
    if array.dtype.kind != "O" or array.dtype.names is not None:
        raise _mat_error(source, "expected a cell array of strings, got %s" % describe_mat(cell))
    out = []
    for item in array.ravel():
        if isinstance(item, np.ndarray) and item.dtype.kind in "US" and item.size == 0:
            out.append("")  # '' in a cell: keep its place
        else:
            out.extend(mat_strings(item, source))
    return out


def mat_numbers(value, source, ndim=None):
    """A numeric MATLAB variable as a float64 array, UserError naming ``source`` otherwise.

    source: "<file>: <variable>"; ndim: None, or the number of dimensions the
    array must have (2: a matrix; 1: any vector, returned flattened). Logical
    arrays count as numbers; NaN is allowed here (the callers check values).
    """
    array = np.asarray(value)
    if array.dtype.kind not in "biuf" or array.dtype.names is not None:
        raise UserError("%s: expected a numeric array, got %s" % (source, describe_mat(value)))
    array = array.astype(np.float64)
    if ndim == 1:
        if array.ndim > 2 or (array.ndim == 2 and min(array.shape) > 1):
            raise UserError("%s: expected a vector, got a %s array"
                            % (source, "x".join(map(str, array.shape))))
        return array.ravel()
    if ndim is not None and array.ndim != ndim:
        raise UserError("%s: expected a %d-D array, got shape %s"
                        % (source, ndim, "x".join(map(str, array.shape)) or "scalar"))
    return array


def mat_integers(value, source, minimum=None, maximum=None):
    """A numeric MATLAB vector of whole numbers as a 1-D int64 array (UserError naming ``source``
    for text, structs, fractions, NaN or values outside [minimum, maximum])."""
    array = mat_numbers(value, source, ndim=1)
    bad = ~np.isfinite(array) | (array != np.round(array))
    if minimum is not None:
        bad |= array < minimum
    if maximum is not None:
        bad |= array > maximum
    if bad.any():
        first = int(np.argmax(bad))
        bounds = ""
        if minimum is not None or maximum is not None:
            bounds = " in %s..%s" % ("" if minimum is None else "%d" % minimum,
                                     "" if maximum is None else "%d" % maximum)
        raise UserError("%s: expected whole numbers%s, got %s (element %d)"
                        % (source, bounds, _number(array[first]), first + 1))
    return array.astype(np.int64)


def _number(value):
    value = float(value)
    return "%d" % value if math.isfinite(value) and value == int(value) else "%g" % value
