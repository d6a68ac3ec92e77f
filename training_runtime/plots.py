"""Figures of a run (matplotlib, Agg backend). Every function writes one PNG
atomically; :func:`safely` turns any plotting failure into a logged warning
(a figure never fails a run).

- :func:`curves`: ``curves.png``: training loss per logged step (raw and
  smoothed, from steps.jsonl) with the learning rate on a secondary axis, and
  every numeric validation metric per epoch (metrics.jsonl), e.g. S3N's
  per-branch top-1.
- :func:`ap_bars`: per-attribute AP bars sorted by positive rate.
- :func:`pr_curves`: precision–recall curves, one per attribute.
"""
import numpy as np

from . import checkpoint


def _pyplot():
    import matplotlib  # imported on first use: it costs a second at start-up
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    plt = _pyplot()
    try:
        fig.tight_layout()
        with checkpoint.replaced_atomically(path) as tmp:
            fig.savefig(tmp, format="png", dpi=80)
    finally:
        plt.close(fig)


def safely(function, *args, log=print, **kwargs):
    """``function(*args, **kwargs)``; any exception is logged as a warning, never raised."""
    try:
        return function(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - a figure must never fail a run
        log("warning: %s failed: %s: %s" % (getattr(function, "__name__", function),
                                             type(err).__name__, err))
        return None


def smooth(values, weight=0.6):
    """Exponential moving average (TensorBoard's, bias-corrected); values: (T,) -> (T,)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return np.array(out)


def curves(path, epoch_records, step_records):
    """curves.png. epoch_records: metrics.jsonl records (epoch, lr, train_loss, val:
    {name: float}); step_records: steps.jsonl records (step, epoch, loss, lr).
    Returns the validation metrics drawn (every numeric one present)."""
    plt = _pyplot()
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    if step_records:
        steps = [r["step"] for r in step_records]
        loss = np.array([r["loss"] for r in step_records], dtype=float)
        ax_loss.plot(steps, loss, color="tab:blue", alpha=0.35, label="train loss (logged steps)")
        ax_loss.plot(steps, smooth(loss), color="tab:blue", label="train loss (smoothed)")
        ax_loss.set_xlabel("step")
        ax_lr = ax_loss.twinx()
        ax_lr.plot(steps, [r["lr"] for r in step_records], color="tab:orange", ls="--", label="lr")
        ax_lr.set_ylabel("learning rate", color="tab:orange")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    else:  # a run from before steps.jsonl: one point per epoch
        ax_loss.plot([r["epoch"] for r in epoch_records], [r["train_loss"] for r in epoch_records],
                     "o-", label="train loss")
        ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(loc="upper right", fontsize="small")
    ax_loss.set_title("training")
    epochs = [r["epoch"] for r in epoch_records]
    keys = sorted({k for r in epoch_records for k, v in r.get("val", {}).items()
                   if isinstance(v, (int, float))})
    for key in keys:
        ax_metric.plot(epochs, [r["val"].get(key, float("nan")) for r in epoch_records], "o-", label=key)
    ax_metric.set_xlabel("epoch")
    ax_metric.set_title("validation")
    if keys:
        ax_metric.legend(fontsize="small")
    _save(fig, path)
    return keys


def ap_bars(path, names, aps, rates):
    """Per-attribute AP bars, sorted by positive rate (rarest first), rate annotated.
    names: C labels; aps, rates: (C,)."""
    plt = _pyplot()
    aps, rates = np.asarray(aps, float), np.asarray(rates, float)
    order = np.argsort(rates, kind="stable")
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names) + 2), 4))
    x = np.arange(len(names))
    ax.bar(x, aps[order], color="tab:blue")
    for i, k in enumerate(order):
        ax.text(i, np.nan_to_num(min(aps[k], 1.0)) + 0.02, "%.0f%%" % (100 * rates[k]), ha="center", fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels([names[k] for k in order], rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("test AP")
    ax.set_title("test AP per attribute, rarest first\n(positive rate above each bar); mAP %.4f" % np.nanmean(aps))
    _save(fig, path)


def pr_curves(path, names, curves_by_name):
    """Precision–recall curves. curves_by_name: name -> (recall (T,), precision (T,), AP)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5))
    cmap = plt.get_cmap("tab20")
    for i, name in enumerate(names):
        recall, precision, ap = curves_by_name[name]
        ax.step(recall, precision, where="pre", color=cmap(i % 20), lw=1,
                label="%s (AP %.2f)" % (name, ap))
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title("precision-recall per attribute (test)")
    ax.legend(fontsize=6, ncol=2, loc="lower left")
    _save(fig, path)
