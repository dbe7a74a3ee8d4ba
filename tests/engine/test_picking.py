"""Picking (mtd.picking): coordinates against planted copies, merging, matching, metrics, STAR."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mtd
from mtd import picking
from tests.reference import equations as ref


def planted(F: np.ndarray, N: int, corners, ks, sigma: float, seed: int) -> np.ndarray:
    """An (N, N) micrograph with np.rot90(F, k) planted at each top-left corner, plus noise."""
    L = F.shape[0]
    rng = np.random.default_rng(seed)
    M = sigma * rng.standard_normal((N, N))
    for (r, c), k in zip(corners, ks, strict=True):
        M[r : r + L, c : c + L] += np.rot90(F, k)
    return M


def engine(L, K=4, **kw):
    return mtd.ApproximateEM(mtd.Rotations(L, K), dtype=torch.float64, **kw)


def uniform_log_rho(L):
    return torch.full((2 * L, 2 * L), -math.log(4 * L * L), dtype=torch.float64)


def test_centre_exact_at_every_position_on_the_patch_grid():
    """One copy at every top-left corner of a 3 x 3 patch grid (all L x L offsets relative to the
    patches, the micrograph's borders included): one pick, at the planted centre and angle."""
    L, N, sigma = 5, 15, 0.01
    rng = np.random.default_rng(7)
    F = 0.5 + rng.uniform(0, 1, (L, L))  # no symmetry, no blank pixel
    em = engine(L)
    for r in range(N - L + 1):
        for c in range(N - L + 1):
            k = (r + 2 * c) % 4
            M = planted(F, N, [(r, c)], [k], sigma, seed=r * 100 + c)
            picks, _ = picking.pick_posterior(em, M, F, uniform_log_rho(L), sigma**2)
            # every candidate is a copy inside the micrograph
            assert (picks.centres >= (L - 1) / 2).all()
            assert (picks.centres <= N - 1 - (L - 1) / 2).all()
            got = picks.picked()
            assert len(got) == 1, (r, c, got.centres)
            np.testing.assert_array_equal(got.centres[0], [r + (L - 1) / 2, c + (L - 1) / 2])
            assert got.angles[0] == pytest.approx(k * math.pi / 2)
            assert got.templates[0] == k


def test_centres_exact_in_streamed_multi_file_data(tmp_path):
    """Two micrographs of other sizes (one with a remainder strip, which a copy reaches into)
    read from files, streamed: every pick names its micrograph and sits at the planted
    centre; for both ways of combining the patches."""
    L, sigma = 5, 0.01
    rng = np.random.default_rng(3)
    F = 0.5 + rng.uniform(0, 1, (L, L))
    a = planted(F, 20, [(2, 3), (11, 13)], [1, 2], sigma, seed=1)
    # 17 = 3 L + 2: the patches drop a strip of 2; the copy at (12, 12) has 2 of its 5 rows and
    # columns there
    b = planted(F, 17, [(0, 9), (8, 1), (12, 12)], [3, 0, 1], sigma, seed=2)
    paths = [tmp_path / "a.npy", tmp_path / "b.npy"]
    for p, m in zip(paths, (a, b), strict=True):
        np.save(p, m)
    em = engine(L, compute=mtd.Compute(chunk_size=3))
    data = em.prepare([str(p) for p in paths])
    assert data.held is None  # streamed
    planted_at = [(0, 2, 3), (0, 11, 13), (1, 0, 9), (1, 8, 1), (1, 12, 12)]
    want = sorted((s, r + 2.0, c + 2.0) for s, r, c in planted_at)
    for combine in ("evidence", "nms"):
        picks, _ = picking.pick_posterior(
            em, data, F, uniform_log_rho(L), sigma**2, combine=combine
        )
        got = picks.picked()
        found = sorted(
            (int(s), *map(float, cen)) for s, cen in zip(got.micrograph, got.centres, strict=True)
        )
        assert found == want, combine
        assert got.names == [str(p) for p in paths]


def test_noise_threshold_bounds_false_picks_where_the_bayes_rule_over_picks():
    """Pure noise under a prior that calls 81 % of patches occupied (uniform rho): per patch
    (Algorithm 2, "nms") the Bayes rule (threshold 0) picks dozens of the 1600 noise patches;
    the default threshold, set by the scores of noise micrographs drawn apart from the data,
    about one per micrograph. The patches' combined evidence ("evidence") is calibrated: its
    Bayes rule already picks only a few."""
    L = 5
    F = 0.5 + np.random.default_rng(4).uniform(0, 1, (L, L))
    em = engine(L)
    for combine, bayes_least, bayes_most in (("nms", 40, math.inf), ("evidence", 0, 10)):
        bayes, noise = [], []
        for seed in range(3):
            M = np.random.default_rng(100 + seed).standard_normal((40 * L, 40 * L))
            data = em.prepare(M)
            args = (em, data, F, uniform_log_rho(L), 1.0)
            p0, _ = picking.pick_posterior(*args, threshold=0.0, combine=combine)
            pn, _ = picking.pick_posterior(*args, seed=seed, combine=combine)
            assert pn.info["threshold"] > 0
            bayes.append(int(p0.selected.sum()))
            noise.append(int(pn.selected.sum()))
        assert bayes_least <= min(bayes) and max(bayes) <= bayes_most, (combine, bayes)
        assert sum(noise) <= 6, (combine, noise)
    # The evidence's threshold: the draws-th largest candidate of draws noise micrographs, seeded.
    args = (em, F, uniform_log_rho(L), 1.0, (20 * L, 30 * L), L - 1)
    a = picking.evidence_noise_score(*args, seed=1, draws=3)
    assert a == picking.evidence_noise_score(*args, seed=1, draws=3)
    assert a != picking.evidence_noise_score(*args, seed=2, draws=3)
    gen = torch.Generator().manual_seed(1)
    noise = [torch.randn(20 * L, 30 * L, generator=gen, dtype=torch.float64) for _ in range(3)]
    found = picking.evidence_candidates(
        em, mtd.PatchSource(noise, L), torch.from_numpy(F), uniform_log_rho(L), 1.0, L - 1
    )
    assert a == np.sort(found.scores)[-3]
    # The threshold is the draws-th largest of draws micrographs' worth of noise scores, seeded.
    args = (em, F, uniform_log_rho(L), 1.0, 30)
    a = picking.noise_score(*args, seed=1, draws=3, block=4)
    assert a == picking.noise_score(*args, seed=1, draws=3, block=4)
    assert a != picking.noise_score(*args, seed=2, draws=3, block=4)
    gen = torch.Generator().manual_seed(1)  # blocks of 4 x 4 patches: 16, 16, 16, 16, 16, 10
    scores = []
    for rows, cols in [(4, 4)] * 5 + [(3, 4)]:
        Z = torch.randn(rows * L, cols * L, generator=gen, dtype=torch.float64)
        scores.append(picking.patch_posteriors(em, Z, F, uniform_log_rho(L), 1.0, 0.2).score())
    assert a == np.sort(np.concatenate(scores)[:90])[-3]
    with pytest.raises(ValueError, match="draws must be"):
        picking.noise_score(*args, draws=0)


@pytest.mark.parametrize(
    ("group", "blocks"), [("rotations", "one"), ("dihedral", "one"), ("dihedral", "each")]
)
def test_copy_evidence_is_the_sum_of_the_patches_log_likelihood_ratios(group, blocks):
    """For every corner c whose copy touches the 3 x 4 patch grid (its borders included), the
    combined score equals, brute force, log sum_k pi_k exp(sum over the patches m it touches of
    log p(M_m | l_m, k) - log p(M_m | blank)) + the prior odds, with the E-step's own
    log-likelihoods (eq. 10) and l_m = shift_of_offset(c - origin_m); with unequal template
    weights (one zero), in one block of templates or one block per template."""
    L, sigma = 4, 0.7
    rng = np.random.default_rng(21)
    F = rng.uniform(-0.5, 1, (L, L))
    M = rng.standard_normal((3 * L + 2, 4 * L + 1))  # the patches drop the remainder strip
    G = mtd.Rotations(L, 4) if group == "rotations" else mtd.Dihedral(L, 4)
    em = mtd.ApproximateEM(G, dtype=torch.float64)
    data = em.prepare(M)
    ll = em.estep.log_likelihoods(data, torch.from_numpy(F), sigma).numpy()  # (D, K, 2L, 2L)
    blank = ll[:, 0, L, L]  # an all-padding shift: the patch's likelihood without a copy
    _, origin = picking.patch_origins(data.source)
    w = rng.uniform(0.5, 2, G.K)
    w[0] = 0  # a zero weight: the first block all -inf when blocks are single templates
    with np.errstate(divide="ignore"):
        log_w = np.log(w / w.sum())
    log_odds = -3.0
    score, best_k = picking.copy_evidence(
        torch.from_numpy(M[: 3 * L, : 4 * L]), G.templates(torch.from_numpy(F)),
        torch.from_numpy(log_w), sigma**2, log_odds,
        block_bytes=1 if blocks == "each" else 1 << 28,
    )  # fmt: skip
    assert torch.isfinite(score).all()
    assert score.shape == (3 * L + L - 1, 4 * L + L - 1)
    for i in range(score.shape[0]):
        for j in range(score.shape[1]):
            c = np.array([i - (L - 1), j - (L - 1)])
            e = np.zeros(G.K)
            for m in range(data.D):
                o = c - origin[m]
                if np.all(np.abs(o) < L):
                    lx, ly = picking.shift_of_offset(o, L)
                    e += ll[m, :, lx, ly] - blank[m]
            want = np.logaddexp.reduce(e + log_w) + log_odds
            assert float(score[i, j]) == pytest.approx(want, abs=1e-9)
            # (mirrored and rotated templates can agree on the part a border corner shows)
            assert int(best_k[i, j]) != 0
            assert (e + log_w)[int(best_k[i, j])] == pytest.approx((e + log_w).max(), abs=1e-9)


def test_corner_log_odds_closed_form():
    """q = the mean of rho over the L^2 shifts that put a copy's corner inside the patch."""
    L = 6
    q = 1 / (4 * L * L)  # uniform rho
    assert picking.corner_log_odds(uniform_log_rho(L), L) == pytest.approx(math.log(q / (1 - q)))
    rho = torch.zeros(2 * L, 2 * L, dtype=torch.float64)
    rho[L, L], rho[0, L + 2], rho[L + 1, L - 1] = 0.7, 0.2, 0.1  # only (0, L + 2) is inside
    q = 0.2 / (L * L)
    assert picking.corner_log_odds(rho.log(), L) == pytest.approx(math.log(q / (1 - q)))


def test_evidence_adds_up_what_each_patch_sees_of_a_copy_on_a_patch_corner():
    """Copies centred on patch corners, each patch seeing a quarter, at an SNR where a quarter's
    evidence is weak: the combined evidence picks every copy and nothing else; Algorithm 2 per
    patch (each decides on its quarter) misses copies (measured: F1 0.83, recall 0.72 here)."""
    L, n = 8, 12
    rng = np.random.default_rng(5)
    F = rng.uniform(0, 1, (L, L))
    sigma = float(np.linalg.norm(F)) / 6  # the whole copy at 6 sigma, a quarter at about 3
    steps = range(0, n - 1, 2)
    corners = [(a * L + L // 2, b * L + L // 2) for a in steps for b in steps]
    ks = [int(k) for k in rng.integers(0, 4, len(corners))]
    M = planted(F, n * L, corners, ks, sigma, seed=9)
    truth = np.array(corners, dtype=np.float64) + (L - 1) / 2
    em = engine(L)
    log_rho, _ = picking.fit_rho_sigma(em, M, F, sigma=sigma, iterations=5)
    out = {}
    for combine in ("evidence", "nms"):
        picks, _ = picking.pick_posterior(em, M, F, log_rho, sigma**2, combine=combine)
        out[combine] = picking.picking_metrics(picks, truth)
    assert out["evidence"]["f1"] == 1.0 and out["evidence"]["ap"] == 1.0, out
    assert out["nms"]["f1"] < 0.9, out


def test_patch_truth_shift_equals_brute_force_model():
    """The true shift of every patch is the l at which the model's crop C T_l Z R_k F equals the
    clean patch (tests/reference.crop_shift, np.roll): no derivation shared with the code."""
    L, K = 4, 4
    rng = np.random.default_rng(11)
    F = 0.5 + rng.uniform(0, 1, (L, L))
    meas = mtd.simulate(F, 6 * L, density=0.12, snr=math.inf, K=K, seed=5)
    clean = meas.clean().numpy()
    source = mtd.PatchSource(meas.data, L)
    truth = picking.patch_truth(source, meas.positions.numpy())
    RF = ref.rotations(F, K)
    for m, patch in enumerate(ref.patches(clean, L)):
        if truth.empty[m]:
            assert np.abs(patch).max() == 0
            continue
        lx, ly = truth.shift[m]
        assert min(np.abs(patch - ref.crop_shift(R, lx, ly)).max() for R in RF) < 1e-12


def test_one_pick_per_copy_at_high_snr(digits):
    """Copies cut by patch borders are seen by up to four patches: one pick per copy."""
    F = digits[4]
    L = F.shape[0]
    meas = mtd.simulate(F, 8 * L, density=0.1, snr=20, K=4, seed=2)
    em = engine(L)
    data = em.prepare(meas.data)
    log_rho, s2 = picking.fit_rho_sigma(em, data, F, sigma=meas.sigma, iterations=5)
    # sigma estimated with the image held fixed: the M-step's residual, close to the truth
    _, s2_fit = picking.fit_rho_sigma(em, data, F, iterations=5)
    assert math.sqrt(s2_fit) == pytest.approx(meas.sigma, rel=0.03)
    picks, post = picking.pick_posterior(em, data, F, log_rho, s2)
    got = picks.picked()
    truth = meas.positions.numpy() + (L - 1) / 2
    assert len(got) == len(truth)
    assert sorted(map(tuple, got.centres)) == sorted(map(tuple, truth))
    m = picking.picking_metrics(picks, truth)
    assert m["f1"] == 1.0 and m["ap"] == 1.0
    # The paper's patch measures, with the border-only patches counted empty.
    pt = picking.patch_truth(
        data.source, meas.positions.numpy(), clean=meas.clean(), energy=float(F.square().sum())
    )
    pm = picking.patch_metrics(post.score() <= 0, post.shift, pt, L)
    assert pm["empty_f1"] == 1.0 and pm["shift_accuracy"] == 1.0
    assert pm["empty_f1_always"] < 1


def test_shift_accuracy_of_a_translated_estimate_is_scored_in_its_own_frame(digits):
    """An MTD estimate is the image up to a translation: picking with the digit moved by d
    (inside its empty border) finds every copy's shift in the estimate's frame, where each
    copy's corner moves by -R_k d (its rotation k turns the offset), not in the digit's."""
    F = digits[4]
    L = F.shape[0]
    meas = mtd.simulate(F, 8 * L, density=0.1, snr=20, K=4, seed=2)
    d = (2, -1)
    X = torch.roll(F, d, dims=(0, 1))
    assert float(F[:2].abs().sum() + F[:, :1].abs().sum() + F[-2:].abs().sum()) == 0
    em = engine(L)
    data = em.prepare(meas.data)
    log_rho, s2 = picking.fit_rho_sigma(em, data, X, sigma=meas.sigma, iterations=5)
    picks, post = picking.pick_posterior(em, data, X, log_rho, s2)
    truth = picking.truth_of(meas)
    group = mtd.Rotations(L, 4)
    seen = picking.in_frame_of(truth, X, group)
    assert picking.in_frame_of(truth, F, group)["corners"].tolist() == truth["corners"].tolist()
    # rot90 by k (counter-clockwise) turns a (row, column) offset (a, b) into (-b, a), k times
    ks = np.rint(meas.angles.numpy() / (math.pi / 2)).astype(int) % 4
    for corner, moved, k in zip(truth["corners"], seen["corners"], ks, strict=True):
        a, b = d
        for _ in range(k):
            a, b = -b, a
        assert tuple(moved - corner) == (-a, -b)
    scores = {}
    for name, t in (("digit", truth), ("estimate", seen)):
        pt = picking.patch_truth(data.source, t["corners"], clean=t["clean"], energy=t["energy"])
        scores[name] = picking.patch_metrics(post.score() <= 0, post.shift, pt, L)
    assert scores["estimate"]["shift_accuracy"] == 1.0
    assert scores["digit"]["shift_accuracy"] < 0.5
    assert picking.picking_metrics(picks, truth["centres"])["f1"] == 1.0


def test_posterior_picking_through_steerable_coefficients(digits):
    """The unknown a steerable basis's coefficients, copies at continuous angles: one pick per
    copy at its centre, its angle the nearest of the group's K (within a step)."""
    F = digits[3]
    L = F.shape[0]
    group = mtd.groups.steerable(L, 16)
    F = group.to_image(group.from_image(F))  # in the basis's span
    meas = mtd.simulate(F, 8 * L, density=0.1, snr=20, K=4, rotation="continuous", seed=3)
    em = mtd.ApproximateEM(group, dtype=torch.float64)
    x = group.from_image(F)
    log_rho, s2 = picking.fit_rho_sigma(em, meas.data, x, sigma=meas.sigma, iterations=3)
    picks, _ = picking.pick_posterior(em, meas.data, x, log_rho, s2)
    truth = meas.positions.numpy() + (L - 1) / 2
    m = picking.picking_metrics(picks, truth, radius=2)
    assert m["f1"] == 1.0, m
    got = picks.picked()
    order = [int(np.argmin(np.linalg.norm(truth - c, axis=1))) for c in got.centres]
    step = 2 * math.pi / 16
    diff = np.angle(np.exp(1j * (got.angles - meas.angles.numpy()[order])))
    assert np.abs(diff).max() <= step, diff


def test_template_matching_with_the_true_image_finds_every_copy(digits):
    F = digits[7]
    L = F.shape[0]
    meas = mtd.simulate(F, 10 * L, density=0.1, snr=5, K=4, seed=4)
    picks = picking.template_match(meas.data, mtd.Rotations(L, 4), F)
    truth = meas.positions.numpy() + (L - 1) / 2
    m = picking.picking_metrics(picks, truth)
    assert m["precision"] == 1.0 and m["recall"] == 1.0
    got = picks.picked()
    np.testing.assert_allclose(np.sort(got.centres, 0), np.sort(truth, 0))


def test_template_matching_noise_threshold_is_seeded_and_bounds_false_picks(digits):
    """The default operating point: the draws-th largest candidate NCC of draws white-noise
    micrographs of the data's size (seeded); on pure noise it selects about one pick per
    micrograph, and it is below the closed form ("auto"), which errs high."""
    F = digits[2]
    L = F.shape[0]
    group = mtd.Rotations(L, 4)
    picked = []
    for seed in range(4):
        M = np.random.default_rng(50 + seed).standard_normal((12 * L, 10 * L)) * 3.0
        noise = picking.template_match(M, group, F, seed=seed)
        auto = picking.template_match(M, group, F, threshold="auto")
        assert noise.info["threshold"] < auto.info["threshold"]
        picked.append(int(noise.selected.sum()))
    assert sum(picked) <= 8, picked
    M = np.random.default_rng(9).standard_normal((12 * L, 10 * L))
    a = picking.template_match(M, group, F, seed=1, noise_draws=3).info["threshold"]
    assert a == picking.template_match(M, group, F, seed=1, noise_draws=3).info["threshold"]
    assert a != picking.template_match(M, group, F, seed=2, noise_draws=3).info["threshold"]
    gen = torch.Generator().manual_seed(1)
    noise = [torch.randn(12 * L, 10 * L, generator=gen, dtype=torch.float64) for _ in range(3)]
    found = picking.template_match(noise, group, F, threshold=0.0).scores
    assert a == np.sort(found)[-3]
    with pytest.raises(ValueError, match="noise_draws must be"):
        picking.template_match(M, group, F, noise_draws=0)


def test_template_matching_keeps_copies_whose_boxes_touch(digits):
    """Copies L apart side by side and diagonally (boxes touching, not overlapping) are all
    picked (a pooling window as wide as L let the better-matched neighbour hide one)."""
    F = digits[5].numpy()
    L = F.shape[0]
    corners = [(10, 10), (10, 10 + L), (10 + L, 10 + 2 * L), (10 + 2 * L, 10 + 3 * L)]
    M = planted(F, 6 * L, corners, [0, 1, 2, 3], 0.3, seed=1)
    picks = picking.template_match(M, mtd.Rotations(L, 4), F)
    truth = np.array(corners, dtype=np.float64) + (L - 1) / 2
    m = picking.picking_metrics(picks, truth)
    assert m["f1"] == 1.0, m


def test_ncc_equals_direct_formula():
    rng = np.random.default_rng(0)
    M = rng.standard_normal((13, 11))
    T = rng.standard_normal((2, 4, 4))
    score, k = picking.normalised_cross_correlation(torch.from_numpy(M), torch.from_numpy(T))
    for u in range(10):
        for v in range(8):
            W = M[u : u + 4, v : v + 4]
            W = W - W.mean()
            nccs = [(W * (t - t.mean())).sum() / np.linalg.norm(W) / np.linalg.norm(t - t.mean())
                    for t in T]  # fmt: skip
            assert float(score[u, v]) == pytest.approx(max(nccs), abs=1e-10)
            assert int(k[u, v]) == int(np.argmax(nccs))


def test_hungarian_matching_beats_greedy_on_a_hand_made_case():
    truth = np.array([[0.0, 0.0], [7.0, 0.0]])
    picks = np.array([[3.0, 0.0], [-1.0, 0.0]])  # nearest-first would give p0 -> t0, p1 nothing
    np.testing.assert_array_equal(picking.match(picks, truth, radius=5), [True, True])
    # one centre, two picks within the radius: one match; a pick at the radius: none (strict)
    np.testing.assert_array_equal(
        picking.match(np.array([[1.0, 0], [0, 2.0], [5.0, 0]]), np.array([[0.0, 0]]), 5),
        [True, False, False],
    )
    assert not picking.match(np.zeros((0, 2)), truth, 5).size


def test_precision_recall_curve_and_average_precision_by_hand():
    # perfect ranking: AP 1, whatever the scores
    p, r, t, ap = picking.precision_recall_curve([1, 1, 0, 0], [0.9, 0.8, 0.3, 0.1], 2)
    assert ap == 1.0
    # ranking: hit, miss, hit; 3 true particles: AP = (1 * 1 + 2/3 * 1) / 3
    p, r, t, ap = picking.precision_recall_curve([1, 0, 1], [3.0, 2.0, 1.0], 3)
    assert ap == pytest.approx((1 + 2 / 3) / 3)
    np.testing.assert_allclose(p, [1, 0.5, 2 / 3])
    np.testing.assert_allclose(r, [1 / 3, 1 / 3, 2 / 3])
    # tied scores form one step: precision 1/2 over both
    p, r, t, ap = picking.precision_recall_curve([0, 1], [1.0, 1.0], 1)
    assert ap == 0.5 and len(p) == 1


def test_patch_metrics_by_hand():
    L = 4
    truth = picking.PatchTruth(
        empty=np.array([True, True, True, False]),
        shift=np.array([[L, L], [L, L], [L, L], [1, 7]]),
        half=np.array([False, False, False, True]),
    )
    pred_empty = np.array([True, True, False, False])
    pred_shift = np.array([[L, L], [L, L], [0, 0], [0, 6]])  # offsets (0, 2) vs (-1, 1): ok
    m = picking.patch_metrics(pred_empty, pred_shift, truth, L)
    assert m["empty_f1"] == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))
    assert m["empty_f1_always"] == pytest.approx(2 * 0.75 / 1.75)
    assert m["shift_accuracy"] == 1.0
    pred_shift[3] = [3, 6]  # offset (-3, 2): two rows off
    assert picking.patch_metrics(pred_empty, pred_shift, truth, L)["shift_accuracy"] == 0.0


def test_star_round_trip(tmp_path):
    starfile = pytest.importorskip("starfile")
    picks = picking.Picks(
        centres=np.array([[10.5, 20.5], [3.0, 4.0], [7.0, 8.0]]),
        scores=np.array([5.0, -1.0, 2.0]),
        selected=np.array([True, False, True]),
        micrograph=np.array([0, 0, 1]),
        names=["a.mrc", "b.mrc"],
        angles=np.array([0.0, math.pi, math.pi / 2]),
        mirrored=np.zeros(3, dtype=bool),
        templates=np.array([0, 2, 1]),
        patches=np.array([-1, -1, -1]),
        L=28,
    )
    path = mtd.io.write_star(tmp_path / "picks.star", picks)
    df = starfile.read(path)
    assert list(df.columns) == [*mtd.io.star.STAR_COLUMNS, "rlnMicrographName"]
    np.testing.assert_allclose(df["rlnCoordinateX"], [20.5, 8.0])  # the column
    np.testing.assert_allclose(df["rlnCoordinateY"], [10.5, 7.0])  # the row
    np.testing.assert_allclose(df["rlnAnglePsi"], [0.0, 90.0])
    np.testing.assert_allclose(df["rlnAutopickFigureOfMerit"], [5.0, 2.0])
    assert list(df["rlnMicrographName"]) == ["a.mrc", "b.mrc"]
    back = mtd.io.read_star(path)
    np.testing.assert_allclose(back["rlnCoordinateX"], [20.5, 8.0])
    with pytest.raises(ValueError, match="does not exist"):
        mtd.io.write_star(tmp_path / "missing" / "picks.star", picks)
    assert not (tmp_path / "missing").exists()


def test_bad_input_is_refused_before_work():
    L = 5
    em = engine(L)
    M = np.zeros((15, 15))
    with pytest.raises(ValueError, match="estimate has shape"):
        picking.pick_posterior(em, M, np.ones((4, 4)), uniform_log_rho(L), 1.0)
    with pytest.raises(ValueError, match="smaller than"):
        picking.pick_posterior(em, np.zeros((3, 3)), np.ones((L, L)), uniform_log_rho(L), 1.0)
    with pytest.raises(ValueError, match="smaller than one particle"):
        picking.template_match(np.zeros((3, 3)), mtd.Rotations(L, 4), np.ones((L, L)) + np.eye(L))
    with pytest.raises(ValueError, match="empty_rule"):
        picking.pick_posterior(em, M, np.ones((L, L)), uniform_log_rho(L), 1.0, empty_rule="x")
    with pytest.raises(ValueError, match="threshold must be"):
        picking.pick_posterior(em, M, np.ones((L, L)), uniform_log_rho(L), 1.0, threshold="x")
    with pytest.raises(ValueError, match="combine must be one of"):
        picking.pick_posterior(em, M, np.ones((L, L)), uniform_log_rho(L), 1.0, combine="x")
    with pytest.raises(ValueError, match="constant"):
        picking.template_match(M, mtd.Rotations(L, 4), np.ones((L, L)))


@pytest.fixture
def small_case(tmp_path):
    """A micrograph file of a 5 x 5 image's rot90 copies, the image, and a STAR of the truth."""
    L, sigma = 5, 0.05
    rng = np.random.default_rng(5)
    F = 0.5 + rng.uniform(0, 1, (L, L))
    corners = [(1, 2), (1, 13), (12, 4), (13, 16)]  # well separated
    M = planted(F, 25, corners, [0, 1, 2, 3], sigma, seed=9)
    np.save(tmp_path / "M.npy", M)
    np.save(tmp_path / "F.npy", F)
    c = np.array(corners) + (L - 1) / 2
    pd = pytest.importorskip("pandas")
    import starfile

    table = pd.DataFrame({"rlnCoordinateX": c[:, 1], "rlnCoordinateY": c[:, 0]})
    starfile.write(table, tmp_path / "truth.star", overwrite=True)
    return tmp_path, c


@pytest.mark.parametrize("method", ["posterior", "posterior combine=nms", "template"])
def test_pick_py_writes_the_star_of_the_planted_centres(small_case, method, compose):
    from tasks.pick import pick

    d, centres = small_case
    method, *more = method.split()
    cfg = compose(
        "pick", f"micrograph={d / 'M.npy'}", f"estimate={d / 'F.npy'}", f"method={method}",
        f"truth={d / 'truth.star'}", "min_distance=3", *more, root=d,
    )  # fmt: skip
    metrics = pick(cfg)
    assert metrics["f1"] == 1.0 and metrics["ap"] == 1.0
    table = mtd.io.read_star(d / "out" / "picks.star")
    got = np.stack([table["rlnCoordinateY"], table["rlnCoordinateX"]], 1)
    np.testing.assert_allclose(np.sort(got, 0), np.sort(centres, 0))
    assert (d / "out" / "picks.png").stat().st_size > 0
    assert (d / "out" / "summary.json").exists()


def test_pick_py_bad_input_fails_before_writing(small_case, compose):
    from tasks.pick import pick

    d, _ = small_case
    np.save(d / "F4.npy", np.ones((4, 4)))
    np.save(d / "tiny.npy", np.zeros((3, 3)))
    base = [f"micrograph={d / 'M.npy'}", f"estimate={d / 'F.npy'}"]
    cases = [
        (["L=6"], "estimate .* is 5 x 5; L = 6"),
        ([f"micrograph={d / 'tiny.npy'}"], "smaller than one patch"),
        (["star=nowhere/picks.star"], "does not exist"),
        (["method=magic"], "method must be one of"),
        (["combine=vote"], "combine must be one of"),
        (["threshold=high"], "threshold must be a number, 'noise', 'auto' or null, got 'high'"),
        (["noise_draws=0"], "noise_draws must be an integer >= 1, got 0"),
    ]
    for extra, message in cases:
        cfg = compose("pick", *base, *extra, root=d)
        with pytest.raises(ValueError, match=message):
            pick(cfg)
        assert not list((d / "out").glob("*.star")) and not (d / "out" / "summary.json").exists()


@pytest.mark.slow
def test_posterior_picking_of_volume_projections():
    """Through the TransformSet seam only: the projections of a volume (mtd.groups.tomography), one
    pick per planted projection at high SNR, template indices in the STAR where there is no
    angle."""
    from mtd.forward.volumes import shepp_logan, simulate_volume
    from mtd.groups.tomography import projections
    from mtd.so3 import hopf_grid

    L = 11
    V = shepp_logan(L)
    group = projections(L, resolution=0)
    R, _ = hopf_grid(0)
    meas = simulate_volume(V, 11 * L, density=0.1, snr=20, seed=0, grid=R)
    em = mtd.ApproximateEM(group, dtype=torch.float64)
    x = group.from_image(V)
    log_rho, s2 = picking.fit_rho_sigma(em, meas.data, x, sigma=meas.sigma, iterations=3)
    picks, _ = picking.pick_posterior(em, meas.data, x, log_rho, s2)
    truth = meas.positions.numpy() + (L - 1) / 2
    m = picking.picking_metrics(picks, truth)
    assert m["f1"] == 1.0
    assert np.isnan(picks.angles).all()


def test_mirrored_copies_and_float32():
    """Dihedral templates: a mirrored copy is picked as the mirror image at its angle; a float32
    engine gives the same picks (its scores saturate lower)."""
    L, N, sigma = 5, 15, 0.01
    rng = np.random.default_rng(8)
    F = 0.5 + rng.uniform(0, 1, (L, L))
    M = planted(np.fliplr(F), N, [(6, 3)], [3], sigma, seed=4)  # rot90^3 of the mirror image
    for dtype in (torch.float64, torch.float32):
        em = mtd.ApproximateEM(mtd.Dihedral(L, 4), dtype=dtype)
        picks, _ = picking.pick_posterior(em, M, F, uniform_log_rho(L), sigma**2)
        got = picks.picked()
        assert len(got) == 1
        np.testing.assert_array_equal(got.centres[0], [8.0, 5.0])
        assert got.mirrored[0] and got.angles[0] == pytest.approx(3 * math.pi / 2)
        assert got.templates[0] == 4 + 3
        assert np.isfinite(got.scores).all()
