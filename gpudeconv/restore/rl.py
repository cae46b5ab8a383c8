"""Richardson-Lucy deconvolution, written once for every backend."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

from .._errors import GpudeconvError, GpudeconvWarning
from ..backend import Backend, backend_for, is_cupy_array
from ..operators import Convolution, SpatiallyVaryingConvolution
from ..psf import PSFField, validate_psf
from ..psf.field import FieldWindow

__all__ = ["richardson_lucy"]

#: More iterations than this are legal but almost always over-sharpen noise into artefacts.
MANY_ITERATIONS = 500


def _validate_image(image) -> None:
    dtype = np.dtype(image.dtype)
    if dtype.kind not in "uif":
        msg = f"image must hold real numbers, got dtype {dtype}; convert it to float32"
        raise GpudeconvError(msg)
    if image.ndim not in (2, 3):
        msg = (
            f"image must be 2-D (H, W) or channel-first colour (C, H, W), got shape "
            f"{tuple(image.shape)}"
        )
        raise GpudeconvError(msg)
    if min(image.shape[-2:]) < 2:
        msg = f"image of shape {tuple(image.shape)} is too small to deconvolve"
        raise GpudeconvError(msg)


def _validate_iterations(iterations) -> int:
    if isinstance(iterations, bool) or int(iterations) != iterations or iterations < 1:
        msg = (
            f"iterations must be a positive integer, got {iterations!r}; "
            "typical values are 10 to 50"
        )
        raise GpudeconvError(msg)
    if iterations > MANY_ITERATIONS:
        warnings.warn(
            f"{iterations} iterations of plain Richardson-Lucy will amplify noise into artefacts; "
            "10 to 50 is typical",
            GpudeconvWarning,
            stacklevel=3,
        )
    return int(iterations)


def _operators(psf, image_shape, channels: int, is_colour: bool, backend: Backend) -> list:
    """One blur operator per channel (shared when one PSF or field serves all channels)."""
    fields = [psf] if isinstance(psf, (PSFField, FieldWindow)) else None
    if (
        isinstance(psf, (list, tuple))
        and psf
        and all(isinstance(p, (PSFField, FieldWindow)) for p in psf)
    ):
        if len(psf) != channels:
            msg = f"{len(psf)} PSF fields were given for an image of {channels} channel(s)"
            raise GpudeconvError(msg)
        fields = list(psf)
    if fields is not None:
        operators = []
        for field in fields:
            field.check_image_shape(image_shape)
            # The restoration pads each plane by two PSF radii (see _restore_plane): the
            # operator works on the padded array, whose pixel (0, 0) lies 2r before the image's
            # (or the window's) first pixel in the field.
            whole, origin = (
                (field.field, field.origin) if isinstance(field, FieldWindow) else (field, (0, 0))
            )
            pad = 2 * whole.radius
            operators.append(
                SpatiallyVaryingConvolution(
                    whole, backend, origin=(origin[0] - pad, origin[1] - pad)
                )
            )
        return operators * channels if len(operators) == 1 else operators
    host_psf = validate_psf(backend.to_host(psf), channels=channels if is_colour else None)
    if host_psf.ndim == 2:
        return [Convolution(host_psf, backend)] * channels
    return [Convolution(plane, backend) for plane in host_psf]


def richardson_lucy(
    image,
    psf,
    iterations: int = 30,
    *,
    backend: str | Backend | None = None,
    progress: bool = False,
    callback: Callable[[int, int], None] | None = None,
):
    """Restore a blurred image by Richardson-Lucy iterations.

    Parameters
    ----------
    image : (H, W) or (C, H, W) ndarray (NumPy or CuPy)
        The observed image; colour channel-first, restored channel by channel. Non-finite pixels
        are no-data: they carry no weight in the fit and come back as NaN.
    psf : (k, k) or (C, k, k) array_like, or PSFField or FieldWindow (or one per channel)
        The PSF, odd sides, normalized to sum 1 internally; one for all channels or one each.
        A :class:`~gpudeconv.PSFField` made for this image's shape restores with a PSF that
        varies across the field (:class:`~gpudeconv.operators.SpatiallyVaryingConvolution`);
        ``field.window(y0, x0, H, W)`` restores a tile of the field's image with its own part of
        the field.
    iterations : int
        Number of iterations (10 to 50 is typical; more sharpens noise).
    backend : {'auto', 'numpy', 'cupy'} or Backend, optional
        Where to compute; NumPy input comes back as NumPy, CuPy input as CuPy.
    progress : bool
        Show a tqdm progress bar over all iterations of all channels.
    callback : callable(done, total), optional
        Called after each iteration with the iterations done and the total (all channels).

    Returns
    -------
    restored : ndarray, shape of ``image``
        float32, or float64 for float64 input.

    Notes
    -----
    Each iteration, with :math:`H` the blur and :math:`w` the data weights (0 on no-data),

    .. math:: u \\leftarrow \\frac{u}{H^T w} \\cdot H^T\\!\\left(\\frac{w\\, d}{H u}\\right)

    Inside the frame :math:`H^T w = 1` and this is the plain iteration of [1]_ and [2]_. The
    estimate starts from the observed image. The image is padded by reflection by the PSF
    radius, and the estimate reaches one more radius beyond, unobserved (:math:`w = 0`) [3]_, so
    borders neither darken nor ring and a flat image stays flat. Data with negative values is
    lifted by a constant pedestal for the fit (with a warning) and lowered after, since RL
    needs non-negative data.

    References
    ----------
    .. [1] Richardson, W. H. (1972), "Bayesian-based iterative method of image restoration",
           JOSA 62, 55. :doi:`10.1364/JOSA.62.000055`
    .. [2] Lucy, L. B. (1974), "An iterative technique for the rectification of observed
           distributions", AJ 79, 745. :doi:`10.1086/111605`
    .. [3] Bertero, M. & Boccacci, P. (2005), "A simple method for the reduction of boundary
           effects in the Richardson-Lucy approach to image deconvolution", A&A 437, 369.
           :doi:`10.1051/0004-6361:20052717`
    """
    backend = backend_for(image, backend)
    _validate_image(image)
    iterations = _validate_iterations(iterations)
    is_colour = image.ndim == 3
    channels = image.shape[0] if is_colour else 1
    operators = _operators(psf, image.shape[-2:], channels, is_colour, backend)
    dtype = backend.float_dtype(image.dtype)
    data = backend.asarray(image, dtype=dtype)
    planes = data if is_colour else data[None]

    total = iterations * channels
    bar = _progress_bar(total) if progress else None
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if bar is not None:
            bar.update(1)
        if callback is not None:
            callback(done, total)

    try:
        restored = backend.xp.empty_like(planes)
        for index in range(channels):
            restored[index] = _restore_plane(planes[index], operators[index], iterations, step)
    finally:
        if bar is not None:
            bar.close()
    result = restored if is_colour else restored[0]
    return result if is_cupy_array(image) else backend.to_host(result)


def _restore_plane(observed, operator, iterations: int, step):
    """RL on one 2-D plane on ``operator``'s backend; returns the restored plane.

    The plane is padded by reflection by the PSF radius (the padded pixels count as observed),
    and the estimate extends by one more PSF radius of unobserved pixels (weight 0), so that the
    blur of every observed pixel is computed from estimated light only, never from zeros
    outside the array: a flat image is then an exact fixed point (Bertero & Boccacci 2005).
    """
    backend = operator.backend
    xp = backend.xp
    dtype = observed.dtype.type
    valid = xp.isfinite(observed)
    has_nodata = not bool(valid.all())
    if has_nodata and not bool(valid.any()):
        return xp.full_like(observed, np.nan)
    values = observed[valid] if has_nodata else observed
    low, high = float(values.min()), float(values.max())
    pedestal = _pedestal(low, high)
    # RL does not depend on the data's scale; restoring at unit scale keeps the division guard
    # meaningful for flux-calibrated data (pixel values of 1e-14 and less).
    scale = (high + pedestal) or 1.0
    data = (observed + dtype(pedestal)) * dtype(1 / scale)
    if has_nodata:
        data = xp.where(valid, data, dtype(0))

    ry, rx = operator.radius
    frame = ((ry, ry), (rx, rx))
    mode = "reflect" if min(data.shape) > max(ry, rx) else "symmetric"
    padded = xp.pad(data, frame, mode=mode)
    if has_nodata:
        observed_weight = xp.pad(valid.astype(data.dtype), frame, mode=mode)
    else:
        observed_weight = xp.ones_like(padded)
    weight = xp.pad(observed_weight, frame)  # the unobserved ring: weight 0
    extended = xp.pad(padded, frame)
    estimate = xp.pad(padded, frame, mode="edge")
    if has_nodata:
        # No-data pixels start from the mean of the data instead of 0, from which RL cannot move.
        fill = dtype(float(data[valid].mean()))
        estimate = xp.where(xp.pad(observed_weight, frame, mode="edge") > 0, estimate, fill)
    norm = operator.adjoint(weight)
    del weight, observed_weight  # only the normalization needs them

    blurred = xp.empty_like(estimate)  # work buffers, allocated once
    correction = xp.empty_like(estimate)
    # The data is 0 wherever the weight is (no-data pixels, the unobserved ring), so the ratio
    # is already 0 there and needs no weighting: the weights act through the normalization.
    for _ in range(iterations):
        operator.forward(estimate, out=blurred)
        ratio = backend.rl_ratio(extended, blurred)
        operator.adjoint(ratio, out=correction)
        backend.rl_update(estimate, correction, norm)
        step()

    height, width = observed.shape
    restored = estimate[2 * ry : 2 * ry + height, 2 * rx : 2 * rx + width] * dtype(scale)
    if pedestal:
        restored -= dtype(pedestal)
    if has_nodata:
        restored = xp.where(valid, restored, dtype(np.nan))
    return restored


def _pedestal(low: float, high: float) -> float:
    """The constant that lifts negative data just above 0 (0 when the data is non-negative).

    The lowest pixel lands at a thousandth of the data's range rather than at 0, where the
    multiplicative RL update could never move it.
    """
    if low >= 0:
        return 0.0
    pedestal = -low + 1e-3 * (high - low)
    warnings.warn(
        f"the image has negative values (minimum {low:.4g}); Richardson-Lucy needs non-negative "
        f"data, so a pedestal of {pedestal:.4g} is added for the restoration and removed after",
        GpudeconvWarning,
        stacklevel=4,
    )
    return pedestal


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="it", desc="Richardson-Lucy", leave=False)
