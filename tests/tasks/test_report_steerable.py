"""report.py on the approximate-EM paper's sweeps (experiment=steerable_snr|size|K): tiny real runs
through reconstruct.py, the tables' means, the paper's stored Fig. 2 values and the log-log slopes
of Fig. 3 against closed forms."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from tasks import report_steerable, runs
from tasks.reconstruct import reconstruct
from tasks.report import main as report_main

# (experiment=steerable_snr fits the autocorrelation baseline and starts EM from it: one short fit)
TINY = (
    "measurement.N=100",
    "em.iterations=3",
    "em.tol=0",
    "ac.starts=1",
    "ac.iterations=20",
)


def run(compose, out: Path, experiment: str, *overrides: str) -> dict:
    """One reconstruction of ``experiment`` into ``out``; its metrics."""
    return reconstruct(
        compose("reconstruct", f"experiment={experiment}", *TINY, *overrides, out=out)
    )


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory, compose):
    """Three tiny sweeps, as ``reconstruct.py -m experiment=...`` lays them out: {name: (folder,
    {(axis value, trial): metrics})}."""
    root = tmp_path_factory.mktemp("sweeps")
    no_ac = ("autocorrelation=false",)
    plan = {  # (axis value, trial, more overrides)
        "size": (
            "steerable_size",
            "measurement.N",
            [(100, 0, no_ac), (100, 1, no_ac), (150, 0, no_ac)],
        ),
        "snr": ("steerable_snr", "measurement.snr", [(1, 0, ()), (2, 0, ())]),
        # The baseline fitted beside one run only: EM's column is the same experiment.
        "K": ("steerable_K", "em.K", [(4, 0, no_ac), (8, 0, ())]),
    }
    out = {}
    for name, (experiment, key, points) in plan.items():
        metrics = {}
        for j, (value, trial, more) in enumerate(points):
            metrics[(value, trial)] = run(
                compose,
                root / name / str(j),
                experiment,
                f"{key}={value}",
                f"measurement.index={trial}",
                *more,
            )
        out[name] = (root / name, metrics)
    return out


def row(text: str, first: str) -> list[str]:
    """The cells of the table row whose first cell is ``first``."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in:\n{text}")


def test_size_sweep_means_and_the_slope_of_error_and_time_against_n_squared(sweeps, capsys):
    folder, metrics = sweeps["size"]
    assert report_main([str(folder)]) == 0
    text = capsys.readouterr().out
    assert "Against N^2 (SNR = 5, K = 16)" in text
    e100 = np.mean([metrics[(100, i)]["error/no_prior"] for i in (0, 1)])
    sd100 = np.std([metrics[(100, i)]["error/no_prior"] for i in (0, 1)], ddof=1)
    e150 = metrics[(150, 0)]["error/no_prior"]
    cells = row(text, "100 (1e+04)")
    assert cells[1] == f"{e100:.3f} ± {sd100:.3f}" and cells[-1] == "2"
    assert row(text, "150 (2.25e+04)")[1] == f"{e150:.3f}"
    # Two sizes: the least-squares slope is the two-point slope log(e2 / e1) / log(N2^2 / N1^2).
    slope = math.log(e150 / e100) / math.log(150**2 / 100**2)
    t100 = np.mean([metrics[(100, i)]["seconds/no_prior"] for i in (0, 1)])
    t150 = metrics[(150, 0)]["seconds/no_prior"]
    t_slope = math.log(t150 / t100) / math.log(150**2 / 100**2)
    assert f"EM: error {slope:+.2f} (paper: -1/2), time {t_slope:+.2f} (paper: 1)" in text
    assert (folder / "steerable_N.png").stat().st_size > 0
    assert not (folder / "steerable_snr.png").exists()  # one SNR: no Fig. 2
    assert "autocorrelation" not in text  # not fitted: no column


def test_snr_sweep_puts_the_papers_fig2_values_beside_ours(sweeps, capsys):
    folder, metrics = sweeps["snr"]
    assert report_main([str(folder)]) == 0
    text = capsys.readouterr().out
    assert "Against SNR (N = 100, K = 8)" in text
    # SNR 1 and 2: the paper's stored EM / autocorrelation errors 0.220 / 0.253, 0.083 / 0.137.
    head = "| SNR | EM error | autocorrelation error | paper EM (K = 8, N = 2500) | paper autocorr"
    assert head in text
    for snr, paper in ((1, ("0.220", "0.253")), (2, ("0.083", "0.137"))):
        cells = row(text, f"{snr:g}")
        m = metrics[(snr, 0)]
        assert cells[1:3] == [f"{m['error/no_prior']:.3f}", f"{m['error/autocorrelation']:.3f}"]
        assert tuple(cells[3:5]) == paper
        assert m["error/init"] == pytest.approx(m["error/autocorrelation"], rel=1e-3)
    assert (folder / "steerable_snr.png").stat().st_size > 0


def test_k_sweep_tabulates_error_time_and_the_autocorrelation_baseline(sweeps, capsys):
    folder, metrics = sweeps["K"]
    assert report_main([str(folder)]) == 0
    text = capsys.readouterr().out
    assert "Against K (SNR = 5, N = 100)" in text
    head = "| K | EM error | EM seconds (s/it) | autocorrelation error | autocorrelation seconds |"
    assert head in text
    for K in (4, 8):
        cells = row(text, str(K))
        m = metrics[(K, 0)]
        per_it = m["seconds/no_prior"] / m["iterations/no_prior"]
        assert cells[1:3] == [
            f"{m['error/no_prior']:.3f}",
            f"{m['seconds/no_prior']:.1f} ({per_it:.3f})",
        ]
    m = metrics[(8, 0)]
    ac = [f"{m['error/autocorrelation']:.3f}", f"{m['seconds/autocorrelation']:.1f}"]
    assert row(text, "8")[3:] == [*ac, "1/1"] and row(text, "4")[3:] == ["-", "-", "1/0"]
    # EM's time follows K; the autocorrelation analysis takes every angle, so no slope for it.
    assert "log-log slopes against K: EM: time" in text and "autocorrelation: time" not in text
    assert (folder / "steerable_K.png").stat().st_size > 0


def test_loglog_slope_of_an_exact_power_law():
    # e = c / N: -1/2 against N^2 (the paper's law-of-large-numbers line), whatever c and the N.
    N = np.array([250.0, 500, 1000, 2000])
    assert report_steerable.loglog_slope(N**2, 0.7 / N) == pytest.approx(-0.5, abs=1e-12)
    assert report_steerable.loglog_slope(N**2, 3e-3 * N**2) == pytest.approx(1.0, abs=1e-12)
    # Least squares: residuals orthogonal to (1, log x) (x geometric, signs + - - +) leave it.
    y = 0.7 / N * np.exp(np.array([0.1, -0.1, -0.1, 0.1]))
    assert report_steerable.loglog_slope(N**2, y) == pytest.approx(-0.5, abs=1e-12)
    with pytest.raises(ValueError, match="needs >= 2 positive points"):
        report_steerable.loglog_slope([1.0], [1.0])


def test_keys_added_later_leave_an_experiment_as_it_was():
    """A run recorded before em.refine_* and picking.* existed and one after, with them at values
    that change nothing (no refinement; picking after EM), are one experiment; a refinement is
    another."""
    old = {"em": {"K": 8, "iterations": 200}, "measurement": {"N": 1000}, "ckpt": None}
    new = {
        "em": {"K": 8, "iterations": 200, "refine_K": None, "refine_iterations": 50},
        "measurement": {"N": 1000},
        "ckpt": None,
        "pick": True,
        "picking": {"threshold": "noise", "noise_draws": 4},
    }
    refined = {**new, "em": {**new["em"], "refine_K": 32}}
    key = runs.experiment_key
    assert key(old, {}) == key(new, {}) != key(refined, {})
    # The denoising M-step's completions: none is as before; its seed is the run's (a trial).
    denoise = {"_target_": "mtd.Denoise", "noise_scale": 1.0}
    old = {**old, "em": {**old["em"], "m_step": denoise}}
    new = {**new, "em": {**new["em"], "m_step": {**denoise, "complete_draws": 0, "seed": 3}}}
    completed = {**new, "em": {**new["em"], "m_step": {**denoise, "complete_draws": 4, "seed": 3}}}
    trial = {
        **completed,
        "em": {**new["em"], "m_step": {**denoise, "complete_draws": 4, "seed": 4}},
    }
    assert key(old, {}) == key(new, {}) != key(completed, {}) == key(trial, {})
    assert new["em"]["m_step"]["seed"] == 3  # the run's config is left as it was
