"""The ``aikd`` subcommands: one module per command, each with ``add_arguments(parser)`` and ``run(args) -> int``.

The convention, for every command alike: a command module turns the parsed command line into the library's
typed options (:mod:`aikd.commands.options` for what several commands share), calls the library, and
prints; everything it calls lives outside this package and never imports it. :mod:`aikd.cli` dispatches.

    detect    aikd.detectors                    label     aikd.pipeline.labelling, aikd.labelers
    align     aikd.pipeline.crops               train     aikd.training
    score     aikd.pipeline.scoring             embed     aikd.pipeline.embedding
    evaluate  aikd.evaluation.report            calibrate aikd.evaluation.calibration
    export    aikd.inference.export, .quantize  demo      aikd.demo
    models    aikd.models.registry
"""
