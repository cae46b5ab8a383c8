"""The CPU backend: NumPy arrays, ``scipy.fft`` on all cores, SciPy twins of the fused steps."""

from __future__ import annotations

import functools
import os
import platform
import time
import tracemalloc

import numpy as np
import scipy.fft
import scipy.ndimage

from .._errors import GpudeconvError
from ._base import (
    NORM_FLOOR,
    RATIO_EPS,
    Backend,
    CostRates,
    MemoryInfo,
    validate_background,
    validate_bounds,
)
from ._fftplans import fftw_available, get_plan
from ._parallel import by_rows

__all__ = ["NumPyBackend"]

_FFT_LIBRARIES = ("auto", "pyfftw", "scipy.fft")

#: Below this length every candidate transform is fast; take scipy's next fast length.
_MEASURE_FROM = 512
#: Candidate lengths may exceed the minimum by this fraction.
_SLACK = 0.08


def _candidate_lengths(n: int, limit: int) -> list[int]:
    """Lengths ``2^a 3^b 5^c`` in ``[n, limit]`` with few factors of 3 and 5.

    Long runs of radix-3 or radix-5 passes (2187 = 3^7) and radix-7 factors were slow in both
    pocketfft and FFTW on the development machine.
    """
    found = set()
    power_of_two = 1
    while power_of_two <= limit:
        for b in range(4):
            for c in range(4):
                value = power_of_two * 3**b * 5**c
                if n <= value <= limit:
                    found.add(value)
        power_of_two *= 2
    return sorted(found)


@functools.cache
def _measured_fast_length(n: int) -> int:
    """The quickest real-FFT length in ``[n, n * (1 + _SLACK)]``, timed once per process.

    The padded length matters more than its size suggests (a 2084-point transform took 4x as
    long as a 2160-point one on the development machine), and heuristics on the prime factors do
    not rank the candidates reliably, so the few candidates are timed on a strip of 64 rows.
    """
    candidates = _candidate_lengths(n, int(n * (1 + _SLACK)))[:4]
    if not candidates:
        return scipy.fft.next_fast_len(n, real=True)
    if len(candidates) == 1:
        return candidates[0]
    best, best_time = candidates[0], np.inf
    for length in candidates:
        strip = np.ones((64, length), dtype=np.float32)
        timings = []
        for _ in range(5):
            start = time.perf_counter()
            scipy.fft.irfft(scipy.fft.rfft(strip, axis=-1), n=length, axis=-1)
            scipy.fft.ifft(scipy.fft.fft(strip.T, axis=0), axis=0)
            timings.append(time.perf_counter() - start)
        elapsed = min(timings)
        if elapsed < best_time:
            best, best_time = length, elapsed
    return best


#: The length chosen for each measured ``n`` in this process: timed (`_measured_fast_length`), or
#: pinned by `NumPyBackend.pin_fft_lengths` so that a resumed tiled run transforms its tiles at
#: the lengths of the run it continues (another length rounds differently).
_chosen_lengths: dict[int, int] = {}


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
    """NumPy arrays on the CPU; FFTs with all cores, by FFTW (pyFFTW) where it is installed and
    by ``scipy.fft`` otherwise (``fft=`` or the environment variable ``GPUDECONV_FFT`` choose)."""

    name = "numpy"
    xp = np
    # scipy.ndimage sums on one core: even a 3x3 PSF was slower than the threaded FFT on a
    # 2048^2 image (40 ms against 34 ms on 2 cores), so the CPU always takes the FFT by default.
    direct_max_size = 0
    # Measured on the 2-core development VM (scipy.ndimage 1.2-1.4 GMAC/s for k = 7 to 15 at
    # 1024-2048 px; FFTW convolution pairs about 7e9 n log2 n per second).
    cost_rates = CostRates(direct=1.2e9, sv_kernel=0.0, fft=6e9, call=1e-4)

    def __init__(self, workers: int = -1, fft: str = "auto"):
        if fft not in _FFT_LIBRARIES:
            msg = f"fft must be one of {', '.join(_FFT_LIBRARIES)}, got {fft!r}"
            raise GpudeconvError(msg)
        if fft == "auto":
            wanted = os.environ.get("GPUDECONV_FFT", "").strip().lower()
            fft = wanted if wanted in _FFT_LIBRARIES else "auto"
        if fft == "auto":
            fft = "pyfftw" if fftw_available() else "scipy.fft"
        if fft == "pyfftw" and not fftw_available():
            msg = "fft='pyfftw' was asked for but pyFFTW is not installed; pip install pyFFTW"
            raise GpudeconvError(msg)
        self.workers = workers
        #: the FFT library of the convolutions: {'pyfftw', 'scipy.fft'}
        self.fft_library = fft

    def is_own_array(self, a) -> bool:
        return isinstance(a, np.ndarray)

    # ------------------------------------------------------------------ FFT
    def fft_length(self, n: int) -> int:
        if n < _MEASURE_FROM:
            return scipy.fft.next_fast_len(n, real=True)
        length = _chosen_lengths.get(n)
        if length is None:
            length = _chosen_lengths[n] = _measured_fast_length(n)
        return length

    def fft_lengths(self) -> dict[int, int]:
        return dict(_chosen_lengths)

    def pin_fft_lengths(self, lengths) -> None:
        for n, length in dict(lengths).items():
            _chosen_lengths[int(n)] = int(length)

    def rfft2(self, x, shape):
        return scipy.fft.rfft2(x, s=tuple(shape), workers=self.workers)

    def irfft2(self, spectrum, shape):
        return scipy.fft.irfft2(spectrum, s=tuple(shape), workers=self.workers, overwrite_x=True)

    def fft_convolve(self, x, otf, fft_shape, out=None):
        plan = get_plan(fft_shape, x.dtype, library=self.fft_library, workers=self.workers)
        window = plan.convolve(x, otf)[: x.shape[0], : x.shape[1]]
        if out is None:
            out = np.empty_like(window)  # the plan reuses its buffers
        by_rows(np.copyto, out, window)
        return out

    def direct_convolve(self, x, kernel, *, adjoint: bool = False, out=None):
        operation = scipy.ndimage.correlate if adjoint else scipy.ndimage.convolve
        kernel = np.asarray(kernel, dtype=x.dtype)
        return operation(x, kernel, output=out, mode="constant", cval=0.0)

    # ------------------------------------------------------------------ fused RL steps
    def rl_ratio(self, observed, blurred, weight=None, *, background: float = 0.0):
        background = blurred.dtype.type(validate_background(background))
        if background == 0:  # the RL loop's hot path: no shift pass
            if weight is None:
                by_rows(_ratio, observed, blurred)
            else:
                by_rows(_weighted_ratio, observed, blurred, weight)
        elif weight is None:
            by_rows(functools.partial(_shifted_ratio, background=background), observed, blurred)
        else:
            shifted = functools.partial(_weighted_shifted_ratio, background=background)
            by_rows(shifted, observed, blurred, weight)
        return blurred

    def rl_update(
        self,
        estimate,
        correction,
        norm=None,
        *,
        lower: float | None = None,
        upper: float | None = None,
    ) -> None:
        bounds = validate_bounds(lower, upper)
        if bounds is None:  # the RL loop's hot path
            if norm is None:
                by_rows(np.multiply, estimate, correction, estimate)
            else:
                by_rows(_normalized_update, estimate, correction, norm)
            return
        lower, upper = (estimate.dtype.type(bound) for bound in bounds)
        if norm is None:
            update, arrays = _product, (estimate, correction)
        else:
            update, arrays = _normalized_update, (estimate, correction, norm)
        by_rows(functools.partial(_clamped, update, lower=lower, upper=upper), *arrays)

    # ------------------------------------------------------------------ facts
    def peak_memory(self, function) -> int:
        # NumPy reports its buffers to tracemalloc (FFT library scratch is not included).
        started = not tracemalloc.is_tracing()
        if started:
            tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            before, _ = tracemalloc.get_traced_memory()
            result = function()
            _, peak = tracemalloc.get_traced_memory()
            del result
        finally:
            if started:
                tracemalloc.stop()
        return int(peak - before)

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

    def versions(self) -> dict[str, str]:
        found = {"numpy": np.__version__, "scipy": scipy.__version__}
        if self.fft_library == "pyfftw":
            import pyfftw

            found["pyfftw"] = pyfftw.__version__
        return found

    def device_name(self) -> str:
        return f"{_cpu_name()} ({os.cpu_count()} cores, {self.fft_library})"


# The scalar arguments of the fused steps, checked once per call for both backends (the CuPy
# backend imports these: the package has no other module both backends read that may hold them).
# The NumPy twins of kernels/rl_steps.cu, applied to row blocks by by_rows. The plain steps are
# the RL loop's hot path; the background and clamp variants are separate functions so that the
# plain ones pay nothing for them.
def _ratio(observed, blurred):
    np.maximum(blurred, RATIO_EPS, out=blurred)
    np.divide(observed, blurred, out=blurred)


def _weighted_ratio(observed, blurred, weight):
    _ratio(observed, blurred)
    blurred *= weight


def _shifted_ratio(observed, blurred, *, background):
    # background is of blurred's dtype: the sum is rounded as the kernel rounds it
    blurred += background
    _ratio(observed, blurred)


def _weighted_shifted_ratio(observed, blurred, weight, *, background):
    _shifted_ratio(observed, blurred, background=background)
    blurred *= weight


def _product(estimate, correction):
    estimate *= correction


def _normalized_update(estimate, correction, norm):
    # Divide everywhere, then set the few pixels without data to "keep": faster than masked
    # (where=) ufuncs, which NumPy runs element by element.
    with np.errstate(divide="ignore", invalid="ignore"):
        np.divide(correction, norm, out=correction)
    correction[norm <= NORM_FLOOR] = 1.0
    estimate *= correction


def _clamped(update, estimate, *factors, lower, upper):
    # Every pixel, kept ones included, as the kernel does; np.clip compares like the kernel's
    # comparisons (a NaN stays NaN, -0 stays -0) and runs at the speed of one multiply.
    update(estimate, *factors)
    np.clip(estimate, lower, upper, out=estimate)
