"""Plots of the summary and of the routing."""

import math
from pathlib import Path

import numpy as np

from .methods import HEADLINE_METHODS


# ----------------------------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_routing(result: dict, path: Path):
    """One heatmap per MoE layer: languages x experts, the share of each language's assignments per expert."""
    plt = _pyplot()
    routing = result["routing"]
    langs, layers = routing["languages"], routing["layers"]
    data = np.array([[routing["load"][lang][layer] for lang in langs] for layer in range(len(layers))])
    columns = min(len(layers), 6)
    rows = math.ceil(len(layers) / columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(1.5 + 2.0 * columns, 1.2 + rows * (0.9 + 0.22 * len(langs))), squeeze=False,
        layout="constrained",
    )
    vmax = max(float(data.max()), 1e-9)
    for index, ax in enumerate(axes.flat):
        if index >= len(layers):
            ax.axis("off")
            continue
        image = ax.imshow(data[index], vmin=0, vmax=vmax, cmap="viridis", aspect="auto")
        ax.set_title(f"layer {layers[index]}", fontsize=8)
        ax.set_xticks(range(routing["num_experts"]), [str(e) for e in range(routing["num_experts"])], fontsize=6)
        ax.set_yticks(range(len(langs)), langs if index % columns == 0 else [""] * len(langs), fontsize=7)
        ax.set_xlabel("expert", fontsize=7)
    figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="share of top-k assignments")
    figure.suptitle(f"{result['method']} (seed {result['seed']}): decoder expert load per target language", fontsize=9)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def plot_summary(summary: dict, plots: Path):
    """Per-language BLEU, pairwise expert distance before/after, load balance and training loss across methods."""
    plt = _pyplot()
    methods = summary["methods"]
    names = [name for name in methods if methods[name]["seeds"]]
    langs = summary["languages"]

    shown = [name for name in HEADLINE_METHODS if name in names] or names
    width = 0.8 / len(shown)
    for metric, title in (("bleu", "BLEU"), ("chrf", "chrF++")):
        figure, ax = plt.subplots(figsize=(max(6, 0.9 * len(langs) + 2), 3.6))
        for offset, name in enumerate(shown):
            values = [methods[name]["per_lang"][lang][metric]["mean"] for lang in langs] + [methods[name][metric]["mean"]]
            ax.bar(np.arange(len(langs) + 1) + offset * width, values, width, label=name)
        ax.set_xticks(np.arange(len(langs) + 1) + 0.4 - width / 2, langs + ["avg"], fontsize=8)
        ax.set_ylabel(title)
        ax.legend(fontsize=7, ncol=4)
        ax.set_title(f"{title} per language (mean over seeds)", fontsize=9)
        figure.tight_layout()
        figure.savefig(plots / f"{metric}-per-language.png", dpi=90)
        plt.close(figure)
    plot_paired(summary, plots / "paired-differences.png")

    moe = [name for name in names if methods[name].get("routing")]
    if moe:
        figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        x = np.arange(len(moe))
        before = [methods[name]["routing"]["pairwise_distance_before"] for name in moe]
        after = [methods[name]["routing"]["pairwise_distance_after"] for name in moe]
        axes[0].bar(x - 0.2, before, 0.4, label="before training")
        axes[0].bar(x + 0.2, after, 0.4, label="after training")
        axes[0].set_yscale("symlog", linthresh=1e-3)
        axes[0].set_title("mean pairwise expert distance (relative)", fontsize=9)
        axes[0].legend(fontsize=7)
        axes[1].bar(x, [methods[name]["routing"]["cv"] for name in moe])
        axes[1].set_title("load coefficient of variation (0 = uniform)", fontsize=9)
        axes[2].bar(x, [methods[name]["routing"]["language_expert_mi_bits"] for name in moe])
        axes[2].set_title("language-expert mutual information (bits)", fontsize=9)
        for ax in axes:
            ax.set_xticks(x, moe, rotation=60, ha="right", fontsize=7)
        figure.tight_layout()
        figure.savefig(plots / "routing-summary.png", dpi=90)
        plt.close(figure)

    figure, ax = plt.subplots(figsize=(6.5, 3.6))
    for name in shown:
        curve = methods[name].get("loss_curve")
        if curve:
            ax.plot(range(1, len(curve) + 1), curve, label=name, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (seed mean)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(plots / "training-loss.png", dpi=90)
    plt.close(figure)


def plot_paired(summary: dict, path: Path):
    """The paired sentence chrF++ differences with their 95% intervals: every method against dense, and every
    ablation variant against the default spri (one panel each, where the summary has them)."""
    paired = summary.get("paired", {}).get("methods", {})
    panels = []
    for reference in ("dense", "spri"):
        rows = [(name, stats[f"vs_{reference}"]) for name, stats in paired.items() if f"vs_{reference}" in stats]
        if rows:
            panels.append((reference, rows))
    if not panels:
        return
    plt = _pyplot()
    height = 1.2 + 0.28 * max(len(rows) for _, rows in panels)
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), height), squeeze=False)
    for ax, (reference, rows) in zip(axes[0], panels):
        y = np.arange(len(rows))[::-1]
        for position, (_, stat) in zip(y, rows):
            errors = [[max(stat["mean"] - stat["low"], 0.0)], [max(stat["high"] - stat["mean"], 0.0)]]
            colour = "tab:red" if stat["significant"] else "tab:gray"
            ax.errorbar([stat["mean"]], [position], xerr=errors, fmt="o", markersize=4, color=colour, capsize=3)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(y, [name for name, _ in rows], fontsize=7)
        ax.set_xlabel(f"chrF++ difference to {reference} (95% CI; red: excludes 0)", fontsize=8)
        ax.set_title(f"paired against {reference}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
