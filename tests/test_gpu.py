"""On a CUDA GPU: the engine, the priors and reconstruct.py give what they give on the CPU.

Every test here is marked ``gpu``: skipped where torch sees no CUDA device (tests/conftest.py),
run with ``python -m pytest -m gpu`` (scripts/gpu_check.sh does, on a CUDA machine). The CPU in
float64 is the reference: float64 on the GPU must agree with it to rounding (the FFT and the
reductions run in another order, nothing else differs); float32 on the GPU within bounds about 20
times the CPU's own float32-vs-float64 gap on the same problems (measured: estimate 5e-6, rho
3.5e-5, sigma 1e-8, log-likelihood 2e-7 relative, for both forms).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import mtd
from priors.prior import ScorePrior
from tasks.reconstruct import reconstruct
from tests.engine.test_scale import _free_port
from tests.helpers import gaussian_image

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]
F64 = {"estimate": 1e-9, "rho": 1e-9, "sigma": 1e-9, "loglik": 1e-9}
F32 = {"estimate": 1e-4, "rho": 1e-3, "sigma": 1e-5, "loglik": 1e-5}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 on the CPU."""
    a, b = torch.as_tensor(a).cpu().double(), torch.as_tensor(b).cpu().double()
    return float((a - b).norm() / b.norm())


def fit(L, method, device, dtype, data, init, truth, stream=None, chunk_size=None, comm=None):
    """Five closed-form EM iterations (sigma and rho estimated), no early stop."""
    em = mtd.ApproximateEM(
        mtd.Rotations(L, K=4),
        iterations=5,
        tol=0,
        compute=mtd.Compute(method=method, chunk_size=chunk_size, stream=stream),
        device=device,
        dtype=dtype,
    )
    assert em.device.type == torch.device(device).type
    return em.fit(data, init, truth=truth, comm=comm)


def assert_results_close(got, ref, bounds):
    gaps = {
        "estimate": rel(got.estimate, ref.estimate),
        "rho": rel(got.rho, ref.rho),
        "sigma": abs(got.sigma - ref.sigma) / ref.sigma,
        "loglik": rel(got.loglik, ref.loglik),
    }
    assert all(math.isfinite(g) for g in gaps.values()), gaps
    assert all(gaps[k] < bounds[k] for k in bounds), (gaps, bounds)


def problem(form, digits):
    """(L, method, measurement, init): a digit for the FFT form, a 5 x 5 Gaussian for the GEMM."""
    if form == "fft":
        image, N, snr, init = digits[3], 28 * 8, 1.0, digits[:10].mean(0)
    else:
        image, N, snr = gaussian_image(2)[0], 150, 2.0
        init = torch.full((5, 5), float(image.mean()), dtype=torch.float64)
    return image.shape[0], mtd.simulate(image, N, snr=snr, K=4, seed=3), init


@pytest.mark.parametrize("form", ["fft", "gemm"])
def test_engine_on_cuda_equals_the_cpu(form, digits):
    L, meas, init = problem(form, digits)
    ref = fit(L, form, "cpu", torch.float64, meas.data, init, meas.image)
    got64 = fit(L, form, "cuda", torch.float64, meas.data, init, meas.image)
    assert_results_close(got64, ref, F64)
    got32 = fit(L, form, "cuda", torch.float32, meas.data, init, meas.image)
    assert_results_close(got32, ref, F32)
    # The error along the iterations, which reconstruct.py reports, agrees too.
    errors = [[h["error"] for h in r.history] for r in (ref, got64, got32)]
    np.testing.assert_allclose(errors[1], errors[0], rtol=1e-9)
    np.testing.assert_allclose(errors[2], errors[0], rtol=1e-3)


@pytest.mark.parametrize("form", ["fft", "gemm"])
def test_streamed_file_on_cuda_equals_in_memory_cpu(form, digits, tmp_path):
    """The measurement memory-mapped from a .npy and streamed in blocks of 13 patches to the GPU
    gives the in-memory CPU result."""
    L, meas, init = problem(form, digits)
    path = tmp_path / "measurement.npy"
    np.save(path, meas.data.numpy())
    ref = fit(L, form, "cpu", torch.float64, meas.data, init, meas.image, stream=False)
    got = fit(
        L, form, "cuda", torch.float64, str(path), init, meas.image, stream=True, chunk_size=13
    )
    assert_results_close(got, ref, F64)


@pytest.mark.parametrize("form", ["fft", "gemm"])
def test_nccl_all_reduce_on_cuda_equals_no_comm(form, digits):
    """EM with comm=mtd.TorchDistributed() over an NCCL process group: NCCL takes CUDA tensors
    only, so every statistic the engine all-reduces must live on the GPU. One rank: NCCL refuses
    two ranks on one device, and a one-GPU machine is what the GPU check runs on (two GPUs:
    scripts/gpu_check.sh runs launcher=ddp on both); the sums are then the rank's own, so the
    result is the one without comm."""
    import torch.distributed as dist

    L, meas, init = problem(form, digits)
    ref = fit(L, form, "cuda", torch.float64, meas.data, init, meas.image)
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        got = fit(
            L,
            form,
            "cuda",
            torch.float64,
            meas.data,
            init,
            meas.image,
            comm=mtd.TorchDistributed(),
        )
    finally:
        dist.destroy_process_group()
    assert_results_close(got, ref, dict.fromkeys(F64, 1e-12))


def test_mnist_prior_score_on_cuda_equals_the_cpu():
    """The shipped MNIST prior's score at noisy held-out digits, at several diffusion times. In
    float64 to rounding; in float32 within 2e-2: cuDNN runs float32 convolutions in TF32 (10-bit
    mantissa) by default, as reconstruct.py's prior_dtype=float32 does on a GPU."""
    path = ROOT / "priors" / "pretrained" / "mnist.ckpt"
    priors = {
        (device, dtype): ScorePrior.from_checkpoint(path, device=device, dtype=dtype)
        for device in ("cpu", "cuda")
        for dtype in (torch.float32, torch.float64)
    }
    ref_prior = priors["cpu", torch.float64]
    x0 = ref_prior.held_out[:4, None].double()  # (4, 1, 28, 28) in measurement units
    g = torch.Generator().manual_seed(0)
    for t in (0.01, 0.1, 0.5):
        a, s = float(ref_prior.sde.alpha(t)), float(ref_prior.sde.sigma(t))
        x = a * x0 + s * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        ref = ref_prior.score(x, t)
        for (device, dtype), prior in priors.items():
            got = prior.score(x.to(device=device, dtype=dtype), t)
            assert got.device.type == device and got.dtype == dtype
            bound = 1e-9 if dtype == torch.float64 else 2e-2
            assert rel(got, ref) < bound, (t, device, dtype, rel(got, ref))


def test_reconstruct_on_cuda_matches_the_cpu(tmp_path, compose):
    """reconstruct(cfg) with device=cuda dtype=float32, the shipped MNIST prior, 10 iterations:
    runs, writes its outputs, and reports the CPU float64 run's errors to within 1e-2."""
    short = ("em.iterations=10",)
    cpu = reconstruct(
        compose("reconstruct", "device=cpu", "dtype=float64", *short, root=tmp_path / "cpu")
    )
    cuda = reconstruct(
        compose("reconstruct", "device=cuda", "dtype=float32", *short, root=tmp_path / "cuda")
    )
    for v in ("init", "prior", "no_prior"):
        assert math.isfinite(cuda[f"error/{v}"])
        assert cuda[f"error/{v}"] == pytest.approx(cpu[f"error/{v}"], abs=1e-2), v
    for name in ("summary.json", "estimate_prior.npy", "estimate_no_prior.npy"):
        assert (tmp_path / "cuda" / "out" / name).is_file(), name


def test_picking_on_cuda_equals_the_cpu(digits):
    """Posterior picking (the combined evidence, its noise threshold drawn on the CPU) and
    template matching give the CPU's picks on CUDA."""
    from mtd import picking

    F = digits[4]
    L = F.shape[0]
    meas = mtd.simulate(F, 10 * L, density=0.1, snr=0.3, K=4, seed=6)
    out = {}
    for device in ("cpu", "cuda"):
        em = mtd.ApproximateEM(mtd.Rotations(L, 4), dtype=torch.float64, device=device)
        log_rho, s2 = picking.fit_rho_sigma(em, meas.data, F, sigma=meas.sigma, iterations=3)
        picks, _ = picking.pick_posterior(em, meas.data, F, log_rho, s2)
        tm = picking.template_match(meas.data, mtd.Rotations(L, 4), F, device=device)
        out[device] = (picks, tm)
    for a, b in zip(out["cpu"], out["cuda"], strict=True):
        np.testing.assert_array_equal(a.centres, b.centres)
        np.testing.assert_array_equal(a.selected, b.selected)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-8, atol=1e-8)
