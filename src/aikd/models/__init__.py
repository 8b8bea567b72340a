"""Models of AI-KD: insightface-compatible iResNet backbones, the quality head, the registry, checkpoints.

    from aikd.models import build_model, load_fr_model, load_quality_model
    model = load_quality_model("aikd-best.pth")          # the paper's release, or an aikd checkpoint
    embedding, quality = model(model.preprocessing(images))
    teacher = load_fr_model("backbone.pth")              # backbone + preprocessing + arch
"""

from aikd.models.calibration import calibrate_batchnorm
from aikd.models.checkpoint import (
    FRModel,
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
from aikd.models.layout import needs_nchw_backward, to_training_layout
from aikd.models.preprocessing import Preprocessing
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

__all__ = [
    "FRModel",
    "IBasicBlock",
    "IResNet",
    "ModelSpec",
    "Preprocessing",
    "QualityHead",
    "QualityModel",
    "build_backbone",
    "build_model",
    "calibrate_batchnorm",
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
