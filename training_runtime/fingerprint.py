"""A cheap fingerprint of a dataset split: which samples, in which order, with which labels.

Stored in every checkpoint (``meta['data']``) and compared on ``--resume``: a
run continued on data whose sample list or labels changed (images added to
or removed from --data-dir, a changed split file) would silently train on a
different shuffle, so it is refused with what changed.

What is hashed (never the image pixels of files, so it costs a directory
listing's worth of work): readers of image files (``paths``, ``boxes``,
``labels``), in-memory arrays (``images`` and ``labels``: the demo's
Fashion-MNIST arrays are small), packed records (the record ids of the
``.idx`` and the ``.rec`` file size).
"""
import hashlib
import os

import numpy as np


def _update(digest, value):
    if isinstance(value, np.ndarray):
        digest.update(str(value.dtype).encode())
        digest.update(str(value.shape).encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    else:
        digest.update(repr(value).encode())


def _sha(*values):
    digest = hashlib.sha1()
    for value in values:
        _update(digest, value)
    return digest.hexdigest()[:16]


def fingerprint(dataset):
    """dict(count, samples, labels) of ``dataset`` (untransformed reader): ``samples`` and
    ``labels`` are short hashes; None for what the dataset does not expose."""
    samples = labels = None
    if hasattr(dataset, "paths"):
        samples = _sha(list(dataset.paths), getattr(dataset, "boxes", None))
    elif hasattr(dataset, "images"):
        samples = _sha(np.asarray(dataset.images))
    elif hasattr(dataset, "prefix"):  # packed records
        keys = list(getattr(dataset, "_record").keys)[:len(dataset)]
        samples = _sha(keys, os.path.getsize(dataset.prefix + ".rec"))
    if hasattr(dataset, "prefix"):
        labels = None  # reading every record's header costs a full read of the .rec
    elif hasattr(dataset, "label_matrix"):
        labels = _sha(np.asarray(dataset.label_matrix))
    elif hasattr(dataset, "labels"):
        labels = _sha(np.asarray(dataset.labels))
    return {"count": len(dataset), "samples": samples, "labels": labels}


def describe_difference(saved, current):
    """Words for what differs between two fingerprints (None when they agree)."""
    if saved == current:
        return None
    if saved.get("count") != current.get("count"):
        return "%d samples, the checkpoint was trained on %d" % (current["count"], saved["count"])
    changed = [key for key in ("samples", "labels") if saved.get(key) != current.get(key)]
    return "the same number of samples (%d) but different %s" % (current["count"], " and ".join(changed))
