"""SER-FIQ: quality from how stable a face's embedding stays across random subnetworks of the FR model.

Terhörst, Kolf, Damer, Kirchbuchner and Kuijper, "SER-FIQ: Unsupervised Estimation of Face Image Quality
Based on Stochastic Embedding Robustness", CVPR 2020. ``T`` forward passes with dropout active before the
embedding layer give embeddings ``x_1 .. x_T``; with ``d`` the mean Euclidean distance between the
L2-normalised embeddings over the ``T(T-1)/2`` pairs ``i < j``,

    q = 2 * sigmoid(-d) = 2 / (1 + exp(d))                 in (0, 1]; 1 when all T embeddings coincide.

The authors' code (pterhoer/FaceImageQuality, ``face_image_quality.py``) averages exactly these pairs (the
upper triangle of the distance matrix), and its ``get_score`` then stretches the narrow range ArcFace gives,

    q' = sigmoid(alpha * (q - r)),    alpha = 130, r = 0.88,

which ``rescale=True`` applies (``quality`` is then q' and q is kept in the ``serfiq_raw`` column). Those
two constants were fitted to the authors' ArcFace model: with another model q' may sit at 0 or 1.

Defaults are the authors': ``T = 100`` passes and dropout ``p = 0.5`` on the input of the embedding layer
(their first release applies Keras ``Dropout(0.5)`` to the 25088-D flattened feature map before ArcFace's
``fc1``; this is the same place as the ``dropout`` of an insightface iResNet). Their README adds that the FR
model should have been trained with dropout for the estimate to be accurate.

Only the embedding head (dropout -> fc -> BatchNorm1d) is stochastic, so the trunk runs once per image
and the head ``T`` times on the cached trunk output, the ``T`` passes of several images in one matrix
product. For iResNet-100 the ``T = 100`` head passes cost 25088 x 512 x 100 = 1.3 GMAC per face, about a
tenth of one trunk pass (12.1 GMAC).

Dropout masks are drawn from a :class:`torch.Generator` seeded by ``(seed, CRC-32 of the image key)``, so
an image's quality does not depend on the batch it falls in, on resuming, or on sharding. Masks may also
be passed in, which is how the tests compare against a plain loop of full forward passes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aikd.labelers.base import BatchLabels, Labeler, image_generator

__all__ = ["SerFiq", "SerFiqOptions", "dropout_masks", "mean_pairwise_distance", "serfiq_quality"]

MAX_ELEMENTS = 1 << 24  # masked trunk copies held at once (64 MB of float32); bounds the memory of a batch


@dataclass(frozen=True)
class SerFiqOptions:
    """Settings of SER-FIQ.

    Attributes:
        passes: ``T``, stochastic forward passes per image (100 in the paper and its code).
        dropout: ``p``, dropout probability before the embedding layer (0.5 in the authors' code).
        rescale: report ``sigmoid(alpha * (q - r))`` as the quality (the authors' ``get_score``).
        alpha: stretch of the rescaling (130 in the authors' code).
        r: centre of the rescaling (0.88 in the authors' code).
        seed: seed of the dropout masks (with each image key).
    """

    passes: int = 100
    dropout: float = 0.5
    rescale: bool = False
    alpha: float = 130.0
    r: float = 0.88
    seed: int = 0

    def __post_init__(self) -> None:
        if self.passes < 2:
            raise ValueError(f"--passes must be at least 2 (SER-FIQ compares pairs of passes), got {self.passes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not (math.isfinite(self.alpha) and math.isfinite(self.r)):
            raise ValueError(f"--rescale-alpha and --rescale-r must be finite, got {self.alpha}, {self.r}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")


def dropout_masks(keys: Sequence[str], features: int, options: SerFiqOptions,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Keep-masks (N, T, features), bool, each unit kept with probability ``1 - p``, one generator per key."""
    masks = torch.empty((len(keys), options.passes, features), dtype=torch.bool, device=device)
    for index, key in enumerate(keys):
        uniform = torch.rand((options.passes, features), generator=image_generator(options.seed, key, device),
                             device=device)
        torch.ge(uniform, options.dropout, out=masks[index])
    return masks


def mean_pairwise_distance(embeddings: torch.Tensor) -> torch.Tensor:
    """Mean Euclidean distance between the L2-normalised embeddings of each image over its T(T-1)/2 pairs.

    Args:
        embeddings: (N, T, D) stochastic embeddings.

    Returns:
        (N,) float64. Computed from the Gram matrix in float64: |a - b| = sqrt(2 - 2 a.b) for unit vectors.
    """
    unit = F.normalize(embeddings.double(), dim=-1)
    gram = unit @ unit.transpose(1, 2)
    first, second = torch.triu_indices(unit.shape[1], unit.shape[1], offset=1, device=unit.device)
    squared = (2.0 - 2.0 * gram[:, first, second]).clamp_min(0.0)
    return squared.sqrt().mean(dim=1)


def serfiq_quality(distance: torch.Tensor | np.ndarray, options: SerFiqOptions | None = None) -> np.ndarray:
    """``q = 2 sigmoid(-d)``, then ``sigmoid(alpha (q - r))`` if ``options.rescale``; float64 numpy."""
    quality = 2.0 / (1.0 + np.exp(np.asarray(torch.as_tensor(distance).cpu(), dtype=np.float64)))
    if options is not None and options.rescale:
        quality = 1.0 / (1.0 + np.exp(-options.alpha * (quality - options.r)))
    return quality


class SerFiq(Labeler):
    """SER-FIQ labels from an FR backbone that is split into trunk and embedding head (an aikd iResNet).

    Args:
        backbone: with ``forward_trunk`` and ``forward_embedding_from_trunk``; used in eval mode (running
            BatchNorm statistics), its own dropout off: the masks here are the only dropout.
        options: T, p, rescaling, seed.
    """

    name = "serfiq"
    Options = SerFiqOptions

    def __init__(self, backbone: nn.Module, options: SerFiqOptions | None = None) -> None:
        if not (hasattr(backbone, "forward_trunk") and hasattr(backbone, "forward_embedding_from_trunk")):
            raise ValueError(f"SER-FIQ needs a backbone with forward_trunk/forward_embedding_from_trunk (an aikd "
                             f"IResNet), got {type(backbone).__name__}")
        self.backbone = backbone.eval()
        self.options = options = options or SerFiqOptions()
        self.columns = ("serfiq_raw", "mean_distance") if options.rescale else ("mean_distance",)

    def stochastic_embeddings(self, trunk: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Embedding head on ``trunk`` (N, F) under keep-masks (N, T, F): (N, T, D) embeddings."""
        count, passes, features = masks.shape
        kept = trunk[:, None, :] * masks.to(trunk.dtype) * (1.0 / (1.0 - self.options.dropout))
        embeddings = self.backbone.forward_embedding_from_trunk(kept.reshape(count * passes, features))
        return embeddings.reshape(count, passes, -1)

    @torch.inference_mode()
    def label_batch(self, faces: torch.Tensor, keys: Sequence[str], masks: torch.Tensor | None = None
                    ) -> BatchLabels:
        """SER-FIQ of N faces; ``masks`` (N, T, F) replaces the seeded dropout masks (for tests)."""
        if self.backbone.training:
            self.backbone.eval()
        trunk = self.backbone.forward_trunk(faces)
        features = trunk.shape[1]
        if masks is not None and masks.shape != (len(faces), self.options.passes, features):
            raise ValueError(f"masks must be (N, T, F) = {(len(faces), self.options.passes, features)}, "
                             f"got {tuple(masks.shape)}")
        chunk = max(1, MAX_ELEMENTS // (self.options.passes * features))
        distance = torch.empty(len(faces), dtype=torch.float64)
        for start in range(0, len(faces), chunk):
            stop = min(start + chunk, len(faces))
            chunk_masks = (masks[start:stop].to(trunk.device) if masks is not None
                           else dropout_masks(keys[start:stop], features, self.options, trunk.device))
            embeddings = self.stochastic_embeddings(trunk[start:stop], chunk_masks)
            distance[start:stop] = mean_pairwise_distance(embeddings).cpu()
        raw = serfiq_quality(distance)
        extras = {"mean_distance": distance.numpy()}
        if not self.options.rescale:
            return BatchLabels(quality=raw, extras=extras)
        return BatchLabels(quality=serfiq_quality(distance, self.options), extras={"serfiq_raw": raw, **extras})
