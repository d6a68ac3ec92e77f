"""Ablation of the attribute model's losses on the demo data, over seeds and two imbalances.

    python experiments/ablation_attr.py                  # the full ablation (README "Results")
    python experiments/ablation_attr.py --quick          # CI: tiny runs, same table and plot
    python experiments/ablation_attr.py --seeds 0 1 2 3  # more seeds: finished runs are reused

Variants (``train_attr.py --loss``): ``original`` (plain sigmoid BCE on
every branch, what the original script ran), ``paper`` (weighted focal main
loss + history-weighted attention losses, as published), ``focal`` (the
focal/class weighting alone) and ``history`` (the history weighting alone).
Imbalances: ``natural`` (dataset ``fashion-mnist``: the six rarest
attributes at 10 %) and ``rare`` (``fashion-mnist-rare``: the training split
keeps those six at 1-3 %; validation and test keep natural rates).

Each (imbalance, variant, seed) is one ``train_attr.py`` run in
``<out>/runs/<imbalance>-<variant>-s<seed>``; finished runs are skipped, so an
interrupted ablation continues where it stopped. Runs go seed by seed, so a
partial ablation has the same seeds for every variant. Writes
``<out>/ablation_attr.md`` (mean ± std over seeds of test mAP, mA, the mean AP
of the six rare attributes and the AP of the rarest, legwear; paired per-seed
differences; the per-seed values), ``<out>/ablation_attr.png`` and
``<out>/summary.json``.

The history schedule is scaled to the short runs with ``--history-start`` and
``--history-weight-epoch`` (the original's 2 and 5 are for 250 epochs).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # noqa: E402
from imbalanced_attr import fashion_attributes  # noqa: E402

VARIANTS = ("original", "paper", "focal", "history")
DATASETS = {"natural": "fashion-mnist", "rare": "fashion-mnist-rare"}
NAMES = fashion_attributes.ATTRIBUTE_NAMES
RARE = tuple(fashion_attributes.RARE_RATES)          # the six single-class attributes
RAREST = min(RARE, key=lambda n: fashion_attributes.RARE_RATES[n])   # legwear (1 % in 'rare')
METRICS = ("mAP", "mA", "rare AP", "AP " + RAREST)

FULL = dict(seeds=[0, 1, 2], epochs=4, train_limit=600, val_limit=300, test_limit=1000, batch_size=32,
            lr=0.005, history_start=0, history_weight_epoch=2, picture_images=None)
#: CI smoke run (tests/test_ablation.py): 2 variants x 2 seeds (the least that gives a mean ± std and a
#: paired difference), one epoch with the history weighting on from epoch 0, no pictures
QUICK = dict(seeds=[0, 1], epochs=1, train_limit=100, val_limit=24, test_limit=48, batch_size=25,
             lr=0.005, history_start=0, history_weight_epoch=0, variants=["original", "paper"],
             picture_images=0)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="results directory (default results/ablation_attr, "
                        "results/ablation_attr_quick with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny runs in-process (CI, < 1 minute)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=None)
    parser.add_argument("--imbalance", nargs="+", choices=sorted(DATASETS), default=["natural", "rare"])
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    for key in ("epochs", "train_limit", "val_limit", "test_limit", "batch_size", "history_start",
                "history_weight_epoch"):
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=None)
    parser.add_argument("--picture-images", type=int, default=None,
                        help="train_attr.py --picture-images (default: not passed, the method's own; "
                        "--quick: 0, no pictures)")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--nice", type=int, default=10, help="niceness of the training subprocesses")
    parser.add_argument("--jobs", type=int, default=2, help="training subprocesses at a time (in seed "
                        "order, so a partial ablation has the same seeds for every variant)")
    parser.add_argument("--report-only", action="store_true", help="tables from the finished runs only")
    args = parser.parse_args(argv)
    preset = dict(QUICK if args.quick else FULL)
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.variants is None:
        args.variants = list(VARIANTS)
    if args.out is None:
        args.out = os.path.join(common.REPO, "results", "ablation_attr_quick" if args.quick else "ablation_attr")
    if args.history_weight_epoch >= args.epochs:
        parser.error("--history-weight-epoch %d: expected < --epochs %d (else the history never weights)"
                     % (args.history_weight_epoch, args.epochs))
    return args


def train_args(args, imbalance, variant, seed):
    return ["--dataset", DATASETS[imbalance], "--loss", variant, "--seed", str(seed),
            "--epochs", str(args.epochs), "--train-limit", str(args.train_limit),
            "--val-limit", str(args.val_limit), "--test-limit", str(args.test_limit),
            "--batch-size", str(args.batch_size), "--lr", str(args.lr),
            "--history-start", str(args.history_start),
            "--history-weight-epoch", str(args.history_weight_epoch)] + (
        [] if args.picture_images is None else ["--picture-images", str(args.picture_images)])


def metrics_of(report):
    aps = dict(zip(NAMES, report["APs"]))
    return {"mAP": report["mAP"], "mA": report["mA"],
            "rare AP": sum(aps[n] for n in RARE) / len(RARE), "AP " + RAREST: aps[RAREST]}


def run_all(args, echo=print):
    """results[imbalance][variant] = list of (seed, metrics dict, seconds)."""
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    log = os.path.join(args.out, "runs.jsonl")
    results = {imb: {v: [] for v in args.variants} for imb in args.imbalance}
    jobs = []
    for seed in args.seeds:
        for imbalance in args.imbalance:
            for variant in args.variants:
                run_dir = os.path.join(args.out, "runs", "%s-%s-s%d" % (imbalance, variant, seed))
                if args.report_only and not os.path.exists(os.path.join(run_dir, "test.json")):
                    continue
                jobs.append((seed, imbalance, variant, run_dir))

    def one(job):
        seed, imbalance, variant, run_dir = job
        report, seconds = common.run_training(
            "train_attr.py", train_args(args, imbalance, variant, seed), run_dir, log,
            nice=args.nice, echo=echo, in_process=args.quick)
        if seconds is None:
            seconds = _logged_seconds(log, os.path.basename(run_dir))
        return metrics_of(report), seconds

    for (seed, imbalance, variant, _), (values, seconds) in zip(
            jobs, common.map_jobs(one, jobs, 1 if args.quick else args.jobs)):
        results[imbalance][variant].append((seed, values, seconds))
    return results


def _logged_seconds(log, run):
    seconds = None
    if os.path.exists(log):
        with open(log) as f:
            for line in f:
                entry = json.loads(line)
                if entry["run"] == run and entry["returncode"] == 0:
                    seconds = entry["seconds"]
    return seconds


def comparisons(variants):
    pairs = [(v, "original") for v in variants if v != "original" and "original" in variants]
    pairs += [("paper", v) for v in ("focal", "history") if v in variants and "paper" in variants]
    return pairs


def report(args, results, argv, wall):
    lines = ["# Attribute-loss ablation on the demo data", "",
             "Command: `%s`" % common.command_line(argv), "",
             "Setting: resnet18_v1 at 32×32 from scratch, %d training / %d validation / %d test images, "
             "%d epochs, batch %d, lr %g, history recorded from epoch %d and weighting from epoch %d "
             "(0-based); test metrics of the best-validation-mAP checkpoint. `rare AP` = mean AP of %s "
             "(10 %% of training labels each at natural imbalance, 1-3 %% at `rare`); `AP %s` = the rarest "
             "(1 %% at `rare`)." % (args.train_limit, args.val_limit, args.test_limit, args.epochs,
                                     args.batch_size, args.lr, args.history_start, args.history_weight_epoch,
                                     ", ".join(RARE), RAREST), ""]
    seconds = [s for imb in results.values() for runs in imb.values() for _, _, s in runs if s]
    lines.append("Machine time: %d runs, %.1f min of training subprocesses in total (%.0f s per run on "
                 "average); this invocation took %.1f min." % (len(seconds), sum(seconds) / 60.,
                                                               sum(seconds) / max(len(seconds), 1), wall / 60.))
    lines.append("")
    summary = {}
    for imbalance, by_variant in results.items():
        lines += ["## Imbalance: %s (`--dataset %s`)" % (imbalance, DATASETS[imbalance]), ""]
        rows = []
        for variant, runs in by_variant.items():
            values = {m: [r[1][m] for r in runs] for m in METRICS}
            summary.setdefault(imbalance, {})[variant] = dict(seeds=[r[0] for r in runs], **values)
            rows.append(["`%s`" % variant, len(runs)] + [common.fmt_values(values[m]) if runs else "-"
                                                       for m in METRICS])
        lines += [common.markdown_table(["variant", "n seeds"] + list(METRICS), rows), ""]
        pair_rows = []
        for a, b in comparisons(list(by_variant)):
            ra, rb = dict((r[0], r[1]) for r in by_variant[a]), dict((r[0], r[1]) for r in by_variant[b])
            seeds = sorted(set(ra) & set(rb))
            if len(seeds) < 1:
                continue
            cells = []
            for m in METRICS:
                cells.append(common.fmt_paired(common.paired([ra[s][m] for s in seeds],
                                                             [rb[s][m] for s in seeds])))
            pair_rows.append(["`%s` − `%s`" % (a, b)] + cells)
        if pair_rows:
            lines += ["Paired per-seed differences (mean ± std of the differences; wins = seeds where the "
                      "first is higher; p = two-sided paired t-test):", "",
                      common.markdown_table(["comparison"] + ["Δ " + m for m in METRICS], pair_rows), ""]
        seed_rows = []
        for variant, runs in by_variant.items():
            for seed, values, secs in runs:
                seed_rows.append(["`%s`" % variant, seed] + ["%.4f" % values[m] for m in METRICS]
                                 + ["%.0f" % secs if secs else "-"])
        lines += ["<details><summary>per-seed values</summary>", "",
                  common.markdown_table(["variant", "seed"] + list(METRICS) + ["seconds"], seed_rows), "",
                  "</details>", ""]
    os.makedirs(args.out, exist_ok=True)
    table = os.path.join(args.out, "ablation_attr.md")
    with open(table, "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    series = {v: {imb: {m: summary[imb][v][m] for m in METRICS} for imb in summary if v in summary[imb]}
              for v in args.variants}
    plot = os.path.join(args.out, "ablation_attr.png")
    common.error_bar_plot(plot, list(results), series, METRICS,
                          "attribute losses on the demo data: test metrics, mean ± std over seeds")
    return table, plot


def main(argv=None):
    return common.harness_main(parse_args, run_all, report, argv)


if __name__ == "__main__":
    main()
