"""BatchNorm folding for inference: the same function with fewer operators, exact up to float rounding.

Every BatchNorm of an inference-mode iResNet is an affine map per channel, ``y = a * x + b``. A BatchNorm
*after* a convolution scales the convolution's output channels and adds a bias. The iResNet block's
BatchNorm *before* its first convolution (``bn1 -> conv1``) scales the convolution's input channels; its
shift ``b`` becomes a bias too, except on the one-pixel border, where ``conv1`` reads zero padding rather
than ``b`` — that border difference is precomputed per input size and added back, so the folded block
equals the original exactly. The trunk's final ``bn2``, ``fc`` and the ``features`` BatchNorm1d (dropout
is the identity in eval mode) become one Linear layer. PReLU is kept. dlib's ResNet (``dlib-r29``) has per-channel
affine layers in place of BatchNorm, each after a convolution: they fold into it
(:func:`aikd.models.dlib_resnet.fold_affine`).

Used by the inference engine (:mod:`aikd.inference.engine`) and the ONNX export (:mod:`aikd.inference.export`).
"""

from __future__ import annotations

import copy
import itertools

import torch
import torch.nn.functional as F
from torch import nn

from aikd.models.dlib_resnet import DlibResNet, fold_affine
from aikd.models.iresnet import IBasicBlock, IResNet
from aikd.models.quality import QualityModel
from aikd.runtime import release_freed_memory

__all__ = ["FoldedBlock", "FoldedIResNet", "fold_batchnorm"]


def _affine(norm: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``y = scale * x + shift`` per channel (float64 for exact folding)."""
    var = norm.running_var.double()
    mean = norm.running_mean.double()
    weight = norm.weight.double() if norm.weight is not None else torch.ones_like(var)
    bias = norm.bias.double() if norm.bias is not None else torch.zeros_like(var)
    scale = weight / torch.sqrt(var + norm.eps)
    return scale, bias - mean * scale


def _conv_then_norm(conv: nn.Conv2d, norm: nn.modules.batchnorm._BatchNorm) -> nn.Conv2d:
    """``norm(conv(x))`` as one convolution with a bias."""
    scale, shift = _affine(norm)
    weight = conv.weight.detach().to(torch.float64, copy=True).mul_(scale.view(-1, 1, 1, 1))
    bias = shift + (conv.bias.double() * scale if conv.bias is not None else 0.0)
    return _new_conv(conv, weight, bias)


def _new_conv(template: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    """A convolution like ``template`` holding ``weight`` and ``bias`` (built without a random init first)."""
    with torch.device("meta"):
        conv = nn.Conv2d(template.in_channels, template.out_channels, template.kernel_size, template.stride,
                         template.padding, template.dilation, template.groups, bias=True)
    like = template.weight
    conv.weight = nn.Parameter(weight.to(like.device, like.dtype))
    conv.bias = nn.Parameter(torch.as_tensor(bias).to(like.device, like.dtype))
    return conv


def _free(module: nn.Module) -> None:
    """Drop the storage of every tensor of ``module`` (each becomes empty; the module is unusable).

    Cheaper than ``to_empty(device="meta")``, whose first use imports torch's symbolic-shape machinery (about
    a second of start-up)."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)


class _NormConvNorm(nn.Module):
    """``bn_after(conv(bn_before(x)))`` as one convolution plus a precomputed border correction.

    ``conv`` holds the folded weights and the bias an interior pixel gets. On the border, padding means
    the original convolution never saw ``bn_before``'s shift there; the difference depends only on the
    input size and is cached per (height, width, device, dtype).
    """

    def __init__(self, before: nn.modules.batchnorm._BatchNorm, conv: nn.Conv2d,
                 after: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        in_scale, in_shift = _affine(before)
        out_scale, out_shift = _affine(after)
        weight = conv.weight.detach().to(torch.float64, copy=True)  # one float64 copy, then in place
        # What the input shift adds through each kernel tap; an interior pixel gets the sum over all taps.
        tap_shift = (torch.einsum("oikl,i->okl", weight, in_shift) * out_scale.view(-1, 1, 1)).cpu()
        folded = weight.mul_((out_scale[:, None] * in_scale[None, :]).view(*weight.shape[:2], 1, 1))
        self.conv = _new_conv(conv, folded, tap_shift.sum((1, 2)) + out_shift)
        self.tap_shift = tap_shift  # float64, CPU: the border is computed exactly once per input size
        self.correct_border = bool(in_shift.abs().max() > 0) and max(conv.padding) > 0
        kernel, padding = tuple(conv.kernel_size), tuple(conv.padding)
        self.ring_only = conv.stride == (1, 1) and conv.dilation == (1, 1) and kernel == (3, 3) and padding == (1, 1)
        self._border: dict[tuple, torch.Tensor] = {}

    def border(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(1, H', W', C_out) bias missing from ``conv``'s output: zero inside, non-zero on the border."""
        key = (height, width, torch.device(device), dtype)
        if key not in self._border:
            if self.ring_only and height >= 3 and width >= 3:
                # 3x3, stride 1, padding 1: an output pixel's taps depend only on whether it lies on the first
                # or last row and column, so a 3x3 input gives every distinct value; spread it over H x W.
                small = self._real_bias(3, 3)
                rows = torch.ones(height, dtype=torch.long)
                cols = torch.ones(width, dtype=torch.long)
                rows[0], rows[-1], cols[0], cols[-1] = 0, 2, 0, 2
                real = small[:, :, rows][:, :, :, cols]
            else:
                real = self._real_bias(height, width)
            interior = self.tap_shift.sum((1, 2)).view(1, -1, 1, 1)
            self._border[key] = (real - interior).permute(0, 2, 3, 1).contiguous().to(device, dtype)
        return self._border[key]

    def _real_bias(self, height: int, width: int) -> torch.Tensor:
        """(1, C_out, H', W') float64: ones convolved with the per-tap shift, the bias each output pixel gets."""
        conv = self.conv
        ones = torch.ones(1, 1, height, width, dtype=torch.float64)
        return F.conv2d(ones, self.tap_shift.unsqueeze(1), None, conv.stride, conv.padding, conv.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        if not self.correct_border:
            return out
        # int(): under the ONNX tracer sizes are tensors, and the border is a constant of the input size.
        border = self.border(int(x.shape[-2]), int(x.shape[-1]), out.device, out.dtype)
        height, width = out.shape[-2:]
        if not self.ring_only or height < 3 or width < 3 or torch.jit.is_tracing() \
                or torch.onnx.is_in_onnx_export():
            return out + border.permute(0, 3, 1, 2)  # also the exported graph: one Add of a constant
        # 3x3 kernel, stride 1, padding 1: only the outermost rows and columns differ. Two in-place adds on
        # the (N, H, W, C) view, contiguous along C for channels_last output.
        out_hwc = out.permute(0, 2, 3, 1)
        out_hwc[:, :: height - 1] += border[:, :: height - 1]
        out_hwc[:, 1:-1, :: width - 1] += border[:, 1:-1, :: width - 1]
        return out


class FoldedBlock(nn.Module):
    """An :class:`IBasicBlock` with its three BatchNorms (and the shortcut's) folded into convolutions."""

    def __init__(self, block: IBasicBlock) -> None:
        super().__init__()
        self.conv1 = _NormConvNorm(block.bn1, block.conv1, block.bn2)
        self.prelu = copy.deepcopy(block.prelu)
        self.conv2 = _conv_then_norm(block.conv2, block.bn3)
        self.downsample = None
        if block.downsample is not None:
            conv, norm = block.downsample[0], block.downsample[1]
            self.downsample = _conv_then_norm(conv, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.prelu(self.conv1(x)))
        out += x if self.downsample is None else self.downsample(x)  # out is fresh: add in place
        return out


class FoldedIResNet(nn.Module):
    """Inference-only iResNet: BatchNorms folded; ``bn2 -> flatten -> fc -> features`` as one Linear.

    Same interface as :class:`IResNet` (``forward``, ``forward_trunk``, ``forward_embedding_from_trunk``,
    ``num_features``), except that the trunk output is flattened in (height, width, channel) order, which
    is free for channels_last input, and the embedding layer needs the trunk's spatial size (7x7).
    """

    def __init__(self, model: IResNet, consume: bool = False) -> None:
        super().__init__()
        self.num_features = model.num_features
        self.conv1 = _conv_then_norm(model.conv1, model.bn1)
        self.prelu = copy.deepcopy(model.prelu)
        blocks = [block for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for block in stage]
        folded = []
        for index, block in enumerate(blocks, 1):
            folded.append(FoldedBlock(block))
            if consume:  # free each source block once folded: the weights are never held twice
                _free(block)
                if index % 8 == 0:  # glibc would keep the freed pages; the next blocks' temporaries would add up
                    release_freed_memory()
        self.blocks = nn.Sequential(*folded)
        self.fc = self._fold_embedding(model)
        if consume:
            _free(model)

    @staticmethod
    def _fold_embedding(model: IResNet) -> nn.Linear:
        channels = model.bn2.num_features
        positions = model.fc.in_features // channels
        in_scale, in_shift = _affine(model.bn2)
        out_scale, out_shift = _affine(model.features)
        # fc input index is c * positions + p (flatten of C, H, W); reorder to p * channels + c (H, W, C).
        # The largest layer of the network (51 MB for r100): folded in float64 a few output rows at a time, so
        # the temporaries stay small.
        like = model.fc.weight.detach()
        folded = torch.empty(model.fc.out_features, positions, channels, dtype=like.dtype, device=like.device)
        bias = model.fc.bias.double().clone()
        for start in range(0, model.fc.out_features, 64):
            rows = like[start:start + 64].to(torch.float64, copy=True).view(-1, channels, positions)
            bias[start:start + 64] += rows.sum(2) @ in_shift
            rows.mul_(in_scale.view(1, -1, 1)).mul_(out_scale[start:start + 64].view(-1, 1, 1))
            folded[start:start + 64].copy_(rows.permute(0, 2, 1))
        with torch.device("meta"):
            fc = nn.Linear(model.fc.in_features, model.fc.out_features)
        fc.weight = nn.Parameter(folded.view(model.fc.out_features, -1))
        fc.bias = nn.Parameter((bias * out_scale + out_shift).to(like.device, like.dtype))
        return fc

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 112, 112) -> (N, 7 * 7 * C) flattened in (H, W, C) order (before ``bn2``, folded into fc)."""
        x = self.blocks(self.prelu(self.conv1(x)))
        return x.permute(0, 2, 3, 1).flatten(1)

    def forward_embedding_from_trunk(self, trunk: torch.Tensor) -> torch.Tensor:
        return self.fc(trunk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_embedding_from_trunk(self.forward_trunk(x))


@torch.no_grad()
def fold_batchnorm(model: nn.Module, consume: bool = False) -> nn.Module:
    """Inference copy of ``model`` with BatchNorm folded (see the module docstring).

    Args:
        model: an :class:`IResNet` or a :class:`DlibResNet`, a :class:`QualityModel` with either as its backbone,
            or anything else (then returned as an eval-mode copy, unfolded).
        consume: free ``model``'s iResNet tensors as they are folded (``model`` is unusable afterwards): the
            peak memory of folding is then one set of weights, not two. Otherwise ``model`` is untouched.

    Returns:
        A new module in eval mode giving the same outputs as ``model.eval()`` up to float rounding, on the device
        ``model`` is on.
    """
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    if device.type != "cpu":  # fold on the CPU (float64, exactly as there), then back: a GPU model too
        source = model if consume else copy.deepcopy(model)
        return fold_batchnorm(source.cpu(), consume=True).to(device)
    if isinstance(model, QualityModel):
        backbone = fold_batchnorm(model.feature_extractor, consume)
        head = model.quality_head if consume else copy.deepcopy(model.quality_head)
        return QualityModel(backbone, head, model.arch, model.preprocessing).eval()
    if isinstance(model, IResNet):
        return FoldedIResNet(model.eval(), consume).eval()
    if isinstance(model, DlibResNet):
        return fold_affine(model)
    return copy.deepcopy(model).eval()
