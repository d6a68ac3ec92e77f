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

def make_peta(root, num_images=8, num_attributes=40, bad_value=False):
    """PETA.mat in the common layout: data (N x (5 + A)), attribute names, the first 35
    selected (1-based), 5 partitions of 1-based train/val/test indices."""
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
        partitions[p, 0] = {"train": order[:4, None].astype(np.float64),
                            "val": order[4:6, None].astype(np.float64),
                            "test": order[6:, None].astype(np.float64)}
    peta = {"data": data, "attribute": names,
            "selected_attribute": np.arange(1, 36, dtype=np.float64)[None, :],
            "partion_attribute": partitions}
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

def make_pa100k(root, sizes=(3, 2, 2), label_width=26):
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
    scipy.io.savemat(os.path.join(root, "annotation.mat"), content)
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
    with pytest.raises(UserError, match="--dataset: expected one of wider, peta, pa100k, "
                                        "fashion-mnist, got 'celeba'"):
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
