"""BatchNorm synchronised across the processes of a torchrun job, on CPUs (gloo) and GPUs (NCCL) alike.

AI-KD trains its student with BatchNorm in train mode (as the paper's code does), so every BatchNorm
normalises over the batch it sees. Under torchrun each process sees only its share of the batch: 4 GPUs x 16
faces normalise over 16 faces each, not over the paper's 64. :func:`synchronise_batchnorm` makes every
BatchNorm of a model compute its batch statistics over all processes' faces, which gives the same
normalisation, running statistics and gradients as one process with the whole batch.

torch's ``nn.SyncBatchNorm`` refuses CPU tensors, so this is aikd's own: the mean and the variance are sums
over all processes by a differentiable all-reduce (whose backward sums the gradients the same way), and
autograd derives the rest. Statistics are computed in float32 whatever the input's dtype.
Outside training mode, or alone, the layer is a plain BatchNorm. State-dict keys do not change.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["SynchronisedBatchNorm1d", "SynchronisedBatchNorm2d", "synchronise_batchnorm"]


class _AllSum(torch.autograd.Function):
    """Sum over all processes; its gradient is the sum of every process's gradient (each used the total)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


def _all_sum(tensor: torch.Tensor) -> torch.Tensor:
    return _AllSum.apply(tensor)


class _Synchronised:
    """Forward of a train-mode BatchNorm over the batch of every process."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        dims = [d for d in range(input.dim()) if d != 1]
        shape = [1, -1] + [1] * (input.dim() - 2)
        values = input.float()
        count = _all_sum(torch.tensor([values.numel() / values.shape[1]], device=values.device))
        mean = _all_sum(values.sum(dims)) / count
        centred = values - mean.view(shape)
        variance = _all_sum(centred.square().sum(dims)) / count  # biased: what normalises the batch
        output = centred * torch.rsqrt(variance + self.eps).view(shape)
        if self.affine:
            output = output * self.weight.float().view(shape) + self.bias.float().view(shape)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), variance.detach() * count / (count - 1).clamp_min(1))
        return output.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


class SynchronisedBatchNorm1d(_Synchronised, nn.BatchNorm1d):
    """:class:`~torch.nn.BatchNorm1d` over the batches of all torchrun processes."""


class SynchronisedBatchNorm2d(_Synchronised, nn.BatchNorm2d):
    """:class:`~torch.nn.BatchNorm2d` over the batches of all torchrun processes."""


_SYNCHRONISED = {nn.BatchNorm1d: SynchronisedBatchNorm1d, nn.BatchNorm2d: SynchronisedBatchNorm2d}


def synchronise_batchnorm(model: nn.Module) -> int:
    """Make every BatchNorm1d/2d of ``model`` synchronised, in place (same parameters, buffers and keys).

    Returns:
        The number of layers changed.
    """
    changed = 0
    for module in model.modules():
        target = _SYNCHRONISED.get(type(module))
        if target is not None:
            module.__class__ = target  # same attributes; only the forward differs
            changed += 1
    return changed
