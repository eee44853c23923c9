"""Convergence simulations of dynamic weight sharing in one pool of neurons.

A pool of ``n`` neurons with ``k x k`` receptive fields sees one shared input ``x ~ N(0, I)``.
Initial weights are ``1 + N(0, 1)`` per entry and every update uses momentum. Two simulations
show how the pool's weights converge towards one shared kernel:

- ``simulate_instant``: plain SGD on the lateral-inhibition objective, a new ``x`` every step::

      z_i = w_i . x
      v  <- momentum * v + lr_t * ( -(z_i - mean_j z_j) x - gamma (w_i - w_i_init) )
      w  <- w + v,          lr_t = lr / (1 + t / lr_time_constant)

  The defaults ``lr = 5e-4, lr_time_constant = 1000`` give the reference's ``0.5 / (1000 + t)``.

- ``simulate_dynamic``: rate dynamics with one inhibitory neuron, ``x`` held for ``hold_steps``::

      dr_inh = (-r_inh - b + mean(r)) / tau          (uses r before this step)
      r      <- r + (-r + z - alpha * r_inh + b) / tau
      r_inh  <- r_inh + dr_inh
      v      <- momentum * v + lr_t * ( -(r_i - b) x - gamma (w_i - w_i_init) )
      w      <- w + v,      lr_t = lr / sqrt(1 + t / lr_time_constant), zero for t < lr_delay_steps

  Rates start at ``r = b`` and ``r_inh = 0``, and ``t`` counts steps from 0.

Both record the deviation ``mean over entries of (w - w_mean)^2 / w_mean^2``, where ``w_mean`` is
the mean over the pool and the inverse is an SNR. They also record the cosine between the
pool-mean weight vector and its initial value. Weights, inputs and results are float64.

The whole grid (gammas x kernel sizes x trials) runs as one batch. The dynamic simulation uses an
exact reformulation: while ``x`` is held, ``w - w_init`` and ``v`` change only along ``x`` and
along their own values at the start of the hold, so each neuron carries three scalars
(``r``, ``w . x``, ``v . x``) whose updates are linear. The map over one hold is therefore a
small matrix that depends only on the learning rates, ``gamma`` and ``|x|^2``. The matrices of
many holds are computed at once, and the weight vectors are rebuilt once per hold.
Neurons couple only through the pool mean, so the mean follows a 6-state system (with ``r_inh``
and a constant) and the deviations from it a 4-state system without ``r_inh``.

Source: R. Pogodin, Y. Mehta, T. P. Lillicrap, P. E. Latham, "Towards Biologically Plausible
Convolutional Networks", NeurIPS 2021 (arXiv 2106.13031), and its reference code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from tqdm.auto import tqdm

__all__ = [
    "InstantParams",
    "DynamicParams",
    "DYNAMIC_K3_PRESET",
    "SimulationResult",
    "draw_pool",
    "instant_learning_rates",
    "dynamic_learning_rates",
    "pool_deviation",
    "pool_alignment",
    "simulate_instant",
    "simulate_dynamic",
]

logger = logging.getLogger(__name__)

PAPER_KERNEL_SIZES = (3, 6, 9)
PAPER_GAMMAS = (1e-1, 1e-2, 1e-3)


@dataclass(frozen=True)
class InstantParams:
    """Constants of the instant (plain SGD) simulation, with the reference's values as defaults."""

    n_neurons: int = 100
    momentum: float = 0.95
    lr: float = 5e-4  # lr_t = lr / (1 + t / lr_time_constant), i.e. 0.5 / (1000 + t)
    lr_time_constant: float = 1000.0
    init_mean: float = 1.0  # initial weights are init_mean + init_std * N(0, 1) per entry
    init_std: float = 1.0


@dataclass(frozen=True)
class DynamicParams:
    """Constants of the rate-dynamics simulation, with the reference's values as defaults."""

    n_neurons: int = 100
    tau: float = 30.0  # time constant of the rates, in steps
    alpha: float = 10.0  # strength of the inhibitory neuron's feedback
    b: float = 1.0  # baseline rate
    momentum: float = 0.95
    lr: float = 3e-4  # lr_t = lr / sqrt(1 + t / lr_time_constant)
    lr_time_constant: float = 2.0
    lr_delay_steps: int = 50  # lr_t is zero before this step
    hold_steps: int = 150  # steps for which one input x is held
    init_mean: float = 1.0
    init_std: float = 1.0


# The reference's comments give these settings for k = 3. They read "time constant 5 instead
# of 2", which is taken here as the constant in the learning-rate schedule's denominator:
# lr_t = 5e-4 / sqrt(1 + t / 5).
DYNAMIC_K3_PRESET = {"hold_steps": 200, "lr": 5e-4, "lr_time_constant": 5.0}


@dataclass
class SimulationResult:
    """Recorded measures of a grid of simulations.

    ``deviation`` and ``alignment`` have shape ``(len(gammas), len(kernel_sizes), n_trials,
    n_records)``, and ``steps[j]`` is the number of steps completed at record ``j``.
    """

    kind: str  # "instant" or "dynamic"
    kernel_sizes: tuple
    gammas: tuple
    n_trials: int
    seed: int
    params: dict
    steps: np.ndarray  # (R,)
    deviation: np.ndarray  # (G, K, T, R)
    alignment: np.ndarray  # (G, K, T, R)
    wall_time_s: float = float("nan")  # seconds the simulation took

    @property
    def snr(self) -> np.ndarray:
        """Signal-to-noise ratio of the pool's weights, the inverse of the deviation."""
        return 1.0 / self.deviation

    def select(self, kernel_sizes: Optional[Sequence[int]] = None,
               gammas: Optional[Sequence[float]] = None) -> "SimulationResult":
        """Return the part of the grid with the given kernel sizes and gammas (default: all)."""
        kernel_sizes = self.kernel_sizes if kernel_sizes is None else tuple(kernel_sizes)
        gammas = self.gammas if gammas is None else tuple(gammas)
        missing = [k for k in kernel_sizes if k not in self.kernel_sizes] + \
            [g for g in gammas if g not in self.gammas]
        if missing:
            raise ValueError(f"{missing} not in this grid: kernel sizes {self.kernel_sizes}, "
                             f"gammas {self.gammas}")
        ki = [self.kernel_sizes.index(k) for k in kernel_sizes]
        gi = [self.gammas.index(g) for g in gammas]
        index = np.ix_(gi, ki)
        return dataclasses.replace(self, kernel_sizes=kernel_sizes, gammas=gammas,
                                   deviation=self.deviation[index],
                                   alignment=self.alignment[index])

    def save(self, path: Union[str, Path]) -> Path:
        """Write the result to one ``.npz`` file and return its path."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(path.suffix + ".npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "kind": self.kind,
            "kernel_sizes": list(self.kernel_sizes),
            "gammas": list(self.gammas),
            "n_trials": self.n_trials,
            "seed": self.seed,
            "params": self.params,
            "wall_time_s": self.wall_time_s,
        }
        np.savez_compressed(
            path,
            meta=np.array(json.dumps(meta)),
            steps=self.steps,
            deviation=self.deviation,
            alignment=self.alignment,
        )
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "SimulationResult":
        """Read a result written by ``save``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"simulation result not found: {path}")
        with np.load(path, allow_pickle=False) as data:
            missing = {"meta", "steps", "deviation", "alignment"} - set(data.files)
            if missing:
                raise ValueError(
                    f"{path} is not a simulation result: arrays {sorted(missing)} are missing"
                )
            meta = json.loads(str(data["meta"]))
            return cls(
                kind=meta["kind"],
                kernel_sizes=tuple(meta["kernel_sizes"]),
                gammas=tuple(meta["gammas"]),
                n_trials=meta["n_trials"],
                seed=meta["seed"],
                params=meta["params"],
                steps=data["steps"],
                deviation=data["deviation"],
                alignment=data["alignment"],
                wall_time_s=meta["wall_time_s"],
            )


def draw_pool(
    seed: int,
    kernel_size: int,
    trial: int,
    n_neurons: int,
    n_inputs: int,
    init_mean: float = 1.0,
    init_std: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw the initial weights (n_neurons, k*k) and the inputs (n_inputs, k*k) of one trial.

    The draws depend only on (seed, kernel_size, trial), so every gamma of a trial starts from
    the same weights and sees the same inputs, and a per-configuration loop can reproduce them.
    """
    rng = np.random.default_rng([seed, kernel_size, trial])
    dim = kernel_size * kernel_size
    w_init = init_mean + init_std * rng.standard_normal((n_neurons, dim))
    x = rng.standard_normal((n_inputs, dim))
    return w_init, x


def _draw_trials(seed, kernel_size, n_trials, n_inputs, p):
    """Stack ``draw_pool`` over trials: w_init (1, T, n, d) and inputs (T, n_inputs, d)."""
    draws = [draw_pool(seed, kernel_size, trial, p.n_neurons, n_inputs, p.init_mean, p.init_std)
             for trial in range(n_trials)]
    return np.stack([d[0] for d in draws])[None], np.stack([d[1] for d in draws])


def instant_learning_rates(n_steps: int, params: InstantParams) -> np.ndarray:
    """Return lr_t for t = 0 .. n_steps - 1 of the instant simulation."""
    t = np.arange(n_steps, dtype=np.float64)
    return params.lr / (1.0 + t / params.lr_time_constant)


def dynamic_learning_rates(n_steps: int, params: DynamicParams) -> np.ndarray:
    """Return lr_t for t = 0 .. n_steps - 1 of the dynamic simulation."""
    t = np.arange(n_steps, dtype=np.float64)
    lr = params.lr / np.sqrt(1.0 + t / params.lr_time_constant)
    lr[: params.lr_delay_steps] = 0.0
    return lr


def pool_deviation(w: np.ndarray) -> np.ndarray:
    """Return mean over entries of (w - w_mean)^2 / w_mean^2 for weights (..., n, d)."""
    w_mean = w.mean(axis=-2)  # (..., d)
    centred = w - w_mean[..., None, :]
    spread = np.einsum("...nd,...nd->...d", centred, centred) / w.shape[-2]
    return (spread / w_mean**2).mean(axis=-1)


def pool_alignment(w: np.ndarray, w_init: np.ndarray) -> np.ndarray:
    """Return the cosine between the pool-mean weights of (..., n, d) now and at the start."""
    return _cosine(w.mean(axis=-2), w_init.mean(axis=-2))


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    dot = (a * b).sum(axis=-1)
    return dot / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _check_grid(kernel_sizes, gammas, n_trials, n_steps, record_every) -> None:
    if not kernel_sizes or any(int(k) != k or k < 1 for k in kernel_sizes):
        raise ValueError(f"kernel_sizes must be positive integers, got {kernel_sizes!r}")
    if not gammas or any(g < 0 for g in gammas):
        raise ValueError(f"gammas must be non-negative numbers, got {gammas!r}")
    if n_trials < 1:
        raise ValueError(f"n_trials must be at least 1, got {n_trials}")
    if record_every < 1 or record_every > n_steps:
        raise ValueError(
            f"record_every must be between 1 and n_steps={n_steps}, got {record_every}"
        )


def simulate_instant(
    kernel_sizes: Sequence[int] = PAPER_KERNEL_SIZES,
    gammas: Sequence[float] = PAPER_GAMMAS,
    n_trials: int = 10,
    n_steps: int = 2000,
    seed: int = 0,
    record_every: int = 1,
    progress: bool = False,
    **params,
) -> SimulationResult:
    """Run plain SGD on the lateral-inhibition objective for the whole grid at once.

    ``params`` are the fields of ``InstantParams``. Records are taken after every
    ``record_every`` steps.
    """
    kernel_sizes, gammas = tuple(int(k) for k in kernel_sizes), tuple(float(g) for g in gammas)
    _check_grid(kernel_sizes, gammas, n_trials, n_steps, record_every)
    p = InstantParams(**params)
    start = time.perf_counter()
    n_records = n_steps // record_every
    deviation = np.empty((len(gammas), len(kernel_sizes), n_trials, n_records))
    alignment = np.empty_like(deviation)
    gamma = np.asarray(gammas)[:, None, None, None]  # (G, 1, 1, 1)
    lr = instant_learning_rates(n_steps, p)

    # Each kernel size is one batch over (gamma, trial); all sizes advance in the same step loop.
    # The state is e = w - w_init and v, both (G, T, n, d).
    pools = []
    for k in kernel_sizes:
        w_init, x = _draw_trials(seed, k, n_trials, n_steps, p)  # (1, T, n, d), (T, n_steps, d)
        z_init = w_init[0] @ np.swapaxes(x, -1, -2)  # (T, n, n_steps): w_init . x of each step
        e = np.zeros((len(gammas),) + w_init.shape[1:])
        pools.append({"w_init": w_init, "x": x, "z_init": z_init, "e": e, "v": np.zeros_like(e)})

    for t in tqdm(range(n_steps), desc="instant", disable=not progress):
        for ki, pool in enumerate(pools):
            x = pool["x"][:, t, :, None]  # (T, d, 1)
            e, v = pool["e"], pool["v"]
            z = (e @ x)[..., 0] + pool["z_init"][..., t]  # (G, T, n)
            z -= z.mean(axis=-1, keepdims=True)
            v *= p.momentum
            v -= (lr[t] * z)[..., None] * np.swapaxes(x, -1, -2)[None]
            v -= (lr[t] * gamma) * e
            e += v
            if (t + 1) % record_every == 0 and (t + 1) // record_every <= n_records:
                j = (t + 1) // record_every - 1
                w = pool["w_init"] + e
                deviation[:, ki, :, j] = pool_deviation(w)
                alignment[:, ki, :, j] = pool_alignment(w, pool["w_init"])

    steps = record_every * np.arange(1, n_records + 1)
    elapsed = time.perf_counter() - start
    logger.info("instant grid of %d configurations, %d steps: %.1f s",
                deviation[..., 0].size, n_steps, elapsed)
    return SimulationResult("instant", kernel_sizes, gammas, n_trials, seed,
                            dataclasses.asdict(p), steps, deviation, alignment, elapsed)


def _hold_maps(lr: np.ndarray, x_sq: np.ndarray, gammas: np.ndarray, p: DynamicParams):
    """Compute the linear map of each hold for every configuration.

    ``lr`` (H, L) contains the learning rates of the L steps of each of H holds, and ``x_sq``
    (K, T, H) the squared norm of each hold's input. With z = w . x, u = v . x and
    z_init = w_init . x, it returns

    - ``mean_maps`` (G, K, T, H, 4, 6), from the pool means (r, z, u, z_init, r_inh, 1) at the
      start of a hold to (r, z, u, r_inh) at its end.
    - ``dev_maps`` (G, K, T, H, 3, 4), from a neuron's deviations from the pool mean
      (r, z, u, z_init) to (r, z, u). The inhibitory neuron and the constants act on the mean only.
    - ``momentum_maps`` (G, H, 2, 2), from (w - w_init, v) at the start of a hold to their
      values at its end, except for the part along x. It depends only on gamma and lr.
    """
    n_holds, n_steps = lr.shape
    n_gammas, (n_kernels, n_trials) = len(gammas), x_sq.shape[:2]
    leak, inv_tau, m, b = 1.0 - 1.0 / p.tau, 1.0 / p.tau, p.momentum, p.b
    batch = (n_gammas, n_kernels, n_trials, n_holds)

    # Each array is one row of the map: its entry j is the coefficient of start component j.
    dev_r, dev_z, dev_u = (np.zeros(batch + (4,)) for _ in range(3))
    dev_r[..., 0], dev_z[..., 1], dev_u[..., 2] = 1.0, 1.0, 1.0
    mean_r, mean_z, mean_u, mean_inh = (np.zeros(batch + (6,)) for _ in range(4))
    mean_r[..., 0], mean_z[..., 1], mean_u[..., 2], mean_inh[..., 4] = 1.0, 1.0, 1.0, 1.0
    mom_e, mom_v = np.zeros((n_gammas, n_holds, 2)), np.zeros((n_gammas, n_holds, 2))
    mom_e[..., 0], mom_v[..., 1] = 1.0, 1.0

    for step in range(n_steps):
        lr_step = lr[:, step]  # (H,)
        lr_x_sq = (lr_step * x_sq)[None, ..., None]  # (1, K, T, H, 1)
        lr_gamma = np.multiply.outer(gammas, lr_step)  # (G, H)
        lr_gamma_b = lr_gamma[:, None, None, :, None]  # (G, 1, 1, H, 1)

        # Deviations: r <- leak r + z / tau, then u <- m u - lr |x|^2 r - lr gamma (z - z_init).
        dev_r *= leak
        dev_r += inv_tau * dev_z
        dev_u *= m
        dev_u -= lr_x_sq * dev_r
        dev_u -= lr_gamma_b * dev_z
        dev_u[..., 3] += lr_gamma_b[..., 0]
        dev_z += dev_u

        # Pool means, with the inhibitory neuron driven by the mean rate before this step.
        inh_drive = inv_tau * mean_r
        mean_r *= leak
        mean_r += inv_tau * mean_z
        mean_r -= (p.alpha * inv_tau) * mean_inh
        mean_r[..., 5] += b * inv_tau
        mean_inh *= leak
        mean_inh += inh_drive
        mean_inh[..., 5] -= b * inv_tau
        mean_u *= m
        mean_u -= lr_x_sq * mean_r
        mean_u[..., 5] += b * lr_x_sq[..., 0]  # the b of -(r - b) acts on the constant
        mean_u -= lr_gamma_b * mean_z
        mean_u[..., 3] += lr_gamma_b[..., 0]
        mean_z += mean_u

        # Momentum with the pull towards w_init: v <- m v - lr gamma e, then e <- e + v.
        mom_v *= m
        mom_v -= lr_gamma[..., None] * mom_e
        mom_e += mom_v

    mean_maps = np.stack([mean_r, mean_z, mean_u, mean_inh], axis=-2)
    dev_maps = np.stack([dev_r, dev_z, dev_u], axis=-2)
    momentum_maps = np.stack([mom_e, mom_v], axis=-2)
    return mean_maps, dev_maps, momentum_maps


def simulate_dynamic(
    kernel_sizes: Sequence[int] = PAPER_KERNEL_SIZES,
    gammas: Sequence[float] = PAPER_GAMMAS,
    n_trials: int = 10,
    n_steps: int = 1_500_000,
    seed: int = 0,
    record_every: Optional[int] = None,
    progress: bool = False,
    chunk_holds: int = 250,
    **params,
) -> SimulationResult:
    """Run the rate dynamics with an inhibitory neuron for the whole grid at once.

    ``params`` are the fields of ``DynamicParams``. Pass ``**DYNAMIC_K3_PRESET`` for the
    reference's k = 3 settings. ``record_every`` must be a multiple of ``hold_steps`` (its
    default) because the weight vectors exist only at the ends of holds. When ``n_steps`` is
    not a multiple of ``hold_steps``, the last hold is shorter. ``chunk_holds`` sets how many
    holds' maps are computed together, trading memory for speed.
    """
    kernel_sizes, gammas = tuple(int(k) for k in kernel_sizes), tuple(float(g) for g in gammas)
    p = DynamicParams(**params)
    hold = p.hold_steps
    if hold < 1:
        raise ValueError(f"hold_steps must be at least 1, got {hold}")
    record_every = hold if record_every is None else int(record_every)
    _check_grid(kernel_sizes, gammas, n_trials, n_steps, record_every)
    if record_every % hold:
        raise ValueError(
            f"record_every={record_every} must be a multiple of hold_steps={hold}, because "
            "the weights are rebuilt only at the ends of holds"
        )
    start = time.perf_counter()

    n_full, rest = divmod(n_steps, hold)
    hold_lengths = [hold] * n_full + ([rest] if rest else [])
    n_holds = len(hold_lengths)
    n_records = n_steps // record_every
    n_g, n_k, n_n = len(gammas), len(kernel_sizes), p.n_neurons
    gamma_arr = np.asarray(gammas)
    lr_all = dynamic_learning_rates(n_steps, p)

    # Per kernel size: w_init (1, T, n, d); e = w - w_init and v (G, T, n, d); inputs (T, H, d).
    pools = []
    for k in kernel_sizes:
        w_init, x = _draw_trials(seed, k, n_trials, n_holds, p)
        pools.append({
            "w_init": w_init,
            "x": x,
            "e": np.zeros((n_g,) + w_init.shape[1:]),
            "v": np.zeros((n_g,) + w_init.shape[1:]),
        })
    x_sq = np.stack([(pool["x"] ** 2).sum(axis=-1) for pool in pools])  # (K, T, H)

    r = np.full((n_g, n_k, n_trials, n_n), p.b)  # rates start at the baseline
    r_inh = np.zeros((n_g, n_k, n_trials))
    deviation = np.empty((n_g, n_k, n_trials, n_records))
    alignment = np.empty_like(deviation)

    # Chunks of equal-length holds share one call to _hold_maps.
    chunks = [(h0, min(h0 + chunk_holds, n_full)) for h0 in range(0, n_full, chunk_holds)]
    if rest:
        chunks.append((n_full, n_full + 1))
    bar = tqdm(total=n_steps, desc="dynamic", disable=not progress, unit="step")
    step = 0
    for h0, h1 in chunks:
        length = hold_lengths[h0]
        lr = lr_all[step: step + (h1 - h0) * length].reshape(h1 - h0, length)
        mean_maps, dev_maps, momentum_maps = _hold_maps(lr, x_sq[..., h0:h1], gamma_arr, p)
        for h in range(h0, h1):
            i = h - h0
            r, r_inh = _advance_hold(pools, r, r_inh, h, x_sq[..., h], mean_maps[..., i, :, :],
                                     dev_maps[..., i, :, :], momentum_maps[:, i])
            step += length
            bar.update(length)
            if step % record_every == 0 and step // record_every <= n_records:
                j = step // record_every - 1
                for ki, pool in enumerate(pools):
                    w = pool["w_init"] + pool["e"]
                    deviation[:, ki, :, j] = pool_deviation(w)
                    alignment[:, ki, :, j] = pool_alignment(w, pool["w_init"])
    bar.close()

    steps = record_every * np.arange(1, n_records + 1)
    elapsed = time.perf_counter() - start
    logger.info("dynamic grid of %d configurations, %d steps: %.1f s",
                deviation[..., 0].size, n_steps, elapsed)
    return SimulationResult("dynamic", kernel_sizes, gammas, n_trials, seed,
                            dataclasses.asdict(p), steps, deviation, alignment, elapsed)


def _advance_hold(pools, r, r_inh, h, x_sq, mean_map, dev_map, momentum_map):
    """Advance every configuration by hold ``h``, updating the pools' e and v in place.

    ``r`` (G, K, T, n), ``r_inh`` (G, K, T), ``x_sq`` (K, T), ``mean_map`` (G, K, T, 4, 6),
    ``dev_map`` (G, K, T, 3, 4), ``momentum_map`` (G, 2, 2). Returns the new ``r, r_inh``.
    """
    # Projections on this hold's input, (G, K, T, n) each.
    z_init = np.stack([(pool["w_init"] @ pool["x"][:, h, :, None])[..., 0] for pool in pools],
                      axis=1)
    z_e = np.stack([(pool["e"] @ pool["x"][:, h, :, None])[..., 0] for pool in pools], axis=1)
    u = np.stack([(pool["v"] @ pool["x"][:, h, :, None])[..., 0] for pool in pools], axis=1)
    z_init = np.broadcast_to(z_init, z_e.shape)
    z = z_init + z_e

    state = np.stack([r, z, u, z_init], axis=-1)  # (G, K, T, n, 4)
    mean = state.mean(axis=-2)  # (G, K, T, 4)
    mean_full = np.concatenate([mean, r_inh[..., None], np.ones_like(r_inh)[..., None]], -1)
    mean_end = (mean_map @ mean_full[..., None])[..., 0]  # (G, K, T, 4): r, z, u, r_inh
    dev_end = (state - mean[..., None, :]) @ np.swapaxes(dev_map, -1, -2)  # (G, K, T, n, 3)
    r_end = mean_end[..., None, 0] + dev_end[..., 0]
    z_end = mean_end[..., None, 1] + dev_end[..., 1]
    u_end = mean_end[..., None, 2] + dev_end[..., 2]

    # Apart from the part along x, (e, v) follow momentum_map [[P, S], [Q, T]]. The coefficients
    # c and g along x follow from the projections: e_end . x = P e . x + S v . x + c |x|^2,
    # and the same for v with Q, T and g.
    coefficients = momentum_map[:, :, :, None, None, None]  # (G, 2, 2, 1, 1, 1)
    p_e, s_v = coefficients[:, 0, 0], coefficients[:, 0, 1]
    q_e, t_v = coefficients[:, 1, 0], coefficients[:, 1, 1]
    x_sq = x_sq[None, ..., None]  # (1, K, T, 1)
    c = (z_end - z_init - p_e * z_e - s_v * u) / x_sq  # (G, K, T, n)
    g = (u_end - q_e * z_e - t_v * u) / x_sq

    for ki, pool in enumerate(pools):
        x = pool["x"][None, :, h, None, :]  # (1, T, 1, d)
        e, v = pool["e"], pool["v"]
        e_new = p_e * e + s_v * v + c[:, ki, ..., None] * x
        v *= t_v
        v += q_e * e
        v += g[:, ki, ..., None] * x
        pool["e"] = e_new
    return r_end, mean_end[..., 3]
