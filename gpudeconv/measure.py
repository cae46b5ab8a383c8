"""Star sharpness at known positions: the FWHM that the demo and the tests report.

Small on purpose: stars are given (a synthetic scene's catalogue); finding them in an image is
the job of the star detection that PSF estimation will bring.
"""

from __future__ import annotations

import warnings

import numpy as np
from astropy.table import Table

from ._errors import GpudeconvError

__all__ = ["median_fwhm", "select_measurable_stars", "star_fwhm"]

#: Photutils fit flags that make a FWHM meaningless: position outside the image, non-positive
#: flux, possible non-convergence, a parameter at its bound (FWHM 0), no or too few pixels,
#: non-finite results. (Not 1, "partial fit region": stars touching edges or NaN are refused
#: before the fit; not 16, "no covariance", which says nothing about the value.)
_FAILED_FIT = 2 | 4 | 8 | 32 | 64 | 128 | 256 | 512 | 1024
#: The automatic fit box is this many FWHM wide: the core of the profile, where a Gaussian fit
#: measures the FWHM without being widened by Moffat-like wings.
_BOX_IN_FWHM = 1.25
_FIRST_PASS_BOX = 9
_MIN_BOX = 5


def _validate_positions(positions) -> np.ndarray:
    if isinstance(positions, Table):
        positions = np.column_stack([positions["x"], positions["y"]])
    xy = np.asarray(positions, dtype=np.float64)
    if xy.size == 0:
        return xy.reshape(0, 2)
    xy = np.atleast_2d(xy)
    if xy.ndim != 2 or xy.shape[1] != 2:
        msg = f"positions must be (x, y) pairs, an array of shape (N, 2), got shape {xy.shape}"
        raise GpudeconvError(msg)
    return xy


def _odd(value: float) -> int:
    return int(2 * round((value - 1) / 2) + 1)


def star_fwhm(image, positions, *, box: int | None = None) -> np.ndarray:
    """FWHM of stars at known positions, by Gaussian fits with a local background.

    Parameters
    ----------
    image : (H, W) array_like
        The image, background included (it is measured around each star).
    positions : (N, 2) array_like or Table
        ``(x, y)`` of each star, ``x`` the column and ``y`` the row, 0-based pixel centres; a
        table with columns ``x`` and ``y`` works too.
    box : odd int, optional
        Side of the square fitted around each star. By default about 1.25 times the stars'
        median FWHM (at least 5), found by a first pass with a 9-pixel box.

    Returns
    -------
    fwhm : (N,) ndarray of float64
        In pixels; NaN for stars whose neighbourhood (fit box and background annulus) leaves the
        image or holds NaN, and for failed fits.

    Notes
    -----
    Each star is fitted with photutils' pixel-integrated circular Gaussian
    (``CircularGaussianPRF``, as ``photutils.psf.fit_fwhm`` does) after subtracting the
    sigma-clipped mode of an annulus from ``2 * box`` to ``2 * box + 5`` pixels. The box keeps
    to the core: a Gaussian fitted to a wider window of a Moffat star grows with the window.
    The measure is meant for comparisons (before and after a restoration, against the PSF
    measured the same way); on a Moffat PSF with beta = 3 and FWHM 4 it reads about 4 % above
    the model's FWHM.
    """
    data = np.asarray(image, dtype=np.float64)
    if data.ndim != 2:
        msg = f"image must be 2-D (H, W), got shape {data.shape}"
        raise GpudeconvError(msg)
    xy = _validate_positions(positions)
    if box is not None and (int(box) != box or box < 3 or box % 2 == 0):
        msg = f"box must be an odd integer of at least 3 pixels, got {box!r}; e.g. 5 or 7"
        raise GpudeconvError(msg)
    if len(xy) == 0:
        return np.zeros(0)
    if box is None:
        first = _fit_fwhm(data, xy, _FIRST_PASS_BOX)
        if not np.isfinite(first).any():
            return first
        box = max(_MIN_BOX, _odd(_BOX_IN_FWHM * float(np.nanmedian(first))))
    return _fit_fwhm(data, xy, int(box))


def _fit_fwhm(data: np.ndarray, xy: np.ndarray, box: int) -> np.ndarray:
    """One pass of Gaussian fits with a fixed box; NaN where a star cannot be measured."""
    from astropy.utils.exceptions import AstropyUserWarning
    from photutils.background import LocalBackground, MMMBackground
    from photutils.psf import CircularGaussianPRF, PSFPhotometry

    inner = 2 * box
    outer = inner + 5
    fwhm = np.full(len(xy), np.nan)
    measurable = np.array([_clean_neighbourhood(data, x, y, outer) for x, y in xy], dtype=bool)
    if not measurable.any():
        return fwhm
    model = CircularGaussianPRF(fwhm=box / 2)
    model.fwhm.fixed = False
    model.fwhm.min = 0.0
    photometry = PSFPhotometry(
        model,
        box,
        local_bkg_estimator=LocalBackground(inner, outer, bkg_estimator=MMMBackground()),
        aperture_radius=box / 2,
    )
    chosen = xy[measurable]
    init = Table({"x": chosen[:, 0], "y": chosen[:, 1]})
    with warnings.catch_warnings():
        # Failed fits are reported per star (NaN), not as warnings.
        warnings.simplefilter("ignore", AstropyUserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        result = photometry(data, init_params=init)
    fitted = np.asarray(result["fwhm_fit"], dtype=np.float64)
    flags = np.asarray(result["flags"], dtype=np.int64)
    moved = np.hypot(result["x_fit"] - chosen[:, 0], result["y_fit"] - chosen[:, 1]) > box / 2
    failed = ((flags & _FAILED_FIT) != 0) | np.asarray(moved) | ~(fitted > 0)
    fwhm[measurable] = np.where(failed, np.nan, np.abs(fitted))
    return fwhm


def _clean_neighbourhood(data: np.ndarray, x: float, y: float, half: int) -> bool:
    """Whether the square of half-side ``half`` around (x, y) lies in the image, all finite."""
    if not (np.isfinite(x) and np.isfinite(y)):
        return False
    col, row = round(x), round(y)
    height, width = data.shape
    if row - half < 0 or col - half < 0 or row + half >= height or col + half >= width:
        return False
    return bool(np.isfinite(data[row - half : row + half + 1, col - half : col + half + 1]).all())


def median_fwhm(image, positions, *, box: int | None = None) -> float:
    """Median FWHM (pixels) of the stars at ``positions`` that could be measured; NaN if none.

    See :func:`star_fwhm` for the parameters.
    """
    fwhm = star_fwhm(image, positions, box=box)
    fwhm = fwhm[np.isfinite(fwhm)]
    return float(np.median(fwhm)) if fwhm.size else float("nan")


def select_measurable_stars(
    stars: Table,
    image_shape: tuple[int, int],
    *,
    min_flux: float,
    max_flux: float = np.inf,
    isolation: float = 12.0,
    neighbours: Table | None = None,
) -> Table:
    """The stars of a catalogue whose FWHM can be measured cleanly.

    Parameters
    ----------
    stars : Table
        Columns ``x`` (column), ``y`` (row) and ``flux``.
    image_shape : (int, int)
        Rows and columns of the image.
    min_flux : float
        Fainter stars are too noisy to measure.
    max_flux : float
        Brighter stars may saturate (in a restored image too, as their peaks grow).
    isolation : float
        Radius in pixels (about 3 FWHM) within which no other source may hold more than a tenth
        of the star's flux; stars also keep this far from the image's edges.
    neighbours : Table, optional
        Other sources (``x``, ``y``, ``flux``; e.g. galaxies) that count against isolation but
        are never selected.

    Returns
    -------
    Table
        The selected rows of ``stars``, in their order.
    """
    from scipy.spatial import cKDTree

    if not (np.isfinite(isolation) and isolation > 0):
        msg = f"isolation must be a positive radius in pixels, got {isolation!r}; about 3 FWHM"
        raise GpudeconvError(msg)
    x = np.asarray(stars["x"], dtype=np.float64)
    y = np.asarray(stars["y"], dtype=np.float64)
    flux = np.asarray(stars["flux"], dtype=np.float64)
    height, width = image_shape
    inside = (
        (x >= isolation)
        & (y >= isolation)
        & (x <= width - 1 - isolation)
        & (y <= height - 1 - isolation)
    )
    candidates = np.nonzero(inside & (flux >= min_flux) & (flux <= max_flux))[0]
    if neighbours is not None and len(neighbours):
        all_x = np.concatenate([x, np.asarray(neighbours["x"], dtype=np.float64)])
        all_y = np.concatenate([y, np.asarray(neighbours["y"], dtype=np.float64)])
        all_flux = np.concatenate([flux, np.asarray(neighbours["flux"], dtype=np.float64)])
    else:
        all_x, all_y, all_flux = x, y, flux
    tree = cKDTree(np.column_stack([all_x, all_y]))
    keep = []
    for index in candidates:
        near = tree.query_ball_point((x[index], y[index]), isolation)
        rivals = [j for j in near if j != index and all_flux[j] > 0.1 * flux[index]]
        if not rivals:
            keep.append(index)
    return stars[np.asarray(keep, dtype=np.intp)]
