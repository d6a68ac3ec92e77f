"""train_attr.py end to end on the real demo data (Fashion-MNIST), in subprocesses.

Tiny configuration: resnet18_v1 at 32×32, a few dozen images, a few steps.
The full model still has 24M parameters (the heads' widths are the
original's), so each checkpoint is ~190 MB: runs are kept few and short.
"""
import csv
import json
import os
import shutil
import time

import numpy as np
import pytest

from training_runtime import checkpoint, cli
from training_runtime.errors import UserError
from resume_harness import max_param_diff, params_of, run_script

pytestmark = pytest.mark.slow  # end-to-end runs: not in the fast loop (-m "not slow")

TINY = ["--picture-images", "0", "--train-limit", "64", "--val-limit", "32", "--test-limit", "32", "--batch-size", "16",
        "--lr", "0.01", "--epochs", "2", "--seed", "3"]
# the reference run and its kill-and-resume twins; --normalize original is not the demo's
# default (imagenet), so --test of the run must take it from the checkpoint
REFERENCE = TINY + ["--normalize", "original", "--max-steps", "6", "--checkpoint-every", "3"]


def run_attr(args, env=None, expect=0, **hooks):
    return run_script("train_attr.py", args, env=env, expect=expect, **hooks)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, fashion_mnist_dir):
    """Uninterrupted: 6 steps over 2 epochs (4 + 2), checkpoints every 3 steps and at epoch ends."""
    save_dir = str(tmp_path_factory.mktemp("ref") / "run")
    run_attr(REFERENCE + ["--save-dir", save_dir])
    return save_dir


def test_reference_run_writes_everything(reference_run):
    files = set(os.listdir(reference_run))
    assert {"args.json", "metrics.jsonl", "curves.png", "last.ckpt", "best.ckpt", "test.json"} <= files
    assert not [f for f in files if f.startswith(".")]  # no temporary files left
    with open(os.path.join(reference_run, "args.json")) as f:
        assert json.load(f)["config"]["runtime"]["max_steps"] == 6
    lines = [json.loads(line) for line in open(os.path.join(reference_run, "metrics.jsonl"))]
    assert [(r["epoch"], r.get("partial", False)) for r in lines] == [(0, False), (1, True)]
    for r in lines:
        assert set(r) >= {"epoch", "lr", "train_loss", "val", "time"} and 0 <= r["val"]["mAP"] <= 1
    record, _ = params_of(os.path.join(reference_run, "last.ckpt"))
    assert record["progress"]["step"] == 6 and record["progress"]["epoch"] == 1


def _alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("kill_at,workers", [(5, "2"), (4, "0")])
def test_kill_and_resume_gives_the_same_parameters(reference_run, tmp_path, kill_at, workers):
    """SIGKILL after step k (5: mid-epoch, resumes from step 4's epoch-end checkpoint; 4: the
    epoch's last step, killed before its evaluation, resumes from step 3), then --resume:
    bitwise the parameters and metrics of the uninterrupted reference run (0 workers).
    With --num-workers 2 (per-sample augmentation seeds) the killed run's DataLoader
    workers die with it."""
    save_dir = str(tmp_path / "run")
    args = REFERENCE + ["--save-dir", save_dir, "--num-workers", workers]
    children_file = str(tmp_path / "children.json")
    killed = run_attr(args, kill_at_step=kill_at, expect=None, env={"KILL_CHILDREN_FILE": children_file})
    assert killed.returncode == -9, killed.stderr[-2000:]
    if workers != "0":
        with open(children_file) as f:
            children = json.load(f)
        assert len(children) >= int(workers), children  # the epoch's DataLoader workers were running
        deadline = time.time() + 10
        while any(_alive(pid) for pid in children) and time.time() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in children if _alive(pid)], "orphaned DataLoader workers"
    saved_step = checkpoint.read(os.path.join(save_dir, "last.ckpt"))[0]["progress"]["step"]
    assert saved_step == {5: 4, 4: 3}[kill_at]
    resumed = run_attr(args + ["--resume"])
    assert "resumed from" in resumed.stdout
    _, expected = params_of(os.path.join(reference_run, "last.ckpt"))
    _, actual = params_of(os.path.join(save_dir, "last.ckpt"))
    diff = max_param_diff(actual, expected)
    print("kill at step %d, %s workers: max parameter difference after resume %g" % (kill_at, workers, diff))
    assert diff == 0.0, "max parameter difference %g" % diff
    ref_lines = open(os.path.join(reference_run, "metrics.jsonl")).read().splitlines()
    lines = open(os.path.join(save_dir, "metrics.jsonl")).read().splitlines()
    strip = [{k: v for k, v in json.loads(line).items() if k != "time"} for line in lines]
    assert strip == [{k: v for k, v in json.loads(line).items() if k != "time"} for line in ref_lines]


# one context against two (and two workers), every method: tests/test_invariance.py


def test_sync_batchnorm_on_cpu_contexts_is_refused():
    args = type("Args", (), dict(gpus="", cpus=2, batchnorm="sync"))()
    with pytest.raises(UserError, match="--batchnorm sync: SyncBatchNorm needs GPUs"):
        cli.contexts(args)


# --stable-sigmoid's numerics are checked against the plain path in test_attr_losses
# (the original's plain loss trains in test_ablation's real runs)
@pytest.mark.parametrize("loss", [["--loss", "paper"]], ids=["paper"])
def test_demo_loss_falls_on_real_images(tmp_path, fashion_mnist_dir, loss):
    save_dir = str(tmp_path / "run")
    run_attr(["--train-limit", "240", "--val-limit", "64", "--test-limit", "64", "--batch-size", "16",
              "--lr", "0.005", "--epochs", "2", "--save-dir", save_dir] + loss)
    lines = [json.loads(line) for line in open(os.path.join(save_dir, "metrics.jsonl"))]
    assert len(lines) == 2 and lines[1]["steps"] == 30
    assert lines[1]["train_loss"] < 0.85 * lines[0]["train_loss"], lines


def test_nan_guard_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, fashion_mnist_dir):
    save_dir = str(tmp_path / "run")
    proc = run_attr(TINY + ["--save-dir", save_dir, "--max-steps", "6", "--checkpoint-every", "2"],
                    nan_at_step=3, expect=2)
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: training diverged: the loss is nan at step 3 (lower --lr?); the last good "
        "checkpoint (step 2) is kept: %s" % os.path.join(save_dir, "last.ckpt"))
    assert "Traceback" not in proc.stderr
    record, params = params_of(os.path.join(save_dir, "last.ckpt"))
    assert record["progress"]["step"] == 2
    assert all(np.all(np.isfinite(v)) for v in params.values())


def test_resume_missing_and_incompatible_checkpoints(reference_run, tmp_path):
    proc = run_attr(TINY + ["--save-dir", str(tmp_path / "new"), "--resume"], expect=2)
    assert proc.stderr.strip().splitlines() == [
        "error: --resume: checkpoint %s not found" % os.path.join(str(tmp_path / "new"), "last.ckpt")]
    other = str(tmp_path / "other")
    shutil.copytree(reference_run, other)
    proc = run_attr(TINY + ["--save-dir", other, "--resume", "--input-size", "28"], expect=2)
    assert proc.stderr.strip().splitlines() == [
        "error: --image-size 28: %s was trained with --image-size 32; this setting cannot change "
        "for --resume (start a new run instead)" % os.path.join(other, "last.ckpt")]


def test_predict_writes_a_csv_of_probabilities(reference_run, tmp_path):
    from training_runtime.fashion_mnist import load_split
    images, _ = load_split("test")
    from PIL import Image
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / ("img%d.png" % i)))
        Image.fromarray(images[i]).convert("RGB").save(paths[-1])
    output = str(tmp_path / "pred.csv")
    run_attr(["--predict"] + paths + ["--weights", reference_run, "--output", output])
    rows = list(csv.reader(open(output)))
    assert rows[0][0] == "image" and rows[0][1] == "footwear" and len(rows) == 4
    probs = np.array([[float(v) for v in row[1:]] for row in rows[1:]])
    assert probs.shape == (3, 9) and np.all((probs >= 0) & (probs <= 1))
    proc = run_attr(["--predict"] + paths, expect=2)
    assert proc.stderr.startswith("error: --weights: give the model")


# ---- save-dir guard (in process: no training needed)

class _Args(object):
    def __init__(self, save_dir, resume=None, overwrite=False):
        self.save_dir, self.resume, self.overwrite = save_dir, resume, overwrite


def test_save_dir_holding_a_run_is_refused_unless_resume_or_overwrite(tmp_path):
    run = str(tmp_path / "run")
    cli.prepare_save_dir(_Args(run), "train_attr")
    open(os.path.join(run, "metrics.jsonl"), "w").close()  # the run has progress
    with pytest.raises(UserError, match="already holds a run; pass --resume .* or --overwrite"):
        cli.prepare_save_dir(_Args(run), "train_attr")
    open(os.path.join(run, checkpoint.LAST), "w").write("old")
    cli.prepare_save_dir(_Args(run, resume="last"), "train_attr")
    assert os.path.exists(os.path.join(run, checkpoint.LAST))
    # the old run's logs and folders too (else the new run appends to its steps.jsonl)
    open(os.path.join(run, "steps.jsonl"), "w").write('{"step": 1}\n')
    for folder, name in (("pictures", "attention_epoch0.png"), ("tensorboard", "events.out.tfevents.1")):
        os.makedirs(os.path.join(run, folder))
        open(os.path.join(run, folder, name), "w").close()
    cli.prepare_save_dir(_Args(run, overwrite=True), "train_attr")
    assert sorted(os.listdir(run)) == ["args.json"]  # the old run's files are gone
    with pytest.raises(UserError, match="--resume and --overwrite"):
        cli.prepare_save_dir(_Args(run, resume="last", overwrite=True), "train_attr")


def test_default_save_dir_never_collides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = _Args(None)
    directory = cli.prepare_save_dir(args, "train_attr")
    assert directory.startswith(os.path.join("runs", "train_attr-"))


def test_refusal_is_one_line_and_status_2(tmp_path, fashion_mnist_dir):
    run = str(tmp_path / "run")
    os.makedirs(run)
    open(os.path.join(run, "metrics.jsonl"), "w").close()
    proc = run_attr(TINY + ["--save-dir", run], expect=2)
    assert proc.stderr.strip().splitlines() == [
        "error: --save-dir: %s already holds a run; pass --resume to continue it or --overwrite "
        "to replace it" % run]


def test_test_on_the_originals_params_files_matches_the_checkpoint(reference_run, tmp_path):
    """--test DIR of the original's .params files (params_io layout) gives the same report."""
    from imbalanced_attr.model import AttributeModel
    from imbalanced_attr.params_io import save_original_params
    net = AttributeModel(9, backbone="resnet18_v1", input_size=32)
    checkpoint.load_parameters(os.path.join(reference_run, "best.ckpt"), net.blocks(),
                               {"num_classes": 9, "backbone": "resnet18_v1"})
    params_dir = str(tmp_path / "params")
    save_original_params(net, params_dir)
    assert "backbone_resnet.params" in os.listdir(params_dir)
    # a directory of .params files carries no preprocessing: say what the run used
    from_params = run_attr(["--test", params_dir, "--test-limit", "40", "--normalize", "original"]).stdout
    from_checkpoint = run_attr(["--test", reference_run, "--test-limit", "40"]).stdout
    assert "test mAP" in from_checkpoint and "on 40 images" in from_checkpoint
    for word in ("footwear", "mA", "accuracy", "precision", "recall", "F1"):
        assert word in from_checkpoint
    # the same report; only the first line (which weights were tested) differs
    assert from_params.splitlines()[1:] == from_checkpoint.splitlines()[1:]
    assert from_params.splitlines()[0].startswith("testing %s " % params_dir)


def test_test_rebuilds_preprocessing_from_the_checkpoint(reference_run):
    """The reference run was trained with non-default preprocessing (--normalize original; the
    demo's default is imagenet): --test of its last checkpoint reproduces the run's own final
    test (of the model as training left it), and a contradicting flag is refused."""
    report = json.load(open(os.path.join(reference_run, "test.json")))
    tested = run_attr(["--test", os.path.join(reference_run, "last.ckpt")]).stdout.splitlines()
    assert tested[1] == "test mAP %.4f on 32 images (mean positive rate %.4f)" % (
        report["mAP"], np.mean(report["positive_rates"]))
    for name, ap in zip(["footwear", "upper_body"], report["APs"]):
        assert any(line.startswith("%-16s %8.4f " % (name, ap)) for line in tested), name
    proc = run_attr(["--test", reference_run, "--normalize", "imagenet"], expect=2)
    assert proc.stderr.startswith("error: --normalize imagenet: %s was trained with --normalize "
                                  "original; this setting cannot change for --test"
                                  % os.path.join(reference_run, "best.ckpt"))


def test_resume_applies_and_reports_changed_settings_and_keeps_args_json(reference_run, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(reference_run, run)
    args_json = open(os.path.join(run, "args.json")).read()
    proc = run_attr(["--save-dir", run, "--resume", "--lr", "0.005", "--max-steps", "7"])
    assert "resume: applied --lr 0.01 -> 0.005, --max-steps 6 -> 7 (from step 6)" in proc.stdout
    record, _ = params_of(os.path.join(run, "last.ckpt"))
    assert record["progress"]["step"] == 7
    assert record["meta"]["config"]["optim"]["lr"] == 0.005 and record["schedule"]["lr"] == 0.005
    refused = run_attr(["--save-dir", run, "--resume", "--momentum", "0.5"], expect=2)
    assert refused.stderr.startswith("error: --momentum 0.5: %s was trained with --momentum 0.9"
                                     % os.path.join(run, "last.ckpt"))
    assert open(os.path.join(run, "args.json")).read() == args_json  # the first args.json survives
    resumes = [json.loads(line) for line in open(os.path.join(run, "resumes.jsonl"))]
    assert len(resumes) == 1 and resumes[0]["from_step"] == 6
    assert resumes[0]["changes"] == [["lr", 0.01, 0.005], ["max_steps", 6, 7]]
