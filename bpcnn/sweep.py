"""Sweeps: a YAML file of named variants and seeds, each run executed by the training notebook through papermill.

A sweep file contains a base configuration, named variants that override it, and a list of seeds::

    name: paper_cifar10          # optional; defaults to the file name without extension
    base: {dataset: CIFAR10, n_epochs: 200, ...}
    seeds: [0, 1, 2]
    variants:
      conv: {is_locally_connected: false}
      lc_share10: {is_locally_connected: true, sharing: instant, weight_sharing_frequency: 10}

Every key of ``base`` and of a variant is a ``RunConfig`` field, or ``sharing`` (``none``,
``instant`` or ``sleep``, as in ``make_config``). Run ``<variant>_seed<seed>`` lives in
``RUNS_DIR/<sweep name>/<variant>_seed<seed>/`` and keeps the executed notebook (``train.ipynb``),
papermill's log (``papermill.log``) and ``status.json`` (sweep, variant, seed, state and the error
of a failed attempt) beside what ``train`` writes there.

A run counts as finished when its ``checkpoints/last.pt`` covers ``n_epochs`` epochs; finished runs
are skipped without starting a kernel. Any other run is executed again, and ``train`` resumes it
from its last checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import yaml

from .config import RunConfig, make_config

log = logging.getLogger(__name__)

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "train.ipynb"
SWEEP_KEYS = ("name", "description", "base", "seeds", "variants")

# Parameters of the training notebook's ``parameters`` cell; every other RunConfig field goes
# into its ``extra_config`` dict. ``width`` maps onto the width field of the chosen experiment.
NOTEBOOK_FIELDS = ("dataset", "data_root", "experiment", "resnet_n", "is_locally_connected", "n_first_conv",
                   "weight_sharing_frequency", "n_repetitions", "n_epochs", "batch_size", "optimizer", "lr",
                   "weight_decay", "epoch_decrease_lr", "amp", "subset", "seed", "device", "run_dir")
WIDTH_FIELDS = {"resnet_cifar": "resnet_cifar_width", "resnet18_imagenet": "resnet18_width_per_group"}

STATUS_FILE = "status.json"
LOCK_FILE = ".sweep.lock"
EXECUTED_NOTEBOOK = "train.ipynb"
LOG_FILE = "papermill.log"


class SweepError(ValueError):
    """A sweep file or a request on it is invalid; the message names the value and what is expected."""


# ----------------------------------------------------------------------------------------------
# Sweep files


@dataclass
class Sweep:
    """A parsed sweep file: base fields, ``{variant name: fields}`` and seeds."""

    name: str
    base: Dict[str, Any]
    variants: Dict[str, Dict[str, Any]]
    seeds: List[int]
    description: str = ""


@dataclass
class SweepRun:
    """One run of a sweep: variant and seed, its full configuration and its run folder."""

    sweep: str
    variant: str
    seed: int
    config: RunConfig

    @property
    def name(self) -> str:
        return f"{self.variant}_seed{self.seed}"

    @property
    def run_dir(self) -> Path:
        return self.config.resolved_run_dir()


def _build_config(fields: Mapping[str, Any], where: str) -> RunConfig:
    fields = dict(fields)
    sharing = fields.pop("sharing", None)
    try:
        if sharing is None:
            return RunConfig.from_dict(fields)
        return make_config(sharing=sharing, **fields)
    except (TypeError, ValueError) as err:
        raise SweepError(f"{where}: {err}") from err


def parse_sweep(data: Any, default_name: str, source: str = "sweep") -> Sweep:
    """Check the structure of a loaded sweep file and return it as a ``Sweep``.

    Every variant is built into a ``RunConfig`` here, so a misspelt field or an invalid value
    raises ``SweepError`` before any run starts.
    """
    if not isinstance(data, dict):
        raise SweepError(f"{source}: expected a mapping with keys {', '.join(SWEEP_KEYS)}, got {type(data).__name__}")
    unknown = sorted(set(data) - set(SWEEP_KEYS))
    if unknown:
        raise SweepError(f"{source}: unknown top-level keys {unknown}; expected {', '.join(SWEEP_KEYS)}")

    base = data.get("base") or {}
    variants = data.get("variants")
    seeds = data.get("seeds", [0])
    if not isinstance(base, dict):
        raise SweepError(f"{source}: 'base' must be a mapping of run configuration fields")
    if not isinstance(variants, dict) or not variants:
        raise SweepError(f"{source}: 'variants' must map at least one variant name to its fields")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise SweepError(f"{source}: 'seeds' must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"{source}: 'seeds' lists a seed twice: {seeds}")
    for key in ("seed", "run_dir"):
        if key in base:
            raise SweepError(f"{source}: 'base' sets {key!r}, which the sweep sets for each run; remove it")

    name = str(data.get("name") or default_name)
    checked: Dict[str, Dict[str, Any]] = {}
    for variant, fields in variants.items():
        variant = str(variant)
        if not variant.replace("_", "").replace("-", "").isalnum():
            raise SweepError(f"{source}: variant name {variant!r} must contain only letters, digits, '_' and '-'")
        fields = fields or {}
        if not isinstance(fields, dict):
            raise SweepError(f"{source}: variant {variant!r} must map run configuration fields to values")
        for key in ("seed", "run_dir"):
            if key in fields:
                raise SweepError(f"{source}: variant {variant!r} sets {key!r}, which the sweep sets for each run")
        _build_config({**base, **fields}, f"{source}, variant {variant!r}")
        checked[variant] = dict(fields)
    return Sweep(name=name, base=dict(base), variants=checked, seeds=list(seeds),
                 description=str(data.get("description") or ""))


def load_sweep(path: Path) -> Sweep:
    """Read and check a sweep file (YAML)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path} not found; the presets are in the repository's sweeps/ folder")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SweepError(f"sweep file {path} is not valid YAML: {err}") from err
    return parse_sweep(data, default_name=path.stem, source=f"sweep file {path}")


def expand(sweep: Sweep, runs_dir: Path, only: Optional[Sequence[str]] = None) -> List[SweepRun]:
    """Return the sweep's runs, seed by seed so that early seeds of every variant finish first.

    ``only`` keeps the variants or runs (``<variant>_seed<seed>``) it names.
    Unless the sweep sets ``progress``, runs log one line per epoch instead of drawing progress
    bars into the executed notebooks.
    """
    runs = []
    for seed in sweep.seeds:
        for variant, fields in sweep.variants.items():
            values = {"progress": False, **sweep.base, **fields, "seed": seed,
                      "run_dir": str(Path(runs_dir) / sweep.name / f"{variant}_seed{seed}")}
            config = _build_config(values, f"sweep {sweep.name!r}, variant {variant!r}")
            runs.append(SweepRun(sweep.name, variant, seed, config))
    if only:
        known = set(sweep.variants) | {run.name for run in runs}
        missing = sorted(set(only) - known)
        if missing:
            raise SweepError(f"--only names {missing} not in sweep {sweep.name!r}; "
                             f"its variants are {', '.join(sweep.variants)}")
        runs = [run for run in runs if run.variant in only or run.name in only]
    return runs


def notebook_parameters(config: RunConfig) -> Dict[str, Any]:
    """Map a config onto the training notebook's parameters, the inverse of the notebook's ``make_config`` call."""
    values = config.to_dict()
    parameters = {name: values.pop(name) for name in NOTEBOOK_FIELDS}
    width_field = WIDTH_FIELDS[config.experiment]
    parameters["width"] = values.pop(width_field)
    if not config.share_weights:
        parameters["sharing"] = "none"
    else:
        parameters["sharing"] = "instant" if config.instant_weight_sharing else "sleep"
    # make_config derives these two from `sharing`; passing them again would be redundant.
    values.pop("share_weights")
    values.pop("instant_weight_sharing")
    defaults = RunConfig().to_dict()
    parameters["extra_config"] = {k: v for k, v in values.items() if v != defaults[k]}
    return parameters


# ----------------------------------------------------------------------------------------------
# Run folder state


def completed_epochs(run_dir: Path) -> int:
    """Return the epoch count stored in ``run_dir/checkpoints/last.pt`` (0 without a readable checkpoint)."""
    last = Path(run_dir) / "checkpoints" / "last.pt"
    if not last.is_file():
        return 0
    import torch

    try:
        # mmap keeps the tensors on disk, so only the small entries are read.
        state = torch.load(last, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file means "not finished"; train() reports why
        log.warning("cannot read %s (%s: %s); the run will be executed again", last, type(err).__name__, err)
        return 0
    return int(state.get("epoch", 0)) if isinstance(state, dict) else 0


def read_status(run_dir: Path) -> Dict[str, Any]:
    """Return a run folder's ``status.json`` (empty when missing or unreadable)."""
    path = Path(run_dir) / STATUS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_status(run: SweepRun, state: str, **details: Any) -> None:
    """Write ``status.json`` into the run folder (through a temporary file, so readers never see half of it)."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    record = {"sweep": run.sweep, "variant": run.variant, "seed": run.seed, "state": state,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **details}
    tmp = run.run_dir / (STATUS_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, run.run_dir / STATUS_FILE)


def config_conflict(run: SweepRun) -> Optional[str]:
    """Describe how the run folder's saved config differs from the sweep's, or return None when it may resume."""
    saved = run.run_dir / "config.json"
    if not saved.is_file():
        return None
    try:
        previous = RunConfig.load(saved)
    except (ValueError, FileNotFoundError) as err:
        return str(err)
    changed = previous.differences(run.config)
    if not changed:
        return None
    details = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
    return (f"run folder {run.run_dir} holds a run with a different configuration ({details}); "
            f"delete the folder to start it over, or give the variant another name")


@dataclass
class PlannedRun:
    """A run and what the sweep will do with it: ``new``, ``resume``, ``finished`` or ``conflict``."""

    run: SweepRun
    action: str
    epochs_done: int
    detail: str = ""


def plan(runs: Iterable[SweepRun]) -> List[PlannedRun]:
    """Inspect each run folder (without starting a kernel) and decide what to do with it."""
    planned = []
    for run in runs:
        done = completed_epochs(run.run_dir)
        conflict = config_conflict(run)
        if conflict:
            planned.append(PlannedRun(run, "conflict", done, conflict))
        elif done >= run.config.n_epochs:
            planned.append(PlannedRun(run, "finished", done))
        elif done > 0:
            planned.append(PlannedRun(run, "resume", done, f"from epoch {done} of {run.config.n_epochs}"))
        else:
            previous = read_status(run.run_dir).get("state")
            planned.append(PlannedRun(run, "new", 0, f"last attempt {previous}" if previous else ""))
    return planned


# ----------------------------------------------------------------------------------------------
# Execution


@dataclass
class RunOutcome:
    """Outcome of one run: ``finished`` (``skipped`` when it had finished before), ``failed``, ``interrupted``,
    or ``busy`` (another sweep process holds its run folder's lock)."""

    run: SweepRun
    state: str
    message: str = ""
    skipped: bool = False


def visible_gpus() -> List[str]:
    """Return the GPU ids a worker may be given: ``CUDA_VISIBLE_DEVICES``'s entries, or 0..N-1, or none."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip() and gpu.strip() != "-1"]
    try:
        import torch

        return [str(index) for index in range(torch.cuda.device_count())]
    except (ImportError, RuntimeError):
        return []


def _notebook_error(notebook: Path) -> str:
    """Return ``"Name: value"`` of the first error output in an executed notebook, or ''."""
    try:
        cells = json.loads(notebook.read_text()).get("cells", [])
    except (OSError, json.JSONDecodeError):
        return ""
    for cell in cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                return f"{output.get('ename', 'Error')}: {output.get('evalue', '')}"
    return ""


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


# Starts papermill with Linux's parent-death signal set, so the papermill process stops when the
# sweep process dies, even by SIGKILL. The kernel then exits because its parent is gone (ipykernel
# polls for that). The signal fires when the forking thread exits, and a worker thread waits for
# its child.
_PDEATHSIG_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 is PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit('the sweep process exited before papermill started')\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'papermill', *sys.argv[2:]])\n"
)


class SweepRunner:
    """Execute runs through papermill in worker threads, each run in its own papermill process.

    Each worker owns a slot. With GPUs present, slot ``i`` gets ``CUDA_VISIBLE_DEVICES`` set to
    GPU ``i mod (number of GPUs)``. The papermill process and the kernel it starts inherit that
    environment, so the run's ``cuda:0`` is that GPU.
    """

    def __init__(self, workers: int = 1, notebook: Path = NOTEBOOK, kernel: str = "python3",
                 cwd: Optional[Path] = None, gpus: Optional[Sequence[str]] = None) -> None:
        if workers < 1:
            raise SweepError(f"invalid number of workers {workers}: expected an integer >= 1")
        if not Path(notebook).is_file():
            raise FileNotFoundError(f"training notebook {notebook} not found; run from a checkout of the bpcnn repository")
        self.workers = workers
        self.notebook = Path(notebook)
        self.kernel = kernel
        self.cwd = Path(cwd) if cwd else Path.cwd()
        self.gpus = list(visible_gpus() if gpus is None else gpus)
        self._children: Dict[int, subprocess.Popen] = {}
        self._children_lock = threading.Lock()
        self._stopping = threading.Event()

    def _environment(self, slot: int) -> Dict[str, str]:
        env = dict(os.environ)
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[slot % len(self.gpus)]
        return env

    def _papermill_command(self, run: SweepRun) -> List[str]:
        parameters = json.dumps(notebook_parameters(run.config))  # JSON is valid YAML for papermill's -y
        arguments = [str(self.notebook), str(run.run_dir / EXECUTED_NOTEBOOK), "-y", parameters,
                     "-k", self.kernel, "--cwd", str(self.cwd), "--no-progress-bar"]
        if sys.platform.startswith("linux"):
            return [sys.executable, "-c", _PDEATHSIG_LAUNCHER, str(os.getpid()), *arguments]
        return [sys.executable, "-m", "papermill", *arguments]

    def execute(self, run: SweepRun, slot: int = 0) -> RunOutcome:
        """Execute one run's notebook unless it has finished; record the outcome in ``status.json``."""
        run.run_dir.mkdir(parents=True, exist_ok=True)
        with open(run.run_dir / LOCK_FILE, "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return RunOutcome(run, "busy", f"{run.run_dir} is being trained by another sweep process")
            return self._execute_locked(run, slot, lock.fileno())

    def _execute_locked(self, run: SweepRun, slot: int, lock_fd: int) -> RunOutcome:
        done = completed_epochs(run.run_dir)
        if done >= run.config.n_epochs:
            write_status(run, "finished", epochs=done)
            return RunOutcome(run, "finished", f"already finished ({done} epochs)", skipped=True)
        if self._stopping.is_set():
            return RunOutcome(run, "interrupted", "not started: the sweep was interrupted")

        env = self._environment(slot)
        gpu = env.get("CUDA_VISIBLE_DEVICES") if self.gpus else None
        write_status(run, "running", pid=os.getpid(), started_epoch=done, gpu=gpu)
        log.info("%s: %s%s", run.name, f"resuming from epoch {done}" if done else "starting",
                 f" on GPU {gpu}" if gpu is not None else "")
        log_path = run.run_dir / LOG_FILE
        started = time.monotonic()
        with open(log_path, "a") as log_file:
            log_file.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} executing {self.notebook} (epoch {done}) ===\n")
            log_file.flush()
            # The child inherits the lock, so a papermill process that outlives this one still
            # keeps other sweeps out of the run folder.
            child = subprocess.Popen(self._papermill_command(run), stdout=log_file, stderr=subprocess.STDOUT,
                                     env=env, cwd=str(self.cwd), pass_fds=(lock_fd,))
            with self._children_lock:
                self._children[child.pid] = child
            try:
                returncode = child.wait()
            finally:
                with self._children_lock:
                    self._children.pop(child.pid, None)
        seconds = time.monotonic() - started

        done = completed_epochs(run.run_dir)
        if returncode == 0 and done >= run.config.n_epochs:
            write_status(run, "finished", epochs=done, seconds=round(seconds, 1))
            log.info("%s: finished %d epochs in %.0f s", run.name, done, seconds)
            return RunOutcome(run, "finished", f"{done} epochs in {seconds:.0f} s")
        if self._stopping.is_set():
            write_status(run, "interrupted", epochs=done)
            return RunOutcome(run, "interrupted", f"interrupted after {done} epochs")
        error = _notebook_error(run.run_dir / EXECUTED_NOTEBOOK) or _log_tail(log_path)
        if returncode == 0:
            error = f"the notebook ran but the checkpoint covers {done} of {run.config.n_epochs} epochs"
        write_status(run, "failed", epochs=done, returncode=returncode, error=error,
                     notebook=EXECUTED_NOTEBOOK, log=LOG_FILE)
        log.error("%s failed (papermill exit code %s): %s; see %s", run.name, returncode, error,
                  run.run_dir / EXECUTED_NOTEBOOK)
        return RunOutcome(run, "failed", error)

    def stop(self) -> None:
        """Terminate running papermill processes; their kernels exit when they see their parent gone."""
        self._stopping.set()
        with self._children_lock:
            children = list(self._children.values())
        for child in children:
            if child.poll() is None:
                child.terminate()

    def run_all(self, runs: Sequence[SweepRun]) -> List[RunOutcome]:
        """Execute ``runs`` with ``self.workers`` at a time; a failed run does not stop the others."""
        slots: "queue.Queue[int]" = queue.Queue()
        for slot in range(self.workers):
            slots.put(slot)

        def work(run: SweepRun) -> RunOutcome:
            slot = slots.get()
            try:
                return self.execute(run, slot)
            finally:
                slots.put(slot)

        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="sweep")
        futures = [pool.submit(work, run) for run in runs]
        try:
            outcomes = [future.result() for future in futures]
        except BaseException:
            # KeyboardInterrupt or SystemExit (SIGTERM): stop the children, wait for the threads.
            self.stop()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return outcomes


def run_sweep(sweep: Sweep, runs_dir: Path, only: Optional[Sequence[str]] = None, workers: int = 1,
              notebook: Path = NOTEBOOK, kernel: str = "python3") -> List[RunOutcome]:
    """Execute every unfinished run of ``sweep`` into ``runs_dir``; return one outcome per run.

    Runs whose folder contains a different configuration are reported as failed without executing.
    """
    outcomes: List[RunOutcome] = []
    pending: List[SweepRun] = []
    for item in plan(expand(sweep, runs_dir, only)):
        if item.action == "conflict":
            write_status(item.run, "failed", error=item.detail)
            outcomes.append(RunOutcome(item.run, "failed", item.detail))
        else:
            pending.append(item.run)
    runner = SweepRunner(workers=workers, notebook=notebook, kernel=kernel)
    return outcomes + runner.run_all(pending)


def default_workers() -> int:
    """Return the default number of workers: one per visible GPU, or one on a CPU-only machine."""
    return max(1, len(visible_gpus()))


def format_plan(planned: Sequence[PlannedRun]) -> str:
    """Return a text table of planned runs: name, action, epochs done and run folder."""
    rows = [("run", "action", "epochs", "run folder")]
    for item in planned:
        action = item.action + (f" ({item.detail})" if item.detail and item.action != "conflict" else "")
        rows.append((item.run.name, action, f"{item.epochs_done}/{item.run.config.n_epochs}", str(item.run.run_dir)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3] for row in rows]
    lines += [f"conflict: {item.run.name}: {item.detail}" for item in planned if item.action == "conflict"]
    return "\n".join(lines)


def format_outcomes(outcomes: Sequence[RunOutcome]) -> str:
    """Return a summary: counts per state, then one line per run that did not finish."""
    counts: Dict[str, int] = {}
    for outcome in outcomes:
        key = "skipped (already finished)" if outcome.skipped else outcome.state
        counts[key] = counts.get(key, 0) + 1
    lines = ["sweep summary: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))]
    for outcome in outcomes:
        if outcome.state != "finished":
            lines.append(f"  {outcome.state}: {outcome.run.name} ({outcome.run.run_dir}): {outcome.message}")
    return "\n".join(lines)


__all__ = ["Sweep", "SweepRun", "SweepError", "SweepRunner", "RunOutcome", "PlannedRun", "load_sweep",
           "parse_sweep", "expand", "plan", "run_sweep", "notebook_parameters", "completed_epochs",
           "read_status", "default_workers", "format_plan", "format_outcomes", "visible_gpus"]
