"""Data loading with DataLoader workers: per-sample augmentation seeds make
``--num-workers N`` give bitwise the same batches as ``--num-workers 0``.

End to end (in the kill-and-resume tests, sharing their reference runs):
tests/test_train_attr.py kills a ``--num-workers 2`` run (its workers must die
with it) and resumes it to bitwise the parameters of the 0-worker run;
tests/test_train_fgvc.py does the same for the baseline's RandomResizedCrop + flip."""
import random

import mxnet as mx
import numpy as np
import pytest
from mxnet import gluon

from fgvc_gluon.data import make_transform as fgvc_transform
from imbalanced_attr.data import make_transform as attr_transform
from training_runtime.images import ArrayImageDataset
from training_runtime.loop import IndexedDataset, epoch_keys

FGVC_DEFAULTS = dict(image_size=24, train_crop="random_resized", crop_scale=(0.5, 1.0), flip=True)


def _transformed(kind):
    """16 random 40×40 RGB images with the training transform of ``kind``; items 3×S×S."""
    rng = np.random.RandomState(0)
    data = ArrayImageDataset(rng.randint(0, 256, (16, 40, 40, 3)).astype(np.uint8), list(range(16)))
    if kind == "attr":
        return data.transform_first(attr_transform(True, input_size=32))
    return data.transform_first(fgvc_transform(FGVC_DEFAULTS, True))


def _batches(dataset, keys, num_workers):
    loader = gluon.data.DataLoader(dataset, batch_sampler=keys, num_workers=num_workers)
    return [[x.asnumpy() for x in batch] for batch in loader]


@pytest.mark.parametrize("kind", ["attr", "fgvc"])
def test_augmentation_depends_on_seed_epoch_and_index_only(kind):
    indexed = IndexedDataset(_transformed(kind), seed=5)
    batches = [list(range(0, 8)), list(range(8, 16))]
    in_main = _batches(indexed, epoch_keys(0, batches), 0)
    in_workers = _batches(indexed, epoch_keys(0, batches), 2)
    for a, b in zip(in_main, in_workers):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    # another history of the generators, another order: the same items
    random.seed(1), np.random.seed(2), mx.random.seed(3)
    again = [indexed[(0, i)] for i in reversed(range(16))][::-1]
    for i, (data, _, index) in enumerate(again):
        assert index == i
        np.testing.assert_array_equal(data.asnumpy(), in_main[i // 8][0][i % 8])
    # the augmentation is random: another epoch (or seed) crops and flips otherwise
    other_epoch = _batches(indexed, epoch_keys(1, batches), 0)
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(in_main, other_epoch))
    other_seed = _batches(IndexedDataset(_transformed(kind), seed=6), epoch_keys(0, batches), 0)
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(in_main, other_seed))
