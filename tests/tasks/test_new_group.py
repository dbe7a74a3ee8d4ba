"""A kind of unknown the rest of the code has never seen, plugged in by a class and a config value
(docs/design.md, section 10): the K rotations of an image seen through a linear filter (a point
spread function, as a CTF acts on a micrograph). The reconstruction, its errors, its files and
posterior picking run on it unchanged."""

from __future__ import annotations

import json

import numpy as np
import torch

import mtd
from mtd.forward.placement import place, plant
from mtd.groups.base import Poses, TransformSet, solve_normal
from tasks.reconstruct import reconstruct

# A point spread function with a negative ring, like a CTF's at low defocus (3 x 3, centred).
PSF = ((-0.05, -0.1, -0.05), (-0.1, 1.0, -0.1), (-0.05, -0.1, -0.05))


class FilteredRotations(TransformSet):
    """T_k(x) = H R_k x: the K rotations of an (L, L) image (``mtd.Rotations``), then the
    filter H (correlation with ``psf``, zero outside the box), as dense (L^2, L^2) maps."""

    def __init__(self, L: int, K: int = 4, psf=PSF):
        super().__init__()
        self.L, self.K, self.shape = L, K, (L, L)
        self.rotations = mtd.Rotations(L, K)
        basis = torch.eye(L * L, dtype=torch.float64).reshape(L * L, L, L)
        rotated = torch.stack([self.rotations(b) for b in basis])  # (L^2, K, L, L): R_k e_j
        kernel = torch.as_tensor(psf, dtype=torch.float64)[None, None]
        filtered = torch.nn.functional.conv2d(rotated.reshape(-1, 1, L, L), kernel, padding=1)
        maps = filtered.reshape(L * L, K, L * L).permute(1, 2, 0)  # (K, L^2 out, L^2 in)
        self.register_buffer("maps", maps.contiguous())

    def templates(self, x, block=None):
        M = self.maps[block or slice(None)]
        return (M @ x.reshape(-1)).reshape(len(M), self.L, self.L)

    def adjoint(self, images, block=None):
        M = self.maps[block or slice(None)]
        return torch.einsum("kpn,kp->n", M, images.reshape(len(M), -1)).reshape(self.L, self.L)

    def normal_solve(self, c, rhs, x):
        A = torch.einsum("kpi,kp,kpj->ij", self.maps, c.reshape(self.K, -1), self.maps)
        return solve_normal(A, rhs.reshape(-1), x.reshape(-1)).reshape(self.L, self.L)

    def orbit(self, x):
        return self.rotations.orbit(x)  # the filter is known: the image is known up to R_k

    def poses(self) -> Poses:
        return self.rotations.poses()


def test_a_new_group_runs_through_the_whole_pipeline_from_its_config(tmp_path, compose):
    L, N, K = 5, 60, 4
    rng = np.random.default_rng(3)
    truth = torch.from_numpy(rng.uniform(0.5, 1.5, (L, L)))
    group = FilteredRotations(L, K)
    corners = torch.from_numpy(place(N, L, 12, 2 * L - 1, rng))
    k = torch.from_numpy(rng.integers(0, K, len(corners)))
    data = torch.from_numpy(rng.standard_normal((N, N))) * 0.02
    plant(data, group.templates(truth)[k], corners)
    np.save(tmp_path / "m.npy", data.numpy())
    np.save(tmp_path / "truth.npy", truth.numpy())
    np.save(tmp_path / "init.npy", (truth + 0.2 * torch.randn(L, L, dtype=torch.float64)).numpy())
    cfg = compose(
        "reconstruct", "ckpt=none", "measurement=file", f"measurement.path={tmp_path / 'm.npy'}",
        f"measurement.L={L}", f"measurement.truth={tmp_path / 'truth.npy'}", "em=paper_gaussian",
        "em.baseline=closed_form", "em.rho=estimate", "em.init=file",
        f"em.init_file={tmp_path / 'init.npy'}", "em.iterations=30", f"em.K={K}",
        f"em.group._target_={__name__}.FilteredRotations", "pick=true", root=tmp_path,
    )  # fmt: skip
    metrics = reconstruct(cfg)
    assert metrics["error/no_prior"] < 0.05, metrics  # the image recovered through the filter
    out = tmp_path / "out"
    assert json.loads((out / "summary.json").read_text())["runs"]["no_prior"]["group"] == (
        "FilteredRotations"
    )
    picks = mtd.io.read_star(out / "picks.star")
    assert len(picks["rlnCoordinateX"]) == len(corners)  # every copy, with its in-plane angle
    assert set(np.round(picks["rlnAnglePsi"]).astype(int)) <= {0, 90, 180, 270}
