"""SwinFace's face-recognition branch: its Swin-T backbone and embedding head, as ``lxq1000/SwinFace`` publishes it.

Qiu, Hu and Huang, "SwinFace: A Multi-task Transformer for Face Recognition, Expression Recognition, Age
Estimation and Attribute Estimation", IEEE TCSVT 2023. ``swinface_project/backbones/swin.py``
(``SwinTransformer``, built by ``get_model("swin_t", num_features=512)``) is a Swin Transformer (Liu et al.,
ICCV 2021) for 112x112 faces:

* ``patch_embed``: 2x2 convolution with stride 2 (bias) -> 56 x 56 tokens of 96 channels, LayerNorm ``norm``;
* ``layers.{0..3}``: 2, 2, 6, 2 Swin blocks of 96, 192, 384, 768 channels and 3, 6, 12, 24 heads at 56, 28,
  14 and 7 tokens a side; windows of 7 x 7, every second block shifted by 3 (the last stage is one window, so
  never shifted); each block: ``norm1``, window attention ``attn`` (``qkv`` with bias, a learned
  ``relative_position_bias_table`` of 13 x 13 offsets per head with its ``relative_position_index`` buffer,
  ``proj``), ``norm2``, ``mlp`` (``fc1`` - GELU - ``fc2``); shifted blocks carry their ``attn_mask`` buffer;
  stages 0-2 end in ``downsample`` (2x2 patch merging: LayerNorm ``norm`` of 4C, Linear ``reduction`` 4C -> 2C,
  no bias);
* ``norm`` (LayerNorm 768), mean over the 49 tokens, then ``feature``: Linear(768 -> 768, no bias),
  BatchNorm1d(768, eps 2e-5), Linear(768 -> 512, no bias), BatchNorm1d(512, eps 2e-5): the embedding;
* ``head``: Linear(768 -> 512), created by the published class but never used by its forward; kept (frozen)
  so the published keys load.

The published checkpoint (``checkpoint_step_79999_gpu_0.pt``, from the Google Drive folder of the SwinFace
README) is the multi-task training state: ``state_dict_backbone`` holds this network; ``state_dict_fam``,
``state_dict_tss`` and ``state_dict_om`` hold the attribute, expression and age analysis subnets (they read
the backbone's intermediate feature maps, not the embedding), ``state_dict_softmax_fc`` the recognition
classifier, plus optimiser and scheduler states. aikd loads ``state_dict_backbone`` and leaves the rest out,
and says so. The embedding is what SwinFace's ``ModelBox`` reports as ``Recognition``.

Input (``inference.py``, ``eval_ijbc.py``): **RGB**, ``(x / 255 - 0.5) / 0.5``, 112x112 crops aligned to the
ArcFace template (insightface's evaluation sets).

Differences that change no embedding: the authors run window attention in float32 under CUDA autocast
(aikd's autocast regions are chosen by its callers); stochastic depth (a training regulariser) is left out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from aikd.models.registry import ModelSpec, register_model
from aikd.preprocessing import Preprocessing

__all__ = ["SwinBlock", "SwinFace", "swinface_t"]

INPUT = 112
BN_EPS = 2e-5


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * windows, window * window, C), windows in row-major order."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window, window, width // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, channels)


def window_reverse(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * windows, window * window, C) -> (B, H, W, C)."""
    channels = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


def relative_position_index(window: int) -> torch.Tensor:
    """(window^2, window^2) index into the (2 window - 1)^2 table of relative offsets (Swin's buffer)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return relative[:, :, 0] * (2 * window - 1) + relative[:, :, 1]


def shifted_window_mask(size: int, window: int, shift: int) -> torch.Tensor:
    """(windows, window^2, window^2) additive mask: -100 between tokens from different regions after the roll."""
    regions = torch.zeros(1, size, size, 1)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for label, (rows, cols) in enumerate((r, c) for r in cuts for c in cuts):
        regions[:, rows, cols, :] = label
    labels = window_partition(regions, window).squeeze(-1)
    different = labels.unsqueeze(1) != labels.unsqueeze(2)
    return torch.zeros(different.shape).masked_fill(different, -100.0)


class WindowAttention(nn.Module):
    """Multi-head attention within windows, with Swin's learned relative position bias."""

    def __init__(self, dim: int, window: int, heads: int) -> None:
        super().__init__()
        self.heads, self.window = heads, window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: (B * windows, window^2, C); ``mask``: (windows, window^2, window^2) or ``None``."""
        groups, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(groups, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(tokens, tokens, self.heads).permute(2, 0, 1)  # (heads, N, N)
        if mask is not None:  # groups are (image, window) pairs, window fastest: one mask per window
            windows = mask.shape[0]
            q, k, v = (t.reshape(groups // windows, windows, *t.shape[1:]) for t in (q, k, v))
            bias = bias.unsqueeze(0) + mask.unsqueeze(1)  # (windows, heads, N, N)
        # Written out: with an additive mask, torch's fused attention takes a slower path on the CPU
        # (measured: docs/speed.md).
        attention = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1) + bias.to(q.dtype)).softmax(dim=-1)
        x = (attention @ v).reshape(groups, self.heads, tokens, -1)
        return self.proj(x.transpose(1, 2).reshape(groups, tokens, dim))


class Mlp(nn.Module):
    """``fc1`` - GELU - ``fc2``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """Swin block at ``size`` x ``size`` tokens: (shifted) window attention and an MLP, both pre-norm residual."""

    def __init__(self, dim: int, size: int, heads: int, window: int = 7, shift: int = 0) -> None:
        super().__init__()
        if size <= window:  # one window covers the map: no partition, no shift (as published)
            window, shift = size, 0
        self.size, self.window, self.shift = size, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        self.register_buffer("attn_mask", shifted_window_mask(size, window, shift) if shift else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, channels = x.shape
        shortcut = x
        x = self.norm1(x).view(batch, self.size, self.size, channels)
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        x = self.attn(window_partition(x, self.window), self.attn_mask)
        x = window_reverse(x, self.window, self.size, self.size)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        x = shortcut + x.reshape(batch, tokens, channels)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbouring tokens concatenated (4C), LayerNorm, Linear 4C -> 2C."""

    def __init__(self, dim: int, size: int) -> None:
        super().__init__()
        self.size = size
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, channels = x.shape
        x = x.view(batch, self.size, self.size, channels)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(batch, -1, 4 * channels)))


class PatchEmbed(nn.Module):
    """``patch`` x ``patch`` patches -> LayerNorm-ed tokens (N, (112 / patch)^2, dim)."""

    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class Stage(nn.Module):
    """``blocks`` at one resolution, then ``downsample`` (patch merging) unless it is the last stage."""

    def __init__(self, dim: int, size: int, depth: int, heads: int, window: int, last: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(SwinBlock(dim, size, heads, window, 0 if i % 2 == 0 else window // 2)
                                    for i in range(depth))
        self.downsample = None if last else PatchMerging(dim, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class SwinFace(nn.Module):
    """SwinFace's backbone and recognition head: faces (N, 3, 112, 112) -> embeddings (N, num_features).

    Args:
        embed_dim: channels of the first stage (96: Swin-T).
        depths: blocks per stage.
        heads: attention heads per stage.
        window: attention window side.
        patch: patch side of the embedding convolution.
        dropout: dropout on the pooled feature before ``feature`` (0 as published; SER-FIQ draws its own).
        num_features: embedding size.
    """

    def __init__(self, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 heads: Sequence[int] = (3, 6, 12, 24), window: int = 7, patch: int = 2, dropout: float = 0.0,
                 num_features: int = 512) -> None:
        super().__init__()
        self.num_features = int(num_features)
        size = INPUT // patch
        self.patch_embed = PatchEmbed(embed_dim, patch)
        self.layers = nn.ModuleList(
            Stage(embed_dim * 2**i, size // 2**i, depths[i], heads[i], window, i == len(depths) - 1)
            for i in range(len(depths)))
        width = embed_dim * 2 ** (len(depths) - 1)
        self.width = width
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_features)  # unused by the published forward; kept for its keys
        self.head.requires_grad_(False)
        self.feature = nn.Sequential(nn.Linear(width, width, bias=False), nn.BatchNorm1d(width, eps=BN_EPS),
                                     nn.Linear(width, num_features, bias=False),
                                     nn.BatchNorm1d(num_features, eps=BN_EPS))
        self.dropout = nn.Dropout(dropout)
        self._init_weights()

    def _init_weights(self) -> None:
        # As published: N(0, 0.02) Linear weights and bias tables (trunc_normal_(std=.02) cuts at +-2, i.e. never),
        # zero biases; LayerNorms keep torch's unit scale and zero shift.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, WindowAttention):
                nn.init.normal_(module.relative_position_bias_table, std=0.02)

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Patches, the four stages, ``norm`` and the mean over tokens: (N, 768)."""
        x = self.patch_embed(x)
        for stage in self.layers:
            x = stage(x)
        return self.norm(x).mean(dim=1)

    def forward_embedding_from_trunk(self, trunk: torch.Tensor) -> torch.Tensor:
        """Dropout (out of place) and ``feature`` on a trunk output."""
        return self.feature(F.dropout(trunk, self.dropout.p, self.dropout.training, inplace=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Faces (N, 3, 112, 112) scaled to [-1, 1] -> embeddings (N, num_features), not L2-normalised."""
        return self.forward_embedding_from_trunk(self.forward_trunk(x))


def swinface_t(**kwargs: Any) -> SwinFace:
    """SwinFace's Swin-T (96 channels, blocks 2, 2, 6, 2, heads 3, 6, 12, 24, windows of 7, patches of 2)."""
    return SwinFace(**kwargs)


def _matches(state: Mapping[str, Any]) -> bool:
    """SwinFace's Swin-T backbone state dict: 96 channels in 2x2 patches, blocks 2, 2, 6, 2, the ``feature`` head."""
    embed = state.get("patch_embed.proj.weight")
    if embed is None or tuple(embed.shape) != (96, 3, 2, 2) or "feature.0.weight" not in state:
        return False
    blocks = [len({key.split(".")[3] for key in state if key.startswith(f"layers.{i}.blocks.")}) for i in range(4)]
    return blocks == [2, 2, 6, 2]


register_model(ModelSpec(
    "swinface", swinface_t, Preprocessing(),
    "SwinFace Swin-T, recognition branch (lxq1000/SwinFace backbones/swin.py)",
    layers=(2, 2, 6, 2), width=96, matches=_matches, family="swin"))
