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
    TV_STABILITY,
    Backend,
    CostRates,
    MemoryInfo,
    check_like,
    check_tv_arrays,
    poisson_deviance,
    validate_background,
    validate_bounds,
    validate_damping,
    validate_extrapolation,
    validate_tv,
)
from ._fftplans import fftw_available, get_plan
from ._parallel import by_row_ranges, by_rows, map_rows

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
    ndimage = scipy.ndimage
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
    def rl_ratio(
        self,
        observed,
        blurred,
        weight=None,
        *,
        background: float = 0.0,
        damping: tuple[float, float] | tuple[float, float, float] | None = None,
    ):
        background = blurred.dtype.type(validate_background(background))
        damping = validate_damping(damping)
        if damping is not None:
            scale, power, offset = (blurred.dtype.type(value) for value in damping)
            damped = functools.partial(
                _damped_ratio, background=background, scale=scale, power=power, offset=offset
            )
            by_rows(damped, observed, blurred, weight)
        elif background == 0:  # the RL loop's hot path: no shift pass
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
        floor=None,
        change=None,
    ) -> None:
        bounds = validate_bounds(lower, upper)
        if bounds is None and floor is None and change is None:  # the RL loop's hot path
            if norm is None:
                by_rows(np.multiply, estimate, correction, estimate)
            else:
                by_rows(_normalized_update, estimate, correction, norm)
            return
        if floor is not None:
            check_like("floor", floor, estimate)
            # compared in the estimate's dtype, as the kernel compares
            floor = np.asarray(floor, dtype=estimate.dtype)
        if change is not None:
            check_like("change", change, estimate, written=True)
        if bounds is not None:
            bounds = tuple(estimate.dtype.type(bound) for bound in bounds)
        step = functools.partial(_extended_update, bounds=bounds)
        by_rows(step, estimate, correction, norm, floor, change)

    def rl_tv_norm(self, estimate, norm, out, *, strength: float, epsilon: float):
        strength, epsilon = validate_tv(strength, epsilon)
        check_tv_arrays(estimate, norm, out, xp=np)
        scalar = estimate.dtype.type
        strength = scalar(strength)
        stencil = functools.partial(
            _tv_norm_rows,
            estimate,
            np.asarray(norm, dtype=estimate.dtype),
            out,
            strength=strength,
            reach=scalar(TV_STABILITY) * strength,  # rounded as the kernel rounds it
            epsilon=scalar(epsilon),
        )
        by_row_ranges(stencil, estimate.shape[0], estimate.size)
        return out

    def ba_extrapolate(self, estimate, previous, alpha: float, *, floor_fraction: float = 0.1):
        alpha, floor_fraction = validate_extrapolation(alpha, floor_fraction)
        check_like("previous", previous, estimate, written=True)
        scalar = estimate.dtype.type
        step = functools.partial(
            _extrapolate, alpha=scalar(alpha), floor_fraction=scalar(floor_fraction)
        )
        by_rows(step, estimate, previous)

    def rl_deviance(self, observed, blurred, weight=None, *, background: float = 0.0) -> float:
        # The base class's version, on row blocks in parallel with a partial sum per block.
        background = blurred.dtype.type(validate_background(background))
        partial = functools.partial(_deviance_sum, background=background)
        return float(sum(map_rows(partial, observed, blurred, weight)))

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


# The NumPy twins of kernels/rl_steps.cu, applied to row blocks by by_rows (the TV stencil by
# by_row_ranges, with a row of halo). The plain steps are the RL loop's hot path; the background,
# damping, clamp, floor and change variants are separate functions so that the plain ones pay
# nothing for them. The twins of steps with transcendental functions or many roundings (damped
# ratio, TV, extrapolation) repeat the kernel's operations in its order and in the arrays' dtype.
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


def _damping_misfit(observed, model, offset):
    # the kernel's damping_misfit: p D + (1 - p) (d - m)^2 / m, the deviance itself where p
    # rounds to 1 (everywhere when offset = 0, with no Pearson pass)
    deviance = poisson_deviance(observed, model, xp=np)
    if offset == 0:
        return deviance
    share = np.where(model > offset, (model - offset) / model, model.dtype.type(0))
    mixed = share < 1
    pearson = observed - model
    pearson *= pearson
    pearson /= model
    blend = share * deviance
    blend += (1 - share) * pearson
    np.copyto(deviance, blend, where=mixed)
    return deviance


def _damped_ratio(observed, blurred, weight, *, background, scale, power, offset):
    # everything in blurred's dtype (the scalars too), so that float32 rounds as in the kernel
    observed = observed.astype(blurred.dtype, copy=False)
    blurred += background
    model = np.maximum(blurred, RATIO_EPS, out=blurred)
    misfit = _damping_misfit(observed, model, offset)
    misfit *= scale
    order = power - 1
    # computed everywhere and kept where U < 1: elsewhere U**(N-1) may overflow, unused
    with np.errstate(over="ignore", invalid="ignore"):
        damped = np.power(misfit, order)
        damped *= power - order * misfit
        damped *= (observed - model) / model
    damped += 1
    fitted = misfit < 1
    np.divide(observed, model, out=blurred)
    np.copyto(blurred, damped, where=fitted)
    if weight is not None:
        blurred *= weight


def _normalized_update(estimate, correction, norm):
    # Divide everywhere, then set the few pixels without data to "keep": faster than masked
    # (where=) ufuncs, which NumPy runs element by element.
    with np.errstate(divide="ignore", invalid="ignore"):
        np.divide(correction, norm, out=correction)
    correction[norm <= NORM_FLOOR] = 1.0
    estimate *= correction


def _extended_update(estimate, correction, norm, floor, change, *, bounds):
    # The kernel's order: update, clamp, floor, then the change from the value before. np.clip
    # compares like the kernel's comparisons (a NaN stays NaN, -0 stays -0) and runs at the
    # speed of one multiply; the floor is a masked copy for the same reasons.
    if change is not None:
        np.copyto(change, estimate)
    if norm is None:
        estimate *= correction
    else:
        _normalized_update(estimate, correction, norm)
    if bounds is not None:
        np.clip(estimate, *bounds, out=estimate)
    if floor is not None:
        np.copyto(estimate, floor, where=estimate < floor)
    if change is not None:
        np.subtract(estimate, change, out=change)


def _tv_norm_rows(estimate, norm, out, start, stop, *, strength, reach, epsilon):
    # Rows start:stop of out, from the unit gradients of the estimate's rows start - 1 (the
    # upper neighbours' ny) to stop - 1, with the kernel's operations in its order. Each
    # gradient's floor is max(epsilon, reach u) at its own pixel (TV_STABILITY, _base.py).
    top = max(start - 1, 0)
    nx, ny = _gradient(estimate, top, stop)
    floor = np.multiply(estimate[top:stop], reach)
    np.copyto(floor, epsilon, where=~(floor > epsilon))  # compared as the kernel does: NaN -> eps
    floor *= floor
    length = nx * nx
    length += ny * ny
    length += floor
    np.sqrt(length, out=length)
    nx /= length
    ny /= length
    own = start - top  # 1 where the block has a row above it, else 0
    div = _divergence(nx[own:], ny[own:], ny[0] if own else None)
    block = norm[start:stop]
    regularized = np.multiply(div, strength, out=div)
    np.subtract(block, regularized, out=regularized)
    np.maximum(regularized, block * 0.5, out=regularized)  # a NaN stays NaN, as in the kernel
    kept = block <= NORM_FLOOR
    regularized[kept] = block[kept]
    out[start:stop] = regularized


def _gradient(image, start, stop):
    """The forward differences ``(gx, gy)`` of rows ``start:stop`` of the 2-D ``image`` (row
    ``stop`` read too): ``gx[i, j] = u[i, j+1] - u[i, j]``, 0 on the last column;
    ``gy[i, j] = u[i+1, j] - u[i, j]``, 0 on the image's last row."""
    rows = image[start:stop]
    gx = np.zeros_like(rows)
    np.subtract(rows[:, 1:], rows[:, :-1], out=gx[:, :-1])
    gy = np.zeros_like(rows)
    below = image[start + 1 : stop + 1]  # one row short where stop is the image's last row
    np.subtract(below, rows[: len(below)], out=gy[: len(below)])
    return gx, gy


def _divergence(px, py, py_above=None):
    """The backward differences ``px[i, j] - px[i, j-1] + py[i, j] - py[i-1, j]`` of a block of
    rows, ``px`` taken as 0 left of the first column and ``py`` above the first row as
    ``py_above`` (the row above the block; None: the image's first row, 0 above it).

    Over a whole image it is the negative adjoint of :func:`_gradient` for fields that are 0
    where the gradient is (``px`` on the last column, ``py`` on the last row), as the unit
    gradients of TV are. Summed in the kernel's order: ``((px - px_left) + py) - py_above``.
    """
    div = np.empty_like(px)
    div[:, 0] = px[:, 0]
    np.subtract(px[:, 1:], px[:, :-1], out=div[:, 1:])
    div += py
    if py_above is not None:
        div[0] -= py_above
    div[1:] -= py[:-1]
    return div


def _extrapolate(estimate, previous, *, alpha, floor_fraction):
    step = np.subtract(estimate, previous)
    np.copyto(previous, estimate)
    step *= alpha
    step += estimate  # u + alpha (u - p)
    lowest = np.multiply(estimate, floor_fraction, out=estimate)
    np.maximum(step, lowest, out=estimate)  # a NaN stays NaN, as in the kernel


def _deviance_sum(observed, blurred, weight, *, background):
    model = blurred + background
    np.maximum(model, RATIO_EPS, out=model)
    deviance = poisson_deviance(observed.astype(model.dtype, copy=False), model, xp=np)
    if weight is not None:
        deviance *= weight
    return float(deviance.sum(dtype=np.float64))
