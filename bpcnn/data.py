"""Datasets, augmentation and batching, with translated repetitions of each image.

Small datasets (MNIST, Fashion-MNIST, CIFAR-10/100) are read from their on-disk formats into one
uint8 tensor and augmented a whole batch at a time, which is several times faster on a CPU than
per-image PIL transforms. Image-folder datasets (TinyImageNet, ImageNet) go through a standard
``DataLoader`` with worker processes.

Every loader draws its order and augmentation from ``(seed, epoch)``, so an epoch's batches do not
depend on what ran before it: a resumed run sees the same data as an uninterrupted one.
"""

from __future__ import annotations

import copy
import gzip
import logging
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .config import RunConfig

log = logging.getLogger(__name__)

FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"

# Per-channel mean and standard deviation of the training images, in [0, 1] units.
NORMALISATION = {
    "MNIST": ((0.1307,), (0.3081,)),
    "FashionMNIST": ((0.2860,), (0.3530,)),
    "CIFAR10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "CIFAR100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "TinyImageNet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "ImageNet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
NUM_CLASSES = {"MNIST": 10, "FashionMNIST": 10, "CIFAR10": 10, "CIFAR100": 100, "TinyImageNet": 200, "ImageNet": 1000}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing. The message names the folders searched and how to get the files."""


# ----------------------------------------------------------------------------------------------
# On-disk formats


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST's format), gzip-compressed or not, into a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"cannot read IDX file {path}: {err}; the file is damaged, fetch it again") from err
    if len(data) < 4:
        raise ValueError(f"IDX file {path} is truncated ({len(data)} bytes); fetch it again")
    zero, dtype_code, n_dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (header {data[:4].hex()}); expected MNIST-format data")
    shape = struct.unpack(f">{n_dims}I", data[4 : 4 + 4 * n_dims])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * n_dims)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"IDX file {path} is truncated: it contains {body.size} bytes of data, but its header expects shape {shape}; fetch it again")
    return body.reshape(shape)


def _find_file(folders: Sequence[Path], names: Sequence[str]) -> Optional[Path]:
    for folder in folders:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return None


def load_mnist_like(dataset: str, root: Path, train: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Load MNIST or Fashion-MNIST IDX files: images ``(N, 1, 28, 28)`` uint8 and labels ``(N,)`` long."""
    sub = "FashionMNIST" if dataset == "FashionMNIST" else "MNIST"
    folders = [root, root / sub / "raw", root / sub, root / "fashion-mnist", root / "mnist"]
    prefix = "train" if train else "t10k"
    found = []
    for kind, dims in (("images", 3), ("labels", 1)):
        base = f"{prefix}-{kind}-idx{dims}-ubyte"
        path = _find_file(folders, (base + ".gz", base))
        if path is None:
            hint = (
                "install Debian's package with `apt-get install dataset-fashion-mnist` (files land in "
                f"{FASHION_MNIST_DEBIAN}), or pass --download with internet access"
                if dataset == "FashionMNIST"
                else "pass --download with internet access, or copy the four IDX .gz files into --data-root"
            )
            missing = "" if root.is_dir() else f" (the folder {root} does not exist: check --data-root)"
            raise DatasetNotFoundError(
                f"{dataset}: {base}.gz not found in {', '.join(str(f) for f in folders)}{missing}; {hint}"
            )
        found.append(read_idx(path))
    images, labels = found
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{dataset} in {root}: {images.shape[0]} images but {labels.shape[0]} labels")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def load_cifar(dataset: str, root: Path, train: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Load CIFAR-10/100 from torchvision's on-disk format (pickled batches): ``(N, 3, 32, 32)`` uint8 and labels."""
    if dataset == "CIFAR10":
        folder_name, files, key = "cifar-10-batches-py", (
            [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]), b"labels"
    else:
        folder_name, files, key = "cifar-100-python", ["train" if train else "test"], b"fine_labels"
    folder = next((f for f in (root / folder_name, root) if (f / files[0]).is_file()), None)
    if folder is None:
        raise DatasetNotFoundError(
            f"{dataset}: {files[0]} not found in {root / folder_name} or {root}; pass --download with internet "
            f"access, or unpack the CIFAR python archive into --data-root"
        )
    images, labels = [], []
    for name in files:
        try:
            with open(folder / name, "rb") as handle:
                batch = pickle.load(handle, encoding="bytes")
        except (OSError, EOFError, pickle.UnpicklingError) as err:
            raise ValueError(f"{dataset}: cannot read {folder / name} ({err}); the file is damaged, fetch it again") from err
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def download(dataset: str, root: Path) -> None:
    """Fetch MNIST, Fashion-MNIST or CIFAR with torchvision (needs internet)."""
    import torchvision.datasets as tvd

    classes = {"MNIST": tvd.MNIST, "FashionMNIST": tvd.FashionMNIST, "CIFAR10": tvd.CIFAR10, "CIFAR100": tvd.CIFAR100}
    if dataset not in classes:
        raise ValueError(f"--download supports {', '.join(classes)}, not {dataset}; fetch it by hand into --imagenet-path")
    for train in (True, False):
        classes[dataset](str(root), train=train, download=True)


# ----------------------------------------------------------------------------------------------
# In-memory datasets, augmented per batch


def random_translate(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad each image by ``padding`` and crop back to its size at an independent random offset."""
    if padding == 0:
        return images
    batch, channels, height, width = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    rows = dy[:, None] + torch.arange(height)  # (B, H)
    cols = dx[:, None] + torch.arange(width)  # (B, W)
    index = torch.arange(batch)[:, None, None]
    # Advanced indexing gives (B, H, W, C); move channels back: (B, C, H, W).
    return padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the images horizontally."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def epoch_generator(seed: int, epoch: int, salt: int = 0) -> torch.Generator:
    """Return a CPU generator that depends only on ``(seed, epoch, salt)``."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7919 + salt)


def shard_length(size: int, rank: int, world_size: int, train: bool) -> int:
    """Return how many of ``size`` items process ``rank`` takes per epoch.

    Training drops the last ``size % world_size`` items of each epoch's shuffled order, so every
    process runs the same number of steps (DDP waits for every rank at each backward pass, and a
    rank with one extra batch would hang the run). Evaluation keeps every item exactly once, so
    shards may differ in length by one.
    """
    if train:
        return size // world_size
    return len(range(rank, size, world_size))


class TensorLoader:
    """Batches from in-memory uint8 images, augmented per batch; optionally one shard of several processes.

    Training batches hold ``batch_size // n_repetitions`` distinct images, each repeated
    ``n_repetitions`` times with its own random translation. An epoch covers every training image
    once, so ``n_repetitions`` multiplies the iterations per epoch. With ``world_size > 1`` each
    process takes every ``world_size``-th image of each global batch, with the augmentation the
    single-process run would draw, so a global step gets the same data at any world size
    (training drops the last ``len % world_size`` images of each epoch, see ``shard_length``).
    Evaluation shards are disjoint and cover each image exactly once.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        padding: int = 0,
        flip: bool = False,
        n_repetitions: int = 1,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.train = batch_size, train
        self.padding, self.flip, self.n_repetitions = padding, flip, n_repetitions
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        """Number of images this process trains or evaluates on per epoch (without repetitions)."""
        return shard_length(len(self.labels), self.rank, self.world_size, self.train)

    def _distinct_per_batch(self) -> int:
        return max(1, self.batch_size // self.n_repetitions) if self.train else self.batch_size

    def __len__(self) -> int:
        per_batch = self._distinct_per_batch()
        return (self.num_samples + per_batch - 1) // per_batch

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        per_batch = self._distinct_per_batch()
        if not self.train:
            order = torch.arange(len(self.labels))[self.rank :: self.world_size]
            for start in range(0, len(order), per_batch):
                index = order[start : start + per_batch]
                yield self._normalise(self.images[index]), self.labels[index]
            return

        generator = epoch_generator(self.seed, self.epoch)
        order = torch.randperm(len(self.labels), generator=generator)
        order = order[: self.num_samples * self.world_size]
        # Every process augments the whole global batch with the same random numbers as a
        # single-process run, then keeps its share: every world_size-th image with its repetitions.
        # So a step's images and augmentations do not depend on the world size.
        global_batch = per_batch * self.world_size
        for start in range(0, len(order), global_batch):
            index = order[start : start + global_batch]
            images, labels = self.images[index], self.labels[index]
            if self.n_repetitions > 1:
                images = images.repeat_interleave(self.n_repetitions, dim=0)
                labels = labels.repeat_interleave(self.n_repetitions, dim=0)
            images = random_translate(images, self.padding, generator)
            if self.flip:
                images = random_flip(images, generator)
            mine = torch.arange(len(index))[self.rank :: self.world_size]
            rows = (mine[:, None] * self.n_repetitions + torch.arange(self.n_repetitions)).reshape(-1)
            yield self._normalise(images[rows]), labels[rows]

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255.0 - self.mean) / self.std


# ----------------------------------------------------------------------------------------------
# Image folders


class TinyImageNetVal(Dataset):
    """TinyImageNet's original validation layout: ``val/images/*.JPEG`` with labels in ``val_annotations.txt``."""

    def __init__(self, folder: Path, class_to_idx: dict, transform: Optional[Callable] = None) -> None:
        from torchvision.datasets.folder import default_loader

        self.loader = default_loader
        self.transform = transform
        self.samples: List[Tuple[str, int]] = []
        for line in (folder / "val_annotations.txt").read_text().splitlines():
            parts = line.split("\t")
            if len(parts) < 2:
                continue
            if parts[1] not in class_to_idx:
                raise ValueError(f"{folder / 'val_annotations.txt'}: class {parts[1]!r} of {parts[0]} is not a train/ class")
            self.samples.append((str(folder / "images" / parts[0]), class_to_idx[parts[1]]))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        image = self.loader(path)
        return (self.transform(image) if self.transform else image), target


class Repeated(Dataset):
    """Return ``n`` independently transformed views of each image, stacked: ``(n, C, H, W)``."""

    def __init__(self, dataset: Dataset, n: int) -> None:
        self.dataset, self.n = dataset, n

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        views = [self.dataset[index] for _ in range(self.n)]
        return torch.stack([v[0] for v in views]), torch.tensor([v[1] for v in views])


def _flatten_repeats(batch):
    images = torch.cat([item[0] for item in batch])
    labels = torch.cat([item[1] for item in batch])
    return images, labels


class ShardSampler(Sampler[int]):
    """Seeded per-epoch order, split across processes like ``TensorLoader``'s.

    With ``shuffle`` (training) it splits like ``torch.utils.data.DistributedSampler(drop_last=True)``:
    equal shards, the last ``size % world_size`` items of the epoch's order dropped. Without it
    (evaluation) shards are disjoint, not padded, and cover every item exactly once.
    """

    def __init__(self, size: int, shuffle: bool, seed: int, rank: int, world_size: int) -> None:
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.size, generator=epoch_generator(self.seed, self.epoch)).tolist()
        else:
            order = list(range(self.size))
        return iter(order[self.rank :: self.world_size][: len(self)])

    def __len__(self) -> int:
        return shard_length(self.size, self.rank, self.world_size, self.shuffle)


class FolderLoader:
    """A ``DataLoader`` over an image-folder dataset with the same interface as ``TensorLoader``."""

    def __init__(self, dataset: Dataset, batch_size: int, train: bool, n_repetitions: int, seed: int,
                 workers: int, rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> None:
        self.n_repetitions = n_repetitions if train else 1
        if self.n_repetitions > 1:
            dataset = Repeated(dataset, self.n_repetitions)
        self.sampler = ShardSampler(len(dataset), train, seed, rank, world_size)  # type: ignore[arg-type]
        self.seed, self.rank = seed, rank
        self.generator = torch.Generator()
        self.loader = DataLoader(
            dataset, batch_size=max(1, batch_size // self.n_repetitions), sampler=self.sampler,
            num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0,
            collate_fn=_flatten_repeats if self.n_repetitions > 1 else None, generator=self.generator,
        )

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        # The DataLoader seeds its workers' augmentation from this generator. The rank is part of
        # the seed so that workers of different processes draw different crops and flips.
        self.generator.manual_seed(self.seed * 1_000_003 + epoch * 7919 + 1 + 104_729 * self.rank)

    @property
    def num_samples(self) -> int:
        return len(self.sampler)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


def _folder_transforms(dataset: str, scale: int, padding: int, mean, std):
    import torchvision.transforms as T

    normalise = [T.ToTensor(), T.Normalize(mean, std)]
    if dataset == "ImageNet":
        train = T.Compose([T.RandomResizedCrop(scale), T.RandomHorizontalFlip()] + normalise)
        evaluate = T.Compose([T.Resize(int(round(scale * 256 / 224))), T.CenterCrop(scale)] + normalise)
    else:
        resize = [T.Resize(scale)] if scale != 64 else []
        train = T.Compose(resize + [T.RandomCrop(scale, padding=padding), T.RandomHorizontalFlip()] + normalise)
        evaluate = T.Compose(resize + [T.CenterCrop(scale)] + normalise)
    return train, evaluate


def _load_folders(dataset: str, root: Path, train_tf, eval_tf):
    from torchvision.datasets import ImageFolder

    train_dir, val_dir = root / "train", root / "val"
    for folder in (train_dir, val_dir):
        if not folder.is_dir():
            raise DatasetNotFoundError(
                f"{dataset}: folder {folder} not found; --imagenet-path must point to a folder with train/ and "
                f"val/ subfolders (one subfolder per class in train/)"
            )
    train_set = ImageFolder(str(train_dir), transform=train_tf)
    if (val_dir / "val_annotations.txt").is_file():
        test_set: Dataset = TinyImageNetVal(val_dir, train_set.class_to_idx, eval_tf)
    else:
        test_set = ImageFolder(str(val_dir), transform=eval_tf)
        if test_set.class_to_idx != train_set.class_to_idx:
            raise ValueError(f"{dataset}: the class folders of {val_dir} differ from those of {train_dir}")
    return train_set, test_set


# ----------------------------------------------------------------------------------------------
# Entry point


@dataclass
class DataBundle:
    """Loaders and the facts about the data that the model needs."""

    train: object
    evaluation: object
    evaluation_split: str
    num_classes: int
    in_channels: int
    image_size: Tuple[int, int]


def default_root(config: RunConfig) -> Path:
    """Return the folder the dataset is read from."""
    if config.dataset in ("TinyImageNet", "ImageNet"):
        root = config.imagenet_path or config.data_root
        if root is None:
            raise DatasetNotFoundError(f"{config.dataset} needs --imagenet-path: a folder with train/ and val/ subfolders")
        return Path(root)
    if config.data_root:
        return Path(config.data_root)
    if config.dataset == "FashionMNIST" and not config.download:
        return Path(FASHION_MNIST_DEBIAN)
    return Path("data")


def _split(size: int, config: RunConfig) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Return training indices and, in validation mode, the held-out indices (seeded)."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(config.seed + 12345))
    if config.training_mode == "validation":
        if config.validation_size >= size:
            raise ValueError(
                f"validation_size {config.validation_size} must be smaller than the {size} training images")
        return order[config.validation_size :], order[: config.validation_size]
    return torch.arange(size), None


def _limit(indices: torch.Tensor, subset: Optional[int], seed: int) -> torch.Tensor:
    if subset is None or subset >= len(indices):
        return indices
    pick = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed + 777))[:subset]
    return indices[pick.sort().values]


def build_data(config: RunConfig, rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> DataBundle:
    """Build the training and evaluation loaders of a run.

    ``config.batch_size`` is the global batch: each of ``world_size`` processes gets
    ``batch_size // world_size`` images per step.
    """
    if config.batch_size % world_size:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the {world_size} processes")
    per_rank = config.batch_size // world_size
    if per_rank % config.n_repetitions:
        raise ValueError(
            f"the per-process batch {per_rank} (batch_size {config.batch_size} / {world_size} processes) is not "
            f"divisible by n_repetitions {config.n_repetitions}; choose a batch_size divisible by "
            f"{world_size * config.n_repetitions}")
    root = default_root(config)
    mean, std = NORMALISATION[config.dataset]
    split_name = "validation" if config.training_mode == "validation" else "test"

    if config.dataset in ("MNIST", "FashionMNIST", "CIFAR10", "CIFAR100"):
        load = load_mnist_like if config.dataset in ("MNIST", "FashionMNIST") else load_cifar
        if config.download:
            try:
                load(config.dataset, root, train=True)
            except DatasetNotFoundError:
                download(config.dataset, root)
        train_images, train_labels = load(config.dataset, root, train=True)
        train_index, held_out = _split(len(train_labels), config)
        if held_out is None:
            eval_images, eval_labels = load(config.dataset, root, train=False)
            eval_index = torch.arange(len(eval_labels))
        else:
            eval_images, eval_labels, eval_index = train_images, train_labels, held_out
        train_index = _limit(train_index, config.subset, config.seed)
        eval_index = _limit(eval_index, config.subset if config.subset_evaluation else None, config.seed + 1)
        natural = config.dataset.startswith("CIFAR")
        common = dict(mean=mean, std=std, seed=config.seed, rank=rank, world_size=world_size)
        train = TensorLoader(train_images[train_index], train_labels[train_index], per_rank, train=True,
                             padding=config.image_padding, flip=natural, n_repetitions=config.n_repetitions, **common)
        evaluation = TensorLoader(eval_images[eval_index], eval_labels[eval_index], per_rank, train=False, **common)
        channels, size = train_images.shape[1], tuple(train_images.shape[-2:])
        log.info("%s from %s: %d training and %d %s images", config.dataset, root, len(train_index), len(eval_index), split_name)
        return DataBundle(train, evaluation, split_name, NUM_CLASSES[config.dataset], channels, size)  # type: ignore[arg-type]

    scale = config.input_scale or (224 if config.dataset == "ImageNet" else 64)
    train_tf, eval_tf = _folder_transforms(config.dataset, scale, config.image_padding, mean, std)
    train_set, test_set = _load_folders(config.dataset, root, train_tf, eval_tf)
    num_classes = len(train_set.classes)
    train_index, held_out = _split(len(train_set), config)
    if held_out is not None:
        eval_source = copy.copy(train_set)
        eval_source.transform = eval_tf
        test_set = torch.utils.data.Subset(eval_source, held_out.tolist())
    train_index = _limit(train_index, config.subset, config.seed)
    train_subset = torch.utils.data.Subset(train_set, train_index.tolist())
    eval_index = _limit(torch.arange(len(test_set)), config.subset if config.subset_evaluation else None, config.seed + 1)
    test_subset = torch.utils.data.Subset(test_set, eval_index.tolist())
    common = dict(seed=config.seed, workers=config.workers, rank=rank, world_size=world_size, pin_memory=pin_memory)
    train = FolderLoader(train_subset, per_rank, True, config.n_repetitions, **common)
    evaluation = FolderLoader(test_subset, per_rank, False, 1, **common)
    log.info("%s from %s: %d training and %d %s images, %d classes", config.dataset, root, len(train_subset),
             len(test_subset), split_name, num_classes)
    return DataBundle(train, evaluation, split_name, num_classes, 3, (scale, scale))
