"""Pedestrian-attribute (PAR) datasets: RAP v1, RAP v2 and Rethinking_of_PAR's dataset.pkl.

Registered (from :mod:`imbalanced_attr.data`) as ``--dataset rap``, ``rap2``
and ``par-pkl``; docs/DATASETS.md has the layouts and commands.

Labels follow the rest of the attribute family: float32 vectors in
{1, -1, 0}. The PAR files hold 0/1, and 2 in RAP's raw annotation (an
uncertain label); as Rethinking_of_PAR's ``PedesAttr`` does (``label == 2 ->
0``), 2 counts as a negative (-1 here): no entry is unspecified, so
``attribute_metrics`` (mA, instance accuracy / precision / recall / F1) sees
the same positives and negatives as the PAR protocol.

Partitions: RAP v1 and v2 (and the PETA / RAP pickles) come with 5 random
partitions. The split names carry the partition: ``SPLIT`` is partition 0
(what Rethinking_of_PAR trains on: ``partition[split][0]``), ``SPLIT@K`` the
0-based partition K, e.g. ``--train-split trainval@2 --val-split test@2
--test-split test@2`` (give the same K to every split: partitions overlap).

Attribute order: the 51 (v1) / 54 (v2) evaluated attributes in the group
order of Rethinking_of_PAR (head, upper body, lower body, shoes,
accessories, then age, gender, body shape, role, action), the order its
``format_rap.py`` / ``format_rap2.py`` write into ``label_idx.eval``, so
``rap`` and ``par-pkl`` on the same data give the same label vectors.

dataset.pkl is read with :class:`RestrictedUnpickler`: a pickle can run any
code when loaded, so only plain containers, numpy arrays and EasyDict
(read as :class:`ParDict`, easydict is never imported) are accepted.
"""
import builtins
import codecs
import collections
import os
import pickle

import numpy as np

from training_runtime.errors import UserError
from training_runtime.images import (check_split, describe_mat, first_existing, load_mat,
                                     mat_integers, mat_numbers, mat_strings, require_root)

__all__ = ["RAP", "RAP2", "ParPickle", "RestrictedUnpickler", "ParDict", "load_par_pickle",
           "parse_split", "RAP1_GROUP_ORDER", "RAP2_GROUP_ORDER"]

#: RAP v1: the evaluated attributes are the first 51 of the 92 columns; their group order
#: (head 9-14, upper 15-23, lower 24-29, shoes 30-34, accessories 35-42, age 1-3, female 0,
#: body shape 4-6, role 7-8, action 43-50)
RAP1_GROUP_ORDER = tuple(list(range(9, 43)) + [1, 2, 3, 0] + list(range(4, 9)) + list(range(43, 51)))
#: RAP v2: positions within ``selected_attribute`` (54): head 10-14, upper 15-24, lower 25-30,
#: shoes 31-36, accessories 37-44, age 1-4, female 0, body shape 5-7, role 8-9, action 45-53
RAP2_GROUP_ORDER = tuple(list(range(10, 45)) + [1, 2, 3, 4, 0] + list(range(5, 10)) + list(range(45, 54)))
PKL_NAMES = ("dataset.pkl", "dataset_all.pkl")


def parse_split(split, flag="split"):
    """'trainval' -> ('trainval', 0); 'test@2' -> ('test', 2). UserError for a bad suffix."""
    name, sep, number = str(split).partition("@")
    if not sep:
        return name, 0
    if not number.isdigit():
        raise UserError("%s: expected SPLIT or SPLIT@K with K a partition number (0, 1, ...), got %r"
                        % (flag, split))
    return name, int(number)


def _pick(count, partition, source):
    if not 0 <= partition < count:
        raise UserError("split: %s has %d partition%s, expected @0..@%d, got @%d"
                        % (source, count, "" if count == 1 else "s", count - 1, partition))


def par_labels(raw, source, columns=None):
    """0/1/2 labels (N, C) -> float32 1/-1 (2, RAP's uncertain label, is a negative as in
    Rethinking_of_PAR). ``columns``: the evaluated columns (default all), in their order.
    UserError naming ``source`` and the file's row and column for any other value."""
    raw = np.asarray(raw)
    if raw.dtype.kind not in "biuf" or raw.ndim != 2:
        raise UserError("%s: expected an N x C numeric label matrix, got %s" % (source, describe_mat(raw)))
    columns = np.arange(raw.shape[1]) if columns is None else np.asarray(columns)
    raw = raw[:, columns]
    bad = ~np.isin(raw, (0, 1, 2))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise UserError("%s: expected labels 0, 1 (or 2 = uncertain), got %g (row %d, column %d)"
                        % (source, raw[row, col], row + 1, columns[col] + 1))
    return np.where(raw == 1, 1.0, -1.0).astype(np.float32)


# ----------------------------------------------------------------------------- RAP .mat

def _struct(mat, path):
    if "RAP_annotation" not in mat:
        raise UserError("%s: expected a variable 'RAP_annotation', found %s"
                        % (path, ", ".join(k for k in mat if not k.startswith("__")) or "none"))
    value = mat["RAP_annotation"]
    if getattr(value.dtype, "names", None) is None or value.size != 1:
        raise UserError("%s: RAP_annotation: expected a 1x1 struct, got %s" % (path, describe_mat(value)))
    return value.ravel()[0]


def _field(record, names, path, what):
    """The first field of ``names`` present in the loadmat struct ``record``."""
    present = record.dtype.names or ()
    for name in names:
        if name in present:
            return record[name]
    raise UserError("%s: %s: expected a field %s, found %s"
                    % (path, what, " or ".join(repr(n) for n in names), ", ".join(present)))


def _partition_record(cell, index, path, what):
    """Partition ``index`` of a 1xK cell of structs (any loadmat nesting)."""
    cells = np.asarray(cell)
    if cells.dtype.names is None:
        cells = cells.ravel()
    else:
        cells = cells.reshape(-1)
    _pick(len(cells), index, "%s: %s" % (path, what))
    value = cells[index]
    while isinstance(value, np.ndarray) and value.dtype.names is None and value.dtype.kind == "O" \
            and value.size == 1:
        value = value.ravel()[0]
    if isinstance(value, np.ndarray) and value.dtype.names is not None and value.size == 1:
        value = value.ravel()[0]
    if not (isinstance(value, np.void) and value.dtype.names):
        raise UserError("%s: %s{%d}: expected a struct of image indices, got %s"
                        % (path, what, index + 1, describe_mat(value)))
    return value


def _rap_dataset(root, name, split, build, skip_bad_images, limit):
    """RAP v1 / v2 (``build`` reads the struct): the annotation file under ``root``, the
    images in ``root/RAP_dataset`` (or ``root``)."""
    from .data import AttributeDataset
    base, partition = parse_split(split)
    require_root(root, name)
    mat_path = first_existing([os.path.join(root, "RAP_annotation", "RAP_annotation.mat"),
                               os.path.join(root, "RAP_annotation.mat")], "RAP_annotation.mat")
    image_dir = os.path.join(root, "RAP_dataset")
    image_dir = image_dir if os.path.isdir(image_dir) else root
    record = _struct(load_mat(mat_path), mat_path)
    images, labels, names, indices = build(record, mat_path, base, partition)
    rows = mat_integers(indices, "%s: %s" % (mat_path, "partition indices"), minimum=1,
                        maximum=len(images)) - 1
    paths = [os.path.join(image_dir, images[r]) for r in rows]
    return AttributeDataset(paths, labels[rows], names, source=mat_path, split=split,
                            skip_bad_images=skip_bad_images, limit=limit)


def _rap_common(record, path, image_field, label_field, name_fields, width):
    images = mat_strings(_field(record, image_field, path, "RAP_annotation"),
                         "%s: RAP_annotation.%s" % (path, image_field[0]))
    raw = mat_numbers(_field(record, label_field, path, "RAP_annotation"),
                      "%s: RAP_annotation.%s" % (path, label_field[0]), ndim=2)
    names = mat_strings(_field(record, name_fields, path, "RAP_annotation"),
                        "%s: RAP_annotation.%s" % (path, name_fields[0]))
    if raw.shape[0] != len(images) or raw.shape[1] != len(names) or len(names) < width:
        raise UserError("%s: expected RAP_annotation.%s of %d images x %d attributes (at least %d), "
                        "got shape %s" % (path, label_field[0], len(images), len(names), width, raw.shape))
    return images, raw, names


def RAP(root, split="trainval", skip_bad_images=False, limit=None):
    """RAP v1: ``RAP_annotation.mat`` (in ``root/RAP_annotation/`` or ``root``), images in
    ``root/RAP_dataset/``. Struct fields read: ``imagesname`` (N names), ``label`` (N x 92,
    0/1/2), ``attribute_eng`` (or ``attribute``: 92 names), ``partion`` (5 structs of 1-based
    ``train_index`` / ``test_index``). The 51 evaluated attributes (the first 51 columns) in
    :data:`RAP1_GROUP_ORDER`. Splits: train = trainval (the partition's train_index; RAP v1
    has no validation part), test; ``@K`` selects partition K.
    """

    def build(record, path, base, partition):
        check_split(base, ("train", "trainval", "test"))
        images, raw, names = _rap_common(record, path, ("imagesname",), ("label",),
                                         ("attribute_eng", "attribute"), 51)
        part = _partition_record(_field(record, ("partion", "partition"), path, "RAP_annotation"),
                                 partition, path, "RAP_annotation.partion")
        key = "test_index" if base == "test" else "train_index"
        indices = _field(part, (key,), path, "RAP_annotation.partion{%d}" % (partition + 1))
        order = list(RAP1_GROUP_ORDER)
        return images, par_labels(raw, "%s: RAP_annotation.label" % path, order), \
            [names[i] for i in order], indices

    return _rap_dataset(root, "rap", split, build, skip_bad_images, limit)


def RAP2(root, split="trainval", skip_bad_images=False, limit=None):
    """RAP v2: ``RAP_annotation/RAP_annotation.mat`` (or ``root/RAP_annotation.mat``), images in
    ``root/RAP_dataset/``. Struct fields read: ``name`` (N names), ``data`` (N x 152, 0/1/2),
    ``attribute`` (152 names), ``selected_attribute`` (the 54 evaluated attributes, 1-based),
    ``partition_attribute`` (5 structs of 1-based ``train_index`` / ``val_index`` /
    ``test_index``). Attributes: the selected ones in :data:`RAP2_GROUP_ORDER`. Splits: train,
    val, trainval (train + val), test; ``@K`` selects partition K.
    """

    def build(record, path, base, partition):
        check_split(base, ("train", "val", "trainval", "test"))
        images, raw, names = _rap_common(record, path, ("name",), ("data",), ("attribute",), 54)
        selected = mat_integers(_field(record, ("selected_attribute",), path, "RAP_annotation"),
                                "%s: RAP_annotation.selected_attribute" % path,
                                minimum=1, maximum=len(names)) - 1
        if len(selected) != len(RAP2_GROUP_ORDER):
            raise UserError("%s: RAP_annotation.selected_attribute: expected the %d evaluated "
                            "attributes of RAP v2, got %d" % (path, len(RAP2_GROUP_ORDER), len(selected)))
        part = _partition_record(_field(record, ("partition_attribute",), path, "RAP_annotation"),
                                 partition, path, "RAP_annotation.partition_attribute")
        what = "RAP_annotation.partition_attribute{%d}" % (partition + 1)
        keys = ("train", "val") if base == "trainval" else (base,)
        indices = np.concatenate([
            mat_integers(_field(part, (key + "_index",), path, what), "%s: %s.%s_index" % (path, what, key))
            for key in keys])
        order = selected[list(RAP2_GROUP_ORDER)]
        return images, par_labels(raw, "%s: RAP_annotation.data" % path, order), \
            [names[i] for i in order], indices

    return _rap_dataset(root, "rap2", split, build, skip_bad_images, limit)


# ----------------------------------------------------------------------------- dataset.pkl

class ParDict(dict):
    """What an ``easydict.EasyDict`` of a dataset.pkl becomes: a dict with attribute access.

    Pickled EasyDicts carry their entries twice (as items and as ``__dict__``
    state); the items are kept, the state only fills keys that are missing.
    """

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name)

    def __setstate__(self, state):
        if isinstance(state, dict):
            for key, value in state.items():
                self.setdefault(key, value)


def _numpy_allowed():
    from numpy.core import multiarray, numeric
    table = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    # numpy >= 2 writes numpy._core.*; the functions are the same as numpy.core's here
    for core in ("numpy.core", "numpy._core"):
        table[(core + ".multiarray", "_reconstruct")] = multiarray._reconstruct
        table[(core + ".multiarray", "scalar")] = multiarray.scalar
        # protocol-5 pickles: an array from its bytes
        table[(core + ".numeric", "_frombuffer")] = numeric._frombuffer
    return table


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler that builds only the classes a dataset.pkl holds.

    Allowed: numpy arrays, dtypes and scalars (``_reconstruct``, ``_frombuffer``,
    ``ndarray``, ``dtype``, ``scalar``), ``collections.OrderedDict``, the harmless builtins
    ``range`` / ``set`` / ``frozenset`` / ``slice`` / ``complex`` /
    ``bytearray``, ``_codecs.encode`` (bytes in protocol-2 pickles) and
    ``easydict.EasyDict`` (-> :class:`ParDict`, without importing easydict).
    Anything else (``os.system``, ``builtins.eval``, any other class) raises a
    UserError naming ``source`` and the class, before it is called.
    """

    ALLOWED = {("collections", "OrderedDict"): collections.OrderedDict,
               ("easydict", "EasyDict"): ParDict,
               ("_codecs", "encode"): codecs.encode}
    ALLOWED.update((("builtins", name), getattr(builtins, name))
                   for name in ("range", "set", "frozenset", "slice", "complex", "bytearray"))

    def __init__(self, file, source):
        super(RestrictedUnpickler, self).__init__(file)
        self.source = source
        self.allowed = dict(self.ALLOWED)
        self.allowed.update(_numpy_allowed())

    def find_class(self, module, name):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise UserError("%s: refusing to load %s.%s from this pickle (a pickle can run code; "
                            "a dataset.pkl holds only dicts, lists, numpy arrays and EasyDict)"
                            % (self.source, module, name))


def load_par_pickle(path):
    """The object of a dataset.pkl, unpickled by :class:`RestrictedUnpickler`."""
    if not os.path.isfile(path):
        raise UserError("%s: file not found" % path)
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, path).load()
    except UserError:
        raise
    except Exception as err:  # truncated or not a pickle: UnpicklingError, EOFError, ValueError...
        raise UserError("%s: expected a pickle written by Rethinking_of_PAR's format_*.py (%s: %s)"
                        % (path, type(err).__name__, err))


def _key(mapping, key, path, what="the dataset"):
    if not isinstance(mapping, dict):
        raise UserError("%s: %s: expected a dict (EasyDict), got %s" % (path, what, type(mapping).__name__))
    if key not in mapping:
        raise UserError("%s: %s: expected a key %r, found %s"
                        % (path, what, key, ", ".join(map(str, mapping)) or "none"))
    return mapping[key]


def _index_vector(value, count, path, what):
    """A 1-D int64 array of 0-based indices < ``count`` (UserError naming ``what``)."""
    if isinstance(value, range):
        value = list(value)
    array = np.asarray(value)
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iuf") or \
            (array.size and not np.all(array == np.round(array))):
        raise UserError("%s: %s: expected a list of whole-number indices, got %s"
                        % (path, what, describe_mat(array)))
    array = array.astype(np.int64)
    if array.size and (array.min() < 0 or array.max() >= count):
        raise UserError("%s: %s: expected indices in 0..%d, got %d"
                        % (path, what, count - 1, array.min() if array.min() < 0 else array.max()))
    return array


def _as_text(value, path, what):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (str, np.str_)):
        return str(value)
    raise UserError("%s: %s: expected text, got %s" % (path, what, type(value).__name__))


def _find_pickle(data_dir):
    if data_dir is None:
        raise UserError("--data-dir: required for dataset par-pkl (the folder of dataset.pkl, or the file)")
    if os.path.isfile(data_dir):
        return data_dir, os.path.dirname(os.path.abspath(data_dir))
    require_root(data_dir, "par-pkl")
    path = first_existing([os.path.join(data_dir, n) for n in PKL_NAMES], "Rethinking_of_PAR dataset.pkl")
    return path, data_dir


def _image_dir(root, data_dir, names, path):
    """Where the images are: ``data_dir/<last folder of the pickle's root>``, ``data_dir`` or
    the pickle's ``root`` itself (when absolute), the first holding one of the first images
    listed."""
    candidates = []
    if root:
        candidates.append(os.path.join(data_dir, os.path.basename(os.path.normpath(root))))
    candidates.append(data_dir)
    if root and os.path.isabs(root):
        candidates.append(root)
    for directory in candidates:
        if any(os.path.isfile(os.path.join(directory, n)) for n in names[:20]):
            return directory
    raise UserError("%s: image %s not found under %s" % (path, names[0] if names else "?",
                                                         " or ".join(candidates)))


def ParPickle(data_dir, split="trainval", skip_bad_images=False, limit=None):
    """A Rethinking_of_PAR ``dataset.pkl`` (``dataset_all.pkl``): ``--data-dir`` is its folder
    (or the file). Keys read: ``image_name`` (N), ``label`` (N x A, 0/1/2), ``attr_name`` (A),
    ``label_idx.eval`` (the evaluated attributes, in that order; all when ``label_idx`` is
    absent, as for zero-shot splits), ``partition`` (split -> indices, or a list of
    partitions), ``root`` (its last folder name is looked for under ``--data-dir``). Splits:
    the keys of ``partition``; ``SPLIT@K`` = partition K of a list (plain ``SPLIT`` = K 0).
    """
    from .data import AttributeDataset
    base, partition = parse_split(split)
    path, directory = _find_pickle(data_dir)
    dataset = load_par_pickle(path)
    image_names = _key(dataset, "image_name", path)
    if isinstance(image_names, np.ndarray):
        image_names = image_names.tolist()
    if not isinstance(image_names, (list, tuple)) or not image_names:
        raise UserError("%s: image_name: expected a list of image file names, got %s"
                        % (path, type(image_names).__name__))
    attr_names = [_as_text(v, path, "attr_name") for v in list(_key(dataset, "attr_name", path))]
    raw = np.asarray(_key(dataset, "label", path))
    if raw.shape != (len(image_names), len(attr_names)):
        raise UserError("%s: label: expected %d images x %d attributes (image_name x attr_name), "
                        "got shape %s" % (path, len(image_names), len(attr_names), raw.shape))
    selected = np.arange(len(attr_names))
    if "label_idx" in dataset:
        selected = _index_vector(_key(_key(dataset, "label_idx", path), "eval", path, "label_idx"),
                                 len(attr_names), path, "label_idx.eval")
    labels = par_labels(raw, "%s: label" % path, selected)
    partitions = _key(dataset, "partition", path)
    if not isinstance(partitions, dict):
        raise UserError("%s: partition: expected a dict split -> indices, got %s"
                        % (path, type(partitions).__name__))
    check_split(base, tuple(partitions))
    value = partitions[base]
    if isinstance(value, (list, tuple)) and value and not np.isscalar(value[0]):
        _pick(len(value), partition, "%s: partition.%s" % (path, base))
        value = value[partition]
    else:
        _pick(1, partition, "%s: partition.%s" % (path, base))
    rows = _index_vector(value, len(image_names), path, "partition.%s" % split)
    names = [_as_text(image_names[r], path, "image_name[%d]" % r) for r in rows]
    root = dataset.get("root")
    root = None if root is None else _as_text(root, path, "root")
    image_dir = _image_dir(root, directory, names, path)
    return AttributeDataset([os.path.join(image_dir, n) for n in names], labels[rows],
                            [attr_names[i] for i in selected], source=path, split=split,
                            skip_bad_images=skip_bad_images, limit=limit)
