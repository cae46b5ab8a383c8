"""Luminance mode: restore a colour image's luminance once, keep its colour differences."""

from __future__ import annotations

import numpy as np

from .._errors import GpudeconvError
from ..backend import Backend, is_cupy_array

__all__ = ["luminance", "recombine"]


def _validate_colour(image, name: str = "image") -> None:
    if np.dtype(image.dtype).kind not in "uif":
        msg = f"{name} must hold real numbers, got dtype {image.dtype}; convert it to float32"
        raise GpudeconvError(msg)
    if image.ndim != 3:
        msg = (
            f"{name} must be a channel-first colour image (C, H, W), got shape "
            f"{tuple(image.shape)}; a grey image is its own luminance"
        )
        raise GpudeconvError(msg)


def _validate_weights(weights, channels: int) -> list[float]:
    if weights is None:
        return [1.0 / channels] * channels
    values = np.asarray(weights.get() if is_cupy_array(weights) else weights)
    if values.dtype.kind not in "uif" or values.shape != (channels,):
        msg = (
            f"weights must be {channels} numbers, one per channel, got {weights!r}; "
            "e.g. (0.2126, 0.7152, 0.0722) for linear RGB"
        )
        raise GpudeconvError(msg)
    values = values.astype(np.float64)
    total = float(values.sum())
    if not np.isfinite(values).all() or (values < 0).any() or not total > 0:
        msg = (
            f"weights must be finite, non-negative and not all 0, got {values.tolist()}; "
            "they are normalized to sum 1"
        )
        raise GpudeconvError(msg)
    return [float(v) / total for v in values]


def luminance(image, weights=None):
    """The luminance of a colour image: the weighted mean of its channels.

    Parameters
    ----------
    image : (C, H, W) ndarray (NumPy or CuPy)
        Channel-first colour image.
    weights : (C,) array_like, optional
        Weight of each channel, non-negative, normalized to sum 1; equal by default. For
        linear RGB, (0.2126, 0.7152, 0.0722) gives the photometric luminance.

    Returns
    -------
    (H, W) ndarray
        On the image's device; float32, or float64 for float64 input. A pixel that is NaN in
        any channel is NaN.
    """
    _validate_colour(image)
    weights = _validate_weights(weights, image.shape[0])
    dtype = Backend.float_dtype(image.dtype)
    planes = image.astype(dtype, copy=False)
    result = planes[0] * dtype.type(weights[0])
    for plane, weight in zip(planes[1:], weights[1:], strict=True):
        result += plane * dtype.type(weight)
    return result


def recombine(image, luminance_before, luminance_after):
    """Replace a colour image's luminance, keeping its chrominance.

    Parameters
    ----------
    image : (C, H, W) ndarray (NumPy or CuPy)
        The colour image whose luminance was ``luminance_before``.
    luminance_before, luminance_after : (H, W) ndarray
        The luminance of ``image`` (`luminance`, with any weights) and its replacement (e.g.
        restored), on the same device as ``image``.

    Returns
    -------
    (C, H, W) ndarray
        ``image + (luminance_after - luminance_before)`` in every channel: float32, or
        float64 for float64 input.

    Notes
    -----
    With weights :math:`w_c` summing to 1, :math:`L = \\sum_c w_c I_c` and the chrominance
    :math:`I_c - L` split the image exactly; adding :math:`\\Delta = L' - L` to every channel
    keeps every :math:`I_c - L` and makes the luminance :math:`L + \\Delta \\sum_c w_c = L'`,
    whatever the weights. The change is additive rather than a ratio
    :math:`I_c \\cdot L' / L`, which would keep the colour ratios but divides by a luminance
    that is near zero or negative on a sky-subtracted background, and turns its noise into
    colour noise there.
    """
    _validate_colour(image)
    plane_shape = tuple(image.shape[1:])
    on_device = is_cupy_array(image)
    for name, plane in (
        ("luminance_before", luminance_before),
        ("luminance_after", luminance_after),
    ):
        if tuple(plane.shape) != plane_shape:
            msg = (
                f"{name} must have the image's plane shape {plane_shape}, got {tuple(plane.shape)}"
            )
            raise GpudeconvError(msg)
        if is_cupy_array(plane) != on_device:
            where = "a CuPy" if on_device else "a NumPy"
            msg = f"{name} must be {where} array like the image; move it with the backend"
            raise GpudeconvError(msg)
    dtype = Backend.float_dtype(image.dtype)
    change = luminance_after.astype(dtype) - luminance_before.astype(dtype)
    return image.astype(dtype) + change[None]
