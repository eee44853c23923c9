"""Results tables read from hand-written run folders, the check of the expected ordering, and the figures notebook."""

import json
from pathlib import Path

import pandas as pd
import pytest

from bpcnn import RunConfig
from bpcnn.config import make_config
from bpcnn.results import (check_ordering, model_label, read_runs, runs_table, snr_table, summarize,
                           summary_markdown, write_summary)

REPO = Path(__file__).resolve().parents[1]

# (variant, sharing fields, {seed: final test top-1}); each run has 2 epochs.
VARIANTS = [
    ("conv", dict(is_locally_connected=False), {0: 0.90, 1: 0.88}),
    ("lc", dict(is_locally_connected=True), {0: 0.80, 1: 0.76}),
    ("lc_share1", dict(is_locally_connected=True, sharing="instant", weight_sharing_frequency=1), {0: 0.87, 1: 0.86}),
    ("lc_share10", dict(is_locally_connected=True, sharing="instant", weight_sharing_frequency=10), {0: 0.85, 1: 0.84}),
    ("lc_rep4", dict(is_locally_connected=True, n_repetitions=4), {0: 0.82, 1: 0.84}),
]


def write_run(run_dir, config, finals, n_done=None, status=None):
    """Write config.json and metrics.jsonl by hand: epoch 1 at final - 0.1, epoch 2 at final."""
    run_dir.mkdir(parents=True)
    config.save(run_dir / "config.json")
    records = []
    for epoch in range(1, (config.n_epochs if n_done is None else n_done) + 1):
        top1 = finals - 0.1 * (config.n_epochs - epoch)
        snr = {"stem.conv": 0.5 * epoch, "stages.0.conv1": 2.0 * epoch} if config.is_locally_connected else {}
        records.append({"epoch": epoch, "step": 10 * epoch, "lr": 0.01, "train_loss": 1.0 / epoch,
                        "train_top1": top1, "train_top5": 1.0, "train_seconds": 2.0, "sharing_seconds": 0.5,
                        "sharing_events": 0, "eval_split": "test", "eval_loss": 0.5, "eval_top1": top1,
                        "eval_top5": min(1.0, top1 + 0.05), "snr": snr})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if status is not None:
        (run_dir / "status.json").write_text(json.dumps(status))


@pytest.fixture
def runs_root(tmp_path):
    root = tmp_path / "runs"
    for variant, fields, finals in VARIANTS:
        for seed, final in finals.items():
            config = make_config(n_epochs=2, seed=seed, run_dir=str(root / "grid" / f"{variant}_seed{seed}"), **fields)
            write_run(Path(config.run_dir), config, final,
                      status={"sweep": "grid", "variant": variant, "seed": seed, "state": "finished"})
    # An unfinished run (1 of 2 epochs), which the table must leave out.
    config = make_config(n_epochs=2, seed=2, run_dir=str(root / "grid" / "conv_seed2"))
    write_run(Path(config.run_dir), config, 0.10, n_done=1)
    # A folder written without a sweep (no status.json): named after its parent and RunConfig.variant.
    config = make_config(n_epochs=2, dataset="CIFAR10", is_locally_connected=True, run_dir=str(root / "other" / "x"))
    write_run(Path(config.run_dir), config, 0.60)
    return root


def test_runs_table_reads_folders(runs_root):
    runs = runs_table(read_runs(runs_root))
    assert len(runs) == 12
    row = runs[(runs["variant"] == "lc_share10") & (runs["seed"] == 1)].iloc[0]
    assert row["top1"] == pytest.approx(84.0)
    assert row["top5"] == pytest.approx(89.0)
    assert row["model"] == "lc_instant10"
    assert row["train_seconds"] == pytest.approx(5.0)
    unfinished = runs[runs["seed"] == 2].iloc[0]
    assert not unfinished["finished"]
    other = runs[runs["sweep"] == "other"].iloc[0]
    assert (other["variant"], other["dataset"]) == ("lc", "CIFAR10")


def test_summary_means_over_seeds(runs_root):
    summary = summarize(runs_table(read_runs(runs_root)))
    grid = summary[summary["sweep"] == "grid"].set_index("variant")
    assert list(grid.index) == ["conv", "lc_share1", "lc_share10", "lc", "lc_rep4"]  # conv, share(1), share(10), LC, LC+rep
    assert grid.loc["conv", "top1_mean"] == pytest.approx(89.0)  # the unfinished seed 2 is left out
    assert grid.loc["conv", "seeds"] == 2
    assert grid.loc["lc", "top1_mean"] == pytest.approx(78.0)
    assert grid.loc["lc", "top1_std"] == pytest.approx(2.8284271, rel=1e-6)  # sample std of 80 and 76
    assert grid.loc["lc_rep4", "top5_mean"] == pytest.approx(88.0)
    other = summary[summary["sweep"] == "other"].iloc[0]
    assert other["seeds"] == 1
    assert pd.isna(other["top1_std"])


def test_ordering_check_reports_differences(runs_root):
    checks = {c.sweep: c for c in check_ordering(summarize(runs_table(read_runs(runs_root))))}
    grid = checks["grid"]
    pairs = {(c.better, c.worse): c for c in grid.comparisons}
    assert set(pairs) == {("conv", "lc_instant1"), ("lc_instant1", "lc_instant10"), ("lc_instant10", "lc"),
                          ("lc_rep4", "lc"), ("conv", "lc_rep4")}
    assert pairs[("conv", "lc_instant1")].difference == pytest.approx(2.5)
    assert pairs[("lc_rep4", "lc")].difference == pytest.approx(5.0)
    assert grid.holds
    assert grid.missing == ["lc_instant100"]
    assert "does not hold" not in grid.describe()
    assert checks["other"].comparisons == []


def test_ordering_check_detects_reversal(tmp_path):
    root = tmp_path / "runs"
    for variant, fields, final in [("conv", {}, 0.70), ("lc", dict(is_locally_connected=True), 0.75)]:
        config = make_config(n_epochs=2, run_dir=str(root / "flip" / variant), **fields)
        write_run(Path(config.run_dir), config, final)
    (check,) = check_ordering(summarize(runs_table(read_runs(root))))
    (comparison,) = check.comparisons
    assert comparison.difference == pytest.approx(-5.0)
    assert not check.holds
    assert "REVERSED" in check.describe()


def test_markdown_shows_paper_direction(runs_root):
    summary = summarize(runs_table(read_runs(runs_root)))
    text = summary_markdown(summary, check_ordering(summary))
    assert "| lc_share10 | 2 | 84.50 ± 0.71 |" in text
    cifar = text[text.index("## CIFAR10"):]
    assert "paper: conv > share(1) > share(10) > share(100) > LC" in cifar
    assert "top-5" not in text  # top-5 is shown for ImageNet only


def test_write_summary_csv_matches_folders(runs_root, tmp_path):
    summary = summarize(runs_table(read_runs(runs_root)))
    paths = write_summary(summary, check_ordering(summary), tmp_path / "figures")
    table = pd.read_csv(paths["csv"]).set_index("variant")
    assert table.loc["lc_share1", "top1_mean"] == pytest.approx(86.5)
    assert paths["markdown"].read_text().startswith("# Comparison")


def test_snr_table_has_lc_layers(runs_root):
    snr = snr_table(read_runs(runs_root))
    assert set(snr["model"]) == {"lc", "lc_instant1", "lc_instant10", "lc_rep4"}
    row = snr[(snr["sweep"] == "grid") & (snr["variant"] == "lc") & (snr["seed"] == 0) & (snr["epoch"] == 2) & (snr["layer"] == "stages.0.conv1")]
    assert row["snr"].tolist() == [4.0]


@pytest.mark.parametrize("model, label", [("conv", "conv"), ("lc", "LC"), ("lc_instant10", "LC+share(10)"),
                                          ("lc_sleep100", "LC+sleep(100)"), ("lc_instant1_rep4", "LC+share(1)+rep(4)")])
def test_model_label(model, label):
    assert model_label(model) == label


def test_missing_runs_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="run a sweep first"):
        read_runs(tmp_path / "nothing")


def test_figures_notebook_builds_table(runs_root, tmp_path):
    papermill = pytest.importorskip("papermill")
    out = tmp_path / "figures"
    papermill.execute_notebook(str(REPO / "notebooks" / "figures.ipynb"), str(tmp_path / "figures.ipynb"),
                               parameters={"runs_dir": str(runs_root), "output_dir": str(out)},
                               kernel_name="python3", progress_bar=False)
    table = pd.read_csv(out / "results_table.csv")
    grid = table[table["sweep"] == "grid"].set_index("variant")
    for variant, _, finals in VARIANTS:
        assert grid.loc[variant, "top1_mean"] == pytest.approx(100 * sum(finals.values()) / len(finals)), variant
        assert grid.loc[variant, "seeds"] == len(finals)
    for name in ("results_table.md", "results_accuracy.png", "results_repetitions.png",
                 "results_grid_FashionMNIST_test_accuracy.png", "results_grid_FashionMNIST_snr.png",
                 "results_other_CIFAR10_test_accuracy.png"):
        assert (out / name).is_file(), name
    executed = (tmp_path / "figures.ipynb").read_text()
    assert "the paper's ordering holds" in executed
