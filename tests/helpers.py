"""Test data written here, independent of the package: realistic star fields, host copies."""

from __future__ import annotations

import numpy as np
import scipy.signal


def to_numpy(array) -> np.ndarray:
    """Host copy of a NumPy or CuPy array (tests compare on the host)."""
    from gpudeconv.backend import is_cupy_array

    return array.get() if is_cupy_array(array) else array


def star_field(shape=(160, 176), *, seed=0, n_stars=60, sky=50.0, fwhm=3.0, noise=True):
    """A float32 blurred star field with Poisson and read noise, written here, independent of
    the package: stars of fluxes spanning three decades on a sky, blurred by a Gaussian."""
    rng = np.random.default_rng(seed)
    truth = np.zeros(shape, dtype=np.float64)
    ys = rng.integers(4, shape[0] - 4, n_stars)
    xs = rng.integers(4, shape[1] - 4, n_stars)
    truth[ys, xs] += 10 ** rng.uniform(2, 5, n_stars)
    sigma = fwhm / 2.3548
    half = int(np.ceil(4 * sigma))
    grid = np.arange(-half, half + 1)
    kernel = np.exp(-(grid[:, None] ** 2 + grid[None, :] ** 2) / (2 * sigma**2))
    kernel /= kernel.sum()
    blurred = scipy.signal.fftconvolve(truth, kernel, mode="same") + sky
    if noise:
        blurred = rng.poisson(np.clip(blurred, 0, None)).astype(np.float64)
        blurred += rng.normal(0, 3.0, shape)
        blurred = np.clip(blurred, 0, None)  # a stacked, non-negative frame
    return blurred.astype(np.float32)


def reference_rl(observed, psf, iterations):
    """RL as the seed states it, in float64 with scipy.signal (no gpudeconv code): reflect-pad by
    the PSF radius, start from the observed image, u <- u * (h~ * (d / (h * u)))."""
    d = np.asarray(observed, dtype=np.float64)
    h = np.asarray(psf, dtype=np.float64)
    h = h / h.sum()
    ry, rx = h.shape[0] // 2, h.shape[1] // 2
    padded = np.pad(d, ((ry, ry), (rx, rx)), mode="reflect")
    u = padded.copy()
    for _ in range(iterations):
        blurred = scipy.signal.fftconvolve(u, h, mode="same")
        u = u * scipy.signal.fftconvolve(padded / blurred, h[::-1, ::-1], mode="same")
    return u[ry : ry + d.shape[0], rx : rx + d.shape[1]]
