"""RecordIO packing and reading (the format of the original's ImageRecordIter).

``pack_dataset(dataset, prefix)`` writes ``prefix.rec`` + ``prefix.idx`` with
``mx.recordio.MXIndexedRecordIO`` and ``mx.recordio.pack_img``, one record per
item, record id = item index. Labels: an int class is stored as the header's
scalar label (flag 0); an attribute vector as a float32 vector (flag = its
length), the layout of mxnet's ``im2rec.py --pack-label`` that the original
used, so the original's own ``wider_records/*.rec`` files read back too.

``RecordDataset(prefix)`` reads them back: items ``(H×W×3 uint8 RGB NDArray,
label)`` with label an int (scalar records) or a float32 vector.

Command line: ``python -m training_runtime.records --help``.
"""
import argparse
import os
import sys

import numpy as np
import mxnet as mx
from mxnet.gluon.data import RecordFileDataset

from .errors import UserError
from .images import decode_image


def _record_label(label):
    """Dataset label -> what IRHeader stores: float for a class, float32 vector for attributes."""
    if isinstance(label, mx.nd.NDArray):
        label = label.asnumpy()
    array = np.asarray(label)
    if array.ndim == 0:
        return float(array)
    return array.astype(np.float32).ravel()


def pack_dataset(dataset, prefix, quality=95, resize=None, progress=None):
    """Write every item of ``dataset`` to ``prefix.rec`` / ``prefix.idx``.

    dataset: items (H×W×3 uint8 RGB NDArray, label); prefix: output path
    without extension; quality: JPEG quality 1-100; resize: None, or an int
    side S to store S×S images (the original's 256×256 pre-resize), or an
    (width, height) pair. Returns the number of records written.
    """
    if not 1 <= int(quality) <= 100:
        raise UserError("--quality: expected an integer in 1..100, got %s" % quality)
    out_dir = os.path.dirname(os.path.abspath(prefix))
    if not os.path.isdir(out_dir):
        raise UserError("%s: output directory does not exist" % out_dir)
    if resize is not None:
        size = (resize, resize) if np.isscalar(resize) else tuple(resize)
    record = mx.recordio.MXIndexedRecordIO(prefix + ".idx", prefix + ".rec", "w")
    count = 0
    try:
        for index in range(len(dataset)):
            image, label = dataset[index]
            if resize is not None:
                image = mx.image.imresize(image, size[0], size[1], interp=3)
            # pack_img encodes with OpenCV, which expects BGR
            bgr = image.asnumpy()[:, :, ::-1]
            header = mx.recordio.IRHeader(0, _record_label(label), index, 0)
            record.write_idx(index, mx.recordio.pack_img(header, bgr, quality=int(quality),
                                                         img_fmt=".jpg"))
            count += 1
            if progress is not None:
                progress(count)
    finally:
        record.close()
    return count


class RecordDataset(RecordFileDataset):
    """Items of a ``.rec`` + ``.idx`` pair: (H×W×3 uint8 RGB NDArray, label).

    prefix: path with or without the ``.rec`` extension. Labels: int for
    scalar records, float32 vector for vector records (im2rec ``--pack-label``).
    """

    def __init__(self, prefix):
        if prefix.endswith(".rec"):
            prefix = prefix[:-4]
        self.prefix = prefix
        for ext in (".rec", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise UserError("%s%s: record file not found (expected %s.rec and %s.idx, "
                                "see python -m training_runtime.records --help)"
                                % (prefix, ext, prefix, prefix))
        super(RecordDataset, self).__init__(prefix + ".rec")
        if len(self) == 0:
            raise UserError("%s.idx: expected at least one record, got none" % prefix)

    def __getitem__(self, idx):
        raw = super(RecordDataset, self).__getitem__(idx)
        header, payload = mx.recordio.unpack(raw)
        image = decode_image(payload, source="%s.rec record %d" % (self.prefix, idx))
        if header.flag > 0:
            label = np.array(header.label, dtype=np.float32)
        else:
            label = int(header.label)
        return image, label


def _build_dataset(args):
    """The dataset named on the command line, via the package factories."""
    if args.task == "attr":
        from imbalanced_attr.data import get_dataset
    else:
        from fgvc_gluon.data import get_dataset
    options = {"skip_bad_images": args.skip_bad_images}
    if args.limit is not None:
        options["limit"] = args.limit
    return get_dataset(args.dataset, args.data_dir, args.split, **options)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m training_runtime.records",
        description="Pack one split of a dataset into RecordIO (PREFIX.rec + PREFIX.idx), "
                    "labels as float vectors (attributes) or scalars (classes).")
    parser.add_argument("--task", choices=("attr", "fgvc"), required=True,
                        help="which package's datasets: attr (imbalanced_attr) or fgvc (fgvc_gluon)")
    parser.add_argument("--dataset", required=True,
                        help="dataset name, e.g. wider, peta, pa100k, fashion-mnist (attr); "
                             "cub, cub-s3n, aircraft, cars, flowers, folder, fashion-mnist (fgvc)")
    parser.add_argument("--data-dir", default=None, help="dataset root directory")
    parser.add_argument("--split", default="train", help="split to pack (train, val, trainval, test)")
    parser.add_argument("--prefix", required=True, help="output path without extension")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality 1-100 (default 95)")
    parser.add_argument("--resize", type=int, default=None,
                        help="store SxS images (the original stored WIDER crops at 256x256)")
    parser.add_argument("--limit", type=int, default=None, help="pack only the first N items")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="leave out missing/truncated images instead of stopping")
    args = parser.parse_args(argv)
    try:
        dataset = _build_dataset(args)
        count = pack_dataset(dataset, args.prefix, quality=args.quality, resize=args.resize)
    except UserError as err:
        print("error: %s" % err, file=sys.stderr)
        return UserError.exit_code
    skipped = getattr(dataset, "num_skipped", 0)
    print("wrote %d records to %s.rec (%d bad images skipped)" % (count, args.prefix, skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
