"""The noise model of an image plane: sky level, sky noise, and Poisson-plus-Gaussian parameters.

Data ``d`` in data units (ADU) recorded with gain ``g`` (electrons per ADU) and read noise ``r``
(electrons) have :math:`\\mathrm{var}(d) = (E[d] + \\alpha) / g` with :math:`\\alpha = r^2 / g`:
the shifted data :math:`d + \\alpha` is close to Poisson in units of :math:`1/g` (Snyder et al.
1993). `estimate_noise` finds :math:`b` (the sky), the sky noise :math:`\\sigma`, :math:`\\alpha`
and :math:`g` from the plane itself when the camera's figures are not given;
`saturation_level` finds the level above which pixels were clipped.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from .._errors import GpudeconvError
from ..backend import is_cupy_array
from ..psf.estimate import _validate_saturation

__all__ = ["NoiseModel", "estimate_noise", "saturation_level"]

#: Side of the boxes whose sky level and noise are measured (pixels): 1024 pixels give each box
#: a noise to 2-3 % and a level to 0.04 sigma, and a 512^2 frame 256 boxes.
BOX = 32
#: At most this many boxes are measured (a regular subset of a larger frame's): enough for the
#: photon-transfer fit, and the cost stays that of a 1024^2 frame whatever the image's size
#: (0.3 s on the 2-core development machine; 8192 boxes took 1.2 s at 2048^2, as long as 18
#: RL iterations there).
MAX_BOXES = 1024
#: A box counts when at least this fraction of its pixels hold data (NaN borders, masks).
MIN_VALID_FRACTION = 0.75
#: Sigma clipping of each box's pixels (stars) and of the fit's boxes.
CLIP_SIGMA = 3.0
#: Iterated 3-sigma clipping keeps Gaussian noise within +-2.95 sigma, whose standard deviation
#: is 0.98485 sigma (the fixed point of the truncated normal's variance); clipped standard
#: deviations are divided by it.
CLIPPED_STD = 0.98485
#: The sky is the median level of the boxes in this lowest fraction of all box levels.
SKY_FRACTION = 0.25
#: Smallest box side: a plane with less than 4 boxes of it across is measured as one box.
MIN_BOX = 8
#: The fraction of Gaussian noise beyond the +-2.95 sigma that iterated clipping keeps.
CLIPPED_FRACTION = 0.00314
#: The photon-transfer fit is accepted when its slope is at least this many standard errors
#: above 0, from at least `MIN_FIT_BOXES` boxes whose levels (5th to 95th percentile) change
#: the fitted variance by at least `MIN_VARIANCE_SPAN` of its value at the lowest. On 512^2
#: synthetic frames, fits of slope below 15 standard errors or spans below 0.2 (a faint
#: nebula, 3 sigma at its peak) missed the gain by up to 35 %, those above 20 and 0.3 (a
#: bright nebula or galaxy) by less than 8 %: stars' wings bias faint fits.
MIN_SLOPE_SIGNIFICANCE = 20.0
MIN_VARIANCE_SPAN = 0.3
MIN_FIT_BOXES = 12
#: A sky below this many sigma above 0 has lost its zero point (sky-subtracted data).
CLEAR_SKY_SIGMA = 3.0
#: A saturation plateau: at least this many pixels within `PLATEAU_TOLERANCE` of the data's
#: range below its maximum. Tighter than the PSF estimator's plateau (1 % of the maximum, at
#: least 3 pixels; psf/estimate.py), on purpose: there a false plateau only drops a few bright
#: stars from the fit, here it masks pixels from the restoration of every run, and within 1 %
#: of the maximum lie the bright smooth areas of a planet, the Moon or a galaxy's core, and the
#: four equal peak pixels of a bright unsaturated star centred on a pixel corner. A core
#: clipped before flat-fielding, spread over 1 %, is missed here: give its level.
PLATEAU_PIXELS = 4
PLATEAU_TOLERANCE = 1e-4


@dataclass(frozen=True)
class NoiseModel:
    """The noise of an image plane: :math:`\\mathrm{var}(d) = (d + \\alpha) / g`.

    Attributes
    ----------
    background : float
        Sky level :math:`b` (data units): the constant that the restoration treats as known sky.
    sigma : float
        Noise standard deviation of a sky pixel (data units).
    offset : float
        :math:`\\alpha \\ge 0` (data units): the shift of Snyder et al. (1993), the read
        noise's variance (data units squared) times the gain, :math:`r^2 / g` for a read noise
        :math:`r` in electrons; :math:`d + \\alpha` is nearly Poisson in units of :math:`1/g`.
    gain : float
        Equivalent gain :math:`g` (counts per data unit), so that
        :math:`\\mathrm{var}(d) = (d + \\alpha) / g`.
    source : str
        How ``offset`` and ``gain`` were obtained: ``'given'`` (read noise and gain given),
        ``'photon-transfer'`` (fitted across the frame's levels), ``'sky'`` (a photon-dominated
        sky, ``offset = 0``) or ``'sky-subtracted'`` (a sky with no zero point).
    """

    background: float
    sigma: float
    offset: float
    gain: float
    source: str


# ---------------------------------------------------------------------------------- validation


def _validate_plane(plane) -> np.ndarray:
    """The plane as a host array (not copied); ``GpudeconvError`` unless 2-D, real, with data."""
    array = plane.get() if is_cupy_array(plane) else np.asarray(plane)
    if array.dtype.kind not in "uif":
        msg = f"plane must hold real numbers, got dtype {array.dtype}; convert it to float32"
        raise GpudeconvError(msg)
    if array.ndim != 2:
        msg = (
            f"plane must be one 2-D image plane (H, W), got shape {array.shape}; "
            "estimate the noise of each channel of a colour image separately"
        )
        raise GpudeconvError(msg)
    if np.count_nonzero(np.isfinite(array)) < 2:
        msg = (
            f"plane of shape {array.shape} has no data (all its pixels are NaN or infinite); "
            "give a plane with finite pixels"
        )
        raise GpudeconvError(msg)
    return array


def _real(value) -> float | None:
    """``value`` as a float if it is a finite real number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _validate_camera(read_noise, gain) -> tuple[float, float] | None:
    if read_noise is None and gain is None:
        return None
    if read_noise is None or gain is None:
        msg = "read_noise (electrons) and gain (electrons per ADU) go together: give both"
        raise GpudeconvError(msg)
    electrons, per_unit = _real(read_noise), _real(gain)
    if electrons is None or electrons < 0:
        msg = f"read_noise must be a non-negative number of electrons, got {read_noise!r}; e.g. 3"
        raise GpudeconvError(msg)
    if per_unit is None or per_unit <= 0:
        msg = f"gain must be a positive number of electrons per ADU, got {gain!r}; e.g. 1.0"
        raise GpudeconvError(msg)
    return electrons, per_unit


def _validate_background(background) -> float | None:
    if background is None:
        return None
    value = _real(background)
    if value is None:
        msg = (
            f"background must be a finite sky level in data units, or None to measure it, "
            f"got {background!r}"
        )
        raise GpudeconvError(msg)
    return value


# ---------------------------------------------------------------------------------- noise


def estimate_noise(plane, *, background=None, read_noise=None, gain=None) -> NoiseModel:
    """Measure the noise model of an image plane.

    Parameters
    ----------
    plane : (H, W) array_like (NumPy or CuPy)
        One image plane in data units (ADU); NaN and infinite pixels are no-data, ignored.
    background : float, optional
        The sky level :math:`b` in data units; by default measured (see Notes).
    read_noise : float, optional
        Read noise in electrons (RMS per pixel); with ``gain``.
    gain : float, optional
        Electrons per data unit (e-/ADU); with ``read_noise``. For a stack of N frames averaged,
        the gain of one frame times N, and the read noise of one frame.

    Returns
    -------
    NoiseModel

    Raises
    ------
    GpudeconvError
        For a plane that is not 2-D or has no finite pixel, a non-finite background, or only
        one of ``read_noise`` and ``gain``.

    Notes
    -----
    The model is Poisson noise in electrons plus Gaussian read noise, in data units

    .. math:: \\mathrm{var}(d) = \\frac{E[d] + \\alpha}{g}, \\qquad \\alpha = \\frac{r^2}{g}

    so that :math:`d + \\alpha` is close to a Poisson variable of mean
    :math:`(E[d] + \\alpha)` in units of :math:`1/g` [1]_: a restoration fits
    :math:`\\max(d + \\alpha, 0)` with the model :math:`H u + b + \\alpha`.

    The plane is cut into boxes of 32 x 32 pixels. In each box a plane is fitted to the
    pixels and the residuals are sigma-clipped (3 sigma, iterated, which removes stars), giving
    a level (the fitted plane's centre plus the median residual) and a noise (the clipped
    residuals' standard deviation, corrected for the clipping), neither of which a gradient
    across the box inflates; the differences of horizontally neighbouring pixels, clipped
    alike, give a variance that smooth structure (nebulosity) does not inflate either.

    * The sky :math:`b` is the median level of the darkest quarter of the boxes. Nebulosity
      and star halos only add light, and a frame-wide sigma-clipped median (or mode) counts
      them as sky where they cover much of the frame; a constant sky set too high would make
      the restoration dig the faint light into zero, one set slightly low only leaves a little
      sky in the restored light.
    * :math:`\\sigma` is the median noise of the same boxes.
    * Given ``read_noise`` and ``gain``: :math:`\\alpha = r^2 / g` and :math:`g` as given
      (source ``'given'``).
    * Otherwise a photon-transfer fit: the difference variances of the boxes without stars
      (no more clipped pixels than noise alone has) against their levels,
      :math:`v = (L + \\alpha) / g`, a straight line fitted by weighted least squares with
      iterated 3-sigma clipping. It is accepted when, from at least 12 boxes, its slope is at
      least 20 standard errors and the boxes' levels (5th to 95th percentile) change the
      variance by at least 30 %: a frame with a bright nebula, galaxy or sky glow. Stars'
      wings bias fits over a faint nebula's few sigma of levels (by up to 35 % in the gain
      on synthetic frames). Then
      :math:`\\alpha = \\max(\\text{intercept} / \\text{slope}, 0)` (source
      ``'photon-transfer'``). The ratio does not depend on the scale of the variances, so
      noise correlated between neighbouring pixels (registration, drizzle) does not bias it.
    * Otherwise, a sky at least 3 sigma above 0 is taken as photon-dominated: :math:`\\alpha = 0`
      (source ``'sky'``); a sky not clearly above 0 has lost its zero point (sky-subtracted
      data): :math:`\\alpha = 3\\sigma - b`, so that the sky's equivalent Poisson level
      :math:`b + \\alpha` is :math:`3\\sigma` (source ``'sky-subtracted'``).
    * Except when given, :math:`g = (b + \\alpha) / \\sigma^2`: the model's variance at the sky
      is the measured sky noise.

    References
    ----------
    .. [1] Snyder, D. L., Hammoud, A. M. & White, R. L. (1993), "Image recovery from data
           acquired with a charge-coupled-device camera", JOSA A 10, 1014.
           :doi:`10.1364/JOSAA.10.001014`
    """
    data = _validate_plane(plane)
    background = _validate_background(background)
    camera = _validate_camera(read_noise, gain)
    boxes = _BoxStatistics(data)
    sky = boxes.sky_level() if background is None else background
    sigma = boxes.sky_sigma(sky)
    if camera is not None:
        read_noise, gain = camera
        return NoiseModel(sky, sigma, read_noise**2 / gain, gain, "given")
    offset = boxes.photon_transfer_offset()
    if offset is not None and sky + offset > 0:
        source = "photon-transfer"
    elif sky >= CLEAR_SKY_SIGMA * sigma:
        offset, source = 0.0, "sky"
    else:
        offset, source = CLEAR_SKY_SIGMA * sigma - sky, "sky-subtracted"
    return NoiseModel(sky, sigma, offset, (sky + offset) / sigma**2, source)


class _BoxStatistics:
    """Level, noise, difference variance and clipped pixels of each box of a plane."""

    def __init__(self, data: np.ndarray):
        from astropy.stats import sigma_clip

        self.data = data
        stacks = _boxes(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # boxes with every pixel masked
            level, sigma, clipped = _detrended_statistics(stacks)
            differences = (stacks[:, :, 1:] - stacks[:, :, :-1]).reshape(len(stacks), -1)
            kept = sigma_clip(differences, sigma=CLIP_SIGMA, maxiters=5, axis=1)
            variance = ((kept.std(axis=1) / CLIPPED_STD) ** 2 / 2).filled(np.nan)
        finite = np.isfinite(stacks).reshape(len(stacks), -1).sum(axis=1)
        good = np.isfinite(level) & np.isfinite(sigma)
        self.level, self.sigma, self.variance = level[good], sigma[good], variance[good]
        # Noise alone has 0.31 % of its pixels beyond the +-2.95 sigma that clipping keeps: a
        # box with clearly more holds a star, whose wings inflate its variance.
        expected = CLIPPED_FRACTION * finite[good]
        self.starless = clipped[good] <= expected + 3 * np.sqrt(expected) + 1

    def _finite(self) -> np.ndarray:
        return self.data[np.isfinite(self.data)].astype(np.float64)

    def _sky_boxes(self) -> np.ndarray:
        """Indices of the darkest `SKY_FRACTION` of the boxes (at least one)."""
        count = max(1, round(SKY_FRACTION * self.level.size))
        return np.argsort(self.level, kind="stable")[:count]

    def sky_level(self) -> float:
        if self.level.size == 0:
            return float(np.median(self._finite()))
        return float(np.median(self.level[self._sky_boxes()]))

    def sky_sigma(self, sky: float) -> float:
        if self.level.size:
            sigma = float(np.median(self.sigma[self._sky_boxes()]))
        else:
            sigma = float(np.std(self._finite()))
        if not (math.isfinite(sigma) and sigma > 0):
            # A noiseless (synthetic) plane: a noise far below any structure in it.
            finite = self._finite()
            scale = max(float(finite.max() - finite.min()), abs(sky))
            sigma = 1e-6 * scale if scale > 0 else 1e-6
        return sigma

    def photon_transfer_offset(self) -> float | None:
        """The fitted intercept over slope of variance against level; None unless reliable."""
        usable = self.starless & np.isfinite(self.variance) & (self.variance > 0)
        level, variance = self.level[usable], self.variance[usable]
        keep = np.ones(level.size, dtype=bool)
        for _ in range(10):
            if np.count_nonzero(keep) < MIN_FIT_BOXES:
                return None
            fit = _weighted_line(level[keep], variance[keep])
            if fit is None:
                return None
            model = fit[0] + fit[1] * level
            relative = (variance - model) / np.abs(model)
            residual = relative[keep] - np.median(relative[keep])
            scatter = 1.4826 * np.median(np.abs(residual))
            clipped = np.abs(relative - np.median(relative[keep])) <= CLIP_SIGMA * scatter
            if np.array_equal(clipped, keep):
                break
            keep = clipped
        if np.count_nonzero(keep) < MIN_FIT_BOXES:
            return None
        intercept, slope, slope_error = fit
        if not (slope > 0 and slope >= MIN_SLOPE_SIGNIFICANCE * slope_error):
            return None
        low, high = np.percentile(level[keep], [5, 95])
        if slope * (high - low) < MIN_VARIANCE_SPAN * (intercept + slope * low):
            return None
        return max(intercept / slope, 0.0)


def _boxes(data: np.ndarray) -> np.ndarray:
    """The plane's boxes as an ``(n, k, k)`` float64 stack, no-data as NaN: those with enough
    data, at most `MAX_BOXES` of them (a regular subset, so that only they are copied), or the
    whole plane as one box if it is tiny."""
    height, width = data.shape
    box = min(BOX, height // 4, width // 4)
    if box < MIN_BOX:
        return _as_float(data[None])
    ny, nx = height // box, width // box
    stride = max(1, math.ceil(math.sqrt(ny * nx / MAX_BOXES)))
    rows, cols = np.arange(0, ny, stride), np.arange(0, nx, stride)
    stacks = _as_float(
        data[: ny * box, : nx * box]
        .reshape(ny, box, nx, box)[rows][:, :, cols]
        .transpose(0, 2, 1, 3)
        .reshape(rows.size * cols.size, box, box)
    )
    filled = np.isfinite(stacks).reshape(len(stacks), -1).mean(axis=1)
    enough = filled >= MIN_VALID_FRACTION
    if not enough.any():  # mostly no-data: every box with any data
        enough = filled > 0
    if not enough.any():  # the data lies in the strips beyond the last whole box
        return _as_float(data[None])
    return stacks[enough]


def _as_float(values: np.ndarray) -> np.ndarray:
    """A float64 copy with every non-finite value NaN."""
    values = values.astype(np.float64)
    values[~np.isfinite(values)] = np.nan
    return values


def _detrended_statistics(stacks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Level, noise about its own least-squares plane, and pixels clipped, of each box of
    ``stacks`` (n, k, k).

    A gradient across a box (sky glow, the edge of a nebula) would otherwise count as noise:
    a slope of 3 ADU per pixel over 32 pixels is a spread of +-50 ADU. Pixels of stars are
    sigma-clipped (3 sigma, iterated) from the residuals before each refit of the plane.
    """
    from astropy.stats import sigma_clip

    count, height, width = stacks.shape
    rows = np.arange(height, dtype=np.float64) - (height - 1) / 2
    cols = np.arange(width, dtype=np.float64) - (width - 1) / 2
    design = np.stack(np.broadcast_arrays(1.0, rows[:, None], cols[None, :]), axis=-1)
    design = design.reshape(height * width, 3)
    values = stacks.reshape(count, -1)
    clipped = sigma_clip(values, sigma=CLIP_SIGMA, maxiters=5, axis=1)
    for _ in range(2):
        weight = (~np.ma.getmaskarray(clipped)).astype(np.float64)
        normal = np.einsum("np,pi,pj->nij", weight, design, design)
        normal += 1e-9 * np.eye(3)  # a box with too few pixels left stays solvable
        right = np.einsum("np,pi,np->ni", weight, design, np.where(weight > 0, values, 0.0))
        plane = np.linalg.solve(normal, right[..., None])[..., 0]
        residual = values - plane @ design.T
        clipped = sigma_clip(residual, sigma=CLIP_SIGMA, maxiters=5, axis=1)
    level = plane[:, 0] + np.ma.median(clipped, axis=1).filled(np.nan)
    sigma = (clipped.std(axis=1) / CLIPPED_STD).filled(np.nan)
    rejected = np.count_nonzero(np.ma.getmaskarray(clipped) & np.isfinite(values), axis=1)
    return level, sigma, rejected


def _weighted_line(x: np.ndarray, y: np.ndarray):
    """``(intercept, slope, slope's standard error)`` of ``y = a + b x``, each point weighted by
    ``1 / y**2`` (variances measured from equal numbers of pixels have equal relative errors),
    the error scaled by the residuals' scatter; None when x does not vary."""
    weight = 1.0 / y**2
    total = weight.sum()
    x_mean = (weight * x).sum() / total
    y_mean = (weight * y).sum() / total
    spread = (weight * (x - x_mean) ** 2).sum()
    if not spread > 0:
        return None
    slope = (weight * (x - x_mean) * (y - y_mean)).sum() / spread
    intercept = y_mean - slope * x_mean
    residual = (weight * (y - intercept - slope * x) ** 2).sum() / max(x.size - 2, 1)
    return intercept, slope, math.sqrt(residual / spread)


# ---------------------------------------------------------------------------------- saturation


def saturation_level(plane, *, header=None, level=None) -> float | None:
    """The level at and above which pixels are saturated, or None if none are.

    Parameters
    ----------
    plane : (H, W) or (C, H, W) array_like (NumPy or CuPy)
        The data (already scaled by any ``BZERO``/``BSCALE``); NaN is no-data.
    header : astropy.io.fits.Header or mapping, optional
        Its ``SATURATE`` or ``DATAMAX`` keyword (in that order) gives the level.
    level : float, optional
        The level, given: it wins over everything else.

    Returns
    -------
    float or None

    Notes
    -----
    Without a given level or keyword, the data's maximum plateau: clipped pixels pile up at
    the maximum. If at least 4 pixels lie within :math:`10^{-4}` of the data's range below the
    maximum, and more than twice as many as at the next occupied level below (so that integer
    data, whose maximum is shared by many pixels of a smooth unclipped area, does not count),
    the level is the maximum minus that tolerance.
    """
    if level is not None:
        return _validate_saturation(level)
    if header is not None:
        # astropy applies BZERO/BSCALE when it reads the data, and SATURATE/DATAMAX are in the
        # same physical units: no scaling here.
        for key in ("SATURATE", "DATAMAX"):
            value = _real(header.get(key)) if hasattr(header, "get") else None
            if value is not None:
                return value
    return _plateau(plane)


def _plateau(plane) -> float | None:
    array = plane.get() if is_cupy_array(plane) else np.asarray(plane)
    if array.dtype.kind not in "uif":
        msg = f"plane must hold real numbers, got dtype {array.dtype}"
        raise GpudeconvError(msg)
    values = array[np.isfinite(array)] if array.dtype.kind == "f" else array.ravel()
    if values.size < PLATEAU_PIXELS:
        return None
    values = values.astype(np.float64)
    top, bottom = float(values.max()), float(values.min())
    if top == bottom:
        return None
    tolerance = PLATEAU_TOLERANCE * (top - bottom)
    at_top = values >= top - tolerance
    count = int(np.count_nonzero(at_top))
    if count < PLATEAU_PIXELS:
        return None
    below = values[~at_top]
    following = float(below.max())
    next_count = int(np.count_nonzero(below >= following - tolerance))
    if count <= 2 * next_count:
        return None
    return top - tolerance
