"""FaceQAN: quality from how robust a face's embedding is to adversarial noise, and to a horizontal flip.

Babnik, Peer and Štruc, "FaceQAN: Face Image Quality Assessment Through Adversarial Noise Exploration", ICPR 2022;
the formula, defaults and steps of the authors' code (LSIbabnikz/FaceQAN ``src/calculate_qs.py``,
``bim_attack.py``, ``symmetry.py``, ``util.py``). With ``M`` the FR model, ``I`` a face in [0, 1] pixels (the
model normalises it inside) and ``cos`` the cosine similarity:

1. ``k`` copies ``I + U(-eps, eps)``, clamped to [-1, 1] (the reference clamps to [-1, 1], not [0, 1]);
2. ``l`` iterations of the basic iterative method (iterative FGSM) away from ``M(I)``: each embeds the copies,
   records ``cos(M(I), M(copy))``, then steps every copy by ``eps * sign(grad)`` of the cosine embedding loss
   ``mean(1 - cos)`` and clamps again. The similarities recorded are those *before* each step, so the last step's
   update is never embedded (and is not computed here);
3. the symmetry ``q_s = cos(M(I), M(flip(I)))``;
4. with ``S`` the ``l * k`` similarities (mean and population standard deviation over all of them),

       q = ( (1 + mean S) / 2  *  clip(1 - std S, 0, 1)  *  q_s ) ** p

Defaults as in the authors' code: ``eps = 0.001`` (on the [0, 1] pixel scale), ``l = 5``, ``k = 10``, ``p = 5``.
(Their ``calculate_qs.py`` takes ``-k`` and ``-p`` on its command line but does not pass them on, so 10 and 5
always apply there; here both options are honoured.)

The same similarities as the authors' one-image loop, bit for bit, so the same scores (up to the float32 rounding of
their formula; float64 here; measured: tests/test_reference_fiqa.py), in less time:
no parameter gradients (only the input's, with ``torch.autograd.grad``; the authors' ``loss.backward()`` computes
every weight's gradient too), no backward pass after the last embedding, and the face's own embedding computed once
for the attack and the symmetry. The convolutions see the batches the authors' code gives them (each face alone,
NCHW; its ``k`` copies together, channels_last), which is what makes the bits the same: FGSM steps by the *sign*
of each pixel's gradient, so a rounding difference anywhere flips near-zero signs and the iterations amplify it
(the authors' code on one thread instead of two moves its own scores by ~3e-5 relative). Two options trade that
identity for speed: ``fold=True`` folds BatchNorm (or dlib's affine layers) into the convolutions, and
``images_per_pass=M`` attacks M faces' copies in one batch (what a GPU wants); scores then agree with the authors'
to ~1e-4 relative (docs/fiqa.md has the figures).

Reproducible: the uniform noise of an image comes from a generator seeded by ``(seed, CRC-32 of its key)``
(:func:`~aikd.labelers.base.image_generator`), drawn on the CPU, and faces are attacked in passes of exactly
``images_per_pass`` images (a short last pass is padded by repeating its last face). With one face per pass (the
default) a face's score is the same bits whatever the batch size, the worker count or a resume; with several, the
same to float rounding (oneDNN rounds a sample by its position in some batch sizes). Noise may also be passed in,
which is how the reference comparison feeds the authors' code and this one the same copies. Faces are taken back to
the 8-bit pixels they were made from (``x / 255``, as the authors' ``ToTensor`` gives them) when they lie on that
grid.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aikd.labelers.base import BatchLabels, Labeler, image_generator
from aikd.preprocessing import Preprocessing

__all__ = ["FaceQan", "FaceQanOptions", "faceqan_quality"]


@dataclass(frozen=True)
class FaceQanOptions:
    """Settings of FaceQAN (the authors' defaults).

    Attributes:
        epsilon: ``eps``: spread of the uniform noise and size of each FGSM step, on the [0, 1] pixel scale.
        iterations: ``l``: iterations of the basic iterative method.
        copies: ``k``: adversarial copies of each face.
        exponent: ``p``: exponent of the quality formula.
        images_per_pass: faces attacked in one batch of ``images_per_pass * copies`` images (1: the authors'
            batches, the same bits as their code; more is faster, on GPUs much faster, and agrees to ~1e-4).
        fold: fold BatchNorm into the convolutions (faster; agrees with the authors' scores to ~1e-4).
        seed: seed of the uniform noise (with each image key).
    """

    epsilon: float = 0.001
    iterations: int = 5
    copies: int = 10
    exponent: int = 5
    images_per_pass: int = 1
    fold: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.epsilon < 1.0:
            raise ValueError(f"epsilon must be in (0, 1), got {self.epsilon}")
        if self.iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {self.iterations}")
        if self.copies < 2:
            raise ValueError(f"copies must be at least 2 (FaceQAN takes a standard deviation), got {self.copies}")
        if self.exponent < 1:
            raise ValueError(f"exponent must be at least 1, got {self.exponent}")
        if self.images_per_pass < 1:
            raise ValueError(f"images_per_pass must be at least 1, got {self.images_per_pass}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


def faceqan_quality(similarities: np.ndarray, symmetry: np.ndarray, exponent: int = 5) -> np.ndarray:
    """``((1 + mean S) / 2 * clip(1 - std S, 0, 1) * q_s) ** p`` per image, in float64.

    Args:
        similarities: (N, l, k) adversarial similarities of each image.
        symmetry: (N,) flip similarities ``q_s``.
        exponent: ``p``.
    """
    values = np.asarray(similarities, dtype=np.float64).reshape(len(similarities), -1)
    mean, std = values.mean(axis=1), values.std(axis=1)
    return ((1.0 + mean) / 2.0 * np.clip(1.0 - std, 0.0, 1.0) * np.asarray(symmetry, np.float64)) ** exponent


def _loss_per_copy(anchor: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` as ``torch.nn.CosineEmbeddingLoss`` computes it for target 1 (its 1e-12 in each squared norm)."""
    product = (anchor * embeddings).sum(dim=1)
    norms = ((anchor * anchor).sum(dim=1) + 1e-12) * ((embeddings * embeddings).sum(dim=1) + 1e-12)
    return 1.0 - product / norms.sqrt()


class FaceQan(Labeler):
    """FaceQAN labels from any registered FR backbone.

    Args:
        backbone: the FR model (copied: never modified).
        preprocessing: its input (the mean and std that map model input back to [0, 1] pixels).
        options: eps, l, k, p, batching, folding, seed.
    """

    name = "faceqan"
    columns = ("symmetry", "similarity_mean", "similarity_std")
    needs_gradients = True
    Options = FaceQanOptions

    def __init__(self, backbone: nn.Module, preprocessing: Preprocessing, options: FaceQanOptions | None = None
                 ) -> None:
        self.options = options = options or FaceQanOptions()
        self.compute_batch = options.images_per_pass  # aikd label: no padding beyond its own passes
        if options.fold:
            from aikd.models.folding import fold_batchnorm

            network = fold_batchnorm(backbone)
        else:
            network = copy.deepcopy(backbone)
        # Its own copy without parameter gradients: the attack differentiates with respect to the faces only.
        self.network = network.eval().requires_grad_(False)
        self.mean = torch.tensor(preprocessing.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocessing.std, dtype=torch.float32).view(1, 3, 1, 1)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Embeddings of faces in [0, 1] pixels (normalised here, as the authors' model does in its first layer)."""
        mean, std = self.mean.to(pixels.device), self.std.to(pixels.device)
        return self.network((pixels - mean) / std).float()

    def to_pixels(self, faces: torch.Tensor) -> torch.Tensor:
        """Model input -> [0, 1] pixels; snapped to the 8-bit grid ``x / 255`` (what the authors' ``ToTensor``
        gives) when every value lies within 1e-3 of it, as faces made from images do."""
        pixels = faces.float() * self.std.to(faces.device) + self.mean.to(faces.device)
        levels = torch.round(pixels * 255.0)
        if (pixels * 255.0 - levels).abs().max() < 1e-3:
            pixels = levels / 255.0
        return pixels

    def noise(self, keys: Sequence[str], shape: Sequence[int]) -> torch.Tensor:
        """The uniform noise U(-eps, eps) of each image: (N, k, *shape) float32, one seeded generator per key."""
        eps, copies = self.options.epsilon, self.options.copies
        out = torch.empty((len(keys), copies, *shape), dtype=torch.float32)
        for index, key in enumerate(keys):
            generator = image_generator(self.options.seed, key)
            out[index].uniform_(-eps, eps, generator=generator)
        return out

    def label_batch(self, faces: torch.Tensor, keys: Sequence[str], noise: torch.Tensor | None = None
                    ) -> BatchLabels:
        """FaceQAN of N faces (model input); ``noise`` (N, k, C, H, W) replaces the seeded noise (for tests)."""
        if self.network.training:
            self.network.eval()
        pixels = self.to_pixels(faces)
        if noise is None:
            noise = self.noise(keys, pixels.shape[1:])
        per_pass = self.options.images_per_pass
        similarities, symmetry = [], []
        for start in range(0, len(pixels), per_pass):
            stop = min(start + per_pass, len(pixels))
            pad = [stop - 1] * (start + per_pass - stop)  # a short last pass: the same batch shape, same bits
            rows = torch.tensor([*range(start, stop), *pad])
            chunk_similarities, chunk_symmetry = self.attack(pixels[rows], noise[rows].to(pixels.device))
            similarities.append(chunk_similarities[: stop - start])
            symmetry.append(chunk_symmetry[: stop - start])
        s = torch.cat(similarities).double().numpy()
        q_s = torch.cat(symmetry).double().numpy()
        flat = s.reshape(len(s), -1)
        quality = faceqan_quality(s, q_s, self.options.exponent)
        return BatchLabels(quality=quality, extras={"symmetry": q_s, "similarity_mean": flat.mean(axis=1),
                                                    "similarity_std": flat.std(axis=1)})

    def attack(self, pixels: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The adversarial similarities (M, l, k) and flip similarities (M,) of M faces in [0, 1] pixels."""
        count, copies = len(pixels), self.options.copies
        # Memory layouts as in the authors' code, so the convolutions are the same kernels and give the same bits: a
        # face from their ToTensor (HWC memory seen as CHW) runs as NCHW on its own, while the copies made from it
        # inherit channels_last (also oneDNN's faster layout for the attack's backward passes).
        pixels = pixels.contiguous()
        with torch.no_grad():  # each face alone, as the authors' attack embeds it (batch of one: the same bits)
            anchor = torch.cat([self.embed(face[None]) for face in pixels])
            flipped = torch.cat([self.embed(face[None].flip(-1)) for face in pixels])
        symmetry = F.cosine_similarity(anchor, flipped, dim=1).cpu()
        anchor = anchor.repeat_interleave(copies, dim=0)
        batch = (pixels[:, None] + noise).clamp(-1.0, 1.0).flatten(0, 1).contiguous(memory_format=torch.channels_last)
        similarities = []
        for iteration in range(self.options.iterations):
            if iteration == self.options.iterations - 1:  # its update would never be embedded
                with torch.no_grad():
                    similarities.append(F.cosine_similarity(anchor, self.embed(batch), dim=1))
                break
            batch.requires_grad_(True)
            embeddings = self.embed(batch)
            similarities.append(F.cosine_similarity(anchor, embeddings.detach(), dim=1))
            loss = _loss_per_copy(anchor, embeddings).view(count, copies).mean(dim=1).sum()
            (gradient,) = torch.autograd.grad(loss, batch)
            with torch.no_grad():
                batch = (batch + self.options.epsilon * gradient.sign()).clamp(-1.0, 1.0)
        stacked = torch.stack(similarities).view(len(similarities), count, copies).permute(1, 0, 2)
        return stacked.cpu(), symmetry
