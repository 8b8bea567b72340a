"""The Ray Data engine of the file pipeline: ``aikd score`` / ``aikd embed`` ``--engine ray [--ray-address ADDR]``.

    ray start --head                                   # the head node (then `ray start --address HEAD:6379` on others)
    aikd score /data/faces --checkpoint best.pt -o scores.parquet --engine ray --ray-address auto

The same job as the local engine (:func:`aikd.pipeline.files.run_files`), spread over a Ray cluster:

1. the driver (where aikd runs) lists the inputs, claims the output under the same output policy (refusals, locks,
   ``--resume`` of the same model and settings only) and writes the images not done yet as a Parquet manifest in
   the journal folder (``OUT.partial/ray/``);
2. Ray Data reads the manifest, decodes and crops (and detects) the faces in CPU tasks, and runs the model in an
   actor pool: one actor per GPU (``num_gpus=1``) where the cluster has GPUs, else CPU actors, half the cluster's
   CPUs (at least one), so decoding always has a CPU left (on 2 CPUs, two model actors and the read task
   deadlock);
3. batches come back to the driver in input order and each is appended to the journal and fsynced, so a driver
   stopped at any point loses at most the batches in flight and ``--resume`` does only what is missing;
4. the output is written by the local engine's finish (:func:`aikd.pipeline.jobs.finish_job`): the same files
   (CSV, JSONL, pickle, Parquet, the embeddings, the errors file, the run record).

Every file a run names (images, model, landmarks, calibration) must be readable at the same path on every node (a
shared file system). Ray is imported only here, only when this engine is chosen; a run that starts Ray (no
``ray.init`` before it) shuts it down at its end.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from aikd.images import ImageInput
from aikd.pipeline.crops import CropOptions, FaceCropper
from aikd.pipeline.decoding import load_prepared
from aikd.pipeline.faces import FilePreparer
from aikd.pipeline.journal import ItemResult, Journal, json_default
from aikd.pipeline.outputs import claimed_output, journal_dir

if TYPE_CHECKING:
    from aikd.pipeline.jobs import JobOptions, TaskFactory

__all__ = ["MANIFEST_ROWS", "ModelActor", "PrepareSpec", "RayOptions", "prepare_batch", "ray_session", "run_ray"]

MANIFEST_ROWS = 4096  # images per manifest file: a read task's share
GPU_BATCH = 256  # faces per forward pass on a GPU actor (the local engine's GPU default)
MIN_TASK_MEMORY = 256 << 20  # bytes a decode task asks Ray for, at least (a large photo decoded)
BLOCK_BYTES = 1 << 20  # Ray Data's block size for this run (its default, 128 MB, is hundreds of prepared faces)


@dataclass(frozen=True)
class RayOptions:
    """Where and how the Ray engine runs.

    Attributes:
        address: the cluster (``auto``, ``HEAD:6379``, ``ray://HEAD:10001``); ``None``: a Ray session this process
            already has, else a local one started for the run.
        actors: model actors (default: one per GPU, else half the cluster's CPUs, at least one).
        worker_setup: called first in each model actor's process: the entry point's process-wide settings
            (``aikd score`` passes :func:`aikd.runtime.use_fastest_convolutions`: fp32 stays IEEE on a GPU actor).
    """

    address: str | None = None
    actors: int | None = None
    worker_setup: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise ValueError(f"--ray-actors must be at least 1, got {self.actors}")


def run_ray(items: Sequence[ImageInput], output: Path, job: JobOptions, factory: TaskFactory, options: RayOptions,
            *, device: str = "auto", device_backend: str = "torch", protected: Sequence[Path] = ()) -> int:
    """:func:`aikd.pipeline.files.run_files` on a Ray cluster; returns the exit status (0 all done, 1 some failed).

    Args:
        items: the images (:func:`aikd.images.collect_inputs`).
        output: the output file.
        job: batch size, ``resume``/``overwrite`` (``workers`` and ``decode`` are the cluster's).
        factory: makes the task (:data:`aikd.pipeline.jobs.TaskFactory`, sent to every actor: picklable); the
            driver makes one on its CPU (settings, writing).
        options: the cluster and the actors.
        device: ``auto`` (GPU actors where the cluster has GPUs), ``cpu`` or ``cuda``.
        device_backend: ``onnxruntime`` for an ONNX model.
        protected: every file the run reads besides the images.

    Raises:
        ValueError: a refused output, bad settings, a torchrun job, or a task that cannot run on a cluster.
    """
    from aikd.pipeline.jobs import InputPaths, finish_sharded, pending_inputs
    from aikd.runtime import join_torchrun

    dist = join_torchrun("cpu", backend=device_backend)
    if dist.world_size > 1:
        raise ValueError("--engine ray runs from one driver process; start it without torchrun")
    task = factory(dist, items, 0)
    with claimed_output(output, task.settings(), resume=job.resume, overwrite=job.overwrite, dist=dist,
                        inputs=InputPaths(items, protected), side_outputs=task.side_outputs()):
        if task.reads_images:
            spec = _prepare_spec(task)
            todo, count = pending_inputs(items, output, job.resume, load_previous=task.load_previous)
            if count:
                manifest = _write_manifest(todo, journal_dir(output) / "ray")
                with ray_session(options.address):
                    _run(manifest, count, output, job, factory, spec, options, device, device_backend, task.desc)
        task.after_pass(dist)
        return finish_sharded(dist, items, output, task.write, verb=task.verb, before_write=task.finish)


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """The Ray session this process has, or one started (on ``address``, else locally) and shut down at the end."""
    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(address=address, include_dashboard=False, configure_logging=False, log_to_driver=True)
    try:
        yield
    finally:
        ray.shutdown()


# ------------------------------------------------------------------------------------------------- the stages
@dataclass(frozen=True)
class PrepareSpec:
    """What a CPU task needs to turn an image file into the model's input, without the model: how faces are
    cropped, the model's preprocessing and its layout."""

    crop: CropOptions
    preprocessing: Any
    channels_first: bool

    @property
    def input_shape(self) -> tuple[int, int, int]:
        height, width = self.preprocessing.input_size
        return (3, height, width) if self.channels_first else (height, width, 3)


def _prepare_spec(task: Any) -> PrepareSpec:
    """The crop and preprocessing of ``task``'s model (a face pipeline's, or a labeller's FR model's)."""
    pipeline = getattr(task, "pipeline", None)
    if pipeline is not None:
        return PrepareSpec(pipeline.cropper.options, pipeline.engine.preprocessing, pipeline.engine.channels_first)
    cropper, model = getattr(task, "cropper", None), getattr(task, "model", None)
    if cropper is not None and model is not None:
        return PrepareSpec(cropper.options, model.preprocessing, False)
    raise ValueError(f"--engine ray: {task.desc} has no per-face model step to run on a cluster; use the local "
                     "engine")


_PREPARERS: dict[bytes, FilePreparer] = {}  # in a Ray worker process: one crop step per spec (a detector, a table)


def _preparer(spec: PrepareSpec) -> FilePreparer:
    key = pickle.dumps(spec)
    if key not in _PREPARERS:
        cropper = FaceCropper(spec.crop, spec.preprocessing, items=(), workers=1)  # single-threaded detector
        _PREPARERS[key] = FilePreparer(cropper, spec.preprocessing, spec.channels_first)
    return _PREPARERS[key]


def prepare_batch(batch: dict[str, np.ndarray], spec: PrepareSpec) -> dict[str, np.ndarray]:
    """A Ray Data CPU task: the manifest rows' images decoded, cropped and preprocessed (zeros and an ``error``
    where an image cannot be used: the reason the local engine gives)."""
    preparer = _preparer(spec)
    inputs = np.zeros((len(batch["key"]), *spec.input_shape), dtype=np.float32)
    errors = []
    for row, item in enumerate(_items(batch)):
        image, error = load_prepared(item, preparer)
        if image is not None:
            inputs[row] = image
        errors.append(error or "")
    return {"key": batch["key"], "path": batch["path"], "error": np.array(errors, dtype=object), "input": inputs}


def _items(batch: dict[str, np.ndarray]) -> Iterator[ImageInput]:
    for path, key, member, error in zip(batch["path"], batch["key"], batch["member"], batch["error"], strict=True):
        yield ImageInput(Path(str(path)), str(key), None if int(member) < 0 else int(member), str(error) or None)


class ModelActor:
    """A Ray Data actor: the task's model on this actor's device, run over batches of prepared faces.

    Args:
        factory: makes the task (:data:`aikd.pipeline.jobs.TaskFactory`).
        device: ``cpu`` or ``cuda`` (the GPU Ray gave this actor).
        backend: ``torch`` or ``onnxruntime``.
        threads: CPU threads of the model (the actor's CPUs).
        setup: :attr:`RayOptions.worker_setup`.
    """

    def __init__(self, factory: TaskFactory, device: str, backend: str, threads: int,
                 setup: Callable[[], None] | None = None) -> None:
        from aikd.runtime import join_torchrun

        if setup is not None:
            setup()  # the command's process-wide settings, in this actor's process (a Ray worker of its own)
        if backend == "torch" and device == "cpu":
            import torch

            torch.set_num_threads(threads)  # this actor's process is Ray's, given ``threads`` CPUs
        self.task = factory(join_torchrun(device, backend=backend))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        good = [row for row, error in enumerate(batch["error"]) if not error]
        items = [ImageInput(Path(str(batch["path"][row])), str(batch["key"][row])) for row in good]
        results = self.task.process([batch["input"][row] for row in good], items) if good else []
        if len(results) != len(good):
            raise RuntimeError(f"the model gave {len(results)} results for {len(good)} images")
        records = [ItemResult(error=str(error)) if error else None for error in batch["error"]]
        for row, result in zip(good, results, strict=True):
            records[row] = result
        seconds = (time.perf_counter() - started) / max(1, len(good))
        return {"key": batch["key"], "record": np.array([_record(r) for r in records], dtype=object),
                "vector": np.array([_vector_bytes(r) for r in records], dtype=object),
                "model_s": np.full(len(records), seconds if good else 0.0)}


def _record(result: ItemResult) -> str:
    return json.dumps({"r": result.rows, "e": result.error}, default=json_default)


def _vector_bytes(result: ItemResult) -> bytes:
    return b"" if result.vector is None else np.ascontiguousarray(result.vector, dtype=np.float32).tobytes()


# ------------------------------------------------------------------------------------------------ the driver
def _write_manifest(todo: Iterable[ImageInput], folder: Path) -> Path:
    """The images to do as Parquet files of :data:`MANIFEST_ROWS` rows (path, key, member: -1 for none, error)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from aikd.io import chunked

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for number, chunk in enumerate(chunked(todo, MANIFEST_ROWS)):
        table = pa.table({"path": [str(item.path) for item in chunk], "key": [item.key for item in chunk],
                          "member": pa.array([-1 if item.member is None else item.member for item in chunk],
                                             pa.int64()),
                          "error": [item.error or "" for item in chunk]})
        pq.write_table(table, folder / f"manifest-{number:06d}.parquet")
    return folder


@dataclass(frozen=True)
class _Placement:
    """How the model actors are placed: how many, on which device, with which resources."""

    actors: int
    device: str
    gpus: float
    cpus: float
    batch_size: int


def _placement(options: RayOptions, device: str, batch_size: int | None) -> _Placement:
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    if device.startswith("cuda") and not gpus:
        raise ValueError(f"--device {device}: the Ray cluster has no GPU; use --device auto or cpu")
    if gpus and device != "cpu":
        return _Placement(options.actors or gpus, "cuda", 1.0, 1.0, batch_size or GPU_BATCH)
    # CPU actors: at most half the CPUs, so the read and decode tasks always find one (2 CPUs: one actor)
    actors = options.actors or max(1, cpus // 2)
    return _Placement(actors, "cpu", 0.0, 1.0, batch_size or 32)


def _run(manifest: Path, count: int, output: Path, job: JobOptions, factory: TaskFactory, spec: PrepareSpec,
         options: RayOptions, device: str, backend: str, desc: str) -> None:
    """Run the images of ``manifest`` through the cluster, appending each batch that comes back to the journal."""
    import ray

    place = _placement(options, device, job.batch_size)
    dataset = ray.data.read_parquet(str(manifest), file_extensions=["parquet"])
    context = dataset.context  # this dataset's own copy: the session's settings are left alone
    context.execution_options.preserve_order = True  # batches come back in input order: the journal's order
    context.enable_progress_bars = False
    # Small blocks: a decode task hands on its faces a batch at a time (not a whole manifest file's), and each model
    # batch comes back to the driver, and so to the journal, on its own.
    context.target_max_block_size = BLOCK_BYTES
    # A decode task states the memory it needs (its batch of faces and the decoder's working copies); with it, Ray
    # Data never fuses decoding into the model actors: CPU tasks decode while the actors run the model.
    memory = max(MIN_TASK_MEMORY, 4 * place.batch_size * int(np.prod(spec.input_shape)) * 4)
    dataset = dataset.map_batches(prepare_batch, fn_kwargs={"spec": spec}, batch_size=place.batch_size,
                                  batch_format="numpy", num_cpus=1, memory=memory)
    actor = {"factory": factory, "device": place.device, "backend": backend, "threads": int(place.cpus),
             "setup": options.worker_setup}
    dataset = dataset.map_batches(ModelActor, fn_constructor_kwargs=actor,
                                  batch_size=place.batch_size, batch_format="numpy", num_cpus=place.cpus,
                                  num_gpus=place.gpus, compute=ray.data.ActorPoolStrategy(size=place.actors))
    journal = Journal(output, 0)
    progress = tqdm(total=count, desc=f"{desc} (ray)", unit="img", dynamic_ncols=True, file=sys.stderr)
    started, model_seconds, done = time.perf_counter(), 0.0, 0
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            journal.append(list(_results(batch)))
            model_seconds += float(np.sum(batch["model_s"]))
            done += len(batch["key"])
            progress.update(len(batch["key"]))
    finally:
        progress.close()
        journal.close()
    wall = time.perf_counter() - started
    rate = done / model_seconds if model_seconds else float("nan")
    print(f"ray: {done} images in {wall:.1f} s on {place.actors} {place.device} actor(s), {rate:.1f} img/s per actor "
          f"in the model", file=sys.stderr)


def _results(batch: dict[str, np.ndarray]) -> Iterator[tuple[str, ItemResult]]:
    for key, record, vector in zip(batch["key"], batch["record"], batch["vector"], strict=True):
        entry = json.loads(record)
        values = np.frombuffer(vector, dtype=np.float32).copy() if len(vector) else None
        yield str(key), ItemResult(entry["r"] or [], values, entry["e"])
