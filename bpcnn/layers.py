"""Locally connected 2D layer: a convolution's receptive fields without weight sharing.

Every output position holds its own kernel, so the layer has the FLOPs of ``nn.Conv2d`` and
``out_h * out_w`` times its parameters. Pogodin et al., "Towards Biologically Plausible
Convolutional Networks", NeurIPS 2021 (arXiv 2106.13031), use such layers as the biologically
plausible stand-in for convolutions.

The weight has the shape ``(out_h, out_w, out_channels, in_channels // groups, kh, kw)``, and
``LocallyConnected2d.kernels()`` is a view of the parameter; for one group and no dilation its
memory is ordered as the matrix products read it (see ``empty_kernels``). The forward and backward
passes run as one batched matrix product over output positions per kernel row. Layers of one
group work on channels-last activations (``_LocallyConnectedChannelsLast``, any stride); stride-1
layers of several groups copy NCHW activations to a batch-innermost layout
(``_LocallyConnectedRows``). No patch tensor is materialised except for dilated layers and strided
layers of several groups, which use ``F.unfold``.
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


def _framed(pixels: torch.Tensor, frame: Tuple[int, int, int, int]) -> torch.Tensor:
    """Copy ``(B, H, W, C)`` into a new buffer with ``(top, bottom, left, right)`` zero rows and columns around it.

    Only the frame is zeroed, so the buffer is written once rather than twice.
    """
    batch, height, width, channels = pixels.shape
    top, bottom, left, right = frame
    out = pixels.new_empty(batch, top + height + bottom, left + width + right, channels)
    out[:, :top].zero_()
    out[:, top + height:].zero_()
    interior = out[:, top:top + height]
    interior[:, :, :left].zero_()
    interior[:, :, left + width:].zero_()
    interior[:, :, left:left + width] = pixels
    return out


def _pixel_windows(
    frame: torch.Tensor, first_row: int, positions: int, kernel_w: int, first_col: int = 0, stride: int = 1
) -> torch.Tensor:
    """View ``kernel_w`` consecutive pixels of a channels-last frame as one ``(B, kernel_w * C)`` matrix per position.

    ``frame`` is ``(B, R, Wp, C)`` contiguous. Position ``p`` starts at flat pixel
    ``first_row * Wp + first_col + stride * p``. As in ``_row_windows``, positions past a row's end
    wrap into the next row.
    """
    batch, n_rows, width, channels = frame.shape
    return frame.as_strided(
        (positions, batch, kernel_w * channels),
        (stride * channels, n_rows * width * channels, 1),
        frame.storage_offset() + (first_row * width + first_col) * channels,
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


def empty_kernels(
    shape: Tuple[int, int, int, int, int, int], row_layout: bool, **factory: Any
) -> torch.Tensor:
    """Return uninitialised kernels of ``shape`` ``(oh, ow, C_out, C_in/g, kh, kw)``.

    With ``row_layout`` the memory is ordered ``(kh, oh, ow, C_out, kw, C_in)``: the kernel row
    ``i`` of one output row is then one contiguous ``(ow, C_out, kw * C_in)`` block, the operand of
    one row-by-row GEMM. The forward pass then needs no copy of the kernels, and the backward pass
    returns the kernel gradient without rearranging it. The tensor
    has the usual shape either way; only its strides differ. Only for one group.
    """
    out_h, out_w, out_channels, in_per_group, kh, kw = shape
    if not row_layout:
        return torch.empty(shape, **factory)
    # (kh, oh, ow, C_out, kw, C_in) -> (oh, ow, C_out, C_in, kh, kw)
    return torch.empty(kh, out_h, out_w, out_channels, kw, in_per_group, **factory).permute(1, 2, 3, 5, 0, 4)


def is_row_layout(weight: torch.Tensor, groups: int) -> bool:
    """Return whether ``weight`` is stored in the row layout of ``empty_kernels``."""
    return groups == 1 and weight.permute(4, 0, 1, 2, 5, 3).is_contiguous()


def _kernels_by_row(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """View the kernels as ``(g, kh, oh, ow, C_out/g, kw, C_in/g)``, the order of a kernel row's GEMM."""
    out_h, out_w, out_channels, in_per_group, kh, kw = weight.shape
    # (oh, ow, g, C_out/g, C_in/g, kh, kw) -> (g, kh, oh, ow, C_out/g, kw, C_in/g)
    grouped = weight.reshape(out_h, out_w, groups, out_channels // groups, in_per_group, kh, kw)
    return grouped.permute(2, 5, 0, 1, 3, 6, 4)


def _add_product(target: torch.Tensor, left: torch.Tensor, right: torch.Tensor, overwrite: bool) -> None:
    """Add the batched product ``left @ right`` to ``target``, or write it there when ``overwrite`` is set."""
    if overwrite:
        torch.bmm(left, right, out=target)
    else:
        target.baddbmm_(left, right)


def _moved_kernels(
    kernels: torch.Tensor,
    padded_h: int,
    padded_w: int,
    pad_top_left: Tuple[int, int],
    in_size: Tuple[int, int],
    first_col: int,
    grid_w: int,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Move each kernel tap to the input pixel it reads, for the input gradient.

    Input pixel Y (padded coordinates) receives kernel row i of output row Y - i. The kernels are
    moved to the pixel they touch, with the kw taps reversed to match the order in which a window of
    the padded output gradient lists output columns: ``(g, kh, H, grid_w, kw, C_out/g, C_in/g)``
    for input rows top .. top + H - 1 and grid columns ``first_col`` onwards, zero where no output
    position exists. Tap (i, j) of output (r, c) goes to (i, r + i - top, c + j - first_col, kw - 1 - j).

    Args:
        kernels: ``(g, kh, oh, ow, C_out/g, kw, C_in/g)``, any strides.

    Returns:
        The moved kernels, and the buffer holding them (None when they are a view of ``kernels``),
        which the caller may reuse once they are no longer needed.
    """
    groups, kh, out_h, out_w, out_per_group, kw, in_per_group = kernels.shape
    top, _ = pad_top_left
    height, _ = in_size
    if kh * kw == 1 and (padded_h, padded_w) == (out_h, out_w):
        return kernels.transpose(4, 5), None  # one tap and no padding: every pixel has its own kernel
    # Only the entries no kernel reaches are zeroed (a frame per tap): filling the whole buffer
    # first wrote it twice, 4% to 5% of a pass at the ResNet-20 shapes.
    moved = kernels.new_empty(groups, kh, height, grid_w, kw, out_per_group, in_per_group)
    s_g, s_i, s_r, s_c, s_o, s_j, s_in = kernels.stride()
    # Grid columns [x_0, x_1) receive all kw taps. There moved[:, i, y, x, t] is
    # kernels[:, i, y + top - i, x + first_col - (kw - 1) + t, :, kw - 1 - t].
    # That is one strided view (stride s_c - s_j along t), copied once per kernel row. On one
    # thread this took a quarter to a half of the time of kw separate copies.
    x_0, x_1 = max(0, kw - 1 - first_col), min(grid_w, out_w - first_col)
    if s_c < s_j:
        # The view would need a negative stride, so every tap is copied on its own.
        x_0 = x_1 = 0
    for i in range(kh):
        first_r, end_r = max(0, top - i), min(out_h, top + height - i)
        row_0, row_1 = first_r + i - top, end_r + i - top
        strided_copy = row_0 < row_1 and x_0 < x_1
        if strided_copy:
            offset = (kernels.storage_offset() + i * s_i + first_r * s_r
                      + (x_0 + first_col - (kw - 1)) * s_c + (kw - 1) * s_j)
            taps = kernels.as_strided(
                (groups, row_1 - row_0, x_1 - x_0, kw, out_per_group, in_per_group),
                (s_g, s_r, s_c, s_c - s_j, s_o, s_in), offset)
            moved[:, i, row_0:row_1, x_0:x_1] = taps
        for j in range(kw):
            first_c, end_c = max(0, first_col - j), min(out_w, first_col + grid_w - j)
            tap = moved[:, i, :, :, kw - 1 - j]  # (g, H, grid_w, C_out/g, C_in/g)
            if first_r >= end_r or first_c >= end_c:
                tap.zero_()
                continue
            col_0, col_1 = first_c + j - first_col, end_c + j - first_col
            tap[:, :row_0].zero_()
            tap[:, row_1:].zero_()
            tap[:, row_0:row_1, :col_0].zero_()
            tap[:, row_0:row_1, col_1:].zero_()
            # The columns the strided copy did not cover, [col_0, x_0) and [x_1, col_1).
            spans = [(col_0, min(col_1, x_0)), (max(col_0, x_1), col_1)] if strided_copy else [(col_0, col_1)]
            for start, end in spans:
                if start < end:
                    tap[:, row_0:row_1, start:end] = kernels[
                        :, i, first_r:end_r, start + first_col - j:end + first_col - j, :, j]
    return moved, moved


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
    top, left = pad_top_left
    height, width = in_size

    # Row by row, only the real input columns are computed; otherwise all Wp columns.
    first_col, grid_w = (left, width) if row_by_row else (0, padded_w)
    moved, scratch = _moved_kernels(kernels, grad_h - kh, padded_w, pad_top_left, in_size, first_col, grid_w)

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
                _add_product(target, pixel_kernels, windows, overwrite=i == 0)
    return _from_row_layout(grad_x_rows[:, :, left - first_col:left - first_col + width]), scratch


# Below this many output channels, stride-1 layers of one group take _LocallyConnectedRows: the
# channels-last GEMMs have C_out columns, too few for MKL. With two threads, batch 128 and 3x3
# kernels, 1 -> 8 channels at 28x28 took 5.6 ms there against 12.0 ms channels-last, 8 -> 8 took
# 11.4 against 18.8 ms, and 16 -> 16 at 14x14 took 6.8 against 5.5 ms.
_MIN_CHANNELS_LAST_OUT = 16


def _is_channels_last(x: torch.Tensor) -> bool:
    """Return whether ``x`` is channels-last in memory and not also contiguous (ambiguous when C or H * W is 1)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _kernel_grad_buffer(scratch: Optional[torch.Tensor], shape: Tuple[int, ...], weight: torch.Tensor) -> torch.Tensor:
    """Return a buffer for the kernel gradient, reusing the input gradient's kernel buffer if it is large enough."""
    if scratch is not None and scratch.numel() >= math.prod(shape):
        # The input gradient's kernel buffer is free now and at least as large (Hp >= oh).
        return scratch.view(-1)[:math.prod(shape)].view(shape)
    return weight.new_empty(shape)


def _weight_grad(grad_kernels: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Turn the kernel-row GEMMs' output ``(g, kh, oh, grid_w, C_out/g, kw * C_in/g)`` into the weight's gradient.

    Returned with the weight's strides when the weight is stored in row layout (no copy), else contiguous.
    """
    out_h, out_w, out_channels, in_per_group, kh, kw = weight.shape
    _, _, _, grid_w, out_per_group, _ = grad_kernels.shape
    # (g, kh, oh, ow, C_out/g, kw, C_in/g) -> (oh, ow, g, C_out/g, kh, kw, C_in/g)
    grad_w = grad_kernels.view(groups, kh, out_h, grid_w, out_per_group, kw, in_per_group)[:, :, :, :out_w]
    grad_w = grad_w.permute(2, 3, 0, 4, 1, 5, 6)
    if grid_w == out_w and kh * kw != 1 and is_row_layout(weight, groups):
        # The weight is stored in row layout: its gradient is the GEMMs' output as it is, with the
        # same strides, so autograd accumulates it without a copy.
        # (oh, ow, 1, C_out, kh, kw, C_in) -> (oh, ow, C_out, C_in, kh, kw)
        return grad_w.squeeze(2).permute(0, 1, 2, 5, 3, 4)
    if kh * kw != 1:
        # Two copies with long inner loops, several times faster than one 7D permute:
        # -> (oh * ow * C_out, kh * kw, C_in/g) -> (oh * ow * C_out, C_in/g, kh * kw)
        grad_w = grad_w.contiguous().view(-1, kh * kw, in_per_group).transpose(1, 2)
    # A free view for one group and a 1x1 kernel, where both orders agree.
    return grad_w.reshape(out_h, out_w, out_channels, in_per_group, kh, kw)


class _LocallyConnectedRows(torch.autograd.Function):
    """Stride-1, dilation-1 locally connected layer computed as batched GEMMs, one per kernel row.

    ``locally_connected2d`` uses it for stride-1 layers of several groups or with fewer than
    ``_MIN_CHANNELS_LAST_OUT`` output channels, and for 1x1 layers after subsampling.
    ``_LocallyConnectedChannelsLast`` serves the other layers of one group.

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
        # Kernels stored in row layout (see empty_kernels) are used as they are, row by row.
        in_place = grid_w == out_w and (kh * kw == 1 or row_kernels.is_contiguous())
        if not in_place:
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
                    _add_product(target, kernels, windows, overwrite=i == 0)

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
            grad_kernels = _kernel_grad_buffer(scratch, shape, weight)
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
            grad_w = _weight_grad(grad_kernels, weight, groups)

        return grad_x, grad_w, None, None, None


class _LocallyConnectedChannelsLast(torch.autograd.Function):
    """The computation of ``_LocallyConnectedRows`` for one group, on activations in channels-last order.

    A channels-last tensor ``(B, C, H, W)`` is ``(B, H, W, C)`` in memory, so the ``kw`` pixels a
    kernel row covers are, per image, ``kw * C`` contiguous numbers. Copied once into a zero
    frame ``(B, Hp + 1, Wp, C)``, they form one ``(B, kw * C)`` matrix per output position, with the
    batch as the GEMM's rows and the image size as their stride. Each kernel row is then one
    ``torch.bmm`` over positions, as in ``_LocallyConnectedRows``, but the activations go in and
    out by copies of contiguous pixel blocks, several times cheaper than that class's transposes.
    Output and input gradient are channels-last. The input may have any strides.

    Strides work too, row by row: position ``c`` of an output row starts ``stride * c`` pixels into
    its frame row. The moved kernels of the stride-1 input gradient assume stride 1. A strided
    layer instead computes ``(B, C_out) @ (C_out, kw * C_in)`` per position and kernel row, and adds
    the result tap by tap into a strided view of the padded input gradient.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        padding: Tuple[int, int, int, int],
        stride: Tuple[int, int],
        row_by_row: bool,
    ) -> torch.Tensor:
        top, bottom, left, right = padding
        stride_h, stride_w = stride
        batch, in_channels, height, width = x.shape
        out_h, out_w, out_channels, _, kh, kw = weight.shape
        padded_h, padded_w = height + top + bottom, width + left + right
        row_by_row = row_by_row or stride != (1, 1)  # a strided grid has no single position stride
        grid_w = out_w if row_by_row else padded_w

        # (B, C, H, W) channels-last -> (B, H, W, C) inside a zero frame (B, padded_h + 1, padded_w, C).
        frame = _framed(x.permute(0, 2, 3, 1), (top, 1 + bottom, left, right))

        row_kernels = _kernels_by_row(weight, 1)[0]  # (kh, oh, ow, C_out, kw, C_in)
        if not (grid_w == out_w and (kh * kw == 1 or row_kernels.is_contiguous())):
            arranged = row_kernels
            row_kernels = weight.new_empty(kh, out_h, grid_w, out_channels, kw, in_channels)
            row_kernels[:, :, :out_w] = arranged

        out = x.new_empty(out_h, grid_w, batch, out_channels)
        for first, count in _row_blocks(out_h, row_by_row):
            positions = count * grid_w
            target = out[first:first + count].view(positions, batch, out_channels)
            for i in range(kh):
                # (P, B, kw * C_in) @ (P, kw * C_in, C_out) -> (P, B, C_out)
                kernels = row_kernels[i, first:first + count].reshape(positions, out_channels, -1).transpose(1, 2)
                windows = _pixel_windows(frame, first * stride_h + i, positions, kw, 0, stride_w)
                _add_product(target, windows, kernels, overwrite=i == 0)

        ctx.save_for_backward(frame, weight)
        ctx.geometry = (padding, stride, row_by_row, (height, width))
        # (oh, ow, B, C_out) -> (B, oh, ow, C_out), which is (B, C_out, oh, ow) channels-last.
        result = x.new_empty(batch, out_h, out_w, out_channels)
        result.copy_(out[:, :out_w].permute(2, 0, 1, 3))
        return result.permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:  # type: ignore[override]
        frame, weight = ctx.saved_tensors
        (top, _, left, _), stride, row_by_row, (height, width) = ctx.geometry
        if stride != (1, 1):
            return _strided_channels_last_backward(ctx, grad_out, frame, weight)
        out_h, out_w, out_channels, in_channels, kh, kw = weight.shape
        batch, padded_h, padded_w, _ = frame.shape
        padded_h -= 1  # the frame has one spare row
        grid_w = out_w if row_by_row else padded_w
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]

        # The output gradient with kh - 1 zero rows above and kw - 1 zero columns left of every row:
        # (B, padded_h + kh, Wp, C_out), as grad_rows in _LocallyConnectedRows.
        grad_frame = _framed(grad_out.permute(0, 2, 3, 1), (kh - 1, padded_h + 1 - out_h, kw - 1, 0))

        grad_x = grad_w = scratch = None
        if need_x:
            first_col, grid_x = (left, width) if row_by_row else (0, padded_w)
            moved, scratch = _moved_kernels(
                _kernels_by_row(weight, 1), padded_h, padded_w, (top, left), (height, width), first_col, grid_x)
            grad_pixels = grad_out.new_empty(height, grid_x, batch, in_channels)
            for first, count in _row_blocks(height, row_by_row):
                positions = count * grid_x
                target = grad_pixels[first:first + count].view(positions, batch, in_channels)
                for i in range(kh):
                    # (P, B, kw * C_out) @ (P, kw * C_out, C_in) -> (P, B, C_in)
                    pixel_kernels = moved[0, i, first:first + count].reshape(positions, kw * out_channels, in_channels)
                    # Output row Y - i sits in grad_frame row Y - i + kh - 1.
                    windows = _pixel_windows(grad_frame, top + first + kh - 1 - i, positions, kw, first_col)
                    _add_product(target, windows, pixel_kernels, overwrite=i == 0)
            del moved
            # (H, W, B, C_in) -> (B, H, W, C_in), which is (B, C_in, H, W) channels-last.
            grad_x = grad_out.new_empty(batch, height, width, in_channels)
            grad_x.copy_(grad_pixels[:, left - first_col:left - first_col + width].permute(2, 0, 1, 3))
            grad_x = grad_x.permute(0, 3, 1, 2)
            del grad_pixels

        if need_w:
            grad_kernels = _kernel_grad_buffer(scratch, (1, kh, out_h, grid_w, out_channels, kw * in_channels), weight)
            del scratch
            for first, count in _row_blocks(out_h, row_by_row):
                positions = count * grid_w
                # Output pixel (r, c) sits at grad_frame pixel (r + kh - 1, c + kw - 1): (P, C_out, B).
                grad_block = _pixel_windows(grad_frame, first + kh - 1, positions, 1, kw - 1).transpose(1, 2)
                for i in range(kh):
                    # (P, C_out, B) @ (P, B, kw * C_in) -> (P, C_out, kw * C_in)
                    windows = _pixel_windows(frame, first + i, positions, kw)
                    target = grad_kernels[0, i, first:first + count].view(positions, out_channels, -1)
                    torch.bmm(grad_block, windows, out=target)
            grad_w = _weight_grad(grad_kernels, weight, 1)

        return grad_x, grad_w, None, None, None


def _strided_channels_last_backward(
    ctx: Any, grad_out: torch.Tensor, frame: torch.Tensor, weight: torch.Tensor
) -> Tuple[Optional[torch.Tensor], ...]:
    """Return the gradients of ``_LocallyConnectedChannelsLast`` for a stride other than 1 (row by row)."""
    (top, _, left, _), (stride_h, stride_w), _, (height, width) = ctx.geometry
    out_h, out_w, out_channels, in_channels, kh, kw = weight.shape
    batch, frame_h, padded_w, _ = frame.shape
    positions = out_h * out_w
    # (B, C_out, oh, ow) channels-last -> (B, oh, ow, C_out) contiguous.
    grad_pixels = grad_out.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    offset = grad_pixels.storage_offset()
    grad_x = grad_w = None

    if ctx.needs_input_grad[0]:
        # (kh, oh, ow, C_out, kw, C_in) -> (kh, P, C_out, kw * C_in); a view for kernels in row layout.
        kernels = _kernels_by_row(weight, 1)[0].reshape(kh, positions, out_channels, kw * in_channels)
        grad_all = grad_pixels.as_strided((positions, batch, out_channels), (out_channels, positions * out_channels, 1), offset)
        grad_frame = grad_out.new_zeros(batch, frame_h, padded_w, in_channels)
        rows_end, cols_end = (out_h - 1) * stride_h + 1, (out_w - 1) * stride_w + 1
        for i in range(kh):
            # (P, B, C_out) @ (P, C_out, kw * C_in) -> (P, B, kw * C_in) -> (oh, ow, B, kw, C_in)
            taps = torch.bmm(grad_all, kernels[i]).view(out_h, out_w, batch, kw, in_channels)
            for j in range(kw):
                # Output (r, c) reads padded pixel (r * s_h + i, c * s_w + j): positions never collide within a tap.
                target = grad_frame[:, i:i + rows_end:stride_h, j:j + cols_end:stride_w]  # (B, oh, ow, C_in)
                target += taps[:, :, :, j].permute(2, 0, 1, 3)
            del taps
        # (B, H, W, C_in) contiguous, which is (B, C_in, H, W) channels-last.
        grad_x = grad_frame[:, top:top + height, left:left + width].contiguous().permute(0, 3, 1, 2)

    if ctx.needs_input_grad[1]:
        grad_kernels = weight.new_empty(1, kh, out_h, out_w, out_channels, kw * in_channels)
        for row in range(out_h):
            # Output row `row` of the gradient as (ow, C_out, B).
            grad_block = grad_pixels.as_strided(
                (out_w, out_channels, batch), (out_channels, 1, positions * out_channels), offset + row * out_w * out_channels)
            for i in range(kh):
                # (ow, C_out, B) @ (ow, B, kw * C_in) -> (ow, C_out, kw * C_in)
                windows = _pixel_windows(frame, row * stride_h + i, out_w, kw, 0, stride_w)
                torch.bmm(grad_block, windows, out=grad_kernels[0, i, row])
        grad_w = _weight_grad(grad_kernels, weight, 1)

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
    channels_last: Optional[bool] = None,
) -> torch.Tensor:
    """Apply a locally connected layer, the functional counterpart of ``F.conv2d``.

    Layers without dilation run as one batched GEMM per kernel row: layers of one group in
    ``_LocallyConnectedChannelsLast`` (for NCHW inputs too), stride-1 layers of several groups in
    ``_LocallyConnectedRows``. A 1x1 kernel with any stride subsamples its input first. Dilated
    layers and strided layers of several groups gather patches with ``F.unfold`` and run them as a
    1x1 layer. Under autocast the input and kernels are cast to the autocast dtype, as
    ``F.conv2d`` does.

    Args:
        x: input ``(B, C_in, H, W)``.
        weight: per-position kernels ``(out_h, out_w, C_out, C_in // groups, kh, kw)``.
        bias: per-position bias ``(out_h, out_w, C_out)`` or None.
        padding: an int, a pair ``(pad_h, pad_w)`` or ``(top, bottom, left, right)``.
        row_by_row: issue one GEMM call per output row, computing only real positions, instead of one
            call over a grid that includes ``kw - 1`` dropped columns per row. None (the default)
            chooses row by row on the channels-last path for kernels stored in row layout (see
            ``empty_kernels``), on a CPU running one thread, and when those columns are over a
            quarter of the grid. Strided layers always run row by row. ``benchmarks/README.md`` has the measurements.
        channels_last: return a channels-last output, which saves a copy per layer and pass. None
            (the default) does so when ``x`` is channels-last and not also contiguous. A tensor
            with one channel is both, so it counts as contiguous. ``LocallyConnected2d`` passes
            True after ``to_channels_last``.

    Returns:
        ``(B, C_out, out_h, out_w)``, channels-last or contiguous as described for ``channels_last``.
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

    subsample_1x1 = (kh, kw) == (1, 1) and (stride_hw != (1, 1) or any(pads))
    channels_last_path = (not subsample_1x1 and groups == 1 and dilation_hw == (1, 1)
                          and (stride_hw != (1, 1) or out_channels >= _MIN_CHANNELS_LAST_OUT))
    if row_by_row is None:
        # Only the kernel-rows paths drop columns (kw - 1 per row); the 1x1 paths have none.
        dropped = kw - 1 if stride_hw == (1, 1) and dilation_hw == (1, 1) else 0
        single_thread_cpu = x.device.type == "cpu" and torch.get_num_threads() == 1
        # Kernels in row layout are read in place row by row on the channels-last path. On
        # _LocallyConnectedRows with two threads, the grid was faster for the demo's 1 -> 8 and
        # 8 -> 8 layers (5.6 and 11.4 ms against 7.4 and 13.1 ms), even with its kernel copy.
        in_place = channels_last_path and is_row_layout(weight, groups)
        row_by_row = dropped > 0 and (single_thread_cpu or dropped * 4 > out_w + dropped or in_place)

    if channels_last is None:
        channels_last = _is_channels_last(x)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(compute_dtype), weight.to(compute_dtype)
    with torch.autocast(device_type, enabled=False):
        if subsample_1x1:
            # A 1x1 kernel reads one pixel: pad, subsample, and run a 1x1 stride-1 layer.
            x = F.pad(x, (pads[2], pads[3], pads[0], pads[1]))
            x = x[:, :, ::stride_hw[0], ::stride_hw[1]][:, :, :out_h, :out_w]
            out = _LocallyConnectedRows.apply(x, weight, (0, 0, 0, 0), groups, row_by_row)
        elif channels_last_path:
            # NCHW inputs take this path too: it reads any input strides, and its output goes back
            # to NCHW here. On one thread that was 1.02x to 1.1x faster than _LocallyConnectedRows.
            out = _LocallyConnectedChannelsLast.apply(x, weight, pads, stride_hw, row_by_row)
            if not channels_last:
                out = out.contiguous()
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
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)  # a no-op after the channels-last path
    if bias is not None:
        out = out + bias.permute(2, 0, 1).to(out.dtype)  # keeps the output's memory format
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
        # Layers of one group without dilation store their kernels in the order their GEMMs read them.
        row_layout = groups == 1 and self.dilation == (1, 1) and kh * kw > 1
        self.weight = nn.Parameter(empty_kernels(
            (out_h, out_w, out_channels, in_channels // groups, kh, kw), row_layout, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_h, out_w, out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters(deviation_eps)
        # Set by bpcnn.to_channels_last. Outputs are then always channels-last, as nn.Conv2d's are
        # once its weight is channels-last, so a network keeps that layout throughout.
        self.channels_last = False

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
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
            channels_last=True if self.channels_last else None,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"in_size={self.in_size}, out_size={self.out_size}, stride={self.stride}, "
            f"padding={self.padding_arg}, dilation={self.dilation}, groups={self.groups}, "
            f"bias={self.bias is not None}"
        )
