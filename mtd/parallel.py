"""Work shared out over worker threads, one intra-op thread each, in a fixed order (issue 28).

The mechanism under the thread policy of ``mtd.em.threads``: ``limit_threads`` sets torch's
intra-op threads for a block; ``ordered_map`` runs a function over a list of independent pieces
of work (the E-step's chunks, the volume group's rotation blocks) on the workers that
``sharing`` declares, each worker at one intra-op thread.

The workers pull the pieces as they become free. Beside another process that holds a core, the
worker that shares the core takes fewer pieces and the other takes more, so the pair loses about
a third of its quiet speed, not half of it: a fixed split of the pieces (one half each) waited
for the slow half, and intra-op threads wait for the slow thread at every op. The results come
back in the pieces' order whoever computed them, so sums over them are the same bytes with one
worker or many, quiet or loaded: a run repeats byte for byte.

Usage::

    with sharing(2):  # an E-step keeps two cores busy: so does its M-step
        total = sum_in_order(ordered_map(piece, blocks))
"""

from __future__ import annotations

import contextlib
import contextvars
import operator
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

# Workers of ``ordered_map`` within a ``sharing`` block. A worker thread starts with the default
# (1): a piece of work that maps over pieces of its own runs them in place, never on the pool.
_WORKERS: contextvars.ContextVar[int] = contextvars.ContextVar("mtd_workers", default=1)
_POOLS: dict[int, ThreadPoolExecutor] = {}


@contextlib.contextmanager
def limit_threads(n: int) -> Iterator[int]:
    """Run the block with ``torch.set_num_threads(n)``; restore the previous count on exit.

    Restores also when the block raises. Nothing is set when ``n`` is already the current count.

    Args:
        n: intra-op threads, an integer >= 1.

    Yields:
        n.
    """
    n = check_count("n", n, 1)
    previous = torch.get_num_threads()
    if n == previous:
        yield n
        return
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def sharing(workers: int) -> Iterator[int]:
    """Within the block, ``ordered_map`` runs its pieces on ``workers`` threads.

    Args:
        workers: an integer >= 1; 1 runs every piece in the calling thread.
    """
    token = _WORKERS.set(check_count("workers", workers, 1))
    try:
        yield workers
    finally:
        _WORKERS.reset(token)


def workers() -> int:
    """The workers ``ordered_map`` uses here (``sharing``; 1 outside it)."""
    return _WORKERS.get()


def ordered_map(fn: Callable, items: Iterable, window: int = 2) -> Iterator:
    """``fn(item)`` for every item, yielded in the items' order.

    With one worker (``sharing``), ``map(fn, items)`` in the calling thread at its intra-op
    threads. With more, the items are submitted to that many threads, which pull them as they
    become free and run them at one intra-op thread (and the caller's grad mode); the caller
    consumes the results in order while the workers go on. At most ``window`` results per
    worker wait to be consumed (they bound the memory: an E-step's piece returns its sums).

    Args:
        fn: the work of one item; independent of the other items (it runs on any thread).
        items: the pieces of work.
        window: results per worker that may be computed ahead of the one being consumed.

    Yields:
        fn(item), in the order of ``items``. If the consumer stops early or raises, the
        submitted pieces are cancelled or finished before this returns.
    """
    n = workers()
    if n == 1:
        yield from map(fn, items)
        return
    grad = torch.is_grad_enabled()

    def task(item):
        with torch.set_grad_enabled(grad):
            return fn(item)

    pending: deque = deque()
    todo = iter(items)
    # One intra-op thread for the pool's threads (torch reads the count when a thread runs its
    # first op, so the pool's threads start here) and for the caller's sums between results.
    with limit_threads(1):
        pool = _pool(n)
        try:
            for item in todo:
                pending.append(pool.submit(task, item))
                if len(pending) >= window * n:
                    break
            while pending:
                result = pending.popleft().result()
                for item in todo:  # keep the pool fed: one new piece per result consumed
                    pending.append(pool.submit(task, item))
                    break
                yield result
        finally:
            for f in pending:
                f.cancel()
            for f in pending:  # the running ones finish before their buffers are reused
                if not f.cancelled():
                    f.exception()


def sum_in_order(parts: Iterable[torch.Tensor]) -> torch.Tensor:
    """((p_0 + p_1) + p_2) + ...: the same bytes whichever worker computed which part."""
    total = None
    for p in parts:
        total = p if total is None else total.add_(p)
    if total is None:
        raise ValueError("sum_in_order got no parts")
    return total


def _pool(n: int) -> ThreadPoolExecutor:
    # One pool per worker count for the process: an M-step maps over its blocks some 60 times.
    if n not in _POOLS:
        _POOLS[n] = ThreadPoolExecutor(n, thread_name_prefix="mtd-worker")
    return _POOLS[n]


def check_count(name: str, value, low: int) -> int:
    """``value`` as an int >= ``low``; a float such as 1.5, a bool or a string is an error.

    Raises:
        ValueError: one line naming ``name``, the value and what is allowed.
    """
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}") from None
    if n < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return n
