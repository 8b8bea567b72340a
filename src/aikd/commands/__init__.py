"""The ``aikd`` subcommands: one module per command, each with ``add_arguments(parser)`` and ``run(args) -> int``.

The convention, for every command alike: a command module turns the parsed command line into the library's
typed options (:mod:`aikd.commands.options` for what several commands share), calls the library, and
prints; everything it calls lives outside this package and never imports it. :mod:`aikd.cli` dispatches.

    detect   aikd.detectors, aikd.detectors          label    aikd.labelers, aikd.models
    align    aikd.align, aikd.pipeline.crops             train    aikd.training.train, aikd.training.distill, aikd.training.data
    score    aikd.inference.scorer, aikd.inference.engine           embed    aikd.inference.engine
    evaluate aikd.evaluation.report, aikd.evaluation.metrics           export   aikd.inference.export
    demo     the other commands                   models   aikd.models.registry
"""
