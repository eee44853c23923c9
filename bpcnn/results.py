"""Tables of results read from run folders: one row per run, per-epoch curves, and means over seeds.

Only the files a run writes are read (``config.json``, ``metrics.jsonl`` and, for sweep runs,
``status.json``), never executed notebooks. A run's variant is the sweep's variant name from
``status.json``. For folders that no sweep wrote it is ``RunConfig.variant`` (``conv``, ``lc``,
``lc_instant10``, ...), and the sweep is the name of the parent folder. Accuracies in the tables
are percentages.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pandas as pd

from .config import RunConfig

log = logging.getLogger(__name__)

# Directions of effect from Pogodin et al., "Towards Biologically Plausible Convolutional Networks"
# (NeurIPS 2021, arXiv 2106.13031): LC networks trail conv nets, and weight sharing brings them
# close to conv ("nearly convolutional performance on ImageNet"), more so the more often it runs.
# Translated copies of each image help LC but do not remove the gap.
# NOTE: only the direction of each effect is recorded here, not the paper's accuracies.
PAPER_ORDER = ("conv", "lc_instant1", "lc_instant10", "lc_instant100", "lc")
PAPER_FINDINGS = {
    "CIFAR10": "conv > share(1) > share(10) > share(100) > LC, LC several points below conv; "
               "LC+rep helps LC but trails conv",
    "CIFAR100": "conv > share(1) > share(10) > share(100) > LC, LC far below conv; LC+rep helps LC but trails conv",
    "TinyImageNet": "conv > share(1) > share(10) > share(100) > LC, LC far below conv; "
                    "LC+rep helps LC but trails conv",
    "ImageNet": "conv > share(1) > share(10) > share(100) > LC; frequent sharing is nearly convolutional, "
                "LC far below conv",
}

def paper_finding(dataset: str) -> str:
    """Return the paper's reported direction of effect on ``dataset``, or its CIFAR-10 finding for other datasets."""
    if dataset in PAPER_FINDINGS:
        return PAPER_FINDINGS[dataset]
    return f"no {dataset} result; on CIFAR-10 it reports {PAPER_FINDINGS['CIFAR10']}"


RUN_COLUMNS = ["sweep", "dataset", "variant", "model", "seed", "n_repetitions", "epochs_done", "n_epochs", "finished",
               "eval_split", "top1", "top5", "train_seconds", "state", "run_dir"]


def model_label(model: str) -> str:
    """Return a short label for ``RunConfig.variant``: ``conv``, ``LC``, ``LC+share(10)``, ``LC+sleep(10)``, ``LC+rep(4)``."""
    if model == "conv":
        return "conv"
    label = "LC"
    for part in model.split("_")[1:]:
        match = re.fullmatch(r"(instant|sleep|rep)(\d+)", part)
        if match is None:
            label += f"+{part}"
            continue
        kind, number = match.groups()
        label += {"instant": "+share", "sleep": "+sleep", "rep": "+rep"}[kind] + f"({number})"
    return label


# ----------------------------------------------------------------------------------------------
# Reading run folders


def find_run_dirs(root: Path) -> List[Path]:
    """Return every folder under ``root`` (``root`` included) that contains a ``config.json``, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"runs folder {root} not found; run a sweep first, e.g. "
                                f"`python -m bpcnn sweep sweeps/fashion_mnist_cpu.yaml`")
    return sorted(path.parent for path in root.rglob("config.json") if "checkpoints" not in path.parts)


@dataclass
class RunRecord:
    """One run folder's configuration, identity and per-epoch metrics."""

    run_dir: Path
    config: RunConfig
    sweep: str
    variant: str
    state: str
    metrics: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return len(self.metrics) >= self.config.n_epochs

    def final(self) -> Dict[str, Any]:
        """Return the last epoch record that has an evaluation (empty when none has)."""
        evaluated = [m for m in self.metrics if m.get("eval_top1") is not None]
        return evaluated[-1] if evaluated else {}


def read_run(run_dir: Path) -> RunRecord:
    """Read one run folder; raise ``ValueError`` naming the file when ``config.json`` or a metrics line is invalid."""
    run_dir = Path(run_dir)
    config = RunConfig.load(run_dir / "config.json")
    metrics_path = run_dir / "metrics.jsonl"
    metrics: List[Dict[str, Any]] = []
    if metrics_path.is_file():
        for number, line in enumerate(metrics_path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                metrics.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{metrics_path} line {number} is not valid JSON ({err}); fix or delete the line") from err
    status: Dict[str, Any] = {}
    status_path = run_dir / "status.json"
    if status_path.is_file():
        try:
            status = json.loads(status_path.read_text())
        except json.JSONDecodeError:
            log.warning("ignoring %s: not valid JSON", status_path)
    return RunRecord(run_dir=run_dir, config=config, sweep=str(status.get("sweep") or run_dir.parent.name),
                     variant=str(status.get("variant") or config.variant), state=str(status.get("state") or ""),
                     metrics=metrics)


def read_runs(root: Path) -> List[RunRecord]:
    """Read every run folder under ``root``; folders with an unreadable config are skipped with a warning."""
    records = []
    for run_dir in find_run_dirs(root):
        try:
            records.append(read_run(run_dir))
        except ValueError as err:
            log.warning("skipping %s: %s", run_dir, err)
    return records


def _percent(value: Optional[float]) -> float:
    return float("nan") if value is None else 100.0 * float(value)


def runs_table(records: Sequence[RunRecord]) -> pd.DataFrame:
    """Return one row per run: identity, progress and the final evaluation's top-1 and top-5 (%)."""
    rows = []
    for record in records:
        final = record.final()
        rows.append({
            "sweep": record.sweep, "dataset": record.config.dataset, "variant": record.variant,
            "model": record.config.variant, "seed": record.config.seed,
            "n_repetitions": record.config.n_repetitions, "epochs_done": len(record.metrics),
            "n_epochs": record.config.n_epochs, "finished": record.finished,
            "eval_split": final.get("eval_split", ""), "top1": _percent(final.get("eval_top1")),
            "top5": _percent(final.get("eval_top5")),
            "train_seconds": sum(m.get("train_seconds", 0.0) + m.get("sharing_seconds", 0.0) for m in record.metrics),
            "state": record.state, "run_dir": str(record.run_dir),
        })
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def epochs_table(records: Sequence[RunRecord]) -> pd.DataFrame:
    """Return one row per run and epoch with training and evaluation metrics (%)."""
    rows = []
    for record in records:
        for m in record.metrics:
            rows.append({
                "sweep": record.sweep, "dataset": record.config.dataset, "variant": record.variant,
                "model": record.config.variant, "seed": record.config.seed, "epoch": m["epoch"],
                "train_loss": m.get("train_loss"), "train_top1": _percent(m.get("train_top1")),
                "eval_top1": _percent(m.get("eval_top1")), "eval_top5": _percent(m.get("eval_top5")),
                "run_dir": str(record.run_dir),
            })
    return pd.DataFrame(rows, columns=["sweep", "dataset", "variant", "model", "seed", "epoch", "train_loss",
                                       "train_top1", "eval_top1", "eval_top5", "run_dir"])


def snr_table(records: Sequence[RunRecord]) -> pd.DataFrame:
    """Return one row per run, epoch and LC layer with the layer's weight SNR."""
    rows = []
    for record in records:
        for m in record.metrics:
            for layer, value in (m.get("snr") or {}).items():
                rows.append({"sweep": record.sweep, "dataset": record.config.dataset, "variant": record.variant,
                             "model": record.config.variant, "seed": record.config.seed, "epoch": m["epoch"],
                             "layer": layer, "snr": value})
    return pd.DataFrame(rows, columns=["sweep", "dataset", "variant", "model", "seed", "epoch", "layer", "snr"])


# ----------------------------------------------------------------------------------------------
# Means over seeds


def _variant_rank(model: str) -> Tuple[int, str]:
    order = list(PAPER_ORDER) + ["lc_rep"]
    for index, name in enumerate(order):
        if model == name or (name == "lc_rep" and model.startswith("lc_rep")):
            return index, model
    return len(order), model


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Return mean and sample standard deviation over seeds of the final top-1 and top-5 of finished runs.

    One row per sweep, dataset and variant, in the order conv, share(1), share(10), share(100),
    LC, LC+rep, then the rest. ``std`` is NaN for a single seed.
    """
    finished = runs[runs["finished"] & runs["top1"].notna()]
    columns = ["sweep", "dataset", "variant", "model", "label", "n_repetitions", "eval_split", "seeds",
               "top1_mean", "top1_std", "top5_mean", "top5_std", "train_seconds_mean"]
    if finished.empty:
        return pd.DataFrame(columns=columns)
    grouped = finished.groupby(["sweep", "dataset", "variant"], sort=False)
    summary = grouped.agg(
        model=("model", "first"), n_repetitions=("n_repetitions", "first"), eval_split=("eval_split", "first"),
        seeds=("seed", "count"), top1_mean=("top1", "mean"), top1_std=("top1", "std"),
        top5_mean=("top5", "mean"), top5_std=("top5", "std"), train_seconds_mean=("train_seconds", "mean"),
    ).reset_index()
    mixed = grouped["model"].nunique()
    for key in mixed[mixed > 1].index:
        log.warning("sweep %s, dataset %s, variant %s mixes model variants %s", *key,
                    sorted(finished.set_index(["sweep", "dataset", "variant"]).loc[key, "model"].unique()))
    summary["label"] = [model_label(m) if v == m else v for v, m in zip(summary["variant"], summary["model"])]
    summary["order"] = [_variant_rank(m) for m in summary["model"]]
    summary = summary.sort_values(["sweep", "dataset", "order"]).drop(columns="order").reset_index(drop=True)
    return summary[columns]


# ----------------------------------------------------------------------------------------------
# The paper's ordering


@dataclass
class Comparison:
    """One expected inequality ``better >= worse`` between two variants and how it came out."""

    better: str
    worse: str
    difference: float  # better mean - worse mean, in percentage points
    noise: float  # sqrt(std_better^2 + std_worse^2); NaN with one seed
    holds: bool

    def describe(self) -> str:
        noise = "" if math.isnan(self.noise) else f" (seed spread {self.noise:.2f})"
        verdict = "holds" if self.holds else "REVERSED"
        return f"{model_label(self.better)} - {model_label(self.worse)} = {self.difference:+.2f} points{noise}: {verdict}"


@dataclass
class OrderingCheck:
    """The paper's expected inequalities checked on one sweep and dataset."""

    sweep: str
    dataset: str
    observed: List[Tuple[str, float]]
    comparisons: List[Comparison]
    missing: List[str]

    @property
    def holds(self) -> bool:
        return bool(self.comparisons) and all(c.holds for c in self.comparisons)

    def observed_order(self) -> str:
        """Return the variants by decreasing mean top-1, e.g. ``conv 85.1 > LC+share(1) 84.0 > ...``."""
        ranked = sorted(self.observed, key=lambda item: -item[1])
        return " > ".join(f"{model_label(model)} {value:.2f}" for model, value in ranked)

    def describe(self) -> str:
        lines = [f"{self.dataset} ({self.sweep}): ours {self.observed_order()}"]
        lines.append(f"  paper: {paper_finding(self.dataset)}")
        lines += [f"  {c.describe()}" for c in self.comparisons]
        if self.missing:
            lines.append(f"  not run or not finished: {', '.join(model_label(m) for m in self.missing)}")
        lines.append("  the paper's ordering " + ("holds" if self.holds else "does not hold") +
                     ("" if self.comparisons else " (nothing to compare)"))
        return "\n".join(lines)


def _expected_pairs(models: Sequence[str]) -> List[Tuple[str, str]]:
    """Return the paper's inequalities among ``models``: neighbours in PAPER_ORDER, and LC < LC+rep < conv."""
    present = [m for m in PAPER_ORDER if m in models]
    pairs = list(zip(present, present[1:]))
    for model in models:
        if re.fullmatch(r"lc_rep\d+", model):
            if "lc" in models:
                pairs.append((model, "lc"))
            if "conv" in models:
                pairs.append(("conv", model))
    return pairs


def check_ordering(summary: pd.DataFrame) -> List[OrderingCheck]:
    """Check, per sweep and dataset, conv >= share(1) >= share(10) >= share(100) >= LC and LC < LC+rep < conv.

    Variants are matched by model (``RunConfig.variant``). When two variants of one dataset have
    the same model, that model is left out of the check, because either could stand for it.
    """
    checks = []
    for (sweep, dataset), group in summary.groupby(["sweep", "dataset"], sort=False):
        counts = group["model"].value_counts()
        unique = group[group["model"].map(counts) == 1]
        means = dict(zip(unique["model"], unique["top1_mean"]))
        spreads = dict(zip(unique["model"], unique["top1_std"]))
        comparisons = []
        for better, worse in _expected_pairs(list(means)):
            difference = means[better] - means[worse]
            noise = math.sqrt(spreads[better] ** 2 + spreads[worse] ** 2)
            comparisons.append(Comparison(better, worse, difference, noise, holds=difference >= 0))
        expected = list(PAPER_ORDER) + ["lc_rep4"]
        missing = [m for m in expected if m not in means]
        checks.append(OrderingCheck(str(sweep), str(dataset), list(means.items()), comparisons, missing))
    return checks


# ----------------------------------------------------------------------------------------------
# Writing the table


def _format(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def summary_markdown(summary: pd.DataFrame, checks: Sequence[OrderingCheck]) -> str:
    """Return the comparison as Markdown: a table per sweep and dataset, with the paper's direction of effect beside ours.

    Top-5 is shown for ImageNet only, as in the paper; the CSV has it for every dataset.
    """
    by_key = {(c.sweep, c.dataset): c for c in checks}
    sections = []
    for (sweep, dataset), group in summary.groupby(["sweep", "dataset"], sort=False):
        split = ", ".join(sorted(set(group["eval_split"]) - {""})) or "evaluation"
        header = ["variant", "seeds", f"{split} top-1 (%)"]
        if dataset == "ImageNet":
            header.append(f"{split} top-5 (%)")
        rows = []
        for _, row in group.iterrows():
            cells = [str(row["label"]), str(int(row["seeds"])), _format(row["top1_mean"], row["top1_std"])]
            if dataset == "ImageNet":
                cells.append(_format(row["top5_mean"], row["top5_std"]))
            rows.append(cells)
        lines = [f"## {dataset} ({sweep})", ""]
        lines += _markdown_table(header, rows)
        check = by_key.get((sweep, dataset))
        lines.append("")
        if check is not None:
            lines.append(f"- ours: {check.observed_order()}")
        lines.append(f"- paper: {paper_finding(dataset)}")
        if check is not None and check.comparisons:
            lines.append("- expected inequalities (mean difference in top-1 points; ± is the root sum of "
                         "squared seed standard deviations):")
            lines += [f"  - {c.describe()}" for c in check.comparisons]
        sections.append("\n".join(lines))
    intro = ("Mean ± sample standard deviation over seeds of the final top-1 accuracy of finished runs. "
             "Regenerated by notebooks/figures.ipynb from the run folders.")
    return "\n\n".join(["# Comparison of conv, LC and LC with weight sharing", intro, *sections]) + "\n"


def write_summary(summary: pd.DataFrame, checks: Sequence[OrderingCheck], output_dir: Path,
                  stem: str = "results_table") -> Dict[str, Path]:
    """Write the summary as ``<stem>.csv`` and ``<stem>.md`` into ``output_dir``; return both paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": output_dir / f"{stem}.csv", "markdown": output_dir / f"{stem}.md"}
    summary.to_csv(paths["csv"], index=False, float_format="%.4f")
    paths["markdown"].write_text(summary_markdown(summary, checks))
    return paths


__all__ = ["PAPER_ORDER", "PAPER_FINDINGS", "paper_finding", "RunRecord", "Comparison", "OrderingCheck", "model_label",
           "find_run_dirs", "read_run", "read_runs", "runs_table", "epochs_table", "snr_table", "summarize",
           "check_ordering", "summary_markdown", "write_summary"]
