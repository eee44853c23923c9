"""Locally connected 2D layer: a convolution's receptive fields without weight sharing.

Every output position holds its own kernel, so the layer has the FLOPs of ``nn.Conv2d`` and
``out_h * out_w`` times its parameters. Pogodin et al., "Towards Biologically Plausible
Convolutional Networks", NeurIPS 2021 (arXiv 2106.13031), use such layers as the biologically
plausible stand-in for convolutions.

The weight is stored position-major, ``(out_h, out_w, out_channels, in_channels // groups, kh, kw)``,
and ``LocallyConnected2d.kernels()`` is a view of the parameter. The forward and backward passes
run as one batched matrix product over output positions per kernel row, on activations copied
to a batch-innermost layout (see ``_LocallyConnectedRows``); no patch tensor is materialised for
stride-1 layers.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Tuple, Union

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


def _row_windows(
    rows: torch.Tensor, first_row: int, positions: int, kernel_w: int, first_col: int = 0
) -> torch.Tensor:
    """View ``kernel_w`` consecutive pixels of a row-layout image as one matrix per position.

    ``rows`` is ``(R, Wp, C, B)`` contiguous, so the pixels ``(y, z) .. (y, z + kernel_w - 1)`` form one
    contiguous ``(kernel_w * C, B)`` matrix. Position ``p`` of the result starts at flat pixel
    ``first_row * Wp + first_col + p``. Positions past the end of a row wrap into the next row, so
    callers give every buffer a spare row and drop (or zero) the wrapped positions.
    """
    _, width, channels, batch = rows.shape
    return rows.as_strided(
        (positions, kernel_w * channels, batch),
        (channels * batch, batch, 1),
        rows.storage_offset() + (first_row * width + first_col) * channels * batch,
    )


def _row_blocks(n_rows: int, row_by_row: bool) -> List[Tuple[int, int]]:
    """Return ``(first row, row count)`` of the blocks of output (or input) rows that share one ``bmm``."""
    return [(row, 1) for row in range(n_rows)] if row_by_row else [(0, n_rows)]


def _to_row_layout(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Copy ``(B, C, H, W)`` to ``(g, H, W, C/g, B)`` (batch innermost).

    Two copies, a 2D transpose and a copy of contiguous ``B``-element blocks, are several times
    faster on the CPU than one permuted copy, whose innermost read stride would be ``C * H * W``.
    """
    batch, channels, height, width = x.shape
    batch_last = x.reshape(batch, channels * height * width).t().contiguous()  # (C*H*W, B)
    # (g, C/g, H, W, B) -> (g, H, W, C/g, B)
    return batch_last.view(groups, channels // groups, height, width, batch).permute(0, 2, 3, 1, 4)


def _from_row_layout(rows: torch.Tensor) -> torch.Tensor:
    """Copy ``(g, H, W, C/g, B)`` (any strides) to a contiguous ``(B, C, H, W)``; see ``_to_row_layout``."""
    groups, height, width, per_group, batch = rows.shape
    # (g, H, W, C/g, B) -> (g, C/g, H, W, B) -> (C*H*W, B)
    batch_last = rows.permute(0, 3, 1, 2, 4).reshape(groups * per_group * height * width, batch)
    # Copy into a fresh tensor rather than returning a view of a temporary: a custom Function's
    # output that is a view cannot be modified in place (ReLU(inplace=True) right after the layer).
    out = rows.new_empty(batch, groups * per_group, height, width)
    out.view(batch, -1).copy_(batch_last.t())
    return out


def _kernels_by_row(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """View the kernels as ``(g, kh, oh, ow, C_out/g, kw, C_in/g)``, the order of a kernel row's GEMM."""
    out_h, out_w, out_channels, in_per_group, kh, kw = weight.shape
    # (oh, ow, g, C_out/g, C_in/g, kh, kw) -> (g, kh, oh, ow, C_out/g, kw, C_in/g)
    grouped = weight.reshape(out_h, out_w, groups, out_channels // groups, in_per_group, kh, kw)
    return grouped.permute(2, 5, 0, 1, 3, 6, 4)


def _grad_input_by_rows(
    grad_rows: torch.Tensor,
    kernels: torch.Tensor,
    pad_top_left: Tuple[int, int],
    in_size: Tuple[int, int],
    row_by_row: bool,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Compute the input gradient ``(B, C_in, H, W)`` of ``_LocallyConnectedRows`` by kernel-row GEMMs.

    Args:
        grad_rows: output gradient in row layout, ``(g, Hp + kh, Wp, C_out/g, B)``, with kh - 1 zero
            rows above and kw - 1 zero columns left of every row.
        kernels: ``(g, kh, oh, ow, C_out/g, kw, C_in/g)``, any strides.

    Returns:
        The input gradient, and the kernel-sized scratch buffer it used (None if it needed none),
        which the caller may reuse: a fresh buffer costs page faults on the CPU.
    """
    groups, kh, out_h, out_w, out_per_group, kw, in_per_group = kernels.shape
    _, grad_h, padded_w, _, batch = grad_rows.shape
    padded_h = grad_h - kh
    top, left = pad_top_left
    height, width = in_size

    # Row by row, only the real input columns are computed; otherwise all Wp columns.
    first_col, grid_w = (left, width) if row_by_row else (0, padded_w)

    # Input pixel Y (padded coordinates) receives kernel row i of output row Y - i. The kernels are
    # moved to the pixel they touch, with the kw taps reversed to match the order in which a
    # grad_rows window lists output columns: (g, kh, H, grid_w, kw, C_out/g, C_in/g) for input
    # rows top .. top + H - 1 and grid columns first_col onwards, zero where no output position
    # exists. Tap (i, j) of output (r, c) goes to (i, r + i - top, c + j - first_col, kw - 1 - j).
    scratch = None
    if kh * kw == 1 and (padded_h, padded_w) == (out_h, out_w):
        moved = kernels.transpose(4, 5)  # one tap and no padding: every pixel has its own kernel
    else:
        moved = scratch = kernels.new_zeros(groups, kh, height, grid_w, kw, out_per_group, in_per_group)
        for i in range(kh):
            first_r, end_r = max(0, top - i), min(out_h, top + height - i)
            for j in range(kw):
                first_c, end_c = max(0, first_col - j), min(out_w, first_col + grid_w - j)
                if first_r < end_r and first_c < end_c:
                    moved[:, i, first_r + i - top:end_r + i - top, first_c + j - first_col:end_c + j - first_col,
                          kw - 1 - j] = kernels[:, i, first_r:end_r, first_c:end_c, :, j]

    grad_x_rows = grad_rows.new_empty(groups, height, grid_w, in_per_group, batch)
    for group in range(groups):
        for first, count in _row_blocks(height, row_by_row):
            positions = count * grid_w
            target = grad_x_rows[group, first:first + count].view(positions, in_per_group, batch)
            for i in range(kh):
                # (P, C_in/g, kw * C_out/g) @ (P, kw * C_out/g, B) -> (P, C_in/g, B)
                pixel_kernels = moved[group, i, first:first + count].reshape(positions, kw * out_per_group, in_per_group)
                pixel_kernels = pixel_kernels.transpose(1, 2)
                # Output row Y - i sits in grad_rows row Y - i + kh - 1.
                windows = _row_windows(grad_rows[group], top + first + kh - 1 - i, positions, kw, first_col)
                if i == 0:
                    torch.bmm(pixel_kernels, windows, out=target)
                else:
                    target.baddbmm_(pixel_kernels, windows)
    return _from_row_layout(grad_x_rows[:, :, left - first_col:left - first_col + width]), scratch


class _LocallyConnectedRows(torch.autograd.Function):
    """Stride-1, dilation-1 locally connected layer computed as batched GEMMs, one per kernel row.

    Activations are copied once into a "row layout" ``(g, Hp + 1, Wp, C/g, B)``, batch innermost,
    where ``Hp, Wp`` is the padded size. In that layout the ``kw`` pixels a kernel row covers are
    one contiguous ``(kw * C/g, B)`` matrix, so a kernel row is one ``torch.bmm`` over output
    positions and no patch tensor is materialised. A ``bmm`` needs one stride between positions:
    either one call covers all output rows on an ``oh x Wp`` grid, whose ``Wp - ow`` extra columns per
    row are computed and dropped, or (``row_by_row``) one call per output row computes only real
    positions. The input gradient is the same computation run on the zero-padded output gradient with
    the kernels flipped and moved to the input pixels they touch, which avoids a col2im fold.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        padding: Tuple[int, int, int, int],
        groups: int,
        row_by_row: bool,
    ) -> torch.Tensor:
        top, bottom, left, right = padding
        batch, in_channels, height, width = x.shape
        out_h, out_w, out_channels, in_per_group, kh, kw = weight.shape
        out_per_group = out_channels // groups
        padded_h, padded_w = height + top + bottom, width + left + right
        grid_w = out_w if row_by_row else padded_w  # output columns computed per row

        # (B, C, H, W) -> (g, H, W, C/g, B) inside a zero frame: (g, padded_h + 1, padded_w, C/g, B).
        # One memset of the whole buffer beats four thin border fills on the CPU.
        rows = x.new_zeros(groups, padded_h + 1, padded_w, in_per_group, batch)
        rows[:, top:top + height, left:left + width] = _to_row_layout(x, groups)

        # (g, kh, oh, grid_w, C_out/g, kw, C_in/g). A 1x1 kernel needs no copy: with one tap the
        # view already has contiguous (C_out/g, C_in/g) matrices at one stride per position.
        # Columns past ow stay uninitialised: they only feed output columns that are dropped, and
        # every position is a separate GEMM, so even NaNs there reach nothing else.
        row_kernels = _kernels_by_row(weight, groups)
        if kh * kw != 1 or grid_w != out_w:
            arranged = row_kernels
            row_kernels = weight.new_empty(groups, kh, out_h, grid_w, out_per_group, kw, in_per_group)
            row_kernels[:, :, :, :out_w] = arranged

        out = x.new_empty(groups, out_h, grid_w, out_per_group, batch)
        for group in range(groups):
            for first, count in _row_blocks(out_h, row_by_row):
                positions = count * grid_w
                target = out[group, first:first + count].view(positions, out_per_group, batch)
                for i in range(kh):
                    # (P, C_out/g, kw * C_in/g) @ (P, kw * C_in/g, B) -> (P, C_out/g, B)
                    kernels = row_kernels[group, i, first:first + count].view(positions, out_per_group, -1)
                    windows = _row_windows(rows[group], first + i, positions, kw)
                    if i == 0:
                        torch.bmm(kernels, windows, out=target)
                    else:
                        target.baddbmm_(kernels, windows)

        # The weight, not row_kernels, is saved: it exists anyway, so the arranged copy is freed here.
        ctx.save_for_backward(rows, weight)
        ctx.geometry = (padding, groups, row_by_row, (height, width))
        return _from_row_layout(out[:, :, :out_w])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:  # type: ignore[override]
        rows, weight = ctx.saved_tensors
        (top, _, left, _), groups, row_by_row, (height, width) = ctx.geometry
        out_h, out_w, out_channels, in_per_group, kh, kw = weight.shape
        out_per_group = out_channels // groups
        _, padded_h, padded_w, _, batch = rows.shape
        padded_h -= 1  # rows has one spare row
        grid_w = out_w if row_by_row else padded_w
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]

        # The output gradient in row layout, with kh - 1 zero rows above and kw - 1 zero columns left
        # of every row: (g, padded_h + kh, Wp, C_out/g, B). Since ow + kw - 1 == Wp, the data fills
        # each interior row to its end, and reads past a row's end wrap into the next row's zeros.
        grad_rows = grad_out.new_zeros(groups, padded_h + kh, padded_w, out_per_group, batch)
        grad_rows[:, kh - 1:kh - 1 + out_h, kw - 1:] = _to_row_layout(grad_out, groups)

        # The input gradient comes first, so its kernel copy is freed before the kernel gradient's
        # buffers exist.
        grad_x = grad_w = scratch = None
        if need_x:
            grad_x, scratch = _grad_input_by_rows(
                grad_rows, _kernels_by_row(weight, groups), (top, left), (height, width), row_by_row
            )

        if need_w:
            shape = (groups, kh, out_h, grid_w, out_per_group, kw * in_per_group)
            if scratch is not None and scratch.numel() >= math.prod(shape):
                # The input gradient's kernel buffer is free now and at least as large (Hp >= oh).
                grad_kernels = scratch.view(-1)[:math.prod(shape)].view(shape)
            else:
                grad_kernels = weight.new_empty(shape)
            del scratch
            for group in range(groups):
                grad_flat = grad_rows[group].view(-1, out_per_group, batch)  # (pixels, C_out/g, B)
                for first, count in _row_blocks(out_h, row_by_row):
                    positions = count * grid_w
                    # Output pixel (r, c) sits at grad_rows pixel (r + kh - 1, c + kw - 1).
                    start = (first + kh - 1) * padded_w + kw - 1
                    grad_block = grad_flat[start:start + positions]  # (P, C_out/g, B)
                    for i in range(kh):
                        # (P, C_out/g, B) @ (P, B, kw * C_in/g) -> (P, C_out/g, kw * C_in/g)
                        windows = _row_windows(rows[group], first + i, positions, kw)
                        target = grad_kernels[group, i, first:first + count].view(positions, out_per_group, -1)
                        torch.bmm(grad_block, windows.transpose(1, 2), out=target)
            # (g, kh, oh, ow, C_out/g, kw, C_in/g) -> (oh, ow, g, C_out/g, kh, kw, C_in/g)
            grad_w = grad_kernels.view(groups, kh, out_h, grid_w, out_per_group, kw, in_per_group)[:, :, :, :out_w]
            grad_w = grad_w.permute(2, 3, 0, 4, 1, 5, 6)
            if kh * kw != 1:
                # Two copies with long inner loops, several times faster than one 7D permute:
                # -> (oh * ow * C_out, kh * kw, C_in/g) -> (oh * ow * C_out, C_in/g, kh * kw)
                grad_w = grad_w.contiguous()
                del grad_kernels
                grad_w = grad_w.view(-1, kh * kw, in_per_group).transpose(1, 2)
            # A free view for one group and a 1x1 kernel, where both orders agree.
            grad_w = grad_w.reshape(out_h, out_w, out_channels, in_per_group, kh, kw)

        return grad_x, grad_w, None, None, None


def locally_connected2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntPair = 1,
    padding: Union[IntPair, Tuple[int, int, int, int]] = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    row_by_row: Optional[bool] = None,
) -> torch.Tensor:
    """Apply a locally connected layer, the functional counterpart of ``F.conv2d``.

    Stride-1, dilation-1 layers run as one batched GEMM per kernel row (see
    ``_LocallyConnectedRows``). A 1x1 kernel with any stride subsamples its input first. Other
    strides and dilations gather patches with ``F.unfold`` and run them as a 1x1 layer. Under
    autocast the input and kernels are cast to the autocast dtype, as ``F.conv2d`` does.

    Args:
        x: input ``(B, C_in, H, W)``.
        weight: per-position kernels ``(out_h, out_w, C_out, C_in // groups, kh, kw)``.
        bias: per-position bias ``(out_h, out_w, C_out)`` or None.
        padding: an int, a pair ``(pad_h, pad_w)`` or ``(top, bottom, left, right)``.
        row_by_row: issue one GEMM call per output row, computing only real positions, instead of one
            call over a grid that includes ``kw - 1`` dropped columns per row. None (the default)
            chooses row by row on a CPU running one thread, and elsewhere when those columns are
            over a quarter of the grid. Measured on a 2-core CPU shared with other jobs (ResNet-20
            layers, batch 128): on one thread, row by row was 8% to 14% faster at 32x32, 16x16 and
            8x8. With two threads, where every call is a parallel region, it ran 1.4x (best of 11)
            to 2x (median) slower than the grid at 8x8, despite the grid's 20% dropped columns.

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
    expected = output_size(tuple(x.shape[-2:]), (kh, kw), stride_hw, pads, dilation_hw)  # type: ignore[arg-type]
    if expected != (out_h, out_w):
        raise ValueError(
            f"input of spatial size {tuple(x.shape[-2:])} gives {expected[0]}x{expected[1]} output "
            f"positions, but the weight has {out_h}x{out_w}"
        )
    if x.shape[1] != in_per_group * groups:
        raise ValueError(
            f"input has {x.shape[1]} channels, but the weight expects {in_per_group} per group "
            f"times groups={groups}"
        )

    if row_by_row is None:
        # Only the kernel-rows path drops columns (kw - 1 per row); the 1x1 paths have none.
        dropped = kw - 1 if stride_hw == (1, 1) and dilation_hw == (1, 1) else 0
        single_thread_cpu = x.device.type == "cpu" and torch.get_num_threads() == 1
        row_by_row = dropped > 0 and (single_thread_cpu or dropped * 4 > out_w + dropped)

    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(compute_dtype), weight.to(compute_dtype)
    with torch.autocast(device_type, enabled=False):
        if (kh, kw) == (1, 1) and (stride_hw != (1, 1) or any(pads)):
            # A 1x1 kernel reads one pixel: pad, subsample, and run a 1x1 stride-1 layer.
            x = F.pad(x, (pads[2], pads[3], pads[0], pads[1]))
            x = x[:, :, ::stride_hw[0], ::stride_hw[1]][:, :, :out_h, :out_w]
            out = _LocallyConnectedRows.apply(x, weight, (0, 0, 0, 0), groups, row_by_row)
        elif stride_hw == (1, 1) and dilation_hw == (1, 1):
            out = _LocallyConnectedRows.apply(x, weight, pads, groups, row_by_row)
        else:
            # Gather patches: (B, C_in * kh * kw, oh * ow), channels ordered (C_in, kh, kw) as in the
            # weight, so the weight is a free view as 1x1 kernels over C_in/g * kh * kw channels.
            x = F.pad(x, (pads[2], pads[3], pads[0], pads[1]))
            patches = F.unfold(x, (kh, kw), dilation=dilation_hw, stride=stride_hw)
            patches = patches.view(x.shape[0], -1, out_h, out_w)
            kernels_1x1 = weight.reshape(out_h, out_w, out_channels, in_per_group * kh * kw, 1, 1)
            out = _LocallyConnectedRows.apply(patches, kernels_1x1, (0, 0, 0, 0), groups, row_by_row)
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
