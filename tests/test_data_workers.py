"""Data loading with DataLoader workers: per-sample augmentation seeds make
``--num-workers N`` give bitwise the same batches, parameters and resumes as
``--num-workers 0``; workers die with a SIGKILLed run."""
import json
import os
import random
import time

import mxnet as mx
import numpy as np
import pytest
from mxnet import gluon

from fgvc_gluon.data import make_transform as fgvc_transform
from imbalanced_attr.data import make_transform as attr_transform
from training_runtime import checkpoint
from training_runtime.images import ArrayImageDataset
from training_runtime.loop import IndexedDataset, epoch_keys
from resume_harness import max_param_diff, params_of, run_script

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


def _alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


ATTR = ["--picture-images", "0", "--train-limit", "64", "--val-limit", "16", "--test-limit", "16", "--batch-size", "16",
        "--lr", "0.01", "--epochs", "1", "--seed", "3", "--max-steps", "4", "--checkpoint-every", "2"]


def test_attr_workers_match_and_resume_exactly_after_sigkill(tmp_path, fashion_mnist_dir):
    """--num-workers 2, SIGKILLed after step 3 and resumed from step 2 (workers again), ends
    with bitwise the parameters of an uninterrupted --num-workers 0 run; no worker survives."""
    reference = str(tmp_path / "ref")
    run_script("train_attr.py", ATTR + ["--save-dir", reference, "--num-workers", "0"])
    save_dir = str(tmp_path / "run")
    args = ATTR + ["--save-dir", save_dir, "--num-workers", "2"]
    children_file = str(tmp_path / "children.json")
    killed = run_script("train_attr.py", args, kill_at_step=3, expect=None,
                        env={"KILL_CHILDREN_FILE": children_file})
    assert killed.returncode == -9, killed.stderr[-2000:]
    with open(children_file) as f:
        workers = json.load(f)
    assert len(workers) >= 2, workers  # the epoch's DataLoader workers were running
    deadline = time.time() + 10
    while any(_alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if _alive(pid)], "orphaned DataLoader workers"
    assert checkpoint.read(os.path.join(save_dir, "last.ckpt"))[0]["progress"]["step"] == 2
    resumed = run_script("train_attr.py", args + ["--resume"])
    assert "resumed from" in resumed.stdout
    ref_record, ref_params = params_of(os.path.join(reference, "last.ckpt"))
    record, params = params_of(os.path.join(save_dir, "last.ckpt"))
    assert record["progress"]["step"] == ref_record["progress"]["step"] == 4
    assert max_param_diff(ref_params, params) == 0.0


def test_fgvc_workers_give_the_same_parameters(tmp_path, fashion_mnist_dir):
    """The baseline's RandomResizedCrop + flip (python random and mxnet's generator) in
    two worker processes: bitwise the parameters of the main-process run."""
    args = ["--method", "baseline", "--train-limit", "48", "--val-limit", "16", "--test-limit", "16",
            "--batch-size", "16", "--seed", "2", "--epochs", "1", "--max-steps", "3"]
    found = []
    for workers in ("0", "2"):
        save_dir = str(tmp_path / ("w" + workers))
        run_script("train_fgvc.py", args + ["--save-dir", save_dir, "--num-workers", workers])
        found.append(params_of(os.path.join(save_dir, "last.ckpt"))[1])
    assert max_param_diff(*found) == 0.0
