"""Weight sharing for locally connected layers: pools, instant sharing and weight SNR.

A *pool* is a set of output positions whose neurons see identical inputs when the layer's input
repeats with period ``k`` in space (the sleep phase feeds such inputs). For kernel size ``k`` and
stride ``s`` along one dimension, positions ``h`` and ``h'`` see the same input exactly when
``(h - h') * s`` is a multiple of ``k``, so the pools are the residues of ``h`` modulo
``k / gcd(k, s)``. With stride 1 this is the reference's rule ``h' = h (mod k)``, and a 1x1 kernel
gives one pool covering the whole layer.

The training loop calls a sharing schedule (``InstantSharing`` here, ``SleepPhase`` in
``bpcnn.sleep``) after every optimiser step; a schedule decides itself when to act.
"""

from __future__ import annotations

import logging
import math
from typing import Dict, Iterator, List, Protocol, Tuple

import torch
import torch.nn as nn

from .layers import LocallyConnected2d

log = logging.getLogger(__name__)


def locally_connected_layers(module: nn.Module) -> Iterator[Tuple[str, LocallyConnected2d]]:
    """Yield ``(name, layer)`` for ``module`` itself (name ``''``) or each LC layer inside it."""
    for name, sub in module.named_modules():
        if isinstance(sub, LocallyConnected2d):
            yield name, sub


def pool_periods(layer: LocallyConnected2d) -> Tuple[int, int]:
    """Return the pool period ``(p_h, p_w)``: positions congruent modulo it share one pool."""
    (kh, kw), (sh, sw) = layer.kernel_size, layer.stride
    return kh // math.gcd(kh, sh), kw // math.gcd(kw, sw)


def interior_mask(layer: LocallyConnected2d) -> torch.Tensor:
    """Return a bool ``(out_h, out_w)`` mask of positions whose receptive field does not touch the zero padding."""
    top, _, left, _ = layer.padding
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    height, width = layer.in_size
    out_h, out_w = layer.out_size
    rows = torch.arange(out_h) * sh - top  # first input row each position reads
    cols = torch.arange(out_w) * sw - left
    rows_ok = (rows >= 0) & (rows + dh * (kh - 1) <= height - 1)
    cols_ok = (cols >= 0) & (cols + dw * (kw - 1) <= width - 1)
    return rows_ok[:, None] & cols_ok[None, :]


def pool_ids(layer: LocallyConnected2d, exclude_border: bool = False) -> Tuple[torch.Tensor, int]:
    """Return the pool index of every position, ``(out_h, out_w)`` long, and the number of pools.

    With ``exclude_border`` the positions whose receptive field touches the padding get index -1.
    """
    period_h, period_w = pool_periods(layer)
    out_h, out_w = layer.out_size
    ids = (torch.arange(out_h) % period_h)[:, None] * period_w + (torch.arange(out_w) % period_w)[None, :]
    if exclude_border:
        ids = torch.where(interior_mask(layer), ids, torch.full_like(ids, -1))
    return ids, period_h * period_w


def pool_means(values: torch.Tensor, ids: torch.Tensor, n_pools: int) -> torch.Tensor:
    """Average ``values`` ``(out_h, out_w, ...)`` within pools; return the pool mean at every position.

    Positions with id -1 keep their own value.
    """
    out_h, out_w = values.shape[:2]
    flat = values.reshape(out_h * out_w, -1)  # (L, F)
    flat_ids = ids.reshape(-1).to(values.device)
    member = flat_ids >= 0
    sums = torch.zeros(n_pools, flat.shape[1], dtype=flat.dtype, device=flat.device)
    sums.index_add_(0, flat_ids[member], flat[member])
    counts = torch.bincount(flat_ids[member], minlength=n_pools).clamp(min=1).to(flat.dtype)
    means = sums / counts[:, None]  # (n_pools, F)
    shared = torch.where(member[:, None], means[flat_ids.clamp(min=0)], flat)
    return shared.reshape(values.shape)


@torch.no_grad()
def share_weights_instantly(module: nn.Module, share_bias: bool = True, exclude_border: bool = False) -> int:
    """Replace every LC kernel by the mean kernel of its pool; return the number of layers changed.

    Pools: output positions ``(h, w)`` and ``(h', w')`` of a layer with kernel ``(kh, kw)`` and
    stride ``(sh, sw)`` share when ``h = h' (mod kh / gcd(kh, sh))`` and
    ``w = w' (mod kw / gcd(kw, sw))``; for stride 1 that is ``h = h' (mod kh)``, and a 1x1 kernel
    pools the whole layer. Border positions are included, as in the reference, unless
    ``exclude_border``: then positions whose receptive field touches the padding keep their own
    kernels, the pools of the sleep phase, which repeated phases converge to. ``module`` may be
    one ``LocallyConnected2d`` or any model containing them. With ``share_bias`` the per-position
    biases are averaged over the same pools. Sharing twice changes nothing.
    """
    changed = 0
    for _, layer in locally_connected_layers(module):
        ids, n_pools = pool_ids(layer, exclude_border=exclude_border)
        kernels = layer.kernels()
        kernels.copy_(pool_means(kernels, ids, n_pools))
        if share_bias and layer.bias is not None:
            layer.bias.copy_(pool_means(layer.bias, ids, n_pools))
        changed += 1
    return changed


@torch.no_grad()
def weight_snr(layer: LocallyConnected2d) -> float:
    """Return the layer's weight signal-to-noise ratio.

    Over the positions whose receptive field does not touch the zero padding, take the mean and
    the (unbiased) standard deviation of every kernel entry across positions; the SNR is the
    average over entries of ``|mean| / std``. It grows as kernels agree, and is ``inf`` when all
    interior kernels are equal. Returns ``nan`` with fewer than two interior positions.
    """
    mask = interior_mask(layer).to(layer.weight.device)
    if int(mask.sum()) < 2:
        return float("nan")
    kernels = layer.kernels()[mask].float()  # (n_interior, C_out, C_in/g, kh, kw)
    mean = kernels.mean(dim=0)
    std = kernels.std(dim=0)
    ratio = mean.abs() / std
    ratio = torch.where((std == 0) & (mean == 0), torch.zeros_like(ratio), ratio)
    return float(ratio.mean())


def weight_snrs(model: nn.Module) -> Dict[str, float]:
    """Return ``{layer name: weight_snr}`` for every LC layer of ``model``."""
    return {name or "layer": weight_snr(layer) for name, layer in locally_connected_layers(model)}


class WeightSharing(Protocol):
    """A sharing schedule. The training loop calls it after every optimiser step."""

    frequency: int

    def __call__(self, model: nn.Module, step: int) -> bool:
        """Share weights if ``step`` (1-based count of optimiser steps) is due; return whether it acted."""
        ...


class InstantSharing:
    """Replace kernels by their pool means every ``frequency`` optimiser steps.

    With ``exclude_border`` the pools are the sleep phase's: border positions keep their own
    kernels (see ``share_weights_instantly``).
    """

    def __init__(self, frequency: int, exclude_border: bool = False) -> None:
        if frequency < 1:
            raise ValueError(f"weight sharing frequency must be >= 1 iteration, got {frequency}")
        self.frequency = frequency
        self.exclude_border = exclude_border

    def __call__(self, model: nn.Module, step: int) -> bool:
        if step % self.frequency:
            return False
        share_weights_instantly(model, exclude_border=self.exclude_border)
        return True

    def __repr__(self) -> str:
        return f"InstantSharing(frequency={self.frequency}, exclude_border={self.exclude_border})"


def unwrap(model: nn.Module) -> nn.Module:
    """Return the model inside a ``DistributedDataParallel`` (or similar ``.module``) wrapper."""
    return getattr(model, "module", model)


def layer_names(model: nn.Module) -> List[str]:
    """Return the names of the LC layers of ``model`` in module order."""
    return [name for name, _ in locally_connected_layers(model)]

