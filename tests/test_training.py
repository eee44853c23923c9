"""Training loop, checkpoints and resume, the command line and the training notebook."""

import json
from pathlib import Path

import pytest
import torch

from bpcnn import RunConfig, train
from bpcnn.__main__ import main
from bpcnn.training import CheckpointError, load_checkpoint, read_metrics

REPO = Path(__file__).resolve().parents[1]


def _config(root, run_dir, **kwargs):
    defaults = dict(dataset="FashionMNIST", data_root=str(root), resnet_n=1, resnet_cifar_width=4, batch_size=16,
                    n_epochs=2, lr=0.01, epoch_decrease_lr=[1], run_dir=str(run_dir), progress=False, device="cpu")
    defaults.update(kwargs)
    return RunConfig(**defaults)


def test_one_epoch_lowers_loss(fashion_root, tmp_path):
    config = _config(fashion_root, tmp_path / "run", n_epochs=3, lr=0.02)
    metrics = train(config).metrics
    assert len(metrics) == 3
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert metrics[0]["eval_top1"] is not None


def test_run_folder_contents(fashion_root, tmp_path):
    config = _config(fashion_root, tmp_path / "run", n_epochs=2, is_locally_connected=True, share_weights=True,
                     instant_weight_sharing=True, weight_sharing_frequency=2, checkpoint_frequency=1)
    train(config)
    run = tmp_path / "run"
    assert RunConfig.load(run) == config
    records = read_metrics(run)
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[0]["sharing_events"] == 3  # 6 steps per epoch, sharing every 2
    assert set(records[0]["snr"])
    assert all(isinstance(v, float) for v in records[0]["snr"].values())
    assert (run / "checkpoints" / "epoch_0001.pt").is_file()
    assert (run / "checkpoints" / "last.pt").is_file()


def test_resume_matches_uninterrupted_run(fashion_root, tmp_path):
    whole = train(_config(fashion_root, tmp_path / "whole", is_locally_connected=True, share_weights=True,
                          instant_weight_sharing=True, weight_sharing_frequency=4))
    interrupted = _config(fashion_root, tmp_path / "parts", is_locally_connected=True, share_weights=True,
                          instant_weight_sharing=True, weight_sharing_frequency=4, n_epochs=1)
    train(interrupted)
    interrupted.n_epochs = 2
    resumed = train(interrupted)
    for a, b in zip(whole.metrics, resumed.metrics):
        for key in ("train_loss", "train_top1", "eval_loss", "eval_top1", "step", "lr", "snr"):
            assert a[key] == b[key], key
    for (name, a), (_, b) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_finished_run_is_not_trained_again(fashion_root, tmp_path, caplog):
    config = _config(fashion_root, tmp_path / "run", n_epochs=1)
    train(config)
    stamp = (tmp_path / "run" / "checkpoints" / "last.pt").stat().st_mtime_ns
    caplog.set_level("INFO")
    result = train(config)
    assert "already finished" in caplog.text
    assert len(result.metrics) == 1
    assert (tmp_path / "run" / "checkpoints" / "last.pt").stat().st_mtime_ns == stamp


def test_truncated_checkpoint_raises_clear_error(fashion_root, tmp_path):
    config = _config(fashion_root, tmp_path / "run", n_epochs=1)
    train(config)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"last\.pt is corrupt or truncated.*delete"):
        load_checkpoint(last)
    config.n_epochs = 2
    with pytest.raises(CheckpointError, match="corrupt"):
        train(config)


def test_changed_config_in_same_folder_is_rejected(fashion_root, tmp_path):
    train(_config(fashion_root, tmp_path / "run", n_epochs=1))
    with pytest.raises(ValueError, match=r"different configuration \(lr: 0\.01 -> 0\.5\)"):
        train(_config(fashion_root, tmp_path / "run", n_epochs=1, lr=0.5))


def test_cli_reference_command_line(fashion_root, tmp_path, capsys):
    folder = tmp_path / "experiments"
    argv = ("train --dataset FashionMNIST --experiment resnet_cifar --amp --experiment-folder {folder} --job-idx final "
            "--n-epochs 1 --epoch-decrease-lr 100 150 --optimizer AdamW --batch-size 32 --lr 0.01 --weight-decay 0.0001 "
            "--is-locally-connected --share-weights --instant-weight-sharing --weight-sharing-frequency 10 "
            "--training-mode test --stat-report-frequency 10 --checkpoint-frequency 50 "
            "--data-root {root} --subset 32 --device cpu --resnet-n 1 --resnet-cifar-width 4 --no-progress")
    assert main(argv.format(folder=folder, root=fashion_root).split()) == 0
    run = folder / "FashionMNIST_resnet_cifar_lc_instant10_final"
    saved = json.loads((run / "config.json").read_text())
    assert saved["amp"]
    assert saved["is_locally_connected"]
    assert saved["epoch_decrease_lr"] == [100, 150]
    assert read_metrics(run)[0]["eval_top1"] is not None
    assert "test top-1" in capsys.readouterr().out


def test_cli_config_file_with_override(fashion_root, tmp_path):
    first = _config(fashion_root, tmp_path / "a", n_epochs=1)
    first.save(tmp_path / "config.json")
    assert main(["train", "--config", str(tmp_path / "config.json"), "--run-dir", str(tmp_path / "b")]) == 0
    assert RunConfig.load(tmp_path / "b").lr == first.lr


def test_cli_reports_unknown_dataset(capsys):
    assert main(["train", "--dataset", "SVHN"]) == 2
    assert "invalid dataset 'SVHN'" in capsys.readouterr().err


def test_notebook_runs_under_papermill(fashion_root, tmp_path):
    papermill = pytest.importorskip("papermill")
    run_dir = tmp_path / "nb_run"
    papermill.execute_notebook(
        str(REPO / "notebooks" / "train.ipynb"), str(tmp_path / "out.ipynb"), kernel_name="python3",
        progress_bar=False,
        parameters=dict(data_root=str(fashion_root), resnet_n=1, width=4, n_epochs=1, batch_size=16, subset=32,
                        run_dir=str(run_dir), device="cpu", sharing="instant", weight_sharing_frequency=1),
    )
    assert len(read_metrics(run_dir)) == 1
    assert (run_dir / "figures" / "learning_curves.png").is_file()
    assert (run_dir / "figures" / "snr.png").is_file()


def test_instant_sharing_border_option():
    from bpcnn.sharing import InstantSharing
    from bpcnn.training import build_weight_sharing

    fields = dict(is_locally_connected=True, share_weights=True, instant_weight_sharing=True)
    reference = RunConfig(**fields)
    interior = RunConfig(**fields, instant_exclude_border=True)
    schedule = build_weight_sharing(interior)
    assert isinstance(schedule, InstantSharing)
    assert schedule.exclude_border
    assert not build_weight_sharing(reference).exclude_border
    assert reference.variant == "lc_instant10"
    assert interior.variant == "lc_instant10_interior"


def test_sharing_that_cannot_act_warns(fashion_root, tmp_path, caplog):
    # 64 images in batches of 16 for 1 epoch: 4 iterations, fewer than the sharing frequency of 10.
    config = _config(fashion_root, tmp_path / "never", subset=64, n_epochs=1, is_locally_connected=True,
                     share_weights=True, instant_weight_sharing=True, weight_sharing_frequency=10)
    with caplog.at_level("WARNING", logger="bpcnn.training"):
        result = train(config)
    assert "fewer than --weight-sharing-frequency 10" in caplog.text
    assert result.metrics[-1]["sharing_events"] == 0

    caplog.clear()
    config = _config(fashion_root, tmp_path / "ignored", subset=64, n_epochs=1, is_locally_connected=True,
                     instant_weight_sharing=True)
    with caplog.at_level("WARNING", logger="bpcnn.training"):
        train(config)
    assert "no effect without --share-weights" in caplog.text
