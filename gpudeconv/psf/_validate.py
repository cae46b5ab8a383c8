"""Checks on PSF arrays given by users (files or arrays), done once at the boundary."""

from __future__ import annotations

import operator
import warnings

import numpy as np

from .._errors import GpudeconvError, GpudeconvWarning

__all__ = ["validate_odd_size", "validate_psf"]


def validate_psf(
    psf, *, name: str = "psf", channels: int | None = None, warn_sum: bool = True
) -> np.ndarray:
    """Check a PSF array and return it normalized to sum 1 (each plane), as float64 NumPy.

    Parameters
    ----------
    psf : (k, k) or (C, k, k) array_like
        Odd sides, finite, non-negative, with light in it. ``(C, k, k)`` gives one PSF per
        channel and needs ``channels == C``.
    name : str
        How the PSF is named in messages (e.g. the file it came from).
    channels : int, optional
        Channels of the image it will deconvolve (None for a grey image).
    warn_sum : bool
        Warn when the PSF sums far from 1 (an array passed in code); a PSF image read from a
        file is a star cut-out in data units and is normalized without a word.
    """
    array = np.asarray(psf)
    if array.dtype.kind not in "uif":
        msg = f"{name} must hold real numbers, got dtype {array.dtype}"
        raise GpudeconvError(msg)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim not in (2, 3):
        msg = f"{name} must be a 2-D array (or one 2-D PSF per channel), got shape {array.shape}"
        raise GpudeconvError(msg)
    if array.ndim == 3 and array.shape[0] != channels:
        msg = (
            f"{name} holds {array.shape[0]} PSFs but the image has "
            f"{channels or 1} channel(s); give one PSF, or one per channel"
        )
        raise GpudeconvError(msg)
    ky, kx = array.shape[-2:]
    if ky % 2 == 0 or kx % 2 == 0:
        msg = (
            f"{name} has shape {ky}x{kx}; its sides must be odd so that it has a centre pixel: "
            "crop or pad it by one row/column"
        )
        raise GpudeconvError(msg)
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        msg = f"{name} contains NaN or infinite values; fix or re-measure the PSF"
        raise GpudeconvError(msg)
    if (array < 0).any():
        msg = (
            f"{name} has negative values (minimum {array.min():.3g}); a PSF is a distribution of "
            "light: subtract its background and clip it at 0"
        )
        raise GpudeconvError(msg)
    sums = array.sum(axis=(-2, -1), keepdims=True)
    if (sums <= 0).any():
        msg = f"{name} is all zeros; give a PSF with light in it"
        raise GpudeconvError(msg)
    if warn_sum and ((sums < 0.5) | (sums > 2.0)).any():
        warnings.warn(
            f"{name} sums to {float(sums.ravel()[0]):.4g}, not 1; it is normalized to sum 1",
            GpudeconvWarning,
            stacklevel=3,
        )
    return array / sums


def validate_odd_size(size, *, minimum: int = 1) -> int:
    """A PSF side given by a user: an odd integer (not a bool, not a float) of at least
    ``minimum``, as int; ``GpudeconvError`` otherwise."""
    try:
        k = operator.index(size)
    except TypeError:
        k = None
    if k is None or isinstance(size, bool) or k < minimum or k % 2 == 0:
        what = "a positive odd integer" if minimum <= 1 else f"an odd integer of at least {minimum}"
        msg = f"size must be {what}, got {size!r}; e.g. 25"
        raise GpudeconvError(msg)
    return int(k)
