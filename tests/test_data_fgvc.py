"""fgvc_gluon.data: CUB (official + S3N lists), FGVC-Aircraft, Stanford Cars,
Flowers-102, folder-per-class, the Fashion-MNIST demo and make_transform, on tiny
on-disk copies of the real formats."""
import os
import random

import numpy as np
import mxnet as mx
import pytest
import scipy.io

from fgvc_gluon import data as fgvc_data
from fgvc_gluon.data import (CUB, CUBS3N, Aircraft, Cars, FashionMNISTClasses, Flowers,
                             FolderDataset, get_dataset, make_transform)
from training_runtime import fashion_mnist
from training_runtime.errors import UserError

from conftest import FASHION_MNIST_DIR
from helpers import coordinate_image, solid_image, write_jpeg


COLOUR = (200, 60, 30)


def write_lines(path, lines):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(str(path), "w") as f:
        f.writelines(line + "\n" for line in lines)


# ----------------------------------------------------------------------------- CUB

CUB_IMAGES = ["001.Black_footed_Albatross/Black_Footed_Albatross_0001_796111.jpg",
              "001.Black_footed_Albatross/Black_Footed_Albatross_0002_55.jpg",
              "002.Laysan_Albatross/Laysan_Albatross_0001_545.jpg",
              "200.Common_Yellowthroat/Common_Yellowthroat_0003_190521.jpg"]


def make_cub(root, classes=(1, 1, 2, 200), is_train=(1, 0, 1, 1)):
    for i, rel in enumerate(CUB_IMAGES):
        write_jpeg(os.path.join(root, "images", rel), solid_image(30 + i, 40, COLOUR))
    write_lines(os.path.join(root, "images.txt"),
                ["%d %s" % (i + 1, rel) for i, rel in enumerate(CUB_IMAGES)])
    write_lines(os.path.join(root, "image_class_labels.txt"),
                ["%d %d" % (i + 1, c) for i, c in enumerate(classes)])
    write_lines(os.path.join(root, "train_test_split.txt"),
                ["%d %d" % (i + 1, t) for i, t in enumerate(is_train)])
    write_lines(os.path.join(root, "bounding_boxes.txt"),
                ["%d 5.0 6.0 20.0 %d.0" % (i + 1, 10 + i) for i in range(len(CUB_IMAGES))])


def test_cub_official_lists(tmp_path):
    root = str(tmp_path)
    make_cub(root)
    train = CUB(root, "train")
    assert len(train) == 3 and train.num_classes == 200
    assert [train[i][1] for i in range(3)] == [0, 1, 199]
    image, label = train[1]
    assert image.shape == (32, 40, 3) and image.dtype == np.uint8
    assert isinstance(label, int)
    test = CUB(root, "test")
    assert len(test) == 1 and test[0][1] == 0
    boxed = CUB(root, "train", crop_boxes=True)
    assert boxed[2][0].shape == (13, 20, 3)  # box 5, 6, 20 x (10 + 3)
    assert get_dataset("cub", root, "test").paths == test.paths


def test_cub_errors(tmp_path):
    make_cub(str(tmp_path / "a"), classes=(1, 1, 201, 2))
    with pytest.raises(UserError, match="image_class_labels.txt: expected class labels in "
                                        "0..199, got 200"):
        CUB(str(tmp_path / "a"), "train")
    make_cub(str(tmp_path / "b"), is_train=(1, 1, 1, 1))
    with pytest.raises(UserError, match="split 'test' is empty"):
        CUB(str(tmp_path / "b"), "test")
    make_cub(str(tmp_path / "c"))
    write_lines(tmp_path / "c" / "train_test_split.txt", ["1 1", "2", "3 1", "4 0"])
    with pytest.raises(UserError, match="train_test_split.txt line 2: expected an id and 1 value"):
        CUB(str(tmp_path / "c"), "train")
    with pytest.raises(UserError, match="split: expected one of train, test, got 'val'"):
        CUB(str(tmp_path / "c"), "val")


def test_cub_s3n_lists(tmp_path):
    root = str(tmp_path)
    for i, rel in enumerate(CUB_IMAGES):
        write_jpeg(os.path.join(root, "images", rel), solid_image(20, 20 + i, COLOUR))
    # S3N's format: "<image_name> <class_id>", a repeated name keeps its last label
    write_lines(tmp_path / "train.txt", ["%s 0" % CUB_IMAGES[0], "%s 1" % CUB_IMAGES[2],
                                         "%s 5" % CUB_IMAGES[0]])
    write_lines(tmp_path / "test.txt", ["%s 199" % CUB_IMAGES[3]])
    train = CUBS3N(root, "train")
    assert len(train) == 2 and [train[i][1] for i in range(2)] == [5, 1]
    assert train[1][0].shape == (20, 22, 3)
    assert get_dataset("cub-s3n", root, "test")[0][1] == 199
    write_lines(tmp_path / "test.txt", ["%s 200" % CUB_IMAGES[3]])
    with pytest.raises(UserError, match="test.txt: expected class labels in 0..199, got 200"):
        CUBS3N(root, "test")
    assert CUBS3N(root, "test", label_base=1)[0][1] == 199
    write_lines(tmp_path / "test.txt", ["%s" % CUB_IMAGES[3]])
    with pytest.raises(UserError, match="test.txt line 1: expected '<image_name> <class_id>'"):
        CUBS3N(root, "test")


# ----------------------------------------------------------------------------- Aircraft

def make_aircraft(root):
    data = os.path.join(root, "data")
    variants = ["707-320", "A340-500", "F/A-18"]
    write_lines(os.path.join(data, "variants.txt"), variants)
    ids = {"train": [("1025794", "707-320"), ("0056978", "F/A-18")],
           "val": [("1340192", "A340-500")], "test": [("0698580", "F/A-18")]}
    for split, rows in ids.items():
        write_lines(os.path.join(data, "images_variant_%s.txt" % split),
                    ["%s %s" % row for row in rows])
        for image_id, _ in rows:
            write_jpeg(os.path.join(data, "images", image_id + ".jpg"), solid_image(60, 50, COLOUR))
    write_lines(os.path.join(data, "images_variant_trainval.txt"),
                ["%s %s" % row for row in ids["train"] + ids["val"]])


def test_aircraft_reader_and_banner(tmp_path):
    root = str(tmp_path)
    make_aircraft(root)
    train = Aircraft(root, "train")
    assert len(train) == 2 and train.num_classes == 3
    assert [train[i][1] for i in range(2)] == [0, 2]
    assert train.class_names[2] == "F/A-18"
    assert train[0][0].shape == (40, 50, 3)  # the bottom 20-pixel banner removed
    assert Aircraft(root, "train", crop_banner=False)[0][0].shape == (60, 50, 3)
    assert len(Aircraft(root, "trainval")) == 3
    assert Aircraft(os.path.join(root, "data"), "val")[0][1] == 1
    write_lines(os.path.join(root, "data", "images_variant_test.txt"), ["0698580 Concorde"])
    with pytest.raises(UserError, match="images_variant_test.txt line 1: variant 'Concorde' "
                                        "is not in .*variants.txt"):
        Aircraft(root, "test")


# ----------------------------------------------------------------------------- Cars

def cars_annotations(rows):
    dtype = [(name, object) for name in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2",
                                         "class", "fname")]
    array = np.zeros((1, len(rows)), dtype=dtype)
    for i, (x1, y1, x2, y2, cls, fname) in enumerate(rows):
        for name, value in zip(("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class"),
                               (x1, y1, x2, y2, cls)):
            array[0, i][name] = np.array([[value]], dtype=np.uint16)
        array[0, i]["fname"] = np.array([fname])
    return array


def make_cars(root, train_classes=(1, 3)):
    devkit = os.path.join(root, "devkit")
    os.makedirs(devkit)
    names = np.empty((1, 3), dtype=object)
    names[0, :] = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Volvo XC90 SUV 2007"]
    scipy.io.savemat(os.path.join(devkit, "cars_meta.mat"), {"class_names": names})
    train = [(3, 4, 22, 13, train_classes[0], "00001.jpg"), (1, 1, 30, 30, train_classes[1],
                                                              "00002.jpg")]
    test = [(2, 2, 11, 11, 2, "00001.jpg")]
    scipy.io.savemat(os.path.join(devkit, "cars_train_annos.mat"),
                     {"annotations": cars_annotations(train)})
    scipy.io.savemat(os.path.join(root, "cars_test_annos_withlabels.mat"),
                     {"annotations": cars_annotations(test)})
    for folder, rows in (("cars_train", train), ("cars_test", test)):
        for row in rows:
            write_jpeg(os.path.join(root, folder, row[-1]), solid_image(30, 40, COLOUR))


def test_cars_reader(tmp_path):
    root = str(tmp_path)
    make_cars(root)
    train = Cars(root, "train")
    assert len(train) == 2 and train.num_classes == 3
    assert [train[i][1] for i in range(2)] == [0, 2]
    assert train.class_names[2] == "Volvo XC90 SUV 2007"
    assert train[0][0].shape == (30, 40, 3)
    boxed = Cars(root, "train", crop_boxes=True)
    assert boxed[0][0].shape == (10, 20, 3)  # 1-based inclusive corners (3, 4)-(22, 13)
    test = get_dataset("cars", root, "test", crop_boxes=True)
    assert test[0][1] == 1 and test[0][0].shape == (10, 10, 3)


def test_cars_label_out_of_range(tmp_path):
    make_cars(str(tmp_path), train_classes=(1, 4))
    with pytest.raises(UserError, match="cars_train_annos.mat: expected class labels in 0..2, "
                                        "got 3"):
        Cars(str(tmp_path), "train")


# ----------------------------------------------------------------------------- Flowers

def make_flowers(root, labels=(1, 2, 102, 5, 5, 1)):
    for i in range(len(labels)):
        write_jpeg(os.path.join(root, "jpg", "image_%05d.jpg" % (i + 1)), solid_image(16, 12 + i, COLOUR))
    scipy.io.savemat(os.path.join(root, "imagelabels.mat"),
                     {"labels": np.array([labels], dtype=np.uint8)})
    scipy.io.savemat(os.path.join(root, "setid.mat"),
                     {"trnid": np.array([[1, 3]]), "valid": np.array([[2, 6]]),
                      "tstid": np.array([[4, 5]])})


def test_flowers_reader(tmp_path):
    root = str(tmp_path)
    make_flowers(root)
    train = Flowers(root, "train")
    assert [train[i][1] for i in range(2)] == [0, 101] and train.num_classes == 102
    assert train[1][0].shape == (16, 14, 3)
    assert [os.path.basename(p) for p in Flowers(root, "trainval").paths] == [
        "image_00001.jpg", "image_00003.jpg", "image_00002.jpg", "image_00006.jpg"]
    assert [x[1] for x in get_dataset("flowers", root, "test")] == [4, 4]
    make_flowers(str(tmp_path / "bad"), labels=(1, 2, 103, 5, 5, 1))
    with pytest.raises(UserError, match="imagelabels.mat: expected class labels in 0..101"):
        Flowers(str(tmp_path / "bad"), "train")


# ----------------------------------------------------------------------------- folder

def test_folder_reader_and_empty_split(tmp_path):
    root = str(tmp_path)
    for cls, n in (("b_cardinal", 2), ("a_albatross", 1)):
        for i in range(n):
            write_jpeg(os.path.join(root, "train", cls, "%d.jpg" % i), solid_image(10, 10 + i, COLOUR))
    train = FolderDataset(root, "train")
    assert train.class_names == ("a_albatross", "b_cardinal")
    assert [train[i][1] for i in range(3)] == [0, 1, 1]
    assert train[2][0].shape == (10, 11, 3)
    assert len(get_dataset("folder", os.path.join(root, "train"), "all")) == 3
    with pytest.raises(UserError, match="test: expected a folder of class folders"):
        FolderDataset(root, "test")
    os.makedirs(os.path.join(root, "val", "a_albatross"))
    with pytest.raises(UserError, match="split 'val' is empty"):
        FolderDataset(root, "val")


def test_folder_truncated_image_and_skip(tmp_path):
    root = str(tmp_path)
    write_jpeg(os.path.join(root, "train", "a", "good.jpg"), solid_image(8, 8, COLOUR))
    bad = os.path.join(root, "train", "a", "bad.jpg")
    write_jpeg(bad, solid_image(64, 64, COLOUR))
    with open(bad, "rb") as f:
        data = f.read()
    with open(bad, "wb") as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(UserError, match="bad.jpg: .*truncated JPEG"):
        FolderDataset(root, "train")[0]
    with pytest.warns(UserWarning):
        dataset = get_dataset("folder", root, "train", skip_bad_images=True)
    assert len(dataset) == 1 and dataset.num_skipped == 1


# ----------------------------------------------------------------------------- demo, factory

@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="Fashion-MNIST not installed")
def test_fashion_mnist_classes():
    dataset = FashionMNISTClasses("test", limit=5)
    images, classes = fashion_mnist.load_split("test")
    assert len(dataset) == 5 and dataset.num_classes == 10
    image, label = dataset[4]
    assert image.shape == (28, 28, 3) and image.dtype == np.uint8
    assert label == classes[4] and isinstance(label, int)
    np.testing.assert_array_equal(image.asnumpy()[..., 2], images[4])
    assert len(get_dataset("fashion-mnist", None, "train", limit=7)) == 7


def test_get_dataset_unknown_name():
    with pytest.raises(UserError, match="--dataset: expected one of cub, cub-s3n, aircraft, "
                                        "cars, flowers, folder, fashion-mnist, got 'dogs'"):
        get_dataset("dogs", "/tmp", "train")


# ----------------------------------------------------------------------------- transforms

MCLOSS_LIKE = {"image_size": 32, "resize": None, "train_crop": "pad_random", "pad": 4,
               "flip": True, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
S3N_LIKE = {"image_size": 48, "resize": 60, "train_crop": "random_resized",
            "crop_scale": (0.5, 1.0), "flip": True,
            "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def test_pad_random_crop_is_a_window_of_the_padded_image():
    random.seed(0)
    image = mx.nd.array(coordinate_image(32, 32, blue=255) + 1, dtype=np.uint8)
    padded = np.pad(image.asnumpy(), ((4, 4), (4, 4), (0, 0)))
    offsets = set()
    for _ in range(20):
        out = fgvc_data.PadRandomCrop(32, 4)(image).asnumpy()
        assert out.shape == (32, 32, 3)
        matches = [(y, x) for y in range(9) for x in range(9)
                   if np.array_equal(padded[y:y + 32, x:x + 32], out)]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 3


def test_make_transform_mcloss_style():
    random.seed(1)
    image = mx.nd.array(coordinate_image(50, 70, blue=255), dtype=np.uint8)
    out = make_transform(MCLOSS_LIKE, train=True)(image).asnumpy()
    assert out.shape == (3, 32, 32) and out.dtype == np.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert (out[2] == -1.0).any()  # zero padding (black) is reachable: pad 4 of 40
    out = make_transform(MCLOSS_LIKE, train=False)(image).asnumpy()
    assert out.shape == (3, 32, 32)
    np.testing.assert_allclose(out[2], 1.0)  # blue 255 -> (1 - 0.5) / 0.5


def test_make_transform_s3n_style():
    random.seed(2)
    image = mx.nd.array(coordinate_image(120, 80, blue=255), dtype=np.uint8)
    out = make_transform(S3N_LIKE, train=True)(image).asnumpy()
    assert out.shape == (3, 48, 48)
    np.testing.assert_allclose(out[2], (1.0 - 0.406) / 0.225, rtol=1e-5)
    # eval: short side 80 -> 60 (so 120 -> 90), center 48 crop: rows from 21
    out = make_transform(S3N_LIKE, train=False)(image).asnumpy()
    assert out.shape == (3, 48, 48)
    green = out[1, :, 0] * 0.224 + 0.456
    np.testing.assert_allclose(green[0] * 255, 21 * 120 / 90.0, atol=2.0)
    squash = dict(S3N_LIKE, resize=(60, 60))  # upstream S3N: Resize([600, 600])
    out = make_transform(squash, train=False)(image).asnumpy()
    green = out[1, :, 0] * 0.224 + 0.456
    np.testing.assert_allclose(green[0] * 255, 6 * 120 / 60.0, atol=2.0)


def test_make_transform_errors():
    with pytest.raises(UserError, match="defaults\\['train_crop'\\]: expected one of "
                                        "random_resized, pad_random, resize"):
        make_transform(dict(S3N_LIKE, train_crop="five_crop"), train=True)
    with pytest.raises(UserError, match="defaults: expected an 'image_size' entry"):
        make_transform({"lr": 0.1}, train=False)


# ----------------------------------------------------------------------------- bad annotation files

def assert_one_line(excinfo, *fragments):
    """The error is a one-line UserError containing every fragment."""
    message = str(excinfo.value)
    assert excinfo.type is UserError and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_cub_bom_in_images_txt(tmp_path):
    root = str(tmp_path)
    make_cub(root)
    path = tmp_path / "images.txt"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # used to be blamed on image_class_labels.txt
    train = CUB(root, "train")
    assert len(train) == 3 and train.paths[0].endswith(CUB_IMAGES[0])
    assert [train[i][1] for i in range(3)] == [0, 1, 199]


def test_cub_utf8_and_latin1_image_names(tmp_path):
    root = str(tmp_path)
    make_cub(root)
    name = "002.Laysan_Albatross/Laysan_Albatros\u00e9_0001.jpg"
    write_jpeg(os.path.join(root, "images", name), solid_image(12, 40, COLOUR))
    lines = ["%d %s" % (i + 1, rel) for i, rel in enumerate(CUB_IMAGES)]
    lines[2] = "3 " + name
    write_lines(tmp_path / "images.txt", lines)  # UTF-8
    assert CUB(root, "train")[1][0].shape == (12, 40, 3)
    (tmp_path / "images.txt").write_bytes("\n".join(lines).encode("latin-1"))
    with pytest.raises(UserError) as excinfo:
        CUB(root, "train")
    offset = len("\n".join(lines[:2])) + 1 + len("3 002.Laysan_Albatross/Laysan_Albatros")
    assert_one_line(excinfo, str(tmp_path / "images.txt") + ": expected UTF-8 text, got "
                             "undecodable bytes at offset %d (Latin-1?) on line 3" % offset)


def test_cub_classes_txt(tmp_path):
    root = str(tmp_path)
    make_cub(root)
    names = ["%03d.class_%d" % (i, i) for i in range(1, 201)]
    write_lines(tmp_path / "classes.txt", ["%d %s" % (i + 1, n) for i, n in enumerate(names)])
    train = CUB(root, "train")
    assert train.num_classes == 200 and train.class_names[199] == "200.class_200"
    (tmp_path / "classes.txt").write_bytes(b"")  # used to mean 200 unnamed classes
    with pytest.raises(UserError) as excinfo:
        CUB(root, "train")
    assert_one_line(excinfo, str(tmp_path / "classes.txt") + ": expected one line '<class id> "
                             "<class name>' per class, got an empty file")
    write_lines(tmp_path / "classes.txt", ["%d %s" % (i + 2, n) for i, n in enumerate(names)])
    with pytest.raises(UserError, match="classes.txt: expected class ids 1..200 in order, got id 2 "
                                        "on entry 1"):
        CUB(root, "train")


def test_cub_split_values_other_than_0_1(tmp_path):
    root = str(tmp_path)
    make_cub(root, is_train=(1, 0, 2, 1))  # 2 used to drop the image from both splits
    with pytest.raises(UserError) as excinfo:
        CUB(root, "test")
    assert_one_line(excinfo, str(tmp_path / "train_test_split.txt") + " line 3: expected 1 "
                                                                      "(train) or 0 (test), got 2")
    write_lines(tmp_path / "train_test_split.txt", ["1 1", "2 0", "3 1", "4 one"])
    with pytest.raises(UserError, match="train_test_split.txt line 4: expected numbers, got '4 one'"):
        CUB(root, "train")
    write_lines(tmp_path / "train_test_split.txt", ["1 1", "2 0", "3 1", "2 1", "4 1"])
    with pytest.raises(UserError, match="train_test_split.txt line 4: id 2 is given twice "
                                        "\\(first on line 2\\)"):
        CUB(root, "train")


def test_cub_nan_box_and_empty_images_txt(tmp_path):
    root = str(tmp_path)
    make_cub(root)
    write_lines(tmp_path / "bounding_boxes.txt", ["1 5 6 nan 10", "2 5 6 20 11", "3 5 6 20 12",
                                                 "4 5 6 20 13"])
    with pytest.raises(UserError, match="bounding_boxes.txt line 1: expected numbers, got "
                                        "'1 5 6 nan 10'"):
        CUB(root, "train", crop_boxes=True)
    (tmp_path / "images.txt").write_bytes(b"")
    with pytest.raises(UserError, match="images.txt: expected lines '<image id> <image path>', "
                                        "got an empty file"):
        CUB(root, "train")


def test_cub_s3n_list_bom_and_latin1(tmp_path):
    root = str(tmp_path)
    for i, rel in enumerate(CUB_IMAGES[:2]):
        write_jpeg(os.path.join(root, "images", rel), solid_image(20, 20 + i, COLOUR))
    text = "%s 0\n%s 1\n" % tuple(CUB_IMAGES[:2])
    (tmp_path / "train.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    train = CUBS3N(root, "train")
    assert train.paths[0].endswith(CUB_IMAGES[0]) and train[0][1] == 0
    (tmp_path / "train.txt").write_bytes((text + "caf\u00e9.jpg 2\n").encode("latin-1"))
    with pytest.raises(UserError) as excinfo:
        CUBS3N(root, "train")
    assert_one_line(excinfo, str(tmp_path / "train.txt") + ": expected UTF-8 text, got "
                             "undecodable bytes at offset %d (Latin-1?) on line 3" % (len(text) + 3))


def test_aircraft_bom_latin1_and_bad_variants(tmp_path):
    root = str(tmp_path)
    make_aircraft(root)
    variants = tmp_path / "data" / "variants.txt"
    variants.write_bytes(b"\xef\xbb\xbf" + variants.read_bytes())
    train = Aircraft(root, "train")
    assert train.class_names[0] == "707-320" and [train[i][1] for i in range(2)] == [0, 2]
    listing = tmp_path / "data" / "images_variant_train.txt"
    listing.write_bytes("1025794 707-320\n0056978 F\u00e9-18\n".encode("latin-1"))
    with pytest.raises(UserError) as excinfo:
        Aircraft(root, "train")
    assert_one_line(excinfo, str(listing) + ": expected UTF-8 text, got undecodable bytes at "
                                            "offset 25 (Latin-1?) on line 2")
    write_lines(variants, ["707-320", "A340-500", "707-320"])
    with pytest.raises(UserError, match="variants.txt: variant '707-320' is listed twice "
                                        "\\(entries 1 and 3\\)"):
        Aircraft(root, "train")
    variants.write_bytes(b"")
    with pytest.raises(UserError, match="variants.txt: expected one variant name per line, "
                                        "got an empty file"):
        Aircraft(root, "train")


def rewrite_cars_train(root, change):
    """Rewrite cars_train_annos.mat after ``change(annotations)`` edits the struct array."""
    path = os.path.join(root, "devkit", "cars_train_annos.mat")
    annotations = cars_annotations([(3, 4, 22, 13, 1, "00001.jpg"), (1, 1, 30, 30, 3, "00002.jpg")])
    change(annotations)
    scipy.io.savemat(path, {"annotations": annotations})
    return path


def _set_field(index, field, value):
    def change(annotations):
        annotations[0, index][field] = value
    return change


BAD_CARS = {
    "class a string": (_set_field(1, "class", np.array(["three"])),
                       "cars_train_annos.mat: annotations(2).class: expected a numeric array, "
                       "got text of shape 1"),
    "class a fraction": (_set_field(0, "class", np.array([[1.5]])),
                         "cars_train_annos.mat: annotations(1).class: expected a whole class "
                         "number, got 1.5"),
    "bbox empty": (_set_field(1, "bbox_x2", np.zeros((0, 0))),
                   "cars_train_annos.mat: annotations(2).bbox_x2: expected one finite number, "
                   "got a 0x0 float64 array"),
    "fname a number": (_set_field(0, "fname", np.array([[7]], np.uint16)),
                       "cars_train_annos.mat: annotations(1).fname: expected a cell array of "
                       "strings, got a 1x1 uint16 array"),
}


@pytest.mark.parametrize("case", sorted(BAD_CARS))
def test_cars_bad_annotation_fields(tmp_path, case):
    root = str(tmp_path)
    make_cars(root)
    change, expected = BAD_CARS[case]
    path = rewrite_cars_train(root, change)
    with pytest.raises(Exception) as excinfo:
        Cars(root, "train")
    assert_one_line(excinfo, path + ": ", expected)


def test_cars_class_names_are_numbers(tmp_path):
    root = str(tmp_path)
    make_cars(root)
    path = os.path.join(root, "devkit", "cars_meta.mat")
    scipy.io.savemat(path, {"class_names": np.arange(3.0)[None, :]})
    with pytest.raises(Exception) as excinfo:
        Cars(root, "train")
    assert_one_line(excinfo, path + ": class_names: expected a cell array of strings, got a 1x3 "
                                    "float64 array")


def test_flowers_bad_mat_variables(tmp_path):
    root = str(tmp_path)
    make_flowers(root)
    scipy.io.savemat(str(tmp_path / "setid.mat"), {"trnid": np.array([[1, 2.5]]),
                                                   "valid": np.array([[2]]),
                                                   "tstid": np.array([[4]])})
    with pytest.raises(Exception) as excinfo:
        Flowers(root, "train")
    assert_one_line(excinfo, str(tmp_path / "setid.mat") + ": trnid: expected whole numbers, got "
                                                          "2.5 (element 2)")
    scipy.io.savemat(str(tmp_path / "imagelabels.mat"),
                     {"labels": np.array(["a", "b"], dtype=object)[None, :]})
    with pytest.raises(Exception) as excinfo:
        Flowers(root, "test")
    assert_one_line(excinfo, str(tmp_path / "imagelabels.mat") + ": labels: expected a numeric "
                                                                "array, got a 1x2 cell array")
