"""What both ablation harnesses share: resumable training subprocesses, statistics, tables, plots.

Each training is one subprocess of ``train_attr.py`` / ``train_fgvc.py`` (the
repository's own command line, so a result is reproducible by pasting its
command) writing to ``<out>/runs/<name>``; a run whose ``test.json`` exists is
finished and skipped, an interrupted one (``last.ckpt`` without
``test.json``) is continued with ``--resume`` (exact), anything else starts
over with ``--overwrite``. Every command, its wall time and its exit code go
to ``<out>/runs.jsonl``.
"""
import json
import math
import os
import shlex
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_training(script, args, run_dir, log_path, nice=0, echo=print, in_process=False):
    """Run ``script`` (train_attr.py / train_fgvc.py) with ``args`` into ``run_dir``.

    Returns (test report dict, wall seconds or None when skipped). Raises
    RuntimeError naming the run and its log when the training fails.
    ``in_process``: call the script's ``main(argv)`` in this process instead
    (the quick mode: no interpreter / MXNet start-up per run; same argv).
    """
    test_path = os.path.join(run_dir, "test.json")
    if os.path.exists(test_path):
        with open(test_path) as f:
            return json.load(f), None
    if in_process:
        return _run_in_process(script, args, run_dir, log_path, echo)
    command = [sys.executable, os.path.join(REPO, script)] + list(args) + ["--save-dir", run_dir]
    if os.path.exists(os.path.join(run_dir, "last.ckpt")):
        command.append("--resume")
    else:
        command.append("--overwrite")
    if nice:
        command = ["nice", "-n", str(int(nice))] + command
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    os.makedirs(os.path.dirname(run_dir) or ".", exist_ok=True)
    output = run_dir + ".log"
    echo("run %s: %s" % (os.path.basename(run_dir), " ".join(shlex.quote(c) for c in command)))
    start = time.time()
    with open(output, "w") as out:
        code = subprocess.call(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = round(time.time() - start, 1)  # as logged: a rerun reports the same
    with open(log_path, "a") as f:
        f.write(json.dumps(dict(run=os.path.basename(run_dir), command=command, seconds=round(seconds, 1),
                                returncode=code)) + "\n")
    if code != 0 or not os.path.exists(test_path):
        with open(output) as f:
            tail = f.read()[-2000:]
        raise RuntimeError("run %s failed (exit %d), log %s:\n%s" % (run_dir, code, output, tail))
    with open(test_path) as f:
        return json.load(f), seconds


def read_metrics(run_dir):
    """The run's metrics.jsonl as a list of dicts (one per epoch)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def mean_std(values):
    """(mean, sample std with ddof 1; 0 for one value) of a list of floats."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


def fmt(mean, std, digits=4):
    return "%.*f ± %.*f" % (digits, mean, digits, std)


def fmt_values(values, digits=4):
    """'mean ± std' of per-seed values; a single value alone (no spread to show)."""
    if len(values) == 1:
        return "%.*f" % (digits, values[0])
    return fmt(*mean_std(values), digits=digits)


def fmt_paired(p):
    """A ``paired`` result as 'Δ ± std (wins/n, p x)'; one seed: 'Δ (1 seed)'."""
    if p["n"] == 1:
        return "%+.4f (1 seed)" % p["mean"]
    if p["p"] != p["p"]:
        shown = "-"
    else:
        shown = "< 0.01" if p["p"] < 0.005 else "%.2f" % p["p"]
    return "%+.4f ± %.4f (%d/%d, p %s)" % (p["mean"], p["std"], p["wins"], p["n"], shown)


def paired(a, b):
    """Paired comparison of per-seed values ``a`` vs ``b`` (same seeds, same order).

    Returns dict: n, mean and std of the differences a - b, wins (a > b),
    t = mean / (std / sqrt(n)) (nan for n < 2 or zero spread) and its two-sided
    p-value from Student's t with n - 1 degrees of freedom.
    """
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    n = d.size
    mean, std = mean_std(d)
    t = mean / (std / math.sqrt(n)) if n > 1 and std > 0 else float("nan")
    return dict(n=n, mean=mean, std=std, wins=int((d > 0).sum()), t=t, p=_t_pvalue(t, n - 1))


def _t_pvalue(t, dof):
    """Two-sided p-value of Student's t (numeric integration of the density; no scipy needed)."""
    if not np.isfinite(t) or dof < 1:
        return float("nan")
    x = np.linspace(0, abs(t), 20001)
    log_c = math.lgamma((dof + 1) / 2.) - math.lgamma(dof / 2.) - 0.5 * math.log(dof * math.pi)
    density = np.exp(log_c - (dof + 1) / 2. * np.log1p(x ** 2 / dof))
    area = float(np.sum((density[1:] + density[:-1]) / 2 * np.diff(x)))
    return max(0.0, 1.0 - 2 * area)


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line(argv):
    """The harness's own command as a shell line (for the report)."""
    return " ".join(shlex.quote(a) for a in ["python", os.path.relpath(sys.argv[0], REPO)] + list(argv))


def error_bar_plot(path, groups, series, metric_names, title):
    """One panel per metric: for each group (x) one marker per series, mean ± std over seeds,
    the single seeds as faint dots. ``series[name][group][metric]`` = list of per-seed values."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(metric_names), figsize=(4.2 * len(metric_names), 3.6), squeeze=False)
    names = list(series)
    width = 0.8 / max(len(names), 1)
    for ax, metric in zip(axes[0], metric_names):
        for i, name in enumerate(names):
            for g, group in enumerate(groups):
                values = series[name].get(group, {}).get(metric, [])
                if not values:
                    continue
                x = g - 0.4 + width * (i + 0.5)
                mean, std = mean_std(values)
                ax.errorbar([x], [mean], yerr=[std], fmt="o", color="C%d" % i, capsize=3,
                            label=name if g == 0 else None)
                ax.plot([x] * len(values), values, ".", color="C%d" % i, alpha=0.35)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups)
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _run_in_process(script, args, run_dir, log_path, echo):
    import contextlib
    import importlib.util
    import io
    spec = importlib.util.spec_from_file_location("_harness_" + script[:-3], os.path.join(REPO, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = list(args) + ["--save-dir", run_dir]
    argv.append("--resume" if os.path.exists(os.path.join(run_dir, "last.ckpt")) else "--overwrite")
    echo("run %s (in process): %s %s" % (os.path.basename(run_dir), script, " ".join(map(shlex.quote, argv))))
    start = time.time()
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        module.main(argv)
    seconds = round(time.time() - start, 1)  # as logged: a rerun reports the same
    with open(run_dir + ".log", "w") as f:
        f.write(buffer.getvalue())
    with open(log_path, "a") as f:
        f.write(json.dumps(dict(run=os.path.basename(run_dir), command=[script] + argv,
                                seconds=round(seconds, 1), returncode=0, in_process=True)) + "\n")
    with open(os.path.join(run_dir, "test.json")) as f:
        return json.load(f), seconds


def map_jobs(function, items, jobs):
    """[function(item) for item in items] with up to ``jobs`` at a time (threads: each job waits
    on its own training subprocess); results in the order of ``items``; the first error is raised
    after the running jobs end."""
    if jobs <= 1:
        return [function(item) for item in items]
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(function, items))


def harness_main(parse_args, run_all, report, argv=None):
    """The harnesses' command line: parse ``argv``, run (skipping finished runs), write the
    table and plot; returns their paths."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    start = time.time()
    results = run_all(args)
    table, plot = report(args, results, argv, time.time() - start)
    print("wrote %s and %s" % (table, plot))
    return table, plot
