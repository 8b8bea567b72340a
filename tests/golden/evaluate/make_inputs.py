"""Make the checked-in inputs of the ``aikd evaluate`` golden test (``tests/test_golden.py``).

This script was run ONCE to create the files next to it::

    .venv/bin/python tests/golden/evaluate/make_inputs.py

Do not re-run it unless the goldens are deliberately regenerated: the test reads the checked-in files and
never calls this script, so that a change in numpy's random streams or in this script cannot silently move
the expected numbers. After re-running it, regenerate the expected files as ``tests/test_golden.py`` says and
give the reason in the commit message.

What it writes (all small, plain files):

* ``emb.npz``: 70 images (14 identities x 5), 32-D float32 L2-normalised embeddings
  (:func:`aikd.io.save_embeddings`). Each image has a hidden true quality ``t`` in [0.05, 1], mostly high
  (``0.05 + 0.95 Beta(3, 1.5)``); its embedding is its identity's centre plus Gaussian noise that grows
  quickly as ``t`` falls, so mated pairs with a low-quality image have low similarity and give the false
  non-matches that discarding by quality removes.
* ``pairs.csv``: the generic CSV protocol (``a,b,genuine``) with every mated pair (140) and 400 distinct
  non-mated pairs, shuffled, each pair's two images in random order.
* ``informative.csv``, ``weak.csv``, ``random.csv``: score files ``path,quality``: ``t`` plus small noise,
  ``t`` plus large noise, and uniform noise unrelated to ``t``.

Robustness of the goldens: the similarities of the pairs are float32 dot products whose last bits can depend
on the numpy build and the CPU. The embeddings are redrawn until every two similarities in the protocol
differ by at least ``MIN_GAP``, far more than float32 rounding, so thresholds at any FMR and every
match/non-match decision do not depend on it. Quality values are written with 8 decimals and are all
distinct within a score file.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from aikd.io import save_embeddings, write_csv

HERE = Path(__file__).resolve().parent
SEED = 20240601
N_IDENTITIES = 14
PER_IDENTITY = 5
DIM = 32
N_NONMATED = 400
QUALITY_BETA = (3.0, 1.5)  # t = 0.05 + 0.95 Beta(3, 1.5): most images good, a tail of poor ones
NOISE_BASE, NOISE_SLOPE = 0.15, 5.0  # noise scale 0.15 + 5 (1 - t)^2: FNMR(0) about 0.2 at FMR 0.01
WEAK_NOISE = 0.3  # standard deviation of the noise the weakly informative method adds to t
MIN_GAP = 1e-5  # smallest allowed difference between two similarities of the protocol


def draw_embeddings(rng: np.random.Generator, identity: np.ndarray, true_quality: np.ndarray) -> np.ndarray:
    """Unit-norm float32 embeddings: identity centre plus noise scaled by ``(1 - true_quality)^2``."""
    centres = rng.normal(size=(N_IDENTITIES, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    noise = rng.normal(size=(len(identity), DIM)) / np.sqrt(DIM)
    embeddings = centres[identity] + noise * (NOISE_BASE + NOISE_SLOPE * (1 - true_quality) ** 2)[:, None]
    return (embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)).astype(np.float32)


def draw_pairs(rng: np.random.Generator, identity: np.ndarray) -> list[tuple[int, int, bool]]:
    """Every mated pair and ``N_NONMATED`` distinct non-mated ones, shuffled, sides in random order."""
    n = len(identity)
    everything = list(itertools.combinations(range(n), 2))
    mated = [(a, b, True) for a, b in everything if identity[a] == identity[b]]
    nonmated = [(a, b, False) for a, b in everything if identity[a] != identity[b]]
    picked = rng.choice(len(nonmated), N_NONMATED, replace=False)
    pairs = mated + [nonmated[i] for i in picked]
    pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    return [(b, a, m) if swap else (a, b, m) for (a, b, m), swap in zip(pairs, rng.random(len(pairs)) < 0.5,
                                                                         strict=True)]


def smallest_gap(embeddings: np.ndarray, pairs: list[tuple[int, int, bool]]) -> float:
    """Smallest difference between two similarities of the protocol (float64 from the float32 values)."""
    first = np.array([p[0] for p in pairs])
    second = np.array([p[1] for p in pairs])
    values = embeddings.astype(np.float64)
    similarity = np.einsum("ij,ij->i", values[first], values[second])
    return float(np.diff(np.sort(similarity)).min())


def quality_text(values: np.ndarray) -> list[str]:
    texts = [f"{v:.8f}" for v in values]
    if len(set(texts)) != len(texts):
        raise RuntimeError("two qualities print alike; change the seed")
    return texts


def main() -> None:
    rng = np.random.default_rng(SEED)
    identity = np.repeat(np.arange(N_IDENTITIES), PER_IDENTITY)
    paths = [f"id{i:02d}/{k:04d}.jpg" for i in range(N_IDENTITIES) for k in range(1, PER_IDENTITY + 1)]
    true_quality = 0.05 + 0.95 * rng.beta(*QUALITY_BETA, len(paths))
    pairs = draw_pairs(rng, identity)
    attempt = 0
    while True:  # redraw until no two similarities are closer than MIN_GAP (takes a few dozen draws)
        attempt += 1
        embeddings = draw_embeddings(rng, identity, true_quality)
        if smallest_gap(embeddings, pairs) >= MIN_GAP:
            break
        if attempt == 1000:
            raise RuntimeError(f"no embeddings with similarities {MIN_GAP:g} apart in {attempt} draws")
    print(f"embeddings: draw {attempt}, smallest similarity gap {smallest_gap(embeddings, pairs):.3g}")
    save_embeddings(HERE / "emb.npz", paths, embeddings)
    write_csv(HERE / "pairs.csv", ["a", "b", "genuine"],
              [(paths[a], paths[b], int(mated)) for a, b, mated in pairs])
    methods = {
        "informative": true_quality + rng.normal(0, 0.05, len(paths)),
        "weak": true_quality + rng.normal(0, WEAK_NOISE, len(paths)),
        "random": rng.uniform(0, 1, len(paths)),
    }
    for method, quality in methods.items():
        write_csv(HERE / f"{method}.csv", ["path", "quality"], zip(paths, quality_text(quality), strict=True))


if __name__ == "__main__":
    main()
