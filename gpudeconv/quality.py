"""How good a restoration is, in numbers: sharpness, noise, rings and photometry.

For a run's ``--report FILE.json``, for tests with thresholds and for benchmarks. Each measure
compares the image before a restoration with the image after it (or an image with a
reference) on the host, in NumPy, with the tools the field uses:

* stars: photutils `DAOStarFinder` on the sky-subtracted image, the sky and the noise from
  photutils `Background2D` (the machinery of `gpudeconv.psf.estimate`);
* sharpness: the FWHM of isolated, unsaturated, bright stars by Gaussian fits
  (`gpudeconv.measure.star_fwhm`), at the same positions before and after, per region;
* noise: the sigma-clipped standard deviation of the pixels far from any source (photutils
  `detect_sources` on the smoothed image, each source grown by its own size);
* rings: the depth of the dark ring that Richardson-Lucy [1]_ digs around bright and saturated
  stars [2]_, from the azimuthal median profile;
* photometry: photutils circular apertures with a median local background.

NaN marks no-data everywhere and is ignored. `restoration_report` gathers everything into a
dictionary that `json.dumps` writes as it is (no NaN: None for what could not be measured).

References
----------
.. [1] Lucy, L. B. (1974), "An iterative technique for the rectification of observed
       distributions", AJ 79, 745. doi:10.1086/111605
.. [2] White, R. L. (1994), "Image restoration using the damped Richardson-Lucy method",
       Proc. SPIE 2198, 1342. doi:10.1117/12.176819
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from astropy.table import Table
from scipy import ndimage

from ._errors import GpudeconvError
from .backend import is_cupy_array
from .measure import (
    _BOX_IN_FWHM,
    _FIRST_PASS_BOX,
    _MIN_BOX,
    _odd,
    _validate_positions,
    select_measurable_stars,
    star_fwhm,
)
from .psf.estimate import (
    _SATURATED,
    _THRESHOLD_SIGMA,
    _clipped_pixels,
    _detect,
    _find_stars,
    _first_of_each_saturated_star,
    _flat_top,
    _measure_sky,
)

__all__ = [
    "aperture_fluxes",
    "empty_sky_mask",
    "find_stars",
    "fwhm_by_region",
    "noise_gain",
    "psnr",
    "restoration_report",
    "ringing_score",
]

#: Smallest side of an image to measure (a star's box with room around it, as fit_psf needs).
_MIN_SIDE = 32
#: Source detection for the empty sky: photutils' recipe, a Gaussian of 3 px FWHM in a 5 px
#: kernel, and at least 5 connected pixels above the threshold.
_SEGMENT_KERNEL_FWHM = 3.0
_SEGMENT_KERNEL_SIZE = 5
_SEGMENT_PIXELS = 5
#: By default each source grows by this many times its own radius (that of a disc of its area),
#: at least `_MIN_GROWTH` px: the footprint ends where the star falls to a few sigma, and at
#: 2.5 times that radius a Moffat wing (beta = 3, falling as r**-6) is some 200 times fainter.
_GROWTH = 1.5
_MIN_GROWTH = 4.0
#: The empty sky must cover at least this fraction of the image's data, and this many pixels.
_MIN_SKY_FRACTION = 0.05
_MIN_SKY_PIXELS = 500
#: Stars whose FWHM and flux are compared: peak this far above the noise, unsaturated, with no
#: source of a tenth of their flux within 3 FWHM (`select_measurable_stars`).
_MIN_PEAK_SNR = 30.0
_ISOLATION_IN_FWHM = 3.0
#: Of the stars found, those wider than this times the median FWHM are galaxies or blends:
#: DAOFIND's sharpness does not set small galaxies apart (0.3 to 0.45 against 0.35 to 0.5).
_EXTENDED = 1.35
#: Where the dark ring is looked for, and where the local sky is measured, in FWHM.
_RING_ANNULUS = (1.0, 4.0)
_SKY_ANNULUS = (6.0, 9.0)
#: A star's annulus must hold at least this fraction of its pixels, finite and in the image.
_MIN_COVERAGE = 0.5
#: Apertures of the report: radius and background annulus, in FWHM.
_APERTURE_IN_FWHM = 3.0
_APERTURE_ANNULUS_IN_FWHM = (5.0, 8.0)
#: How `aperture_fluxes` measures the background annulus.
_BACKGROUNDS = ("median", "mean")
_CLIP_SIGMA = 3.0


# --- validation -------------------------------------------------------------------------------


def _validate_plane(image, name: str = "image") -> np.ndarray:
    """The image as a host ``(H, W)`` float array (float32 kept, integers to float32)."""
    array = image.get() if is_cupy_array(image) else np.asarray(image)
    if array.dtype.kind not in "uif":
        msg = f"{name} must hold real numbers, got dtype {array.dtype}"
        raise GpudeconvError(msg)
    if array.ndim != 2:
        msg = (
            f"{name} must be one 2-D plane (H, W), got shape {array.shape}; for colour pass one "
            "channel, or use restoration_report, which measures the channels' mean"
        )
        raise GpudeconvError(msg)
    if min(array.shape) < _MIN_SIDE:
        msg = (
            f"{name} is {array.shape[0]}x{array.shape[1]} pixels, too small to measure stars "
            f"in: give at least {_MIN_SIDE}x{_MIN_SIDE}"
        )
        raise GpudeconvError(msg)
    if array.dtype.kind != "f" or array.dtype.itemsize < 4:
        array = array.astype(np.float32)
    if not np.isfinite(array).any():
        msg = f"{name} holds no data (every pixel is NaN or infinite): check the file or the stack"
        raise GpudeconvError(msg)
    return array


def _validate_pair(before, after) -> tuple[np.ndarray, np.ndarray]:
    before = _validate_plane(before, "before")
    after = _validate_plane(after, "after")
    if before.shape != after.shape:
        msg = (
            f"before and after must have the same shape, got {before.shape} and {after.shape}; "
            "compare the restoration with the image it was made from"
        )
        raise GpudeconvError(msg)
    return before, after


def _validate_positive(value, name: str, example: str) -> float:
    if isinstance(value, bool) or not (
        isinstance(value, int | float | np.number) and np.isfinite(value) and value > 0
    ):
        msg = f"{name} must be a positive number, got {value!r}; {example}"
        raise GpudeconvError(msg)
    return float(value)


def _validate_dilate(dilate) -> float | None:
    if dilate is None:
        return None
    if isinstance(dilate, bool) or not (
        isinstance(dilate, int | float | np.number) and np.isfinite(dilate) and dilate >= 0
    ):
        msg = (
            f"dilate must be a radius in pixels (0 or more) or None (each source grown by its own "
            f"size), got {dilate!r}; e.g. 10"
        )
        raise GpudeconvError(msg)
    return float(dilate)


def _validate_grid(grid, shape: tuple[int, int]) -> tuple[int, int]:
    try:
        ny, nx = (int(v) for v in grid)
        valid = all(int(v) == v for v in grid) and ny >= 1 and nx >= 1
    except (TypeError, ValueError):
        valid = False
    if not valid:
        msg = (
            f"grid must be (rows, columns) of regions, two positive integers, got {grid!r}; "
            "e.g. (3, 3)"
        )
        raise GpudeconvError(msg)
    if ny > shape[0] or nx > shape[1]:
        msg = (
            f"a {ny}x{nx} grid has more regions than the {shape[0]}x{shape[1]} image has pixels "
            "along an axis: use fewer regions, e.g. (3, 3)"
        )
        raise GpudeconvError(msg)
    return ny, nx


def _validate_mask(mask, shape: tuple[int, int]) -> np.ndarray:
    array = mask.get() if is_cupy_array(mask) else np.asarray(mask)
    if array.dtype != bool or array.shape != shape:
        msg = (
            f"mask must be a boolean array of the images' shape {shape} (True on empty sky), got "
            f"{array.dtype} of shape {array.shape}; e.g. empty_sky_mask(before)"
        )
        raise GpudeconvError(msg)
    return array


def _validate_annulus(annulus, radius: float) -> tuple[float, float]:
    try:
        inner, outer = (float(v) for v in annulus)
    except (TypeError, ValueError):
        inner = outer = float("nan")
    if not (np.isfinite(inner) and np.isfinite(outer) and radius <= inner < outer):
        msg = (
            f"annulus must be (r_in, r_out) with radius ({radius:g}) <= r_in < r_out, got "
            f"{annulus!r}; e.g. ({1.5 * radius:g}, {2.5 * radius:g})"
        )
        raise GpudeconvError(msg)
    return inner, outer


# --- stars --------------------------------------------------------------------------------------


def find_stars(image, *, fwhm: float | None = None, threshold: float = 5.0) -> Table:
    """Stars of an image: DAOFIND on the sky-subtracted image, brightest first.

    Parameters
    ----------
    image : (H, W) array_like
        Sky included; NaN marks no-data.
    fwhm : float, optional
        The stars' FWHM in pixels, the size of the detection kernel. By default measured by
        Gaussian fits to the brightest clean stars of a first pass with a 3 px kernel, as
        `gpudeconv.psf.fit_psf` does.
    threshold : float
        Detection threshold in units of the sky noise (5 is DAOFIND's usual).

    Returns
    -------
    Table
        Columns ``x`` (column) and ``y`` (row), 0-based pixel centres; ``peak`` and ``flux``
        (sum within the kernel's footprint), above the sky; ``sharpness`` (DAOFIND's: stars 0.2
        to 0.7, hot pixels 1 and more); ``saturated`` (a pixel at the image's clipping level
        within one FWHM, or a flat top; such a star is listed once). Sorted by ``flux``,
        brightest first; empty when nothing is found. ``meta`` holds ``fwhm`` (the kernel's),
        ``noise`` (the sky noise per pixel) and ``sky`` (its median level).

    Raises
    ------
    GpudeconvError
        For an image that is not 2-D, is all NaN or under 32 pixels on a side, or a
        ``fwhm`` or ``threshold`` that is not a positive number.
    """
    data = _validate_plane(image)
    if fwhm is not None:
        fwhm = _validate_positive(fwhm, "fwhm", "the stars' FWHM in pixels, e.g. 4")
    threshold = _validate_positive(threshold, "threshold", "in noise sigmas, e.g. 5")
    return _Sky(data).stars(fwhm=fwhm, threshold=threshold)


class _Sky:
    """One image's sky, noise, clipped pixels and sky-subtracted residual, measured once."""

    def __init__(self, data: np.ndarray):
        self.data = data
        self.no_data = ~np.isfinite(data)
        sky_map, self.level, self.noise, _ = _measure_sky(data, self.no_data)
        self.residual = np.subtract(data, sky_map, out=sky_map)
        self.residual[self.no_data] = 0.0
        self._clipped = None

    @property
    def clipped(self) -> np.ndarray:
        if self._clipped is None:
            self._clipped = _clipped_pixels([self.data], self.no_data, None)
        return self._clipped

    def stars(self, *, fwhm: float | None, threshold: float) -> Table:
        """`find_stars` on this image."""
        found = None
        if fwhm is None:
            try:
                found, fwhm = _detect(self.residual, self.no_data, self.noise, self.clipped)
            except GpudeconvError:
                found, fwhm = None, None
            if threshold != _THRESHOLD_SIGMA:
                found = None
        if found is None and fwhm is not None:
            # _find_stars thresholds at _THRESHOLD_SIGMA times the noise it is given.
            scaled = self.noise * threshold / _THRESHOLD_SIGMA
            found = _find_stars(self.residual, self.no_data, scaled, fwhm)
        meta = {"fwhm": fwhm, "noise": self.noise, "sky": self.level}
        if found is None:
            table = Table(
                {name: np.zeros(0) for name in ("x", "y", "peak", "flux", "sharpness")}, meta=meta
            )
            table["saturated"] = np.zeros(0, dtype=bool)
            return table
        saturated = np.array(
            [self._saturated(x, y, fwhm) for x, y in zip(found["x"], found["y"], strict=True)],
            dtype=bool,
        )
        reasons = np.where(saturated, _SATURATED, "")
        keep = _first_of_each_saturated_star(found, reasons, max(4, round(2 * fwhm)))
        table = Table(
            {
                "x": found["x"][keep],
                "y": found["y"][keep],
                "peak": found["peak"][keep],
                "flux": found["flux"][keep],
                "sharpness": found["sharpness"][keep],
                "saturated": saturated[keep],
            },
            meta=meta,
        )
        return table[np.argsort(-np.asarray(table["flux"]), kind="stable")]

    def _saturated(self, x: float, y: float, fwhm: float) -> bool:
        window = _clamped_window(self.data.shape, x, y, max(1, math.ceil(fwhm)))
        return bool(self.clipped[window].any()) or _flat_top(self.residual, x, y, self.noise)

    def measurable(self, stars: Table, fwhm: float) -> Table:
        """Isolated, unsaturated stars well above the noise, away from edges and no-data."""
        chosen = (np.asarray(stars["peak"]) >= _MIN_PEAK_SNR * self.noise) & ~np.asarray(
            stars["saturated"]
        )
        if not chosen.any():
            return stars[:0]
        selected = select_measurable_stars(
            stars[chosen],
            self.data.shape,
            min_flux=0.0,
            isolation=_ISOLATION_IN_FWHM * fwhm,
            neighbours=stars[~chosen],
        )
        half = math.ceil(_ISOLATION_IN_FWHM * fwhm)
        clean = [
            not self.no_data[_clamped_window(self.data.shape, x, y, half)].any()
            for x, y in zip(selected["x"], selected["y"], strict=True)
        ]
        return selected[np.asarray(clean, dtype=bool)]

    def empty(self, sigma: float, dilate: float | None) -> np.ndarray:
        """`empty_sky_mask` of this image."""
        from photutils.segmentation import detect_sources, make_2dgaussian_kernel

        kernel = make_2dgaussian_kernel(_SEGMENT_KERNEL_FWHM, size=_SEGMENT_KERNEL_SIZE).array
        smoothed = ndimage.convolve(self.residual, kernel, mode="reflect")
        # Threshold in units of the smoothed image's noise: the kernel averages it down by the
        # root of its squared weights.
        threshold = sigma * self.noise * float(np.sqrt(np.sum(kernel**2)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no sources found" is an empty footprint here
            segments = detect_sources(smoothed, threshold, _SEGMENT_PIXELS, mask=self.no_data)
        sources = np.zeros(self.data.shape, dtype=bool)
        if segments is not None:
            sources = _grow(segments, dilate)
        empty = ~sources & ~self.no_data
        count = int(np.count_nonzero(empty))
        data_pixels = int(np.count_nonzero(~self.no_data))
        if count < max(_MIN_SKY_PIXELS, _MIN_SKY_FRACTION * data_pixels):
            msg = (
                f"only {count} pixels ({100 * count / data_pixels:.1f} % of the data) are empty "
                f"sky, at least {_MIN_SKY_FRACTION:.0%} and {_MIN_SKY_PIXELS} are needed to "
                "measure the noise: give a smaller dilate or a larger sigma, or a region with "
                "background"
            )
            raise GpudeconvError(msg)
        return empty


def _clamped_window(shape, x: float, y: float, half: int) -> tuple[slice, slice]:
    row, col = round(y), round(x)
    return (slice(max(0, row - half), row + half + 1), slice(max(0, col - half), col + half + 1))


def _grow(segments, dilate: float | None) -> np.ndarray:
    """The sources' footprints grown by ``dilate`` px, or each by its own size (`_GROWTH`)."""
    labels = segments.data
    if dilate is not None:
        sources = labels > 0
        if dilate == 0:
            return sources
        return ndimage.distance_transform_edt(~sources) <= dilate
    grown = np.zeros(labels.shape, dtype=bool)
    height, width = labels.shape
    radii = np.sqrt(np.asarray(segments.areas, dtype=np.float64) / np.pi)
    for label, (rows, cols), radius in zip(segments.labels, segments.slices, radii, strict=True):
        reach = max(_MIN_GROWTH, _GROWTH * radius)
        pad = math.ceil(reach)
        window = (
            slice(max(0, rows.start - pad), min(height, rows.stop + pad)),
            slice(max(0, cols.start - pad), min(width, cols.stop + pad)),
        )
        footprint = labels[window] == label
        grown[window] |= ndimage.distance_transform_edt(~footprint) <= reach
    return grown


# --- noise ----------------------------------------------------------------------------------------


def empty_sky_mask(image, *, sigma: float = 3.0, dilate: float | None = None) -> np.ndarray:
    """Pixels of empty sky: finite and far from any source.

    Parameters
    ----------
    image : (H, W) array_like
        Sky included; NaN marks no-data.
    sigma : float
        Detection threshold of the sources, in units of the noise of the smoothed image.
    dilate : float, optional
        Grow every source's footprint by this radius in pixels. By default each grows by 1.5
        times its own radius (that of a disc of its area), at least 4 px, so that bright
        stars' wings, which reach further, are left out too.

    Returns
    -------
    mask : (H, W) ndarray of bool
        True on empty sky.

    Raises
    ------
    GpudeconvError
        For a bad image, ``sigma`` or ``dilate``, or when less than 5 % of the image's data
        (or under 500 pixels) is left: a frame filled by a nebula or a planet.

    Notes
    -----
    The sky (photutils `Background2D`, which follows a smooth nebula) is subtracted and the
    residual smoothed by a Gaussian of 3 px FWHM; the sources are the groups of at least 5
    connected pixels above ``sigma`` times the smoothed noise (photutils `detect_sources`).
    """
    data = _validate_plane(image)
    sigma = _validate_positive(sigma, "sigma", "in noise sigmas, e.g. 3")
    dilate = _validate_dilate(dilate)
    return _Sky(data).empty(sigma, dilate)


def noise_gain(before, after, *, mask=None) -> float:
    """How much a restoration amplifies the noise: its standard deviation on empty sky, after
    over before.

    Parameters
    ----------
    before, after : (H, W) array_like
        The image before and after the restoration; NaN marks no-data.
    mask : (H, W) ndarray of bool, optional
        The empty sky (True); by default `empty_sky_mask` of ``before``.

    Returns
    -------
    float
        Above 1 when the noise grew (Richardson-Lucy), below 1 when it was smoothed.

    Raises
    ------
    GpudeconvError
        For bad images or mask, or too little empty sky (see `empty_sky_mask`).

    Notes
    -----
    Each image's own sky (`Background2D`) is subtracted first, so that a nebula's smooth light
    does not count as noise; the standard deviation is that of the pixels of the mask finite in
    both images, sigma-clipped at 3 sigma (faint stars below the detection threshold drop out,
    the noise's own shape stays).
    """
    before, after = _validate_pair(before, after)
    sky = _Sky(before)
    region = sky.empty(3.0, None) if mask is None else _validate_mask(mask, before.shape)
    return _noise_ratio(sky, _Sky(after), region)


def _noise_ratio(before: _Sky, after: _Sky, region: np.ndarray) -> float:
    region = region & ~before.no_data & ~after.no_data
    if np.count_nonzero(region) < _MIN_SKY_PIXELS:
        msg = (
            f"the empty-sky mask holds {np.count_nonzero(region)} pixels with data in both "
            f"images, at least {_MIN_SKY_PIXELS} are needed to measure the noise"
        )
        raise GpudeconvError(msg)
    reference = _clipped_std(before.residual[region])
    if not reference > 0:
        msg = "before has no noise on the empty sky (a noiseless image): the gain is undefined"
        raise GpudeconvError(msg)
    return _clipped_std(after.residual[region]) / reference


def _clipped_std(values: np.ndarray) -> float:
    from astropy.stats import sigma_clipped_stats

    _, _, std = sigma_clipped_stats(values, sigma=_CLIP_SIGMA, maxiters=5)
    return float(std)


# --- sharpness --------------------------------------------------------------------------------


def fwhm_by_region(before, after, *, grid: tuple[int, int] = (3, 3), stars=None) -> dict:
    """Star FWHM before and after a restoration, per region of the frame and overall.

    Parameters
    ----------
    before, after : (H, W) array_like
        The image before and after the restoration; NaN marks no-data.
    grid : (rows, columns)
        Regions: the frame cut into equal parts.
    stars : (N, 2) array_like or Table, optional
        ``(x, y)`` of the stars to measure (or a table with columns ``x`` and ``y``). By
        default those of `find_stars` on ``before`` whose peak is 30 sigma or more above the
        sky, unsaturated, with no source of a tenth of their flux and no no-data within 3 FWHM,
        and not more than 1.35 times wider than their median (galaxies, blends).

    Returns
    -------
    dict
        ``'regions'``: a list, row by row, of ``{'row', 'col', 'before', 'after', 'stars'}``
        (median FWHM in pixels, None where no star was measured; the number of stars);
        ``'before'``, ``'after'``, ``'stars'``: the same over the whole frame; ``'ratio'``:
        after over before; ``'grid'``: ``[rows, columns]``. Only the stars measured in both
        images count.

    Raises
    ------
    GpudeconvError
        For bad images, grid or positions.

    Notes
    -----
    The FWHM is that of `gpudeconv.measure.star_fwhm` (a pixel-integrated circular Gaussian
    fitted to the core), in both images with the fitting box chosen on ``before``, so that a
    star is measured the same way before and after.
    """
    before, after = _validate_pair(before, after)
    grid = _validate_grid(grid, before.shape)
    if stars is None:
        sky = _Sky(before)
        found = sky.stars(fwhm=None, threshold=_THRESHOLD_SIGMA)
        fwhm = found.meta["fwhm"]
        positions = _positions(sky.measurable(found, fwhm)) if fwhm else np.zeros((0, 2))
        return _json_safe(_fwhm_regions(before, after, positions, grid, point_like=True))
    positions = _validate_positions(stars)
    return _json_safe(_fwhm_regions(before, after, positions, grid, point_like=False))


def _positions(stars: Table) -> np.ndarray:
    return np.column_stack(
        [np.asarray(stars["x"], dtype=np.float64), np.asarray(stars["y"], dtype=np.float64)]
    ).reshape(-1, 2)


def _fwhm_regions(before, after, positions, grid, *, point_like: bool) -> dict:
    """`fwhm_by_region` at given positions; ``point_like`` drops the extended sources."""
    # star_fwhm's own choice of box, made once on `before` and kept for `after`.
    first = star_fwhm(before, positions, box=_FIRST_PASS_BOX)
    if not np.isfinite(first).any():
        return _fwhm_table(first, first, positions, before.shape, grid)
    box = max(_MIN_BOX, _odd(_BOX_IN_FWHM * float(np.nanmedian(first))))
    fwhm_before = star_fwhm(before, positions, box=box)
    if point_like and np.isfinite(fwhm_before).any():
        with np.errstate(invalid="ignore"):
            wide = fwhm_before > _EXTENDED * np.nanmedian(fwhm_before)
        fwhm_before[wide] = np.nan
    fwhm_after = np.full(len(positions), np.nan)
    measured = np.isfinite(fwhm_before)
    fwhm_after[measured] = star_fwhm(after, positions[measured], box=box)
    return _fwhm_table(fwhm_before, fwhm_after, positions, before.shape, grid)


def _fwhm_table(fwhm_before, fwhm_after, positions, shape, grid) -> dict:
    both = np.isfinite(fwhm_before) & np.isfinite(fwhm_after)
    height, width = shape
    rows, cols = grid
    row_of = np.clip((positions[:, 1] + 0.5) * rows // height, 0, rows - 1).astype(int)
    col_of = np.clip((positions[:, 0] + 0.5) * cols // width, 0, cols - 1).astype(int)
    regions = []
    for row in range(rows):
        for col in range(cols):
            inside = both & (row_of == row) & (col_of == col)
            regions.append(
                {
                    "row": row,
                    "col": col,
                    "before": _median(fwhm_before[inside]),
                    "after": _median(fwhm_after[inside]),
                    "stars": int(np.count_nonzero(inside)),
                }
            )
    overall_before = _median(fwhm_before[both])
    overall_after = _median(fwhm_after[both])
    return {
        "grid": [rows, cols],
        "regions": regions,
        "before": overall_before,
        "after": overall_after,
        "ratio": overall_after / overall_before if both.any() else None,
        "stars": int(np.count_nonzero(both)),
    }


def _median(values: np.ndarray) -> float | None:
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size else None


# --- rings ----------------------------------------------------------------------------------------


def ringing_score(image, stars, *, fwhm: float, sky=None, sigma: float | None = None) -> dict:
    """Depth of the dark rings around stars: the undershoot of their profile below the sky.

    Parameters
    ----------
    image : (H, W) array_like
        Sky included; NaN marks no-data.
    stars : (N, 2) array_like or Table
        ``(x, y)`` of the stars, or a table with columns ``x`` and ``y``: bright ones, those
        saturated first, are where Richardson-Lucy rings.
    fwhm : float
        The stars' FWHM in pixels before restoration: the radii scale with it.
    sky : float, optional
        The sky level; by default each star's own, the sigma-clipped median of the annulus from
        6 to 9 FWHM.
    sigma : float, optional
        The noise per pixel that ``depth_sigma`` counts in; by default the image's sky noise
        (the median RMS of photutils `Background2D`). Give the input image's noise to compare
        a restoration with its input in the same units.

    Returns
    -------
    dict
        ``'stars'``: per star ``{'x', 'y', 'depth', 'depth_sigma', 'radius'}``: the most
        negative value of the azimuthal median profile minus the sky between 1 and 4 FWHM, in
        data units and in units of ``sigma`` (0 when the profile stays above the sky), and the
        radius in pixels where it lies (None without undershoot); all None for a star whose
        annuli hold less than half their pixels (edges, no-data). ``'depth'``,
        ``'depth_sigma'``: the medians over the measured stars (None if none); ``'measured'``:
        their number; ``'sigma'``, ``'fwhm'``: as used.

    Raises
    ------
    GpudeconvError
        For a bad image, positions, ``fwhm``, ``sky`` or ``sigma``.

    Notes
    -----
    The profile is the median of the pixels in rings 1 px wide around the star's centre: the
    median ignores a neighbour that crosses a ring. A blurred star's profile stays above the
    sky; plain Richardson-Lucy overshoots around sharp, bright or saturated cores and leaves
    a dark ring of a few FWHM radius.
    """
    data = _validate_plane(image)
    positions = _validate_positions(stars)
    fwhm = _validate_positive(fwhm, "fwhm", "the stars' FWHM in pixels, e.g. 4")
    if sky is not None:
        sky = _validate_finite(sky, "sky", "the sky level in image units, e.g. 100")
    if sigma is None:
        sigma = _Sky(data).noise
    else:
        sigma = _validate_positive(sigma, "sigma", "the noise per pixel, e.g. 10")
    return _json_safe(_rings(data, positions, fwhm, sky, sigma))


def _validate_finite(value, name: str, example: str) -> float:
    if isinstance(value, bool) or not (
        isinstance(value, int | float | np.number) and np.isfinite(value)
    ):
        msg = f"{name} must be a finite number, got {value!r}; {example}"
        raise GpudeconvError(msg)
    return float(value)


def _rings(data, positions, fwhm: float, sky: float | None, sigma: float) -> dict:
    per_star = [_ring(data, x, y, fwhm, sky, sigma) for x, y in positions]
    depths = np.array([s["depth"] for s in per_star if s["depth"] is not None])
    in_sigma = np.array([s["depth_sigma"] for s in per_star if s["depth_sigma"] is not None])
    return {
        "stars": per_star,
        "depth": _median(depths),
        "depth_sigma": _median(in_sigma),
        "measured": int(depths.size),
        "sigma": float(sigma),
        "fwhm": float(fwhm),
    }


def _ring(data, x: float, y: float, fwhm: float, sky: float | None, sigma: float) -> dict:
    result = {"x": float(x), "y": float(y), "depth": None, "depth_sigma": None, "radius": None}
    if not (np.isfinite(x) and np.isfinite(y)):
        return result
    inner, outer = (fwhm * r for r in _RING_ANNULUS)
    sky_inner, sky_outer = (fwhm * r for r in _SKY_ANNULUS)
    half = math.ceil(sky_outer)
    window = _clamped_window(data.shape, x, y, half)
    cutout = data[window]
    rows = np.arange(window[0].start, window[0].start + cutout.shape[0])
    cols = np.arange(window[1].start, window[1].start + cutout.shape[1])
    radius = np.hypot(rows[:, None] - y, cols[None, :] - x)
    finite = np.isfinite(cutout)
    ring = (radius >= inner) & (radius <= outer)
    outside = (radius >= sky_inner) & (radius <= sky_outer)
    for zone, r_in, r_out in ((ring, inner, outer), (outside, sky_inner, sky_outer)):
        if np.count_nonzero(zone & finite) < _MIN_COVERAGE * np.pi * (r_out**2 - r_in**2):
            return result
    if sky is None:
        sky = _clipped_median(cutout[outside & finite])
    zone = ring & finite
    bins = np.floor(radius[zone]).astype(np.intp)
    labels = np.unique(bins)
    profile = np.asarray(ndimage.median(cutout[zone], bins, labels), dtype=np.float64) - sky
    lowest = int(np.argmin(profile))
    depth = min(0.0, float(profile[lowest]))
    result["depth"] = depth
    result["depth_sigma"] = depth / sigma
    result["radius"] = float(labels[lowest] + 0.5) if depth < 0 else None
    return result


def _clipped_median(values: np.ndarray) -> float:
    from astropy.stats import sigma_clipped_stats

    _, median, _ = sigma_clipped_stats(values, sigma=_CLIP_SIGMA, maxiters=5)
    return float(median)


# --- photometry -----------------------------------------------------------------------------------


def aperture_fluxes(
    image,
    positions,
    *,
    radius: float,
    annulus: tuple[float, float] | None = None,
    background: str = "median",
) -> np.ndarray:
    """Background-subtracted flux in circular apertures.

    Parameters
    ----------
    image : (H, W) array_like
        Sky included; NaN marks no-data.
    positions : (N, 2) array_like or Table
        ``(x, y)`` of the apertures' centres, or a table with columns ``x`` and ``y``.
    radius : float
        Aperture radius in pixels; 3 to 4 FWHM holds nearly all of a star's light.
    annulus : (r_in, r_out), optional
        Radii in pixels of the background annulus, ``radius <= r_in < r_out``; by default
        ``(1.5 radius, 2.5 radius)``.
    background : {'median', 'mean'}
        The annulus's level: its sigma-clipped median, robust to neighbours in it, for an
        observed frame; or its plain mean, to compare an image with its restoration (see
        Notes).

    Returns
    -------
    flux : (N,) ndarray of float64
        The aperture's sum minus its area times the annulus's level; NaN where the aperture
        leaves the image or holds no-data, or the annulus has no data.

    Raises
    ------
    GpudeconvError
        For a bad image, positions, ``radius`` or ``annulus``.

    Notes
    -----
    photutils `CircularAperture` and `CircularAnnulus`, exact pixel overlap. The noise of a
    restoration is skewed (Richardson-Lucy's multiplicative updates leave many pixels a little
    below the sky and a few far above), so its median lies below its mean level: by 1 ADU,
    a tenth of the noise, after 30 iterations on the default synthetic scene, which adds 450
    ADU to an aperture of 12 px radius. The mean has no such bias, and a neighbour in the
    annulus adds the same light before and after a restoration, which conserves flux.
    """
    data = _validate_plane(image)
    xy = _validate_positions(positions)
    radius = _validate_positive(radius, "radius", "in pixels, about 3 FWHM")
    if annulus is None:
        annulus = (1.5 * radius, 2.5 * radius)
    r_in, r_out = _validate_annulus(annulus, radius)
    if background not in _BACKGROUNDS:
        msg = (
            f"background must be one of {', '.join(map(repr, _BACKGROUNDS))}, got "
            f"{background!r}; 'median' for an observed frame, 'mean' to compare restorations"
        )
        raise GpudeconvError(msg)
    return _aperture_fluxes(data, xy, radius, (r_in, r_out), background)


def _aperture_fluxes(data, xy: np.ndarray, radius: float, annulus, background: str):
    from astropy.stats import SigmaClip
    from photutils.aperture import ApertureStats, CircularAnnulus, CircularAperture

    flux = np.full(len(xy), np.nan)
    if len(xy) == 0:
        return flux
    height, width = data.shape
    inside = (
        np.isfinite(xy).all(axis=1)
        & (xy[:, 0] - radius >= -0.5)
        & (xy[:, 1] - radius >= -0.5)
        & (xy[:, 0] + radius <= width - 0.5)
        & (xy[:, 1] + radius <= height - 0.5)
    )
    if not inside.any():
        return flux
    no_data = ~np.isfinite(data)
    apertures = CircularAperture(xy[inside], r=radius)
    rings = CircularAnnulus(xy[inside], r_in=annulus[0], r_out=annulus[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an annulus without data gives NaN, said in the result
        if background == "median":
            clip = SigmaClip(sigma=_CLIP_SIGMA, maxiters=5)
            level = ApertureStats(data, rings, mask=no_data, sigma_clip=clip).median
        else:
            level = ApertureStats(data, rings, mask=no_data).mean
        stats = ApertureStats(data, apertures, mask=no_data)
        total = np.asarray(stats.sum, dtype=np.float64)
        # The area of the aperture's data: less than its full area where no-data is masked.
        covered = np.asarray(stats.sum_aper_area.value, dtype=np.float64)
    full = apertures.area
    measured = total - np.asarray(level, dtype=np.float64) * full
    measured[~np.isclose(covered, full, rtol=1e-6)] = np.nan
    flux[inside] = measured
    return flux


# --- fidelity -------------------------------------------------------------------------------------


def psnr(image, reference, *, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio of an image against a reference, in dB.

    Parameters
    ----------
    image, reference : (H, W) array_like
        Same shape; pixels NaN in either are left out.
    data_range : float, optional
        The range of the values; by default the reference's maximum minus its minimum.

    Returns
    -------
    float
        :math:`10 \\log_{10}(R^2 / \\mathrm{MSE})`; ``inf`` for identical images.

    Raises
    ------
    GpudeconvError
        For images of different shapes, no pixel finite in both, a constant reference
        without ``data_range``, or a ``data_range`` that is not a positive number.
    """
    image = _validate_plane(image)
    reference = _validate_plane(reference, "reference")
    if image.shape != reference.shape:
        msg = (
            f"image and reference must have the same shape, got {image.shape} and {reference.shape}"
        )
        raise GpudeconvError(msg)
    both = np.isfinite(image) & np.isfinite(reference)
    if not both.any():
        msg = "image and reference have no pixel with data in both: check their NaN masks"
        raise GpudeconvError(msg)
    values = image[both].astype(np.float64)
    truth = reference[both].astype(np.float64)
    if data_range is None:
        data_range = float(truth.max() - truth.min())
        if data_range <= 0:
            msg = "the reference is constant, so it has no range: give data_range, e.g. 65535"
            raise GpudeconvError(msg)
    else:
        data_range = _validate_positive(data_range, "data_range", "e.g. 65535 for 16-bit data")
    mse = float(np.mean((values - truth) ** 2))
    if mse == 0:
        return float("inf")
    return 10.0 * math.log10(data_range**2 / mse)


# --- the report -----------------------------------------------------------------------------------


def restoration_report(
    before,
    after,
    *,
    psf_fwhm: float | None = None,
    info: dict | None = None,
    grid: tuple[int, int] = (3, 3),
    bright: int = 10,
) -> dict:
    """Everything measured on one restoration, as a dictionary that `json.dumps` writes.

    Parameters
    ----------
    before, after : (H, W) or (C, H, W) array_like
        The image before and after the restoration, same shape; NaN marks no-data. Colour is
        measured on the mean of its channels (what the eye sees as brightness; one set of
        stars, one pass of fits): measure channels one by one for per-channel figures.
    psf_fwhm : float, optional
        The PSF's FWHM in pixels: the detection kernel, and the scale of the ring and aperture
        radii. By default measured on ``before``'s stars (`find_stars`).
    info : dict, optional
        About the run (iterations, stop reason, data term per iteration, ...): copied under
        ``'run'``, NumPy values made plain, NaN and infinities made None.
    grid : (rows, columns)
        Regions of `fwhm_by_region`.
    bright : int
        How many of the brightest stars of ``before`` (saturated ones first) are scored for
        rings; 0 for none.

    Returns
    -------
    dict
        ``'shape'`` (``[H, W]``); ``'channels'`` (1, or the number averaged); ``'psf_fwhm'``
        (as given, or the detection kernel's measured on ``before``);
        ``'sky'`` and ``'noise'`` (``{'before', 'after'}``: sky level and noise per pixel,
        photutils `Background2D`); ``'stars'`` (``{'found', 'measured', 'bright'}``);
        ``'fwhm'`` (`fwhm_by_region`); ``'noise_gain'`` (`noise_gain`); ``'ringing'``
        (``{'before', 'after'}``, each `ringing_score` at the same stars, sky per star, depth
        in units of ``before``'s noise); ``'flux_ratio'`` (median over the measured stars of
        their aperture flux after over before: radius 3 FWHM, background from 5 to 8 FWHM);
        ``'run'`` (``info``); ``'notes'`` (what could not be measured, and why). Values are
        plain floats, ints, strings, lists, dicts, or None where a figure could not be made.

    Raises
    ------
    GpudeconvError
        For bad images (not 2-D or 3-D, of different shapes, all NaN, under 32 pixels on a
        side), ``psf_fwhm``, ``info``, ``grid`` or ``bright``.
    """
    before, after, channels = _validate_report_images(before, after)
    if psf_fwhm is not None:
        psf_fwhm = _validate_positive(psf_fwhm, "psf_fwhm", "the PSF's FWHM in pixels, e.g. 4")
    if info is not None and not isinstance(info, dict):
        msg = (
            "info must be a dict about the run (iterations, stop reason, ...), got "
            f"{type(info).__name__}"
        )
        raise GpudeconvError(msg)
    grid = _validate_grid(grid, before.shape)
    if isinstance(bright, bool) or not isinstance(bright, int | np.integer) or bright < 0:
        msg = f"bright must be a number of stars (0 or more), got {bright!r}; e.g. 10"
        raise GpudeconvError(msg)

    notes = []
    sky_before, sky_after = _Sky(before), _Sky(after)
    stars = sky_before.stars(fwhm=psf_fwhm, threshold=_THRESHOLD_SIGMA)
    fwhm = psf_fwhm if psf_fwhm is not None else stars.meta["fwhm"]
    if fwhm is None:
        notes.append("no stars found in the image before restoration: no FWHM, rings or fluxes")
        measurable = stars[:0]
    else:
        measurable = sky_before.measurable(stars, fwhm)
    positions = _positions(measurable)
    fwhm_part = _fwhm_regions(before, after, positions, grid, point_like=True)
    if fwhm is not None and fwhm_part["stars"] == 0:
        notes.append("no isolated, unsaturated star 30 sigma above the sky: no FWHM, no fluxes")

    try:
        gain = _noise_ratio(sky_before, sky_after, sky_before.empty(3.0, None))
    except GpudeconvError as error:
        gain = None
        notes.append(f"noise gain not measured: {error}")

    ringing = {"before": None, "after": None}
    chosen = _brightest(stars, bright)
    if fwhm is not None and len(chosen):
        xy = _positions(chosen)
        ringing = {
            "before": _rings(before, xy, fwhm, None, sky_before.noise),
            "after": _rings(after, xy, fwhm, None, sky_before.noise),
        }

    flux_ratio = None
    if fwhm is not None and len(positions):
        radius = _APERTURE_IN_FWHM * fwhm
        annulus = tuple(r * fwhm for r in _APERTURE_ANNULUS_IN_FWHM)
        flux_before = _aperture_fluxes(before, positions, radius, annulus, "mean")
        flux_after = _aperture_fluxes(after, positions, radius, annulus, "mean")
        usable = np.isfinite(flux_before) & np.isfinite(flux_after) & (flux_before > 0)
        flux_ratio = _median(flux_after[usable] / flux_before[usable])

    report = {
        "shape": list(before.shape),
        "channels": channels,
        "psf_fwhm": fwhm,
        "sky": {"before": sky_before.level, "after": sky_after.level},
        "noise": {"before": sky_before.noise, "after": sky_after.noise},
        "stars": {"found": len(stars), "measured": fwhm_part["stars"], "bright": len(chosen)},
        "fwhm": fwhm_part,
        "noise_gain": gain,
        "ringing": ringing,
        "flux_ratio": flux_ratio,
        "run": {} if info is None else info,
        "notes": notes,
    }
    return _json_safe(report)


def _validate_report_images(before, after) -> tuple[np.ndarray, np.ndarray, int]:
    arrays = [
        image.get() if is_cupy_array(image) else np.asarray(image) for image in (before, after)
    ]
    if arrays[0].shape != arrays[1].shape:
        msg = (
            f"before and after must have the same shape, got {arrays[0].shape} and "
            f"{arrays[1].shape}; compare the restoration with the image it was made from"
        )
        raise GpudeconvError(msg)
    planes = []
    channels = 1
    for name, array in zip(("before", "after"), arrays, strict=True):
        if array.ndim == 3 and array.dtype.kind in "uif":
            channels = array.shape[0]
            if array.shape[-1] in (3, 4) and array.shape[0] > 4:
                msg = (
                    f"{name} has shape {array.shape}: channel-last colour (H, W, C); gpudeconv "
                    "takes channel-first (C, H, W): pass np.moveaxis(image, -1, 0)"
                )
                raise GpudeconvError(msg)
            # NaN in any channel is no-data in the mean too.
            array = array.astype(np.float32 if array.dtype.itemsize <= 4 else np.float64)
            array = array.mean(axis=0)
        planes.append(array)
    before, after = _validate_pair(*planes)
    return before, after, channels


def _brightest(stars: Table, count: int) -> Table:
    """The ``count`` brightest stars, saturated ones first (they ring most)."""
    if count == 0 or len(stars) == 0:
        return stars[:0]
    order = np.lexsort((-np.asarray(stars["flux"]), ~np.asarray(stars["saturated"])))
    return stars[order[:count]]


def _json_safe(value):
    """Plain Python values that `json.dumps(..., allow_nan=False)` writes: NaN and inf to None."""
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    if isinstance(value, np.ndarray):
        return [_json_safe(item) for item in value.tolist()]
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if np.isfinite(value) else None
    return str(value)
