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
``d_p = (w_p - mean_P w) . x_P``, and the pool mean of the kernels does not move (the code keeps
it fixed exactly). One step maps the deviation ``D_p = w_p - mean_P w`` to
``D_p (I - lr * x_P^T x_P / B) - lr * gamma * (D_p - D_p0)``.
So each pool runs one chain of small matrix products driven by the sampled patterns: the same
random draws and the same stochastic update as the plain formulation, not its expectation. With
period ``k`` and a dilation coprime to ``k``, every ``x_P`` is a permutation of the pixels of one
``k x k`` pattern per channel, and after permuting each kernel's entries all pools share a single
chain. Only border neurons kept in the pools (``exclude_border=False``) need the plain
per-position formulation, because their patches are partly zero padding.
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


def tiling_period(layer: LocallyConnected2d, period_increase: int = 0) -> Pair:
    """Return the sleep-phase tiling period ``(T_h, T_w)``: the kernel size plus ``period_increase``."""
    if period_increase < 0:
        raise ValueError(
            f"sleep-phase period increase must be >= 0, got {period_increase}: with a period shorter than "
            f"the kernel a receptive field sees repeated pixels and kernel entries cannot be told apart"
        )
    kh, kw = layer.kernel_size
    return kh + period_increase, kw + period_increase


def sleep_pool_ids(
    layer: LocallyConnected2d, period_increase: int = 0, exclude_border: bool = True
) -> Tuple[torch.Tensor, int]:
    """Return the pool index of every position ``(out_h, out_w)`` and the number of pools for a tiling period.

    With the default period (the kernel size) these are ``bpcnn.sharing.pool_ids``. With period
    ``T`` and stride ``s`` positions ``h`` and ``h'`` see the same input when ``(h - h') * s`` is a
    multiple of ``T``, so the pools are the residues modulo ``T / gcd(T, s)``. With
    ``exclude_border`` positions whose receptive field touches the padding get index -1.
    """
    if period_increase == 0:
        return pool_ids(layer, exclude_border=exclude_border)
    (period_h, period_w), (sh, sw) = tiling_period(layer, period_increase), layer.stride
    period_h, period_w = period_h // math.gcd(period_h, sh), period_w // math.gcd(period_w, sw)
    out_h, out_w = layer.out_size
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


def draw_offset(period: Pair, generator: torch.Generator) -> Pair:
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


def pool_deviation(layer: LocallyConnected2d, period_increase: int = 0, exclude_border: bool = True) -> float:
    """Return the root-mean-square distance of the pooled kernels from their pool means.

    Only positions that belong to a pool count (with ``exclude_border``, the interior ones).
    Returns 0 when no position belongs to a pool.
    """
    ids, n_pools = sleep_pool_ids(layer, period_increase, exclude_border)
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


def _uses_permuted_patches(layer: LocallyConnected2d, period: Pair) -> bool:
    """Return whether every pool's patch is a permutation of the pattern's pixels, so one chain serves all pools."""
    (kh, kw), (dh, dw) = layer.kernel_size, layer.dilation
    return period == (kh, kw) and math.gcd(dh, kh) == 1 and math.gcd(dw, kw) == 1


def _anti_hebbian_step(state: torch.Tensor, anchor: torch.Tensor, x: torch.Tensor, lr: float, gamma: float) -> None:
    """Update ``S <- S (I - lr * X^T X / B) - lr * gamma * (S - anchor)`` in place.

    ``state`` ``S`` is ``(..., R, K)`` and ``x`` ``X`` is ``(..., B, K)``, one row per input of the
    batch, with matching leading dimensions.
    """
    batch, size = x.shape[-2], x.shape[-1]
    rows = state.shape[-2]
    if size * size * (rows + batch) < 2 * rows * size * batch:
        # Small K: multiply by the batch covariance X^T X, (..., K, K).
        correction = torch.matmul(state, torch.matmul(x.transpose(-1, -2), x))  # (..., R, K)
    else:
        responses = torch.matmul(state, x.transpose(-1, -2))  # (..., R, B)
        correction = torch.matmul(responses, x)  # (..., R, K)
    state.mul_(1.0 - lr * gamma)
    if gamma:
        state.add_(anchor, alpha=lr * gamma)
    state.add_(correction, alpha=-lr / batch)


class _PoolChain:
    """The chain of one pool (or of all pools at once, on permuted kernels) through the sleep phase.

    The chain runs on the deviations ``(g, R, K)`` themselves, or, when they have more rows ``R``
    than ``K``, on the identity ``(g, K, K)``, whose final value then multiplies the deviations once.
    """

    def __init__(self, deviation: torch.Tensor, pixels: Optional[torch.Tensor]) -> None:
        groups, rows, size = deviation.shape
        self.deviation = deviation
        self.pixels = pixels  # pattern pixel of every kernel entry, (K,), or None for all pixels in order
        self.on_identity = size < rows
        if self.on_identity:
            identity = torch.eye(size, dtype=deviation.dtype, device=deviation.device)
            self.anchor = identity.expand(groups, size, size)
        else:
            self.anchor = deviation
        self.state = self.anchor.clone()

    def step(self, x: torch.Tensor, lr: float, gamma: float) -> None:
        """Apply one step for patterns ``x`` ``(g, B, n)`` over all pattern pixels."""
        if self.pixels is not None:
            x = x.index_select(-1, self.pixels)  # (g, B, K)
        _anti_hebbian_step(self.state, self.anchor, x, lr, gamma)

    def result(self) -> torch.Tensor:
        """Return the final deviations ``(g, R, K)``."""
        return torch.matmul(self.deviation, self.state) if self.on_identity else self.state


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
    # NOTE: only CPU layers have been run. On a GPU each step copies one small batch to the device.
    for _ in range(steps):
        yield draw_patterns(layer, period, batch_size, generator).to(device=device, dtype=dtype)


def _sleep_pooled(
    layer: LocallyConnected2d,
    patterns: Iterator[torch.Tensor],
    period: Pair,
    offset: Pair,
    lr: float,
    gamma: float,
) -> None:
    """Run the sleep phase pool by pool on a layer whose border neurons are excluded from the pools."""
    weight = layer.kernels()
    out_h, out_w, _, in_per_group, kh, kw = weight.shape
    groups, out_per_group, size, positions = _kernel_layout(layer)
    dtype = _compute_dtype(weight)
    period_h, period_w = period
    n_pixels = in_per_group * period_h * period_w  # pattern pixels per group

    ids, n_pools = sleep_pool_ids(layer, period_h - kh, exclude_border=True)
    flat_ids = ids.reshape(-1).to(weight.device)
    members = torch.nonzero(flat_ids >= 0).squeeze(1)  # (M,)
    if members.numel() == 0:
        log.debug("sleep phase: %s has no interior positions, nothing to share", layer)
        return

    kernels = weight.detach().to(dtype).reshape(out_h, out_w, groups, out_per_group, size)
    means = pool_means(kernels, ids, n_pools).reshape(positions, groups, out_per_group, size)
    means = means.index_select(0, members)  # (M, g, C_out/g, K)
    deviation = kernels.reshape(positions, groups, out_per_group, size).index_select(0, members) - means

    # Pattern pixel read by kernel entry (c, a, b) of each position: c*T_h*T_w + rows[h, a]*T_w + cols[w, b].
    rows, cols = pattern_rows(layer, period, offset)  # (out_h, kh), (out_w, kw)
    pixel = rows[:, None, :, None] * period_w + cols[None, :, None, :]  # (out_h, out_w, kh, kw)
    channel_base = torch.arange(in_per_group)[:, None] * (period_h * period_w)  # (C_in/g, 1)
    index = (channel_base[None] + pixel.reshape(positions, 1, kh * kw)).reshape(positions, size)  # (L, K)
    index = index.to(weight.device).index_select(0, members)  # (M, K)

    def group_major(x: torch.Tensor) -> torch.Tensor:
        # (B, C_in, T_h, T_w) -> (B, g, n) -> (g, B, n)
        return x.reshape(x.shape[0], groups, n_pixels).transpose(0, 1).contiguous()

    if _uses_permuted_patches(layer, period):
        # Re-index every kernel by pattern pixel, so that all positions see the same input x: E_p x = D_p x_P.
        expanded = index[:, None, None, :].expand_as(deviation)
        permuted = torch.empty_like(deviation).scatter_(-1, expanded, deviation)  # (M, g, C_out/g, K)
        permuted = permuted.permute(1, 0, 2, 3).reshape(groups, -1, size)  # (g, M * C_out/g, K)
        chain = _PoolChain(permuted, pixels=None)
        for x in patterns:
            chain.step(group_major(x), lr, gamma)
        # (g, M * C_out/g, K) -> (M, g, C_out/g, K), back to each kernel's own entry order.
        permuted = chain.result().reshape(groups, -1, out_per_group, size).permute(1, 0, 2, 3)
        deviation = permuted.gather(-1, expanded)
    else:
        member_pools = flat_ids.index_select(0, members)  # (M,)
        chains = []
        for pool in torch.unique(member_pools).tolist():
            rows_of_pool = torch.nonzero(member_pools == pool).squeeze(1)
            # (n_P, g, C_out/g, K) -> (g, n_P * C_out/g, K)
            block = deviation.index_select(0, rows_of_pool).permute(1, 0, 2, 3).reshape(groups, -1, size)
            chains.append((rows_of_pool, _PoolChain(block, pixels=index[rows_of_pool[0]])))
        for x in patterns:
            x = group_major(x)
            for _, chain in chains:
                chain.step(x, lr, gamma)
        for rows_of_pool, chain in chains:
            block = chain.result().reshape(groups, -1, out_per_group, size).permute(1, 0, 2, 3)
            deviation.index_copy_(0, rows_of_pool, block)

    shared = means + deviation
    n_members = members.numel()
    # (oh, ow, C_out, ...) -> (L, C_out, ...): a view for any kernel storage order (see empty_kernels).
    flat = weight.view(positions, *weight.shape[2:])
    flat.index_copy_(0, members, shared.reshape(n_members, *weight.shape[2:]).to(weight.dtype))


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
    period_increase: int = 0,
    algorithm: str = "auto",
) -> int:
    """Run one sleep phase on every LC layer of ``module``; return the number of layers processed.

    Each of ``steps`` steps draws ``batch_size`` random standard-normal ``k x k`` patterns per input
    channel (``k`` the kernel size), tiles them over the layer's input size, and applies the
    anti-Hebbian update with lateral inhibition within each pool::

        z_p = w_p . x_p ;  d_p = z_p - mean_{q in pool(p)} z_q
        w_p <- w_p - lr * ( mean_batch(d_p x_p) + gamma * (w_p - w_p at the start of the phase) )

    Pools are the positions that see identical input (``bpcnn.sharing.pool_ids``), which holds for
    any stride, dilation and groups. With ``exclude_border`` (the default, as in the reference)
    positions whose receptive field touches the zero padding belong to no pool and do not change.
    The bias is not touched, because ``z`` has no bias term. Repeated phases converge to the pool
    means of the interior kernels. ``share_weights_instantly`` differs from that limit: it also pools
    the border positions and the biases.

    Args:
        module: one ``LocallyConnected2d`` or a model containing them; a ``DistributedDataParallel``
            wrapper is unwrapped.
        generator: CPU generator for every random draw. All layers draw from it in module order,
            and the global RNG is never used, so equal generators give bit-identical results on
            equal hardware (every rank of a distributed run). ``None`` means a new generator seeded
            with 0, so repeated calls without one feed the same inputs.
        random_offset: shift the tiling by a random ``(oy, ox)`` per layer and phase. The pools stay
            the same, because positions ``k`` apart still see equal inputs and neighbours still
            see cyclically shifted ones. The shift only changes which pattern pixel lands on which
            kernel entry, and the pattern pixels are independent and identically distributed, so
            the update has the same distribution with or without it. It does not make adjacent
            positions share (``benchmarks/sleep_phase.py`` measures this). ``period_increase`` does.
        period_increase: tile with period ``k + period_increase``. With period ``T`` the pools are
            the residues modulo ``T / gcd(T, stride)``, so phases alternating between increases 0
            and 1 link every interior position to every other one (``SleepPhase(alternate_period=True)``).
            This goes beyond the reference, whose lateral connections are fixed: the pools change
            between phases.
        algorithm: ``'auto'`` computes the update pool by pool when border neurons are excluded and
            position by position otherwise. ``'per_position'`` always uses the per-position
            formulation. Both give the same weights up to rounding.

    Raises:
        ValueError: on a negative ``steps``, ``gamma`` or ``period_increase``, a ``batch_size``
            below 1, a non-positive ``lr``, a non-CPU generator or an unknown ``algorithm``.
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
        period = tiling_period(layer, period_increase)
        offset = draw_offset(period, generator) if random_offset else (0, 0)
        dtype = _compute_dtype(layer.weight)
        patterns = _pattern_batches(layer, period, steps, batch_size, generator, layer.weight.device, dtype)
        # A caller's autocast would run the chains in reduced precision, and 100 steps amplify its error.
        with torch.autocast(device_type=layer.weight.device.type, enabled=False):
            if algorithm == "auto" and exclude_border:
                _sleep_pooled(layer, patterns, period, offset, lr, gamma)
            else:
                ids, n_pools = sleep_pool_ids(layer, period_increase, exclude_border)
                _sleep_per_position(layer, patterns, offset, ids, n_pools, lr, gamma)
        log.debug("sleep phase: layer %r, %d steps, period %s, offset %s", name or "layer", steps, period, offset)
    return len(layers)


class SleepPhase:
    """Run a sleep phase (``share_weights_dynamically``) every ``frequency`` optimiser steps.

    The training loop calls the instance after every optimiser step with the 1-based global step
    count. The phase's random inputs come from a generator seeded by ``phase_seed(seed, step)``,
    so every rank of a distributed run draws the same inputs, the global RNG is left untouched,
    and a resumed run repeats the phases it would have run. With ``alternate_period`` every
    other phase tiles with period ``k + 1`` instead of ``k``, so that over many phases all interior
    positions, not only those ``k`` apart, come to share.
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
        alternate_period: bool = False,
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
        self.alternate_period = alternate_period

    def __call__(self, model: nn.Module, step: int) -> bool:
        if step % self.frequency:
            return False
        generator = torch.Generator().manual_seed(phase_seed(self.seed, step))
        phase = step // self.frequency
        share_weights_dynamically(
            unwrap(model),
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            gamma=self.gamma,
            generator=generator,
            random_offset=self.random_offset,
            exclude_border=self.exclude_border,
            period_increase=phase % 2 if self.alternate_period else 0,
        )
        return True

    def __repr__(self) -> str:
        return (
            f"SleepPhase(frequency={self.frequency}, steps={self.steps}, batch_size={self.batch_size}, "
            f"lr={self.lr}, gamma={self.gamma}, random_offset={self.random_offset}, seed={self.seed}, "
            f"alternate_period={self.alternate_period})"
        )
