"""Dynamic weight sharing: the sleep phase of Pogodin et al., NeurIPS 2021 (arXiv 2106.13031).

Training pauses, and the layer below an LC layer feeds it random Gaussian patterns that repeat
with period ``k`` in space (``k`` the kernel size). Output neurons that then see identical inputs
form a *pool*. Lateral inhibition removes each pool's mean response, and an anti-Hebbian update
shrinks what is left, pulling every kernel toward its pool's mean::

    z_p  = w_p . x_p                         response of the LC neuron at position p
    d_p  = z_p - mean_{q in pool(p)} z_q     after lateral inhibition
    w_p <- w_p - lr * ( <d_p x_p>_batch + gamma * (w_p - w_p at the start of the phase) )

How this module computes it fast, without changing the rule: every neuron of pool ``P`` sees the
same patch ``x_P``, so the pool's mean response is the response of the pool's mean kernel. Hence
``d_p = (w_p - mean_P w) . x_P``, the pool mean of the kernels never moves, and one step maps the
deviation ``D_p = w_p - mean_P w`` to ``D_p (I - lr * x_P^T x_P / B) - lr * gamma * (D_p - D_p0)``.
With period ``k`` and a dilation coprime to ``k``, ``x_P`` is a fixed permutation of the pixels of
one ``k x k`` pattern per channel, so after permuting each kernel's entries all pools see the same
input. The whole phase then is one chain of small matrix products driven by the sampled patterns:
the same random draws and the same stochastic update as the plain formulation, not its
expectation. Other settings (another period, a dilation sharing a factor with ``k``, or border
neurons kept in the pools) run the plain per-position formulation.
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from .layers import LocallyConnected2d, extract_patches
from .sharing import interior_mask, locally_connected_layers, pool_ids, pool_means, unwrap

log = logging.getLogger(__name__)

Pair = Tuple[int, int]


def phase_seed(seed: int, step: int) -> int:
    """Return a 63-bit seed for the sleep phase after optimiser step ``step`` of a run seeded ``seed``.

    The value depends only on ``(seed, step)``, so every process of a distributed run derives the
    same sleep-phase inputs without communicating.
    """
    digest = hashlib.sha256(f"bpcnn-sleep:{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _tiling_period(layer: LocallyConnected2d, period: Optional[int]) -> Pair:
    if period is None:
        return layer.kernel_size
    kh, kw = layer.kernel_size
    if period < max(kh, kw):
        raise ValueError(
            f"sleep-phase period must be at least the kernel size {layer.kernel_size}, got {period}: "
            f"with a shorter period a receptive field sees repeated pixels and kernel entries cannot be told apart"
        )
    return period, period


def sleep_pool_ids(
    layer: LocallyConnected2d, period: Optional[int] = None, exclude_border: bool = True
) -> Tuple[torch.Tensor, int]:
    """Return the pool index of every position ``(out_h, out_w)`` and the number of pools for a tiling period.

    With the default period (the kernel size) these are ``bpcnn.sharing.pool_ids``. With period
    ``T`` and stride ``s`` positions ``h`` and ``h'`` see the same input when ``(h - h') * s`` is a
    multiple of ``T``, so the pools are the residues modulo ``T / gcd(T, s)``. With
    ``exclude_border`` positions whose receptive field touches the padding get index -1.
    """
    if period is None:
        return pool_ids(layer, exclude_border=exclude_border)
    (sh, sw), (out_h, out_w) = layer.stride, layer.out_size
    period_h, period_w = period // math.gcd(period, sh), period // math.gcd(period, sw)
    ids = (torch.arange(out_h) % period_h)[:, None] * period_w + (torch.arange(out_w) % period_w)[None, :]
    if exclude_border:
        ids = torch.where(interior_mask(layer), ids, torch.full_like(ids, -1))
    return ids, period_h * period_w


def pattern_rows(layer: LocallyConnected2d, period: Pair, offset: Pair) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return, for every output row and column, which pattern rows and columns its receptive field reads.

    The tiled input pixel ``(i, j)`` (unpadded coordinates) is ``pattern[(i + oy) % T_h, (j + ox) % T_w]``.
    Returns ``(rows, cols)`` of shapes ``(out_h, kh)`` and ``(out_w, kw)``.
    """
    top, _, left, _ = layer.padding
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    out_h, out_w = layer.out_size
    rows = torch.arange(out_h)[:, None] * sh - top + torch.arange(kh)[None, :] * dh
    cols = torch.arange(out_w)[:, None] * sw - left + torch.arange(kw)[None, :] * dw
    return (rows + offset[0]) % period[0], (cols + offset[1]) % period[1]


def draw_offset(layer: LocallyConnected2d, period: Pair, generator: torch.Generator) -> Pair:
    """Draw a tiling offset ``(oy, ox)``, uniform over one period, from ``generator``."""
    oy = int(torch.randint(period[0], (1,), generator=generator))
    ox = int(torch.randint(period[1], (1,), generator=generator))
    return oy, ox


def draw_patterns(
    layer: LocallyConnected2d, period: Pair, batch_size: int, generator: torch.Generator
) -> torch.Tensor:
    """Draw one step's random patterns ``(B, C_in, T_h, T_w)``, standard normal, on the CPU."""
    return torch.randn(batch_size, layer.in_channels, period[0], period[1], generator=generator)


def tile_patterns(patterns: torch.Tensor, in_size: Pair, offset: Pair = (0, 0)) -> torch.Tensor:
    """Tile patterns ``(B, C, T_h, T_w)`` periodically over ``in_size``: returns ``(B, C, H, W)``."""
    period_h, period_w = patterns.shape[-2:]
    rows = (torch.arange(in_size[0], device=patterns.device) + offset[0]) % period_h
    cols = (torch.arange(in_size[1], device=patterns.device) + offset[1]) % period_w
    return patterns[:, :, rows][:, :, :, cols]


def pool_deviation(layer: LocallyConnected2d, period: Optional[int] = None, exclude_border: bool = True) -> float:
    """Return the root-mean-square distance of the pooled kernels from their pool means.

    Only positions that belong to a pool count (with ``exclude_border``, the interior ones).
    Returns 0 when no position belongs to a pool.
    """
    ids, n_pools = sleep_pool_ids(layer, period, exclude_border)
    member = (ids >= 0).to(layer.weight.device)
    if not bool(member.any()):
        return 0.0
    with torch.no_grad():
        kernels = layer.kernels().double()
        deviation = kernels - pool_means(kernels, ids, n_pools)
        return float(deviation[member].pow(2).mean().sqrt())


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _kernel_layout(layer: LocallyConnected2d) -> Tuple[int, int, int, int]:
    """Return ``(groups, out_channels // groups, K, positions)``, K being the entries of one group's kernel."""
    kh, kw = layer.kernel_size
    out_h, out_w = layer.out_size
    size = layer.in_channels // layer.groups * kh * kw
    return layer.groups, layer.out_channels // layer.groups, size, out_h * out_w


def _uses_permuted_patches(layer: LocallyConnected2d, period: Pair, exclude_border: bool) -> bool:
    """Return whether every pool's patch is a permutation of the pattern's pixels (the fast case)."""
    (kh, kw), (dh, dw) = layer.kernel_size, layer.dilation
    return (
        exclude_border
        and period == (kh, kw)
        and math.gcd(dh, kh) == 1
        and math.gcd(dw, kw) == 1
    )


def _anti_hebbian_chain(
    state: torch.Tensor,
    patterns: Iterator[torch.Tensor],
    lr: float,
    gamma: float,
) -> torch.Tensor:
    """Run ``S <- S (I - lr * X^T X / B) - lr * gamma * (S - S_0)`` once for each ``X`` in ``patterns``.

    ``state`` ``S`` is ``(g, R, K)`` or ``(R, K)``, and every ``X`` is ``(g, B, K)`` or ``(B, K)``
    to match, one row per input of the batch. Returns the final state as a new tensor.
    """
    anchor = state
    state = state.clone()
    decay = 1.0 - lr * gamma
    for x in patterns:
        batch, size = x.shape[-2], x.shape[-1]
        rows = state.shape[-2]
        if size * size * (rows + batch) < 2 * rows * size * batch:
            # Small K: multiply by the batch covariance X^T X, (..., K, K).
            correction = torch.matmul(state, torch.matmul(x.transpose(-1, -2), x))  # (..., R, K)
        else:
            responses = torch.matmul(state, x.transpose(-1, -2))  # (..., R, B)
            correction = torch.matmul(responses, x)  # (..., R, K)
        state.mul_(decay)
        if gamma:
            state.add_(anchor, alpha=lr * gamma)
        state.add_(correction, alpha=-lr / batch)
    return state


def _pattern_batches(
    layer: LocallyConnected2d,
    period: Pair,
    steps: int,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
) -> Iterator[torch.Tensor]:
    """Yield one step's patterns ``(B, C_in, T_h, T_w)`` at a time, drawn on the CPU and moved to ``device``."""
    for _ in range(steps):
        yield draw_patterns(layer, period, batch_size, generator).to(device=device, dtype=dtype)


def _sleep_pooled(
    layer: LocallyConnected2d,
    patterns: Iterator[torch.Tensor],
    offset: Pair,
    lr: float,
    gamma: float,
) -> None:
    """Run the sleep phase on a layer whose pools see permutations of one ``k x k`` pattern, border excluded."""
    weight = layer.kernels()
    out_h, out_w, _, in_per_group, kh, kw = weight.shape
    groups, out_per_group, size, positions = _kernel_layout(layer)
    dtype = _compute_dtype(weight)

    ids, n_pools = pool_ids(layer, exclude_border=True)
    members = torch.nonzero(ids.reshape(-1) >= 0).squeeze(1).to(weight.device)  # (M,)
    if members.numel() == 0:
        log.debug("sleep phase: %s has no interior positions, nothing to share", layer)
        return

    kernels = weight.detach().to(dtype).reshape(out_h, out_w, groups, out_per_group, size)
    means = pool_means(kernels, ids, n_pools).reshape(positions, groups, out_per_group, size)
    means = means.index_select(0, members)  # (M, g, C_out/g, K)
    deviation = kernels.reshape(positions, groups, out_per_group, size).index_select(0, members) - means

    # Pattern pixel read by entry (c, a, b) of each position's kernel: c*kh*kw + rows[h, a]*kw + cols[w, b].
    rows, cols = pattern_rows(layer, (kh, kw), offset)  # (out_h, kh), (out_w, kw)
    pixel = rows[:, None, :, None] * kw + cols[None, :, None, :]  # (out_h, out_w, kh, kw)
    channel_base = torch.arange(in_per_group)[:, None] * (kh * kw)  # (C_in/g, 1)
    index = (channel_base[None] + pixel.reshape(positions, 1, kh * kw)).reshape(positions, size)  # (L, K)
    index = index.to(weight.device).index_select(0, members)[:, None, None, :].expand_as(deviation)

    # Re-index every kernel by pattern pixel, so that all positions see the same input x: E_p x = D_p x_P.
    permuted = torch.empty_like(deviation).scatter_(-1, index, deviation)  # (M, g, C_out/g, K)
    n_members = members.numel()
    permuted = permuted.permute(1, 0, 2, 3).reshape(groups, n_members * out_per_group, size)  # (g, R, K)

    def group_major(x: torch.Tensor) -> torch.Tensor:
        # (B, C_in, kh, kw) -> (B, g, K) -> (g, B, K)
        return x.reshape(x.shape[0], groups, size).transpose(0, 1).contiguous()

    batches = (group_major(x) for x in patterns)
    if size < permuted.shape[1]:
        # Fewer pattern pixels than kernel rows: run the chain on the identity and apply it once.
        identity = torch.eye(size, dtype=dtype, device=weight.device).expand(groups, size, size)
        permuted = torch.bmm(permuted, _anti_hebbian_chain(identity, batches, lr, gamma))
    else:
        permuted = _anti_hebbian_chain(permuted, batches, lr, gamma)

    # (g, M * C_out/g, K) -> (M, g, C_out/g, K), back to each kernel's own entry order.
    permuted = permuted.reshape(groups, n_members, out_per_group, size).permute(1, 0, 2, 3)
    shared = means + permuted.gather(-1, index)
    weight.view(positions, -1).index_copy_(0, members, shared.reshape(n_members, -1).to(weight.dtype))


def _sleep_per_position(
    layer: LocallyConnected2d,
    patterns: Iterator[torch.Tensor],
    offset: Pair,
    ids: torch.Tensor,
    n_pools: int,
    lr: float,
    gamma: float,
) -> None:
    """Run the sleep phase position by position: tile, respond, inhibit, update (any geometry)."""
    weight = layer.kernels()
    out_h, out_w = layer.out_size
    kh, kw = layer.kernel_size
    groups, out_per_group, size, positions = _kernel_layout(layer)
    dtype = _compute_dtype(weight)

    kernels = weight.detach().to(dtype).reshape(positions * groups, out_per_group, size).clone()
    start = kernels.clone()
    for x in patterns:
        batch = x.shape[0]
        inputs = tile_patterns(x, layer.in_size, offset)  # (B, C_in, H, W)
        patches = extract_patches(inputs, (kh, kw), layer.stride, layer.padding, layer.dilation)  # (L, B, C_in*kh*kw)
        # (L, B, g, K) -> (L, g, B, K) -> (L * g, B, K)
        patches = patches.view(positions, batch, groups, size).transpose(1, 2).reshape(positions * groups, batch, size)
        responses = torch.bmm(patches, kernels.transpose(1, 2))  # (L * g, B, C_out/g)
        responses = responses.view(out_h, out_w, groups, batch, out_per_group)
        # Lateral inhibition. Positions outside every pool keep their own response, so d = 0 there.
        inhibited = responses - pool_means(responses, ids, n_pools)
        inhibited = inhibited.reshape(positions * groups, batch, out_per_group)
        hebbian = torch.bmm(inhibited.transpose(1, 2), patches) / batch  # (L * g, C_out/g, K)
        kernels -= lr * (hebbian + gamma * (kernels - start))
    weight.copy_(kernels.view(weight.shape).to(weight.dtype))


@torch.no_grad()
def share_weights_dynamically(
    module: nn.Module,
    steps: int = 100,
    batch_size: int = 128,
    lr: float = 0.1,
    gamma: float = 1e-5,
    generator: Optional[torch.Generator] = None,
    random_offset: bool = False,
    exclude_border: bool = True,
    period: Optional[int] = None,
    algorithm: str = "auto",
) -> int:
    """Run one sleep phase on every LC layer of ``module``; return the number of layers processed.

    Each of ``steps`` steps draws ``batch_size`` random standard-normal patterns of size
    ``period x period`` (default: the kernel size) per input channel, tiles them over the layer's
    input size, and applies the anti-Hebbian update with lateral inhibition within each pool::

        z_p = w_p . x_p ;  d_p = z_p - mean_{q in pool(p)} z_q
        w_p <- w_p - lr * ( mean_batch(d_p x_p) + gamma * (w_p - w_p at the start of the phase) )

    Pools are the positions that see identical input (``bpcnn.sharing.pool_ids``), which holds for
    any stride and groups. With ``exclude_border`` (the default, as in the reference) positions
    whose receptive field touches the zero padding belong to no pool and do not change. The bias is
    not touched, because ``z`` has no bias term. Repeated phases converge to
    ``share_weights_instantly`` over the same pools, border excluded.

    Args:
        module: one ``LocallyConnected2d`` or a model containing them; a ``DistributedDataParallel``
            wrapper is unwrapped.
        generator: CPU generator for every random draw. All layers draw from it in module order,
            and the global RNG is never used, so equal generators give bit-identical results on
            equal hardware (every rank of a distributed run). ``None`` means a new generator seeded
            with 0, so repeated calls without one feed the same inputs.
        random_offset: shift the tiling by a random ``(oy, ox)`` per layer and phase. The pools stay
            the same: the shift only changes which pattern pixel lands on which kernel entry, and
            the pattern pixels are independent and identically distributed, so the update has the
            same distribution with or without the shift. It does not make adjacent positions share
            (``benchmarks/sleep_phase.py`` measures this); a longer ``period`` does.
        period: tiling period in pixels, at least the kernel size. With period ``T`` the pools are
            the residues modulo ``T / gcd(T, stride)``, so alternating phases of period ``k`` and
            ``k + 1`` link every interior position to every other one over time.
        algorithm: ``'auto'`` computes the update pool by pool on permuted kernels where the
            geometry allows (period = kernel size, dilation coprime with it, border excluded) and
            position by position otherwise; ``'per_position'`` always uses the per-position
            formulation. Both give the same weights up to rounding.

    Raises:
        ValueError: on a non-positive ``steps``, ``batch_size`` or ``lr``, a negative ``gamma``, a
            non-CPU generator, a period shorter than a layer's kernel, or an unknown ``algorithm``.
    """
    if steps < 0:
        raise ValueError(f"sleep-phase steps must be >= 0, got {steps}")
    if batch_size < 1:
        raise ValueError(f"sleep-phase batch size must be >= 1, got {batch_size}")
    if not lr > 0:
        raise ValueError(f"sleep-phase learning rate must be > 0, got {lr}")
    if gamma < 0:
        raise ValueError(f"sleep-phase gamma (pull toward the kernels at the start of the phase) must be >= 0, got {gamma}")
    if algorithm not in ("auto", "per_position"):
        raise ValueError(f"algorithm must be 'auto' or 'per_position', got {algorithm!r}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    elif generator.device.type != "cpu":
        raise ValueError(
            f"the sleep phase draws its inputs on the CPU so that every device gets the same values; "
            f"pass a CPU torch.Generator, got one on {generator.device}"
        )

    layers: List[Tuple[str, LocallyConnected2d]] = list(locally_connected_layers(unwrap(module)))
    if not layers:
        log.warning("sleep phase: %s contains no LocallyConnected2d layer, nothing to share", type(module).__name__)
        return 0
    for name, layer in layers:
        tiling = _tiling_period(layer, period)
        offset = draw_offset(layer, tiling, generator) if random_offset else (0, 0)
        dtype = _compute_dtype(layer.weight)
        patterns = _pattern_batches(layer, tiling, steps, batch_size, generator, layer.weight.device, dtype)
        if algorithm == "auto" and _uses_permuted_patches(layer, tiling, exclude_border):
            _sleep_pooled(layer, patterns, offset, lr, gamma)
        else:
            ids, n_pools = sleep_pool_ids(layer, period, exclude_border)
            _sleep_per_position(layer, patterns, offset, ids, n_pools, lr, gamma)
        log.debug("sleep phase: layer %r, %d steps, offset %s", name or "layer", steps, offset)
    return len(layers)


class SleepPhase:
    """Run a sleep phase (``share_weights_dynamically``) every ``frequency`` optimiser steps.

    The training loop calls the instance after every optimiser step with the 1-based global step
    count. The phase's random inputs come from a generator seeded by ``phase_seed(seed, step)``,
    so every rank of a distributed run draws the same inputs, the global RNG is left untouched,
    and a resumed run repeats the phases it would have run.
    """

    def __init__(
        self,
        frequency: int,
        steps: int = 100,
        batch_size: int = 128,
        lr: float = 0.1,
        gamma: float = 1e-5,
        random_offset: bool = False,
        seed: Optional[int] = 0,
        exclude_border: bool = True,
    ) -> None:
        if frequency < 1:
            raise ValueError(f"weight sharing frequency must be >= 1 iteration, got {frequency}")
        if steps < 0 or batch_size < 1 or not lr > 0 or gamma < 0:
            raise ValueError(
                f"invalid sleep-phase settings: steps={steps} (>= 0), batch_size={batch_size} (>= 1), "
                f"lr={lr} (> 0), gamma={gamma} (>= 0)"
            )
        self.frequency = frequency
        self.steps = steps
        self.batch_size = batch_size
        self.lr = lr
        self.gamma = gamma
        self.random_offset = random_offset
        self.seed = 0 if seed is None else seed
        self.exclude_border = exclude_border

    def __call__(self, model: nn.Module, step: int) -> bool:
        if step % self.frequency:
            return False
        generator = torch.Generator().manual_seed(phase_seed(self.seed, step))
        share_weights_dynamically(
            unwrap(model),
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            gamma=self.gamma,
            generator=generator,
            random_offset=self.random_offset,
            exclude_border=self.exclude_border,
        )
        return True

    def __repr__(self) -> str:
        return (
            f"SleepPhase(frequency={self.frequency}, steps={self.steps}, batch_size={self.batch_size}, "
            f"lr={self.lr}, gamma={self.gamma}, random_offset={self.random_offset}, seed={self.seed})"
        )
