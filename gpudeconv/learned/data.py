"""Training data for learned deconvolution: random deep-sky patches, blurred and sharp.

Each sample is a patch of the sky of `gpudeconv.synthetic` (power-law stars, Sersic galaxies,
nebulosity) on a sky background, seen two ways:

- ``blurred``: through a random PSF that varies linearly across the patch (a
  :class:`~gpudeconv.PSFField` of Moffat or Gaussian node PSFs, applied by
  :class:`~gpudeconv.operators.SpatiallyVaryingConvolution`), with Poisson and read noise and
  sometimes saturated cores: the network's input;
- ``target``: through a round Gaussian of ``TARGET_FWHM`` pixels, without noise: what the
  network should output.

The scene is drawn on a canvas larger than the patch by the PSF radius on each side and both
views are cropped from it, so the patch's edges hold the light of sources just outside it, as
in a real image, and no zero border enters the blur. Everything is float32 and follows from the
seed alone.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .._errors import GpudeconvError
from ..operators import Convolution, SpatiallyVaryingConvolution
from ..psf import PSFField, gaussian, moffat, validate_psf
from ..psf.limb import noise_sigma
from ..synthetic import (
    _FAINTEST_IN_SIGMA,
    _STAR_DENSITY,
    _add_sersic,
    _deposit_points,
    _galaxy_table,
    _nebula,
    _star_table,
)

__all__ = [
    "FWHM_UNIT",
    "NOISE_UNITS",
    "TARGET_FWHM",
    "NoiseRange",
    "PSFRange",
    "Sample",
    "denormalize",
    "make_batch",
    "make_sample",
    "normalize",
    "psf_maps",
]

#: FWHM (pixels) of the Gaussian through which the target sees the truth. Point sources are no
#: sensible target: a star's light in one pixel (or split over four) cannot be predicted from a
#: sampled image, and a loss on it rewards ringing. 1.5 px is about the narrowest profile that
#: is still sampled (Nyquist needs FWHM >= ~2 px for a Gaussian, 1.5 px keeps aliasing at a few
#: per cent) and well below the narrowest training PSF (2 px), so the target is always sharper.
TARGET_FWHM = 1.5
#: The normalization's scale in units of the noise: ``scale = NOISE_UNITS * sigma``, so the
#: background noise has a standard deviation of 0.2 and 1.0 is a 5-sigma detection.
NOISE_UNITS = 5.0
#: The FWHM channel of `psf_maps` holds FWHM / FWHM_UNIT, so training PSFs (2-7 px) map to ~0.5-2.
FWHM_UNIT = 4.0

#: Star density relative to `gpudeconv.synthetic` (one per 1600 px), log-uniform in this range.
_DENSITY_FACTOR = (0.5, 4.0)
#: Chance of a galaxy and of nebulosity in a patch; the nebula's peak, in noise sigmas,
#: log-uniform in this range.
_GALAXY_CHANCE = 0.3
_NEBULA_CHANCE = 0.5
_NEBULA_LEVEL = (1.0, 30.0)
#: A saturated sample clips at the sky plus this fraction (uniform) of its brightest peak.
_SATURATION_DEPTH = (0.2, 0.6)
#: Node PSFs reach this many (largest node) FWHM from their centre, at most _MAX_PSF_RADIUS.
_PSF_REACH = 3.0
_MAX_PSF_RADIUS = 30
#: The PSF shape is measured on a grid this many times finer than the pixels.
_UPSAMPLE = 5
_MIN_SIZE = 16


def _validate_interval(name: str, value, low: float, high: float, example: str):
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        msg = f"{name} must be a (low, high) pair of numbers, got {value!r}; e.g. {example}"
        raise GpudeconvError(msg) from None
    if not (np.isfinite(lo) and np.isfinite(hi) and low <= lo <= hi <= high):
        msg = (
            f"{name} must be a (low, high) pair with {low} <= low <= high <= {high}, got {value!r}"
        )
        raise GpudeconvError(msg)
    return lo, hi


def _validate_fraction(name: str, value) -> None:
    if not (isinstance(value, (int, float)) and 0 <= value <= 1):
        msg = f"{name} must be a fraction in [0, 1], got {value!r}"
        raise GpudeconvError(msg)


@dataclass(frozen=True)
class PSFRange:
    """The distribution of training PSFs.

    Each sample draws, uniformly in each range: the FWHM of the major axis (pixels) at the patch
    centre, the axis ratio (minor/major), the angle of the major axis (degrees from +x towards
    +y, as `gpudeconv.psf.moffat`), and the profile: Gaussian with probability
    ``gaussian_fraction``, else Moffat with ``beta`` in its range. Across the patch the FWHM
    and the ratio vary linearly along a random direction (field tilt, curvature, coma-like
    elongation): by a relative amount uniform in ``[0, fwhm_variation]`` and an absolute one
    in ``[0, ratio_variation]`` at the outer nodes of a ``grid x grid`` `PSFField`, bilinear in
    between and constant beyond, as the field interpolates.

    Attributes
    ----------
    fwhm : (float, float)
        Pixels; default 2.0 to 7.0 (seeing of 1-4" at typical amateur sampling).
    ratio : (float, float)
        Minor over major FWHM, in (0, 1]; default 0.6 to 1.0.
    angle : (float, float)
        Degrees; default 0 to 180.
    beta : (float, float)
        Moffat wing exponent, > 1; default 2.0 to 5.0.
    gaussian_fraction : float
        Share of Gaussian PSFs; default 0.3.
    fwhm_variation : float
        Largest relative change of the FWHM from the centre to the outer nodes; default 0.15.
    ratio_variation : float
        Largest change of the axis ratio from the centre to the outer nodes; default 0.1.
    grid : int
        Nodes of the field along each axis, 1 to 4; default 2.
    """

    fwhm: tuple[float, float] = (2.0, 7.0)
    ratio: tuple[float, float] = (0.6, 1.0)
    angle: tuple[float, float] = (0.0, 180.0)
    beta: tuple[float, float] = (2.0, 5.0)
    gaussian_fraction: float = 0.3
    fwhm_variation: float = 0.15
    ratio_variation: float = 0.1
    grid: int = 2

    def __post_init__(self):
        _validate_interval("PSFRange.fwhm", self.fwhm, 1.0, 12.0, "(2.0, 7.0)")
        _validate_interval("PSFRange.ratio", self.ratio, 0.2, 1.0, "(0.6, 1.0)")
        _validate_interval("PSFRange.angle", self.angle, -360.0, 360.0, "(0, 180)")
        _validate_interval("PSFRange.beta", self.beta, 1.1, 20.0, "(2.0, 5.0)")
        _validate_fraction("PSFRange.gaussian_fraction", self.gaussian_fraction)
        _validate_fraction("PSFRange.fwhm_variation", self.fwhm_variation)
        _validate_fraction("PSFRange.ratio_variation", self.ratio_variation)
        if not (isinstance(self.grid, int) and 1 <= self.grid <= 4):
            msg = (
                f"PSFRange.grid must be an integer from 1 to 4 (nodes per axis), got {self.grid!r}"
            )
            raise GpudeconvError(msg)


@dataclass(frozen=True)
class NoiseRange:
    """The distribution of recording conditions.

    Sky and gain are drawn log-uniformly, the read noise uniformly.

    Attributes
    ----------
    sky : (float, float)
        Background level in ADU; default 20 to 2000.
    gain : (float, float)
        Electrons per ADU; default 0.5 to 4. A stack of N frames behaves like one frame with N
        times the gain: the upper end stands for stacks.
    read_noise : (float, float)
        Electrons RMS per pixel; default 2 to 10.
    saturated_fraction : float
        Share of samples whose brightest cores are clipped (a full well), default 0.1.
    """

    sky: tuple[float, float] = (20.0, 2000.0)
    gain: tuple[float, float] = (0.5, 4.0)
    read_noise: tuple[float, float] = (2.0, 10.0)
    saturated_fraction: float = 0.1

    def __post_init__(self):
        _validate_interval("NoiseRange.sky", self.sky, 1e-3, 1e7, "(20, 2000)")
        _validate_interval("NoiseRange.gain", self.gain, 1e-3, 1e4, "(0.5, 4)")
        _validate_interval("NoiseRange.read_noise", self.read_noise, 0.0, 1e3, "(2, 10)")
        _validate_fraction("NoiseRange.saturated_fraction", self.saturated_fraction)


@dataclass(frozen=True)
class Sample:
    """One training patch and what it was made from.

    Attributes
    ----------
    blurred : (P, P) ndarray of float32
        The observed patch, normalized: ``(data - offset) / scale``.
    target : (P, P) ndarray of float32
        The same sky (truth plus background, no noise) through ``gaussian(TARGET_FWHM)``, with
        the same normalization, so ``target - blurred`` is what a residual network predicts.
        Clipped at ``saturation`` too where the input is saturated.
    clean : (P, P) ndarray of float32
        ``blurred`` before noise and saturation (same normalization), for diagnostics.
    psf_maps : (3, P, P) ndarray of float32
        The PSF at each pixel, measured by `psf_maps` from the field that blurred the patch:
        major-axis FWHM / `FWHM_UNIT`, e1, e2.
    offset, scale : float
        The normalization from `normalize` of the observed patch (ADU).
    fwhm, ratio, angle : float
        The drawn PSF at the patch centre: major-axis FWHM (px), minor/major, degrees.
    beta : float or None
        Moffat exponent; None for a Gaussian PSF.
    field : PSFField
        The PSF field that blurred the patch (its image shape is the patch's), for restoring
        the patch with the true PSF by other methods.
    fwhm_gradient, ratio_gradient : (float, float)
        Change of the FWHM (relative) and of the ratio (absolute) from the centre to the outer
        nodes along rows and columns.
    sky, gain, read_noise, noise_sigma : float
        ADU, e-/ADU, e-, and the noise of a background pixel in ADU.
    saturation : float or None
        The clipping level in ADU, or None.
    stars : (N, 3) ndarray of float64
        ``x``, ``y`` (patch pixel coordinates, possibly outside the patch) and ``flux`` (ADU) of
        the stars on the canvas, brightest first.
    """

    blurred: np.ndarray
    target: np.ndarray
    clean: np.ndarray
    psf_maps: np.ndarray
    offset: float
    scale: float
    fwhm: float
    ratio: float
    angle: float
    beta: float | None
    fwhm_gradient: tuple[float, float]
    ratio_gradient: tuple[float, float]
    sky: float
    gain: float
    read_noise: float
    noise_sigma: float
    saturation: float | None
    stars: np.ndarray
    field: PSFField


# --- normalization ----------------------------------------------------------------------------


def normalize(image) -> tuple[np.ndarray, float, float]:
    """Put an image on the network's scale: sky at 0, background noise of standard deviation 0.2.

    Parameters
    ----------
    image : (H, W) array_like
        Linear data (ADU), finite, at least 3 x 3.

    Returns
    -------
    normalized : (H, W) ndarray of float32
        ``(image - offset) / scale``.
    offset : float
        The median of the image: the sky level where sources cover less than half of it.
    scale : float
        ``NOISE_UNITS`` (5) times the robust noise sigma of the image (Immerkaer's mask, as
        `gpudeconv.psf.limb.noise_sigma`, which smooth structure does not inflate).

    Notes
    -----
    The transform is linear and invertible (`denormalize`): the network works on linear data,
    with a scale that makes the noise, and so what can be trusted, the same in every sample.
    """
    data = np.asarray(image, dtype=np.float64)
    if data.ndim != 2 or min(data.shape) < 3:
        msg = f"image must be 2-D (H, W) and at least 3x3, got shape {data.shape}"
        raise GpudeconvError(msg)
    if not np.isfinite(data).all():
        msg = "image has NaN or infinite pixels; fill or crop no-data borders before normalize"
        raise GpudeconvError(msg)
    offset = float(np.median(data))
    sigma = noise_sigma(data)
    if not sigma > 0:
        msg = (
            "image has no measurable noise (robust sigma 0): normalize takes recorded data; "
            "for a noiseless image pass the offset and scale of its noisy counterpart"
        )
        raise GpudeconvError(msg)
    scale = NOISE_UNITS * sigma
    return ((data - offset) / scale).astype(np.float32), offset, float(scale)


def denormalize(normalized, offset: float, scale: float) -> np.ndarray:
    """Undo `normalize`: ``normalized * scale + offset``, float32 of the input's shape."""
    if not (np.isfinite(offset) and np.isfinite(scale) and scale > 0):
        msg = f"scale must be positive and offset finite, got offset={offset!r}, scale={scale!r}"
        raise GpudeconvError(msg)
    data = np.asarray(normalized, dtype=np.float64)
    return (data * scale + offset).astype(np.float32)


# --- PSF description --------------------------------------------------------------------------


def _psf_shape(psf: np.ndarray) -> tuple[float, float, float]:
    """Major-axis FWHM (px), e1 and e2 of one PSF image, from its half-maximum isophote.

    The PSF near its peak is interpolated by cubic splines on a grid ``_UPSAMPLE`` times finer,
    the region above half the peak taken, and its second moments computed: for an elliptical
    profile that region is an ellipse whose moments are ``(FWHM_axis / 4)**2`` along its axes,
    whatever the radial profile (Gaussian or Moffat). Pixel integration widens the region; a
    Gaussian's variance grows by 1/12 px^2, which is taken off each axis.
    """
    peak_row, peak_col = np.unravel_index(int(np.argmax(psf)), psf.shape)
    bright = psf >= psf[peak_row, peak_col] / 8
    rows = np.nonzero(bright.any(axis=1))[0]
    cols = np.nonzero(bright.any(axis=0))[0]
    r0, r1 = max(rows[0] - 3, 0), min(rows[-1] + 4, psf.shape[0])
    c0, c1 = max(cols[0] - 3, 0), min(cols[-1] + 4, psf.shape[1])
    core = psf[r0:r1, c0:c1]
    coef = ndimage.spline_filter(core, order=3, mode="mirror")
    ty = (np.arange(core.shape[0] * _UPSAMPLE) + 0.5) / _UPSAMPLE - 0.5
    tx = (np.arange(core.shape[1] * _UPSAMPLE) + 0.5) / _UPSAMPLE - 0.5
    yy, xx = np.meshgrid(ty, tx, indexing="ij")
    fine = ndimage.map_coordinates(coef, [yy, xx], order=3, prefilter=False, mode="mirror")
    inside = fine >= fine.max() / 2
    dx = xx[inside] - xx[inside].mean()
    dy = yy[inside] - yy[inside].mean()
    # quantization of the fine grid, then the pixel's own width (Gaussian: 8 ln 2 / 12 px^2 on
    # FWHM^2, i.e. that / 16 on the isophote's moments)
    correction = 1 / (12 * _UPSAMPLE**2) + 8 * math.log(2) / (12 * 16)
    cxx = max(float(np.mean(dx * dx)) - correction, 1e-6)
    cyy = max(float(np.mean(dy * dy)) - correction, 1e-6)
    cxy = float(np.mean(dx * dy))
    det = max(cxx * cyy - cxy * cxy, 1e-12)
    norm = cxx + cyy + 2 * math.sqrt(det)
    major = 0.5 * (cxx + cyy) + math.sqrt(0.25 * (cxx - cyy) ** 2 + cxy * cxy)
    return 4 * math.sqrt(major), (cxx - cyy) / norm, 2 * cxy / norm


def psf_maps(field_or_psf, shape, *, origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """The PSF at each pixel of an image, as the network's three input channels.

    Parameters
    ----------
    field_or_psf : PSFField or (k, k) array_like
        A spatially varying PSF, or one PSF for the whole image.
    shape : (H, W) tuple of int
        The image (or tile) described.
    origin : (int, int)
        Field coordinates of the image's pixel (0, 0): a tile's corner in the field's image.

    Returns
    -------
    maps : (3, H, W) ndarray of float32
        Major-axis FWHM / `FWHM_UNIT` (pixels / 4), and the ellipticity components
        ``e1, e2 = (1 - q) / (1 + q) * (cos 2 theta, sin 2 theta)``, ``q`` the axis ratio and
        ``theta`` the major axis's angle from +x towards +y.

    Notes
    -----
    Each node PSF is measured once, from its half-maximum isophote (the region above half the
    peak, on a cubic-spline grid 5 times finer than the pixels): that region's second moments
    give the FWHM of each axis and the ellipticity of any elliptical profile, Gaussian or
    Moffat, less the widening by the pixel. This is the true FWHM, not the Gaussian-equivalent
    one of the whole profile's second moments (infinite for Moffat beta <= 2 and 24 % too large
    at beta = 2 for a truncated one). It is accurate to ~2 % in FWHM and 0.03 in ellipticity
    from FWHM 3 px; below that the minor axis is undersampled and the ellipticity reads low.
    The three values are then interpolated bilinearly between nodes with the field's own
    weights (`PSFField.axis_weights`, clamped beyond the outer nodes), as `PSFField.psf_at`
    interpolates the PSFs.
    """
    height, width = _validate_shape(shape)
    try:
        oy, ox = (operator.index(v) for v in origin)
    except (TypeError, ValueError):
        msg = f"origin must be (row, column), two integers, got {origin!r}"
        raise GpudeconvError(msg) from None
    if isinstance(field_or_psf, PSFField):
        field = field_or_psf
    else:
        psf = validate_psf(field_or_psf, warn_sum=False)
        if psf.ndim != 2:
            msg = f"psf_maps takes a PSFField or one 2-D PSF, got shape {psf.shape}"
            raise GpudeconvError(msg)
        field = PSFField.uniform(psf, (height, width))
    return _maps_from_nodes(_node_shapes(field), field, (height, width), (oy, ox))


def _node_shapes(field: PSFField) -> np.ndarray:
    """``(ny, nx, 3)`` float64: major-axis FWHM (pixels), e1 and e2 of each node PSF."""
    ny, nx = field.grid
    return np.array([[_psf_shape(field.psfs[a, b]) for b in range(nx)] for a in range(ny)])


def _maps_from_nodes(nodes, field: PSFField, shape, origin) -> np.ndarray:
    """`psf_maps` from the node shapes of `_node_shapes` (measured once for many tiles)."""
    (height, width), (oy, ox) = shape, origin
    ny, nx = field.grid
    nodes = nodes / np.array([FWHM_UNIT, 1.0, 1.0])
    iy, fy = field.axis_weights(oy + np.arange(height), 0)
    ix, fx = field.axis_weights(ox + np.arange(width), 1)
    jy, jx = np.minimum(iy + 1, ny - 1), np.minimum(ix + 1, nx - 1)
    fy, fx = fy[:, None, None], fx[None, :, None]
    maps = (
        nodes[iy[:, None], ix[None, :]] * (1 - fy) * (1 - fx)
        + nodes[iy[:, None], jx[None, :]] * (1 - fy) * fx
        + nodes[jy[:, None], ix[None, :]] * fy * (1 - fx)
        + nodes[jy[:, None], jx[None, :]] * fy * fx
    )
    return np.ascontiguousarray(maps.transpose(2, 0, 1), dtype=np.float32)


# --- samples ----------------------------------------------------------------------------------


def _validate_shape(shape) -> tuple[int, int]:
    try:
        height, width = (operator.index(v) for v in tuple(shape))
    except (TypeError, ValueError):
        msg = f"shape must be (H, W), two positive integers, got {shape!r}"
        raise GpudeconvError(msg) from None
    if height < 1 or width < 1:
        msg = f"shape must be (H, W), two positive integers, got {shape!r}"
        raise GpudeconvError(msg)
    return int(height), int(width)


def _validate_sample_options(seed, size, psf_range, noise_range) -> np.random.SeedSequence:
    if not isinstance(psf_range, PSFRange):
        msg = f"psf_range must be a gpudeconv.learned.data.PSFRange, got {type(psf_range).__name__}"
        raise GpudeconvError(msg)
    if not isinstance(noise_range, NoiseRange):
        msg = (
            f"noise_range must be a gpudeconv.learned.data.NoiseRange, "
            f"got {type(noise_range).__name__}"
        )
        raise GpudeconvError(msg)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < _MIN_SIZE:
        msg = f"size must be an integer of at least {_MIN_SIZE} pixels, got {size!r}; e.g. 64"
        raise GpudeconvError(msg)
    if isinstance(seed, np.random.SeedSequence):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        msg = f"seed must be a non-negative integer, got {seed!r}"
        raise GpudeconvError(msg)
    return np.random.SeedSequence(int(seed))


def _uniform(rng, interval) -> float:
    return float(rng.uniform(interval[0], interval[1]))


def _log_uniform(rng, interval) -> float:
    return float(math.exp(rng.uniform(math.log(interval[0]), math.log(interval[1]))))


def _gradient(rng, largest: float) -> tuple[float, float]:
    """A change of size uniform in [0, largest] along a uniformly random direction (rows, cols)."""
    size = rng.uniform(0, largest)
    direction = rng.uniform(0, 2 * math.pi)
    return float(size * math.sin(direction)), float(size * math.cos(direction))


def make_sample(
    seed: int | np.random.SeedSequence,
    *,
    size: int = 64,
    psf_range: PSFRange = PSFRange(),
    noise_range: NoiseRange = NoiseRange(),
) -> Sample:
    """Draw one training patch: a random sky through a random, varying PSF, and its target.

    Parameters
    ----------
    seed : int or numpy.random.SeedSequence
        Everything follows from it: the same seed and options give identical arrays.
    size : int
        Side P of the square patch, at least 16.
    psf_range : PSFRange
        The PSF distribution.
    noise_range : NoiseRange
        Sky, gain, read noise and the share of saturated samples.

    Returns
    -------
    Sample

    Notes
    -----
    The scene is `gpudeconv.synthetic`'s: stars with :math:`N(>F) \\propto F^{-0.75}` from
    25 noise sigmas up 3.5 decades, at 0.5 to 4 times its density (log-uniform), a Sersic
    galaxy in 30 % of the patches and nebulosity peaking at 1 to 30 sigmas in half of them. It
    is drawn on a canvas of ``P + 2 R`` pixels, ``R`` the PSF radius, blurred there, and the
    central ``P x P`` kept, with noise

    .. math:: d = \\frac{\\mathrm{Poisson}(g\\,(h * t + s))}{g} + \\mathcal{N}(0, r/g)

    and the target :math:`g_{1.5} * t + s` (no noise), both normalized by `normalize` of ``d``.
    """
    sequence = _validate_sample_options(seed, size, psf_range, noise_range)
    rng = np.random.default_rng(sequence)
    size = int(size)

    # the PSF field over the patch
    fwhm = _uniform(rng, psf_range.fwhm)
    ratio = _uniform(rng, psf_range.ratio)
    angle = _uniform(rng, psf_range.angle)
    beta = None if rng.uniform() < psf_range.gaussian_fraction else _uniform(rng, psf_range.beta)
    fwhm_gradient = _gradient(rng, psf_range.fwhm_variation)
    ratio_gradient = _gradient(rng, psf_range.ratio_variation)
    grid = psf_range.grid
    # node positions relative to the centre, -1 at the first node, +1 at the last
    node_unit = np.linspace(-1.0, 1.0, grid) if grid > 1 else np.zeros(1)
    node_fwhm = fwhm * (
        1 + fwhm_gradient[0] * node_unit[:, None] + fwhm_gradient[1] * node_unit[None, :]
    )
    node_ratio = np.clip(
        ratio + ratio_gradient[0] * node_unit[:, None] + ratio_gradient[1] * node_unit[None, :],
        0.2,
        1.0,
    )
    radius = min(math.ceil(_PSF_REACH * float(node_fwhm.max())), _MAX_PSF_RADIUS)
    side = 2 * radius + 1
    psfs = np.empty((grid, grid, side, side))
    for a in range(grid):
        for b in range(grid):
            shape = {"size": side, "ratio": float(node_ratio[a, b]), "angle": angle}
            f = float(node_fwhm[a, b])
            psfs[a, b] = gaussian(f, **shape) if beta is None else moffat(f, beta, **shape)
    field = PSFField(psfs, (size, size))

    # the recording conditions
    sky = _log_uniform(rng, noise_range.sky)
    gain = _log_uniform(rng, noise_range.gain)
    read_noise = _uniform(rng, noise_range.read_noise)
    sigma = math.sqrt(sky * gain + read_noise**2) / gain
    faintest = _FAINTEST_IN_SIGMA * max(sigma, 1.0)

    # the ideal sky on the canvas
    canvas = size + 2 * radius
    truth = np.zeros((canvas, canvas))
    density = _STAR_DENSITY * _log_uniform(rng, _DENSITY_FACTOR)
    stars = _star_table(rng, int(rng.poisson(density * canvas * canvas)), canvas, canvas, faintest)
    _deposit_points(truth, stars["x"], stars["y"], stars["flux"])
    if rng.uniform() < _GALAXY_CHANCE:
        galaxies = _galaxy_table(rng, canvas, canvas, faintest, enabled=True)
        # anywhere on the canvas: its own placement keeps 6 effective radii from the edges
        galaxies["x"] = rng.uniform(0, canvas - 1, size=len(galaxies))
        galaxies["y"] = rng.uniform(0, canvas - 1, size=len(galaxies))
        for row in galaxies:
            _add_sersic(truth, row)
    if rng.uniform() < _NEBULA_CHANCE:
        level = _log_uniform(rng, _NEBULA_LEVEL) * sigma
        truth += _nebula(rng, canvas, canvas, level=level)

    # the two views, cropped to the patch
    crop = (slice(radius, radius + size), slice(radius, radius + size))
    blur = SpatiallyVaryingConvolution(field, "numpy", origin=(-radius, -radius))
    clean = np.clip(blur.forward(truth)[crop], 0.0, None) + sky
    sharp = Convolution(gaussian(TARGET_FWHM), "numpy").forward(truth)[crop]
    target = np.clip(sharp, 0.0, None) + sky

    observed = rng.poisson(clean * gain) / gain
    observed += rng.normal(0.0, read_noise / gain, size=observed.shape)
    saturation = None
    if rng.uniform() < noise_range.saturated_fraction:
        depth = _uniform(rng, _SATURATION_DEPTH)
        saturation = float(sky + depth * (clean.max() - sky))
        np.minimum(observed, saturation, out=observed)
        np.minimum(target, saturation, out=target)

    blurred, offset, scale = normalize(observed)
    star_xy = np.column_stack([stars["x"], stars["y"], stars["flux"]]).astype(np.float64)
    star_xy[:, :2] -= radius
    return Sample(
        blurred=blurred,
        target=((target - offset) / scale).astype(np.float32),
        clean=((clean - offset) / scale).astype(np.float32),
        psf_maps=psf_maps(field, (size, size)),
        offset=offset,
        scale=scale,
        fwhm=fwhm,
        ratio=ratio,
        angle=angle,
        beta=beta,
        fwhm_gradient=fwhm_gradient,
        ratio_gradient=ratio_gradient,
        sky=sky,
        gain=gain,
        read_noise=read_noise,
        noise_sigma=sigma,
        saturation=saturation,
        stars=star_xy.reshape(-1, 3),
        field=field,
    )


def make_batch(
    seed: int,
    count: int,
    *,
    size: int = 64,
    psf_range: PSFRange = PSFRange(),
    noise_range: NoiseRange = NoiseRange(),
) -> tuple[np.ndarray, np.ndarray]:
    """A batch of training pairs, as network inputs and targets.

    Parameters
    ----------
    seed : int
        Seed of the batch. Sample ``i`` is ``make_sample(SeedSequence(seed, spawn_key=(i,)))``
        (the ``i``-th child of ``SeedSequence(seed).spawn``), so a batch is reproducible, its
        first samples do not depend on ``count``, and batches of different seeds are independent.
    count : int
        Samples N, at least 1.
    size, psf_range, noise_range
        As `make_sample`.

    Returns
    -------
    inputs : (N, 4, P, P) ndarray of float32
        The normalized blurred patch, then the three `psf_maps` channels.
    targets : (N, 1, P, P) ndarray of float32
        The normalized targets.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        msg = f"seed must be a non-negative integer, got {seed!r}"
        raise GpudeconvError(msg)
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        msg = f"count must be a positive integer (samples in the batch), got {count!r}; e.g. 32"
        raise GpudeconvError(msg)
    _validate_sample_options(seed, size, psf_range, noise_range)
    inputs = np.empty((count, 4, size, size), dtype=np.float32)
    targets = np.empty((count, 1, size, size), dtype=np.float32)
    for i in range(count):
        sample = make_sample(
            np.random.SeedSequence(int(seed), spawn_key=(i,)),
            size=size,
            psf_range=psf_range,
            noise_range=noise_range,
        )
        inputs[i, 0] = sample.blurred
        inputs[i, 1:] = sample.psf_maps
        targets[i, 0] = sample.target
    return inputs, targets
