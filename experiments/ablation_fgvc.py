"""Ablation of the fine-grained methods on the demo data: each method against its baseline.

    python experiments/ablation_fgvc.py                     # all methods, scratch (+ fine-tuned where
                                                            # ImageNet weights are available)
    python experiments/ablation_fgvc.py --methods mcloss centerloss --seeds 0 1 2
    python experiments/ablation_fgvc.py --quick             # tiny runs (a smoke check of the harness)

Each comparison keeps the network and the data and switches the method's
contribution off:

- ``mcloss``: MC-Loss (alpha 1.5, beta 20) vs the same network with plain
  cross entropy (``--alpha 0 --beta 0``);
- ``s3n``: S3N vs ``--method baseline`` (same backbone, input size, smoothing);
- ``centerloss``: center loss (lambda 1) vs the same LeNet++ with softmax only
  (``--center-weight 0``); for both, the compactness of the test features
  (mean distance of a feature to its class center over the mean distance
  between class centers, lower = more compact) is computed from the best
  checkpoint and drawn as a figure of the 2-D features.

Modes: ``scratch`` (``--no-pretrained``) and ``finetune`` (``--pretrained``:
ImageNet weights of the model-zoo backbone; needs them in ~/.mxnet/models or
a download; a run that cannot load them is reported as not run). Only S3N
and its baseline use model-zoo backbones; this port's MC-Loss networks (their
c·xi-channel layers) and LeNet++ have no ImageNet weights, so they run from
scratch only (MC-Loss upstream: VGG16 from scratch).

Runs live in ``<out>/runs/<method>-<mode>-<arm>-s<seed>`` (finished ones are
skipped); ``<out>/ablation_fgvc.md``, ``ablation_fgvc.png``,
``centerloss_features.png`` and ``summary.json`` are the report.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # noqa: E402

#: method -> (its arm's extra flags, the baseline arm's (flags)), same data and network
ARMS = {
    "mcloss": (["--method", "mcloss"], ["--method", "mcloss", "--alpha", "0", "--beta", "0"]),
    "s3n": (["--method", "s3n"], ["--method", "baseline", "--image-size", "48", "--train-limit", "1000",
                                  "--val-limit", "500"]),
    "centerloss": (["--method", "centerloss"], ["--method", "centerloss", "--center-weight", "0"]),
}
BASELINE_NAME = {"mcloss": "CE only", "s3n": "baseline", "centerloss": "softmax only"}
#: model-zoo backbones with ImageNet weights (this port's MC-Loss networks and LeNet++ have none)
FINETUNABLE = ("s3n",)

FULL = dict(seeds=[0, 1, 2], epochs=None, train_limit=None, val_limit=None, test_limit=None)
QUICK = dict(seeds=[0, 1], epochs=1, train_limit=64, val_limit=32, test_limit=64)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--methods", nargs="+", choices=sorted(ARMS), default=sorted(ARMS))
    parser.add_argument("--modes", nargs="+", choices=("scratch", "finetune"), default=["scratch", "finetune"])
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    for key in ("epochs", "train_limit", "val_limit", "test_limit"):
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=None,
                            help="default: the method's demo value")
    parser.add_argument("--nice", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--report-only", action="store_true", help="tables from the finished runs only")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = os.path.join(common.REPO, "results", "ablation_fgvc_quick" if args.quick else "ablation_fgvc")
    return args


def train_args(args, method, mode, arm, seed):
    flags = list(ARMS[method][0 if arm == "method" else 1]) + ["--seed", str(seed)]
    flags.append("--pretrained" if mode == "finetune" else "--no-pretrained")
    for key in ("epochs", "train_limit", "val_limit", "test_limit"):
        value = getattr(args, key)
        if value is not None:
            flag = "--" + key.replace("_", "-")
            if flag in flags:               # the arm's own value (e.g. S3N's demo sizes) is replaced
                i = flags.index(flag)
                del flags[i:i + 2]
            flags += [flag, str(value)]
    return flags


def features_of(run_dir, limit):
    """(features N×D, labels (N,)) of the test split from the run's best checkpoint (center loss net)."""
    from fgvc_gluon.family import FAMILY
    from training_runtime import app, cli
    from training_runtime import config as run_config
    parser = app.build_parser(FAMILY, "")
    args = parser.parse_args(["--test", run_dir] + (["--test-limit", str(limit)] if limit else []))
    given = run_config.given_values(args, FAMILY)
    task, config, _, _, _ = app._inference_task(FAMILY, args, given, "--test", "test")
    test_set = app.load_split(FAMILY, config, config.data.test_split, config.data.test_limit, "--test-split")
    data = test_set.transform_first(task.transform(False))
    import mxnet as mx
    loader = mx.gluon.data.DataLoader(data, batch_size=256, shuffle=False)
    ctx = cli.contexts(config.runtime)[0]
    features, labels = [], []
    for x, y in loader:
        features.append(task.net(x.as_in_context(ctx))[0].asnumpy())
        labels.append(y.asnumpy())
    return np.concatenate(features), np.concatenate(labels).astype(int)


def compactness(features, labels):
    """mean ||x - c_y|| over the samples / mean ||c_i - c_j|| over the pairs of class centers."""
    classes = np.unique(labels)
    centers = np.stack([features[labels == c].mean(axis=0) for c in classes])
    intra = np.mean(np.linalg.norm(features - centers[np.searchsorted(classes, labels)], axis=1))
    pairs = [np.linalg.norm(centers[i] - centers[j]) for i in range(len(classes))
             for j in range(i + 1, len(classes))]
    return float(intra / np.mean(pairs))


def run_all(args, echo=print):
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    log = os.path.join(args.out, "runs.jsonl")
    jobs = []
    for seed in args.seeds:
        for method in args.methods:
            for mode in args.modes:
                if mode == "finetune" and method not in FINETUNABLE:
                    continue
                if args.report_only and not all(os.path.exists(os.path.join(
                        args.out, "runs", "%s-%s-%s-s%d" % (method, mode, arm, seed), "test.json"))
                        for arm in ("method", "baseline")):
                    continue
                for arm in ("method", "baseline"):
                    jobs.append((method, mode, arm, seed,
                                 os.path.join(args.out, "runs", "%s-%s-%s-s%d" % (method, mode, arm, seed))))

    def one(job):
        method, mode, arm, seed, run_dir = job
        try:
            report, seconds = common.run_training("train_fgvc.py", train_args(args, method, mode, arm, seed),
                                                  run_dir, log, nice=args.nice, echo=echo,
                                                  in_process=args.quick)
        except Exception as err:  # noqa: BLE001 (a subprocess failure or, in process, its UserError)
            if mode == "finetune":       # typically: no ImageNet weights on this machine
                return None, str(err).splitlines()[-1][:200]
            raise
        value = {"top1": report.get("top1", report.get("accuracy"))}
        if method == "centerloss":
            value["compactness"] = compactness(*features_of(run_dir, args.test_limit))
        return value, seconds

    results = {}
    for (method, mode, arm, seed, run_dir), (value, info) in zip(jobs, common.map_jobs(one, jobs, 1 if args.quick
                                                                                       else args.jobs)):
        results.setdefault(method, {}).setdefault(mode, {}).setdefault(arm, [])
        results[method][mode][arm].append((seed, value, info))
    return results


def report(args, results, argv, wall):
    lines = ["# Fine-grained methods vs their baselines on the demo data", "",
             "Command: `%s`" % common.command_line(argv), "",
             "Demo settings of each method (`python train_fgvc.py --help`) unless overridden: epochs %s, "
             "training images %s, test images %s. Test top-1 of the best-validation checkpoint." % (
                 args.epochs or "demo", args.train_limit or "demo", args.test_limit or "demo"), "",
             "Wall time of this invocation: %.1f min." % (wall / 60.), ""]
    rows, pair_rows, summary = [], [], {}
    for method, modes in results.items():
        for mode, arms in modes.items():
            done = {arm: [(s, v) for s, v, _ in runs if v is not None] for arm, runs in arms.items()}
            failed = [info for runs in arms.values() for _, v, info in runs if v is None]
            if failed:
                rows.append([method, mode, "not run: %s" % failed[0], "", ""])
                continue
            cells = []
            for arm in ("method", "baseline"):
                top1 = [v["top1"] for _, v in done[arm]]
                cell = common.fmt_values(top1)
                if method == "centerloss":
                    cell += " (compactness %s)" % common.fmt_values([v["compactness"] for _, v in done[arm]],
                                                                    digits=3)
                cells.append(cell)
                summary.setdefault(method, {}).setdefault(mode, {})[arm] = dict(
                    seeds=[s for s, _ in done[arm]], top1=top1,
                    compactness=[v.get("compactness") for _, v in done[arm]])
            rows.append([method, mode, len(done["method"])] + cells)
            a, b = dict(done["method"]), dict(done["baseline"])
            seeds = sorted(set(a) & set(b))
            p = common.paired([a[s]["top1"] for s in seeds], [b[s]["top1"] for s in seeds])
            pair_rows.append(["%s vs %s (%s)" % (method, BASELINE_NAME[method], mode),
                              common.fmt_paired(p)])
            if method == "centerloss":   # compactness: lower is tighter, so a win is a negative difference
                c = common.paired([a[s]["compactness"] for s in seeds], [b[s]["compactness"] for s in seeds])
                pair_rows.append(["%s vs %s (%s): compactness (wins = seeds where it is higher)"
                                  % (method, BASELINE_NAME[method], mode), common.fmt_paired(c)])
    lines += [common.markdown_table(["method", "mode", "n seeds", "method top-1", "baseline top-1"], rows), "",
              "Paired per-seed differences (method − baseline) of top-1, and for center loss of the "
              "compactness (lower = tighter); wins/n; two-sided paired t-test:", "",
              common.markdown_table(["comparison", "Δ"], pair_rows), ""]
    if "centerloss" in summary:
        lines += ["Compactness = mean distance of a test feature to its class center / mean distance between "
                  "class centers (lower: tighter classes); figure `centerloss_features.png`.", ""]
    table = os.path.join(args.out, "ablation_fgvc.md")
    with open(table, "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    series = {}
    for method, modes in summary.items():
        for mode, arms in modes.items():
            for arm, values in arms.items():
                series.setdefault(arm, {})["%s\n%s" % (method, mode)] = {"top1": values["top1"]}
    groups = sorted(set(g for s in series.values() for g in s))
    plot = os.path.join(args.out, "ablation_fgvc.png")
    common.error_bar_plot(plot, groups, series, ["top1"], "FGVC methods vs baselines (demo data, mean ± std)")
    if "centerloss" in summary:
        features_figure(args, os.path.join(args.out, "centerloss_features.png"))
    return table, plot


def features_figure(args, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    seed = args.seeds[0]
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    for ax, arm, title in zip(axes, ("method", "baseline"), ("center loss (lambda 1)", "softmax only")):
        run_dir = os.path.join(args.out, "runs", "centerloss-scratch-%s-s%d" % (arm, seed))
        features, labels = features_of(run_dir, args.test_limit)
        if features.shape[1] != 2:
            features = features[:, :2]
        for c in np.unique(labels):
            ax.plot(features[labels == c, 0], features[labels == c, 1], ".", ms=2, label=str(c))
        ax.set_title("%s: compactness %.3f" % (title, compactness(features, labels)), fontsize=9)
    axes[1].legend(fontsize=6, markerscale=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    return common.harness_main(parse_args, run_all, report, argv)


if __name__ == "__main__":
    main()
