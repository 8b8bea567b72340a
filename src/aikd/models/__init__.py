"""Models of AI-KD: face-recognition backbones as their authors publish them, the quality head, the registry,
checkpoints.

Families (each module registers its architectures): insightface iResNet (:mod:`~aikd.models.iresnet`, in the
registry), MagFace (:mod:`~aikd.models.magface`), AdaFace and CurricularFace IR nets (:mod:`~aikd.models.irnet`),
arcface_torch ViTs and TransFace (:mod:`~aikd.models.vit`), SwinFace (:mod:`~aikd.models.swin`).

    from aikd.models import build_model, load_fr_model, load_quality_model
    model = load_quality_model("aikd-best.pth")          # the paper's release, or an aikd checkpoint
    embedding, quality = model(model.preprocessing(images))
    teacher = load_fr_model("backbone.pth")              # backbone + preprocessing + arch
    adaface = load_fr_model("adaface_ir50_ms1mv2.ckpt")  # any registered family's file, as published
"""

from aikd.models import irnet, magface, swin, vit  # noqa: F401  (each registers its architectures)
from aikd.models.batchnorm_statistics import calibrate_batchnorm
from aikd.models.checkpoint import (
    FRModel,
    fitting_architectures,
    infer_arch,
    load_backbone,
    load_fr_model,
    load_quality_model,
    read_checkpoint,
    save_checkpoint,
    weights_fingerprint,
)
from aikd.models.head import QualityHead
from aikd.models.iresnet import (
    IBasicBlock,
    IResNet,
    iresnet18,
    iresnet18_w025,
    iresnet34,
    iresnet50,
    iresnet100,
    iresnet200,
    iresnet_tiny,
)
from aikd.models.irnet import IRNet
from aikd.models.layout import needs_nchw_backward, to_training_layout
from aikd.models.quality import QualityModel
from aikd.models.registry import (
    ModelSpec,
    build_backbone,
    build_model,
    get_spec,
    list_models,
    preprocessing_for,
    register_model,
)
from aikd.models.swin import SwinFace
from aikd.models.vit import FaceViT
from aikd.preprocessing import Preprocessing

__all__ = [
    "FRModel",
    "FaceViT",
    "IBasicBlock",
    "IRNet",
    "IResNet",
    "ModelSpec",
    "Preprocessing",
    "QualityHead",
    "QualityModel",
    "SwinFace",
    "build_backbone",
    "build_model",
    "calibrate_batchnorm",
    "fitting_architectures",
    "get_spec",
    "infer_arch",
    "iresnet18",
    "iresnet18_w025",
    "iresnet34",
    "iresnet50",
    "iresnet100",
    "iresnet200",
    "iresnet_tiny",
    "list_models",
    "load_backbone",
    "load_fr_model",
    "load_quality_model",
    "needs_nchw_backward",
    "preprocessing_for",
    "read_checkpoint",
    "register_model",
    "save_checkpoint",
    "to_training_layout",
    "weights_fingerprint",
]
