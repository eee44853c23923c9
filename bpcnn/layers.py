"""Locally connected 2D layer: a convolution's receptive fields without weight sharing.

Every output position holds its own kernel, so the layer has the FLOPs of ``nn.Conv2d`` and
``out_h * out_w`` times its parameters. Pogodin et al., "Towards Biologically Plausible
Convolutional Networks", NeurIPS 2021 (arXiv 2106.13031), use such layers as the biologically
plausible stand-in for convolutions.

The weight is stored position-major, ``(out_h, out_w, out_channels, in_channels // groups, kh, kw)``,
so that the forward pass is one batched matrix product over output positions and
``LocallyConnected2d.kernels()`` is a view of the parameter.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

IntPair = Union[int, Tuple[int, int]]


def _pair(value: IntPair, name: str) -> Tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    pair = tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair  # type: ignore[return-value]


def resolve_padding(
    padding: Union[str, IntPair],
    kernel_size: Tuple[int, int],
    stride: Tuple[int, int],
    dilation: Tuple[int, int],
) -> Tuple[int, int, int, int]:
    """Return the zero padding as ``(top, bottom, left, right)``, following ``nn.Conv2d``'s rules.

    ``'same'`` pads ``dilation * (k - 1)`` in total per dimension, the extra pixel of an even
    kernel going to the bottom/right side as in ``nn.Conv2d``; it requires stride 1.
    """
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(f"padding='same' requires stride 1, got stride={stride}")
            total_h = dilation[0] * (kernel_size[0] - 1)
            total_w = dilation[1] * (kernel_size[1] - 1)
            return (total_h // 2, total_h - total_h // 2, total_w // 2, total_w - total_w // 2)
        raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    pad_h, pad_w = _pair(padding, "padding")
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return (pad_h, pad_h, pad_w, pad_w)


def output_size(
    in_size: Tuple[int, int],
    kernel_size: Tuple[int, int],
    stride: Tuple[int, int],
    padding: Tuple[int, int, int, int],
    dilation: Tuple[int, int],
) -> Tuple[int, int]:
    """Return ``(out_h, out_w)`` of a convolution with this geometry."""
    top, bottom, left, right = padding
    out_h = (in_size[0] + top + bottom - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
    out_w = (in_size[1] + left + right - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
    return out_h, out_w


def extract_patches(
    x: torch.Tensor,
    kernel_size: Tuple[int, int],
    stride: Tuple[int, int],
    padding: Tuple[int, int, int, int],
    dilation: Tuple[int, int],
) -> torch.Tensor:
    """Gather receptive fields position-major: ``(B, C, H, W) -> (out_h * out_w, B, C * kh * kw)``.

    The last dimension is ordered ``(C, kh, kw)`` like a flattened ``nn.Conv2d`` kernel.
    """
    top, bottom, left, right = padding
    if any(padding):
        x = F.pad(x, (left, right, top, bottom))
    batch, channels, height, width = x.shape
    kh, kw = kernel_size
    out_h = (height - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (width - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    sb, sc, sh, sw = x.stride()
    # A strided view of every receptive field, no copy: (B, C, out_h, out_w, kh, kw).
    windows = x.as_strided(
        (batch, channels, out_h, out_w, kh, kw),
        (sb, sc, sh * stride[0], sw * stride[1], sh * dilation[0], sw * dilation[1]),
    )
    # One copy into position-major order: (out_h, out_w, B, C, kh, kw) -> (L, B, C * kh * kw).
    return windows.permute(2, 3, 0, 1, 4, 5).reshape(out_h * out_w, batch, channels * kh * kw)


def locally_connected2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntPair = 1,
    padding: Union[IntPair, Tuple[int, int, int, int]] = 0,
    dilation: IntPair = 1,
    groups: int = 1,
) -> torch.Tensor:
    """Apply a locally connected layer, the functional counterpart of ``F.conv2d``.

    Args:
        x: input ``(B, C_in, H, W)``.
        weight: per-position kernels ``(out_h, out_w, C_out, C_in // groups, kh, kw)``.
        bias: per-position bias ``(out_h, out_w, C_out)`` or None.
        padding: an int, a pair ``(pad_h, pad_w)`` or ``(top, bottom, left, right)``.

    Returns:
        ``(B, C_out, out_h, out_w)``.
    """
    stride_hw = _pair(stride, "stride")
    dilation_hw = _pair(dilation, "dilation")
    if isinstance(padding, int) or len(padding) == 2:
        pad_h, pad_w = _pair(padding, "padding")  # type: ignore[arg-type]
        pads = (pad_h, pad_h, pad_w, pad_w)
    else:
        pads = tuple(padding)  # type: ignore[assignment]
    out_h, out_w, out_channels, in_per_group, kh, kw = weight.shape
    batch = x.shape[0]
    positions = out_h * out_w
    out_per_group = out_channels // groups
    patch_len = in_per_group * kh * kw

    patches = extract_patches(x, (kh, kw), stride_hw, pads, dilation_hw)  # (L, B, C_in*kh*kw)
    if patches.shape[0] != positions:
        raise ValueError(
            f"input of spatial size {tuple(x.shape[-2:])} gives {patches.shape[0]} output positions, "
            f"but the weight has {out_h}x{out_w}={positions}"
        )
    # Split channels into groups: (L, B, g, K) -> (L, g, B, K) -> (L * g, B, K).
    patches = patches.view(positions, batch, groups, patch_len).transpose(1, 2).reshape(
        positions * groups, batch, patch_len
    )
    kernels = weight.reshape(positions * groups, out_per_group, patch_len)  # (L * g, C_out/g, K)
    out = torch.bmm(patches, kernels.transpose(1, 2))  # (L * g, B, C_out/g)
    # (L, g, B, C_out/g) -> (B, g, C_out/g, L) -> (B, C_out, out_h, out_w)
    out = out.view(positions, groups, batch, out_per_group).permute(2, 1, 3, 0)
    out = out.reshape(batch, out_channels, out_h, out_w)
    if bias is not None:
        out = out + bias.permute(2, 0, 1).to(out.dtype)
    return out


class LocallyConnected2d(nn.Module):
    """A 2D locally connected layer with ``nn.Conv2d``'s geometry and an independent kernel per position.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as in
            ``nn.Conv2d``; ``padding`` may also be ``'same'`` or ``'valid'``.
        in_size: spatial size ``(H, W)`` (or one int for square inputs) of the inputs this layer
            accepts; the number of output positions, hence the number of kernels, depends on it.
        deviation_eps: if given, use the "near-convolutional" initialisation: one shared random
            kernel plus ``deviation_eps`` times independent noise per position, rescaled by
            ``1 / sqrt(1 + deviation_eps**2)`` so the variance matches the default initialisation.

    Kernels are initialised independently per position from Kaiming normal for ReLU with fan-out,
    ``std = sqrt(2 / (out_channels * kh * kw))``; the bias is uniform in
    ``+-1 / sqrt(in_channels // groups * kh * kw)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        in_size: IntPair,
        stride: IntPair = 1,
        padding: Union[str, IntPair] = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        bias: bool = True,
        deviation_eps: Optional[float] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.in_size = _pair(in_size, "in_size")
        self.stride = _pair(stride, "stride")
        self.dilation = _pair(dilation, "dilation")
        self.groups = groups
        self.padding_arg = padding
        self.padding = resolve_padding(padding, self.kernel_size, self.stride, self.dilation)
        self._check_geometry()
        self.out_size = output_size(
            self.in_size, self.kernel_size, self.stride, self.padding, self.dilation
        )
        if self.out_size[0] < 1 or self.out_size[1] < 1:
            raise ValueError(
                f"output size {self.out_size} < 1: input {self.in_size} with padding "
                f"(top, bottom, left, right)={self.padding} is smaller than the kernel "
                f"{self.kernel_size} with dilation {self.dilation}; use a larger input or padding"
            )
        factory = {"device": device, "dtype": dtype}
        kh, kw = self.kernel_size
        out_h, out_w = self.out_size
        self.weight = nn.Parameter(
            torch.empty(out_h, out_w, out_channels, in_channels // groups, kh, kw, **factory)
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_h, out_w, out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters(deviation_eps)

    def _check_geometry(self) -> None:
        if self.in_channels < 1 or self.out_channels < 1 or self.groups < 1:
            raise ValueError(
                f"in_channels, out_channels and groups must be positive, got "
                f"{self.in_channels}, {self.out_channels}, {self.groups}"
            )
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(
                f"in_channels={self.in_channels} and out_channels={self.out_channels} must both be "
                f"divisible by groups={self.groups}"
            )
        for name, pair in (("kernel_size", self.kernel_size), ("stride", self.stride),
                           ("dilation", self.dilation), ("in_size", self.in_size)):
            if min(pair) < 1:
                raise ValueError(f"{name} must be positive, got {pair}")

    def reset_parameters(self, deviation_eps: Optional[float] = None) -> None:
        """Draw new kernels (Kaiming normal, fan-out, per position) and biases."""
        kh, kw = self.kernel_size
        std = math.sqrt(2.0 / (self.out_channels * kh * kw))
        with torch.no_grad():
            if deviation_eps is None:
                self.weight.normal_(0.0, std)
            else:
                shared = torch.randn_like(self.weight[0, 0]) * std
                noise = torch.randn_like(self.weight) * std
                self.weight.copy_((shared + deviation_eps * noise) / math.sqrt(1.0 + deviation_eps**2))
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.in_channels // self.groups * kh * kw)
                self.bias.uniform_(-bound, bound)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, in_size: IntPair) -> "LocallyConnected2d":
        """Build a layer whose every position holds ``conv``'s kernel and bias, so its output equals ``conv(x)``."""
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"only zero-padded convolutions can be converted, got padding_mode={conv.padding_mode!r}"
            )
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,  # type: ignore[arg-type]
            in_size,
            stride=conv.stride,  # type: ignore[arg-type]
            padding=conv.padding,  # type: ignore[arg-type]
            dilation=conv.dilation,  # type: ignore[arg-type]
            groups=conv.groups,
            bias=conv.bias is not None,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        with torch.no_grad():
            layer.weight.copy_(conv.weight.expand_as(layer.weight))
            if conv.bias is not None:
                layer.bias.copy_(conv.bias.expand_as(layer.bias))
        return layer

    def kernels(self) -> torch.Tensor:
        """Return the per-position kernels, ``(out_h, out_w, out_channels, in_channels // groups, kh, kw)``.

        This is the parameter itself (a view), so in-place edits under ``torch.no_grad()`` change the layer.
        """
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(
                f"{type(self).__name__} expects a 4D input (batch, channels, height, width), "
                f"got shape {tuple(x.shape)}"
            )
        if tuple(x.shape[-2:]) != self.in_size:
            raise ValueError(
                f"{type(self).__name__} was built for inputs of spatial size {self.in_size}, "
                f"got {tuple(x.shape[-2:])}; build the layer (or convert the model) with the input size you train on"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects {self.in_channels} input channels, got {x.shape[1]}"
            )
        return locally_connected2d(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"in_size={self.in_size}, out_size={self.out_size}, stride={self.stride}, "
            f"padding={self.padding_arg}, dilation={self.dilation}, groups={self.groups}, "
            f"bias={self.bias is not None}"
        )
