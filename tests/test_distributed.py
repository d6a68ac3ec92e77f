"""Distributed training on loopback: python -m training_runtime.launch, --kvstore dist_sync.

Every process runs under a time limit (the launcher's --timeout and the
subprocess timeout). Tiny runs (16 training images of 32 px, a global batch of
8: two steps) shared between the assertions by module-scoped fixtures: the
attribute model; S3N (four trainers with lr multipliers, parameter shapes
deferred to the first forward); center loss (the centers' trainer with its own
lr), which also serves the kill, resume and refusal checks.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from resume_harness import HOOKS, ROOT, max_param_diff, metrics_without_time, params_of, run_script
import train_attr
import train_fgvc
from training_runtime import checkpoint, distributed, launch as launcher
from training_runtime.errors import UserError

pytestmark = pytest.mark.slow  # end-to-end runs: not in the fast loop (-m "not slow")

TINY = ["--picture-images", "0", "--figures", "none", "--train-limit", "16", "--val-limit", "4", "--test-limit", "4",
        "--seed", "1", "--epochs", "1", "--batchnorm", "frozen", "--image-size", "32"]
DIST = ["--batch-size", "4", "--kvstore", "dist_sync"]   # x 2 workers
ONE = ["--batch-size", "8"]                              # the same global batch in one process
#: the attribute demo needs a positive of every attribute in the training split: 32 images
ATTR = {"train": ["--train-limit", "32"], "batch": 2}


class Launch(object):
    """``python -m training_runtime.launch --workers N --servers 1 -- python ARGS`` started in
    the background (output into files); :meth:`result` waits (hard timeout) and returns a
    CompletedProcess, its exit status checked unless ``expect`` is None."""

    def __init__(self, script_args, workers=2, expect=0, timeout=120, output=None):
        command = [sys.executable, "-m", "training_runtime.launch", "--workers", str(workers),
                   "--servers", "1", "--timeout", str(timeout - 20), "--grace", "2", "--",
                   "python"] + script_args
        env = dict(os.environ, PYTHONPATH=ROOT, PORT="9")  # PORT must be removed by the launcher
        self.expect, self.timeout, self.args = expect, timeout, command
        self.files = [tempfile.TemporaryFile(mode="w+", dir=output) for _ in range(2)]
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.files[0],
                                     stderr=self.files[1], text=True)

    def result(self):
        try:
            code = self.proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        out = []
        for f in self.files:
            f.seek(0)
            out.append(f.read())
            f.close()
        proc = subprocess.CompletedProcess(self.args, code, *out)
        assert self.expect is None or code == self.expect, "exit %d\nstdout:\n%s\nstderr:\n%s" % (
            code, proc.stdout[-3000:], proc.stderr[-3000:])
        return proc


def launch(script_args, **kwargs):
    return Launch(script_args, **kwargs).result()


def last_params(save_dir):
    return params_of(os.path.join(save_dir, checkpoint.LAST))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs made on first use, once per module: name -> (save dir, CompletedProcess, or the
    final test's report of a one-process run). A one-process run (in this process) starts its
    family's distributed runs first, so they overlap."""
    root = tmp_path_factory.mktemp("dist")
    made, started = {}, {}

    def command(family, kind, save):
        """The launcher arguments of a distributed run."""
        script = (["train_attr.py"] if family.startswith("attr") else
                  ["train_fgvc.py", "--method", family])
        if kind == "two":
            tiny, dist = (TINY + ATTR["train"], ["--batch-size", str(int(DIST[1]) * ATTR["batch"])]
                          + DIST[2:]) if family.startswith("attr") else (TINY, DIST)
            if family == "attrbn":  # BatchNorm with batch statistics (running statistics per worker)
                tiny = tiny + ["--batchnorm", "batch"]
            return script + tiny + dist + ["--save-dir", save]
        # killed: rank 1 SIGKILLs itself after step 1: rank 0 cannot go past step 1 (step 2 needs
        # rank 1's gradients) and saves it (--checkpoint-every 1, or on the launcher's SIGTERM)
        return ([HOOKS, "--kill-at-step", "1", "--kill-rank", "1", os.path.join(ROOT, script[0])] +
                script[1:] + TINY + DIST + ["--checkpoint-every", "1", "--save-dir", save])

    def start(name, **kwargs):
        if name not in made and name not in started:
            family, kind = name.split("-")
            started[name] = Launch(command(family, kind, str(root / name)), **kwargs)

    def get(name):
        if name not in made:
            save = str(root / name)
            family, kind = name.split("-")[0], name.split("-")[1]
            script = ["train_attr.py"] if family == "attr" else ["train_fgvc.py", "--method", family]
            if family == "centerloss":  # the uninterrupted and the killed run overlap
                start("centerloss-two")
                start("centerloss-killed", expect=None)
            if kind in ("two", "killed"):
                start(name, expect=0 if kind == "two" else None)
                proc = started.pop(name).result()
            elif kind == "resumed":
                shutil.copytree(get(family + "-killed")[0], save)
                proc = launch([script[0], "--resume", os.path.join(save, checkpoint.LAST)])
            made[name] = save, proc
        return made[name]
    yield get
    for unused in started.values():  # started for a test that was deselected: the launcher stops all
        unused.proc.terminate()
        unused.proc.wait(timeout=30)


def test_shard_covers_the_global_batch():
    batch = list(range(11))
    parts = [distributed.shard(batch, r, 3) for r in range(3)]
    assert sum(parts, []) == batch and [len(p) for p in parts] == [4, 4, 3]


def test_dist_kvstore_without_launcher_is_a_clear_error(tmp_path, monkeypatch):
    for key in [k for k in os.environ if k.startswith("DMLC_")]:
        monkeypatch.delenv(key)
    with pytest.raises(UserError, match="start the run with python -m training_runtime.launch"):
        train_attr.main(TINY + ["--kvstore", "dist_sync", "--save-dir", str(tmp_path / "r")])
    assert not os.path.exists(str(tmp_path / "r"))


# two workers against one and two contexts, every method: tests/test_invariance.py


def test_workers_evaluate_with_rank_0_batchnorm_statistics(runs):
    """--batchnorm batch: each worker's running statistics follow its own share, yet both
    evaluate with rank 0's (copied before every evaluation), so their metrics agree (without
    the copy they differ on this run: val mAP 0.2963 vs 0.3241)."""
    _, proc = runs("attrbn-two")
    lines = dict(re.findall(r"\[worker (\d)\] epoch 0: (.*), [\d.]+s\n", proc.stdout))
    assert len(lines) == 2 and lines["0"] == lines["1"] and "val mAP" in lines["0"], proc.stdout[-2000:]


def test_a_killed_worker_stops_everything_and_leaves_the_checkpoint(runs):
    save, proc = runs("centerloss-killed")
    found = re.search(r"launch: worker (\d) \(pid \d+\) exited with status -9 \(SIGKILL\); "
                      r"stopping the others", proc.stderr)
    assert found, proc.stderr[-3000:]
    assert proc.returncode == 10 + int(found.group(1))  # not 7: stopped before --timeout
    stopped = re.search(r"launch: stopped every process in ([\d.]+)s", proc.stderr)
    assert stopped and float(stopped.group(1)) < 2 + 3  # --grace 2: the blocked rank 0 is SIGKILLed
    record, killed = last_params(save)
    assert record["progress"]["step"] == 1
    # the comparisons below can fail: one step more changes the parameters
    assert max_param_diff(killed, last_params(runs("centerloss-two")[0])[1]) > 1e-4


def test_resumed_distributed_run_equals_the_uninterrupted_one(runs):
    save, proc = runs("centerloss-resumed")
    assert "resumed from" in proc.stdout
    record, resumed = last_params(save)
    _, uninterrupted = last_params(runs("centerloss-two")[0])
    assert record["progress"]["step"] == 2
    assert all(np.array_equal(uninterrupted[k], resumed[k]) for k in uninterrupted)


def test_resume_with_another_worker_count_is_refused(runs):
    save, _ = runs("centerloss-killed")
    with pytest.raises(UserError, match=r"written by 2 worker\(s\), this run has 1 \(the global batch"):
        train_fgvc.main(["--resume", os.path.join(save, checkpoint.LAST), "--kvstore", "device"])


# ---- the launcher's plan (no process started) ---------------------------------------------------

def test_local_plan_binds_to_loopback_without_port():
    specs = launcher.plan(2, 1, ["python", "train_attr.py", "--kvstore", "dist_sync"], port=1234,
                          environ={"PORT": "9", "HOME": "/h"}, python="/venv/python")
    assert [(s.role, s.rank, s.host) for s in specs] == [
        ("scheduler", 0, None), ("server", 0, None), ("worker", 0, None), ("worker", 1, None)]
    for s in specs:
        assert "PORT" not in s.env and s.env["DMLC_NODE_HOST"] == "127.0.0.1"
        assert s.env["DMLC_PS_ROOT_URI"] == "127.0.0.1" and s.env["DMLC_PS_ROOT_PORT"] == "1234"
        assert s.env["DMLC_NUM_WORKER"] == "2" and s.env["DMLC_NUM_SERVER"] == "1"
        assert s.env["DMLC_ROLE"] == s.role
    assert specs[2].argv == ["/venv/python", "train_attr.py", "--kvstore", "dist_sync"]
    assert specs[1].argv == ["/venv/python", "-c", "import mxnet"]


def test_hostfile_plan_runs_servers_and_workers_over_ssh(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# nodes\nnode-a\n\n  me@node-b   # second\n")
    hosts = launcher.read_hostfile(str(hostfile))
    assert hosts == ["node-a", "me@node-b"]
    specs = launcher.plan(3, 2, ["python", "train_fgvc.py", "--save-dir", "runs/x y"], hosts,
                          root_uri="head", port=99, extra_env=launcher.parse_env(["DMLC_INTERFACE=eth1",
                                                                                  "MY_FLAG=1"]),
                          environ={"PORT": "9", "PYTHONPATH": "/repo", "SECRET": "s"},
                          cwd="/work/repo", python="/venv/python")
    assert [(s.role, s.host) for s in specs] == [
        ("scheduler", None), ("server", "node-a"), ("server", "me@node-b"), ("worker", "node-a"),
        ("worker", "me@node-b"), ("worker", "node-a")]
    assert specs[0].argv == ["/venv/python", "-c", "import mxnet"]  # the scheduler runs here
    assert "DMLC_NODE_HOST" not in specs[0].env  # every host binds its own address
    worker = specs[4]
    assert worker.argv[:5] == ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new"]
    assert worker.argv[5] == "me@node-b"
    remote = worker.argv[6]
    assert remote.startswith("cd /work/repo && env -u PORT ")
    for part in ("DMLC_ROLE=worker", "DMLC_PS_ROOT_URI=head", "DMLC_PS_ROOT_PORT=99", "DMLC_NUM_WORKER=3",
                 "DMLC_NUM_SERVER=2", "DMLC_INTERFACE=eth1", "MY_FLAG=1", "PYTHONPATH=/repo",
                 "/venv/python train_fgvc.py --save-dir 'runs/x y'"):
        assert part in remote, (part, remote)
    assert "SECRET" not in remote and not re.search(r"(^| )PORT=", remote)
    assert "DMLC_ROLE=server" in specs[1].argv[6] and "-c 'import mxnet'" in specs[1].argv[6]


def test_workers_of_one_host_split_the_gpus():
    """--gpus 0,1,2,3 with 2 workers on this host: 0,1 and 2,3; with a hostfile of 2 hosts and
    4 workers, each host's two workers split its list; --share-gpus keeps the whole list."""
    command = ["python", "train_attr.py", "--gpus", "0,1,2,3", "--kvstore", "dist_sync"]
    workers = [s for s in launcher.plan(2, 1, command, port=1) if s.role == "worker"]
    assert [w.argv[3] for w in workers] == ["0,1", "2,3"]
    shared = [s for s in launcher.plan(2, 1, command, port=1, share_gpus=True) if s.role == "worker"]
    assert [w.argv[3] for w in shared] == ["0,1,2,3"] * 2
    equals = ["python", "train_fgvc.py", "--gpus=0,1", "--kvstore", "dist_sync"]
    remote = [s for s in launcher.plan(4, 1, equals, ["a", "b"], port=1) if s.role == "worker"]
    assert [(s.host, "--gpus=%s" % g in s.argv[-1]) for s, g in zip(remote, "0011")] == [
        ("a", True), ("b", True), ("a", True), ("b", True)]
    assert launcher.plan(2, 1, ["python", "train_attr.py"], port=1)[-1].argv[-1] == "train_attr.py"
    with pytest.raises(SystemExit, match=r"--gpus 0,1,2: 3 GPU\(s\) cannot be split evenly over the 2 "):
        launcher.plan(2, 1, ["python", "x.py", "--gpus", "0,1,2"], port=1)


def test_step_batch_gathers_the_whole_batch():
    """In one process gather is the identity; with an all_sum (here: a fake of two workers whose
    other share is known) the rows land at the worker's offset of the global batch."""
    import mxnet as mx
    from training_runtime.task import StepBatch, class_counts
    label, index = mx.nd.array([[2], [0], [2]]), mx.nd.array([7, 3, 5], dtype="int64")
    one = StepBatch(0, 0, label, index)
    assert one.gather("x", label) is label and one.global_size == 3
    other = np.zeros((5, 1), np.float32)
    other[:2] = [[1], [1]]  # rank 0's share (2 samples); this worker is rank 1 at offset 2
    two = StepBatch(0, 0, label, index, global_size=5, offset=2,
                    all_sum=lambda name, padded: padded + mx.nd.array(other if "label" in name else
                                                                      np.array([4, 6, 0, 0, 0])))
    np.testing.assert_array_equal(two.global_label.asnumpy().ravel(), [1, 1, 2, 0, 2])
    np.testing.assert_array_equal(two.global_index.asnumpy(), [4, 6, 7, 3, 5])
    assert two.global_index.dtype == np.int64
    np.testing.assert_array_equal(class_counts(two.global_label, 3), [1, 2, 2])
    with pytest.raises(ValueError, match=r"expected 3 rows"):
        two.gather("bad", mx.nd.zeros((2, 1)))


@pytest.mark.parametrize("content, message", [
    (None, "No such file"), ("\n# only a comment\n", "no hosts"),
    ("node-a\nnode-b slots=2\n", "line 2: expected one host name per line")])
def test_bad_hostfile_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "hosts"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as err:
        launcher.read_hostfile(str(path))
    assert str(path) in str(err.value) and message in str(err.value)


def test_bad_launch_arguments_are_clear_errors():
    with pytest.raises(SystemExit, match="--env 'NOVALUE': expected KEY=VALUE"):
        launcher.parse_env(["NOVALUE"])
    with pytest.raises(SystemExit, match="at least 1"):
        launcher.plan(0, 1, ["python", "x.py"], port=1)
    with pytest.raises(SystemExit, match="no worker command"):
        launcher.main(["--workers", "1", "--"])


def test_a_failing_worker_command_stops_the_servers():
    """A worker that fails at once (status 3): the launcher stops the scheduler and the server
    it left waiting and exits 10 + its index."""
    proc = launch(["-c", "import sys; sys.exit(3)"], workers=1, expect=None, timeout=60)
    assert proc.returncode == 10, proc.stderr
    assert re.search(r"launch: worker 0 \(pid \d+\) exited with status 3; stopping the others", proc.stderr)
    assert "launch: stopped every process in" in proc.stderr


def test_figures_none_draws_no_curves_and_no_test_figures(runs):
    """--figures none (every run above): no curves.png, no test figures; the logs are written."""
    save, _ = runs("attrbn-two")
    files = set(os.listdir(save))
    assert {"metrics.jsonl", "test.json", checkpoint.LAST} <= files
    assert not files & {"curves.png", "test_ap.png", "test_pr.png"}
