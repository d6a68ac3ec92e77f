"""Logs a person can follow and the run's figures: log lines when stderr is not a
terminal, steps.jsonl (and its truncation on resume), curves.png and the attribute
model's test figures (real PNGs with content)."""
import json
import os
import re

import numpy as np
import pytest

from training_runtime import checkpoint, loop, plots, progress
from resume_harness import run_script
from test_runner import make_runner, StopAt

pytestmark = pytest.mark.slow  # end-to-end runs: not in the fast loop (-m "not slow")

LINE = re.compile(r"^epoch (\d+) step (\d+)/(\d+) \(run (\d+)/(\d+)\): loss ([0-9.naninf]+), lr \S+, "
                  r"([0-9.]+) samples/s, ETA epoch (\S+) run (\S+)$")


def assert_png_with_content(path, min_size=(200, 150)):
    """A decodable PNG of at least ``min_size`` (width, height) whose pixels are not uniform."""
    import matplotlib.image
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[1] >= min_size[0] and pixels.shape[0] >= min_size[1], pixels.shape
    assert pixels[..., :3].std() > 0.01, "%s is blank" % path
    # more than background + one colour: curves, bars or text were drawn
    assert len(np.unique(pixels[..., :3].reshape(-1, 3).round(2), axis=0)) > 10


def steps_records(save_dir):
    return [json.loads(line) for line in open(os.path.join(save_dir, progress.STEPS_FILE))]


def test_steps_jsonl_every_log_step_and_truncated_on_resume(tmp_path):
    """LinearTask: 40 samples / batch 8 = 5 steps per epoch, 3 epochs, log every 2 steps."""
    reference = make_runner(tmp_path / "ref", checkpoint_every=3)
    reference.run()
    ref = steps_records(str(tmp_path / "ref"))
    assert [r["step"] for r in ref] == [2, 4, 6, 8, 10, 12, 14]
    assert [(r["epoch"], r["batch"], r["batches"]) for r in ref[:3]] == [(0, 2, 5), (0, 4, 5), (1, 1, 5)]
    for r in ref:
        assert set(r) >= {"epoch", "step", "loss", "lr", "samples_per_sec", "eta_epoch", "eta_run"}
        assert np.isfinite(r["loss"]) and r["samples_per_sec"] > 0 and r["eta_epoch"] >= 0
    assert ref[-1]["eta_run"] >= 0 and ref[0]["loss"] != ref[-1]["loss"]
    assert_png_with_content(str(tmp_path / "ref" / loop.CURVES_FILE))

    crashed = make_runner(tmp_path / "run", callbacks=[StopAt(7)], checkpoint_every=3)
    with pytest.raises(KeyboardInterrupt):
        crashed.run()
    path = str(tmp_path / "run" / progress.STEPS_FILE)
    assert [r["step"] for r in steps_records(str(tmp_path / "run"))] == [2, 4, 6]
    with open(path, "a") as f:
        f.write(json.dumps({"epoch": 1, "step": 8, "loss": 1.0})[:15])  # a torn last line
    messages = []
    resumed = make_runner(tmp_path / "run", checkpoint_every=3)
    resumed.log = messages.append
    resumed.steps_log.log = messages.append
    resumed.resume(str(tmp_path / "run" / checkpoint.LAST))  # step 6
    assert any("torn last line" in m for m in messages)
    assert [r["step"] for r in steps_records(str(tmp_path / "run"))] == [2, 4, 6]
    resumed.run()
    got = steps_records(str(tmp_path / "run"))
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    # the loss is the same numbers as the uninterrupted run (resume is exact)
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in ref], rtol=1e-6)


def test_curves_draw_every_validation_metric(tmp_path):
    """S3N-like metrics (top-1 per branch), no steps.jsonl (a run from before it)."""
    epochs = [{"epoch": e, "lr": 0.01, "train_loss": 2.0 - e,
               "val": {"top1": 0.1 * e, "top1_raw": 0.05 * e, "top1_object": 0.2, "note": "x"}}
              for e in range(3)]
    path = str(tmp_path / "curves.png")
    assert plots.curves(path, epochs, []) == ["top1", "top1_object", "top1_raw"]
    assert_png_with_content(path)


def test_a_plotting_failure_is_a_warning(tmp_path):
    messages = []
    plots.safely(plots.curves, str(tmp_path / "no" / "such" / "dir.png"), [], [], log=messages.append)
    assert len(messages) == 1 and messages[0].startswith("warning: curves failed")


def test_a_logged_run_shows_lines_speed_eta_and_writes_the_figures(tmp_path, fashion_mnist_dir):
    """train_attr.py with stderr to a pipe (not a terminal): one epoch of 3 steps."""
    save_dir = str(tmp_path / "run")
    proc = run_script("train_attr.py", ["--train-limit", "48", "--val-limit", "16", "--test-limit", "48",
                                        "--batch-size", "16", "--lr", "0.01", "--epochs", "1",
                                        "--seed", "3", "--log-every", "1", "--save-dir", save_dir])
    assert "devices: cpu(0); batch per device 16, effective batch 16" in proc.stdout
    lines = [LINE.match(line) for line in proc.stderr.splitlines()]
    lines = [m for m in lines if m]
    assert [int(m.group(4)) for m in lines] == list(range(1, 4)), proc.stderr[-2000:]
    for m in lines:
        assert int(m.group(3)) == 3 and int(m.group(5)) == 3 and float(m.group(7)) > 0
        assert m.group(8) != "?" and m.group(9) != "?"
    assert [r["step"] for r in steps_records(save_dir)] == list(range(1, 4))
    for name in (loop.CURVES_FILE, "test_ap.png", "test_pr.png"):
        assert_png_with_content(os.path.join(save_dir, name))
    assert "warning" not in proc.stdout + proc.stderr


def test_precision_recall_points():
    from imbalanced_attr.task import precision_recall
    labels = np.array([1, -1, 1, 0, -1], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.95, 0.1], np.float32)  # the unspecified one is left out
    recall, precision = precision_recall(labels, scores)
    np.testing.assert_allclose(recall, [0, 0.5, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(precision, [1, 1, 0.5, 2 / 3, 0.5])
