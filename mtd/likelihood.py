"""Cross-correlation of patches with shifted, rotated templates: the heavy part of the E-step.

For a patch M_m and the zero-padded rotated image G_k = Z R_k F (2L x 2L), DESIGN section 4 needs

    c_m(l, k) = sum_{i,j<L} M_m[i, j] G_k[(i + l_x) mod 2L, (j + l_y) mod 2L],   l in {0..2L-1}^2

and, for the M-step, its adjoint: the back-projection of posterior weights w_m(l, k) onto G_k,

    g_k(y) = sum_m sum_l w_m(l, k) (Z M_m)[(y - l) mod 2L]          (b_k = Z^T g_k).

Two equivalent forms compute both; ``choose_method`` picks one by the sizes:

- "fft": c = IFFT2(conj(FFT2(Z M_m)) * FFT2(G_k)), g = IFFT2(sum_m FFT2(w_m) * FFT2(Z M_m)). The
  patch FFTs are computed once. Cost per patch ~ K * 2 FFTs of 2L x 2L.
- "gemm": every shifted crop C T_l G_k is a row of a (K*4L^2, L^2) template matrix S; c = M S^T and
  the back-projection is w^T M scattered back through the same shift table. Cost per patch
  K * 4L^4 MACs, which wins for small L where tiny FFTs are dominated by overhead.
"""

from __future__ import annotations

import math

import torch

# Measured on 2 CPU cores (python -m tests.benchmarks.bench_em --methods): GEMM wins up to L = 7,
# FFT above. A rule of the sizes, not a timing at run time, so that runs stay reproducible.
GEMM_MAX_L = 7


def choose_method(L: int) -> str:
    """The faster correlation form for patch side L ("gemm" for small L, else "fft")."""
    return "gemm" if L <= GEMM_MAX_L else "fft"


def shift_table(L: int, device=None) -> torch.Tensor:
    """Flat indices into a 2L x 2L image of the crop C T_l for every shift l.

    Returns:
        (4L^2, L^2) int64: row ``l = l_x * 2L + l_y``, column ``i * L + j`` holds
        ``((i + l_x) mod 2L) * 2L + (j + l_y) mod 2L`` (eq. 7 of the approximate-EM paper).
    """
    P = 2 * L
    ar = torch.arange(P, device=device)
    lx, ly = torch.meshgrid(ar, ar, indexing="ij")
    i, j = torch.meshgrid(ar[:L], ar[:L], indexing="ij")
    rows = (i.reshape(1, -1) + lx.reshape(-1, 1)) % P
    cols = (j.reshape(1, -1) + ly.reshape(-1, 1)) % P
    return rows * P + cols


def template_energy(G: torch.Tensor, L: int) -> torch.Tensor:
    """e(l, k) = ||C T_l G_k||^2 for all shifts: the correlation of the L x L window of ones with
    G_k^2.

    Args:
        G: (K, 2L, 2L) zero-padded rotated images.

    Returns:
        (K, 2L, 2L).
    """
    P = 2 * L
    window = torch.zeros(P, P, dtype=G.dtype, device=G.device)
    window[:L, :L] = 1
    spec = torch.conj(torch.fft.rfft2(window)) * torch.fft.rfft2(G * G)
    return torch.fft.irfft2(spec, s=(P, P))


class Correlator:
    """Holds the patches in the form the chosen method needs, computed once.

    The cross-correlations come out in a method-specific layout ``(B, *layout)`` over (rotation,
    shift); ``to_layout`` / ``from_layout`` convert (K, 2L, 2L) arrays such as the E-step's bias
    and occupancy. The FFT form packs rotations in pairs as the real and imaginary parts of one
    complex FFT (two real transforms for the price of one), so its layout is
    (ceil(K/2), 2L, 2L, 2).

    The per-chunk arrays live in one work buffer that is reused from chunk to chunk: the arrays
    ``correlate`` returns are overwritten by the next call.

    Patches are addressed by ``index``: a slice or a 1-D int64 tensor of positions in ``patches``.

    Args:
        patches: (D, L, L) patches.
        method: "fft" or "gemm".
        work: a work buffer to reuse (``.work`` of another correlator), or None.
    """

    def __init__(self, patches: torch.Tensor, method: str, work: torch.Tensor | None = None):
        if method not in ("fft", "gemm"):
            raise ValueError(f"correlation method must be 'fft' or 'gemm', got {method!r}")
        self.method = method
        self.D, self.L = patches.shape[0], patches.shape[-1]
        self.dtype, self.device = patches.dtype, patches.device
        L, P = self.L, 2 * self.L
        self.work = work
        if method == "fft":
            if self.D:
                self.spectra = torch.fft.fft2(patches, s=(P, P))  # FFT2(Z M_m), (D, 2L, 2L)
            else:  # a layout-only correlator (streamed data); MKL refuses an empty transform
                cdtype = self.dtype.to_complex()
                self.spectra = torch.zeros(0, P, P, dtype=cdtype, device=self.device)
            self.spectra_conj = self.spectra.conj().resolve_conj()
        else:
            ones = torch.ones(self.D, 1, dtype=self.dtype, device=self.device)
            self.flat = torch.cat([patches.reshape(self.D, L * L), ones], 1)  # (D, L^2 + 1)
            self.shifts = shift_table(L, self.device)  # (4L^2, L^2)

    def _buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape)
        if self.work is None or self.work.numel() < n or self.work.dtype != dtype:
            self.work = torch.empty(n, dtype=dtype, device=self.device)
        return self.work[:n].view(shape)

    def to_layout(self, x: torch.Tensor) -> torch.Tensor:
        """(K, 2L, 2L) -> this method's layout; odd K (FFT) gets a zero padding rotation."""
        if self.method == "gemm":
            return x
        K, P = x.shape[0], x.shape[-1]
        if K % 2:
            x = torch.cat([x, torch.zeros_like(x[:1])])
        return x.reshape(-1, 2, P, P).permute(0, 2, 3, 1).contiguous()

    def from_layout(self, y: torch.Tensor, K: int) -> torch.Tensor:
        """This method's layout -> (K, 2L, 2L)."""
        if self.method == "gemm":
            return y
        P = y.shape[1]
        return y.permute(0, 3, 1, 2).reshape(-1, P, P)[:K]

    def prepare(self, G: torch.Tensor, scale: float, bias: torch.Tensor):
        """Per-iteration form of the templates, such that ``correlate`` returns scale * c + bias.

        Args:
            G: (K, 2L, 2L) zero-padded rotated images.
            scale: factor on the correlations.
            bias: (K, 2L, 2L) added to every patch's scaled correlations.
        """
        K = G.shape[0]
        if self.method == "fft":
            # FFT2(G_2j + i G_2j+1), scaled; the bias enters in the frequency domain (the IFFT is
            # linear), fused with the product. A padding rotation (odd K) is masked after the IFFT.
            spec = torch.fft.fft2(torch.view_as_complex(self.to_layout(G))).mul_(scale)
            bias_hat = torch.fft.fft2(torch.view_as_complex(self.to_layout(bias)))
            return spec, bias_hat, K % 2 == 1
        S = G.reshape(K, -1)[:, self.shifts].reshape(-1, self.L * self.L) * scale
        # The bias rides in the GEMM as one more column, against a column of ones in the patches.
        return torch.cat([S, bias.reshape(-1, 1)], 1).T.contiguous(), None, False

    def correlate(self, index, templates) -> torch.Tensor:
        """scale * c_m(l, k) + bias(l, k) for the patches at ``index`` (see ``prepare``).

        Returns:
            (B, *layout) real, in the work buffer.
        """
        spec, bias_hat, odd = templates
        P = 2 * self.L
        if self.method == "fft":
            # IFFT2(conj(FFT2 ZM) (FFT2 G_2j + i FFT2 G_2j+1)) = c_2j + i c_2j+1: both are real.
            conj = self.spectra_conj[index]
            prod = self._buffer((conj.shape[0], *spec.shape), spec.dtype)
            torch.addcmul(bias_hat, conj[:, None], spec, out=prod)
            out = torch.view_as_real(torch.fft.ifft2(prod))
            if odd:
                out[:, -1, ..., 1] = -math.inf
            return out
        flat = self.flat[index]
        out = self._buffer((flat.shape[0], spec.shape[1]), self.dtype)
        return torch.matmul(flat, spec, out=out).view(flat.shape[0], -1, P, P)

    def new_accumulator(self, K: int) -> torch.Tensor:
        """Zeros to accumulate the back-projection in.

        GEMM form: (L^2 + 1, K 4L^2); the last row, the product with the patches' column of ones,
        accumulates the occupancy omega in the same GEMM (see ``occupancy``).
        """
        L, P = self.L, 2 * self.L
        if self.method == "fft":
            return torch.zeros((K + 1) // 2, P, P, dtype=self.spectra.dtype, device=self.device)
        return torch.zeros(L * L + 1, K * P * P, dtype=self.dtype, device=self.device)

    def occupancy(self, acc: torch.Tensor, K: int) -> torch.Tensor:
        """GEMM form: sum_m scale[m] w_m, (K, 2L, 2L), from the accumulator's last row."""
        P = 2 * self.L
        return acc[-1].reshape(K, P, P)

    def accumulate(self, index, w: torch.Tensor, scale: torch.Tensor, acc: torch.Tensor) -> None:
        """Add the back-projection of weights scale[m] * w[m] (w: (B, *layout)) to acc."""
        if self.method == "fft":
            spec = torch.fft.fft2(torch.view_as_complex(w))  # FFT2(w_2j + i w_2j+1)
            spec.mul_(self.spectra[index][:, None])
            # The weighted sum over patches as one product: scale^T (B, ...).
            acc.view(1, -1).addmm_(scale.to(spec.dtype).view(1, -1), spec.view(len(spec), -1))
        else:
            rows = self.flat[index] * scale.view(-1, 1)  # the ones column gives omega
            # (L^2 + 1, B) x (B, K 4L^2): w is read row-major, ~1.5x faster than w^T x rows.
            acc.addmm_(rows.T, w.reshape(rows.shape[0], -1))

    def finish(self, acc: torch.Tensor, K: int) -> torch.Tensor:
        """The back-projection g_k on the 2L x 2L grid from an accumulator.

        Returns:
            (K, 2L, 2L); its top-left L x L block is b_k.
        """
        if self.method == "fft":  # IFFT2 of the packed sum = g_2j + i g_2j+1
            return self.from_layout(torch.view_as_real(torch.fft.ifft2(acc)), K)
        P = 2 * self.L
        g = torch.zeros(K, P * P, dtype=acc.dtype, device=acc.device)
        idx = self.shifts.reshape(-1).expand(K, -1)
        g.scatter_add_(1, idx, acc[:-1].T.reshape(K, -1))
        return g.reshape(K, P, P)
