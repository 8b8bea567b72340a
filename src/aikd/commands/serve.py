"""``aikd serve``: face quality over HTTP, with dynamic batching and a page to try it in a browser.

    aikd serve --checkpoint best.pt                          # http://127.0.0.1:8000/ (the page), POST /v1/quality
    aikd serve --checkpoint model.int8.onnx --detect --calibration calib.json --reject-above 0.05
    aikd serve --checkpoint best.pt --host 0.0.0.0 --api-key-file keys.txt   # reachable by others: keys required

The model options are ``aikd score``'s, so the same image with the same options gets the same quality. The work is
the library's (:mod:`aikd.service`); this module parses the command line, makes the process-wide settings and runs
uvicorn. SIGTERM or Ctrl-C stops taking connections, answers the requests in flight, and exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from aikd.commands.options import (
    add_crop_arguments,
    add_inference_arguments,
    count,
    crop_options,
    inference_options,
)
from aikd.service.options import BatchOptions, Limits, MiB, ServiceOptions

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``aikd serve``."""
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="quality model: an aikd checkpoint, the AI-KD release (aikd-best.pth), or an ONNX file "
                             "written by aikd export (fp32 or int8)")
    parser.add_argument("--arch", help="backbone architecture when the checkpoint does not record it (e.g. r100)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s, this machine only; 0.0.0.0 exposes it: "
                             "use --api-key-file)")
    parser.add_argument("--port", type=count(0, 65_535), default=8000,
                        help="port (default: %(default)s; 0: any free port)")
    parser.add_argument("--calibration", type=Path, metavar="JSON",
                        help="add expected_fnmr and quality_100 to every face (a calibrated model adds them without "
                             "it)")
    parser.add_argument("--reject-above", type=float, metavar="FNMR",
                        help="decision: reject faces whose expected FNMR is above this (default: the calibration's "
                             "recommended reject threshold, if it has one)")
    parser.add_argument("--api-key-file", type=Path, metavar="FILE",
                        help="require one of the keys in FILE (one a line) on /v1/* (Authorization: Bearer KEY or "
                             "X-API-Key: KEY)")
    limits, batching = Limits(), BatchOptions()
    group = parser.add_argument_group("limits and batching")
    group.add_argument("--max-body-mb", type=float, default=limits.max_body_bytes / MiB,
                       help="request body size (default: %(default)s MB)")
    group.add_argument("--max-images", type=count(1, 10_000), default=limits.max_images,
                       help="images per request (default: %(default)s)")
    group.add_argument("--max-pixels", type=count(1, 1_000_000_000), default=limits.max_pixels,
                       help="decoded pixels per image (decompression bombs; default: %(default)s)")
    group.add_argument("--request-timeout", type=float, default=limits.request_timeout_s, metavar="SECONDS",
                       help="time from a request's arrival to its answer (default: %(default)s)")
    group.add_argument("--max-wait-ms", type=float, default=batching.max_wait_ms,
                       help="how long a forward pass waits for faces other requests are still preparing "
                            "(default: %(default)s)")
    group.add_argument("--queue-size", type=count(1, 100_000), default=batching.queue_size,
                       help="requests held at once; one more is answered 429 (default: %(default)s)")
    group.add_argument("--model-threads", type=count(1, 64), default=batching.model_threads,
                       help="forward passes at once, each on its own batch; torch then runs each pass on cores / N "
                            "threads (default: %(default)s)")
    add_crop_arguments(parser)
    # --batch-size: faces per forward pass at most; --workers: preparing threads; no --resume or --overwrite
    add_inference_arguments(parser, files=False)


def service_options(args: argparse.Namespace) -> ServiceOptions:
    """The :class:`~aikd.service.options.ServiceOptions` of the command line."""
    if args.landmarks:  # aikd score's crop options, but a landmarks file names files, and requests send images
        raise ValueError("--landmarks is for file jobs; aikd serve takes images in requests (--detect finds faces)")
    crop = crop_options(args)
    limits = Limits(int(args.max_body_mb * MiB), args.max_images, args.max_pixels, args.request_timeout)
    batching = BatchOptions(args.max_wait_ms, args.queue_size, args.workers, args.model_threads)
    return ServiceOptions(args.checkpoint, args.arch, inference_options(args), crop.detect, crop.detector,
                          crop.detect_threshold, crop.misalign, crop.seed, args.calibration, args.reject_above,
                          args.api_key_file, limits, batching)


def run(args: argparse.Namespace) -> int:
    """``aikd serve``: runs until SIGTERM or Ctrl-C; 0 after a clean drain."""
    # The model threads share the cores with the event loop and the worker threads: OpenMP threads that spin-wait
    # between forward passes would take their CPU. Unless the user chose otherwise, they sleep (read when torch loads,
    # which has not happened yet).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import uvicorn

    from aikd.service.app import create_app

    options = service_options(args)
    if not _loopback(args.host) and options.api_key_file is None:
        print(f"aikd serve: warning: {args.host} lets other machines in and no --api-key-file is given: anyone who "
              "reaches this port can use it", file=sys.stderr, flush=True)
    if options.inference.device_backend(options.checkpoint) == "torch":
        import torch

        from aikd.runtime import available_cores, use_fastest_convolutions

        use_fastest_convolutions()
        if options.batching.model_threads > 1:  # the cores shared by the passes that run at once
            torch.set_num_threads(max(1, available_cores() // options.batching.model_threads))
    app = create_app(options)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info", server_header=False,
                            timeout_graceful_shutdown=int(options.limits.request_timeout_s) + 5)
    server = uvicorn.Server(config)
    sock = config.bind_socket()
    host, port = sock.getsockname()[:2]
    print(f"aikd serve: {args.checkpoint.name} on http://{_url_host(host)}:{port}/ (the page); POST /v1/quality",
          file=sys.stderr, flush=True)
    # uvicorn re-raises the signal that stopped it once it has drained; handlers of ours make that a clean exit.
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, lambda *_: None)
    server.run(sockets=[sock])
    print("aikd serve: stopped", file=sys.stderr, flush=True)
    return 0


def _loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
