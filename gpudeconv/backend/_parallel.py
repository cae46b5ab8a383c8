"""Row-parallel elementwise passes for the CPU backend.

Between its FFTs an RL iteration makes about a dozen memory-bound passes (ratio, update, buffer
copies, spectrum products). NumPy runs each on one core while FFTW and pocketfft use all of
them; NumPy releases the GIL inside ufuncs, so cutting a pass into row blocks on a small thread
pool brings those passes to the machine's memory bandwidth (1.6-1.8x on 2 cores, 2048^2 float32).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

__all__ = ["by_rows", "usable_cores"]

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


def by_rows(function, *arrays) -> None:
    """Call ``function(*blocks)`` on matching row blocks of ``arrays`` (equal first axes).

    ``function`` must work elementwise: each call sees the same rows of every array and writes
    only into those rows. Small arrays, and machines with one core, take a single call.
    """
    rows = arrays[0].shape[0]
    if _WORKERS == 1 or arrays[0].size < _PARALLEL_FROM or rows < 2 * _WORKERS:
        function(*arrays)
        return
    step = -(-rows // _WORKERS)
    futures = [
        _executor().submit(function, *(array[start : start + step] for array in arrays))
        for start in range(0, rows, step)
    ]
    for future in futures:
        future.result()
