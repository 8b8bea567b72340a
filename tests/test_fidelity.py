"""Training as the paper's code trains, or as a named option: trainable set, precision regions, EMA, non-finite
steps, BatchNorm across processes, and the paper's clipped step."""

from __future__ import annotations

import copy
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from aikd.config import load_config
from aikd.models import build_model, list_models, read_checkpoint
from aikd.models.batchnorm import SynchronisedBatchNorm1d, SynchronisedBatchNorm2d
from aikd.models.forward import quality_forward
from aikd.training.distill import (
    AIKDTask,
    LossConfig,
    StudentConfig,
    TeacherConfig,
    build_task,
    set_trainable,
)
from aikd.training.train import TrainConfig, Trainer, TrainingDiverged, train

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
SMALL = ["data.synthetic.count=72", "data.synthetic.image_size=96", "data.val_fraction=0.125",
         "data.val_batch_size=16", "optim.pretrain_fraction=0"]


# ------------------------------------------------------------------------------------------ trainable set
def frozen_by_design(arch: str) -> list[str]:
    """Backbone tensors the architecture itself never trains: arcface_torch (and ElasticFace) freeze the
    ``features`` BatchNorm scale, MagFace trains it; the ViTs keep ``mask_token`` and SwinFace an unused ``head``
    only so their published keys load; the IR nets' last BatchNorm has no affine parameters."""
    if arch.startswith(("magface-", "adaface-", "curricularface-", "dlib-")):
        return []
    if arch.startswith(("vit-", "transface-")):
        return ["mask_token"]
    if arch == "swinface":
        return ["head.weight", "head.bias"]
    return ["features.weight"]


@pytest.mark.parametrize("arch", list_models())
def test_the_last_k_tensors_train_as_the_papers_slice(arch):
    """``list(backbone.parameters())[-100:]``: every tensor of a backbone with fewer than 100."""
    with torch.device("meta"):
        student = build_model(arch)
    named = dict(student.feature_extractor.named_parameters())
    frozen = {id(named[name]) for name in frozen_by_design(arch)}
    assert {id(p) for p in named.values() if not p.requires_grad} == frozen, arch
    backbone = list(named.values())
    for count in (0, 1, 50, 100, len(backbone) + 7, "all"):
        head, trainable = set_trainable(student, count)
        wanted = backbone if count == "all" else backbone[len(backbone) - min(count, len(backbone)):] if count else []
        expected = [p for p in wanted if id(p) not in frozen]  # frozen by design stays frozen
        assert [id(p) for p in trainable] == [id(p) for p in expected], (arch, count)
        assert len(head) == 4 and all(p.requires_grad for p in head)
    set_trainable(student, 100)  # features.weight is among the last 100 and stays frozen: r100 trains 99 (paper)
    last = backbone[len(backbone) - min(100, len(backbone)):]
    assert sum(p.requires_grad for p in backbone) == len(last) - sum(id(p) in frozen for p in last)
    if arch == "r100":
        assert sum(p.requires_grad for p in backbone) == 99


# ------------------------------------------------------------------------------------------- precision
def _dtypes(task: AIKDTask, regions: str) -> dict[str, torch.dtype]:
    seen: dict[str, torch.dtype] = {}
    student = task.student
    def record(name: str):
        def hook(module, inputs, output) -> None:  # returns None: the output is left as it is
            seen.setdefault(name, output.dtype)

        return hook

    hooks = [module.register_forward_hook(record(name))
             for name, module in (("trunk_conv", student.feature_extractor.layer4[0].conv2),
                                  ("fc", student.feature_extractor.fc), ("head", student.quality_head.l2))]
    faces = torch.rand(4, 3, 112, 112) * 2 - 1
    embedding, quality = quality_forward(student, faces, torch.bfloat16, regions)
    for hook in hooks:
        hook.remove()
    assert embedding.dtype == quality.dtype == torch.float32
    return seen


def test_precision_regions_paper_and_trunk():
    task, _ = build_task(TeacherConfig(weights="none"), StudentConfig(arch="tiny"), LossConfig(), seed=0,
                         amp_dtype=torch.bfloat16)
    # The paper's code: backbone built with fp16=False, so the trunk runs fp32 inside the outer autocast.
    assert _dtypes(task, "paper") == {"trunk_conv": torch.float32, "fc": torch.bfloat16, "head": torch.bfloat16}
    assert _dtypes(task, "trunk") == {"trunk_conv": torch.bfloat16, "fc": torch.float32, "head": torch.float32}
    with pytest.raises(ValueError, match="train.amp_regions"):
        _dtypes(task, "everything")


# -------------------------------------------------------------------------------------------- EMA
def _trainer(tiny_train_config, tmp_path, *overrides):
    return Trainer(tiny_train_config(*overrides), tmp_path)


def _batches(trainer):
    return iter(trainer._train_loader(0, 0))


def test_ema_none_saves_the_student_and_running_averages(tiny_train_config, tmp_path):
    for ema in ("none", "running"):
        trainer = _trainer(tiny_train_config, tmp_path / ema, f"train.ema={ema}")
        (tmp_path / ema).mkdir(exist_ok=True)  # the teacher cache made it
        batches = _batches(trainer)
        trainer.task.train()
        trainer.train_step(next(batches))
        trainer.validate(None)
        first = copy.deepcopy(trainer.student.state_dict())
        trainer.train_step(next(batches))
        trainer.best = None  # keep whatever this validation gives
        trainer.validate(None)
        saved, meta = read_checkpoint(tmp_path / ema / "best.pt")
        now = trainer.student.state_dict()
        weight = "feature_extractor.layer4.0.conv2.weight"
        assert trainer.student.training and not trainer.task.teacher.training  # modes restored after validation
        if ema == "none":
            assert meta["extra"]["weights"] == "student"
            assert all(torch.equal(saved[k], v) for k, v in now.items())
        else:
            assert meta["extra"]["weights"] == "ema"
            torch.testing.assert_close(saved[weight], 0.1 * first[weight] + 0.9 * now[weight])


# ------------------------------------------------------------------------------------------ non-finite
def test_a_nan_batch_is_skipped_counted_and_undone(tiny_train_config, tmp_path):
    trainer = _trainer(tiny_train_config, tmp_path, "train.max_nonfinite_steps=3")
    trainer.task.train()
    batches = _batches(trainer)
    trainer.train_step(next(batches))
    before = copy.deepcopy(trainer.student.state_dict())
    bad = next(batches)
    bad["quality"][2] = math.nan
    values = trainer.train_step(bad)
    assert math.isnan(values["loss"]) and trainer.nonfinite_steps == 1 and trainer.step == 2
    after = trainer.student.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # weights and BatchNorm statistics
    good = trainer.train_step(next(batches))
    assert math.isfinite(good["loss"]) and trainer.nonfinite_in_a_row == 0 and trainer.nonfinite_steps == 1
    assert any(not torch.equal(trainer.student.state_dict()[k], v) for k, v in before.items())
    for _ in range(2):
        bad = next(batches)
        bad["misaligned"][0] = math.nan
        trainer.train_step(bad)
    bad = next(batches)
    bad["misaligned"][0] = math.nan
    with pytest.raises(TrainingDiverged, match="3 steps in a row"):
        trainer.train_step(bad)
    assert trainer.training_state()["nonfinite_steps"] == 4


# ------------------------------------------------------------------------------- BatchNorm across ranks
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, run_dir: str, overrides: list[str]) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"})
    result = train(load_config(TrainConfig, TINY, overrides), run_dir)
    kinds = {type(m) for m in result.task.student.modules()}
    torch.save({"state": result.task.student.state_dict(),
                "synchronised": SynchronisedBatchNorm2d in kinds and SynchronisedBatchNorm1d in kinds},
               Path(run_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_processes_of_8_train_like_one_of_16_with_synchronised_batchnorm(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    steps = ["train.max_steps=1", "train.checkpoint_every=0", "teacher.cache=false"]
    single = train(load_config(TrainConfig, TINY, [*SMALL, *steps, "data.batch_size=16"]), tmp_path / "one")
    reference = single.task.student.state_dict()
    differences = {}
    for sync in ("auto", "false"):
        run_dir = tmp_path / f"two-{sync}"
        mp.spawn(_worker, args=(_free_port(), str(run_dir), [*SMALL, *steps, "data.batch_size=8",
                                                             f"train.sync_bn={sync}"]), nprocs=2, join=True)
        ranks = [torch.load(run_dir / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
        assert ranks[0]["synchronised"] == (sync == "auto")
        differences[sync] = max(float((ranks[0]["state"][k].double() - v.double()).abs().max())
                                for k, v in reference.items() if v.is_floating_point())
    assert differences["auto"] < 1e-4, differences  # the same step as one process with the whole batch
    assert differences["false"] > 1e-3, differences  # per-process statistics: a different step


# ------------------------------------------------------------------------------------ the paper's step
def test_the_papers_accumulated_gradients_shrink_its_steps(tmp_path):
    """bench/paper_step.py's emulation: with more than 100 backbone tensors the frozen ones carry x128 scaled
    gradients (and pile them up), so the paper's clip shrinks every step far more than aikd's does."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "paper_step.py"
    spec = importlib.util.spec_from_file_location("paper_step", path)
    paper_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paper_step)
    torch.manual_seed(0)
    paper = paper_step.paper_clip_factors(paper_step.make_trainer("r34", 4, 6, tmp_path / "p"), 6)
    ours = paper_step.aikd_clip_factors(paper_step.make_trainer("r34", 4, 6, tmp_path / "a"), 6)
    assert max(paper) < min(ours) / 10  # 66 of r34's 166 tensors keep scaled gradients that are never cleared
