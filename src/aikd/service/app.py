"""The HTTP routes of ``aikd serve`` (FastAPI): face quality over HTTP, a page to try it, health and metrics.

    POST /v1/quality   images -> {"model": {...}, "results": [{"name", "quality", "faces": [...], "error"}]}
    POST /v1/select    images of one person -> the best k by quality ("selected": indices, best first)
    GET  /v1/model     architecture, fingerprint, preprocessing, calibration, decision rule, limits, version
    GET  /healthz      alive (the process answers)
    GET  /readyz       ready (a real inference on a built-in face photo went through)
    GET  /metrics      Prometheus text format
    GET  /             the page (static HTML/JS/CSS shipped with aikd; nothing is loaded from elsewhere)

Every error is JSON, ``{"error": {"code", "message"}}`` (:mod:`aikd.service.errors`), never a traceback. With API
keys (:mod:`aikd.service.auth`) ``/v1/*`` needs one. A request is admitted into a bounded queue (429 when full),
read within the size limit, and answered within the request time limit; decoding, detection and the model run in
threads, never on the event loop. A result holds every image's own result: a request whose every image failed is
answered 422 with the first image's error at the top as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aikd.service.auth import ApiKeys, read_api_keys
from aikd.service.core import QualityService
from aikd.service.errors import ServiceError, error_body
from aikd.service.inputs import check_length, parse_images, read_body
from aikd.service.metrics import CONTENT_TYPE, Metrics
from aikd.service.options import ServiceOptions
from aikd.service.results import select_best

__all__ = ["create_app"]

log = logging.getLogger(__name__)
ROUTES = ("/", "/static", "/healthz", "/readyz", "/metrics", "/v1/model", "/v1/quality", "/v1/select")
STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
PAGE_HEADERS = {  # the page talks to this server only, and runs only its own script
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob: mediastream:; "
                               "connect-src 'self'; style-src 'self'; script-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def create_app(options: ServiceOptions, service: QualityService | None = None) -> FastAPI:
    """The app of ``aikd serve``: loads the model now (a bad model file fails here, not at the first request).

    Args:
        options: model, limits, batching, keys.
        service: an already built :class:`QualityService` (tests); default: built from ``options``.

    Raises:
        ValueError: a model file, calibration or key file that cannot serve.
    """
    keys = ApiKeys(read_api_keys(options.api_key_file) if options.api_key_file else None)
    service = service or QualityService(options, Metrics())
    metrics = service.metrics
    assets = {name: (resources.files("aikd.service") / "static" / name).read_bytes() for name in (*STATIC,
                                                                                              "index.html")}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            await service.ready()  # warm-up: the first forward pass is the slowest
        except ServiceError as err:
            log.warning("warning: warm-up failed: %s", err.message)
        yield
        service.close()  # after uvicorn has drained the requests in flight

    app = FastAPI(title="aikd serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(_Counted, metrics=metrics)
    app.state.service = service

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, error: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "bad_request")
        metrics.errors.labels(code).inc()
        return JSONResponse(error_body(code, str(error.detail)), status_code=error.status_code)

    async def answer(request: Request, work: Callable[[], Awaitable[Response | dict[str, Any]]],
                     needs_key: bool) -> Response:
        """``work``'s answer, or the JSON of its error; the key checked first, the time limit kept."""
        try:
            if needs_key and not keys.allows(request.headers):
                raise ServiceError("unauthorized", "a valid API key is needed (Authorization: Bearer KEY or "
                                   "X-API-Key: KEY)", {"WWW-Authenticate": "Bearer"})
            result = await asyncio.wait_for(work(), options.limits.request_timeout_s)
            return result if isinstance(result, Response) else JSONResponse(result)
        except ServiceError as err:
            return _refused(err, metrics)
        except asyncio.TimeoutError:
            return _refused(ServiceError("timeout", f"no answer within {options.limits.request_timeout_s:g} s"),
                            metrics)
        except ClientDisconnect:
            return _refused(ServiceError("client_disconnected", "the client left before its request was read"),
                            metrics)
        except Exception:  # a bug: logged with its traceback here, a plain code for the client
            log.exception("%s %s failed", request.method, request.url.path)
            return _refused(ServiceError("internal", "internal error (the server's log says more)"), metrics)

    async def score(request: Request) -> tuple[list[dict[str, Any]], Any]:
        length, limit = request.headers.get("content-length"), options.limits.max_body_bytes
        check_length(length, limit)  # before a place in the queue is taken: a body too large is refused at once
        ticket = service.admit()
        try:
            body = await read_body(request.stream(), length, limit)
            uploads, request_options = parse_images(body, request.headers.get("content-type", ""),
                                                    request.query_params, options.limits)
            del body
            return await service.score(uploads, request_options, ticket), request_options
        finally:
            ticket.release()

    def scored(results: list[dict[str, Any]], **extra: Any) -> JSONResponse:
        body = {"model": service.model_record(), **extra, "results": results}
        if results and all(result["error"] is not None for result in results):
            metrics.errors.labels("no_usable_image").inc()
            return JSONResponse({"error": results[0]["error"], **body}, status_code=422)
        return JSONResponse(body)

    @app.post("/v1/quality")
    async def quality(request: Request) -> Response:
        async def work() -> Response:
            results, _ = await score(request)
            return scored(results)

        return await answer(request, work, needs_key=True)

    @app.post("/v1/select")
    async def select(request: Request) -> Response:
        async def work() -> Response:
            results, request_options = await score(request)
            return scored(results, k=request_options.k, selected=select_best(results, request_options.k))

        return await answer(request, work, needs_key=True)

    @app.get("/v1/model")
    async def model(request: Request) -> Response:
        async def work() -> dict[str, Any]:
            return {**service.model_info(), "api_key_required": keys.required}

        return await answer(request, work, needs_key=True)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz(request: Request) -> Response:
        return await answer(request, service.ready, needs_key=False)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/")
    async def page() -> Response:
        return Response(assets["index.html"], media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    @app.get("/static/{name}")
    async def static(name: str) -> Response:
        if name not in STATIC:  # a fixed set, read at start: a request never names a file on disk
            return _refused(ServiceError("not_found", "no such file"), metrics)
        return Response(assets[name], media_type=STATIC[name], headers=PAGE_HEADERS)

    return app


def _refused(error: ServiceError, metrics: Metrics) -> JSONResponse:
    metrics.errors.labels(error.code).inc()
    return JSONResponse(error_body(error.code, error.message), status_code=error.status, headers=error.headers)


class _Counted:
    """ASGI middleware: every HTTP request counted and timed by route and status (``/metrics``)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), [500]
        path = scope.get("path", "")
        route = next((r for r in ROUTES if path == r or (r == "/static" and path.startswith("/static/"))), "other")

        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted_send)
        finally:
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
