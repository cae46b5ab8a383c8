"""Wiener deconvolution: the closed-form linear restoration, written once for every backend."""

from __future__ import annotations

import math

import numpy as np

from .._errors import GpudeconvError
from ..backend import Backend, backend_for, is_cupy_array
from ..psf import PSFField, validate_psf
from ..psf.field import FieldWindow
from .noise import estimate_noise
from .rl import _as_image, _check_has_data, _validate_image

__all__ = ["wiener"]

#: A band of frequencies holds signal when its mean power exceeds the noise's by this fraction
#: (the sky noise is measured to about 2 %, its power to 4 %) ...
SIGNAL_MARGIN = 0.1
#: ... and by this many standard errors of the band's mean noise power.
SIGNAL_ERRORS = 4.0
#: The default filter multiplies the RMS of white noise by at most this much.
MAX_NOISE_GAIN = 3.0
#: Frequencies where the PSF passes less power than this are noise alone in the periodogram;
#: their mean power floors the noise's when there are enough of them.
BLIND_TRANSFER = 1e-6
MIN_BLIND_FREQUENCIES = 1024
#: Beyond the measured rings, S stays at the least of the last this many measured.
EXTENSION_RINGS = 4
#: The normalized convolution that fills no-data pixels falls back to the plane's median where
#: less than about this much PSF weight of data surrounds a pixel.
FILL_WEIGHT = 1e-2


def _validate_nsr(nsr) -> float | None:
    if nsr is None:
        return None
    value = None
    if not isinstance(nsr, bool) and isinstance(nsr, int | float | np.number):
        value = float(nsr)
    if value is None or not (math.isfinite(value) and value > 0):
        msg = (
            f"nsr must be a positive noise-to-signal power ratio (typically 1e-4 to 1e-1), or "
            f"None to estimate it from the image, got {nsr!r}"
        )
        raise GpudeconvError(msg)
    return value


def _validate_single_psf(psf) -> None:
    fields = (PSFField, FieldWindow)
    if isinstance(psf, fields) or (
        isinstance(psf, list | tuple) and any(isinstance(p, fields) for p in psf)
    ):
        msg = (
            "wiener needs one PSF (a 2-D array, or one per channel), got a PSF field; "
            "use richardson_lucy, which follows a PSF that varies across the field"
        )
        raise GpudeconvError(msg)


def wiener(image, psf, *, nsr: float | None = None, backend: str | Backend | None = None):
    """Restore a blurred image with the Wiener filter.

    Parameters
    ----------
    image : (H, W) or (C, H, W) array_like (NumPy or CuPy)
        The observed image; colour channel-first, restored channel by channel. Non-finite
        pixels are no-data: filled for the filter from the data around them and NaN after.
    psf : (k, k) or (C, k, k) array_like
        The PSF, odd sides, normalized to sum 1 internally; one for all channels or one each.
        A :class:`~gpudeconv.PSFField` is refused: the filter needs one PSF.
    nsr : float, optional
        The noise-to-signal power ratio, constant over frequencies (1e-4 for very clean data,
        1e-1 for noisy data). By default a ratio that depends on the frequency, estimated
        from the image (see Notes).
    backend : {'auto', 'numpy', 'cupy'} or Backend, optional
        Where to compute; NumPy input comes back as NumPy, CuPy input as CuPy.

    Returns
    -------
    restored : ndarray, shape of ``image``
        float32, or float64 for float64 input.

    Notes
    -----
    With :math:`H` the PSF's transfer function and :math:`D` the spectrum of the data,

    .. math:: \\hat U(f) = W(f)\\, D(f), \\qquad
              W(f) = \\frac{H^*(f)}{|H(f)|^2 + \\mathrm{NSR}(f)}, \\qquad
              \\mathrm{NSR}(f) = \\frac{N}{S(f)}

    the linear estimate of least mean square error [1]_ for white noise of power :math:`N`
    and a sky of power spectrum :math:`S` before the blur. The default estimates both from
    the plane:

    * :math:`N` is the mean noise variance of its pixels by its noise model
      (:func:`~gpudeconv.restore.noise.estimate_noise`, :math:`(d + \\alpha) / g`): photon
      noise is white at the mean of its variance, which the bright disk of a planet raises far
      above the sky's. Where the PSF passes almost nothing (:math:`|H|^2 < 10^{-6}`) the
      periodogram is noise alone, and its mean there floors :math:`N`.
    * :math:`S` is averaged over rings of frequency from the periodogram of the plane under a
      cosine-edged window: :math:`S = \\sum (|D|^2 - N) / \\sum |H|^2` over each ring. Rings
      whose mean power does not exceed :math:`N` by 10 % and 4 standard errors hold no
      measurable signal; from the first of them outwards :math:`S` stays at the least of the
      last 4 measured values: the flat spectrum of point sources. There
      :math:`|H|^2 S < N`, so the filter falls with :math:`|H|` instead of dividing by it,
      and a saturated core, a hot pixel or a noise measured a little low is not amplified.
    * :math:`\\mathrm{NSR}(f)` is then floored by the least constant for which the filter
      multiplies the RMS of white noise, :math:`\\sqrt{\\langle |W|^2 \\rangle}`, by at most
      3. The least-squares optimum is set by the few brightest stars, whose flat spectrum
      asks for restoration up to high frequencies: on the synthetic star fields of the tests
      it multiplied the sky noise by 8 (and by 70 at high signal) for the sake of those
      stars; floored, the sky noise grows about as much as with 100 Richardson-Lucy
      iterations and the stars' FWHM shrinks by a third. A planet's disk, whose own spectrum
      falls with frequency, stays below the limit: its filter is the unfloored optimum.
    * :math:`\\mathrm{NSR}(0) = 0`: the filter keeps the flux (DC gain 1).

    A star restored by the filter has a dark ring of a few percent of its peak (about 6 %
    for a Moffat PSF on the synthetic scenes of the tests) where the filter's response falls
    at the limit set by the noise; Richardson-Lucy, which keeps the light positive, rings
    much less on stars. A constant ``nsr`` gives the classical filter, unfloored.

    Each plane is padded by reflection by at least the PSF's side (then to a fast FFT
    length), and the padding is tapered to the plane's median by a cosine, so the FFT's
    periodic wrap meets no edge and the borders do not ring. No-data pixels are filled with
    the PSF-weighted mean of the data around them (the plane's median far from any).

    References
    ----------
    .. [1] Wiener, N. (1949), "Extrapolation, Interpolation, and Smoothing of Stationary Time
           Series", MIT Press. Gonzalez, R. C. & Woods, R. E. (2018), "Digital Image
           Processing", 4th ed., section 5.8.
    """
    image = _as_image(image)
    backend = backend_for(image, backend)
    _validate_image(image)
    _validate_single_psf(psf)
    nsr = _validate_nsr(nsr)
    is_colour = image.ndim == 3
    channels = image.shape[0] if is_colour else 1
    host_psf = validate_psf(backend.to_host(psf), channels=channels if is_colour else None)
    psfs = [host_psf] * channels if host_psf.ndim == 2 else list(host_psf)
    dtype = backend.float_dtype(image.dtype)
    data = backend.asarray(image, dtype=dtype)
    planes = data if is_colour else data[None]
    _check_has_data(planes, backend.xp)
    restored = backend.xp.empty_like(planes)
    for index in range(channels):
        restored[index] = _restore_plane(planes[index], psfs[index], nsr, backend)
    result = restored if is_colour else restored[0]
    return result if is_cupy_array(image) else backend.to_host(result)


def _restore_plane(plane, psf: np.ndarray, nsr: float | None, backend: Backend):
    """The Wiener filter applied to one 2-D plane on ``backend``."""
    xp = backend.xp
    dtype = plane.dtype.type
    valid = xp.isfinite(plane)
    has_nodata = not bool(valid.all())
    if has_nodata and not bool(valid.any()):
        return xp.full_like(plane, np.nan)
    height, width = plane.shape
    pad = max(psf.shape)
    shape = backend.fft_shape((height + 2 * pad, width + 2 * pad))
    otf = backend.otf(backend.asarray(psf, dtype=plane.dtype), shape)
    level = float(xp.median(plane[valid] if has_nodata else plane))
    centred = plane - dtype(level)
    if has_nodata:
        centred = _fill(centred, valid, otf, shape, backend)

    if nsr is None:
        variance = _noise_variance(plane, valid, backend)
        ratio = _noise_to_signal(centred, variance, otf, shape, backend)
        ratio = _limit_noise_gain(ratio, otf, MAX_NOISE_GAIN, backend)
    else:
        ratio = xp.full(otf.shape, nsr, dtype=plane.dtype)
    ratio[0, 0] = 0  # DC gain 1: the filter keeps the flux
    gain = xp.conj(otf) / (otf.real**2 + otf.imag**2 + ratio)

    rows = _reflected(height, pad, shape[0], xp)
    cols = _reflected(width, pad, shape[1], xp)
    padded = xp.take(xp.take(centred, rows, axis=0), cols, axis=1)
    padded *= _taper(height, pad, shape[0], plane.dtype, backend)[:, None]
    padded *= _taper(width, pad, shape[1], plane.dtype, backend)[None, :]
    spectrum = backend.rfft2(padded, shape)
    spectrum *= gain
    restored = backend.irfft2(spectrum, shape)[pad : pad + height, pad : pad + width]
    restored = restored + dtype(level)
    if has_nodata:
        restored = xp.where(valid, restored, dtype(np.nan))
    return restored


def _noise_variance(plane, valid, backend: Backend):
    """Each pixel's noise variance by the plane's noise model, ``max(d + offset, 0) / gain``
    (0 on no-data), floored at the float round-off of the plane's largest value."""
    xp = backend.xp
    dtype = plane.dtype.type
    model = estimate_noise(backend.to_host(plane))
    data = xp.where(valid, plane, dtype(0))
    round_off = float(np.finfo(plane.dtype).eps) * float(xp.abs(data).max())
    variance = xp.maximum(data + dtype(model.offset), dtype(0)) * dtype(1 / model.gain)
    return xp.where(valid, variance + dtype(round_off**2), dtype(0))


def _fill(centred, valid, otf, shape, backend: Backend):
    """``centred`` with its no-data pixels replaced by the PSF-weighted mean of the data around
    them (a normalized convolution), blending into 0 (the plane's median) far from any data."""
    xp = backend.xp
    dtype = centred.dtype.type
    weight = valid.astype(centred.dtype)
    light = backend.fft_convolve(xp.where(valid, centred, dtype(0)), otf, shape)
    reach = backend.fft_convolve(weight, otf, shape)
    local = light / (xp.maximum(reach, dtype(0)) + dtype(FILL_WEIGHT))
    return xp.where(valid, centred, local)


def _reflected(length: int, before: int, total: int, xp):
    """Indices that extend an axis of ``length`` by reflection (edge pixel not repeated),
    ``before`` in front, to ``total``: as ``np.pad(mode='reflect')``, for any pad width."""
    index = np.arange(total) - before
    if length == 1:
        return xp.asarray(np.zeros(total, dtype=np.intp))
    period = 2 * (length - 1)
    index = np.mod(index, period)
    return xp.asarray(np.where(index < length, index, period - index))


def _taper(length: int, before: int, total: int, dtype, backend: Backend):
    """1 over the plane, falling by a cosine to 0 at both ends of the padded axis."""
    window = np.ones(total)
    after = total - length - before
    if before:
        window[:before] = 0.5 - 0.5 * np.cos(np.pi * (np.arange(before) + 0.5) / before)
    if after:
        window[length + before :] = 0.5 + 0.5 * np.cos(np.pi * (np.arange(after) + 0.5) / after)
    return backend.asarray(window, dtype=dtype)


def _noise_to_signal(centred, variance, otf, shape, backend: Backend):
    """``N / S(|f|)`` on the grid of ``otf``: ``N`` the noise's (white) power, ``S`` the sky's
    power spectrum before the blur, averaged over rings of frequency (see `wiener`'s Notes)."""
    xp = backend.xp
    height, width = centred.shape
    ramp = max(1, min(height, width) // 8)
    window = _cosine_edges(height, ramp)[:, None] * _cosine_edges(width, ramp)[None, :]
    window_sum = float((window**2).sum())
    window = backend.asarray(window, dtype=centred.dtype)
    # Poisson noise is white at the mean of its variance; filled no-data pixels carry none.
    noise_power = float((window**2 * variance).sum()) / window_sum
    periodogram = backend.rfft2(centred * window, shape)
    periodogram = (periodogram.real**2 + periodogram.imag**2) / window_sum
    transfer = otf.real**2 + otf.imag**2
    # Where the PSF passes (almost) nothing the periodogram is noise alone: a floor for the
    # model's noise (hot pixels, noise the model underrates), when such frequencies exist.
    blind = transfer < BLIND_TRANSFER
    blind_count = int(blind.sum())
    if blind_count >= MIN_BLIND_FREQUENCIES:
        noise_power = max(noise_power, float(xp.where(blind, periodogram, 0).sum()) / blind_count)
    tiny = float(np.finfo(centred.dtype).tiny)
    noise_power = max(noise_power, tiny)  # an all-zero plane: no noise, no signal

    radius = _frequency_radius(shape)
    step = 2.0 / min(height, width)  # the window's resolution in frequency, twice
    host_ring = (radius / step).astype(np.intp).ravel()
    rings = int(host_ring.max()) + 1
    count = np.bincount(host_ring, minlength=rings).astype(np.float64)
    ring = backend.asarray(host_ring)
    power = backend.to_host(xp.bincount(ring, weights=periodogram.ravel(), minlength=rings))
    response = backend.to_host(xp.bincount(ring, weights=transfer.ravel(), minlength=rings))

    # Neighbouring frequencies of the zero-padded transform are not independent: a ring holds
    # about count * (plane area / transform area) independent periodogram values.
    independent = np.maximum(count * height * width / (shape[0] * shape[1]), 1.0)
    excess = power / np.maximum(count, 1) - noise_power
    margin = noise_power * np.maximum(SIGNAL_MARGIN, SIGNAL_ERRORS / np.sqrt(independent))
    measured = (excess > margin) & (count > 0)
    signal = np.zeros(rings)
    signal[measured] = excess[measured] * count[measured] / np.maximum(response[measured], 1e-300)
    first_unmeasured = int(np.argmin(measured)) if not measured.all() else rings
    if first_unmeasured == 0:
        # No ring beyond the noise: S reaches the noise only at zero frequency.
        signal[:] = noise_power
    else:
        # The last few measured rings, the least of them: the outermost is the least certain.
        last = signal[max(0, first_unmeasured - EXTENSION_RINGS) : first_unmeasured]
        signal[first_unmeasured:] = last.min()
    signal = np.maximum(signal, 1e-30 * signal.max() if signal.max() > 0 else 1e-30)
    centres = (np.arange(rings) + 0.5) * step
    ratio = xp.interp(
        backend.asarray(radius.ravel()),
        backend.asarray(centres),
        backend.asarray(np.maximum(noise_power / signal, tiny)),  # a normal number: > 0
    )
    return ratio.reshape(otf.shape).astype(centred.dtype)


def _limit_noise_gain(ratio, otf, limit: float, backend: Backend):
    """``max(ratio, floor)``, with the least ``floor`` (found by bisection in its logarithm)
    for which the filter multiplies the RMS of white noise by at most ``limit``."""
    xp = backend.xp
    transfer = otf.real**2 + otf.imag**2

    def noise_gain(floor: float) -> float:
        denominator = transfer + xp.maximum(ratio, ratio.dtype.type(floor))
        return math.sqrt(float((transfer / denominator**2).mean()))

    if noise_gain(0.0) <= limit:
        return ratio
    low, high = -16.0, 4.0  # log10 of the floor; at 1e4 the filter passes almost nothing
    for _ in range(30):
        middle = 0.5 * (low + high)
        low, high = (low, middle) if noise_gain(10.0**middle) <= limit else (middle, high)
    return xp.maximum(ratio, ratio.dtype.type(10.0**high))


def _cosine_edges(length: int, ramp: int) -> np.ndarray:
    """1 inside, rising from near 0 by half a cosine over ``ramp`` pixels at each end."""
    window = np.ones(length)
    ramp = min(ramp, length // 2)
    if ramp:
        rise = 0.5 - 0.5 * np.cos(np.pi * (np.arange(ramp) + 0.5) / ramp)
        window[:ramp] = rise
        window[length - ramp :] = rise[::-1]
    return window


def _frequency_radius(shape) -> np.ndarray:
    """``|f|`` in cycles per pixel on the grid of a real FFT of ``shape`` (host, float64)."""
    rows = np.fft.fftfreq(shape[0])[:, None]
    cols = np.fft.rfftfreq(shape[1])[None, :]
    return np.sqrt(rows**2 + cols**2)
