"""Real face photos that installed packages ship: what the demo, the benchmarks and the parity checks run on.

- ``astronaut``: Eileen Collins, scikit-image ``skimage.data.astronaut()`` (512x512, NASA, public domain);
- ``grace_hopper``: matplotlib's sample ``grace_hopper.jpg`` (512x600, public domain);
- ``lfw_NNN``: the 100 faces of scikit-image's ``lfw_subset()`` (Labeled Faces in the Wild, 25x25 grayscale
  tight crops), enlarged and framed by :func:`lfw_subset_faces` so that detectors find them: low-resolution
  cases. LFW does not say who they are here; a few of the 100 may show the same person.

Nothing is downloaded: both packages install these files with themselves.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["LFW_SUBSET_FACES", "lfw_subset_faces", "sample_photos"]

LFW_SUBSET_FACES = 100  # lfw_subset(): 100 faces, then 100 patches without a face


def sample_photos() -> dict[str, np.ndarray]:
    """The astronaut and (where matplotlib is installed) Grace Hopper, RGB uint8."""
    from skimage import data

    photos = {"astronaut": data.astronaut()}
    try:
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
            encoded = np.frombuffer(handle.read(), np.uint8)
        photos["grace_hopper"] = np.ascontiguousarray(cv2.imdecode(encoded, cv2.IMREAD_COLOR)[:, :, ::-1])
    except (ImportError, OSError):  # matplotlib is an optional extra
        pass
    return photos


def lfw_subset_faces(count: int = LFW_SUBSET_FACES, scale: int = 5, border: int = 60) -> dict[str, np.ndarray]:
    """The first ``count`` faces of scikit-image's ``lfw_subset()`` as RGB uint8 photos, keyed ``lfw_000`` ...

    Each 25x25 grayscale crop is enlarged ``scale`` times (bicubic) and framed by ``border`` pixels of its edge
    colours, because the crops end at the face and detectors need some surroundings to find one.
    """
    from skimage import data

    if not 0 <= count <= LFW_SUBSET_FACES:
        raise ValueError(f"lfw_subset holds {LFW_SUBSET_FACES} faces, {count} were asked for")
    faces = {}
    for index, face in enumerate(data.lfw_subset()[:count]):
        gray = np.clip(np.rint(face * 255.0), 0, 255).astype(np.uint8)
        side = gray.shape[0] * scale
        large = cv2.resize(gray, (side, side), interpolation=cv2.INTER_CUBIC)
        framed = cv2.copyMakeBorder(large, border, border, border, border, cv2.BORDER_REPLICATE)
        faces[f"lfw_{index:03d}"] = np.repeat(framed[:, :, None], 3, axis=2)
    return faces
