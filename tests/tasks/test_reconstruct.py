"""The reconstruction end to end (tasks.reconstruct, python reconstruct.py), its bad-input
errors, its outputs, and the report."""

from __future__ import annotations

import json

import hydra
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import mtd
from tasks import inputs, tracking
from tasks.reconstruct import reconstruct
from tasks.settings import reconstruct_settings
from tests.helpers import GAUSS, MU, write_gaussian_ckpt


def test_end_to_end_with_the_analytic_prior_outputs_match_summary(tmp_path, gauss_ckpt, compose):
    cfg = compose("reconstruct", f"ckpt={gauss_ckpt}", "oracle=true", *GAUSS, root=tmp_path)
    metrics = reconstruct(cfg)
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"] == pytest.approx(metrics)
    truth = np.load(out / "truth.npy")
    # The target is the Gaussian draw the config names, from the checkpoint's stored mu.
    g = torch.Generator().manual_seed(cfg.measurement.target_seed)
    expected = (
        torch.tensor(MU, dtype=torch.float64)
        + torch.randn(1, 5, 5, generator=g, dtype=torch.float64)[0]
    )
    np.testing.assert_allclose(truth, expected.numpy())
    for v in ("prior", "no_prior"):
        est = np.load(out / f"estimate_{v}.npy")
        assert est.shape == (5, 5)
        err = mtd.relative_error(torch.from_numpy(truth), torch.from_numpy(est))
        assert err == pytest.approx(metrics[f"error/{v}"], abs=1e-12)
        assert summary["runs"][v]["iterations"] == metrics[f"iterations/{v}"]
        assert (summary["runs"][v]["group"], summary["runs"][v]["K"]) == ("Rotations", 4)
        mrc = mtd.read_micrograph(out / f"estimate_{v}.mrc")
        np.testing.assert_allclose(mrc.numpy(), est, rtol=1e-6, atol=1e-6)  # float32 in MRC
    # The oracle's exact score pulls the estimate to the data mean: better than no prior.
    assert metrics["error/prior"] < metrics["error/no_prior"]
    assert (out / "reconstruction.png").stat().st_size > 1000
    saved = mtd.read_micrograph(out / "measurement.mrc")
    assert saved.shape == (40, 40)
    assert not list(out.glob(".*.tmp"))


def test_the_network_prior_from_a_test_checkpoint_runs_and_ckpt_none_runs_without(
    tmp_path, gauss_ckpt, compose
):
    cfg = compose("reconstruct", f"ckpt={gauss_ckpt}", *GAUSS, "em.iterations=3", root=tmp_path)
    with_net = reconstruct(cfg)
    assert {"error/prior", "error/no_prior", "error/init"} <= set(with_net)
    # ckpt=none: the same target (from measurement.reference_ckpt), no prior run.
    cfg = compose(
        "reconstruct",
        "ckpt=none",
        f"measurement.reference_ckpt={gauss_ckpt}",
        *GAUSS,
        "em.iterations=3",
        root=tmp_path / "alone",
    )
    alone = reconstruct(cfg)
    assert "error/prior" not in alone
    assert alone["error/no_prior"] == pytest.approx(with_net["error/no_prior"], abs=1e-12)


def test_runs_are_reproducible_byte_for_byte(tmp_path, gauss_ckpt, compose):
    over = (f"ckpt={gauss_ckpt}", *GAUSS, "em.iterations=5")
    reconstruct(compose("reconstruct", *over, root=tmp_path / "a"))
    reconstruct(compose("reconstruct", *over, root=tmp_path / "b"))
    for name in ("estimate_prior.npy", "estimate_no_prior.npy", "measurement.mrc"):
        assert (tmp_path / "a/out" / name).read_bytes() == (tmp_path / "b/out" / name).read_bytes()


def test_default_run_uses_the_shipped_prior_and_a_held_out_digit(compose):
    cfg = compose("reconstruct", "paths.output_dir=unused", bare=True)
    s, group = reconstruct_settings(cfg), mtd.Rotations(28, 4)
    prior = inputs.load_prior(s, torch.device("cpu"))
    truth, where = inputs.target_image(s, prior)
    assert truth.shape == (28, 28) and "held-out" in where
    # The init digits are training digits, none of them a held-out target.
    init = inputs.initial_guess(s, 28, prior, truth, group)
    assert init.shape == (1, 28, 28)
    with np.load(cfg.em.init_digits) as f:
        used = f["source_index"][list(cfg.em.init_indices)]
        digits = f["images"][list(cfg.em.init_indices)] / 255
        labels = f["labels"][list(cfg.em.init_indices)]
    assert not set(used.tolist()) & set(prior.meta["held_out"])
    # Restarts: the mean first, then the digits themselves (one per class), at most 11.
    assert sorted(labels.tolist()) == list(range(10))
    cfg.em.restarts = 4
    init = inputs.initial_guess(reconstruct_settings(cfg), 28, prior, truth, group).numpy()
    np.testing.assert_allclose(init[0], digits.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(init[1:], digits[:3], rtol=0, atol=1e-12)
    cfg.em.restarts = 12
    with pytest.raises(ValueError, match="em.restarts=12 with em.init=digits: at most 11"):
        inputs.initial_guess(reconstruct_settings(cfg), 28, prior, truth, group)


def test_measurement_file_reads_mrc_written_by_mtd_and_npy(tmp_path, compose):
    truth = torch.tensor(MU, dtype=torch.float64)
    meas = mtd.simulate(truth, 40, density=0.12, snr=20, seed=3)
    meas.save(tmp_path / "m.mrc")
    np.save(tmp_path / "m.npy", meas.data.numpy())
    np.save(tmp_path / "truth.npy", truth.numpy())

    def run(folder, spec):  # closed-form EM on the file(s), started from the truth
        cfg = compose(
            "reconstruct",
            "ckpt=none",
            "measurement=file",
            f"measurement.path={spec}",
            "measurement.L=5",
            f"measurement.truth={tmp_path / 'truth.npy'}",
            "em=paper_gaussian",
            "em.baseline=closed_form",
            "em.init=file",
            f"em.init_file={tmp_path / 'truth.npy'}",
            "em.iterations=10",
            root=folder,
        )
        return reconstruct(cfg)["error/no_prior"]

    errors = []
    for name in ("m.mrc", "m.npy"):
        errors.append(run(tmp_path / f"run_{name}", tmp_path / name))
        assert (tmp_path / f"run_{name}" / "out/summary.json").is_file()
    assert errors[0] == pytest.approx(errors[1], abs=1e-5)  # MRC holds float32
    # The .npy run is the engine's own run on the in-memory measurement (em=paper_gaussian's
    # closed-form baseline: uniform rho, sigma estimated, 10 iterations from the truth).
    em = mtd.ApproximateEM(
        mtd.Rotations(5, 4), rho="uniform", iterations=10, tol=1e-5, dtype=torch.float64
    )
    direct = mtd.relative_error(truth, em.fit(meas.data, truth).estimate)
    assert errors[1] == pytest.approx(direct, rel=1e-9)
    assert errors[1] < 0.1  # 0.075: close to the truth it started from (SNR 20)
    # Two files (split at a patch row) as a list, and as a glob: one data set, the same result.
    np.save(tmp_path / "part_a.npy", meas.data.numpy()[:20])
    np.save(tmp_path / "part_b.npy", meas.data.numpy()[20:])
    for i, spec in enumerate((f"[{tmp_path}/part_a.npy,{tmp_path}/part_b.npy]", "part_*.npy")):
        spec = spec if i == 0 else str(tmp_path / spec)
        assert run(tmp_path / f"parts{i}", spec) == pytest.approx(errors[1], abs=1e-12)


# ------------------------------------------------------------------------------------------------
# The config: presets, the searched group apart from the simulated one
# ------------------------------------------------------------------------------------------------
def _engines(compose, tmp_path, *overrides):
    """The composed config and the EM that reconstruct builds from it for 5 x 5 images."""
    cfg = compose("reconstruct", *overrides, root=tmp_path)
    group = hydra.utils.instantiate(cfg.em.group)(5)
    m_step = hydra.utils.instantiate(cfg.em.m_step)
    return cfg, inputs.build_em(reconstruct_settings(cfg), group, m_step, None, "cpu")


@pytest.mark.parametrize(
    ("preset", "m_step", "rho", "iterations", "init"),
    [
        (
            "paper_mnist",
            "Gradient(steps=1, lr=0.001, gamma=LinearGamma(max=1.0), prior_t=0.01)",
            "uniform",
            100,
            "digits",
        ),
        (
            "mnist",
            "Denoise(gamma=ConstantGamma(value=1.0), noise_scale=1.0, anneal_from=1.0, "
            "anneal_iterations=32, complete_draws=0)",
            "estimate",
            40,
            "digits",
        ),
        (
            "paper_gaussian",
            "Gradient(steps=1, lr=0.001, gamma=ConstantGamma(value=1.0), prior_t=0.01)",
            "uniform",
            100,
            "uniform",
        ),
        (
            "gaussian",
            "Denoise(gamma=ConstantGamma(value=1.0), noise_scale=1.0, anneal_from=None, "
            "anneal_iterations=0, complete_draws=0)",
            "estimate",
            100,
            "prior_mean",
        ),
    ],
)
def test_presets_build_the_engine_settings_of_the_readme(
    tmp_path, preset, m_step, rho, iterations, init, compose
):
    cfg, em = _engines(compose, tmp_path, f"em={preset}")
    assert repr(em.m_step) == m_step
    assert (em.rho_mode, em.iterations, em.tol, em.stochastic) == (rho, iterations, 1e-5, None)
    assert isinstance(em.group, mtd.Rotations) and em.K == 4
    assert (cfg.em.init, cfg.em.baseline, cfg.em.restarts) == (init, "same", 1)


def test_steerable_mnist_completes_its_denoiser_and_takes_any_other_m_step(tmp_path, compose):
    # em=steerable_mnist's M-step is em=mnist's with 4 completions, seeded by the run's seed; as
    # for every preset, em/m_step=<other> replaces it whole (no completion key left over).
    cfg, em = _engines(compose, tmp_path, "em=steerable_mnist", "seed=7")
    assert (em.m_step.complete_draws, em.m_step.seed, em.m_step.anneal_iterations) == (4, 7, 32)
    cfg, em = _engines(compose, tmp_path, "em=steerable_mnist", "em/m_step=gradient")
    assert type(em.m_step).__name__ == "Gradient"


def test_searched_transformations_follow_the_simulated_ones_unless_set(tmp_path, compose):
    assert _engines(compose, tmp_path, "measurement.K=8")[1].K == 8
    cfg, em = _engines(compose, tmp_path, "measurement.K=8", "em.K=6")
    assert (cfg.measurement.K, em.K) == (8, 6)
    # Files have no simulated rotations: the EM searches em.K (4 unless set).
    file = ("measurement=file", "measurement.path=m.npy", "measurement.L=5")
    assert _engines(compose, tmp_path, *file)[1].K == 4
    cfg, em = _engines(compose, tmp_path, *file, "em/group=dihedral", "em.K=3")
    assert isinstance(em.group, mtd.Dihedral) and em.K == 6  # 3 rotations, each mirrored
    cfg, em = _engines(
        compose, tmp_path, "em/m_step=gradient", "em/m_step/gamma=constant", "em.stochastic=0.5"
    )
    assert repr(em.m_step.schedule) == "ConstantGamma(value=1.0)"
    assert (em.stochastic.fraction, em.stochastic.seed) == (0.5, cfg.seed)


def test_the_prior_runs_search_keeps_its_best_candidate_with_or_without_the_comparison(
    tmp_path, compose
):
    # em=mnist's search: the annealed denoiser, the same without annealing, and one from EM
    # without the prior; summary.json holds every candidate's score and the kept one's index.
    over = ("measurement.N=140", "measurement.snr=0.5", "em.iterations=3")
    reconstruct(compose("reconstruct", *over, root=tmp_path / "a"))
    run = json.loads((tmp_path / "a/out/summary.json").read_text())["runs"]["prior"]
    assert len(run["scores"]) == 3 and run["restart"] == int(np.argmax(run["scores"]))
    # compare=false makes the start from EM without the prior itself: the same estimate, and no
    # file of that unrecorded run.
    reconstruct(compose("reconstruct", *over, "compare=false", root=tmp_path / "b"))
    a, b = tmp_path / "a/out", tmp_path / "b/out"
    assert (a / "estimate_prior.npy").read_bytes() == (b / "estimate_prior.npy").read_bytes()
    assert not (b / "estimate_no_prior.npy").exists()
    # Without the search: one candidate, and the same as the search's first.
    reconstruct(
        compose("reconstruct", *over, "em.search_anneal=[]", "em.search_from_no_prior=false",
                root=tmp_path / "c")
    )  # fmt: skip
    alone = json.loads((tmp_path / "c/out/summary.json").read_text())["runs"]["prior"]
    assert alone["scores"] == [run["scores"][0]]
    assert run["score"] == run["scores"][run["restart"]]
    # em.search_iterations continues the kept candidate: two more iterations, scored after them.
    reconstruct(compose("reconstruct", *over, "em.search_iterations=2", root=tmp_path / "d"))
    more = json.loads((tmp_path / "d/out/summary.json").read_text())["runs"]["prior"]
    assert more["scores"] == run["scores"] and more["restart"] == run["restart"]
    assert more["iterations"] == run["iterations"] + 2 and more["score"] != run["score"]
    assert (tmp_path / "d/out/estimate_prior.npy").read_bytes() != (
        a / "estimate_prior.npy"
    ).read_bytes()


# ------------------------------------------------------------------------------------------------
# Bad input: a clear error before EM starts, nothing written
# ------------------------------------------------------------------------------------------------
def _bad(compose, tmp_path, match, *overrides):
    cfg = compose("reconstruct", *overrides, root=tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        reconstruct(cfg)
    assert not (tmp_path / "out").exists()


def test_mnist_measurement_files_with_the_shipped_prior(tmp_path, digits, compose):
    """The FFT form (L = 28) streamed from two .mrc files, stochastic with a polish: the path a
    user's own MNIST-size data takes (it once crashed, then diverged)."""
    for seed in (1, 2):
        mtd.simulate(digits[4], 308, snr=1.0, seed=seed).save(tmp_path / f"m{seed}.mrc")
    np.save(tmp_path / "truth.npy", digits[4].numpy())
    cfg = compose(
        "reconstruct",
        "measurement=file",
        f"measurement.path={tmp_path / 'm*.mrc'}",
        f"measurement.truth={tmp_path / 'truth.npy'}",
        "measurement.L=28",
        "em.iterations=4",
        "em.stochastic=0.1",
        "em.polish=2",
        root=tmp_path,
    )
    metrics = reconstruct(cfg)
    for variant in ("prior", "no_prior"):
        estimate = np.load(tmp_path / "out" / f"estimate_{variant}.npy")
        assert estimate.shape == (28, 28) and np.isfinite(estimate).all()
        assert mtd.relative_error(digits[4], estimate) == pytest.approx(
            metrics[f"error/{variant}"]
        )
    # Even on 24 patches per iteration the prior keeps the estimate near a digit (0.78, the
    # initial guess 0.73), where EM alone drifts (1.06).
    assert metrics["error/prior"] < metrics["error/no_prior"] - 0.1


def test_missing_checkpoint(tmp_path, no_em, compose):
    _bad(compose, tmp_path, "no checkpoint at", f"ckpt={tmp_path / 'nope.ckpt'}")


def test_corrupt_checkpoint(tmp_path, no_em, compose):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    _bad(compose, tmp_path, "not a readable checkpoint", f"ckpt={bad}")
    with pytest.raises(ValueError, match="weights_only=True, so that") as err:
        reconstruct(compose("reconstruct", f"ckpt={bad}", root=tmp_path))
    assert "weights_only` set to `False`" not in str(err.value)  # no advice to run its code


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_a_gpu(tmp_path, no_em, compose):
    _bad(compose, tmp_path, "no CUDA GPU", "device=cuda")


def test_checkpoint_of_another_image_size(tmp_path, no_em, compose):
    ckpt = write_gaussian_ckpt(tmp_path / "g6.ckpt", image_size=6)
    np.save(tmp_path / "m.npy", np.zeros((40, 40)))
    _bad(
        compose,
        tmp_path,
        "6 x 6 images; the measurement's unknowns are images of side 5",
        f"ckpt={ckpt}",
        "measurement=file",
        f"measurement.path={tmp_path / 'm.npy'}",
        "measurement.L=5",
        "em=paper_gaussian",
    )


@pytest.mark.parametrize(
    ("array", "match"),
    [(np.full((30, 30), np.nan), "non-finite"), (np.zeros((2, 30, 30)), "a measurement is 2-D")],
)
def test_bad_measurement_file(tmp_path, no_em, array, match, compose):
    np.save(tmp_path / "m.npy", array)
    _bad(
        compose,
        tmp_path,
        match,
        "ckpt=none",
        "measurement=file",
        f"measurement.path={tmp_path / 'm.npy'}",
        "measurement.L=5",
        "em=paper_gaussian",
    )


@pytest.mark.parametrize("sigma", [0, -1.0])
def test_sigma_must_be_positive(tmp_path, no_em, sigma, compose):
    np.save(tmp_path / "m.npy", np.zeros((30, 30)))
    _bad(
        compose,
        tmp_path,
        "sigma must be > 0",
        "ckpt=none",
        "measurement=file",
        f"measurement.path={tmp_path / 'm.npy'}",
        "measurement.L=5",
        f"measurement.sigma={sigma}",
    )


def test_unknown_config_key_is_refused(tmp_path, compose):
    with pytest.raises(Exception, match="no_such_key"):
        compose("reconstruct", "em.no_such_key=1", root=tmp_path)
    with pytest.raises(Exception, match="no_such_key"):
        compose("reconstruct", "no_such_key=1", root=tmp_path)


def test_denoise_m_step_refuses_a_time_free_prior(tmp_path, no_em, compose):
    ckpt = write_gaussian_ckpt(tmp_path / "ism.ckpt", time=False)
    _bad(
        compose, tmp_path, "needs a time-conditioned prior", f"ckpt={ckpt}", *GAUSS, "em=gaussian"
    )


def test_a_logger_other_than_wandb_is_refused(tmp_path, no_em, compose):
    _bad(compose, tmp_path, "W&B only", "logger=csv")


def test_oracle_needs_a_gaussian_checkpoint(tmp_path, no_em, compose):
    _bad(compose, tmp_path, "oracle=true needs", "oracle=true")


# ------------------------------------------------------------------------------------------------
# Interruption: whole files or none
# ------------------------------------------------------------------------------------------------
def test_interrupted_run_leaves_no_half_written_file(tmp_path, gauss_ckpt, monkeypatch, compose):
    cfg = compose("reconstruct", f"ckpt={gauss_ckpt}", *GAUSS, "em.iterations=3", root=tmp_path)
    fit = mtd.ApproximateEM.fit

    def interrupted(self, *args, **kwargs):  # Ctrl-C during the second EM
        if isinstance(self.m_step, mtd.Gradient) and kwargs.get("prior") is not None:
            raise KeyboardInterrupt
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(mtd.ApproximateEM, "fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        reconstruct(cfg)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

    # Ctrl-C while the figure is being written: the files written before it are whole, no
    # temporary is left and there is no summary.json (it is written last).
    monkeypatch.setattr(mtd.ApproximateEM, "fit", fit)

    def figure(tmp):  # the figure's temporary file is half written when Ctrl-C comes
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(
        mtd.io.outputs, "save_figure", lambda path, *a: mtd.io.files.atomic_write(path, figure)
    )
    with pytest.raises(KeyboardInterrupt):
        reconstruct(cfg)
    out = tmp_path / "out"
    assert not (out / "summary.json").exists() and not (out / "reconstruction.png").exists()
    assert not list(out.glob(".*"))
    assert np.load(out / "estimate_prior.npy").shape == (5, 5)


# ------------------------------------------------------------------------------------------------
# W&B and the report
# ------------------------------------------------------------------------------------------------
def test_wandb_offline_run(tmp_path, gauss_ckpt, monkeypatch, compose):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose(
        "reconstruct", f"paths.output_dir={tmp_path}", f"ckpt={gauss_ckpt}", *GAUSS,
        "em.iterations=4", "image_every=2", bare=True,
    )  # fmt: skip
    metrics = reconstruct(cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and metrics["error/prior"] < metrics["error/init"]
    assert any(f.suffix == ".wandb" for f in runs[0].iterdir())


def test_wandb_run_has_a_name_the_final_estimate_the_truth_the_figure_and_an_artifact(
    tmp_path, gauss_ckpt, monkeypatch, compose
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose(
        "reconstruct",
        f"ckpt={gauss_ckpt}",
        *GAUSS,
        "em.iterations=4",
        "image_every=2",
        root=tmp_path,
    )
    cfg.logger = OmegaConf.create({"wandb": {"project": "t", "save_dir": str(tmp_path)}})
    reconstruct(cfg)
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    media = run / "files" / "media" / "images"
    for variant in ("prior", "no_prior"):
        # iterations 0 and 2 (image_every) and the last, 3, that EM returned
        assert len(list((media / "em" / variant).glob("estimate_*.png"))) == 3
        assert len(list((media / "final" / variant).glob("estimate_*.png"))) == 1
    for name in ("truth", "measurement_crop", "reconstruction"):
        assert len(list((media / "final").glob(f"{name}_*.png"))) == 1
    import wandb

    wandb.teardown()  # the W&B service may still be writing the record after finish(): wait
    record = next(run.glob("*.wandb")).read_bytes()
    assert b"paper_gaussian N(mu, I) draw 0 of seed 1337 snr=10" in record  # the display name
    assert b"reconstruction-" in record and b"estimate_prior.npy" in record  # the artifact


class FakeRun:
    """Records what reconstruct.py tells a W&B run."""

    def __init__(self):
        self.summary, self.logged, self.exit_code, self.id = {}, [], "not finished", "fake"

    def log(self, row):
        self.logged.append(row)

    def log_artifact(self, artifact):
        self.logged.append({"artifact": artifact.name})

    def finish(self, exit_code=None):
        self.exit_code = exit_code


def test_ctrl_c_marks_the_wandb_run_interrupted_and_a_finished_one_exits_0(
    tmp_path, gauss_ckpt, monkeypatch, compose
):
    runs = []
    monkeypatch.setattr(
        tracking, "start_reconstruction", lambda *a: runs.append(FakeRun()) or runs[-1]
    )
    reconstruct(
        compose(
            "reconstruct", f"ckpt={gauss_ckpt}", *GAUSS, "em.iterations=2", root=tmp_path / "done"
        )
    )
    assert runs[-1].exit_code == 0 and "interrupted" not in runs[-1].summary

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mtd.ApproximateEM, "fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        reconstruct(compose("reconstruct", f"ckpt={gauss_ckpt}", *GAUSS, root=tmp_path / "int"))
    # A non-zero exit code: W&B records the run as failed, not as a finished run.
    assert runs[-1].exit_code == 130 and runs[-1].summary["interrupted"] is True


def test_report_means_match_the_runs(tmp_path, gauss_ckpt, capsys, compose):
    from tasks import report

    errors = {}
    for snr in (5, 10):
        for index in (0, 1):
            d = tmp_path / "sweep" / f"{snr}_{index}"
            cfg = compose(
                "reconstruct",
                f"ckpt={gauss_ckpt}",
                *GAUSS,
                "em.iterations=3",
                f"measurement.snr={snr}",
                f"measurement.index={index}",
                root=d,
            )
            cfg.paths.output_dir = str(d)
            errors[(snr, index)] = reconstruct(cfg)
    assert report.main([str(tmp_path / "sweep")]) == 0
    text = capsys.readouterr().out
    for variant, word in (("prior", "with"), ("no_prior", "without")):
        row = next(line for line in text.splitlines() if f"| {word} |" in line)
        for snr in (5, 10):
            mean = np.mean([errors[(snr, i)][f"error/{variant}"] for i in (0, 1)])
            assert f"{mean:.3f}" in row
    assert (tmp_path / "sweep/errors.png").is_file()
    assert (tmp_path / "sweep/estimates_paper_gaussian_snr10.png").is_file()


def test_report_aligns_with_each_runs_own_group(tmp_path, gauss_ckpt, compose):
    """A run searching the 8 rotations and their mirror images: the report shows its estimates at
    the group element its recorded error is measured at (not at one of 4 rotations)."""
    from tasks import report, runs

    cfg = compose(
        "reconstruct",
        f"ckpt={gauss_ckpt}",
        *GAUSS,
        "em.iterations=5",
        "measurement.K=8",
        "measurement.reflect=true",
        "em/group=dihedral",
        root=tmp_path,
    )
    metrics = reconstruct(cfg)
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    truth = torch.from_numpy(np.load(out / "truth.npy"))
    group = runs.run_group(summary["config"], 5)
    assert isinstance(group, mtd.Dihedral) and group.K == 16
    for v in ("prior", "no_prior"):
        est = torch.from_numpy(np.load(out / f"estimate_{v}.npy"))
        shown = mtd.align(truth, est, group=group)
        err = float((shown - truth).norm() / truth.norm())
        assert err == pytest.approx(metrics[f"error/{v}"], abs=1e-12)
    # A summary from before em.group: the rotations of measurement.K.
    old = runs.run_group({"em": {"name": "x"}, "measurement": {"K": 8}}, 5)
    assert isinstance(old, mtd.Rotations) and old.K == 8
    assert report.main([str(tmp_path)]) == 0


def test_steerable_preset_on_a_file_writes_the_image_and_scores_eq_19(tmp_path, compose):
    # em=steerable on a measurement of exactly rotated band-limited copies (the paper's forward
    # model): the estimate is written as the L x L image of its coefficients, and the error is
    # eq. (19), the coefficients' error minimised over the rotation angle.
    basis = mtd.FBBasis(5, radius=3)  # the preset's: the disk holding the square, 17 functions
    rng = np.random.default_rng(0)
    coef = torch.from_numpy(rng.standard_normal(basis.n))
    coef *= 10 / float(coef.norm())
    image = basis.evaluate(coef)
    meas = mtd.simulate(image, 300, density=0.1, snr=20, rotation="continuous", basis=basis)
    np.save(tmp_path / "m.npy", meas.data.numpy())
    np.save(tmp_path / "truth.npy", image.numpy())
    cfg = compose(
        "reconstruct",
        "ckpt=none",
        "em=steerable",
        "em.K=16",
        "em.restarts=2",
        "em.iterations=60",
        "measurement=file",
        f"measurement.path={tmp_path / 'm.npy'}",
        "measurement.L=5",
        f"measurement.sigma={meas.sigma}",
        f"measurement.truth={tmp_path / 'truth.npy'}",
        root=tmp_path,
    )
    metrics = reconstruct(cfg)
    estimate = torch.from_numpy(np.load(tmp_path / "out" / "estimate_no_prior.npy"))
    assert estimate.shape == (5, 5)
    group = mtd.Steerable(basis, K=16)
    error = mtd.relative_error(coef, basis.expand(estimate), group=group)
    assert error == pytest.approx(metrics["error/no_prior"], abs=1e-9)
    # The preset starts from autocorrelation analysis (restart 0), already close at SNR 20 (a
    # random draw is at ~1). EM then fits K = 16 grid rotations to continuously rotated copies:
    # with N(0, 1) coefficients up to nu = 5 that grid's bias is a few per cent (measured 0.05).
    assert metrics["error/init"] < 0.1 and metrics["error/no_prior"] < 0.1
    assert "error_shift/no_prior" not in metrics  # no translations of coefficients


def test_the_paper_experiment_simulates_band_limited_copies_of_a_random_image(tmp_path, compose):
    # experiment=steerable_paper: the approximate-EM paper's random image (U[0, 1] entries,
    # ||F|| = 10), kept to its first 10 FB coefficients, copies rotated exactly; the truth the
    # error is measured against is that band-limited image, and the SNR is the raw image's.
    cfg = compose(
        "reconstruct",
        "experiment=steerable_paper",
        "measurement.N=120",
        "em.restarts=1",
        "em.iterations=3",
        root=tmp_path,
    )
    metrics = reconstruct(cfg)
    out = tmp_path / "out"
    truth = torch.from_numpy(np.load(out / "truth.npy"))
    raw = mtd.random_image(5, seed=1337, norm=10.0)
    basis = mtd.FBBasis(5, n=10, radius=3, selection="paper_code")  # the paper code's
    assert float(raw.norm()) == pytest.approx(10)
    assert torch.allclose(truth, basis.evaluate(basis.expand(raw)), atol=1e-12)
    summary = json.loads((out / "summary.json").read_text())
    sigma = summary["measurement"]["sigma"]
    assert sigma == pytest.approx(10 / (5 * 5**0.5))  # snr_of=raw: ||raw||^2 / (L^2 sigma^2) = 5
    est = torch.from_numpy(np.load(out / "estimate_no_prior.npy"))
    error = mtd.relative_error(basis.expand(truth), basis.expand(est), group=mtd.Steerable(basis))
    assert error == pytest.approx(metrics["error/no_prior"], abs=1e-9)


def test_refinement_on_a_finer_grid_removes_the_coarse_grids_bias(tmp_path, compose):
    # em.refine_K: copies at any angle fitted with K = 4 rotations come out averaged over
    # +-pi / 4 (the nu = 2 pair damped to 0.64), whatever the SNR; the best restart refined on a
    # 16-point grid from there is near the truth, its iterations after the search's in one
    # history, the record naming both grids.
    args = ("experiment=steerable_paper", "measurement.N=300", "measurement.snr=100")
    args += ("em.K=4", "em.restarts=1", "em.iterations=30", "em.init=autocorrelation")
    coarse = reconstruct(compose("reconstruct", *args, root=tmp_path / "a"))
    fine = reconstruct(
        compose(
            "reconstruct", *args, "em.refine_K=16", "em.refine_iterations=20", root=tmp_path / "b"
        )
    )
    assert coarse["error/no_prior"] > 0.1
    assert fine["error/no_prior"] < coarse["error/no_prior"] / 3
    run = json.loads((tmp_path / "b" / "out" / "summary.json").read_text())["runs"]["no_prior"]
    assert (run["K"], run["refine_K"], run["templates"]) == (4, 16, 16)
    assert coarse["iterations/no_prior"] == 30
    assert 30 < fine["iterations/no_prior"] == run["iterations"] <= 50


def test_refinement_runs_with_a_prior_and_refuses_a_grid_no_finer(tmp_path, gauss_ckpt, compose):
    # The prior's M-step refined past its schedule (mtd.Continued ranks the one start with the
    # step's own prior_t) and the baseline's, both recorded with the grid they refined on.
    args = (f"ckpt={gauss_ckpt}", *GAUSS, "em.iterations=4", "em.restarts=2", "compare=true")
    cfg = compose("reconstruct", *args, "em.refine_K=8", "em.refine_iterations=3", root=tmp_path)
    metrics = reconstruct(cfg)
    runs = json.loads((tmp_path / "out" / "summary.json").read_text())["runs"]
    for v in ("prior", "no_prior"):
        assert runs[v]["refine_K"] == 8 and runs[v]["templates"] == 8
        assert 4 < metrics[f"iterations/{v}"] <= 7
    with pytest.raises(ValueError, match="em.refine_K must be a finer grid than em.K = 4, got 4"):
        reconstruct(compose("reconstruct", *args, "em.refine_K=4", root=tmp_path / "b"))


def test_a_random_target_needs_its_side(tmp_path, no_em, compose):
    _bad(
        compose,
        tmp_path,
        "measurement.target=random needs measurement.L",
        "measurement.target=random",
    )


def test_autocorrelation_baseline_and_initialisation(tmp_path, compose):
    # autocorrelation=true records the paper's baseline (its eq. 19 error, its estimate written as
    # an image); em.init=autocorrelation starts EM from that same fit (seed 0), so the initial
    # guess's error is the baseline's.
    cfg = compose(
        "reconstruct",
        "experiment=steerable_paper",
        "measurement.N=300",
        "measurement.snr=20",
        "autocorrelation=true",
        "em.init=autocorrelation",
        "em.restarts=1",
        "em.iterations=5",
        root=tmp_path,
    )
    metrics = reconstruct(cfg)
    out = tmp_path / "out"
    basis = mtd.FBBasis(5, n=10, radius=3, selection="paper_code")  # the paper code's
    truth = basis.expand(torch.from_numpy(np.load(out / "truth.npy")))
    ac = basis.expand(torch.from_numpy(np.load(out / "estimate_autocorrelation.npy")))
    group = mtd.Steerable(basis)
    assert mtd.relative_error(truth, ac, group=group) == pytest.approx(
        metrics["error/autocorrelation"], abs=1e-9
    )
    assert metrics["error/init"] == pytest.approx(metrics["error/autocorrelation"], abs=1e-9)
    assert metrics["error/autocorrelation"] < 0.5  # a fit, not a random guess (~0.9)
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert runs["autocorrelation"]["gamma"] == pytest.approx(0.04, rel=0.3)


def test_autocorrelation_needs_a_steerable_unknown(tmp_path, no_em, compose):
    _bad(compose, tmp_path, "needs em/group=steerable", "ckpt=none", "autocorrelation=true")


@pytest.mark.parametrize("max_shift", ["3", "null"])
def test_pick_after_em_writes_one_star_row_per_copy(tmp_path, max_shift, compose):
    # pick=true: posterior picking at the run's estimate; at high SNR every planted copy is
    # picked once (no duplicates across patch borders) at its true centre. max_shift=null (no
    # search for the estimate's frame) runs too.
    import starfile

    cfg = compose(
        "reconstruct", "ckpt=none", "measurement.snr=50", "em.iterations=5", "pick=true",
        f"max_shift={max_shift}", root=tmp_path,
    )  # fmt: skip
    metrics = reconstruct(cfg)
    assert metrics["pick/shift_accuracy"] == 1.0
    out = tmp_path / "out"
    star = starfile.read(out / "picks.star")
    assert {"rlnCoordinateX", "rlnCoordinateY", "rlnAnglePsi"} <= set(star.columns)
    assert len(star) == metrics["pick/picks"] == metrics["pick/particles"] == 12
    assert metrics["pick/f1"] == 1.0
    # the baseline ranks every copy first; its noise threshold allows about one false pick per
    # micrograph by design (here one, NCC 0.156 against 0.99 for the copies)
    assert metrics["pick_template_true/ap"] == 1.0 and metrics["pick_template_true/recall"] == 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["pick/ap"] == metrics["pick/ap"]
    assert (out / "picks.png").exists()


def test_volume_experiment_writes_the_aligned_volume_and_its_fsc(tmp_path, compose):
    # object=volume (experiment=volume): the same entry point estimates a 3-D volume from a
    # micrograph of its projections; the estimate is written aligned to the truth (rotation,
    # mirror, shift), its error is that aligned volume's error, and the FSC crossings are recorded.
    from mtd.metrics import volumes as volume_metrics

    cfg = compose(
        "reconstruct",
        "experiment=volume",
        "measurement.N=220",
        "measurement.snr=100",
        "em.iterations=2",
        "em.stochastic=1",
        "em.group.resolution=0",
        "em.K=72",
        "em.group.schedule=[[0,6],[1,8]]",
        root=tmp_path,
    )
    metrics = reconstruct(cfg)
    out = tmp_path / "out"
    est, voxel = mtd.io.read_volume(out / "estimate_no_prior.mrc")
    truth, _ = mtd.io.read_volume(out / "truth.mrc")
    assert est.shape == (11, 11, 11) and voxel == 1.0
    error = volume_metrics.volume_error(torch.from_numpy(truth), torch.from_numpy(est))
    assert error == pytest.approx(metrics["error/no_prior"], rel=1e-5)  # (float32 .mrc)
    assert metrics["resolution_0.5/no_prior"] is None or metrics["resolution_0.5/no_prior"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs"]["no_prior"]["templates"] == 72
    assert {"volume.png", "fsc.png", "measurement.mrc"} <= {p.name for p in out.iterdir()}


def test_denoise_after_em_writes_the_denoised_measurement(tmp_path, compose):
    # denoise=true: the shipped tile prior's posterior mean over blended tiles, guided by the
    # estimate; on a simulated measurement its PSNR against the clean one is recorded and beats
    # the raw measurement's.
    cfg = compose(
        "reconstruct",
        "ckpt=none",
        "measurement.snr=1",
        "em.iterations=3",
        "denoise=true",
        root=tmp_path,
    )
    metrics = reconstruct(cfg)
    out = tmp_path / "out"
    assert (out / "denoised.mrc").exists() and (out / "denoised.png").exists()
    assert metrics["denoise/guidance"] == 0.25
    assert metrics["denoise/psnr"] > metrics["denoise/psnr_raw"] + 10
    denoised = mtd.read_micrograph(out / "denoised.mrc")
    assert denoised.shape == (308, 308)


def test_volume_from_a_micrograph_file_scored_against_the_named_truth(tmp_path, compose):
    # object=volume on a user's micrograph file: measurement=file with the volume it was made of
    # (measurement.truth=shepp_logan, or a .mrc) gives the aligned error; by default a file's
    # volume is not known (not the simulator's phantom): no error.
    import mtd.forward.volumes

    meas = mtd.forward.volumes.simulate_volume(
        mtd.forward.volumes.shepp_logan(11), 220, density=0.15, snr=50, seed=3
    )
    np.save(tmp_path / "mic.npy", meas.data.numpy())
    common = [
        "experiment=volume",
        "measurement=file",
        f"measurement.path={tmp_path / 'mic.npy'}",
        f"measurement.sigma={meas.sigma}",
        "em.iterations=1",
        "em.stochastic=1",
        "em.group.resolution=0",
        "em.K=72",
        "em.group.schedule=[[0,6]]",
    ]
    metrics = reconstruct(
        compose("reconstruct", *common, "measurement.truth=shepp_logan", root=tmp_path)
    )
    assert 0 < metrics["error/no_prior"] < 2
    other = tmp_path / "other"
    other.mkdir()
    metrics = reconstruct(compose("reconstruct", *common, root=other))
    assert "error/no_prior" not in metrics and (other / "out" / "estimate_no_prior.mrc").exists()


def test_em_log_records_a_volumes_aligned_error_every_few_iterations():
    # The W&B curve of a volume run: every `every` iterations the estimate is aligned to the truth
    # through its group (SO(3), the mirror, shifts) and its error logged; the dashboard's image
    # is the central slice.
    from tasks import tracking
    from tasks.reconstruct import EMLog

    truth = mtd.shepp_logan(11)  # (at 9^3 its small features, which tell the hands apart, are
    # gone: the other hand is within 0.05)
    turned = torch.rot90(truth, 1, dims=(1, 2)).flip(0)  # a quarter turn and a mirror
    rows = []
    log = EMLog(rows.append, mtd.projections(11, resolution=0), truth, every=2)
    for tau in range(3):
        log({"iteration": tau, "loglik": 0.0, "estimate": turned})
    assert [("error" in r) for r in rows] == [True, False, True]
    assert rows[0]["error"] < 1e-3 and rows[2]["error"] < 1e-3
    shown = tracking._image(rows[1]["estimate"])
    assert shown.shape == (11, 11)
    middle = turned[5].numpy()
    np.testing.assert_array_equal(shown, tracking._image(torch.from_numpy(middle)))
    unaligned = float((turned - truth).norm() / truth.norm())
    assert unaligned > 0.5
