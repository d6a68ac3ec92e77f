"""The device-split contract (README "Devices and workers"): a run's numbers depend on the
global batch, the seed and the run definition, not on how the batch is split.

For the attribute model and every registered FGVC method, one small run in which every
stateful mechanism acts (the prediction history recording and weighting, an lr drop,
the centres' own trainer, MC-Loss's masks, S3N's random evaluation mode) is made three
ways with the same global batch of 8:

- ``one``: one process, one CPU context, batch 8;
- ``cpus``: one process, two CPU contexts (``--cpus 2``), batch 8;
- ``dist``: two loopback workers of ``--kvstore dist_sync``, batch 4 each.

Parameters and optimizer states must agree within :data:`TOLERANCE` (float32 sums in
another order; measured worst: parameters 4.2e-7 (S3N), optimizer states 1.0e-7), validation
metrics too; and
``--test`` of the ``cpus`` run's checkpoint prints its own final test. A run stopped on
two contexts and resumed on one (and the reverse) equals the uninterrupted run.
BatchNorm normalises with its running statistics (``--batchnorm frozen``): batch
statistics are per device slice by definition (the documented exception).
"""
import os
import pickle

import numpy as np
import pytest

from resume_harness import max_param_diff, metrics_without_time, params_of
from test_distributed import Launch
import train_attr
import train_fgvc
from training_runtime import checkpoint

pytestmark = pytest.mark.slow  # end-to-end runs: not in the fast loop (-m "not slow")

#: float32 sums in another order, over 4-6 SGD steps of small networks
TOLERANCE = 2e-5
FAMILIES = ("attr", "baseline", "mcloss", "s3n", "centerloss")
COMMON = ["--picture-images", "0", "--figures", "none", "--val-limit", "8", "--test-limit", "8",
          "--seed", "1", "--batchnorm", "frozen", "--image-size", "32"]
#: the history records from epoch 0 and weights from epoch 1; the lr drops after epoch 1
ARGS = {
    "attr": ["train_attr.py", "--train-limit", "32", "--epochs", "3", "--history-start", "0",
             "--history-weight-epoch", "1", "--schedule", "step", "--lr-steps", "2", "--lr", "0.001", "--stable-sigmoid"],
    "fgvc": ["train_fgvc.py", "--train-limit", "16", "--epochs", "2", "--schedule", "step",
             "--lr-steps", "1"],
}


#: MC-Loss's demo lr (0.05) diverges with BatchNorm frozen at its initial statistics
EXTRA = {"mcloss": ["--lr", "0.005"]}


def script_args(family):
    args = ARGS["attr"] if family == "attr" else ARGS["fgvc"][:1] + ["--method", family] + ARGS["fgvc"][1:]
    return args + COMMON + EXTRA.get(family, [])


def main_of(family):
    return train_attr.main if family == "attr" else train_fgvc.main


def trainer_states(path):
    """{'<trainer>/<state index>': numpy array} of a checkpoint's optimizer states."""
    _, arrays = checkpoint.read(path)
    found = {}
    for key, value in arrays.items():
        if key.startswith("trainer/"):
            states = pickle.loads(value.tobytes())
            states = states[0] if isinstance(states, tuple) else states
            for index, state in states.items():
                parts = state if isinstance(state, (tuple, list)) else (state,)
                for j, part in enumerate(parts):
                    if part is not None:
                        found["%s/%s/%d" % (key, index, j)] = part.asnumpy()
    return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name 'FAMILY-KIND' -> (save dir, what main returned / the launcher's process).
    The distributed runs start in the background at the first request of their family."""
    root = tmp_path_factory.mktemp("invariance")
    made, started = {}, {}

    def start_dist(family):
        name = family + "-dist"
        if name not in made and name not in started:
            args = script_args(family)
            started[name] = Launch(args + ["--batch-size", "4", "--kvstore", "dist_sync",
                                           "--save-dir", str(root / name)], timeout=240)

    def get(name):
        if name not in made:
            family, kind = name.split("-")
            save = str(root / name)
            start_dist(family)
            if kind == "dist":
                made[name] = save, started.pop(name).result()
            elif kind == "batchstats":  # BatchNorm with batch statistics: per device by definition
                made[name] = save, main_of(family)(script_args(family)[1:] + [
                    "--batch-size", "8", "--cpus", "2", "--batchnorm", "batch", "--epochs", "1",
                    "--save-dir", save])
            else:
                cpus = {"one": [], "cpus": ["--cpus", "2"]}[kind]
                made[name] = save, main_of(family)(script_args(family)[1:] + ["--batch-size", "8"]
                                                   + cpus + ["--save-dir", save])
        return made[name]
    yield get
    for unused in started.values():
        unused.proc.terminate()
        unused.proc.wait(timeout=30)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_context_two_contexts_and_two_workers_agree(runs, family):
    last = {kind: os.path.join(runs("%s-%s" % (family, kind))[0], checkpoint.LAST)
            for kind in ("one", "cpus", "dist")}
    params = {kind: params_of(path) for kind, path in last.items()}
    states = {kind: trainer_states(path) for kind, path in last.items()}
    steps = {kind: record["progress"]["step"] for kind, (record, _) in params.items()}
    assert len(set(steps.values())) == 1 and steps["one"] >= 4, steps
    assert params["dist"][0]["progress"]["world_size"] == 2
    for kind in ("cpus", "dist"):
        diff = max_param_diff(params["one"][1], params[kind][1])
        assert diff <= TOLERANCE, "%s %s: parameters %.3g apart" % (family, kind, diff)
        assert states["one"].keys() == states[kind].keys() and states["one"]
        diff = max_param_diff(states["one"], states[kind])
        assert diff <= TOLERANCE, "%s %s: optimizer states %.3g apart" % (family, kind, diff)
        one, other = metrics_without_time(runs(family + "-one")[0]), metrics_without_time(runs(
            "%s-%s" % (family, kind))[0])
        assert [r["lr"] for r in one] == [r["lr"] for r in other]
        assert len(set(r["lr"] for r in one)) == 2  # the lr dropped
        for a, b in zip(one, other):
            assert b["val"] == pytest.approx(a["val"], abs=1e-4), (family, kind)
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4), (family, kind)


def test_the_attribute_history_sees_the_whole_batch(runs):
    """Under dist each worker recorded only its share (half the slots filled): the checkpoint's
    history equals the one-process history."""
    histories = {}
    for kind in ("one", "dist"):
        _, arrays = checkpoint.read(os.path.join(runs("attr-" + kind)[0], checkpoint.LAST))
        history = [v for k, v in arrays.items() if k.startswith("extra/") and "history" in k]
        assert history, sorted(arrays)
        histories[kind] = max(history, key=np.size)
    assert np.count_nonzero(histories["one"]) > 0.5 * histories["one"].size
    np.testing.assert_allclose(histories["dist"], histories["one"], atol=TOLERANCE)


@pytest.mark.parametrize("family", ["attr", "mcloss"])
def test_test_of_a_two_context_run_prints_its_own_final_test(runs, family, capsys):
    """--batchnorm batch on two contexts: each device's running statistics follow its own
    slices; evaluation and checkpoints use the first device's (before: the final test mixed
    both devices' statistics and --test differed, attr mAP 0.4839 vs 0.4815)."""
    save, report = runs(family + "-batchstats")
    for cpus in (["--cpus", "2"], []):
        again = main_of(family)(["--test", os.path.join(save, checkpoint.LAST)] + cpus)
        assert again.keys() == report.keys()
        for key, value in report.items():
            if isinstance(value, float):
                assert again[key] == pytest.approx(value, abs=1e-5, nan_ok=True), (family, key, cpus)


@pytest.mark.parametrize("family, first, then", [("attr", ["--cpus", "2"], []),
                                                 ("mcloss", [], ["--cpus", "2"]),
                                                 ("centerloss", ["--cpus", "2"], [])])
def test_stopped_on_one_device_set_and_resumed_on_another(runs, tmp_path, family, first, then):
    """Stopped mid-epoch after 3 steps (--max-steps), resumed with the other device count: the
    parameters equal the uninterrupted run's (on either device count)."""
    save = str(tmp_path / "run")
    args = script_args(family)[1:] + ["--batch-size", "8", "--save-dir", save]
    main_of(family)(args + first + ["--max-steps", "3"])
    main_of(family)(["--resume", os.path.join(save, checkpoint.LAST), "--max-steps", "0"] + then)
    record, resumed = params_of(os.path.join(save, checkpoint.LAST))
    _, uninterrupted = params_of(os.path.join(runs(family + "-one")[0], checkpoint.LAST))
    assert record["progress"]["step"] == params_of(os.path.join(runs(family + "-one")[0],
                                                                checkpoint.LAST))[0]["progress"]["step"]
    assert max_param_diff(uninterrupted, resumed) <= TOLERANCE
