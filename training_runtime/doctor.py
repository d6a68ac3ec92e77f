"""python -m training_runtime.doctor: is this machine ready to train? One line per check.

Checks, in order (status ``ok``, ``FAIL``, ``warn``, ``info`` or ``skip``; any FAIL
makes the exit status 1):

- Python and numpy: MXNet 1.9.1 needs numpy < 1.24 (it uses ``np.bool``), which has no
  wheels past Python 3.11;
- the MXNet build: version, distribution (``mxnet`` = CPU, ``mxnet-cu112`` ..), CUDA /
  cuDNN / NCCL compiled in, ``mx.context.num_gpus()``;
- the GPU architectures the installed wheel has kernels for (:mod:`training_runtime.gpus`)
  and every visible GPU (name, compute capability, memory) against them: a GPU without
  kernels (e.g. an H100, sm_90, with ``mxnet-cu112``) is a FAIL naming what to do;
- each model package's native CPU kernels (S3N's sampler), built and loaded in a
  subprocess (``python -m <package>.native``) so this module imports no model package;
  unavailable is a warning (the methods fall back to MXNet's operators);
- onnx / onnxruntime (``python -m training_runtime.export --format onnx``; optional);
- the demo data (Fashion-MNIST, ``/usr/share/datasets/fashion-mnist``);
- model-zoo weights on disk (``$MXNET_HOME/models``, default ``~/.mxnet/models``) for
  every backbone a registered method's upstream recipe loads pretrained (missing:
  a warning; they download on first use where there is a network);
- unless ``--quick``: a few training steps of every registered method at tiny size, each
  script in its own process with a time limit, on every kind of device present: CPU;
  and, when MXNet sees a GPU, ``--gpus 0`` and ``--gpus 0 --amp``.

    python -m training_runtime.doctor            # everything (about 10 s per method and device)
    python -m training_runtime.doctor --quick    # no training steps
"""
import argparse
import glob
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import mxnet as mx
import numpy as np

from . import fashion_mnist, gpus, registry

OK, FAIL, WARN, INFO, SKIP = "ok", "FAIL", "warn", "info", "skip"


class Report(object):
    """The lines printed so far; ``failed`` once any line is a FAIL."""

    def __init__(self, stream=None):
        self.lines, self.stream = [], stream or sys.stdout

    def add(self, status, item, detail):
        self.lines.append((status, item, detail))
        print("%-4s  %-28s %s" % (status, item, detail), file=self.stream, flush=True)

    @property
    def failed(self):
        return any(status == FAIL for status, _, _ in self.lines)


# ---------------------------------------------------------------------------- environment

def check_python(report):
    version = "%d.%d.%d" % sys.version_info[:3]
    if sys.version_info[:2] > (3, 11):
        report.add(FAIL, "python", "%s: MXNet 1.9.1 needs numpy < 1.24, which has no wheels past "
                   "Python 3.11; use Python 3.10 or 3.11" % version)
    else:
        report.add(OK, "python", "%s (%s)" % (version, sys.executable))
    major, minor = (int(p) for p in np.__version__.split(".")[:2])
    if (major, minor) >= (1, 24):
        report.add(FAIL, "numpy", "%s: MXNet 1.9.1 needs numpy < 1.24 (pip install 'numpy<1.24')"
                   % np.__version__)
    else:
        report.add(OK, "numpy", np.__version__)


def check_mxnet(report):
    """The build lines; returns (wheel name, its sm list or None, CUDA compiled in, GPU count)."""
    features = mx.runtime.Features()
    name, version, cuda = gpus.installed_build()
    count = mx.context.num_gpus() if cuda else 0
    flags = ", ".join("%s %s" % (f, "on" if features.is_enabled(f) else "off")
                      for f in ("CUDA", "CUDNN", "NCCL", "MKLDNN"))
    report.add(OK, "mxnet", "%s (%s; %s build: %s); %d GPU(s) visible"
               % (mx.__version__, name or "distribution unknown", "GPU" if cuda else "CPU", flags, count))
    archs = gpus.wheel_architectures(name, cuda)
    if archs is None:
        report.add(WARN, "wheel GPU architectures", "unknown for %s (a source build?): GPUs are not "
                   "checked; set %s=70,80,... to declare them" % (name or "this build", gpus.ARCHS_ENV))
    elif not archs:
        report.add(INFO, "wheel GPU architectures", "none (a CPU build)")
    else:
        report.add(OK, "wheel GPU architectures", "%s, no PTX (%s)" % (
            ", ".join("sm_%d" % a for a in archs),
            "from " + gpus.ARCHS_ENV if os.environ.get(gpus.ARCHS_ENV, "").strip()
            else "the official %s build" % name))
    return name, archs, cuda, count


def check_devices(report, name, archs, cuda, count):
    """One line per visible GPU; returns the indices MXNet can train on."""
    devices = gpus.query_devices()
    usable = []
    for device in devices:
        label = "gpu %d" % device["index"]
        text = "%s, %s, %d MB" % (device["name"], gpus.sm(device["capability"]), device["memory_mb"])
        if not cuda:
            report.add(WARN, label, text + ": the CPU build of MXNet is installed; for this GPU "
                       "pip install mxnet-cu112==1.9.1 (or MXNET_EXTRA=gpu bash scripts/install.sh)")
        elif gpus.runnable(device["capability"], archs):
            report.add(OK, label, text + ("" if archs is None else ": runs the wheel's sm_%d kernels"
                                          % max(a for a in archs if a // 10 == device["capability"][0]
                                                and a % 10 <= device["capability"][1])))
            usable.append(device["index"])
        else:
            report.add(FAIL, label, gpus.unsupported_message(device, name, archs).split(": ", 1)[1])
    if not devices:
        if cuda and count:  # MXNet sees GPUs the query could not describe: train on them anyway
            report.add(WARN, "gpus", "MXNet sees %d GPU(s) but neither libcuda nor nvidia-smi "
                       "describes them; architectures not checked" % count)
            usable = list(range(count))
        else:
            report.add(INFO, "gpus", "none visible (CPU only)")
    return usable


def family_packages():
    """(family name, the package of its entry point) of every registered family, without
    importing the package (the entry point's value is 'package.module:OBJECT')."""
    from importlib import metadata
    points = metadata.entry_points(group=registry.ENTRY_POINT_GROUP)
    return sorted((p.name, p.value.split(":")[0].split(".")[0]) for p in points)


def check_native(report, timeout):
    """Each family package's ``native`` kernels, built/loaded by ``python -m PACKAGE.native``."""
    for family, package in family_packages():
        spec = importlib.util.find_spec(package)  # a top-level spec does not import the package
        if spec is None or not spec.submodule_search_locations:
            continue
        directory = list(spec.submodule_search_locations)[0]
        if not os.path.isfile(os.path.join(directory, "native", "__main__.py")):
            continue
        item = "%s.native" % package
        try:
            done = subprocess.run([sys.executable, "-m", item], capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            report.add(WARN, item, "no answer within %d s" % timeout)
            continue
        text = (done.stdout.strip().splitlines() or [""])[-1].replace("[native] ", "")
        if done.returncode != 0:
            report.add(WARN, item, "exit %d: %s" % (done.returncode, _last_line(done.stderr)))
        elif "unavailable" in text:
            report.add(WARN, item, text)
        else:
            report.add(OK, item, text)


def check_onnx(report):
    for module in ("onnx", "onnxruntime"):
        try:
            imported = __import__(module)
            report.add(OK, module, getattr(imported, "__version__", "?"))
        except Exception as err:  # noqa: BLE001 -- any import failure means "not usable"
            report.add(INFO, module, "not importable (%s): only export --format onnx needs it "
                       "(pip install -e '.[export]')" % _last_line(str(err)))


def check_demo_data(report):
    try:
        directory = fashion_mnist.find_files()
        report.add(OK, "demo data", "Fashion-MNIST in %s" % directory)
    except Exception as err:  # noqa: BLE001 -- UserError with the install help
        report.add(WARN, "demo data", _last_line(str(err)))


def zoo_directories():
    """Where MXNet's model zoo keeps weights: $MXNET_HOME/models (mx.base.data_dir), and
    ~/.mxnet/models (gluoncv's default root)."""
    found = [os.path.join(mx.base.data_dir(), "models"), os.path.expanduser("~/.mxnet/models")]
    return list(dict.fromkeys(os.path.abspath(d) for d in found))


def pretrained_backbones(families):
    """{backbone: [family/method, ...]} of every backbone an upstream recipe loads pretrained."""
    wanted = {}
    for family in families.values():
        for entry in family.methods.values():
            backbones = [entry.recipe.get("backbone")] + sorted(entry.backbone_recipes)
            for backbone in backbones:
                if backbone and entry.recipe_for(backbone).get("pretrained"):
                    wanted.setdefault(backbone, []).append("%s/%s" % (family.name, entry.name))
    return wanted


def check_zoo(report, families):
    from mxnet.gluon.model_zoo import model_store
    directories = zoo_directories()
    for backbone, users in sorted(pretrained_backbones(families).items()):
        item = "weights %s" % backbone
        who = "upstream recipe of " + ", ".join(users)
        if backbone not in model_store._model_sha1:
            report.add(INFO, item, "%s; not a model-zoo name (the method builds it from one)" % who)
            continue
        files = [f for d in directories for f in glob.glob(os.path.join(d, backbone + "-*.params"))]
        if files:
            report.add(OK, item, "%s (%s)" % (files[0], who))
        else:
            report.add(WARN, item, "not in %s (%s): downloads on first use with a network, or "
                       "train with --no-pretrained" % (" or ".join(directories), who))


# ---------------------------------------------------------------------------- training steps

TINY = ["--train-limit", "64", "--val-limit", "8", "--test-limit", "8", "--batch-size", "8",
        "--epochs", "1", "--picture-images", "0", "--figures", "none", "--num-workers", "0",
        "--seed", "1", "--log-every", "1"]


def _last_line(text):
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def step_command(family, method, device_flags, steps, save_dir):
    """The command line of a tiny run of ``method`` (``python -m <script>``)."""
    command = [sys.executable, "-m", family.script]
    if len(family.methods) > 1:
        command += ["--method", method]
    return command + TINY + ["--max-steps", str(steps), "--save-dir", save_dir] + list(device_flags)


def device_kinds(usable_gpus):
    """(label, flags) of every kind of device to try: CPU, and GPU / GPU + --amp when usable."""
    kinds = [("cpu", [])]
    if usable_gpus:
        gpu = str(usable_gpus[0])
        kinds += [("gpu %s" % gpu, ["--gpus", gpu]), ("gpu %s --amp" % gpu, ["--gpus", gpu, "--amp"])]
    return kinds


def run_steps(report, families, usable_gpus, steps, timeout, workdir):
    for label, flags in device_kinds(usable_gpus):
        for family in families.values():
            for method in family.methods:
                item = "%s %s" % (family.script if len(family.methods) == 1 else method, label)
                save_dir = os.path.join(workdir, "%s-%s-%s" % (family.name, method, label.replace(" ", "_")))
                command = step_command(family, method, flags, steps, save_dir)
                start = time.time()
                try:
                    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
                except subprocess.TimeoutExpired:
                    report.add(FAIL, item, "no result within %d s (a hang?): %s" % (timeout, " ".join(command)))
                    continue
                seconds = time.time() - start
                if done.returncode != 0:
                    report.add(FAIL, item, "exit %d: %s" % (done.returncode, _last_line(done.stderr)
                                                           or _last_line(done.stdout)))
                elif not os.path.isfile(os.path.join(save_dir, "last.ckpt")):
                    report.add(FAIL, item, "exit 0 but no last.ckpt in %s" % save_dir)
                else:
                    report.add(OK, item, "%d steps, %.1f s" % (steps, seconds))


# ---------------------------------------------------------------------------- main

def build_parser():
    summary, _, rest = __doc__.strip().partition("\n\n")
    parser = argparse.ArgumentParser(prog="python -m training_runtime.doctor", description=summary,
                                     epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="skip the training steps")
    parser.add_argument("--steps", type=int, default=2, help="training steps per method and device (default 2)")
    parser.add_argument("--timeout", type=int, default=300,
                        help="seconds allowed to each subprocess (default 300)")
    return parser


def main(argv=None, stream=None):
    """Run the checks; returns the exit status (1 when any line is a FAIL)."""
    args = build_parser().parse_args(argv)
    if args.steps < 1:
        build_parser().error("--steps: expected at least 1, got %d" % args.steps)
    report = Report(stream)
    print("checking %s on %s (%s)" % (os.path.basename(sys.executable), platform.node(), platform.platform()),
          file=report.stream, flush=True)
    check_python(report)
    name, archs, cuda, count = check_mxnet(report)
    usable = check_devices(report, name, archs, cuda, count)
    families = registry.families()  # loads the model packages through their entry points
    report.add(OK if families else FAIL, "task families", ", ".join(
        "%s (%s: %s)" % (f.name, f.script, ", ".join(f.methods)) for f in families.values())
        or "none installed (pip install -e .)")
    check_native(report, args.timeout)
    check_onnx(report)
    check_demo_data(report)
    check_zoo(report, families)
    if args.quick:
        report.add(SKIP, "training steps", "--quick")
    else:
        runs = len(device_kinds(usable)) * sum(len(f.methods) for f in families.values())
        print("training steps: %d run(s) of %d step(s), each its own process (up to %d s)"
              % (runs, args.steps, args.timeout), file=report.stream, flush=True)
        workdir = tempfile.mkdtemp(prefix="doctor-")
        try:
            run_steps(report, families, usable, args.steps, args.timeout, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    failures = sum(1 for status, _, _ in report.lines if status == FAIL)
    print("%s: %d check(s), %d failure(s)" % ("not ready" if failures else "ready", len(report.lines),
                                              failures), file=report.stream, flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
