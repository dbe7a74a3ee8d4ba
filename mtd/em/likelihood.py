"""Cross-correlation of patches with shifted, rotated templates: the heavy part of the E-step.

For a patch M_m and the zero-padded rotated image G_k = Z R_k F (2L x 2L), DESIGN section 4 needs

    c_m(l, k) = sum_{i,j<L} M_m[i, j] G_k[(i + l_x) mod 2L, (j + l_y) mod 2L],   l in {0..2L-1}^2

and, for the M-step, its adjoint: the back-projection of posterior weights w_m(l, k) onto G_k,

    g_k(y) = sum_m sum_l w_m(l, k) (Z M_m)[(y - l) mod 2L]          (b_k = Z^T g_k).

Two equivalent forms compute both, each one class that owns its layout, its memory model (the
elements a chunk may hold, the bytes a streamed patch costs) and its branches; ``choose_method``
picks one by the sizes:

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


class Form:
    """A correlation form: the patches' transform, the templates' form, correlations and their
    adjoint (the back-projection), for one image side L.

    The cross-correlations come out in a form-specific layout ``(B, *layout)`` over (template,
    shift); ``to_layout`` / ``from_layout`` convert (K, 2L, 2L) arrays such as the E-step's bias.
    The per-chunk arrays live in one work buffer that is reused from chunk to chunk: the arrays
    ``correlate`` returns are overwritten by the next call.

    Patches are addressed by ``index``: a slice or a 1-D int64 tensor of positions in what
    ``transform`` was given.

    Attributes:
        method: "fft" or "gemm".
        pair: template blocks are multiples of this (the FFT form packs templates in pairs).
    """

    method: str
    pair = 1
    # Elements (patches x templates x shifts) per chunk on a CPU: large enough to amortise the
    # per-call overhead, small enough that a chunk's intermediates stay in cache (measured with
    # tests/benchmarks/bench_em.py on 2 CPU cores).
    cpu_chunk_elements: int
    # On a GPU a chunk is worth its ~20 kernel launches only when it is large: 2^23 elements
    # (64 MB in float64). Not measured (no GPU was available); chunk_size overrides it.
    gpu_chunk_elements = 1 << 23
    # When one patch's K x 4L^2 logits alone exceed the chunk budget (K in the hundreds), a chunk
    # may hold up to this many, all K templates in one block where they fit: a second pass over
    # the correlations (template blocks, ``EStep._stream``) costs more than leaving the cache.
    # Measured at L = 11, K = 552 (tests/benchmarks/bench_volume.py speed): 2^18 (9 blocks of 66)
    # 2.6 CPU-s per 740 patches, 2^19 (one block, chunks of 1) 2.0, 2^21 (chunks of 7) 1.7.
    cpu_max_elements = 1 << 21
    gpu_max_elements = 1 << 23

    def __init__(self, L: int, device, dtype):
        self.L, self.device, self.dtype = L, torch.device(device), dtype
        self.work: torch.Tensor | None = None

    def chunk_elements(self) -> int:
        return self.cpu_chunk_elements if self.device.type == "cpu" else self.gpu_chunk_elements

    def max_elements(self) -> int:
        return self.cpu_max_elements if self.device.type == "cpu" else self.gpu_max_elements

    def bytes_per_patch(self) -> int:
        """Memory of one patch's transform (``transform``), for sizing streamed blocks."""
        raise NotImplementedError

    def _buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape)
        if self.work is None or self.work.numel() < n or self.work.dtype != dtype:
            self.work = torch.empty(n, dtype=dtype, device=self.device)
        return self.work[:n].view(shape)

    def to_layout(self, x: torch.Tensor) -> torch.Tensor:
        """(K, 2L, 2L) -> this form's layout."""
        return x

    def from_layout(self, y: torch.Tensor, K: int) -> torch.Tensor:
        """This form's layout, with any leading batch dimensions -> (..., K, 2L, 2L)."""
        return y


class FFTForm(Form):
    """c = IFFT2(conj(FFT2(Z M_m)) * FFT2(G_k)), the back-projection by FFT (DESIGN section 4).

    Templates are packed in pairs as the real and imaginary parts of one complex FFT (two real
    transforms for the price of one), so the layout is (ceil(K/2), 2L, 2L, 2).
    """

    method, pair, cpu_chunk_elements = "fft", 2, 1 << 18

    def bytes_per_patch(self) -> int:
        return 2 * 16 * 4 * self.L * self.L  # the spectrum and its conjugate, complex

    def transform(self, patches: torch.Tensor):
        """(FFT2(Z M_m), its conjugate) of (D, L, L) patches."""
        P = 2 * self.L
        if len(patches):
            spectra = torch.fft.fft2(patches, s=(P, P))  # FFT2(Z M_m), (D, 2L, 2L)
        else:  # MKL refuses an empty transform
            spectra = torch.zeros(0, P, P, dtype=self.dtype.to_complex(), device=self.device)
        return spectra, spectra.conj().resolve_conj()

    def to_layout(self, x: torch.Tensor) -> torch.Tensor:
        """(K, 2L, 2L) -> (ceil(K/2), 2L, 2L, 2); odd K gets a zero padding template."""
        K, P = x.shape[0], x.shape[-1]
        if K % 2:
            x = torch.cat([x, torch.zeros_like(x[:1])])
        return x.reshape(-1, 2, P, P).permute(0, 2, 3, 1).contiguous()

    def from_layout(self, y: torch.Tensor, K: int) -> torch.Tensor:
        P, lead = y.shape[-2], y.shape[:-4]
        y = y.movedim(-1, -3).reshape(*lead, -1, P, P)
        return y[..., :K, :, :]

    def prepare(self, G: torch.Tensor, scale: float, bias: torch.Tensor):
        """Per-iteration form of the templates, such that ``correlate`` returns scale * c + bias.

        Args:
            G: (K, 2L, 2L) zero-padded templates.
            scale: factor on the correlations.
            bias: (K, 2L, 2L) added to every patch's scaled correlations.
        """
        K = G.shape[0]
        # FFT2(G_2j + i G_2j+1), scaled; the bias enters in the frequency domain (the IFFT is
        # linear), fused with the product. A padding template (odd K) is masked after the IFFT.
        spec = torch.fft.fft2(torch.view_as_complex(self.to_layout(G))).mul_(scale)
        bias_hat = torch.fft.fft2(torch.view_as_complex(self.to_layout(bias)))
        return spec, bias_hat, K % 2 == 1

    def correlate(self, held, index, templates) -> torch.Tensor:
        """scale * c_m(l, k) + bias(l, k) for the patches at ``index`` (see ``prepare``).

        Returns:
            (B, *layout) real, in the work buffer.
        """
        spec, bias_hat, odd = templates
        # IFFT2(conj(FFT2 ZM) (FFT2 G_2j + i FFT2 G_2j+1)) = c_2j + i c_2j+1: both are real.
        conj = held[1][index]
        prod = self._buffer((conj.shape[0], *spec.shape), spec.dtype)
        torch.addcmul(bias_hat, conj[:, None], spec, out=prod)
        out = torch.view_as_real(torch.fft.ifft2(prod))
        if odd:
            out[:, -1, ..., 1] = -math.inf
        return out

    def accumulator(self, K: int):
        """Zeros to accumulate the back-projection (packed spectra) and the occupancy in."""
        P = 2 * self.L
        spec = torch.zeros((K + 1) // 2, P, P, dtype=self.dtype.to_complex(), device=self.device)
        omega = torch.zeros((K + 1) // 2, P, P, 2, dtype=self.dtype, device=self.device)
        return spec, omega

    def accumulate(self, held, index, w: torch.Tensor, scale: torch.Tensor, acc) -> None:
        """Add the back-projection and occupancy of weights scale[m] * w[m] (w: (B, *layout))."""
        spec_acc, omega = acc
        omega.view(-1).addmv_(w.view(len(w), -1).T, scale)  # sum_m scale[m] w_m(l, k)
        spec = torch.fft.fft2(torch.view_as_complex(w))  # FFT2(w_2j + i w_2j+1)
        spec.mul_(held[0][index][:, None])
        # The weighted sum over patches as one product: scale^T (B, ...).
        spec_acc.view(1, -1).addmm_(scale.to(spec.dtype).view(1, -1), spec.view(len(spec), -1))

    def finish(self, acc, K: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(omega_k, g_k), each (K, 2L, 2L), from an accumulator; g's top-left L x L is b_k."""
        spec_acc, omega = acc
        g = torch.view_as_real(torch.fft.ifft2(spec_acc))  # IFFT2 of the packed sum
        return self.from_layout(omega, K), self.from_layout(g, K)


class GEMMForm(Form):
    """Every shifted crop C T_l G_k is a row of a (K 4L^2, L^2) template matrix S: c = M S^T.

    The back-projection is w^T M, scattered back through the same shift table; the occupancy
    omega rides in the same GEMM as the product with the patches' column of ones. The layout is
    (K, 2L, 2L).
    """

    method, cpu_chunk_elements = "gemm", 1 << 19

    def __init__(self, L: int, device, dtype):
        super().__init__(L, device, dtype)
        self.shifts = shift_table(L, self.device)  # (4L^2, L^2)

    def bytes_per_patch(self) -> int:
        return 8 * (self.L * self.L + 1)

    def transform(self, patches: torch.Tensor) -> torch.Tensor:
        """(D, L^2 + 1): the flattened patches and a column of ones (for the bias and omega)."""
        ones = torch.ones(len(patches), 1, dtype=patches.dtype, device=patches.device)
        return torch.cat([patches.reshape(len(patches), -1), ones], 1)

    def prepare(self, G: torch.Tensor, scale: float, bias: torch.Tensor):
        K = G.shape[0]
        S = G.reshape(K, -1)[:, self.shifts].reshape(-1, self.L * self.L) * scale
        # The bias rides in the GEMM as one more column, against a column of ones in the patches.
        return torch.cat([S, bias.reshape(-1, 1)], 1).T.contiguous()

    def correlate(self, held, index, templates) -> torch.Tensor:
        flat = held[index]
        out = self._buffer((flat.shape[0], templates.shape[1]), self.dtype)
        P = 2 * self.L
        return torch.matmul(flat, templates, out=out).view(flat.shape[0], -1, P, P)

    def accumulator(self, K: int) -> torch.Tensor:
        """(L^2 + 1, K 4L^2) zeros; the last row accumulates omega (the ones column)."""
        P = 2 * self.L
        return torch.zeros(self.L * self.L + 1, K * P * P, dtype=self.dtype, device=self.device)

    def accumulate(self, held, index, w: torch.Tensor, scale: torch.Tensor, acc) -> None:
        rows = held[index] * scale.view(-1, 1)  # the ones column gives omega
        # (L^2 + 1, B) x (B, K 4L^2): w is read row-major, ~1.5x faster than w^T x rows.
        acc.addmm_(rows.T, w.reshape(rows.shape[0], -1))

    def finish(self, acc, K: int) -> tuple[torch.Tensor, torch.Tensor]:
        P = 2 * self.L
        g = torch.zeros(K, P * P, dtype=acc.dtype, device=acc.device)
        idx = self.shifts.reshape(-1).expand(K, -1)
        g.scatter_add_(1, idx, acc[:-1].T.reshape(K, -1))
        return acc[-1].reshape(K, P, P), g.reshape(K, P, P)


FORMS = {"fft": FFTForm, "gemm": GEMMForm}


def make_form(method: str, L: int, device, dtype) -> Form:
    """The correlation form ``method`` ("fft" or "gemm") for image side L."""
    if method not in FORMS:
        raise ValueError(f"correlation method must be 'fft' or 'gemm', got {method!r}")
    return FORMS[method](L, device, dtype)
