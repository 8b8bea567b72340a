"""Faces/s of every labelling technique against a one-image reference loop of its authors' code, same model, one run.

    PYTHONPATH=src python bench/labelers.py                      # 32 LFW faces, 2 interleaved rounds
    PYTHONPATH=src python bench/labelers.py --faces 16 --rounds 3 --techniques faceqan grafiqs

Each technique runs on the same faces and model as its reference loop, the two interleaved ``--rounds`` times (the
machine is shared: the best round of each is kept, and the load average is printed); the scores of both are
compared (``max rel diff``). Faces: real low-resolution LFW faces (scikit-image's ``lfw_subset``), in identities of
four for the set techniques. Models: dlib's ResNet (``dlib-r29``, real weights) where the technique runs on it,
otherwise seeded random weights with calibrated BatchNorm (GraFIQs needs BatchNorm statistics: iResNet-18; the
quality-model labels: eDifFIQA(T)'s MobileFaceNet).

The reference loops, written here from the authors' code, one image at a time as theirs run:

    serfiq      pterhoer/FaceImageQuality: the T = 100 dropout passes as a batch of T copies through the whole
                network, then the mean pairwise distance (same dropout masks as aikd's)
    magnitude   MagFace gen_feat.py: the embedding norm, one forward per image
    certainty   one forward per image, then each image's own loop over the identity centres (CR-FIQA computes the
                ratio inside training; there is no offline loop of theirs)
    faceqan     LSIbabnikz/FaceQAN: BIM with loss.backward() (weight gradients included), symmetry, F (same noise)
    grafiqs     jankolf/GraFIQs extract_grafiqs.py: BatchNorm hooks and autograd.grad, one image per pass
    sddfiqa     Tencent/TFace gen_pseudo_labels.py: per image and round, Python loops, np.dot per pair and scipy's
                wasserstein_distance (the set pass from embeddings; both sides embed the same way)
    checkpoint  eDifFIQA inference.py: the quality model as stored (not folded, NCHW), one forward per image

The first line describes the CPU; then a table; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from aikd.runtime import describe_cpu

TECHNIQUES = ("serfiq", "magnitude", "certainty", "faceqan", "faceqan-fast", "grafiqs", "sddfiqa", "checkpoint")


def lfw_faces(count: int, size: int) -> np.ndarray:
    """``count`` LFW faces (scikit-image) as ``size`` x ``size`` RGB uint8 crops."""
    import cv2

    from aikd.demo.samples import lfw_subset_faces

    faces = lfw_subset_faces(min(count, 100)).values()
    crops = [cv2.resize(face[50:-50, 50:-50], (size, size), interpolation=cv2.INTER_AREA) for face in faces]
    return np.stack([crops[i % len(crops)] for i in range(count)])


def random_model(name: str) -> torch.nn.Module:
    from aikd.models import build_backbone, calibrate_batchnorm

    torch.manual_seed(0)
    return calibrate_batchnorm(build_backbone(name), batches=2, batch_size=8).eval()


# ------------------------------------------------------------------------------------------ reference loops
def serfiq_reference(backbone, faces, masks, dropout=0.5) -> np.ndarray:
    """T copies of each face through the whole network, the dropout masks applied before the embedding layer."""
    out = []
    with torch.no_grad():
        for face, mask in zip(faces, masks, strict=True):
            copies = face[None].expand(len(mask), *face.shape).contiguous()
            trunk = backbone.forward_trunk(copies)
            embeddings = F.normalize(backbone.forward_embedding_from_trunk(trunk * mask / (1 - dropout)).double())
            distances = torch.cdist(embeddings, embeddings)
            first, second = torch.triu_indices(len(mask), len(mask), 1)
            out.append(2 / (1 + np.exp(float(distances[first, second].mean()))))
    return np.array(out)


def per_image(function: Callable[[torch.Tensor], float]) -> Callable[[torch.Tensor], np.ndarray]:
    return lambda faces: np.array([function(face[None]) for face in faces])


def certainty_reference(embeddings: np.ndarray, identities: Sequence[str]) -> np.ndarray:
    """Each image: its leave-one-out own centre and the nearest other centre, in a Python loop."""
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    names = sorted(set(identities))
    sums = {name: unit[[i for i, n in enumerate(identities) if n == name]].sum(0) for name in names}
    out = []
    for vector, identity in zip(unit, identities, strict=True):
        own = sums[identity] - vector
        ccs = float(vector @ own / np.linalg.norm(own))
        nnccs = max(float(vector @ sums[n] / np.linalg.norm(sums[n])) for n in names if n != identity)
        out.append(ccs / (nnccs + 1 + 1e-9))
    return np.array(out)


def faceqan_reference(backbone, preprocessing, faces, noise, eps=0.001, iterations=5) -> np.ndarray:
    """The authors' __calculate_score_single__: BIM (loss.backward() with weight gradients), symmetry, F."""
    mean = torch.tensor(preprocessing.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(preprocessing.std, dtype=torch.float32).view(3, 1, 1)
    model = lambda x: backbone((x - mean) / std)  # noqa: E731  (their Normalize layer, then the model)
    backbone.requires_grad_(True)
    out = []
    for face, face_noise in zip(faces, noise, strict=True):
        image = torch.round((face * std + mean) * 255) / 255  # ToTensor: the 8-bit pixels / 255
        image = image.permute(1, 2, 0).contiguous().permute(2, 0, 1)  # ToTensor's HWC memory seen as CHW
        batch = torch.clamp(image + face_noise, -1.0, 1.0)
        base = model(image.unsqueeze(0))
        similarities = []
        for _ in range(iterations):
            batch.requires_grad = True
            embeddings = model(batch)
            loss = torch.nn.CosineEmbeddingLoss()(base, embeddings, torch.Tensor([1]))
            backbone.zero_grad()
            loss.backward()
            batch = torch.clamp(batch + eps * batch.grad.data.sign(), -1.0, 1.0).detach()
            base = base.detach()
            similarities.append(F.cosine_similarity(base, embeddings.detach()).numpy())
        both = model(torch.stack([image, image.flip(-1)])).detach()
        symmetry = F.cosine_similarity(both[:1], both[1:]).item()
        out.append(((1 + np.mean(similarities)) / 2 * np.clip(1 - np.std(similarities), 0, 1) * symmetry) ** 5)
    backbone.requires_grad_(False)
    return np.array(out, dtype=np.float64)


def grafiqs_reference(backbone, faces) -> np.ndarray:
    """The authors' BN_Model hooks and extraction loop, one face per forward; the image variant."""
    norms = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    out = []
    stats: list = []

    def hook(module, inputs, output) -> None:  # BN_Model.hook_fn_forward
        stats.append((inputs[0].mean([0, 2, 3]), inputs[0].var([0, 2, 3], unbiased=False), module))

    for face in faces:
        stats.clear()
        hooks = [norm.register_forward_hook(hook) for norm in norms]
        image = face[None].clone().requires_grad_(True)
        backbone(image)
        loss = torch.zeros(1)
        for mean, var, module in stats:
            loss += F.mse_loss(mean, module.running_mean) + F.mse_loss(var, module.running_var)
        (gradient,) = torch.autograd.grad(loss / len(stats), [image])
        out.append(-float(gradient.abs().sum()))
        for handle in hooks:
            handle.remove()
    return np.array(out)


def sdd_reference(embeddings: np.ndarray, identities: Sequence[str], seed: int, rounds=12, pairs=24) -> np.ndarray:
    """gen_pseudo_labels.py's loops (np.dot per pair, scipy's wasserstein_distance per image), seeded."""
    from scipy.stats import wasserstein_distance

    rng = random.Random(seed)
    cos = lambda a, b: np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))  # noqa: E731
    people = sorted(set(identities))
    index_of = {p: [i for i, v in enumerate(identities) if v == p] for p in people}
    scores = np.zeros((len(identities), rounds))
    for r in range(rounds):
        positive, negative = {}, {}
        for person in people:
            for i in index_of[person]:
                others = [j for j in index_of[person] if j != i]
                rng.shuffle(others)
                positive[i] = [cos(embeddings[i], embeddings[j]) for j in others[:pairs]]
        names = list(range(len(identities)))
        rng.shuffle(names)
        for person in people:
            for i in index_of[person]:
                chosen = []
                while len(chosen) < pairs:
                    j = names[rng.randint(0, len(names) - 1)]
                    if j in chosen or identities[j] == person:
                        continue
                    chosen.append(j)
                negative[i] = [cos(embeddings[i], embeddings[j]) for j in chosen]
        order = [i for p in people for i in index_of[p]]
        w = np.array([wasserstein_distance(positive[i], negative[i]) for i in order])
        w = (w - w.min()) / (w.max() - w.min()) * 100
        scores[order, r] = (w - w.min()) / (w.max() - w.min()) * 100
    return scores.mean(axis=1)


# ---------------------------------------------------------------------------------------------------- setups
def _identities(count: int) -> list[str]:
    return [f"id{i // 4:02d}" for i in range(count)]


def _setup(technique: str, count: int) -> tuple[str, Callable[[], np.ndarray], Callable[[], np.ndarray]]:
    """(model name, aikd's labelling, the reference loop) of one technique on ``count`` faces."""
    from aikd.labelers.certainty import CertaintyRatio
    from aikd.labelers.faceqan import FaceQan, FaceQanOptions
    from aikd.labelers.grafiqs import Grafiqs
    from aikd.labelers.magnitude import Magnitude
    from aikd.labelers.quality_model import QualityModelLabels
    from aikd.labelers.sddfiqa import SddOptions, sdd_pseudo_labels
    from aikd.labelers.serfiq import SerFiq, SerFiqOptions, dropout_masks
    from aikd.models import load_fr_model

    keys = [f"{identity}/{i}.png" for i, identity in enumerate(_identities(count))]
    if technique == "grafiqs":
        backbone, preprocessing = random_model("r18"), None
        faces = _inputs(count, 112)
        return "r18 (random)", lambda: Grafiqs(backbone).label_batch(faces, keys).quality, \
            lambda: grafiqs_reference(backbone, faces)
    if technique == "checkpoint":
        from aikd.models.released import get_quality_spec

        torch.manual_seed(0)
        from aikd.models import calibrate_batchnorm

        model = calibrate_batchnorm(get_quality_spec("ediffiqa-t").build(), batches=2, batch_size=8).eval()
        faces = _inputs(count, 112)
        labeler = QualityModelLabels(model)
        with torch.no_grad():
            reference = per_image(lambda x: float(model(x)[1]))
        return "ediffiqa-t (random)", lambda: labeler.label_batch(faces, keys).quality, \
            lambda: _no_grad(reference, faces)
    fr = load_fr_model("dlib")
    backbone, preprocessing = fr.backbone.requires_grad_(False), fr.preprocessing
    faces = _inputs(count, preprocessing.input_size[0], preprocessing)
    if technique == "serfiq":
        labeler = SerFiq(backbone, SerFiqOptions())
        masks = dropout_masks(keys, 256, labeler.options)
        return "dlib-r29", lambda: labeler.label_batch(faces, keys).quality, \
            lambda: serfiq_reference(backbone, faces, masks.float())
    if technique == "magnitude":
        return "dlib-r29", lambda: Magnitude(backbone).label_batch(faces, keys).quality, \
            lambda: _no_grad(per_image(lambda x: float(torch.linalg.vector_norm(backbone(x)))), faces)
    if technique.startswith("faceqan"):
        options = FaceQanOptions(fold=True, images_per_pass=4) if technique == "faceqan-fast" else FaceQanOptions()
        labeler = FaceQan(backbone, preprocessing, options)
        noise = labeler.noise(keys, faces.shape[1:])
        return "dlib-r29", lambda: labeler.label_batch(faces, keys, noise=noise).quality, \
            lambda: faceqan_reference(backbone, preprocessing, faces, noise)
    identities = _identities(count)
    if technique == "certainty":
        labeler = CertaintyRatio(backbone)

        def ours() -> np.ndarray:
            return labeler.label_set(keys, labeler.label_batch(faces, keys).embeddings).quality

        def theirs() -> np.ndarray:
            with torch.no_grad():
                embeddings = np.concatenate([backbone(face[None]).numpy() for face in faces])
            return certainty_reference(embeddings.astype(np.float64), identities)

        return "dlib-r29", ours, theirs
    with torch.no_grad():
        embeddings = backbone(faces).double().numpy()
    pairs = min(24, count - 4)  # negatives come from the other identities (of four faces each)
    return "dlib-r29 (set pass)", \
        lambda: sdd_pseudo_labels(embeddings, identities, SddOptions(pairs=pairs, seed=1)).quality, \
        lambda: sdd_reference(embeddings, identities, seed=1, pairs=pairs)


def _inputs(count: int, size: int, preprocessing=None) -> torch.Tensor:
    from aikd.preprocessing import Preprocessing

    return (preprocessing or Preprocessing()).to_tensor(list(lfw_faces(count, size)))


def _no_grad(function: Callable[[torch.Tensor], np.ndarray], faces: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return function(faces)


def measure(technique: str, count: int, rounds: int) -> dict:
    """Best-of-``rounds`` faces/s of aikd and of the reference loop (interleaved), and their agreement."""
    model, ours, theirs = _setup(technique, count)
    best = {"aikd": np.inf, "reference": np.inf}
    for _ in range(rounds):
        for name, function in (("reference", theirs), ("aikd", ours)):
            start = time.perf_counter()
            scores = function()
            best[name] = min(best[name], time.perf_counter() - start)
            if name == "aikd":
                mine = scores
            else:
                reference = scores
    relative = float(np.max(np.abs(mine - reference) / np.maximum(np.abs(reference), 1e-12)))
    return {"model": model, "faces": count, "aikd_faces_s": round(count / best["aikd"], 3),
            "reference_faces_s": round(count / best["reference"], 3),
            "speedup": round(best["reference"] / best["aikd"], 2), "max_rel_diff": float(f"{relative:.3g}")}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--faces", type=int, default=32, help="faces per technique (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved timed rounds (default: %(default)s)")
    parser.add_argument("--techniques", nargs="+", choices=TECHNIQUES, default=list(TECHNIQUES))
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # dlib's file: "left out ... tensors" notes
    torch.manual_seed(0)
    print(describe_cpu(), flush=True)
    print(f"{'technique':<13} {'model':<20} {'aikd f/s':>9} {'ref f/s':>9} {'speedup':>8} {'max rel diff':>13}")
    results = {}
    for technique in args.techniques:
        row = results[technique] = measure(technique, args.faces, args.rounds)
        print(f"{technique:<13} {row['model']:<20} {row['aikd_faces_s']:>9.2f} {row['reference_faces_s']:>9.2f} "
              f"{row['speedup']:>7.2f}x {row['max_rel_diff']:>13.3g}", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(json.dumps({"techniques": results, "rounds": args.rounds, "load_average": round(load, 2),
                      "threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
