"""Face vision transformers: insightface ``arcface_torch`` ViT-T/S/B/L and TransFace, as their authors publish them.

Layout of ``deepinsight/insightface`` ``recognition/arcface_torch/backbones/vit.py`` (``VisionTransformer``;
sizes from ``backbones/__init__.py``), for a 112x112 RGB face:

* ``patch_embed.proj``: 9x9 convolution with stride 9 (bias) -> 12 x 12 = 144 patches of ``dim`` channels;
  ``pos_embed`` (1, 144, dim) added; no class token;
* ``blocks.{i}``: pre-norm transformer blocks: ``norm1`` (LayerNorm), ``attn.qkv`` (Linear dim -> 3 dim,
  **no bias**), ``attn.proj`` (bias), ``norm2``, ``mlp.fc1`` (dim -> 4 dim) - **ReLU6** - ``mlp.fc2``;
  8 heads, softmax(q k^T / sqrt(head_dim)) v;
* ``norm`` (LayerNorm), the 144 tokens flattened, then ``feature``: Linear(144 dim -> dim, no bias),
  BatchNorm1d(dim, eps 2e-5), Linear(dim -> 512, no bias), BatchNorm1d(512, eps 2e-5): the embedding;
* ``mask_token`` (1, 1, dim): used only by the random patch masking of FR training.

========  =====  =====  ==========================================
name      dim    depth  arcface_torch ``get_model`` name
========  =====  =====  ==========================================
vit-t     256    12     ``vit_t`` / ``vit_t_dp005_mask0``
vit-s     512    12     ``vit_s`` / ``vit_s_dp005_mask_0``
vit-b     512    24     ``vit_b`` / ``vit_b_dp005_mask_005``
vit-l     768    24     ``vit_l_dp005_mask_005``
========  =====  =====  ==========================================

TransFace (Dan et al., ICCV 2023; ``DanJun6737/TransFace``, ``backbones/vit.py``) is the same network plus
``senet``: Linear(144 dim -> 144, no bias), ReLU, Linear(144 -> 144, no bias), Sigmoid, whose output weights
each of the 144 normalised tokens before ``feature``. TransFace-S/B/L are ``vit_s_dp005_mask_0``,
``vit_b_dp005_mask_005`` and ``vit_l_dp005_mask_005``; their ``forward`` also returns the patch weights and
per-patch standard deviations of training, which the embedding does not need.

Both authors evaluate with ``cv2`` images converted to **RGB** and scaled to [-1, 1] (``x / 255 - 0.5) / 0.5``,
``inference.py`` / ``eval_ijbc.py``), on 112x112 crops aligned to the ArcFace template. Published files are
``backbone.module.state_dict()`` (TransFace: ``glint360k_model_TransFace_L.pt``, ``ms1mv2_model_TransFace_S.pt``
and so on; arcface_torch ViTs: ``model.pt``); training checkpoints keep it under ``state_dict_backbone``.

Differences, none of which changes an embedding: attention runs through
:func:`torch.nn.functional.scaled_dot_product_attention` (the same arithmetic; the authors force float32 there
under CUDA autocast, aikd's autocast regions are chosen by its callers); stochastic depth and patch masking,
training-time regularisers of FR training, are left out, and ``mask_token`` is kept only so the published
keys load (frozen, unused).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from aikd.models.registry import ModelSpec, register_model
from aikd.preprocessing import Preprocessing

__all__ = ["FaceViT", "ViTBlock", "transface_b", "transface_l", "transface_s", "vit_b", "vit_l", "vit_s", "vit_t"]

PATCH = 9
INPUT = 112
HEADS = 8
BN_EPS = 2e-5
SIZES: dict[str, tuple[int, int]] = {"t": (256, 12), "s": (512, 12), "b": (512, 24), "l": (768, 24)}


class Attention(nn.Module):
    """Multi-head self-attention with a bias-free ``qkv`` projection and a biased output ``proj``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    """``fc1`` - ReLU6 - ``fc2``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    """``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` patches -> tokens (N, patches, dim)."""

    def __init__(self, dim: int, patch: int = PATCH) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class FaceViT(nn.Module):
    """arcface_torch's face ViT (``senet=True``: TransFace's), faces (N, 3, 112, 112) -> embeddings (N, 512).

    Args:
        dim: token width.
        depth: transformer blocks.
        heads: attention heads.
        senet: TransFace's token re-weighting before ``feature``.
        dropout: dropout on the flattened tokens before ``feature`` (0: the published networks have none at
            that place; SER-FIQ draws its own masks there).
        num_features: embedding size.
    """

    def __init__(self, dim: int, depth: int, heads: int = HEADS, senet: bool = False, dropout: float = 0.0,
                 num_features: int = 512) -> None:
        super().__init__()
        self.dim, self.num_features = int(dim), int(num_features)
        self.num_patches = (INPUT // PATCH) ** 2
        # Registration order as published, so the paper's "last K parameter tensors" are the same tensors.
        self.patch_embed = PatchEmbed(dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, dim))
        self.blocks = nn.ModuleList(ViTBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        flat = dim * self.num_patches
        self.feature = nn.Sequential(nn.Linear(flat, dim, bias=False), nn.BatchNorm1d(dim, eps=BN_EPS),
                                     nn.Linear(dim, num_features, bias=False),
                                     nn.BatchNorm1d(num_features, eps=BN_EPS))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim), requires_grad=False)  # kept for the keys only
        self.senet = (nn.Sequential(nn.Linear(flat, self.num_patches, bias=False), nn.ReLU(),
                                    nn.Linear(self.num_patches, self.num_patches, bias=False), nn.Sigmoid())
                      if senet else None)
        self.dropout = nn.Dropout(dropout)
        self._init_weights()

    def _init_weights(self) -> None:
        # As published: N(0, 0.02) Linear weights and position embedding, zero biases. (The published
        # trunc_normal_(std=.02) cuts at +-2, 100 standard deviations out: the same distribution, drawn faster.)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Patches, blocks, ``norm`` (and TransFace's re-weighting), flattened: (N, 144 * dim)."""
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        flat = x.reshape(x.shape[0], -1)
        if self.senet is None:
            return flat
        return (self.senet(flat).unsqueeze(-1) * x).reshape(x.shape[0], -1)

    def forward_embedding_from_trunk(self, trunk: torch.Tensor) -> torch.Tensor:
        """Dropout (out of place) and ``feature`` on a trunk output."""
        return self.feature(F.dropout(trunk, self.dropout.p, self.dropout.training, inplace=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Faces (N, 3, 112, 112) scaled to [-1, 1] -> embeddings (N, num_features), not L2-normalised."""
        return self.forward_embedding_from_trunk(self.forward_trunk(x))


def vit_t(**kwargs: Any) -> FaceViT:
    """arcface_torch ViT-T (dim 256, 12 blocks)."""
    return FaceViT(*SIZES["t"], **kwargs)


def vit_s(**kwargs: Any) -> FaceViT:
    """arcface_torch ViT-S (dim 512, 12 blocks)."""
    return FaceViT(*SIZES["s"], **kwargs)


def vit_b(**kwargs: Any) -> FaceViT:
    """arcface_torch ViT-B (dim 512, 24 blocks)."""
    return FaceViT(*SIZES["b"], **kwargs)


def vit_l(**kwargs: Any) -> FaceViT:
    """arcface_torch ViT-L (dim 768, 24 blocks)."""
    return FaceViT(*SIZES["l"], **kwargs)


def transface_s(**kwargs: Any) -> FaceViT:
    """TransFace-S: ViT-S with TransFace's token re-weighting."""
    return FaceViT(*SIZES["s"], senet=True, **kwargs)


def transface_b(**kwargs: Any) -> FaceViT:
    """TransFace-B: ViT-B with TransFace's token re-weighting."""
    return FaceViT(*SIZES["b"], senet=True, **kwargs)


def transface_l(**kwargs: Any) -> FaceViT:
    """TransFace-L: ViT-L with TransFace's token re-weighting."""
    return FaceViT(*SIZES["l"], senet=True, **kwargs)


def _matches(dim: int, depth: int, senet: bool) -> Any:
    """Recogniser of a published face-ViT state dict of this width, depth and kind."""

    def matches(state: Mapping[str, Any]) -> bool:
        embed = state.get("patch_embed.proj.weight")
        if embed is None or "pos_embed" not in state or tuple(embed.shape[1:]) != (3, PATCH, PATCH):
            return False
        blocks = {key.split(".")[1] for key in state if key.startswith("blocks.")}
        return int(embed.shape[0]) == dim and len(blocks) == depth and ("senet.0.weight" in state) == senet

    return matches


VIT_PREPROCESSING = Preprocessing()  # RGB, (x / 255 - 0.5) / 0.5

for _name, _builder, _size, _senet, _text in (
    ("vit-t", vit_t, "t", False, "ViT-T (insightface arcface_torch backbones/vit.py)"),
    ("vit-s", vit_s, "s", False, "ViT-S (insightface arcface_torch backbones/vit.py)"),
    ("vit-b", vit_b, "b", False, "ViT-B (insightface arcface_torch backbones/vit.py)"),
    ("vit-l", vit_l, "l", False, "ViT-L (insightface arcface_torch backbones/vit.py)"),
    ("transface-s", transface_s, "s", True, "TransFace-S (DanJun6737/TransFace backbones/vit.py)"),
    ("transface-b", transface_b, "b", True, "TransFace-B (DanJun6737/TransFace backbones/vit.py)"),
    ("transface-l", transface_l, "l", True, "TransFace-L (DanJun6737/TransFace backbones/vit.py)"),
):
    register_model(ModelSpec(_name, _builder, VIT_PREPROCESSING, _text, layers=(SIZES[_size][1],),
                             width=SIZES[_size][0], matches=_matches(*SIZES[_size], _senet),
                             family="transface" if _senet else "vit"))
