"""RecordIO packing and reading (the format of the original's ImageRecordIter).

``pack_dataset(dataset, prefix)`` writes ``prefix.rec`` + ``prefix.idx`` with
``mx.recordio.MXIndexedRecordIO`` and ``mx.recordio.pack_img``, one record per
item, record id = item index. Labels: an int class is stored as the header's
scalar label (flag 0); an attribute vector as a float32 vector (flag = its
length), the layout of mxnet's ``im2rec.py --pack-label`` that the original
used, so the original's own ``wider_records/*.rec`` files read back too.

``pack_dataset`` also writes ``prefix.json``, the metadata the training
scripts need: ``task`` ('attr' for a reader with ``attribute_names``, 'fgvc'
for one with ``class_names``), ``attribute_names`` or ``num_classes`` +
``class_names``, ``count``, and the ``dataset`` / ``split`` names passed in.

``RecordDataset(prefix)`` reads them back: items ``(H×W×3 uint8 RGB NDArray,
label)`` with label an int (scalar records) or a float32 vector; with the
sidecar it exposes the image readers' attributes (``attribute_names`` and
``label_matrix``, or ``num_classes`` and ``class_names``).

``open_split(directory, split, task, ...)`` is what ``--records DIR`` of
train_attr.py / train_fgvc.py reads: ``DIR/<split>.rec/.idx/.json``, as
written by ``python -m training_runtime.records --out-dir DIR``.

Command line: ``python -m training_runtime.records --help``.
"""
import argparse
import glob
import json
import os
import struct
import sys

import numpy as np
import mxnet as mx
from mxnet.gluon.data import RecordFileDataset

from . import registry
from .errors import UserError
from .images import decode_image, load_json


def _record_label(label):
    """Dataset label -> what IRHeader stores: float for a class, float32 vector for attributes."""
    if isinstance(label, mx.nd.NDArray):
        label = label.asnumpy()
    array = np.asarray(label)
    if array.ndim == 0:
        return float(array)
    return array.astype(np.float32).ravel()


def dataset_metadata(dataset):
    """The sidecar fields a reader's attributes give: task and label names."""
    if hasattr(dataset, "attribute_names"):
        return {"task": "attr", "attribute_names": list(dataset.attribute_names)}
    if hasattr(dataset, "class_names"):
        return {"task": "fgvc", "num_classes": int(dataset.num_classes),
                "class_names": list(dataset.class_names)}
    return {"task": None}


def pack_dataset(dataset, prefix, quality=95, resize=None, progress=None, meta=None):
    """Write every item of ``dataset`` to ``prefix.rec`` / ``prefix.idx`` + ``prefix.json``.

    dataset: items (H×W×3 uint8 RGB NDArray, label); prefix: output path
    without extension; quality: JPEG quality 1-100; resize: None, or an int
    side S to store S×S images (the original's 256×256 pre-resize), or an
    (width, height) pair; meta: extra sidecar fields (e.g. dataset, split).
    Returns the number of records written.
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
    sidecar = dict(dataset_metadata(dataset), count=count, **(meta or {}))
    with open(prefix + ".json", "w") as f:
        json.dump(sidecar, f, indent=1)
    return count


def read_metadata(prefix):
    """The ``prefix.json`` sidecar written by :func:`pack_dataset`; UserError naming it."""
    path = prefix + ".json"
    if not os.path.isfile(path):
        raise UserError("%s: record metadata not found (pack the split with python -m "
                        "training_runtime.records --out-dir DIR)" % path)
    meta = load_json(path, "the JSON written by training_runtime.records")
    if not isinstance(meta, dict) or "task" not in meta:
        raise UserError("%s: expected a JSON object with a 'task' field" % path)
    return meta


class RecordDataset(RecordFileDataset):
    """Items of a ``.rec`` + ``.idx`` pair: (H×W×3 uint8 RGB NDArray, label).

    prefix: path with or without the ``.rec`` extension. Labels: int for
    scalar records, float32 vector for vector records (im2rec ``--pack-label``).
    task: None (the sidecar is optional: e.g. the original's own files), or
    'attr' / 'fgvc': ``prefix.json`` must exist and be of that task. limit:
    use the first N records. With a sidecar, ``meta`` holds it and the
    reader's attributes are exposed: ``attribute_names`` + ``label_matrix``
    (N×C float32) for 'attr', ``num_classes`` + ``class_names`` for 'fgvc'.
    """

    def __init__(self, prefix, task=None, limit=None):
        if prefix.endswith(".rec"):
            prefix = prefix[:-4]
        self.prefix = prefix
        for ext in (".rec", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise UserError("%s%s: record file not found (expected %s.rec and %s.idx, "
                                "see python -m training_runtime.records --help)"
                                % (prefix, ext, prefix, prefix))
        self.meta = None
        if task is not None or os.path.isfile(prefix + ".json"):
            self.meta = read_metadata(prefix)
        if task is not None and self.meta["task"] != task:
            raise UserError("%s.json: records packed with --task %s, expected --task %s"
                            % (prefix, self.meta["task"], task))
        try:
            super(RecordDataset, self).__init__(prefix + ".rec")
        except (ValueError, IndexError) as err:  # MXIndexedRecordIO parses the .idx with int()
            raise UserError("%s.idx: expected lines '<record id><TAB><byte offset>' as written by "
                            "training_runtime.records, got unreadable content (%s)" % (prefix, err))
        self._rec_size = os.path.getsize(prefix + ".rec")
        total = len(self._record.keys)
        self._length = total if limit is None else min(int(limit), total)
        if self._length == 0:
            raise UserError("%s.idx: expected at least one record, got none" % prefix)
        self.split = (self.meta or {}).get("split")
        self.skipped, self.num_skipped = [], 0  # bad images were dealt with when packing
        if self.meta is not None and self.meta["task"] == "attr":
            self.attribute_names = tuple(self.meta["attribute_names"])
        elif self.meta is not None and self.meta["task"] == "fgvc":
            self.num_classes = int(self.meta["num_classes"])
            self.class_names = tuple(self.meta["class_names"])
        self._label_matrix = None

    def __len__(self):
        return self._length

    def _header(self, idx):
        """(IRHeader, encoded image bytes) of record ``idx``; UserError when the .rec cannot
        give it (truncated or corrupt: the .idx lists records the file does not hold)."""
        if not 0 <= idx < self._length:
            raise IndexError("record index %d out of range (%d records)" % (idx, self._length))
        offset = self._record.idx[self._record.keys[idx]]
        unpacked = None
        # a record the file does not reach is not read: once mxnet's reader hits the end of
        # the file it stays there and returns nothing for every record after
        if offset < self._rec_size:
            try:
                raw = super(RecordDataset, self).__getitem__(idx)
                unpacked = None if raw is None else mx.recordio.unpack(raw)
            except (mx.base.MXNetError, struct.error, ValueError):
                unpacked = None
            if unpacked is None:
                self._record.reset()  # a fresh reader for the records that are fine
        if unpacked is None:
            where = ("the file (%d bytes) ends before its offset %d" % (self._rec_size, offset)
                     if offset >= self._rec_size else
                     "at offset %d of %d bytes: the file ends inside it or it is corrupt"
                     % (offset, self._rec_size))
            raise UserError("%s.rec: record %d is truncated or unreadable (%s; %s.idx lists %d "
                            "records): re-pack it with python -m training_runtime.records"
                            % (self.prefix, idx, where, self.prefix, len(self._record.keys)))
        return unpacked

    @property
    def label_matrix(self):
        """N×C float32 attribute labels (headers only: no image is decoded); read once."""
        if not hasattr(self, "attribute_names"):
            raise AttributeError("label_matrix: %s.rec holds no attribute records" % self.prefix)
        if self._label_matrix is None:
            self._label_matrix = np.stack([np.asarray(self._header(i)[0].label, np.float32)
                                           for i in range(self._length)])
        return self._label_matrix

    def __getitem__(self, idx):
        header, payload = self._header(idx)
        image = decode_image(payload, source="%s.rec record %d" % (self.prefix, idx))
        if header.flag > 0:
            label = np.array(header.label, dtype=np.float32)
        else:
            label = int(header.label)
        return image, label


def packed_dataset_name(directory, task):
    """The dataset name of the ``task`` records in ``directory`` (from their sidecars).

    For ``--records DIR`` without ``--dataset``; UserError when DIR holds none or several.
    """
    if not os.path.isdir(directory):
        raise UserError("--records: %s is not a directory" % directory)
    names = set()
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        meta = read_metadata(path[:-len(".json")])
        if meta["task"] == task:
            names.add(meta.get("dataset"))
    if not names:
        raise UserError("--records: %s holds no records packed with --task %s (expected "
                        "<split>.rec/.idx/.json from python -m training_runtime.records "
                        "--out-dir %s)" % (directory, task, directory))
    if len(names) > 1:
        raise UserError("--records: %s holds records of several datasets (%s): pass --dataset"
                        % (directory, ", ".join(sorted(str(n) for n in names))))
    return names.pop()


def open_split(directory, split, task, dataset=None, limit=None):
    """``DIR/<split>`` records for ``--records DIR``: a RecordDataset of ``task``;
    ``dataset``, when given, must be the sidecar's dataset name."""
    records = RecordDataset(os.path.join(directory, split), task=task, limit=limit)
    packed = records.meta.get("dataset")
    if dataset is not None and packed is not None and packed != dataset:
        raise UserError("%s.json: records of dataset %s, this run is --dataset %s"
                        % (records.prefix, packed, dataset))
    return records


def _build_dataset(args, split):
    """The dataset named on the command line, through its family's registry."""
    family = registry.family(args.task)
    if args.dataset not in family.datasets:
        raise UserError("--dataset: expected one of %s for --task %s, got %r"
                        % (", ".join(family.datasets), args.task, args.dataset))
    options = {"skip_bad_images": args.skip_bad_images}
    if args.limit is not None:
        options["limit"] = args.limit
    return family.datasets.get(args.dataset).reader(args.data_dir, split, **options)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m training_runtime.records",
        description="Pack splits of a dataset into RecordIO (.rec + .idx + a .json of metadata), "
                    "labels as float vectors (attributes) or scalars (classes).",
        epilog="Train from them: python -m training_runtime.records --task attr --dataset "
               "fashion-mnist --split train val test --out-dir packed/fm, then "
               "python train_attr.py --records packed/fm (train_fgvc.py likewise with --task fgvc).")
    families = registry.families()
    parser.add_argument("--task", choices=tuple(families), required=True,
                        help="the task family whose datasets to read (the registered families)")
    parser.add_argument("--dataset", required=True,
                        help="dataset name: " + "; ".join(
                            "%s (--task %s)" % (", ".join(f.datasets), name) for name, f in families.items()))
    parser.add_argument("--data-dir", default=None, help="dataset root directory")
    parser.add_argument("--split", nargs="+", default=["train"], metavar="SPLIT",
                        help="split(s) to pack (train, val, trainval, test; default train)")
    out = parser.add_mutually_exclusive_group(required=True)
    out.add_argument("--out-dir", metavar="DIR",
                     help="write DIR/<split>.rec/.idx/.json for each --split, as the training "
                          "scripts' --records DIR reads them (DIR is created)")
    out.add_argument("--prefix", help="write one split to PREFIX.rec/.idx/.json")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality 1-100 (default 95)")
    parser.add_argument("--resize", type=int, default=None,
                        help="store SxS images (the original stored WIDER crops at 256x256)")
    parser.add_argument("--limit", type=int, default=None, help="pack only the first N items")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="leave out missing/truncated images instead of stopping")
    args = parser.parse_args(argv)
    try:
        if args.prefix is not None and len(args.split) > 1:
            raise UserError("--prefix: packs one split; use --out-dir DIR for several --split")
        if args.out_dir is not None:
            try:
                os.makedirs(args.out_dir, exist_ok=True)
            except OSError as err:
                raise UserError("--out-dir: cannot create %s (%s)" % (args.out_dir, err))
        for split in args.split:
            prefix = args.prefix or os.path.join(args.out_dir, split)
            dataset = _build_dataset(args, split)
            count = pack_dataset(dataset, prefix, quality=args.quality, resize=args.resize,
                                 meta={"dataset": args.dataset, "split": split})
            skipped = getattr(dataset, "num_skipped", 0)
            print("wrote %d records to %s.rec (%d bad images skipped)" % (count, prefix, skipped))
    except UserError as err:
        print("error: %s" % err, file=sys.stderr)
        return UserError.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
