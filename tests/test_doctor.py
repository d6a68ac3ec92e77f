"""GPU readiness: the wheel-architecture table, the --gpus refusal of a GPU without kernels
(the capability query faked: no GPU here), the doctor on this CPU machine, and the
comparison / report logic of scripts/gpu_acceptance.py (its end-to-end run is slow-marked)."""
import argparse
import io
import json
import os
import subprocess
import sys

import mxnet as mx
import pytest

from training_runtime import cli, doctor, gpus
from training_runtime.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFICIAL = (50, 60, 70, 80, 86)
H100 = {"index": 0, "name": "NVIDIA H100 80GB HBM3", "capability": (9, 0), "memory_mb": 81559}
T4 = {"index": 1, "name": "Tesla T4", "capability": (7, 5), "memory_mb": 15360}
L4 = {"index": 1, "name": "NVIDIA L4", "capability": (8, 9), "memory_mb": 23034}


@pytest.mark.parametrize("capability, expected", [
    ((7, 0), True),    # V100: native
    ((7, 5), True),    # T4: the sm_70 cubins (same major, higher minor)
    ((8, 0), True),    # A100
    ((8, 6), True),    # A10, RTX 30
    ((8, 9), True),    # L4, L40, RTX 40: the sm_86 cubins
    ((6, 1), True),    # P40, GTX 10: sm_60
    ((5, 2), True),    # Maxwell GTX 9: sm_50
    ((3, 7), False),   # K80: no major-3 cubin
    ((9, 0), False),   # H100, H200: no PTX to JIT from
    ((10, 0), False),  # B200
    ((12, 0), False),  # RTX 50
])
def test_official_wheel_kernels_run_only_on_a_same_major_gpu_at_or_above_their_minor(capability, expected):
    assert gpus.WHEEL_ARCHS["mxnet-cu112"] == gpus.WHEEL_ARCHS["mxnet-cu117"] == OFFICIAL
    assert gpus.runnable(capability, OFFICIAL) is expected
    assert gpus.runnable(capability, None) is True   # unknown build: never refused
    assert gpus.runnable(capability, ()) is False    # CPU build: no GPU kernels


def test_wheel_architectures_table_and_override(monkeypatch):
    monkeypatch.delenv(gpus.ARCHS_ENV, raising=False)
    assert gpus.wheel_architectures("mxnet-cu116", cuda=True) == OFFICIAL
    assert gpus.wheel_architectures("mxnet-cu102", cuda=True) == (30, 50, 60, 70, 75)
    assert not gpus.runnable((8, 0), gpus.wheel_architectures("mxnet-cu102"))  # A100 needs cu110+
    assert gpus.wheel_architectures("mxnet", cuda=False) == ()
    assert gpus.wheel_architectures("mxnet", cuda=True) is None    # a CUDA 'mxnet' is a source build
    monkeypatch.setenv(gpus.ARCHS_ENV, "8.0;sm_90, 86")
    assert gpus.wheel_architectures("mxnet-cu112", cuda=True) == (80, 86, 90)
    monkeypatch.setenv(gpus.ARCHS_ENV, "hopper")
    with pytest.raises(ValueError, match=gpus.ARCHS_ENV):
        gpus.wheel_architectures("mxnet-cu112")


def fake_machine(monkeypatch, devices, build=("mxnet-cu112", "1.9.1", True)):
    monkeypatch.delenv(gpus.ARCHS_ENV, raising=False)
    monkeypatch.setattr(gpus, "installed_build", lambda: build)
    monkeypatch.setattr(gpus, "query_devices", lambda: [dict(d) for d in devices])
    monkeypatch.setattr(mx.context, "num_gpus", lambda: len(devices))


def gpu_args(ids):
    return argparse.Namespace(gpus=ids, cpus=1, batchnorm="batch")


def test_gpus_refuses_a_gpu_without_kernels_in_one_line(monkeypatch):
    fake_machine(monkeypatch, [H100, T4])
    with pytest.raises(UserError) as err:
        cli.contexts(gpu_args("0,1"))
    assert str(err.value) == (
        "--gpus: GPU 0 (NVIDIA H100 80GB HBM3, sm_90) has no kernels in the installed mxnet-cu112 1.9.1 "
        "(built for sm_50, sm_60, sm_70, sm_80, sm_86, no PTX): MXNet would stop with 'no kernel image "
        "is available'; use a GPU of an architecture listed (or a newer minor of the same major), or an "
        "MXNet built for sm_90 (see docs/GPU.md)")
    assert cli.contexts(gpu_args("1")) == [mx.gpu(1)]   # the T4 alone is fine
    # a custom build that declares sm_90 is let through
    monkeypatch.setenv(gpus.ARCHS_ENV, "80,90")
    assert cli.contexts(gpu_args("0")) == [mx.gpu(0)]


@pytest.mark.parametrize("device", [T4, L4], ids=["sm_75", "sm_89"])
def test_gpus_allows_a_newer_minor_of_a_built_major(monkeypatch, device):
    fake_machine(monkeypatch, [dict(H100, capability=(8, 0), name="A100"), device])
    assert cli.contexts(gpu_args("0,1")) == [mx.gpu(0), mx.gpu(1)]


def test_gpus_is_not_refused_when_the_build_or_gpu_is_unknown(monkeypatch):
    fake_machine(monkeypatch, [H100], build=("mxnet", "1.9.1", True))  # a source build
    assert cli.contexts(gpu_args("0")) == [mx.gpu(0)]
    fake_machine(monkeypatch, [])                                      # nothing could be queried
    monkeypatch.setattr(mx.context, "num_gpus", lambda: 1)
    assert cli.contexts(gpu_args("0")) == [mx.gpu(0)]


def test_doctor_lines_for_a_faked_gpu_machine(monkeypatch):
    fake_machine(monkeypatch, [H100, T4])
    report = doctor.Report(io.StringIO())
    name, archs, cuda, count = doctor.check_mxnet(report)
    usable = doctor.check_devices(report, name, archs, cuda, count)
    assert usable == [1] and report.failed
    lines = {item: (status, detail) for status, item, detail in report.lines}
    assert lines["wheel GPU architectures"][0] == doctor.OK
    assert lines["gpu 0"][0] == doctor.FAIL and "sm_90" in lines["gpu 0"][1]
    assert lines["gpu 1"] == (doctor.OK, "Tesla T4, sm_75, 15360 MB: runs the wheel's sm_70 kernels")
    assert [label for label, _ in doctor.device_kinds(usable)] == ["cpu", "gpu 1", "gpu 1 --amp"]


class _FakeFamily(object):
    name, script, methods = "fake", "no_such_training_script_module", ("a",)


def test_doctor_step_failures_are_fail_lines_with_the_reason(tmp_path):
    report = doctor.Report(io.StringIO())
    doctor.run_steps(report, {"fake": _FakeFamily()}, [], steps=1, timeout=60, workdir=str(tmp_path))
    [(status, item, detail)] = report.lines
    assert status == doctor.FAIL and item == "no_such_training_script_module cpu"
    assert detail.startswith("exit 1: ") and "No module named no_such_training_script_module" in detail


def test_doctor_quick_passes_on_this_cpu_machine():
    out = io.StringIO()
    assert doctor.main(["--quick"], stream=out) == 0, out.getvalue()
    text = out.getvalue()
    statuses = [line.split()[0] for line in text.splitlines()[1:-1]]
    assert doctor.FAIL not in statuses, text
    for item in ("python", "numpy", "mxnet", "wheel GPU architectures", "task families",
                 "fgvc_gluon.native", "demo data", "training steps"):
        assert any(line[6:].startswith(item) for line in text.splitlines()), (item, text)
    assert "none (a CPU build)" in text
    assert text.splitlines()[-1].startswith("ready: ")


# ---------------------------------------------------------------------------- scripts/gpu_acceptance.py

@pytest.fixture(scope="module")
def acceptance():
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_acceptance", os.path.join(ROOT, "scripts", "gpu_acceptance.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_acceptance_comparisons_against_numpy(acceptance):
    import numpy as np
    rng = np.random.RandomState(0)
    b = {"param/net/w": rng.randn(3, 4).astype(np.float32), "param/net/b": rng.randn(4).astype(np.float32)}
    a = {k: v + np.float32(0.01) * rng.randn(*v.shape).astype(np.float32) for k, v in b.items()}
    flat_a = np.concatenate([a[k].ravel() for k in sorted(a)]).astype(np.float64)
    flat_b = np.concatenate([b[k].ravel() for k in sorted(b)]).astype(np.float64)
    assert acceptance.relative_l2(a, b) == pytest.approx(np.linalg.norm(flat_a - flat_b) / np.linalg.norm(flat_b))
    assert acceptance.relative_l2(b, b) == 0.0
    with pytest.raises(ValueError, match="param/net/x"):
        acceptance.relative_l2(dict(a, **{"param/net/x": b["param/net/b"]}), b)
    # --test's report against test.json (which adds the epoch): only its own keys count
    run = {"top1": 0.5, "images": 32, "epoch": 0, "per_branch": {"raw": 0.25}}
    assert acceptance.largest_report_difference({"top1": 0.5, "images": 32, "per_branch": {"raw": 0.25}}, run) \
        == ("", 0.0)
    assert acceptance.largest_report_difference({"top1": 0.53125, "per_branch": {"raw": 0.25}}, run) \
        == ("top1", pytest.approx(0.03125))
    assert acceptance.largest_report_difference({"top1": 0.5, "mAP": 0.7}, run) == ("mAP", float("inf"))
    assert acceptance.largest_report_difference({"top1": float("nan")}, run) == ("top1", float("inf"))
    # centres: a displacement 2^16 times too small (the loss scale forgotten) is caught
    c0 = rng.randn(10, 2)
    step = rng.randn(10, 2)
    ratio, cosine = acceptance.centre_movement(c0 + 1.1 * step, c0 + step, c0)
    assert ratio == pytest.approx(1.1) and cosine == pytest.approx(1.0)
    ratio, _ = acceptance.centre_movement(c0 + step / 65536.0, c0 + step, c0)
    assert acceptance.judge([(ratio, acceptance.TOLERANCE["centre_ratio"])]) == acceptance.FAIL
    assert acceptance.judge([(1e-4, 1e-3), (1.0, (0.8, 1.25))]) == acceptance.PASS
    assert acceptance.judge([(float("nan"), 1e-3)]) == acceptance.FAIL
    assert acceptance.judge([(2e-3, 1e-3)]) == acceptance.FAIL


def test_acceptance_report_files_are_complete(acceptance, tmp_path):
    report = acceptance.Report({"time": "2026-12-07T12:00:00", "mode": "cpu stand-in"}, log=lambda *a: None)
    report.add("parity", "baseline", acceptance.PASS, "params 0.00e+00 (<= 0.02)", {"params": 0.0}, 3.21)
    report.add("amp", "baseline", acceptance.SKIP, "skipped: needs a GPU (float16 kernels)")
    report.add("test", "s3n", acceptance.FAIL, "--test: exit 2: error: ...")
    json_path, text_path = report.write(str(tmp_path / "out"))
    assert sorted(os.listdir(str(tmp_path / "out"))) == ["acceptance.json", "acceptance.txt"]  # no temporaries
    data = json.load(open(json_path))
    assert [(r["check"], r["method"], r["status"]) for r in data["results"]] == [
        ("parity", "baseline", "pass"), ("amp", "baseline", "skip"), ("test", "s3n", "FAIL")]
    assert data["results"][0]["seconds"] == 3.2 and data["tolerance"]["params"] == 2e-2
    text = open(text_path).read().splitlines()
    assert text[-1] == "3 check(s): 1 passed, 1 failed, 1 skipped"
    assert "skip  amp     baseline    skipped: needs a GPU (float16 kernels)" in text


def test_acceptance_refuses_bad_arguments_before_any_run(acceptance, capsys):
    for argv, expected in ((["--cpu-stand-in", "--checks", "parity,speedy"], "--checks: expected some of"),
                           (["--cpu-stand-in", "--methods", "nope"], "--methods: expected some of"),
                           ([], "--gpus: MXNet sees no GPU here (a CPU build)")):
        with pytest.raises(SystemExit) as stop:
            acceptance.main(argv)
        assert stop.value.code == 2 and expected in capsys.readouterr().err


@pytest.mark.slow
def test_acceptance_cpu_stand_in_end_to_end(tmp_path):
    """The script as CI runs it: one method, parity (two real runs) and the GPU-only checks'
    skip lines; exit 0 and both report files."""
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_acceptance.py"), "--cpu-stand-in",
                           "--methods", "centerloss", "--checks", "parity,amp,sync", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.load(open(str(out / "acceptance.json")))
    statuses = {(r["check"], r["status"]) for r in data["results"]}
    assert statuses == {("parity", "pass"), ("amp", "skip"), ("sync", "skip")}
    parity = [r for r in data["results"] if r["check"] == "parity"][0]
    assert parity["measured"] == {"loss_step1": 0.0, "loss_mean": 0.0, "params": 0.0}  # cpu(0) twice: equal
    assert "skipped: needs a GPU" in open(str(out / "acceptance.txt")).read()
