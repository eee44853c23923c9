"""Figures of the convergence simulations in ``bpcnn.dynamics``, and an interactive explorer."""

from __future__ import annotations

import logging
import time
from typing import Optional, Sequence

import matplotlib.pyplot as plt
from matplotlib.ticker import NullFormatter

from ..dynamics import SimulationResult, simulate_dynamic

__all__ = [
    "plot_measure",
    "plot_convergence",
    "plot_alignment",
    "explore_dynamic",
]

logger = logging.getLogger(__name__)

_MEASURES = {
    "deviation": ("deviation", "deviation  (w - w_mean)^2 / w_mean^2"),
    "snr": ("snr", "SNR  1 / deviation"),
    "alignment": ("alignment", "cosine(mean w, mean w_init)"),
}


def plot_measure(ax, result: SimulationResult, kernel_index: int, measure: str = "deviation",
                 gamma_indices: Optional[Sequence[int]] = None) -> None:
    """Draw one measure against steps for each gamma of one kernel size.

    The line is the mean over trials and the shaded band spans the minimum to the maximum trial.
    ``measure`` is "deviation", "snr" or "alignment", and the first two use log-log axes.
    """
    if measure not in _MEASURES:
        raise ValueError(f"measure must be one of {sorted(_MEASURES)}, got {measure!r}")
    values = getattr(result, _MEASURES[measure][0])[:, kernel_index]  # (G, T, R)
    gamma_indices = range(len(result.gammas)) if gamma_indices is None else gamma_indices
    for gi in gamma_indices:
        trials = values[gi]  # (T, R)
        line, = ax.plot(result.steps, trials.mean(axis=0), label=f"gamma = {result.gammas[gi]:g}")
        ax.fill_between(result.steps, trials.min(axis=0), trials.max(axis=0),
                        color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on short ranges
    if measure != "alignment":
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.grid(True, which="major", alpha=0.3)


def plot_convergence(results: Sequence[SimulationResult], measure: str = "deviation",
                     labels: Optional[Sequence[str]] = None):
    """Return a figure of ``measure`` with a row per result and a column per kernel size.

    Pass ``[instant, dynamic]`` to compare the two simulations. ``labels`` name the rows in the
    panel titles and default to each result's kind.
    """
    results = list(results)
    kernel_sizes = results[0].kernel_sizes
    for result in results[1:]:
        if result.kernel_sizes != kernel_sizes:
            raise ValueError(
                f"all results need the same kernel sizes, got {kernel_sizes} and "
                f"{result.kernel_sizes}; use SimulationResult.select to match them"
            )
    labels = [result.kind for result in results] if labels is None else list(labels)
    fig, axes = plt.subplots(len(results), len(kernel_sizes),
                             figsize=(max(4 * len(kernel_sizes), 6), 3.25 * len(results)),
                             sharey="row", squeeze=False, constrained_layout=True)
    for row, (result, label) in enumerate(zip(results, labels)):
        for ki, k in enumerate(kernel_sizes):
            plot_measure(axes[row, ki], result, ki, measure)
            axes[row, ki].set_title(f"{label}, k = {k}")
        axes[row, 0].set_ylabel(_MEASURES[measure][1])
    axes[0, -1].legend(fontsize="small")
    fig.suptitle(f"{measure}: mean over trials, band from min to max")
    return fig


def plot_alignment(dynamic: SimulationResult):
    """Return a figure of the pool-mean kernel's cosine with its initial value, per kernel size."""
    n_kernels = len(dynamic.kernel_sizes)
    fig, axes = plt.subplots(1, n_kernels, figsize=(4 * n_kernels, 3.5), sharey=True,
                             squeeze=False, constrained_layout=True)
    for ki, k in enumerate(dynamic.kernel_sizes):
        plot_measure(axes[0, ki], dynamic, ki, "alignment")
        axes[0, ki].set_title(f"{dynamic.kind}, k = {k}")
    axes[0, 0].set_ylabel(_MEASURES["alignment"][1])
    axes[0, -1].legend(fontsize="small")
    return fig


def _draw_explorer(fig, kernel_size, gamma, alpha, tau, hold_steps, lr, n_neurons, n_steps,
                   n_trials, seed):
    start = time.perf_counter()
    # About 200 records keep recording and drawing cheap.
    record_every = hold_steps * max(1, n_steps // hold_steps // 200)
    result = simulate_dynamic(
        (kernel_size,), (gamma,), n_trials, n_steps, seed=seed, record_every=record_every,
        alpha=alpha, tau=tau, hold_steps=hold_steps, lr=lr, n_neurons=n_neurons,
    )
    elapsed = time.perf_counter() - start
    fig.clear()
    ax_dev, ax_align = fig.subplots(1, 2)
    plot_measure(ax_dev, result, 0, "deviation")
    ax_dev.set_ylabel(_MEASURES["deviation"][1])
    plot_measure(ax_align, result, 0, "alignment")
    ax_align.set_ylabel(_MEASURES["alignment"][1])
    fig.suptitle(f"dynamic, k = {kernel_size}, gamma = {gamma:g}, {n_trials} trials "
                 f"(simulated in {elapsed:.2f} s)")
    return result


def explore_dynamic(kernel_size: int = 3, gamma: float = 1e-2, alpha: float = 10.0,
                    tau: float = 30.0, hold_steps: int = 150, lr: float = 3e-4,
                    n_neurons: int = 100, n_steps: int = 30_000, n_trials: int = 3,
                    seed: int = 0, interactive: bool = True):
    """Show the dynamic simulation of one configuration, with sliders that rerun it.

    The figure for the given values is displayed first as a static image, so a headless run
    (papermill, nbconvert) keeps it. With ``interactive`` and ipywidgets installed, sliders
    below it rerun the simulation and update the image in place. Returns the sliders by
    parameter name, or an empty dict when there are none.
    """
    from IPython.display import DisplayHandle, display

    fig = plt.figure(figsize=(10, 3.8), constrained_layout=True)
    plt.close(fig)  # keeps the inline backend from drawing it a second time
    _draw_explorer(fig, kernel_size, gamma, alpha, tau, hold_steps, lr, n_neurons, n_steps,
                   n_trials, seed)
    handle = DisplayHandle()  # display(..., display_id=True) returns None outside IPython
    handle.display(fig)
    if not interactive:
        return {}
    try:
        import ipywidgets as widgets
    except ImportError:
        logger.warning("ipywidgets is not installed, so the explorer shows a static figure")
        return {}

    sliders = {
        "kernel_size": widgets.IntSlider(value=kernel_size, min=2, max=10, description="k"),
        "gamma": widgets.FloatLogSlider(value=gamma, base=10, min=-5, max=0, description="gamma"),
        "alpha": widgets.FloatSlider(value=alpha, min=0.0, max=30.0, step=0.5,
                                     description="alpha"),
        "tau": widgets.FloatSlider(value=tau, min=2.0, max=100.0, step=1.0, description="tau"),
        "hold_steps": widgets.IntSlider(value=hold_steps, min=100, max=500, step=10,
                                        description="hold"),
        "lr": widgets.FloatLogSlider(value=lr, base=10, min=-6, max=-2, description="lr"),
        "n_neurons": widgets.IntSlider(value=n_neurons, min=2, max=200, description="neurons"),
        "n_steps": widgets.IntSlider(value=n_steps, min=1000, max=60_000, step=1000,
                                     description="steps"),
    }

    def redraw(_change=None):
        values = {name: slider.value for name, slider in sliders.items()}
        _draw_explorer(fig, n_trials=n_trials, seed=seed, **values)
        handle.update(fig)

    for slider in sliders.values():
        slider.continuous_update = False
        slider.observe(redraw, names="value")
    display(widgets.VBox([widgets.HBox(list(sliders.values())[i:i + 4]) for i in (0, 4)]))
    return sliders
