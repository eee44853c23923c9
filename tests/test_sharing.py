"""Pools, instant weight sharing and weight SNR."""

import math

import pytest
import torch

from bpcnn import LocallyConnected2d, share_weights_instantly, weight_snr
from bpcnn.models import resnet_cifar
from bpcnn.convert import to_locally_connected
from bpcnn.sharing import InstantSharing, interior_mask, pool_ids, pool_periods


def _layer(**kwargs):
    torch.manual_seed(0)
    defaults = dict(in_channels=2, out_channels=3, kernel_size=3, in_size=9, padding=1)
    defaults.update(kwargs)
    return LocallyConnected2d(**defaults).double()


def test_pools_are_residues_modulo_kernel_size():
    layer = _layer()
    ids, n_pools = pool_ids(layer)
    assert n_pools == 9
    assert ids[0, 0] == ids[3, 6] == ids[6, 3]
    assert ids[0, 0] != ids[0, 1]
    assert ids[1, 2] == ids[4, 8]


def test_pool_period_with_stride():
    assert pool_periods(_layer(kernel_size=3, stride=2)) == (3, 3)
    assert pool_periods(_layer(kernel_size=4, stride=2, in_size=12)) == (2, 2)
    assert pool_periods(_layer(kernel_size=1, padding=0)) == (1, 1)


def test_instant_sharing_equalises_each_pool():
    layer = _layer()
    before = layer.kernels().clone()
    share_weights_instantly(layer)
    kernels = layer.kernels()
    ids, n_pools = pool_ids(layer)
    for pool in range(n_pools):
        members = kernels[ids == pool]
        expected = before[ids == pool].mean(dim=0)
        for member in members:
            torch.testing.assert_close(member, expected)
        torch.testing.assert_close(layer.bias[ids == pool], layer.bias[ids == pool][:1].expand_as(layer.bias[ids == pool]))


def test_instant_sharing_excluding_border():
    layer = _layer()
    before = layer.kernels().clone()
    bias_before = layer.bias.detach().clone()
    schedule = InstantSharing(frequency=1, exclude_border=True)
    assert schedule(layer, 1)
    kernels = layer.kernels()
    interior = interior_mask(layer)
    # Border kernels and biases are untouched; interior ones take the mean over interior pool members.
    torch.testing.assert_close(kernels[~interior], before[~interior], rtol=0, atol=0)
    torch.testing.assert_close(layer.bias[~interior], bias_before[~interior], rtol=0, atol=0)
    ids, n_pools = pool_ids(layer)
    for pool in range(n_pools):
        members = (ids == pool) & interior
        expected = before[members].mean(dim=0)
        for member in kernels[members]:
            torch.testing.assert_close(member, expected)


def test_one_by_one_kernel_pools_whole_layer():
    layer = _layer(kernel_size=1, padding=0)
    share_weights_instantly(layer)
    kernels = layer.kernels()
    torch.testing.assert_close(kernels, kernels[:1, :1].expand_as(kernels))


def test_instant_sharing_is_idempotent():
    layer = _layer()
    share_weights_instantly(layer)
    once = layer.kernels().clone()
    share_weights_instantly(layer)
    torch.testing.assert_close(layer.kernels(), once, rtol=0, atol=1e-15)


def test_instant_sharing_keeps_conv_initialised_layer():
    conv = torch.nn.Conv2d(2, 3, 3, padding=1).double()
    layer = LocallyConnected2d.from_conv(conv, 9)
    before = layer.kernels().clone()
    share_weights_instantly(layer)
    torch.testing.assert_close(layer.kernels(), before, rtol=0, atol=1e-15)


def test_sharing_whole_model_counts_layers():
    model = to_locally_connected(resnet_cifar(n=1, width=4), torch.zeros(1, 3, 16, 16))
    assert share_weights_instantly(model) == 9


def test_instant_sharing_schedule_frequency():
    layer = _layer()
    schedule = InstantSharing(frequency=3)
    assert not schedule(layer, 1)
    assert not schedule(layer, 2)
    assert schedule(layer, 3)
    with pytest.raises(ValueError, match="got 0"):
        InstantSharing(0)


def test_interior_mask_excludes_padded_border():
    mask = interior_mask(_layer())
    assert mask.shape == (9, 9)
    assert not mask[0].any()
    assert not mask[-1].any()
    assert not mask[:, 0].any()
    assert mask[1:-1, 1:-1].all()


def test_snr_on_hand_built_kernels():
    layer = LocallyConnected2d(1, 1, 1, in_size=(1, 3), bias=False).double()
    with torch.no_grad():
        layer.kernels().view(-1).copy_(torch.tensor([1.0, 2.0, 3.0]))
    # mean 2, unbiased std 1
    assert weight_snr(layer) == pytest.approx(2.0)
    with torch.no_grad():
        layer.kernels().view(-1).copy_(torch.tensor([-1.0, 1.0, 3.0]))
    assert weight_snr(layer) == pytest.approx(0.5)


def test_snr_averages_entries_and_skips_border():
    layer = LocallyConnected2d(1, 2, 3, in_size=(5, 5), padding=1, bias=False).double()
    with torch.no_grad():
        kernels = layer.kernels()
        kernels.fill_(100.0)  # border positions: must not count
        interior = torch.tensor([1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 1.0, 2.0, 3.0]).view(3, 3)
        kernels[1:4, 1:4, 0] = interior[:, :, None, None, None]  # mean 2, unbiased std sqrt(6 / 8)
        kernels[1:4, 1:4, 1] = (interior * 2 - 4)[:, :, None, None, None]  # values -2, 0, 2: mean 0
    channel0 = 2.0 / math.sqrt(6.0 / 8.0)
    assert weight_snr(layer) == pytest.approx((channel0 * 9 + 0.0 * 9) / 18)


def test_snr_infinite_for_equal_kernels():
    conv = torch.nn.Conv2d(2, 3, 3, padding=1)
    assert math.isinf(weight_snr(LocallyConnected2d.from_conv(conv, 8)))


def test_snr_grows_with_sharing():
    layer = _layer(deviation_eps=1.0)
    before = weight_snr(layer)
    share_weights_instantly(layer)
    assert weight_snr(layer) > before
