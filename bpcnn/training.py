"""Training and evaluation loop, run folders, checkpoints and resume.

A run folder holds ``config.json``, ``metrics.jsonl`` (one JSON object per epoch) and
``checkpoints/`` with ``last.pt`` (written after every epoch, for resume) and numbered copies
every ``checkpoint_frequency`` epochs. ``train(config)`` resumes from ``last.pt`` when it exists
and returns at once when the run has finished.

Under ``torchrun`` the loop runs with ``DistributedDataParallel``; only rank 0 writes files.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import time
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import RunConfig
from .convert import to_channels_last, to_locally_connected
from .data import DataBundle, build_data
from .models import resnet18, resnet_cifar
from .sharing import InstantSharing, WeightSharing, unwrap, weight_snrs

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read; the message names the file and what to do."""


# ----------------------------------------------------------------------------------------------
# Building blocks


def resolve_device(name: str) -> torch.device:
    """Return the device for ``'auto'``, ``'cpu'``, ``'cuda'`` or ``'cuda:N'``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def build_model(config: RunConfig, in_channels: int, image_size: Tuple[int, int], num_classes: int) -> nn.Module:
    """Build the network of ``config``, locally connected if requested (initialised from ``config.seed``)."""
    torch.manual_seed(config.seed)
    if config.experiment == "resnet_cifar":
        model: nn.Module = resnet_cifar(config.resnet_n, config.resnet_cifar_width, num_classes, in_channels)
    else:
        model = resnet18(config.resnet18_width_per_group, num_classes, in_channels)
    if config.is_locally_connected:
        example = torch.zeros(1, in_channels, *image_size)
        to_locally_connected(model, example, n_first_conv=config.n_first_conv, keep_1x1=config.conv_1x1,
                             freeze_1x1=config.freeze_1x1, deviation_eps=config.lc_deviation_eps)
    return model


def build_optimizer(config: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "SGD":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "Adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def build_scheduler(config: RunConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.MultiStepLR:
    """Multiply the learning rate by ``lr_decay`` after each epoch listed in ``epoch_decrease_lr``."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(config.epoch_decrease_lr), gamma=config.lr_decay)


def build_weight_sharing(config: RunConfig) -> Optional[WeightSharing]:
    """Return the sharing schedule of ``config``: None, instant sharing, or the sleep phase."""
    if not (config.is_locally_connected and config.share_weights):
        return None
    if config.instant_weight_sharing:
        return InstantSharing(config.weight_sharing_frequency, exclude_border=config.instant_exclude_border)
    from .sleep import SleepPhase

    return SleepPhase(
        frequency=config.weight_sharing_frequency, steps=config.sleep_steps, batch_size=config.sleep_batch_size,
        lr=config.sleep_lr, gamma=config.sleep_gamma, random_offset=config.sleep_random_offset, seed=config.seed,
        alternate_period=config.sleep_alternate_period,
    )


def _warn_about_sharing(config: RunConfig, sharing: Optional[WeightSharing], iterations: int) -> None:
    """Log a warning when the sharing flags of ``config`` cannot act as a user would expect."""
    if (config.instant_weight_sharing or config.instant_exclude_border) and not config.share_weights:
        log.warning("--instant-weight-sharing and --instant-exclude-border have no effect without --share-weights; "
                    "this run trains without weight sharing")
    if config.share_weights and not config.is_locally_connected:
        log.warning("--share-weights has no effect without --is-locally-connected; this run trains a conv net")
    if sharing is not None and iterations < sharing.frequency:
        log.warning("this run has %d iterations, fewer than --weight-sharing-frequency %d, so weights are never "
                    "shared; lower the frequency or train longer", iterations, sharing.frequency)


def autocast_context(device: torch.device, amp: bool):
    """float16 autocast on CUDA, bfloat16 on CPU, or nothing."""
    if not amp:
        return nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.preserve_format


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: Tuple[int, ...] = (1, 5)) -> List[int]:
    """Return how many targets are among the top-k logits, for each k (k capped at the class count)."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices  # (B, maxk)
    hits = top == targets[:, None]
    return [int(hits[:, : min(k, maxk)].any(dim=1).sum()) for k in ks]


# ----------------------------------------------------------------------------------------------
# Distributed helpers


def distributed_context(device_type: Optional[str] = None) -> Tuple[int, int, int]:
    """Return ``(rank, world_size, local_rank)``; initialise the process group when launched by torchrun.

    torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
    The backend is NCCL for ``device_type`` ``'cuda'`` (or, when it is None, whenever CUDA is
    available) and gloo otherwise.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    world_size = int(os.environ["WORLD_SIZE"])
    if world_size == 1:
        return 0, 1, 0
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() if device_type is None else device_type == "cuda"
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def _all_reduce_sum(values: List[float], device: torch.device) -> List[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every process.

    DDP broadcasts buffers at the start of each training forward pass, so after the epoch's last
    pass every rank holds running statistics of its own batch. Broadcasting them once more makes
    evaluation and the checkpoint use rank 0's statistics on every rank.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def _check_same_on_all_ranks(value: int, what: str, device: torch.device) -> None:
    """Raise ``RuntimeError`` on every rank if ``value`` differs between processes."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    extremes = torch.tensor([value, -value], dtype=torch.int64, device=device)
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    highest, lowest = int(extremes[0]), -int(extremes[1])
    if highest != lowest:
        raise RuntimeError(
            f"processes disagree on {what} (from {lowest} to {highest}); every node must see the same run "
            f"folder, so put it on a shared filesystem or copy checkpoints/last.pt to every node")


# ----------------------------------------------------------------------------------------------
# One epoch


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    amp: bool,
    sharing: Optional[WeightSharing],
    step: int,
    progress: bool = True,
    description: str = "train",
    channels_last: bool = False,
) -> Tuple[Dict[str, float], int]:
    """Train for one pass over ``loader``; return the epoch's metrics and the new optimiser step count.

    With ``channels_last`` the images are handed to the model channels-last (see ``to_channels_last``).
    """
    model.train()
    totals = [0.0, 0.0, 0.0, 0.0]  # loss sum, top-1 hits, top-5 hits, samples
    sharing_seconds, sharing_events = 0.0, 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=description, leave=False, disable=not progress, dynamic_ncols=True)
    for images, targets in bar:
        images = images.to(device, non_blocking=True, memory_format=_memory_format(channels_last))
        targets = targets.to(device, non_blocking=True)
        with autocast_context(device, amp):
            logits = model(images)
            loss = F.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        step += 1
        if sharing is not None:
            tick = time.perf_counter()
            if sharing(model, step):
                sharing_events += 1
                sharing_seconds += time.perf_counter() - tick
        batch = targets.shape[0]
        top1, top5 = topk_correct(logits.detach().float(), targets)
        totals[0] += float(loss.detach()) * batch
        totals[1] += top1
        totals[2] += top5
        totals[3] += batch
        bar.set_postfix(loss=f"{totals[0] / totals[3]:.3f}", acc=f"{totals[1] / totals[3]:.3f}")
    seconds = time.perf_counter() - start
    loss_sum, top1, top5, samples = _all_reduce_sum(totals, device)
    samples = max(samples, 1.0)
    metrics = {
        "train_loss": loss_sum / samples,
        "train_top1": top1 / samples,
        "train_top5": top5 / samples,
        "train_seconds": seconds - sharing_seconds,
        "sharing_seconds": sharing_seconds,
        "sharing_events": sharing_events,
    }
    return metrics, step


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, device: torch.device, amp: bool = False, progress: bool = False, channels_last: bool = False
) -> Dict[str, float]:
    """Return loss, top-1 and top-5 accuracy over ``loader`` (summed over all processes, each sample once)."""
    model.eval()
    totals = [0.0, 0.0, 0.0, 0.0]
    for images, targets in tqdm(loader, desc="evaluate", leave=False, disable=not progress, dynamic_ncols=True):
        images = images.to(device, non_blocking=True, memory_format=_memory_format(channels_last))
        targets = targets.to(device, non_blocking=True)
        with autocast_context(device, amp):
            logits = model(images)
        logits = logits.float()
        totals[0] += float(F.cross_entropy(logits, targets, reduction="sum"))
        top1, top5 = topk_correct(logits, targets)
        totals[1] += top1
        totals[2] += top5
        totals[3] += targets.shape[0]
    loss_sum, top1, top5, samples = _all_reduce_sum(totals, device)
    samples = max(samples, 1.0)
    return {"loss": loss_sum / samples, "top1": top1 / samples, "top5": top5 / samples, "samples": int(samples)}


# ----------------------------------------------------------------------------------------------
# Checkpoints


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(path: Path, state: Dict[str, Any]) -> None:
    """Write ``state`` to ``path`` through a temporary file, so a crash never leaves a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda tmp: torch.save(state, tmp))


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "step", "config", "rng")


def load_checkpoint(path: Path, map_location: Any = "cpu") -> Dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``; raise ``CheckpointError`` if it is damaged."""
    advice = f"delete {path} to restart the run from scratch, or restore the file from a backup"
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(err).__name__}: {err}); {advice}") from err
    if not isinstance(state, dict) or any(key not in state for key in CHECKPOINT_KEYS):
        missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
        raise CheckpointError(f"checkpoint {path} lacks the entries {missing}; it was not written by bpcnn. {advice}")
    return state


def _rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Reading a run folder


def read_metrics(run_dir: Path) -> List[Dict[str, Any]]:
    """Return the per-epoch records of a run folder's ``metrics.jsonl`` (empty if there is none)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class RunResult:
    """Result of ``train``: the run folder, its per-epoch metrics, and the trained model."""

    run_dir: Path
    metrics: List[Dict[str, Any]]
    model: Optional[nn.Module] = None
    finished: bool = True
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> Dict[str, Any]:
        """The last epoch's record that has an evaluation."""
        evaluated = [m for m in self.metrics if m.get("eval_top1") is not None]
        return evaluated[-1] if evaluated else {}


# ----------------------------------------------------------------------------------------------
# The run


def _prepare_run_dir(config: RunConfig, run_dir: Path, is_main: bool) -> None:
    saved = run_dir / "config.json"
    if saved.is_file():
        previous = RunConfig.load(saved)
        changed = previous.differences(config)
        if changed:
            details = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
            raise ValueError(
                f"run folder {run_dir} contains a run with a different configuration ({details}); "
                f"choose another --job-idx or --run-dir, or delete the folder to start over"
            )
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(saved, lambda tmp: config.save(tmp))


def train(config: RunConfig, progress: Optional[bool] = None) -> RunResult:
    """Train ``config``'s run in its run folder, resuming from its latest checkpoint; return the metrics.

    A run whose checkpoint already covers ``config.n_epochs`` epochs is reported as finished and
    not trained again.
    """
    device = resolve_device(config.device)
    rank, world_size, local_rank = distributed_context(device.type)
    is_main = rank == 0
    show = (config.progress if progress is None else progress) and is_main
    if not is_main:
        # Only rank 0 reports progress; other ranks log warnings and errors only.
        logging.getLogger("bpcnn").setLevel(logging.WARNING)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    run_dir = config.resolved_run_dir()
    # Data first, so that a missing dataset leaves no run folder behind.
    data: DataBundle = build_data(config, rank, world_size, pin_memory=device.type == "cuda")
    _prepare_run_dir(config, run_dir, is_main)
    _barrier()
    last = run_dir / "checkpoints" / "last.pt"

    model = build_model(config, data.in_channels, data.image_size, data.num_classes).to(device)
    if config.channels_last:
        to_channels_last(model)
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp and device.type == "cuda")
    sharing = build_weight_sharing(config)
    _warn_about_sharing(config, sharing, len(data.train) * config.n_epochs)
    start_epoch, step = 0, 0
    metrics = read_metrics(run_dir)

    if last.is_file():
        state = load_checkpoint(last, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
        metrics = metrics[:start_epoch]
    elif metrics:
        log.warning("%s has metrics but no checkpoint; starting the run from scratch", run_dir)
        metrics = []
    _check_same_on_all_ranks(start_epoch, "the epoch to resume from", device)
    if start_epoch >= config.n_epochs:
        log.info("run %s already finished (%d of %d epochs); not training again", run_dir, start_epoch, config.n_epochs)
        return RunResult(run_dir, metrics, model, finished=True)
    if start_epoch > 0:
        log.info("resuming %s from epoch %d (step %d)", run_dir, start_epoch, step)
    wrapped: nn.Module = model
    if world_size > 1:
        # NOTE: BatchNorm normalises over each process's batch (batch_size / world_size images),
        # not over the global batch, so runs with different world sizes differ in their BatchNorm
        # statistics. nn.SyncBatchNorm would remove that difference, but in torch 2.14 it rejects
        # CPU tensors, so it could not be tested here and is not used.
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    n_params = sum(p.numel() for p in model.parameters())
    log.info("training %s (%s, %.2fM parameters) on %s for %d epochs into %s", config.variant, config.experiment,
             n_params / 1e6, device, config.n_epochs, run_dir)
    epochs = range(start_epoch, config.n_epochs)
    for epoch in tqdm(epochs, desc=f"{config.variant}", disable=not show, dynamic_ncols=True,
                      initial=start_epoch, total=config.n_epochs):
        data.train.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        record, step = train_one_epoch(wrapped, data.train, optimizer, scaler, device, config.amp, sharing, step,
                                       progress=show, description=f"epoch {epoch + 1}",
                                       channels_last=config.channels_last)
        scheduler.step()
        _broadcast_buffers(model)
        record = {"epoch": epoch + 1, "step": step, "lr": lr, **record}
        if (epoch + 1) % config.stat_report_frequency == 0 or epoch + 1 == config.n_epochs:
            tick = time.perf_counter()
            # The unwrapped model: DDP's forward may synchronise buffers, a collective call that
            # hangs when evaluation shards differ in their number of batches.
            result = evaluate(model, data.evaluation, device, config.amp, channels_last=config.channels_last)
            record.update({"eval_split": data.evaluation_split, "eval_loss": result["loss"],
                           "eval_top1": result["top1"], "eval_top5": result["top5"],
                           "eval_seconds": time.perf_counter() - tick})
        else:
            record.update({"eval_split": data.evaluation_split, "eval_loss": None, "eval_top1": None, "eval_top5": None})
        record["snr"] = weight_snrs(model)
        metrics.append(record)
        log.info("epoch %d/%d: train loss %.4f, top-1 %.4f; %s top-1 %s; %.1f s training, %.1f s sharing",
                 epoch + 1, config.n_epochs, record["train_loss"], record["train_top1"], data.evaluation_split,
                 "-" if record["eval_top1"] is None else f"{record['eval_top1']:.4f}", record["train_seconds"],
                 record["sharing_seconds"])

        _barrier()
        if is_main:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch + 1,
                     "step": step, "config": config.to_dict(), "rng": _rng_state(), "world_size": world_size}
            _atomic_write(run_dir / "metrics.jsonl",
                          lambda tmp: tmp.write_text("".join(json.dumps(m) + "\n" for m in metrics)))
            save_checkpoint(last, state)
            if (epoch + 1) % config.checkpoint_frequency == 0:
                save_checkpoint(run_dir / "checkpoints" / f"epoch_{epoch + 1:04d}.pt", state)
        _barrier()
    return RunResult(run_dir, metrics, model, finished=True)
