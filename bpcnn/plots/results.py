"""Figures of a sweep's results: accuracy per variant, test accuracy and LC weight SNR per epoch, repetitions.

Each function takes the tables of ``bpcnn.results`` (accuracies in percent) and returns a figure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import matplotlib.pyplot as plt
import numpy as np

if TYPE_CHECKING:  # pandas is an optional dependency (the notebooks and test extras)
    import pandas as pd

__all__ = ["plot_variant_accuracy", "plot_accuracy_curves", "plot_snr_curves", "plot_repetition_effect"]


def _label(variant: str, model: str) -> str:
    from ..results import model_label

    return model_label(model) if variant == model else variant


def plot_variant_accuracy(summary: pd.DataFrame, runs: Optional[pd.DataFrame] = None) -> plt.Figure:
    """Draw one panel per sweep and dataset: bars of mean final top-1 per variant, seed standard deviation as error bars.

    With ``runs`` (the per-run table), each seed's accuracy is drawn as a dot on its bar.
    """
    groups = list(summary.groupby(["sweep", "dataset"], sort=False))
    if not groups:
        raise ValueError("the summary has no finished runs to plot")
    fig, axes = plt.subplots(1, len(groups), figsize=(max(5.0, 1.0 + 0.9 * summary.shape[0]), 4), squeeze=False)
    for ax, ((sweep, dataset), group) in zip(axes[0], groups):
        positions = np.arange(len(group))
        bars = ax.bar(positions, group["top1_mean"], yerr=group["top1_std"].fillna(0.0), capsize=4, color="tab:blue",
                      alpha=0.7)
        ax.bar_label(bars, labels=[f"{value:.1f}" for value in group["top1_mean"]], label_type="center", fontsize="small")
        if runs is not None:
            for position, (_, row) in zip(positions, group.iterrows()):
                seeds = runs[(runs["sweep"] == sweep) & (runs["dataset"] == dataset) & (runs["variant"] == row["variant"])
                             & runs["finished"]]
                ax.plot(np.full(len(seeds), position), seeds["top1"], "k.", markersize=5)
        low = float(np.nanmin(group["top1_mean"] - group["top1_std"].fillna(0.0)))
        ax.set_ylim(max(0.0, low - 5.0), min(102.0, float(np.nanmax(group["top1_mean"])) + 3.0))
        ax.set_xticks(positions, group["label"], rotation=30, ha="right")
        split = group["eval_split"].iloc[0] or "evaluation"
        ax.set(ylabel=f"final {split} top-1 (%)", title=f"{dataset} ({sweep})")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_accuracy_curves(epochs: pd.DataFrame, dataset: str, sweep: Optional[str] = None) -> plt.Figure:
    """Plot evaluation top-1 against epoch for each variant of one dataset: mean over seeds, spread shaded."""
    data = epochs[(epochs["dataset"] == dataset) & epochs["eval_top1"].notna()]
    if sweep is not None:
        data = data[data["sweep"] == sweep]
    if data.empty:
        raise ValueError(f"no evaluated epochs for dataset {dataset!r}" + (f" in sweep {sweep!r}" if sweep else ""))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (variant, model), group in data.groupby(["variant", "model"], sort=False):
        stats = group.groupby("epoch")["eval_top1"].agg(["mean", "std", "count"]).reset_index()
        label = _label(variant, model)
        line, = ax.plot(stats["epoch"], stats["mean"], "o-", markersize=3, label=label)
        spread = stats["std"].fillna(0.0)
        ax.fill_between(stats["epoch"], stats["mean"] - spread, stats["mean"] + spread, color=line.get_color(), alpha=0.15)
    ax.set(xlabel="epoch", ylabel="test top-1 accuracy (%)", title=f"{dataset}: mean over seeds (± std)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_snr_curves(snr: pd.DataFrame, dataset: str, sweep: Optional[str] = None) -> Optional[plt.Figure]:
    """Plot each LC layer's weight SNR against epoch, one panel per LC variant (mean over seeds, log axis).

    Returns None when no run of ``dataset`` has LC layers.
    """
    data = snr[snr["dataset"] == dataset]
    if sweep is not None:
        data = data[data["sweep"] == sweep]
    if data.empty:
        return None
    variants = list(data.groupby(["variant", "model"], sort=False).groups)
    columns = min(3, len(variants))
    rows = int(np.ceil(len(variants) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.3 * rows), squeeze=False, sharey=True)
    cmap = plt.get_cmap("viridis")
    for ax, (variant, model) in zip(axes.flat, variants):
        group = data[(data["variant"] == variant) & (data["model"] == model)]
        layers = list(dict.fromkeys(group["layer"]))
        for index, layer in enumerate(layers):
            means = group[group["layer"] == layer].groupby("epoch")["snr"].mean()
            ax.plot(means.index, means.values, color=cmap(index / max(1, len(layers) - 1)), label=layer)
        ax.set(xlabel="epoch", yscale="log", title=_label(variant, model))
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(variants):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("LC weight SNR")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if len(labels) <= 24:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="x-small")
    fig.suptitle(f"{dataset}: weight SNR per LC layer (first to last layer: dark to light)")
    fig.tight_layout()
    return fig


def plot_repetition_effect(summary: pd.DataFrame) -> Optional[plt.Figure]:
    """Plot final top-1 of LC without sharing against the number of translated repetitions, conv as a reference line.

    Returns None when no dataset has an LC run with more than one repetition.
    """
    lc = summary[summary["model"].str.fullmatch(r"lc(_rep\d+)?")]
    keys = [key for key, group in lc.groupby(["sweep", "dataset"], sort=False) if (group["n_repetitions"] > 1).any()]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.8), squeeze=False)
    for ax, (sweep, dataset) in zip(axes[0], keys):
        group = lc[(lc["sweep"] == sweep) & (lc["dataset"] == dataset)].sort_values("n_repetitions")
        ax.errorbar(group["n_repetitions"], group["top1_mean"], yerr=group["top1_std"].fillna(0.0), fmt="o-",
                    capsize=4, label="LC")
        conv = summary[(summary["sweep"] == sweep) & (summary["dataset"] == dataset) & (summary["model"] == "conv")]
        if not conv.empty:
            ax.axhline(conv["top1_mean"].iloc[0], color="k", linestyle="--", label="conv (1 repetition)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(group["n_repetitions"], [str(n) for n in group["n_repetitions"]])
        ax.set(xlabel="translated copies of each image per batch", ylabel="final test top-1 (%)",
               title=f"{dataset} ({sweep})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig
