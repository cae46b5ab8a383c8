"""What every backend provides: the contract that the layers above are written against.

A backend owns everything that differs between the CPU and the GPU (ARCHITECTURE.md, "Backend"):
the array module ``xp``, the dtype policy, FFTs with cached plans, moving data, memory figures and
the fused elementwise steps of Richardson-Lucy. Code above ``gpudeconv/backend/`` calls these
methods and never imports cupy.
"""

from __future__ import annotations

import abc
import gc
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._errors import GpudeconvError

__all__ = [
    "Backend",
    "CostRates",
    "HostEvent",
    "HostStream",
    "MemoryInfo",
    "NORM_FLOOR",
    "RATIO_EPS",
    "TV_STABILITY",
    "check_like",
    "check_tv_arrays",
    "is_cupy_array",
    "poisson_deviance",
    "validate_background",
    "validate_bounds",
    "validate_damping",
    "validate_extrapolation",
    "validate_tv",
]

#: Guard of the RL ratio ``d / max(Hu, eps)``: a normal float32 number (CuPy compiles with
#: ``-ftz``, so denormals would flush to zero), small against any real pixel value, and
#: ``d / eps`` stays finite for every float32 ``d`` below 3e26.
RATIO_EPS = 1e-12

#: TV's gradient floor is at least ``TV_STABILITY * strength * u`` at a pixel of value ``u``
#: (``kernels/rl_steps.cu`` has the same number). Where gradients are under that floor the TV
#: step of Dey et al. is an explicit diffusion of coefficient ``strength * u / floor``, which
#: damps a checkerboard without overshoot only up to 1/8: with a floor of a tenth of the noise
#: alone, noise-free flat areas (clipped cores, smooth high-SNR planetary and lunar detail, the
#: fill of no-data) grew a ±2 % checkerboard at strength 0.005 and ±9 % at 0.02.
TV_STABILITY = 8

#: Pixels whose data weight seen through the PSF, ``H^T w``, is at most this keep their value in
#: the update: under 0.1% of their light reaches observed pixels, and FFT round-off (about 1e-7
#: of the weights) must never be divided by.
NORM_FLOOR = 1e-3


def is_cupy_array(a) -> bool:
    """Whether ``a`` is a CuPy array, without importing cupy (array-api-compat's rule)."""
    return type(a).__module__.split(".", 1)[0] == "cupy" and hasattr(a, "__cuda_array_interface__")


def validate_background(background) -> float:
    """``rl_ratio``'s background as a float: finite, else ``GpudeconvError``."""
    value = float(background)
    if not math.isfinite(value):
        msg = (
            f"background must be a finite number (a constant sky or bias level in the units of "
            f"the blurred image, 0 for none), got {background!r}"
        )
        raise GpudeconvError(msg)
    return value


def validate_bounds(lower, upper) -> tuple[float, float] | None:
    """``rl_update``'s clamp as ``(lower, upper)``, an open side as -inf or +inf; None without
    a clamp. A NaN bound or ``lower > upper`` is a ``GpudeconvError``."""
    if lower is None and upper is None:
        return None
    bounds = (
        -math.inf if lower is None else float(lower),
        math.inf if upper is None else float(upper),
    )
    for name, value in zip(("lower", "upper"), bounds, strict=True):
        if math.isnan(value):
            msg = f"{name} must be a number, or None for no bound on that side, got {value}"
            raise GpudeconvError(msg)
    if bounds[0] > bounds[1]:
        msg = (
            f"lower must be <= upper, got lower={bounds[0]:g} > upper={bounds[1]:g}; swap them, "
            "or pass None for a side without a bound"
        )
        raise GpudeconvError(msg)
    return bounds


def validate_damping(damping) -> tuple[float, float, float] | None:
    """``rl_ratio``'s damping ``(scale, power)`` or ``(scale, power, offset)`` as three floats
    (offset 0 when left out), None without damping; a scale that is not positive and finite, a
    power below 1 (or not finite) or an offset below 0 (or not finite) is a ``GpudeconvError``."""
    if damping is None:
        return None
    try:
        values = tuple(float(value) for value in damping)
    except (TypeError, ValueError):
        values = ()
    if len(values) not in (2, 3):
        msg = (
            f"damping must be None or a pair (scale, power) or a triple (scale, power, offset) "
            f"of numbers, e.g. (0.25, 10) or (0.25, 10, 0.01), got {damping!r}"
        )
        raise GpudeconvError(msg)
    scale, power, offset = values if len(values) == 3 else (*values, 0.0)
    if not (math.isfinite(scale) and scale > 0):
        msg = (
            f"the damping scale must be a positive finite number (1 / T**2 to damp pixels that "
            f"the model fits within T noise sigmas), got {scale!r}"
        )
        raise GpudeconvError(msg)
    # power < 1 would raise U**(power - 1) to a negative power: infinite where U = 0
    if not (math.isfinite(power) and power >= 1):
        msg = (
            f"the damping power must be a finite number >= 1 (White's N, typically 10; 1 damps "
            f"nothing), got {power!r}"
        )
        raise GpudeconvError(msg)
    if not (math.isfinite(offset) and offset >= 0):
        msg = (
            f"the damping offset must be a finite number >= 0 (the noise model's offset in the "
            f"units of the blurred image, 0 for raw frames), got {offset!r}"
        )
        raise GpudeconvError(msg)
    return scale, power, offset


def validate_tv(strength, epsilon) -> tuple[float, float]:
    """``rl_tv_norm``'s ``(strength, epsilon)`` as floats: a finite strength >= 0 and a
    positive finite epsilon, else ``GpudeconvError``."""
    strength, epsilon = float(strength), float(epsilon)
    if not (math.isfinite(strength) and strength >= 0):
        msg = (
            f"the TV strength must be a finite number >= 0 (typically 0.001 to 0.01, 0 for no "
            f"regularization), got {strength!r}"
        )
        raise GpudeconvError(msg)
    if not (math.isfinite(epsilon) and epsilon > 0):
        msg = (
            f"the TV epsilon must be a positive finite number (a gradient, in the estimate's "
            f"units, below which the image counts as flat), got {epsilon!r}"
        )
        raise GpudeconvError(msg)
    return strength, epsilon


def validate_extrapolation(alpha, floor_fraction) -> tuple[float, float]:
    """``ba_extrapolate``'s ``(alpha, floor_fraction)`` as floats: alpha in [0, 1) and
    floor_fraction in [0, 1], else ``GpudeconvError``."""
    alpha, floor_fraction = float(alpha), float(floor_fraction)
    if not 0 <= alpha < 1:
        msg = (
            f"alpha must be a number in [0, 1) (the Biggs-Andrews step length, 0 for no "
            f"extrapolation), got {alpha!r}"
        )
        raise GpudeconvError(msg)
    if not 0 <= floor_fraction <= 1:
        msg = (
            f"floor_fraction must be a number in [0, 1] (the least fraction of each pixel that "
            f"the extrapolated estimate keeps, typically 0.1), got {floor_fraction!r}"
        )
        raise GpudeconvError(msg)
    return alpha, floor_fraction


def check_like(name: str, array, like, *, written: bool = False) -> None:
    """``ValueError`` unless ``array`` has the shape of ``like`` and, where the step writes it
    (``written``), its dtype and C order too: kernels index flat memory, so an array of another
    shape would be read or written past its end, and an output cannot be converted on the way."""
    if array.shape != like.shape:
        msg = f"{name} must have the shape {like.shape} of the estimate, got {array.shape}"
        raise ValueError(msg)
    if written and (array.dtype != like.dtype or not array.flags.c_contiguous):
        msg = (
            f"{name} is written in place: it must be a C-contiguous {like.dtype} array, got a "
            f"{'C' if array.flags.c_contiguous else 'non-C'}-contiguous {array.dtype} one"
        )
        raise ValueError(msg)


def check_tv_arrays(estimate, norm, out, *, xp) -> None:
    """``ValueError`` unless ``rl_tv_norm``'s arrays are 2-D of one shape, ``out`` is
    C-contiguous in the estimate's dtype, and ``out`` shares no memory with the others (each
    pixel's result reads its neighbours' inputs, which an aliased output would overwrite)."""
    if estimate.ndim != 2:
        msg = f"rl_tv_norm takes a 2-D estimate, got shape {estimate.shape}"
        raise ValueError(msg)
    check_like("norm", norm, estimate)
    check_like("out", out, estimate, written=True)
    if not estimate.flags.c_contiguous:
        msg = "rl_tv_norm reads neighbours in flat memory: the estimate must be C-contiguous"
        raise ValueError(msg)
    for name, array in (("estimate", estimate), ("norm", norm)):
        if xp.shares_memory(out, array):
            msg = f"rl_tv_norm's out must be an array of its own: it shares memory with {name}"
            raise ValueError(msg)


def poisson_deviance(observed, model, *, xp):
    """The Poisson deviance of each pixel, ``2 (d log(d / m) - d + m)`` (``2 m`` where
    ``d <= 0``), in the arrays' dtype; ``model`` must be positive (the guarded ``H u + b``).

    Written as ``kernels/rl_steps.cu`` writes it, operation by operation, so that the damped
    ratio's NumPy twin rounds as the kernel does. Rounding can make the bracket slightly
    negative where ``d`` is close to ``m``: it is raised to 0, the deviance's true lower bound
    (a negative one would give NaN in ``U ** (power - 1)`` for a non-integer power).
    """
    positive = observed > 0
    data = xp.where(positive, observed, model)  # log(m / m) = 0: no warning where d <= 0
    deviance = data * xp.log(data / model)
    deviance -= data
    deviance += model
    deviance *= 2
    deviance = xp.where(positive, deviance, 2 * model)
    return xp.maximum(deviance, 0, out=deviance)


@dataclass(frozen=True)
class MemoryInfo:
    """Memory available to a backend, in bytes: device memory on a GPU, RAM on the CPU."""

    free: int
    total: int
    kind: str  # {'host', 'device'}


@dataclass(frozen=True)
class CostRates:
    """Rough throughputs of a backend, for the operators' choice between direct sums and FFTs.

    Only their ratios matter: a choice within tens of percent of the faster way is the aim.
    """

    #: multiply-adds per second of :meth:`Backend.direct_convolve`
    direct: float
    #: multiply-adds per second of :meth:`Backend.sv_direct` (0 where there is no such kernel)
    sv_kernel: float
    #: ``n log2(n)`` per second of a real FFT of ``n`` elements, forward and inverse together
    fft: float
    #: fixed seconds of each convolution call (launches, plan look-ups, small allocations)
    call: float


class HostEvent:
    """The CPU twin of a CUDA event: CPU work is finished when its call returns."""

    done = True

    def synchronize(self) -> None:
        """Nothing to wait for."""


class HostStream:
    """The CPU twin of a CUDA stream (:meth:`Backend.stream`): work runs when it is called, in
    order, so recording, waiting and synchronizing have nothing to do. ``with stream:`` makes it
    current, as a CuPy stream does."""

    def __enter__(self) -> HostStream:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def synchronize(self) -> None:
        """Nothing is queued."""

    def record(self) -> HostEvent:
        """An event that has already happened."""
        return HostEvent()

    def wait_event(self, event) -> None:
        """Everything recorded has already happened."""


class Backend(abc.ABC):
    """An array backend: NumPy on the CPU or CuPy on a CUDA device."""

    #: short name, ``"numpy"`` or ``"cupy"``
    name: str
    #: PSFs up to this side are convolved as direct sums by default, larger ones through FFTs
    direct_max_size: int = 0
    #: the array namespace (``numpy`` or ``cupy``)
    xp: Any
    #: the image filters of ``xp``'s arrays, with SciPy's signatures (``scipy.ndimage`` or
    #: ``cupyx.scipy.ndimage``): filtering where the data lives, without a copy to the host
    ndimage: Any
    #: largest PSF side that :meth:`sv_direct` takes (0: no direct spatially-varying kernel)
    sv_kernel_max_size: int = 0
    #: throughputs for the cost model of the operators
    cost_rates: CostRates

    # ------------------------------------------------------------------ dtypes and data
    @staticmethod
    def float_dtype(dtype) -> np.dtype:
        """The working dtype for input of ``dtype``: float64 stays, everything else is float32."""
        return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)

    @abc.abstractmethod
    def is_own_array(self, a) -> bool:
        """Whether ``a`` already lives on this backend (no transfer needed)."""

    def asarray(self, a, dtype=None):
        """``a`` on this backend, C-contiguous, in ``dtype`` (its own dtype when None)."""
        return self.xp.ascontiguousarray(self.xp.asarray(a, dtype=dtype))

    def to_host(self, a) -> np.ndarray:
        """A NumPy array with the values of ``a`` (a NumPy or CuPy array, or array_like)."""
        return a.get() if is_cupy_array(a) else np.asarray(a)

    def synchronize(self) -> None:  # noqa: B027  (a no-op unless the backend queues work)
        """Wait for queued device work (no-op on the CPU); call before reading a clock."""

    # ------------------------------------------------------------------ streaming tiles
    # What the tile driver (gpudeconv/tiles.py) needs to overlap transfers with computation. The
    # defaults are the CPU's: no streams, ordinary host memory, copies done when called.
    def stream(self):
        """A new stream to queue work on, used as ``with stream:``; it has ``record()`` (an event
        with ``synchronize()``), ``wait_event(event)`` and ``synchronize()``. On the CPU a
        :class:`HostStream`, whose work is done when called."""
        return HostStream()

    def pinned_empty(self, shape, dtype) -> np.ndarray:
        """An uninitialized host (NumPy) array from which :meth:`upload` and into which
        :meth:`download` copy asynchronously: page-locked memory on a GPU. Allocate it once per
        tile shape and reuse it: page-locking is slow and CuPy's pinned pool rounds sizes up
        to a power of two."""
        return np.empty(shape, dtype=dtype)

    def upload(self, host: np.ndarray, *, stream=None):
        """A copy of the host array on this backend, queued on ``stream`` (current stream when
        None). ``host`` may be refilled once an event recorded on ``stream`` after this call has
        happened (at once on the CPU, where the copy is made here)."""
        return self.xp.array(host, copy=True)

    def download(self, array, out: np.ndarray, *, stream=None) -> np.ndarray:
        """Copy ``array`` (this backend's, same shape and dtype as ``out``) into the host array
        ``out``, queued on ``stream``: read ``out`` after an event recorded on ``stream`` after
        this call has happened (at once on the CPU)."""
        np.copyto(out, array)
        return out

    def is_out_of_memory(self, error: BaseException) -> bool:
        """Whether ``error`` says that this backend ran out of memory (so a smaller tile may go)."""
        return isinstance(error, MemoryError)

    def release_memory(self) -> None:
        """Give cached memory back (pools, FFT plans) after running out of memory."""
        gc.collect()

    # ------------------------------------------------------------------ FFT
    @abc.abstractmethod
    def fft_length(self, n: int) -> int:
        """A length ``>= n`` for which this backend's real FFT is fast."""

    def fft_lengths(self) -> dict[int, int]:
        """The lengths `fft_length` chose by timing in this process, ``{n: length}`` (none where
        the choice is a fixed rule)."""
        return {}

    def pin_fft_lengths(self, lengths) -> None:  # noqa: B027  (nothing to pin by default)
        """Make `fft_length` answer ``lengths[n]`` for each ``n`` (as another process chose
        them), so that results are bit for bit those of that process."""

    def fft_shape(self, shape) -> tuple[int, ...]:
        """``fft_length`` applied to each axis of ``shape``."""
        return tuple(self.fft_length(int(n)) for n in shape)

    @abc.abstractmethod
    def rfft2(self, x, shape):
        """Real FFT over the last two axes of ``x`` zero-padded to ``shape``."""

    @abc.abstractmethod
    def irfft2(self, spectrum, shape):
        """Inverse of :meth:`rfft2` for real output of the given last-two-axes ``shape``."""

    def otf(self, psf, shape):
        """Transfer function of ``psf`` for FFTs of ``shape``: its centre moved to index (0, 0).

        The PSF is placed at the corner of a zero array of ``shape`` and rolled by ``-(k // 2)`` on
        each axis, so that convolution by multiplication with this OTF keeps images in place.
        """
        xp = self.xp
        psf = self.asarray(psf)
        padded = xp.zeros(shape, dtype=psf.dtype)
        ky, kx = psf.shape
        padded[:ky, :kx] = psf
        padded = xp.roll(padded, (-(ky // 2), -(kx // 2)), axis=(0, 1))
        return self.rfft2(padded, shape)

    def adjoint_otf(self, otf):
        """The transfer function of the adjoint (correlation): the complex conjugate of ``otf``.

        Operators compute it once beside the OTF, so that no iteration builds a conjugate.
        """
        return self.xp.conj(otf)

    def fft_convolve(self, x, otf, fft_shape, out=None):
        """Linear convolution of the 2-D ``x`` (zero outside) by the PSF whose OTF is ``otf``.

        ``fft_shape`` must exceed ``x.shape`` by at least the PSF radius on each axis so that the
        circular wrap of the FFT falls outside the returned ``x.shape`` window; pass
        :meth:`adjoint_otf` to correlate instead. The result goes to ``out`` when given (an
        array of ``x``'s shape and dtype), else to a new array.
        """
        spectrum = self.rfft2(x, fft_shape)
        spectrum *= otf
        window = self.irfft2(spectrum, fft_shape)[: x.shape[0], : x.shape[1]]
        if out is None:
            # contiguous, so the fused kernels need no copy and the full FFT array is freed
            return self.xp.ascontiguousarray(window)
        out[...] = window
        return out

    @abc.abstractmethod
    def direct_convolve(self, x, kernel, *, adjoint: bool = False, out=None):
        """Linear convolution of 2-D ``x`` by a small odd ``kernel`` as a direct sum, zero outside
        (correlation when ``adjoint``); into ``out`` when given."""

    def sv_direct(self, x, psfs, tables, *, adjoint: bool = False, out=None):
        """Spatially-varying convolution of the 2-D ``x`` as one direct sum (a raw kernel).

        ``psfs`` is the ``(ny, nx, k, k)`` node PSFs in ``x``'s dtype, ``tables`` the
        ``(row_node, row_frac, col_node, col_frac)`` interpolation tables of ``x``'s rows and
        columns (int32 and ``x``'s dtype; ``kernels/sv_convolve.cu`` states their meaning).
        Only backends with ``sv_kernel_max_size >= k`` have it; the operator computes the same
        function as a sum over nodes elsewhere (its NumPy twin).
        """
        msg = f"the {self.name} backend has no direct spatially-varying kernel"
        raise NotImplementedError(msg)

    # ------------------------------------------------------------------ fused RL steps
    @abc.abstractmethod
    def rl_ratio(
        self,
        observed,
        blurred,
        weight=None,
        *,
        background: float = 0.0,
        damping: tuple[float, float] | tuple[float, float, float] | None = None,
    ):
        """``weight * observed / max(blurred + background, RATIO_EPS)`` in one pass.

        May reuse ``blurred`` for the result. ``background`` is a constant level ``b`` (sky,
        bias) of the Poisson model ``observed ~ P(H u + b)``, in the units of ``blurred``; it
        must be finite (``GpudeconvError`` otherwise). 0 gives the plain RL ratio bit for bit.

        ``damping = (scale, power, offset)`` gives White's (1994) damped ratio instead: with
        ``m = max(blurred + background, RATIO_EPS)``, ``d = observed`` and
        ``U = scale * (p * dev + (1 - p) * (d - m)**2 / m)``, ``dev`` the pixel's Poisson
        deviance (:func:`poisson_deviance`) and ``p = max(m - offset, 0) / m``, the ratio is
        ``1 + U**(power-1) * (power - (power-1) * U) * (d - m) / m`` where ``U < 1`` and
        ``d / m`` elsewhere: pixels that the model already fits within the noise
        (``scale = 1 / T**2`` for a threshold of ``T`` sigmas with data in counts, times the
        counts per unit otherwise) pull the estimate no further, which stops RL from fitting
        the noise. ``offset`` (0 if left out: ``(scale, power)``) is the part of ``m`` whose
        noise is Gaussian (read noise, subtracted sky: the noise model's offset in these
        units): the deviance's asymmetry matches Poisson noise and pulls Gaussian noise down,
        so that part takes Pearson's symmetric ``(d - m)**2 / m``; offset 0 is White's
        ``U = scale * dev`` bit for bit. The damped ratio is not 0 where ``d`` is, so the
        weight matters on every pixel. ``scale`` must be positive and finite, ``power``
        (typically 10) finite and at least 1, ``offset`` finite and at least 0
        (``GpudeconvError``); None (the default) is the plain ratio, bit for bit and at its
        speed.

        References
        ----------
        .. [1] White, R. L. (1994), "Image restoration using the damped Richardson-Lucy
               method", Proc. SPIE 2198, 1342. :doi:`10.1117/12.176813`
        """

    @abc.abstractmethod
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
        """``estimate *= correction / norm`` in place, in one pass, then clamped if asked.

        Where ``norm`` (the adjoint applied to the data weights) is given and not above
        ``NORM_FLOOR`` the pixel has no data behind it and keeps its value; without ``norm``
        every pixel is multiplied by ``correction``. ``lower`` and ``upper`` (None: no bound on
        that side) then clamp every pixel of the new estimate, kept ones included, to
        ``[lower, upper]`` by comparisons: a NaN pixel stays NaN. A NaN bound or
        ``lower > upper`` raises ``GpudeconvError`` (a ``ValueError``).

        ``floor``, an array of the estimate's shape, then raises each pixel to at least its
        ``floor`` value (after the clamp, by comparison: a NaN pixel stays NaN), e.g. to hold
        up the dark rings that RL digs beside bright stars. ``change``, an array of the
        estimate's shape and dtype (C-contiguous), receives ``new - old`` of every pixel, the
        step that acceleration and stopping rules measure. Without ``lower``, ``upper``,
        ``floor`` and ``change`` the step is the plain update, bit for bit and at its speed.
        May use ``correction`` as scratch space.
        """

    @abc.abstractmethod
    def rl_tv_norm(self, estimate, norm, out, *, strength: float, epsilon: float):
        """``out = norm - strength * div(grad u / |grad u|)`` of the 2-D estimate ``u``, in one
        pass: the total-variation normalization of RL (Dey et al. 2006), to pass to
        :meth:`rl_update` as its ``norm``.

        ``grad`` is the forward difference (0 across the last column and row), ``|g|`` is
        ``sqrt(gx**2 + gy**2 + epsilon**2)`` and ``div`` the backward difference, the exact
        negative adjoint of ``grad``. Where ``norm <= NORM_FLOOR`` (no data behind the pixel)
        ``out`` is ``norm``; elsewhere at least ``norm / 2``, so that a strong regularization
        can at most double a pixel's update. ``strength`` must be finite and ``>= 0``,
        ``epsilon`` positive and finite (``GpudeconvError``). The three arrays are 2-D of one
        shape; ``out`` (C-contiguous, the estimate's dtype) must share memory with neither of
        the others (``ValueError``). Returns ``out``.

        References
        ----------
        .. [1] Dey, N. et al. (2006), "Richardson-Lucy algorithm with total variation
               regularization for 3D confocal microscope deconvolution", Microsc. Res. Tech.
               69, 260. :doi:`10.1002/jemt.20294`
        """

    @abc.abstractmethod
    def ba_extrapolate(self, estimate, previous, alpha: float, *, floor_fraction: float = 0.1):
        """Biggs and Andrews' (1997) extrapolation of the estimate, in place, in one pass:
        ``previous <- u`` and ``estimate <- max(u + alpha (u - p), floor_fraction * u)`` with
        ``u`` the estimate and ``p`` the previous estimate.

        The floor keeps the extrapolated estimate positive where the estimate is (RL cannot
        move a pixel away from 0). ``alpha`` must be in [0, 1), ``floor_fraction`` in [0, 1]
        (``GpudeconvError``); both arrays are written, C-contiguous, of one shape and dtype.

        References
        ----------
        .. [1] Biggs, D. S. C. & Andrews, M. (1997), "Acceleration of iterative image
               restoration algorithms", Applied Optics 36, 1766. :doi:`10.1364/AO.36.001766`
        """

    def rl_deviance(self, observed, blurred, weight=None, *, background: float = 0.0) -> float:
        """The weighted Poisson deviance ``sum(weight * dev)`` of the model
        ``m = max(blurred + background, RATIO_EPS)`` (:func:`poisson_deviance`), summed in
        float64: twice the log-likelihood ratio of the data under the model against a perfect
        fit, about one per observed pixel when the model fits to the noise (in counts).

        Reads its arguments only (``blurred`` stays for :meth:`rl_ratio`). This version is
        written with ``xp`` alone and runs on any backend (the NumPy backend sums row blocks in
        parallel, the CuPy one runs a fused kernel); returning a float waits for the device.
        """
        xp = self.xp
        dtype = blurred.dtype
        shift = dtype.type(validate_background(background))
        model = xp.maximum(blurred + shift, dtype.type(RATIO_EPS))
        deviance = poisson_deviance(xp.asarray(observed, dtype=dtype), model, xp=xp)
        if weight is not None:
            deviance *= weight
        return float(deviance.sum(dtype=xp.float64))

    # ------------------------------------------------------------------ facts
    @abc.abstractmethod
    def peak_memory(self, function) -> int:
        """Run ``function()`` once; return the memory it allocated at its peak, in bytes."""

    @abc.abstractmethod
    def memory_info(self) -> MemoryInfo:
        """Free and total memory that arrays of this backend draw on."""

    @abc.abstractmethod
    def versions(self) -> dict[str, str]:
        """Versions of the libraries this backend computes with (for ``info`` and records)."""

    def peak_flops(self) -> float | None:
        """The device's FP32 peak in FLOP/s (a fused multiply-add counts 2), None if unknown."""
        return None

    @abc.abstractmethod
    def device_name(self) -> str:
        """Human-readable name of the device (CPU model or GPU name)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} on {self.device_name()}>"
