"""mtd.parallel: intra-op threads of a block, and work shared out over workers in a fixed order."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

import mtd
from mtd import parallel
from mtd.parallel import limit_threads, ordered_map, sharing, sum_in_order


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_limit_threads_sets_and_restores():
    before = torch.get_num_threads()
    n = 1 if before != 1 else 2
    with limit_threads(n) as got:
        assert got == n
        assert torch.get_num_threads() == n
    assert torch.get_num_threads() == before


def test_limit_threads_restores_after_an_exception():
    before = torch.get_num_threads()
    n = 1 if before != 1 else 2
    with pytest.raises(KeyError, match="inside"):
        with limit_threads(n):
            assert torch.get_num_threads() == n
            raise KeyError("inside")
    assert torch.get_num_threads() == before


def test_limit_threads_nested_restore_in_order():
    torch.set_num_threads(2)
    with limit_threads(1):
        with limit_threads(3):
            assert torch.get_num_threads() == 3
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_limit_threads_same_count_sets_nothing(monkeypatch):
    calls = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real(n)))
    with limit_threads(torch.get_num_threads()):
        pass
    assert calls == []
    with limit_threads(torch.get_num_threads() + 1):
        pass
    assert len(calls) == 2  # set, then restored


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", None, True])
def test_limit_threads_rejects_bad_counts(bad):
    before = torch.get_num_threads()
    with pytest.raises(ValueError, match=r"n must be an integer >= 1, got"):
        with limit_threads(bad):
            pass
    assert torch.get_num_threads() == before


def test_ordered_map_without_sharing_runs_in_the_calling_thread_at_its_threads():
    torch.set_num_threads(2)
    seen = list(
        ordered_map(lambda i: (i, threading.get_ident(), torch.get_num_threads()), range(5))
    )
    assert seen == [(i, threading.get_ident(), 2) for i in range(5)]


def test_ordered_map_yields_in_order_though_later_pieces_finish_first():
    # Piece i sleeps less the later it is: on three workers the last ones finish first.
    finished = []

    def piece(i):
        time.sleep(0.02 * (6 - i))
        finished.append(i)
        return i

    with sharing(3):
        assert list(ordered_map(piece, range(6))) == list(range(6))
    assert finished != sorted(finished)  # the pieces did finish out of order


def test_ordered_map_workers_pull_pieces_at_one_intra_op_thread():
    torch.set_num_threads(2)
    seen = set()

    def piece(i):
        time.sleep(0.01)  # long enough that one worker cannot take every piece
        seen.add((threading.get_ident(), torch.get_num_threads(), parallel.workers()))
        return i

    with sharing(2):
        list(ordered_map(piece, range(8)))
        assert parallel.workers() == 2
    assert len(seen) == 2 and {s[1:] for s in seen} == {(1, 1)}  # a piece's own maps run in place
    assert torch.get_num_threads() == 2 and parallel.workers() == 1


def test_ordered_map_keeps_at_most_its_window_ahead_of_the_consumer():
    started = []
    with sharing(2):
        for i, got in enumerate(
            ordered_map(lambda j: started.append(j) or j, range(40), window=2)
        ):
            time.sleep(0.002)  # a slow consumer
            assert got == i and len(started) <= i + 1 + 2 * 2


def test_ordered_map_passes_on_an_error_and_the_pool_stays_usable():
    def piece(i):
        if i == 3:
            raise KeyError("piece 3")
        return i

    with sharing(2):
        with pytest.raises(KeyError, match="piece 3"):
            list(ordered_map(piece, range(10)))
        assert list(ordered_map(lambda i: i * i, range(4))) == [0, 1, 4, 9]


def test_ordered_map_keeps_the_callers_grad_mode():
    with sharing(2), torch.no_grad():
        assert set(ordered_map(lambda i: torch.is_grad_enabled(), range(4))) == {False}


def test_sum_in_order_adds_left_to_right():
    parts = [torch.tensor([1.0]), torch.tensor([1e16]), torch.tensor([-1e16])]
    assert sum_in_order(p.clone() for p in parts).item() == (1.0 + 1e16) - 1e16 == 0.0
    assert sum_in_order(p.clone() for p in parts[::-1]).item() == (-1e16 + 1e16) + 1.0 == 1.0
    with pytest.raises(ValueError, match="no parts"):
        sum_in_order([])


@pytest.mark.parametrize("bad", [0, 1.5, "2", True])
def test_sharing_rejects_bad_counts(bad):
    with pytest.raises(ValueError, match=r"workers must be an integer >= 1, got"):
        with sharing(bad):
            pass


def test_the_volume_operators_are_the_same_bytes_on_one_worker_or_three():
    """The rotation blocks of the templates, their adjoint and the normal operator (the M-step's
    CG) are shared out over workers; their sums are added in the blocks' order, so the bytes
    do not depend on the workers (nor on which of them computed which block)."""
    group = mtd.projections(9)
    assert len(group._sub_blocks(None)) > 3  # enough blocks to share out
    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.normal(size=(9, 9, 9)))
    c = torch.as_tensor(rng.uniform(size=(group.K, 9, 9)))
    images = torch.as_tensor(rng.normal(size=(group.K, 9, 9)))

    def run():
        return group.templates(x), group.adjoint(images), group.normal_apply(c, x)

    serial = run()
    with sharing(3):
        shared = run()
    for a, b in zip(serial, shared, strict=True):
        assert torch.equal(a, b)
    # and the blocks are the operator: <P x, y> = <x, P^T y>
    lhs = (serial[0] * images).sum()
    rhs = (group.restrict(x) * serial[1]).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=0)
