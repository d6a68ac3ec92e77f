"""train_fgvc.py end to end on the real demo data (Fashion-MNIST).

Every method gets one uninterrupted tiny run (2 epochs × 6 steps of 16 images
at 28-32 px; 4 epochs for the slower-learning center loss) whose training loss
must fall, and a kill-and-resume run that must end with the same parameters
and metrics. The center-loss runs use two CPU contexts (data parallelism, the
centers on their own trainer).
Argument errors are checked in process (no training needed).
"""
import json
import os

import numpy as np
import pytest

import train_fgvc
from resume_harness import kill_and_resume, max_param_diff, metrics_without_time, params_of, run_script
from training_runtime import checkpoint, cli
from training_runtime.errors import UserError

pytestmark = pytest.mark.slow  # end-to-end runs: not in the fast loop (-m "not slow")

SCRIPT = "train_fgvc.py"
STEPS_PER_EPOCH = 6
TINY = ["--picture-images", "0", "--train-limit", "96", "--val-limit", "48", "--test-limit", "48", "--batch-size", "16",
        "--seed", "1", "--checkpoint-every", "4"]
#: per method: epochs, extra flags (on top of the demo defaults), step after which the run is killed
METHOD_RUNS = {
    "baseline": (2, [], 11),                        # resumes mid-epoch 1 from step 8 (with 2 DataLoader workers)
    "mcloss": (2, [], 5),                           # resumes mid-epoch 0 from step 4
    "s3n": (2, ["--image-size", "32"], 7),          # resumes from the epoch-0 checkpoint (step 6)
    "centerloss": (4, ["--cpus", "2"], 10),         # two contexts; resumes from step 8
}
METHODS = sorted(METHOD_RUNS)


def method_args(method):
    epochs, extra, _ = METHOD_RUNS[method]
    return ["--method", method, "--epochs", str(epochs)] + TINY + extra


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory, fashion_mnist_dir):
    """One uninterrupted tiny run per method (created on first use): method -> save dir."""
    runs = {}

    def get(method):
        if method not in runs:
            save_dir = str(tmp_path_factory.mktemp("ref-" + method) / "run")
            run_script(SCRIPT, method_args(method) + ["--save-dir", save_dir])
            runs[method] = save_dir
        return runs[method]
    return get


@pytest.mark.parametrize("method", METHODS)
def test_short_run_lowers_the_loss_and_writes_the_run(reference_runs, method):
    save_dir = reference_runs(method)
    files = set(os.listdir(save_dir))
    assert {"args.json", "metrics.jsonl", "curves.png", "last.ckpt", "best.ckpt", "test.json"} <= files
    assert not [f for f in files if f.startswith(".")]  # no temporary files left
    lines = metrics_without_time(save_dir)
    epochs = METHOD_RUNS[method][0]
    assert [(r["epoch"], r["steps"]) for r in lines] == [
        (e, STEPS_PER_EPOCH * (e + 1)) for e in range(epochs)]
    losses = [r["train_loss"] for r in lines]
    print("%s: train loss per epoch %s, val %s" % (method, losses, [r["val"] for r in lines]))
    assert np.all(np.isfinite(losses)) and np.all(np.diff(losses) < 0), losses
    assert losses[-1] < 0.92 * losses[0], losses
    for r in lines:
        assert 0 <= r["val"]["top1"] <= 1
    if method == "s3n":  # one accuracy per branch, the main (concat) one drives the best checkpoint
        assert set(lines[0]["val"]) == {"top1", "top1_concat", "top1_raw", "top1_zoom",
                                        "top1_complementary"}
        assert lines[0]["val"]["top1"] == lines[0]["val"]["top1_concat"]
    record, _ = params_of(os.path.join(save_dir, "last.ckpt"))
    assert record["meta"]["config"]["model"]["method"] == method and record["meta"]["num_classes"] == 10
    assert record["progress"]["step"] == STEPS_PER_EPOCH * epochs and record["progress"]["epoch"] == epochs
    with open(os.path.join(save_dir, "test.json")) as f:
        report = json.load(f)
    assert report["images"] == 48 and 0 <= report["top1"] <= 1


@pytest.mark.parametrize("method", METHODS)
def test_kill_and_resume_gives_the_same_parameters(reference_runs, tmp_path, method):
    """SIGKILL after a step, --resume: the uninterrupted run's parameters and metrics. The
    baseline's killed and resumed runs load with 2 DataLoader workers (its RandomResizedCrop +
    flip draw from python's random and mxnet's generator in the workers) against the
    reference's 0: per-sample seeds make that bitwise the same."""
    kill_at = METHOD_RUNS[method][2]
    save_dir = str(tmp_path / "run")
    workers = ["--num-workers", "2"] if method == "baseline" else []
    saved_step = kill_and_resume(SCRIPT, method_args(method) + workers, save_dir, kill_at)
    assert saved_step == {11: 8, 5: 4, 7: 6, 10: 8}[kill_at]
    reference = reference_runs(method)
    _, expected = params_of(os.path.join(reference, checkpoint.LAST))
    _, actual = params_of(os.path.join(save_dir, checkpoint.LAST))
    diff = max_param_diff(actual, expected)
    print("%s killed after step %d: max parameter difference after resume %g" % (method, kill_at, diff))
    assert diff == 0.0, "max parameter difference %g" % diff
    assert metrics_without_time(save_dir) == metrics_without_time(reference)


def test_test_prints_the_top1_of_every_branch(reference_runs):
    """--test RUN reports every branch; which epoch was best depends on the machine's
    floating-point path, so only the form of the header is checked."""
    save_dir = reference_runs("s3n")
    out = run_script(SCRIPT, ["--test", save_dir, "--test-limit", "40"]).stdout.splitlines()
    best = os.path.join(save_dir, checkpoint.BEST)
    assert out[0].startswith("testing %s (s3n, resnet18_v1 after epoch " % best), out
    assert out[0].endswith(") on test (40 images)"), out
    assert out[1].startswith("test top-1 ") and out[1].endswith(" on 40 images"), out
    top1 = float(out[1].split()[2])
    branches = dict((line.split()[0], float(line.split()[-1])) for line in out[2:])
    assert list(branches) == ["concat", "raw", "zoom", "complementary"]
    assert 0 <= top1 <= 1 and top1 == branches["concat"]


def test_unavailable_imagenet_weights_are_a_one_line_error(tmp_path, fashion_mnist_dir):
    """--pretrained without the model-zoo files and without network: one clear line, status 2."""
    env = {"MXNET_HOME": str(tmp_path / "mxnet"), "MXNET_GLUON_REPO": "http://127.0.0.1:9/"}
    proc = run_script(SCRIPT, ["--method", "s3n", "--pretrained", "--image-size", "32"] + TINY
                      + ["--save-dir", str(tmp_path / "run")], env=env, expect=2)
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --pretrained: ") and "resnet18_v1" in last, last


# ---- argument errors (in process)

def run_main(argv, capsys):
    """cli.run_main(train_fgvc.main, argv): (exit status, stderr lines)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(train_fgvc.main, argv)
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


def test_unknown_method_is_a_one_line_error_listing_the_methods(capsys):
    status, err = run_main(["--method", "svm"], capsys)
    assert status == 2
    assert err == ["error: --method: expected one of baseline, mcloss, s3n, centerloss, got 'svm'"]


def test_method_knob_of_another_method_is_refused(capsys):
    status, err = run_main(["--method", "baseline", "--xi", "2"], capsys)
    assert (status, err) == (2, ["error: --xi: only for --method mcloss (this run is --method baseline)"])


def test_resume_at_a_missing_checkpoint(tmp_path, capsys, fashion_mnist_dir):
    save_dir = str(tmp_path / "new")
    status, err = run_main(["--method", "mcloss"] + TINY + ["--save-dir", save_dir, "--resume"], capsys)
    assert (status, err) == (2, ["error: --resume: checkpoint %s not found"
                                 % os.path.join(save_dir, checkpoint.LAST)])


def test_test_without_weights_or_with_a_foreign_checkpoint(tmp_path, capsys):
    status, err = run_main(["--test"], capsys)
    assert (status, err) == (2, ["error: --test: give the model: --test WEIGHTS or --weights WEIGHTS "
                                 "(a checkpoint or a run directory)"])
    status, err = run_main(["--test", str(tmp_path)], capsys)
    assert (status, err) == (2, ["error: --test: %s holds neither best.ckpt nor last.ckpt" % tmp_path])


def test_defaults_are_the_methods_upstream_recipes_and_the_demos():
    """Settings left unset come from the method's registered recipe (upstream) or its demo overrides."""
    from fgvc_gluon.family import FAMILY
    from training_runtime.config import resolve
    run = resolve(FAMILY, {"method": "s3n", "data_dir": "/data/cub"})
    assert (run.data.dataset, run.model.pretrained, run.data.train_split, run.data.val_split) == (
        "cub", True, "train", "test")
    assert (run.model.backbone, run.model.image_size) == ("resnet50_v1b", 448)
    assert run.model.options == {"radius": 0.09, "radius_inv": 0.3, "base_ratio": 0.09, "smooth_ratio": 0.85,
                                 "sampler_impl": "auto"}
    assert (run.optim.lr, run.optim.epochs, run.optim.lr_steps, run.optim.schedule) == (0.001, 60, [39], "step")
    run = resolve(FAMILY, {"method": "mcloss", "xi": 2})
    assert (run.data.dataset, run.model.pretrained, run.optim.epochs, run.optim.lr, run.optim.lr_steps) == (
        "fashion-mnist", False, 3, 0.05, [])
    assert run.model.options["xi"] == 2
    run = resolve(FAMILY, {"method": "mcloss", "data_dir": "x"})
    assert (run.model.pretrained, run.optim.lr, run.optim.epochs, run.optim.lr_steps, run.runtime.batch_size) == (
        False, 0.1, 300, [149, 224], 32)
    with pytest.raises(UserError, match="--lr: expected a positive number"):
        resolve(FAMILY, {"lr": 0.0})
