"""The seeing blur of a starless image (a planet, the Moon) measured on its limb.

A planet's or the Moon's limb is a sharp edge before the atmosphere and the telescope blur it;
a Gaussian PSF of width ``sigma`` turns a sharp edge into an error function of the same
``sigma``. `limb_fwhm` finds the disc, samples intensity profiles across the limb along many
radii and fits each with such an edge; the robust median of the fitted widths is the blur.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, optimize, special

from .._errors import GpudeconvError

__all__ = ["LimbEstimate", "bright_region", "limb_fwhm", "noise_sigma", "otsu_threshold"]

#: FWHM of a Gaussian over its sigma, 2 sqrt(2 ln 2).
_FWHM_PER_SIGMA = 2 * math.sqrt(2 * math.log(2))
#: Variance (px^2) that integration over a square pixel adds to an edge's spread along any
#: direction: a pixel's projection is the sum of two uniform widths cos(t) and sin(t).
_PIXEL_VARIANCE = 1 / 12
#: Sampling step along each radial profile, pixels.
_STEP = 0.25
#: Smallest disc radius (px) whose limb is worth measuring.
_MIN_RADIUS = 8.0
#: A disc must stand this many noise sigmas above its surroundings.
_MIN_CONTRAST_SNR = 8.0


@dataclass(frozen=True)
class LimbEstimate:
    """The blur measured on a limb by `limb_fwhm`.

    Attributes
    ----------
    fwhm : float
        Gaussian-equivalent FWHM of the PSF in pixels, as `gpudeconv.psf.gaussian` takes it
        (pixel integration removed).
    sigma : float
        The Gaussian sigma, ``fwhm / 2.3548``, pixels.
    n_profiles : int
        Limb profiles whose fits entered the median.
    uncertainty : float
        Standard error of ``fwhm`` (pixels) from the scatter of the accepted profiles; it says
        nothing of the method's bias (see `limb_fwhm`, Notes).
    centre : (float, float)
        Row and column of the disc's centre (a circle fitted to the limb); may lie outside the
        frame when the disc does.
    radius : float
        Radius of that circle, pixels.
    n_angles : int
        Profiles sampled, accepted or not.
    angles : (n_profiles,) ndarray
        Direction of each accepted profile, degrees from +x (columns) towards +y (rows).
    sigmas : (n_profiles,) ndarray
        Gaussian sigma of each accepted profile (pixel integration removed), pixels.
    """

    fwhm: float
    sigma: float
    n_profiles: int
    uncertainty: float
    centre: tuple[float, float]
    radius: float
    n_angles: int
    angles: np.ndarray
    sigmas: np.ndarray

    def __str__(self) -> str:
        return (
            f"FWHM {self.fwhm:.2f} +/- {self.uncertainty:.2f} px (Gaussian-equivalent, from "
            f"{self.n_profiles} of {self.n_angles} limb profiles; disc radius {self.radius:.1f} px "
            f"at row {self.centre[0]:.1f}, column {self.centre[1]:.1f})"
        )


def _validate_image(image) -> np.ndarray:
    """A float64 2-D plane; colour (C, H, W) is summed over channels."""
    if hasattr(image, "get") and not isinstance(image, np.ndarray):
        image = image.get()  # a CuPy array: the fit runs on the host
    data = np.asarray(image)
    if data.dtype.kind not in "uif":
        msg = f"image must hold real numbers, got dtype {data.dtype}; give a grey or colour image"
        raise GpudeconvError(msg)
    if data.ndim == 3:
        data = data.astype(np.float64).sum(axis=0)
    if data.ndim != 2:
        msg = (
            f"image must be 2-D (H, W) or channel-first colour (C, H, W), got shape "
            f"{tuple(np.shape(image))}"
        )
        raise GpudeconvError(msg)
    if min(data.shape) < 4 * _MIN_RADIUS:
        msg = (
            f"image of shape {data.shape} is too small to hold a measurable limb: a disc of at "
            f"least {2 * _MIN_RADIUS:g} px across with some sky around it is needed"
        )
        raise GpudeconvError(msg)
    data = data.astype(np.float64)
    finite = np.isfinite(data)
    if not finite.all():
        if finite.sum() < 0.5 * data.size:
            msg = "more than half of the image is NaN or infinite: give an image of the disc"
            raise GpudeconvError(msg)
        data = np.where(finite, data, np.median(data[finite]))
    return data


def _validate_options(n_angles, max_fwhm) -> None:
    if n_angles is not None and (
        isinstance(n_angles, bool) or not isinstance(n_angles, (int, np.integer)) or n_angles < 8
    ):
        msg = f"n_angles must be an integer of at least 8, got {n_angles!r}; e.g. 180"
        raise GpudeconvError(msg)
    if max_fwhm is not None and not (
        isinstance(max_fwhm, (int, float, np.integer, np.floating))
        and math.isfinite(max_fwhm)
        and max_fwhm > 0
    ):
        msg = f"max_fwhm must be a positive number of pixels, got {max_fwhm!r}; e.g. 20"
        raise GpudeconvError(msg)


def limb_fwhm(
    image,
    *,
    n_angles: int | None = None,
    max_fwhm: float | None = None,
) -> LimbEstimate:
    """Estimate the blur of a planetary or lunar image from the edge spread across the limb.

    Parameters
    ----------
    image : (H, W) or (C, H, W) ndarray
        The image, linear (not stretched); colour channels are summed. The disc (or a part of
        it, with a stretch of limb against dark sky) must be the largest bright object.
        Non-finite pixels are replaced by the median.
    n_angles : int, optional
        Radial profiles sampled around the disc; by default about one per 3 px of
        circumference, from 36 to 360.
    max_fwhm : float, optional
        Largest FWHM (pixels) thought possible: it sets the width of the window each profile
        is fitted over, and wider fits are rejected. By default a tenth of the disc radius, at
        least 12 px.

    Returns
    -------
    LimbEstimate
        ``fwhm``, ``sigma``, ``n_profiles``, ``uncertainty``, ``centre``, ``radius`` and the
        accepted profiles' ``angles`` and ``sigmas``.

    Raises
    ------
    GpudeconvError
        If no disc stands clearly above the background, the disc is too small, or too few limb
        profiles give a clean edge (noise only, no limb in the frame, a frame filled by the disc).

    Notes
    -----
    The disc is the largest bright region (`bright_region`: cut a quarter of the way from the
    sky to the disc, as Otsu's method [1]_ separates them, on the lightly smoothed image,
    holes filled); a circle is fitted by least squares [2]_ to its boundary
    (pixels on the frame's edge left out, outliers such as a terminator rejected iteratively),
    so a disc cut by the frame is handled. Along each radius the image is interpolated (cubic
    spline) over a window across the limb, and fitted with the Gaussian blur of a limb, with
    :math:`z = (r_0 - r) / s`:

    .. math:: f(r) = b + (a - b)\\,\\Phi(z) + c\\,\\sqrt{s}\\,h(z),
              \\qquad h(z) = \\mathrm{E}\\left[\\sqrt{\\max(z + N, 0)}\\right]

    (:math:`\\Phi` and :math:`N` the standard normal CDF and variable): before the blur, sky
    :math:`b` beyond the edge :math:`r_0`, and inside :math:`a + c\\sqrt{r_0 - r}`. A step
    (:math:`c = 0`) blurred by a Gaussian of sigma :math:`s` is an error function of the same
    sigma; the square-root ramp is how a limb-darkened disc, :math:`I \\propto 1 - u(1 - \\mu)`,
    brightens inward near its limb (:math:`\\mu \\approx \\sqrt{2 d / R}` at depth :math:`d`),
    and :math:`h` is the parabolic cylinder function
    :math:`\\Gamma(3/2)\\,e^{-z^2/4} D_{-3/2}(-z) / \\sqrt{2\\pi}`. Without the ramp,
    a darkened limb reads as blur: a plain error-function fit measured FWHM 5.8 px on a disc
    with :math:`u = 0.6` blurred by FWHM 3 px. Both hold when the radius is many times
    :math:`s`. The fit is repeated on a window re-centred on each profile's edge and scaled to
    the first median width. A profile is rejected when the fit fails or finds no edge in its
    window (wider than ``max_fwhm``, or at the window's end), its contrast is under
    half the median (the terminator, a faint stretch of limb), its residual relative to its
    contrast is over 3 times the median (a moon, a ring, a band crossing) or its width is an
    outlier (3 robust sigmas). The pixel's own spread (variance 1/12 px²) is removed:
    :math:`\\sigma^2 = \\mathrm{median}(s)^2 - 1/12`, and FWHM :math:`= 2\\sqrt{2\\ln 2}\\,\\sigma`.

    Accuracy, measured on synthetic discs (radius 100 px, bands, blurred by a known Gaussian
    of FWHM 2 to 8 px, noise 0.3 % of the disc's level): within 1.2 % for uniform and
    limb-darkened (:math:`u \\le 0.6`) discs, within 3.5 % for a half or crescent phase and
    for a disc of radius 25 px or one cut by the frame; 5 % low at a noise of 10 %.
    ``uncertainty`` is the scatter's share only. Biases to keep in mind:

    - It measures a Gaussian-equivalent width. Seeing has broader wings: a limb blurred by a
      Moffat PSF of FWHM 3 px reads 3.5 px (beta 4.765) or 4.2 px (beta 2.5), so use the
      estimate with ``--psf-model gaussian``, or as the top of a Moffat range.
    - Limb darkening that departs from the square root near the limb, an atmosphere's haze
      (Mars, Venus, Titan) or a soft terminator left after rejection bias it high; wavelet or
      unsharp sharpening already applied biases it low. Measure the stack before sharpening.
    - Without a limb in the frame (a lunar close-up) it measures the sharpest disc-shaped
      edges it finds, crater rims: check that the reported centre and radius are the disc's.

    Use it as the centre of a sweep (``gpudeconv sweep --auto-fwhm``): the eye decides.

    References
    ----------
    .. [1] Otsu, N. (1979), "A threshold selection method from gray-level histograms",
           IEEE Trans. SMC 9, 62. :doi:`10.1109/TSMC.1979.4310076`
    .. [2] Kåsa, I. (1976), "A circle fitting procedure and its error analysis", IEEE Trans.
           Instrum. Meas. 25, 8. :doi:`10.1109/TIM.1976.6312298`
    """
    _validate_options(n_angles, max_fwhm)
    data = _validate_image(image)
    mask = _disc_mask(data)
    _check_contrast(data, mask)
    centre, radius = _fit_circle(mask)
    if n_angles is None:
        n_angles = int(np.clip(round(2 * math.pi * radius / 3), 36, 360))
    if max_fwhm is None:
        max_fwhm = max(12.0, 0.1 * radius)
    angles = np.linspace(0.0, 2 * math.pi, int(n_angles), endpoint=False)

    # First pass: a wide window centred on the circle; second: each profile re-centred on its
    # own edge (an oblate disc, an imperfect circle) over a window fitted to the blur found.
    half = min(2.0 * max_fwhm, 0.5 * radius)
    edges = np.full(angles.shape, radius)
    largest = max_fwhm / _FWHM_PER_SIGMA
    first = _fit_profiles(data, centre, angles, edges, half, guess=largest / 2, largest=largest)
    accepted = _accept(first)
    if accepted.sum() < _min_profiles(n_angles):
        raise _no_clean_limb(int(accepted.sum()), int(n_angles))
    width = float(np.median(first.sigma[accepted]))
    half = float(np.clip(6.0 * width, 4.0, half))
    edges = np.where(accepted, first.edge, radius + np.median(first.edge[accepted] - radius))
    second = _fit_profiles(data, centre, angles, edges, half, guess=width, largest=largest)
    accepted = _accept(second)
    n_good = int(accepted.sum())
    if n_good < _min_profiles(n_angles):
        raise _no_clean_limb(n_good, int(n_angles))

    edge_sigma = second.sigma[accepted]
    sigmas = np.sqrt(np.maximum(edge_sigma**2 - _PIXEL_VARIANCE, 0.0))
    sigma = float(np.median(sigmas))
    spread = 1.4826 * float(np.median(np.abs(sigmas - sigma)))
    # Standard error of a median: sqrt(pi / 2) times that of a mean.
    uncertainty = _FWHM_PER_SIGMA * math.sqrt(math.pi / 2) * spread / math.sqrt(n_good)
    return LimbEstimate(
        fwhm=_FWHM_PER_SIGMA * sigma,
        sigma=sigma,
        n_profiles=n_good,
        uncertainty=uncertainty,
        centre=(float(centre[0]), float(centre[1])),
        radius=float(radius),
        n_angles=int(n_angles),
        angles=np.degrees(angles[accepted]),
        sigmas=sigmas,
    )


# --- the disc -------------------------------------------------------------------------------


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values``: the level that maximizes the between-class variance.

    The method of ``skimage.filters.threshold_otsu`` (Otsu 1979), on a histogram that spans
    the 0.1 to 99.9 percentiles, so that a few hot pixels do not squeeze both classes into
    one bin.
    """
    low, high = np.percentile(values, [0.1, 99.9])
    if not high > low:
        return float(low)
    counts, edges = np.histogram(np.clip(values, low, high), bins=bins, range=(low, high))
    centres = 0.5 * (edges[:-1] + edges[1:])
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(counts * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_low = sum_low / weight_low
        mean_high = (sum_low[-1] - sum_low) / weight_high
        between = weight_low * weight_high * (mean_low - mean_high) ** 2
    between = np.nan_to_num(between, nan=-1.0)
    return float(centres[int(np.argmax(between))])


def bright_region(plane: np.ndarray) -> np.ndarray | None:
    """The largest connected bright region of ``plane`` (a planet's disc, the Moon), filled.

    Parameters
    ----------
    plane : (H, W) ndarray
        Finite values. It is lightly smoothed (sigma 1.5 px) so that noise does not fray the
        region's edge.

    Returns
    -------
    mask : (H, W) ndarray of bool, or None
        None when nothing stands above the rest.

    Notes
    -----
    Otsu's threshold (`otsu_threshold`) splits the pixels into sky and body; the region is
    cut a quarter of the way from the sky's median to the body's, lower than Otsu's level, so
    that dark belts reaching the limb and a darkened limb stay inside; holes (spots, craters,
    belts that do not reach the limb) are filled.
    """
    smooth = ndimage.gaussian_filter(np.asarray(plane, dtype=np.float64), 1.5)
    split = otsu_threshold(smooth)
    above = smooth > split
    if not above.any() or above.all():
        return None
    sky, body = float(np.median(smooth[~above])), float(np.median(smooth[above]))
    labels, _ = ndimage.label(smooth > sky + 0.25 * (body - sky))
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(labels == int(np.argmax(sizes)))


def _disc_mask(data: np.ndarray) -> np.ndarray:
    mask = bright_region(data)
    if mask is None:
        raise _no_disc("nothing stands above the background")
    if mask.sum() < math.pi * _MIN_RADIUS**2:
        raise _no_disc(f"the brightest region covers only {int(mask.sum())} px")
    if mask.mean() > 0.97:
        raise _no_disc("the bright region fills the frame, with no limb against the sky")
    return mask


def _check_contrast(data: np.ndarray, mask: np.ndarray) -> None:
    """A real disc stands many noise sigmas above the sky; a threshold of noise does not."""
    inside = float(np.median(data[mask]))
    outside = float(np.median(data[~mask]))
    noise = noise_sigma(data)
    if not inside - outside > _MIN_CONTRAST_SNR * noise:
        raise _no_disc(
            f"the bright region is only {(inside - outside) / max(noise, 1e-300):.1f} noise "
            f"sigmas above the rest (a disc needs {_MIN_CONTRAST_SNR:g})"
        )


def noise_sigma(plane: np.ndarray) -> float:
    """Robust standard deviation of the pixel noise of ``plane``, (H, W) and finite.

    The mask [[1, -2, 1], [-2, 4, -2], [1, -2, 1]] cancels planes and the smooth part of the
    image (Immerkær 1996, :doi:`10.1006/cviu.1996.0060`); its squared weights sum to 36. The
    median (1.4826 MAD) of the response, rather than its mean, ignores the few pixels on edges.
    """
    kernel = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float64)
    response = ndimage.convolve(np.asarray(plane, dtype=np.float64), kernel, mode="reflect")
    return 1.4826 * float(np.median(np.abs(response[1:-1, 1:-1]))) / 6.0


def _fit_circle(mask: np.ndarray) -> tuple[np.ndarray, float]:
    """(centre (row, column), radius) of the circle through the mask's boundary.

    Kåsa's algebraic fit, repeated after dropping points far from the circle (a terminator,
    a ring, a moon touching the disc). Boundary pixels on the frame's edge are no limb.
    """
    boundary = mask & ~ndimage.binary_erosion(mask)
    boundary[:2, :] = boundary[-2:, :] = False
    boundary[:, :2] = boundary[:, -2:] = False
    rows, columns = np.nonzero(boundary)
    points = np.column_stack([rows, columns]).astype(np.float64)
    if len(points) < 20:
        raise _no_disc("the bright region has no limb inside the frame")
    keep = np.ones(len(points), dtype=bool)
    for _ in range(8):
        centre, radius = _kasa(points[keep])
        distance = np.hypot(*(points - centre).T) - radius
        spread = 1.4826 * np.median(np.abs(distance[keep]))
        new_keep = np.abs(distance) <= max(2.0, 3.0 * spread)
        if new_keep.sum() < 20 or np.array_equal(new_keep, keep):
            break
        keep = new_keep
    if not (np.isfinite(radius) and radius >= _MIN_RADIUS):
        raise _no_disc("its boundary is not the arc of a disc")
    if radius > 20 * max(mask.shape):
        raise _no_disc("its boundary is nearly straight, not the arc of a disc")
    return centre, radius


def _kasa(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares circle: y² + x² + D y + E x + F = 0, linear in (D, E, F)."""
    y, x = points.T
    design = np.column_stack([y, x, np.ones_like(y)])
    (d, e, f), *_ = np.linalg.lstsq(design, -(y**2 + x**2), rcond=None)
    centre = np.array([-d / 2, -e / 2])
    radius2 = centre @ centre - f
    return centre, math.sqrt(radius2) if radius2 > 0 else float("nan")


# --- the limb profiles ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Fits:
    """Per-profile edge fits (NaN where a fit failed)."""

    inner: np.ndarray
    outer: np.ndarray
    edge: np.ndarray
    sigma: np.ndarray
    ramp: np.ndarray
    contrast: np.ndarray
    residual: np.ndarray


#: Gamma(3/2) / sqrt(2 pi): the constant of the blurred square root, `_blurred_sqrt`.
_SQRT_CONSTANT = special.gamma(1.5) / math.sqrt(2 * math.pi)
#: The blurred square root is tabulated on [_SQRT_LOW, _SQRT_HIGH] sigmas from the edge: below,
#: it is 0 within 1e-15; above, its asymptotic series is exact within 1e-6.
_SQRT_LOW, _SQRT_HIGH, _SQRT_STEP = -8.0, 30.0, 0.01


@functools.cache
def _blurred_sqrt_table() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grid, h(z) and h'(z) of `_blurred_sqrt` (linear interpolation error below 1e-5)."""
    z = np.arange(_SQRT_LOW, _SQRT_HIGH + _SQRT_STEP / 2, _SQRT_STEP)
    d, dp = special.pbdv(-1.5, -z)
    damping = _SQRT_CONSTANT * np.exp(-(z**2) / 4)
    return z, damping * d, damping * (-0.5 * z * d - dp)


def _blurred_sqrt(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """h(z) = E[sqrt(max(z + N, 0))], N standard normal, and its derivative h'(z).

    A unit Gaussian blur of the square root sqrt(max(z, 0)):
    h(z) = Gamma(3/2) / sqrt(2 pi) exp(-z^2 / 4) D_{-3/2}(-z), with D the parabolic cylinder
    function (scipy.special.pbdv), tabulated; far inside, sqrt(z) (1 - 1 / (8 z^2)).
    """
    grid, values, slopes = _blurred_sqrt_table()
    value = np.interp(z, grid, values, left=0.0)
    slope = np.interp(z, grid, slopes, left=0.0)
    far = z > _SQRT_HIGH
    if far.any():
        root = np.sqrt(z[far])
        value[far] = root * (1 - 1 / (8 * z[far] ** 2))
        slope[far] = 0.5 / root * (1 + 3 / (8 * z[far] ** 2))
    return value, slope


def _edge_model(r, inner, outer, edge, sigma, ramp):
    """A limb blurred by a Gaussian of ``sigma``: a step plus a limb-darkening square root.

    Unblurred, the profile is ``outer`` beyond ``edge`` and ``inner + ramp sqrt(edge - r)``
    inside: near the limb a darkened disc brightens inward as the square root of the depth.
    """
    z = (edge - r) / sigma
    step = 0.5 * special.erfc(-z / math.sqrt(2))
    root, _ = _blurred_sqrt(z)
    return outer + (inner - outer) * step + ramp * math.sqrt(sigma) * root


def _edge_jacobian(r, inner, outer, edge, sigma, ramp):
    z = (edge - r) / sigma
    step = 0.5 * special.erfc(-z / math.sqrt(2))
    density = np.exp(-(z**2) / 2) / math.sqrt(2 * math.pi)
    root, root_slope = _blurred_sqrt(z)
    scale = math.sqrt(sigma)
    along = ((inner - outer) * density + ramp * scale * root_slope) / sigma
    return np.column_stack(
        [step, 1.0 - step, along, -z * along + ramp * root / (2 * scale), scale * root]
    )


def _fit_profiles(data, centre, angles, edges, half, *, guess, largest) -> _Fits:
    """Fit a blurred limb to the profile along each angle, over ``edges ± half`` pixels.

    A fit wider than ``largest`` (a sigma), or whose edge lies within two widths of the
    window's ends, found no edge in the window and counts as failed.
    """
    offsets = np.arange(-half, half + _STEP / 2, _STEP)
    radii = edges[:, None] + offsets[None, :]
    rows = centre[0] + radii * np.sin(angles)[:, None]
    columns = centre[1] + radii * np.cos(angles)[:, None]
    inside = (
        (rows >= 0) & (rows <= data.shape[0] - 1) & (columns >= 0) & (columns <= data.shape[1] - 1)
    )
    profiles = _sample(data, rows, columns)
    result = {name: np.full(len(angles), np.nan) for name in _Fits.__dataclass_fields__}
    tenth = max(2, len(offsets) // 10)
    for index in range(len(angles)):
        if not inside[index].all():
            continue  # the limb runs out of the frame here
        r, profile = radii[index], profiles[index]
        start = (
            float(np.median(profile[:tenth])),
            float(np.median(profile[-tenth:])),
            float(edges[index]),
            float(guess),
            0.0,
        )
        bounds = ([-np.inf, -np.inf, r[0], 0.05, -np.inf], [np.inf, np.inf, r[-1], half, np.inf])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optimize.OptimizeWarning)
                params, _ = optimize.curve_fit(
                    _edge_model,
                    r,
                    profile,
                    p0=start,
                    bounds=bounds,
                    jac=_edge_jacobian,
                    max_nfev=200,
                )
        except (RuntimeError, ValueError):
            continue
        model = _edge_model(r, *params)
        inner, outer, edge, sigma, ramp = params
        if sigma > largest or min(edge - r[0], r[-1] - edge) < 2 * sigma:
            continue
        result["inner"][index], result["outer"][index] = inner, outer
        result["edge"][index], result["sigma"][index], result["ramp"][index] = edge, sigma, ramp
        # The unblurred jump from the sky to the inner end of the window.
        result["contrast"][index] = inner - outer + ramp * math.sqrt(max(edge - r[0], 0.0))
        result["residual"][index] = float(np.sqrt(np.mean((profile - model) ** 2)))
    return _Fits(**result)


def _sample(data, rows, columns) -> np.ndarray:
    """Cubic-spline samples of ``data`` at (rows, columns), on the bounding box only."""
    low_r = max(int(np.floor(np.nanmin(rows))) - 4, 0)
    high_r = min(int(np.ceil(np.nanmax(rows))) + 5, data.shape[0])
    low_c = max(int(np.floor(np.nanmin(columns))) - 4, 0)
    high_c = min(int(np.ceil(np.nanmax(columns))) + 5, data.shape[1])
    box = data[low_r:high_r, low_c:high_c]
    coordinates = np.stack([rows - low_r, columns - low_c])
    return ndimage.map_coordinates(box, coordinates, order=3, mode="nearest")


def _accept(fits_: _Fits) -> np.ndarray:
    """Profiles with a clean limb: fitted, of full contrast, well fitted, not outliers."""
    contrast = fits_.contrast
    ok = np.isfinite(fits_.sigma) & (contrast > 0) & (fits_.inner > fits_.outer)
    if ok.sum() < 3:
        return ok
    ok &= contrast >= 0.5 * np.median(contrast[ok])
    # Residual relative to the edge's contrast, so a bright and a dark stretch of limb compare.
    relative = fits_.residual / np.where(contrast > 0, contrast, np.inf)
    ok &= relative <= 3.0 * np.median(relative[ok]) + 1e-12
    for _ in range(3):
        if ok.sum() < 3:
            break
        centre = np.median(fits_.sigma[ok])
        spread = 1.4826 * np.median(np.abs(fits_.sigma[ok] - centre))
        new_ok = ok & (np.abs(fits_.sigma - centre) <= max(3.0 * spread, 1e-3 * centre))
        if np.array_equal(new_ok, ok):
            break
        ok = new_ok
    return ok


def _min_profiles(n_angles: int) -> int:
    return max(8, int(math.ceil(0.1 * n_angles)))


def _no_disc(reason: str) -> GpudeconvError:
    msg = (
        f"no planetary or lunar disc found ({reason}); limb_fwhm needs a bright disc with a "
        "sharp limb against dark sky: give the --psf-fwhm range by hand"
    )
    return GpudeconvError(msg)


def _no_clean_limb(good: int, total: int) -> GpudeconvError:
    msg = (
        f"only {good} of {total} limb profiles show a clean edge (noise, a terminator or the "
        "frame's edge spoil the rest); give the --psf-fwhm range by hand"
    )
    return GpudeconvError(msg)
