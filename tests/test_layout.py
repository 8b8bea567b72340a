"""Training layout: no crash and no wrong gradient from oneDNN's strided 1x1 channels_last backward, on any CPU.

The bug (oneDNN issue 6035; aikd.models.layout) crashes AVX-512 CPUs and silently corrupts weight gradients
on AVX2 ones, so these tests compare gradients with a float64 NCHW reference instead of only checking that
training runs. The CPU they ran on is printed in the first line of the test run.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from aikd.models import IResNet, build_model, list_models, needs_nchw_backward, to_training_layout
from aikd.models.irnet import IRNet
from aikd.models.layout import NCHWBackwardConv2d
from aikd.models.swin import SwinFace
from aikd.models.vit import FaceViT
from aikd.runtime import describe_cpu
from aikd.training.distill import (
    AIKDTask,
    DistillationLoss,
    LossConfig,
    StudentConfig,
    TeacherConfig,
    apply_training_layout,
    build_task,
    set_trainable,
)

# Relative gradient error allowed for one convolution against float64 (float32 gives ~1e-7, the bug 0.3-1.0).
REPRODUCER_TOLERANCE = 1e-3

# (batch, in_channels, size, out_channels): the reproducer shapes and the AVX2 ones found broken here.
REPRODUCER_SHAPES = [(16, 8, 56, 16), (16, 4, 56, 16), (16, 8, 112, 16), (32, 4, 32, 8), (8, 6, 32, 12),
                     (8, 3, 32, 8), (8, 7, 32, 8)]


def test_the_rule_covers_narrow_strided_pointwise_convolutions_only():
    for channels in (1, 3, 4, 7, 8, 16, 32, 48, 72):
        assert needs_nchw_backward(nn.Conv2d(channels, 16, 1, stride=2)), channels
    assert needs_nchw_backward(nn.Conv2d(8, 16, 1, stride=(1, 3)))
    for safe in (nn.Conv2d(64, 128, 1, stride=2), nn.Conv2d(256, 512, 1, stride=2), nn.Conv2d(8, 16, 1),
                 nn.Conv2d(8, 16, 3, stride=2), nn.Conv2d(3, 64, 3), nn.Linear(8, 8)):
        assert not needs_nchw_backward(safe), safe


def test_reproducer_shapes_train_correctly_in_a_subprocess():
    """The reproducer shapes through aikd's training layout, isolated: a crash or hang fails this test only."""
    script = textwrap.dedent(f"""
        import json, sys, torch
        from torch import nn
        from aikd.models import to_training_layout
        for batch, channels, size, out in {REPRODUCER_SHAPES!r}:
            print(json.dumps({{"start": [batch, channels, size, out]}}), flush=True)
            torch.manual_seed(0)
            faces = torch.randn(batch, channels, size, size)
            layer = nn.Sequential(nn.Conv2d(channels, out, 1, stride=2, bias=False))
            reference = nn.Conv2d(channels, out, 1, stride=2, bias=False).double()
            reference.weight.data.copy_(layer[0].weight.data)
            wanted = faces.double().requires_grad_()
            reference(wanted).square().sum().backward()
            to_training_layout(layer, channels_last=True)
            worst = 0.0
            for _ in range(3):  # the AVX2 failure is intermittent
                layer.zero_grad()
                x = faces.contiguous(memory_format=torch.channels_last).requires_grad_()
                layer(x).square().sum().backward()
                for got, want in ((layer[0].weight.grad, reference.weight.grad), (x.grad, wanted.grad)):
                    worst = max(worst, float((got.double() - want).norm() / want.norm()))
            print(json.dumps({{"shape": [batch, channels, size, out], "error": worst}}), flush=True)
    """)
    try:
        child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as stopped:
        last = (stopped.stdout or b"").decode(errors="replace").strip().splitlines()[-1:]
        pytest.fail(f"strided 1x1 channels_last backward hung after {last} on {describe_cpu()}")
    lines = [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]
    if child.returncode != 0:
        started = [line["start"] for line in lines if "start" in line]
        how = f"signal {-child.returncode}" if child.returncode < 0 else f"exit {child.returncode}"
        pytest.fail(f"training a 1x1 stride-2 convolution {started[-1] if started else ''} (N, C_in, size, C_out) "
                    f"in aikd's layout died ({how}) on {describe_cpu()}: {child.stderr[-2000:]}")
    errors = {tuple(line["shape"]): line["error"] for line in lines if "shape" in line}
    assert set(errors) == set(REPRODUCER_SHAPES)
    for shape, error in errors.items():
        assert error < REPRODUCER_TOLERANCE, f"{shape}: gradient off by {error:.2g} relative on {describe_cpu()}"


# Every registered architecture, plus user-defined narrow widths (the shapes oneDNN gets wrong on every CPU) and
# the other families at reduced width: the IR block of AdaFace and CurricularFace (narrow strided 1x1 shortcuts
# next to MaxPool2d(1, 2) ones), TransFace's ViT (9x9 stride-9 patches, token re-weighting), SwinFace's Swin
# (2x2 stride-2 patches, shifted windows).
CUSTOM = {
    "custom-w4": lambda: IResNet((1, 1, 1, 1), width=4),
    "custom-w12": lambda: IResNet((2, 1, 1, 1), width=12),
    "custom-irnet": lambda: IRNet((1, 2, 1, 1), True, channels=(8, 12, 12, 32)),
    "custom-transface": lambda: FaceViT(32, 2, heads=4, senet=True),
    "custom-swin": lambda: SwinFace(8, (2, 2, 1, 1), (1, 2, 2, 4)),
}


# Architectures whose layer shapes repeat a cheaper one's (a registered one at smaller depth or width, other
# constants only, or a custom family variant above at full width) take 25-90 s each here: `make test-all` runs them.
DEEP = {"r100", "r200", "elasticface-r100", "magface-r50", "magface-r100", "adaface-ir18", "adaface-ir50",
        "adaface-ir101", "curricularface-ir101", "swinface", "vit-t", "vit-s", "vit-b", "vit-l", "transface-s",
        "transface-b", "transface-l"}


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a in DEEP else a
                                  for a in [*list_models(), *CUSTOM]])
def test_training_gradients_equal_a_float64_nchw_reference(arch):
    """One AI-KD step, every tensor trainable, in the layout training uses, against plain NCHW float64.

    Run in a subprocess (this file as a script), so a crash or hang fails this test, not the run.
    Tolerance per tensor: |g - g64| <= 5e-2 |g64| + 1e-3 median_k |g64_k|. float32 itself moves gradients
    by up to ~1.5 % here (a PReLU input within 1e-6 of zero can take the other branch); the oneDNN bug moves
    them by 30-100 % or hangs. The absolute term covers biases whose exact gradient is zero (a train-mode
    BatchNorm follows them), where float32 leaves noise only.
    """
    try:
        child = subprocess.run([sys.executable, __file__, arch], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{arch}: a training step hung on {describe_cpu()}")
    if child.returncode != 0:
        how = f"signal {-child.returncode}" if child.returncode < 0 else f"exit {child.returncode}"
        pytest.fail(f"{arch}: a training step died ({how}) on {describe_cpu()}: {child.stderr[-3000:]}")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["compared"] == result["trainable"] > 0
    worst = max(result["ratios"], key=result["ratios"].get)
    assert result["ratios"][worst] <= 1.0, (f"{arch} {worst}: gradient error {result['ratios'][worst]:.3g} x the "
                                            f"tolerance on {describe_cpu()}")


def training_step_gradient_errors(arch: str) -> dict:
    """Gradient error of each trainable tensor over its tolerance (see the test above); child-process side."""
    from aikd.models import QualityHead, QualityModel, calibrate_batchnorm

    torch.manual_seed(0)
    if arch in CUSTOM:
        student = QualityModel(CUSTOM[arch](), QualityHead(512))
    else:
        student = build_model(arch)
    calibrate_batchnorm(student, batches=1, batch_size=4, seed=0)  # the teacher runs in eval mode: keep it sane
    set_trainable(student, "all")
    task = AIKDTask(student, copy.deepcopy(student.feature_extractor), DistillationLoss())
    reference = copy.deepcopy(task).double()  # plain NCHW, float64
    apply_training_layout(task, channels_last=True)
    generator = torch.Generator().manual_seed(1)
    misaligned, aligned = (torch.rand(4, 3, 112, 112, generator=generator) * 2 - 1 for _ in range(2))
    quality = torch.rand(4, generator=generator)
    reference_loss(reference, misaligned.double(), quality.double(), aligned.double()).backward()
    cl = torch.channels_last
    teacher_embedding = task.teacher_embedding(aligned.contiguous(memory_format=cl))
    task(misaligned.contiguous(memory_format=cl), quality, teacher_embedding)["loss"].backward()
    wanted = {name: p.grad for name, p in reference.student.named_parameters() if p.grad is not None}
    floor = 1e-3 * float(torch.stack([g.norm() for g in wanted.values()]).median())
    ratios = {}
    for name, parameter in task.student.named_parameters():
        if parameter.grad is not None:
            want = wanted[name]
            ratios[name] = float((parameter.grad.double() - want).norm() / (5e-2 * want.norm() + floor))
    return {"ratios": ratios, "compared": len(ratios), "trainable": sum(p.requires_grad for p in student.parameters())}


def reference_loss(task: AIKDTask, misaligned: torch.Tensor, quality: torch.Tensor, aligned: torch.Tensor):
    """The AI-KD loss written out plainly, in the inputs' precision (aikd's own forward casts to float32)."""
    with torch.no_grad():
        teacher_embedding = task.teacher(aligned)
    student_embedding = task.student.feature_extractor(misaligned)
    predicted_quality = task.student.quality_head(student_embedding).squeeze(-1)
    cosine = torch.nn.functional.cosine_similarity(student_embedding, teacher_embedding, dim=1)
    return torch.nn.functional.smooth_l1_loss(predicted_quality, quality, beta=0.5) + (1 - cosine).mean()


def test_narrow_students_switch_only_their_unsafe_convolutions_and_real_ones_none():
    tiny, _ = build_task(TeacherConfig(weights="none"), StudentConfig(arch="tiny"), LossConfig(), seed=0)
    switched = [name for name, m in tiny.student.named_modules() if isinstance(m, NCHWBackwardConv2d)]
    assert switched == [f"feature_extractor.layer{i}.0.downsample.0" for i in range(1, 5)]
    assert not any(isinstance(m, NCHWBackwardConv2d) for m in tiny.teacher.modules())
    with torch.device("meta"):
        r50 = build_model("r50")
    assert apply_training_layout(AIKDTask(r50, copy.deepcopy(r50.feature_extractor), DistillationLoss())) == []


def test_other_families_switch_only_their_narrow_strided_pointwise_convolutions():
    """Published AdaFace/CurricularFace/MagFace/ViT/Swin nets keep channels_last everywhere; a narrow IR net
    switches exactly its strided 1x1 shortcut projections (its MaxPool2d(1, 2) shortcuts have no weights)."""
    for arch in ("adaface-ir18", "curricularface-ir101", "magface-r50", "swinface", "transface-s"):
        with torch.device("meta"):
            model = build_model(arch)
        assert to_training_layout(model) == [], arch
    assert to_training_layout(CUSTOM["custom-irnet"]()) == ["body.1.shortcut_layer.0", "body.4.shortcut_layer.0"]


def test_switched_convolution_keeps_keys_outputs_and_the_channels_last_inference_path():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    switched = copy.deepcopy(plain)
    assert to_training_layout(switched, channels_last=True) == ["0"]
    assert list(switched.state_dict()) == list(plain.state_dict())
    faces = torch.randn(2, 8, 56, 56).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(switched.eval()(faces), plain.eval()(faces))
    output = switched.train()(faces.requires_grad_())
    assert output.is_contiguous(memory_format=torch.channels_last)  # the layers after it stay channels_last


if __name__ == "__main__":  # the child of test_training_gradients_equal_a_float64_nchw_reference
    print(json.dumps(training_step_gradient_errors(sys.argv[1])))
