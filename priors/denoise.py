"""Score-based micrograph denoising with target guidance (issue 14, item 3).

The measurement is y = x + sigma z, z ~ N(0, I), with x a clean micrograph. The denoised
micrograph is the posterior mean E[x | y] (Tweedie's formula, the score-denoising paper's
Appendix A.1 "posterior score identity", and Vincent 2011):

    E[x | y] = y + sigma^2 grad_y log p_sigma(y)                                           (T1)

where p_sigma is the density of the clean tiles convolved with N(0, sigma^2 I). A score network
trained by DSM on the VP-SDE (``priors.micrographs`` tiles, ``python train.py
data=mnist_micrograph``) gives grad log p at the diffusion time t with sigma_t / alpha_t =
sigma / u (u: measurement units per network unit): x_t = alpha_t y has the law of the diffused
tiles, so grad_y log p_sigma(y) = alpha_t s_theta(alpha_t y, t) with s_theta in measurement units
(``ScorePrior.score``). This is ``ScorePrior.posterior_mean`` written in y's units, so that the
guidance term below adds to it.

**Target guidance.** The EM estimate F_hat (L x L) enters as a reference density: the MTD patch
model of a tile given F_hat (the approximate-EM paper's eq. 6, on a T x T tile instead of an
L x L patch): a tile holds no copy (prior probability pi_0), or one copy R_k F_hat, rotated by
one of K angles, with its top-left corner at any of the (T + L - 1)^2 shifts at which it meets
the tile (cropped by the tile), uniformly. Its noisy density is the Gaussian mixture

    p_ref(y) = pi_0 N(y; 0, sigma^2 I)
               + (1 - pi_0) / (K S^2) sum_{k,l} N(y; C T_l R_k F, sigma^2 I)              (G0)

with S = T + L - 1, and its score is (E_ref[x | y] - y) / sigma^2 with E_ref the mixture's
posterior mean (the E-step's posterior-weighted templates). The score-denoising paper
introduces its reference-density guidance without an equation in the text we have
(``score-denoising-cryoem-review.txt``: "a target-guided matching term that incorporates
reference particle densities"); we weigh the two scores, as a tempered product
p_theta^(1 - lambda) p_ref^lambda of the two noisy densities:

    s(y) = (1 - lambda) grad log p_theta,sigma(y) + lambda grad log p_ref(y)                (G1)
    x_hat = y + sigma^2 s(y) = (1 - lambda) E_theta[x | y] + lambda E_ref[x | y]

lambda = 0 is the unguided denoiser, lambda = 1 the posterior mean under the MTD model of the
estimate alone.

**Tiles.** The network sees T x T tiles; the micrograph is cut into tiles at a stride s <= T
(default T / 2), each tile's estimate is weighed by the separable window w(i) w(j) with
w(i) = sin^2(pi (i + 1/2) / T), and the sums are divided by the sum of the windows at each pixel,
so the weights of each pixel sum to one exactly (for any stride). The border is padded by T - s
mirrored pixels, so every pixel sits inside as many tiles as an interior one. Tiles are read and
denoised ``batch_size`` at a time (from a tensor or a memory-mapped file): memory is the output
plus one batch.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mtd.groups.rotations import Rotations
from mtd.io.files import atomic_write, write_micrograph
from priors.prior import ScorePrior


def window(T: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """The 1-D tile window w(i) = sin^2(pi (i + 1/2) / T), (T,): positive, smooth, and for
    stride T / 2 the shifted copies sum to one (sin^2 + cos^2)."""
    i = torch.arange(T, dtype=torch.float64, device=device)
    return torch.sin(math.pi * (i + 0.5) / T).square().to(dtype)


def tile_starts(n: int, T: int, stride: int) -> list[int]:
    """Top-left coordinates of the tiles along one axis of length n (may be negative).

    The first tile starts at -(T - stride) and the tiles run until they cover n + T - stride, so
    every pixel is inside as many tiles as an interior pixel (T / stride of them).
    """
    pad = T - stride
    count = max(1, math.ceil((n + 2 * pad - T) / stride) + 1)
    return [-pad + j * stride for j in range(count)]


def reflect_index(index: np.ndarray, n: int) -> np.ndarray:
    """Symmetric (edge-repeating) reflection of indices into 0..n-1, for any padding width."""
    m = np.mod(index, 2 * n)
    return np.where(m >= n, 2 * n - 1 - m, m)


def _check_micrograph(micrograph) -> None:
    if getattr(micrograph, "ndim", None) != 2:
        shape = getattr(micrograph, "shape", None)
        raise ValueError(f"micrograph must be a 2-D array, got shape {shape}")
    if min(micrograph.shape) < 1:
        raise ValueError(f"micrograph is empty, shape {tuple(micrograph.shape)}")


def tiled(
    micrograph,
    fn: Callable[[torch.Tensor], torch.Tensor],
    T: int,
    stride: int | None = None,
    batch_size: int = 64,
    device=None,
    dtype=torch.float32,
) -> torch.Tensor:
    """Apply a tile map over overlapping T x T tiles and blend them with windows summing to one.

    Args:
        micrograph: (N0, N1) tensor or numpy array (a read-only memmap is read tile by tile).
        fn: (B, 1, T, T) -> (B, 1, T, T), the tile map (a denoiser).
        T: tile side.
        stride: tile stride, 1 <= stride <= T (default T // 2).
        batch_size: tiles per call of ``fn``.
        device, dtype: where and in which dtype ``fn`` runs; the output is float64 on the CPU.

    Returns:
        (N0, N1) float64: sum_tiles w fn(tile) / sum_tiles w at every pixel.
    """
    _check_micrograph(micrograph)
    stride = T // 2 if stride is None else stride
    if isinstance(stride, bool) or int(stride) != stride or not 1 <= stride <= T:
        raise ValueError(f"stride must be an integer in 1..{T} (the tile side), got {stride!r}")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    stride, batch_size = int(stride), int(batch_size)
    N0, N1 = micrograph.shape
    source = micrograph.detach().cpu().numpy() if torch.is_tensor(micrograph) else micrograph
    rows, cols = tile_starts(N0, T, stride), tile_starts(N1, T, stride)
    w = window(T)
    w2 = (w[:, None] * w[None, :]).to(device=device, dtype=dtype)
    # The window sums per axis: tiles form a product grid, so the sum of w(i) w(j) over the
    # tiles covering a pixel is the product of the two 1-D sums.
    norm = []
    for n, starts in ((N0, rows), (N1, cols)):
        total = torch.zeros(n, dtype=torch.float64)
        for s in starts:
            lo, hi = max(s, 0), min(s + T, n)
            total[lo:hi] += w[lo - s : hi - s]
        norm.append(total)
    out = torch.zeros(N0, N1, dtype=torch.float64)
    positions = [(r, c) for r in rows for c in cols]
    offsets = np.arange(T)
    for b in range(0, len(positions), batch_size):
        batch = positions[b : b + batch_size]
        tiles = np.stack(
            [
                np.asarray(
                    source[np.ix_(reflect_index(r + offsets, N0), reflect_index(c + offsets, N1))]
                )
                for r, c in batch
            ]
        )
        y = torch.from_numpy(np.ascontiguousarray(tiles, dtype=np.float64))
        est = fn(y.to(device=device, dtype=dtype)[:, None])
        est = (est[:, 0] * w2).to(device="cpu", dtype=torch.float64)
        for (r, c), e in zip(batch, est, strict=True):
            r0, r1, c0, c1 = max(r, 0), min(r + T, N0), max(c, 0), min(c + T, N1)
            out[r0:r1, c0:c1] += e[r0 - r : r1 - r, c0 - c : c1 - c]
    return out / (norm[0][:, None] * norm[1][None, :])


class ReferenceDensity:
    """The MTD patch model of a T x T tile given an estimate F (L x L), at noise sigma.

    A tile holds no copy (probability ``empty``) or one copy of R_k F (K rotations,
    ``mtd.Rotations``) with its top-left corner at one of the S^2 = (T + L - 1)^2 positions where
    it meets the tile, cropped by the tile; all K S^2 placements equally likely. The noisy tile
    y = x + sigma z then has the Gaussian-mixture density (G0) of the module docstring;
    ``log_density`` is its log, ``posterior_mean`` E_ref[x | y] and ``score`` its gradient
    (E_ref[x | y] - y) / sigma^2.

    The correlations of the tile with every placed template, and the templates' energies inside
    the tile, are circular correlations on an S x S grid (S = T + L - 1 is just enough: no
    placement wraps onto another).

    Args:
        estimate: (L, L) the target estimate, in measurement units.
        T: tile side.
        K: rotations of the estimate.
        empty: prior probability that a tile holds no copy, in [0, 1).
    """

    def __init__(self, estimate: torch.Tensor, T: int, K: int = 16, empty: float = 0.5):
        estimate = torch.as_tensor(estimate)
        if estimate.ndim != 2 or estimate.shape[0] != estimate.shape[1]:
            raise ValueError(
                f"estimate must be a square (L, L) image, got {tuple(estimate.shape)}"
            )
        if not torch.isfinite(estimate).all():
            raise ValueError("estimate has non-finite values")
        if not 0 <= empty < 1:
            raise ValueError(f"empty must be in [0, 1), got {empty!r}")
        self.L, self.T, self.K, self.empty = estimate.shape[0], int(T), int(K), float(empty)
        self.S = self.T + self.L - 1
        rot = Rotations(self.L, self.K).to(device=estimate.device, dtype=estimate.dtype)
        self.templates = rot(estimate)  # (K, L, L)
        G = torch.zeros(self.K, self.S, self.S, dtype=estimate.dtype, device=estimate.device)
        G[:, : self.L, : self.L] = self.templates
        self._G = torch.fft.rfft2(G)
        G2 = torch.zeros_like(G)
        G2[:, : self.L, : self.L] = self.templates.square()
        ones = torch.zeros(self.S, self.S, dtype=estimate.dtype, device=estimate.device)
        ones[: self.T, : self.T] = 1
        # e[k, l] = sum over the tile of the placed template squared: (K, S, S)
        self.energy = torch.fft.irfft2(
            torch.fft.rfft2(ones) * torch.fft.rfft2(G2).conj(), s=(self.S, self.S)
        )

    def _logits(self, y: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K, S, S) log weights of the placements and (B,) of the empty tile, up to the
        common -||y||^2 / (2 sigma^2)."""
        if y.shape[-2:] != (self.T, self.T):
            raise ValueError(f"tiles must be (B, 1, {self.T}, {self.T}), got {tuple(y.shape)}")
        B = y.shape[0]
        Y = torch.zeros(B, 1, self.S, self.S, dtype=y.dtype, device=y.device)
        Y[..., : self.T, : self.T] = y.reshape(B, 1, self.T, self.T)
        c = torch.fft.irfft2(torch.fft.rfft2(Y) * self._G.to(y.device).conj(), s=(self.S, self.S))
        log_each = math.log1p(-self.empty) - math.log(self.K * self.S * self.S)
        logits = (2 * c - self.energy.to(y)) / (2 * sigma**2) + log_each
        log_empty = torch.full((B,), math.log(self.empty) if self.empty > 0 else -math.inf)
        return logits, log_empty.to(y)

    def log_density(self, y: torch.Tensor, sigma: float) -> torch.Tensor:
        """log p_ref(y) for tiles y (B, 1, T, T): (B,)."""
        logits, log_empty = self._logits(y, sigma)
        lse = torch.logsumexp(torch.cat([logits.flatten(1), log_empty[:, None]], 1), 1)
        n = self.T * self.T
        return (
            lse
            - y.flatten(1).square().sum(1) / (2 * sigma**2)
            - 0.5 * n * math.log(2 * math.pi * sigma**2)
        )

    def posterior_mean(self, y: torch.Tensor, sigma: float) -> torch.Tensor:
        """E_ref[x | y] = sum_{k,l} w_{k,l}(y) C T_l R_k F: (B, 1, T, T)."""
        logits, log_empty = self._logits(y, sigma)
        B = y.shape[0]
        lse = torch.logsumexp(torch.cat([logits.flatten(1), log_empty[:, None]], 1), 1)
        w = torch.exp(logits - lse.view(B, 1, 1, 1))  # (B, K, S, S)
        # sum_l w(l) F_k(x - l): a circular convolution on the S x S grid, summed over k.
        x = torch.fft.irfft2(torch.fft.rfft2(w) * self._G.to(y.device), s=(self.S, self.S))
        return x.sum(1, keepdim=True)[..., : self.T, : self.T]

    def score(self, y: torch.Tensor, sigma: float) -> torch.Tensor:
        """grad_y log p_ref(y) = (E_ref[x | y] - y) / sigma^2: (B, 1, T, T)."""
        return (self.posterior_mean(y, sigma) - y) / sigma**2


def expected_empty(density: float, T: int, L: int) -> float:
    """The share of T x T tiles that meet no copy at a copy density p L^2 / N^2: a tile meets a
    copy whose top-left corner is in a (T + L - 1)^2 window, so about density (T + L - 1)^2 / L^2
    copies meet it (clamped to [0, 0.99])."""
    return min(0.99, max(0.0, 1.0 - density * (T + L - 1) ** 2 / L**2))


class MicrographDenoiser:
    """E[x | y] of a micrograph at noise sigma under a score prior of tiles, guided or not.

    Args:
        prior: a ``ScorePrior`` (or any object with ``score(x, t)`` in measurement units,
            ``sde``, ``scale`` and ``image_size``) of T x T clean tiles.
        sigma: the measurement's noise standard deviation (measurement units).
        reference: a ``ReferenceDensity`` of the target estimate, or None.
        guidance: lambda in [0, 1] of eq. (G1) (0: unguided; needs ``reference`` when > 0).
        stride, batch_size: tiling (``tiled``).
        device, dtype: where the tiles are denoised.
    """

    def __init__(
        self,
        prior,
        sigma: float,
        reference: ReferenceDensity | None = None,
        guidance: float = 0.0,
        stride: int | None = None,
        batch_size: int = 64,
        device=None,
        dtype=torch.float32,
    ):
        if not (isinstance(sigma, int | float) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
        if not (isinstance(guidance, int | float) and 0 <= guidance <= 1):
            raise ValueError(f"guidance must be a number in [0, 1] (lambda), got {guidance!r}")
        if guidance > 0 and reference is None:
            raise ValueError(f"guidance={guidance} needs an estimate (the reference density)")
        self.prior, self.sigma, self.reference = prior, float(sigma), reference
        self.guidance, self.stride, self.batch_size = float(guidance), stride, batch_size
        self.device, self.dtype = device, dtype
        self.T = int(prior.image_size)
        if reference is not None and reference.T != self.T:
            raise ValueError(
                f"the reference density is for {reference.T} x {reference.T} tiles, the prior's "
                f"are {self.T} x {self.T}"
            )
        u = float(getattr(prior, "scale", 1.0))
        sde = prior.sde
        t = sde.time_at_noise(self.sigma / u)
        if t >= sde.T and float(sde.sigma(sde.T) / sde.alpha(sde.T)) * u < self.sigma:
            raise ValueError(
                f"sigma={sigma} is beyond the prior's SDE (at most "
                f"{u * float(sde.sigma(sde.T) / sde.alpha(sde.T)):.4g} at t = 1)"
            )
        self.t, self.alpha = t, float(sde.alpha(t))

    def prior_score(self, y: torch.Tensor) -> torch.Tensor:
        """grad_y log p_theta,sigma(y) = alpha_t s_theta(alpha_t y, t): (B, 1, T, T)."""
        return self.alpha * self.prior.score(self.alpha * y, self.t)

    def score(self, y: torch.Tensor) -> torch.Tensor:
        """The guided score of eq. (G1) in y's units: (B, 1, T, T)."""
        s = self.prior_score(y) if self.guidance < 1 else torch.zeros_like(y)
        if self.guidance == 0:
            return s
        return (1 - self.guidance) * s + self.guidance * self.reference.score(y, self.sigma)

    def denoise_tiles(self, y: torch.Tensor) -> torch.Tensor:
        """Tweedie (T1) on tiles: y + sigma^2 s(y), (B, 1, T, T) -> (B, 1, T, T)."""
        return y + self.sigma**2 * self.score(y)

    def __call__(self, micrograph) -> torch.Tensor:
        """The denoised micrograph, (N0, N1) float64 on the CPU."""
        return tiled(
            micrograph,
            self.denoise_tiles,
            self.T,
            self.stride,
            self.batch_size,
            self.device,
            self.dtype,
        )


def psnr(clean: torch.Tensor, estimate: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB: 10 log10(peak^2 / MSE), peak = max |clean|."""
    clean, estimate = torch.as_tensor(clean, dtype=torch.float64), torch.as_tensor(estimate)
    mse = float((estimate.to(clean) - clean).square().mean())
    peak = float(clean.abs().max())
    if peak == 0:
        raise ValueError("the clean micrograph is all zeros: its PSNR is undefined")
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def relative_error(clean: torch.Tensor, estimate: torch.Tensor) -> float:
    """||estimate - clean||_F / ||clean||_F."""
    clean, estimate = torch.as_tensor(clean, dtype=torch.float64), torch.as_tensor(estimate)
    return float((estimate.to(clean) - clean).norm() / clean.norm())


# The guidance weight of ``denoise_micrograph`` when an estimate is given (the denoising sweep of
# docs/benchmarks.md).
GUIDED_LAMBDA = 0.25
DEFAULT_CKPT = Path(__file__).resolve().parent / "pretrained" / "mnist_micrograph.ckpt"


@functools.lru_cache(maxsize=4)
def _prior(ckpt: str, device: str, dtype: torch.dtype) -> ScorePrior:
    return ScorePrior.from_checkpoint(ckpt, device=device, dtype=dtype)


def denoise_micrograph(
    micrograph,
    sigma: float,
    estimate=None,
    guidance: float | None = None,
    ckpt=DEFAULT_CKPT,
    K: int = 16,
    density: float = 0.1,
    stride: int | None = None,
    batch_size: int = 64,
    device="cpu",
    dtype=torch.float32,
    empty: float | None = None,
) -> torch.Tensor:
    """The denoised micrograph in one call (what ``denoise.py`` runs, without the files).

    Args:
        micrograph: (N0, N1) tensor or array.
        sigma: its noise standard deviation.
        estimate: (L, L) target estimate for guidance, or None (unguided).
        guidance: lambda; None: ``GUIDED_LAMBDA`` with an estimate, 0 without.
        ckpt: the tile prior's checkpoint.
        K, density: the reference density's rotations and copy density.
        empty: the share of tiles without a copy, given directly (None: from ``density``,
            ``expected_empty``).
        stride, batch_size, device, dtype: as ``MicrographDenoiser``.

    Returns:
        (N0, N1) float64 on the CPU.
    """
    prior = _prior(str(ckpt), str(device), dtype)
    if guidance is None:
        guidance = 0.0 if estimate is None else GUIDED_LAMBDA
    reference = None
    if estimate is not None:
        estimate = torch.as_tensor(estimate).to(device=device, dtype=dtype)
        if empty is None:
            empty = expected_empty(density, prior.image_size, estimate.shape[-1])
        reference = ReferenceDensity(estimate, prior.image_size, K, empty)
    den = MicrographDenoiser(
        prior, float(sigma), reference, guidance, stride, batch_size, device, dtype
    )
    return den(micrograph)


def metrics_of(clean, raw, result) -> dict:
    """PSNR (dB) and relative error of the raw and the denoised micrograph against the clean."""
    return {
        "psnr_raw": psnr(clean, raw),
        "psnr": psnr(clean, result),
        "relative_error_raw": relative_error(clean, raw),
        "relative_error": relative_error(clean, result),
    }


def denoise_outputs(
    out, micrograph, sigma: float, estimate=None, guidance=None, clean=None, name="denoised", **kw
) -> dict:
    """Denoise a micrograph and write ``<name>.mrc`` and ``<name>.png`` into ``out`` (for
    ``reconstruct.py``: the measurement, its sigma and the EM estimate).

    Args:
        out: an existing folder.
        micrograph, sigma, estimate, guidance, **kw: as ``denoise_micrograph``.
        clean: the clean micrograph (a simulation's), or None.
        name: the outputs' stem.

    Returns:
        {"denoise/guidance", "denoise/seconds"} and, with ``clean``, "denoise/psnr",
        "denoise/psnr_raw", "denoise/relative_error", "denoise/relative_error_raw".
    """
    out = Path(out)
    if not out.is_dir():
        raise ValueError(f"{out} is not an existing folder")
    guidance = (0.0 if estimate is None else GUIDED_LAMBDA) if guidance is None else guidance
    start = time.perf_counter()
    result = denoise_micrograph(micrograph, sigma, estimate, guidance, **kw)
    metrics = {"denoise/guidance": float(guidance), "denoise/seconds": time.perf_counter() - start}
    raw = torch.as_tensor(np.asarray(micrograph, dtype=np.float64))
    panels = [("raw", raw.numpy()), (f"denoised (lambda = {guidance:g})", result.numpy())]
    if clean is not None:
        clean = torch.as_tensor(clean, dtype=torch.float64)
        metrics.update({f"denoise/{k}": v for k, v in metrics_of(clean, raw, result).items()})
        panels.append(("clean", clean.numpy()))
    write_micrograph(out / f"{name}.mrc", result)
    figure(out / f"{name}.png", panels)
    return metrics


def figure(path: Path, panels: list[tuple[str, np.ndarray]]) -> None:
    """The panels side by side on one grey scale (that of the last: the clean one when given),
    as a PNG, written whole."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = np.percentile(panels[-1][1], [0.5, 99.5])
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.2), squeeze=False)
    for ax, (title, image) in zip(axes[0], panels, strict=True):
        ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
