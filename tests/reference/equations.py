"""Approximate EM written the straightforward way: NumPy loops over patches, shifts and rotations.

Each function transcribes an equation of the papers with no FFT, no batching and no
sufficient-statistics shortcut. The tests compare the engine against it on tiny cases; the
benchmark times it as the baseline (it is the way the papers' research code computes an iteration).
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import ndimage


def rotate(F: np.ndarray, angle: float) -> np.ndarray:
    """Bilinear rotation about the centre, counter-clockwise (row axis pointing down).

    scipy's implementation (``scipy.ndimage.rotate``, order 1, zeros outside the image), not a
    transcription of ``mtd.groups.rotations``: a convention error there (the centre, the
    direction, the inverse map, the fill) is not repeated here. Its own convention is pinned by
    tests/reference/test_claims.py (an off-centre Gaussian blob turned by known angles, and
    np.rot90).
    """
    return ndimage.rotate(
        np.asarray(F, dtype=np.float64),
        math.degrees(angle),
        reshape=False,
        order=1,
        mode="grid-constant",
        cval=0.0,
        prefilter=False,
    )


def rotations(F: np.ndarray, K: int) -> list[np.ndarray]:
    """R_k F for k = 0..K-1 (np.rot90 where the angle is a multiple of pi/2)."""
    if K in (1, 2, 4):
        return [np.rot90(F, k * 4 // K).copy() for k in range(K)]
    return [rotate(F, 2 * math.pi * k / K) for k in range(K)]


def patches(M: np.ndarray, L: int) -> list[np.ndarray]:
    """The non-overlapping L x L patches, row by row."""
    n0, n1 = M.shape[0] // L, M.shape[1] // L
    return [M[a * L : (a + 1) * L, b * L : (b + 1) * L] for a in range(n0) for b in range(n1)]


def crop_shift(RF: np.ndarray, lx: int, ly: int) -> np.ndarray:
    """C T_l Z (R F): zero-pad to 2L x 2L, shift circularly by l, keep the top-left L x L."""
    L = RF.shape[0]
    Z = np.zeros((2 * L, 2 * L))
    Z[:L, :L] = RF
    return np.roll(Z, (-lx, -ly), axis=(0, 1))[:L, :L]


def crop_shift_adjoint(X: np.ndarray, lx: int, ly: int) -> np.ndarray:
    """(C T_l Z)^T X: put the patch back where it was cut from, keep the image's L x L."""
    L = X.shape[0]
    Z = np.zeros((2 * L, 2 * L))
    Z[:L, :L] = X
    return np.roll(Z, (lx, ly), axis=(0, 1))[:L, :L]


def dihedral(F: np.ndarray, K: int) -> list[np.ndarray]:
    """R_k F, then R_k of the mirror image (columns reversed): 2K templates."""
    return rotations(F, K) + rotations(np.fliplr(F).copy(), K)


def log_likelihoods(patch_list, F, sigma, K, templates=rotations) -> np.ndarray:
    """-||M_m - C T_l Z T_k F||^2 / (2 sigma^2) for every (m, k, l), eq. (10): (D, K, 2L, 2L).

    ``templates(F, K)`` lists the T_k F: the rotations, or ``dihedral`` (then 2K of them).
    """
    L = F.shape[0]
    RF = templates(F, K)
    K = len(RF)
    out = np.empty((len(patch_list), K, 2 * L, 2 * L))
    for m, Mm in enumerate(patch_list):
        for k in range(K):
            for lx in range(2 * L):
                for ly in range(2 * L):
                    r = Mm - crop_shift(RF[k], lx, ly)
                    out[m, k, lx, ly] = -np.sum(r * r) / (2 * sigma**2)
    return out


def e_step(patch_list, F, rho, sigma, K, templates=rotations):
    """Posteriors and approximate log-likelihood (with the Gaussian normalisation)."""
    L = F.shape[0]
    ll = log_likelihoods(patch_list, F, sigma, K, templates)
    D, K = len(patch_list), ll.shape[1]
    w = np.empty_like(ll)
    total = 0.0
    for m in range(D):
        a = ll[m] + np.log(rho)[None] - math.log(K)
        top = a.max()
        s = np.exp(a - top).sum()
        w[m] = np.exp(a - top) / s
        total += top + math.log(s) - 0.5 * L * L * math.log(2 * math.pi * sigma**2)
    return w, total


def statistics(w, patch_list, K):
    """omega_k(l), b_k = sum w (C T_l Z)^T M_m, c_k = sum w (C T_l Z)^T 1 by loops (DESIGN 4)."""
    L = patch_list[0].shape[0]
    omega = w.sum(0)
    b = np.zeros((K, L, L))
    c = np.zeros((K, L, L))
    ones = np.ones((L, L))
    for k in range(K):
        for lx in range(2 * L):
            for ly in range(2 * L):
                for m, Mm in enumerate(patch_list):
                    b[k] += w[m, k, lx, ly] * crop_shift_adjoint(Mm, lx, ly)
                c[k] += omega[k, lx, ly] * crop_shift_adjoint(ones, lx, ly)
    return omega, b, c


@functools.cache
def rotation_matrix(L: int, K: int, k: int) -> np.ndarray:
    """The L^2 x L^2 matrix of R_k, column by column."""
    eye = np.eye(L * L)
    return np.stack([rotations(eye[q].reshape(L, L), K)[k].ravel() for q in range(L * L)], 1)


def operator(L, K, k, lx, ly) -> np.ndarray:
    """The L^2 x L^2 matrix of C T_l Z R_k."""
    eye = np.eye(L * L)
    shift = np.stack([crop_shift(eye[q].reshape(L, L), lx, ly).ravel() for q in range(L * L)], 1)
    return shift @ rotation_matrix(L, K, k)


def closed_form_m_step(w, patch_list, K) -> np.ndarray:
    """argmax_F Q: solve sum w A^T A F = sum w A^T M_m, A = C T_l Z R_k (eq. 16 set to zero)."""
    L = patch_list[0].shape[0]
    lhs = np.zeros((L * L, L * L))
    rhs = np.zeros(L * L)
    for k in range(K):
        for lx in range(2 * L):
            for ly in range(2 * L):
                A = operator(L, K, k, lx, ly)
                for m, Mm in enumerate(patch_list):
                    lhs += w[m, k, lx, ly] * A.T @ A
                    rhs += w[m, k, lx, ly] * A.T @ Mm.ravel()
    return np.linalg.solve(lhs, rhs).reshape(L, L)


def grad_q(w, patch_list, F, sigma, K) -> np.ndarray:
    """grad_F of eq. (16): sum w R_k^T Z^T T_l^T C^T (M_m - C T_l Z R_k F) / sigma^2, by loops."""
    L = F.shape[0]
    g = np.zeros(L * L)
    for k in range(K):
        for lx in range(2 * L):
            for ly in range(2 * L):
                A = operator(L, K, k, lx, ly)
                for m, Mm in enumerate(patch_list):
                    g += w[m, k, lx, ly] * A.T @ (Mm.ravel() - A @ F.ravel())
    return g.reshape(L, L) / sigma**2


def iteration(patch_list, F, rho, sigma, K):
    """One EM iteration as research code runs it: a Python loop over patches and shifts.

    The K rotated, shifted and cropped templates are formed once per iteration; inside the loops
    NumPy works on the K rotations at once. Returns the closed-form estimate (eq. 16 set to zero),
    the new rho (eq. 18) and the log-likelihood (eq. 5).
    """
    L = F.shape[0]
    P = 2 * L
    RF = rotations(F, K)
    T = np.stack(
        [[crop_shift(RF[k], lx, ly) for k in range(K)] for lx in range(P) for ly in range(P)]
    )
    log_prior = np.log(rho).ravel() - math.log(K)  # (4L^2,)
    const = 0.5 * L * L * math.log(2 * math.pi * sigma**2)
    b = np.zeros((K, L, L))
    omega = np.zeros((P * P, K))
    total = 0.0
    for Mm in patch_list:
        ll = np.empty((P * P, K))
        for l in range(P * P):  # eq. (10) for the K rotations at once
            ll[l] = -((Mm - T[l]) ** 2).sum((1, 2)) / (2 * sigma**2)
        a = ll + log_prior[:, None]  # eq. (11)
        top = a.max()
        e = np.exp(a - top)
        s = e.sum()
        w = e / s
        total += top + math.log(s) - const
        omega += w
        for l in range(P * P):  # back-projection of the patch for each shift
            back = crop_shift_adjoint(Mm, l // P, l % P)
            b += w[l][:, None, None] * back
    c = np.zeros((K, L, L))
    ones = np.ones((L, L))
    for l in range(P * P):
        c += omega[l][:, None, None] * crop_shift_adjoint(ones, l // P, l % P)
    R = [rotation_matrix(L, K, k) for k in range(K)]
    lhs = sum(R[k].T @ np.diag(c[k].ravel()) @ R[k] for k in range(K))
    rhs = sum(R[k].T @ b[k].ravel() for k in range(K))
    rho_new = omega.sum(1).reshape(P, P) / len(patch_list)
    return np.linalg.solve(lhs, rhs).reshape(L, L), rho_new, total
