"""The PSF from the image's own stars: detection, rejection, model fits, robust combination.

`fit_psf` runs the whole measurement and returns a `PSFEstimate` that says which stars it used
and why it refused the others; `estimate_psf` returns only the PSF (or PSF field).

The steps, each with the tool the field uses for it:

1. Sky: photutils `Background2D` (sigma-clipped medians in boxes of 1/16 of the image, at least
   32 px, median-filtered 3 x 3) on the image with its no-data (NaN) masked, so that a smooth
   nebula goes into the sky, not into the stars; the noise is the median of the background RMS
   map (sigma-clipped MAD).
2. Detection: photutils `DAOStarFinder` at 5 sigma on the sky-subtracted image, first with a
   3 px kernel (in the central 1024 x 1024 pixels when the frame is larger), then over the
   whole frame with the median FWHM of Gaussian fits to the brightest clean stars of the
   first pass. At most `MAX_CANDIDATES` candidates go on, the brightest of each of 8 x 8
   regions first, so that they cover the field.
3. Rejection, each star with one reason of `REJECTION_REASONS`, tested in this order: its
   fitting box leaves the image or touches NaN ('edge or no-data'); the box holds a pixel at
   the saturation level (given, or each channel's maximum when at least 3 pixels share it) or
   the star has a flat top ('saturated'); DAOFIND's sharpness is above 0.9, or the fitted
   minor-axis FWHM below 1 px: hot pixels and cosmic rays ('too sharp'); another source with
   at least 5 % of its flux lies within the fitting box grown by one FWHM ('blended'); the fit
   failed, did not converge, ran into a bound, leaves more than 30 % of the star's light in its
   residuals, or gives a shape more than 3 sigma from the other stars' ('poor fit').
4. Fits: each candidate, in a box of 4 FWHM, by an astropy compound model, a constant local
   sky (`Const2D`) plus an elliptical Moffat (or Gaussian) integrated over each pixel, with
   `astropy.modeling.fitting.TRFLSQFitter` and analytic derivatives. The integration makes the
   fitted parameters those of `gpudeconv.psf.moffat` / `gaussian`, which render the PSF
   integrated over pixels the same way. Moffat: ``beta`` and the FWHM trade off in one star's
   fit, so ``beta`` comes from free fits of the brightest stars and every star is then
   fitted with ``beta`` held at that value.
5. Combination: the FWHM, the ellipticity as a 2-vector and ``beta`` are combined by
   sigma-clipped medians (one PSF) or by low-order 2-D polynomials in the position fitted with
   iterative sigma clipping (a field, in the spirit of PSFEx [3]_); each star is clipped
   against its own fit error and the stars' intrinsic scatter. The combined model is rendered
   with `gpudeconv.psf.moffat` / `gpudeconv.psf.gaussian`, at each node for a field.
6. ``model='empirical'``: the Moffat model plus the weighted, sigma-clipped stack of the used
   stars' residuals from it, registered to the centre: DAOPHOT's analytic PSF with an
   empirical look-up table [1]_ (per node, the stars weighted by their bilinear weight there).

The parametrization of the fitted shape: :math:`Q` below is the squared radius in units of
the geometric mean of the two axes (the quadratic form has determinant 1), and
:math:`e = (e_1, e_2) = \\frac{1 - q}{1 + q} (\\cos 2\\theta, \\sin 2\\theta)`, :math:`q` the
axis ratio and :math:`\\theta` the major axis's angle: no wrap of :math:`\\theta`, smooth at
:math:`q = 1`, and the two components of the ellipticity average without bias.

.. math:: Q = \\frac{(1 + |e|^2)(\\Delta x^2 + \\Delta y^2) - 2\\,[e_1 (\\Delta x^2 - \\Delta y^2)
          + 2 e_2 \\Delta x \\Delta y]}{1 - |e|^2}, \\qquad
          f = A \\left(1 + \\frac{Q}{\\alpha^2}\\right)^{-\\beta}
          \\quad\\text{or}\\quad A\\, e^{-Q / 2\\sigma^2}

Seeing-limited stars of FWHM 1.5 px or more are expected; below that, stars and hot pixels
look alike.

References
----------
.. [1] Stetson, P. B. (1987), "DAOPHOT: a computer program for crowded-field stellar
       photometry", PASP 99, 191. doi:10.1086/131977
.. [2] Moffat, A. F. J. (1969), "A theoretical investigation of focal stellar images in the
       photographic emulsion", A&A 3, 455.
.. [3] Bertin, E. (2011), "Automated morphometry with SExtractor and PSFEx", ASP Conf. Ser.
       442, 435.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from astropy.modeling import Fittable2DModel, Parameter, fitting
from astropy.modeling import models as astropy_models
from astropy.table import Table

from .._errors import GpudeconvError
from ..backend import is_cupy_array
from . import models
from ._validate import validate_odd_size
from .field import PSFField, _node_positions, _validate_grid

__all__ = ["REJECTION_REASONS", "PSFEstimate", "estimate_psf", "fit_psf"]

#: Why a detected star was not used, in the order they are tested.
REJECTION_REASONS = ("saturated", "too sharp", "blended", "edge or no-data", "poor fit")
_SATURATED, _SHARP, _BLENDED, _EDGE, _POOR = REJECTION_REASONS

#: The models `fit_psf` knows.
MODELS = ("moffat", "gaussian", "empirical")
#: Candidates kept after detection: enough for an 8 x 8 field, and fitted in seconds.
MAX_CANDIDATES = 600
#: Usable stars needed per node of the PSF (one node without a grid) ...
STARS_PER_NODE = 6
#: ... and per term of the polynomials of a field (degree 2: 6 terms, 36 stars).
STARS_PER_TERM = 6

# Detection.
_THRESHOLD_SIGMA = 5.0  # DAOFIND's threshold, in units of the sky noise
_FIRST_FWHM = 3.0  # px, the kernel of the first pass
_FIRST_PASS_SIDE = 1024  # the first pass looks in the central crop of this side first
# Rejection.
_SHARPNESS_MAX = 0.9  # DAOFIND sharpness: stars 0.2 to 0.7, hot pixels 1 and more
_MIN_STAR_FWHM = 1.0  # px, minor axis: sharper is not light through optics
_BLEND_FLUX_RATIO = 0.05  # a neighbour with this fraction of the star's flux blends it
_FLAT_TOLERANCE = 1e-3  # within this fraction of its maximum, a star's pixel is on a flat top
# (not looser: a star centred on a pixel corner has four nearly equal brightest pixels)
# Within this fraction of the image's maximum, a pixel is at the saturation plateau: clipped
# pixels that a flat field of 0.3% pixel-to-pixel scatter has since scaled apart stay within 1%.
_PLATEAU_TOLERANCE = 1e-2
_RESIDUAL_MAX = 0.3  # misfit (L2, beyond the sky noise) as a fraction of the star's light
_CLIP_SIGMA = 3.0
# Fits.
_BOX_IN_FWHM = 4.0  # the fitting box, odd, at least _MIN_BOX
_MIN_BOX = 9
_OVERSAMPLE = models._OVERSAMPLE  # sub-samples per pixel side, as models.moffat renders
_FREE_FITS = 120  # free Moffat fits (beta free) of the brightest stars
_BETA_BOUNDS = (1.2, 15.0)
_E_BOUND = 0.7  # |e1|, |e2| <= 0.7: axis ratios down to 0.18
_FWHM_FLOOR = 0.3
_SIGMA_PER_FWHM = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
# Rendering.
_TAIL = 1e-3  # the PSF reaches to where the model falls to this fraction of its peak,
_MAX_SIZE = 127  # ... at least 4 FWHM + 1 and at most this side (63 lost 1.4% of a FWHM 12 px,
# beta 2.5 Moffat's light and 2.4% of a FWHM 6 px, beta 1.5 one)
_CUTOUT_MARGIN = 2  # px by which the empirical PSF's star cut-outs exceed it
_MIN_SIDE = 32  # smallest image side with room for a star's fitting box

_NO_STARS_HINT = (
    "planetary or lunar image? give the PSF by hand with --psf-fwhm, or try `gpudeconv sweep`"
)


# --- result ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PSFEstimate:
    """The PSF measured from an image's stars, with the evidence.

    Attributes
    ----------
    psf : (k, k) ndarray or PSFField
        Normalized to sum 1, ``k`` odd; a `PSFField` when a grid was asked for.
    model : {'moffat', 'gaussian', 'empirical'}
    stars : astropy.table.Table
        Every detected star (at most `MAX_CANDIDATES`, the brightest of each region of the
        image first; a saturated star once), columns ``x``, ``y`` (0-based pixels, ``x`` the
        column: the fitted centre of used stars, the detection's centroid of the others),
        ``flux`` (of the fitted model; DAOFIND's where no fit was made), ``peak`` (brightest
        pixel above the sky), ``fwhm`` (major axis, px), ``ratio`` (minor/major), ``angle``
        (degrees of the major axis from +x towards +y, in [0, 180)), ``beta`` (NaN for
        Gaussian fits), ``used`` (bool) and ``reason`` ('' if used, else one of
        `REJECTION_REASONS`). Every star with a whole fitting box is fitted, the refused ones
        too (their shapes show why); Moffat fits hold ``beta`` at the combined value. Shape
        columns are NaN where no fit was made (edge or no-data, or a fit that failed).
        ``stars.meta`` holds ``detection_fwhm`` (the FWHM guess of the detection, px), ``box``
        (the side of the fitting box, px) and ``degree`` (of the polynomials of a field).
    found, used : int
        Rows of ``stars``, and how many of them the PSF is made of.
    rejected : dict of str to int
        Stars refused for each reason of `REJECTION_REASONS` (all present).
    background, noise : float
        Median sky level and its noise (sigma) per pixel, in image units.
    image_shape : (H, W) tuple of int
    grid : (ny, nx) tuple of int or None
    """

    psf: np.ndarray | PSFField = field(repr=False)
    model: str
    stars: Table = field(repr=False)
    found: int
    used: int
    rejected: dict[str, int]
    background: float
    noise: float
    image_shape: tuple[int, int]
    grid: tuple[int, int] | None
    _parameters: Callable[[float, float], dict] = field(repr=False, compare=False, default=None)

    def parameters_at(self, y: float, x: float) -> dict:
        """``{'fwhm', 'ratio', 'angle', 'beta'}`` of the fitted model at pixel ``(y, x)``.

        The polynomial of the field (a constant without a grid); ``beta`` is NaN for the
        Gaussian model. For ``model='empirical'`` these are the Moffat parameters of the
        measurement that selected the stars.
        """
        return self._parameters(float(y), float(x))


# --- public entry points ----------------------------------------------------------------------


def estimate_psf(
    image, *, grid: tuple[int, int] | None = None, model: str = "moffat"
) -> np.ndarray | PSFField:
    """The PSF of an image, measured on its stars: `fit_psf` (see there) without the report.

    Returns
    -------
    (k, k) ndarray of float64 or PSFField
        One PSF (``grid=None``) or a field of ``grid = (ny, nx)`` nodes.
    """
    return fit_psf(image, grid=grid, model=model).psf


def fit_psf(
    image,
    *,
    grid: tuple[int, int] | None = None,
    model: str = "moffat",
    saturation: float | None = None,
    size: int | None = None,
) -> PSFEstimate:
    """Measure the PSF on the image's stars and report which stars were used and why not.

    Parameters
    ----------
    image : (H, W) or (C, H, W) array_like
        The image, sky included; NaN marks no-data. A colour image is measured on the sum of
        its channels: one PSF for all (measure each channel on its own for one PSF each); a
        pixel clipped in any channel counts as saturated. A CuPy array is copied to the host.
    grid : (ny, nx) tuple of int, optional
        Measure a spatially varying PSF and return a `PSFField` of ``ny x nx`` nodes. Needs
        `STARS_PER_NODE` (6) usable stars per node; the error says which grid the stars
        support.
    model : {'moffat', 'gaussian', 'empirical'}
        An elliptical Moffat (the default: seeing-limited stars) or Gaussian; or 'empirical',
        the Moffat model plus the stack of the stars' residuals from it, which follows what
        the model misses (a Gaussian core, a halo, coma) at the cost of a little noise.
    saturation : float, optional
        Level (image units, sky included) at which the detector clips: stars with a pixel at
        it in their fitting box are refused. By default the maximum of each channel when at
        least 3 pixels share it; flat-topped stars are refused in any case.
    size : odd int, optional
        Side of the PSF. By default where the model falls to 1e-3 of its peak along the major
        axis, at least 4 FWHM + 1, at most 63 (for a field: the largest over the nodes).

    Returns
    -------
    PSFEstimate

    Raises
    ------
    GpudeconvError
        For an image that is not 2-D or 3-D, all NaN, or under 32 pixels on a side; a bad
        ``model``, ``grid``, ``saturation`` or ``size``; no stars, or fewer usable stars
        than the PSF (6) or the grid (6 per node) needs.

    Notes
    -----
    The steps, the rejection rules and the fitted model are described in the module's
    docstring. The combined PSF has the median of the stars' geometric-mean FWHM (unbiased by
    noise in their ellipticity), the median :math:`(e_1, e_2)`, converted back to an axis ratio
    and angle, and the median :math:`\\beta`; for a field, polynomials of the position in their
    place: degree 2 with at least 36 usable stars (`STARS_PER_TERM` per term), 1 with at least
    18, else 0, clamped to the range of the stars' values (no wild extrapolation into empty
    corners).

    Examples
    --------
    >>> import gpudeconv as gd
    >>> result = gd.psf.fit_psf(image)  # doctest: +SKIP
    >>> result.used, result.rejected  # doctest: +SKIP
    (362, {'saturated': 4, 'too sharp': 50, 'blended': 50, 'edge or no-data': 8, 'poor fit': 5})
    >>> field = gd.estimate_psf(image, grid=(3, 3))  # doctest: +SKIP
    """
    data, planes = _validate_image(image)
    model = _validate_model(model)
    shape = data.shape
    grid = None if grid is None else _validate_grid(grid, shape)
    saturation = _validate_saturation(saturation)
    size = _validate_size(size)
    no_data = ~np.isfinite(data)
    if no_data.all():
        msg = "the image holds no data (every pixel is NaN): check the file or the stack"
        raise GpudeconvError(msg)
    if min(shape) < _MIN_SIDE:
        msg = (
            f"the image is {shape[0]}x{shape[1]} pixels, too small to measure stars in (each "
            f"needs a box of about 4 FWHM with room around it): give at least "
            f"{_MIN_SIDE}x{_MIN_SIDE} pixels, or the PSF by hand with --psf-fwhm"
        )
        raise GpudeconvError(msg)

    sky_map, background, noise, local_noise = _measure_sky(data, no_data)
    residual = np.subtract(data, sky_map, out=sky_map)
    residual[no_data] = 0.0
    clipped = _clipped_pixels(planes, no_data, saturation)
    detections, fwhm_guess = _detect(residual, no_data, noise, clipped)
    box = max(_MIN_BOX, _odd(_BOX_IN_FWHM * fwhm_guess))
    stars = _cap_candidates(detections, shape)
    stars, reasons = _screen(stars, detections, residual, no_data, clipped, noise, box, fwhm_guess)

    fit_model = "gaussian" if model == "gaussian" else "moffat"
    measurement = _Measurement(
        residual, no_data, stars, reasons, box, fwhm_guess, local_noise, fit_model
    )
    measurement.run(grid)
    _require_stars(measurement, grid)
    shape_model = measurement.shape_model()
    if model == "empirical":
        psf = _empirical(measurement, shape_model, grid, shape, size)
    else:
        psf = _render_parametric(shape_model.parameters_at, fit_model, grid, shape, size)

    table = measurement.table()
    rejected = {reason: int(np.sum(table["reason"] == reason)) for reason in REJECTION_REASONS}
    return PSFEstimate(
        psf=psf,
        model=model,
        stars=table,
        found=len(table),
        used=int(np.sum(table["used"])),
        rejected=rejected,
        background=float(background),
        noise=float(noise),
        image_shape=(int(shape[0]), int(shape[1])),
        grid=grid,
        _parameters=shape_model.parameters_at,
    )


# --- validation -------------------------------------------------------------------------------


def _validate_image(image) -> tuple[np.ndarray, list[np.ndarray]]:
    """The image as float32 ``(H, W)`` (channels summed) and its planes as given.

    float32 halves the time of the sky and detection passes over large frames; the fits work
    in float64 on their cut-outs.
    """
    array = image.get() if is_cupy_array(image) else np.asarray(image)
    if array.dtype.kind not in "uif":
        msg = f"image must hold real numbers, got dtype {array.dtype}"
        raise GpudeconvError(msg)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 2:
        return array.astype(np.float32), [array]
    if array.ndim == 3 and array.shape[-1] in (3, 4) and array.shape[0] > 4:
        msg = (
            f"image has shape {array.shape}: channel-last colour (H, W, C); gpudeconv takes "
            "channel-first (C, H, W): pass np.moveaxis(image, -1, 0)"
        )
        raise GpudeconvError(msg)
    if array.ndim == 3:
        planes = list(array)
        data = np.zeros(array.shape[1:], dtype=np.float32)
        for plane in planes:
            data += plane
        return data, planes
    msg = f"image must be 2-D (H, W) or channel-first colour (C, H, W), got shape {array.shape}"
    raise GpudeconvError(msg)


def _validate_model(model) -> str:
    if not isinstance(model, str) or model.lower() not in MODELS:
        msg = (
            f"model must be one of {', '.join(repr(m) for m in MODELS)}, got {model!r}; "
            "'moffat' suits most seeing-limited images"
        )
        raise GpudeconvError(msg)
    return model.lower()


def _validate_saturation(saturation) -> float | None:
    if saturation is None:
        return None
    if isinstance(saturation, bool) or not (
        isinstance(saturation, int | float | np.number) and np.isfinite(saturation)
    ):
        msg = (
            f"saturation must be a finite level in image units, got {saturation!r}; e.g. 65535 "
            "for 16-bit data, or omit it to take the image's maximum plateau"
        )
        raise GpudeconvError(msg)
    return float(saturation)


def _validate_size(size) -> int | None:
    return None if size is None else validate_odd_size(size, minimum=3)


# --- sky and detection ------------------------------------------------------------------------


def _measure_sky(data: np.ndarray, no_data: np.ndarray):
    """Sky map, its median, the median noise per pixel, and the local noise.

    photutils `Background2D`; the local noise is its RMS mesh (one value per box), which
    follows the extra photon noise of a nebula.

    Returns
    -------
    sky_map : (H, W) float32 ndarray
    background, noise : float
    local_noise : tuple
        ``(mesh, box)``: the ``(ny, nx)`` RMS mesh and the side of its boxes.
    """
    from astropy.stats import SigmaClip, sigma_clipped_stats
    from photutils.background import Background2D, MADStdBackgroundRMS, MedianBackground

    height, width = data.shape
    box = int(min(max(32, min(height, width) // 16), height, width))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sky = Background2D(
                data,
                box,
                mask=no_data,
                filter_size=3,
                sigma_clip=SigmaClip(sigma=3.0, maxiters=5),
                bkg_estimator=MedianBackground(),
                bkg_rms_estimator=MADStdBackgroundRMS(),
                exclude_percentile=50.0,
            )
        sky_map = np.asarray(sky.background, dtype=np.float32)
        background = float(sky.background_median)
        noise = float(sky.background_rms_median)
        mesh = np.asarray(sky.background_rms_mesh, dtype=np.float64)
    except ValueError:
        # Too few clean boxes (a frame mostly without data): one sky level for all.
        _, median, std = sigma_clipped_stats(data, mask=no_data, sigma=3.0, stdfunc="mad_std")
        sky_map = np.full(data.shape, float(median), dtype=np.float32)
        background, noise = float(median), float(std)
        mesh = np.full((1, 1), noise)
    if not (np.isfinite(noise) and noise > 0):
        # A noiseless (synthetic) frame: any light above the sky is a detection.
        scale = float(np.nanmax(np.abs(data - background)))
        noise = 1e-6 * scale if scale > 0 else 1.0
    mesh = np.where(np.isfinite(mesh) & (mesh > 0), mesh, noise)
    return sky_map, background, noise, (mesh, box)


def _clipped_pixels(planes, no_data: np.ndarray, saturation: float | None) -> np.ndarray:
    """Pixels at the saturation level in any channel (given, or each plane's max plateau)."""
    clipped = np.zeros(no_data.shape, dtype=bool)
    for plane in planes:
        values = np.asarray(plane)
        if saturation is not None:
            level = saturation
        else:
            top = np.nanmax(values) if values.dtype.kind == "f" else values.max()
            # Clipped pixels that a flat field has since scaled apart sit within a fraction of a
            # percent of the maximum, no longer exactly at it.
            with np.errstate(invalid="ignore"):
                band = values >= top - _PLATEAU_TOLERANCE * abs(top)
            if not np.isfinite(top) or np.count_nonzero(band) < 3:
                continue
            clipped |= band
            continue
        with np.errstate(invalid="ignore"):
            clipped |= values >= level - 1e-6 * abs(level)
    return clipped


def _find_stars(residual, no_data, noise, fwhm):
    """DAOFIND on the sky-subtracted image; None if nothing is found."""
    from photutils.detection import DAOStarFinder
    from photutils.utils.exceptions import NoDetectionsWarning

    finder = DAOStarFinder(
        _THRESHOLD_SIGMA * noise,
        fwhm,
        sharpness_range=None,
        roundness_range=None,
        # 0: peaks are maxima within the kernel's footprint (about one FWHM), as in DAOFIND;
        # photutils' circular min_separation search is 10x slower on large frames.
        min_separation=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoDetectionsWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        found = finder.find_stars(residual, mask=no_data)
    if found is None or len(found) == 0:
        return None
    return {
        "x": np.asarray(found["x_centroid"], dtype=np.float64),
        "y": np.asarray(found["y_centroid"], dtype=np.float64),
        "flux": np.asarray(found["flux"], dtype=np.float64),
        "peak": np.asarray(found["peak"], dtype=np.float64),
        "sharpness": np.asarray(found["sharpness"], dtype=np.float64),
        "index": np.arange(len(found)),
    }


def _no_stars_error(detail: str) -> GpudeconvError:
    return GpudeconvError(f"no stars found {detail}: {_NO_STARS_HINT}")


def _detect(residual, no_data, noise, clipped):
    """Detections with a kernel matched to the stars, and the stars' typical FWHM.

    The first pass, with a 3 px kernel, only has to find a few dozen bright stars: it looks in
    the central 1024 x 1024 pixels first, and in the whole frame if they hold too few.
    """
    fwhm = None
    crop = _central_crop(residual.shape, _FIRST_PASS_SIDE)
    if crop is not None:
        first = _find_stars(residual[crop], no_data[crop], noise, _FIRST_FWHM)
        if first is not None:
            first["x"] += crop[1].start
            first["y"] += crop[0].start
            fwhm = _quick_fwhm_any(residual, no_data, clipped, first)
    if fwhm is None:
        first = _find_stars(residual, no_data, noise, _FIRST_FWHM)
        if first is None:
            raise _no_stars_error(f"above {_THRESHOLD_SIGMA:g} sigma of the sky noise")
        fwhm = _quick_fwhm_any(residual, no_data, clipped, first) or _FIRST_FWHM
    detections = _find_stars(residual, no_data, noise, fwhm)
    if detections is None:
        raise _no_stars_error(f"above {_THRESHOLD_SIGMA:g} sigma of the sky noise")
    return detections, fwhm


def _central_crop(shape, side: int):
    """The central ``side x side`` slice, or None when the image is not much larger."""
    height, width = shape
    if height <= 1.5 * side and width <= 1.5 * side:
        return None
    top, left = max(0, (height - side) // 2), max(0, (width - side) // 2)
    return (slice(top, top + min(side, height)), slice(left, left + min(side, width)))


def _quick_fwhm_any(residual, no_data, clipped, found):
    """`_quick_fwhm` in boxes of 17, 33 and 65 px: the first that holds the stars (wide
    seeing or defocus makes stars of 12 px FWHM and more, which a 17 px box cannot fit)."""
    for box in (17, 33, 65):
        fwhm = _quick_fwhm(residual, no_data, clipped, found, box=box)
        if fwhm is not None:
            return fwhm
    return None


def _quick_fwhm(residual, no_data, clipped, found, *, count: int = 30, box: int = 17):
    """Median FWHM of Gaussian fits to the brightest clean, isolated first-pass detections;
    None if fewer than 10 could be measured."""
    from scipy.spatial import cKDTree

    x, y, sharp = found["x"], found["y"], found["sharpness"]
    tree = cKDTree(np.column_stack([x, y]))
    crowded = np.array([len(n) > 1 for n in tree.query_ball_point(np.column_stack([x, y]), 10)])
    good = (sharp > 0.2) & (sharp < _SHARPNESS_MAX) & ~crowded
    order = [i for i in np.argsort(-found["flux"]) if good[i]]
    half = box // 2
    fitter = _StarFitter("gaussian", _FIRST_FWHM)
    fwhms = []
    for i in order:
        window = _window(residual.shape, x[i], y[i], half)
        if window is None or no_data[window].any() or clipped[window].any():
            continue
        fit = fitter(residual, window, x[i], y[i])
        if fit is not None and _MIN_STAR_FWHM < fit["fwhm_mean"] < box / 2:
            fwhms.append(fit["fwhm_mean"])
        if len(fwhms) >= count:
            break
    if len(fwhms) < 10:
        return None
    return float(np.median(fwhms))


def _cap_candidates(found: dict, shape) -> dict:
    """At most `MAX_CANDIDATES` detections: the brightest of each of 8 x 8 regions first, so
    that the candidates cover the field."""
    keep = _spread(found, np.arange(len(found["x"])), shape, cells=8)[:MAX_CANDIDATES]
    keep.sort()
    return {k: v[keep] for k, v in found.items()}


def _odd(value: float) -> int:
    return int(2 * math.ceil((value - 1) / 2) + 1)


def _window(shape, x: float, y: float, half: int):
    """The ``(2 half + 1)^2`` slice around pixel (round(y), round(x)); None if it leaves."""
    if not (np.isfinite(x) and np.isfinite(y)):
        return None
    row, col = int(round(y)), int(round(x))
    if row - half < 0 or col - half < 0 or row + half >= shape[0] or col + half >= shape[1]:
        return None
    return (slice(row - half, row + half + 1), slice(col - half, col + half + 1))


def _screen(stars, detections, residual, no_data, clipped, noise, box, fwhm):
    """The first rejections, before any fit: edge or no-data, saturated, too sharp, blended.

    Returns the candidates (a saturated star found several times on its flat top is kept
    once, its brightest detection) and their reasons ('' for those still in the running).
    """
    from scipy.spatial import cKDTree

    n = len(stars["x"])
    reasons = np.full(n, "", dtype=object)
    half = box // 2
    for i in range(n):
        window = _window(residual.shape, stars["x"][i], stars["y"][i], half)
        if window is None or no_data[window].any():
            reasons[i] = _EDGE
        elif clipped[window].any() or _flat_top(residual, stars["x"][i], stars["y"][i], noise):
            reasons[i] = _SATURATED
        elif stars["sharpness"][i] > _SHARPNESS_MAX:
            reasons[i] = _SHARP
    keep = _first_of_each_saturated_star(stars, reasons, half)
    stars = {k: v[keep] for k, v in stars.items()}
    reasons = reasons[keep]
    # Neighbours: every detection but the hot pixels, those beyond the cap included, whose
    # centre lies within the fitting box grown by one FWHM (their core reaches into the box).
    real = np.nonzero(detections["sharpness"] <= _SHARPNESS_MAX)[0]
    if len(real) == 0:
        return stars, reasons
    tree = cKDTree(np.column_stack([detections["x"][real], detections["y"][real]]))
    reach = half + fwhm
    for i in np.nonzero(reasons == "")[0]:
        near = real[tree.query_ball_point((stars["x"][i], stars["y"][i]), reach, p=np.inf)]
        near = near[near != stars["index"][i]]
        if np.any(detections["flux"][near] >= _BLEND_FLUX_RATIO * stars["flux"][i]):
            reasons[i] = _BLENDED
    return stars, reasons


def _first_of_each_saturated_star(stars, reasons, half: int) -> np.ndarray:
    """Mask that drops saturated detections within ``half`` px of a brighter saturated one."""
    keep = np.ones(len(reasons), dtype=bool)
    saturated = np.nonzero(reasons == _SATURATED)[0]
    kept: list[int] = []
    for i in saturated[np.argsort(-stars["flux"][saturated], kind="stable")]:
        for j in kept:
            if max(abs(stars["x"][i] - stars["x"][j]), abs(stars["y"][i] - stars["y"][j])) <= half:
                keep[i] = False
                break
        else:
            kept.append(i)
    return keep


def _flat_top(residual, x, y, noise) -> bool:
    """Whether a bright star's 3 x 3 core holds 3 or more pixels at its maximum: clipped, even
    where a flat field has since scaled the clipped pixels a little apart."""
    window = _window(residual.shape, x, y, 1)
    if window is None:
        return False
    top = residual[window]
    peak = float(top.max())
    if peak < 50 * noise:
        return False
    return int(np.count_nonzero(top >= peak - _FLAT_TOLERANCE * abs(peak))) >= 3


# --- models -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _subpixel_grid(oversample: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sub-sample offsets (x, y) within a pixel and the weights that average over them."""
    offsets = (np.arange(oversample) + 0.5) / oversample - 0.5
    weights = np.full(oversample * oversample, 1.0 / oversample**2)
    return np.tile(offsets, oversample), np.repeat(offsets, oversample), weights


class _PixelIntegrated2D(Fittable2DModel):
    """An elliptical profile averaged over ``oversample x oversample`` points in each pixel.

    Parameters: ``amplitude`` (peak of the continuous profile), ``x_0``, ``y_0`` (centre),
    ``fwhm`` (geometric mean of the major and minor FWHM), ``e1``, ``e2`` (ellipticity,
    ``|e| = (1 - q) / (1 + q)`` along ``2 theta``); subclasses give the radial profile as a
    function of the quadratic form ``Q`` of `fit_psf`'s Notes.
    """

    amplitude = Parameter(default=1.0, bounds=(0.0, None))
    x_0 = Parameter(default=0.0)
    y_0 = Parameter(default=0.0)
    fwhm = Parameter(default=3.0, bounds=(_FWHM_FLOOR, None))
    e1 = Parameter(default=0.0, bounds=(-_E_BOUND, _E_BOUND))
    e2 = Parameter(default=0.0, bounds=(-_E_BOUND, _E_BOUND))

    oversample = _OVERSAMPLE

    def _geometry(self, x, y, x_0, y_0, e1, e2):
        """Offsets of the sub-samples from the centre, ``1 - |e|^2``, and ``Q`` times it."""
        ox, oy, _ = _subpixel_grid(self.oversample)
        dx = np.asarray(x, dtype=np.float64)[..., None] + (ox - x_0)
        dy = np.asarray(y, dtype=np.float64)[..., None] + (oy - y_0)
        e_sq = e1 * e1 + e2 * e2
        det = 1.0 - e_sq
        numerator = (1.0 + e_sq) * (dx * dx + dy * dy) - 2.0 * (
            e1 * (dx * dx - dy * dy) + 2.0 * e2 * dx * dy
        )
        return dx, dy, det, numerator

    def _average(self, values):
        """Mean over the sub-samples (the last axis): the pixel integral."""
        return values @ _subpixel_grid(self.oversample)[2]

    def _derivatives(self, unit, dq, d_fwhm, extra, dx, dy, det, numerator, e1, e2):
        """Pixel-averaged derivatives from ``dq = d profile / d Q`` and the radial ones."""
        e_sq = e1 * e1 + e2 * e2
        parts = [
            unit,
            dq * (-2.0 / det) * ((1 + e_sq - 2 * e1) * dx - 2 * e2 * dy),
            dq * (-2.0 / det) * ((1 + e_sq + 2 * e1) * dy - 2 * e2 * dx),
            d_fwhm,
            dq
            * (
                (2 * e1 * (dx * dx + dy * dy) - 2 * (dx * dx - dy * dy)) / det
                + numerator * 2 * e1 / det**2
            ),
            dq * ((2 * e2 * (dx * dx + dy * dy) - 4 * dx * dy) / det + numerator * 2 * e2 / det**2),
            *extra,
        ]
        return list(self._average(np.stack(parts)))


class _PixelMoffat2D(_PixelIntegrated2D):
    """Elliptical Moffat ``A (1 + Q / alpha^2)^-beta`` integrated over pixels."""

    beta = Parameter(default=3.0, bounds=_BETA_BOUNDS)

    def evaluate(self, x, y, amplitude, x_0, y_0, fwhm, e1, e2, beta):
        _, _, det, numerator = self._geometry(x, y, x_0, y_0, e1, e2)
        alpha2 = fwhm * fwhm / (4 * (2 ** (1 / beta) - 1))
        return amplitude * self._average(np.exp(-beta * np.log1p(numerator / (det * alpha2))))

    def fit_deriv(self, x, y, amplitude, x_0, y_0, fwhm, e1, e2, beta):
        dx, dy, det, numerator = self._geometry(x, y, x_0, y_0, e1, e2)
        c2 = 2 ** (1 / beta) - 1
        alpha2 = fwhm * fwhm / (4 * c2)
        q = numerator / det
        log_t = np.log1p(q / alpha2)
        unit = np.exp(-beta * log_t)
        dq = -amplitude * beta * unit / (alpha2 + q)
        d_fwhm = (-2.0 / fwhm) * dq * q
        # At a fixed FWHM, beta moves alpha: d(alpha^2)/d(beta) = alpha^2 2^(1/b) ln 2 / (b^2 c2).
        dalpha2 = alpha2 * 2 ** (1 / beta) * math.log(2) / (beta * beta * c2)
        d_beta = -amplitude * unit * log_t - dq * (q / alpha2) * dalpha2
        return self._derivatives(unit, dq, d_fwhm, [d_beta], dx, dy, det, numerator, e1, e2)


class _PixelGaussian2D(_PixelIntegrated2D):
    """Elliptical Gaussian ``A exp(-Q / 2 sigma^2)`` integrated over pixels."""

    def evaluate(self, x, y, amplitude, x_0, y_0, fwhm, e1, e2):
        _, _, det, numerator = self._geometry(x, y, x_0, y_0, e1, e2)
        sigma2 = (fwhm * _SIGMA_PER_FWHM) ** 2
        return amplitude * self._average(np.exp(numerator / (-2 * sigma2 * det)))

    def fit_deriv(self, x, y, amplitude, x_0, y_0, fwhm, e1, e2):
        dx, dy, det, numerator = self._geometry(x, y, x_0, y_0, e1, e2)
        sigma2 = (fwhm * _SIGMA_PER_FWHM) ** 2
        q = numerator / det
        unit = np.exp(q / (-2 * sigma2))
        dq = (-amplitude / (2 * sigma2)) * unit
        d_fwhm = (-2.0 / fwhm) * dq * q
        return self._derivatives(unit, dq, d_fwhm, [], dx, dy, det, numerator, e1, e2)


class _LocalSky(astropy_models.Const2D):
    """`Const2D` with its (trivial) derivative, so that the compound model has one too."""

    @staticmethod
    def fit_deriv(x, y, amplitude):
        return [np.ones(np.shape(x))]


def _shape_of(fwhm_mean, e1, e2):
    """Major-axis FWHM, axis ratio and angle (degrees in [0, 180)) from the fitted shape."""
    e = np.minimum(np.hypot(e1, e2), 0.999)
    ratio = (1 - e) / (1 + e)
    major = fwhm_mean / np.sqrt(ratio)
    angle = np.degrees(0.5 * np.arctan2(e2, e1)) % 180.0
    return major, ratio, angle


class _StarFitter:
    """Fits of single stars: ``Const2D`` sky plus a pixel-integrated profile, by TRF.

    One compound model is kept and refitted in place for each star (astropy copies a model
    per fit otherwise, which costs more than the fit of a small star).
    """

    def __init__(self, kind: str, fwhm: float):
        profile = _PixelGaussian2D() if kind == "gaussian" else _PixelMoffat2D()
        # A 3 x 3 sub-grid integrates well-sampled stars to 0.1 %; small ones get 5 x 5.
        profile.oversample = _OVERSAMPLE if fwhm < 2.5 else 3
        self.kind = kind
        self.fwhm = fwhm
        self.model = _LocalSky() + profile
        self.fitter = fitting.TRFLSQFitter(calc_uncertainties=True)

    def __call__(self, residual, window, x, y, *, beta=None, fix_beta=False) -> dict | None:
        """Fit the sky-subtracted pixels in ``window`` around a star near ``(x, y)``."""
        from astropy.utils.exceptions import AstropyUserWarning

        cut = residual[window].astype(np.float64)
        xx, yy = self._coordinates(window)
        edge = np.concatenate([cut[0], cut[-1], cut[1:-1, 0], cut[1:-1, -1]])
        sky = float(np.median(edge))
        peak = float(cut.max() - sky)
        if not peak > 0:
            return None
        model = self.model
        reach = max(1.5, 0.5 * self.fwhm)
        model.amplitude_0 = sky
        model.amplitude_1 = 1.2 * peak
        model.x_0_1, model.y_0_1 = x, y
        model.x_0_1.bounds = (x - reach, x + reach)
        model.y_0_1.bounds = (y - reach, y + reach)
        model.fwhm_1 = self.fwhm
        model.fwhm_1.bounds = (_FWHM_FLOOR, float(cut.shape[0]))
        model.e1_1 = model.e2_1 = 0.0
        if self.kind == "moffat":
            model.beta_1 = 3.0 if beta is None else beta
            model.beta_1.fixed = fix_beta
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", AstropyUserWarning)
                warnings.simplefilter("ignore", RuntimeWarning)
                self.fitter(model, xx, yy, cut, maxiter=100, acc=1e-6, inplace=True)
        except (ValueError, np.linalg.LinAlgError, fitting.NonFiniteValueError):
            return None
        values = dict(zip(model.param_names, (float(v) for v in model.parameters), strict=True))
        if not all(np.isfinite(v) for v in values.values()):
            return None
        star_model = model[1](xx, yy)
        misfit = cut - values["amplitude_0"] - star_model
        errors = _standard_errors(model)
        beta_value = values.get("beta_1", float("nan"))
        return {
            "amplitude": values["amplitude_1"],
            "x": values["x_0_1"],
            "y": values["y_0_1"],
            "fwhm_mean": values["fwhm_1"],
            "e1": values["e1_1"],
            "e2": values["e2_1"],
            "beta": beta_value,
            "sky": values["amplitude_0"],
            "errors": errors,
            "flux": self._flux(values["amplitude_1"], values["fwhm_1"], beta_value),
            "misfit2": float(np.sum(misfit * misfit)),
            "signal2": float(np.sum(star_model * star_model)),
            "pixels": int(cut.size),
            "converged": bool(self.fitter.fit_info.status > 0),
            "at_bounds": _at_bounds(model),
        }

    @staticmethod
    def _coordinates(window):
        """Column and row coordinates of the pixel centres of a window."""
        rows = np.arange(window[0].start, window[0].stop, dtype=np.float64)
        cols = np.arange(window[1].start, window[1].stop, dtype=np.float64)
        return np.broadcast_to(cols, (rows.size, cols.size)), np.broadcast_to(
            rows[:, None], (rows.size, cols.size)
        )

    def _flux(self, amplitude, fwhm, beta) -> float:
        """Integral of the profile over the plane (the quadratic form has determinant 1)."""
        if self.kind == "gaussian":
            return amplitude * 2 * math.pi * (fwhm * _SIGMA_PER_FWHM) ** 2
        return amplitude * math.pi * fwhm * fwhm / (4 * (2 ** (1 / beta) - 1)) / (beta - 1)


def _standard_errors(model) -> dict:
    """1-sigma errors of the free shape parameters (inf where the fit did not give them)."""
    errors = {}
    stds = getattr(model, "stds", None)
    for name in ("fwhm", "e1", "e2", "beta"):
        value = math.inf
        if stds is not None:
            try:
                value = float(stds[f"{name}_1"])
            except (KeyError, TypeError, ValueError):
                value = math.inf
        errors[name] = value if np.isfinite(value) and value > 0 else math.inf
    return errors


def _at_bounds(model) -> set[str]:
    """Names (without the ``_1`` suffix) of free profile parameters that ended on a bound."""
    hit = set()
    for name in model.param_names:
        if not name.endswith("_1") or name == "amplitude_1":
            continue
        parameter = getattr(model, name)
        if parameter.fixed:
            continue
        low, high = parameter.bounds
        value = float(parameter.value)
        span = 1e-6 * max(1.0, abs(value))
        if (low is not None and value <= low + span) or (high is not None and value >= high - span):
            hit.add(name[:-2])
    return hit


# --- measurement ------------------------------------------------------------------------------


class _Measurement:
    """The fits of the candidates, their rejections and the combined model."""

    def __init__(self, residual, no_data, stars, reasons, box, fwhm, local_noise, kind):
        self.residual = residual
        self.no_data = no_data
        self.stars = stars
        self.reasons = reasons
        self.box = box
        self.local_noise = local_noise
        self.kind = kind
        self.shape = residual.shape
        self.fitter = _StarFitter(kind, fwhm)
        self.fits: list[dict | None] = [None] * len(stars["x"])
        self.trends: dict[str, _Trend] = {}
        self.degree = 0

    def run(self, grid) -> None:
        """Fit, judge, combine; afterwards ``reasons`` holds every star's verdict."""
        self.degree = self._degree(grid, int(np.sum(self.reasons == "")))
        beta = None
        if self.kind == "moffat":
            self.trends["beta"] = self._free_beta()
            beta = self.trends["beta"]
        for i in np.nonzero(self.reasons != _EDGE)[0]:
            x, y = self.stars["x"][i], self.stars["y"][i]
            value = None if beta is None else float(beta(y, x))
            self.fits[i] = self._fit(i, beta=value, fix_beta=beta is not None)
            if self.reasons[i] == "":
                self.reasons[i] = self._verdict(self.fits[i])
        self.degree = self._degree(grid, int(np.sum(self.reasons == "")))
        self._combine_shape()

    def _fit(self, i, **options):
        x, y = self.stars["x"][i], self.stars["y"][i]
        window = _window(self.shape, x, y, self.box // 2)
        return self.fitter(self.residual, window, x, y, **options)

    def _verdict(self, fit, *, strict: bool = True) -> str:
        """'' for a fit to keep, else the reason to refuse the star."""
        if fit is None or not fit["converged"]:
            return _POOR
        _, ratio, _ = _shape_of(fit["fwhm_mean"], fit["e1"], fit["e2"])
        if fit["fwhm_mean"] * math.sqrt(ratio) < _MIN_STAR_FWHM:
            return _SHARP
        if {"x_0", "y_0", "fwhm"} & fit["at_bounds"]:
            return _POOR
        if strict:
            if {"e1", "e2"} & fit["at_bounds"]:
                return _POOR
            excess = fit["misfit2"] - fit["pixels"] * self._noise_at(fit["x"], fit["y"]) ** 2
            if excess > (_RESIDUAL_MAX**2) * fit["signal2"]:
                return _POOR
        return ""

    def _noise_at(self, x: float, y: float) -> float:
        """Sky noise per pixel at (x, y), from the RMS mesh of `Background2D`."""
        mesh, box = self.local_noise
        row = min(max(int(y // box), 0), mesh.shape[0] - 1)
        col = min(max(int(x // box), 0), mesh.shape[1] - 1)
        return float(mesh[row, col])

    @staticmethod
    def _degree(grid, usable: int) -> int:
        if grid is None or tuple(grid) == (1, 1):
            return 0
        for degree in (2, 1):
            if usable >= STARS_PER_TERM * (degree + 1) * (degree + 2) // 2:
                return degree
        return 0

    def _free_beta(self) -> _Trend:
        """``beta`` from free fits of the brightest candidates, spread over the field.

        Fits that end on a bound of ``beta`` count too: when most do (a Gaussian-like PSF
        runs to the upper bound), the bound is the answer.
        """
        order = _spread(self.stars, np.nonzero(self.reasons == "")[0], self.shape, cells=4)
        values, errors, xs, ys = [], [], [], []
        for i in order[:_FREE_FITS]:
            fit = self._fit(i)
            if fit is None or self._verdict(fit, strict=False):
                continue
            values.append(fit["beta"])
            errors.append(fit["errors"]["beta"])
            xs.append(fit["x"])
            ys.append(fit["y"])
        if not values:
            return _Trend.constant(3.0)
        degree = self._degree_for(len(values))
        trend, _ = _Trend.fit(xs, ys, values, errors, degree, self.shape)
        return trend

    def _degree_for(self, count: int) -> int:
        for degree in range(self.degree, 0, -1):
            if count >= STARS_PER_TERM * (degree + 1) * (degree + 2) // 2:
                return degree
        return 0

    def _combine_shape(self) -> None:
        """FWHM and ellipticity trends, with sigma clipping; outliers become 'poor fit'."""
        idx = np.nonzero(self.reasons == "")[0]
        if len(idx) == 0:
            return
        x = np.array([self.fits[i]["x"] for i in idx])
        y = np.array([self.fits[i]["y"] for i in idx])
        names = ("fwhm_mean", "e1", "e2")
        errors = {"fwhm_mean": "fwhm", "e1": "e1", "e2": "e2"}
        outliers = np.zeros(len(idx), dtype=bool)
        for name in names:
            values = np.array([self.fits[i][name] for i in idx])
            sigma = np.array([self.fits[i]["errors"][errors[name]] for i in idx])
            _, clipped = _Trend.fit(x, y, values, sigma, self.degree, self.shape)
            outliers |= clipped
        if outliers.all():
            outliers[:] = False
        for i in idx[outliers]:
            self.reasons[i] = _POOR
        keep = ~outliers
        for name in names:
            values = np.array([self.fits[i][name] for i in idx])
            sigma = np.array([self.fits[i]["errors"][errors[name]] for i in idx])
            trend, _ = _Trend.fit(
                x[keep], y[keep], values[keep], sigma[keep], self.degree, self.shape, clip=False
            )
            self.trends[name] = trend

    # Results ------------------------------------------------------------------------------

    def usable(self) -> int:
        return int(np.sum(self.reasons == ""))

    def shape_model(self) -> _ShapeModel:
        """The combined model, on its own (it keeps no image alive)."""
        return _ShapeModel(dict(self.trends))

    def table(self) -> Table:
        n = len(self.stars["x"])
        columns = {name: np.full(n, np.nan) for name in ("fwhm", "ratio", "angle", "beta")}
        x = self.stars["x"].copy()
        y = self.stars["y"].copy()
        flux = self.stars["flux"].copy()
        for i, fit in enumerate(self.fits):
            if fit is None:
                continue
            major, ratio, angle = _shape_of(fit["fwhm_mean"], fit["e1"], fit["e2"])
            columns["fwhm"][i], columns["ratio"][i], columns["angle"][i] = major, ratio, angle
            columns["beta"][i] = fit["beta"]
            flux[i] = fit["flux"]
            if self.reasons[i] == "":
                x[i], y[i] = fit["x"], fit["y"]
        width = max(len(r) for r in REJECTION_REASONS)
        reason = np.array([str(r) for r in self.reasons], dtype=f"<U{width}")
        return Table(
            {
                "x": x,
                "y": y,
                "flux": flux,
                "peak": self.stars["peak"].copy(),
                **columns,
                "used": reason == "",
                "reason": reason,
            },
            meta={
                "detection_fwhm": float(self.fitter.fwhm),
                "box": int(self.box),
                "degree": int(self.degree),
            },
        )


def _spread(stars, indices, shape, *, cells: int) -> np.ndarray:
    """``indices`` by decreasing flux, taking the brightest of each of ``cells x cells``
    regions in turn, so that any prefix covers the field."""
    indices = np.asarray(indices, dtype=np.intp)
    if len(indices) == 0:
        return indices
    height, width = shape
    row = np.clip((stars["y"][indices] * cells / height).astype(int), 0, cells - 1)
    col = np.clip((stars["x"][indices] * cells / width).astype(int), 0, cells - 1)
    cell = row * cells + col
    flux = stars["flux"][indices]
    by_flux = np.argsort(-flux, kind="stable")
    rank = np.empty(len(indices), dtype=np.int64)
    seen = np.zeros(cells * cells, dtype=np.int64)
    for j in by_flux:
        rank[j] = seen[cell[j]]
        seen[cell[j]] += 1
    return indices[np.lexsort((-flux, rank))]


class _ShapeModel:
    """The combined PSF model: each parameter's trend over the image."""

    def __init__(self, trends: dict):
        self.trends = trends

    def trend_parameters(self, y: float, x: float) -> tuple[float, float, float, float]:
        """``(fwhm_mean, e1, e2, beta)`` of the Moffat trend at pixel ``(y, x)``."""
        return (
            float(self.trends["fwhm_mean"](y, x)),
            float(self.trends["e1"](y, x)),
            float(self.trends["e2"](y, x)),
            float(self.trends["beta"](y, x)),
        )

    def parameters_at(self, y: float, x: float) -> dict:
        """``{'fwhm', 'ratio', 'angle', 'beta'}`` at pixel ``(y, x)`` (beta NaN if Gaussian)."""
        fwhm_mean = float(self.trends["fwhm_mean"](y, x))
        e1 = float(self.trends["e1"](y, x))
        e2 = float(self.trends["e2"](y, x))
        major, ratio, angle = _shape_of(fwhm_mean, e1, e2)
        beta = float(self.trends["beta"](y, x)) if "beta" in self.trends else float("nan")
        return {"fwhm": float(major), "ratio": float(ratio), "angle": float(angle), "beta": beta}


class _Trend:
    """A parameter as a function of position: a constant or a 2-D polynomial, clamped to the
    range of the stars it was fitted to (no wild extrapolation into empty corners)."""

    def __init__(self, function, low: float, high: float):
        self._function = function
        self._low, self._high = low, high

    def __call__(self, y, x):
        return np.clip(self._function(y, x), self._low, self._high)

    @classmethod
    def constant(cls, value: float) -> _Trend:
        return cls(lambda y, x: value, value, value)

    @classmethod
    def fit(cls, x, y, values, errors, degree, shape, *, clip: bool = True):
        """Fit ``values`` (1-sigma ``errors``) measured at ``(x, y)``.

        The centre is the median (degree 0) or a weighted least-squares polynomial; clipping
        refuses stars further than `_CLIP_SIGMA` of their own error and of the intrinsic scatter
        of the stars from the trend (found so that the normalized residuals have unit spread).

        Returns
        -------
        trend : _Trend
        clipped : (N,) bool ndarray
            The stars refused.
        """
        values = np.asarray(values, dtype=np.float64)
        errors = np.asarray(errors, dtype=np.float64)
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        height, width = shape
        u = (x - (width - 1) / 2) / (width / 2)
        v = (y - (height - 1) / 2) / (height / 2)
        if len(values) < 3:
            degree, clip = 0, False
        kept = np.ones(len(values), dtype=bool)
        finite_errors = np.isfinite(errors)
        floor = np.median(errors[finite_errors]) if finite_errors.any() else 1.0
        errors = np.where(finite_errors, errors, 10 * floor)
        for _ in range(10 if clip else 1):
            centre = _central(u[kept], v[kept], values[kept], errors[kept], degree, 0.0)
            residuals = values - centre(u, v)
            scatter = _intrinsic_scatter(residuals[kept], errors[kept])
            centre = _central(u[kept], v[kept], values[kept], errors[kept], degree, scatter)
            if not clip:
                break
            residuals = values - centre(u, v)
            now = np.abs(residuals) <= _CLIP_SIGMA * np.sqrt(errors**2 + scatter**2)
            if now.sum() < 3 or (now == kept).all():
                kept = now if now.sum() >= 3 else kept
                break
            kept = now
        centre = _central(u[kept], v[kept], values[kept], errors[kept], degree, scatter)
        low, high = float(values[kept].min()), float(values[kept].max())

        def function(yy, xx):
            return centre(
                (xx - (width - 1) / 2) / (width / 2), (yy - (height - 1) / 2) / (height / 2)
            )

        return cls(function, low, high), ~kept


def _central(u, v, values, errors, degree, scatter):
    """The centre of ``values``: median for degree 0, else a weighted polynomial in (u, v)."""
    if degree == 0 or len(values) <= (degree + 1) * (degree + 2) // 2:
        median = float(np.median(values))
        return lambda uu, vv: np.full(np.shape(uu), median) if np.ndim(uu) else median
    weights = 1.0 / np.sqrt(errors**2 + scatter**2)
    polynomial = fitting.LinearLSQFitter()(
        astropy_models.Polynomial2D(degree), u, v, values, weights=weights
    )
    return polynomial


def _intrinsic_scatter(residuals, errors) -> float:
    """``s`` such that ``residuals / sqrt(errors^2 + s^2)`` has a robust spread of 1."""
    from astropy.stats import mad_std

    def spread(s):
        return mad_std(residuals / np.sqrt(errors**2 + s * s))

    if len(residuals) < 3 or spread(0.0) <= 1.0:
        return 0.0
    low, high = 0.0, float(mad_std(residuals)) * 2 + 1e-12
    for _ in range(40):
        mid = 0.5 * (low + high)
        if spread(mid) > 1.0:
            low = mid
        else:
            high = mid
    return high


# --- requirements and rendering ---------------------------------------------------------------


def _require_stars(measurement: _Measurement, grid) -> None:
    """Refuse, in one line, a measurement with too few usable stars for the PSF or grid."""
    usable = measurement.usable()
    found = len(measurement.reasons)
    counts = ", ".join(
        f"{int(np.sum(measurement.reasons == r))} {r}"
        for r in REJECTION_REASONS
        if np.any(measurement.reasons == r)
    )
    if usable == 0:
        raise _no_stars_error(f"that can be measured ({found} candidates: {counts})")
    nodes = 1 if grid is None else grid[0] * grid[1]
    needed = STARS_PER_NODE * nodes
    if usable >= needed:
        return
    if grid is None:
        msg = (
            f"only {usable} usable star(s) found ({found} candidates: {counts}), a PSF needs "
            f"at least {needed}: {_NO_STARS_HINT}"
        )
        raise GpudeconvError(msg)
    side = math.isqrt(usable // STARS_PER_NODE)
    advice = (
        f"they support a grid up to {side}x{side}; use --grid {side}x{side} or fewer nodes"
        if side >= 1
        else "too few for a PSF field: omit the grid, or give the PSF by hand with --psf-fwhm"
    )
    msg = (
        f"{usable} usable stars found, but a {grid[0]}x{grid[1]} grid needs at least {needed} "
        f"({STARS_PER_NODE} per node): {advice}"
    )
    raise GpudeconvError(msg)


def _render_size(parameters: dict, kind: str) -> int:
    fwhm, beta = parameters["fwhm"], parameters["beta"]
    if kind == "gaussian":
        radius = fwhm * _SIGMA_PER_FWHM * math.sqrt(-2 * math.log(_TAIL))
    else:
        alpha = fwhm / (2 * math.sqrt(2 ** (1 / beta) - 1))
        radius = alpha * math.sqrt(_TAIL ** (-1 / beta) - 1)
    size = max(2 * math.ceil(radius) + 1, _odd(4 * fwhm + 1))
    return int(min(size, _MAX_SIZE))


def _render(parameters: dict, kind: str, size: int) -> np.ndarray:
    shape = {"size": size, "ratio": parameters["ratio"], "angle": parameters["angle"]}
    if kind == "gaussian":
        psf = models.gaussian(parameters["fwhm"], **shape)
    else:
        psf = models.moffat(parameters["fwhm"], parameters["beta"], **shape)
    psf = psf.astype(np.float64)
    return psf / psf.sum()


def _render_parametric(parameters_at, kind, grid, shape, size):
    height, width = shape
    if grid is None:
        parameters = parameters_at((height - 1) / 2, (width - 1) / 2)
        return _render(parameters, kind, size or _render_size(parameters, kind))
    rows = _node_positions(height, grid[0])
    cols = _node_positions(width, grid[1])
    if size is None:
        size = max(_render_size(parameters_at(r, c), kind) for r in rows for c in cols)
    return PSFField.from_function(
        lambda y, x: _render(parameters_at(y, x), kind, size), shape, grid, size=size
    )


# --- empirical PSF ----------------------------------------------------------------------------


def _empirical(measurement: _Measurement, model: _ShapeModel, grid, shape, size):
    """Empirical PSFs: the Moffat trend plus the stack of the stars' residuals from it.

    For each used star, its cut-out (sky-subtracted by `Background2D`, not by the fit's local
    constant, which soaks up any misfit of the model's wings) is scaled to unit flux under the
    trend's model of it and the model subtracted; the residual is shifted to the centre (cubic
    spline: residuals are smooth and small, so the interpolation costs nothing measurable).
    The PSF at a node is the model there plus the weighted mean of the residuals, sigma-clipped
    pixel by pixel, each star weighted by its bilinear weight at the node (all 1 for one PSF)
    and by the inverse of its mean squared residual (noisy faint stars count less): DAOPHOT's
    analytic PSF with an empirical look-up table [1]_. It keeps what the model misses (a
    Gaussian core, a non-Moffat halo, a coma tail), and a node takes the local shape from the
    trend rather than from a blend of its region's different stars.
    """
    height, width = shape
    single = grid is None
    grid = (1, 1) if single else grid
    rows = _node_positions(height, grid[0])
    cols = _node_positions(width, grid[1])
    if size is None:
        size = max(_render_size(model.parameters_at(r, c), "moffat") for r in rows for c in cols)
    # Cut-outs a little wider than the PSF, so that the shift to the centre fills it.
    index, residuals, weights = _star_residuals(measurement, model, size, size + 2 * _CUTOUT_MARGIN)
    if len(index) < STARS_PER_NODE:
        msg = (
            f"only {len(index)} used stars fit whole in a {size}x{size} cut-out, an empirical "
            f"PSF needs {STARS_PER_NODE}: use model='moffat'"
        )
        raise GpudeconvError(msg)
    x = np.array([measurement.fits[i]["x"] for i in index])
    y = np.array([measurement.fits[i]["y"] for i in index])
    field = PSFField(np.ones((grid[0], grid[1], 1, 1)), shape)  # for its bilinear weights
    psfs = np.zeros((grid[0], grid[1], size, size))
    for a, row in enumerate(rows):
        for b, col in enumerate(cols):
            proximity = _node_weight(field, y, 0, a) * _node_weight(field, x, 1, b)
            near = proximity > 0
            if near.sum() < STARS_PER_NODE:
                msg = (
                    f"PSF node ({a}, {b}) at (y, x) = ({row:.0f}, {col:.0f}) has only "
                    f"{int(near.sum())} usable stars around it, an empirical PSF needs "
                    f"{STARS_PER_NODE}: use a coarser grid, or model='moffat'"
                )
                raise GpudeconvError(msg)
            correction = _clipped_mean(residuals[near], proximity[near] * weights[near])
            node = _render(model.parameters_at(row, col), "moffat", size) + correction
            node = np.clip(node, 0.0, None)
            psfs[a, b] = node / node.sum()
    return psfs[0, 0] if single else PSFField(psfs, shape)


def _node_weight(field: PSFField, coords, axis: int, node: int) -> np.ndarray:
    """Bilinear weight of node ``node`` along ``axis`` at each of ``coords``."""
    index, frac = field.axis_weights(coords, axis)
    return np.where(index == node, 1 - frac, 0.0) + np.where(index + 1 == node, frac, 0.0)


def _star_residuals(measurement: _Measurement, shape_model: _ShapeModel, size: int, side: int):
    """The used stars' residuals from the Moffat trend, per unit flux, centred, ``size^2``.

    Returns the indices of the stars whose ``side x side`` cut-out lies whole in the data (the
    others are refused: 'edge or no-data'), their ``(N, size, size)`` residuals and weights.
    """
    from scipy.ndimage import shift

    model = _PixelMoffat2D()
    model.oversample = _OVERSAMPLE
    centre = side // 2
    crop = slice(centre - size // 2, centre + size // 2 + 1)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float64)
    index, residuals = [], []
    for i in np.nonzero(measurement.reasons == "")[0]:
        fit = measurement.fits[i]
        window = _window(measurement.shape, fit["x"], fit["y"], centre)
        if window is None or measurement.no_data[window].any():
            measurement.reasons[i] = _EDGE
            continue
        cut = measurement.residual[window].astype(np.float64)
        x0, y0 = fit["x"] - window[1].start, fit["y"] - window[0].start
        parameters = shape_model.trend_parameters(fit["y"], fit["x"])
        unit = model.evaluate(xx, yy, 1.0, x0, y0, *parameters) / _unit_flux(parameters)
        flux = float(np.sum(cut * unit) / np.sum(unit * unit))  # least squares, shape held
        if not flux > 0:
            measurement.reasons[i] = _POOR
            continue
        residual = shift(cut / flux - unit, (centre - y0, centre - x0), order=3)
        index.append(i)
        residuals.append(residual[crop, crop])
    if not residuals:
        return np.zeros(0, dtype=np.intp), np.zeros((0, size, size)), np.zeros(0)
    residuals = np.array(residuals)
    variance = np.mean(residuals**2, axis=(1, 2))
    return np.array(index), residuals, 1.0 / np.maximum(variance, np.finfo(float).tiny)


def _unit_flux(parameters) -> float:
    """Integral over the plane of `_PixelMoffat2D` with amplitude 1 (fwhm, e1, e2, beta)."""
    fwhm, _, _, beta = parameters
    return math.pi * fwhm * fwhm / (4 * (2 ** (1 / beta) - 1)) / (beta - 1)


def _clipped_mean(stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted mean over the first axis, values beyond 3 sigma of each pixel's median out."""
    from astropy.stats import sigma_clip

    clipped = sigma_clip(stack, sigma=_CLIP_SIGMA, axis=0, maxiters=5)
    w = weights[:, None, None] * ~np.ma.getmaskarray(clipped)
    total = w.sum(axis=0)
    return np.where(total > 0, (w * stack).sum(axis=0) / np.where(total > 0, total, 1), 0.0)
