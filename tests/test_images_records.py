"""training_runtime.images (robust loading, skip option) and training_runtime.records."""
import os
import warnings

import numpy as np
import mxnet as mx
import pytest
from PIL import Image

from training_runtime.errors import UserError
from training_runtime.images import (ArrayImageDataset, ImageListDataset, check_image,
                                     check_image_bytes, crop_box, decode_image, load_image,
                                     mat_integers, mat_numbers, mat_strings, open_text, read_text)
from training_runtime import records
from training_runtime.records import RecordDataset, pack_dataset

from conftest import FASHION_MNIST_DIR
from helpers import (coordinate_image, corrupt_png_bytes, solid_image, write_corrupt_png,
                     write_image, write_jpeg)


def noise_image(height, width, seed=0):
    return (np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8)


def smooth_image(height, width, seed=0):
    """Gradients (JPEG keeps them to a few grey levels), different per channel."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:, :, 0] = np.linspace(20, 230, width)[None, :]
    image[:, :, 1] = np.linspace(230, 20, height)[:, None]
    image[:, :, 2] = 40 + 30 * seed
    return image


def truncate(path, fraction=0.6):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:int(len(data) * fraction)])
    return path


def test_load_image_png_is_exact_rgb(tmp_path):
    image = coordinate_image(20, 30, blue=7)
    loaded = load_image(write_image(tmp_path / "a.png", image, "PNG"))
    assert isinstance(loaded, mx.nd.NDArray)
    assert loaded.dtype == np.uint8 and loaded.shape == (20, 30, 3)
    np.testing.assert_array_equal(loaded.asnumpy(), image)


def test_load_image_jpeg_colour_and_grey(tmp_path):
    loaded = load_image(write_jpeg(tmp_path / "c.jpg", solid_image(16, 24, (200, 100, 50)))).asnumpy()
    assert loaded.shape == (16, 24, 3)
    assert np.abs(loaded.astype(int) - (200, 100, 50)).max() <= 3  # RGB order, not BGR
    grey = np.full((10, 12), 90, np.uint8)
    path = str(tmp_path / "g.jpg")
    Image.fromarray(grey, "L").save(path, "JPEG")
    loaded = load_image(path).asnumpy()
    assert loaded.shape == (10, 12, 3)
    assert (loaded[..., 0] == loaded[..., 1]).all() and (loaded[..., 1] == loaded[..., 2]).all()


def test_missing_file_message(tmp_path):
    path = str(tmp_path / "nope.jpg")
    with pytest.raises(UserError, match="nope.jpg: image file not found"):
        load_image(path)


def test_unreadable_file_message(tmp_path):
    path = tmp_path / "text.jpg"
    path.write_bytes(b"this is not an image at all")
    with pytest.raises(UserError, match="text.jpg: expected a JPEG/PNG/BMP/GIF image"):
        load_image(str(path))
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="empty.png: .*empty file"):
        load_image(str(empty))


def test_truncated_jpeg_is_detected(tmp_path):
    path = truncate(write_image(tmp_path / "t.jpg", noise_image(64, 64)))
    with open(path, "rb") as f:
        data = f.read()
    # the decoder alone silently returns a (partly grey) image: that is why we check
    assert mx.image.imdecode(data).shape == (64, 64, 3)
    with pytest.raises(UserError, match="t.jpg: .*truncated JPEG.*FFD9"):
        load_image(path)


def test_check_image_reads_head_and_tail_of_large_files(tmp_path):
    good = write_image(tmp_path / "big.jpg", noise_image(160, 160))
    assert os.path.getsize(good) > 10000  # beyond the head + tail that check_image reads
    assert check_image(good) is None
    bad = truncate(write_image(tmp_path / "bigcut.jpg", noise_image(160, 160)), 0.8)
    assert "truncated JPEG" in check_image(bad)
    assert check_image(str(tmp_path / "none.jpg")) == "image file not found"


def test_truncated_png_is_detected(tmp_path):
    path = truncate(write_image(tmp_path / "t.png", noise_image(32, 32), "PNG"), 0.9)
    with pytest.raises(UserError, match="t.png: .*truncated PNG"):
        load_image(path)


def test_jpeg_with_trailing_padding_loads(tmp_path):
    path = write_image(tmp_path / "p.jpg", noise_image(8, 8))
    with open(path, "ab") as f:
        f.write(b"\x00\x00\n")
    assert load_image(path).shape == (8, 8, 3)


def test_crop_box_exact_and_clipped(tmp_path):
    image = mx.nd.array(coordinate_image(40, 50, blue=7), dtype=np.uint8)
    crop = crop_box(image, (10, 5, 20, 15)).asnumpy()
    assert crop.shape == (15, 20, 3)
    assert crop[0, 0, 0] == 10 and crop[0, 0, 1] == 5 and crop[-1, -1, 0] == 29
    clipped = crop_box(image, (40.4, 30.6, 100, 100)).asnumpy()
    assert clipped.shape == (9, 10, 3)  # rounded to (40, 31), clipped at 50x40
    with pytest.raises(UserError, match="crop box .* outside the 50x40 image"):
        crop_box(image, (60, 0, 5, 5), source="x.jpg")


def make_image_list(tmp_path):
    """good, missing, truncated, good."""
    good1 = write_image(tmp_path / "img" / "good1.jpg", noise_image(12, 10, 1))
    missing = str(tmp_path / "img" / "missing.jpg")
    bad = truncate(write_image(tmp_path / "img" / "bad.jpg", noise_image(40, 40, 2)))
    good2 = write_image(tmp_path / "img" / "good2.png", noise_image(9, 7, 3), "PNG")
    return [good1, missing, bad, good2], [0, 1, 2, 3]


def test_image_list_without_skip_raises_on_load(tmp_path):
    paths, labels = make_image_list(tmp_path)
    dataset = ImageListDataset(paths, labels)
    assert len(dataset) == 4
    image, label = dataset[0]
    assert image.shape == (12, 10, 3) and label == 0
    with pytest.raises(UserError, match="missing.jpg: image file not found"):
        dataset[1]
    with pytest.raises(UserError, match="bad.jpg: .*truncated JPEG"):
        dataset[2]


def test_skip_bad_images_counts_and_keeps_order(tmp_path):
    paths, labels = make_image_list(tmp_path)
    with pytest.warns(UserWarning, match="skipped 2 bad image"):
        dataset = ImageListDataset(paths, labels, skip_bad_images=True, source="list.txt")
    assert len(dataset) == 2 and dataset.num_skipped == 2
    assert [os.path.basename(p) for p, _ in dataset.skipped] == ["missing.jpg", "bad.jpg"]
    assert "not found" in dataset.skipped[0][1] and "truncated" in dataset.skipped[1][1]
    assert [dataset[i][1] for i in range(2)] == [0, 3]
    assert dataset[1][0].shape == (9, 7, 3)


def test_skip_bad_images_replaces_undecodable_at_load_time(tmp_path):
    good = write_image(tmp_path / "good.jpg", noise_image(6, 6))
    fake = tmp_path / "fake.jpg"  # passes the cheap SOI/EOI check, fails to decode
    fake.write_bytes(b"\xff\xd8" + b"junk" * 20 + b"\xff\xd9")
    dataset = ImageListDataset([str(fake), good], ["a", "b"], skip_bad_images=True)
    assert len(dataset) == 2 and dataset.num_skipped == 0
    with pytest.warns(UserWarning, match="fake.jpg"):
        image, label = dataset[0]
    assert label == "b" and image.shape == (6, 6, 3)
    assert dataset.num_skipped == 1
    assert check_image(str(fake)) is None


def test_all_bad_images_is_an_error(tmp_path):
    with pytest.raises(UserError, match="list.txt: expected at least one usable image"):
        with pytest.warns(UserWarning):
            ImageListDataset([str(tmp_path / "x.jpg")], [0], skip_bad_images=True,
                             source="list.txt")


def test_array_dataset_replicates_grey():
    images = np.arange(2 * 4 * 5, dtype=np.uint8).reshape(2, 4, 5)
    image, label = ArrayImageDataset(images, [3, 4])[1]
    assert image.shape == (4, 5, 3) and image.dtype == np.uint8 and label == 4
    np.testing.assert_array_equal(image.asnumpy()[..., 2], images[1])


def test_record_round_trip_vector_and_class_labels(tmp_path):
    images = [smooth_image(20 + i, 30 - i, i) for i in range(3)]
    paths = [write_image(tmp_path / ("%d.png" % i), im, "PNG") for i, im in enumerate(images)]
    vectors = np.array([[1, -1, 0], [0, 1, 1], [-1, -1, 1]], np.float32)
    prefix = str(tmp_path / "attr")
    assert pack_dataset(ImageListDataset(paths, list(vectors)), prefix, quality=95) == 3
    back = RecordDataset(prefix + ".rec")
    assert len(back) == 3
    for i in range(3):
        image, label = back[i]
        assert image.shape == images[i].shape and image.dtype == np.uint8
        assert label.dtype == np.float32
        np.testing.assert_array_equal(label, vectors[i])
        # JPEG q95: close, and in RGB order (a BGR swap would be far off)
        assert np.abs(image.asnumpy().astype(float) - images[i]).mean() < 3

    prefix = str(tmp_path / "cls")
    pack_dataset(ImageListDataset(paths, [5, 0, 199]), prefix, resize=16)
    back = RecordDataset(prefix)
    assert [back[i][1] for i in range(3)] == [5, 0, 199]
    assert all(isinstance(back[i][1], int) for i in range(3))
    assert back[2][0].shape == (16, 16, 3)
    # the sidecar: no reader attributes here, so no task; the extra fields as given
    assert back.meta == {"task": None, "count": 3}
    pack_dataset(ImageListDataset(paths, [5, 0, 199]), prefix, meta={"split": "x"})
    assert records.read_metadata(prefix) == {"task": None, "count": 3, "split": "x"}
    with pytest.raises(UserError, match=r"cls\.json: records packed with --task None, expected --task fgvc"):
        RecordDataset(prefix, task="fgvc")


def test_record_errors(tmp_path):
    with pytest.raises(UserError, match="missing.rec: record file not found"):
        RecordDataset(str(tmp_path / "missing"))
    (tmp_path / "half.rec").write_bytes(b"")
    with pytest.raises(UserError, match="half.idx: record file not found"):
        RecordDataset(str(tmp_path / "half.rec"))
    with pytest.raises(UserError, match="--quality: expected an integer in 1..100"):
        pack_dataset([], str(tmp_path / "x"), quality=0)


def test_records_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        records.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--prefix" in out and "--out-dir" in out and "--records" in out


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="Fashion-MNIST not installed")
def test_records_cli_packs_fashion_mnist(tmp_path, capsys):
    prefix = str(tmp_path / "fm")
    code = records.main(["--task", "attr", "--dataset", "fashion-mnist", "--split", "test",
                         "--limit", "5", "--prefix", prefix])
    assert code == 0 and "wrote 5 records" in capsys.readouterr().out
    from imbalanced_attr.data import FashionMNISTAttributes
    original = FashionMNISTAttributes("test", limit=5)
    back = RecordDataset(prefix)
    assert len(back) == 5
    for i in range(5):
        np.testing.assert_array_equal(back[i][1], original[i][1])
        assert back[i][0].shape == (28, 28, 3)
    assert back.meta == {"task": "attr", "attribute_names": list(original.attribute_names),
                         "count": 5, "dataset": "fashion-mnist", "split": "test"}
    code = records.main(["--task", "fgvc", "--dataset", "nope", "--prefix", prefix])
    assert code == 2 and "--dataset: expected one of" in capsys.readouterr().err
    code = records.main(["--task", "fgvc", "--dataset", "fashion-mnist", "--split", "train", "test",
                         "--prefix", prefix])
    assert code == 2 and "--prefix: packs one split; use --out-dir" in capsys.readouterr().err


# ----------------------------------------------------------------------------- corrupt image data

def one_line_user_error(excinfo, *fragments):
    """The UserError message: one line, containing every fragment."""
    message = str(excinfo.value)
    assert excinfo.type is UserError and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_corrupt_png_data_fails_when_loaded_naming_the_file(tmp_path):
    path = write_corrupt_png(tmp_path / "broken.png")
    assert check_image(path) is None  # header and IEND are fine: the quick check passes
    with pytest.raises(UserError) as excinfo:
        load_image(path)  # what --predict uses
    one_line_user_error(excinfo, path + ": expected a JPEG/PNG/BMP/GIF image, the decoder could "
                                 "not read it", "decoder: ")
    with pytest.raises(UserError, match="frame.png: expected a JPEG/PNG"):
        decode_image(corrupt_png_bytes(), source="frame.png")
    with pytest.raises(UserError, match="broken.png: expected a JPEG/PNG"):
        ImageListDataset([path], [0])[0]
    mx.nd.waitall()  # nothing failed asynchronously behind our back


def test_skip_bad_images_substitutes_corrupt_png_deterministically(tmp_path):
    good = [write_image(tmp_path / ("good%d.png" % i), solid_image(5 + i, 4, (9, 9, 9)), "PNG")
            for i in range(2)]
    bad = [write_corrupt_png(tmp_path / ("bad%d.png" % i)) for i in range(2)]
    paths, labels = [good[0], bad[0], good[1], bad[1]], [0, 1, 2, 3]

    def read_all(dataset):
        return [(dataset[i][1], dataset[i][0].shape) for i in range(len(dataset))]

    dataset = ImageListDataset(paths, labels, skip_bad_images=True)
    assert len(dataset) == 4 and dataset.num_skipped == 0  # the quick check lets them through
    with pytest.warns(UserWarning) as record:
        first = read_all(dataset)
    # each bad item is replaced by the next one that decodes (the last wraps around to 0)
    assert first == [(0, (5, 4, 3)), (2, (6, 4, 3)), (2, (6, 4, 3)), (0, (5, 4, 3))]
    messages = [str(w.message) for w in record if issubclass(w.category, UserWarning)]
    assert len(messages) == 2  # once per bad image
    assert "bad0.png" in messages[0] and "bad1.png" in messages[1]
    assert dataset.num_skipped == 2 and sorted(dataset.bad_indices) == [1, 3]
    assert [p for p, _ in dataset.skipped] == [bad[0], bad[1]]
    assert "expected a JPEG/PNG" in dataset.skipped[0][1]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a second epoch: no new warning, nothing re-counted
        assert read_all(dataset) == first
    assert dataset.num_skipped == 2
    with pytest.warns(UserWarning):  # a fresh dataset (a resumed run) maps indices the same way
        assert read_all(ImageListDataset(paths, labels, skip_bad_images=True)) == first
    with pytest.raises(IndexError):
        dataset[4]
    mx.nd.waitall()


def test_skip_bad_images_none_decodable(tmp_path):
    paths = [write_corrupt_png(tmp_path / ("bad%d.png" % i)) for i in range(2)]
    dataset = ImageListDataset(paths, [0, 1], skip_bad_images=True, source="list.txt")
    with pytest.warns(UserWarning):
        with pytest.raises(UserError, match="list.txt: no loadable image left \\(2 of 2"):
            dataset[1]


def write_records(prefix, payloads, labels):
    """A .rec/.idx pair of raw payloads (encoded images), as pack_img would store them."""
    record = mx.recordio.MXIndexedRecordIO(prefix + ".idx", prefix + ".rec", "w")
    for i, (payload, label) in enumerate(zip(payloads, labels)):
        record.write_idx(i, mx.recordio.pack(mx.recordio.IRHeader(0, label, i, 0), payload))
    record.close()


def test_record_with_corrupt_png_names_the_record(tmp_path):
    good = open(write_image(tmp_path / "g.png", solid_image(6, 6, (1, 2, 3)), "PNG"), "rb").read()
    prefix = str(tmp_path / "mixed")
    write_records(prefix, [good, corrupt_png_bytes()], [0.0, 1.0])
    dataset = RecordDataset(prefix)
    assert dataset[0][0].shape == (6, 6, 3)
    with pytest.raises(UserError) as excinfo:
        dataset[1]
    one_line_user_error(excinfo, "mixed.rec record 1: expected a JPEG/PNG/BMP/GIF image")
    mx.nd.waitall()


def test_truncated_record_file(tmp_path):
    paths = [write_image(tmp_path / ("%d.png" % i), noise_image(12, 12, i), "PNG")
             for i in range(4)]
    vectors = np.eye(4, 3, dtype=np.float32) * 2 - 1
    prefix = str(tmp_path / "cut")
    packed = ImageListDataset(paths, list(vectors))
    packed.attribute_names = ("a", "b", "c")  # an attribute reader: the sidecar says task 'attr'
    pack_dataset(packed, prefix)
    with open(prefix + ".idx") as f:
        offsets = [int(line.split()[1]) for line in f]
    with open(prefix + ".rec", "rb") as f:
        data = f.read()
    with open(prefix + ".rec", "wb") as f:
        f.write(data[:offsets[2] + 40])  # in the middle of record 2; the .idx lists all 4
    dataset = RecordDataset(prefix)
    assert len(dataset) == 4
    np.testing.assert_array_equal(dataset[1][1], vectors[1])
    for index in (2, 3):
        with pytest.raises(UserError) as excinfo:
            dataset[index]
        one_line_user_error(excinfo, "cut.rec: record %d is truncated or unreadable" % index,
                            "re-pack it with python -m training_runtime.records")
    with pytest.raises(UserError, match="cut.rec: record 2 is truncated"):
        dataset.label_matrix  # headers only, same message
    assert dataset[0][0].shape == (12, 12, 3)  # the reader still works for the others
    with open(prefix + ".idx", "w") as f:
        f.write("0\tzero\n")
    with pytest.raises(UserError, match="cut.idx: expected lines '<record id><TAB><byte offset>'"):
        RecordDataset(prefix)


# ----------------------------------------------------------------------------- text files

def test_open_text_utf8_bom_and_newlines(tmp_path):
    path = tmp_path / "list.txt"
    path.write_bytes(b"\xef\xbb\xbf1 caf\xc3\xa9.jpg\r\n2 b.jpg\r\n")
    with open_text(str(path)) as f:
        assert f.readlines() == ["1 caf\u00e9.jpg\n", "2 b.jpg\n"]
    assert read_text(str(path)).startswith("1 caf")


def test_open_text_latin1_and_utf16_are_errors(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("1 a.jpg\n2 caf\u00e9.jpg\n".encode("latin-1"))
    with pytest.raises(UserError) as excinfo:
        open_text(str(path))
    one_line_user_error(excinfo, str(path) + ": expected UTF-8 text, got undecodable bytes at "
                                             "offset 13 (Latin-1?) on line 2")
    path = tmp_path / "wide.txt"
    path.write_bytes("1 a.jpg\n".encode("utf-16"))
    with pytest.raises(UserError, match="wide.txt: expected UTF-8 text, got undecodable bytes at "
                                        "offset 0 \\(UTF-16"):
        open_text(str(path))
    with pytest.raises(UserError, match="none.txt: file not found"):
        open_text(str(tmp_path / "none.txt"))


# ----------------------------------------------------------------------------- .mat helpers

def test_mat_helpers_name_the_variable():
    numbers = np.arange(3.0)[None, :]
    with pytest.raises(UserError, match="a.mat: names: expected a cell array of strings, got a "
                                        "1x3 float64 array"):
        mat_strings(numbers, "a.mat: names")  # recursed forever before
    with pytest.raises(ValueError, match="expected a cell array of strings"):
        mat_strings(numbers)
    cell = np.empty((3, 1), dtype=object)
    cell[0, 0], cell[1, 0], cell[2, 0] = np.array(["x"]), np.array([], "<U1"), np.array(["z"])
    assert mat_strings(cell) == ["x", "", "z"]  # an empty string keeps its place
    cell[1, 0] = np.array([[4.0]])
    with pytest.raises(UserError, match="a.mat: names: expected a cell array of strings"):
        mat_strings(cell, "a.mat: names")
    with pytest.raises(UserError, match="a.mat: data: expected a numeric array, got a 3x1 cell"):
        mat_numbers(cell, "a.mat: data")
    np.testing.assert_array_equal(mat_integers(np.array([[1, 2]], np.uint8), "a.mat: ids"), [1, 2])
    with pytest.raises(UserError, match=r"a.mat: ids: expected whole numbers in 1..5, got 1.5 "
                                        r"\(element 2\)"):
        mat_integers(np.array([[1, 1.5]]), "a.mat: ids", minimum=1, maximum=5)
    with pytest.raises(UserError, match=r"a.mat: ids: expected whole numbers, got nan"):
        mat_integers(np.array([[np.nan]]), "a.mat: ids")
    with pytest.raises(UserError, match=r"a.mat: ids: expected a vector, got a 2x2 array"):
        mat_integers(np.ones((2, 2)), "a.mat: ids")
