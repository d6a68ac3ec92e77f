"""GPU acceptance: run once on a machine with one or two GPUs; writes a report (JSON + text).

Every training run is a subprocess of the real script (``python -m train_attr`` /
``train_fgvc``) on the embedded demo data (Fashion-MNIST) at the demo's sizes, 20 steps
of batch 8, with a time limit (``--timeout``): a hang is a failure, not a stuck job.
The checks (``--checks``, default all; ``--methods``, default every registered method):

parity   each method 20 steps on gpu(0) and the same on cpu(0) (same seed, same batches,
         one device each; ``NVIDIA_TF32_OVERRIDE=0`` so that Ampere+ convolutions are
         float32 as on the CPU). Tolerances: the first step's loss within 1e-3 (relative;
         the same parameters and images through other float32 kernels), the mean loss of the
         20 steps within 2e-2, the parameters after 20 steps within 2e-2 (relative L2 of
         all parameters: rounding differences grow with each step; S3N's peak picks can flip).
test     ``--test RUN`` of the GPU run equals the run's own final test (test.json): every
         number within 1e-6 (the same checkpoint, split and code).
resume   each method on two GPUs for 20 steps, and on two GPUs for 10 steps then
         ``--resume`` on one GPU to step 20, both ``--batchnorm frozen`` (exact across device
         splits; at a tenth of the demo lr and with ``--stable-sigmoid`` where a method has
         it, so that the untrained networks do not diverge without batch statistics): the
         parameters within 1e-4 (relative L2; only the summation order differs) and the
         resumed run at step 20.
amp      each method with ``--amp`` (20 steps on gpu 0): exits 0 with finite losses; every
         stored parameter float32; ``--test RUN`` equals the run's final test (1e-6); the mean
         loss within 5e-2 of the float32 GPU run (float16 network only). Centre loss: the
         centres move as without --amp: ||c_amp - c0|| / ||c_fp32 - c0|| in [0.8, 1.25] and the
         two displacements' cosine >= 0.9 (c0 from a run with --center-lr 0; a centre gradient
         missing the loss scale would be off by 2^16).
sync     each method with ``--gpus 0,1 --batchnorm sync`` (20 steps) exits 0 within the time
         limit, or is refused up front with a one-line error (S3N: its backbone runs three
         times per forward).
speed    samples/s (median of steps 6-20, batch 32 over gpu 0 and 1, TF32 as the GPU's
         default) of the attribute step and of S3N with ``--kvstore device`` and ``local``:
         measured, not judged.

Without GPUs, ``--cpu-stand-in`` runs the parts that need none with cpu(0) / cpu(0), cpu(1)
in place of gpu(0) / gpu(0), gpu(1) (so parity compares the CPU with itself: it checks the
plumbing, not the GPU); amp and sync print "skipped: needs a GPU".

    python scripts/gpu_acceptance.py --gpus 0,1 --out gpu-acceptance
    python scripts/gpu_acceptance.py --cpu-stand-in --methods baseline --checks parity,test
"""
import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time

import numpy as np

from training_runtime import checkpoint, gpus, registry

CHECKS = ("parity", "test", "resume", "amp", "sync", "speed")
PASS, FAIL, SKIP, INFO = "pass", "FAIL", "skip", "info"
#: (name, limit): the stated tolerances (see the module docstring)
TOLERANCE = {"loss_step1": 1e-3, "loss_mean": 2e-2, "params": 2e-2, "test": 1e-6,
             "resume_params": 1e-4, "amp_loss_mean": 5e-2, "centre_ratio": (0.8, 1.25),
             "centre_cosine": 0.9}
BATCH = 8
EPOCH_STEPS = 20  # every run reads 20 batches' worth of images (one epoch); --max-steps stops it
SPEED_BATCH = 32
SPEED_METHODS = ("attention", "s3n")


# ---------------------------------------------------------------------------- comparisons

def relative_l2(a, b):
    """||a - b|| / ||b|| over every array of two dicts with the same keys (float64)."""
    if set(a) != set(b):
        raise ValueError("the parameter names differ: %s" % sorted(set(a) ^ set(b))[:5])
    num = sum(float(np.sum((a[k].astype(np.float64) - b[k].astype(np.float64)) ** 2)) for k in b)
    den = sum(float(np.sum(b[k].astype(np.float64) ** 2)) for k in b)
    return math.sqrt(num) / math.sqrt(den) if den > 0 else math.sqrt(num)


def relative(a, b):
    """|a - b| / |b| (|a - b| when b is 0)."""
    return abs(a - b) / abs(b) if b else abs(a - b)


def numbers(report, prefix=""):
    """{dotted key: float} of every number in a (nested) report dict."""
    found = {}
    for key, value in report.items():
        if isinstance(value, dict):
            found.update(numbers(value, prefix + key + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found[prefix + key] = float(value)
    return found


def largest_report_difference(a, b):
    """(key, |a - b|) of the largest difference between the numbers of report ``a`` (e.g.
    what --test returns) and the same keys of ``b`` (test.json, which adds the epoch); a key
    missing from ``b`` counts as infinite, as does a NaN."""
    na, nb = numbers(a), numbers(b)
    worst = ("", 0.0)
    for key in sorted(na):
        diff = abs(na[key] - nb[key]) if key in nb else math.inf
        if math.isnan(diff):
            diff = math.inf
        if diff > worst[1]:
            worst = (key, diff)
    if not na:
        worst = ("(no numbers)", math.inf)
    return worst


def centre_movement(c_amp, c_fp32, c0):
    """(ratio of the displacement norms amp / float32, cosine of the two displacements)."""
    da, df = (c_amp - c0).ravel().astype(np.float64), (c_fp32 - c0).ravel().astype(np.float64)
    na, nf = np.linalg.norm(da), np.linalg.norm(df)
    if nf == 0 or na == 0:
        return (na / nf if nf else math.inf), 0.0
    return float(na / nf), float(da.dot(df) / (na * nf))


def judge(limits):
    """PASS when every (value, limit) holds (value <= limit; a (low, high) limit: inside)."""
    for value, limit in limits:
        if isinstance(limit, tuple):
            if not limit[0] <= value <= limit[1]:
                return FAIL
        elif not value <= limit:  # NaN fails
            return FAIL
    return PASS


# ---------------------------------------------------------------------------- runs

class Run(object):
    """One subprocess run of a training script: its directory, status and outputs."""

    def __init__(self, directory, returncode, seconds, stderr):
        self.directory, self.returncode, self.seconds, self.stderr = directory, returncode, seconds, stderr

    @property
    def ok(self):
        return self.returncode == 0

    def why(self):
        if self.returncode is None:
            return "no result within the time limit (a hang?)"
        lines = [line for line in self.stderr.strip().splitlines() if line.strip()]
        return "exit %d: %s" % (self.returncode, lines[-1] if lines else "")

    def params(self):
        record, arrays = checkpoint.read(os.path.join(self.directory, checkpoint.LAST))
        return record, {k: v for k, v in arrays.items() if k.startswith("param/")}

    def losses(self):
        with open(os.path.join(self.directory, "steps.jsonl")) as f:
            return [json.loads(line) for line in f if line.strip()]

    def test(self):
        with open(os.path.join(self.directory, "test.json")) as f:
            return json.load(f)


TEST_SNIPPET = ("import importlib, json, sys\n"
                "report = importlib.import_module(sys.argv[1]).main(sys.argv[3:])\n"
                "json.dump(report, open(sys.argv[2], 'w'), default=float)\n")


class Runner(object):
    """Runs the scripts; ``one`` / ``two`` are the device flags of one and two 'GPUs'."""

    def __init__(self, out, timeout, stand_in, gpu_ids, log=print):
        self.out, self.timeout, self.log = out, timeout, log
        self.stand_in = stand_in
        if stand_in:
            self.one, self.two = ["--cpus", "1"], ["--cpus", "2"]
        else:
            self.one, self.two = ["--gpus", gpu_ids[0]], ["--gpus", ",".join(gpu_ids[:2])]
        self.cpu = ["--cpus", "1"]
        # float32 convolutions and products as on the CPU (Ampere+ would use TF32 for them)
        self.env = dict(os.environ, NVIDIA_TF32_OVERRIDE="0")
        self.families = registry.families()

    def family_of(self, method):
        for family in self.families.values():
            if method in family.methods:
                return family
        raise KeyError(method)

    def command(self, method, steps, batch, extra):
        family = self.family_of(method)
        command = [sys.executable, "-m", family.script]
        if len(family.methods) > 1:
            command += ["--method", method]
        return command + [
            "--train-limit", str(EPOCH_STEPS * batch), "--val-limit", "32", "--test-limit", "32",
            "--batch-size", str(batch), "--epochs", "1", "--max-steps", str(steps), "--seed", "1",
            "--picture-images", "0", "--figures", "none", "--num-workers", "0", "--log-every", "1"] + extra

    def _spawn(self, command, name, tf32=False):
        start = time.time()
        shown = command[2:] if command[1] == "-m" else command[3:4] + command[5:]
        self.log("  run %s: %s" % (name, " ".join(shown)))
        try:
            env = dict(self.env) if not tf32 else {k: v for k, v in self.env.items()
                                                    if k != "NVIDIA_TF32_OVERRIDE"}
            done = subprocess.run(command, capture_output=True, text=True, timeout=self.timeout, env=env)
            code, stderr = done.returncode, done.stderr
        except subprocess.TimeoutExpired as stop:
            code, stderr = None, (stop.stderr or b"").decode(errors="replace") if isinstance(
                stop.stderr, bytes) else (stop.stderr or "")
        return code, time.time() - start, stderr

    def train(self, name, method, flags, steps=20, batch=BATCH, extra=(), tf32=False):
        """A training run into OUT/runs/<name> (an earlier one is replaced)."""
        directory = os.path.join(self.out, "runs", name)
        command = self.command(method, steps, batch, list(flags) + list(extra)
                               + ["--save-dir", directory, "--overwrite"])
        code, seconds, stderr = self._spawn(command, name, tf32)
        return Run(directory, code, seconds, stderr)

    def resume(self, run, method, flags, steps):
        command = self.command(method, steps, BATCH, list(flags) + ["--save-dir", run.directory, "--resume"])
        code, seconds, stderr = self._spawn(command, os.path.basename(run.directory) + " --resume")
        return Run(run.directory, code, seconds, stderr)

    def test(self, run, flags):
        """``--test RUN`` in a subprocess; (report dict or None, Run)."""
        family = self.family_of(json.load(open(os.path.join(run.directory, "args.json")))
                                ["config"]["model"]["method"])
        path = os.path.join(run.directory, "retest.json")
        command = [sys.executable, "-c", TEST_SNIPPET, family.script, path, "--test", run.directory] + list(flags)
        code, seconds, stderr = self._spawn(command, os.path.basename(run.directory) + " --test")
        result = Run(run.directory, code, seconds, stderr)
        return (json.load(open(path)) if code == 0 else None), result


# ---------------------------------------------------------------------------- checks

class Report(object):
    """The checks' results: a JSON list and a text table (written atomically)."""

    def __init__(self, environment, log=print):
        self.environment, self.results, self.log = environment, [], log

    def add(self, check, method, status, detail, measured=None, seconds=None):
        entry = {"check": check, "method": method, "status": status, "detail": detail,
                 "measured": measured or {}, "seconds": None if seconds is None else round(seconds, 1)}
        self.results.append(entry)
        self.log("%-4s  %-7s %-11s %s" % (status, check, method, detail))
        return entry

    @property
    def failures(self):
        return [r for r in self.results if r["status"] == FAIL]

    def text(self):
        lines = ["GPU acceptance report, %s" % self.environment["time"]]
        lines += ["  %s: %s" % (k, v) for k, v in sorted(self.environment.items()) if k != "time"]
        lines.append("")
        for r in self.results:
            lines.append("%-4s  %-7s %-11s %s" % (r["status"], r["check"], r["method"], r["detail"]))
        lines.append("")
        lines.append("%d check(s): %d passed, %d failed, %d skipped" % (
            len(self.results), sum(r["status"] == PASS for r in self.results), len(self.failures),
            sum(r["status"] == SKIP for r in self.results)))
        return "\n".join(lines) + "\n"

    def write(self, directory):
        """acceptance.json and acceptance.txt in ``directory`` (temporary name, then rename)."""
        os.makedirs(directory, exist_ok=True)
        payload = {"environment": self.environment, "tolerance": TOLERANCE, "results": self.results}
        for name, text in (("acceptance.json", json.dumps(payload, indent=1, default=str) + "\n"),
                           ("acceptance.txt", self.text())):
            path = os.path.join(directory, name)
            with checkpoint.replaced_atomically(path) as tmp:
                with open(tmp, "w") as f:
                    f.write(text)
        return [os.path.join(directory, n) for n in ("acceptance.json", "acceptance.txt")]


def mean_loss(run):
    return float(np.mean([r["loss"] for r in run.losses()]))


def check_parity(runner, report, method, gpu_runs):
    g = runner.train("%s-gpu" % method, method, runner.one)
    c = runner.train("%s-cpu" % method, method, runner.cpu)
    if not (g.ok and c.ok):
        return report.add("parity", method, FAIL, (g if not g.ok else c).why())
    gpu_runs[method] = g
    lg, lc = g.losses(), c.losses()
    measured = {"loss_step1": relative(lg[0]["loss"], lc[0]["loss"]),
                "loss_mean": relative(mean_loss(g), mean_loss(c)),
                "params": relative_l2(g.params()[1], c.params()[1])}
    status = judge([(measured[k], TOLERANCE[k]) for k in measured])
    return report.add("parity", method, status, ", ".join(
        "%s %.2e (<= %g)" % (k, measured[k], TOLERANCE[k]) for k in measured), measured, g.seconds + c.seconds)


def check_test(runner, report, method, gpu_runs, name="test", run=None):
    run = run or gpu_runs.get(method)
    if run is None:
        return report.add(name, method, SKIP, "skipped: no GPU run (its parity run failed or was not asked)")
    retest, done = runner.test(run, runner.one)
    if retest is None:
        return report.add(name, method, FAIL, "--test: " + done.why())
    key, diff = largest_report_difference(retest, run.test())
    return report.add(name, method, judge([(diff, TOLERANCE["test"])]),
                      "--test RUN vs the run's final test: largest difference %.2e (%s; <= %g)"
                      % (diff, key or "-", TOLERANCE["test"]), {"difference": diff, "key": key}, done.seconds)


def frozen_flags(runner, method):
    """``--batchnorm frozen`` at a tenth of the method's demo lr: from-scratch networks with
    BatchNorm frozen at its initial statistics diverge at the demo's lr (the attribute model,
    MC-Loss); and ``--stable-sigmoid`` where a method has it (the attribute model's original
    sigmoid gives log(0) on the large logits such a network makes)."""
    entry = runner.family_of(method).methods.get(method)
    flags = ["--batchnorm", "frozen", "--lr", "%g" % (entry.demo.get("lr", entry.recipe.get("lr", 0.01)) / 10.0)]
    return flags + (["--stable-sigmoid"] if any(k.name == "stable_sigmoid" for k in entry.knobs) else [])


def check_resume(runner, report, method):
    flags = frozen_flags(runner, method)
    whole = runner.train("%s-two" % method, method, runner.two + flags)
    part = runner.train("%s-two-resumed" % method, method, runner.two + flags, steps=10)
    if not (whole.ok and part.ok):
        return report.add("resume", method, FAIL, (whole if not whole.ok else part).why())
    resumed = runner.resume(part, method, runner.one + flags, steps=20)
    if not resumed.ok:
        return report.add("resume", method, FAIL, "--resume on one device: " + resumed.why())
    record, params = resumed.params()
    diff = relative_l2(params, whole.params()[1])
    step = record["progress"]["step"]
    status = judge([(diff, TOLERANCE["resume_params"])]) if step == 20 else FAIL
    return report.add("resume", method, status, "two devices 10 steps + one device to step %d vs two "
                      "devices 20 steps: parameters %.2e (<= %g)" % (step, diff, TOLERANCE["resume_params"]),
                      {"params": diff, "step": step}, whole.seconds + part.seconds + resumed.seconds)


def centres(params):
    found = [v for k, v in params.items() if k.endswith("centers")]
    if len(found) != 1:
        raise ValueError("expected one '...centers' parameter, found %d" % len(found))
    return found[0]


def check_amp(runner, report, method, gpu_runs):
    if runner.stand_in:
        return report.add("amp", method, SKIP, "skipped: needs a GPU (float16 kernels)")
    a = runner.train("%s-amp" % method, method, runner.one + ["--amp"])
    if not a.ok:
        return report.add("amp", method, FAIL, a.why())
    _, params = a.params()
    losses = [r["loss"] for r in a.losses()]
    measured = {"float32": all(v.dtype == np.float32 for v in params.values()),
                "finite": bool(np.all(np.isfinite(losses)))}
    retest, done = runner.test(a, runner.one)
    measured["test"] = largest_report_difference(retest, a.test())[1] if retest else math.inf
    limits = [(0 if measured["float32"] and measured["finite"] else 1, 0), (measured["test"], TOLERANCE["test"])]
    fp32 = gpu_runs.get(method)
    if fp32 is not None:
        measured["loss_mean"] = relative(mean_loss(a), mean_loss(fp32))
        limits.append((measured["loss_mean"], TOLERANCE["amp_loss_mean"]))
        if method == "centerloss":
            still = runner.train("%s-c0" % method, method, runner.one, steps=1, extra=["--center-lr", "0"])
            if still.ok:
                ratio, cosine = centre_movement(centres(params), centres(fp32.params()[1]),
                                                centres(still.params()[1]))
                measured.update(centre_ratio=ratio, centre_cosine=cosine)
                limits += [(ratio, TOLERANCE["centre_ratio"]), (-cosine, -TOLERANCE["centre_cosine"])]
            else:
                limits.append((math.inf, 0))
    detail = ", ".join("%s %s" % (k, ("%.3g" % v) if isinstance(v, float) else v) for k, v in measured.items())
    return report.add("amp", method, judge(limits), detail, measured, a.seconds + done.seconds)


def check_sync(runner, report, method):
    if runner.stand_in:
        return report.add("sync", method, SKIP, "skipped: needs a GPU (SyncBatchNorm deadlocks on CPU contexts)")
    run = runner.train("%s-sync" % method, method, runner.two + ["--batchnorm", "sync"])
    if run.ok:
        return report.add("sync", method, PASS, "20 steps in %.0f s" % run.seconds, seconds=run.seconds)
    if run.returncode == 2 and "--batchnorm sync" in run.stderr:
        return report.add("sync", method, PASS, "refused up front: " + run.why(), seconds=run.seconds)
    return report.add("sync", method, FAIL, run.why(), seconds=run.seconds)


def check_speed(runner, report, method):
    measured = {}
    for kvstore in ("device", "local"):
        run = runner.train("%s-speed-%s" % (method, kvstore), method, runner.two + ["--kvstore", kvstore],
                           steps=20, batch=SPEED_BATCH, tf32=True)
        if not run.ok:
            return report.add("speed", method, FAIL, "--kvstore %s: %s" % (kvstore, run.why()))
        rates = [r["samples_per_sec"] for r in run.losses() if r["step"] > 5]
        measured[kvstore] = float(np.median(rates))
    return report.add("speed", method, INFO, "samples/s (batch %d over %s): kvstore device %.1f, local %.1f"
                      % (SPEED_BATCH, " ".join(runner.two), measured["device"], measured["local"]), measured)


def environment(args):
    import mxnet as mx
    name, version, cuda = gpus.installed_build()
    devices = gpus.query_devices()
    return {"time": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
            "python": platform.python_version(), "numpy": np.__version__,
            "mxnet": "%s (%s %s, CUDA %s)" % (mx.__version__, name, version, "on" if cuda else "off"),
            "gpus": ["%d: %s, %s, %d MB" % (d["index"], d["name"], gpus.sm(d["capability"]), d["memory_mb"])
                     for d in devices],
            "mode": "cpu stand-in (no GPU measured)" if args.cpu_stand_in else "--gpus %s" % args.gpus,
            "command": " ".join(sys.argv)}


def build_parser():
    summary, _, rest = __doc__.strip().partition("\n\n")
    parser = argparse.ArgumentParser(prog="scripts/gpu_acceptance.py", description=summary, epilog=rest,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", default="0,1", help="two GPU ids (default 0,1); one id: the two-GPU "
                        "checks (resume, sync, speed) are skipped")
    parser.add_argument("--cpu-stand-in", action="store_true",
                        help="no GPU: cpu(0) / cpu(0),cpu(1) in place of the GPUs; amp and sync skipped")
    parser.add_argument("--checks", default=",".join(CHECKS), help="comma-separated subset of " + ", ".join(CHECKS))
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: every registered one)")
    parser.add_argument("--out", default=None, help="report directory (default gpu-acceptance-<time>)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds allowed to each run (default 300)")
    return parser


def main(argv=None, log=print):
    """Run the checks; returns 0 when none failed, 1 otherwise (2: bad arguments)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        parser.error("--checks: expected some of %s, got %s" % (", ".join(CHECKS), ", ".join(unknown)))
    families = registry.families()
    methods_known = [m for f in families.values() for m in f.methods]
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else methods_known
    unknown = [m for m in methods if m not in methods_known]
    if unknown:
        parser.error("--methods: expected some of %s, got %s" % (", ".join(methods_known), ", ".join(unknown)))
    gpu_ids = [g.strip() for g in args.gpus.split(",") if g.strip()]
    if not args.cpu_stand_in:
        import mxnet as mx
        if not gpu_ids or mx.context.num_gpus() < 1:
            parser.error("--gpus: MXNet sees no GPU here (%s); use --cpu-stand-in to run the parts "
                         "that need none" % ("a CPU build" if not gpus.installed_build()[2] else "0 GPUs"))
    out = args.out or "gpu-acceptance-%s" % datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    runner = Runner(out, args.timeout, args.cpu_stand_in, gpu_ids, log=log)
    report = Report(environment(args), log=log)
    two = args.cpu_stand_in or len(gpu_ids) >= 2
    gpu_runs = {}
    start = time.time()
    for method in methods:
        log("%s:" % method)
        if "parity" in checks:
            check_parity(runner, report, method, gpu_runs)
        if "test" in checks:
            check_test(runner, report, method, gpu_runs)
        if "amp" in checks:
            check_amp(runner, report, method, gpu_runs)
        for name, check in (("resume", check_resume), ("sync", check_sync)):
            if name in checks:
                if two:
                    check(runner, report, method)
                else:
                    report.add(name, method, SKIP, "skipped: needs two GPUs (--gpus 0,1)")
        if "speed" in checks and method in SPEED_METHODS:
            if two:
                check_speed(runner, report, method)
            else:
                report.add("speed", method, SKIP, "skipped: needs two GPUs (--gpus 0,1)")
    report.environment["seconds"] = round(time.time() - start, 1)
    paths = report.write(out)
    log("%d failure(s); report: %s" % (len(report.failures), ", ".join(paths)))
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
