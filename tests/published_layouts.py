"""State-dict layouts of published face-recognition checkpoints, written from their authors' model definitions.

Independent of aikd's modules on purpose: each function lists ``(key, shape)`` in the order the published
``state_dict()`` has them, from reading the repository named in its docstring (module names, what registers
first, parameter shapes, which layers have a bias). :func:`publish` wraps a backbone's tensors the way each
family's published file holds them (nesting, prefixes, the training-only tensors next to the network).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import torch

Layout = list[tuple[str, tuple[int, ...]]]


def bn(prefix: str, channels: int, affine: bool = True) -> Layout:
    """A BatchNorm's entries: weight and bias (if affine), running statistics, the batch counter."""
    keys = [(f"{prefix}.weight", (channels,)), (f"{prefix}.bias", (channels,))] if affine else []
    return keys + [(f"{prefix}.running_mean", (channels,)), (f"{prefix}.running_var", (channels,)),
                   (f"{prefix}.num_batches_tracked", ())]


def ln(prefix: str, channels: int) -> Layout:
    return [(f"{prefix}.weight", (channels,)), (f"{prefix}.bias", (channels,))]


def linear(prefix: str, out: int, inp: int, bias: bool = True) -> Layout:
    return [(f"{prefix}.weight", (out, inp))] + ([(f"{prefix}.bias", (out,))] if bias else [])


def iresnet(blocks: Sequence[int], width: int = 64, features: int = 512) -> Layout:
    """insightface ``recognition/arcface_torch/backbones/iresnet.py`` (also ElasticFace ``backbones/iresnet.py``
    and MagFace ``models/iresnet.py``, which keep its names and shapes): conv1, bn1, prelu; layer1..4 of
    IBasicBlock (bn1, conv1 3x3, bn2, prelu, conv2 3x3 with the stride, bn3, downsample = 1x1 conv + BN in a
    stage's first block); bn2, fc (8 width * 49 -> features), features (BatchNorm1d)."""
    keys = [("conv1.weight", (width, 3, 3, 3)), *bn("bn1", width), ("prelu.weight", (width,))]
    inplanes = width
    for stage, (count, factor) in enumerate(zip(blocks, (1, 2, 4, 8), strict=True), start=1):
        planes = width * factor
        for index in range(count):
            p, cin = f"layer{stage}.{index}", inplanes if index == 0 else planes
            keys += [*bn(f"{p}.bn1", cin), (f"{p}.conv1.weight", (planes, cin, 3, 3)), *bn(f"{p}.bn2", planes),
                     (f"{p}.prelu.weight", (planes,)), (f"{p}.conv2.weight", (planes, planes, 3, 3)),
                     *bn(f"{p}.bn3", planes)]
            if index == 0:
                keys += [(f"{p}.downsample.0.weight", (planes, cin, 1, 1)), *bn(f"{p}.downsample.1", planes)]
        inplanes = planes
    return keys + [*bn("bn2", 8 * width), *linear("fc", features, 8 * width * 49), *bn("features", features)]


def ir_net(units: Sequence[int], mid_norm: bool, channels: Sequence[int] = (64, 128, 256, 512)) -> Layout:
    """AdaFace ``net.py`` ``Backbone(.., 'ir')`` (``mid_norm``) / CurricularFace ``backbone/model_irse.py``.

    ``input_layer`` (conv 3x3 no bias, BN, PReLU), then ``output_layer`` (BN2d, Dropout, Flatten, Linear with
    bias, BatchNorm1d without affine), then ``body``: blocks with ``shortcut_layer`` (MaxPool when the channel
    count stays, else 1x1 conv + BN) registered before ``res_layer`` (BN, conv 3x3, [BN,] PReLU, conv 3x3, BN).
    """
    stem = channels[0]
    keys = [("input_layer.0.weight", (stem, 3, 3, 3)), *bn("input_layer.1", stem), ("input_layer.2.weight", (stem,))]
    keys += [*bn("output_layer.0", channels[-1]), *linear("output_layer.3", 512, channels[-1] * 49),
             *bn("output_layer.4", 512, affine=False)]
    index, inp = 0, stem
    for count, depth in zip(units, channels, strict=True):
        for _ in range(count):
            p = f"body.{index}"
            if inp != depth:
                keys += [(f"{p}.shortcut_layer.0.weight", (depth, inp, 1, 1)), *bn(f"{p}.shortcut_layer.1", depth)]
            keys += [*bn(f"{p}.res_layer.0", inp), (f"{p}.res_layer.1.weight", (depth, inp, 3, 3))]
            last = 2
            if mid_norm:
                keys += bn(f"{p}.res_layer.2", depth)
                last = 3
            keys += [(f"{p}.res_layer.{last}.weight", (depth,)),
                     (f"{p}.res_layer.{last + 1}.weight", (depth, depth, 3, 3)),
                     *bn(f"{p}.res_layer.{last + 2}", depth)]
            index, inp = index + 1, depth
    return keys


def face_vit(dim: int, depth: int, senet: bool) -> Layout:
    """arcface_torch ``backbones/vit.py`` ``VisionTransformer`` (``senet``: TransFace ``backbones/vit.py``).

    Own parameters first (``pos_embed`` (1, 144, dim), ``mask_token`` (1, 1, dim)), then ``patch_embed.proj``
    (9x9 conv with bias), ``blocks`` (norm1, attn.qkv without bias, attn.proj, norm2, mlp.fc1 4x, mlp.fc2),
    ``norm``, ``feature`` (Linear 144 dim -> dim no bias, BN1d, Linear dim -> 512 no bias, BN1d), [``senet``
    (Linear 144 dim -> 144, Linear 144 -> 144, both without bias)].
    """
    keys = [("pos_embed", (1, 144, dim)), ("mask_token", (1, 1, dim)), ("patch_embed.proj.weight", (dim, 3, 9, 9)),
            ("patch_embed.proj.bias", (dim,))]
    for i in range(depth):
        p = f"blocks.{i}"
        keys += [*ln(f"{p}.norm1", dim), *linear(f"{p}.attn.qkv", 3 * dim, dim, bias=False),
                 *linear(f"{p}.attn.proj", dim, dim), *ln(f"{p}.norm2", dim), *linear(f"{p}.mlp.fc1", 4 * dim, dim),
                 *linear(f"{p}.mlp.fc2", dim, 4 * dim)]
    keys += [*ln("norm", dim), *linear("feature.0", dim, 144 * dim, bias=False), *bn("feature.1", dim),
             *linear("feature.2", 512, dim, bias=False), *bn("feature.3", 512)]
    if senet:
        keys += [*linear("senet.0", 144, 144 * dim, bias=False), *linear("senet.2", 144, 144, bias=False)]
    return keys


def swin_face(embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2), heads: Sequence[int] = (3, 6, 12, 24),
              window: int = 7) -> Layout:
    """SwinFace ``swinface_project/backbones/swin.py`` ``SwinTransformer(num_classes=512)`` at 112x112, patch 2.

    ``patch_embed`` (proj 2x2 conv with bias, norm), ``layers.i`` (blocks: own ``attn_mask`` buffer when shifted,
    norm1, attn: relative_position_bias_table, relative_position_index buffer, qkv with bias, proj; norm2,
    mlp.fc1, mlp.fc2; ``downsample``: reduction (4C -> 2C, no bias), norm (4C)), ``norm``, ``head`` (Linear
    768 -> 512), ``feature`` (Linear 768 -> 768 no bias, BN1d, Linear 768 -> 512 no bias, BN1d).
    """
    keys = [("patch_embed.proj.weight", (embed_dim, 3, 2, 2)), ("patch_embed.proj.bias", (embed_dim,)),
            *ln("patch_embed.norm", embed_dim)]
    size = 56
    for stage, (depth, head) in enumerate(zip(depths, heads, strict=True)):
        channels, side = embed_dim * 2**stage, min(window, size)
        for j in range(depth):
            p = f"layers.{stage}.blocks.{j}"
            if j % 2 == 1 and size > window:
                keys.append((f"{p}.attn_mask", ((size // side) ** 2, side * side, side * side)))
            keys += [*ln(f"{p}.norm1", channels),
                     (f"{p}.attn.relative_position_bias_table", ((2 * side - 1) ** 2, head)),
                     (f"{p}.attn.relative_position_index", (side * side, side * side)),
                     *linear(f"{p}.attn.qkv", 3 * channels, channels), *linear(f"{p}.attn.proj", channels, channels),
                     *ln(f"{p}.norm2", channels), *linear(f"{p}.mlp.fc1", 4 * channels, channels),
                     *linear(f"{p}.mlp.fc2", channels, 4 * channels)]
        if stage < len(depths) - 1:
            keys += [*linear(f"layers.{stage}.downsample.reduction", 2 * channels, 4 * channels, bias=False),
                     *ln(f"layers.{stage}.downsample.norm", 4 * channels)]
        size //= 2
    width = embed_dim * 2 ** (len(depths) - 1)
    return keys + [*ln("norm", width), *linear("head", 512, width), *linear("feature.0", width, width, bias=False),
                   *bn("feature.1", width), *linear("feature.2", 512, width, bias=False), *bn("feature.3", 512)]


# ------------------------------------------------------------------------------------------------ files
def publish(family: str, state: dict[str, torch.Tensor], variant: int = 0) -> object:
    """What the authors' file holds: the network's tensors ``state`` in its nesting, with its prefixes, next to
    the training-only entries (random small stand-ins). ``variant`` picks among a family's known forms."""
    extra = torch.Generator().manual_seed(7)
    if family == "adaface":  # PyTorch Lightning 1.8 checkpoint of AdaFace's Trainer (train_val.py, head.py)
        network = {f"model.{key}": value for key, value in state.items()}
        head = {"head.kernel": torch.randn(512, 10, generator=extra), "head.t": torch.zeros(1),
                "head.batch_mean": torch.ones(1) * 20, "head.batch_std": torch.ones(1) * 100}
        return {"epoch": 24, "global_step": 1000, "pytorch-lightning_version": "1.8.6",
                "state_dict": {**network, **head}, "hyper_parameters": {"arch": "ir_101", "head": "adaface", "m": 0.4},
                "lr_schedulers": [{"milestones": collections.Counter({12: 1, 20: 1}), "gamma": 0.1}],
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}]}
    if family == "magface":  # run/trainer.py: {'epoch', 'arch', 'state_dict', 'optimizer'}; DP or DDP prefixes
        prefix = ("module.features.", "features.module.")[variant % 2]
        network = {f"{prefix}{key}": value for key, value in state.items()}
        classifier = {("module.fc.weight", "fc.weight")[variant % 2]: torch.randn(512, 10, generator=extra)}
        return {"epoch": 25, "arch": "iresnet100", "state_dict": {**network, **classifier},
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0]}]}}
    if family == "swinface":  # train.py's save_all_states checkpoint (checkpoint_step_79999_gpu_0.pt)
        def small(*names: str) -> dict[str, torch.Tensor]:
            return {name: torch.randn(4, 4, generator=extra) for name in names}

        return {"epoch": 0, "global_step": 79999, "state_dict_backbone": dict(state),
                "state_dict_softmax_fc": small("weight"), "state_dict_fam": small("nets.0.conv.convs.0.weight"),
                "state_dict_tss": small("nets.0.feature.0.weight"), "state_dict_om": small("output_fcs.0.weight"),
                "state_optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
                "state_lr_scheduler": {"base_lrs": [0.1], "last_epoch": 79999}}
    if family == "transface" and variant % 2 == 1:  # train.py's checkpoint_gpu_{rank}.pt
        return {"epoch": 19, "global_step": 5000, "state_dict_backbone": dict(state),
                "state_dict_softmax_fc": {"weight_activated": torch.randn(10, 512, generator=extra)}}
    return dict(state)  # backbone.module.state_dict(): arcface_torch, ElasticFace, CurricularFace, ViT, TransFace


# ------------------------------------------------------------------------------------- released quality models
def crfiqa(blocks: Sequence[int], width: int = 64) -> Layout:
    """fdbtrs/CR-FIQA ``backbones/iresnet.py`` ``IResNet(qs=1)``: insightface's iResNet, then ``qs`` (Linear 512 -> 1)
    registered last; the file is ``backbone.state_dict()``."""
    return iresnet(blocks, width) + linear("qs", 1, 512)


def mobilefacenet() -> Layout:
    """LSIbabnikz/eDifFIQA ``model/mobilenet.py`` ``MobileFaceNet``: Conv_block = conv (no bias), bn, prelu;
    Linear_block = conv, bn; Depth_Wise = conv (1x1 to groups), conv_dw (3x3 depthwise), project (1x1 Linear_block);
    Residual = model.N Depth_Wise; then linear (no bias) and bn (BatchNorm1d)."""
    def conv_block(p: str, cin: int, cout: int, k: int, groups: int = 1, prelu: bool = True) -> Layout:
        keys = [(f"{p}.conv.weight", (cout, cin // groups, k, k)), *bn(f"{p}.bn", cout)]
        return keys + ([(f"{p}.prelu.weight", (cout,))] if prelu else [])

    def depth_wise(p: str, cin: int, cout: int, groups: int) -> Layout:
        return [*conv_block(f"{p}.conv", cin, groups, 1), *conv_block(f"{p}.conv_dw", groups, groups, 3, groups),
                *conv_block(f"{p}.project", groups, cout, 1, prelu=False)]

    keys = [*conv_block("conv1", 3, 64, 3), *conv_block("conv2_dw", 64, 64, 3, 64), *depth_wise("conv_23", 64, 64, 128)]
    keys += [k for i in range(4) for k in depth_wise(f"conv_3.model.{i}", 64, 64, 128)]
    keys += depth_wise("conv_34", 64, 128, 256)
    keys += [k for i in range(6) for k in depth_wise(f"conv_4.model.{i}", 128, 128, 256)]
    keys += depth_wise("conv_45", 128, 128, 512)
    keys += [k for i in range(2) for k in depth_wise(f"conv_5.model.{i}", 128, 128, 256)]
    keys += [*conv_block("conv_6_sep", 128, 512, 1), *conv_block("conv_6_dw", 512, 512, 7, 512, prelu=False)]
    return keys + [*linear("linear", 512, 512, bias=False), *bn("bn", 512)]


def ediffiqa(backbone: Layout) -> Layout:
    """LSIbabnikz/eDifFIQA ``model/ediffiqa.py`` ``eDifFIQA``: ``base_model`` (the backbone) then ``mlp`` (``MLP``:
    l1 512 -> 1024, GELU, l2 1024 -> 1); the file is its ``state_dict()``."""
    return [(f"base_model.{key}", shape) for key, shape in backbone] + linear("mlp.l1", 1024, 512) + \
        linear("mlp.l2", 1, 1024)


def sddfiqa(units: Sequence[int] = (3, 4, 14, 3), channels: Sequence[int] = (64, 128, 256, 512)) -> Layout:
    """Tencent/TFace ``quality/generate_pseudo_labels/extract_embedding/model/model.py`` ``R50(use_type="Qua")``:
    ``input_layer`` (conv, BN, PReLU), ``quality`` (Flatten, PReLU(C*49), Dropout, Linear(C*49 -> 1)) registered
    before ``body`` (bottleneck_IR: shortcut_layer, then res_layer BN, conv, PReLU, conv, BN)."""
    stem, last = channels[0], channels[-1]
    keys = [("input_layer.0.weight", (stem, 3, 3, 3)), *bn("input_layer.1", stem), ("input_layer.2.weight", (stem,)),
            ("quality.1.weight", (last * 49,)), *linear("quality.3", 1, last * 49)]
    body = ir_net(units, mid_norm=False, channels=channels)
    return keys + [(key, shape) for key, shape in body if key.startswith("body.")]
