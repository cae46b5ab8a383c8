"""Parametric PSF models for images without stars (planets, the Moon) or for a known seeing."""

from __future__ import annotations

import math

import numpy as np

from .._errors import GpudeconvError

__all__ = ["gaussian", "moffat"]

#: Each pixel is integrated on an OVERSAMPLE x OVERSAMPLE sub-grid: point sampling a profile
#: with a FWHM of 1-2 pixels misplaces a large part of its light.
_OVERSAMPLE = 5
#: The automatic size keeps the profile down to this fraction of its peak.
_TAIL = 1e-3
_MAX_AUTO_SIZE = 255


def _validate_shape(fwhm, ratio, angle, size) -> None:
    if not (np.isfinite(fwhm) and fwhm > 0):
        msg = f"fwhm must be a positive number of pixels, got {fwhm!r}; typical seeing is 2 to 8"
        raise GpudeconvError(msg)
    if fwhm > 100:
        msg = f"fwhm of {fwhm} pixels is not a plausible PSF; typical values are 2 to 8 pixels"
        raise GpudeconvError(msg)
    if not (np.isfinite(ratio) and 0 < ratio <= 1):
        msg = f"ratio (minor/major FWHM) must be in (0, 1], got {ratio!r}; 1 is a round PSF"
        raise GpudeconvError(msg)
    if not np.isfinite(angle):
        msg = f"angle must be a finite number of degrees, got {angle!r}"
        raise GpudeconvError(msg)
    if size is not None and (int(size) != size or size < 1 or size % 2 == 0):
        msg = f"size must be a positive odd integer, got {size!r}; e.g. 25"
        raise GpudeconvError(msg)


def _auto_size(radius: float) -> int:
    half = math.ceil(radius)
    return int(min(2 * half + 1, _MAX_AUTO_SIZE))


def _elliptical_radius2(size: int, ratio: float, angle: float) -> np.ndarray:
    """Squared elliptical radius in units of the major axis, on an oversampled pixel grid.

    Returns an array ``(size, size, OVERSAMPLE**2)``: for each pixel, its sub-samples. ``x`` runs
    along columns, ``y`` along rows; the major axis points at ``angle`` degrees from +x towards +y
    (counter-clockwise when row 0 is drawn at the bottom, as FITS viewers do).
    """
    half = size // 2
    offsets = (np.arange(_OVERSAMPLE) + 0.5) / _OVERSAMPLE - 0.5
    centres = np.arange(-half, half + 1, dtype=np.float64)
    y = (centres[:, None] + offsets[None, :]).reshape(-1)
    x = y.copy()
    yy, xx = np.meshgrid(y, x, indexing="ij")
    theta = math.radians(angle)
    major = xx * math.cos(theta) + yy * math.sin(theta)
    minor = -xx * math.sin(theta) + yy * math.cos(theta)
    r2 = major**2 + (minor / ratio) ** 2
    r2 = r2.reshape(size, _OVERSAMPLE, size, _OVERSAMPLE).transpose(0, 2, 1, 3)
    return r2.reshape(size, size, _OVERSAMPLE**2)


def _finish(profile: np.ndarray) -> np.ndarray:
    psf = profile.mean(axis=-1)
    return (psf / psf.sum()).astype(np.float32)


def gaussian(fwhm: float, *, size: int | None = None, ratio: float = 1.0, angle: float = 0.0):
    """A Gaussian PSF, optionally elliptical.

    Parameters
    ----------
    fwhm : float
        Full width at half maximum along the major axis, in pixels.
    size : odd int, optional
        Side of the square array; by default wide enough to hold the profile down to 1e-3 of its
        peak (about 2.2 FWHM each side).
    ratio : float in (0, 1]
        Minor over major FWHM (1 is round).
    angle : float
        Direction of the major axis in degrees from +x (columns) towards +y (rows).

    Returns
    -------
    psf : (size, size) ndarray of float32
        Normalized to sum 1, pixel-integrated, centred on the middle pixel.

    Notes
    -----
    .. math:: h(r) \\propto \\exp\\left(-\\frac{r^2}{2\\sigma^2}\\right),
              \\quad \\sigma = \\frac{\\mathrm{FWHM}}{2\\sqrt{2\\ln 2}}
    """
    _validate_shape(fwhm, ratio, angle, size)
    sigma = fwhm / (2 * math.sqrt(2 * math.log(2)))
    if size is None:
        size = _auto_size(sigma * math.sqrt(-2 * math.log(_TAIL)))
    r2 = _elliptical_radius2(int(size), ratio, angle)
    return _finish(np.exp(-r2 / (2 * sigma**2)))


def moffat(
    fwhm: float,
    beta: float = 2.5,
    *,
    size: int | None = None,
    ratio: float = 1.0,
    angle: float = 0.0,
):
    """A Moffat PSF (Moffat 1969), the usual model of seeing-limited stars.

    Parameters
    ----------
    fwhm : float
        Full width at half maximum along the major axis, in pixels.
    beta : float
        Wing exponent, > 1; small values have strong wings (2 to 5 is typical, 4.765 matches
        Kolmogorov turbulence).
    size : odd int, optional
        Side of the square array; by default wide enough to hold the profile down to 1e-3 of its
        peak.
    ratio : float in (0, 1]
        Minor over major FWHM (1 is round).
    angle : float
        Direction of the major axis in degrees from +x (columns) towards +y (rows).

    Returns
    -------
    psf : (size, size) ndarray of float32
        Normalized to sum 1, pixel-integrated, centred on the middle pixel.

    Notes
    -----
    .. math:: h(r) \\propto \\left(1 + \\frac{r^2}{\\alpha^2}\\right)^{-\\beta},
              \\quad \\alpha = \\frac{\\mathrm{FWHM}}{2\\sqrt{2^{1/\\beta} - 1}}

    References
    ----------
    .. [1] Moffat, A. F. J. (1969), "A theoretical investigation of focal stellar images in the
           photographic emulsion", A&A 3, 455.
    """
    _validate_shape(fwhm, ratio, angle, size)
    if not (np.isfinite(beta) and beta > 1):
        msg = f"beta must be greater than 1, got {beta!r}; typical values are 2 to 5"
        raise GpudeconvError(msg)
    alpha = fwhm / (2 * math.sqrt(2 ** (1 / beta) - 1))
    if size is None:
        size = _auto_size(alpha * math.sqrt(_TAIL ** (-1 / beta) - 1))
    r2 = _elliptical_radius2(int(size), ratio, angle)
    return _finish((1 + r2 / alpha**2) ** (-beta))
