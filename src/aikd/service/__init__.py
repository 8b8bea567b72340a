"""``aikd serve`` as a library: face quality over HTTP with dynamic batching, calibrated answers and a page.

    from aikd.service import ServiceOptions, create_app
    app = create_app(ServiceOptions(Path("best.pt")))        # a FastAPI app; run it with uvicorn

One job a module:

    options.py   the settings, each with a safe default (limits, batching, the model)
    inputs.py    a request's images and options: multipart, raw image body or JSON base64, read within limits
    core.py      the model side: decode -> (detect -> align) -> preprocess in worker threads, calibration, decision
    batching.py  the bounded queue (429 when full) and the model thread that batches faces of concurrent requests
    results.py   each image's JSON result; the best k for /v1/select
    auth.py      API keys (Bearer or X-API-Key, constant-time comparison)
    metrics.py   Prometheus metrics in a registry of the app's own
    errors.py    error codes and their HTTP status
    app.py       the routes
    static/      the page (HTML, JS, CSS), served from memory

Needs the ``serve`` extra (``pip install 'aikd[serve]'``: FastAPI, uvicorn, python-multipart, prometheus-client).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aikd.service.options import BatchOptions, Limits, ServiceOptions

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["BatchOptions", "Limits", "ServiceOptions", "create_app"]


def create_app(options: ServiceOptions) -> FastAPI:
    """The FastAPI app of ``aikd serve`` (:func:`aikd.service.app.create_app`); FastAPI loads only when one is
    built."""
    from aikd.service.app import create_app as build

    return build(options)
