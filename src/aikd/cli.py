"""The ``aikd`` command line: one console script, one subcommand per job.

Each subcommand lives in its own module of :mod:`aikd.commands`, which provides ``add_arguments(parser)`` and
``run(args) -> int``. Only the chosen subcommand's module is imported (:func:`command_module`, plain imports), so
``aikd --help`` and ``aikd evaluate`` never pay for torch start-up.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from aikd.version import __version__

# name -> one-line help. The order is the order of a typical workflow.
COMMANDS: dict[str, str] = {
    "detect": "find faces and their 5 landmarks in photos -> landmarks.csv",
    "align": "write 112x112 aligned (or deliberately misaligned) face crops",
    "label": "make quality labels with a training-free FIQA technique",
    "train": "distil a FIQA technique into an alignment-invariant quality model (AI-KD)",
    "score": "score face images of any alignment -> scores.csv",
    "embed": "face-recognition embeddings of images -> emb.npz",
    "evaluate": "ERC/EDC curves, pAUC tables and plots for FIQA methods",
    "calibrate": "map quality scores to expected FNMR at an FMR -> calib.json",
    "export": "export a quality model to ONNX and check parity",
    "serve": "face quality over HTTP: batched, calibrated, with a page to try it",
    "demo": "AI-KD on dlib's real face recogniser and sample photos, with a report",
    "models": "list the registered model architectures",
}


def command_module(name: str) -> ModuleType:
    """The module of subcommand ``name`` (``aikd.commands.NAME``), imported now and only now."""
    if name == "detect":
        from aikd.commands import detect as module
    elif name == "align":
        from aikd.commands import align as module
    elif name == "label":
        from aikd.commands import label as module
    elif name == "train":
        from aikd.commands import train as module
    elif name == "score":
        from aikd.commands import score as module
    elif name == "embed":
        from aikd.commands import embed as module
    elif name == "evaluate":
        from aikd.commands import evaluate as module
    elif name == "calibrate":
        from aikd.commands import calibrate as module
    elif name == "export":
        from aikd.commands import export as module
    elif name == "serve":
        from aikd.commands import serve as module
    elif name == "demo":
        from aikd.commands import demo as module
    elif name == "models":
        from aikd.commands import models as module
    else:
        raise ValueError(f"unknown command {name!r}")
    return module

EXIT_CODES = """exit status:
  0  everything done
  1  finished, but some inputs failed (see the .errors.csv file next to the output);
     for train: the loss stayed NaN/inf (the last good checkpoint is kept)
  2  usage error or unreadable configuration/input; nothing was done
  3  stopped on an error while working (disk full, an unwritable folder, an unexpected failure);
     what was done is kept: fix the cause and run again with --resume
  130  interrupted (Ctrl-C); what was done is kept: --resume continues"""

EXIT_USAGE, EXIT_STOPPED, EXIT_INTERRUPTED = 2, 3, 130
# Commands that decode photos in several threads.
DECODING_COMMANDS = frozenset({"detect", "align", "label", "score", "embed", "export", "demo", "serve"})


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """Parser with every subcommand listed; only ``selected`` gets its full argument set."""
    parser = argparse.ArgumentParser(
        prog="aikd",
        description="Alignment-invariant face image quality assessment (AI-KD).",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"aikd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        sub_parser = sub.add_parser(
            name, help=help_text, description=help_text, epilog=EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if name == selected:
            command_module(name).add_arguments(sub_parser)
    return parser


class _StderrHandler(logging.Handler):
    """The library's warnings as plain lines on the standard error stream of the moment."""

    def emit(self, record: logging.LogRecord) -> None:
        _say(self.format(record))


def _say(text: str) -> None:
    """Print to stderr; names that are not UTF-8 (surrogate escapes) are shown as backslash escapes."""
    print(text.encode("utf-8", "backslashreplace").decode("utf-8"), file=sys.stderr)


def _show_warnings() -> None:
    library = logging.getLogger("aikd")
    if not any(isinstance(handler, _StderrHandler) for handler in library.handlers):
        library.addHandler(_StderrHandler(logging.WARNING))
        library.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``aikd`` and ``python -m aikd``; returns the exit status."""
    try:
        code = _main(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()  # here, not at exit: a reader that went away (``aikd models | head -1``) is seen now
        return code
    except BrokenPipeError:
        # The reader of our output stopped reading: nothing failed here. Point stdout at /dev/null so the
        # interpreter's own flush at exit does not complain again.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: list[str]) -> int:
    selected = next((arg for arg in argv if not arg.startswith("-")), None)
    parser = build_parser(selected if selected in COMMANDS else None)
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version, usage errors: keep main() callable in-process
        return int(stop.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    module = command_module(args.command)
    _show_warnings()
    if args.command in DECODING_COMMANDS:  # process-wide settings belong to the entry point, not the library
        from aikd.images import use_large_image_blocks

        use_large_image_blocks()
    try:
        return int(module.run(args) or 0)
    except BrokenPipeError:
        raise
    except KeyboardInterrupt:
        _say(f"aikd {args.command}: interrupted")
        return EXIT_INTERRUPTED
    except (ValueError, ImportError, FileNotFoundError, PermissionError, IsADirectoryError) as err:
        # Bad input reaches the user as one clear line naming the file or field, not a traceback.
        _say(f"aikd {args.command}: error: {err}")
        return EXIT_USAGE
    except OSError as err:  # disk full, I/O error, ... while working: say what and where, keep the rest
        where = f" ({err.filename})" if err.filename else ""
        _say(f"aikd {args.command}: error: {err.strerror or err}{where}; what was done is kept: fix the cause "
             "and run the same command again with --resume")
        return EXIT_STOPPED
    except Exception as err:
        if os.environ.get("AIKD_DEBUG"):
            raise
        _say(f"aikd {args.command}: error: unexpected failure: {type(err).__name__}: {err} (set AIKD_DEBUG=1 "
             "to see where; what was done is kept: --resume continues)")
        return EXIT_STOPPED
