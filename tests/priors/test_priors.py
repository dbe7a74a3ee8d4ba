"""The VP-SDE, the losses, the priors and the training task (tasks.train, python train.py)."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from priors.losses import dsm_loss, ism_loss
from priors.module import ScoreModule
from priors.nets import MLP, PaperUNet, ScoreAdapter, UNet, build_net
from priors.prior import AnalyticGaussianPrior, ScorePrior, export_ema, score_error
from priors.sde import VPSDE, sample

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------
# SDE and losses
# ------------------------------------------------------------------------------------------------
def test_vp_marginals_match_closed_form_and_simulation():
    sde = VPSDE(0.1, 20.0)
    for t in (0.01, 0.3, 1.0):
        integral = np.trapezoid([0.1 + 19.9 * s for s in np.linspace(0, t, 2001)], dx=t / 2000)
        assert float(sde.alpha(t)) == pytest.approx(math.exp(-0.5 * integral), rel=1e-9)
        assert float(sde.sigma(t)) ** 2 == pytest.approx(1 - math.exp(-integral), rel=1e-9)
    # Euler-Maruyama on eq. (6) from x0 = 2 reaches N(alpha_t x0, sigma_t^2) at t = 0.4.
    g = torch.Generator().manual_seed(0)
    x = torch.full((40000, 1, 1, 1), 2.0, dtype=torch.float64)
    n = 2000
    for i in range(n):
        drift, diff = sde.sde(x, torch.tensor(0.4 * i / n, dtype=torch.float64))
        x = (
            x
            + drift * (0.4 / n)
            + diff * math.sqrt(0.4 / n) * torch.randn(x.shape, generator=g, dtype=x.dtype)
        )
    mean, std = sde.marginal_prob(torch.full((1, 1, 1, 1), 2.0, dtype=torch.float64), 0.4)
    assert float(x.mean()) == pytest.approx(float(mean), abs=0.01)
    assert float(x.std()) == pytest.approx(float(std), abs=0.01)


def test_posterior_mean_at_a_noise_level_is_the_gaussian_closed_form():
    # y = x0 + s z with x0 ~ N(mu, I): E[x0 | y] = (y + s^2 mu) / (1 + s^2).
    sde = VPSDE()
    mu = torch.arange(25, dtype=torch.float64).reshape(5, 5) % 5
    prior = AnalyticGaussianPrior(mu, sde)
    y = torch.randn(3, 1, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for s in (0.01, 0.3, 2.0):
        t = sde.time_at_noise(s)
        assert float(sde.sigma(t) / sde.alpha(t)) == pytest.approx(s, rel=1e-9)
        expected = (y + s * s * mu) / (1 + s * s)
        torch.testing.assert_close(prior.posterior_mean(y, s), expected, rtol=1e-9, atol=1e-9)
    assert sde.time_at_noise(1e6) == 1.0  # beyond the SDE's end: clamped
    with pytest.raises(ValueError, match="noise must be > 0"):
        sde.time_at_noise(0.0)


def test_dsm_loss_at_exact_score_is_its_analytic_minimum():
    # Data N(mu, I): the exact score is -(x - alpha_t mu) and DSM there equals d * E_t[alpha_t^2].
    sde, d, eps = VPSDE(), 25, 1e-5
    mu = torch.arange(25, dtype=torch.float64).reshape(1, 1, 5, 5) % 5
    exact = AnalyticGaussianPrior(mu[0, 0], sde)
    g = torch.Generator().manual_seed(1)
    x0 = mu + torch.randn((200000, 1, 5, 5), generator=g, dtype=torch.float64)
    loss = float(dsm_loss(exact, sde, x0, eps, generator=g))
    ts = np.linspace(eps, 1, 20001)
    expected = d * np.trapezoid(np.exp(2 * sde.log_alpha(ts)), ts) / (1 - eps)
    assert loss == pytest.approx(expected, rel=0.01)
    paired = float(dsm_loss(exact, sde, x0[:100000], eps, generator=g, antithetic=True))
    assert paired == pytest.approx(expected, rel=0.01)  # the same loss, in expectation
    worse = float(dsm_loss(lambda x, t: exact(x, t) + 0.3, sde, x0, eps, generator=g))
    assert worse > loss + 0.5
    # log t ~ U[log eps, 0]: the expectation over that density, 1 / (t log(1 / eps)).
    eps = 1e-3
    logged = float(dsm_loss(exact, sde, x0, eps, generator=g, t_sampling="log"))
    ls = np.linspace(np.log(eps), 0, 20001)
    expected = d * np.trapezoid(np.exp(2 * sde.log_alpha(np.exp(ls))), ls) / -np.log(eps)
    assert logged == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("time", [False, True])
def test_ism_closed_form_trace_equals_autograd(time):
    torch.manual_seed(0)
    net = MLP(5, 64, time).double()
    x = torch.randn(6, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    s = net(x, torch.zeros(6, dtype=torch.float64)).flatten(1)
    trace = sum(
        torch.autograd.grad(s[:, i].sum(), x, retain_graph=True)[0].flatten(1)[:, i]
        for i in range(25)
    )
    expected = (0.5 * s.square().sum(1) + trace).mean().detach()
    assert float(ism_loss(net, x.detach()).detach()) == pytest.approx(float(expected), rel=1e-12)
    # Generic path (any network): the same value through the batched Jacobian.
    generic = ism_loss(lambda y, t: net(y, t), x.detach())
    assert float(generic.detach()) == pytest.approx(float(expected), rel=1e-12)


def test_ism_is_minimised_by_the_true_score():
    # For N(mu, I) at t = 0 the ISM loss of s(x) = -(x - mu) is -d / 2 in expectation.
    mu = torch.ones(1, 1, 5, 5, dtype=torch.float64)
    x = mu + torch.randn(
        (100000, 1, 5, 5), generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    true = float(ism_loss(lambda y, t: -(y - mu), x).detach())
    assert true == pytest.approx(-12.5, rel=0.01)
    assert float(ism_loss(lambda y, t: -(y - mu) * 1.3, x).detach()) > true + 0.5


def test_reverse_sampler_with_exact_score_draws_the_data_distribution():
    sde = VPSDE()
    mu = torch.tensor([[0.0, 3.0], [1.0, 4.0]])
    x = sample(
        sde,
        AnalyticGaussianPrior(mu, sde),
        (4000, 1, 2, 2),
        steps=500,
        generator=torch.Generator().manual_seed(3),
    )
    assert torch.allclose(x.mean(0)[0], mu, atol=0.08)
    assert torch.allclose(x.std(0)[0], torch.ones(2, 2), atol=0.08)


def test_tweedie_denoiser_of_the_gaussian_prior():
    sde = VPSDE()
    mu = torch.full((1, 1, 5, 5), 2.0)
    prior = AnalyticGaussianPrior(mu[0, 0], sde)
    x = torch.randn(3, 1, 5, 5)
    a = float(sde.alpha(0.3))
    assert torch.allclose(prior.denoise(x, 0.3), mu + a * (x - a * mu), atol=1e-5)  # E[x0 | x_t]


@pytest.mark.parametrize(
    "net", [PaperUNet(), UNet(channels=8), MLP(28, 32, time=True)], ids=["paper", "unet", "mlp"]
)
def test_networks_take_and_return_images(net):
    x = torch.randn(3, 1, 28, 28)
    assert net(x, torch.rand(3)).shape == x.shape


# ------------------------------------------------------------------------------------------------
# One SDE per checkpoint: the score adapter
# ------------------------------------------------------------------------------------------------
def _closed_form_sigma(t: torch.Tensor, beta_min: float, beta_max: float) -> torch.Tensor:
    """sigma_t^2 = 1 - exp(-int_0^t beta) for the linear schedule (eq. 8)."""
    return torch.sqrt(1 - torch.exp(-(beta_min * t + (beta_max - beta_min) * t * t / 2)))


TINY_UNET = {"name": "unet", "image_size": 8, "channels": 8, "mults": [1, 2], "emb_dim": 16}


def test_ema_is_the_exponential_moving_average_of_the_trained_weights():
    # After the weights w_1..w_n of n training steps, the EMA with decay d started at e_0 is
    # d^n e_0 + sum_i (1 - d) d^(n - i) w_i (the definition; DESIGN section 5). A copy of the
    # raw weights would be w_n.
    module = ScoreModule(
        net={"name": "mlp", "image_size": 3, "hidden": 4, "time": True}, ema_decay=0.8
    ).double()
    g = torch.Generator().manual_seed(0)
    start = [e.detach().clone() for e in module.ema.parameters()]
    steps = []
    for _ in range(5):
        with torch.no_grad():
            for p in module.net.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        steps.append([p.detach().clone() for p in module.net.parameters()])
        module.on_train_batch_end(None, None, 0)
    n = len(steps)
    for j, e in enumerate(module.ema.parameters()):
        expected = 0.8**n * start[j] + sum(
            0.2 * 0.8 ** (n - 1 - i) * steps[i][j] for i in range(n)
        )
        torch.testing.assert_close(e.detach(), expected, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(e, steps[-1][j])
    # The weights trained are the raw ones; the EMA takes no gradient.
    assert all(p.requires_grad for p in module.net.parameters())
    assert not any(e.requires_grad for e in module.ema.parameters())


def test_a_non_default_beta_max_drives_the_loss_the_score_and_the_checkpoint(tmp_path):
    sde_hp = {"beta_min": 0.1, "beta_max": 5.0, "N": 1000}
    meta = {"name": "mnist", "image_size": 8, "units": 1.0}
    torch.manual_seed(0)
    module = ScoreModule(net=TINY_UNET, sde=sde_hp, data_meta=meta).double()
    assert module.sde.beta_max == 5.0
    score = module.score_fn(module.net)
    assert score.sde is module.sde and score.output == "noise"
    # The score is -eps / sigma_t with sigma_t of beta_max = 5, not of the default 20.
    x = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.tensor([0.01, 0.1, 0.5, 0.9], dtype=torch.float64)
    sigma = _closed_form_sigma(t, 0.1, 5.0).view(-1, 1, 1, 1)
    with torch.no_grad():
        eps, s = module.net(x, t), score(x, t)
    torch.testing.assert_close(s, -eps / sigma, rtol=1e-12, atol=0)
    torch.testing.assert_close(score.sigma(t, x), sigma, rtol=1e-12, atol=0)
    # The loss's forward process is that SDE too: with the exact score of N(mu, I) under it, DSM
    # is its analytic minimum d E_t[alpha_t^2]; the exact score under beta_max = 20 does worse.
    mu = torch.arange(64, dtype=torch.float64).reshape(1, 1, 8, 8) % 3
    x0 = mu + torch.randn(
        (40000, 1, 8, 8), generator=torch.Generator().manual_seed(2), dtype=x.dtype
    )
    own = AnalyticGaussianPrior(mu[0, 0], VPSDE(0.1, 5.0))
    default = AnalyticGaussianPrior(mu[0, 0], VPSDE(0.1, 20.0))
    g = torch.Generator().manual_seed(3)
    loss_own, loss_default = (float(module.loss(p, x0, g)) for p in (own, default))
    eps_t = module.hparams.eps
    ts = np.linspace(eps_t, 1, 20001)
    alpha2 = np.exp(-(0.1 * ts + 4.9 * ts * ts / 2))
    assert loss_own == pytest.approx(64 * np.trapezoid(alpha2, ts) / (1 - eps_t), rel=0.01)
    assert loss_default > loss_own * 1.2
    # The checkpoint: the bare networks' keys, and a prior whose score uses beta_max = 5.
    state = module.state_dict()
    ema_keys = {k for k in state if k.startswith("ema.")}
    assert ema_keys == {f"ema.{k}" for k in module.net.state_dict()}
    ckpt = {"hyper_parameters": dict(module.hparams), "state_dict": state}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "beta5.ckpt")
    prior = ScorePrior.from_checkpoint(tmp_path / "beta5.ckpt", dtype=torch.float64)
    assert prior.sde.beta_max == 5.0 and prior.net.sde is prior.sde
    torch.testing.assert_close(prior(x, t), -eps / sigma, rtol=1e-12, atol=0)
    assert prior.kind == "mnist" and prior.time_conditioned and prior.held_out is None
    # The slim export keeps the format: without it the file would read as an older checkpoint,
    # whose UNet was scaled by beta_max = 20, and be refused.
    slim = ScorePrior.from_checkpoint(
        export_ema(tmp_path / "beta5.ckpt", tmp_path / "slim.ckpt"), dtype=torch.float64
    )
    torch.testing.assert_close(slim(x, t), -eps / sigma, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="stores no held-out targets"):
        prior.target(0, 0)


def test_score_output_networks_pass_through_the_adapter():
    torch.manual_seed(0)
    x, t = torch.randn(2, 1, 28, 28), torch.rand(2)
    for net in (PaperUNet(), MLP(28, 16, time=True)):
        adapter = ScoreAdapter(net, VPSDE(0.1, 3.0))
        assert adapter.output == "score" and torch.equal(adapter(x, t), net(x, t))
        assert not list(adapter.state_dict().keys() - {f"net.{k}" for k in net.state_dict()})
    ism = ScoreAdapter(MLP(5, 16, time=False), VPSDE())
    assert not ism.time_conditioned and ism.score_and_divergence == ism.net.score_and_divergence
    assert not hasattr(ScoreAdapter(UNet(8, 8, (1, 2), 16), VPSDE()), "score_and_divergence")
    with pytest.raises(ValueError, match="output is None"):
        ScoreAdapter(torch.nn.Linear(2, 2), VPSDE())


def test_ism_with_a_noise_predicting_unet_is_refused():
    with pytest.raises(ValueError, match=r"loss=ism .*\(sigma_0 = 0\)"):
        ScoreModule(net=TINY_UNET, loss="ism")


def test_legacy_unet_sde_keywords_are_checked_and_dropped():
    sde = VPSDE(0.1, 20.0)
    net = build_net(**TINY_UNET, beta_min=0.1, beta_max=20.0, sde=sde)
    assert isinstance(net, UNet) and not hasattr(net, "sde")
    with pytest.raises(ValueError, match=r"net.beta_min=0.2 differs from sde.beta_min=0.1"):
        build_net(**TINY_UNET, beta_min=0.2, sde=sde)
    with pytest.raises(ValueError, match="pass the checkpoint's SDE"):
        build_net(**TINY_UNET, beta_max=20.0)
    with pytest.raises(ValueError, match=r"net.beta_max=10 differs"):
        ScoreModule(net={**TINY_UNET, "beta_max": 10}, sde={"beta_max": 20.0})
    with pytest.raises(TypeError):  # only the UNet ever took them
        build_net("mlp", image_size=5, beta_max=20.0, sde=sde)


# ------------------------------------------------------------------------------------------------
# What a prior knows: targets, mean, samples (priors/pretrained/ in test_pretrained.py)
# ------------------------------------------------------------------------------------------------
def _gaussian_prior(mu: torch.Tensor, units: float = 1.0, time: bool = True) -> ScorePrior:
    torch.manual_seed(0)
    L = mu.shape[-1]
    meta = {"name": "gaussian", "image_size": L, "units": units, "mu": mu.flatten().tolist()}
    return ScorePrior(MLP(L, 16, time=time).double(), VPSDE(), meta, None)


def test_gaussian_targets_are_seeded_draws_of_n_mu_i():
    mu = (torch.arange(16, dtype=torch.float64).reshape(4, 4) * 3) % 5
    prior = _gaussian_prior(mu)
    draws = torch.stack([prior.target(i, 3)[0] for i in range(400)])
    assert draws.shape == (400, 4, 4) and draws.dtype == torch.float64
    assert torch.allclose(draws.mean(0), mu, atol=4 / 400**0.5)  # 4 standard errors
    assert float((draws - mu).std()) == pytest.approx(1.0, abs=0.03)  # 6400 values
    cov = torch.cov((draws - mu).flatten(1).T)  # independent pixels
    assert float((cov - torch.eye(16, dtype=cov.dtype)).abs().max()) < 0.25
    assert len({float(d.sum()) for d in draws}) == 400  # no draw repeats
    image, where = prior.target(7, 3)
    assert torch.equal(image, draws[7]) and where == "N(mu, I) draw 7 of seed 3"
    assert not torch.equal(prior.target(7, 4)[0], image)
    assert torch.equal(AnalyticGaussianPrior(mu).target(7, 3)[0], image)


def test_measurement_units_scale_mean_targets_and_samples():
    mu = torch.ones(3, 3, dtype=torch.float64)
    one, two = _gaussian_prior(mu), _gaussian_prior(mu, units=2.0)
    torch.testing.assert_close(two.mean(), 2 * one.mean())
    torch.testing.assert_close(two.target(1, 0)[0], 2 * one.target(1, 0)[0])
    # The same network: in units u the samples are u times the network's, drawn alike.
    torch.testing.assert_close(two.sample(3, 0, steps=4), 2 * one.sample(3, 0, steps=4))
    with pytest.raises(ValueError, match="units 1"):
        two.oracle()
    assert one.path is None
    with pytest.raises(ValueError, match="this prior is time-free"):
        _gaussian_prior(mu, time=False).sample(1, 0)
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        one.sample(0, 0)


# ------------------------------------------------------------------------------------------------
# train.py
# ------------------------------------------------------------------------------------------------
def write_mnist_idx(root: Path, digits: torch.Tensor) -> np.ndarray:
    """Write real digits and their transposes as torchvision's raw MNIST IDX files."""
    with np.load(ROOT / "assets" / "mnist_digits.npz") as f:
        labels = f["labels"]
    images = (digits.numpy() * 255).round().astype(np.uint8)
    images = np.concatenate([images, images.transpose(0, 2, 1)])
    labels = np.concatenate([labels, labels]).astype(np.uint8)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split in ("train", "t10k"):
        with open(raw / f"{split}-images-idx3-ubyte", "wb") as f:
            f.write(struct.pack(">IIII", 2051, len(images), 28, 28) + images.tobytes())
        with open(raw / f"{split}-labels-idx1-ubyte", "wb") as f:
            f.write(struct.pack(">II", 2049, len(labels)) + labels.tobytes())
    return images


def test_config_composition_picks_the_network_from_the_data(compose):
    assert compose("train", "data=mnist", bare=True).model.net.name == "unet"
    gauss = compose("train", "data=gaussian", bare=True)
    assert gauss.model.net.name == "mlp" and gauss.model.loss == "ism"
    paper = compose("train", "experiment=paper_mnist_prior", bare=True)
    assert paper.model.net.name == "unet_paper" and paper.dataset == "mnist"
    with pytest.raises(Exception, match="no_such_key"):
        compose("train", "data.no_such_key=1", bare=True)


@pytest.mark.parametrize("data", ["mnist", "gaussian"])
def test_fast_dev_run(tmp_path, digits, data, compose):
    from tasks.train import train

    write_mnist_idx(tmp_path / "data", digits)
    cfg = compose(
        "train",
        f"data={data}",
        "debug=fdr",
        "data.download=false" if data == "mnist" else "data.n_train=64",
        root=tmp_path,
    )
    metrics, objects = train(cfg)
    assert math.isfinite(metrics["train/loss"])
    assert objects["trainer"].global_step == 1


def short_mnist_run(compose, tmp_path, digits, *overrides):
    from tasks.train import train

    write_mnist_idx(tmp_path / "data", digits)
    cfg = compose(
        "train",
        "data=mnist",
        "data.download=false",
        "data.batch_size=8",
        "data.val_fraction=0.2",
        "model.sample_every_n_epochs=1",
        "model.n_samples=4",
        "model.sample_steps=3",
        "trainer.max_epochs=2",
        *overrides,
        root=tmp_path,
    )
    return train(cfg)


def test_checkpoint_loads_with_weights_only_and_rebuilds_the_prior(tmp_path, digits, compose):
    metrics, objects = short_mnist_run(compose, tmp_path, digits)
    ckpts = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    assert (tmp_path / "checkpoints" / "last.ckpt") in ckpts and all(
        "=" not in p.name for p in ckpts
    )
    raw = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert raw["hyper_parameters"]["net"]["name"] == "unet"
    prior = ScorePrior.from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    model = objects["model"]
    x = torch.rand(2, 1, 28, 28)
    ema_score = model.score_fn(model.ema)(x, torch.full((2,), 0.1))
    assert torch.allclose(prior(x, 0.1), ema_score, atol=1e-6)
    # ... and the EMA weights are an average, not the last step's raw weights.
    ema, raw = (torch.cat([p.flatten() for p in m.parameters()]) for m in (model.ema, model.net))
    assert not torch.allclose(ema, raw)
    assert not torch.allclose(prior(x, 0.1), model.score_fn(model.net)(x, torch.full((2,), 0.1)))
    held = prior.meta["held_out"]
    images = objects["datamodule"].images
    assert len(held) == 10 and torch.equal(prior.held_out, images[held])
    target, where = prior.target(3, seed=0)
    assert torch.equal(target, images[held[3]].double()) and target.dtype == torch.float64
    assert where == f"held-out target 3 (data index {held[3]})"
    assert (tmp_path / "samples" / "epoch_001.png").is_file()


def test_held_out_targets_never_reach_training(tmp_path, digits, compose):
    _, objects = short_mnist_run(compose, tmp_path, digits, "trainer.max_epochs=1")
    dm = objects["datamodule"]
    held = dm.images[dm.meta()["held_out"]].flatten(1)
    seen = torch.cat(
        [b[0].flatten(1) for b in dm.train_dataloader()]
        + [b[0].flatten(1) for b in dm.val_dataloader()]
    )
    assert len(seen) == len(dm.images) - len(held)
    assert not (torch.cdist(seen, held) < 1e-6).any()


def test_resume_from_last_checkpoint_continues_the_step_count(tmp_path, digits, compose):
    _, first = short_mnist_run(
        compose, tmp_path, digits, "trainer.max_epochs=1", "model.sample_every_n_epochs=0"
    )
    steps = first["trainer"].global_step
    last = tmp_path / "checkpoints" / "last.ckpt"
    _, second = short_mnist_run(
        compose,
        tmp_path,
        digits,
        "trainer.max_epochs=2",
        "model.sample_every_n_epochs=0",
        f"ckpt_path={last}",
    )
    assert steps > 0 and second["trainer"].global_step == 2 * steps


def test_bad_checkpoints_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError):
        ScorePrior.from_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "corrupt.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        ScorePrior.from_checkpoint(tmp_path / "corrupt.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="hyper_parameters"):
        ScorePrior.from_checkpoint(tmp_path / "other.ckpt")


def test_wandb_goes_offline_without_credentials_and_says_how_to_sync(
    tmp_path, monkeypatch, capsys, compose
):
    from tasks.train import train

    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose(
        "train",
        "data=gaussian",
        "data.n_train=64",
        "data.n_val=16",
        "logger=wandb",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=1",
        "+trainer.limit_val_batches=1",
        root=tmp_path,
    )
    train(cfg)
    out = capsys.readouterr().out
    assert "wandb sync" in out and out.count("W&B:") == 1
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1


@pytest.mark.slow
def test_training_the_gaussian_prior_reaches_the_analytic_score(tmp_path, compose):
    """The README's gaussian_ism.ckpt recipe, end to end (about 6 minutes on one core)."""
    from tasks.train import train

    cfg = compose(
        "train",
        "data=gaussian",
        "data.n_train=1000000",
        "data.batch_size=1000",
        "+trainer.limit_train_batches=100",
        "trainer.max_epochs=150",
        "trainer.check_val_every_n_epoch=10",
        root=tmp_path,
    )
    train(cfg)
    prior = ScorePrior.from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    mu = torch.tensor(prior.meta["mu"]).reshape(5, 5)

    def draw(n, g):
        return mu + torch.randn((n, 1, 5, 5), generator=g)

    assert score_error(prior, AnalyticGaussianPrior(mu, prior.sde), draw, 0.0) < 0.05
