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


def reference_rl(observed, psf, iterations, *, unobserved_ring=True):
    """RL as the seed states it, in float64 with scipy.signal (no gpudeconv code).

    Reflect-pad by the PSF radius and start from the observed image;
    u <- u * (h~ * (d / (h * u))). With ``unobserved_ring`` the estimate reaches one more PSF
    radius beyond the padded frame, with no data there (weight 0) and the update normalized by
    h~ * w (Bertero & Boccacci 2005, as gpudeconv does); without it, everything beyond the
    padded frame is zero (the plain scheme of the benchmark peers).
    """
    d = np.asarray(observed, dtype=np.float64)
    h = np.asarray(psf, dtype=np.float64)
    h = h / h.sum()
    ry, rx = h.shape[0] // 2, h.shape[1] // 2
    frame = ((ry, ry), (rx, rx))
    padded = np.pad(d, frame, mode="reflect")
    if unobserved_ring:
        weight = np.pad(np.ones_like(padded), frame)
        data = np.pad(padded, frame)
        u = np.pad(padded, frame, mode="edge")
    else:
        weight, data, u = np.ones_like(padded), padded, padded.copy()
    norm = scipy.signal.fftconvolve(weight, h[::-1, ::-1], mode="same")
    if not unobserved_ring:
        norm = np.ones_like(norm)  # the plain iteration: no normalization
    seen = norm > 1e-3
    for _ in range(iterations):
        blurred = scipy.signal.fftconvolve(u, h, mode="same")
        ratio = np.where(weight > 0, data / np.where(weight > 0, blurred, 1.0), 0.0)
        correction = scipy.signal.fftconvolve(ratio, h[::-1, ::-1], mode="same")
        u = np.where(seen, u * correction / np.where(seen, norm, 1.0), u)
    offset_y, offset_x = (2 * ry, 2 * rx) if unobserved_ring else (ry, rx)
    return u[offset_y : offset_y + d.shape[0], offset_x : offset_x + d.shape[1]]


def reference_regularized_rl(
    observed, psf, iterations, *, background, offset, gain, sigma, tv=0.0, damping=None
):
    """Noise-aware, TV-regularized or damped RL as the papers state it, in float64 with
    scipy.signal (no gpudeconv code), on the frame of `reference_rl` (reflect padding, an
    unobserved ring).

    Data term (Snyder et al. 1993): ``[d + offset]_+ ~ Poisson(g (h * u + background))`` with
    ``u >= 0`` the light above the known background plus the offset, started at
    ``max(d + offset - background, sigma / 10)``; the result is ``u - offset + background``.
    TV (Dey et al. 2006): the normalization ``h~ * w`` becomes
    ``h~ * w - tv div(grad u / |grad u|)`` (forward differences, gradient scale sigma / 10 or
    ``8 tv u`` at the gradient's pixel, whichever is larger), floored at half of itself.
    Damping (White 1994): the ratio is
    ``1 + U^(N-1) (N - (N-1) U) (d - m) / m`` where ``U < 1``, ``N = 10``, with
    ``U = g (p deviance(d, m) + (1 - p) (d - m)^2 / m) / damping^2`` and
    ``p = max(m - offset, 0) / m`` the Poisson share of the model's variance ``m / g`` (the
    offset's part is read or subtracted-sky noise, Gaussian): the deviance alone for offset 0.
    """
    d = np.asarray(observed, dtype=np.float64)
    h = np.asarray(psf, dtype=np.float64)
    h = h / h.sum()
    ry, rx = h.shape[0] // 2, h.shape[1] // 2
    frame = ((ry, ry), (rx, rx))
    padded = np.pad(np.maximum(d + offset, 0.0), frame, mode="reflect")
    weight = np.pad(np.ones_like(padded), frame)
    data = np.pad(padded, frame)
    start = np.pad(np.maximum(d + offset - background, sigma / 10), frame, mode="reflect")
    u = np.pad(start, frame, mode="edge")
    norm = scipy.signal.fftconvolve(weight, h[::-1, ::-1], mode="same")
    seen = norm > 1e-3
    shift = background
    epsilon = sigma / 10
    for _ in range(iterations):
        model = np.maximum(scipy.signal.fftconvolve(u, h, mode="same") + shift, 1e-12)
        ratio = data / model
        if damping is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                deviance = np.where(
                    data > 0, 2 * (data * np.log(data / model) - data + model), 2 * model
                )
            share = np.maximum(model - offset, 0.0) / model
            pearson = (data - model) ** 2 / model
            u_damp = gain * (share * deviance + (1 - share) * pearson) / damping**2
            power = 10.0
            soft = (
                1 + u_damp ** (power - 1) * (power - (power - 1) * u_damp) * (data - model) / model
            )
            ratio = np.where(u_damp < 1, soft, ratio)
        ratio *= weight
        correction = scipy.signal.fftconvolve(ratio, h[::-1, ::-1], mode="same")
        scale = norm
        if tv:
            gx = np.zeros_like(u)
            gy = np.zeros_like(u)
            gx[:, :-1] = u[:, 1:] - u[:, :-1]
            gy[:-1] = u[1:] - u[:-1]
            magnitude = np.sqrt(gx**2 + gy**2 + np.maximum(epsilon, 8 * tv * u) ** 2)
            nx, ny = gx / magnitude, gy / magnitude
            divergence = nx.copy()
            divergence[:, 1:] -= nx[:, :-1]
            divergence += ny
            divergence[1:] -= ny[:-1]
            scale = np.where(seen, np.maximum(norm - tv * divergence, 0.5 * norm), norm)
        u = np.where(seen, u * correction / np.where(seen, scale, 1.0), u)
    inner = u[2 * ry : 2 * ry + d.shape[0], 2 * rx : 2 * rx + d.shape[1]]
    return inner - offset + background
