"""Tiny datasets written in the real on-disk formats, so the real loading code runs in tests."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(2)


def class_images(n: int, channels: int, size: int, n_classes: int, seed: int):
    """Return uint8 images ``(n, channels, size, size)`` whose class shows as a bright square, and labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    images = rng.integers(0, 60, (n, channels, size, size)).astype(np.uint8)
    cells = int(np.ceil(np.sqrt(n_classes)))
    step = size // cells
    for i, label in enumerate(labels):
        row, col = divmod(int(label), cells)
        images[i, :, row * step : (row + 1) * step, col * step : (col + 1) * step] = 230
    return images, labels


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def make_mnist_folder(folder: Path, n_train: int = 96, n_test: int = 40, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = class_images(n, 1, 28, 10, seed + len(prefix))
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images[:, 0])
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


def make_cifar_folder(root: Path, classes: int = 10, n_per_batch: int = 20) -> Path:
    if classes == 10:
        folder = root / "cifar-10-batches-py"
        names, key = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels"
    else:
        folder = root / "cifar-100-python"
        names, key = ["train", "test"], b"fine_labels"
    folder.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        images, labels = class_images(n_per_batch, 3, 32, classes, index)
        batch = {b"data": images.reshape(n_per_batch, -1), key: labels.tolist(), b"batch_label": name.encode()}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)
    return root


def make_image_folder(root: Path, size: int = 64, classes: int = 3, per_class: int = 4, tiny_val: bool = False) -> Path:
    """Write an ImageFolder tree ``train/<class>/images/*.JPEG`` and ``val/`` (TinyImageNet's layout if ``tiny_val``)."""
    from PIL import Image

    names = [f"n{index:08d}" for index in range(classes)]
    for split in ("train", "val"):
        for c, name in enumerate(names):
            images, _ = class_images(per_class, 3, size, classes, c)
            if split == "val" and tiny_val:
                folder = root / "val" / "images"
            else:
                folder = root / split / name / ("images" if split == "train" else "")
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                file = folder / f"{name}_{split}_{i}.JPEG"
                Image.fromarray(images[i].transpose(1, 2, 0)).save(file, format="JPEG")
    if tiny_val:
        lines = [f"{name}_val_{i}.JPEG\t{name}\t0\t0\t{size}\t{size}" for name in names for i in range(per_class)]
        (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def fashion_root(tmp_path: Path) -> Path:
    return make_mnist_folder(tmp_path / "fashion")
