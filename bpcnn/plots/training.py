"""Figures of training runs: learning curves, weight SNR and comparisons between runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import matplotlib.pyplot as plt

Metrics = Sequence[Mapping[str, Any]]

__all__ = ["plot_learning_curves", "plot_snr", "plot_accuracy_comparison", "save_run_figures"]


def _evaluated(metrics: Metrics) -> List[Mapping[str, Any]]:
    return [m for m in metrics if m.get("eval_top1") is not None]


def plot_learning_curves(metrics: Metrics, title: str = "", axes: Optional[Sequence[plt.Axes]] = None) -> plt.Figure:
    """Plot loss and top-1 accuracy per epoch, training beside evaluation."""
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    else:
        fig = axes[0].figure
    epochs = [m["epoch"] for m in metrics]
    evaluated = _evaluated(metrics)
    split = evaluated[0]["eval_split"] if evaluated else "evaluation"
    axes[0].plot(epochs, [m["train_loss"] for m in metrics], label="train")
    axes[0].plot([m["epoch"] for m in evaluated], [m["eval_loss"] for m in evaluated], "o-", label=split)
    axes[0].set(xlabel="epoch", ylabel="cross-entropy loss", title=f"{title} loss".strip())
    axes[1].plot(epochs, [100 * m["train_top1"] for m in metrics], label="train")
    axes[1].plot([m["epoch"] for m in evaluated], [100 * m["eval_top1"] for m in evaluated], "o-", label=split)
    axes[1].set(xlabel="epoch", ylabel="top-1 accuracy (%)", title=f"{title} accuracy".strip())
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_snr(metrics: Metrics, title: str = "", ax: Optional[plt.Axes] = None) -> Optional[plt.Figure]:
    """Plot each LC layer's weight SNR per epoch on a log axis; return None when the run has no LC layer."""
    layers = list(metrics[0].get("snr", {})) if metrics else []
    if not layers:
        return None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
    else:
        fig = ax.figure
    epochs = [m["epoch"] for m in metrics]
    cmap = plt.get_cmap("viridis")
    for index, layer in enumerate(layers):
        values = [m["snr"].get(layer, float("nan")) for m in metrics]
        ax.plot(epochs, values, color=cmap(index / max(1, len(layers) - 1)), label=layer)
    ax.set(xlabel="epoch", ylabel="weight SNR", yscale="log", title=f"{title} LC weight SNR".strip())
    ax.grid(alpha=0.3)
    if len(layers) <= 12:
        ax.legend(fontsize="x-small", ncol=2)
    fig.tight_layout()
    return fig


def plot_accuracy_comparison(runs: Mapping[str, Metrics], ax: Optional[plt.Axes] = None, title: str = "") -> plt.Figure:
    """Plot evaluation top-1 accuracy against epoch for several runs, one line each."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 4))
    else:
        fig = ax.figure
    split = "evaluation"
    for name, metrics in runs.items():
        evaluated = _evaluated(metrics)
        if evaluated:
            split = evaluated[0]["eval_split"]
        ax.plot([m["epoch"] for m in evaluated], [100 * m["eval_top1"] for m in evaluated], "o-", label=name)
    ax.set(xlabel="epoch", ylabel=f"{split} top-1 accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def save_run_figures(run_dir: Path, metrics: Optional[Metrics] = None) -> Dict[str, Path]:
    """Draw a run's learning curves and SNR from its folder into ``run_dir/figures``; return the files written."""
    from ..training import read_metrics

    run_dir = Path(run_dir)
    metrics = list(metrics) if metrics is not None else read_metrics(run_dir)
    if not metrics:
        raise ValueError(f"run folder {run_dir} has no metrics.jsonl records yet; train the run first")
    out = run_dir / "figures"
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    fig = plot_learning_curves(metrics, title=run_dir.name)
    written["learning_curves"] = out / "learning_curves.png"
    fig.savefig(written["learning_curves"], dpi=120)
    plt.close(fig)
    fig = plot_snr(metrics, title=run_dir.name)
    if fig is not None:
        written["snr"] = out / "snr.png"
        fig.savefig(written["snr"], dpi=120)
        plt.close(fig)
    return written
