"""``aikd serve`` as a user starts it (a subprocess on 127.0.0.1): overload and SIGTERM.

- 256 concurrent clients against a queue of 16: only 200s and 429s (each 429 with ``Retry-After`` and the code
  ``queue_full``), no 5xx, the server's peak memory bounded, and it still answers afterwards;
- SIGTERM while a request is in flight: the request is answered in full, the process exits 0.

Traffic goes to 127.0.0.1 only; every loop is bounded in count and time, and the servers are stopped by the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="aikd serve needs the serve extra (pip install 'aikd[serve]')")
httpx = pytest.importorskip("httpx")

from test_serve import checkpoint  # noqa: E402, F401  (the tiny seeded model, a module fixture)

CLIENTS, QUEUE = 256, 16
MEMORY_BOUND_MB = 250  # 16 requests of 2 MB (body, parts, decoded pixels) fit; 256 of them (1.5 GB) do not


@contextlib.contextmanager
def serve_process(log: Path, *args: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """``python -m aikd serve --port 0 ARGS`` until it answers /healthz; yields (process, base URL); killed after."""
    with open(log, "w") as err:
        process = subprocess.Popen([sys.executable, "-m", "aikd", "serve", "--port", "0", *args],
                                   stdout=subprocess.DEVNULL, stderr=err)
    try:
        base, deadline = None, time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            found = re.search(r"on (http://127\.0\.0\.1:\d+)/", log.read_text())
            if found:
                base = found.group(1)
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                        break
            time.sleep(0.1)
        else:
            pytest.fail(f"aikd serve did not start:\n{log.read_text()[-2000:]}")
        yield process, base
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM), MB."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) / 1024


def noise_png(side: int, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def large_jpeg(side: int = 3000, seed: int = 0) -> bytes:
    """A smooth ``side`` x ``side`` JPEG: small to send, slow to decode."""
    small = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(small).resize((side, side), Image.BILINEAR).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


async def overload(base: str, body: bytes) -> list[httpx.Response]:
    """CLIENTS clients, each its own connection, all at once; bounded by a timeout."""
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        async def one() -> httpx.Response:
            return await client.post(f"{base}/v1/quality", content=body, headers={"Content-Type": "image/png"})

        return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(CLIENTS))), 180)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak memory from /proc")
def test_256_clients_against_a_queue_of_16_get_only_200s_and_429s(checkpoint, tmp_path):  # noqa: F811
    body = noise_png(800)  # about 1.9 MB
    assert len(body) > 1.5e6
    with serve_process(tmp_path / "serve.log", "--checkpoint", str(checkpoint), "--queue-size", str(QUEUE),
                       "--workers", "2") as (process, base):
        before = peak_rss_mb(process.pid)
        responses = asyncio.run(overload(base, body))
        grown = peak_rss_mb(process.pid) - before
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 429}, sorted(set(statuses))
        assert statuses.count(200) >= QUEUE and statuses.count(429) > 0, statuses.count(200)
        for response in responses:
            if response.status_code == 429:
                assert response.json()["error"]["code"] == "queue_full"
                assert int(response.headers["retry-after"]) >= 1
            else:
                assert response.json()["results"][0]["quality"] is not None
        assert grown < MEMORY_BOUND_MB, f"peak memory grew {grown:.0f} MB under overload"
        after = httpx.post(f"{base}/v1/quality", content=body, headers={"Content-Type": "image/png"}, timeout=60)
        assert after.status_code == 200 and httpx.get(f"{base}/readyz", timeout=30).status_code == 200
        metrics = httpx.get(f"{base}/metrics").text
        assert 'aikd_errors_total{code="queue_full"}' in metrics and "aikd_queue_depth 0.0" in metrics


def test_sigterm_drains_the_request_in_flight_and_exits_0(checkpoint, tmp_path):  # noqa: F811
    images = {f"{i}.jpg": large_jpeg(seed=i) for i in range(16)}  # 16 x 9 Mpixel: a request that takes a while
    log = tmp_path / "serve.log"
    with serve_process(log, "--checkpoint", str(checkpoint), "--workers", "1") as (process, base):
        answer: dict[str, httpx.Response] = {}

        def slow_request() -> None:
            answer["response"] = httpx.post(f"{base}/v1/quality", timeout=120,
                                            files=[("file", (name, data)) for name, data in images.items()])

        client = threading.Thread(target=slow_request)
        client.start()
        deadline = time.monotonic() + 30
        while "aikd_queue_depth 1.0" not in httpx.get(f"{base}/metrics").text:
            assert time.monotonic() < deadline and client.is_alive(), f"the request was not seen in flight: {answer}"
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        client.join(120)
        assert process.wait(60) == 0, log.read_text()[-2000:]
    response = answer["response"]
    assert response.status_code == 200
    assert [r["error"] for r in response.json()["results"]] == [None] * len(images)
    assert "aikd serve: stopped" in log.read_text()
