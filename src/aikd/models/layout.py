"""Memory layout for training: channels_last, except the one convolution shape oneDNN gets wrong on CPUs.

torch 2.13's oneDNN (3.12) mishandles the backward pass of a **1x1 convolution with stride > 1 in
channels_last when it has fewer input channels than the kernel's channel block** (oneDNN issue 6035,
"1x1 convolution backward_weights writes past the rtus workspace (nhwc, IC < ic_block)"). Measured with
torch 2.13.0+cpu: on AVX-512 CPUs it segfaults for 4 and 8 input channels; on an AVX2 CPU (block 8) 3, 4,
6 and 7 input channels give weight gradients off by 30-100 % or hang. The iResNet downsample shortcut of
narrow models is exactly this shape. The forward pass, NCHW, stride 1 and 3x3 kernels are unaffected.

The rule aikd applies, on every CPU and for every architecture (including user-defined widths): during
training on the CPU, a 1x1 convolution with stride > 1 runs in NCHW when it has fewer than
:data:`SAFE_MIN_CHANNELS` input channels or a count that is not a multiple of :data:`CHANNEL_BLOCK`
(margins over every oneDNN block size: 8 on AVX2, 16 on AVX-512, up to 64 with AMX). The rest of the
network stays channels_last. Real face-recognition backbones (64 channels and up) are untouched, so
their training speed is kept; only narrow test and demo models pay for the layout change, and only in
those few layers. Inference (no gradient) keeps the fast channels_last path everywhere.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CHANNEL_BLOCK", "SAFE_MIN_CHANNELS", "NCHWBackwardConv2d", "needs_nchw_backward", "to_training_layout"]

SAFE_MIN_CHANNELS = 64
CHANNEL_BLOCK = 16


def needs_nchw_backward(conv: nn.Module) -> bool:
    """Whether ``conv`` has the shape whose channels_last backward oneDNN gets wrong (see the module docstring)."""
    if not isinstance(conv, nn.Conv2d):
        return False
    pointwise = tuple(conv.kernel_size) == (1, 1)
    strided = any(s > 1 for s in conv.stride)
    narrow = conv.in_channels // conv.groups
    return pointwise and strided and (narrow < SAFE_MIN_CHANNELS or narrow % CHANNEL_BLOCK != 0)


def _standard(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with plain NCHW strides. ``contiguous()`` is not enough: a (O, I, 1, 1) weight converted to
    channels_last counts as contiguous, yet convolution still reads it as channels_last."""
    expected, stride = [], 1
    for size in reversed(tensor.shape):
        expected.append(stride)
        stride *= size
    if tensor.stride() == tuple(reversed(expected)):
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


class NCHWBackwardConv2d(nn.Conv2d):
    """A :class:`~torch.nn.Conv2d` that runs in NCHW on the CPU whenever autograd records it.

    Same parameters, state-dict keys and outputs as the convolution it replaces; the output is returned
    in the input's memory format, so the layers around it stay channels_last.
    """

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        recorded = torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad)
        if input.device.type != "cpu" or not recorded:
            return super()._conv_forward(input, weight, bias)
        channels_last = input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous()
        output = super()._conv_forward(_standard(input), _standard(weight), bias)
        return output.contiguous(memory_format=torch.channels_last) if channels_last else output


def to_training_layout(model: nn.Module, channels_last: bool = True) -> list[str]:
    """Put ``model`` in aikd's training layout, in place: channels_last (if asked) with the unsafe convolutions
    (:func:`needs_nchw_backward`) switched to :class:`NCHWBackwardConv2d`.

    The switch happens whatever ``channels_last`` says: a later ``.to(memory_format=torch.channels_last)``
    by the caller would otherwise bring the bug back (the switched forward still runs NCHW then, copying the
    weight).

    Returns:
        Names of the convolutions that were switched.
    """
    if channels_last:
        model.to(memory_format=torch.channels_last)
    switched = []
    for name, module in model.named_modules():
        if needs_nchw_backward(module) and type(module) is nn.Conv2d:
            module.__class__ = NCHWBackwardConv2d  # same attributes and parameters; only the forward differs
            # NCHW weights, so their gradients have the strides DDP's buckets expect (no copy per step).
            module.weight.data = _standard(module.weight.data)
            switched.append(name)
    return switched
