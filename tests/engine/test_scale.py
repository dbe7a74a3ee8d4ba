"""Data on disk, streaming, several micrographs, several processes, stochastic EM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import mtd
from tests.helpers import gaussian_image


def measurement(seed=0, N=60, snr=5.0):
    image, mu = gaussian_image(seed)
    return mtd.simulate(image, N, density=0.1, snr=snr, seed=seed), image, mu


def engine(
    K=4,
    method="auto",
    chunk_size=None,
    stream=None,
    stochastic=1.0,
    polish=0,
    seed=0,
    threads="auto",
    **kw,
):
    kw = {"iterations": 6, "tol": 0, "dtype": torch.float64, **kw}
    sampling = mtd.Stochastic(stochastic, polish, seed) if stochastic != 1.0 else None
    compute = mtd.Compute(method, chunk_size, stream, threads)
    return mtd.ApproximateEM(mtd.Rotations(5, K), stochastic=sampling, compute=compute, **kw)


@pytest.mark.parametrize("method", ["gemm", "fft"])
def test_files_streamed_equal_in_memory_whatever_the_split_and_chunks(tmp_path, method):
    meas, image, mu = measurement()
    data = meas.data.double()
    ref = engine(method=method).fit(data, mu)
    # Two files split at a patch row, memory-mapped and streamed in chunks of 7 patches.
    np.save(tmp_path / "a.npy", data[:25].numpy())
    np.save(tmp_path / "b.npy", data[25:].numpy())
    files = [tmp_path / "a.npy", tmp_path / "b.npy"]
    for kw in ({"chunk_size": 7}, {"chunk_size": 1}, {"chunk_size": None, "stream": False}):
        res = engine(method=method, **kw).fit(files, mu)
        torch.testing.assert_close(res.estimate, ref.estimate, rtol=0, atol=1e-10)
        torch.testing.assert_close(res.loglik, ref.loglik, rtol=1e-12, atol=0)
    # In-memory pieces as a list, streamed.
    res = engine(method=method, stream=True, chunk_size=5).fit([data[:25], data[25:]], mu)
    torch.testing.assert_close(res.estimate, ref.estimate, rtol=0, atol=1e-10)


def test_mrc_is_memory_mapped_and_checked_while_streaming(tmp_path):
    meas, _, mu = measurement(1)
    meas.save(tmp_path / "m.mrc")
    mapped = mtd.open_micrograph(tmp_path / "m.mrc")
    assert isinstance(mapped, np.memmap) and not mapped.flags.writeable
    a = engine().fit(tmp_path / "m.mrc", mu)  # streamed (a file)
    b = engine().fit(mtd.read_micrograph(tmp_path / "m.mrc"), mu)  # read whole
    torch.testing.assert_close(a.estimate, b.estimate, rtol=0, atol=1e-10)
    bad = meas.data.double().numpy().copy()
    bad[33, 7] = np.nan
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(ValueError, match="1 non-finite"):
        engine().fit(tmp_path / "bad.npy", mu)


def test_a_micrograph_smaller_than_L_is_named(tmp_path):
    np.save(tmp_path / "tiny.npy", np.zeros((3, 40)))
    with pytest.raises(ValueError, match="tiny.npy"):
        engine().fit([np.zeros((40, 40)), tmp_path / "tiny.npy"], torch.zeros(5, 5))


# ------------------------------------------------------------------------------------------------
# Several processes
# ------------------------------------------------------------------------------------------------
def _worker(rank, world, port, data, init, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        res = engine(chunk_size=7).fit(data, init, comm=mtd.TorchDistributed())
        out[rank] = res.estimate.clone()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Alone:
    """One rank's view with no other process: all_reduce leaves its partial sums as they are."""

    def __init__(self, rank, world_size):
        self.rank, self.world_size = rank, world_size

    def all_reduce(self, tensor):
        return tensor


@pytest.mark.parametrize("method", ["gemm", "fft"])
def test_ranks_partial_statistics_sum_to_all_patches_even_a_rank_without_chunks(method):
    meas, _, mu = measurement(2)
    em = engine(chunk_size=100, method=method)  # 144 patches: 2 chunks for 3 ranks, rank 2: none
    data = em.prepare(meas.data.double())
    log_rho = torch.full((10, 10), 0.01, dtype=torch.float64).log()
    full = em.e_step(data, mu, log_rho, 2.0)
    parts = [em.e_step(data, mu, log_rho, 2.0, comm=_Alone(r, 3)) for r in range(3)]
    assert float(parts[2].loglik) == 0 and float(parts[2].omega.abs().sum()) == 0
    for name in ("omega", "b", "loglik", "energy"):
        total = sum(getattr(p, name) for p in parts)
        torch.testing.assert_close(total, getattr(full, name), rtol=1e-12, atol=1e-12)


def test_two_processes_gloo_equal_one_process():
    meas, _, mu = measurement(2)
    data = meas.data.double()
    single = engine(chunk_size=7).fit(data, mu).estimate
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, _free_port(), data, mu, out), nprocs=2, join=True)
        estimates = [out[0], out[1]]
    torch.testing.assert_close(estimates[0], estimates[1], rtol=0, atol=0)  # the same F everywhere
    torch.testing.assert_close(estimates[0], single, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Stochastic EM
# ------------------------------------------------------------------------------------------------
def test_stochastic_statistics_are_the_subset_sums_scaled_to_all_patches():
    meas, image, mu = measurement(3)
    em = engine()
    data = em.prepare(meas.data)
    log_rho = torch.full((10, 10), 0.01, dtype=torch.float64).log()
    subset = torch.tensor([0, 3, 4, 9, 17, 30, 101, 140])
    part = em.e_step(data, mu, log_rho, 2.0, subset)
    alone = em.e_step(em.prepare(data.source.read(subset).reshape(-1, 5)), mu, log_rho, 2.0)
    scale = data.D / len(subset)
    assert part.D == data.D
    for name in ("omega", "b", "c", "loglik", "energy"):
        torch.testing.assert_close(getattr(part, name), getattr(alone, name) * scale)
    # All patches as the subset: the full statistics.
    full, every = (
        em.e_step(data, mu, log_rho, 2.0),
        em.e_step(data, mu, log_rho, 2.0, torch.arange(data.D)),
    )
    torch.testing.assert_close(every.b, full.b, rtol=0, atol=1e-12)


def test_stochastic_em_is_seeded_and_s_one_is_full_em():
    meas, image, mu = measurement(4, N=110)
    full = engine().fit(meas.data, mu)
    same = engine(stochastic=1.0).fit(meas.data, mu)
    torch.testing.assert_close(same.estimate, full.estimate, rtol=0, atol=0)
    a = engine(stochastic=0.3, seed=1).fit(meas.data, mu)
    b = engine(stochastic=0.3, seed=1).fit(meas.data, mu)
    c = engine(stochastic=0.3, seed=2).fit(meas.data, mu)
    assert torch.equal(a.estimate, b.estimate) and not torch.equal(a.estimate, c.estimate)
    with pytest.raises(ValueError, match="stochastic"):
        engine(stochastic=0.0)
    # Polish: full-data iterations after the stochastic ones, carrying rho over, lead to the full
    # EM's fixed point, which the noisy stochastic iterate alone misses.
    fixed = engine(iterations=400, tol=1e-10).fit(meas.data, mu)
    assert fixed.converged
    noisy = engine(stochastic=0.3, seed=1, iterations=30).fit(meas.data, mu)
    polished = engine(stochastic=0.3, seed=1, iterations=30, polish=400, tol=1e-10)
    polished = polished.fit(meas.data, mu)
    assert len(noisy.history) == 30 and 30 < len(polished.history) <= 430
    gap = (polished.estimate - fixed.estimate).norm()
    assert gap < 1e-3 and gap < (noisy.estimate - fixed.estimate).norm() / 20


def test_stochastic_em_scores_every_restart_on_one_subset_of_patches():
    # Without a polish, the final log-likelihood (the restart's score) is one stochastic E-step
    # at the estimate, on a subset of floor(S D) patches that every restart shares (drawn from
    # seed + _EVAL, while restart r's iterations draw from seed + r); with a polish, the last
    # iterations and the score are on all patches.
    meas, image, mu = measurement(5, N=110)
    em = engine(stochastic=0.3, seed=3, iterations=4)
    data = em.prepare(meas.data)
    seeds, draw = [], em._subset

    def recording(data, generator):
        seeds.append(generator.initial_seed())
        return draw(data, generator)

    em._subset = recording
    res = em.fit(data, torch.stack([mu, mu.flip(0)]))
    shared = 3 + mtd.em.loop._EVAL
    assert seeds == [3, 3, 3, 3, shared, 4, 4, 4, 4, shared]
    subset = draw(data, torch.Generator().manual_seed(shared))
    assert len(subset) == int(0.3 * data.D)
    best = res.restart
    at = em.e_step(data, res.estimate, res.rho.log(), res.sigma**2, subset)
    assert float(res.scores[best]) == pytest.approx(float(at.loglik), rel=1e-6)  # (float32)
    assert float(res.loglik[-1]) == pytest.approx(float(at.loglik), rel=1e-12)
    full = em.e_step(data, res.estimate, res.rho.log(), res.sigma**2)
    assert float(res.loglik[-1]) != pytest.approx(float(full.loglik), rel=1e-6)
    polished = engine(stochastic=0.3, seed=3, iterations=4, polish=1).fit(data, mu)
    full = em.e_step(data, polished.estimate, polished.rho.log(), polished.sigma**2)
    assert float(polished.loglik[-1]) == pytest.approx(float(full.loglik), rel=1e-12)


def test_thousands_of_templates_stay_within_the_chunk_memory():
    # A few templates: chunks within the cache-sized budget. K x 4L^2 above it: one block in
    # chunks within the memory-sized budget while a patch's logits fit there (K = 2000 at L = 11),
    # template blocks beyond (K = 5000); the chunk's work buffer stays within the budget.
    L, image = 11, torch.rand(11, 11, generator=torch.Generator().manual_seed(0)).double()
    meas = mtd.simulate(image, 2 * L, density=0.1, snr=2.0, K=8, seed=0)
    for K in (16, 2000, 5000):
        em = mtd.ApproximateEM(mtd.Rotations(L, K), sigma=meas.sigma, dtype=torch.float64)
        log_rho = torch.full((2 * L, 2 * L), 1 / (4 * L * L), dtype=torch.float64).log()
        stats = em.e_step(em.prepare(meas.data), image, log_rho, meas.sigma**2)
        assert float(stats.omega.sum()) == pytest.approx(4.0)  # 4 patches, each a posterior
        buffer = em.estep.form.work
        work = buffer.numel() * buffer.element_size()
        form = em.estep.form
        budget = form.chunk_elements() if K == 16 else form.max_elements()
        assert work <= budget * 8, (K, work, budget)
        blocks = em.estep.chunking(4)[1]
        assert (len(blocks) > 1) == (K == 5000) and blocks[-1].stop == K
    # A user's chunk of 4 patches x 2000 templates exceeds the memory budget: template blocks.
    compute = mtd.Compute(chunk_size=4)
    em = mtd.ApproximateEM(mtd.Rotations(L, 2000), compute=compute, dtype=torch.float64)
    chunk, blocks = em.estep.chunking(4)
    assert chunk == 4 and len(blocks) > 1
    assert chunk * (blocks[0].stop - blocks[0].start) * 4 * L * L <= em.estep.form.max_elements()


@pytest.mark.parametrize("method", ["gemm", "fft"])
def test_workers_share_the_chunks_and_sum_to_the_serial_statistics(method):
    # threads="auto" shares the chunks out among the cores, each worker on one thread, taking
    # the next chunk when free; the chunks' sums are added in their order, so two or three
    # workers give the serial E-step's bytes, whichever worker summed which chunk.
    meas, _, mu = measurement(N=120)
    data = meas.data.double()
    log_rho = torch.full((10, 10), 0.01, dtype=torch.float64).log()
    serial = engine(method=method, chunk_size=9, threads=1)
    ref = serial.e_step(serial.prepare(data), mu, log_rho, 2.0)
    em = engine(method=method, chunk_size=9)
    patches = em.prepare(data)
    for n in (2, 3, 3):
        em.estep.workers = lambda D, chunks, n=n: n  # n workers whatever this machine's cores
        got = em.e_step(patches, mu, log_rho, 2.0)
        for name in ("omega", "b", "c", "loglik", "energy"):
            assert torch.equal(getattr(got, name), getattr(ref, name)), (n, name)


def test_an_engine_that_ran_two_workers_can_be_copied():
    import copy

    meas, _, mu = measurement(N=120)
    em = engine(chunk_size=9)
    em.estep.workers = lambda D, chunks: 2
    log_rho = torch.full((10, 10), 0.01, dtype=torch.float64).log()
    em.e_step(em.prepare(meas.data.double()), mu, log_rho, 2.0)
    del em.estep.workers  # the method again
    copy.deepcopy(em)  # no thread pool or queue left on it
