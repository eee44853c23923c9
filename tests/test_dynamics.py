"""Tests of the convergence simulations: batched grid against the plain loop, and the notebook."""

import importlib.util
import itertools
from pathlib import Path

import nbformat
import numpy as np
import pytest

from bpcnn.dynamics import (
    DYNAMIC_K3_PRESET,
    SimulationResult,
    simulate_dynamic,
    simulate_instant,
)

ROOT = Path(__file__).resolve().parents[1]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_dynamics",
                                                  ROOT / "benchmarks" / "dynamics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


loops = _load_benchmark()


def _assert_matches_loop(result, loop, n_steps, **params):
    grid = itertools.product(enumerate(result.gammas), enumerate(result.kernel_sizes),
                             range(result.n_trials))
    for (gi, gamma), (ki, k), trial in grid:
        steps, deviation, alignment = loop(k, gamma, trial, n_steps, seed=result.seed,
                                           record_every=int(result.steps[0]), **params)
        config = f"gamma={gamma}, k={k}, trial={trial}"
        np.testing.assert_array_equal(steps, result.steps, err_msg=config)
        np.testing.assert_allclose(result.deviation[gi, ki, trial], deviation, rtol=1e-9,
                                   err_msg=config)
        np.testing.assert_allclose(result.alignment[gi, ki, trial], alignment, rtol=0,
                                   atol=1e-12, err_msg=config)


@pytest.mark.parametrize("params", [
    {},
    DYNAMIC_K3_PRESET,
    {"hold_steps": 37, "tau": 5.0, "alpha": 2.0, "n_neurons": 7},  # the last hold is partial
], ids=["reference", "k3-preset", "short-hold"])
def test_dynamic_matches_loop(params):
    n_steps = 3000
    record_every = 2 * params.get("hold_steps", 150)
    result = simulate_dynamic((3, 6), (1e-1, 1e-3), 2, n_steps, seed=3,
                              record_every=record_every, **params)

    assert result.deviation.shape == (2, 2, 2, n_steps // record_every)
    _assert_matches_loop(result, loops.loop_dynamic, n_steps, **params)


def test_instant_matches_loop():
    n_steps = 300
    result = simulate_instant((3, 5), (1e-1, 1e-3), 2, n_steps, seed=4, record_every=3)

    assert result.deviation.shape == (2, 2, 2, 100)
    _assert_matches_loop(result, loops.loop_instant, n_steps)


def test_dynamic_matches_loop_in_distribution():
    # Different seeds, so only the spread over trials can agree.
    n_steps, n_trials = 15_000, 10
    batched = simulate_dynamic((6,), (1e-2,), n_trials, n_steps, seed=0, record_every=n_steps)
    looped = [loops.loop_dynamic(6, 1e-2, trial, n_steps, seed=1, record_every=n_steps)[1][-1]
              for trial in range(n_trials)]

    batched_median = np.median(batched.deviation[0, 0, :, -1])
    looped_median = np.median(looped)
    assert abs(batched_median / looped_median - 1) < 0.2


def test_deviation_falls_for_every_configuration():
    instant = simulate_instant(n_trials=3, n_steps=500, record_every=50)
    dynamic = simulate_dynamic(n_trials=3, n_steps=15_000, record_every=1500)

    for result in (instant, dynamic):
        first, last = result.deviation[..., 0], result.deviation[..., -1]
        assert result.deviation.shape[:3] == (3, 3, 3)
        assert np.all(last < first), f"{result.kind}: deviation rose in {np.argwhere(last >= first)}"
        assert np.all(last < 0.6), f"{result.kind}: final deviations {last.ravel()}"


def test_instant_pool_mean_stays_at_start():
    # The pool mean of the instant update is only the pull towards w_init, which starts at zero.
    result = simulate_instant((3,), (1e-1,), 2, 200)

    np.testing.assert_allclose(result.alignment, 1.0, atol=1e-12)


def test_dynamic_pool_mean_moves():
    result = simulate_dynamic((3,), (1e-3,), 2, 15_000, record_every=1500)

    assert np.all(result.alignment[..., -1] < 1 - 1e-6)


def test_same_seed_reproduces_result():
    first = simulate_dynamic((3, 6), (1e-2,), 2, 1500, seed=5)
    again = simulate_dynamic((3, 6), (1e-2,), 2, 1500, seed=5)
    other = simulate_dynamic((3, 6), (1e-2,), 2, 1500, seed=6)

    np.testing.assert_array_equal(first.deviation, again.deviation)
    np.testing.assert_array_equal(first.alignment, again.alignment)
    assert not np.allclose(first.deviation, other.deviation)


def test_gammas_of_a_trial_share_draws():
    # With no learning, every gamma keeps the same initial weights of its trial.
    result = simulate_dynamic((3,), (1e-1, 1e-3), 2, 300, lr_delay_steps=300)

    np.testing.assert_array_equal(result.deviation[0], result.deviation[1])


def test_save_and_load_round_trip(tmp_path):
    result = simulate_instant((3,), (1e-2, 1e-3), 2, 40, record_every=4)

    path = result.save(tmp_path / "nested" / "instant")
    loaded = SimulationResult.load(path)

    assert path.name == "instant.npz"
    assert loaded.kind == "instant"
    assert loaded.kernel_sizes == (3,)
    assert loaded.gammas == (1e-2, 1e-3)
    assert loaded.params == result.params
    np.testing.assert_array_equal(loaded.steps, result.steps)
    np.testing.assert_array_equal(loaded.deviation, result.deviation)
    np.testing.assert_array_equal(loaded.alignment, result.alignment)


def test_load_rejects_other_files(tmp_path):
    other = tmp_path / "other.npz"
    np.savez(other, values=np.zeros(3))

    with pytest.raises(ValueError, match="not a simulation result"):
        SimulationResult.load(other)
    with pytest.raises(FileNotFoundError):
        SimulationResult.load(tmp_path / "missing.npz")


def test_select_returns_subgrid():
    result = simulate_instant((3, 6), (1e-1, 1e-2, 1e-3), 2, 20)

    part = result.select(kernel_sizes=(6,), gammas=(1e-3, 1e-1))

    assert part.deviation.shape == (2, 1, 2, 20)
    np.testing.assert_array_equal(part.deviation[0, 0], result.deviation[2, 1])
    np.testing.assert_array_equal(part.deviation[1, 0], result.deviation[0, 1])
    with pytest.raises(ValueError, match="not in this grid"):
        result.select(kernel_sizes=(9,))


def test_k3_preset_sets_hold_and_schedule():
    result = simulate_dynamic((3,), (1e-2,), 1, 400, **DYNAMIC_K3_PRESET)

    assert result.params["hold_steps"] == 200
    assert result.params["lr"] == 5e-4
    assert result.params["lr_time_constant"] == 5.0
    np.testing.assert_array_equal(result.steps, [200, 400])


@pytest.mark.parametrize("kwargs, message", [
    ({"record_every": 100}, "multiple of hold_steps"),
    ({"record_every": 0}, "record_every must be between"),
    ({"kernel_sizes": ()}, "kernel_sizes"),
    ({"gammas": (-1.0,)}, "gammas"),
    ({"n_trials": 0}, "n_trials"),
    ({"hold_steps": 0}, "hold_steps"),
])
def test_dynamic_rejects_invalid_arguments(kwargs, message):
    arguments = {"kernel_sizes": (3,), "gammas": (1e-2,), "n_trials": 1, "n_steps": 600}
    arguments.update(kwargs)

    with pytest.raises(ValueError, match=message):
        simulate_dynamic(**arguments)


def test_explorer_sliders_rerun_simulation(monkeypatch):
    pytest.importorskip("ipywidgets")
    import matplotlib

    matplotlib.use("Agg")
    from bpcnn.plots import dynamics as plots

    calls = []

    def recording_simulation(*args, **kwargs):
        calls.append((args, kwargs))
        return simulate_dynamic(*args, **kwargs)

    monkeypatch.setattr(plots, "simulate_dynamic", recording_simulation)
    sliders = plots.explore_dynamic(n_steps=1500, n_trials=2)
    sliders["gamma"].value = 1e-3
    sliders["hold_steps"].value = 200

    assert len(calls) == 3
    assert calls[1][0][1] == (pytest.approx(1e-3),)
    assert calls[2][1]["hold_steps"] == 200
    assert calls[2][1]["record_every"] % 200 == 0
    assert plots.explore_dynamic(n_steps=1500, n_trials=1, interactive=False) == {}


def test_notebook_runs_under_papermill(tmp_path):
    papermill = pytest.importorskip("papermill")
    output = tmp_path / "out.ipynb"
    figures = tmp_path / "figures"

    papermill.execute_notebook(
        str(ROOT / "notebooks" / "weight_sharing_dynamics.ipynb"), str(output),
        parameters={
            "kernel_sizes": [3, 5], "gammas": [1e-2, 1e-3], "n_trials": 2,
            "instant_steps": 50, "dynamic_steps": 1200, "dynamic_record_every": 150,
            "output_dir": str(figures), "results_dir": str(tmp_path / "results"),
            "explorer_steps": 1000,
        },
        kernel_name="python3", cwd=str(ROOT / "notebooks"), progress_bar=False,
    )

    for name in ("deviation", "snr", "alignment", "k3_preset"):
        assert (figures / f"dynamics_{name}.png").stat().st_size > 0, name
    assert SimulationResult.load(tmp_path / "results" / "dynamic.npz").steps[-1] == 1200
    explorer = nbformat.read(output, as_version=4).cells[-1]
    kinds = [set(out.get("data", {})) for out in explorer.outputs]
    assert any("image/png" in data for data in kinds), kinds
    assert any("application/vnd.jupyter.widget-view+json" in data for data in kinds), kinds
