"""Time and memory of LocallyConnected2d against nn.Conv2d and the unfold + einsum formulation.

Every measurement is one training-style forward and backward pass: the layer's output is
back-propagated with a fixed random gradient, and the gradients of the input and the parameters
are reset to None before each repeat, as ``optimizer.zero_grad()`` does. The three implementations
are timed interleaved (conv, reference, bpcnn, conv, ...) and each time is the median over the
repeats after warm-up, so that load from other processes hits all three alike.

Peak memory is the extra memory a forward and backward pass needs above the inputs and parameters:
on CUDA ``torch.cuda.max_memory_allocated`` minus the allocation before the pass; on the CPU, where
PyTorch keeps no allocation statistics, the peak resident set size of a fresh subprocess
(``VmHWM``, reset just before the pass) minus its resident size before the pass. The subprocess
runs with ``MALLOC_MMAP_THRESHOLD_=131072``, so glibc serves every allocation above 128 KiB by
``mmap`` and freed tensors leave the resident set at once.

Usage:
    python benchmarks/lc_layer.py                  # CPU: ResNet-20 and ResNet-18 layers, network step
    python benchmarks/lc_layer.py --skip-resnet18  # the ResNet-20 goals only (minutes)
    python benchmarks/lc_layer.py --device cuda    # fp32 and bf16 (autocast) on a GPU

Every shape runs with NCHW (contiguous) and with channels-last activations, the same format for
all three implementations (``--formats`` picks one); the conv layer's weight is converted too, as
``model.to(memory_format=torch.channels_last)`` does.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from bpcnn.convert import to_channels_last, to_locally_connected
from bpcnn.layers import LocallyConnected2d
from bpcnn.models import resnet_cifar

log = logging.getLogger("lc_layer")

IMPLEMENTATIONS = ("conv", "reference", "bpcnn")
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """One convolution's geometry and the batch it is timed with."""

    name: str
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    padding: int
    in_size: int
    batch: int


def resnet20_shapes(batch: int) -> List[LayerShape]:
    """Return the 3x3 stride-1 layer of each ResNet-20 stage (CIFAR, 32x32 input)."""
    return [
        LayerShape("resnet20 C=16 32x32", 16, 16, 3, 1, 1, 32, batch),
        LayerShape("resnet20 C=32 16x16", 32, 32, 3, 1, 1, 16, batch),
        LayerShape("resnet20 C=64 8x8", 64, 64, 3, 1, 1, 8, batch),
    ]


def resnet18_shapes(batch: int, width: int = 32) -> List[LayerShape]:
    """Return the distinct layer shapes of a ResNet-18 of the given width on 224x224 inputs."""
    w = width
    return [
        LayerShape(f"resnet18 stem 3->{w} 7x7/2 224", 3, w, 7, 2, 3, 224, batch),
        LayerShape(f"resnet18 C={w} 56x56", w, w, 3, 1, 1, 56, batch),
        LayerShape(f"resnet18 {w}->{2 * w} 3x3/2 56", w, 2 * w, 3, 2, 1, 56, batch),
        LayerShape(f"resnet18 {w}->{2 * w} 1x1/2 56", w, 2 * w, 1, 2, 0, 56, batch),
        LayerShape(f"resnet18 C={2 * w} 28x28", 2 * w, 2 * w, 3, 1, 1, 28, batch),
        LayerShape(f"resnet18 C={4 * w} 14x14", 4 * w, 4 * w, 3, 1, 1, 14, batch),
        LayerShape(f"resnet18 C={8 * w} 7x7", 8 * w, 8 * w, 3, 1, 1, 7, batch),
    ]


class UnfoldEinsumLC(nn.Module):
    """The reference formulation of a locally connected layer: pad, unfold twice, one einsum.

    The weight is laid out ``(in, out, out_h, out_w, kh, kw)``; ``x.unfold(2, k, s).unfold(3, k, s)``
    gives the patches ``(b, in, out_h, out_w, kh, kw)`` as a strided view.
    """

    def __init__(self, shape: LayerShape, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = shape.kernel_size, shape.stride, shape.padding
        out_size = (shape.in_size + 2 * shape.padding - shape.kernel_size) // shape.stride + 1
        k = shape.kernel_size
        self.weight = nn.Parameter(
            torch.randn(shape.in_channels, shape.out_channels, out_size, out_size, k, k, device=device, dtype=dtype)
            * (2.0 / (shape.out_channels * k * k)) ** 0.5
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s, p = self.kernel_size, self.stride, self.padding
        x = F.pad(x, (p, p, p, p))
        patches = x.unfold(2, k, s).unfold(3, k, s)  # (b, i, h, w, k, l)
        return torch.einsum("bihwkl,iohwkl->bohw", patches, self.weight.to(x.dtype))


def build_layer(kind: str, shape: LayerShape, device: torch.device, memory_format: str = "nchw") -> nn.Module:
    """Build one implementation of ``shape`` in float32 (bf16 runs use autocast)."""
    if kind == "conv":
        return nn.Conv2d(
            shape.in_channels, shape.out_channels, shape.kernel_size, shape.stride, shape.padding,
            bias=False, device=device,
        ).to(memory_format=FORMATS[memory_format])
    if kind == "reference":
        return UnfoldEinsumLC(shape, device, torch.float32)
    if kind == "bpcnn":
        return LocallyConnected2d(
            shape.in_channels, shape.out_channels, shape.kernel_size, shape.in_size,
            stride=shape.stride, padding=shape.padding, bias=False, device=device,
        )
    raise ValueError(f"unknown implementation {kind!r}; expected one of {IMPLEMENTATIONS}")


def autocast_context(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def make_layer_step(
    kind: str, shape: LayerShape, device: torch.device, dtype: torch.dtype, memory_format: str = "nchw"
) -> Callable[[], None]:
    """Return a closure running one forward and backward pass of one implementation."""
    layer = build_layer(kind, shape, device, memory_format)
    x = torch.randn(shape.batch, shape.in_channels, shape.in_size, shape.in_size, device=device)
    x = x.contiguous(memory_format=FORMATS[memory_format]).requires_grad_()
    with autocast_context(device, dtype):
        grad_out = torch.randn_like(layer(x))  # same strides as the output

    def step() -> None:
        x.grad = None
        layer.zero_grad(set_to_none=True)
        with autocast_context(device, dtype):
            out = layer(x)
        out.backward(grad_out)

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    steps: Dict[str, Callable[[], None]],
    device: torch.device,
    warmup: int,
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
) -> Dict[str, float]:
    """Return the median seconds per call of each step, calling them in turn so load hits all alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            synchronize(device)
            start = clock()
            step()
            synchronize(device)
            times[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def process_status_bytes(field: str) -> int:
    """Return a memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} line; peak memory needs Linux")


def reset_peak_resident() -> None:
    """Reset the kernel's peak resident set size (``VmHWM``) to the current size (Linux 4.0+)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def measure_peak_here(
    kind: str, shape: LayerShape, device: torch.device, dtype: torch.dtype, memory_format: str = "nchw"
) -> int:
    """Return the bytes one forward and backward pass needs above what exists before it."""
    step = make_layer_step(kind, shape, device, dtype, memory_format)
    if device.type == "cuda":
        step()  # the first pass creates the cuBLAS/cuDNN workspaces, which are not the layer's memory
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    reset_peak_resident()
    before = process_status_bytes("VmRSS")
    step()
    return process_status_bytes("VmHWM") - before


def measure_peak(
    kind: str, shape: LayerShape, device: torch.device, dtype: torch.dtype, memory_format: str = "nchw"
) -> int:
    """Measure the peak in a fresh process on the CPU (freed heap memory stays resident), in this one on CUDA."""
    if device.type == "cuda":
        return measure_peak_here(kind, shape, device, dtype, memory_format)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    request = json.dumps({"kind": kind, "shape": dataclasses.asdict(shape), "dtype": str(dtype).split(".")[-1],
                          "format": memory_format})
    result = subprocess.run(
        [sys.executable, __file__, "--measure-peak", request],
        env=env, capture_output=True, text=True, check=True,
    )
    return int(result.stdout.strip().splitlines()[-1])


def network_steps(
    batch: int, device: torch.device, dtype: torch.dtype, memory_format: str = "nchw"
) -> Dict[str, Callable[[], None]]:
    """Return training steps (forward, cross-entropy, backward, SGD) of a conv and an LC ResNet-20."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=FORMATS[memory_format])
    labels = torch.randint(0, 10, (batch,), device=device)
    steps = {}
    for kind in ("conv", "bpcnn"):
        model = resnet_cifar(n=3, width=16, num_classes=10).to(device)
        if kind == "bpcnn":
            model = to_locally_connected(model, x[:2])
        if memory_format == "channels_last":
            to_channels_last(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

        def step(model: nn.Module = model, optimizer: torch.optim.Optimizer = optimizer) -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast_context(device, dtype):
                loss = F.cross_entropy(model(x), labels)
            loss.backward()
            optimizer.step()

        steps[kind] = step
    return steps


def format_table(rows: Sequence[Dict[str, object]]) -> str:
    header = (
        f"| {'shape':<30} | {'batch':>5} | {'dtype':<8} | {'conv ms':>8} | {'ref ms':>8} | {'bpcnn ms':>8} "
        f"| {'bpcnn/conv':>10} | {'ref/bpcnn':>9} | {'peak MiB conv/ref/bpcnn':>23} |"
    )
    header = header.replace("| dtype    |", "| dtype    | format        |")
    lines = [header, "|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|"]
    for row in rows:
        times = row["ms"]
        peaks = row["peak_mib"]
        assert isinstance(times, dict) and isinstance(peaks, dict)
        peak_text = "/".join(f"{peaks[kind]:.0f}" if peaks[kind] is not None else "-" for kind in IMPLEMENTATIONS)
        lines.append(
            f"| {row['shape']:<30} | {row['batch']:>5} | {row['dtype']:<8} | {row['format']:<13} | {times['conv']:>8.1f} "
            f"| {times['reference']:>8.1f} | {times['bpcnn']:>8.1f} | {times['bpcnn'] / times['conv']:>10.2f} "
            f"| {times['reference'] / times['bpcnn']:>9.2f} | {peak_text:>23} |"
        )
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="torch device to run on (default: cpu)")
    parser.add_argument(
        "--dtypes", nargs="+", choices=("float32", "bfloat16", "float16"),
        help="compute dtypes; reduced precision runs under autocast (default: float32 on cpu, "
        "float32 and bfloat16 on cuda)",
    )
    parser.add_argument(
        "--formats", nargs="+", choices=tuple(FORMATS), default=list(FORMATS),
        help="activation memory formats to time (default: both)",
    )
    parser.add_argument("--batch", type=int, default=128, help="batch size of the ResNet-20 layers and network step")
    parser.add_argument("--resnet18-batch", type=int, default=32, help="batch size of the ResNet-18 layers")
    parser.add_argument("--skip-resnet20", action="store_true", help="skip the ResNet-20 (CIFAR) layers")
    parser.add_argument("--skip-resnet18", action="store_true", help="skip the ResNet-18 (width 32, 224x224) layers")
    parser.add_argument("--skip-network", action="store_true", help="skip the whole ResNet-20 training step")
    parser.add_argument("--skip-memory", action="store_true", help="skip the peak memory measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed passes per implementation (default: 2)")
    parser.add_argument("--repeats", type=int, default=9, help="timed passes per implementation (default: 9)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on the CPU (default: torch's)")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall",
        help="wall: elapsed time; cpu: CPU time of this process (time.process_time), which on a "
        "machine shared with other jobs excludes the time the process waits for a core; use it "
        "with --threads 1, because idle OpenMP threads spin and count as CPU time (default: wall)",
    )
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--measure-peak", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.clock == "cpu" and device.type == "cuda":
        raise ValueError("--clock cpu measures CPU work and cannot time CUDA kernels; use --clock wall on cuda")
    if args.measure_peak:
        request = json.loads(args.measure_peak)
        shape = LayerShape(**request["shape"])
        print(measure_peak_here(request["kind"], shape, device, getattr(torch, request["dtype"]), request["format"]))
        return

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dtype_names = args.dtypes or (["float32", "bfloat16"] if device.type == "cuda" else ["float32"])
    log.info(
        "torch %s, %s, %d threads, %s clock, device %s%s, load average %.1f", torch.__version__,
        platform.machine(), torch.get_num_threads(), args.clock, device,
        f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "", os.getloadavg()[0],
    )
    shapes = [] if args.skip_resnet20 else resnet20_shapes(args.batch)
    if not args.skip_resnet18:
        shapes += resnet18_shapes(args.resnet18_batch)

    rows: List[Dict[str, object]] = []
    for dtype_name, shape, memory_format in itertools.product(dtype_names, shapes, args.formats):
        dtype = getattr(torch, dtype_name)
        torch.manual_seed(0)
        steps = {kind: make_layer_step(kind, shape, device, dtype, memory_format) for kind in IMPLEMENTATIONS}
        seconds = time_interleaved(steps, device, args.warmup, args.repeats, clock)
        del steps
        peaks: Dict[str, Optional[float]] = {kind: None for kind in IMPLEMENTATIONS}
        if not args.skip_memory:
            for kind in IMPLEMENTATIONS:
                peaks[kind] = measure_peak(kind, shape, device, dtype, memory_format) / 2**20
        row = {
            "shape": shape.name, "batch": shape.batch, "dtype": dtype_name, "format": memory_format,
            "ms": {kind: 1e3 * value for kind, value in seconds.items()}, "peak_mib": peaks,
        }
        rows.append(row)
        log.info("%s", format_table([row]).splitlines()[-1])

    print(format_table(rows))
    print(f"load average after the layers: {os.getloadavg()[0]:.1f}")
    network: Dict[str, Dict[str, float]] = {}
    if not args.skip_network:
        for dtype_name, memory_format in itertools.product(dtype_names, args.formats):
            steps = network_steps(args.batch, device, getattr(torch, dtype_name), memory_format)
            seconds = time_interleaved(steps, device, args.warmup, args.repeats, clock)
            key = f"{dtype_name} {memory_format}"
            network[key] = {kind: 1e3 * value for kind, value in seconds.items()}
            print(
                f"ResNet-20 training step, batch {args.batch}, {key}: conv {network[key]['conv']:.1f} ms, "
                f"LC {network[key]['bpcnn']:.1f} ms, LC/conv {seconds['bpcnn'] / seconds['conv']:.2f}"
            )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(), "clock": args.clock,
                 "load_average": os.getloadavg()[0], "layers": rows, "network": network},
                handle, indent=1,
            )


if __name__ == "__main__":
    main()
