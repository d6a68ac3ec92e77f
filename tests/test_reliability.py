"""Nothing silently wrong, nothing left behind: pre-emption signals, leftovers of killed
writes, best.ckpt after smoke runs, torn logs, changed data on resume, disk errors and
flags checked before any work. End to end on the demo data with the fastest method
(MC-Loss at 32 px, 4 steps an epoch), in subprocesses where a signal or a kill is involved."""
import errno
import json
import os
import shutil
import stat

import numpy as np
import pytest

import train_attr
import train_fgvc
from resume_harness import max_param_diff, metrics_without_time, params_of, run_script
from training_runtime import checkpoint, cli, errors, loop
from training_runtime.errors import UserError

pytestmark = pytest.mark.slow  # end-to-end runs: not in the fast loop (-m "not slow")

SCRIPT = "train_fgvc.py"
TINY = ["--picture-images", "0", "--method", "mcloss", "--train-limit", "64", "--val-limit", "32", "--test-limit", "32",
        "--batch-size", "16", "--epochs", "2", "--seed", "5"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, fashion_mnist_dir):
    """An uninterrupted run: 2 epochs of 4 steps."""
    save_dir = str(tmp_path_factory.mktemp("reference") / "run")
    run_script(SCRIPT, TINY + ["--save-dir", save_dir])
    return save_dir


def leftovers(directory):
    return [f for f in os.listdir(directory) if f.startswith(".")]


@pytest.mark.parametrize("name, status", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_mid_epoch_saves_that_step_and_resume_is_exact(reference, tmp_path, name, status):
    save_dir = str(tmp_path / "run")
    args = TINY + ["--save-dir", save_dir]
    stopped = run_script(SCRIPT, args, signal_at_step=6, signal=name, expect=status)
    last = stopped.stderr.strip().splitlines()[-1]
    assert last == ("interrupted: %s: stopped after step 6 (epoch 1); the checkpoint is %s: continue "
                    "with --resume --save-dir %s" % (name, os.path.join(save_dir, "last.ckpt"), save_dir))
    assert "Traceback" not in stopped.stderr
    assert checkpoint.read(os.path.join(save_dir, "last.ckpt"))[0]["progress"]["step"] == 6
    run_script(SCRIPT, args + ["--resume"])
    diff = max_param_diff(params_of(os.path.join(save_dir, "last.ckpt"))[1],
                          params_of(os.path.join(reference, "last.ckpt"))[1])
    assert diff == 0, diff
    assert metrics_without_time(save_dir) == metrics_without_time(reference)
    assert not leftovers(save_dir)


def test_a_second_signal_stops_at_once(tmp_path, fashion_mnist_dir):
    save_dir = str(tmp_path / "run")
    proc = run_script(SCRIPT, TINY + ["--save-dir", save_dir], signal_at_step=3, signal_count=2, expect=None)
    assert proc.returncode == -15  # the default action of the second SIGTERM
    assert not os.path.exists(os.path.join(save_dir, "last.ckpt"))  # no save after the second signal


def test_stale_temporaries_are_removed_at_resume_and_by_overwrite(reference, tmp_path):
    save_dir = str(tmp_path / "run")
    shutil.copytree(reference, save_dir)
    for name in (".last.ckpt.tmp-abc123", ".trainer-xyz"):
        with open(os.path.join(save_dir, name), "wb") as f:
            f.write(b"\0" * 4096)
    out = run_script(SCRIPT, TINY + ["--save-dir", save_dir, "--resume", "--epochs", "3",
                                     "--max-steps", "9"]).stdout
    assert "removed 2 temporary file(s)" in out and not leftovers(save_dir)
    open(os.path.join(save_dir, ".best.ckpt.tmp-1"), "w").close()
    run_script(SCRIPT, TINY + ["--save-dir", save_dir, "--overwrite", "--max-steps", "1"])
    assert not leftovers(save_dir)
    assert set(os.listdir(save_dir)) - {"steps.jsonl"} == {"args.json", "metrics.jsonl", "curves.png", "last.ckpt",
                                         "best.ckpt", "test.json"}


def test_best_checkpoint_after_a_smoke_run_resumed_to_the_end(tmp_path, fashion_mnist_dir):
    save_dir = str(tmp_path / "run")
    run_script(SCRIPT, TINY + ["--save-dir", save_dir, "--max-steps", "2"])
    assert os.path.exists(os.path.join(save_dir, "best.ckpt"))  # any evaluation leaves one
    run_script(SCRIPT, TINY + ["--save-dir", save_dir, "--resume", "--max-steps", "0"])
    best = checkpoint.read(os.path.join(save_dir, "best.ckpt"))[0]["progress"]
    assert best["batch_in_epoch"] == 0 and best["epoch"] >= 1  # a full epoch's, not the smoke run's
    mode = stat.S_IMODE(os.stat(os.path.join(save_dir, "last.ckpt")).st_mode)
    assert mode == stat.S_IMODE(os.stat(os.path.join(save_dir, "args.json")).st_mode)


def test_a_torn_last_metrics_line_is_dropped_on_resume(reference, tmp_path):
    save_dir = str(tmp_path / "run")
    shutil.copytree(reference, save_dir)
    with open(os.path.join(save_dir, "metrics.jsonl"), "a") as f:
        f.write('{"epoch": 2, "lr": 0.0')
    out = run_script(SCRIPT, TINY + ["--save-dir", save_dir, "--resume", "--epochs", "3"]).stdout
    assert "metrics.jsonl: dropped a torn last line" in out
    assert [r["epoch"] for r in metrics_without_time(save_dir)] == [0, 1, 2]


def class_image(c, i):
    """Class 0: red band left; class 1: red band right; shades vary with i."""
    from helpers import blocks_image
    red, grey = (200, 20 + 10 * i, 20), (90 + 10 * i,) * 3
    return blocks_image(32, 32, [red, grey] if c == 0 else [grey, red])


def write_folder_dataset(root, per_class=6):
    from helpers import write_image
    for split in ("train", "test"):
        for c, name in enumerate(("left", "right")):
            for i in range(per_class):
                write_image(os.path.join(root, split, name, "%d.png" % i), class_image(c, i), fmt="PNG")


def test_resume_on_changed_data_is_refused_with_what_changed(tmp_path, fashion_mnist_dir):
    data = str(tmp_path / "data")
    write_folder_dataset(data)
    save_dir = str(tmp_path / "run")
    args = ["--method", "baseline", "--dataset", "folder", "--data-dir", data, "--backbone", "resnet18_v1",
            "--image-size", "32", "--no-pretrained", "--batch-size", "4", "--epochs", "2",
            "--save-dir", save_dir]
    run_script(SCRIPT, args + ["--max-steps", "2"])
    from helpers import write_image
    write_image(os.path.join(data, "train", "left", "new.png"), class_image(0, 7), fmt="PNG")
    proc = run_script(SCRIPT, args + ["--resume"], expect=2)
    assert proc.stderr.strip().splitlines() == [
        "error: --resume: the training split train of folder now has 13 samples, the checkpoint was "
        "trained on 12 (images added, removed or relabelled?); resuming would change the data order: "
        "restore the data or start a new run (%s)" % os.path.join(save_dir, "last.ckpt")]
    proc = run_script(SCRIPT, args[:-2] + ["--train-limit", "8", "--save-dir", save_dir, "--resume"], expect=2)
    assert "--train-limit 8: %s was trained with --train-limit None" % os.path.join(save_dir, "last.ckpt") \
        in proc.stderr


# ---- in process: flags and files checked before any work

def main_error(main, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(main, argv)
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("flags, message", [
    (["--train-limit", "-60"], "--train-limit: expected a positive number, got -60"),
    (["--max-steps", "-1"], "--max-steps: expected at least 0, got -1"),
    (["--momentum", "nan"], "--momentum: expected a finite number, got nan"),
    (["--checkpoint-every", "-1"], "--checkpoint-every: expected at least 0, got -1"),
    (["--method", "baseline", "--smooth-ratio", "2"], "--smooth-ratio: expected at most 1, got 2.0"),
    (["--lr", "inf"], "--lr: expected a finite number, got inf"),
    (["--wd", "inf"], "--wd: expected a finite number, got inf"),
    (["--seed", "-1"], "--seed: expected at least 0, got -1"),
    (["--seed", "4294967296"], "--seed: expected at most 2.14748e+09, got 4294967296"),
])
def test_numeric_flags_are_checked_before_any_work(tmp_path, capsys, flags, message):
    status, err = main_error(train_fgvc.main, flags + ["--save-dir", str(tmp_path / "run")], capsys)
    assert (status, err) == (2, ["error: " + message])
    assert not os.path.exists(str(tmp_path / "run"))  # nothing was created


def test_evaluation_split_with_an_attribute_never_specified_is_refused_before_training():
    from imbalanced_attr.family import FAMILY
    from training_runtime.config import resolve

    class Split(object):
        label_matrix = np.array([[1, 0], [-1, 0], [1, 0]], np.float32)

    task = FAMILY.methods.get("attention").build(resolve(FAMILY, {}).model, ("a", "b"), [mx_cpu()])
    with pytest.raises(ValueError, match="attribute b is never specified"):
        task.check_evaluation_split(Split())
    Split.label_matrix = np.array([[1, -1], [-1, -1]], np.float32)  # no positives: AP 0, allowed
    task.check_evaluation_split(Split())


def mx_cpu():
    import mxnet as mx
    return mx.cpu()


def test_disk_errors_of_writes_are_one_line(tmp_path, monkeypatch):
    path = str(tmp_path / "x")
    for code, advice in ((errno.ENOSPC, "the disk is full"), (errno.EROFS, "the file system is read-only"),
                         (errno.EACCES, "permission denied")):
        with pytest.raises(UserError, match="%s: cannot write \\(%s" % (path, advice)):
            with errors.writing(path):
                raise OSError(code, os.strerror(code))
    log = loop.MetricsLog(str(tmp_path))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("builtins.open", full)
    with pytest.raises(UserError, match="metrics.jsonl: cannot write \\(the disk is full"):
        log.append({"epoch": 0, "train_loss": 1.0, "val": {}})


def test_predictions_to_a_full_device_or_a_directory_are_one_line_errors(reference, tmp_path, capsys):
    from helpers import write_image
    image = write_image(str(tmp_path / "a.png"), class_image(0, 1), fmt="PNG")
    status, err = main_error(train_fgvc.main, ["--predict", image, "--weights", reference,
                                               "--output", "/dev/full"], capsys)
    assert (status, err) == (2, ["error: /dev/full: cannot write (the disk is full: free space or "
                                 "choose another --save-dir)"])
    status, err = main_error(train_fgvc.main, ["--predict", image, "--weights", reference,
                                               "--output", str(tmp_path)], capsys)
    assert (status, err) == (2, ["error: --output: %s is a directory; expected the path of a CSV file"
                                 % tmp_path])
    status, err = main_error(train_fgvc.main, TINY + ["--save-dir", "/sys/not-here/run"], capsys)
    assert status == 2 and err[0].startswith("error: --save-dir: cannot create /sys/not-here/run")


def test_a_run_that_failed_before_any_progress_can_be_started_again(tmp_path):
    class Args(object):
        save_dir, resume, overwrite = str(tmp_path / "run"), None, False
    cli.prepare_save_dir(Args(), "train_fgvc", config={"a": 1})
    cli.prepare_save_dir(Args(), "train_fgvc", config={"a": 2})  # only args.json: not a run yet
    assert json.load(open(os.path.join(Args.save_dir, "args.json")))["config"] == {"a": 2}
    open(os.path.join(Args.save_dir, "metrics.jsonl"), "w").close()
    with pytest.raises(UserError, match="already holds a run"):
        cli.prepare_save_dir(Args(), "train_fgvc")


def test_divergence_before_any_checkpoint_says_so(tmp_path, fashion_mnist_dir):
    proc = run_script(SCRIPT, TINY + ["--save-dir", str(tmp_path / "run")], nan_at_step=1, expect=2)
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: training diverged: the loss is nan at step 1 (lower --lr?); no checkpoint was written yet")


def test_resume_without_a_save_dir_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    status, err = main_error(train_attr.main, ["--resume"], capsys)
    assert (status, err) == (2, ["error: --resume: give a checkpoint or run directory, or --save-dir DIR"])
    assert os.listdir(str(tmp_path)) == []


def test_splits_and_checkpoints_must_agree_by_label_name(tmp_path, fashion_mnist_dir):
    """A renamed class folder (same class count) is refused before training, and so is
    testing a checkpoint on data with other label names."""
    data = str(tmp_path / "data")
    write_folder_dataset(data)
    args = ["--method", "baseline", "--dataset", "folder", "--backbone", "resnet18_v1", "--image-size",
            "32", "--no-pretrained", "--batch-size", "4", "--epochs", "1", "--max-steps", "1"]
    save_dir = str(tmp_path / "run")
    run_script(SCRIPT, args + ["--data-dir", data, "--save-dir", save_dir])
    other = str(tmp_path / "other")
    shutil.copytree(data, other)
    os.rename(os.path.join(other, "test", "right"), os.path.join(other, "test", "zz_right"))
    proc = run_script(SCRIPT, args + ["--data-dir", other, "--save-dir", str(tmp_path / "run2")], expect=2)
    assert proc.stderr.strip().splitlines() == [  # folder evaluates on its test split every epoch
        "error: --val-split test: label 'zz_right' where 'right' was expected (the label names must match)"]
    assert not os.path.exists(str(tmp_path / "run2"))  # refused before anything was written
    proc = run_script(SCRIPT, ["--test", save_dir, "--data-dir", other], expect=2)
    assert proc.stderr.strip().splitlines() == [
        "error: --test-split test: label 'zz_right' where 'right' was expected (the label names must match)"]


def test_skipped_images_are_counted_in_the_log_and_the_metrics(tmp_path, fashion_mnist_dir):
    data = str(tmp_path / "data")
    write_folder_dataset(data)
    broken = os.path.join(data, "train", "left", "0.png")
    with open(broken, "r+b") as f:
        f.truncate(40)  # a truncated PNG
    save_dir = str(tmp_path / "run")
    out = run_script(SCRIPT, ["--method", "baseline", "--dataset", "folder", "--data-dir", data,
                              "--backbone", "resnet18_v1", "--image-size", "32", "--no-pretrained",
                              "--batch-size", "4", "--epochs", "1", "--skip-bad-images",
                              "--save-dir", save_dir]).stdout
    assert "skipping bad images (--skip-bad-images): 1 in train" in out
    assert [r["skipped_images"] for r in metrics_without_time(save_dir)] == [{"train": 1}]


def test_predict_names_an_unreadable_image_or_skips_it(reference, tmp_path, capsys):
    from helpers import write_image
    good = write_image(str(tmp_path / "good.png"), class_image(0, 1), fmt="PNG")
    bad = str(tmp_path / "bad.png")
    with open(bad, "wb") as f:
        f.write(open(good, "rb").read()[:50])  # truncated
    output = str(tmp_path / "p.csv")
    status, err = main_error(train_fgvc.main, ["--predict", good, bad, "--weights", reference,
                                               "--output", output], capsys)
    assert status == 2 and len(err) == 1 and err[0].startswith("error: %s: " % bad)
    assert not os.path.exists(output)
    train_fgvc.main(["--predict", good, bad, "--weights", reference, "--output", output,
                     "--skip-bad-images"])
    assert "skipped unreadable image %s" % bad in capsys.readouterr().out
    rows = open(output).read().splitlines()
    assert len(rows) == 2 and rows[1].startswith(good + ",")
