"""Intra-op threads of the E-step, chosen by the work of one chunk (issue 11, item 7).

The E-step streams patches in chunks of a few 10^5 (rotation, shift) elements, a few
milliseconds each, and every torch op on a chunk is one OpenMP parallel region split evenly
over the threads. When another process holds a core, the thread that shares it waits for the
scheduler at every region, so a small chunk costs several times more with two threads than with
one (measured: a median 3.4x, ``tests/benchmarks/bench_threads.py``); only a chunk whose
work is large enough amortises that wait against what a second core gains on a quiet machine.
The policy: one thread below ``PARALLEL_WORK`` elements per chunk, torch's default above; a user's
``threads`` (an integer) overrides it. The engine's default CPU chunks are sized to stay in cache
(2^18-2^19 elements), so on the CPU they run on one thread.

The whole iteration keeps that choice, not only the chunk loop (``EStep.limit``, issue 28): the
templates, the patch transforms, the M-step and the prior run at the chunks' threads, and what
comes in independent pieces runs on the E-step's workers (``mtd.parallel``). One op left at
torch's default threads (an FFT of the templates, a matrix product of the M-step) waits at its
barrier for a core another process holds: beside a real job the L = 28 case ran 4-7x slower than
when started with ``OMP_NUM_THREADS=1``, though its chunks ran on one thread
(``tests/benchmarks/bench_load.py``).

Usage in the E-step, around the loop over chunks (``block``: templates per template block)::

    work = chunk_work(chunk, block, L)
    with limit_threads(resolve_threads(threads, work, device)):
        ...  # the chunk loop
"""

from __future__ import annotations

import torch

from mtd.parallel import check_count

# The intra-op threads torch would use here (its default: the cores, or OMP_NUM_THREADS), taken
# when this module is imported, so that a limit_threads context that lowered the current value
# does not lower what "auto" gives a large chunk.
DEFAULT_THREADS = torch.get_num_threads()

# Elements (patches x templates x shifts) per chunk from which the E-step uses DEFAULT_THREADS.
# Measured with tests/benchmarks/bench_threads.py --sweep on the project's shared 2-core VM
# (float64, torch 2.14, OpenMP; five sweeps, other agents' jobs running too): one EM iteration at
# 1 and 2 threads, quiet and with a process spinning on one core, variants interleaved, medians of
# 5-11 rounds, chunks of 2.5e5 to 2.4e7 elements (FFT form, L = 28, 11, 16) and 5e5 to 8e6 (GEMM
# form, L = 5), and the default chunks of L = 11, 16 and of L = 28 with 4x and 16x the patches.
# Gain = 1-thread time / 2-thread time, median (range) over the measurements in each band:
#   <= ~1e6 elements (every default CPU chunk; 33): quiet 0.88 (0.05-1.66), loaded 0.29 (0.09-1.24)
#   1e6-4e6 (10):                                   quiet 1.31 (0.16-1.94), loaded 0.52 (0.21-0.98)
#   >= 4e6, 27-240 ms per chunk on one thread (13): quiet 1.00 (0.34-1.69), loaded 0.76 (0.62-1.29)
# In the calmest sweep the loaded gain rose steadily with the work (FFT 0.38, 0.51, 0.61, 0.73,
# 0.82 at 2.5e5, 1e6, 2e6, 4e6, 8e6; GEMM 0.29, 0.30, 0.43, 0.62, 0.68 at 5e5 ... 8e6), the
# quiet gain was 0.6-1.7. Below ~1e6 a competing process makes two threads a median 3.4x slower
# (the same chunk with 4x or 16x the patches alike: the chunk, not the problem, sets the cost of
# the wait at every parallel region); from 4e6 the worst loss is 1.6x while a quiet machine can
# still gain 1.7x, so that is where the default threads start. The per-element cost barely
# depends on the form or on L (4-9 ns per element on one thread for L = 5 GEMM and L = 11, 16, 28
# FFT chunks: the elementwise passes weigh as much as the GEMMs or FFTs), so elements alone
# measure the work.
PARALLEL_WORK = 1 << 22


def chunk_work(patches: int, templates: int, L: int) -> int:
    """The work of one E-step chunk, as ``threads_for`` counts it.

    Args:
        patches: patches in the chunk (the engine's chunk size, at most D).
        templates: templates searched per patch (K rotations; 2K with reflections).
        L: patch side; every template is correlated at the 4 L^2 shifts of the 2L x 2L grid.

    Returns:
        patches * templates * 4 L^2: the (patch, template, shift) elements of the chunk's logits,
        the size of every pass over the chunk.
    """
    for name, value in (("patches", patches), ("templates", templates), ("L", L)):
        check_count(name, value, 1)
    return int(patches) * int(templates) * 4 * int(L) ** 2


def threads_for(work: int, device="cpu") -> int:
    """Intra-op threads for an E-step whose chunks each hold ``work`` elements.

    Args:
        work: (patch, template, shift) elements per chunk (``chunk_work``), an integer >= 0.
        device: the engine's device; on a non-CPU device torch's setting is left alone.

    Returns:
        1 when ``work < PARALLEL_WORK`` on the CPU, ``DEFAULT_THREADS`` otherwise; on other
        devices the current ``torch.get_num_threads()``.
    """
    check_count("work", work, 0)
    if torch.device(device).type != "cpu":
        return torch.get_num_threads()
    return 1 if work < PARALLEL_WORK else DEFAULT_THREADS


def resolve_threads(threads, work: int, device="cpu") -> int:
    """The E-step's thread count from the user's ``threads`` setting.

    Args:
        threads: "auto" (``threads_for(work, device)``) or an integer >= 1, used as given on
            every device.
        work: elements per chunk (``chunk_work``).
        device: the engine's device.

    Returns:
        The number of intra-op threads, >= 1.

    Raises:
        ValueError: ``threads`` is neither "auto" nor an integer >= 1.
    """
    if isinstance(threads, str) and threads == "auto":
        return threads_for(work, device)
    try:
        n = check_count("threads", threads, 1)
    except ValueError:
        raise ValueError(
            f'threads must be "auto" or an integer >= 1 (intra-op threads of the E-step), '
            f"got {threads!r}"
        ) from None
    return n
