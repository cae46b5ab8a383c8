"""Synthetic deep-sky scenes with a known truth, for the demo, the tests and the benchmarks.

A scene is an ideal sky (point-like stars, small Sersic galaxies, faint nebulosity) blurred by
a known PSF and recorded with photon and read noise, as a stacked astrophoto would be. It is
made with NumPy and SciPy only (``scipy.signal.oaconvolve``), never with gpudeconv's own
operators, so that tests built on it check the engine against an independent forward model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from astropy.table import Table, vstack
from scipy import ndimage, signal

from ._errors import GpudeconvError
from .psf import moffat

__all__ = ["Scene", "make_scene", "DEFAULT_PSF_FWHM", "DEFAULT_PSF_BETA"]

#: The default PSF: seeing of 4 pixels FWHM with moderate Moffat wings.
DEFAULT_PSF_FWHM = 4.0
DEFAULT_PSF_BETA = 3.0

#: Stars per pixel by default (about 1 per 40x40 pixels: a rich but not crowded field).
_STAR_DENSITY = 1 / 1600
#: The faintest star's flux, in units of the per-pixel sky noise; it peaks near 1 sigma.
_FAINTEST_IN_SIGMA = 25.0
#: Brightest / faintest star flux (3.5 decades, about 9 magnitudes).
_FLUX_RANGE = 10**3.5
#: Cumulative counts N(>F) ~ F**-0.75: the slope of star counts, dN/dm ~ 10**(0.3 m).
_COUNT_SLOPE = 0.75
#: Stars keep this far (pixels) from the frame's edges.
_STAR_MARGIN = 3
#: Galaxies per pixel by default, at least one per scene.
_GALAXY_DENSITY = 1 / 90_000
#: Members of each star cluster, and the Gaussian sigma (pixels) of their spread.
_CLUSTER_MEMBERS = 60
_CLUSTER_RADIUS = 14.0


@dataclass(frozen=True)
class Scene:
    """A synthetic scene and what it was made from.

    Attributes
    ----------
    truth : (H, W) ndarray
        The ideal sky without background: stars as single-point sources (each one's flux split
        bilinearly over its 4 nearest pixels), galaxies and nebulosity.
    observed : (H, W) ndarray
        ``truth`` blurred by ``psf``, plus ``sky``, with Poisson and read noise, clipped at
        ``saturation`` (if given) and NaN on a border of ``nan_border`` pixels (if any).
    psf : (k, k) ndarray of float32
        The PSF used for the blur (sum 1).
    stars : astropy.table.Table
        Columns ``x`` (column), ``y`` (row), both 0-based pixel centres, and ``flux`` (total ADU),
        brightest first; cluster members included.
    galaxies : astropy.table.Table
        Columns ``x``, ``y``, ``flux``, ``r_eff`` (pixels), ``n`` (Sersic index), ``ratio``
        (minor/major axis) and ``angle`` (degrees from +x towards +y).
    clusters : astropy.table.Table
        Columns ``x``, ``y`` (centre) and ``radius`` (Gaussian sigma of the members' spread).
    sky : float
        The background level (ADU per pixel) added to the blurred scene.
    noise_sigma : float
        Noise of a background pixel (ADU): photon noise of the sky plus read noise.
    saturation : float or None
        The level at which ``observed`` was clipped.
    """

    truth: np.ndarray
    observed: np.ndarray
    psf: np.ndarray
    stars: Table
    galaxies: Table
    clusters: Table
    sky: float
    noise_sigma: float
    saturation: float | None


def _validate_scene_options(
    shape, n_stars, clusters, sky, read_noise, gain, saturation, nan_border, dtype
):
    if len(shape) != 2 or min(shape) < 32 or any(int(s) != s for s in shape):
        msg = f"shape must be two integers of at least 32 pixels, got {shape!r}; e.g. (512, 512)"
        raise GpudeconvError(msg)
    if n_stars is not None and (int(n_stars) != n_stars or n_stars < 0):
        msg = f"n_stars must be a non-negative integer or None (automatic), got {n_stars!r}"
        raise GpudeconvError(msg)
    if int(clusters) != clusters or clusters < 0:
        msg = f"clusters must be a non-negative integer, got {clusters!r}; e.g. 1"
        raise GpudeconvError(msg)
    if not (np.isfinite(sky) and sky >= 0):
        msg = f"sky must be a non-negative level in ADU, got {sky!r}; e.g. 100"
        raise GpudeconvError(msg)
    if not (np.isfinite(read_noise) and read_noise >= 0):
        msg = f"read_noise must be a non-negative number of electrons, got {read_noise!r}; e.g. 5"
        raise GpudeconvError(msg)
    if not (np.isfinite(gain) and gain > 0):
        msg = f"gain must be a positive number of electrons per ADU, got {gain!r}; e.g. 1"
        raise GpudeconvError(msg)
    if saturation is not None and not (np.isfinite(saturation) and saturation > sky):
        msg = f"saturation must be above the sky level ({sky}) or None, got {saturation!r}"
        raise GpudeconvError(msg)
    if int(nan_border) != nan_border or nan_border < 0 or 2 * nan_border >= min(shape):
        msg = (
            f"nan_border must be a non-negative number of pixels, less than half the smallest "
            f"side {min(shape)}, got {nan_border!r}"
        )
        raise GpudeconvError(msg)
    if np.dtype(dtype).kind != "f":
        msg = f"dtype must be a floating type (float32 or float64), got {np.dtype(dtype)}"
        raise GpudeconvError(msg)


def make_scene(
    shape: tuple[int, int] = (512, 512),
    *,
    psf: np.ndarray | None = None,
    seed: int = 0,
    n_stars: int | None = None,
    sky: float = 100.0,
    read_noise: float = 5.0,
    gain: float = 1.0,
    saturation: float | None = None,
    galaxies: bool = True,
    nebula: bool = True,
    clusters: int = 0,
    nan_border: int = 0,
    dtype=np.float32,
) -> Scene:
    """Make a deep-sky scene: stars, galaxies and nebulosity, blurred and noisy.

    Parameters
    ----------
    shape : (int, int)
        Rows and columns.
    psf : (k, k) array_like, optional
        The blur, odd sides; by default ``moffat(4.0, beta=3.0)``. Normalized to sum 1.
    seed : int
        Seed of the random generator: the same seed and options give the same scene.
    n_stars : int, optional
        Number of stars; by default one per 1600 pixels.
    sky : float
        Background level in ADU.
    read_noise : float
        Read noise in electrons (RMS per pixel).
    gain : float
        Electrons per ADU. Photon noise is Poisson in electrons, so a larger gain means less
        relative noise: a stack of N frames behaves like one frame with N times the gain.
    saturation : float, optional
        Clip ``observed`` at this level (ADU), as a sensor's full well would.
    galaxies, nebula : bool
        Add a few small elliptical galaxies; add faint diffuse nebulosity.
    clusters : int
        Number of compact star clusters to add (each of 60 stars, brighter than the field on
        average, spread as a Gaussian of sigma 14 pixels), on top of ``n_stars``.
    nan_border : int
        Width in pixels of a NaN border around ``observed`` (as left by stacking and cropping
        of dithered frames).
    dtype : {float32, float64}
        Type of ``truth`` and ``observed``.

    Returns
    -------
    Scene

    Notes
    -----
    Star fluxes follow a truncated power law, :math:`N(>F) \\propto F^{-0.75}`, from about
    :math:`25\\,\\sigma` (stars that peak near the noise) up to 3.5 decades brighter. Positions
    are uniform, at least 3 pixels from the edges. The blur is computed on the scene mirrored
    at its edges, so stars near the edges keep their light, and noise is

    .. math:: d = \\frac{\\mathrm{Poisson}(g\\,(h * t + s))}{g} + \\mathcal{N}(0, r/g)

    with :math:`g` the gain, :math:`s` the sky and :math:`r` the read noise.
    """
    _validate_scene_options(
        shape, n_stars, clusters, sky, read_noise, gain, saturation, nan_border, dtype
    )
    height, width = (int(s) for s in shape)
    if psf is None:
        psf = moffat(DEFAULT_PSF_FWHM, beta=DEFAULT_PSF_BETA)
    psf = np.asarray(psf, dtype=np.float64)
    if psf.ndim != 2 or psf.shape[0] % 2 == 0 or psf.shape[1] % 2 == 0 or psf.sum() <= 0:
        msg = f"psf must be a 2-D array with odd sides and light in it, got shape {psf.shape}"
        raise GpudeconvError(msg)
    psf = psf / psf.sum()

    rng = np.random.default_rng(seed)
    noise_sigma = math.sqrt(sky * gain + read_noise**2) / gain
    faintest = _FAINTEST_IN_SIGMA * max(noise_sigma, 1.0)
    if n_stars is None:
        n_stars = max(1, round(height * width * _STAR_DENSITY))

    truth = np.zeros((height, width), dtype=np.float64)
    stars = _star_table(rng, int(n_stars), height, width, faintest)
    cluster_table = _cluster_table(rng, int(clusters), height, width)
    if len(cluster_table):
        members = [_cluster_members(rng, row, height, width, faintest) for row in cluster_table]
        stars = _brightest_first(vstack([stars, *members]))
    _deposit_points(truth, stars["x"], stars["y"], stars["flux"])
    galaxy_table = _galaxy_table(rng, height, width, faintest, enabled=galaxies)
    for row in galaxy_table:
        _add_sersic(truth, row)
    if nebula:
        truth += _nebula(rng, height, width, level=3.0 * noise_sigma)

    blurred = _blur(truth, psf) + sky
    # Round-off of the FFT leaves values of order -1e-12 where the scene is empty.
    np.clip(blurred, 0.0, None, out=blurred)
    observed = rng.poisson(blurred * gain) / gain
    if read_noise > 0:
        observed += rng.normal(0.0, read_noise / gain, size=observed.shape)
    if saturation is not None:
        np.minimum(observed, saturation, out=observed)
    observed = observed.astype(dtype)
    if nan_border:
        observed[:nan_border] = np.nan
        observed[-nan_border:] = np.nan
        observed[:, :nan_border] = np.nan
        observed[:, -nan_border:] = np.nan
    return Scene(
        truth=truth.astype(dtype),
        observed=observed,
        psf=psf.astype(np.float32),
        stars=stars,
        galaxies=galaxy_table,
        clusters=cluster_table,
        sky=float(sky),
        noise_sigma=float(noise_sigma),
        saturation=None if saturation is None else float(saturation),
    )


def _star_table(rng, n_stars: int, height: int, width: int, faintest: float) -> Table:
    """Uniform positions and power-law fluxes, brightest first."""
    flux = _power_law_fluxes(rng, n_stars, faintest)
    x = rng.uniform(_STAR_MARGIN, width - 1 - _STAR_MARGIN, size=n_stars)
    y = rng.uniform(_STAR_MARGIN, height - 1 - _STAR_MARGIN, size=n_stars)
    return _brightest_first(Table({"x": x, "y": y, "flux": flux}))


def _power_law_fluxes(rng, count: int, faintest: float) -> np.ndarray:
    # Inverse CDF of N(>F) ~ F**-a truncated to [faintest, faintest * _FLUX_RANGE].
    u = rng.uniform(_FLUX_RANGE ** (-_COUNT_SLOPE), 1.0, size=count)
    return faintest * u ** (-1 / _COUNT_SLOPE)


def _brightest_first(stars: Table) -> Table:
    return stars[np.argsort(-np.asarray(stars["flux"]), kind="stable")]


def _cluster_table(rng, count: int, height: int, width: int) -> Table:
    radius = np.full(count, min(_CLUSTER_RADIUS, min(height, width) / 10))
    margin = 4 * radius
    return Table(
        {
            "x": margin + rng.uniform(0, 1, size=count) * (width - 1 - 2 * margin),
            "y": margin + rng.uniform(0, 1, size=count) * (height - 1 - 2 * margin),
            "radius": radius,
        }
    )


def _cluster_members(rng, cluster, height: int, width: int, faintest: float) -> Table:
    """Members spread as a 2-D Gaussian around the centre, kept inside the star margin."""
    x = rng.normal(float(cluster["x"]), float(cluster["radius"]), size=_CLUSTER_MEMBERS)
    y = rng.normal(float(cluster["y"]), float(cluster["radius"]), size=_CLUSTER_MEMBERS)
    x = np.clip(x, _STAR_MARGIN, width - 1 - _STAR_MARGIN)
    y = np.clip(y, _STAR_MARGIN, height - 1 - _STAR_MARGIN)
    flux = _power_law_fluxes(rng, _CLUSTER_MEMBERS, 2 * faintest)
    return Table({"x": x, "y": y, "flux": flux})


def _deposit_points(image: np.ndarray, x, y, flux) -> None:
    """Add point sources, each one's flux split bilinearly over its 4 nearest pixels."""
    x = np.asarray(x)
    y = np.asarray(y)
    flux = np.asarray(flux)
    x0 = np.floor(x).astype(np.intp)
    y0 = np.floor(y).astype(np.intp)
    fx = x - x0
    fy = y - y0
    height, width = image.shape
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            rows = np.clip(y0 + dy, 0, height - 1)
            cols = np.clip(x0 + dx, 0, width - 1)
            np.add.at(image, (rows, cols), flux * wy * wx)


def _galaxy_table(rng, height: int, width: int, faintest: float, *, enabled: bool) -> Table:
    """A few small galaxies: exponential discs to de Vaucouleurs bulges, brightish."""
    count = max(1, round(height * width * _GALAXY_DENSITY)) if enabled else 0
    r_eff = rng.uniform(2.5, 7.0, size=count)
    margin = 6 * r_eff
    return Table(
        {
            "x": margin + rng.uniform(0, 1, size=count) * (width - 1 - 2 * margin),
            "y": margin + rng.uniform(0, 1, size=count) * (height - 1 - 2 * margin),
            "flux": faintest * 10 ** rng.uniform(2.3, 3.0, size=count),
            "r_eff": r_eff,
            "n": rng.uniform(1.0, 4.0, size=count),
            "ratio": rng.uniform(0.35, 0.8, size=count),
            "angle": rng.uniform(0, 180, size=count),
        }
    )


def _add_sersic(image: np.ndarray, galaxy) -> None:
    """Add one elliptical Sersic profile, integrated over each pixel on a 3x3 sub-grid.

    The stamp reaches 8 effective radii, where the profile has fallen below 1e-3 of its
    central surface brightness for n <= 4, and is normalized so the galaxy holds ``flux``.
    """
    n = float(galaxy["n"])
    # Ciotti & Bertin (1999) asymptotic b_n, accurate to 1e-4 for n >= 0.5.
    b_n = 2 * n - 1 / 3 + 4 / (405 * n) + 46 / (25515 * n**2)
    half = min(math.ceil(8 * float(galaxy["r_eff"])), 120)
    xc, yc = float(galaxy["x"]), float(galaxy["y"])
    cols = np.arange(math.floor(xc) - half, math.floor(xc) + half + 1)
    rows = np.arange(math.floor(yc) - half, math.floor(yc) + half + 1)
    cols = cols[(cols >= 0) & (cols < image.shape[1])]
    rows = rows[(rows >= 0) & (rows < image.shape[0])]
    sub = (np.arange(3) - 1) / 3
    yy = (rows[:, None] + sub[None, :]).reshape(-1)[:, None] - yc
    xx = (cols[:, None] + sub[None, :]).reshape(-1)[None, :] - xc
    theta = math.radians(float(galaxy["angle"]))
    major = xx * math.cos(theta) + yy * math.sin(theta)
    minor = -xx * math.sin(theta) + yy * math.cos(theta)
    radius = np.sqrt(major**2 + (minor / float(galaxy["ratio"])) ** 2) / float(galaxy["r_eff"])
    profile = np.exp(-b_n * (radius ** (1 / n) - 1))
    profile = profile.reshape(rows.size, 3, cols.size, 3).sum(axis=(1, 3))
    image[np.ix_(rows, cols)] += float(galaxy["flux"]) * profile / profile.sum()


def _nebula(rng, height: int, width: int, *, level: float) -> np.ndarray:
    """Smooth, patchy, filamentary emission peaking near ``level``, zero-floored.

    A few large anisotropic Gaussian clouds, modulated by smoothed noise: made on a grid 8
    times coarser and enlarged by cubic splines, so it costs little even for large frames.
    """
    coarse = (max(8, height // 8), max(8, width // 8))
    yy, xx = np.mgrid[0 : coarse[0], 0 : coarse[1]].astype(np.float64)
    clouds = np.zeros(coarse)
    for _ in range(3):
        yc, xc = rng.uniform(0, coarse[0]), rng.uniform(0, coarse[1])
        s_major = rng.uniform(0.15, 0.35) * max(coarse)
        s_minor = s_major * rng.uniform(0.3, 0.6)
        theta = rng.uniform(0, math.pi)
        major = (xx - xc) * math.cos(theta) + (yy - yc) * math.sin(theta)
        minor = -(xx - xc) * math.sin(theta) + (yy - yc) * math.cos(theta)
        r2 = (major / s_major) ** 2 + (minor / s_minor) ** 2
        clouds += rng.uniform(0.5, 1.0) * np.exp(-0.5 * r2)
    texture = ndimage.gaussian_filter(rng.normal(size=coarse), sigma=max(coarse) / 40, mode="wrap")
    texture = 1 + 1.5 * texture / texture.std()
    coarse_map = np.clip(clouds * texture, 0, None)
    zoom = (height / coarse[0], width / coarse[1])
    fine = ndimage.zoom(coarse_map, zoom, order=3, grid_mode=True, mode="grid-constant")
    fine = np.clip(fine[:height, :width], 0, None)
    peak = fine.max()
    return fine * (level / peak) if peak > 0 else fine


def _blur(truth: np.ndarray, psf: np.ndarray) -> np.ndarray:
    """Linear convolution of the scene mirrored at its edges, cropped back to the frame.

    Mirroring about the frame's edge (NumPy's ``'symmetric'``) sends back into the frame, for
    a PSF symmetric about its axes, exactly the light that leaves it: the blur conserves flux.
    """
    ry, rx = psf.shape[0] // 2, psf.shape[1] // 2
    padded = np.pad(truth, ((ry, ry), (rx, rx)), mode="symmetric")
    blurred = signal.oaconvolve(padded, psf, mode="same")
    return blurred[ry : ry + truth.shape[0], rx : rx + truth.shape[1]]
