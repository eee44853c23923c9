"""Distributed training: two gloo processes on 127.0.0.1, launched by torch.multiprocessing or torchrun.

The runs are tiny (ResNet-8 of width 4, 64 MNIST-format images): the file needs about 70 s of CPU
time, most of it spent starting Python processes that import torch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from bpcnn import RunConfig, train
from bpcnn import training
from bpcnn.data import ShardSampler, TensorLoader, build_data
from bpcnn.training import build_model, evaluate, load_checkpoint, read_metrics
from conftest import make_mnist_folder

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
N_TRAIN, N_TEST = 64, 21  # 21 evaluation images: not divisible by the 2 processes
WORKER_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _config(root: Path, run_dir: Path, **fields: Any) -> RunConfig:
    values = dict(dataset="MNIST", data_root=str(root), resnet_n=1, resnet_cifar_width=4, batch_size=16, n_epochs=2,
                  lr=0.01, epoch_decrease_lr=[1], run_dir=str(run_dir), progress=False, device="cpu",
                  is_locally_connected=True, share_weights=True, instant_weight_sharing=True,
                  weight_sharing_frequency=3)
    values.update(fields)
    return RunConfig(**values)


def _with_groupnorm(*args, **kwargs) -> nn.Module:
    """Build ``resnet_cifar`` with every BatchNorm replaced by GroupNorm, which normalises each image alone."""
    from bpcnn.models import resnet_cifar

    model = resnet_cifar(*args, **kwargs)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, child_name, nn.GroupNorm(1, child.num_features))
    return model


def _train_worker(rank: int, world_size: int, port: int, configs: List[Dict[str, Any]], out: str,
                  groupnorm: bool) -> None:
    """Train ``configs[rank]`` as one rank of a gloo group; save this rank's weights, metrics and evaluation."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if groupnorm:
        training.resnet_cifar = _with_groupnorm
    try:
        run_config = RunConfig.from_dict(configs[rank])
        result = train(run_config)
        shard = build_data(run_config, rank, world_size).evaluation
        summary = evaluate(result.model, shard, torch.device("cpu"))
        torch.save({"state": result.model.state_dict(), "metrics": result.metrics, "evaluation": summary,
                    "shard_samples": shard.num_samples}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn_two(config: RunConfig, out: Path, groupnorm: bool = False, rank1_config: Optional[RunConfig] = None) -> list:
    """Run ``_train_worker`` on two processes (rank 1 with ``rank1_config`` if given); return each rank's results."""
    configs = [config.to_dict(), (rank1_config or config).to_dict()]
    context = mp.spawn(_train_worker, args=(2, _free_port(), configs, str(out), groupnorm), nprocs=2, join=False)
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"two-process training did not finish within {WORKER_TIMEOUT_S} s (a rank is hanging)")
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


def _assert_tensors_equal(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory) -> Path:
    return make_mnist_folder(tmp_path_factory.mktemp("mnist"), n_train=N_TRAIN, n_test=N_TEST)


# --- data sharding, no processes needed ---------------------------------------------------------


def _loader(world_size: int, rank: int, n_images: int, train: bool = True) -> TensorLoader:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_images, 3, 8, 8), dtype=torch.uint8, generator=generator)
    labels = torch.arange(n_images)
    loader = TensorLoader(images, labels, batch_size=8 // world_size, mean=(0.5,) * 3, std=(0.25,) * 3,
                          train=train, padding=2, flip=True, n_repetitions=2, seed=5, rank=rank,
                          world_size=world_size)
    loader.set_epoch(3)
    return loader


def test_global_batches_independent_of_world_size():
    single = list(_loader(1, 0, 36))
    shards = [list(_loader(2, rank, 36)) for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(single) == 9
    for step, (images, labels) in enumerate(single):
        # Rank r gets distinct images r, r + 2, ... of the global batch, each with its 2 repetitions.
        pairs = [(shard[step][0].view(-1, 2, 3, 8, 8), shard[step][1].view(-1, 2)) for shard in shards]
        merged_images = torch.stack([pairs[0][0], pairs[1][0]], dim=1).reshape(images.shape)
        merged_labels = torch.stack([pairs[0][1], pairs[1][1]], dim=1).reshape(labels.shape)
        assert torch.equal(merged_labels, labels), step
        assert torch.equal(merged_images, images), step


def test_training_shards_have_equal_steps():
    # Without the dropped tail, 33 images would give one rank 17 images (3 batches of 8) and the
    # other 16 (2 batches), so DDP would hang. 37 images would give 19 against 18 images.
    for n_images in (33, 37):
        shards = [_loader(2, rank, n_images) for rank in range(2)]
        assert shards[0].num_samples == shards[1].num_samples == n_images // 2
        assert len(list(shards[0])) == len(list(shards[1])) == len(shards[0])
        samplers = [ShardSampler(n_images, shuffle=True, seed=1, rank=rank, world_size=2) for rank in range(2)]
        assert len(samplers[0]) == len(samplers[1]) == n_images // 2
        assert not set(samplers[0]) & set(samplers[1])


def test_evaluation_shards_cover_each_image_once():
    for n_images in (33, 37):
        shards = [_loader(2, rank, n_images, train=False) for rank in range(2)]
        labels = torch.cat([labels for shard in shards for _, labels in shard])
        assert sorted(labels.tolist()) == list(range(n_images))
        samplers = [ShardSampler(n_images, shuffle=False, seed=1, rank=rank, world_size=2) for rank in range(2)]
        assert sorted(list(samplers[0]) + list(samplers[1])) == list(range(n_images))


def test_batch_not_divisible_by_repetitions_per_rank(mnist_root, tmp_path):
    config = _config(mnist_root, tmp_path / "run", batch_size=4, n_repetitions=4)
    build_data(config, rank=0, world_size=1)
    with pytest.raises(ValueError, match="per-process batch 2"):
        build_data(config, rank=0, world_size=2)


# --- two training processes -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sharing", ["instant", "sleep"])
def test_two_ranks_bit_identical(sharing, mnist_root, tmp_path):
    fields = {"instant": {}, "sleep": dict(instant_weight_sharing=False, sleep_steps=5, sleep_batch_size=8)}[sharing]
    config = _config(mnist_root, tmp_path / "run", **fields)
    ranks = _spawn_two(config, tmp_path)

    _assert_tensors_equal(ranks[0]["state"], ranks[1]["state"])  # parameters and BatchNorm buffers
    records = read_metrics(tmp_path / "run")
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[-1]["sharing_events"] == 1  # steps 5 to 8, sharing every 3 steps
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert checkpoint["world_size"] == 2
    _assert_tensors_equal(checkpoint["model"], ranks[0]["state"])

    # Evaluation on 21 images: shards of 11 and 10, summed once each, as one process evaluates them.
    assert [r["shard_samples"] for r in ranks] == [11, 10]
    assert ranks[0]["evaluation"]["samples"] == N_TEST
    model = build_model(config, 1, (28, 28), 10)
    model.load_state_dict(checkpoint["model"])
    single = evaluate(model, build_data(config).evaluation, torch.device("cpu"))
    assert single["samples"] == N_TEST
    assert records[-1]["eval_top1"] == single["top1"]
    assert records[-1]["eval_top5"] == single["top5"]
    assert records[-1]["eval_loss"] == pytest.approx(single["loss"], rel=1e-5)


@pytest.mark.slow
def test_two_ranks_match_one_process(mnist_root, tmp_path, monkeypatch):
    # With GroupNorm in place of BatchNorm, DDP's averaged gradient of two 8-image halves equals
    # the 16-image gradient, so the runs agree up to float rounding. With BatchNorm each rank
    # normalises over its own 8 images and the runs differ by design.
    fields = dict(image_padding=4, n_repetitions=2, weight_sharing_frequency=2)
    two_ranks = _spawn_two(_config(mnist_root, tmp_path / "two", **fields), tmp_path, groupnorm=True)
    monkeypatch.setattr(training, "resnet_cifar", _with_groupnorm)
    one_rank = train(_config(mnist_root, tmp_path / "one", **fields))
    initial = build_model(_config(mnist_root, tmp_path / "init", **fields), 1, (28, 28), 10).state_dict()

    single = one_rank.model.state_dict()
    assert not any("running_mean" in name for name in single)
    for name, value in single.items():
        assert not torch.allclose(value, initial[name], atol=1e-4), f"{name} did not train"
        # atol 5e-5: AdamW divides each gradient entry by its own running size, so an entry whose
        # gradient is near zero moves by an amount that float rounding decides (seen: 1.1e-5).
        torch.testing.assert_close(two_ranks[0]["state"][name], value, rtol=1e-4, atol=5e-5, msg=name)
    assert [r["step"] for r in two_ranks[0]["metrics"]] == [r["step"] for r in one_rank.metrics] == [8, 16]


@pytest.mark.slow
def test_ranks_resuming_different_epochs_raise(mnist_root, tmp_path):
    # Two nodes without a shared filesystem: rank 0 finds a checkpoint of epoch 1, rank 1 none.
    train(_config(mnist_root, tmp_path / "rank0", n_epochs=1))
    with pytest.raises(Exception, match="processes disagree on the epoch to resume from"):
        _spawn_two(_config(mnist_root, tmp_path / "rank0"), tmp_path,
                   rank1_config=_config(mnist_root, tmp_path / "rank1"))
    assert not (tmp_path / "rank1" / "checkpoints").exists()


# --- the command line under torchrun -----------------------------------------------------------


def _cli(run_dir: Path, root: Path, n_epochs: int, processes: int, log_dir: Path) -> subprocess.CompletedProcess:
    """Run ``python -m bpcnn train``, under torchrun when ``processes > 1``."""
    if processes > 1:
        launcher = [str(TORCHRUN), "--nnodes", "1", "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1",
                    "--master_port", str(_free_port()), "--log-dir", str(log_dir), "--redirects", "3", "-m", "bpcnn"]
    else:
        launcher = [sys.executable, "-m", "bpcnn"]
    if (run_dir / "config.json").is_file():
        flags = ["--config", str(run_dir)]
    else:
        flags = ["--dataset", "MNIST", "--data-root", str(root), "--resnet-n", "1", "--resnet-cifar-width", "4",
                 "--batch-size", "16", "--lr", "0.01", "--device", "cpu", "--is-locally-connected",
                 "--share-weights", "--instant-weight-sharing", "--weight-sharing-frequency", "3",
                 "--run-dir", str(run_dir)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(launcher + ["train"] + flags + ["--n-epochs", str(n_epochs)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)


@pytest.mark.slow
def test_torchrun_resume_across_world_sizes(mnist_root, tmp_path):
    if not TORCHRUN.is_file():
        pytest.skip(f"torchrun not found next to {sys.executable}")
    run_dir = tmp_path / "run"
    steps_per_epoch = N_TRAIN // 16
    for n_epochs, processes in ((1, 2), (2, 1), (3, 2)):
        done = _cli(run_dir, mnist_root, n_epochs, processes, tmp_path / f"logs{n_epochs}")
        assert done.returncode == 0, done.stderr[-3000:]
        checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.pt")
        assert checkpoint["world_size"] == processes
        assert checkpoint["epoch"] == n_epochs
        assert checkpoint["step"] == n_epochs * steps_per_epoch
        records = read_metrics(run_dir)
        assert [r["epoch"] for r in records] == list(range(1, n_epochs + 1))
        assert records[-1]["step"] == n_epochs * steps_per_epoch
        assert not list(run_dir.rglob("*.tmp"))

    # torchrun --redirects 3 writes each rank's stdout and stderr under the log folder; rank 1 logs
    # warnings only, rank 0 logs the epochs.
    rank_logs = {path.parent.name: path.read_text() for path in (tmp_path / "logs3").rglob("stderr.log")}
    assert set(rank_logs) == {"0", "1"}
    assert "epoch 3/3" in rank_logs["0"]
    assert "resuming" in rank_logs["0"]
    assert " INFO " not in rank_logs["1"]
    assert json.loads((run_dir / "config.json").read_text())["n_epochs"] == 3
