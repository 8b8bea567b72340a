"""BatchNorm calibration for randomly initialised networks (benchmarks, demos, parity checks).

A fresh iResNet keeps BatchNorm's default running statistics (mean 0, variance 1), which normalise
nothing: in eval mode activations grow block after block and an iResNet-100's qualities explode
(measured: docs/speed.md, "Random weights in benchmarks"). Re-estimating the running statistics on a few
random batches, as in the usual "BN recalibration" after weight surgery, makes eval-mode activations look
like a trained network's.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["calibrate_batchnorm"]


@torch.no_grad()
def calibrate_batchnorm(
    model: nn.Module,
    batches: int = 4,
    batch_size: int = 8,
    seed: int = 0,
    input_size: tuple[int, int] | None = None,
) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics from seeded random faces; returns ``model``.

    Running statistics are reset and accumulated as a plain average over ``batches`` batches
    (``momentum=None``). Only the BatchNorm layers run in train mode (dropout stays off); each module's
    mode and momentum are restored afterwards. Weights are not touched.

    Args:
        model: any module taking (N, 3, H, W) input, e.g. an :class:`IResNet` or a ``QualityModel``.
        batches: number of random batches.
        batch_size: images per batch (at least 2: BatchNorm1d cannot normalise a batch of one).
        seed: seed of the random input, so calibration is reproducible.
        input_size: (height, width); defaults to ``model.preprocessing.input_size`` or 112x112.
    """
    if batches < 1 or batch_size < 2:
        raise ValueError(f"calibrate_batchnorm needs batches >= 1 and batch_size >= 2, "
                         f"got batches={batches}, batch_size={batch_size}")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    if input_size is None:
        preprocessing = getattr(model, "preprocessing", None)
        input_size = tuple(preprocessing.input_size) if preprocessing is not None else (112, 112)
    saved_modes = {m: m.training for m in model.modules()}
    saved_momenta = [m.momentum for m in norms]
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    generator = torch.Generator().manual_seed(seed)
    try:
        model.eval()
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
            norm.train()
        for _ in range(batches):
            faces = torch.randn(batch_size, 3, *input_size, generator=generator).clamp_(-1.0, 1.0)
            model(faces.to(device, dtype))
    finally:
        for norm, momentum in zip(norms, saved_momenta, strict=True):
            norm.momentum = momentum
        for module, training in saved_modes.items():
            module.training = training
    return model
