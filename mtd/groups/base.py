"""The seam between the E-step and the kind of object it estimates (DESIGN section 9).

The E-step never sees the unknown itself: it needs K templates (L x L images) made from it, the
prior weight of each template, and, for the M-step, the adjoint of "unknown -> templates" and a
solver for the normal equations of Q (eq. 16 of the approximate-EM paper). A ``TransformSet`` is
that object; a new kind of unknown (rotations with reflections, a steerable basis, projections of
a volume) is a new implementation, and the E-step, rho, sigma, streaming, stochastic EM and the
distributed sums are shared.

    templates     T_k(x),                      k = 0..K-1          (K, L, L)
    adjoint       sum_k T_k^T Y_k                                  shape of x
    normal_solve  x with sum_k T_k^T diag(c_k) T_k x = rhs          shape of x
    log_weights   log pi_k, the prior of template k (uniform: -log K)
    poses         what template k is in the field's terms: in-plane angle, mirror, 3-D rotation
    orbit         x under every group element, to measure errors up to the group's symmetry
    nearest       the element of x's orbit closest to a truth (the error's alignment)
    to_image      the object x stands for: an (L, L) image, or an (L, L, L) volume

Everything after the E-step (metrics, outputs, picking, the reconstruction's pipeline) asks the
group what it is through these, never by its type: a new kind of unknown is a new subclass here
and a config file in ``configs/em/group/`` (docs/design.md).
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Poses:
    """What each of the K templates is, in the terms of the field (for STAR files and picks).

    Attributes:
        angles: (K,) in-plane angle in radians (counter-clockwise, as ``mtd.simulate``), or
            None where the templates have no in-plane reading.
        mirrored: (K,) bool, template k is of the mirror image.
        rotations: (K, 3, 3) the 3-D rotation of each template (projections of a volume), or
            None.
    """

    angles: np.ndarray | None
    mirrored: np.ndarray
    rotations: torch.Tensor | None = None


class TransformSet(torch.nn.Module, metaclass=abc.ABCMeta):
    """K linear maps from an unknown x to L x L templates, with their prior weights.

    Implementations hold their tables as buffers, built in float64 on the CPU; the engine moves
    them to its device and dtype (``.to(device=..., dtype=...)``).

    Attributes:
        L: template side in pixels.
        K: number of templates.
        shape: shape of the unknown x.
        costly_nearest: ``nearest`` is a search that takes seconds (a volume's alignment over
            SO(3)): callers measure errors at the end, not at every EM iteration.
    """

    L: int
    K: int
    shape: tuple[int, ...]
    costly_nearest: bool = False

    def log_weights(self) -> torch.Tensor:
        """(K,) log prior weight of every template, float64 on the tables' device (uniform)."""
        return torch.full((self.K,), -math.log(self.K), dtype=torch.float64, device=self.device)

    @property
    def device(self) -> torch.device:
        buffers = list(self.buffers())
        return buffers[0].device if buffers else torch.device("cpu")

    @abc.abstractmethod
    def templates(self, x: torch.Tensor, block: slice | None = None) -> torch.Tensor:
        """T_k(x) for the templates in ``block`` (all when None).

        Args:
            x: the unknown, ``shape``.
            block: a slice of template indices.

        Returns:
            (k, L, L).
        """
        raise NotImplementedError

    @abc.abstractmethod
    def adjoint(self, images: torch.Tensor, block: slice | None = None) -> torch.Tensor:
        """sum_k T_k^T images_k over the templates in ``block``.

        Args:
            images: (k, L, L), one image per template of the block.

        Returns:
            the shape of the unknown.
        """
        raise NotImplementedError

    @abc.abstractmethod
    def normal_solve(self, c: torch.Tensor, rhs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Solve sum_k T_k^T diag(c_k) T_k x' = rhs (the closed-form M-step, eq. 16 set to zero).

        Args:
            c: (K, L, L) coverage of every template pixel (the E-step's statistics).
            rhs: sum_k T_k^T b_k, the shape of the unknown.
            x: the current unknown; entries the coverage does not reach keep its value.

        Returns:
            x', the shape of the unknown.
        """
        raise NotImplementedError

    @abc.abstractmethod
    def orbit(self, x: torch.Tensor) -> torch.Tensor:
        """x under every element of the symmetry the data cannot resolve, (n, *shape)."""
        raise NotImplementedError

    @abc.abstractmethod
    def poses(self) -> Poses:
        """The in-plane angle, mirror flag (and 3-D rotation) of every template."""
        raise NotImplementedError

    def start_iteration(self, tau: int) -> None:
        """Called by the EM loop before iteration tau's E-step, and with the last iteration's tau
        before the final log-likelihood: a group whose subspace changes along the run (frequency
        marching of a volume, the stochastic-EM paper's Section III-D) sets it here. No-op."""

    def nearest(self, truth: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The element of x's orbit closest to ``truth`` (both ``shape``), by the orbit's grid.

        Implementations with a continuous group refine the grid's best element (``Steerable``).
        """
        orbit = self.orbit(x)
        dist = (orbit - truth).reshape(len(orbit), -1).square().sum(1)
        return orbit[int(dist.argmin())]

    def to_image(self, x: torch.Tensor) -> torch.Tensor:
        """The (..., L, L) image an unknown stands for (itself where the unknown is an image)."""
        return x

    def from_image(self, image: torch.Tensor) -> torch.Tensor:
        """The unknown closest to (..., L, L) images (themselves where the unknown is an image)."""
        return image

    @property
    def object_shape(self) -> tuple[int, ...]:
        """The shape of the object an unknown stands for (``to_image``): (L, L) for an image,
        (L, L, L) for a volume."""
        return (self.L,) * (3 if len(self.shape) == 3 else 2)

    @property
    def dimension(self) -> int:
        """The dimension of the unknown's space (of its subspace, for a band-limited volume):
        the directions a white noise on the unknown has."""
        return math.prod(self.shape)

    @property
    def n_rotations(self) -> int:
        """The rotations the group searches: its K (without Dihedral's mirror images; a volume's
        grid size), what a run records as its K."""
        return self.K

    @property
    def is_image(self) -> bool:
        """The unknown is the (L, L) image itself (pixels), not coefficients of a basis."""
        return tuple(self.shape) == (self.L, self.L)

    @property
    def steerable_basis(self):
        """The ``FBBasis`` whose coefficients the unknown is (the autocorrelation analysis needs
        one), or None."""
        return None

    def real_dtype(self) -> torch.dtype:
        """The float dtype of the tables (float64 for a group with none)."""
        floats = [b.dtype for b in self.buffers() if b.dtype.is_floating_point]
        return floats[0] if floats else torch.float64

    def on_tables(self, x) -> torch.Tensor:
        """x on the tables' device and in their float dtype (an engine's group may be float32 or
        on a GPU)."""
        return torch.as_tensor(x, dtype=self.real_dtype(), device=self.device)

    def extra_repr(self) -> str:
        return f"L={self.L}, K={self.K}"


def check_group(group) -> TransformSet:
    """``group`` if it is a ``TransformSet``, else an error saying what is expected."""
    if not isinstance(group, TransformSet):
        raise ValueError(
            f"group must be an mtd TransformSet (e.g. mtd.Rotations(L, K)), got {group!r}"
        )
    return group


def solve_normal(A: torch.Tensor, rhs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Solve the dense normal equations A x' = rhs; entries A (almost) does not reach keep x.

    Below sqrt(eps) of the largest diagonal entry, an unknown's equation would be the rounding
    noise of the FFT back-projection divided by a vanishing weight (a stochastic E-step on a few
    patches leaves such entries, and one of them is enough to blow the estimate up): those
    entries are fixed at their value in x and the system is solved for the others, by Cholesky
    (least squares if A is singular there).

    Args:
        A: (n, n) symmetric positive semi-definite, n = x.numel().
        rhs: the right-hand side, the shape of x.
        x: the current unknown.

    Returns:
        x', the shape of x.
    """
    floor = torch.finfo(x.dtype).eps ** 0.5
    covered = A.diagonal() > floor * A.diagonal().max()
    x_fixed = torch.where(covered, 0, x.reshape(-1))
    b = torch.where(covered, rhs.reshape(-1) - A @ x_fixed, x.reshape(-1))
    both = covered[:, None] & covered[None, :]
    A = torch.where(both, A, 0) + torch.diag((~covered).to(A.dtype))
    L_chol, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        sol = torch.cholesky_solve(b.reshape(-1, 1), L_chol)
    else:
        sol = torch.linalg.lstsq(A, b.reshape(-1, 1)).solution
    return sol.reshape(x.shape)
