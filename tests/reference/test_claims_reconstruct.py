"""What the docs claim of the reconstruction (tasks.reconstruct), against behaviour (issue 16):
the em=mnist schedule, the W&B run's group, tags and keys, em.init=prior_samples,
measurement.target=PATH, and launcher=ddp through Fabric."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mtd
from priors import ScorePrior
from tasks import inputs
from tasks.reconstruct import reconstruct
from tasks.settings import reconstruct_settings

ROOT = Path(__file__).resolve().parents[2]
GAUSSIAN_DSM = ROOT / "priors" / "pretrained" / "gaussian_dsm.ckpt"
# A small Gaussian reconstruction: 5 x 5 draws of the shipped DSM prior's N(mu, I), N = 40.
SMALL = (
    f"ckpt={GAUSSIAN_DSM}",
    "measurement.snr=10",
    "measurement.N=40",
    "measurement.density=0.12",
    "prior_dtype=float64",
)


class FakeRun:
    """Stands in for the W&B run: records what reconstruct.py sends it."""

    def __init__(self, **init):
        self.init, self.id = init, "fake"
        self.metrics, self.rows, self.summary, self.artifacts = [], [], {}, []
        self.exit_code = "not finished"

    def define_metric(self, name, **kwargs):
        self.metrics.append((name, kwargs))

    def log(self, row):
        self.rows.append(row)

    def log_artifact(self, artifact):
        self.artifacts.append(artifact)

    def finish(self, exit_code=None):
        self.exit_code = exit_code


@pytest.fixture
def fake_wandb(monkeypatch):
    """wandb.init returns a FakeRun (the real wandb.Image / Artifact are kept); the runs list."""
    import wandb

    runs = []
    monkeypatch.setattr(wandb, "init", lambda **kw: runs.append(FakeRun(**kw)) or runs[-1])
    monkeypatch.setenv("WANDB_MODE", "offline")
    return runs


def with_wandb(cfg, save_dir):
    from omegaconf import OmegaConf

    cfg.logger = OmegaConf.create({"wandb": {"project": "claims", "save_dir": str(save_dir)}})
    return cfg


def series(run, key):
    """(iterations, values) of an em/* key over the rows that hold it."""
    rows = [r for r in run.rows if key in r]
    return [r["em/iteration"] for r in rows], [r[key] for r in rows]


# ------------------------------------------------------------------------------------------------
# em=mnist: 40 iterations, rho estimated, the denoiser's noise annealed from 1.0 over 32
# ------------------------------------------------------------------------------------------------
def test_em_mnist_anneals_the_denoisers_noise_from_one_over_32_of_40_iterations(
    tmp_path, fake_wandb, compose
):
    # The README: each M-step is the closed-form step, then the prior's denoiser at the noise of
    # that estimate, sigma^2 / (mean coverage), annealed from 1.0 down to that level over 32
    # iterations; 40 iterations; rho estimated. Run through reconstruct.py with tol = 0, the
    # noise it logs starts at 1.0, falls geometrically towards the estimated level (halfway, at
    # iteration 16, their geometric mean) and follows that level from iteration 32 on.
    cfg = with_wandb(
        compose(
            "reconstruct",
            *SMALL,
            "em=mnist",
            "em.init=prior_mean",
            "em.tol=0",
            "em.search_anneal=[]",  # the annealed run alone (em=mnist's search also runs others)
            "em.search_from_no_prior=false",
            out=tmp_path / "out",
        ),
        tmp_path,
    )
    reconstruct(cfg)
    (run,) = fake_wandb
    its, noise = series(run, "em/prior/noise")
    assert its == list(range(40))
    assert noise[0] == pytest.approx(1.0, rel=1e-12)
    assert all(a > b for a, b in zip(noise[:32], noise[1:33], strict=True))
    # Where the level is steady, the annealed noise at tau is 1.0^(1 - tau/32) level^(tau/32).
    level = noise[-1]
    assert noise[32:] == pytest.approx([level] * 8, rel=0.02)
    assert noise[16] == pytest.approx(math.sqrt(level), rel=0.05)
    # rho estimated: the empty mass moves off the uniform rho's (4L - 1) / (4L^2) = 0.19.
    _, empty = series(run, "em/prior/empty_mass")
    assert abs(empty[-1] - 0.19) > 0.1
    # paper_mnist, for contrast: uniform rho, no denoiser, 100 iterations.
    cfg = with_wandb(
        compose(
            "reconstruct",
            *SMALL,
            "em=paper_mnist",
            "em.init=prior_mean",
            "em.tol=0",
            out=tmp_path / "paper",
        ),
        tmp_path,
    )
    reconstruct(cfg)
    its, empty = series(fake_wandb[-1], "em/prior/empty_mass")
    assert its == list(range(100)) and empty == pytest.approx([0.19] * 100)
    assert not series(fake_wandb[-1], "em/prior/noise")[0]


# ------------------------------------------------------------------------------------------------
# W&B: one run per reconstruction, its group, job type, tags, keys and summary
# ------------------------------------------------------------------------------------------------
def test_wandb_run_group_tags_keys_and_summary(tmp_path, fake_wandb, compose):
    cfg = with_wandb(
        compose(
            "reconstruct",
            *SMALL,
            "em=paper_gaussian",
            "em.iterations=6",
            "em.tol=0",
            "group=my_experiment",
            "tags=[extra]",
            "image_every=2",
            out=tmp_path / "out",
        ),
        tmp_path,
    )
    metrics = reconstruct(cfg)
    (run,) = fake_wandb
    assert run.init["group"] == "my_experiment" and run.init["job_type"] == "reconstruct"
    assert run.init["tags"] == ["extra", "em=paper_gaussian", "K=4", "snr=10"]
    assert run.init["config"]["measurement"]["snr"] == 10
    assert ("em/*", {"step_metric": "em/iteration"}) in run.metrics
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    for v in ("prior", "no_prior"):
        keys = {k for r in run.rows for k in r if k.startswith(f"em/{v}/")}
        # The gradient M-step has a learning rate and no denoiser noise.
        expected = {"loglik", "error", "step", "empty_mass", "sigma", "gamma", "lr", "estimate"}
        assert keys == {f"em/{v}/{k}" for k in expected}
        its, errors = series(run, f"em/{v}/error")
        assert its == list(range(6))
        assert errors[-1] == pytest.approx(metrics[f"error/{v}"], rel=1e-12)
        _, sigma = series(run, f"em/{v}/sigma")
        assert sigma == pytest.approx([summary["measurement"]["sigma"]] * 6)  # sigma known
        its, _ = series(run, f"em/{v}/estimate")
        assert its == [0, 2, 4, 5]  # every image_every iterations, and the last
        _, gamma = series(run, f"em/{v}/gamma")
        assert gamma == pytest.approx([1.0 if v == "prior" else 0.0] * 6)  # paper_gaussian
    assert {k: run.summary[k] for k in metrics} == metrics
    assert run.exit_code == 0
    # The denoising M-step logs its noise and no learning rate.
    cfg = with_wandb(
        compose("reconstruct", *SMALL, "em=gaussian", "em.iterations=3", out=tmp_path / "den"),
        tmp_path,
    )
    reconstruct(cfg)
    keys = {k for r in fake_wandb[-1].rows for k in r if k.startswith("em/prior/")}
    assert "em/prior/noise" in keys and "em/prior/lr" not in keys
    assert "em=gaussian" in fake_wandb[-1].init["tags"]


# ------------------------------------------------------------------------------------------------
# em.init=prior_samples and measurement.target=PATH
# ------------------------------------------------------------------------------------------------
def test_init_prior_samples_are_reverse_sde_draws_of_the_prior(tmp_path, compose):
    cfg = compose(
        "reconstruct",
        *SMALL,
        "em=gaussian",
        "em.init=prior_samples",
        "em.restarts=3",
        "em.iterations=5",
        "seed=4",
        out=tmp_path / "out",
    )
    prior = ScorePrior.from_checkpoint(GAUSSIAN_DSM, dtype=torch.float64)
    draws = prior.sample(3, seed=4)
    s = reconstruct_settings(cfg)
    truth, _ = inputs.target_image(s, prior)
    init = inputs.initial_guess(s, 5, prior, truth, mtd.Rotations(5, 4))
    torch.testing.assert_close(init, draws, rtol=0, atol=0)
    # Draws of N(mu, I): each about one unit per pixel from the stored mean, and not equal.
    mu = prior.mean()
    assert all(0.6 < float((x - mu).square().mean().sqrt()) < 1.4 for x in init)
    assert not torch.equal(init[0], init[1])
    metrics = reconstruct(cfg)
    expected = min(mtd.relative_error(truth, x) for x in draws)
    assert metrics["error/init"] == pytest.approx(expected, rel=1e-12)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["runs"]["prior"]["restart"] in (0, 1, 2)


@pytest.mark.parametrize("suffix", [".npy", ".mrc"])
def test_measurement_target_path_is_the_simulated_truth(tmp_path, suffix, compose):
    rng = np.random.default_rng(0)
    stack = rng.uniform(0, 3, (3, 5, 5))
    path = tmp_path / f"targets{suffix}"
    if suffix == ".npy":
        np.save(path, stack)
        index, expected = 2, stack[2]
    else:  # one (L, L) image
        import mrcfile

        with mrcfile.new(path) as mrc:
            mrc.set_data(stack[0].astype(np.float32))
        index, expected = 0, stack[0].astype(np.float32).astype(np.float64)
    cfg = compose(
        "reconstruct",
        *SMALL,
        "em=gaussian",
        "em.iterations=3",
        f"measurement.target={path}",
        f"measurement.index={index}",
        "measurement.snr=inf",
        "measurement.sigma_known=false",
        out=tmp_path / "out",
    )
    reconstruct(cfg)
    out = tmp_path / "out"
    np.testing.assert_array_equal(np.load(out / "truth.npy"), expected)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["measurement"]["target"] == f"{path}[{index}]"
    # No noise: the saved measurement holds the target's copies (rot90 turns) and nothing else.
    data = mtd.read_micrograph(out / "measurement.mrc").numpy().astype(np.float64)
    copies = summary["measurement"]["copies"]
    assert np.isclose(data.sum(), copies * expected.sum(), rtol=1e-5)
    last = len(stack) - 1 if suffix == ".npy" else 0
    with pytest.raises(ValueError, match=rf"measurement.index must be in 0\.\.{last} "):
        reconstruct(
            compose(
                "reconstruct",
                *SMALL,
                f"measurement.target={path}",
                "measurement.index=3",
                out=tmp_path / "bad",
            )
        )


# ------------------------------------------------------------------------------------------------
# launcher=ddp: EM across two CPU processes through Lightning Fabric
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_launcher_ddp_on_two_cpu_processes_gives_the_single_process_estimate(tmp_path, compose):
    # About 16 s (three Python processes start): slow. The README: every process takes every
    # world_size-th chunk of patches, the statistics are all-reduced, rank 0 writes; the
    # estimate is the one-process estimate.
    over = (*SMALL, "em=gaussian", "em.iterations=8", "em.chunk_size=4", "measurement.N=60")
    single = tmp_path / "single"
    reconstruct(compose("reconstruct", *over, out=single))
    ddp = tmp_path / "ddp"
    proc = subprocess.run(
        [
            sys.executable,
            "reconstruct.py",
            *over,
            "logger=none",
            "launcher=ddp",
            "launcher.accelerator=cpu",
            "launcher.devices=2",
            f"hydra.run.dir={ddp}",
            f"paths.output_dir={ddp}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("estimate_prior.npy", "estimate_no_prior.npy"):
        np.testing.assert_allclose(
            np.load(ddp / name), np.load(single / name), rtol=1e-9, atol=1e-9
        )
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["config"]["launcher"]["devices"] == 2
