"""The Fourier shell correlation of two volumes (eq. 38 of the stochastic-EM paper), on shells of
width one index unit up to the largest shell inside the cube (floor(L / 2); Nyquist for even L),
with the 0.5 (the paper's cutoff) and 0.143 crossings interpolated linearly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from mtd.metrics.volumes import as_volume
from mtd.so3 import ball_mask


def shell_index(L: int, device=None) -> torch.Tensor:
    """(L, L, L) int64 shell round(|k|) of every FFT index, k the integer frequency (fftfreq L)."""
    k = torch.fft.fftfreq(L, d=1.0 / L, device=device, dtype=torch.float64)
    k0, k1, k2 = torch.meshgrid(k, k, k, indexing="ij")
    return torch.round(torch.sqrt(k0**2 + k1**2 + k2**2)).to(torch.int64)


@dataclass
class FSCCurve:
    """A Fourier shell correlation curve, eq. (38) of the stochastic-EM paper.

    Attributes:
        shells: (S,) shell radii in index units 0 .. floor(L / 2).
        frequency: (S,) shell frequencies in 1/Angstrom, shell / (L voxel_size).
        fsc: (S,) correlations (0 where either volume's shell holds no power, below 1e-24 of
            its total).
        n_voxels: (S,) Fourier voxels in each shell.
        crossings: {threshold: (frequency in 1/A, resolution 1/frequency in A)} or (None, None)
            where the curve never drops below the threshold.
        voxel_size: Angstrom per voxel.
        mask: description of the real-space mask applied to both volumes before the FFT.
    """

    shells: np.ndarray
    frequency: np.ndarray
    fsc: np.ndarray
    n_voxels: np.ndarray
    crossings: dict
    voxel_size: float
    mask: str

    def resolution(self, threshold: float = 0.5) -> float | None:
        """1 / (the crossing frequency) in Angstrom at ``threshold``, None if never crossed."""
        return self.crossings[threshold][1]

    def to_dict(self) -> dict:
        """Plain values for summary.json."""
        return {
            "frequency": self.frequency.tolist(),
            "fsc": self.fsc.tolist(),
            "n_voxels": self.n_voxels.tolist(),
            "voxel_size": self.voxel_size,
            "mask": self.mask,
            "cutoff": "shells 0 .. floor(L/2) (Nyquist 1/(2 voxel_size) for even L)",
            # JSON has no inf: a curve below the threshold already at shell 0 has frequency 0
            # and resolution None, one that never drops below it None for both
            **{
                f"resolution_{thr:g}": None if c[1] is None or math.isinf(c[1]) else c[1]
                for thr, c in self.crossings.items()
            },
            **{f"frequency_{thr:g}": c[0] for thr, c in self.crossings.items()},
        }


def fsc_crossing(frequency, curve, threshold: float) -> float | None:
    """The first frequency where ``curve`` drops below ``threshold``, linear between shells.

    Shell 0 (the mean) is a single voxel and its correlation is only its sign; the search starts at
    shell 1, interpolating from shell 0. If the curve is already below at shell 0, the crossing is
    frequency 0 (resolution infinite); if it never drops below, None.
    """
    f, c = np.asarray(frequency, dtype=np.float64), np.asarray(curve, dtype=np.float64)
    if c[0] < threshold:
        return 0.0
    for s in range(1, len(c)):
        if c[s] < threshold:
            a = (c[s - 1] - threshold) / (c[s - 1] - c[s])
            return float(f[s - 1] + a * (f[s] - f[s - 1]))
    return None


def fsc(
    a,
    b,
    voxel_size: float = 1.0,
    mask: str | None = "soft",
    mask_radius: float | None = None,
    mask_edge: float = 2.0,
    thresholds=(0.5, 0.143),
) -> FSCCurve:
    """Fourier shell correlation of two volumes (eq. 38), float64 FFT.

    FSC(r) = Re sum_{k in S_r} A(k) conj(B(k)) / sqrt(sum |A|^2 sum |B|^2), S_r = {k : round(|k|)
    = r} (width one index unit), r = 0 .. floor(L / 2): the shells the cube holds whole; the
    cube's corners beyond are left out, so the cutoff is floor(L / 2) / L cycles per voxel (Nyquist
    for even L, 5 / 11 of a cycle for L = 11). For real volumes the sum is real (Hermitian shells).

    Args:
        a: (L, L, L) first volume (e.g. the truth; its device is used).
        b: (L, L, L) second volume (e.g. the aligned estimate).
        voxel_size: Angstrom per voxel (> 0); frequencies are shell / (L voxel_size) in 1/A.
        mask: "soft" (``ball_mask(L, mask_radius, mask_edge)``: a cosine edge), "ball" (hard ball
            of mask_radius), or None (no mask); applied to both volumes.
        mask_radius: the mask's outer radius in voxels; None is L / 2.
        mask_edge: width of the soft mask's cosine edge in voxels.
        thresholds: the levels whose crossings are reported (default 0.5, the paper's, and 0.143).

    Returns:
        An ``FSCCurve``.
    """
    A = as_volume(a, "first volume")
    B = as_volume(b, "second volume", like=A)
    L = A.shape[0]
    if not (isinstance(voxel_size, int | float) and math.isfinite(voxel_size) and voxel_size > 0):
        raise ValueError(f"voxel_size must be a finite number > 0 (Angstrom), got {voxel_size!r}")
    if mask not in ("soft", "ball", None):
        raise ValueError(f"mask must be 'soft', 'ball' or None, got {mask!r}")
    radius = L / 2 if mask_radius is None else float(mask_radius)
    if mask is not None:
        M = ball_mask(L, radius, mask_edge if mask == "soft" else 0.0, device=A.device)
        A, B = A * M, B * M
    desc = {
        "soft": f"soft ball radius {radius:g} voxels, cosine edge {mask_edge:g} voxels",
        "ball": f"hard ball |p| <= {radius:g} voxels",
        None: "none",
    }[mask]
    FA, FB = torch.fft.fftn(A), torch.fft.fftn(B)
    S = L // 2 + 1
    idx = shell_index(L, A.device).reshape(-1)
    keep = idx < S
    idx = idx[keep]

    def shell_sum(x):
        return torch.zeros(S, dtype=torch.float64, device=A.device).index_add_(0, idx, x[keep])

    num = shell_sum((FA * FB.conj()).real.reshape(-1))
    pa = shell_sum((FA.abs() ** 2).reshape(-1))
    pb = shell_sum((FB.abs() ** 2).reshape(-1))
    count = torch.bincount(idx, minlength=S)
    # a shell whose power is round-off (below 1e-24 of the volume's, e.g. beyond a sharp
    # low-pass) holds nothing to correlate: its FSC is 0, not the ratio of two round-offs
    empty = (pa <= 1e-24 * pa.sum()) | (pb <= 1e-24 * pb.sum())
    den = torch.sqrt(pa * pb).clamp_min(torch.finfo(torch.float64).tiny)
    curve = torch.where(empty, 0.0, num / den)
    shells = np.arange(S)
    freq = shells / (L * float(voxel_size))
    curve = curve.cpu().numpy()
    crossings = {}
    for thr in thresholds:
        fc = fsc_crossing(freq, curve, float(thr))
        crossings[float(thr)] = (fc, None if fc is None else (math.inf if fc == 0 else 1 / fc))
    return FSCCurve(
        shells=shells,
        frequency=freq,
        fsc=curve,
        n_voxels=count.cpu().numpy(),
        crossings=crossings,
        voxel_size=float(voxel_size),
        mask=desc,
    )
