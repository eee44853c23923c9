"""Models and conversion of conv nets to locally connected ones."""

import pytest
import torch
import torch.nn as nn
import torchvision

from bpcnn import LocallyConnected2d, to_channels_last, to_convolutional, to_locally_connected
from bpcnn.models import resnet18, resnet_cifar


def _count(model, kind):
    return sum(isinstance(m, kind) for m in model.modules())


def test_resnet_cifar_depth_and_output():
    model = resnet_cifar(n=3, width=16, num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == 20  # 19 3x3 convolutions + the classifier = ResNet-20
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet18_width_and_output():
    model = resnet18(width=8, num_classes=7, in_channels=1)
    assert model.fc.in_features == 64
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 7)


@pytest.mark.parametrize(
    "build, size",
    [
        (lambda: resnet_cifar(n=1, width=4, num_classes=5), 16),
        (lambda: resnet18(width=4, num_classes=5), 32),
        (lambda: torchvision.models.mobilenet_v2(width_mult=0.25, num_classes=5), 32),
    ],
    ids=["resnet_cifar", "resnet18", "torchvision_mobilenet_v2"],
)
def test_conversion_from_conv_keeps_outputs(build, size):
    torch.manual_seed(0)
    model = build().double().eval()
    x = torch.randn(3, 3, size, size, dtype=torch.double)
    expected = model(x)
    n_conv = _count(model, nn.Conv2d)
    to_locally_connected(model, x[:1], init_from_conv=True)
    assert _count(model, nn.Conv2d) == 0
    assert _count(model, LocallyConnected2d) == n_conv
    torch.testing.assert_close(model(x), expected, rtol=1e-9, atol=1e-9)


def test_conversion_records_input_sizes():
    model = resnet_cifar(n=1, width=4)
    to_locally_connected(model, torch.zeros(1, 3, 32, 24))
    sizes = [m.in_size for m in model.modules() if isinstance(m, LocallyConnected2d)]
    assert sizes[0] == (32, 24)
    assert (8, 6) in [m.out_size for m in model.modules() if isinstance(m, LocallyConnected2d)]


def test_n_first_conv_keeps_first_convolutions():
    model = resnet_cifar(n=1, width=4)
    first = model.stem[0]
    to_locally_connected(model, torch.zeros(1, 3, 16, 16), n_first_conv=1)
    assert model.stem[0] is first
    assert isinstance(model.stages[0][0].conv1, LocallyConnected2d)


def test_keep_and_freeze_1x1():
    model = resnet_cifar(n=1, width=4)
    to_locally_connected(model, torch.zeros(1, 3, 16, 16), keep_1x1=True, freeze_1x1=True)
    kept = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert kept and all(m.kernel_size == (1, 1) for m in kept)
    assert all(not p.requires_grad for m in kept for p in m.parameters())
    lc = [m for m in model.modules() if isinstance(m, LocallyConnected2d)]
    assert all(p.requires_grad for m in lc for p in m.parameters())


def test_keep_1x1_without_freeze_trains_them():
    model = resnet_cifar(n=1, width=4)
    to_locally_connected(model, torch.zeros(1, 3, 16, 16), keep_1x1=True)
    kept = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert kept and all(p.requires_grad for m in kept for p in m.parameters())


def test_converted_model_rejects_other_input_size():
    model = to_locally_connected(resnet_cifar(n=1, width=4), torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\(16, 16\).*\(20, 20\)"):
        model(torch.zeros(1, 3, 20, 20))


def test_freeze_1x1_requires_keep_1x1():
    with pytest.raises(ValueError, match="keep_1x1"):
        to_locally_connected(resnet_cifar(n=1, width=4), torch.zeros(1, 3, 16, 16), freeze_1x1=True)


def test_to_convolutional_round_trip():
    torch.manual_seed(0)
    model = resnet_cifar(n=1, width=4).double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.double)
    expected = model(x)
    to_locally_connected(model, x[:1], init_from_conv=True)
    to_convolutional(model)
    assert _count(model, LocallyConnected2d) == 0
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_channels_last_model_same_outputs(in_channels):
    torch.manual_seed(0)
    model = to_locally_connected(resnet_cifar(n=1, width=4, num_classes=5, in_channels=in_channels).double(),
                                 torch.zeros(1, in_channels, 12, 12, dtype=torch.float64))
    x = torch.randn(3, in_channels, 12, 12, dtype=torch.float64)
    expected = model(x)
    expected_grads = torch.autograd.grad(expected.square().sum(), list(model.parameters()))

    outputs = []
    for module in model.modules():
        if isinstance(module, LocallyConnected2d):
            module.register_forward_hook(lambda module, inputs, output: outputs.append(output))
    to_channels_last(model)
    actual = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(actual, expected)
    grads = torch.autograd.grad(actual.square().sum(), list(model.parameters()))
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)
    # Every LC output is channels-last, the first layer's (one input channel) included.
    assert len(outputs) == _count(model, LocallyConnected2d)
    assert all(out.is_contiguous(memory_format=torch.channels_last) and out.stride(1) == 1 for out in outputs)


def test_example_input_with_wrong_channels_raises():
    model = resnet_cifar(n=1, width=4, num_classes=5, in_channels=3)
    with pytest.raises(ValueError, match=r"example input of shape \(1, 1, 12, 12\) does not run through the model"):
        to_locally_connected(model, torch.zeros(1, 1, 12, 12))
