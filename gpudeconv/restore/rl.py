"""Richardson-Lucy deconvolution, written once for every backend."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

from .._errors import GpudeconvError, GpudeconvWarning
from ..backend import Backend, backend_for, is_cupy_array
from ..operators import Convolution
from ..psf import validate_psf

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


def _operators(psf, channels: int, is_colour: bool, backend: Backend) -> list[Convolution]:
    """One operator per channel (shared when one PSF serves all channels)."""
    host_psf = backend.to_host(psf) if is_cupy_array(psf) else psf
    host_psf = validate_psf(host_psf, channels=channels if is_colour else None)
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
    psf : (k, k) or (C, k, k) array_like
        The PSF, odd sides, normalized to sum 1 internally; one for all channels or one each.
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

    (without no-data pixels :math:`H^T w = 1` inside the frame and is left out, which is the
    plain iteration of [1]_ and [2]_). The estimate starts from the observed image. The image is
    padded by reflection by the PSF radius so the borders do not darken or ring; data with
    negative values is lifted by a constant pedestal for the fit (with a warning) and lowered
    after, since RL needs non-negative data.

    References
    ----------
    .. [1] Richardson, W. H. (1972), "Bayesian-based iterative method of image restoration",
           JOSA 62, 55. :doi:`10.1364/JOSA.62.000055`
    .. [2] Lucy, L. B. (1974), "An iterative technique for the rectification of observed
           distributions", AJ 79, 745. :doi:`10.1086/111605`
    """
    backend = backend_for(image, backend)
    _validate_image(image)
    iterations = _validate_iterations(iterations)
    is_colour = image.ndim == 3
    channels = image.shape[0] if is_colour else 1
    operators = _operators(psf, channels, is_colour, backend)
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


def _restore_plane(observed, operator: Convolution, iterations: int, step):
    """RL on one 2-D plane on ``operator``'s backend; returns the restored plane."""
    backend = operator.backend
    xp = backend.xp
    valid = xp.isfinite(observed)
    has_nodata = not bool(valid.all())
    if has_nodata and not bool(valid.any()):
        return xp.full_like(observed, np.nan)
    data = xp.where(valid, observed, 0) if has_nodata else observed
    pedestal = _pedestal(data[valid] if has_nodata else data)
    if pedestal:
        data = data + data.dtype.type(pedestal)
        if has_nodata:
            data = xp.where(valid, data, 0)

    ry, rx = operator.radius
    pad = ((ry, ry), (rx, rx))
    padded = (
        xp.pad(data, pad, mode="reflect")
        if min(data.shape) > max(ry, rx)
        else xp.pad(data, pad, mode="symmetric")
    )
    weight = norm = None
    if has_nodata:
        weight = xp.pad(valid.astype(data.dtype), pad, mode="symmetric")
        norm = operator.adjoint(weight)
        # No-data pixels start from the mean of the data instead of 0, from which RL cannot move.
        fill = data.dtype.type(float(data[valid].mean()))
        estimate = xp.where(weight > 0, padded, fill)
    else:
        estimate = padded.copy()

    blurred = xp.empty_like(estimate)  # work buffers, allocated once
    correction = xp.empty_like(estimate)
    for _ in range(iterations):
        operator.forward(estimate, out=blurred)
        ratio = backend.rl_ratio(padded, blurred, weight)
        operator.adjoint(ratio, out=correction)
        backend.rl_update(estimate, correction, norm)
        step()

    height, width = observed.shape
    restored = estimate[ry : ry + height, rx : rx + width]
    if pedestal:
        restored = restored - restored.dtype.type(pedestal)
    if has_nodata:
        restored = xp.where(valid, restored, xp.nan).astype(observed.dtype, copy=False)
    return restored


def _pedestal(values) -> float:
    """The constant that lifts negative data to 0 (0 when the data is non-negative)."""
    low = float(values.min())
    if low >= 0:
        return 0.0
    warnings.warn(
        f"the image has negative values (minimum {low:.4g}); Richardson-Lucy needs non-negative "
        f"data, so a pedestal of {-low:.4g} is added for the restoration and removed after",
        GpudeconvWarning,
        stacklevel=4,
    )
    return -low


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="it", desc="Richardson-Lucy", leave=False)
