"""Sweep files, their expansion into runs, and execution through papermill (skip, resume, failure)."""

import json
import os
from pathlib import Path

import pytest
import yaml

from bpcnn import RunConfig, train
from bpcnn.__main__ import main
from bpcnn.config import make_config
from bpcnn.sweep import (SweepError, SweepRunner, completed_epochs, expand, load_sweep, notebook_parameters,
                         parse_sweep, plan, read_status)
from bpcnn.training import read_metrics
from conftest import make_mnist_folder

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / "sweeps").glob("*.yaml"))


def tiny_base(data_root, **fields):
    base = dict(dataset="FashionMNIST", data_root=str(data_root), resnet_n=1, resnet_cifar_width=4, subset=32,
                batch_size=16, n_epochs=1, epoch_decrease_lr=[1], device="cpu")
    base.update(fields)
    return base


def write_sweep(path, base, variants, seeds=(0,), name="tiny"):
    path.write_text(yaml.safe_dump({"name": name, "base": base, "variants": variants, "seeds": list(seeds)}))
    return path


# ----------------------------------------------------------------------------------------------
# Sweep files and expansion


def test_presets_expand_to_the_paper_grid():
    assert {p.name for p in PRESETS} >= {"paper_cifar10.yaml", "paper_cifar100.yaml", "paper_tinyimagenet.yaml",
                                         "paper_imagenet.yaml", "fashion_mnist_cpu.yaml"}
    for path in PRESETS:
        if path.name == "fashion_mnist_sleep.yaml":
            continue  # its own grid, checked below
        sweep = load_sweep(path)
        runs = expand(sweep, Path("runs"))
        models = {run.variant: run.config.variant for run in runs}
        assert models == {"conv": "conv", "lc": "lc", "lc_share1": "lc_instant1", "lc_share10": "lc_instant10",
                          "lc_share100": "lc_instant100", "lc_rep4": "lc_rep4"}, path.name
        assert len(sweep.seeds) >= 2, path.name


def test_sleep_preset_grid():
    sweep = load_sweep(REPO / "sweeps" / "fashion_mnist_sleep.yaml")
    runs = expand(sweep, Path("runs"))
    models = {run.variant: run.config.variant for run in runs}
    assert models == {"lc": "lc", "lc_sleep10": "lc_sleep10", "lc_instant10_interior": "lc_instant10_interior",
                      "lc_instant10": "lc_instant10"}
    assert sweep.seeds == [0, 1, 2]
    assert all(run.config.lc_deviation_eps == 0.1 for run in runs)
    assert all(run.config.image_padding == 4 for run in runs)


@pytest.mark.parametrize("name, dataset, batch, lr, weight_decay", [
    ("paper_cifar10", "CIFAR10", 512, 0.01, 1e-4),
    ("paper_cifar100", "CIFAR100", 512, 0.01, 1e-4),
    ("paper_tinyimagenet", "TinyImageNet", 512, 0.01, 1e-4),
    ("paper_imagenet", "ImageNet", 256, 5e-4, 1e-2),
])
def test_paper_presets_follow_protocol(name, dataset, batch, lr, weight_decay):
    config = expand(load_sweep(REPO / "sweeps" / f"{name}.yaml"), Path("runs"))[0].config
    assert config.dataset == dataset
    assert config.optimizer == "AdamW"
    assert config.batch_size == batch
    assert config.lr == lr
    assert config.weight_decay == weight_decay
    assert config.n_epochs == 200
    assert config.epoch_decrease_lr == [100, 150]
    assert config.lr_decay == 0.25
    assert config.amp
    if dataset == "ImageNet":
        assert (config.experiment, config.resnet18_width_per_group) == ("resnet18_imagenet", 32)
    else:
        assert (config.experiment, config.resnet_n, config.resnet_cifar_width) == ("resnet_cifar", 3, 16)


def test_expand_names_folders_and_seeds(tmp_path):
    sweep = parse_sweep({"base": tiny_base(tmp_path), "seeds": [3, 5],
                         "variants": {"conv": {}, "lc_sleep": {"is_locally_connected": True, "sharing": "sleep"}}},
                        default_name="grid")
    runs = expand(sweep, tmp_path / "runs")
    assert [run.name for run in runs] == ["conv_seed3", "lc_sleep_seed3", "conv_seed5", "lc_sleep_seed5"]
    assert runs[1].run_dir == tmp_path / "runs" / "grid" / "lc_sleep_seed3"
    assert runs[1].config.share_weights and not runs[1].config.instant_weight_sharing
    assert runs[2].config.seed == 5
    assert not runs[0].config.progress
    assert [run.name for run in expand(sweep, tmp_path, only=["lc_sleep", "conv_seed5"])] == [
        "lc_sleep_seed3", "conv_seed5", "lc_sleep_seed5"]


@pytest.mark.parametrize("data, message", [
    ({"variants": {"conv": {"lerning_rate": 1}}}, "unknown run configuration keys"),
    ({"variants": {"conv": {"sharing": "sometimes"}}}, "invalid sharing"),
    ({"variants": {"conv": {"batch_size": 0}}}, "invalid batch_size"),
    ({"variants": {}}, "at least one variant"),
    ({"variants": {"conv": {}}, "seeds": [0, 0]}, "seed twice"),
    ({"variants": {"conv": {}}, "seeds": "0"}, "list of integers"),
    ({"variants": {"conv": {"seed": 1}}}, "sets 'seed'"),
    ({"variants": {"a b": {}}}, "only letters"),
    ({"variants": {"conv": {}}, "grid": {}}, "unknown top-level keys"),
])
def test_invalid_sweep_raises(data, message):
    with pytest.raises(SweepError, match=message):
        parse_sweep(data, default_name="bad")


def test_only_unknown_name_raises(tmp_path):
    sweep = parse_sweep({"variants": {"conv": {}}}, default_name="grid")
    with pytest.raises(SweepError, match=r"--only names \['lcc'\].*variants are conv"):
        expand(sweep, tmp_path, only=["lcc"])


@pytest.mark.parametrize("fields", [
    dict(is_locally_connected=True, sharing="instant", weight_sharing_frequency=100, n_repetitions=4),
    dict(is_locally_connected=True, sharing="sleep", sleep_steps=7, training_mode="validation"),
    dict(experiment="resnet18_imagenet", dataset="ImageNet", resnet18_width_per_group=32, amp=True, subset=None),
    dict(is_locally_connected=False, resnet_cifar_width=12, lr_decay=0.5, progress=False),
])
def test_notebook_parameters_rebuild_config(fields):
    """The notebook's own make_config call on these parameters must give back the same config."""
    config = make_config(**{"run_dir": "runs/x", **fields})
    parameters = notebook_parameters(config)
    extra = parameters.pop("extra_config")
    width = parameters.pop("width")
    width_field = "resnet_cifar_width" if parameters["experiment"] == "resnet_cifar" else "resnet18_width_per_group"
    assert make_config(**parameters, **{width_field: width}, **extra) == config


def test_train_notebook_declares_parameters():
    """Every parameter the sweep passes exists in the training notebook's parameters cell."""
    notebook = json.loads((REPO / "notebooks" / "train.ipynb").read_text())
    cell = next(c for c in notebook["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    declared = {line.split("=")[0].strip() for line in "".join(cell["source"]).splitlines()
                if "=" in line and not line.startswith("#")}
    assert set(notebook_parameters(RunConfig(run_dir="x"))) <= declared


def test_workers_get_gpus_round_robin(tmp_path):
    runner = SweepRunner(workers=3, gpus=["4", "7"])
    assert [runner._environment(slot)["CUDA_VISIBLE_DEVICES"] for slot in range(3)] == ["4", "7", "4"]
    without_gpus = SweepRunner(workers=2, gpus=[])._environment(1)
    assert without_gpus.get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")
    with pytest.raises(SweepError, match="workers 0"):
        SweepRunner(workers=0)


def test_plan_reports_conflicting_config(tmp_path):
    sweep = parse_sweep({"base": tiny_base(tmp_path), "variants": {"conv": {}}}, default_name="grid")
    run = expand(sweep, tmp_path / "runs")[0]
    run.run_dir.mkdir(parents=True)
    changed = RunConfig.from_dict({**run.config.to_dict(), "lr": 0.5})
    changed.save(run.run_dir / "config.json")
    (item,) = plan([run])
    assert item.action == "conflict"
    assert "lr: 0.5 -> 0.01" in item.detail


# ----------------------------------------------------------------------------------------------
# Execution through papermill


@pytest.fixture(scope="module")
def executed_sweep(tmp_path_factory):
    """Two one-epoch runs and one run whose data folder is missing, executed by `python -m bpcnn sweep` with 2 workers."""
    root = tmp_path_factory.mktemp("sweep")
    data = make_mnist_folder(root / "fashion")
    sweep_file = write_sweep(root / "tiny.yaml", tiny_base(data), {
        "conv": {"is_locally_connected": False},
        "lc_share1": {"is_locally_connected": True, "sharing": "instant", "weight_sharing_frequency": 1},
        "broken": {"data_root": str(root / "missing")},
    })
    runs_dir = root / "runs"
    code = main(["sweep", str(sweep_file), "--runs-dir", str(runs_dir), "--workers", "2"])
    return {"root": root, "file": sweep_file, "runs": runs_dir / "tiny", "code": code}


def test_sweep_executes_notebooks(executed_sweep):
    for name in ("conv_seed0", "lc_share1_seed0"):
        run_dir = executed_sweep["runs"] / name
        assert len(read_metrics(run_dir)) == 1, name
        assert completed_epochs(run_dir) == 1, name
        assert read_status(run_dir)["state"] == "finished", name
        notebook = json.loads((run_dir / "train.ipynb").read_text())
        assert notebook["metadata"]["papermill"]["parameters"]["run_dir"] == str(run_dir)
    assert RunConfig.load(executed_sweep["runs"] / "lc_share1_seed0").variant == "lc_instant1"


def test_failed_run_is_recorded(executed_sweep):
    assert executed_sweep["code"] == 1
    run_dir = executed_sweep["runs"] / "broken_seed0"
    status = read_status(run_dir)
    assert status["state"] == "failed"
    assert status["variant"] == "broken"
    assert "not found" in status["error"]
    notebook = json.loads((run_dir / "train.ipynb").read_text())
    errors = [o for c in notebook["cells"] for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert errors and errors[0]["traceback"]


def test_rerun_skips_finished_runs(executed_sweep, capsys):
    runs = executed_sweep["runs"]
    stamps = {name: (runs / name / "checkpoints" / "last.pt").stat().st_mtime_ns for name in ("conv_seed0", "lc_share1_seed0")}
    logs = {name: (runs / name / "papermill.log").read_text() for name in stamps}
    code = main(["sweep", str(executed_sweep["file"]), "--runs-dir", str(runs.parent), "--only", "conv", "lc_share1"])
    assert code == 0
    assert "2 skipped (already finished)" in capsys.readouterr().out
    for name, stamp in stamps.items():
        assert (runs / name / "checkpoints" / "last.pt").stat().st_mtime_ns == stamp
        assert (runs / name / "papermill.log").read_text() == logs[name]  # papermill was not started


def test_dry_run_lists_actions(executed_sweep, capsys):
    assert main(["sweep", str(executed_sweep["file"]), "--runs-dir", str(executed_sweep["runs"].parent),
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "finished" in lines["conv_seed0"]
    assert "last attempt failed" in lines["broken_seed0"]


def test_interrupted_run_resumes(tmp_path, fashion_root):
    """Epoch 1 trained directly stands for a sweep killed after one epoch; the sweep trains only epoch 2."""
    base = tiny_base(fashion_root, n_epochs=2, epoch_decrease_lr=[2])
    sweep_file = write_sweep(tmp_path / "resume.yaml", base, {"lc": {"is_locally_connected": True}})
    (run,) = expand(load_sweep(sweep_file), tmp_path / "runs")
    first = RunConfig.from_dict({**run.config.to_dict(), "n_epochs": 1})
    train(first)
    epoch_one = read_metrics(run.run_dir)[0]

    (item,) = plan([run])
    assert (item.action, item.epochs_done) == ("resume", 1)
    assert main(["sweep", str(sweep_file), "--runs-dir", str(tmp_path / "runs")]) == 0
    metrics = read_metrics(run.run_dir)
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert metrics[0] == epoch_one  # epoch 1 was not trained again
    assert "resuming" in (run.run_dir / "train.ipynb").read_text()
