"""The GPU backend: CuPy arrays, cuFFT with CuPy's plan cache, raw kernels from ``kernels/``.

This is the only module (with the kernel loader inside it) that imports cupy. It is imported
lazily by :func:`gpudeconv.backend.get_backend`, so the package imports on machines without CuPy.
"""

from __future__ import annotations

import gc

import cupy
import cupyx
import cupyx.scipy.fft
import cupyx.scipy.ndimage
import numpy as np

from .._errors import GpudeconvError
from ._base import (
    NORM_FLOOR,
    RATIO_EPS,
    Backend,
    CostRates,
    MemoryInfo,
    check_like,
    check_tv_arrays,
    validate_background,
    validate_bounds,
    validate_damping,
    validate_extrapolation,
    validate_tv,
)
from ._kernels import BLOCK, MAX_BLOCKS, SV_MAX_SIZE, index_type, kernel_source, sv_launch

__all__ = ["CuPyBackend", "device_answers"]


def device_answers() -> tuple[bool, str]:
    """Whether a CUDA device can be used, and if not, why (one line)."""
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # CUDARuntimeError without driver or device
        return False, f"CUDA is not usable ({type(error).__name__}: {error})"
    if count < 1:
        return False, "no CUDA device was found"
    try:
        cupy.cuda.Device(0).compute_capability  # noqa: B018  (touches the device)
    except Exception as error:
        return False, f"the CUDA device does not answer ({type(error).__name__}: {error})"
    return True, ""


def _compile(source: str, names: list[str], **defines: str):
    """``kernels/<source>`` as a ``RawModule``, compiled now, with one line if that fails.

    CuPy compiles lazily, at the first ``get_function``; asking for every entry point here makes
    a compiler error surface once, where the module is built, rather than at some later launch.
    """
    # CuPy 14 compiles with -std=c++17 already; the sources need nothing more.
    module = cupy.RawModule(code=kernel_source(source, **defines), name_expressions=names)
    try:
        for name in names:
            module.get_function(name)
    except cupy.cuda.compiler.CompileException as error:
        first = next((line for line in str(error).splitlines() if "error" in line), str(error))
        msg = (
            f"compiling kernels/{source} ({', '.join(f'{k}={v}' for k, v in defines.items())}) "
            f"for this GPU failed: {first.strip()}; set CUPY_DUMP_CUDA_SOURCE_ON_ERROR=1 for the "
            "whole log, or run with --backend numpy"
        )
        raise GpudeconvError(msg) from error
    return module


#: The entry points of ``kernels/rl_steps.cu``, ``gpudeconv_<step>_<dtype>``.
_RL_STEPS = (
    "rl_ratio",
    "rl_damped_ratio",
    "rl_update",
    "rl_tv_norm",
    "ba_extrapolate",
    "rl_deviance",
)


@cupy.memoize(for_each_device=True)
def _rl_steps_module(index: str):
    """``kernels/rl_steps.cu`` compiled for the current device, once per index type."""
    names = [f"gpudeconv_{step}_{dtype}" for step in _RL_STEPS for dtype in ("float32", "float64")]
    return _compile("rl_steps.cu", names, IDX=index)


def _rl_kernel(step: str, array):
    """The entry point of ``step`` (one of ``_RL_STEPS``) for ``array``'s dtype and size."""
    module = _rl_steps_module(index_type(array.size))
    return module.get_function(f"gpudeconv_{step}_{array.dtype.name}")


@cupy.memoize(for_each_device=True)
def _sv_module(index: str, size: int):
    """``kernels/sv_convolve.cu`` compiled for the current device, once per index type and PSF
    side (a compile-time constant, so that the inner loops unroll)."""
    names = [
        f"gpudeconv_sv_{direction}_{dtype}"
        for direction in ("forward", "adjoint")
        for dtype in ("float32", "float64")
    ]
    return _compile("sv_convolve.cu", names, IDX=index, KSIZE=str(size))


def _launch_shape(size: int) -> tuple[tuple[int], tuple[int]]:
    blocks = max(1, min((size + BLOCK - 1) // BLOCK, MAX_BLOCKS))
    return (blocks,), (BLOCK,)


class CuPyBackend(Backend):
    """CuPy arrays on the current CUDA device; cuFFT plans from CuPy's per-device plan cache."""

    name = "cupy"
    xp = cupy
    ndimage = cupyx.scipy.ndimage
    #: cupyx.scipy.ndimage's direct sum beats two cuFFT passes for small PSFs (not yet measured)
    direct_max_size = 7
    sv_kernel_max_size = SV_MAX_SIZE
    # Not yet measured (no GPU lent so far): an H100's FP32 peak is about 3e13 multiply-adds/s,
    # of which the SV kernel aims at half; cupyx.scipy.ndimage and cuFFT figures are estimates.
    cost_rates = CostRates(direct=1e12, sv_kernel=1.5e13, fft=1.5e12, call=2e-5)

    def is_own_array(self, a) -> bool:
        return isinstance(a, cupy.ndarray)

    def synchronize(self) -> None:
        cupy.cuda.get_current_stream().synchronize()

    # ------------------------------------------------------------------ streaming tiles
    def stream(self):
        # non_blocking: no implicit synchronization with the legacy default stream, so that
        # copies on one stream overlap kernels on another (cupy-notes.md, section 5)
        return cupy.cuda.Stream(non_blocking=True)

    def pinned_empty(self, shape, dtype) -> np.ndarray:
        return cupyx.empty_pinned(tuple(shape), dtype=dtype)

    def upload(self, host: np.ndarray, *, stream=None):
        device = cupy.empty(host.shape, dtype=host.dtype)
        # asynchronous only from page-locked memory (pinned_empty) on a non-default stream
        device.set(host, stream=stream)
        return device

    def download(self, array, out: np.ndarray, *, stream=None) -> np.ndarray:
        # blocking=False: CuPy's default (True) synchronizes and would end the overlap
        array.get(stream=stream, out=out, blocking=False)
        return out

    def is_out_of_memory(self, error: BaseException) -> bool:
        if isinstance(error, MemoryError):  # cupy.cuda.memory.OutOfMemoryError, pinned or not
            return True
        # a cuFFT plan whose work area could not be allocated (CUFFT_ALLOC_FAILED = 2); the
        # cufft module is touched only here, on a machine that ran the FFT (cupy-notes.md, 1)
        return type(error).__name__ == "CuFFTError" and getattr(error, "result", None) == 2

    def release_memory(self) -> None:
        cupy.fft.config.get_plan_cache().clear()
        gc.collect()
        self.synchronize()
        cupy.get_default_memory_pool().free_all_blocks()
        cupy.get_default_pinned_memory_pool().free_all_blocks()

    # ------------------------------------------------------------------ FFT
    def fft_length(self, n: int) -> int:
        # cuFFT is fastest on 2^a 3^b 5^c 7^d lengths, and those are what next_fast_len returns.
        return int(cupyx.scipy.fft.next_fast_len(int(n), real=True))

    def rfft2(self, x, shape):
        return cupy.fft.rfft2(x, s=tuple(shape))

    def irfft2(self, spectrum, shape):
        return cupy.fft.irfft2(spectrum, s=tuple(shape))

    def fft_convolve(self, x, otf, fft_shape, out=None):
        # The base class's steps less two passes over memory per convolution: cuFFT's C2R
        # overwrites its input, so CuPy copies the spectrum first unless told it may (it is
        # ours); and the 'backward' inverse scales its whole output by 1 / N in a pass of its
        # own, while 'forward' leaves it unscaled and the window's copy, needed anyway, scales.
        shape = tuple(fft_shape)
        spectrum = cupy.fft.rfft2(x, s=shape)
        spectrum *= otf
        full = cupyx.scipy.fft.irfft2(spectrum, s=shape, norm="forward", overwrite_x=True)
        window = full[: x.shape[0], : x.shape[1]]
        scale = 1.0 / (shape[0] * shape[1])  # a Python float: float32 stays float32
        if out is None:
            return window * scale  # contiguous, and the full array is freed
        cupy.multiply(window, scale, out=out)
        return out

    def direct_convolve(self, x, kernel, *, adjoint: bool = False, out=None):
        operation = cupyx.scipy.ndimage.correlate if adjoint else cupyx.scipy.ndimage.convolve
        kernel = cupy.asarray(kernel, dtype=x.dtype)
        return operation(x, kernel, output=out, mode="constant", cval=0.0)

    def sv_direct(self, x, psfs, tables, *, adjoint: bool = False, out=None):
        height, width = x.shape
        size = psfs.shape[-1]
        if size > SV_MAX_SIZE:
            msg = f"sv_direct takes PSFs up to {SV_MAX_SIZE} pixels, got {size}"
            raise ValueError(msg)
        source = cupy.ascontiguousarray(x)
        dtype = source.dtype
        psfs = cupy.ascontiguousarray(psfs, dtype=dtype)
        row_node, row_frac, col_node, col_frac = tables
        row_node = cupy.ascontiguousarray(row_node, dtype=np.int32)
        col_node = cupy.ascontiguousarray(col_node, dtype=np.int32)
        row_frac = cupy.ascontiguousarray(row_frac, dtype=dtype)
        col_frac = cupy.ascontiguousarray(col_frac, dtype=dtype)
        # the kernel writes every pixel of its own buffer, which must not be its input
        direct_out = (
            out is not None
            and out.flags.c_contiguous
            and out.dtype == dtype
            and not cupy.shares_memory(out, source)
        )
        result = out if direct_out else cupy.empty_like(source)
        grid, block = sv_launch((height, width), dtype.itemsize)
        module = _sv_module(index_type(source.size), size)
        kernel = module.get_function(
            f"gpudeconv_sv_{'adjoint' if adjoint else 'forward'}_{dtype.name}"
        )
        kernel(
            grid,
            block,
            (
                source,
                result,
                psfs,
                row_node,
                row_frac,
                col_node,
                col_frac,
                np.int32(height),
                np.int32(width),
                np.int32(psfs.shape[1]),
            ),
        )
        if out is not None and not direct_out:
            out[...] = result
            return out
        return result

    # ------------------------------------------------------------------ fused RL steps
    # The kernels read raw pointers: every array is made C-contiguous in the kernel's dtype
    # (a no-op in the RL loop, where they already are). Arrays the kernels write must be so
    # already. An optional array left out is replaced by one the kernel has anyway, which its
    # flag (0) keeps it from reading or writing.
    def rl_ratio(
        self,
        observed,
        blurred,
        weight=None,
        *,
        background: float = 0.0,
        damping: tuple[float, float] | tuple[float, float, float] | None = None,
    ):
        background = validate_background(background)
        damping = validate_damping(damping)
        ratio = cupy.ascontiguousarray(blurred)
        dtype = ratio.dtype
        observed = cupy.ascontiguousarray(observed, dtype=dtype)
        has_weight = weight is not None
        weight = cupy.ascontiguousarray(weight, dtype=dtype) if has_weight else observed
        grid, block = _launch_shape(ratio.size)
        shared = (observed, ratio, weight, ratio, _index(ratio), dtype.type(RATIO_EPS))
        if damping is None:
            _rl_kernel("rl_ratio", ratio)(
                grid, block, (*shared, dtype.type(background), np.int32(has_weight))
            )
        else:
            scale, power, offset = damping
            _rl_kernel("rl_damped_ratio", ratio)(
                grid,
                block,
                (
                    *shared,
                    dtype.type(background),
                    dtype.type(scale),
                    dtype.type(power),
                    dtype.type(offset),
                    np.int32(has_weight),
                ),
            )
        return ratio

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
        if not estimate.flags.c_contiguous:
            msg = "rl_update writes the estimate in place: it must be C-contiguous"
            raise ValueError(msg)
        dtype = estimate.dtype
        correction = cupy.ascontiguousarray(correction, dtype=dtype)
        has_norm = norm is not None
        norm = cupy.ascontiguousarray(norm, dtype=dtype) if has_norm else correction
        has_clamp = bounds is not None
        lower, upper = bounds if has_clamp else (-np.inf, np.inf)  # not read without a clamp
        has_floor = floor is not None
        if has_floor:
            check_like("floor", floor, estimate)
            floor = cupy.ascontiguousarray(floor, dtype=dtype)
        has_change = change is not None
        if has_change:
            check_like("change", change, estimate, written=True)
        grid, block = _launch_shape(estimate.size)
        _rl_kernel("rl_update", estimate)(
            grid,
            block,
            (
                estimate,
                correction,
                norm,
                floor if has_floor else correction,
                change if has_change else estimate,
                _index(estimate),
                dtype.type(NORM_FLOOR),
                dtype.type(lower),
                dtype.type(upper),
                np.int32(has_norm),
                np.int32(has_clamp),
                np.int32(has_floor),
                np.int32(has_change),
            ),
        )

    def rl_tv_norm(self, estimate, norm, out, *, strength: float, epsilon: float):
        strength, epsilon = validate_tv(strength, epsilon)
        check_tv_arrays(estimate, norm, out, xp=cupy)
        dtype = estimate.dtype
        norm = cupy.ascontiguousarray(norm, dtype=dtype)
        grid, block = _launch_shape(estimate.size)
        _rl_kernel("rl_tv_norm", estimate)(
            grid,
            block,
            (
                estimate,
                norm,
                out,
                _index(estimate),
                _index(estimate, estimate.shape[1]),
                dtype.type(NORM_FLOOR),
                dtype.type(strength),
                dtype.type(epsilon),
            ),
        )
        return out

    def ba_extrapolate(self, estimate, previous, alpha: float, *, floor_fraction: float = 0.1):
        alpha, floor_fraction = validate_extrapolation(alpha, floor_fraction)
        if not estimate.flags.c_contiguous:
            msg = "ba_extrapolate writes the estimate in place: it must be C-contiguous"
            raise ValueError(msg)
        check_like("previous", previous, estimate, written=True)
        dtype = estimate.dtype
        grid, block = _launch_shape(estimate.size)
        _rl_kernel("ba_extrapolate", estimate)(
            grid,
            block,
            (
                estimate,
                previous,
                _index(estimate),
                dtype.type(alpha),
                dtype.type(floor_fraction),
            ),
        )

    def rl_deviance(self, observed, blurred, weight=None, *, background: float = 0.0) -> float:
        # One pass (kernels/rl_steps.cu) instead of the base class's temporaries: a partial sum
        # per block in float64, added up on the device; float() is the one wait for it.
        background = validate_background(background)
        blurred = cupy.ascontiguousarray(blurred)
        dtype = blurred.dtype
        check_like("observed", observed, blurred)
        observed = cupy.ascontiguousarray(observed, dtype=dtype)
        has_weight = weight is not None
        if has_weight:
            check_like("weight", weight, blurred)
            weight = cupy.ascontiguousarray(weight, dtype=dtype)
        grid, block = _launch_shape(blurred.size)
        partial = cupy.empty(grid, dtype=np.float64)
        _rl_kernel("rl_deviance", blurred)(
            grid,
            block,
            (
                observed,
                blurred,
                weight if has_weight else observed,
                partial,
                _index(blurred),
                dtype.type(RATIO_EPS),
                dtype.type(background),
                np.int32(has_weight),
            ),
        )
        return float(partial.sum())

    # ------------------------------------------------------------------ facts
    def peak_memory(self, function) -> int:
        # Growth of CuPy's pool, after freeing its unused blocks and clearing the FFT plan cache
        # so that cuFFT work areas are counted too.
        pool = cupy.get_default_memory_pool()
        cupy.fft.config.get_plan_cache().clear()
        gc.collect()
        self.synchronize()
        pool.free_all_blocks()
        before = pool.total_bytes()
        result = function()
        self.synchronize()
        peak = pool.total_bytes() - before
        del result
        return int(peak)

    def memory_info(self) -> MemoryInfo:
        free, total = cupy.cuda.Device().mem_info
        # Blocks held by CuPy's pool are free for our arrays too.
        pool = cupy.get_default_memory_pool()
        free += pool.total_bytes() - pool.used_bytes()
        return MemoryInfo(free=int(free), total=int(total), kind="device")

    def versions(self) -> dict[str, str]:
        def dotted(number: int) -> str:  # 13000 -> "13.0"
            return f"{number // 1000}.{number % 1000 // 10}"

        return {
            "cupy": cupy.__version__,
            "cuda runtime": dotted(cupy.cuda.runtime.runtimeGetVersion()),
            "cuda driver": dotted(cupy.cuda.runtime.driverGetVersion()),
        }

    def peak_flops(self) -> float | None:
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        lanes = _FP32_LANES_PER_SM.get((props["major"], props["minor"]))
        # the boost clock in kHz, as datasheet peaks are quoted; CUDA 13 dropped clockRate from
        # the properties, the device attribute (cudaDevAttrClockRate = 13) still answers
        clock = props.get("clockRate")
        if not clock:
            try:
                clock = cupy.cuda.runtime.deviceGetAttribute(13, cupy.cuda.Device().id)
            except Exception:  # noqa: BLE001  (an unknown attribute: no figure, not a failure)
                clock = None
        if lanes is None or not clock:
            return None
        return 2.0 * lanes * props["multiProcessorCount"] * clock * 1e3

    def device_name(self) -> str:
        device = cupy.cuda.Device()
        name = cupy.cuda.runtime.getDeviceProperties(device.id)["name"]
        if isinstance(name, bytes):
            name = name.decode(errors="replace")
        return f"{name} (GPU {device.id}, sm_{device.compute_capability})"


#: FP32 lanes per SM by compute capability (CUDA C Programming Guide, "Arithmetic Instructions")
_FP32_LANES_PER_SM = {
    (7, 0): 64,
    (7, 5): 64,
    (8, 0): 64,
    (8, 6): 128,
    (8, 7): 128,
    (8, 9): 128,
    (9, 0): 128,
    (10, 0): 128,
    (12, 0): 128,
}


def _index(array, value=None):
    """``value`` (the element count by default) as the C index type the kernel was compiled with
    for ``array`` (a Python int would be passed as a 64-bit one)."""
    value = array.size if value is None else value
    return np.int64(value) if index_type(array.size) == "long long" else np.int32(value)
