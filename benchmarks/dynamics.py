"""Time the batched convergence simulations against a plain loop over configurations.

The loop functions here are the baseline: one configuration at a time, one step at a time, the
equations written as in the method description with full weight vectors. The tests use them to
check that the batched simulations in ``bpcnn.dynamics`` agree with them.

    python benchmarks/dynamics.py                   # 20,000 steps: batched grid vs loop
    python benchmarks/dynamics.py --full            # also the grid at 1.5 million steps
    python benchmarks/dynamics.py --loop-configs 9  # time the loop on 9 configurations only
    python benchmarks/dynamics.py --explorer        # redraw time of the notebook's sliders
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import platform
import time

import numpy as np

from bpcnn.dynamics import (
    DynamicParams,
    InstantParams,
    draw_pool,
    dynamic_learning_rates,
    instant_learning_rates,
    pool_alignment,
    pool_deviation,
    simulate_dynamic,
)

logger = logging.getLogger("benchmarks.dynamics")


def loop_dynamic(kernel_size, gamma, trial, n_steps, seed=0, record_every=None, **params):
    """Simulate one configuration of the rate dynamics step by step.

    Returns (steps, deviation, alignment) with the same draws and record steps as
    ``bpcnn.dynamics.simulate_dynamic``.
    """
    p = DynamicParams(**params)
    record_every = p.hold_steps if record_every is None else record_every
    n_holds = -(-n_steps // p.hold_steps)
    w_init, inputs = draw_pool(seed, kernel_size, trial, p.n_neurons, n_holds,
                               p.init_mean, p.init_std)
    lr = dynamic_learning_rates(n_steps, p)
    w = w_init.copy()
    v = np.zeros_like(w)
    r = np.full(p.n_neurons, p.b)
    r_inh = 0.0
    records = []
    for t in range(n_steps):
        x = inputs[t // p.hold_steps]
        z = w @ x
        dr_inh = (-r_inh - p.b + r.mean()) / p.tau
        r = r + (-r + z - p.alpha * r_inh + p.b) / p.tau
        r_inh = r_inh + dr_inh
        v = p.momentum * v + lr[t] * (-np.outer(r - p.b, x) - gamma * (w - w_init))
        w = w + v
        if (t + 1) % record_every == 0:
            records.append((t + 1, pool_deviation(w), pool_alignment(w, w_init)))
    return _stack_records(records)


def loop_instant(kernel_size, gamma, trial, n_steps, seed=0, record_every=1, **params):
    """Simulate one configuration of plain SGD on the lateral-inhibition objective."""
    p = InstantParams(**params)
    w_init, inputs = draw_pool(seed, kernel_size, trial, p.n_neurons, n_steps,
                               p.init_mean, p.init_std)
    lr = instant_learning_rates(n_steps, p)
    w = w_init.copy()
    v = np.zeros_like(w)
    records = []
    for t in range(n_steps):
        x = inputs[t]
        z = w @ x
        v = p.momentum * v + lr[t] * (-np.outer(z - z.mean(), x) - gamma * (w - w_init))
        w = w + v
        if (t + 1) % record_every == 0:
            records.append((t + 1, pool_deviation(w), pool_alignment(w, w_init)))
    return _stack_records(records)


def _stack_records(records):
    steps, deviation, alignment = zip(*records)
    return np.array(steps), np.array(deviation), np.array(alignment)


def time_grid(n_steps, kernel_sizes, gammas, n_trials, loop_configs):
    """Time the batched grid and the loop, and return (result, batched seconds, loop seconds)."""
    start = time.perf_counter()
    result = simulate_dynamic(kernel_sizes, gammas, n_trials, n_steps, record_every=1500)
    batched_s = time.perf_counter() - start

    configs = list(itertools.product(gammas, kernel_sizes, range(n_trials)))
    timed = configs[:loop_configs] if loop_configs else configs
    start = time.perf_counter()
    for gamma, k, trial in timed:
        loop_dynamic(k, gamma, trial, n_steps, record_every=1500)
    loop_s = (time.perf_counter() - start) * len(configs) / len(timed)
    estimate = "" if len(timed) == len(configs) else f" (estimated from {len(timed)})"
    print(f"{n_steps} steps, {len(configs)} configurations")
    print(f"  batched grid: {batched_s:8.2f} s")
    print(f"  plain loop:   {loop_s:8.2f} s{estimate}")
    print(f"  speed-up:     {loop_s / batched_s:8.1f}x")
    return result, batched_s, loop_s


def time_explorer():
    """Time one redraw of the notebook's explorer (simulation and rendering) at slider corners."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bpcnn.plots.dynamics import _draw_explorer

    fig = plt.figure(figsize=(10, 3.8))
    _draw_explorer(fig, 3, 1e-2, 10.0, 30.0, 150, 3e-4, 100, 1000, 3, 0)  # warm-up
    fig.canvas.draw()
    cases = [  # kernel size, neurons, steps, hold steps
        (3, 100, 30_000, 150),  # the notebook's starting values
        (10, 100, 30_000, 150),
        (10, 200, 60_000, 100),  # the largest and slowest slider values
    ]
    for k, n_neurons, n_steps, hold in cases:
        start = time.perf_counter()
        _draw_explorer(fig, k, 1e-2, 10.0, 30.0, hold, 3e-4, n_neurons, n_steps, 3, 0)
        fig.canvas.draw()
        print(f"explorer k={k}, {n_neurons} neurons, {n_steps} steps, hold {hold}: "
              f"{time.perf_counter() - start:.2f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20_000,
                        help="steps of the batched-vs-loop comparison (default 20000)")
    parser.add_argument("--trials", type=int, default=10, help="trials per configuration")
    parser.add_argument("--loop-configs", type=int, default=0,
                        help="time the loop on this many configurations and scale up "
                             "(default 0: all of them)")
    parser.add_argument("--full", action="store_true",
                        help="also time the batched grid at 1,500,000 steps")
    parser.add_argument("--explorer", action="store_true",
                        help="time the notebook's explorer redraws instead of the grid")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"numpy {np.__version__}, python {platform.python_version()}")
    if args.explorer:
        time_explorer()
        return
    kernel_sizes, gammas = (3, 6, 9), (1e-1, 1e-2, 1e-3)
    time_grid(args.steps, kernel_sizes, gammas, args.trials, args.loop_configs)
    if args.full:
        start = time.perf_counter()
        simulate_dynamic(kernel_sizes, gammas, args.trials, 1_500_000, record_every=150)
        print(f"1500000 steps, batched grid: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
