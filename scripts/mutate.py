"""Mutation check: put plausible bugs into the engine and the priors, one at a time, and see which
the default tests catch.

    python scripts/mutate.py                 # every mutation, its own test selection (~4 min)
    python scripts/mutate.py --only snr-formula ema-copy
    python scripts/mutate.py --full          # the whole default suite per mutation (slow)
    python scripts/mutate.py --list

Each mutation is (name, file, exact old text, new text, tests): the old text must occur exactly
once in the file. The working tree (what git tracks plus untracked files it does not ignore) is
copied into a temporary directory once; there each mutation is applied, ``python -m pytest -x -q``
runs on its test selection (a subset of the default suite, chosen so that the whole check takes
minutes; with ``--full`` the whole default suite), and the file is restored. The shared working
tree is never touched. The selection runs unmutated first: it must pass, else nothing is
concluded.

Prints a table name / file / killed by / result and exits non-zero if any mutation survives, or
its old text is no longer in the file (the code moved on: update the mutation). When a test suite
misses a bug found in the wild, add the bug here with the test that now kills it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


def M(name, file, old, new, *tests):
    return Mutation(name, file, old, new, tests)


CLAIMS = "tests/reference/test_claims.py"
EXACT = "tests/reference/test_exact.py"
SIM = "tests/engine/test_simulator.py"
RECON = "tests/reference/test_claims_reconstruct.py"

MUTATIONS = [
    # ---- the six bugs of issue 16 ---------------------------------------------------------------
    M(
        "empty-mask-off-by-one",
        "mtd/em/statistics.py",
        "empty[L, :] = empty[:, L] = True",
        "empty[L - 1, :] = empty[:, L - 1] = True",
        f"{CLAIMS}::test_empty_mass_is_one_on_blank_patches_and_zero_on_patches_holding_a_copy",
        f"{CLAIMS}::test_empty_mass_of_a_blank_measurement_is_one",
    ),
    M(
        "snr-formula",
        "mtd/forward/measurement.py",
        "sigma = math.sqrt(model.energy(copies) / (snr * L * L))",
        "sigma = math.sqrt(model.energy(copies) / (L * L)) / snr",
        f"{SIM}::test_snr_is_the_ratio_of_image_power_to_noise_power",
    ),
    M(
        "ema-copy",
        "priors/module.py",
        "e.lerp_(p, 1 - decay)",
        "e.copy_(p)",
        "tests/priors/test_priors.py::test_ema_is_the_exponential_moving_average_of_the_trained_weights",
    ),
    M(
        "anneal-reversed",
        "mtd/em/msteps.py",
        "self.anneal_from ** (1 - u) * level**u",
        "self.anneal_from**u * level ** (1 - u)",
        f"{CLAIMS}::test_denoiser_noise_is_sigma_over_root_coverage_annealed_geometrically_from_above",
        f"{CLAIMS}::test_the_history_records_the_annealed_noise",
    ),
    M(
        "sigma-at-old-estimate",
        "mtd/em/loop.py",
        "self.residual(stats, x_new)",
        "self.residual(stats, x)",
        f"{EXACT}::test_sigma_estimate_maximises_q_at_the_new_estimate",
    ),
    M(
        "restart-prior-sign",
        "mtd/em/loop.py",
        "score += gamma * self.log_prior(prior, res.estimate)",
        "score -= gamma * self.log_prior(prior, res.estimate)",
        f"{CLAIMS}::test_restarts_with_a_prior_rank_by_loglik_plus_gamma_log_prior",
    ),
    # ---- the engine -----------------------------------------------------------------------------
    M(
        "rho-normalised-by-DK",
        "mtd/em/loop.py",
        "rho = stats.omega.sum(0) / stats.D",
        "rho = stats.omega.sum(0) / (stats.D * self.K)",
        f"{EXACT}::test_reference_iteration_matches_engine",
        f"{EXACT}::test_m_steps_and_rho_equal_brute_force",
    ),
    M(
        "rotation-clockwise",
        "mtd/groups/rotations.py",
        "    sy = cos * y + sin * x + c\n    sx = -sin * y + cos * x + c",
        "    sy = cos * y - sin * x + c\n    sx = sin * y + cos * x + c",
        f"{CLAIMS}::test_rotation_turns_about_the_centre_counter_clockwise",
    ),
    M(
        "rotation-centre",
        "mtd/groups/rotations.py",
        "    c = (L - 1) / 2\n    i, j = torch.meshgrid(",
        "    c = L / 2\n    i, j = torch.meshgrid(",
        f"{CLAIMS}::test_rotation_turns_about_the_centre_counter_clockwise",
    ),
    M(
        "rotation-drops-last-row",  # the fill: the last row and column read as outside
        "mtd/groups/rotations.py",
        "inside = (ys >= 0) & (ys <= L - 1) & (xs >= 0) & (xs <= L - 1)",
        "inside = (ys >= 0) & (ys < L - 1) & (xs >= 0) & (xs < L - 1)",
        f"{CLAIMS}::test_rotation_turns_about_the_centre_counter_clockwise",
    ),
    M(
        "dihedral-not-mirrored",
        "mtd/groups/rotations.py",
        "mirrored = index - col + (L - 1 - col)",
        "mirrored = index",
        f"{EXACT}::test_dihedral_e_step_and_m_step_equal_brute_force",
    ),
    M(
        "coverage-box-off-by-one",
        "mtd/em/statistics.py",
        "rows = ext.unfold(1, L, 1)[:, :L].sum(-1)",
        "rows = ext.unfold(1, L, 1)[:, 1 : L + 1].sum(-1)",
        f"{EXACT}::test_e_step_statistics_equal_brute_force",
    ),
    M(
        "loglik-normaliser-per-patch",
        "mtd/em/estep.py",
        "norm = -0.5 * L * L * math.log(2 * math.pi * sigma2)",
        "norm = -0.5 * math.log(2 * math.pi * sigma2)",
        f"{EXACT}::test_e_step_statistics_equal_brute_force",
    ),
    M(
        "stochastic-unscaled",
        "mtd/em/estep.py",
        "scale = 1.0 if subset is None else data.D / len(subset)",
        "scale = 1.0",
        "tests/engine/test_scale.py::test_stochastic_statistics_are_the_subset_sums_scaled_to_all_patches",
    ),
    M(
        "linear-gamma-over-T",
        "mtd/em/msteps.py",
        "self.max * min(tau / (T - 1), 1.0)",
        "self.max * min(tau / T, 1.0)",
        f"{EXACT}::test_m_steps_and_rho_equal_brute_force",
    ),
    M(
        "gradient-prior-sign",
        "mtd/em/msteps.py",
        "direction = direction + gamma * prior_gradient(",
        "direction = direction - gamma * prior_gradient(",
        f"{EXACT}::test_one_gradient_iteration_is_eq_18",
    ),
    M(
        "denoise-blend-swapped",
        "mtd/em/msteps.py",
        "return (1 - gamma) * x_ml + gamma * denoised, info",
        "return gamma * x_ml + (1 - gamma) * denoised, info",
        "tests/engine/test_em.py::test_denoise_m_step_is_the_map_step_for_a_gaussian_prior_with_uniform_coverage",
    ),
    M(
        "denoise-noise-is-variance",
        "mtd/em/msteps.py",
        "level = self.noise_scale * math.sqrt(sigma2 / max(mean_coverage, 1e-12))",
        "level = self.noise_scale * sigma2 / max(mean_coverage, 1e-12)",
        f"{CLAIMS}::test_denoiser_noise_is_sigma_over_root_coverage_annealed_geometrically_from_above",
    ),
    M(
        "log-prior-weights-doubled",
        "mtd/em/loop.py",
        "zip((u + 1) / 2, wq / 2, strict=True)",
        "zip((u + 1) / 2, wq, strict=True)",
        "tests/engine/test_em.py::test_log_prior_integrates_the_score",
        f"{CLAIMS}::test_restarts_with_a_prior_rank_by_loglik_plus_gamma_log_prior",
    ),
    M(
        "relative-error-normaliser",
        "mtd/metrics/images.py",
        "return torch.linalg.vector_norm(diff, dim=1) / torch.linalg.vector_norm(truth)",
        "return torch.linalg.vector_norm(diff, dim=1) / torch.linalg.vector_norm(\n"
        "        candidates.reshape(len(candidates), -1), dim=1\n    )",
        "tests/engine/test_measurement.py::test_relative_error_is_rotation_invariant_and_optionally_shift_invariant",
    ),
    # ---- the simulator --------------------------------------------------------------------------
    M(
        "iteration-threads-unlimited",
        "mtd/em/estep.py",
        "with sharing(workers), limit_threads(self.threads(D)) as n:",
        "with sharing(workers), limit_threads(torch.get_num_threads()) as n:",
        "tests/engine/test_threads.py::test_every_step_of_an_iteration_runs_at_the_e_steps_threads",
        "tests/engine/test_threads.py::test_an_iteration_shares_its_pieces_over_the_e_steps_workers",
    ),
    M(
        "volume-m-step-on-intra-op-threads",
        "mtd/groups/tomography.py",
        "sum_in_order(ordered_map(part, self._sub_blocks(None)))",
        "sum_in_order(map(part, self._sub_blocks(None)))",
        "tests/engine/test_threads.py::test_the_volume_m_step_runs_on_the_e_steps_workers",
    ),
    M(
        "pieces-ignore-the-workers",
        "mtd/parallel.py",
        "    n = workers()\n",
        "    n = 1\n",
        "tests/engine/test_parallel.py::test_ordered_map_yields_in_order_though_later_pieces_finish_first",
        "tests/engine/test_parallel.py::test_ordered_map_workers_pull_pieces_at_one_intra_op_thread",
    ),
    M(
        "block-lse-no-rescale",
        "mtd/em/estep.py",
        "total = total * (top - new).exp()",
        "total = total * 1",
        f"{EXACT}::test_template_blocks_equal_brute_force",
    ),
    M(
        "workers-merge-overwrites",
        "mtd/em/statistics.py",
        "                m += t",
        "                m.copy_(t)",
        "tests/engine/test_scale.py::test_workers_share_the_chunks_and_sum_to_the_serial_statistics",
        f"{EXACT}::test_template_blocks_equal_brute_force",
    ),
    M(
        "steerable-rotation-clockwise",
        "mtd/groups/fourier_bessel.py",
        "out[:, cos_rows, sin_rows] = -sin[:, sin_rows]  # a' = a cos - b sin",
        "out[:, cos_rows, sin_rows] = sin[:, sin_rows]  # a' = a cos - b sin",
        "tests/engine/test_steerable.py::test_rotation_of_coefficients_is_the_analytic_rotation_at_every_angle",
    ),
    M(
        "posterior-mean-noise-in-measurement-units",
        "priors/prior.py",
        "t = self.sde.time_at_noise(noise / self.scale)",
        "t = self.sde.time_at_noise(noise)",
        f"{CLAIMS}::test_posterior_mean_in_measurement_units_is_the_gaussian_closed_form",
    ),
    M(
        "well-separation-gap",
        "mtd/forward/measurement.py",
        'gap = 2 * L - 1 if separation == "well" else L',
        'gap = 2 * L - 2 if separation == "well" else L',
        "tests/engine/test_measurement.py::test_plants_exactly_p_copies_with_the_separation_rule",
    ),
    M(
        "mirror-after-rotation",
        "mtd/forward/images.py",
        "flipped = _copies(mirror(image), angles, K, rotation, basis=basis)",
        "flipped = mirror(_copies(image, angles, K, rotation, basis=basis))",
        f"{SIM}::test_copies_are_planted_at_the_returned_positions_and_angles",
    ),
    # ---- the priors -----------------------------------------------------------------------------
    M(
        "tweedie-sigma-not-squared",
        "priors/prior.py",
        "return (x + (self.scale * s) ** 2 * self.score(x, t)) / a",
        "return (x + self.scale * s * self.score(x, t)) / a",
        "tests/priors/test_priors.py::test_tweedie_denoiser_of_the_gaussian_prior",
    ),
    M(
        "posterior-mean-unscaled",
        "priors/prior.py",
        "return self.denoise(float(self.sde.alpha(t)) * y, t)",
        "return self.denoise(y, t)",
        "tests/priors/test_priors.py::test_posterior_mean_at_a_noise_level_is_the_gaussian_closed_form",
    ),
    M(
        "score-units-once",
        "priors/prior.py",
        "out = self.net(x.to(p) / self.scale, t) / self.scale",
        "out = self.net(x.to(p) / self.scale, t)",
        f"{CLAIMS}::test_a_prior_in_other_units_has_the_score_of_the_rescaled_density",
    ),
    M(
        "export-keeps-raw-weights",
        "priors/prior.py",
        'if k.startswith("ema.") or k == "held_out"}',
        'if k.startswith(("ema.", "net.")) or k == "held_out"}',
        f"{CLAIMS}::test_priors_export_keeps_the_ema_weights_only",
    ),
    M(
        "dsm-noise-sign",
        "priors/losses.py",
        "residual = std * net(mean + std * z, t) + z",
        "residual = std * net(mean + std * z, t) - z",
        "tests/priors/test_priors.py::test_dsm_loss_at_exact_score_is_its_analytic_minimum",
    ),
    M(
        "hutchinson-without-probe",
        "priors/losses.py",
        "trace = (g * v).flatten(1).sum(1)",
        "trace = g.flatten(1).sum(1)",
        f"{CLAIMS}::test_hutchinson_ism_is_an_unbiased_estimate_of_the_exact_loss",
    ),
    M(
        "corrector-half-noise",
        "priors/sde.py",
        "x = x + step * g + torch.sqrt(2 * step) * z",
        "x = x + step * g + torch.sqrt(step) * z",
        f"{CLAIMS}::test_reverse_sampler_with_a_corrector_draws_the_data_distribution",
    ),
    M(
        "probability-flow-full-score",
        "priors/sde.py",
        "f = f - G**2 * self.score(x, t) * weight",
        "f = f - G**2 * self.score(x, t)",
        f"{CLAIMS}::test_reverse_sde_and_probability_flow_ode_carry_noise_to_the_data",
    ),
    # ---- the seams of the layout: the groups' poses, the typed config ---------------------------
    M(
        "dihedral-poses-not-mirrored",
        "mtd/groups/rotations.py",
        "return Poses(angles=2 * math.pi * (k % r) / r, mirrored=k >= r)",
        "return Poses(angles=2 * math.pi * (k % r) / r, mirrored=k < 0)",
        "tests/engine/test_picking.py::test_mirrored_copies_and_float32",
    ),
    M(
        "config-integer-accepts-fractions",
        "tasks/config.py",
        "if not math.isfinite(number) or number != int(number):",
        "if not math.isfinite(number):",
        "tests/tasks/test_user_errors.py::"
        "test_a_value_of_the_wrong_type_is_refused_naming_its_key_and_what_is_allowed",
    ),
    # ---- the reconstruction and its W&B run -----------------------------------------------------
    M(
        "wandb-group-is-the-task",
        "tasks/tracking.py",
        "group=cfg.group,",
        "group=cfg.task_name,",
        f"{RECON}::test_wandb_run_group_tags_keys_and_summary",
    ),
    M(
        "target-path-first-image",
        "tasks/inputs.py",
        'return stack[m.index], f"{m.target}[{m.index}]"',
        'return stack[0], f"{m.target}[{m.index}]"',
        f"{RECON}::test_measurement_target_path_is_the_simulated_truth",
    ),
    M(
        "prior-samples-unseeded",
        "tasks/inputs.py",
        "prior.sample(R, s.seed)",
        "prior.sample(R, 0)",
        f"{RECON}::test_init_prior_samples_are_reverse_sde_draws_of_the_prior",
    ),
]


def copy_tree(dest: Path) -> None:
    """Copy what git carries (tracked files and untracked ones it does not ignore) into dest."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for raw in listed:
        if not raw:
            continue
        rel = raw.decode()
        src = ROOT / rel
        if not src.is_file():  # deleted in the working tree
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)


def run_tests(where: Path, tests, full: bool, timeout: float) -> tuple[int, str, float]:
    args = [] if full else list(tests)
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider", *args]
    env = {**os.environ, "PYTHONPATH": str(where), "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=where, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return -1, "timeout", time.perf_counter() - start
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start


def killed_by(output: str) -> str:
    m = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
    if m:
        return m.group(1).split("/")[-1]
    return "collection / import error" if "error" in output.lower() else "?"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", metavar="NAME", help="run these mutations only")
    p.add_argument("--full", action="store_true", help="the whole default suite per mutation")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    p.add_argument("--timeout", type=float, default=600, help="seconds per pytest run")
    args = p.parse_args(argv)
    names = [m.name for m in MUTATIONS]
    if len(set(names)) != len(names):
        p.error("mutation names must be unique")
    chosen = MUTATIONS
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            p.error(f"unknown mutation(s) {unknown}; known: {names}")
        chosen = [m for m in MUTATIONS if m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name:30s} {m.file:20s} {' '.join(m.tests)}")
        return 0

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:
        where = Path(tmp)
        copy_tree(where)
        selection = list(dict.fromkeys(t for m in chosen for t in m.tests))
        rc, out, secs = run_tests(where, selection, args.full, args.timeout)
        if rc != 0:
            print(out[-3000:])
            print(f"the unmutated tests fail (rc {rc}): fix them before judging mutations")
            return 2
        print(f"unmutated: {len(selection)} test selections pass ({secs:.0f} s)", flush=True)
        rows, bad = [], 0
        for m in chosen:
            path = where / m.file
            text = path.read_text()
            count = text.count(m.old)
            if count != 1:
                rows.append((m.name, m.file, f"old text found {count} times", "STALE", 0.0))
                bad += 1
                continue
            path.write_text(text.replace(m.old, m.new))
            try:
                rc, out, secs = run_tests(where, m.tests, args.full, args.timeout)
            finally:
                path.write_text(text)
            if rc == 0:
                rows.append((m.name, m.file, "-", "SURVIVED", secs))
                bad += 1
            elif rc == -1:
                rows.append((m.name, m.file, "timeout", "killed (timeout)", secs))
            else:
                rows.append((m.name, m.file, killed_by(out), "killed", secs))
            print(f"  {rows[-1][0]}: {rows[-1][3]} ({secs:.0f} s)", flush=True)
    print()
    print("| mutation | file | killed by | result |")
    print("|---|---|---|---|")
    for name, file, by, result, _ in rows:
        print(f"| {name} | {file} | {by} | {result} |")
    total = time.perf_counter() - start
    survived = sum(r[3] == "SURVIVED" for r in rows)
    stale = sum(r[3] == "STALE" for r in rows)
    print(
        f"\n{len(rows) - survived - stale} of {len(rows)} killed, {survived} survived, "
        f"{stale} stale; {total:.0f} s ({'whole default suite' if args.full else 'selections'})"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
