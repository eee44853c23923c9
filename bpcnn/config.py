"""One dataclass describes a training run; CLI flags, notebook parameters and the saved run config all map onto it.

Field names follow the reference code's flags (``--is-locally-connected`` is ``is_locally_connected``),
so its command lines work unchanged under ``python -m bpcnn train``. Defaults are the CIFAR
protocol of Pogodin et al. (NeurIPS 2021): AdamW, batch 512, lr 0.01, weight decay 1e-4, 200
epochs, lr x0.25 at epochs 100 and 150. The default dataset is Fashion-MNIST because Debian
packages it, so it needs no download.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

DATASETS = ("MNIST", "FashionMNIST", "CIFAR10", "CIFAR100", "TinyImageNet", "ImageNet")
EXPERIMENTS = ("resnet_cifar", "resnet18_imagenet")
OPTIMIZERS = ("SGD", "Adam", "AdamW")
TRAINING_MODES = ("test", "validation")

# Fields that may differ between a run folder's saved config and a resumed run: they change how
# the run executes or how long it lasts, not what it computes per epoch.
RESUMABLE_CHANGES = frozenset(
    {"n_epochs", "device", "workers", "stat_report_frequency", "checkpoint_frequency", "progress",
     "data_root", "imagenet_path", "experiment_folder", "run_dir", "download", "channels_last"}
)


def _help(text: str, **extra: Any) -> Dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class RunConfig:
    """Everything that defines a run. ``python -m bpcnn train --help`` lists the fields as flags."""

    # data
    dataset: str = field(default="FashionMNIST", metadata=_help(f"dataset: one of {', '.join(DATASETS)}"))
    data_root: Optional[str] = field(default=None, metadata=_help(
        "folder holding the dataset files (default: /usr/share/datasets/fashion-mnist for FashionMNIST, "
        "./data otherwise)"))
    imagenet_path: Optional[str] = field(default=None, metadata=_help(
        "folder with train/ and val/ subfolders for TinyImageNet and ImageNet (same as --data-root)"))
    download: bool = field(default=False, metadata=_help(
        "download MNIST, FashionMNIST or CIFAR with torchvision into --data-root when missing (needs internet)"))
    training_mode: str = field(default="test", metadata=_help(
        "'test': train on the whole training set and evaluate on the test set; 'validation': hold out "
        "--validation-size training images (seeded) and evaluate on them"))
    validation_size: int = field(default=5000, metadata=_help("images held out in validation mode"))
    subset: Optional[int] = field(default=None, metadata=_help(
        "use only N (seeded random) training and N evaluation images, for smoke runs"))
    subset_evaluation: bool = field(default=True, metadata=_help(
        "with --subset, limit the evaluation set too (--no-subset-evaluation evaluates on all of it)"))
    image_padding: int = field(default=4, metadata=_help("zero padding in pixels before the random crop"))
    n_repetitions: int = field(default=1, metadata=_help(
        "copies of each image per batch, each with its own random translation; a batch then holds "
        "batch_size / n_repetitions distinct images"))
    input_scale: Optional[int] = field(default=None, metadata=_help(
        "image side in pixels for TinyImageNet (default 64) and ImageNet (default 224)"))
    workers: int = field(default=0, metadata=_help("data-loader processes for image-folder datasets"))

    # model
    experiment: str = field(default="resnet_cifar", metadata=_help(f"network: one of {', '.join(EXPERIMENTS)}"))
    resnet_n: int = field(default=3, metadata=_help("blocks per stage of resnet_cifar (6n+2 layers; 3 is ResNet-20)"))
    resnet_cifar_width: int = field(default=16, metadata=_help("channels of the first stage of resnet_cifar"))
    resnet18_width_per_group: int = field(default=64, metadata=_help(
        "channels of the first stage of resnet18_imagenet (the paper uses 32)"))
    is_locally_connected: bool = field(default=False, metadata=_help("make the network locally connected"))
    n_first_conv: int = field(default=0, metadata=_help("keep the first N convolutions convolutional"))
    conv_1x1: bool = field(default=False, metadata=_help("keep 1x1 convolutions convolutional"))
    freeze_1x1: bool = field(default=False, metadata=_help("with --conv-1x1, do not train the 1x1 convolutions"))
    lc_deviation_eps: Optional[float] = field(default=None, metadata=_help(
        "near-convolutional LC initialisation: shared kernel plus this times independent noise"))

    # weight sharing
    share_weights: bool = field(default=False, metadata=_help(
        "share LC weights every --weight-sharing-frequency iterations (the sleep phase unless "
        "--instant-weight-sharing)"))
    instant_weight_sharing: bool = field(default=False, metadata=_help(
        "share by replacing kernels with their pool mean instead of running the sleep phase"))
    weight_sharing_frequency: int = field(default=10, metadata=_help("iterations between sharing events"))
    instant_exclude_border: bool = field(default=False, metadata=_help(
        "instant sharing leaves positions whose receptive field touches the padding unshared, as the sleep "
        "phase does (default: they are pooled, as in the reference)"))
    sleep_steps: int = field(default=100, metadata=_help("update steps per sleep phase"))
    sleep_batch_size: int = field(default=128, metadata=_help("random periodic inputs per sleep-phase step"))
    sleep_lr: float = field(default=0.1, metadata=_help("learning rate of the anti-Hebbian sleep-phase update"))
    sleep_gamma: float = field(default=1e-5, metadata=_help(
        "pull toward the kernels at the start of the sleep phase"))
    sleep_random_offset: bool = field(default=False, metadata=_help(
        "tile the sleep-phase inputs at a random offset each phase; the pools and the update's "
        "distribution stay the same, so this does not make neighbouring positions share"))
    sleep_alternate_period: bool = field(default=False, metadata=_help(
        "alternate the sleep-phase tiling period between k and k+1, so that over many phases all "
        "interior positions of a layer come to share (beyond the paper's fixed lateral wiring)"))

    # optimisation
    n_epochs: int = field(default=200, metadata=_help("training epochs"))
    batch_size: int = field(default=512, metadata=_help("images per optimiser step, summed over all processes"))
    optimizer: str = field(default="AdamW", metadata=_help(f"optimiser: one of {', '.join(OPTIMIZERS)}"))
    lr: float = field(default=0.01, metadata=_help("learning rate"))
    momentum: float = field(default=0.9, metadata=_help("SGD momentum"))
    weight_decay: float = field(default=1e-4, metadata=_help("weight decay"))
    epoch_decrease_lr: List[int] = field(default_factory=lambda: [100, 150], metadata=_help(
        "epochs after which the learning rate is multiplied by --lr-decay", nargs="*"))
    lr_decay: float = field(default=0.25, metadata=_help("factor applied to the learning rate at each milestone"))
    amp: bool = field(default=False, metadata=_help(
        "mixed precision: float16 with a gradient scaler on CUDA, bfloat16 autocast on CPU"))
    channels_last: bool = field(default=True, metadata=_help(
        "keep activations channels-last (NHWC in memory), the faster layout for conv and LC layers on the "
        "CPU; --no-channels-last keeps NCHW"))
    seed: int = field(default=0, metadata=_help("random seed of initialisation, data order and augmentation"))
    device: str = field(default="auto", metadata=_help("'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'"))

    # run folder and reporting
    experiment_folder: str = field(default="runs", metadata=_help("parent folder of run folders"))
    job_idx: str = field(default="0", metadata=_help("suffix that tells runs of one configuration apart"))
    run_dir: Optional[str] = field(default=None, metadata=_help(
        "run folder (default: EXPERIMENT_FOLDER/<dataset>_<experiment>_<variant>_<job-idx>)"))
    stat_report_frequency: int = field(default=1, metadata=_help(
        "evaluate every N epochs (and after the last one)"))
    checkpoint_frequency: int = field(default=50, metadata=_help(
        "keep a numbered checkpoint every N epochs; the latest state is saved after every epoch"))
    progress: bool = field(default=True, metadata=_help("show progress bars"))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field, its value and what is accepted."""
        choices = {"dataset": DATASETS, "experiment": EXPERIMENTS, "optimizer": OPTIMIZERS,
                   "training_mode": TRAINING_MODES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"invalid {name} {getattr(self, name)!r}: expected one of {', '.join(allowed)}")
        positive = ("batch_size", "n_epochs", "weight_sharing_frequency", "sleep_steps", "sleep_batch_size",
                    "n_repetitions", "stat_report_frequency", "checkpoint_frequency", "resnet_n",
                    "resnet_cifar_width", "resnet18_width_per_group")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"invalid {name} {getattr(self, name)}: expected an integer >= 1")
        for name in ("n_first_conv", "image_padding", "workers", "validation_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"invalid {name} {getattr(self, name)}: expected an integer >= 0")
        if self.subset is not None and self.subset < 1:
            raise ValueError(f"invalid subset {self.subset}: expected a number of images >= 1, or None for all")
        if self.batch_size % self.n_repetitions:
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible by n_repetitions {self.n_repetitions}: "
                "each batch holds batch_size / n_repetitions distinct images")
        if self.freeze_1x1 and not self.conv_1x1:
            raise ValueError("freeze_1x1 needs conv_1x1: only 1x1 layers kept convolutional can be frozen")
        if self.lr <= 0:
            raise ValueError(f"invalid lr {self.lr}: expected a positive learning rate")

    # naming and persistence

    @property
    def variant(self) -> str:
        """Short name of the model variant, e.g. ``conv``, ``lc``, ``lc_instant10``, ``lc_instant10_interior``, ``lc_sleep10``."""
        if not self.is_locally_connected:
            name = "conv"
        else:
            name = "lc"
            if self.share_weights:
                kind = "instant" if self.instant_weight_sharing else "sleep"
                name += f"_{kind}{self.weight_sharing_frequency}"
                if self.instant_weight_sharing and self.instant_exclude_border:
                    name += "_interior"
        if self.n_repetitions > 1:
            name += f"_rep{self.n_repetitions}"
        return name

    def resolved_run_dir(self) -> Path:
        """Return the run folder: ``run_dir`` if set, else one named after dataset, experiment, variant and job index."""
        if self.run_dir:
            return Path(self.run_dir)
        return Path(self.experiment_folder) / f"{self.dataset}_{self.experiment}_{self.variant}_{self.job_idx}"

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "RunConfig":
        """Build a config from a dict, rejecting unknown keys by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown run configuration keys {unknown}; valid keys are the fields of RunConfig "
                f"(see `python -m bpcnn train --help`)")
        return cls(**values)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "RunConfig":
        """Read a config saved by ``save`` (a run folder's ``config.json``)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"run config {path} not found; pass a run folder or its config.json")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"run config {path} is not valid JSON ({err}); fix or delete it") from err
        return cls.from_dict(values)

    def differences(self, other: "RunConfig") -> Dict[str, Any]:
        """Return ``{field: (self value, other value)}`` for fields that differ and may not change on resume."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k] and k not in RESUMABLE_CHANGES}


SHARING_MODES = ("none", "instant", "sleep")


def make_config(sharing: str = "none", **fields: Any) -> RunConfig:
    """Build a ``RunConfig`` from notebook-style parameters.

    ``sharing`` is ``'none'``, ``'instant'`` (pool means every ``weight_sharing_frequency``
    iterations) or ``'sleep'`` (the sleep phase at that frequency); it sets ``share_weights`` and
    ``instant_weight_sharing``. Every other keyword is a ``RunConfig`` field.
    """
    if sharing not in SHARING_MODES:
        raise ValueError(f"invalid sharing {sharing!r}: expected one of {', '.join(SHARING_MODES)}")
    fields.setdefault("share_weights", sharing != "none")
    fields.setdefault("instant_weight_sharing", sharing == "instant")
    return RunConfig.from_dict(fields)
