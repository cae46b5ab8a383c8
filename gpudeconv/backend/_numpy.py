"""The CPU backend: NumPy arrays, ``scipy.fft`` on all cores, SciPy twins of the fused steps."""

from __future__ import annotations

import functools
import os
import platform
import time

import numpy as np
import scipy.fft
import scipy.ndimage

from ._base import NORM_FLOOR, RATIO_EPS, Backend, MemoryInfo

__all__ = ["NumPyBackend"]

#: Below this length every candidate transform is fast; take scipy's next fast length.
_MEASURE_FROM = 512
#: Candidate lengths may exceed the minimum by this fraction.
_SLACK = 0.08


def _smooth_lengths(n: int, limit: int) -> list[int]:
    """The 7-smooth integers in ``[n, limit]`` (lengths pocketfft handles without Bluestein)."""
    found = []
    for a in range(0, limit.bit_length() + 1):
        for b in range(0, 14):
            for c in range(0, 10):
                for d in range(0, 8):
                    value = 2**a * 3**b * 5**c * 7**d
                    if value > limit:
                        break
                    if value >= n:
                        found.append(value)
    return sorted(set(found))


@functools.cache
def _measured_fast_length(n: int) -> int:
    """The quickest real-FFT length in ``[n, n * (1 + _SLACK)]``, timed once per process.

    The padded length matters more than its size suggests (a 2084-point transform took 4x as
    long as a 2160-point one on the development machine), and heuristics on the prime factors do
    not rank the candidates reliably, so the few candidates are timed on a strip of 64 rows.
    """
    limit = max(int(n * (1 + _SLACK)), scipy.fft.next_fast_len(n, real=True))
    candidates = _smooth_lengths(n, limit)
    # Even lengths keep the half-spectrum simple; the smallest few cover the good choices.
    candidates = sorted(candidates, key=lambda m: (m % 2, m))[:6]
    best, best_time = candidates[0], np.inf
    for length in candidates:
        strip = np.ones((64, length), dtype=np.float32)
        timings = []
        for _ in range(3):
            start = time.perf_counter()
            scipy.fft.irfft(scipy.fft.rfft(strip, axis=-1), n=length, axis=-1)
            scipy.fft.ifft(scipy.fft.fft(strip.T, axis=0), axis=0)
            timings.append(time.perf_counter() - start)
        elapsed = min(timings)
        if elapsed < best_time:
            best, best_time = length, elapsed
    return best


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class NumPyBackend(Backend):
    """NumPy arrays on the CPU; FFTs by ``scipy.fft`` with all cores (``workers=-1``)."""

    name = "numpy"
    xp = np

    def __init__(self, workers: int = -1):
        self.workers = workers

    def is_own_array(self, a) -> bool:
        return isinstance(a, np.ndarray)

    def to_host(self, a) -> np.ndarray:
        return np.asarray(a)

    # ------------------------------------------------------------------ FFT
    def fft_length(self, n: int) -> int:
        if n < _MEASURE_FROM:
            return scipy.fft.next_fast_len(n, real=True)
        return _measured_fast_length(n)

    def rfft2(self, x, shape):
        return scipy.fft.rfft2(x, s=tuple(shape), workers=self.workers)

    def irfft2(self, spectrum, shape):
        return scipy.fft.irfft2(spectrum, s=tuple(shape), workers=self.workers, overwrite_x=True)

    def direct_convolve(self, x, kernel, *, adjoint: bool = False):
        operation = scipy.ndimage.correlate if adjoint else scipy.ndimage.convolve
        return operation(x, np.asarray(kernel, dtype=x.dtype), mode="constant", cval=0.0)

    # ------------------------------------------------------------------ fused RL steps
    def rl_ratio(self, observed, blurred, weight=None):
        ratio = blurred
        np.maximum(blurred, RATIO_EPS, out=ratio)
        np.divide(observed, ratio, out=ratio)
        if weight is not None:
            ratio *= weight
        return ratio

    def rl_update(self, estimate, correction, norm=None) -> None:
        if norm is None:
            estimate *= correction
            return
        has_data = norm > NORM_FLOOR
        np.divide(correction, norm, out=correction, where=has_data)
        np.multiply(estimate, correction, out=estimate, where=has_data)

    # ------------------------------------------------------------------ facts
    def memory_info(self) -> MemoryInfo:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        free = total
        try:
            with open("/proc/meminfo") as info:
                for line in info:
                    if line.startswith("MemAvailable:"):
                        free = int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
        return MemoryInfo(free=free, total=total, kind="host")

    def device_name(self) -> str:
        return f"{_cpu_name()} ({os.cpu_count()} cores)"
