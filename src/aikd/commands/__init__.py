"""The ``aikd`` subcommands: one module per command, each with ``add_arguments(parser)`` and ``run(args) -> int``.

The convention, for every command alike: a command module turns the parsed command line into the library's
typed options (:mod:`aikd.commands.options` for what several commands share), calls the library, and
prints; everything it calls lives outside this package and never imports it. :mod:`aikd.cli` dispatches.

    detect   aikd.detect, aikd.detectors          label    aikd.labelers, aikd.models
    align    aikd.align, aikd.sources             train    aikd.train, aikd.distill, aikd.data
    score    aikd.score, aikd.inference           embed    aikd.inference
    evaluate aikd.report, aikd.evaluate           export   aikd.export
    demo     the other commands                   models   aikd.models.registry
"""
