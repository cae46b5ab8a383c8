"""Star fields with a known PSF, for the tests of PSF estimation (``gpudeconv.psf.estimate``).

Written on purpose without gpudeconv's PSF code: each star is the analytic elliptical Moffat or
Gaussian profile integrated over every pixel on a ``SUBSAMPLE x SUBSAMPLE`` sub-grid at the star's
own sub-pixel position, and the true PSF for comparison is rendered by the same function,
centred. A scene holds what makes real frames hard: sky and a smooth nebula, Poisson and read
noise, hot pixels and two-pixel cosmic-ray streaks, stars clipped at a saturation level, a close
pair, stars cut by the border and a strip of no-data (NaN), stars over four decades of flux.

Conventions (those of the package): ``x`` is the column, ``y`` the row, pixel centres at
integers; ``fwhm`` is the major-axis FWHM in pixels, ``ratio`` minor over major, ``angle`` the
direction of the major axis in degrees from +x towards +y.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

#: Sub-samples per pixel side when integrating a profile over a pixel.
SUBSAMPLE = 7


def profile(dx, dy, *, fwhm: float, ratio: float, angle: float, beta: float | None):
    """The continuous profile at offsets ``(dx, dy)`` from its centre, 1 at the peak.

    A Moffat profile ``(1 + r^2 / alpha^2)^-beta`` for a finite ``beta``, a Gaussian for ``None``;
    ``r`` is the elliptical radius in units of the major axis.
    """
    theta = math.radians(angle)
    major = dx * math.cos(theta) + dy * math.sin(theta)
    minor = -dx * math.sin(theta) + dy * math.cos(theta)
    r2 = major**2 + (minor / ratio) ** 2
    if beta is None:
        sigma = fwhm / (2 * math.sqrt(2 * math.log(2)))
        return np.exp(-r2 / (2 * sigma**2))
    alpha = fwhm / (2 * math.sqrt(2 ** (1 / beta) - 1))
    return (1 + r2 / alpha**2) ** (-beta)


def profile_integral(*, fwhm: float, ratio: float, beta: float | None, **_) -> float:
    """Integral of `profile` over the plane (its flux for a peak of 1)."""
    if beta is None:
        sigma = fwhm / (2 * math.sqrt(2 * math.log(2)))
        return 2 * math.pi * sigma**2 * ratio
    alpha = fwhm / (2 * math.sqrt(2 ** (1 / beta) - 1))
    return math.pi * alpha**2 * ratio / (beta - 1)


def pixel_integrated(offset_x: float, offset_y: float, half: int, params: dict, sub=SUBSAMPLE):
    """A ``(2 half + 1)^2`` stamp of the profile integrated over each pixel, flux 1 on the plane.

    The profile's centre lies ``(offset_x, offset_y)`` from the stamp's centre pixel; light beyond
    the stamp is lost (the stamp does not sum to 1), as it would be off a real detector.
    """
    sub_offsets = (np.arange(sub) + 0.5) / sub - 0.5
    pixels = np.arange(-half, half + 1, dtype=np.float64)
    xs = (pixels[:, None] + sub_offsets[None, :]).ravel() - offset_x
    ys = (pixels[:, None] + sub_offsets[None, :]).ravel() - offset_y
    values = profile(xs[None, :], ys[:, None], **params)
    n = 2 * half + 1
    values = values.reshape(n, sub, n, sub).mean(axis=(1, 3))
    return values / profile_integral(**params)


def true_psf(params: dict, size: int = 15) -> np.ndarray:
    """The PSF a star centred on a pixel makes, ``size x size``, normalized to sum 1."""
    psf = pixel_integrated(0.0, 0.0, size // 2, params)
    return psf / psf.sum()


def relative_l2(psf, truth, size: int = 15) -> float:
    """``||p - t|| / ||t||`` over the central ``size x size`` core, both normalized there."""

    def core(array):
        array = np.asarray(array, dtype=np.float64)
        if array.shape[0] < size:  # a small PSF: zeros around it
            pad = (size - array.shape[0] + 1) // 2
            array = np.pad(array, pad)
        c = array.shape[0] // 2
        h = size // 2
        array = array[c - h : c + h + 1, c - h : c + h + 1]
        return array / array.sum()

    p, t = core(psf), core(truth)
    return float(np.linalg.norm(p - t) / np.linalg.norm(t))


def _stamp_half(params: dict, peak: float, *, floor: float = 0.3, cap: int = 80) -> int:
    """Half-side of a stamp that holds the star until its profile falls below ``floor`` e-."""
    if peak <= floor:
        return 4
    fwhm, beta = params["fwhm"], params["beta"]
    if beta is None:
        sigma = fwhm / (2 * math.sqrt(2 * math.log(2)))
        radius = sigma * math.sqrt(2 * math.log(peak / floor))
    else:
        alpha = fwhm / (2 * math.sqrt(2 ** (1 / beta) - 1))
        radius = alpha * math.sqrt((peak / floor) ** (1 / beta) - 1)
    return int(min(cap, max(4, math.ceil(radius))))


@dataclass
class Scene:
    """A synthetic frame and everything planted in it."""

    image: np.ndarray  #: (H, W) float32, electrons; NaN where there are no data
    psf_at: Callable[[float, float], dict]  #: true PSF parameters at (y, x)
    stars: dict  #: arrays x, y, flux of every star rendered
    saturation: float
    sky: float
    hot: list = field(default_factory=list)  #: (x, y) of each hot pixel or streak start
    saturated: list = field(default_factory=list)  #: (x, y) of the stars planted to clip
    pair: list = field(default_factory=list)  #: (x, y) of the two stars of the close pair
    border: list = field(default_factory=list)  #: (x, y) of stars cut by the border or NaN
    nan_columns: int = 0  #: width of the NaN strip along the right edge

    def true_psf(self, y: float, x: float, size: int = 15) -> np.ndarray:
        return true_psf(self.psf_at(y, x), size)


def constant_psf(**params) -> Callable[[float, float], dict]:
    """``psf_at`` for one PSF everywhere (``fwhm``, ``ratio``, ``angle``, ``beta``)."""
    params = {"ratio": 1.0, "angle": 0.0, "beta": None} | params
    return lambda y, x: dict(params)


def varying_psf(
    shape, *, fwhm_centre: float, fwhm_corner: float, e_corner: float, beta: float | None
) -> Callable[[float, float], dict]:
    """A PSF that widens and stretches radially towards the corners, smoothly.

    With ``u, v`` the column and row offsets from the centre in units of the half-diagonal
    (``rho^2 = u^2 + v^2`` is 1 at the corners): ``FWHM = f_c + (f_k - f_c) rho^2`` (field
    curvature) and the ellipticity ``(e1, e2) = e_k (u^2 - v^2, 2 u v)``, i.e. ``|e| = e_k rho^2``
    along the radius (astigmatism); ``ratio = (1 - |e|) / (1 + |e|)``.
    """
    height, width = shape
    yc, xc = (height - 1) / 2, (width - 1) / 2
    scale = math.hypot(yc, xc)

    def psf_at(y: float, x: float) -> dict:
        u, v = (x - xc) / scale, (y - yc) / scale
        rho2 = u * u + v * v
        e1, e2 = e_corner * (u * u - v * v), e_corner * 2 * u * v
        e = math.hypot(e1, e2)
        return {
            "fwhm": fwhm_centre + (fwhm_corner - fwhm_centre) * rho2,
            "ratio": (1 - e) / (1 + e),
            "angle": math.degrees(0.5 * math.atan2(e2, e1)) % 180,
            "beta": beta,
        }

    return psf_at


def make_scene(
    shape=(1024, 1024),
    psf_at: Callable[[float, float], dict] | None = None,
    *,
    n_stars: int = 450,
    flux_range=(2.5e3, 6e5),
    sky: float = 800.0,
    nebula: float = 400.0,
    read_noise: float = 6.0,
    n_hot: int = 50,
    n_saturated: int = 4,
    saturation: float = 60000.0,
    pair: bool = True,
    n_border: int = 8,
    nan_columns: int = 12,
    subsample: int = SUBSAMPLE,
    seed: int = 1,
) -> Scene:
    """A star field with known PSF and planted defects (see the module docstring).

    Fluxes are log-uniform over ``flux_range`` (electrons); with the defaults and a FWHM of
    3.5 px the faintest stars peak near 5 sigma of the sky noise and the brightest near 3/4 of
    ``saturation``. The ``n_saturated`` planted stars are 20x brighter than that and clip.
    """
    rng = np.random.default_rng(seed)
    height, width = shape
    psf_at = psf_at or constant_psf(fwhm=3.5, beta=3.0, ratio=0.8, angle=30.0)
    usable_width = width - nan_columns

    xs = list(rng.uniform(20, usable_width - 21, n_stars))
    ys = list(rng.uniform(20, height - 21, n_stars))
    lo, hi = np.log10(flux_range[0]), np.log10(flux_range[1])
    fluxes = list(10 ** rng.uniform(lo, hi, n_stars))

    def far_from_stars(x, y, distance):
        d2 = (np.asarray(xs) - x) ** 2 + (np.asarray(ys) - y) ** 2
        return bool((d2 > distance**2).all())

    def clean_spot(distance, margin=40):
        """A place at least ``distance`` from every star so far (less in a crowded frame)."""
        for attempt in range(100000):
            x = rng.uniform(margin, usable_width - margin)
            y = rng.uniform(margin, height - margin)
            if far_from_stars(x, y, distance * 0.9 ** (attempt // 500)):
                return x, y
        raise RuntimeError("no room left in the scene")

    saturated = []
    for _ in range(n_saturated):
        x, y = clean_spot(40)
        saturated.append((x, y))
        xs.append(x), ys.append(y), fluxes.append(20 * flux_range[1])
    pair_positions = []
    if pair:
        x, y = clean_spot(40)
        for dx, flux in ((-2.6, 0.4 * flux_range[1]), (2.6, 0.25 * flux_range[1])):
            pair_positions.append((x + dx, y + 0.7))
            xs.append(x + dx), ys.append(y + 0.7), fluxes.append(flux)
    border = []
    for i in range(n_border):
        flux = 0.3 * flux_range[1]
        if i % 2 == 0:  # cut by the top or bottom edge
            x = rng.uniform(60, usable_width - 60)
            y = rng.uniform(-1.5, 2.5) if i % 4 == 0 else height - 1 - rng.uniform(-1.5, 2.5)
        else:  # cut by the left edge or touching the NaN strip
            y = rng.uniform(60, height - 60)
            x = rng.uniform(-1.5, 2.5) if i % 4 == 1 else usable_width - 1 - rng.uniform(0, 3)
        border.append((x, y))
        xs.append(x), ys.append(y), fluxes.append(flux)

    signal = np.full(shape, sky, dtype=np.float64)
    if nebula:
        yy, xx = np.mgrid[0:height, 0:width]
        for cy, cx, s, a in ((0.35, 0.4, 0.18, 1.0), (0.7, 0.65, 0.1, 0.6)):
            r2 = ((yy - cy * height) ** 2 + (xx - cx * width) ** 2) / (s * max(shape)) ** 2
            signal += a * nebula * np.exp(-r2 / 2)
    for x, y, flux in zip(xs, ys, fluxes, strict=True):
        params = psf_at(y, x)
        peak = flux / profile_integral(**params)
        half = _stamp_half(params, peak)
        col, row = int(round(x)), int(round(y))
        stamp = flux * pixel_integrated(x - col, y - row, half, params, subsample)
        r0, c0 = row - half, col - half
        r1, c1 = max(r0, 0), max(c0, 0)
        r2_, c2 = min(row + half + 1, height), min(col + half + 1, width)
        if r1 < r2_ and c1 < c2:
            signal[r1:r2_, c1:c2] += stamp[r1 - r0 : r2_ - r0, c1 - c0 : c2 - c0]

    image = rng.poisson(signal).astype(np.float64)
    image += rng.normal(0.0, read_noise, shape)
    hot = []
    while len(hot) < n_hot:
        x, y = clean_spot(12, margin=25)
        col, row = int(x), int(y)
        amplitude = rng.uniform(3e3, 3e4)
        image[row, col] += amplitude
        if len(hot) % 3 == 2:  # a two-pixel cosmic-ray streak
            dr, dc = ((0, 1), (1, 0), (1, 1))[len(hot) % 9 // 3]
            image[row + dr, col + dc] += amplitude * rng.uniform(0.5, 1.0)
        hot.append((float(col), float(row)))
    np.minimum(image, saturation, out=image)
    if nan_columns:
        image[:, width - nan_columns :] = np.nan
    return Scene(
        image=image.astype(np.float32),
        psf_at=psf_at,
        stars={"x": np.asarray(xs), "y": np.asarray(ys), "flux": np.asarray(fluxes)},
        saturation=saturation,
        sky=sky,
        hot=hot,
        saturated=saturated,
        pair=pair_positions,
        border=border,
        nan_columns=nan_columns,
    )
