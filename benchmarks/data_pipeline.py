"""Measure the image-folder input pipeline alone, to tell whether data loading or compute limits training.

The script iterates over the training loader that ``python -m bpcnn train`` builds for an image
folder (JPEG decoding, ``RandomResizedCrop`` at ``--input-scale``, flip, normalisation, batching
and, on CUDA machines, pinned memory) with no model, for each requested number of data-loader
worker processes. Each setting runs two epochs: the first includes starting the workers, the
second reuses them (persistent workers). With ``--compute`` it also times training steps
(forward, backward, optimiser step) of the run's model on random batches of the same shape, so
the two rates can be compared.

Without ``--path`` the script writes a temporary ImageNet-like folder of JPEG files (500x375
pixels, smooth random content) and deletes it afterwards. Examples::

    python benchmarks/data_pipeline.py --workers 0 1 2
    python benchmarks/data_pipeline.py --path /data/imagenet --batch-size 64 --workers 4 8 16 --batches 100
    python benchmarks/data_pipeline.py --config runs/notebook --compute --device cuda

Throughput is per process: under ``torchrun --nproc_per_node N`` every process runs its own
workers, so a node needs about N times the CPU cores that the fastest setting here used.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from bpcnn.config import RunConfig
from bpcnn.data import build_data
from bpcnn.training import build_model, build_optimizer, resolve_device


def write_jpeg_folder(root: Path, classes: int, per_class: int, width: int, height: int, seed: int = 0) -> Path:
    """Write ``train/`` and ``val/`` ImageFolder trees of JPEG files; return ``root``.

    Each image is a random 12x16 colour grid scaled up bilinearly plus mild pixel noise, so files
    compress more like photographs than pure noise would.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", max(1, per_class // 4))):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
                smooth = np.asarray(coarse.resize((width, height), Image.BILINEAR), dtype=np.int16)
                noisy = np.clip(smooth + rng.integers(-12, 13, smooth.shape), 0, 255).astype(np.uint8)
                Image.fromarray(noisy).save(folder / f"{split}_{c}_{i}.JPEG", format="JPEG", quality=90)
    return root


def mean_file_kib(root: Path) -> float:
    sizes = [path.stat().st_size for path in (root / "train").rglob("*") if path.is_file()]
    return statistics.fmean(sizes) / 1024 if sizes else float("nan")


def time_epoch(loader, epoch: int, max_batches: Optional[int]) -> Tuple[int, float, float]:
    """Iterate one epoch; return images delivered, total seconds and seconds to the first batch."""
    loader.set_epoch(epoch)
    images, first = 0, float("nan")
    start = time.perf_counter()
    for index, (batch, _) in enumerate(loader):
        if index == 0:
            first = time.perf_counter() - start
        images += batch.shape[0]
        if max_batches is not None and index + 1 >= max_batches:
            break
    return images, time.perf_counter() - start, first


def measure_compute(config: RunConfig, batch_size: int, scale: int, num_classes: int, steps: int) -> float:
    """Return training images per second of ``config``'s model on random ``(batch_size, 3, scale, scale)`` batches."""
    device = resolve_device(config.device)
    model = build_model(config, 3, (scale, scale), num_classes).to(device)
    optimizer = build_optimizer(config, model)
    images = torch.randn(batch_size, 3, scale, scale, device=device)
    labels = torch.randint(0, num_classes, (batch_size,), device=device)
    model.train()
    durations: List[float] = []
    for step in range(steps + 1):  # step 0 warms up and is not timed
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step > 0:
            durations.append(time.perf_counter() - start)
    return batch_size / statistics.median(durations)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", type=Path, default=None,
                        help="ImageFolder root with train/ and val/ (default: a temporary generated folder)")
    parser.add_argument("--config", type=Path, default=None,
                        help="a saved run config (config.json or its run folder) for the model and transforms")
    parser.add_argument("--dataset", default="ImageNet", choices=("ImageNet", "TinyImageNet"),
                        help="transforms to use when --config is not given (default: ImageNet)")
    parser.add_argument("--input-scale", type=int, default=None,
                        help="crop side in pixels (default: the config's, else 224 for ImageNet and 64 for TinyImageNet)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch of one process (default: 64)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                        help="data-loader process counts to measure (default: 0 1 2)")
    parser.add_argument("--batches", type=int, default=None, help="batches per epoch to time (default: all)")
    parser.add_argument("--classes", type=int, default=4, help="classes of the generated folder (default: 4)")
    parser.add_argument("--per-class", type=int, default=128,
                        help="training images per class of the generated folder (default: 128)")
    parser.add_argument("--compute", action="store_true",
                        help="also time training steps of the config's model (default: conv ResNet-18 of width 32)")
    parser.add_argument("--compute-steps", type=int, default=5, help="timed training steps with --compute (default: 5)")
    parser.add_argument("--device", default=None, help="device for --compute (default: the config's, else auto)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads of the main process (default: torch's choice); workers use 1")
    return parser.parse_args()


def base_config(args: argparse.Namespace, root: Path) -> RunConfig:
    if args.config is not None:
        config = RunConfig.load(args.config)
        if config.dataset not in ("ImageNet", "TinyImageNet"):
            raise SystemExit(f"error: {args.config} trains on {config.dataset}, which is read into memory, not "
                             f"through an image folder; pass a run config of ImageNet or TinyImageNet")
    else:
        config = RunConfig(dataset=args.dataset, experiment="resnet18_imagenet", resnet18_width_per_group=32)
    changes = dict(imagenet_path=str(root), data_root=None, batch_size=args.batch_size, subset=None,
                   training_mode="test", progress=False)
    if args.input_scale is not None:
        changes["input_scale"] = args.input_scale
    if args.device is not None:
        changes["device"] = args.device
    return dataclasses.replace(config, **changes)


def run(args: argparse.Namespace, root: Path) -> None:
    config = base_config(args, root)
    pin_memory = torch.cuda.is_available()
    print(f"folder {root}: mean JPEG size {mean_file_kib(root):.0f} KiB; batch {args.batch_size} per process; "
          f"pinned memory {'on' if pin_memory else 'off (no CUDA)'}; {torch.get_num_threads()} torch threads")
    print(f"{'workers':>7} | {'epoch 1 img/s':>13} | {'epoch 2 img/s':>13} | {'first batch s':>13} | images")
    best, scale, num_classes = 0.0, 0, 0
    for workers in args.workers:
        data = build_data(dataclasses.replace(config, workers=workers), rank=0, world_size=1, pin_memory=pin_memory)
        scale, num_classes = data.image_size[0], data.num_classes
        first_images, first_seconds, startup = time_epoch(data.train, 0, args.batches)
        images, seconds, _ = time_epoch(data.train, 1, args.batches)
        best = max(best, images / seconds)
        print(f"{workers:>7} | {first_images / first_seconds:>13.1f} | {images / seconds:>13.1f} | "
              f"{startup:>13.2f} | {images}")
        del data  # stops the persistent workers before the next setting starts its own
    print(f"input scale {scale} px, {num_classes} classes")
    if args.compute:
        rate = measure_compute(config, args.batch_size, scale, num_classes, args.compute_steps)
        print(f"compute: {rate:.1f} training img/s for {config.experiment} ({config.variant}) on "
              f"{resolve_device(config.device)}; data loading: at best {best:.1f} img/s")
        print("data loading is the bottleneck" if best < rate else "compute is the bottleneck")


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.path is not None:
        run(args, args.path)
        return
    with tempfile.TemporaryDirectory(prefix="bpcnn_jpeg_") as folder:
        root = write_jpeg_folder(Path(folder), args.classes, args.per_class, width=500, height=375)
        run(args, root)


if __name__ == "__main__":
    main()
