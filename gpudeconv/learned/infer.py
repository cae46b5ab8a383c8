"""Learned deconvolution of whole images: the network of `gpudeconv.learned.network` run over
an image in overlapping tiles, on the NumPy or CuPy backend, without PyTorch.

Each channel is put on the network's scale by `gpudeconv.learned.data.normalize` (sky at 0,
noise of standard deviation 0.2), described by the PSF maps of `psf_maps` (FWHM / 4, e1, e2
at every pixel) and restored tile by tile. The network's correction, blended across the
tiles, is scaled back to data units and added to the image.

Tiles
-----
The network commutes with shifts by multiples of 4 and an output pixel sees at most 23 pixels
on each side (`gpudeconv.learned.network`). So tile cores of ``tile`` pixels (a multiple of 4)
start at multiples of 4, each tile's input reaches ``HALO`` (24) pixels beyond the part of its
output that is used, and the image is padded by reflection for the tiles at its edges: every
used output pixel is then the one the network gives on the whole padded image, to float32
rounding (the tests measure it). Neighbouring tiles' outputs are blended by a raised-cosine
crossfade ``BLEND`` (16) pixels wide, centred on the boundary of their cores, with weights that
sum to 1: a safeguard that keeps any residual difference from showing as a step. The input of
a tile is its core plus ``BLEND / 2 + HALO`` = 32 pixels on each side: 27 % more pixels than
the core at the default 512.
"""

from __future__ import annotations

import importlib.resources
import math
import os
import warnings
from pathlib import Path

import numpy as np
from scipy import ndimage

from .._errors import GpudeconvError, GpudeconvWarning
from ..backend import Backend, backend_for, is_cupy_array
from ..psf import PSFField, validate_psf
from ..psf.field import FieldWindow
from ..restore import rl
from .data import NOISE_UNITS, PSFRange, _maps_from_nodes, _node_shapes, normalize
from .network import MULTIPLE, Weights, forward

__all__ = [
    "BLEND",
    "DEFAULT_TILE",
    "HALO",
    "WEIGHTS_ENV",
    "WEIGHTS_FILE",
    "learned_deconvolve",
    "load_weights",
    "weights_name",
    "weights_path",
]

#: The packaged weights, in ``gpudeconv/learned/weights/``.
WEIGHTS_FILE = "learned-v1.npz"
#: An environment variable naming a weight file to use instead of the packaged one.
WEIGHTS_ENV = "GPUDECONV_LEARNED_WEIGHTS"
#: Pixels of input beyond any output pixel used: more than the network's reach of 23.
HALO = 24
#: The network's correction keeps its light within this many PSF FWHMs (`_local_mean`).
FLUX_WIDTH = 1.5
#: Width of the crossfade between neighbouring tiles (pixels, a multiple of 4).
BLEND = 16
#: A tile's input reaches this far beyond its core on each side.
_MARGIN = HALO + BLEND // 2
#: Side of the tile cores by default: (512 + 64)**2 pixels take about 230 MB in the network.
DEFAULT_TILE = 512
#: The smallest tile core accepted.
MIN_TILE = 32
#: The smallest image side accepted (the noise of smaller images is not measurable).
MIN_SIDE = 16
#: A PSF whose FWHM lies outside the training range by more than this fraction, or whose axis
#: ratio lies below the range, gets a warning ...
_WARN_MARGIN = 0.1
#: ... and one beyond this factor of the range (FWHM above twice its top or below half its
#: bottom, axis ratio below half its bottom) is refused.
_REFUSE_FACTOR = 2.0
#: Normalized level (in units of 5 noise sigma: 100 sigma) beyond which a pixel is far from
#: anything the network was trained on, and the share of such pixels from which the image is
#: taken for planetary, lunar or very bright extended data.
_BRIGHT_LEVEL = 20.0
_BRIGHT_FRACTION = 0.05
#: Immerkaer's noise mask (`gpudeconv.psf.limb.noise_sigma`), for planes with no-data pixels.
_NOISE_MASK = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float64)


def learned_deconvolve(
    image,
    psf,
    *,
    weights: Weights | str | os.PathLike | None = None,
    backend: str | Backend | None = None,
    tile: int = DEFAULT_TILE,
    progress: bool = False,
    normalization=None,
):
    """Restore an image with the trained deconvolution network.

    Parameters
    ----------
    image : (H, W) or (C, H, W) array_like (NumPy or CuPy)
        Linear data; colour channel-first, each channel restored on its own. Non-finite pixels
        are no-data: they enter the network at the sky level and come back NaN. Sides of at
        least 16 pixels.
    psf : (k, k) or (C, k, k) array_like, PSFField or FieldWindow
        The PSF: one for all channels, one per channel, or a field that varies across the
        image (the same for all channels; its image shape, or the window's, must be the
        image's). The network sees its FWHM and ellipticity at every pixel (`psf_maps`).
    weights : Weights, str or os.PathLike, optional
        The network, or the ``.npz`` file that `Weights.save` wrote. By default the file named
        by the environment variable ``GPUDECONV_LEARNED_WEIGHTS``, else the packaged
        ``gpudeconv/learned/weights/learned-v1.npz``.
    backend : {'auto', 'numpy', 'cupy'} or Backend, optional
        Where to compute; NumPy input comes back as NumPy, CuPy input as CuPy.
    tile : int
        Side of the tile cores, a multiple of 4 of at least 32 (default 512). It bounds the
        memory: about 700 bytes per pixel of ``(tile + 64)**2`` for the network's layers;
        the result does not depend on it beyond float32 rounding.
    progress : bool
        Show a progress bar over the tiles (tqdm).
    normalization : (offset, scale) or sequence of them (one per channel), optional
        The normalization to use instead of the one measured on each plane: a mosaic
        restored in parts (`gpudeconv.tiles.deconvolve_file`) gives every part the one
        measured on the whole image, so that the parts agree. Its check for data unlike
        the training's (planetary, lunar) is then the caller's, on the whole image: a part
        over a bright object is not such data.

    Returns
    -------
    restored : ndarray of float32, shape of ``image``
        float32 also for float64 input: the network computes in float32.

    Raises
    ------
    GpudeconvError
        If the weights are missing or unreadable, the PSF is far outside the training range
        (FWHM above twice its top, e.g. 15 px, or below half its bottom, or an axis ratio
        below half its bottom), or a plane has no measurable noise.

    Warns
    -----
    GpudeconvWarning
        If the PSF lies outside the training range by more than 10 % in FWHM or below it in
        axis ratio, or more than 5 % of a plane's pixels lie over 100 noise sigma from its
        median (planetary or lunar data, or very bright extended objects: the network was
        trained on deep-sky fields).

    Notes
    -----
    Per plane, with ``offset`` and ``scale`` those of `normalize` (median, 5 noise sigma;
    with no-data pixels both are measured on the data alone) and :math:`f` the network,

    .. math:: \\hat u = d + \\mathrm{scale} \\cdot (f(x) - x), \\qquad
              x = (d - \\mathrm{offset}) / \\mathrm{scale}

    which is ``denormalize(f(x), offset, scale)`` written so that all-zero weights (the
    identity network) return the data unchanged, bit for bit. The tiling is described in the
    module's docstring.
    """
    image = rl._as_image(image)
    chosen = backend_for(image, backend)
    _validate_image(image)
    tile = _validate_tile(tile)
    network = load_weights(weights)
    is_colour = image.ndim == 3
    channels = image.shape[0] if is_colour else 1
    shape = tuple(int(n) for n in image.shape[-2:])
    fields = _psf_fields(psf, shape, channels, chosen)
    nodes = [_node_shapes(field) for field, _ in fields]
    _check_psf_range(nodes)
    norms = _validate_normalization(normalization, channels)

    data = chosen.asarray(image, dtype=np.float32)
    planes = data if is_colour else data[None]
    rl._check_has_data(planes, chosen.xp)
    restored = chosen.xp.empty_like(planes)
    rows, columns = _tile_spans(shape[0], tile), _tile_spans(shape[1], tile)
    bar = _progress_bar(channels * len(rows) * len(columns), progress)
    try:
        for index in range(channels):
            field, origin = fields[index if len(fields) > 1 else 0]
            node_shapes = nodes[index if len(nodes) > 1 else 0]
            restored[index] = _restore_plane(
                planes[index],
                field,
                origin,
                node_shapes,
                network,
                rows,
                columns,
                chosen,
                bar,
                None if norms is None else norms[index],
            )
    finally:
        if bar is not None:
            bar.close()
    result = restored if is_colour else restored[0]
    return result if is_cupy_array(image) else chosen.to_host(result)


# --- weights ----------------------------------------------------------------------------------


def load_weights(weights: Weights | str | os.PathLike | None = None) -> Weights:
    """The network's weights: ``weights`` itself, the file it names, or by default the file
    named by ``GPUDECONV_LEARNED_WEIGHTS``, else the packaged ``learned-v1.npz``."""
    if isinstance(weights, Weights):
        return weights
    if isinstance(weights, (str, os.PathLike)):
        return Weights.load(weights)
    if weights is not None:
        msg = (
            f"weights must be a gpudeconv.learned.network.Weights, the path of its .npz file, "
            f"or None for the packaged network, got {type(weights).__name__}"
        )
        raise GpudeconvError(msg)
    with importlib.resources.as_file(weights_path()) as path:
        return Weights.load(path)


def weights_name(weights=None) -> str:
    """The network as records (HISTORY) name it: the file name of ``weights`` (None: of
    `weights_path`'s file; a path: its own), or a `Weights`' name."""
    if weights is None:
        return weights_path().name
    if isinstance(weights, (str, os.PathLike)):
        return Path(weights).name
    return getattr(weights, "name", "given weights")


def weights_path():
    """The weight file that ``weights=None`` loads: the file named by the environment variable
    ``GPUDECONV_LEARNED_WEIGHTS``, else the packaged ``learned-v1.npz`` (a `pathlib.Path`, or
    an `importlib.resources` traversable for a zipped install)."""
    override = os.environ.get(WEIGHTS_ENV, "").strip()
    if override:
        if not Path(override).is_file():
            msg = f"{WEIGHTS_ENV} names {override!r}, which is not a file: fix or unset it"
            raise GpudeconvError(msg)
        return Path(override)
    packaged = importlib.resources.files(__package__).joinpath("weights", WEIGHTS_FILE)
    if not packaged.is_file():
        msg = "the packaged weights are missing; reinstall gpudeconv or pass weights="
        raise GpudeconvError(msg)
    return packaged


# --- validation -------------------------------------------------------------------------------


def _validate_image(image) -> None:
    rl._validate_image(
        image,
        min_side=MIN_SIDE,
        too_small=f"for the learned method: sides of at least {MIN_SIDE} pixels",
    )


def _validate_tile(tile) -> int:
    if (
        isinstance(tile, bool)
        or not isinstance(tile, (int, np.integer))
        or tile < MIN_TILE
        or tile % MULTIPLE
    ):
        msg = (
            f"tile must be a multiple of {MULTIPLE} of at least {MIN_TILE} pixels (the network "
            f"pools 4 x 4), got {tile!r}; e.g. 512"
        )
        raise GpudeconvError(msg)
    return int(tile)


def _validate_normalization(normalization, channels: int):
    """``normalization`` as one ``(offset, scale)`` per channel, or None."""
    if normalization is None:
        return None
    try:
        pairs = np.asarray(normalization, dtype=np.float64)
    except (TypeError, ValueError):
        pairs = np.empty(0)
    if pairs.shape == (2,):
        pairs = np.tile(pairs, (channels, 1))
    if pairs.shape != (channels, 2) or not np.isfinite(pairs).all() or not (pairs[:, 1] > 0).all():
        msg = (
            f"normalization must be (offset, scale) with a finite offset and a positive scale, "
            f"or one such pair per channel ({channels}), got {normalization!r}"
        )
        raise GpudeconvError(msg)
    return [(float(offset), float(scale)) for offset, scale in pairs]


def _psf_fields(psf, shape, channels: int, backend: Backend) -> list:
    """``[(field, origin)]``: one for all channels or one per channel, ``origin`` the image's
    pixel (0, 0) in the field's image."""
    if isinstance(psf, FieldWindow):
        psf.check_image_shape(shape)
        return [(psf.field, psf.origin)]
    if isinstance(psf, PSFField):
        psf.check_image_shape(shape)
        return [(psf, (0, 0))]
    host = validate_psf(backend.to_host(psf), channels=channels if channels > 1 else None)
    kernels = [host] if host.ndim == 2 else list(host)
    return [(PSFField.uniform(kernel, shape), (0, 0)) for kernel in kernels]


def _check_psf_range(nodes: list) -> None:
    """Warn where the PSF lies outside the training range, refuse it far outside."""
    trained = PSFRange()
    values = np.concatenate([n.reshape(-1, 3) for n in nodes])
    fwhm = values[:, 0]
    ellipticity = np.hypot(values[:, 1], values[:, 2])
    ratio = (1 - ellipticity) / (1 + ellipticity)
    # the node PSFs of the training fields vary about the drawn centre by these amounts
    low = trained.fwhm[0] * (1 - trained.fwhm_variation)
    high = trained.fwhm[1] * (1 + trained.fwhm_variation)
    ratio_low = max(trained.ratio[0] - trained.ratio_variation, 0.2)
    found = f"FWHM {fwhm.min():.2f} to {fwhm.max():.2f} px, axis ratio down to {ratio.min():.2f}"
    expected = (
        f"the network was trained on FWHM {low:g} to {high:g} px and axis ratios from {ratio_low:g}"
    )
    if (
        fwhm.max() > _REFUSE_FACTOR * high
        or fwhm.min() < low / _REFUSE_FACTOR
        or ratio.min() < ratio_low / _REFUSE_FACTOR
    ):
        msg = f"the PSF ({found}) is far outside what {expected}; use --method rl"
        raise GpudeconvError(msg)
    if (
        fwhm.max() > (1 + _WARN_MARGIN) * high
        or fwhm.min() < (1 - _WARN_MARGIN) * low
        or ratio.min() < ratio_low
    ):
        warnings.warn(
            f"the PSF ({found}) lies outside the training range: {expected}; its result may "
            "be unreliable: use --method rl",
            GpudeconvWarning,
            stacklevel=3,
        )


def _check_deep_sky(normalized: np.ndarray, valid: np.ndarray) -> None:
    """Warn when many pixels lie far from the sky: not the deep-sky data of the training."""
    far = np.abs(normalized[valid]) > _BRIGHT_LEVEL
    share = float(far.mean()) if far.size else 0.0
    if share > _BRIGHT_FRACTION:
        sigmas = _BRIGHT_LEVEL * NOISE_UNITS
        warnings.warn(
            f"{100 * share:.0f} % of the pixels lie over {sigmas:g} noise sigma from the "
            "median: planetary, lunar or very bright extended data; the network was trained "
            "on deep-sky data only (stars, galaxies, faint nebulae): use --method rl",
            GpudeconvWarning,
            stacklevel=4,
        )


# --- normalization ----------------------------------------------------------------------------


def _normalization(plane: np.ndarray, valid: np.ndarray) -> tuple[float, float]:
    """``(offset, scale)`` of `normalize`, measured on the finite pixels of a host plane."""
    if valid.all():
        _, offset, scale = normalize(plane)
        return offset, scale
    offset = float(np.median(plane[valid]))
    filled = np.where(valid, plane, offset).astype(np.float64)
    response = ndimage.convolve(filled, _NOISE_MASK, mode="reflect")
    # only where the mask saw data alone, and not on the plane's border (as noise_sigma)
    inside = ndimage.binary_erosion(valid, structure=np.ones((3, 3), bool), border_value=0)
    sigma = 1.4826 * float(np.median(np.abs(response[inside]))) / 6.0 if inside.any() else 0.0
    return offset, NOISE_UNITS * sigma


# --- tiles ------------------------------------------------------------------------------------


def _tile_spans(length: int, tile: int) -> list[tuple[int, int]]:
    """Tile cores ``[start, stop)`` along an axis of ``length`` pixels, rounded up to a
    multiple of 4 (the last core may be shorter than ``tile``)."""
    covered = -(-length // MULTIPLE) * MULTIPLE
    return [(start, min(start + tile, covered)) for start in range(0, covered, tile)]


def _ramps(spans: list[tuple[int, int]]) -> list[np.ndarray]:
    """Each tile's blending weights along an axis, over its core and ``BLEND / 2`` pixels on
    either side: 1, with raised-cosine ramps across the boundaries with its neighbours. Where
    two tiles meet, one's ramp up and the other's ramp down sum to 1."""
    rise = 0.5 - 0.5 * np.cos(math.pi * (np.arange(BLEND) + 0.5) / BLEND)
    ramps = []
    for index, (start, stop) in enumerate(spans):
        weight = np.ones(stop - start + BLEND)
        if index > 0:
            weight[:BLEND] = rise
        if index < len(spans) - 1:
            weight[-BLEND:] = 1 - rise
        ramps.append(weight.astype(np.float32))
    return ramps


def _restore_plane(
    plane, field, origin, nodes, weights, rows, columns, backend, bar, normalization=None
):
    """One (H, W) plane on ``backend``: normalized (by ``normalization``, else as measured on
    it), corrected tile by tile, scaled back."""
    xp = backend.xp
    height, width = plane.shape
    host = backend.to_host(plane)
    valid = np.isfinite(host)
    if not valid.any():
        if bar is not None:
            bar.update(len(rows) * len(columns))
        return xp.full_like(plane, np.nan)
    if normalization is None:
        offset, scale = _normalization(host, valid)
    else:
        offset, scale = normalization
    if not scale > 0:
        msg = (
            "a plane has no measurable noise (robust sigma 0): the learned method measures "
            "its scale in noise sigmas; use --method rl for noiseless or synthetic data"
        )
        raise GpudeconvError(msg)
    if normalization is None:  # else a part of a mosaic: the caller checks the whole once
        _check_deep_sky((host - offset) / scale, valid)

    has_nodata = not valid.all()
    finite = backend.asarray(valid) if has_nodata else None
    normalized = (plane - np.float32(offset)) / np.float32(scale)
    if has_nodata:
        normalized = xp.where(finite, normalized, np.float32(0))
    covered = (rows[-1][1], columns[-1][1])
    padded = xp.pad(
        normalized,
        ((_MARGIN, _MARGIN + covered[0] - height), (_MARGIN, _MARGIN + covered[1] - width)),
        mode="reflect",
    )
    # the correction, over the image's rows and columns from -BLEND/2 to covered + BLEND/2
    correction = xp.zeros((covered[0] + BLEND, covered[1] + BLEND), dtype=np.float32)
    row_ramps, column_ramps = _ramps(rows), _ramps(columns)
    for (y0, y1), row_ramp in zip(rows, row_ramps, strict=True):
        for (x0, x1), column_ramp in zip(columns, column_ramps, strict=True):
            window = (y1 - y0 + 2 * _MARGIN, x1 - x0 + 2 * _MARGIN)
            inputs = xp.empty((4, *window), dtype=np.float32)
            inputs[0] = padded[y0 : y0 + window[0], x0 : x0 + window[1]]
            field_origin = (origin[0] + y0 - _MARGIN, origin[1] + x0 - _MARGIN)
            inputs[1:] = backend.asarray(_maps_from_nodes(nodes, field, window, field_origin))
            output = forward(inputs, weights, backend=backend)
            used = (slice(HALO, window[0] - HALO), slice(HALO, window[1] - HALO))
            blend = backend.asarray(row_ramp[:, None] * column_ramp[None, :])
            correction[y0 : y1 + BLEND, x0 : x1 + BLEND] += blend * (
                output[0][used] - inputs[0][used]
            )
            if bar is not None:
                bar.update(1)
    half = BLEND // 2
    correction = correction[half : half + height, half : half + width]
    correction -= _local_mean(correction, finite, float(nodes[..., 0].max()), backend)
    restored = plane + np.float32(scale) * correction
    if has_nodata:
        restored = xp.where(finite, restored, np.float32(np.nan))
    return restored


def _local_mean(correction, finite, fwhm: float, backend: Backend):
    """The mean of ``correction`` around each pixel, over a Gaussian of `FLUX_WIDTH` times the
    PSF's largest FWHM (weighted by the data mask ``finite``, None for all).

    A deconvolution moves light by a few PSF widths, into stars' cores from their wings; it
    neither makes nor loses light. The network's correction is held to that by removing its
    local mean: the redistribution within a PSF width passes nearly untouched, and any light
    it would add or take over a larger area (measured on held-out scenes: up to a third of a
    wide star's flux) is taken back out.
    """
    from ..operators import Convolution
    from ..psf import gaussian

    sigma = FLUX_WIDTH * fwhm / 2.3548
    kernel = gaussian(2.3548 * sigma, size=2 * math.ceil(3 * sigma) + 1)
    average = Convolution(kernel, backend)
    mask = backend.xp.ones_like(correction) if finite is None else finite.astype(np.float32)
    weight = average.forward(mask)
    total = average.forward(correction * mask)
    return total / backend.xp.maximum(weight, np.float32(1e-6))


def _progress_bar(total: int, enabled: bool):
    from ..tiles import _progress_bar

    return _progress_bar(total, 0, enabled)
