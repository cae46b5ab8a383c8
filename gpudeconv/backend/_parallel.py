"""Row-parallel elementwise passes for the CPU backend.

Between its FFTs an RL iteration makes about a dozen memory-bound passes (ratio, update, buffer
copies, spectrum products). NumPy runs each on one core while FFTW and pocketfft use all of
them; NumPy releases the GIL inside ufuncs, so cutting a pass into row blocks on a small thread
pool brings those passes to the machine's memory bandwidth (1.6-1.8x on 2 cores, 2048^2 float32).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

__all__ = ["by_row_ranges", "by_rows", "map_rows", "usable_cores"]

#: Arrays below this many elements are not worth a thread hand-off.
_PARALLEL_FROM = 1 << 20


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS reports one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


_WORKERS = usable_cores()

_pool: ThreadPoolExecutor | None = None


def _forget_pool_after_fork() -> None:
    # A forked child inherits the pool object but none of its threads: submitting would hang.
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(_WORKERS, thread_name_prefix="gpudeconv-rows")
    return _pool


def _row_blocks(rows: int, size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the row blocks a pass over ``rows`` rows of ``size`` elements is cut
    into: one block for small arrays and on machines with one core."""
    if _WORKERS == 1 or size < _PARALLEL_FROM or rows < 2 * _WORKERS:
        return [(0, rows)]
    step = -(-rows // _WORKERS)
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def by_row_ranges(function, rows: int, size: int) -> list:
    """``[function(start, stop), ...]`` over the row blocks of an array of ``rows`` rows and
    ``size`` elements, in row order.

    For passes that read beyond their own rows (a stencil reads a row of halo on each side):
    ``function`` slices what it needs; it must write only rows ``start:stop``.
    """
    blocks = _row_blocks(rows, size)
    if len(blocks) == 1:
        return [function(*blocks[0])]
    futures = [_executor().submit(function, start, stop) for start, stop in blocks]
    return [future.result() for future in futures]


def map_rows(function, *arrays) -> list:
    """``function(*blocks)`` on matching row blocks of ``arrays`` (equal first axes); the
    results of the calls, in row order (per-block partial sums, for instance).

    ``function`` must work elementwise: each call sees the same rows of every array and writes
    only into those rows. A None in ``arrays`` (an optional array left out) reaches every call
    as None. Small arrays, and machines with one core, take a single call.
    """
    first = next(array for array in arrays if array is not None)

    def block(start: int, stop: int):
        return function(*(None if array is None else array[start:stop] for array in arrays))

    return by_row_ranges(block, first.shape[0], first.size)


def by_rows(function, *arrays) -> None:
    """Call ``function(*blocks)`` on matching row blocks of ``arrays`` (equal first axes), as
    :func:`map_rows` does, for passes that write their result into the arrays."""
    map_rows(function, *arrays)
