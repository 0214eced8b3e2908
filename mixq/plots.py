"""PNG plots of a run: per-layer bit widths (slices as min..max ranges) and accuracy and size
against the budget over training. matplotlib runs headless (Agg)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .config import UNITS  # noqa: E402


def plot_bits(layers: list[dict], path) -> None:
    """Bit widths per layer: weights and activations, a bar from min to max slice, mean dot."""
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 0.45 * len(layers) + 2), 6), sharex=True)
    names = [row["fqn"] for row in layers]
    for ax, kind, color in ((axes[0], "weight", "tab:blue"), (axes[1], "act", "tab:orange")):
        for i, row in enumerate(layers):
            if not row[f"{kind}_elements"]:
                continue
            lo, mean, hi = row[f"{kind}_bits_min"], row[f"{kind}_bits_mean"], row[f"{kind}_bits_max"]
            ax.bar(i, hi - lo + 0.15, bottom=lo - 0.075, color=color, alpha=0.35, width=0.7)
            ax.plot(i, mean, "o", color=color, ms=4)
        ax.set_ylabel(f"{'weight' if kind == 'weight' else 'activation'} bits")
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylim(0, 9)
    axes[0].set_title("bits per layer (bar: slice min..max, dot: mean)", fontsize=9)
    axes[1].set_xticks(range(len(names)), names, rotation=70, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training(log: list[dict], budgets: dict, unit: str, path) -> None:
    """Validation accuracy, and each constrained size against its budget, over training steps."""
    evals = [r for r in log if r.get("eval")]
    offsets, x = {}, []
    total = 0
    for r in log:  # cumulative step across stages
        stage = r.get("stage", 0)
        if stage not in offsets:
            offsets[stage] = total
        total = max(total, offsets[stage] + r.get("step", 0))
    for r in evals:
        x.append(offsets[r.get("stage", 0)] + r["step"])
    keys = [k for k in ("weight", "act_sum", "act_max") if budgets.get(f"{k}_bytes")]
    fig, axes = plt.subplots(1 + len(keys), 1, figsize=(7, 2.4 * (1 + len(keys))), sharex=True)
    axes = list(axes) if len(keys) else [axes]
    axes[0].plot(x, [100 * r["val_acc"] for r in evals], "o-", ms=3)
    axes[0].set_ylabel("validation acc. (%)")
    for stage, start in offsets.items():
        for ax in axes:
            ax.axvline(start, color="grey", lw=0.6, ls=":")
        axes[0].annotate(f"stage {stage}", (start, 0.02), xycoords=("data", "axes fraction"), fontsize=7)
    for ax, key in zip(axes[1:], keys, strict=True):
        points = [(xi, r["sizes"][f"{key}_bytes"] / UNITS[unit]) for xi, r in zip(x, evals, strict=True)
                  if r.get("sizes")]
        if points:
            ax.plot(*zip(*points, strict=True), "o-", ms=3, color="tab:green")
        ax.axhline(budgets[f"{key}_bytes"] / UNITS[unit], color="tab:red", ls="--", label="budget")
        ax.set_ylabel(f"{key} ({unit})")
        ax.legend(loc="upper right", fontsize=7)
    axes[-1].set_xlabel("training step (all stages)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_run(folder, summary: dict, unit: str = "KiB") -> None:
    if summary.get("layers"):
        plot_bits(summary["layers"], folder.path / "bits.png")
    plot_training(folder.read_log(), summary.get("budgets", {}), unit, folder.path / "training.png")
