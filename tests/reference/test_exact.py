"""The engine against a straightforward implementation of the papers' equations (reference.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mtd
from tests.reference import equations as ref

CASES = [(L, K) for L in (3, 4, 5, 6) for K in (1, 4, 8)]


def tiny_case(L, K, rng, n=3, snr=2.0):
    """A float64 measurement of n x n patches holding a random image, and a random estimate."""
    image = rng.uniform(0, 1, (L, L))
    meas = mtd.simulate(
        image, n * L + 1, density=0.12, snr=snr, K=K, seed=int(rng.integers(1 << 30))
    )
    data = meas.data.numpy()[: n * L, : n * L]  # whole patches only
    F = image + 0.3 * rng.standard_normal((L, L))
    rho = rng.uniform(0.5, 1.5, (2 * L, 2 * L))
    return data, F, rho / rho.sum(), meas.sigma


def engine(L, K, method, chunk_size=None, group=mtd.Rotations):
    compute = mtd.Compute(method=method, chunk_size=chunk_size)
    return mtd.ApproximateEM(group(L, K), compute=compute, dtype=torch.float64)


def assert_statistics_equal(stats, w, loglik, patch_list):
    """The engine's statistics equal those of the brute-force posteriors w (D, K, 2L, 2L)."""
    omega, b, c = ref.statistics(w, patch_list, w.shape[1])
    np.testing.assert_allclose(stats.omega.numpy(), omega, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats.b.numpy(), b, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats.c.numpy(), c, rtol=1e-9, atol=1e-12)
    assert float(stats.loglik) == pytest.approx(loglik, rel=1e-10)
    return omega, b, c


@pytest.mark.parametrize("method", ["fft", "gemm"])
@pytest.mark.parametrize("L,K", CASES)
def test_log_likelihoods_equal_direct_formula(L, K, method, rng):
    data, F, _, sigma = tiny_case(L, K, rng)
    ours = engine(L, K, method).log_likelihoods(data, torch.from_numpy(F), sigma).numpy()
    direct = ref.log_likelihoods(ref.patches(data, L), F, sigma, K)
    np.testing.assert_allclose(ours, direct, rtol=1e-9, atol=1e-9 * np.abs(direct).max())


@pytest.mark.parametrize("method", ["fft", "gemm"])
@pytest.mark.parametrize("L,K", CASES)
def test_e_step_statistics_equal_brute_force(L, K, method, rng):
    data, F, rho, sigma = tiny_case(L, K, rng)
    em = engine(L, K, method, chunk_size=2)
    stats = em.e_step(
        em.prepare(data), torch.from_numpy(F), torch.from_numpy(np.log(rho)), sigma**2
    )
    w, loglik = ref.e_step(ref.patches(data, L), F, rho, sigma, K)
    assert_statistics_equal(stats, w, loglik, ref.patches(data, L))


@pytest.mark.parametrize("method", ["fft", "gemm"])
@pytest.mark.parametrize(
    "snr,rare,f_scale,shift,clamp",
    [
        (0.5, 1, 1, False, False),  # low SNR: exp(logits) directly
        (0.5, 1e-300, 1, False, True),  # a shift of rho ~ 0 spreads the logits below log(tiny)
        (300.0, 1, 1, True, True),  # high SNR: logits beyond exp's range, widely spread
        (300.0, 1, 1e-4, True, False),  # beyond exp's range, narrowly spread
    ],
)
def test_logit_bounds_hold_and_every_log_sum_exp_path_is_exact(
    snr, rare, f_scale, shift, clamp, method, rng
):
    # The E-step drops the log-sum-exp's max, subtraction and clamp where _templates' bounds on
    # the logits show they are not needed: the bounds must hold, pick the expected path, and
    # every path must give the brute-force statistics.
    L, K = 5, 4
    data, F, rho, sigma = tiny_case(L, K, rng, n=4, snr=snr)
    F, rho[0, 0] = F * f_scale, rho[0, 0] * rare
    em = engine(L, K, method, chunk_size=3)
    patches = em.prepare(data)
    F_t, log_rho = torch.from_numpy(F), torch.from_numpy(np.log(rho))
    _, blocks = em.estep.chunking(patches.D)
    _, (low, high, spread) = em.estep._templates(patches, F_t, log_rho, sigma**2, blocks)
    ll = em.log_likelihoods(patches, F_t, sigma).reshape(patches.D, K, -1)
    # The logits of the E-step: log p + log rho + log pi + ||M||^2 / (2 sigma^2).
    bias = torch.from_numpy(np.log(rho)).reshape(1, 1, -1) - math.log(K)
    logits = (ll + bias).reshape(patches.D, -1) + patches.energy.view(-1, 1) / (2 * sigma**2)
    top, bottom = logits.amax(1), logits.amin(1)
    assert low - 1e-9 <= float(top.min()) and float(top.max()) <= high + 1e-9
    assert float((top - bottom).max()) <= spread * (1 + 1e-12)
    passes = mtd.em.estep._log_sum_exp_passes(torch.float64, K * 4 * L * L, low, high, spread)
    assert passes[:2] == (shift, clamp)
    stats = em.e_step(patches, F_t, log_rho, sigma**2)
    w, loglik = ref.e_step(ref.patches(data, L), F, rho, sigma, K)
    omega, b, _ = ref.statistics(w, ref.patches(data, L), K)
    np.testing.assert_allclose(stats.omega.numpy(), omega, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats.b.numpy(), b, rtol=1e-9, atol=1e-12)
    assert float(stats.loglik) == pytest.approx(loglik, rel=1e-10)


@pytest.mark.parametrize("L,K", [(4, 4), (5, 8), (3, 1)])
def test_posteriors_of_each_patch_equal_brute_force(L, K, rng):
    # The engine never holds posteriors; on a one-patch measurement omega is that patch's
    # posterior.
    data, F, rho, sigma = tiny_case(L, K, rng)
    w, _ = ref.e_step(ref.patches(data, L), F, rho, sigma, K)
    em = engine(L, K, "auto")
    for m, patch in enumerate(ref.patches(data, L)):
        stats = em.e_step(
            em.prepare(patch), torch.from_numpy(F), torch.from_numpy(np.log(rho)), sigma**2
        )
        np.testing.assert_allclose(stats.omega.numpy(), w[m], rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("L,K", [(4, 4), (5, 8), (6, 1), (3, 3)])
def test_m_steps_and_rho_equal_brute_force(L, K, rng):
    data, F, rho, sigma = tiny_case(L, K, rng)
    patch_list = ref.patches(data, L)
    w, _ = ref.e_step(patch_list, F, rho, sigma, K)
    em = mtd.ApproximateEM(mtd.Rotations(L, K), mtd.Gradient(lr=1e-3), dtype=torch.float64)
    Ft = torch.from_numpy(F)
    stats = em.e_step(em.prepare(data), Ft, torch.from_numpy(np.log(rho)), sigma**2)
    # Closed form: the solution of the normal equations built from the operators themselves.
    np.testing.assert_allclose(
        em.closed_form(stats, Ft).numpy(), ref.closed_form_m_step(w, patch_list, K), rtol=1e-8
    )
    # Gradient of Q, and one step of eq. (18) with a prior: the Gradient M-step at iteration
    # tau = 2 of T = 5 weighs the score by the paper's linspace(0, 1, 5)[2] = 0.5.
    g = ref.grad_q(w, patch_list, F, sigma, K)
    np.testing.assert_allclose(em.grad_q(stats, Ft, sigma**2).numpy(), g, rtol=1e-9, atol=1e-9)
    mu = rng.uniform(0, 1, (L, L))
    prior = lambda x, t: -(x - torch.from_numpy(mu))  # noqa: E731  the score of N(mu, I)
    stepped, info = em.m_step.step(em.group, stats, Ft, sigma**2, 2, 5, prior)
    expected = F + 1e-3 * (g + np.linspace(0, 1, 5)[2] * -(F - mu))
    np.testing.assert_allclose(stepped.numpy(), expected, rtol=1e-10, atol=1e-12)
    assert info["gamma"] == 0.5 and info["lr"] == 1e-3
    # rho, eq. (18) of the approximate-EM paper, as the EM loop updates it: one iteration from
    # the uniform rho (fit's start) gives the posteriors' mean shift occupancy.
    uniform = np.full((2 * L, 2 * L), 1 / (4 * L * L))
    w0, _ = ref.e_step(patch_list, F, uniform, sigma, K)
    loop = mtd.ApproximateEM(mtd.Rotations(L, K), sigma=sigma, iterations=1, dtype=torch.float64)
    res = loop.fit(data, Ft)
    np.testing.assert_allclose(res.rho.numpy(), w0.sum((0, 1)) / len(w0), rtol=1e-9, atol=1e-15)
    shifts = np.arange(2 * L)
    empty = (shifts[:, None] == L) | (shifts[None, :] == L)  # l_x = L or l_y = L: a blank crop
    mass = w0.sum((0, 1))[empty].sum() / len(w0)
    assert res.history[0]["empty_mass"] == pytest.approx(mass, rel=1e-9)


@pytest.mark.parametrize("L,K", [(4, 4), (5, 8)])
def test_gradient_of_q_equals_autograd(L, K, rng):
    data, F, rho, sigma = tiny_case(L, K, rng)
    patch_list = ref.patches(data, L)
    w, _ = ref.e_step(patch_list, F, rho, sigma, K)
    em = mtd.ApproximateEM(mtd.Rotations(L, K), dtype=torch.float64)
    x = torch.from_numpy(F).requires_grad_(True)
    RF = em.group(x)
    q = 0.0  # eq. (16), summed term by term
    for m, Mm in enumerate(patch_list):
        for k in range(K):
            Z = torch.zeros(2 * L, 2 * L, dtype=torch.float64)
            Z[:L, :L] = RF[k]
            for lx in range(2 * L):
                for ly in range(2 * L):
                    win = torch.roll(Z, (-lx, -ly), (0, 1))[:L, :L]
                    q = q - w[m, k, lx, ly] * ((torch.from_numpy(Mm) - win) ** 2).sum() / (
                        2 * sigma**2
                    )
    (grad,) = torch.autograd.grad(q, x)
    stats = em.e_step(em.prepare(data), x.detach(), torch.from_numpy(np.log(rho)), sigma**2)
    np.testing.assert_allclose(
        em.grad_q(stats, x.detach(), sigma**2).numpy(), grad.numpy(), rtol=1e-9
    )
    # Q from the statistics is the same sum (eq. 16).
    assert float(em.q_function(stats, x.detach(), sigma**2)) == pytest.approx(
        float(q.detach()), rel=1e-10
    )


def test_one_gradient_iteration_is_eq_18(rng):
    L, K = 4, 4
    data, F, _, sigma = tiny_case(L, K, rng)
    mu = torch.from_numpy(rng.uniform(0, 1, (L, L)))
    prior = lambda x, t: -(x - mu)  # noqa: E731
    em = mtd.ApproximateEM(
        mtd.Rotations(L, K),
        mtd.Gradient(lr=1e-3, gamma=mtd.ConstantGamma(0.7)),
        sigma=sigma,
        rho="uniform",
        iterations=1,
        dtype=torch.float64,
    )
    res = em.fit(data, F, prior=prior)
    rho = np.full((2 * L, 2 * L), 1 / (4 * L * L))
    w, _ = ref.e_step(ref.patches(data, L), F, rho, sigma, K)
    expected = F + 1e-3 * (
        ref.grad_q(w, ref.patches(data, L), F, sigma, K) + 0.7 * -(F - mu.numpy())
    )
    np.testing.assert_allclose(res.estimate.numpy(), expected, rtol=1e-10)


def test_reference_iteration_matches_engine(rng):
    """The benchmark's baseline computes the same iteration as the engine's loop."""
    L, K = 4, 4
    data, F, _, sigma = tiny_case(L, K, rng)
    rho = np.full((2 * L, 2 * L), 1 / (4 * L * L))  # where fit starts
    F_ref, rho_ref, loglik = ref.iteration(ref.patches(data, L), F, rho, sigma, K)
    em = mtd.ApproximateEM(mtd.Rotations(L, K), sigma=sigma, iterations=1, dtype=torch.float64)
    res = em.fit(data, torch.from_numpy(F))
    np.testing.assert_allclose(res.estimate.numpy(), F_ref, rtol=1e-9)
    np.testing.assert_allclose(res.rho.numpy(), rho_ref, rtol=1e-9)
    assert float(res.loglik[0]) == pytest.approx(loglik, rel=1e-10)
    assert res.history[0]["delta"] == pytest.approx(np.linalg.norm(F_ref - F), rel=1e-9)


@pytest.mark.parametrize("L,K", [(5, 4), (4, 8)])
def test_chunk_size_does_not_change_results(L, K, rng):
    image = rng.uniform(0, 1, (L, L))
    meas = mtd.simulate(image, 12 * L, snr=3.0, K=K, seed=3)
    init = torch.from_numpy(image + 0.2 * rng.standard_normal((L, L)))
    runs = []
    for method in ("fft", "gemm"):
        for chunk in (1, 7, None, 10**6):
            compute = mtd.Compute(method=method, chunk_size=chunk)
            em = mtd.ApproximateEM(
                mtd.Rotations(L, K), iterations=4, compute=compute, dtype=torch.float64
            )
            runs.append(em.fit(meas.data, init))
    for r in runs[1:]:
        assert torch.allclose(r.estimate, runs[0].estimate, rtol=0, atol=1e-10)
        assert torch.allclose(r.loglik, runs[0].loglik, rtol=1e-12, atol=1e-10)
        assert abs(r.sigma - runs[0].sigma) < 1e-10


def test_sigma_estimate_maximises_q_at_the_new_estimate(rng):
    # sigma=None: the M-step's sigma^2 is argmax of Q (eq. 16 with its -D L^2 / 2 log sigma^2)
    # at the new estimate, the mean squared residual of the patches under the posteriors of the
    # E-step, sum_m sum_{l,k} w ||M_m - C T_l Z R_k F_new||^2 / (D L^2). Brute force: the
    # posteriors at the first E-step (uniform rho, sigma^2 = the patches' mean power), the
    # closed-form F_new, the residual by loops.
    L, K = 5, 4
    data, F, _, _ = tiny_case(L, K, rng)
    patch_list = ref.patches(data, L)
    sigma0 = math.sqrt(np.square(data).mean())
    w, _ = ref.e_step(patch_list, F, np.full((2 * L, 2 * L), 1 / (4 * L * L)), sigma0, K)
    F_new = ref.closed_form_m_step(w, patch_list, K)

    def mean_residual(X):
        RX = ref.rotations(X, K)
        total = sum(
            w[m, k, lx, ly] * np.square(Mm - ref.crop_shift(RX[k], lx, ly)).sum()
            for m, Mm in enumerate(patch_list)
            for k in range(K)
            for lx in range(2 * L)
            for ly in range(2 * L)
        )
        return total / (len(patch_list) * L * L)

    expected = mean_residual(F_new)
    assert abs(mean_residual(F) / expected - 1) > 0.05  # the old estimate's would differ
    em = mtd.ApproximateEM(mtd.Rotations(L, K), sigma=None, iterations=1, dtype=torch.float64)
    res = em.fit(data, torch.from_numpy(F))
    np.testing.assert_allclose(res.estimate.numpy(), F_new, rtol=1e-8)
    assert res.history[0]["sigma"] ** 2 == pytest.approx(expected, rel=1e-9)
    assert res.sigma**2 == pytest.approx(expected, rel=1e-9)


# ------------------------------------------------------------------------------------------------
# A second group through the same E-step: rotations and mirror images (mtd.Dihedral)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["fft", "gemm"])
@pytest.mark.parametrize("L,K", [(4, 4), (5, 1), (5, 3)])
def test_dihedral_e_step_and_m_step_equal_brute_force(L, K, method, rng):
    # The templates of the reference are np.rot90 / bilinear rotations of F and of np.fliplr(F),
    # not the engine's gather tables.
    image = rng.uniform(0, 1, (L, L))
    meas = mtd.simulate(image, 3 * L + 1, density=0.12, snr=2.0, K=K, reflect=True, seed=5)
    data = meas.data.numpy()[: 3 * L, : 3 * L]
    F = image + 0.3 * rng.standard_normal((L, L))
    rho = rng.uniform(0.5, 1.5, (2 * L, 2 * L))
    rho /= rho.sum()
    em = engine(L, K, method, chunk_size=2, group=mtd.Dihedral)
    assert em.K == 2 * K
    Ft = torch.from_numpy(F)
    stats = em.e_step(em.prepare(data), Ft, torch.from_numpy(np.log(rho)), meas.sigma**2)
    patch_list = ref.patches(data, L)
    w, loglik = ref.e_step(patch_list, F, rho, meas.sigma, K, ref.dihedral)
    omega, b, c = assert_statistics_equal(stats, w, loglik, patch_list)
    # The closed-form M-step: argmax of Q summed term by term over the 2K templates.
    A, rhs = np.zeros((L * L, L * L)), np.zeros(L * L)
    eye = np.eye(L * L)
    T = np.stack([np.stack(ref.dihedral(eye[q].reshape(L, L), K)) for q in range(L * L)], -1)
    T = T.reshape(2 * K, L * L, L * L)  # T[k] is the matrix of template k
    for k in range(2 * K):
        A += T[k].T @ np.diag(c[k].ravel()) @ T[k]
        rhs += T[k].T @ b[k].ravel()
    expected = np.linalg.solve(A, rhs).reshape(L, L)
    np.testing.assert_allclose(em.closed_form(stats, Ft).numpy(), expected, rtol=1e-8, atol=1e-10)


def test_dihedral_em_recovers_a_chiral_image_from_mirrored_copies():
    # A chiral image (no rotation maps it to its mirror image): with mirrored copies in the
    # measurement, EM over rotations alone mixes the two faces; over the dihedral group it
    # separates them, and the error minimised over the group is small.
    L = 5
    image = torch.zeros(L, L, dtype=torch.float64)
    image[0, :3], image[1:4, 0], image[2, 1], image[4, 3] = 2.0, 1.5, 1.0, 3.0
    meas = mtd.simulate(image, 220, snr=50.0, K=4, reflect=True, seed=3)
    assert 0.3 < float(meas.reflections.double().mean()) < 0.7
    init = torch.full((L, L), float(image.mean()), dtype=torch.float64) + 0.1 * torch.rand(
        L, L, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    errors = {}
    for name, group in (("rot", mtd.Rotations(L, 4)), ("dih", mtd.Dihedral(L, 4))):
        em = mtd.ApproximateEM(group, iterations=100, dtype=torch.float64)
        res = em.fit(meas.data, init)
        errors[name] = mtd.relative_error(image, res.estimate, group=mtd.Dihedral(L, 4))
    assert errors["dih"] < 0.05, errors
    assert errors["rot"] > 2 * errors["dih"], errors


# ------------------------------------------------------------------------------------------------
# The stream of posteriors: template blocks, per-patch summaries
# ------------------------------------------------------------------------------------------------
def _blocked(em, budget):
    """Force template blocks: a chunk budget below K x 4L^2 elements."""
    em.estep.form.cpu_chunk_elements = em.estep.form.cpu_max_elements = budget
    return em


@pytest.mark.parametrize("method", ["fft", "gemm"])
@pytest.mark.parametrize("L,K", [(4, 8), (5, 7)])
def test_template_blocks_equal_brute_force(L, K, method, rng):
    # K x 4L^2 above the chunk budget: the log-sum-exp streams across template blocks (two
    # passes); statistics and log-likelihood must equal brute force as in one block.
    data, F, rho, sigma = tiny_case(L, K, rng)
    em = _blocked(engine(L, K, method, chunk_size=2), budget=6 * 4 * L * L)
    chunk, blocks = em.estep.chunking(9)
    assert len(blocks) > 1 and all(
        (b.stop - b.start) % em.estep.form.pair == 0 for b in blocks[:-1]
    )
    stats = em.e_step(
        em.prepare(data), torch.from_numpy(F), torch.from_numpy(np.log(rho)), sigma**2
    )
    w, loglik = ref.e_step(ref.patches(data, L), F, rho, sigma, K)
    assert_statistics_equal(stats, w, loglik, ref.patches(data, L))
    ll = em.log_likelihoods(data, torch.from_numpy(F), sigma).numpy()
    direct = ref.log_likelihoods(ref.patches(data, L), F, sigma, K)
    np.testing.assert_allclose(ll, direct, rtol=1e-9, atol=1e-9 * np.abs(direct).max())


@pytest.mark.parametrize("blocked", [False, True])
@pytest.mark.parametrize("method", ["fft", "gemm"])
def test_patch_summaries_equal_brute_force_and_sum_to_the_statistics(method, blocked, rng):
    L, K = 4, 5
    data, F, rho, sigma = tiny_case(L, K, rng, snr=8.0)
    em = engine(L, K, method, chunk_size=2)
    if blocked:
        em = _blocked(engine(L, K, method, chunk_size=2), budget=4 * 4 * L * L)
        assert len(em.estep.chunking(9)[1]) > 1
    patches = em.prepare(data)
    Ft, log_rho = torch.from_numpy(F), torch.from_numpy(np.log(rho))
    s = em.summaries(patches, Ft, log_rho, sigma**2)
    w, _ = ref.e_step(ref.patches(data, L), F, rho, sigma, K)  # (D, K, 2L, 2L)
    D = len(w)
    # Per patch: the log-likelihood, the empty mass, the best shift of the posterior summed over
    # templates, the best (template, shift) jointly, and their probabilities.
    ll = ref.log_likelihoods(ref.patches(data, L), F, sigma, K) + np.log(rho)[None, None]
    ll = ll - math.log(K) - 0.5 * L * L * math.log(2 * math.pi * sigma**2)
    top = ll.reshape(D, -1).max(1)
    lse = top + np.log(np.exp(ll.reshape(D, -1) - top[:, None]).sum(1))
    np.testing.assert_allclose(s.loglik.numpy(), lse, rtol=1e-10)
    marginal = w.sum(1)  # (D, 2L, 2L)
    empty = np.array([[lx == L or ly == L for ly in range(2 * L)] for lx in range(2 * L)])
    np.testing.assert_allclose(s.empty.numpy(), marginal[:, empty].sum(1), rtol=1e-9, atol=1e-14)
    best_shift = np.stack(np.unravel_index(marginal.reshape(D, -1).argmax(1), (2 * L, 2 * L)), 1)
    np.testing.assert_array_equal(s.shift.numpy(), best_shift)
    np.testing.assert_allclose(s.shift_prob.numpy(), marginal.reshape(D, -1).max(1), rtol=1e-9)
    # The joint best: at an empty shift every template ties, so check the value it points at.
    k, lx, ly = s.best.numpy().T
    np.testing.assert_allclose(w[np.arange(D), k, lx, ly], w.reshape(D, -1).max(1), rtol=1e-9)
    np.testing.assert_allclose(s.best_prob.numpy(), w.reshape(D, -1).max(1), rtol=1e-9)
    occupied = ~empty[lx, ly]
    assert occupied.any()  # the patches with a copy: their best template is unique
    joint = np.stack(np.unravel_index(w.reshape(D, -1).argmax(1), w.shape[1:]), 1)
    np.testing.assert_array_equal(s.best.numpy()[occupied], joint[occupied])
    # Summed over patches the summaries are the statistics: the log-likelihood, and the
    # occupancy's mass on the empty shifts.
    stats = em.e_step(patches, Ft, log_rho, sigma**2)
    assert float(s.loglik.sum()) == pytest.approx(float(stats.loglik), rel=1e-12)
    empty_t = torch.from_numpy(empty)
    assert float(s.empty.sum()) == pytest.approx(
        float(stats.omega.sum(0)[empty_t].sum()), rel=1e-10
    )


class _Weighted(mtd.Rotations):
    """Rotations with a given prior weight per template (zeros allowed)."""

    def __init__(self, L, K, weights):
        super().__init__(L, K)
        self.w = torch.tensor(weights, dtype=torch.float64)

    def log_weights(self):
        return self.w.log().to(self.device)


@pytest.mark.parametrize("zeros_first", [True, False])
def test_template_blocks_with_zero_prior_weights_equal_one_block(zeros_first, rng):
    # A block whose templates all have prior weight 0 holds only -inf logits: the streamed
    # log-sum-exp must skip it, not turn it into NaN.
    L, K = 5, 4
    data, F, rho, sigma = tiny_case(L, K, rng)
    weights = [0, 0, 0.5, 0.5] if zeros_first else [0.5, 0.5, 0, 0]
    stats = {}
    for blocked in (False, True):
        compute = mtd.Compute(method="gemm", chunk_size=8)
        em = mtd.ApproximateEM(_Weighted(L, K, weights), compute=compute, dtype=torch.float64)
        if blocked:
            _blocked(em, budget=3 * 4 * L * L)  # below one patch's K x 4L^2: blocks of one
            assert len(em.estep.chunking(9)[1]) == 4
        stats[blocked] = em.e_step(
            em.prepare(data), torch.from_numpy(F), torch.from_numpy(np.log(rho)), sigma**2
        )
    assert math.isfinite(float(stats[True].loglik))
    assert float(stats[True].loglik) == pytest.approx(float(stats[False].loglik), rel=1e-12)
    torch.testing.assert_close(stats[True].omega, stats[False].omega, rtol=1e-9, atol=1e-12)


def test_a_large_chunk_size_does_not_cut_the_templates():
    # chunk_size sets patches per chunk; the templates are cut only when one patch's K x 4L^2
    # exceed the budget.
    em = engine(11, 4, "fft", chunk_size=1000)
    assert em.estep.chunking(4096) == (1000, [slice(0, 4)])
