"""imbalanced_attr.data: WIDER-Attribute (JSON and SRN lists), PETA, PA-100K, the
Fashion-MNIST demo, training_targets and the original's transforms, on tiny
on-disk copies of the real formats."""
import json
import os
import random

import numpy as np
import mxnet as mx
import pytest
import scipy.io

from imbalanced_attr import fashion_attributes
from imbalanced_attr import data as attr_data
from imbalanced_attr.data import (PA100K, PETA, FashionMNISTAttributes, WiderAttribute,
                                  get_dataset, make_transform, training_targets)
from training_runtime import fashion_mnist
from training_runtime.errors import UserError

from conftest import FASHION_MNIST_DIR
from helpers import blocks_image, coordinate_image, write_image, write_jpeg

needs_fashion_mnist = pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR),
                                         reason="Fashion-MNIST not installed")


def label_row(seed):
    return [int(v) for v in np.random.RandomState(seed).choice([-1, 0, 1], 14)]


# ----------------------------------------------------------------------------- WIDER JSON

RED, GREEN, BLUE = (220, 30, 30), (30, 220, 30), (30, 30, 220)


def make_wider_json(root):
    """trainval: a train image with 2 persons (+1 zero-size box), a val image with 1;
    test: one image with 1 person. Image 80x40: left half red, right half green."""
    for rel in ("train/0--Parade/0_Parade_1.jpg", "val/0--Parade/0_Parade_2.jpg",
                "test/1--Handshaking/1_Hand_3.jpg"):
        write_jpeg(os.path.join(root, "Image", rel), blocks_image(40, 80, [RED, GREEN]))
    trainval = {
        "attribute_id_map": {str(i): n for i, n in enumerate(attr_data.WIDER_ATTRIBUTES)},
        "images": [
            {"file_name": "train/0--Parade/0_Parade_1.jpg", "scene_id": 0, "targets": [
                {"attribute": label_row(0), "bbox": [2.0, 4.0, 30.0, 20.0]},      # in red
                {"attribute": label_row(1), "bbox": [50.0, 10.0, 60.0, 50.0]},    # green, clipped
                {"attribute": label_row(2), "bbox": [5.0, 5.0, 0.0, 10.0]}]},     # no area
            {"file_name": "val/0--Parade/0_Parade_2.jpg", "scene_id": 0, "targets": [
                {"attribute": label_row(3), "bbox": [0, 0, 80, 40]}]},
        ]}
    test = {"images": [{"file_name": "test/1--Handshaking/1_Hand_3.jpg", "scene_id": 1,
                        "targets": [{"attribute": label_row(4), "bbox": [40, 0, 40, 40]}]}]}
    os.makedirs(os.path.join(root, "Anno"))
    for name, content in (("trainval", trainval), ("test", test)):
        with open(os.path.join(root, "Anno", "wider_attribute_%s.json" % name), "w") as f:
            json.dump(content, f)
    return trainval, test


def test_wider_json_splits_crops_and_labels(tmp_path):
    root = str(tmp_path)
    make_wider_json(root)
    train = WiderAttribute(root, "train")
    assert train.annotation_source == "json"
    assert len(train) == 2 and train.dropped_boxes == 1
    assert train.attribute_names == attr_data.WIDER_ATTRIBUTES
    image, label = train[0]
    assert image.shape == (20, 30, 3) and image.dtype == np.uint8
    assert np.abs(image.asnumpy().reshape(-1, 3).mean(0) - RED).max() < 8
    assert label.dtype == np.float32
    np.testing.assert_array_equal(label, label_row(0))
    image, label = train[1]
    assert image.shape == (30, 30, 3)  # box 50..110 x 10..60 clipped to the 80x40 image
    assert np.abs(image.asnumpy()[:, 5:].reshape(-1, 3).mean(0) - GREEN).max() < 8
    np.testing.assert_array_equal(train.label_matrix, [label_row(0), label_row(1)])
    assert len(WiderAttribute(root, "val")) == 1
    assert len(WiderAttribute(root, "trainval")) == 3
    test = WiderAttribute(root, "test")
    assert len(test) == 1 and test[0][0].shape == (40, 40, 3)
    np.testing.assert_array_equal(test[0][1], label_row(4))


def test_wider_json_bad_labels(tmp_path):
    root = str(tmp_path)
    trainval, _ = make_wider_json(root)
    path = os.path.join(root, "Anno", "wider_attribute_trainval.json")
    trainval["images"][1]["targets"][0]["attribute"] = [1] * 13
    with open(path, "w") as f:
        json.dump(trainval, f)
    with pytest.raises(UserError, match=r"wider_attribute_trainval.json: image "
                                        r"val/0--Parade/0_Parade_2.jpg target 0: expected 14"):
        WiderAttribute(root, "train")
    trainval["images"][1]["targets"][0]["attribute"] = [2] + [1] * 13
    with open(path, "w") as f:
        json.dump(trainval, f)
    with pytest.raises(UserError, match=r"expected attribute labels in \{-1, 0, 1\}"):
        WiderAttribute(root, "val")
    with open(path, "w") as f:
        f.write("{not json")
    with pytest.raises(UserError, match="wider_attribute_trainval.json: expected the WIDER"):
        WiderAttribute(root, "train")


def test_wider_missing_image_and_skip(tmp_path):
    root = str(tmp_path)
    make_wider_json(root)
    os.remove(os.path.join(root, "Image", "val", "0--Parade", "0_Parade_2.jpg"))
    trainval = WiderAttribute(root, "trainval")
    with pytest.raises(UserError, match="0_Parade_2.jpg: image file not found"):
        trainval[2]
    with pytest.warns(UserWarning):
        trainval = WiderAttribute(root, "trainval", skip_bad_images=True)
    assert len(trainval) == 2 and trainval.num_skipped == 1
    with pytest.raises(UserError,
                       match="expected at least one usable image, got none \\(1 skipped"):
        with pytest.warns(UserWarning):
            WiderAttribute(root, "val", skip_bad_images=True)


# ----------------------------------------------------------------------------- WIDER SRN lists

def make_wider_srn(root, label_rows=None):
    """SRN-style lists: 3 train images (one under val/), 1 test image; mixed line styles."""
    rels = ["Image_cropped/train/0--Parade/a_0.jpg", "Image_cropped/val/0--Parade/b_0.jpg",
            "Image_cropped/train/2--Demo/c_1.jpg"]
    for i, rel in enumerate(rels + ["Image_cropped/test/3--Riot/d_0.jpg"]):
        write_jpeg(os.path.join(root, rel), blocks_image(30 + i, 20, [BLUE]))
    os.makedirs(os.path.join(root, "wider_att"))
    with open(os.path.join(root, "wider_att", "wider_att_train_imglist.txt"), "w") as f:
        f.write("./%s 3\n" % rels[0])
        f.write("/%s 1\n" % rels[1])
        f.write("'%s',\n" % rels[2])
    with open(os.path.join(root, "wider_att", "wider_att_test_imglist.txt"), "w") as f:
        f.write("Image_cropped/test/3--Riot/d_0.jpg 2\n")
    rows = label_rows or [label_row(i) for i in range(3)]
    for name, content in (("train", rows), ("test", [label_row(9)])):
        with open(os.path.join(root, "wider_att", "wider_att_%s_label.txt" % name), "w") as f:
            f.writelines(" ".join(map(str, r)) + " \n" for r in content)


def test_wider_srn_lists(tmp_path):
    root = str(tmp_path)
    make_wider_srn(root)
    train = WiderAttribute(root, "train")
    assert train.annotation_source == "srn"
    assert len(train) == 2
    assert [os.path.basename(p) for p in train.paths] == ["a_0.jpg", "c_1.jpg"]
    np.testing.assert_array_equal(train.label_matrix, [label_row(0), label_row(2)])
    image, _ = train[1]
    assert image.shape == (32, 20, 3)
    val = WiderAttribute(root, "val", source="srn")
    assert len(val) == 1 and os.path.basename(val.paths[0]) == "b_0.jpg"
    np.testing.assert_array_equal(val[0][1], label_row(1))
    assert len(WiderAttribute(root, "trainval")) == 3
    test = WiderAttribute(root, "test")
    np.testing.assert_array_equal(test[0][1], label_row(9))


def test_wider_srn_wrong_width_and_values(tmp_path):
    root = str(tmp_path)
    rows = [label_row(0), label_row(1)[:13], label_row(2)]
    make_wider_srn(root, rows)
    with pytest.raises(UserError, match="wider_att_train_label.txt line 2: expected 14 "
                                        "attribute labels, got 13"):
        WiderAttribute(root, "train")
    rows = [label_row(0), label_row(1), [1] * 13 + [3]]
    make_wider_srn(str(tmp_path / "b"), rows)
    with pytest.raises(UserError, match=r"wider_att_train_label.txt line 3: expected attribute "
                                        r"labels in \{-1, 0, 1\}, got 3"):
        WiderAttribute(str(tmp_path / "b"), "train")


def test_wider_srn_count_mismatch_and_empty_split(tmp_path):
    root = str(tmp_path)
    make_wider_srn(root, [label_row(0), label_row(1)])
    with pytest.raises(UserError, match="wider_att_train_label.txt: expected one label row per "
                                        "image of .*wider_att_train_imglist.txt \\(3\\), got 2"):
        WiderAttribute(root, "train")
    other = str(tmp_path / "noval")
    make_wider_srn(other)
    listing = os.path.join(other, "wider_att", "wider_att_train_imglist.txt")
    with open(listing) as f:
        text = f.read().replace("/val/", "/train/")
    with open(listing, "w") as f:
        f.write(text)
    os.makedirs(os.path.join(other, "Image_cropped", "train", "0--Parade"), exist_ok=True)
    with pytest.raises(UserError, match="split 'val' is empty"):
        WiderAttribute(other, "val")


def test_wider_missing_annotations(tmp_path):
    with pytest.raises(UserError, match="wider_att_train_imglist.txt: not found"):
        WiderAttribute(str(tmp_path), "train")
    with pytest.raises(UserError, match="split: expected one of train, val, trainval, test"):
        WiderAttribute(str(tmp_path), "training")
    with pytest.raises(UserError, match="--data-dir: required for dataset wider"):
        get_dataset("wider", None, "train")


# ----------------------------------------------------------------------------- PETA

def _override(content, overrides):
    """``content`` with ``overrides`` applied (a None value removes the key)."""
    content = dict(content)
    for key, value in (overrides or {}).items():
        if value is None:
            content.pop(key, None)
        else:
            content[key] = value
    return content


def make_peta(root, num_images=8, num_attributes=40, bad_value=False, overrides=None,
              partition_overrides=None):
    """PETA.mat in the common layout: data (N x (5 + A)), attribute names, the first 35
    selected (1-based), 5 partitions of 1-based train/val/test indices.

    overrides: fields of the peta struct to replace (None value: leave the field out);
    partition_overrides: the same for every partition struct."""
    rng = np.random.RandomState(0)
    binary = rng.randint(0, 2, (num_images, num_attributes)).astype(np.float64)
    if bad_value:
        binary[2, 4] = 2
    data = np.concatenate([np.arange(1, num_images + 1)[:, None] * np.ones((1, 5)), binary], 1)
    names = np.empty((num_attributes, 1), dtype=object)
    for i in range(num_attributes):
        names[i, 0] = "attr%03d" % i
    partitions = np.empty((5, 1), dtype=object)
    for p in range(5):
        order = np.roll(np.arange(1, num_images + 1), p)
        partitions[p, 0] = _override({"train": order[:4, None].astype(np.float64),
                                      "val": order[4:6, None].astype(np.float64),
                                      "test": order[6:, None].astype(np.float64)},
                                     partition_overrides)
    peta = _override({"data": data, "attribute": names,
                      "selected_attribute": np.arange(1, 36, dtype=np.float64)[None, :],
                      "partion_attribute": partitions}, overrides)
    scipy.io.savemat(os.path.join(root, "PETA.mat"), {"peta": peta})
    for i in range(num_images):
        write_image(os.path.join(root, "images", "%05d.png" % (i + 1)), blocks_image(24 + i, 10, [RED]), "PNG")
    return binary


def test_peta_reader(tmp_path):
    root = str(tmp_path)
    binary = make_peta(root)
    train = PETA(root, "train")
    assert len(train) == 4 and len(train.attribute_names) == 35
    assert train.attribute_names[0] == "attr000" and train.attribute_names[-1] == "attr034"
    np.testing.assert_array_equal(train.label_matrix, binary[:4, :35] * 2 - 1)
    image, label = train[3]
    assert image.shape == (27, 10, 3) and label.shape == (35,)
    assert set(np.unique(label)) <= {-1.0, 1.0}
    test = PETA(root, "test", partition=1)  # rolled by one: images 6, 7 (0-based 5, 6)
    assert [os.path.basename(p) for p in test.paths] == ["00006.png", "00007.png"]
    assert len(PETA(root, "trainval")) == 6
    with pytest.raises(UserError, match="partition: expected 0..4"):
        PETA(root, "train", partition=5)


def test_peta_bad_values(tmp_path):
    make_peta(str(tmp_path), bad_value=True)
    with pytest.raises(UserError, match="PETA.mat: expected 0/1 attribute values"):
        PETA(str(tmp_path), "trainval")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "PETA.mat").write_bytes(b"garbage")
    with pytest.raises(UserError, match="PETA.mat: expected a MATLAB .mat file"):
        PETA(str(tmp_path / "x"), "train")


# ----------------------------------------------------------------------------- PA-100K

def make_pa100k(root, sizes=(3, 2, 2), label_width=26, overrides=None):
    rng = np.random.RandomState(1)
    content = {"attributes": np.array([["a%02d" % i] for i in range(26)], dtype=object)}
    labels = {}
    image_dir = os.path.join(root, "release_data", "release_data")
    os.makedirs(image_dir)
    counter = 0
    for part, n in zip(("train", "val", "test"), sizes):
        names = np.empty((n, 1), dtype=object)
        for i in range(n):
            counter += 1
            names[i, 0] = "%06d.jpg" % counter
            write_jpeg(os.path.join(image_dir, names[i, 0]), blocks_image(20, 8 + i, [GREEN]))
        content["%s_images_name" % part] = names
        labels[part] = rng.randint(0, 2, (n, label_width)).astype(np.uint8)
        content["%s_label" % part] = labels[part]
    scipy.io.savemat(os.path.join(root, "annotation.mat"), _override(content, overrides))
    return labels


def test_pa100k_reader(tmp_path):
    labels = make_pa100k(str(tmp_path))
    train = PA100K(str(tmp_path), "train")
    assert len(train) == 3 and train.attribute_names[1] == "a01"
    np.testing.assert_array_equal(train.label_matrix, labels["train"] * 2.0 - 1)
    assert train[2][0].shape == (20, 10, 3)
    trainval = PA100K(str(tmp_path), "trainval")
    assert len(trainval) == 5
    np.testing.assert_array_equal(trainval.label_matrix[3:], labels["val"] * 2.0 - 1)
    assert os.path.basename(PA100K(str(tmp_path), "test").paths[0]) == "000006.jpg"


def test_pa100k_wrong_width(tmp_path):
    make_pa100k(str(tmp_path), label_width=25)
    with pytest.raises(UserError, match="annotation.mat: expected train_label of shape 3x26"):
        PA100K(str(tmp_path), "train")


# ----------------------------------------------------------------------------- demo

@needs_fashion_mnist
def test_fashion_mnist_attributes():
    dataset = FashionMNISTAttributes("test", limit=6)
    assert len(dataset) == 6
    images, classes = fashion_mnist.load_split("test")
    image, label = dataset[5]
    assert image.shape == (28, 28, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image.asnumpy()[..., 1], images[5])
    np.testing.assert_array_equal(label, fashion_attributes.attribute_labels(classes[5:6])[0])
    assert set(np.unique(dataset.label_matrix)) == {-1.0, 1.0}
    val = get_dataset("fashion-mnist", None, "val", limit=3, skip_bad_images=False)
    train_images, _ = fashion_mnist.load_split("train")
    np.testing.assert_array_equal(val[0][0].asnumpy()[..., 0], train_images[50000])
    assert len(val.attribute_names) == len(fashion_attributes.ATTRIBUTES)


def test_get_dataset_unknown_name():
    with pytest.raises(UserError, match="--dataset: expected one of wider, peta, pa100k, rap, rap2, "
                                        "par-pkl, fashion-mnist, fashion-mnist-rare, got 'celeba'"):
        get_dataset("celeba", "/tmp", "train")


# ----------------------------------------------------------------------------- targets

def test_training_targets_numpy_and_ndarray():
    labels = np.array([[1, -1, 0], [0, 1, -1]], np.float32)
    targets, mask = training_targets(labels)
    np.testing.assert_array_equal(targets, [[1, 0, 0], [0, 1, 0]])
    np.testing.assert_array_equal(mask, np.ones((2, 3)))
    targets, mask = training_targets(mx.nd.array(labels), mask_unspecified=True)
    assert isinstance(targets, mx.nd.NDArray) and isinstance(mask, mx.nd.NDArray)
    np.testing.assert_array_equal(targets.asnumpy(), [[1, 0, 0], [0, 1, 0]])
    np.testing.assert_array_equal(mask.asnumpy(), [[1, 1, 0], [0, 1, 1]])


# ----------------------------------------------------------------------------- transforms

def test_eval_transform_original_center_crop_and_mean():
    transform = make_transform(False)
    out = transform(mx.nd.array(coordinate_image(256, 256, blue=50), dtype=np.uint8)).asnumpy()
    assert out.shape == (3, 224, 224) and out.dtype == np.float32
    # center 224 crop of the 256x256 image starts at 16; R 104, G 117, B 123 subtracted, no std
    np.testing.assert_array_equal(out[0, 0], np.arange(16, 240) - 104.0)
    np.testing.assert_array_equal(out[1, :, 0], np.arange(16, 240) - 117.0)
    assert (out[2] == 50 - 123.0).all()


def test_transform_resizes_any_crop_to_256_first():
    solid = np.zeros((300, 120, 3), np.uint8)
    solid[:] = (200, 100, 50)
    out = make_transform(False)(mx.nd.array(solid, dtype=np.uint8)).asnumpy()
    assert out.shape == (3, 224, 224)
    np.testing.assert_allclose(out[:, 100, 100], [96, -17, -73])
    out = make_transform(True, normalize="imagenet")(mx.nd.array(solid, dtype=np.uint8))
    assert out.shape == (3, 224, 224)
    expected = (np.array([200, 100, 50]) / 255.0 - attr_data.IMAGENET_MEAN) / attr_data.IMAGENET_STD
    np.testing.assert_allclose(out.asnumpy()[:, 50, 50], expected, rtol=1e-5)


def test_random_square_crop_is_a_square_window():
    image = mx.nd.array(coordinate_image(256, 256, blue=50), dtype=np.uint8)
    random.seed(3)
    crop = attr_data.RandomSquareCrop(100, 100, 100)
    for _ in range(5):
        out = crop(image).asnumpy()
        x0, y0 = int(out[0, 0, 0]), int(out[0, 0, 1])
        assert 0 <= x0 <= 156 and 0 <= y0 <= 156
        np.testing.assert_array_equal(out[0, :, 0], np.arange(x0, x0 + 100))
        np.testing.assert_array_equal(out[:, 0, 1], np.arange(y0, y0 + 100))
    # sides drawn in [min, max]: the last column seen after resizing to 224 spans the side
    crop = attr_data.RandomSquareCrop(128, 224, 224)
    spans = []
    for _ in range(30):
        out = crop(image).asnumpy().astype(int)
        spans.append(out[0, -1, 0] - out[0, 0, 0] + 1)
    assert min(spans) >= 126 and max(spans) <= 225 and max(spans) - min(spans) > 20


def test_train_transform_original_values_and_mirror():
    random.seed(0)
    transform = make_transform(True)
    image = mx.nd.array(coordinate_image(256, 256, blue=50), dtype=np.uint8)
    flipped = 0
    for _ in range(12):
        out = transform(image).asnumpy()
        assert out.shape == (3, 224, 224)
        assert (out[2] == 50 - 123.0).all()  # blue constant: mean subtracted, no scaling
        flipped += out[0, 0, 0] > out[0, 0, -1]
    assert 0 < flipped < 12


def test_transform_demo_sizes_scale_proportionally():
    random.seed(1)
    image = mx.nd.array(coordinate_image(28, 28, blue=50), dtype=np.uint8)
    assert make_transform(True, input_size=28)(image).shape == (3, 28, 28)
    out = make_transform(False, input_size=28)(image).asnumpy()
    assert out.shape == (3, 28, 28)  # 28 -> 32x32, center 28 crop starts at 2
    assert abs(out[0, 0, 0] + 104 - 2 * 28 / 32.0) < 2
    with pytest.raises(UserError, match="normalize: expected 'original' or 'imagenet'"):
        make_transform(True, normalize="caffe")
    with pytest.raises(UserError, match="crop sizes: expected 0 < min_crop <= max_crop <= resize"):
        make_transform(True, min_crop=240)


# ----------------------------------------------------------------------------- bad annotation files

def assert_one_line(excinfo, *fragments):
    """The error is a one-line UserError containing every fragment."""
    message = str(excinfo.value)
    assert excinfo.type is UserError and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


TRAIN_IMAGE = "train/0--Parade/0_Parade_1.jpg"
VAL_IMAGE = "val/0--Parade/0_Parade_2.jpg"


def _set(path_in_json, value):
    """A mutation of the trainval JSON: set (or, with value ..., delete) the item at the path."""
    def mutate(content):
        node = content
        for key in path_in_json[:-1]:
            node = node[key]
        if value is Ellipsis:
            del node[path_in_json[-1]]
        else:
            node[path_in_json[-1]] = value
    return mutate


TARGET0 = ("images", 0, "targets", 0)
BAD_WIDER_JSON = {
    "bbox strings": (_set(TARGET0 + ("bbox",), ["2", "4", "30", "20"]),
                     "image %s target 0: expected bbox [x, y, w, h] of 4 finite numbers, got ['2'"
                     % TRAIN_IMAGE),
    "bbox null": (_set(TARGET0 + ("bbox",), None),
                  "target 0: expected bbox [x, y, w, h] of 4 finite numbers, got None"),
    "bbox NaN": (_set(TARGET0 + ("bbox",), [2.0, 4.0, float("nan"), 20.0]),
                 "target 0: expected bbox [x, y, w, h] of 4 finite numbers, got [2.0, 4.0, nan"),
    "bbox infinite": (_set(TARGET0 + ("bbox",), [2.0, 4.0, float("inf"), 20.0]),
                      "4 finite numbers, got [2.0, 4.0, inf"),
    "bbox length 3": (_set(TARGET0 + ("bbox",), [2.0, 4.0, 30.0]),
                      "4 finite numbers, got [2.0, 4.0, 30.0]"),
    "bbox bools": (_set(TARGET0 + ("bbox",), [True, True, True, True]),
                   "4 finite numbers, got [True"),
    "bbox missing": (_set(TARGET0 + ("bbox",), Ellipsis),
                     "target 0: expected bbox [x, y, w, h] of 4 finite numbers, got no 'bbox'"),
    "attribute too short": (_set(TARGET0 + ("attribute",), [1] * 13),
                            "target 0: expected 14 attribute labels, got 13"),
    "attribute a dict": (_set(TARGET0 + ("attribute",), {"Male": 1}),
                         "target 0: expected 14 attribute labels, got {'Male': 1}"),
    "attribute strings": (_set(TARGET0 + ("attribute",), ["1"] * 14),
                          "target 0: expected attribute labels in {-1, 0, 1}, got ['1'"),
    "attribute bools": (_set(TARGET0 + ("attribute",), [True] * 14),
                        "expected attribute labels in {-1, 0, 1}, got [True"),
    "attribute null": (_set(TARGET0 + ("attribute",), [None] * 14),
                       "expected attribute labels in {-1, 0, 1}, got [None"),
    "attribute missing": (_set(TARGET0 + ("attribute",), Ellipsis),
                          "target 0: expected 14 attribute labels, got no 'attribute'"),
    "target a list": (_set(TARGET0, [1, 2]),
                      "image %s target 0: expected an object with 'attribute' and 'bbox', got [1, 2]"
                      % TRAIN_IMAGE),
    "targets a dict": (_set(("images", 0, "targets"), {"attribute": [1] * 14}),
                       "image %s (images[0]): targets: expected a list of persons" % TRAIN_IMAGE),
    "targets strings": (_set(("images", 0, "targets"), "person"),
                        "targets: expected a list of persons ({'attribute': [...], 'bbox': "
                        "[x, y, w, h]}), got 'person'"),
    "targets missing": (_set(("images", 1, "targets"), Ellipsis),
                        "image %s (images[1]): targets: expected a list of persons ({'attribute': "
                        "[...], 'bbox': [x, y, w, h]}), got no 'targets'" % VAL_IMAGE),
    "file_name missing": (_set(("images", 1, "file_name"), Ellipsis),
                          "images[1]: file_name: expected the image path, got no 'file_name'"),
    "file_name a number": (_set(("images", 1, "file_name"), 7),
                           "images[1]: file_name: expected the image path, got 7"),
    "entry a string": (_set(("images", 1), "val/0--Parade/0_Parade_2.jpg"),
                       "images[1]: expected an object with 'file_name' and 'targets', got 'val/"),
    "images a dict": (_set(("images",), {"a": 1}),
                      "images: expected a list of image entries, got {'a': 1}"),
    "images missing": (_set(("images",), Ellipsis),
                       "expected a JSON object with an 'images' list, got an object with keys "
                       "['attribute_id_map']"),
    "id map key not an integer": (_set(("attribute_id_map", "Male"), "Male"),
                                  "attribute_id_map: expected integer ids as keys, got 'Male'"),
    "id map key repeated": (_set(("attribute_id_map", "01"), "again"),
                            "attribute_id_map: id 1 is given twice"),
    "id map name a number": (_set(("attribute_id_map", "3"), 3),
                             "attribute_id_map['3']: expected an attribute name, got 3"),
    "id map a list": (_set(("attribute_id_map",), ["Male"]),
                      "attribute_id_map: expected an object {\"<id>\": \"<name>\"}, got ['Male']"),
}


@pytest.mark.parametrize("case", sorted(BAD_WIDER_JSON))
def test_wider_json_bad_fields(tmp_path, case):
    root = str(tmp_path)
    trainval, _ = make_wider_json(root)
    mutate, expected = BAD_WIDER_JSON[case]
    mutate(trainval)
    path = os.path.join(root, "Anno", "wider_attribute_trainval.json")
    with open(path, "w") as f:
        json.dump(trainval, f)  # NaN and Infinity are written as JSON's non-standard literals
    for split in ("train", "val"):  # every entry is checked, whichever split is read
        with pytest.raises(Exception) as excinfo:
            WiderAttribute(root, split)
        assert_one_line(excinfo, path + ": ", expected)


def test_wider_json_bom_and_latin1(tmp_path):
    root = str(tmp_path)
    trainval, _ = make_wider_json(root)
    path = os.path.join(root, "Anno", "wider_attribute_trainval.json")
    with open(path, "w", encoding="utf-8-sig") as f:
        json.dump(trainval, f)
    assert len(WiderAttribute(root, "train")) == 2
    trainval["images"][0]["scene"] = "f\u00eate"
    with open(path, "w", encoding="latin-1") as f:
        json.dump(trainval, f, ensure_ascii=False)
    with pytest.raises(UserError) as excinfo:
        WiderAttribute(root, "train")
    assert_one_line(excinfo, path + ": expected UTF-8 text, got undecodable bytes at offset",
                    "(Latin-1?)")


def test_wider_srn_lists_bom_latin1_and_empty_path(tmp_path):
    root = str(tmp_path)
    make_wider_srn(root)
    listing = os.path.join(root, "wider_att", "wider_att_train_imglist.txt")
    labels = os.path.join(root, "wider_att", "wider_att_train_label.txt")
    for path in (listing, labels):  # a BOM (Windows editors) in front of both lists
        with open(path, "rb") as f:
            content = f.read()
        with open(path, "wb") as f:
            f.write(b"\xef\xbb\xbf" + content)
    with open(listing, "rb") as f:
        data = f.read()
    train = WiderAttribute(root, "train")
    assert [os.path.basename(p) for p in train.paths] == ["a_0.jpg", "c_1.jpg"]
    np.testing.assert_array_equal(train.label_matrix, [label_row(0), label_row(2)])
    with open(listing, "ab") as f:
        f.write("Image_cropped/train/2--Demo/\u00e9t\u00e9.jpg 1\n".encode("latin-1"))
    with pytest.raises(UserError) as excinfo:
        WiderAttribute(root, "train")
    offset = len(data) + len("Image_cropped/train/2--Demo/")
    assert_one_line(excinfo, listing + ": expected UTF-8 text, got undecodable bytes at offset "
                             "%d (Latin-1?) on line 4" % offset)
    with open(listing, "wb") as f:
        f.write(data + b"'',\n")
    with pytest.raises(UserError, match="wider_att_train_imglist.txt line 4: expected an image path"):
        WiderAttribute(root, "train")


BAD_PETA = {
    "attribute names are numbers": (
        dict(overrides={"attribute": np.arange(40.0)[:, None]}),
        "PETA.mat: peta.attribute: expected a cell array of strings, got a 40x1 float64 array"),
    "data is text": (dict(overrides={"data": np.array(["abc", "def"], dtype=object)[:, None]}),
                     "PETA.mat: peta.data: expected a numeric array, got a 2x1 cell array"),
    "data too narrow": (dict(overrides={"data": np.zeros((8, 12))}),
                        "PETA.mat: expected peta.data with 5 + 40 columns, got shape (8, 12)"),
    "data missing": (dict(overrides={"data": None}), "PETA.mat: peta: expected a field 'data'"),
    "selected index 0": (
        dict(overrides={"selected_attribute": np.arange(0, 35, dtype=np.float64)[None, :]}),
        "PETA.mat: peta.selected_attribute: expected whole numbers in 1..40, got 0 (element 1)"),
    "selected index beyond the names": (
        dict(overrides={"selected_attribute": np.arange(7, 42, dtype=np.float64)[None, :]}),
        "peta.selected_attribute: expected whole numbers in 1..40, got 41 (element 35)"),
    "selected are names": (
        dict(overrides={"selected_attribute": np.array([["a"]], dtype=object)}),
        "peta.selected_attribute: expected a numeric array, got a 1x1 cell array"),
    "partitions are numbers": (dict(overrides={"partion_attribute": np.ones((5, 1))}),
                               "PETA.mat: peta.partion_attribute{1}: expected a struct with "
                               "train, val and test indices, got a scalar float64 array"),
    "partition index beyond the images": (
        dict(partition_overrides={"train": np.array([[1.0], [9.0]])}),
        "PETA.mat: peta.partion_attribute{1}.train: expected whole numbers in 1..8, got 9"),
    "partition index a fraction": (
        dict(partition_overrides={"val": np.array([[1.5]])}),
        "peta.partion_attribute{1}.val: expected whole numbers in 1..8, got 1.5 (element 1)"),
    "partition without val": (dict(partition_overrides={"val": None}),
                              "PETA.mat: peta.partion_attribute{1}: expected a field 'val', "
                              "found train, test"),
}


@pytest.mark.parametrize("case", sorted(BAD_PETA))
def test_peta_bad_mat_variables(tmp_path, case):
    options, expected = BAD_PETA[case]
    make_peta(str(tmp_path), **options)
    with pytest.raises(Exception) as excinfo:
        PETA(str(tmp_path), "train")
    assert_one_line(excinfo, str(tmp_path / "PETA.mat") + ": ", expected)


def test_peta_not_a_struct(tmp_path):
    scipy.io.savemat(str(tmp_path / "PETA.mat"), {"peta": np.ones((1, 1))})
    with pytest.raises(UserError, match="PETA.mat: peta: expected a 1x1 struct, got a 1x1 float64"):
        PETA(str(tmp_path), "train")


def _cell(strings):
    cell = np.empty((len(strings), 1), dtype=object)
    for i, value in enumerate(strings):
        cell[i, 0] = value
    return cell


BAD_PA100K = {
    "attribute names are numbers": ({"attributes": np.arange(26.0)[None, :]},
                                    "annotation.mat: attributes: expected a cell array of "
                                    "strings, got a 1x26 float64 array"),
    "attribute names are a numeric cell": ({"attributes": _cell([np.array([[1.0]])] * 26)},
                                           "annotation.mat: attributes: expected a cell array "
                                           "of strings, got a 1x1 float64 array"),
    "image names are numbers": ({"train_images_name": np.arange(3.0)[:, None]},
                                "annotation.mat: train_images_name: expected a cell array of "
                                "strings, got a 3x1 float64 array"),
    "image name empty": ({"train_images_name": _cell(["000001.jpg", "", "000003.jpg"])},
                         "annotation.mat: train_images_name: expected image file names, got an "
                         "empty one (element 2)"),
    "labels are text": ({"train_label": _cell(["1"] * 3)},
                        "annotation.mat: train_label: expected a numeric array, got a 3x1 cell"),
    "label value 2": ({"train_label": np.full((3, 26), 2, np.uint8)},
                      "annotation.mat: expected 0/1 values in train_label, got 2 (row 1, column 1)"),
    "labels transposed": ({"train_label": np.zeros((26, 3), np.uint8)},
                          "annotation.mat: expected train_label of shape 3x26, got (26, 3)"),
    "labels missing": ({"train_label": None}, "annotation.mat: expected a variable 'train_label'"),
}


@pytest.mark.parametrize("case", sorted(BAD_PA100K))
def test_pa100k_bad_mat_variables(tmp_path, case):
    overrides, expected = BAD_PA100K[case]
    make_pa100k(str(tmp_path), overrides=overrides)
    with pytest.raises(Exception) as excinfo:
        PA100K(str(tmp_path), "train")
    assert_one_line(excinfo, str(tmp_path / "annotation.mat") + ": ", expected)
