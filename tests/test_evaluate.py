"""EDC / pAUC metrics against plain brute-force re-implementations, hand-worked examples and scale paths."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from aikd.evaluation import metrics as ev


# ------------------------------------------------------------------------------ brute-force references
def brute_threshold(nonmated, fmr):
    """(k+1)-th highest non-mated score, k the most false matches with k / n <= fmr (counted up in a loop)."""
    n = len(nonmated)
    k = 0
    while (k + 1) / n <= fmr + 1e-12:
        k += 1
    return sorted(nonmated, reverse=True)[k]


def brute_fnmr(mated, threshold):
    misses = 0
    for s in mated:
        if s <= threshold:
            misses += 1
    return misses / len(mated)


def brute_fixed_edc(mated, quality, threshold):
    """For every distinct quality value (and for nothing), discard all mated pairs at or below it."""
    xs, ys = [0.0], [brute_fnmr(mated, threshold)]
    for v in sorted(set(quality)):
        kept = [s for s, q in zip(mated, quality, strict=True) if q > v]
        if not kept:
            break
        xs.append((len(mated) - len(kept)) / len(mated))
        ys.append(brute_fnmr(kept, threshold))
    return np.array(xs), np.array(ys)


def brute_recomputed_edc(scores, mated, sort_key, fmr, steps):
    """At discard level k/20: sort by ``sort_key``, drop the first k*P//20, re-threshold, recount."""
    order = sorted(range(len(scores)), key=sort_key)
    xs, ys, ts = [], [], []
    for k in steps:
        kept = order[k * len(scores) // 20:]
        gen = [scores[i] for i in kept if mated[i]]
        imp = [scores[i] for i in kept if not mated[i]]
        if not gen or not imp:
            break
        t = brute_threshold(imp, fmr)
        xs.append(k / 20)
        ys.append(brute_fnmr(gen, t))
        ts.append(t)
    return np.array(xs), np.array(ys), np.array(ts)


def riemann_step_area(xs, ys, limit, samples=400_000):
    """Area under the step function (value of the last point at or left of d) by dense sampling."""
    d = (np.arange(samples) + 0.5) * (limit / samples)
    values = ys[np.searchsorted(xs, d, side="right") - 1]
    return float(values.sum() * limit / samples)


def synthetic_scores(seed, n_mated=400, n_nonmated=4000, ties=False):
    rng = np.random.default_rng(seed)
    mated = rng.normal(0.55, 0.2, n_mated).astype(np.float32)
    nonmated = rng.normal(0.0, 0.12, n_nonmated).astype(np.float32)
    quality = rng.random(n_mated)
    if ties:
        quality = np.round(quality, 1)  # about ten tie groups
    return mated, nonmated, quality


# --------------------------------------------------------------------------------------------- basics
def test_evaluate_does_not_import_torch():
    code = ("import sys; import aikd.evaluation.metrics, aikd.evaluation.protocols, aikd.evaluation.report; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]; "
            "sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_cosine_similarity_and_pair_quality():
    a = np.array([[3.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    b = np.array([[5.0, 0.0], [-1.0, -1.0], [2.0, 0.0]])
    assert np.allclose(ev.cosine_similarity(a, b), [1.0, -1.0, 0.0], atol=1e-6)
    assert np.array_equal(ev.pair_quality(np.array([0.2, 0.9]), np.array([0.5, 0.1])), [0.2, 0.1])


@pytest.mark.parametrize("fmr", [1e-4, 1e-3, 1e-2, 0.1, 0.25])
def test_threshold_matches_brute_force_and_bounds_fmr(fmr):
    rng = np.random.default_rng(3)
    nonmated = np.round(rng.normal(size=4000), 2)  # many ties
    threshold = ev.threshold_at_fmr(nonmated, fmr)
    assert threshold == brute_threshold(list(nonmated), fmr)
    allowed = ev.false_matches_allowed(len(nonmated), fmr)
    assert np.count_nonzero(nonmated > threshold) <= allowed <= fmr * len(nonmated) + 1e-9
    assert np.count_nonzero(nonmated >= threshold) >= allowed + 1  # no lower threshold qualifies


def test_false_matches_allowed_is_not_fooled_by_rounding():
    assert ev.false_matches_allowed(3000, 1e-3) == 3
    assert ev.false_matches_allowed(1000, 1e-3) == 1
    assert ev.false_matches_allowed(999, 1e-3) == 0


def test_fnmr_at_fmr_hand_example():
    nonmated = np.array([0.3, 0.25, 0.05, 0.0])
    mated = np.array([0.9, 0.2, 0.8, 0.1])
    assert ev.threshold_at_fmr(nonmated, 0.25) == 0.25  # k = 1: second highest
    assert ev.fnmr_at_fmr(mated, nonmated, 0.25) == 0.5  # 0.2 and 0.1 are <= 0.25
    assert ev.threshold_at_fmr(nonmated, 0.1) == 0.3  # k = 0: the highest
    assert ev.fnmr_at_fmr(mated, nonmated, 0.5) == 0.0  # k = 2: threshold 0.05


# ---------------------------------------------------------------------------------------- fixed EDC
def test_fixed_edc_hand_example():
    mated = np.array([0.9, 0.2, 0.8, 0.1])
    quality = np.array([0.5, 0.1, 0.9, 0.3])
    edc = ev.fnm_edc(mated, quality, threshold=0.25, fmr=0.25)
    assert np.allclose(edc.discard_fraction, [0, 0.25, 0.5, 0.75])
    assert np.allclose(edc.fnmr, [0.5, 1 / 3, 0, 0])
    assert ev.pauc(edc, 0.3) == pytest.approx(0.5 * 0.25 + (1 / 3) * 0.05)
    assert ev.normalised_pauc(edc, 0.3) == pytest.approx((0.125 + 0.05 / 3) / (0.5 * 0.3))
    assert edc.threshold_mode == "fixed" and edc.fmr == 0.25


def test_fixed_edc_discards_tie_groups_together():
    mated = np.array([0.2, 0.9, 0.1, 0.8])
    quality = np.array([0.1, 0.1, 0.5, 0.9])  # the two lowest are tied
    edc = ev.fnm_edc(mated, quality, threshold=0.25)
    assert np.allclose(edc.discard_fraction, [0, 0.5, 0.75])  # no point at 0.25
    assert np.allclose(edc.fnmr, [0.5, 0.5, 0.0])
    assert ev.pauc(edc, 0.6) == pytest.approx(0.5 * 0.5 + 0.5 * 0.1)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_fixed_edc_matches_brute_force(seed, ties):
    mated, nonmated, quality = synthetic_scores(seed, ties=ties)
    threshold = ev.threshold_at_fmr(nonmated, 1e-2)
    edc = ev.fnm_edc(mated, quality, threshold)
    xs, ys = brute_fixed_edc(list(mated), list(quality), threshold)
    assert np.allclose(edc.discard_fraction, xs) and np.allclose(edc.fnmr, ys)
    for limit in (0.2, 0.3):
        assert ev.pauc(edc, limit) == pytest.approx(riemann_step_area(xs, ys, limit), abs=2e-5)


def test_perfect_quality_gives_the_oracle_curve():
    mated, nonmated, _ = synthetic_scores(7)
    threshold = ev.threshold_at_fmr(nonmated, 1e-3)
    edc = ev.fnm_edc(mated, mated.astype(np.float64), threshold)  # quality = similarity: FNMs go first
    oracle = ev.oracle_for(edc)
    assert np.allclose(edc.fnmr, oracle.fnmr) and np.allclose(edc.discard_fraction, oracle.discard_fraction)
    assert np.allclose(edc.fnmr, ev.oracle_fnmr(edc.fnmr0, edc.discard_fraction))
    assert ev.pauc(edc, 0.3, subtract_oracle=True) == pytest.approx(0.0, abs=1e-12)


def test_oracle_formula():
    assert np.allclose(ev.oracle_fnmr(0.2, np.array([0, 0.1, 0.2, 0.5])), [0.2, 0.1 / 0.9, 0, 0])
    oracle = ev.oracle_edc(4, 2)
    assert np.allclose(oracle.fnmr, [0.5, 1 / 3, 0, 0])


@pytest.mark.parametrize("mode", ["fixed", "recomputed"])
def test_random_quality_is_no_better_than_not_discarding_and_inverted_is_worse(mode):
    randoms, inverted = [], []
    for seed in range(12):
        rng = np.random.default_rng(100 + seed)
        mated, nonmated, _ = synthetic_scores(seed, n_mated=1500, n_nonmated=15000)
        scores = np.concatenate([mated, nonmated])
        is_mated = np.arange(scores.size) < mated.size
        # inverted: the best mated comparisons get the lowest quality; non-mated ones a random quality
        best_first = 1 - np.argsort(np.argsort(scores)) / scores.size
        for quality, bucket in ((rng.random(scores.size), randoms),
                                (np.where(is_mated, best_first, rng.random(scores.size)), inverted)):
            if mode == "fixed":
                edc = ev.fnm_edc(mated, quality[is_mated], ev.threshold_at_fmr(nonmated, 1e-2))
            else:
                edc = ev.recomputed_edc(scores, is_mated, 1e-2, pair_quality=quality)
            bucket.append(ev.normalised_pauc(edc, 0.3))
    assert abs(np.mean(randoms) - 1) < 0.03
    assert min(inverted) > 1.05


# ----------------------------------------------------------------------------------- recomputed EDC
def test_recomputed_edc_hand_example():
    scores = np.array([0.9, 0.3, 0.7, 0.4, 0.5, 0.2, 0.35, 0.1])
    mated = np.array([1, 1, 1, 1, 0, 0, 0, 0], dtype=bool)
    quality = np.array([0.8, 0.1, 0.6, 0.3, 0.2, 0.7, 0.5, 0.4])
    edc = ev.recomputed_edc(scores, mated, 0.25, pair_quality=quality, grid=[0, 0.25, 0.5])
    # level 0: k = 1 -> threshold 0.35, mated 0.3 misses; level 0.25 drops q 0.1, 0.2; level 0.5 also 0.3, 0.4
    assert np.allclose(edc.threshold, [0.35, 0.35, 0.35])
    assert np.allclose(edc.fnmr, [0.25, 0.0, 0.0])
    assert ev.pauc(edc, 0.3) == pytest.approx(0.25 * 0.25 / 2)  # trapezoid, then zero
    assert ev.normalised_pauc(edc, 0.3) == pytest.approx(0.03125 / (0.25 * 0.3))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_recomputed_edc_matches_brute_force(seed, ties):
    rng = np.random.default_rng(seed)
    n_images, n_pairs = 120, 1500
    image_quality = np.round(rng.random(n_images), 1) if ties else rng.random(n_images)
    first, second = rng.integers(0, n_images, n_pairs), rng.integers(0, n_images, n_pairs)
    mated = rng.random(n_pairs) < 0.3
    scores = np.where(mated, rng.normal(0.5, 0.2, n_pairs), rng.normal(0, 0.15, n_pairs)).astype(np.float32)
    ranks = ev.image_ranks(image_quality)
    order = ev.discard_order(ranks[first], ranks[second])
    edc = ev.recomputed_edc(scores, mated, 1e-2, order=order)

    def key(i):  # lower pair quality first; ties: lower image index, then the other image, then list position
        a, b = sorted([(image_quality[first[i]], first[i]), (image_quality[second[i]], second[i])])
        return (a, b, i)

    xs, ys, ts = brute_recomputed_edc(list(scores), list(mated), key, 1e-2, range(20))
    assert np.allclose(edc.discard_fraction, xs) and np.allclose(edc.fnmr, ys)
    assert np.allclose(edc.threshold, ts)
    inside = xs <= 0.3
    assert ev.pauc(edc, 0.3) == pytest.approx(np.trapezoid(ys[inside], xs[inside]))
    at_limit = np.interp(0.32, xs, ys)  # a limit between grid points: interpolated, then trapezoid
    expected = np.trapezoid(ys[inside], xs[inside]) + 0.02 * (ys[6] + at_limit) / 2
    assert ev.pauc(edc, 0.32) == pytest.approx(expected)


def test_pauc_rejects_limits_outside_the_curve():
    edc = ev.recomputed_edc(np.array([0.9, 0.1, 0.5, 0.2]), np.array([1, 1, 0, 0], bool), 0.5,
                            pair_quality=np.arange(4.0), grid=[0, 0.25])
    with pytest.raises(ValueError, match="stops at discard fraction"):
        ev.pauc(edc, 0.3)
    with pytest.raises(ValueError, match="between 0 and 1"):
        ev.pauc(edc, 1.5)


# --------------------------------------------------------------------------------------- all-vs-all
def synthetic_identities(seed, n_images=150, n_ids=25, dim=16, ties=False):
    rng = np.random.default_rng(seed)
    identity = rng.integers(0, n_ids, n_images)
    quality = np.round(rng.random(n_images), 1) if ties else rng.random(n_images)
    centres = rng.normal(size=(n_ids, dim))
    embeddings = centres[identity] + rng.normal(size=(n_images, dim)) * (0.4 + 1.2 * (1 - quality))[:, None]
    return embeddings.astype(np.float32), identity, quality


def test_chunked_similarities_equal_the_dense_matrix():
    embeddings, _, _ = synthetic_identities(0, n_images=57)
    normalised = ev.l2_normalise(embeddings)
    dense = normalised @ normalised.T
    parts = list(ev.iter_all_vs_all_similarities(embeddings, chunk_elements=100))
    assert len(parts) > 5
    first, second, sims = (np.concatenate([p[k] for p in parts]) for k in range(3))
    i, j = np.triu_indices(57, 1)
    got = sorted(zip(first.tolist(), second.tolist(), strict=True))
    assert got == list(zip(i.tolist(), j.tolist(), strict=True))
    assert np.allclose(sims, dense[first, second], atol=1e-6)


def test_mated_pairs_enumerates_each_same_identity_pair_once():
    identity = np.array([3, 1, 3, 2, 1, 3, 7])
    first, second = ev.mated_pairs(identity)
    expected = {(a, b) for a in range(7) for b in range(a + 1, 7) if identity[a] == identity[b]}
    assert set(zip(first.tolist(), second.tolist(), strict=True)) == expected and len(first) == len(expected)


@pytest.mark.parametrize("ties", [False, True])
def test_all_vs_all_chunked_equals_dense_pair_list(ties):
    embeddings, identity, quality = synthetic_identities(1, ties=ties)
    rng = np.random.default_rng(5)
    qualities = {"q": quality, "noisy": quality + rng.normal(0, 0.3, len(quality))}
    fmrs = (1e-3, 1e-2, 0.05)
    chunked = ev.evaluate_all_vs_all(embeddings, identity, qualities, fmrs, chunk_elements=300)
    first, second = np.triu_indices(len(identity), 1)
    dense = ev.evaluate_pairs(embeddings, first, second, identity[first] == identity[second], qualities, fmrs)
    assert set(chunked) == set(dense) and len(dense) == 2 * 3 * 2
    for key, edc in dense.items():
        other = chunked[key]
        assert np.array_equal(other.discard_fraction, edc.discard_fraction), key
        assert np.allclose(other.threshold, edc.threshold, atol=1e-6), key
        assert np.allclose(other.fnmr, edc.fnmr), key


def test_all_vs_all_fixed_only_uses_one_level():
    embeddings, identity, quality = synthetic_identities(2)
    fixed = ev.evaluate_all_vs_all(embeddings, identity, {"q": quality}, (1e-2,), modes=("fixed",),
                                   chunk_elements=500)
    both = ev.evaluate_all_vs_all(embeddings, identity, {"q": quality}, (1e-2,), chunk_elements=500)
    assert set(fixed) == {("q", 1e-2, "fixed")}
    assert np.allclose(fixed["q", 1e-2, "fixed"].fnmr, both["q", 1e-2, "fixed"].fnmr)


def test_nonmated_tail_keeps_exactly_what_thresholds_need():
    rng = np.random.default_rng(11)
    scores = rng.normal(size=20000).astype(np.float32)
    levels = rng.integers(0, 5, scores.size).astype(np.int16)
    counts = np.cumsum(np.bincount(levels, minlength=5)[::-1])[::-1]
    needed = ev.false_matches_allowed(counts, 0.01) + 1
    tail = ev.NonMatedTail(needed, prune_at=500)
    for start in range(0, scores.size, 700):
        tail.add(scores[start:start + 700], levels[start:start + 700])
    kept, kept_levels = tail.result()
    assert kept.size < scores.size / 4  # the pruning did something
    for level in range(5):
        everything = np.sort(scores[levels >= level])[::-1]
        survivors = np.sort(kept[kept_levels >= level])[::-1]
        assert np.array_equal(survivors[: needed[level]], everything[: needed[level]])


def test_qualities_must_be_finite():
    embeddings, identity, quality = synthetic_identities(3, n_images=20)
    quality[4] = np.nan
    with pytest.raises(ValueError, match="finite"):
        ev.evaluate_all_vs_all(embeddings, identity, {"q": quality})
