"""The AI-KD task: frozen separate teacher, trainable set, loss, teacher-embedding cache."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aikd.models import build_backbone, build_model, weights_fingerprint
from aikd.models.forward import quality_forward
from aikd.training.distill import (
    DistillationLoss,
    LossConfig,
    StudentConfig,
    TeacherConfig,
    build_task,
    set_trainable,
    teacher_embeddings,
)
from aikd.training.train import Trainer


def _tiny_task(**student):
    return build_task(TeacherConfig(weights="none"), StudentConfig(arch="tiny", **student), LossConfig(), seed=0)


def _trainer(config, tmp_path, name="run"):
    return Trainer(config, tmp_path / name)


def _first_batch(trainer):
    return next(iter(trainer._train_loader(0, 0)))


def test_teacher_is_a_frozen_separate_copy_that_stays_in_eval_mode():
    task, _ = _tiny_task()
    student_ids = {id(p) for p in task.student.parameters()} | {id(b) for b in task.student.buffers()}
    assert not any(id(p) in student_ids for p in task.teacher.parameters())
    assert not any(id(b) in student_ids for b in task.teacher.buffers())
    assert not any(p.requires_grad for p in task.teacher.parameters())
    for mode in (True, False, True):
        task.train(mode)
        assert not any(m.training for m in task.teacher.modules())
        assert task.student.training is mode
    # same starting weights, separate storage
    for (name, t), (_, s) in zip(task.teacher.state_dict().items(), task.student.feature_extractor.state_dict().items(),
                                 strict=True):
        assert torch.equal(t, s) and t.data_ptr() != s.data_ptr(), name
    with pytest.raises(ValueError, match="shares parameters"):
        type(task)(task.student, task.student.feature_extractor, DistillationLoss())


def test_teacher_weights_are_loaded_from_an_arcface_backbone_file(tmp_path):
    torch.manual_seed(5)
    backbone = build_backbone("tiny")
    torch.save(backbone.state_dict(), tmp_path / "backbone.pth")  # arcface_torch layout, no metadata
    task, fingerprint = build_task(TeacherConfig(weights=str(tmp_path / "backbone.pth")), StudentConfig(),
                                   LossConfig(), seed=0)
    assert task.student.arch == "tiny"
    for name, value in backbone.state_dict().items():
        assert torch.equal(task.teacher.state_dict()[name], value), name
        assert torch.equal(task.student.feature_extractor.state_dict()[name], value), name
    assert fingerprint == weights_fingerprint(backbone)
    other = build_backbone("tiny")
    assert weights_fingerprint(other) != fingerprint


def test_refuses_to_start_without_teacher_weights(tmp_path):
    with pytest.raises(ValueError, match=r"teacher.weights: required.*teacher.weights=none"):
        build_task(TeacherConfig(), StudentConfig(arch="tiny"), LossConfig())
    with pytest.raises(ValueError, match="teacher.weights: .* is not a file"):
        TeacherConfig(weights=str(tmp_path / "missing.pth")).check()
    with pytest.raises(ValueError, match="student.arch: required with teacher.weights=none"):
        build_task(TeacherConfig(weights="none"), StudentConfig(), LossConfig())


def test_trainable_set_is_the_head_and_the_last_k_backbone_tensors():
    model = build_model("tiny")
    names = [name for name, _ in model.feature_extractor.named_parameters()]
    set_trainable(model, 10)
    trainable = [n for n, p in model.feature_extractor.named_parameters() if p.requires_grad]
    assert trainable == [n for n in names[-10:] if n != "features.weight"]  # insightface freezes features.weight
    assert all(p.requires_grad for p in model.quality_head.parameters())
    set_trainable(model, "all")
    assert [n for n, p in model.feature_extractor.named_parameters() if not p.requires_grad] == ["features.weight"]
    head, backbone = set_trainable(model, 0)
    assert backbone == [] and len(head) == 4
    assert not any(p.requires_grad for p in model.feature_extractor.parameters())


def test_loss_is_smooth_l1_plus_lambda_times_one_minus_cosine():
    generator = torch.Generator().manual_seed(0)
    predicted, label = torch.rand(6, generator=generator), torch.rand(6, generator=generator)
    student, teacher = torch.randn(6, 512, generator=generator), torch.randn(6, 512, generator=generator)
    terms = DistillationLoss(beta=0.5, consistency_weight=2.0)(predicted, label, student, teacher)
    quality = nn.SmoothL1Loss(beta=0.5)(predicted, label)
    consistency = nn.CosineEmbeddingLoss()(student, teacher, torch.ones(6))  # the paper's module, target 1
    torch.testing.assert_close(terms["quality_loss"], quality)
    torch.testing.assert_close(terms["consistency_loss"], consistency)
    torch.testing.assert_close(terms["loss"], quality + 2.0 * consistency)
    half = DistillationLoss()(predicted.half(), label, student.bfloat16(), teacher)
    assert all(v.dtype == torch.float32 for v in half.values())


def test_a_step_changes_only_the_trainable_set(tiny_train_config, tmp_path):
    trainer = _trainer(tiny_train_config("student.trainable_tensors=10"), tmp_path)
    student, teacher = trainer.task.student, trainer.task.teacher
    before = copy.deepcopy(student.state_dict())
    teacher_before = copy.deepcopy(teacher.state_dict())
    batch = _first_batch(trainer)
    trainer.task.train()
    trainer.train_step(batch)  # LR factor 0 at step 0 (the paper's sine warm-up): fills the momentum only
    trainer.train_step(batch)
    trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    assert len(trainable) == 9 + 4
    for name, p in student.named_parameters():
        changed = not torch.equal(p.detach(), before[name])
        assert changed == (name in trainable), name
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name
    # frozen_bn=train (the paper): frozen layers' BatchNorm statistics follow the misaligned faces
    assert not torch.equal(student.state_dict()["feature_extractor.bn1.running_mean"],
                           before["feature_extractor.bn1.running_mean"])


def test_frozen_batchnorm_can_keep_the_teachers_statistics(tiny_train_config, tmp_path):
    trainer = _trainer(tiny_train_config("student.trainable_tensors=10", "student.frozen_bn=eval"), tmp_path)
    before = copy.deepcopy(trainer.task.student.state_dict())
    trainer.task.train()
    assert not trainer.task.student.feature_extractor.bn1.training
    assert trainer.task.student.feature_extractor.features.training  # has a trainable bias: train mode
    trainer.train_step(_first_batch(trainer))
    after = trainer.task.student.state_dict()
    assert torch.equal(after["feature_extractor.bn1.running_mean"], before["feature_extractor.bn1.running_mean"])
    assert not torch.equal(after["feature_extractor.features.running_mean"],
                           before["feature_extractor.features.running_mean"])


def test_cached_teacher_embeddings_give_the_same_step(tiny_train_config, tmp_path):
    plain = _trainer(tiny_train_config("teacher.cache=false"), tmp_path, "plain")
    cached = _trainer(tiny_train_config("teacher.cache=true"), tmp_path, "cached")
    assert plain.cache is None and cached.cache is not None
    batch = _first_batch(plain)
    assert len(batch["aligned_rows"]) == len(batch["index"])
    # fill the cache from the aligned faces, then train on a batch that carries no aligned faces at all
    filled = teacher_embeddings(cached.task, batch, torch.device("cpu"), cached.cache, cached.memory_format)
    positions = batch["index"].numpy()
    np.testing.assert_array_equal(cached.cache.values[positions], filled.numpy())
    without_aligned = _first_batch(cached)
    assert torch.equal(without_aligned["index"], batch["index"]) and without_aligned["aligned"].shape[0] == 0
    for trainer, step_batch in ((plain, batch), (plain, batch), (cached, without_aligned), (cached, without_aligned)):
        trainer.task.train()
        trainer.train_step(step_batch)
    for (name, a), (_, b) in zip(plain.task.student.state_dict().items(), cached.task.student.state_dict().items(),
                                 strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_a_cache_is_keyed_by_teacher_and_precision(tiny_train_config, tmp_path):
    first = _trainer(tiny_train_config(), tmp_path, "a")
    other_teacher = _trainer(tiny_train_config("train.seed=1"), tmp_path, "b")
    shared = f"teacher.cache_dir={tmp_path / 'a' / 'teacher_cache'}"
    other_precision = _trainer(tiny_train_config("train.amp=bf16", shared), tmp_path, "c")
    names = {t.cache.values_path.name for t in (first, other_teacher, other_precision)}
    assert len(names) == 3
    assert other_precision.cache.values_path.parent == first.cache.values_path.parent  # a shared folder is fine


def test_autocast_keeps_embeddings_head_and_loss_in_float32(tiny_model, faces_batch):
    embedding, quality = quality_forward(tiny_model, faces_batch, torch.bfloat16)
    assert embedding.dtype == torch.float32 and quality.dtype == torch.float32
    reference_embedding, reference_quality = tiny_model(faces_batch)
    assert F.cosine_similarity(embedding, reference_embedding).min() > 0.99
    torch.testing.assert_close(quality, reference_quality, atol=0.05, rtol=0.05)
