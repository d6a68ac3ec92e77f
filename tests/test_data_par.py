"""imbalanced_attr.par_datasets: RAP v1 / v2 annotation files and Rethinking_of_PAR's
dataset.pkl, written here in each format (tiny images), partitions, the evaluated-label
selection, the restricted unpickler, and one short training run on a dataset.pkl."""
import os
import pickle
import sys
import types

import numpy as np
import pytest
import scipy.io

from imbalanced_attr import par_datasets
from imbalanced_attr.data import get_dataset
from imbalanced_attr.par_datasets import RAP, RAP2, ParDict, ParPickle, load_par_pickle
from training_runtime.errors import UserError

from helpers import blocks_image, write_image

# Rethinking_of_PAR's group orders as its annotation.md lists them (literal, to check ours)
PEER_RAP1_ORDER = [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29,
                   30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 1, 2, 3, 0, 4, 5, 6, 7, 8, 43,
                   44, 45, 46, 47, 48, 49, 50]
PEER_RAP2_ORDER = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30,
                   31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 1, 2, 3, 4, 0, 5, 6, 7, 8,
                   9, 45, 46, 47, 48, 49, 50, 51, 52, 53]


def test_group_orders_match_rethinking_of_par():
    assert list(par_datasets.RAP1_GROUP_ORDER) == PEER_RAP1_ORDER
    assert list(par_datasets.RAP2_GROUP_ORDER) == PEER_RAP2_ORDER


def _cell(strings):
    cell = np.empty((len(strings), 1), dtype=object)
    for i, s in enumerate(strings):
        cell[i, 0] = s
    return cell


def _images(directory, names):
    for i, name in enumerate(names):
        write_image(os.path.join(directory, name), blocks_image(20 + i, 12, [(40 * i % 256, 90, 200)]),
                    "PNG" if name.endswith(".png") else "JPEG")


def _raw_labels(num_images, num_attributes, seed):
    """0/1 labels with a few 2s (RAP's uncertain value)."""
    raw = np.random.RandomState(seed).randint(0, 2, (num_images, num_attributes)).astype(np.float64)
    raw[1, ::7] = 2
    return raw


def _expected(raw_column):
    """PAR encoding in our convention: 1 -> 1, 0 and 2 -> -1 (one entry at a time)."""
    return [1.0 if v == 1 else -1.0 for v in raw_column]


# ----------------------------------------------------------------------------- RAP v1

def make_rap1(root, num_images=6, bad_value=False, drop=()):
    """RAP_annotation.mat (v1 layout) + images; bad_value: a 3 at row 3, column 41 (1-based);
    drop: struct fields to leave out."""
    names = ["CAM%02d_frame%d.png" % (i % 3, i) for i in range(num_images)]
    raw = _raw_labels(num_images, 92, seed=3)
    if bad_value:
        raw[2, 40] = 3
    os.makedirs(root, exist_ok=True)
    partitions = np.empty((5, 1), dtype=object)
    for p in range(5):
        order = np.roll(np.arange(1, num_images + 1), p).astype(np.float64)
        partitions[p, 0] = {"train_index": order[None, :4], "test_index": order[None, 4:]}
    fields = {"partion": partitions, "label": raw,
              "attribute_chinese": _cell(["c%d" % i for i in range(92)]),
              "attribute_eng": _cell(["attr%02d" % i for i in range(92)]),
              "imagesname": _cell(names)}
    scipy.io.savemat(os.path.join(root, "RAP_annotation.mat"),
                     {"RAP_annotation": {k: v for k, v in fields.items() if k not in drop}})
    _images(os.path.join(root, "RAP_dataset"), names)
    return names, raw


def test_rap1_partitions_and_51_attributes(tmp_path):
    root = str(tmp_path)
    names, raw = make_rap1(root)
    train = RAP(root, "trainval")
    assert len(train.attribute_names) == 51
    assert train.attribute_names[:2] == ("attr09", "attr10")
    assert train.attribute_names[34:38] == ("attr01", "attr02", "attr03", "attr00")
    assert "attr51" not in train.attribute_names  # colour / extra columns are not evaluated
    assert [os.path.basename(p) for p in train.paths] == names[:4]
    for j, name in enumerate(train.attribute_names):
        column = int(name[4:])
        assert train.label_matrix[:, j].tolist() == _expected(raw[:4, column])
    assert RAP(root, "train").paths == train.paths  # RAP v1: train = trainval
    test = RAP(root, "test@2")  # partition 2: indices rolled by two -> images 3, 4 (1-based)
    assert [os.path.basename(p) for p in test.paths] == [names[2], names[3]]
    image, label = test[1]
    assert image.shape == (23, 12, 3) and label.shape == (51,)
    assert get_dataset("rap", root, "test@2").paths == test.paths
    with pytest.raises(UserError, match=r"split: expected one of train, trainval, test, got 'val'"):
        RAP(root, "val")
    with pytest.raises(UserError, match=r"RAP_annotation.partion has 5 partitions, expected @0..@4, got @5"):
        RAP(root, "test@5")
    with pytest.raises(UserError, match=r"expected SPLIT or SPLIT@K"):
        RAP(root, "test@x")


def test_rap1_bad_files(tmp_path):
    with pytest.raises(UserError, match="RAP_annotation.mat: not found"):
        RAP(str(tmp_path), "test")
    make_rap1(str(tmp_path / "bad"), bad_value=True)
    with pytest.raises(UserError, match=r"RAP_annotation.label: expected labels 0, 1 \(or 2 = uncertain\), "
                                        r"got 3 \(row 3, column 41\)"):
        RAP(str(tmp_path / "bad"), "trainval")
    make_rap1(str(tmp_path / "names"), drop=("imagesname",))
    with pytest.raises(UserError, match=r"RAP_annotation: expected a field 'imagesname'"):
        RAP(str(tmp_path / "names"), "trainval")


# ----------------------------------------------------------------------------- RAP v2

def make_rap2(root, num_images=7, num_attributes=60):
    names = ["img%03d.png" % i for i in range(num_images)]
    raw = _raw_labels(num_images, num_attributes, seed=4)
    selected = np.random.RandomState(5).permutation(num_attributes)[:54] + 1  # 1-based
    partitions = np.empty((1, 5), dtype=object)
    for p in range(5):
        order = np.roll(np.arange(1, num_images + 1), p).astype(np.float64)
        partitions[0, p] = {"train_index": order[None, :3], "val_index": order[None, 3:5],
                            "test_index": order[None, 5:]}
    os.makedirs(os.path.join(root, "RAP_annotation"))
    scipy.io.savemat(os.path.join(root, "RAP_annotation", "RAP_annotation.mat"), {"RAP_annotation": {
        "name": _cell(names), "attribute": _cell(["a%02d" % i for i in range(num_attributes)]),
        "data": raw, "selected_attribute": selected[None, :].astype(np.float64),
        "partition_attribute": partitions}})
    _images(os.path.join(root, "RAP_dataset"), names)
    return names, raw, selected


def test_rap2_selected_attributes_and_partitions(tmp_path):
    root = str(tmp_path)
    names, raw, selected = make_rap2(root)
    train = RAP2(root, "train@1")  # rolled by one: images 7, 1, 2 (1-based)
    assert [os.path.basename(p) for p in train.paths] == [names[6], names[0], names[1]]
    expected_names = ["a%02d" % (selected[k] - 1) for k in PEER_RAP2_ORDER]
    assert list(train.attribute_names) == expected_names
    for j, name in enumerate(train.attribute_names):
        assert train.label_matrix[:, j].tolist() == _expected(raw[[6, 0, 1], int(name[1:])])
    trainval = RAP2(root, "trainval@1")
    assert [os.path.basename(p) for p in trainval.paths] == [names[i] for i in (6, 0, 1, 2, 3)]
    assert len(RAP2(root, "val")) == 2 and len(RAP2(root, "test")) == 2
    with pytest.raises(UserError, match=r"split: expected one of train, val, trainval, test, got 'all'"):
        RAP2(root, "all")


# ----------------------------------------------------------------------------- dataset.pkl

class EasyDict(dict):
    """Stand-in for easydict.EasyDict (pickled under that name): keys mirrored as attributes,
    so the pickle holds both the items and a __dict__ state, as the real one does."""

    def __init__(self, **entries):
        super(EasyDict, self).__init__()
        for key, value in entries.items():
            setattr(self, key, value)

    def __setattr__(self, key, value):
        super(EasyDict, self).__setattr__(key, value)
        self[key] = value


EasyDict.__module__ = "easydict"


def write_pkl(path, obj, monkeypatch, protocol=None):
    """pickle.dump with ``EasyDict`` importable as easydict.EasyDict while pickling only."""
    with monkeypatch.context() as patch:
        module = types.ModuleType("easydict")
        module.EasyDict = EasyDict
        patch.setitem(sys.modules, "easydict", module)
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=protocol)
    return path


def make_rap_pkl(root, monkeypatch, num_images=8):
    """A dataset_all.pkl laid out as format_rap.py writes one: 12 raw attributes, the evaluated
    ones reordered by label_idx.eval, 3 random trainval/test partitions, an absolute root
    of another machine whose last folder holds the images under --data-dir."""
    names = ["p%02d.jpg" % i for i in range(num_images)]
    raw = _raw_labels(num_images, 12, seed=6).astype(np.uint8)
    rng = np.random.RandomState(7)
    permutations = [rng.permutation(num_images) for _ in range(3)]
    dataset = EasyDict(
        description="rap", reorder="group_order", root="/mnt/elsewhere/RAP/RAP_dataset",
        image_name=names, label=raw, attr_name=["attr%02d" % i for i in range(12)],
        label_idx=EasyDict(eval=[4, 5, 1, 0, 2, 3], color=list(range(6, 9)), extra=range(9, 12)),
        partition=EasyDict(trainval=[p[:5] for p in permutations], test=[p[5:] for p in permutations]),
        weight_trainval=[np.mean(raw[p[:5]], axis=0).astype(np.float32) for p in permutations])
    write_pkl(os.path.join(root, "dataset_all.pkl"), dataset, monkeypatch)
    _images(os.path.join(root, "RAP_dataset"), names)
    return names, raw, permutations


def test_par_pkl_partitions_and_label_selection(tmp_path, monkeypatch):
    root = str(tmp_path)
    names, raw, permutations = make_rap_pkl(root, monkeypatch)
    before = sys.modules.get("easydict")
    trainval = ParPickle(root, "trainval")
    assert sys.modules.get("easydict") is before  # easydict was never imported
    assert trainval.attribute_names == ("attr04", "attr05", "attr01", "attr00", "attr02", "attr03")
    assert [os.path.basename(p) for p in trainval.paths] == [names[i] for i in permutations[0][:5]]
    assert os.path.dirname(trainval.paths[0]) == os.path.join(root, "RAP_dataset")
    for j, name in enumerate(trainval.attribute_names):
        assert trainval.label_matrix[:, j].tolist() == _expected(raw[permutations[0][:5], int(name[4:])])
    test = get_dataset("par-pkl", root, "test@2")
    assert [os.path.basename(p) for p in test.paths] == [names[i] for i in permutations[2][5:]]
    assert test[0][0].shape[2] == 3
    with pytest.raises(UserError, match=r"split: expected one of trainval, test, got 'val'"):
        ParPickle(root, "val")
    with pytest.raises(UserError, match=r"partition.test has 3 partitions, expected @0..@2, got @3"):
        ParPickle(root, "test@3")
    # --data-dir may name the file itself
    assert ParPickle(os.path.join(root, "dataset_all.pkl"), "test@1").paths == ParPickle(root, "test@1").paths
    loaded = load_par_pickle(os.path.join(root, "dataset_all.pkl"))
    assert type(loaded) is ParDict and type(loaded.label_idx) is ParDict
    assert loaded.label_idx.extra == range(9, 12) and loaded.description == "rap"


def test_par_pkl_single_partition_and_no_label_idx(tmp_path, monkeypatch):
    """PA-100K style: one array per split; zero-shot style: no label_idx (every attribute);
    pickle protocol 5 (numpy arrays rebuilt from their bytes)."""
    root = str(tmp_path)
    names = ["%06d.jpg" % i for i in range(6)]
    raw = _raw_labels(6, 4, seed=8)
    raw[raw == 2] = 0
    dataset = EasyDict(root="data", image_name=np.array(names), label=raw,
                       attr_name=["Female", "AgeOver60", "Age18-60", "AgeLess18"],
                       partition=EasyDict(train=np.arange(0, 3), val=np.arange(3, 4),
                                          test=np.arange(4, 6), trainval=np.arange(0, 4)))
    write_pkl(os.path.join(root, "dataset.pkl"), dataset, monkeypatch, protocol=5)
    with open(os.path.join(root, "dataset.pkl"), "rb") as f:
        assert b"_frombuffer" in f.read()
    _images(os.path.join(root, "data"), names)
    val = ParPickle(root, "val")
    assert val.attribute_names == ("Female", "AgeOver60", "Age18-60", "AgeLess18")
    assert [os.path.basename(p) for p in val.paths] == [names[3]]
    assert val.label_matrix[0].tolist() == _expected(raw[3])
    with pytest.raises(UserError, match=r"partition.train has 1 partition, expected @0..@0, got @1"):
        ParPickle(root, "train@1")
    os.rename(os.path.join(root, "data"), os.path.join(root, "moved"))
    with pytest.raises(UserError, match=r"dataset.pkl: image 000003.jpg not found under"):
        ParPickle(root, "val")


class _Evil(object):
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, ("touch %s" % self.marker,)


def test_par_pkl_refuses_code(tmp_path, monkeypatch):
    marker = str(tmp_path / "ran")
    path = str(tmp_path / "dataset.pkl")
    with open(path, "wb") as f:
        pickle.dump({"image_name": ["a.jpg"], "label": _Evil(marker)}, f)
    with pytest.raises(UserError) as err:
        ParPickle(str(tmp_path), "test")
    message = str(err.value)
    assert message.startswith(path + ": refusing to load ") and "\n" not in message
    assert ("%s.system" % os.system.__module__) in message
    assert not os.path.exists(marker)
    with open(path, "wb") as f:
        f.write(b"cbuiltins\neval\n(S'1+1'\ntR.")  # protocol 0: builtins.eval('1+1')
    with pytest.raises(UserError, match=r"dataset.pkl: refusing to load builtins.eval"):
        load_par_pickle(path)
    with open(path, "wb") as f:
        f.write(b"\x80\x04not a pickle")
    with pytest.raises(UserError, match=r"dataset.pkl: expected a pickle written by Rethinking_of_PAR"):
        load_par_pickle(path)


def test_par_pkl_trains_and_reports_par_metrics(tmp_path, monkeypatch, capsys):
    """train_attr.py --dataset par-pkl, in process: 2 steps on partition 1, the final test
    prints mA / accuracy / precision / recall / F1 over the 6 evaluated attributes."""
    from imbalanced_attr.family import FAMILY
    from training_runtime import app
    root = str(tmp_path / "RAP")
    os.makedirs(root)
    _, raw, permutations = make_rap_pkl(root, monkeypatch)
    run = str(tmp_path / "run")
    report = app.main(FAMILY, [
        "--dataset", "par-pkl", "--data-dir", root, "--train-split", "trainval@1",
        "--val-split", "test@1", "--test-split", "test@1", "--no-pretrained",
        "--backbone", "resnet18_v1", "--image-size", "32", "--batch-size", "4", "--epochs", "1",
        "--max-steps", "2", "--normalize", "imagenet", "--figures", "none", "--picture-images", "0",
        "--save-dir", run])
    out = capsys.readouterr().out
    assert "mA " in out and "F1 " in out
    for key in ("mA", "accuracy", "precision", "recall", "f1"):
        assert key in report
    assert len(report["APs"]) == 6
    # the final test ran on partition 1's test images, label_idx.eval's columns in its order
    test_rows = raw[permutations[1][5:]]
    assert report["positive_rates"] == pytest.approx([np.mean(test_rows[:, c] == 1) for c in (4, 5, 1, 0, 2, 3)])
    assert all(0 <= report[k] <= 1 for k in ("mA", "accuracy", "precision", "recall", "f1"))
    with pytest.raises(UserError, match=r"^--val-split: expected one of trainval, test, got 'val'"):
        app.main(FAMILY, ["--dataset", "par-pkl", "--data-dir", root, "--val-split", "val",
                          "--no-pretrained", "--backbone", "resnet18_v1", "--image-size", "32",
                          "--save-dir", str(tmp_path / "run2")])


def test_peta_partition_suffix(tmp_path):
    """--dataset peta takes the same SPLIT@K (its reader's partition argument)."""
    from imbalanced_attr.data import PETA
    from test_data_attr import make_peta
    make_peta(str(tmp_path))
    assert get_dataset("peta", str(tmp_path), "test@1").paths == PETA(str(tmp_path), "test", partition=1).paths
    assert get_dataset("peta", str(tmp_path), "test").paths == PETA(str(tmp_path), "test", partition=0).paths
    assert get_dataset("peta", str(tmp_path), "test@1").paths != get_dataset("peta", str(tmp_path), "test").paths
