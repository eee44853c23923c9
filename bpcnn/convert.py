"""Turn any convolutional network into a locally connected one, and back for analysis."""

from __future__ import annotations

import logging
from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from .layers import LocallyConnected2d

log = logging.getLogger(__name__)


def _conv_input_sizes(model: nn.Module, example_input: torch.Tensor) -> List[Tuple[str, nn.Conv2d, Tuple[int, int]]]:
    """Run ``example_input`` through ``model`` and return ``(name, conv, (H, W))`` in forward order."""
    names = {module: name for name, module in model.named_modules()}
    order: List[Tuple[str, nn.Conv2d, Tuple[int, int]]] = []
    seen = set()

    def record(module: nn.Module, inputs: Tuple[torch.Tensor, ...]) -> None:
        if module not in seen:
            seen.add(module)
            order.append((names[module], module, tuple(inputs[0].shape[-2:])))  # type: ignore[arg-type]

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, nn.Conv2d)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    except RuntimeError as err:
        raise ValueError(
            f"the example input of shape {tuple(example_input.shape)} does not run through the model ({err}); "
            "pass one input (batch, channels, height, width) with the channels and image size you train on"
        ) from err
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return order


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def to_locally_connected(
    model: nn.Module,
    example_input: torch.Tensor,
    n_first_conv: int = 0,
    keep_1x1: bool = False,
    freeze_1x1: bool = False,
    init_from_conv: bool = False,
    deviation_eps: float | None = None,
) -> nn.Module:
    """Replace the ``nn.Conv2d`` modules of ``model`` by ``LocallyConnected2d`` layers of the same geometry.

    Each layer's input size is found by running ``example_input`` (one batch, any batch size)
    through the model, so the converted model only accepts inputs of that spatial size.

    Args:
        n_first_conv: keep the first ``n`` convolutions, in forward order, convolutional.
        keep_1x1: keep 1x1 convolutions convolutional (they have no spatial receptive field to share).
        freeze_1x1: with ``keep_1x1``, also stop training the kept 1x1 convolutions.
        init_from_conv: copy each convolution's kernel into every position (outputs stay equal);
            otherwise LC kernels are initialised independently per position.
        deviation_eps: with ``init_from_conv=False``, use the near-convolutional initialisation
            (see ``LocallyConnected2d``).

    Returns:
        ``model``, changed in place. A convolution used twice in one forward pass cannot be
        converted (its positions would differ per call) and raises ``ValueError``.
    """
    if n_first_conv < 0:
        raise ValueError(f"n_first_conv must be >= 0, got {n_first_conv}")
    if freeze_1x1 and not keep_1x1:
        raise ValueError("freeze_1x1=True requires keep_1x1=True: only kept 1x1 convolutions can be frozen")
    convs = _conv_input_sizes(model, example_input)
    if not convs:
        log.warning("to_locally_connected: %s has no nn.Conv2d reached by the example input", type(model).__name__)
    counts: Dict[nn.Module, int] = {}
    for _, conv, _ in convs:
        counts[conv] = counts.get(conv, 0) + 1
    converted = 0
    for index, (name, conv, in_size) in enumerate(convs):
        is_1x1 = conv.kernel_size == (1, 1)
        if index < n_first_conv:
            continue
        if is_1x1 and keep_1x1:
            if freeze_1x1:
                conv.requires_grad_(False)
            continue
        if counts[conv] > 1:
            raise ValueError(f"convolution {name!r} is applied more than once per forward pass; it cannot become locally connected")
        if init_from_conv:
            layer = LocallyConnected2d.from_conv(conv, in_size)
        else:
            layer = LocallyConnected2d(
                conv.in_channels, conv.out_channels, conv.kernel_size, in_size,  # type: ignore[arg-type]
                stride=conv.stride, padding=conv.padding, dilation=conv.dilation,  # type: ignore[arg-type]
                groups=conv.groups, bias=conv.bias is not None, deviation_eps=deviation_eps,
                device=conv.weight.device, dtype=conv.weight.dtype,
            )
        _set_submodule(model, name, layer)
        converted += 1
    log.info("to_locally_connected: %d of %d convolutions are now locally connected", converted, len(convs))
    return model


def to_convolutional(model: nn.Module) -> nn.Module:
    """Replace every ``LocallyConnected2d`` by an ``nn.Conv2d`` holding its kernels' mean over positions.

    For analysis: how well does the average LC kernel work as a convolution? Changes ``model`` in place.
    """
    for name, module in list(model.named_modules()):
        if not isinstance(module, LocallyConnected2d):
            continue
        top, bottom, left, right = module.padding
        if top != bottom or left != right:
            raise ValueError(f"layer {name!r} has asymmetric padding {module.padding}, which nn.Conv2d cannot express")
        conv = nn.Conv2d(
            module.in_channels, module.out_channels, module.kernel_size, module.stride, (top, left),
            module.dilation, module.groups, bias=module.bias is not None,
            device=module.weight.device, dtype=module.weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(module.kernels().mean(dim=(0, 1)))
            if module.bias is not None:
                conv.bias.copy_(module.bias.mean(dim=(0, 1)))
        _set_submodule(model, name, conv)
    return model


def to_channels_last(model: nn.Module) -> nn.Module:
    """Make ``model`` compute with channels-last activations; return it (changed in place).

    Converts the convolution weights as ``model.to(memory_format=torch.channels_last)`` does and
    makes every ``LocallyConnected2d`` return channels-last outputs, so that a network fed
    channels-last inputs (``x.contiguous(memory_format=torch.channels_last)``) keeps that layout
    from layer to layer. On the CPU this is the fast layout for both layer kinds; see
    ``benchmarks/README.md``. The LC kernels themselves are not touched.
    """
    model.to(memory_format=torch.channels_last)
    for module in model.modules():
        if isinstance(module, LocallyConnected2d):
            module.channels_last = True
    return model
