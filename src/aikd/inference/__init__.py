"""Running a trained model: the inference engines, the Python scoring API, ONNX export and int8 quantisation.

    engine.py    the torch and onnxruntime engines behind one interface (device, folding, precision)
    scorer.py    :func:`score_images`, the Python API over the same engine as ``aikd score``
    export.py    ONNX export and its parity check
    quantize.py  static int8 quantisation of an exported graph, its agreement measured

Nothing here imports torch at module level: a process that scores an exported graph runs without it.
"""
