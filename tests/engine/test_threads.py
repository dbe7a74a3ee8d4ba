"""mtd.em.threads: the E-step's thread policy, its validation, and the iteration's threads."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import mtd
from mtd.em import threads
from mtd.em.threads import chunk_work, resolve_threads, threads_for
from mtd.parallel import limit_threads


@pytest.fixture(autouse=True)
def _restore_threads():
    # Whatever a failing test leaves behind, the next test starts at the same count.
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def default3(monkeypatch):
    # A default different from both 1 and the current count, so "the default" is told apart from
    # "the current value" and from the small-work answer.
    monkeypatch.setattr(threads, "DEFAULT_THREADS", 3)
    return 3


def test_threads_for_small_work_is_one_thread(default3):
    for work in (0, 1, 225_792, threads.PARALLEL_WORK - 1):
        assert threads_for(work, "cpu") == 1


def test_threads_for_large_work_is_the_default_not_the_current_count(default3):
    with limit_threads(1):  # a context lowered the current count: "auto" must not follow it
        for work in (threads.PARALLEL_WORK, 10 * threads.PARALLEL_WORK):
            assert threads_for(work, "cpu") == 3
            assert threads_for(work, torch.device("cpu")) == 3


def test_threads_for_leaves_other_devices_alone(default3):
    with limit_threads(2):
        for device in ("cuda", torch.device("cuda", 0), "meta"):
            assert threads_for(0, device) == 2
            assert threads_for(10 * threads.PARALLEL_WORK, device) == 2
        assert torch.get_num_threads() == 2


def test_default_threads_is_torchs_default_at_import():
    # A fresh interpreter with OMP_NUM_THREADS=2 starts torch at 2 threads; lowering the count
    # after importing mtd.em.threads does not change what it captured.
    code = (
        "import torch, mtd.em.threads as t; d = torch.get_num_threads(); "
        "torch.set_num_threads(1); "
        "print(d, t.DEFAULT_THREADS, t.threads_for(t.PARALLEL_WORK, 'cpu'))"
    )
    env = {"OMP_NUM_THREADS": "2", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.split() == ["2", "2", "2"]


@pytest.mark.parametrize("bad", [-1, 1.5, "many", None, True])
def test_threads_for_rejects_bad_work(bad):
    with pytest.raises(ValueError, match=r"work must be an integer >= 0, got"):
        threads_for(bad, "cpu")


def test_resolve_threads_auto_follows_the_policy(default3):
    assert resolve_threads("auto", 0, "cpu") == 1
    assert resolve_threads("auto", threads.PARALLEL_WORK, "cpu") == 3
    with limit_threads(2):
        assert resolve_threads("auto", threads.PARALLEL_WORK, "cuda") == 2


def test_resolve_threads_int_is_used_as_given_on_every_device(default3):
    for device in ("cpu", "cuda"):
        assert resolve_threads(1, 10 * threads.PARALLEL_WORK, device) == 1
        assert resolve_threads(5, 0, device) == 5
    assert resolve_threads(np.int64(2), 0, "cpu") == 2


@pytest.mark.parametrize("bad", [0, -1, "many", 1.5, 2.0, True, None, "Auto"])
def test_resolve_threads_rejects_bad_values(bad):
    with pytest.raises(ValueError) as info:
        resolve_threads(bad, 0, "cpu")
    msg = str(info.value)
    assert msg.startswith("threads must be")
    assert '"auto"' in msg and "integer >= 1" in msg and repr(bad) in msg


def test_chunk_work_counts_the_logits_of_a_chunk():
    # One logit per (patch, template, shift), the shifts a 2L x 2L grid: the logits array of a
    # chunk of 7 patches, 3 templates, L = 5.
    assert chunk_work(7, 3, 5) == torch.empty(7, 3, 10, 10).numel()
    for bad in ((0, 3, 5), (7, 0, 5), (7, 3, 0), (7, 3, 1.5)):
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            chunk_work(*bad)


@pytest.mark.parametrize(("L", "K", "N"), [(28, 4, 308), (5, 8, 1000), (5, 400, 1000)])
def test_engine_default_cpu_chunks_run_on_one_thread(default3, L, K, N):
    """The engine's default CPU chunks (~2 ms each, sized to stay in cache) hold at most the
    correlation form's element budget, below PARALLEL_WORK: one thread, for the two cases of
    issue 11 and for K = 400 (templates in blocks). See bench_threads for the measurements."""
    D = (N // L) ** 2
    em = mtd.ApproximateEM(mtd.Rotations(L, K=K), dtype=torch.float64)
    chunk, blocks = em.estep.chunking(D)
    block = max(b.stop - b.start for b in blocks)
    work = chunk_work(chunk, block, L)
    assert work <= em.estep.form.chunk_elements() < threads.PARALLEL_WORK
    assert threads_for(work, "cpu") == 1


def test_every_step_of_an_iteration_runs_at_the_e_steps_threads():
    """Issue 28: the chunk loop ran at the policy's one thread while the templates, the M-step
    and the patch transforms ran at torch's default and, beside a competing job, stalled at a
    barrier on every op (5x). Each must see the E-step's count, through fit and when called
    one by one, and the process's own count comes back afterwards."""
    torch.set_num_threads(2)
    seen: dict[str, set] = {}

    def spy(name):
        seen.setdefault(name, set()).add(torch.get_num_threads())

    class Spied(mtd.Rotations):
        def log_weights(self):  # read by the templates of every E-step
            spy("templates")
            return super().log_weights()

    class SpiedStep(mtd.ClosedForm):
        def step(self, *args):
            spy("m_step")
            return super().step(*args)

    em = mtd.ApproximateEM(Spied(12, K=4), m_step=SpiedStep(), iterations=2, dtype=torch.float64)
    transform = em.estep.form.transform
    em.estep.form.transform = lambda patches: (spy("transform"), transform(patches))[1]
    image = np.random.default_rng(0).uniform(0, 1, (12, 12))
    data = em.prepare(mtd.simulate(image, 120, density=0.1, snr=1.0, K=4, seed=0).data)
    assert em.estep.threads(data.D) == 1  # small chunks: the policy's one thread
    em.fit(data, image, callback=lambda entry: spy("callback"))
    assert seen == {"transform": {1}, "templates": {1}, "m_step": {1}, "callback": {1}}
    assert torch.get_num_threads() == 2

    seen.clear()  # the same steps called one by one, as a user's own loop does
    solve = em.group.normal_solve
    em.group.normal_solve = lambda *args: (spy("closed_form"), solve(*args))[1]
    x = torch.as_tensor(image)
    log_rho = torch.full((24, 24), -np.log(24.0**2), dtype=torch.float64)
    em.closed_form(em.e_step(data, x, log_rho, 0.1), x)
    assert seen == {"templates": {1}, "closed_form": {1}}
    assert torch.get_num_threads() == 2


def test_an_iteration_shares_its_pieces_over_the_e_steps_workers(monkeypatch):
    """EStep.limit: the chunks' intra-op threads for every op, and the E-step's workers for
    what comes in pieces (mtd.parallel). Chunks shared out over 3 workers leave the M-step's
    pieces on 3 workers and the rest on one thread; an E-step on one chunk is one worker; a
    user's thread count is one worker at that many threads."""
    from mtd import parallel
    from mtd.em import estep

    monkeypatch.setattr(estep, "DEFAULT_THREADS", 3)
    torch.set_num_threads(2)
    em = mtd.ApproximateEM(mtd.Rotations(5, K=8), dtype=torch.float64)
    D = 40_000
    chunk, _ = em.estep.chunking(D)
    assert em.estep.threads(D) == 1 and em.estep.workers(D, -(-D // chunk)) == 3
    with em.estep.limit(D) as n:
        assert (n, torch.get_num_threads(), parallel.workers()) == (1, 1, 3)
    with em.estep.limit(D, used=chunk) as n:
        assert (n, torch.get_num_threads(), parallel.workers()) == (1, 1, 1)
    em.estep.compute.threads = 2  # the user's count: one worker, that many threads
    with em.estep.limit(D) as n:
        assert (n, torch.get_num_threads(), parallel.workers()) == (2, 2, 1)
    assert (torch.get_num_threads(), parallel.workers()) == (2, 1)


def test_the_volume_m_step_runs_on_the_e_steps_workers(monkeypatch):
    """Issue 28: the volume's CG M-step (0.8 s of a 1.8 s iteration) ran on two intra-op
    threads and, beside a competing job, stalled at every op's barrier (2x); its rotation
    blocks now run on the E-step's workers, one intra-op thread each."""
    from mtd import parallel

    em = mtd.ApproximateEM(mtd.projections(9), dtype=torch.float64)
    group = em.group
    seen = set()
    project = group._project

    def spied(v, b):
        seen.add(
            (threading.current_thread().name.startswith("mtd-worker"), torch.get_num_threads())
        )
        return project(v, b)

    monkeypatch.setattr(group, "_project", spied)
    em.estep.workers = lambda D, chunks: 2
    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.normal(size=(9, 9, 9)))
    stats = mtd.Statistics(
        omega=torch.ones(group.K, 18, 18, dtype=torch.float64),
        b=torch.as_tensor(rng.normal(size=(group.K, 9, 9))),
        c=torch.ones(group.K, 9, 9, dtype=torch.float64),
        loglik=torch.zeros((), dtype=torch.float64),
        energy=torch.zeros((), dtype=torch.float64),
        D=1000,
    )
    with em.estep.limit(1000):
        assert parallel.workers() == 2
        em.closed_form(stats, x)
    assert seen == {(True, 1)}
