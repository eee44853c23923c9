"""LocallyConnected2d against nn.Conv2d: outputs, gradients, errors and initialisation.

A locally connected layer whose every position holds a convolution's kernel must compute that
convolution, so ``LocallyConnected2d.from_conv`` gives exact references for the forward pass and
for both gradients (the kernel gradient of the convolution is the sum over positions).
"""

from __future__ import annotations

import itertools
import math
from typing import List, Tuple, Union

import pytest
import torch
import torch.nn as nn

from bpcnn import layers
from bpcnn.layers import LocallyConnected2d, is_row_layout, locally_connected2d, output_size, resolve_padding

Padding = Union[str, int, Tuple[int, int]]


def conv_cases() -> List[tuple]:
    """Return geometries covering all three code paths: kernel rows, 1x1 subsampling, unfold."""
    cases = []
    paddings: List[Padding] = [0, 1, (2, 1), "same", "valid"]
    channel_groups = [(3, 4, 1), (4, 6, 2)]  # (in_channels, out_channels, groups)
    sizes = [(7, 7), (9, 6)]
    for kernel, stride, padding, dilation, (c_in, c_out, groups) in itertools.product(
        range(1, 6), (1, 2), paddings, (1, 2), channel_groups
    ):
        size = sizes[(kernel + dilation + groups) % 2]
        if padding == "same" and stride != 1:
            continue
        pads = resolve_padding(padding, (kernel, kernel), (stride, stride), (dilation, dilation))
        if min(output_size(size, (kernel, kernel), (stride, stride), pads, (dilation, dilation))) < 1:
            continue
        bias = (kernel + stride + dilation) % 2 == 0
        cases.append((c_in, c_out, kernel, stride, padding, dilation, groups, size, bias))
    # Rectangular kernels, strides and dilations, a stride larger than the kernel, depthwise.
    cases += [
        (3, 5, (2, 3), (1, 2), (1, 0), (2, 1), 1, (8, 9), True),
        (3, 5, (3, 1), 1, "same", (1, 3), 1, (6, 7), False),
        (2, 3, 2, 3, 1, 1, 1, (9, 10), True),
        (4, 4, 3, 1, 1, 1, 4, (5, 6), True),
        (6, 6, 5, 1, 2, 1, 3, (5, 5), False),
    ]
    return cases


def case_id(case: tuple) -> str:
    c_in, c_out, kernel, stride, padding, dilation, groups, size, bias = case
    return f"c{c_in}-{c_out}_k{kernel}_s{stride}_p{padding}_d{dilation}_g{groups}_{size[0]}x{size[1]}_b{int(bias)}".replace(
        " ", ""
    )


CASES = conv_cases()


@pytest.fixture(params=["default", "channels_last_path"])
def layer_path(request, monkeypatch):
    """Run a test as it is, and again with every stride-1 layer of one group on the channels-last path.

    The small layers of these tests have fewer output channels than the path's threshold.
    """
    if request.param == "channels_last_path":
        monkeypatch.setattr(layers, "_MIN_CHANNELS_LAST_OUT", 1)
    return request.param


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", CASES, ids=[case_id(case) for case in CASES])
def test_forward_backward_match_conv(case: tuple, memory_format: torch.memory_format, layer_path: str) -> None:
    c_in, c_out, kernel, stride, padding, dilation, groups, size, bias = case
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, groups, bias, dtype=torch.float64)
    layer = LocallyConnected2d.from_conv(conv, size)
    x = torch.randn(2, c_in, *size, dtype=torch.float64).contiguous(memory_format=memory_format).requires_grad_()

    expected = conv(x)
    actual = layer(x)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected)

    grad_out = torch.randn_like(expected)
    conv_grads = torch.autograd.grad(expected, [x, *conv.parameters()], grad_out)
    layer_grads = torch.autograd.grad(actual, [x, *layer.parameters()], grad_out)
    torch.testing.assert_close(layer_grads[0], conv_grads[0], msg="input gradient")
    torch.testing.assert_close(layer_grads[1].sum((0, 1)), conv_grads[1], msg="kernel gradient")
    if bias:
        torch.testing.assert_close(layer_grads[2].sum((0, 1)), conv_grads[2], msg="bias gradient")


@pytest.mark.parametrize("row_by_row", [False, True], ids=["grid", "row_by_row"])
@pytest.mark.parametrize(
    "geometry",
    [
        dict(kernel_size=3, padding=1, size=(6, 7)),
        dict(kernel_size=(2, 4), padding=(0, 2), size=(5, 4), groups=2),
        dict(kernel_size=1, stride=2, size=(5, 6)),
        dict(kernel_size=3, stride=2, padding=1, size=(7, 6)),
    ],
    ids=["3x3", "2x4_groups", "1x1_stride2", "3x3_stride2"],
)
def test_gemm_schedules_match_conv(geometry: dict, row_by_row: bool) -> None:
    torch.manual_seed(0)
    geometry = dict(geometry)
    size = geometry.pop("size")
    conv = nn.Conv2d(4, 6, dtype=torch.float64, **geometry)
    layer = LocallyConnected2d.from_conv(conv, size)
    x = torch.randn(3, 4, *size, dtype=torch.float64, requires_grad=True)
    actual = locally_connected2d(
        x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups, row_by_row=row_by_row
    )
    expected = conv(x)
    torch.testing.assert_close(actual, expected)

    grad_out = torch.randn_like(expected)
    conv_grads = torch.autograd.grad(expected, [x, conv.weight], grad_out)
    layer_grads = torch.autograd.grad(actual, [x, layer.weight], grad_out)
    torch.testing.assert_close(layer_grads[0], conv_grads[0], msg="input gradient")
    torch.testing.assert_close(layer_grads[1].sum((0, 1)), conv_grads[1], msg="kernel gradient")


def test_position_kernels_are_independent() -> None:
    torch.manual_seed(0)
    layer = LocallyConnected2d(3, 4, 3, (6, 5), padding=1, dtype=torch.float64)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    out = layer(x)
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    for row, col in [(0, 0), (2, 3), (5, 4)]:
        patch = padded[:, :, row:row + 3, col:col + 3]  # (B, C_in, 3, 3)
        expected = torch.einsum("bikl,oikl->bo", patch, layer.weight[row, col]) + layer.bias[row, col]
        torch.testing.assert_close(out[:, :, row, col], expected)


GRADCHECK_CASES = {
    "kernel_rows": dict(kernel_size=3, padding=1),
    "kernel_rows_grid": dict(kernel_size=3, padding=(1, 0), row_by_row=False),
    "kernel_rows_groups_asymmetric": dict(kernel_size=(2, 3), padding="same", groups=2),
    "1x1_stride2": dict(kernel_size=1, stride=2, padding=1),
    "channels_last_stride2": dict(kernel_size=3, stride=2, padding=1),
    "channels_last_stride_2x1": dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), channels_last=True),
    "unfold_stride2_groups": dict(kernel_size=3, stride=2, padding=1, groups=2),
    "unfold_dilation2": dict(kernel_size=2, dilation=2, groups=2),
    "channels_last": dict(kernel_size=3, padding=1, channels_last=True),
    "channels_last_grid": dict(kernel_size=(3, 2), padding=(1, 0), row_by_row=False, channels_last=True),
}


@pytest.mark.parametrize("name", list(GRADCHECK_CASES))
def test_gradcheck_float64(name: str, layer_path: str) -> None:
    torch.manual_seed(0)
    geometry = dict(GRADCHECK_CASES[name])
    row_by_row = geometry.pop("row_by_row", None)
    memory_format = torch.channels_last if geometry.pop("channels_last", False) else torch.contiguous_format
    layer = LocallyConnected2d(2, 2, in_size=(3, 4), dtype=torch.float64, **geometry)  # type: ignore[arg-type]
    x = torch.randn(2, 2, 3, 4, dtype=torch.float64).contiguous(memory_format=memory_format).requires_grad_()

    def apply(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return locally_connected2d(
            x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups, row_by_row=row_by_row
        )

    assert torch.autograd.gradcheck(apply, (x, layer.weight, layer.bias))


def test_single_gradient_requests() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64)
    layer = LocallyConnected2d.from_conv(conv, 5)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)

    layer.requires_grad_(False)
    x_grad = torch.autograd.grad(layer(x.requires_grad_()).sum(), x)[0]
    torch.testing.assert_close(x_grad, torch.autograd.grad(conv(x).sum(), x)[0])

    layer.requires_grad_(True)
    x = x.detach()
    weight_grad = torch.autograd.grad(layer(x).sum(), layer.weight)[0]
    torch.testing.assert_close(weight_grad.sum((0, 1)), torch.autograd.grad(conv(x).sum(), conv.weight)[0])


@pytest.mark.parametrize(
    "geometry",
    [dict(kernel_size=3, padding=1), dict(kernel_size=1, stride=2), dict(kernel_size=3, stride=2, padding=1),
     dict(kernel_size=3, padding=1, groups=2)],
    ids=["kernel_rows", "1x1_stride2", "stride2", "groups"],
)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_bfloat16_autocast_matches_conv(geometry: dict, memory_format: torch.memory_format) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, bias=True, **geometry)
    layer = LocallyConnected2d.from_conv(conv, 12)
    x = torch.randn(4, 8, 12, 12).contiguous(memory_format=memory_format).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = conv(x)
        actual = layer(x)
    assert actual.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), expected.float(), atol=3e-2, rtol=3e-2)

    grad_out = torch.randn_like(expected)
    conv_grads = torch.autograd.grad(expected, [x, conv.weight], grad_out)
    layer_grads = torch.autograd.grad(actual, [x, layer.weight], grad_out)
    assert layer_grads[1].dtype == torch.float32
    torch.testing.assert_close(layer_grads[0], conv_grads[0], atol=5e-2, rtol=3e-2)
    torch.testing.assert_close(layer_grads[1].sum((0, 1)), conv_grads[1], atol=0.5, rtol=3e-2)


def test_noncontiguous_input_and_weight() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64)
    layer = LocallyConnected2d.from_conv(conv, (6, 5))
    x = torch.randn(1, 6, 5, 3, dtype=torch.float64).permute(0, 3, 1, 2)  # channels-last strides
    assert not x.is_contiguous()
    torch.testing.assert_close(layer(x), conv(x))

    # A weight with other strides, through the functional API: (oh, ow, C_in, C_out, kh, kw) transposed.
    weight = layer.weight.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()
    assert not weight.is_contiguous()
    actual = locally_connected2d(x, weight, layer.bias, padding=1)
    torch.testing.assert_close(actual, conv(x))
    torch.testing.assert_close(torch.autograd.grad(actual.sum(), weight)[0].sum((0, 1)),
                               torch.autograd.grad(conv(x).sum(), conv.weight)[0])


def test_from_conv_copies_kernel_to_every_position() -> None:
    conv = nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), groups=2)
    layer = LocallyConnected2d.from_conv(conv, (9, 8))
    assert layer.out_size == (5, 7)
    assert layer.weight.shape == (5, 7, 6, 2, 3, 2)
    assert layer.bias is not None and layer.bias.shape == (5, 7, 6)
    assert torch.equal(layer.weight, conv.weight.detach().expand_as(layer.weight))
    assert torch.equal(layer.bias, conv.bias.detach().expand_as(layer.bias))
    x = torch.randn(3, 4, 9, 8)
    torch.testing.assert_close(layer(x), conv(x), atol=1e-5, rtol=1e-5)


def test_from_conv_rejects_non_zero_padding_mode() -> None:
    conv = nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        LocallyConnected2d.from_conv(conv, 5)


def test_kernels_is_a_view_of_weight() -> None:
    torch.manual_seed(0)
    layer = LocallyConnected2d(2, 3, 3, 5, padding=1)
    x = torch.randn(2, 2, 5, 5)
    before = layer(x).detach()

    kernels = layer.kernels()
    assert kernels.shape == (5, 5, 3, 2, 3, 3)
    assert kernels.data_ptr() == layer.weight.data_ptr()
    with torch.no_grad():
        kernels[1, 2].zero_()
    after = layer(x).detach()

    assert layer.bias is not None
    expected_at_zeroed = layer.bias[1, 2].detach().expand(2, 3)
    torch.testing.assert_close(after[:, :, 1, 2], expected_at_zeroed)
    unchanged = torch.ones(5, 5, dtype=torch.bool)
    unchanged[1, 2] = False
    torch.testing.assert_close(after[:, :, unchanged], before[:, :, unchanged])


def test_attributes_and_padding_resolution() -> None:
    layer = LocallyConnected2d(2, 4, (4, 3), (10, 9), padding="same", dilation=(1, 2))
    assert layer.kernel_size == (4, 3)
    assert layer.stride == (1, 1)
    assert layer.dilation == (1, 2)
    assert layer.padding == (1, 2, 2, 2)  # (top, bottom, left, right): the odd pixel goes bottom/right
    assert layer.in_size == (10, 9)
    assert layer.out_size == (10, 9)
    assert LocallyConnected2d(2, 4, 3, 7, padding=(2, 1)).padding == (2, 2, 1, 1)
    assert LocallyConnected2d(2, 4, 3, 7, padding="valid").out_size == (5, 5)


def test_wrong_input_size_raises() -> None:
    layer = LocallyConnected2d(3, 4, 3, (8, 7), padding=1)
    with pytest.raises(ValueError, match=r"\(8, 7\).*\(8, 8\)"):
        layer(torch.randn(2, 3, 8, 8))


def test_wrong_channel_count_raises() -> None:
    layer = LocallyConnected2d(3, 4, 3, 6)
    with pytest.raises(ValueError, match="expects 3 input channels, got 5"):
        layer(torch.randn(2, 5, 6, 6))


def test_wrong_input_rank_raises() -> None:
    layer = LocallyConnected2d(3, 4, 3, 6)
    with pytest.raises(ValueError, match=r"4D input.*\(3, 6, 6\)"):
        layer(torch.randn(3, 6, 6))


def test_channels_not_divisible_by_groups_raises() -> None:
    with pytest.raises(ValueError, match="in_channels=5 and out_channels=4 must both be divisible by groups=2"):
        LocallyConnected2d(5, 4, 3, 6, groups=2)
    with pytest.raises(ValueError, match="in_channels=4 and out_channels=3 must both be divisible by groups=2"):
        LocallyConnected2d(4, 3, 3, 6, groups=2)


def test_output_smaller_than_one_raises() -> None:
    with pytest.raises(ValueError, match=r"output size \(-1, 0\) < 1.*\(3, 4\).*\(5, 5\)"):
        LocallyConnected2d(2, 2, 5, (3, 4))


def test_same_padding_with_stride_raises() -> None:
    with pytest.raises(ValueError, match=r"stride=\(2, 2\)"):
        LocallyConnected2d(2, 2, 3, 6, stride=2, padding="same")


def test_functional_rejects_mismatched_weight() -> None:
    weight = torch.randn(4, 4, 2, 3, 3, 3)
    with pytest.raises(ValueError, match=r"\(7, 7\) gives 5x5 output positions, but the weight has 4x4"):
        locally_connected2d(torch.randn(1, 3, 7, 7), weight)
    with pytest.raises(ValueError, match="input has 2 channels, but the weight expects 3 per group times groups=1"):
        locally_connected2d(torch.randn(1, 2, 6, 6), weight)


def test_zero_deviation_gives_identical_kernels() -> None:
    torch.manual_seed(0)
    layer = LocallyConnected2d(4, 8, 3, 6, deviation_eps=0.0)
    first = layer.weight[0, 0]
    assert torch.equal(layer.weight, first.expand_as(layer.weight))
    assert first.std() > 0


def test_default_init_std_per_position() -> None:
    torch.manual_seed(0)
    out_channels, kernel = 32, 3
    layer = LocallyConnected2d(16, out_channels, kernel, 4, padding=1)
    expected = math.sqrt(2.0 / (out_channels * kernel * kernel))
    per_position_std = layer.weight.flatten(2).std(dim=2)  # (out_h, out_w), 4608 samples each
    assert per_position_std.shape == (4, 4)
    torch.testing.assert_close(per_position_std, torch.full_like(per_position_std, expected), rtol=0.05, atol=0.0)
    # Independent draws: different positions hold different kernels.
    assert not torch.equal(layer.weight[0, 0], layer.weight[0, 1])


def test_deviation_init_std_and_correlation() -> None:
    torch.manual_seed(0)
    out_channels, kernel, eps = 32, 3, 0.5
    layer = LocallyConnected2d(16, out_channels, kernel, 4, padding=1, deviation_eps=eps)
    expected = math.sqrt(2.0 / (out_channels * kernel * kernel))
    torch.testing.assert_close(layer.weight.std(), torch.tensor(expected), rtol=0.05, atol=0.0)
    a, b = layer.weight[0, 0].flatten(), layer.weight[3, 2].flatten()
    correlation = torch.corrcoef(torch.stack([a, b]))[0, 1]
    assert abs(correlation.item() - 1.0 / (1.0 + eps**2)) < 0.05


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_output_allows_inplace_relu_without_bias(kernel_size):
    layer = LocallyConnected2d(4, 4, kernel_size, 8, padding=kernel_size // 2, bias=False)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    torch.relu_(layer(x)).sum().backward()
    assert x.grad is not None
    assert layer.weight.grad is not None


@pytest.mark.parametrize("row_by_row", [None, False, True], ids=["default", "grid", "row_by_row"])
def test_channels_last_in_and_out(row_by_row) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 16, 3, padding=1, dtype=torch.float64)  # 16 outputs: the channels-last path
    layer = LocallyConnected2d.from_conv(conv, (6, 7))
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    out = locally_connected2d(x, layer.weight, layer.bias, padding=layer.padding, row_by_row=row_by_row)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert not out.is_contiguous()
    torch.testing.assert_close(out, conv(x))
    (grad_x,) = torch.autograd.grad(out, x, torch.randn_like(out))
    assert grad_x.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "geometry, row_layout",
    [
        (dict(kernel_size=3, padding=1), True),
        (dict(kernel_size=(2, 3), padding=0), True),
        (dict(kernel_size=3, padding=1, groups=2), False),
        (dict(kernel_size=3, stride=2, padding=1), True),
        (dict(kernel_size=3, dilation=2, padding=2), False),
    ],
    ids=["3x3", "2x3", "groups", "stride2", "dilation2"],
)
def test_row_layout_by_geometry(geometry: dict, row_layout: bool) -> None:
    layer = LocallyConnected2d(4, 6, in_size=(6, 6), **geometry)
    assert tuple(layer.weight.shape[:2]) == layer.out_size
    assert is_row_layout(layer.weight, layer.groups) is row_layout
    assert layer.weight.is_contiguous() is not row_layout


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_row_layout_gradient_strides(memory_format, layer_path: str) -> None:
    torch.manual_seed(0)
    layer = LocallyConnected2d(3, 4, 3, (6, 5), padding=1, bias=False, dtype=torch.float64)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64).contiguous(memory_format=memory_format)
    (grad,) = torch.autograd.grad(layer(x).square().sum(), layer.weight)
    assert grad.stride() == layer.weight.stride()

    # The same kernels as a contiguous tensor give the same output and gradient.
    weight = layer.weight.detach().contiguous().requires_grad_()
    out = locally_connected2d(x, weight, padding=1)
    torch.testing.assert_close(out, layer(x))
    (contiguous_grad,) = torch.autograd.grad(out.square().sum(), weight)
    torch.testing.assert_close(contiguous_grad, grad)


def test_row_layout_persists() -> None:
    torch.manual_seed(0)
    layer = LocallyConnected2d(3, 4, 3, (5, 5), padding=1)
    optimiser = torch.optim.AdamW(layer.parameters(), lr=0.1)
    layer(torch.randn(2, 3, 5, 5)).sum().backward()
    optimiser.step()
    assert is_row_layout(layer.weight, 1)
    assert is_row_layout(optimiser.state[layer.weight]["exp_avg"], 1)
    assert is_row_layout(layer.to(torch.float64).weight, 1)

    # A state dict with contiguous kernels (as older checkpoints hold) loads into the row layout.
    state = {name: value.contiguous() for name, value in layer.state_dict().items()}
    fresh = LocallyConnected2d(3, 4, 3, (5, 5), padding=1, dtype=torch.float64)
    fresh.load_state_dict(state)
    assert is_row_layout(fresh.weight, 1)
    torch.testing.assert_close(fresh.weight, layer.weight)
