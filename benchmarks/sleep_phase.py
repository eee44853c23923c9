"""Benchmark the sleep phase: speed against the reference formulation, training cost, random offsets.

Three measurements, each printed as a table:

1. One default sleep phase (100 steps, batch 128) on one LC layer of ResNet-20, computed by
   ``bpcnn.share_weights_dynamically`` and by the reference formulation of the same update. The
   reference unfolds the periodic input per position and runs a forward ``einsum``, pool means
   and an update ``einsum``. Both run alternately on the same random draws. Reports the median
   times, their ratio and the largest weight difference between the two.
2. The cost of training an LC ResNet-20 with a sleep phase every 10 iterations, relative to
   training with instant sharing every 10 iterations. The script times one training iteration
   (forward, backward, AdamW step on random 32x32 images), one sleep phase over the whole model
   and one instant sharing, alternately, and reports the factor
   ``(10 * iteration + sleep) / (10 * iteration + instant)`` from their medians.
3. Whether tiling at a random offset makes adjacent positions share. Repeated phases run on one
   layer with a fixed offset, a random offset, and periods alternating between ``k`` and ``k + 1``.
   The table gives the pool deviation and the RMS difference between adjacent interior kernels.

Run ``python benchmarks/sleep_phase.py --threads 1`` (about 15 minutes on one idle CPU core; the
reference formulation takes most of it) or ``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from bpcnn.convert import to_locally_connected
from bpcnn.layers import LocallyConnected2d
from bpcnn.models import resnet_cifar
from bpcnn.sharing import pool_ids, pool_means, share_weights_instantly
from bpcnn.sleep import SleepPhase, draw_patterns, pool_deviation, share_weights_dynamically, tile_patterns


@torch.no_grad()
def reference_sleep_phase(
    layer: LocallyConnected2d, steps: int, batch_size: int, lr: float, gamma: float, generator: torch.Generator
) -> None:
    """Run the sleep phase as the reference formulates it: unfold the tiled input, einsum, pool means, einsum."""
    weight = layer.kernels()
    out_h, out_w, out_channels, in_channels, kh, kw = weight.shape
    positions = out_h * out_w
    ids, n_pools = pool_ids(layer, exclude_border=True)
    kernels = weight.reshape(positions, out_channels, in_channels * kh * kw).clone()  # (L, C_out, K)
    start = kernels.clone()
    for _ in range(steps):
        patterns = draw_patterns(layer, layer.kernel_size, batch_size, generator)
        inputs = tile_patterns(patterns, layer.in_size)  # (B, C_in, H, W)
        patches = F.unfold(inputs, (kh, kw), layer.dilation, layer.padding[::2], layer.stride)  # (B, K, L)
        responses = torch.einsum("bkl,lok->blo", patches, kernels)  # (B, L, C_out)
        # (B, L, C_out) -> (out_h, out_w, B, C_out) for the pool means, and back.
        by_position = responses.permute(1, 0, 2).reshape(out_h, out_w, batch_size, out_channels)
        means = pool_means(by_position, ids, n_pools).reshape(positions, batch_size, out_channels)
        inhibited = responses - means.permute(1, 0, 2)  # (B, L, C_out)
        hebbian = torch.einsum("blo,bkl->lok", inhibited, patches) / batch_size  # (L, C_out, K)
        kernels -= lr * (hebbian + gamma * (kernels - start))
    weight.copy_(kernels.view(weight.shape))


def median_times(functions: Dict[str, Callable[[], None]], repeats: int) -> Dict[str, float]:
    """Run every function ``repeats`` times, alternating between them, and return each one's median seconds."""
    times: Dict[str, List[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            begin = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - begin)
    return {name: statistics.median(values) for name, values in times.items()}


def benchmark_one_layer(repeats: int, steps: int) -> None:
    torch.manual_seed(0)
    layer = LocallyConnected2d(16, 16, 3, 32, padding=1, bias=False)
    initial = layer.weight.detach().clone()
    ours = LocallyConnected2d(16, 16, 3, 32, padding=1, bias=False)
    per_position = LocallyConnected2d(16, 16, 3, 32, padding=1, bias=False)
    reference = LocallyConnected2d(16, 16, 3, 32, padding=1, bias=False)

    def reset() -> None:
        with torch.no_grad():
            ours.weight.copy_(initial)
            per_position.weight.copy_(initial)
            reference.weight.copy_(initial)

    reset()
    share_weights_dynamically(ours, steps=steps, generator=torch.Generator().manual_seed(1))
    reference_sleep_phase(reference, steps, 128, 0.1, 1e-5, torch.Generator().manual_seed(1))
    difference = float((ours.weight - reference.weight).detach().abs().max())
    scale = float(initial.abs().max())

    timings = median_times(
        {
            "bpcnn": lambda: share_weights_dynamically(ours, steps=steps, generator=torch.Generator().manual_seed(1)),
            "per_position": lambda: share_weights_dynamically(
                per_position, steps=steps, generator=torch.Generator().manual_seed(1), algorithm="per_position"
            ),
            "reference": lambda: reference_sleep_phase(reference, steps, 128, 0.1, 1e-5, torch.Generator().manual_seed(1)),
        },
        repeats,
    )
    print(f"\n## One sleep phase, LC layer 16->16, 3x3, 32x32, padding 1, {steps} steps, batch 128")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, medians of {repeats} alternating runs")
    print("| formulation | seconds |")
    print("| --- | --- |")
    print(f"| bpcnn.share_weights_dynamically | {timings['bpcnn']:.3f} |")
    print(f"| bpcnn, algorithm='per_position' (batched matrix products per position) | {timings['per_position']:.3f} |")
    print(f"| reference (unfold, einsum, pool means, einsum) | {timings['reference']:.3f} |")
    print(f"speed-up: {timings['reference'] / timings['bpcnn']:.1f}x over the reference, "
          f"{timings['per_position'] / timings['bpcnn']:.1f}x over per-position; "
          f"max weight difference {difference:.2e} (weights up to {scale:.2e})")


def lc_resnet20() -> nn.Module:
    torch.manual_seed(0)
    model = resnet_cifar(3, 16, 10, 3)
    return to_locally_connected(model, torch.zeros(1, 3, 32, 32))


def benchmark_training(repeats: int, batch_sizes: List[int]) -> None:
    model = lc_resnet20()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sleep_phase = SleepPhase(frequency=10, seed=0)
    steps = iter(range(10, 10**9, 10))
    print("\n## LC ResNet-20: sleep phase vs instant sharing, every 10 iterations")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, medians of {repeats} alternating runs")
    print("| training batch | iteration (s) | sleep phase (s) | instant sharing (s) | training-time factor |")
    print("| --- | --- | --- | --- | --- |")
    for batch_size in batch_sizes:
        images = torch.randn(batch_size, 3, 32, 32)
        labels = torch.randint(0, 10, (batch_size,))

        def iteration() -> None:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()

        iteration()  # warm-up
        timings = median_times(
            {
                "iteration": iteration,
                "sleep": lambda: sleep_phase(model, next(steps)),
                "instant": lambda: share_weights_instantly(model),
            },
            repeats,
        )
        ten = 10 * timings["iteration"]
        factor = (ten + timings["sleep"]) / (ten + timings["instant"])
        print(f"| {batch_size} | {timings['iteration']:.3f} | {timings['sleep']:.3f} | "
              f"{timings['instant']:.4f} | {factor:.2f}x |")


def adjacent_deviation(layer: LocallyConnected2d) -> float:
    """Return the RMS difference between the kernels of horizontally or vertically adjacent interior positions."""
    ids, _ = pool_ids(layer, exclude_border=True)
    interior = ids >= 0
    kernels = layer.kernels().detach().double()
    pairs = []
    horizontal = interior[:, 1:] & interior[:, :-1]
    vertical = interior[1:, :] & interior[:-1, :]
    pairs.append((kernels[:, 1:] - kernels[:, :-1])[horizontal])
    pairs.append((kernels[1:, :] - kernels[:-1, :])[vertical])
    return float(torch.cat(pairs).pow(2).mean().sqrt())


def benchmark_offsets(phases: int) -> None:
    variants = {
        "fixed offset, period k": dict(random_offset=False, alternate_period=False),
        "random offset, period k": dict(random_offset=True, alternate_period=False),
        "fixed offset, periods k and k+1 alternating": dict(random_offset=False, alternate_period=True),
    }
    print(f"\n## Random offset: LC layer 4->4, 3x3, 16x16, padding 1, {phases} default phases")
    print("Deviations relative to the initial ones (1.0 = unchanged); no training between phases.")
    print("| variant | pool deviation | adjacent deviation |")
    print("| --- | --- | --- |")
    for name, settings in variants.items():
        torch.manual_seed(0)
        layer = LocallyConnected2d(4, 4, 3, 16, padding=1, bias=False)
        pool_start, adjacent_start = pool_deviation(layer), adjacent_deviation(layer)
        schedule = SleepPhase(frequency=1, seed=1, **settings)
        for step in range(1, phases + 1):
            schedule(layer, step)
        print(f"| {name} | {pool_deviation(layer) / pool_start:.2e} | {adjacent_deviation(layer) / adjacent_start:.2e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and steps, for a smoke run")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512],
                        help="training batch sizes for the training-time factor")
    parser.add_argument("--only", nargs="+", choices=["layer", "training", "offsets"],
                        default=["layer", "training", "offsets"], help="measurements to run (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if "layer" in args.only:
        benchmark_one_layer(repeats=1 if args.quick else 3, steps=10 if args.quick else 100)
    if "training" in args.only:
        benchmark_training(repeats=1 if args.quick else 3, batch_sizes=[32] if args.quick else args.batch_sizes)
    if "offsets" in args.only:
        benchmark_offsets(phases=2 if args.quick else 12)


if __name__ == "__main__":
    main()
