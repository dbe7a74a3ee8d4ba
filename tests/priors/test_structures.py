"""The 3-D prior's training data (priors.structures) and its score network on volumes: the
Gaussian-atom rendering against its closed form, poses that keep the norm and the centre, and a
volume checkpoint that loads back to the same scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from priors.structures import BandLimit, load_atoms, place, render, structure_files


def test_one_gaussian_atom_renders_to_its_integral_and_centre():
    L, width, Z = 25, 1.2, 6.0  # the box holds the Gaussian to 1e-10
    p = torch.tensor([[0.7, -1.3, 2.1]], dtype=torch.float64)
    V = render(p, torch.tensor([Z], dtype=torch.float64), L, width)
    grid = torch.arange(L, dtype=torch.float64) - (L - 1) / 2
    assert float(V.sum()) == pytest.approx(Z, rel=1e-8)  # sampled, the integral
    centre = [float((V.sum(dims) * grid).sum() / V.sum()) for dims in ((1, 2), (0, 2), (0, 1))]
    assert centre == pytest.approx(p[0].tolist(), abs=1e-8)
    # and the value at a voxel is the 3-D normal density there
    i = (3, 9, 4)
    d2 = sum((float(grid[a]) - float(p[0, k])) ** 2 for k, a in enumerate(i))
    expected = Z * math.exp(-d2 / (2 * width**2)) / (2 * math.pi * width**2) ** 1.5
    assert float(V[i]) == pytest.approx(expected, rel=1e-12)


def test_a_rotated_structure_keeps_its_norm_and_centre():
    from mtd.so3 import random_rotations

    xyz, z = load_atoms(structure_files()["1ahsA"])
    L = 11
    p, voxel = place(xyz, z, L, 0.45)
    assert np.linalg.norm(p, axis=1).max() == pytest.approx(0.45 * L)
    assert 1 < voxel < 20  # Angstrom per voxel for a small protein at L = 11
    R = random_rotations(4, seed=1)
    pt = torch.from_numpy(p.copy())
    maps = render(torch.einsum("bij,nj->bni", R, pt), torch.from_numpy(z), L, 1.0)
    own = render(pt, torch.from_numpy(z), L, 1.0)
    grid = torch.arange(L, dtype=torch.float64) - (L - 1) / 2
    for V in maps:
        assert float(V.norm()) == pytest.approx(float(own.norm()), rel=0.01)
        for dims in ((1, 2), (0, 2), (0, 1)):
            assert abs(float((V.sum(dims) * grid).sum() / V.sum())) < 0.05  # voxels
    band = BandLimit(L, 10)
    scaled = band(maps)
    inside = band.mask
    rms = scaled[:, inside].square().mean(1).sqrt()
    assert torch.allclose(rms, torch.ones(4, dtype=torch.float64))
    assert torch.allclose(band(scaled), scaled, atol=1e-10)  # a projector: idempotent


def test_volume_checkpoint_round_trips_to_the_same_scores(tmp_path):
    from priors.module import ScoreModule
    from priors.prior import ScorePrior, export_ema

    meta = {"name": "volumes", "image_size": 7, "ndim": 3, "units": 1.0,
            "normalisation": "ball_rms"}  # fmt: skip
    net = {"name": "unet", "image_size": 7, "channels": 8, "mults": [1, 2], "emb_dim": 16,
           "dims": 3}  # fmt: skip
    model = ScoreModule(net, sde={"beta_min": 0.1, "beta_max": 20.0, "N": 1000}, data_meta=meta,
                        n_held_out=2)  # fmt: skip
    model.held_out.copy_(torch.randn(2, 7, 7, 7))
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()},
               tmp_path / "m.ckpt")  # fmt: skip
    export_ema(tmp_path / "m.ckpt", tmp_path / "slim.ckpt")
    prior = ScorePrior.from_checkpoint(tmp_path / "slim.ckpt", dtype=torch.float64)
    x = torch.randn(3, 1, 7, 7, 7, dtype=torch.float64)
    expected = model.score_fn(model.ema).double()(x, 0.3)
    assert torch.allclose(prior(x, 0.3), expected, atol=1e-10)
    assert prior.object_shape == (7, 7, 7) and prior.scale_free
    assert prior.target(1, 0)[0].shape == (7, 7, 7)
    # units: the prior of shapes in other units is the same score, rescaled
    assert torch.allclose(prior.rescaled(2.0)(2 * x, 0.3), prior(x, 0.3) / 2, atol=1e-10)
    with pytest.raises(ValueError, match=r"takes \(B, 1, 7, 7, 7\) volumes"):
        prior(torch.zeros(1, 1, 7, 7), 0.3)
