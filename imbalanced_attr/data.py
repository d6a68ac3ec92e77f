"""Attribute datasets: WIDER-Attribute, PETA, PA-100K and the Fashion-MNIST demo
(RAP v1 / v2 and Rethinking_of_PAR's dataset.pkl: :mod:`imbalanced_attr.par_datasets`).

Every reader returns a gluon ``Dataset`` of ``(image, label)``: image an
H×W×3 uint8 RGB NDArray (the person crop), label a float32 vector in the
WIDER convention: 1 positive, -1 negative, 0 unspecified. Readers expose
``attribute_names`` and ``label_matrix`` (N×C float32, e.g. for class
weights). Splits: 'train', 'val', 'trainval', 'test'.

WIDER-Attribute (``WiderAttribute(root, split)``), two sources:

- ``source='json'``: the official release, ``wider_attribute_trainval.json``
  and ``wider_attribute_test.json`` (in ``root``, ``root/Anno`` or
  ``root/wider_attribute_annotation``), images under ``root/Image/``. One
  item per person (``targets``): the crop is the person box ``bbox``
  [x, y, w, h] rounded to pixels and clipped to the image (the original
  trained on SRN's per-box crops: 28,340 trainval + 29,177 test; boxes with no
  area after clipping are dropped and counted in ``dropped_boxes``). Train /
  val come from trainval by the image's folder (``train/...`` or ``val/...``).
  Every field of every entry is type-checked whatever the split (``file_name``
  a path, ``targets`` a list of objects, ``attribute`` C numbers in {-1, 0, 1},
  ``bbox`` 4 finite numbers, ``attribute_id_map`` integer keys -> names):
  ``<file>: image <file_name> target <k>: expected ..., got ...``.
- ``source='srn'``: the SRN lists the original read (utilities.get_data):
  ``wider_att/wider_att_{train,test}_imglist.txt`` (one image path per line,
  first token; quotes, trailing commas and a leading ``./`` or ``/`` are
  stripped; extra tokens such as SRN's tag count are ignored) and
  ``wider_att/wider_att_{train,test}_label.txt`` (14 space-separated
  1/-1/0 per line), paths relative to ``root``. As in the original, an image
  is in 'val' when a folder of its path is named ``val``; the rest of the
  train list is 'train'. These images are already person crops.
- ``source='auto'`` (default): json when the json file exists, else srn.

Text files are read as UTF-8 (a leading BOM dropped); .mat variables of the
wrong type or shape are UserErrors naming the file and the variable
(``PETA.mat: peta.attribute: expected a cell array of strings, got ...``).

The original then resized every crop to 256×256 (PIL, aspect ratio not kept):
:func:`make_transform` does that resize first.

PETA (``PETA(root, split, partition=0)``): the common ``PETA.mat`` release
(dangweili/pedestrian-attribute-recognition-pytorch layout): a struct
``peta`` with fields ``data`` (19000 × (5 + 105): columns 0-4 are image id
and meta data, columns 5.. the 105 binary attributes), ``attribute`` (105
names), ``selected_attribute`` (the 35 attributes of the standard protocol,
1-based) and ``partion_attribute`` (5 random partitions, each a struct with
1-based ``train`` / ``val`` / ``test`` image indices). Images are
``root/images/%05d.png`` (1-based). Split: partition ``partition`` (default
0, the first, as usually reported; ``--dataset peta`` reads ``SPLIT@K`` as
partition K); trainval = train + val. Labels 0/1 are
mapped to -1/1.

PA-100K (``PA100K(root, split)``): ``annotation.mat`` (in ``root`` or
``root/annotation``) with ``attributes`` (26 names), ``{train,val,test}_images_name``
and ``{train,val,test}_label`` (0/1 -> -1/1); images under ``root/data/`` or
``root/release_data/release_data/``.
"""
import math
import os
import random

import numpy as np
import mxnet as mx
from mxnet.gluon import Block, HybridBlock
from mxnet.gluon.data.vision import transforms

from training_runtime import fashion_mnist
from training_runtime.errors import UserError
from training_runtime.images import (IMAGENET_MEAN, IMAGENET_STD, ImageListDataset,
                                     ArrayImageDataset, check_split, describe_mat,
                                     first_existing, load_json, load_mat, mat_integers,
                                     mat_numbers, mat_strings, open_text, require_root)
from training_runtime.registry import DatasetEntry

from . import fashion_attributes, par_datasets
from .registry import DATASETS as DATASET_REGISTRY

WIDER_ATTRIBUTES = ("Male", "longHair", "sunglass", "Hat", "Tshirt", "longSleeve", "formal",
                    "shorts", "jeans", "longPants", "skirt", "faceMask", "logo", "stripe")
SPLITS = ("train", "val", "trainval", "test")
DATASETS = ("wider", "peta", "pa100k", "rap", "rap2", "par-pkl", "fashion-mnist", "fashion-mnist-rare")
# the original's ImageRecordIter: mean_r/g/b on 0-255 pixels, no std
ORIGINAL_MEAN = (104.0, 117.0, 123.0)


# ----------------------------------------------------------------------------- labels

def check_label_values(labels, source, allowed=(-1, 0, 1)):
    """UserError naming ``source`` and the first bad row when a value is not in ``allowed``."""
    labels = np.asarray(labels)
    bad = ~np.isin(labels, allowed)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise UserError("%s: expected attribute labels in {%s}, got %s (row %d, attribute %d)"
                        % (source, ", ".join(map(str, allowed)), labels[row, col], row + 1, col + 1))


def parse_label_lines(path, width=None):
    """Space-separated integer label rows of a text file -> (N, C) float32.

    Every row must have ``width`` values (or the width of the first row) in
    {-1, 0, 1}; UserError naming the file and line otherwise.
    """
    rows = []
    with open_text(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = [int(v) for v in line.split()]
            except ValueError:
                raise UserError("%s line %d: expected space-separated integers 1/-1/0, got %r"
                                % (path, number, line.strip()[:60]))
            if width is None:
                width = len(row)
            if len(row) != width:
                raise UserError("%s line %d: expected %d attribute labels, got %d"
                                % (path, number, width, len(row)))
            bad = [v for v in row if v not in (-1, 0, 1)]
            if bad:
                raise UserError("%s line %d: expected attribute labels in {-1, 0, 1}, got %d"
                                % (path, number, bad[0]))
            rows.append(row)
    return np.array(rows, dtype=np.float32).reshape(len(rows), width or 0)


def training_targets(labels, mask_unspecified=False):
    """WIDER labels -> (targets, mask), both shaped like ``labels`` (N×C), float32.

    targets: 1 where the label is 1, else 0 — the original maps both -1 and
    0 (unspecified) to 0 (SPEC quirk 4). mask: all ones (original), or with
    ``mask_unspecified=True`` 0 where the label is 0 so that unspecified
    attributes can be left out of the loss. Accepts NDArray (returns
    NDArrays on its context) or numpy.
    """
    if isinstance(labels, mx.nd.NDArray):
        targets = (labels == 1).astype("float32")
        mask = (labels != 0).astype("float32") if mask_unspecified else mx.nd.ones_like(targets)
        return targets, mask
    labels = np.asarray(labels)
    targets = (labels == 1).astype(np.float32)
    mask = (labels != 0).astype(np.float32) if mask_unspecified else np.ones_like(targets)
    return targets, mask


def _mat_field(struct, name, path, what="the struct"):
    """Field ``name`` of a loadmat struct record; UserError naming the file and ``what``."""
    names = getattr(getattr(struct, "dtype", None), "names", None)
    if names is None or name not in names:
        raise UserError("%s: %s: expected a field %r, found %s"
                        % (path, what, name, ", ".join(names) if names else
                           "no fields (%s)" % describe_mat(struct)))
    return struct[name]


def _mat_record(value):
    """The struct record inside cell/1x1-array nesting (None if there is none)."""
    while isinstance(value, np.ndarray) and value.dtype.names is None and \
            value.dtype.kind == "O" and value.size == 1:
        value = value.ravel()[0]
    if isinstance(value, np.ndarray) and value.dtype.names is not None and value.size == 1:
        value = value.ravel()[0]
    if isinstance(value, np.void) and value.dtype.names:
        return value
    return None


class AttributeDataset(ImageListDataset):
    """:class:`ImageListDataset` with attribute labels (float32 vectors in {1, -1, 0})."""

    def __init__(self, paths, labels, attribute_names, boxes=None, source=None, split=None,
                 skip_bad_images=False, limit=None):
        labels = np.asarray(labels, dtype=np.float32)
        if len(paths) == 0:
            raise UserError("%s: split %r is empty (expected at least one image)" % (source, split))
        check_label_values(labels, source)
        super(AttributeDataset, self).__init__(
            paths, list(labels), boxes=boxes, skip_bad_images=skip_bad_images, source=source,
            limit=limit)
        self.attribute_names = tuple(attribute_names)
        self.split = split

    @property
    def label_matrix(self):
        """N×C float32 labels of the items kept."""
        return np.stack(self.labels).astype(np.float32)


# ----------------------------------------------------------------------------- WIDER

def _find_wider_json(root, part):
    name = "wider_attribute_%s.json" % part
    return [os.path.join(root, d, name) for d in ("", "Anno", "wider_attribute_annotation")]


def _short(value, limit=60):
    """repr of a JSON value, cut to ``limit`` characters for one-line messages."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_number(value):
    """A JSON number (not a bool, not a string), finite."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) < 2 ** 53  # a float can hold it (huge ints overflow float())
    return isinstance(value, float) and math.isfinite(value)


def _wider_attribute_names(id_map, path):
    """The attribute names of ``attribute_id_map`` ({"0": "Male", ...}) in id order."""
    if id_map is None or id_map == {}:
        return WIDER_ATTRIBUTES
    if not isinstance(id_map, dict):
        raise UserError("%s: attribute_id_map: expected an object {\"<id>\": \"<name>\"}, got %s"
                        % (path, _short(id_map)))
    ids = {}
    for key, name in id_map.items():
        try:
            number = int(key)
        except ValueError:
            raise UserError("%s: attribute_id_map: expected integer ids as keys, got %s"
                            % (path, _short(key)))
        if number in ids:
            raise UserError("%s: attribute_id_map: id %d is given twice (%s and %s)"
                            % (path, number, _short(ids[number][0]), _short(key)))
        if not isinstance(name, str) or not name:
            raise UserError("%s: attribute_id_map[%s]: expected an attribute name, got %s"
                            % (path, _short(key), _short(name)))
        ids[number] = (key, name)
    return tuple(ids[k][1] for k in sorted(ids))


def _wider_json_items(root, split):
    """(paths, labels, boxes, attribute names, json path, dropped box count) of one split.

    Every field of every entry is checked (types, lengths, values), whatever the
    split: UserError ``<file>: image <file_name> target <k>: expected ..., got ...``.
    """
    part = "test" if split == "test" else "trainval"
    path = first_existing(_find_wider_json(root, part), "WIDER-Attribute %s annotations" % part)
    data = load_json(path, "the WIDER-Attribute JSON annotations")
    if not isinstance(data, dict) or "images" not in data:
        raise UserError("%s: expected a JSON object with an 'images' list, got %s"
                        % (path, "an object with keys %s" % _short(sorted(data))
                           if isinstance(data, dict) else "a JSON %s" % type(data).__name__))
    if not isinstance(data["images"], list):
        raise UserError("%s: images: expected a list of image entries, got %s"
                        % (path, _short(data["images"])))
    names = _wider_attribute_names(data.get("attribute_id_map"), path)
    paths, labels, boxes, dropped = [], [], [], 0
    for index, entry in enumerate(data["images"]):
        if not isinstance(entry, dict):
            raise UserError("%s: images[%d]: expected an object with 'file_name' and 'targets', "
                            "got %s" % (path, index, _short(entry)))
        file_name = entry.get("file_name")
        if not isinstance(file_name, str) or not file_name.strip():
            raise UserError("%s: images[%d]: file_name: expected the image path, got %s"
                            % (path, index, "no 'file_name'" if "file_name" not in entry
                               else _short(file_name)))
        targets = entry.get("targets")
        if not isinstance(targets, list):
            raise UserError("%s: image %s (images[%d]): targets: expected a list of persons "
                            "({'attribute': [...], 'bbox': [x, y, w, h]}), got %s"
                            % (path, file_name, index,
                               "no 'targets'" if "targets" not in entry else _short(targets)))
        folders = file_name.replace("\\", "/").split("/")[:-1]
        in_val = "val" in folders
        wanted = not (split == "train" and in_val or split == "val" and not in_val)
        for k, target in enumerate(targets):  # every entry is validated
            where = "%s: image %s target %d" % (path, file_name, k)
            if not isinstance(target, dict):
                raise UserError("%s: expected an object with 'attribute' and 'bbox', got %s"
                                % (where, _short(target)))
            attribute = target.get("attribute")
            bbox = target.get("bbox")
            if not isinstance(attribute, list) or len(attribute) != len(names):
                raise UserError("%s: expected %d attribute labels, got %s"
                                % (where, len(names),
                                   "no 'attribute'" if "attribute" not in target else
                                   len(attribute) if isinstance(attribute, list) else
                                   _short(attribute)))
            if any(not _is_number(v) or v not in (-1, 0, 1) for v in attribute):
                raise UserError("%s: expected attribute labels in {-1, 0, 1}, got %s"
                                % (where, _short(attribute, 120)))
            if (not isinstance(bbox, list) or len(bbox) != 4
                    or not all(_is_number(v) for v in bbox)):
                raise UserError("%s: expected bbox [x, y, w, h] of 4 finite numbers, got %s"
                                % (where, "no 'bbox'" if "bbox" not in target else _short(bbox)))
            if not wanted:
                continue
            if bbox[2] < 1 or bbox[3] < 1:
                dropped += 1
                continue
            paths.append(os.path.join(root, "Image", file_name))
            labels.append([int(v) for v in attribute])
            boxes.append(tuple(float(v) for v in bbox))
    return paths, labels, boxes, names, path, dropped


def _clean_list_path(line):
    """An SRN image-list line -> the image path relative to the dataset root."""
    token = line.split()[0].strip("'\",")
    while token.startswith("./"):
        token = token[2:]
    return token.lstrip("/")


def _wider_srn_items(root, split):
    part = "test" if split == "test" else "train"
    names = ["wider_att_%s_imglist.txt" % part, "wider_att_%s_label.txt" % part]
    list_path, label_path = (
        first_existing([os.path.join(root, "wider_att", n), os.path.join(root, n)], n) for n in names)
    rel_paths = []
    with open_text(list_path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            rel = _clean_list_path(line)
            if not rel or rel.endswith("/"):
                raise UserError("%s line %d: expected an image path, got %r"
                                % (list_path, number, line.strip()[:80]))
            rel_paths.append(rel)
    labels = parse_label_lines(label_path, width=len(WIDER_ATTRIBUTES))
    if len(labels) != len(rel_paths):
        raise UserError("%s: expected one label row per image of %s (%d), got %d rows"
                        % (label_path, list_path, len(rel_paths), len(labels)))
    keep = []
    for i, rel in enumerate(rel_paths):
        in_val = "val" in rel.split("/")[:-1]
        if part == "test" or split == "trainval" or in_val == (split == "val"):
            keep.append(i)
    paths = [os.path.join(root, rel_paths[i]) for i in keep]
    return paths, labels[keep], list_path


class WiderAttribute(AttributeDataset):
    """WIDER-Attribute person crops (see the module doc for the layouts).

    root: dataset directory; split: train / val / trainval / test;
    source: 'auto' | 'json' | 'srn'; skip_bad_images, limit: see ImageListDataset.
    """

    def __init__(self, root, split="train", source="auto", skip_bad_images=False, limit=None):
        require_root(root, "wider")
        check_split(split, SPLITS)
        if source not in ("auto", "json", "srn"):
            raise UserError("source: expected auto, json or srn, got %r" % source)
        if source == "auto":
            part = "test" if split == "test" else "trainval"
            has_json = any(os.path.isfile(p) for p in _find_wider_json(root, part))
            source = "json" if has_json else "srn"
        self.dropped_boxes = 0
        boxes = None
        if source == "json":
            paths, labels, boxes, names, ann, self.dropped_boxes = _wider_json_items(root, split)
        else:
            paths, labels, ann = _wider_srn_items(root, split)
            names = WIDER_ATTRIBUTES
        self.annotation_source = source
        super(WiderAttribute, self).__init__(paths, labels, names, boxes=boxes, source=ann,
                                             split=split, skip_bad_images=skip_bad_images,
                                             limit=limit)


# ----------------------------------------------------------------------------- PETA

class PETA(AttributeDataset):
    """PETA, 35-attribute protocol, from ``root/PETA.mat`` + ``root/images/%05d.png``."""

    def __init__(self, root, split="train", partition=0, skip_bad_images=False, limit=None):
        require_root(root, "peta")
        check_split(split, SPLITS)
        mat_path = os.path.join(root, "PETA.mat")
        mat = load_mat(mat_path)
        if "peta" not in mat:
            raise UserError("%s: expected a variable 'peta', found %s"
                            % (mat_path, ", ".join(k for k in mat if not k.startswith("__"))))
        peta = mat["peta"][0, 0] if mat["peta"].size == 1 else None
        if peta is None or getattr(peta.dtype, "names", None) is None:
            raise UserError("%s: peta: expected a 1x1 struct, got %s"
                            % (mat_path, describe_mat(mat["peta"])))

        def field(name):
            return _mat_field(peta, name, mat_path, "peta")

        data = mat_numbers(field("data"), "%s: peta.data" % mat_path, ndim=2)
        names = mat_strings(field("attribute"), "%s: peta.attribute" % mat_path)
        if not names:
            raise UserError("%s: peta.attribute: expected the attribute names, got none" % mat_path)
        selected = mat_integers(field("selected_attribute"),
                                "%s: peta.selected_attribute" % mat_path,
                                minimum=1, maximum=len(names)) - 1
        partitions = np.asarray(field("partion_attribute")).ravel()
        if data.shape[1] < 5 + len(names):
            raise UserError("%s: expected peta.data with 5 + %d columns, got shape %s"
                            % (mat_path, len(names), data.shape))
        if not 0 <= partition < len(partitions):
            raise UserError("partition: expected 0..%d for %s, got %d"
                            % (len(partitions) - 1, mat_path, partition))
        what = "peta.partion_attribute{%d}" % (partition + 1)
        part = _mat_record(partitions[partition])
        if part is None:
            raise UserError("%s: %s: expected a struct with train, val and test indices, got %s"
                            % (mat_path, what, describe_mat(partitions[partition])))
        indices = {}
        for key in ("train", "val", "test"):
            indices[key] = mat_integers(_mat_field(part, key, mat_path, what),
                                        "%s: %s.%s" % (mat_path, what, key),
                                        minimum=1, maximum=len(data)) - 1
        indices["trainval"] = np.concatenate([indices["train"], indices["val"]])
        rows = indices[split]
        binary = data[rows][:, 5 + selected]
        if not np.isin(binary, (0, 1)).all():
            raise UserError("%s: expected 0/1 attribute values in peta.data columns 5.., got %s"
                            % (mat_path, np.unique(binary[~np.isin(binary, (0, 1))])[:3]))
        paths = [os.path.join(root, "images", "%05d.png" % (r + 1)) for r in rows]
        super(PETA, self).__init__(paths, binary * 2 - 1, [names[i] for i in selected],
                                   source=mat_path, split=split,
                                   skip_bad_images=skip_bad_images, limit=limit)


# ----------------------------------------------------------------------------- PA-100K

class PA100K(AttributeDataset):
    """PA-100K from ``annotation.mat`` (26 attributes, official train/val/test)."""

    def __init__(self, root, split="train", skip_bad_images=False, limit=None):
        require_root(root, "pa100k")
        check_split(split, SPLITS)
        mat_path = first_existing([os.path.join(root, "annotation.mat"),
                                    os.path.join(root, "annotation", "annotation.mat")],
                                   "PA-100K annotation.mat")
        mat = load_mat(mat_path)
        image_dir = first_existing([os.path.join(root, "data"),
                                     os.path.join(root, "release_data", "release_data")],
                                    "PA-100K image folder")
        parts = ("train", "val") if split == "trainval" else (split,)
        if "attributes" not in mat:
            raise UserError("%s: expected a variable 'attributes'" % mat_path)
        names = mat_strings(mat["attributes"], "%s: attributes" % mat_path)
        if not names:
            raise UserError("%s: attributes: expected the attribute names, got none" % mat_path)
        paths, labels = [], []
        for part in parts:
            for key in ("%s_images_name" % part, "%s_label" % part):
                if key not in mat:
                    raise UserError("%s: expected a variable %r" % (mat_path, key))
            key = "%s_images_name" % part
            files = mat_strings(mat[key], "%s: %s" % (mat_path, key))
            empty = [i for i, name in enumerate(files) if not name.strip()]
            if empty:
                raise UserError("%s: %s: expected image file names, got an empty one (element %d)"
                                % (mat_path, key, empty[0] + 1))
            label = mat_numbers(mat["%s_label" % part], "%s: %s_label" % (mat_path, part))
            if label.ndim != 2 or label.shape != (len(files), len(names)):
                raise UserError("%s: expected %s_label of shape %dx%d, got %s"
                                % (mat_path, part, len(files), len(names), label.shape))
            bad = ~np.isin(label, (0, 1))
            if bad.any():
                row, col = np.argwhere(bad)[0]
                raise UserError("%s: expected 0/1 values in %s_label, got %g (row %d, column %d)"
                                % (mat_path, part, label[row, col], row + 1, col + 1))
            paths.extend(os.path.join(image_dir, f) for f in files)
            labels.append(label.astype(np.float32) * 2 - 1)
        super(PA100K, self).__init__(paths, np.concatenate(labels), names, source=mat_path,
                                     split=split, skip_bad_images=skip_bad_images, limit=limit)


# ----------------------------------------------------------------------------- Fashion-MNIST

class FashionMNISTAttributes(ArrayImageDataset):
    """Fashion-MNIST demo: 28×28 grey images as 3 channels, derived attributes (1/-1).

    split: train / val / trainval / test (training_runtime.fashion_mnist.split_arrays).
    rare: the strongly imbalanced variant (dataset ``fashion-mnist-rare``): the
    training split keeps only part of the images of the six classes behind the
    10 % attributes, so those sit at 1-3 % (``fashion_attributes.rare_subsample``,
    deterministic); the evaluation splits keep the natural rates, so the rare
    attributes' APs are measured on as many positives as in the plain demo.
    """

    def __init__(self, split="train", data_dir=None, limit=None, rare=False):
        if rare and split in ("train", "trainval"):
            images, classes = fashion_mnist.split_arrays(split, data_dir)
            keep = fashion_attributes.rare_subsample(classes)
            images, classes = images[keep][:limit], classes[keep][:limit]
        else:
            images, classes = fashion_mnist.split_arrays(split, data_dir, limit)
        labels = fashion_attributes.attribute_labels(classes).astype(np.float32)
        super(FashionMNISTAttributes, self).__init__(images, labels)
        self.attribute_names = fashion_attributes.ATTRIBUTE_NAMES
        self.split = split
        self.skipped = []
        self.num_skipped = 0

    @property
    def label_matrix(self):
        return np.asarray(self.labels, dtype=np.float32)


def get_dataset(name, data_dir, split, **opts):
    """Attribute dataset by name (one of DATASETS).

    opts go to the reader (skip_bad_images, limit, source; the demo takes only
    limit). PETA, RAP, RAP2 and par-pkl take ``SPLIT@K`` for partition K
    (:func:`par_datasets.parse_split`).
    """
    if name == "wider":
        return WiderAttribute(data_dir, split, **opts)
    if name == "peta":
        split, partition = par_datasets.parse_split(split)
        return PETA(data_dir, split, **dict(opts, partition=opts.get("partition", partition)))
    if name == "pa100k":
        return PA100K(data_dir, split, **opts)
    if name == "rap":
        return par_datasets.RAP(data_dir, split, **opts)
    if name == "rap2":
        return par_datasets.RAP2(data_dir, split, **opts)
    if name == "par-pkl":
        return par_datasets.ParPickle(data_dir, split, **opts)
    if name in ("fashion-mnist", "fashion-mnist-rare"):
        opts.pop("skip_bad_images", None)
        return FashionMNISTAttributes(split, data_dir, rare=name == "fashion-mnist-rare", **opts)
    raise UserError("--dataset: expected one of %s, got %r" % (", ".join(DATASETS), name))


# ----------------------------------------------------------------------------- transforms

class RandomSquareCrop(Block):
    """The original's ImageRecordIter crop: a square of random side in [min_size, max_size]
    (uniform integer) at a random position, resized (bilinear) to size×size.

    Input H×W×3 uint8 NDArray with H, W >= max_size; output size×size×3.
    """

    def __init__(self, min_size, max_size, size, interpolation=1):
        super(RandomSquareCrop, self).__init__()
        self._min, self._max, self._size, self._interp = min_size, max_size, size, interpolation

    def forward(self, x):
        height, width = x.shape[:2]
        side = random.randint(self._min, self._max)
        x0 = random.randint(0, width - side)
        y0 = random.randint(0, height - side)
        return mx.image.fixed_crop(x, x0, y0, side, side, size=(self._size, self._size),
                                   interp=self._interp)


class ToFloatCHW(HybridBlock):
    """H×W×3 uint8 -> 3×H×W float32, values kept on 0-255 (the original's pixel range)."""

    def hybrid_forward(self, F, x):
        return F.transpose(F.cast(x, "float32"), axes=(2, 0, 1))


def make_transform(train, input_size=224, resize=None, min_crop=None, max_crop=None,
                   normalize="original"):
    """Image transform of the attribute model: H×W×3 uint8 NDArray -> 3×S×S float32.

    Reproduces the original's data path (preprocessing.resize_images + the
    ImageRecordIter settings of utilities.get_iterators):

    - every image is first resized to resize×resize (aspect ratio not kept;
      the original stored its crops at 256×256; area interpolation stands in
      for PIL's ANTIALIAS);
    - train: a square crop of random integer side in [min_crop, max_crop] at a
      random position, resized (bilinear) to input_size, random mirror;
    - eval: the center input_size×input_size crop (the val/test iterators set
      no resize and no crop size, so ImageRecordIter takes the center crop of
      the stored 256×256 image);
    - normalize='original': subtract the mean (R 104, G 117, B 123) from
      0-255 pixels, no std; 'imagenet': pixels / 255, ImageNet mean and std.

    resize, min_crop and max_crop default to 256, 128 and 224 scaled by
    input_size / 224 (exactly the original's values for input_size 224; for
    the 28-pixel demo: 32, 16, 28).
    """
    scale = input_size / 224.0
    resize = int(round(256 * scale)) if resize is None else int(resize)
    min_crop = int(round(128 * scale)) if min_crop is None else int(min_crop)
    max_crop = input_size if max_crop is None else int(max_crop)
    if normalize not in ("original", "imagenet"):
        raise UserError("normalize: expected 'original' or 'imagenet', got %r" % (normalize,))
    if not 0 < min_crop <= max_crop <= resize:
        raise UserError("crop sizes: expected 0 < min_crop <= max_crop <= resize, got %d, %d, %d"
                        % (min_crop, max_crop, resize))
    if input_size > resize:
        raise UserError("input_size: expected at most resize (%d), got %d" % (resize, input_size))
    steps = [transforms.Resize(resize, keep_ratio=False, interpolation=3)]
    if train:
        steps += [RandomSquareCrop(min_crop, max_crop, input_size),
                  transforms.RandomFlipLeftRight()]
    else:
        steps.append(transforms.CenterCrop(input_size))
    if normalize == "original":
        steps += [ToFloatCHW(), transforms.Normalize(ORIGINAL_MEAN, (1.0, 1.0, 1.0))]
    else:
        steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(steps)


def _register(name, splits=("train", "val", "test"), demo=False, label_names=None, summary=""):
    DATASET_REGISTRY.register(DatasetEntry(
        name, lambda data_dir, split, **opts: get_dataset(name, data_dir, split, **opts),
        splits=splits, demo=demo, summary=summary, label_names=label_names))


_register("wider", label_names=WIDER_ATTRIBUTES, summary="WIDER-Attribute (official JSON or SRN lists)")
_register("peta", summary="PETA.mat, 35-attribute protocol")
_register("pa100k", summary="PA-100K annotation.mat")
# the PAR protocol (Rethinking_of_PAR's configs): train on trainval, evaluate on test
_register("rap", splits=("trainval", "test", "test"),
          summary="RAP v1 RAP_annotation.mat, 51 attributes; SPLIT@K = partition K")
_register("rap2", splits=("trainval", "test", "test"),
          summary="RAP v2 RAP_annotation.mat, 54 attributes; SPLIT@K = partition K")
_register("par-pkl", splits=("trainval", "test", "test"),
          summary="Rethinking_of_PAR dataset.pkl (label_idx.eval); SPLIT@K = partition K")
_register("fashion-mnist", demo=True, label_names=fashion_attributes.ATTRIBUTE_NAMES,
          summary="the embedded demo: attributes derived from Fashion-MNIST classes")
_register("fashion-mnist-rare", demo=True, label_names=fashion_attributes.ATTRIBUTE_NAMES,
          summary="the demo with its six 10 %% attributes subsampled to %s in training"
          % "/".join("%g%%" % (100 * r) for r in fashion_attributes.RARE_RATES.values()))
