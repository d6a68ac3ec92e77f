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
