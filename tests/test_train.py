"""The training loop: paper schedule, learning, exact resume, 2-process DDP, the CLI end to end, failures."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from aikd.cli import main
from aikd.config import load_config
from aikd.evaluation.metrics import quality_metrics
from aikd.models import QualityModel, load_quality_model, read_checkpoint
from aikd.training.train import LoopConfig, OptimConfig, Plan, TrainConfig, lr_factor, train

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
SMALL = ["data.synthetic.count=72", "data.synthetic.image_size=96", "data.val_fraction=0.125", "data.batch_size=8",
         "data.val_batch_size=16"]


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_schedule_follows_the_paper():
    plan = Plan.make(3_267_000, 64, 1, OptimConfig(), LoopConfig())  # VGGFace2 less the 1% validation split
    assert plan.steps_per_epoch == plan.total_steps == 51046
    assert plan.pretrain_end == 15313 and plan.warmup_end == 7656 and plan.val_every == 5104
    assert not plan.validates_at(plan.val_every * 3) and plan.validates_at(plan.val_every * 4)
    assert lr_factor(0, 100) == 0.0 and lr_factor(50, 100) == pytest.approx(math.sin(math.pi / 4))
    assert lr_factor(100, 100) == 1.0 and lr_factor(5, 0) == 1.0
    assert Plan.make(1000, 10, 4, OptimConfig(), LoopConfig(epochs=2, max_steps=30)).total_steps == 30
    with pytest.raises(ValueError, match="data.batch_size"):
        Plan.make(10, 64, 1, OptimConfig(), LoopConfig())


def test_validation_metrics():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    labels = rng.uniform(size=50).round(1)  # ties
    aligned = labels + rng.normal(0, 0.1, 50)
    misaligned = aligned + rng.normal(0, 0.2, 50)
    metrics = quality_metrics(aligned, misaligned, labels, beta=0.5)
    assert metrics["spearman_aligned"] == pytest.approx(scipy_stats.spearmanr(aligned, labels)[0])
    assert metrics["spearman_misaligned"] == pytest.approx(scipy_stats.spearmanr(misaligned, labels)[0])
    assert metrics["pearson_misaligned"] == pytest.approx(scipy_stats.pearsonr(misaligned, labels)[0])
    assert metrics["alignment_sensitivity"] == pytest.approx(np.abs(aligned - misaligned).mean())
    expected = torch.nn.SmoothL1Loss(beta=0.5)(torch.tensor(aligned), torch.tensor(labels)).item()
    assert metrics["quality_loss_aligned"] == pytest.approx(expected)


def test_loss_decreases_on_synthetic_faces(tiny_train_config, tmp_path):
    result = train(tiny_train_config("train.epochs=3", "train.log_every=1"), tmp_path / "run")
    losses = [r["loss"] for r in _records(tmp_path / "run", "train")]
    assert len(losses) == result.total_steps == 21
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5]), losses
    assert result.best is not None and math.isfinite(result.best["quality_loss_aligned"])


def _state(path: Path) -> dict[str, torch.Tensor]:
    weights, meta = read_checkpoint(path)
    return {**weights, **{f"ema.{k}": v for k, v in (meta["extra"].get("ema") or {}).items()}}


def test_resume_gives_the_weights_of_an_uninterrupted_run(tiny_train_config, tmp_path):
    overrides = ("train.epochs=2", "train.validate_every=0.5", "train.ema=running")
    whole = train(tiny_train_config(*overrides), tmp_path / "whole")
    assert whole.status == "done" and whole.step == 14
    stopped = train(tiny_train_config(*overrides), tmp_path / "split", stop_after=5)
    assert stopped.status == "stopped" and stopped.step == 5
    assert read_checkpoint(tmp_path / "split" / "last.pt")[1]["extra"]["step"] == 5
    assert main(["train", "--resume", str(tmp_path / "split")]) == 0
    reference, resumed = _state(tmp_path / "whole" / "last.pt"), _state(tmp_path / "split" / "last.pt")
    assert reference.keys() == resumed.keys() and any(k.startswith("ema.") for k in reference)
    for name, value in reference.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=name)
    best_a, best_b = read_checkpoint(tmp_path / "whole" / "best.pt"), read_checkpoint(tmp_path / "split" / "best.pt")
    assert best_a[1]["extra"]["step"] == best_b[1]["extra"]["step"]
    strip = [{k: v for k, v in r.items() if k != "time"} for r in _records(tmp_path / "whole", "val")]
    assert strip == [{k: v for k, v in r.items() if k != "time"} for r in _records(tmp_path / "split", "val")]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, run_dir: str, overrides: list[str]) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size)})
    config = load_config(TrainConfig, TINY, overrides)
    result = train(config, run_dir)
    torch.save(result.task.student.state_dict(), Path(run_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_gloo_processes_end_with_identical_weights(tmp_path):
    run_dir = tmp_path / "ddp"
    overrides = [*SMALL, "train.max_steps=3", "train.validate_every=0.5", "optim.pretrain_fraction=0"]
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # two processes on a shared CPU: one thread each, as torchrun
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(run_dir), overrides), nprocs=2, join=True)
    ranks = [torch.load(run_dir / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), name
    single = train(load_config(TrainConfig, TINY, [*overrides, "train.max_steps=1"]), tmp_path / "single")
    changed = [name for name, value in single.task.student.state_dict().items()
               if value.is_floating_point() and not torch.equal(value, ranks[0][name])]
    assert changed  # the two-process run trained (on 2 x 8 faces per step)
    assert (run_dir / "best.pt").exists() and not (run_dir / "rank1").exists()


def test_cli_end_to_end(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["train", "--config", TINY, "--out", str(run_dir), *SMALL, "data.workers=1", "train.log_every=2"])
    assert code == 0, capsys.readouterr().err
    for name in ("best.pt", "last.pt", "metrics.jsonl", "metrics.csv", "config.yaml", "data_report.json"):
        assert (run_dir / name).is_file(), name
    model = load_quality_model(run_dir / "best.pt")
    assert isinstance(model, QualityModel) and model.arch == "tiny"
    faces = np.random.default_rng(0).integers(0, 255, (2, 112, 112, 3), dtype=np.uint8)
    with torch.no_grad():
        _, quality = model(model.preprocessing(faces))
    assert quality.shape == (2,) and torch.isfinite(quality).all()
    meta = read_checkpoint(run_dir / "best.pt")[1]
    assert meta["extra"]["weights"] == "student" and meta["preprocessing"]["input_size"] == [112, 112]
    saved = load_config(TrainConfig, run_dir / "config.yaml")
    assert saved.data.batch_size == 8 and saved.teacher.weights == "none"
    validation = _records(run_dir, "val")[-1]
    for key in ("quality_loss_aligned", "quality_loss_misaligned", "spearman_aligned", "spearman_misaligned",
                "pearson_aligned", "pearson_misaligned", "alignment_sensitivity"):
        assert math.isfinite(validation[key]), key
    assert "done" in capsys.readouterr().err
    assert main(["train", "--config", TINY, "--out", str(run_dir)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_nan_losses_in_a_row_stop_and_keep_the_last_good_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["train", "--config", TINY, "--out", str(run_dir), *SMALL, "optim.head_lr=1.0e+30",
                 "optim.clip_grad_norm=0", "train.checkpoint_every=1", "train.max_nonfinite_steps=2"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "2 steps in a row had a non-finite loss" in err and "step skipped (1 in a row" in err
    step = int(err.split("in a row had a non-finite loss or gradients (step ")[1].split(":")[0])
    assert "the last good checkpoint" in err and str(run_dir / "last.pt") in err
    assert read_checkpoint(run_dir / "last.pt")[1]["extra"]["step"] == step - 1


@pytest.mark.parametrize(("override", "message"), [
    ("optim.head_lr=-1", "optim: head_lr: expected 0 or more"),
    ("optim.lr=0.1", "unknown config key optim.lr"),
    ("data.batch_size=many", "data.batch_size: expected int"),
    ("teacher.weights=null", "teacher.weights: required"),
    ("train.amp=fp8", "train.amp: expected one of 'auto', 'off', 'fp16', 'bf16'"),
    ("student.arch=r1000", "unknown model architecture"),
])
def test_bad_config_fails_before_any_work(tmp_path, capsys, override, message):
    run_dir = tmp_path / "run"
    assert main(["train", "--config", TINY, "--out", str(run_dir), override]) == 2
    assert message in capsys.readouterr().err
    assert not run_dir.exists()


def test_help_config_lists_every_key(capsys):
    assert main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    for key in ("data.misalignment.max_shift (float, default 3.0)", "teacher.weights", "student.trainable_tensors",
                "optim.backbone_momentum", "train.ema_decay", "train.amp"):
        assert key in out


FACES = Path("/work/shared/data/faces")


@pytest.mark.skipif(not FACES.exists(), reason="sample faces not available")
def test_trains_on_image_files_with_loader_workers(tmp_path, capsys):
    names = sorted(p.name for p in FACES.glob("*.jpg"))
    template = "38.2946,51.6963,73.5318,51.5014,56.0252,71.7366,41.5493,92.3655,70.7299,92.2041"
    (tmp_path / "landmarks.csv").write_text("path,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5\n"
                                            + "".join(f"{n},{template}\n" for n in names))
    (tmp_path / "labels.csv").write_text("path,quality\n" + "".join(f"{n},{i / 4}\n" for i, n in enumerate(names)))
    run_dir = tmp_path / "run"
    code = main(["train", "--config", TINY, "--out", str(run_dir), "data.source=files", f"data.images={FACES}",
                 f"data.landmarks={tmp_path / 'landmarks.csv'}", f"data.labels={tmp_path / 'labels.csv'}",
                 "data.val_fraction=0.34", "data.batch_size=2", "data.workers=2", "train.epochs=2"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["usable"] == len(names) and report["counts"] == {}
    assert [r["step"] for r in _records(run_dir, "val")] == [1, 2]  # one step per epoch: validate after each
    assert load_quality_model(run_dir / "best.pt").arch == "tiny"


def test_deterministic_kernels_are_scoped_to_the_run(tiny_train_config, tmp_path):
    """train.deterministic switches torch to deterministic kernels for the run and restores the settings after."""
    import os

    import torch

    from aikd.training.train import train

    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    result = train(tiny_train_config("train.deterministic=true", "train.epochs=1"), tmp_path / "run")
    assert result.status == "done"
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG")) == before
