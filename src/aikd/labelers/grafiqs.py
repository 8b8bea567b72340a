"""GraFIQs: quality from the gradient magnitudes of a BatchNorm-statistics loss of the FR model.

Kolf, Damer and Boutros, "GraFIQs: Face Image Quality Assessment Using Gradient Magnitudes", CVPRW 2024; the
loss, hooks and outputs of the authors' code (jankolf/GraFIQs ``extract_grafiqs.py``, ``backbones/bn.py``). A face
passes through the FR model in eval mode; at every ``BatchNorm2d`` its input's mean and (biased) variance over
the spatial positions are compared with the layer's running statistics from FR training,

    L = 1/B * sum_b [ MSE(mu_b(x), running_mean_b) + MSE(sigma2_b(x), running_var_b) ]      (B BatchNorm2d layers)

and ``L`` is back-propagated to the input image and to the outputs of the four stages of blocks. The sum of the
absolute gradient over a tensor is the image's score for it, giving five variants:

    image    d L / d I      (the preprocessed face, the model's input)
    block1   d L / d B_1    (output of the first stage: ``layer1`` of an iResNet; the last block of the first
    ...                     stage of an IR network's ``body``)
    block4   d L / d B_4

The authors' code writes all five (``GraFIQs_image.txt``, ``GraFIQs_block1.txt`` ...) and names none the default.
Here every variant's sum is an output column (``gradient_image`` ... ``gradient_block4``: one backward pass gives
them all) and ``quality`` is the negated sum of ``variant``, **image by default**: it is the one variant every
BatchNorm backbone has, whatever its architecture names its blocks, and it is the gradient with respect to what
every FIQA technique sees, the face itself, so it is comparable across FR models. ``variant=block1`` (...) picks
another.

Sign: the paper's premise is that a face unlike the FR training data moves the BatchNorm statistics and needs a
larger change of the model to fit, so a larger gradient magnitude means a lower quality. aikd's labels are
higher-is-better, so ``quality = -sum |grad|``; the raw magnitudes (the authors' files) are the ``gradient_*``
columns.

Batched exactly: in eval mode BatchNorm keeps samples independent, so the statistics are taken per sample (over
H and W, as the authors' batch of one does) and the loss is summed over the batch; each sample's gradient is its
own. The model needs ``BatchNorm2d`` layers with running statistics: dlib's ResNet (``dlib-r29``) has none (its
affine layers are the statistics folded away) and is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from aikd.labelers.base import BatchLabels, Labeler

__all__ = ["VARIANTS", "Grafiqs", "GrafiqsOptions", "stage_outputs"]

VARIANTS = ("image", "block1", "block2", "block3", "block4")


@dataclass(frozen=True)
class GrafiqsOptions:
    """Settings of GraFIQs.

    Attributes:
        variant: whose gradient magnitude is the quality: ``image`` (default), ``block1`` ... ``block4``.
    """

    variant: str = "image"

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")


def stage_outputs(backbone: nn.Module) -> list[nn.Module] | None:
    """The four modules whose outputs are GraFIQs' blocks 1-4 (iResNet stages; the last block of each stage of an IR
    network), or ``None`` for an architecture without such stages."""
    from aikd.models.iresnet import IResNet
    from aikd.models.irnet import IRNet

    if isinstance(backbone, IResNet):
        return [backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4]
    if isinstance(backbone, IRNet):
        ends = np.cumsum(backbone.units) - 1
        return [backbone.body[int(end)] for end in ends]
    return None


class Grafiqs(Labeler):
    """GraFIQs labels from an FR backbone with BatchNorm2d layers.

    Args:
        backbone: the FR model (used in eval mode; hooks are attached only while a batch is labelled).
        options: the variant that gives the quality.

    Raises:
        ValueError: a backbone without BatchNorm2d layers, or a block variant on one without stages.
    """

    name = "grafiqs"
    needs_gradients = True
    Options = GrafiqsOptions

    def __init__(self, backbone: nn.Module, options: GrafiqsOptions | None = None) -> None:
        self.options = options = options or GrafiqsOptions()
        self.backbone = backbone.eval()
        self.norms = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None]
        if not self.norms:
            raise ValueError(f"GraFIQs compares BatchNorm2d running statistics, and {type(backbone).__name__} has "
                             "none (dlib-r29's affine layers are its BatchNorm folded away): use a model with "
                             "BatchNorm, e.g. an iResNet or IR network")
        self.stages = stage_outputs(backbone)
        if self.stages is None and options.variant != "image":
            raise ValueError(f"variant {options.variant!r}: {type(backbone).__name__} has no stages of blocks "
                             "GraFIQs knows; use variant=image")
        names = VARIANTS if self.stages is not None else VARIANTS[:1]
        self.columns = tuple(f"gradient_{name}" for name in names)

    def label_batch(self, faces: torch.Tensor, keys: Sequence[str]) -> BatchLabels:
        """Gradient magnitudes of N faces (model input): ``quality = -gradient_<variant>``."""
        if self.backbone.training:
            self.backbone.eval()
        statistics: list[tuple[torch.Tensor, torch.Tensor, nn.BatchNorm2d]] = []
        blocks: list[torch.Tensor] = []

        def on_norm(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0]
            statistics.append((x.mean(dim=(2, 3)), x.var(dim=(2, 3), unbiased=False), module))

        def on_block(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            blocks.append(output)

        handles = [norm.register_forward_hook(on_norm) for norm in self.norms]
        handles += [stage.register_forward_hook(on_block) for stage in self.stages or ()]
        try:
            image = faces.detach().float().requires_grad_(True)
            with torch.enable_grad():
                self.backbone(image)
                loss = bns_loss(statistics)
                gradients = torch.autograd.grad(loss.sum(), [image, *blocks])
        finally:
            for handle in handles:
                handle.remove()
        sums = {column: g.detach().abs().flatten(1).double().sum(dim=1).cpu().numpy()
                for column, g in zip(self.columns, gradients, strict=True)}
        return BatchLabels(quality=-sums[f"gradient_{self.options.variant}"], extras=sums)


def bns_loss(statistics: Sequence[tuple[torch.Tensor, torch.Tensor, nn.BatchNorm2d]]) -> torch.Tensor:
    """Per-sample loss (N,): the mean over layers of MSE(mean, running mean) + MSE(variance, running variance)."""
    total = 0.0
    for mean, variance, norm in statistics:
        total = total + ((mean - norm.running_mean) ** 2).mean(dim=1) + ((variance - norm.running_var) ** 2).mean(dim=1)
    return total / len(statistics)
