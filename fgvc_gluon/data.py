"""Fine-grained classification datasets and the transforms of the FGVC methods.

Every reader returns a gluon ``Dataset`` of ``(image, label)``: image an
H×W×3 uint8 RGB NDArray, label an int class index in [0, num_classes).
Readers expose ``num_classes`` and ``class_names``. Layouts (``root`` is the
directory the archive extracts to):

- CUB-200-2011 (``CUB``, name 'cub'): ``images.txt`` (id path),
  ``image_class_labels.txt`` (id class, 1-based), ``train_test_split.txt``
  (id 1=train/0=test; any other value is an error naming the line), optional
  ``classes.txt`` (ids 1..N in order; an empty file is an error, a missing one
  means 200 unnamed classes) and ``bounding_boxes.txt`` (id x y w h, finite
  numbers; used with ``crop_boxes=True``), images under ``images/``. An id
  given twice in a list is an error. Splits train / test.
- CUB as S3N reads it (``CUBS3N``, 'cub-s3n'): ``root/<split>.txt`` with
  lines ``<image_name> <class_id>`` (S3N splits on one space; class ids
  0-based, ``label_base=1`` for 1-based lists), images under ``root/images/``.
  As upstream (an OrderedDict keyed by name) a repeated name keeps its first
  position and its last label.
- FGVC-Aircraft (``Aircraft``, 'aircraft'): ``data/variants.txt`` (the 100
  variant names, class order) and ``data/images_variant_<split>.txt`` (``<id>
  <variant>``), images ``data/images/<id>.jpg``; splits train / val /
  trainval / test. The images carry a 20-pixel copyright banner at the
  bottom; ``crop_banner=True`` (default) removes it, as is common practice
  for this dataset; ``crop_banner=False`` keeps the full image.
- Stanford Cars (``Cars``, 'cars'): devkit ``devkit/cars_meta.mat``
  (``class_names``), ``devkit/cars_train_annos.mat`` and
  ``cars_test_annos_withlabels.mat`` (in root or devkit/; struct
  ``annotations`` with bbox_x1, bbox_y1, bbox_x2, bbox_y2 (1-based, inclusive),
  class (1-based), fname), images under ``cars_train/`` and ``cars_test/``.
  Splits train / test; ``crop_boxes=True`` crops the car box.
- Flowers-102 (``Flowers``, 'flowers'): ``imagelabels.mat`` (``labels``,
  1-based), ``setid.mat`` (``trnid``, ``valid``, ``tstid``, 1-based image
  numbers), images ``jpg/image_%05d.jpg``. Splits train / val / trainval / test.
- Folder per class (``FolderDataset``, 'folder'): ``root/<split>/<class>/<image>``
  (e.g. the train/ and test/ folders MC-Loss's CUB script reads with
  ImageFolder); ``split='all'`` reads ``root/<class>/<image>``. Classes are
  the sorted folder names (gluon ImageFolderDataset's listing).
- Fashion-MNIST demo (``FashionMNISTClasses``, 'fashion-mnist'): 10 classes,
  28×28 grey images as 3 channels; splits of training_runtime.fashion_mnist.split_arrays
  (train = first 50,000, val = last 10,000 training images, test).

Every list file is read as UTF-8 (a leading BOM is dropped; other encodings
are a UserError naming the file and the byte offset), and .mat variables of the
wrong type or shape are UserErrors naming the file and the variable
(``cars_train_annos.mat: annotations(3).class: expected ...``).

Every name of :data:`DATASETS` is registered in :data:`fgvc_gluon.registry.DATASETS`
(a :class:`training_runtime.registry.DatasetEntry`: reader ``(data_dir, split,
**opts)`` = :func:`get_dataset`, and the default (train, evaluated every epoch,
test) splits of :data:`SPLITS`: the upstream scripts evaluate on 'test' every
epoch; the demo holds out 'val').
"""
import os
import random
from collections import OrderedDict

import numpy as np
import mxnet as mx
from mxnet.gluon import Block
from mxnet.gluon.data.vision import transforms, ImageFolderDataset

from training_runtime import fashion_mnist
from training_runtime.errors import UserError
from training_runtime.registry import DatasetEntry
from training_runtime.images import (IMAGENET_MEAN, IMAGENET_STD, ImageListDataset,
                                     ArrayImageDataset, check_split, crop_box, describe_mat,
                                     first_existing, load_image, load_mat, mat_integers,
                                     mat_numbers, mat_strings, open_text, require_root)

from . import registry

DATASETS = ("cub", "cub-s3n", "aircraft", "cars", "flowers", "folder", "fashion-mnist")
DEMO_DATASET = "fashion-mnist"
#: (train split, split evaluated every epoch, test split) per dataset
DEFAULT_SPLITS = ("train", "test", "test")
SPLITS = {"fashion-mnist": ("train", "val", "test"), "aircraft": ("trainval", "test", "test"),
          "flowers": ("trainval", "test", "test")}
SUMMARIES = {
    "cub": "CUB-200-2011 from its official list files (200 classes)",
    "cub-s3n": "CUB-200-2011 from S3N's <split>.txt lists",
    "aircraft": "FGVC-Aircraft, variant level (100 classes)",
    "cars": "Stanford Cars from the devkit .mat files (196 classes)",
    "flowers": "Oxford Flowers-102",
    "folder": "one folder per class: root/<split>/<class>/<image>",
    "fashion-mnist": "embedded demo: the 10 Fashion-MNIST classes",
}
CUB_CLASSES = 200
AIRCRAFT_BANNER = 20  # pixels of copyright banner at the bottom of every aircraft image


def check_class_labels(labels, num_classes, source):
    """UserError naming ``source`` when a class index is outside [0, num_classes)."""
    labels = np.asarray(labels)
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        first = int(np.argmax(bad))
        raise UserError("%s: expected class labels in 0..%d, got %d (item %d)"
                        % (source, num_classes - 1, labels[first], first + 1))


class ClassDataset(ImageListDataset):
    """:class:`ImageListDataset` with int class labels in [0, num_classes)."""

    def __init__(self, paths, labels, num_classes, class_names=None, boxes=None, source=None,
                 split=None, skip_bad_images=False, limit=None):
        if len(paths) == 0:
            raise UserError("%s: split %r is empty (expected at least one image)" % (source, split))
        labels = [int(v) for v in labels]
        check_class_labels(labels, num_classes, source)
        super(ClassDataset, self).__init__(paths, labels, boxes=boxes, source=source,
                                           skip_bad_images=skip_bad_images, limit=limit)
        self.num_classes = num_classes
        self.class_names = tuple(class_names) if class_names is not None else tuple(
            str(i) for i in range(num_classes))
        self.split = split


def _finite_float(text):
    """float(text), ValueError for NaN and infinities (a box must be a real number)."""
    value = float(text)
    if not np.isfinite(value):
        raise ValueError("not a finite number: %r" % text)
    return value


def _read_id_table(path, fields, converters, check=None, lines=None):
    """``id v1 v2 ...`` lines -> OrderedDict id -> tuple of converted values.

    fields: number of values after the id (the last one takes the rest of the
    line when converters[-1] is str). check: None, or ``check(values)`` -> None
    or what is wrong ("expected 0 or 1, got 2"), raised naming the line. An id
    given twice is an error naming both lines. lines: None, or a dict filled
    with id -> line number.
    """
    table = OrderedDict()
    seen = {} if lines is None else lines
    with open_text(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.strip().split(None, fields) if converters[-1] is str else line.split()
            if len(parts) != fields + 1:
                raise UserError("%s line %d: expected an id and %d value(s), got %r"
                                % (path, number, fields, line.strip()[:80]))
            try:
                values = tuple(c(v) for c, v in zip(converters, parts[1:]))
            except ValueError:
                raise UserError("%s line %d: expected numbers, got %r"
                                % (path, number, line.strip()[:80]))
            problem = check(values) if check is not None else None
            if problem:
                raise UserError("%s line %d: %s" % (path, number, problem))
            if parts[0] in table:
                raise UserError("%s line %d: id %s is given twice (first on line %d)"
                                % (path, number, parts[0], seen[parts[0]]))
            table[parts[0]] = values
            seen[parts[0]] = number
    return table


def _train_test_value(values):
    if values[0] not in (0, 1):
        return "expected 1 (train) or 0 (test), got %d" % values[0]
    return None


# ----------------------------------------------------------------------------- CUB

class CUB(ClassDataset):
    """CUB-200-2011 from its official list files (see module doc)."""

    def __init__(self, root, split="train", crop_boxes=False, skip_bad_images=False, limit=None):
        require_root(root, "cub")
        check_split(split, ("train", "test"))
        files = {name: os.path.join(root, name + ".txt")
                 for name in ("images", "image_class_labels", "train_test_split",
                              "bounding_boxes", "classes")}
        images = _read_id_table(files["images"], 1, (str,))
        if not images:
            raise UserError("%s: expected lines '<image id> <image path>', got an empty file"
                            % files["images"])
        classes = _read_id_table(files["image_class_labels"], 1, (int,))
        is_train = _read_id_table(files["train_test_split"], 1, (int,), check=_train_test_value)
        names = None
        if os.path.isfile(files["classes"]):
            class_table = _read_id_table(files["classes"], 1, (str,))
            if not class_table:
                raise UserError("%s: expected one line '<class id> <class name>' per class, got "
                                "an empty file (delete it to use %d unnamed classes)"
                                % (files["classes"], CUB_CLASSES))
            expected = [str(i) for i in range(1, len(class_table) + 1)]
            if list(class_table) != expected:
                first = next(i for i, (a, b) in enumerate(zip(class_table, expected)) if a != b)
                raise UserError("%s: expected class ids 1..%d in order, got id %s on entry %d"
                                % (files["classes"], len(class_table), list(class_table)[first],
                                   first + 1))
            names = [v[0] for v in class_table.values()]
        num_classes = len(names) if names else CUB_CLASSES
        boxes = None
        if crop_boxes:
            boxes_table = _read_id_table(files["bounding_boxes"], 4, (_finite_float,) * 4)
        want = 1 if split == "train" else 0
        paths, labels, box_list = [], [], []
        for image_id, (rel,) in images.items():
            for table, path in ((classes, files["image_class_labels"]),
                                (is_train, files["train_test_split"])):
                if image_id not in table:
                    raise UserError("%s: expected an entry for image id %s" % (path, image_id))
            if is_train[image_id][0] != want:
                continue
            paths.append(os.path.join(root, "images", rel))
            labels.append(classes[image_id][0] - 1)
            if crop_boxes:
                if image_id not in boxes_table:
                    raise UserError("%s: expected a box for image id %s"
                                    % (files["bounding_boxes"], image_id))
                box_list.append(boxes_table[image_id])
        if crop_boxes:
            boxes = box_list
        super(CUB, self).__init__(paths, labels, num_classes, names, boxes=boxes,
                                  source=files["image_class_labels"], split=split,
                                  skip_bad_images=skip_bad_images, limit=limit)


class CUBS3N(ClassDataset):
    """CUB from S3N's ``<split>.txt`` lists (``<image_name> <class_id>``)."""

    def __init__(self, root, split="train", label_base=0, num_classes=CUB_CLASSES,
                 skip_bad_images=False, limit=None):
        require_root(root, "cub-s3n")
        list_path = os.path.join(root, "%s.txt" % split)
        entries = OrderedDict()
        with open_text(list_path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.split()
                if len(parts) != 2:
                    raise UserError("%s line %d: expected '<image_name> <class_id>', got %r"
                                    % (list_path, number, line.strip()[:80]))
                try:
                    entries[parts[0]] = int(parts[1]) - label_base
                except ValueError:
                    raise UserError("%s line %d: expected an integer class id, got %r"
                                    % (list_path, number, parts[1]))
        paths = [os.path.join(root, "images", name) for name in entries]
        super(CUBS3N, self).__init__(paths, list(entries.values()), num_classes,
                                     source=list_path, split=split,
                                     skip_bad_images=skip_bad_images, limit=limit)


# ----------------------------------------------------------------------------- Aircraft

class Aircraft(ClassDataset):
    """FGVC-Aircraft, variant level (100 classes), see module doc."""

    def __init__(self, root, split="train", crop_banner=True, skip_bad_images=False, limit=None):
        require_root(root, "aircraft")
        check_split(split, ("train", "val", "trainval", "test"))
        data_dir = os.path.join(root, "data") if os.path.isdir(os.path.join(root, "data")) else root
        variants_path = os.path.join(data_dir, "variants.txt")
        with open_text(variants_path) as f:
            variants = [line.strip() for line in f if line.strip()]
        if not variants:
            raise UserError("%s: expected one variant name per line, got an empty file"
                            % variants_path)
        index = {}
        for i, name in enumerate(variants):
            if name in index:
                raise UserError("%s: variant %r is listed twice (entries %d and %d)"
                                % (variants_path, name, index[name] + 1, i + 1))
            index[name] = i
        list_path = os.path.join(data_dir, "images_variant_%s.txt" % split)
        paths, labels = [], []
        with open_text(list_path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.strip().split(None, 1)
                if len(parts) != 2:
                    raise UserError("%s line %d: expected '<image id> <variant>', got %r"
                                    % (list_path, number, line.strip()[:80]))
                if parts[1] not in index:
                    raise UserError("%s line %d: variant %r is not in %s"
                                    % (list_path, number, parts[1], variants_path))
                paths.append(os.path.join(data_dir, "images", parts[0] + ".jpg"))
                labels.append(index[parts[1]])
        self.crop_banner = crop_banner
        super(Aircraft, self).__init__(paths, labels, len(variants), variants, source=list_path,
                                       split=split, skip_bad_images=skip_bad_images, limit=limit)

    def _load(self, idx):
        image = load_image(self.paths[idx])
        if self.crop_banner:
            height, width = image.shape[:2]
            image = crop_box(image, (0, 0, width, height - AIRCRAFT_BANNER), source=self.paths[idx])
        return image


# ----------------------------------------------------------------------------- Cars

def _struct_rows(mat, key, path, fields, text_fields=()):
    """Rows of a MATLAB struct array ``mat[key]`` as dicts of the named fields.

    Fields in ``text_fields`` are strings, the others numbers (float); UserError
    naming the file, the element (``annotations(3).class``, 1-based as in
    MATLAB) and the field when a value is missing or of the wrong type.
    """
    if key not in mat:
        raise UserError("%s: expected a variable %r" % (path, key))
    array = mat[key].ravel()
    names = array.dtype.names or ()
    missing = [f for f in fields if f not in names]
    if missing:
        raise UserError("%s: expected fields %s in %r, missing %s"
                        % (path, ", ".join(fields), key, ", ".join(missing)))
    rows = []
    for number, record in enumerate(array, 1):
        row = {}
        for field in fields:
            value = record[field]
            where = "%s: %s(%d).%s" % (path, key, number, field)
            if field in text_fields:
                strings = mat_strings(value, where)
                if len(strings) != 1 or not strings[0].strip():
                    raise UserError("%s: expected one non-empty string, got %s"
                                    % (where, describe_mat(value)))
                row[field] = strings[0]
            else:
                numbers = mat_numbers(value, where).ravel()
                if numbers.size != 1 or not np.isfinite(numbers[0]):
                    raise UserError("%s: expected one finite number, got %s"
                                    % (where, describe_mat(value)))
                row[field] = float(numbers[0])
        rows.append(row)
    return rows


class Cars(ClassDataset):
    """Stanford Cars (196 classes) from the devkit .mat files, see module doc."""

    def __init__(self, root, split="train", crop_boxes=False, skip_bad_images=False, limit=None):
        require_root(root, "cars")
        check_split(split, ("train", "test"))
        meta_path = first_existing([os.path.join(root, "devkit", "cars_meta.mat"),
                                     os.path.join(root, "cars_meta.mat")], "cars_meta.mat")
        meta = load_mat(meta_path)
        if "class_names" not in meta:
            raise UserError("%s: expected a variable 'class_names'" % meta_path)
        names = mat_strings(meta["class_names"], "%s: class_names" % meta_path)
        if not names:
            raise UserError("%s: class_names: expected the class names, got none" % meta_path)
        name = "cars_train_annos.mat" if split == "train" else "cars_test_annos_withlabels.mat"
        ann_path = first_existing([os.path.join(root, "devkit", name), os.path.join(root, name)],
                                   name)
        rows = _struct_rows(load_mat(ann_path), "annotations", ann_path,
                            ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"),
                            text_fields=("fname",))
        for number, row in enumerate(rows, 1):
            if row["class"] != int(row["class"]):
                raise UserError("%s: annotations(%d).class: expected a whole class number, got %g"
                                % (ann_path, number, row["class"]))
        image_dir = os.path.join(root, "cars_train" if split == "train" else "cars_test")
        paths = [os.path.join(image_dir, r["fname"]) for r in rows]
        labels = [int(r["class"]) - 1 for r in rows]
        boxes = None
        if crop_boxes:  # 1-based inclusive corners -> 0-based x, y, w, h
            boxes = [(r["bbox_x1"] - 1, r["bbox_y1"] - 1, r["bbox_x2"] - r["bbox_x1"] + 1,
                      r["bbox_y2"] - r["bbox_y1"] + 1) for r in rows]
        super(Cars, self).__init__(paths, labels, len(names), names, boxes=boxes, source=ann_path,
                                   split=split, skip_bad_images=skip_bad_images, limit=limit)


# ----------------------------------------------------------------------------- Flowers

class Flowers(ClassDataset):
    """Oxford Flowers-102 from imagelabels.mat / setid.mat, see module doc."""

    SPLIT_KEYS = {"train": ("trnid",), "val": ("valid",), "trainval": ("trnid", "valid"),
                  "test": ("tstid",)}

    def __init__(self, root, split="train", skip_bad_images=False, limit=None):
        require_root(root, "flowers")
        check_split(split, tuple(self.SPLIT_KEYS))
        labels_path = os.path.join(root, "imagelabels.mat")
        setid_path = os.path.join(root, "setid.mat")
        labels_mat, setid = load_mat(labels_path), load_mat(setid_path)
        if "labels" not in labels_mat:
            raise UserError("%s: expected a variable 'labels'" % labels_path)
        all_labels = mat_integers(labels_mat["labels"], "%s: labels" % labels_path) - 1
        ids = []
        for key in self.SPLIT_KEYS[split]:
            if key not in setid:
                raise UserError("%s: expected a variable %r" % (setid_path, key))
            ids.extend(mat_integers(setid[key], "%s: %s" % (setid_path, key)).tolist())
        bad = [i for i in ids if not 1 <= i <= len(all_labels)]
        if bad:
            raise UserError("%s: expected image numbers in 1..%d, got %d"
                            % (setid_path, len(all_labels), bad[0]))
        paths = [os.path.join(root, "jpg", "image_%05d.jpg" % i) for i in ids]
        labels = [all_labels[i - 1] for i in ids]
        super(Flowers, self).__init__(paths, labels, 102, source=labels_path, split=split,
                                      skip_bad_images=skip_bad_images, limit=limit)


# ----------------------------------------------------------------------------- folder

class FolderDataset(ClassDataset):
    """``root/<split>/<class>/<image>`` (or ``root/<class>/<image>`` with split='all')."""

    def __init__(self, root, split="train", skip_bad_images=False, limit=None):
        require_root(root, "folder")
        folder = root if split == "all" else os.path.join(root, split)
        if not os.path.isdir(folder):
            raise UserError("%s: expected a folder of class folders for split %r "
                            "(root/<split>/<class>/<image>, or split 'all' for root/<class>/<image>)"
                            % (folder, split))
        listing = ImageFolderDataset(folder)  # gluon's listing: sorted class folders, image files
        paths = [path for path, _ in listing.items]
        labels = [label for _, label in listing.items]
        super(FolderDataset, self).__init__(paths, labels, max(len(listing.synsets), 1),
                                            listing.synsets, source=folder, split=split,
                                            skip_bad_images=skip_bad_images, limit=limit)


# ----------------------------------------------------------------------------- demo

class FashionMNISTClasses(ArrayImageDataset):
    """Fashion-MNIST demo: 10 classes, 28×28 grey images as 3 channels, int labels."""

    def __init__(self, split="train", data_dir=None, limit=None):
        images, classes = fashion_mnist.split_arrays(split, data_dir, limit)
        super(FashionMNISTClasses, self).__init__(images, [int(c) for c in classes])
        self.num_classes = len(fashion_mnist.CLASSES)
        self.class_names = fashion_mnist.CLASSES
        self.split = split
        self.skipped = []
        self.num_skipped = 0


def get_dataset(name, data_dir, split, **opts):
    """Fine-grained dataset by name: 'cub', 'cub-s3n', 'aircraft', 'cars', 'flowers',
    'folder' or 'fashion-mnist'; opts go to the reader (skip_bad_images, limit,
    crop_boxes, crop_banner, label_base; the demo takes only limit)."""
    readers = {"cub": CUB, "cub-s3n": CUBS3N, "aircraft": Aircraft, "cars": Cars,
               "flowers": Flowers, "folder": FolderDataset}
    if name in readers:
        return readers[name](data_dir, split, **opts)
    if name == "fashion-mnist":
        opts.pop("skip_bad_images", None)
        return FashionMNISTClasses(split, data_dir, **opts)
    raise UserError("--dataset: expected one of %s, got %r" % (", ".join(DATASETS), name))


# ----------------------------------------------------------------------------- transforms

class PadRandomCrop(Block):
    """Zero-pad ``pad`` pixels on every side, then a random size×size crop
    (torchvision RandomCrop(size, padding=pad)). H×W×3 uint8 in and out."""

    def __init__(self, size, pad):
        super(PadRandomCrop, self).__init__()
        self._size, self._pad = size, pad

    def forward(self, x):
        if self._pad > 0:
            x = mx.image.copyMakeBorder(x, self._pad, self._pad, self._pad, self._pad,
                                        type=0, value=0)
        height, width = x.shape[:2]
        x0 = random.randint(0, width - self._size)
        y0 = random.randint(0, height - self._size)
        return mx.image.fixed_crop(x, x0, y0, self._size, self._size)


TRAIN_CROPS = ("random_resized", "pad_random", "resize", "resize_random")


def s3n_test_resize(image_size):
    """S3N's evaluation resize (its fetch_data: test images to 600×600, aspect NOT kept,
    then a center crop of 448), scaled to other input sizes: a (side, side) pair."""
    side = int(round(image_size * 600 / 448.0))
    return (side, side)


def make_transform(defaults, train):
    """Gluon transform from a method's ``defaults`` (keys documented in
    fgvc_gluon.method.FGVCMethod.defaults): H×W×3 uint8 -> 3×S×S float32.

    train: 'random_resized' = RandomResizedCrop(S, scale=crop_scale, ratio
    3/4..4/3); 'pad_random' = resize to S×S, zero-pad ``pad``, random S crop;
    'resize' = resize to S×S; 'resize_random' = resize to the ``resize``
    (width, height) pair, then a random S×S crop (torchvision
    Resize((600, 600)) + RandomCrop(448), MC-Loss ResNet-50); then a random
    horizontal flip if ``flip``.
    eval: ``resize`` int -> short side to resize, center crop S; a
    (width, height) pair -> resize to exactly that (S3N upstream resizes test
    images to 600×600), center crop S; None -> resize to S×S. Then pixels/255,
    normalised by ``mean`` / ``std`` (default ImageNet's).
    """
    if "image_size" not in defaults:
        raise UserError("defaults: expected an 'image_size' entry, got keys %s"
                        % ", ".join(sorted(defaults)))
    size = int(defaults["image_size"])
    mean = tuple(defaults.get("mean") or IMAGENET_MEAN)
    std = tuple(defaults.get("std") or IMAGENET_STD)
    steps = []
    if train:
        crop = defaults.get("train_crop", "random_resized")
        if crop == "random_resized":
            steps.append(transforms.RandomResizedCrop(
                size, scale=tuple(defaults.get("crop_scale") or (0.08, 1.0))))
        elif crop == "pad_random":
            steps += [transforms.Resize((size, size)),
                      PadRandomCrop(size, int(defaults.get("pad") or 0))]
        elif crop == "resize":
            steps.append(transforms.Resize((size, size)))
        elif crop == "resize_random":
            resize = defaults.get("resize")
            if resize is None or np.isscalar(resize) or min(int(v) for v in resize) < size:
                raise UserError("defaults['resize']: train_crop 'resize_random' needs a (width, height) "
                                "pair of at least image_size=%d, got %r" % (size, resize))
            steps += [transforms.Resize(tuple(int(v) for v in resize)), PadRandomCrop(size, 0)]
        else:
            raise UserError("defaults['train_crop']: expected one of %s, got %r"
                            % (", ".join(TRAIN_CROPS), crop))
        if defaults.get("flip", True):
            steps.append(transforms.RandomFlipLeftRight())
    else:
        resize = defaults.get("resize")
        if resize is None:
            steps.append(transforms.Resize((size, size)))
        else:
            if np.isscalar(resize):
                steps.append(transforms.Resize(int(resize), keep_ratio=True))
            else:
                steps.append(transforms.Resize(tuple(int(v) for v in resize)))
            steps.append(transforms.CenterCrop(size))
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)


# ----------------------------------------------------------------------------- registry

def _reader(name):
    """``reader(data_dir, split, **opts)`` of dataset ``name`` (:func:`get_dataset`)."""
    def read(data_dir, split, **opts):
        return get_dataset(name, data_dir, split, **opts)
    read.__name__ = "read_" + name.replace("-", "_")
    read.__doc__ = "get_dataset(%r, data_dir, split, **opts)" % name
    return read


for _name in DATASETS:
    registry.DATASETS.register(DatasetEntry(_name, _reader(_name), SPLITS.get(_name, DEFAULT_SPLITS),
                                            demo=_name == DEMO_DATASET, summary=SUMMARIES[_name]))
del _name
