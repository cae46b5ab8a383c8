"""Richardson-Lucy deconvolution, written once for every backend."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from .._errors import GpudeconvError, GpudeconvWarning
from ..backend import Backend, backend_for, is_cupy_array
from ..operators import Convolution, SpatiallyVaryingConvolution
from ..psf import PSFField, validate_psf
from ..psf.field import FieldWindow
from .noise import NoiseModel, estimate_noise

__all__ = ["ChannelInfo", "RestorationInfo", "richardson_lucy"]

#: More iterations than this are legal but almost always over-sharpen noise into artefacts.
MANY_ITERATIONS = 500


def _as_image(image):
    """``image`` as an array: a NumPy or CuPy array as it is, any other array-like (a nested
    list) as `numpy.asarray` makes it, whose dtype then follows the dtype policy."""
    if isinstance(image, np.ndarray) or is_cupy_array(image):
        return image
    try:
        return np.asarray(image)
    except ValueError:  # a ragged nested list
        msg = (
            f"image must be an (H, W) or (C, H, W) array; NumPy cannot make one of this "
            f"{type(image).__name__} (rows or channels of different lengths?)"
        )
        raise GpudeconvError(msg) from None


def _validate_image(image, *, min_side: int = 2, too_small: str = "to deconvolve") -> None:
    """One-line errors for an image no restoration takes: not real numbers, not (H, W) or
    (C, H, W), or sides under ``min_side`` (the message then ends with ``too_small``)."""
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
    if min(image.shape[-2:]) < min_side:
        msg = f"image of shape {tuple(image.shape)} is too small {too_small}"
        raise GpudeconvError(msg)


#: The refusal of an image without data, in memory (`_check_has_data`) and in tiles.
NO_DATA = "the image holds no data (every pixel is NaN or infinite): check the file or the stack"


def _check_has_data(planes, xp) -> None:
    """Refuse an image without one finite pixel in any of its ``(C, H, W)`` ``planes``: there
    is nothing to restore. A colour image with only some channels all no-data is restored
    (those channels come back NaN). Plane by plane: most images stop at the first."""
    if not any(bool(xp.isfinite(plane).any()) for plane in planes):
        raise GpudeconvError(NO_DATA)


def all_saturated(level: float, where: str = "") -> str:
    """The refusal of an image (``where``: a part of it, e.g. ``' of channel 2'``) whose every
    pixel is at or above the saturation ``level``, in memory and in tiles."""
    return (
        f"every pixel{where} is at or above the saturation level {level:g}; give a higher "
        "saturation level, or none"
    )


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


#: The Biggs-Andrews step never extrapolates further than this (an alpha near 1 overshoots).
MAX_ACCELERATION = 0.95
#: Default strengths of the regularized methods, tuned on `gpudeconv.synthetic.make_scene`
#: deep-sky scenes (tests/test_restore_quality.py holds the measurements they must keep).
DEFAULT_TV = 0.005
DEFAULT_DAMPING = 2.0
#: White's (1994) exponent of the damping function: the damped ratio is flat up to about the
#: threshold and joins the plain ratio smoothly above it.
DAMPING_POWER = 10.0
STOP_RULES = ("noise", "change")


@dataclass(frozen=True)
class _Settings:
    """The options of the RL steps, validated once for all channels."""

    noise: object = None  # None (plain Poisson RL), "auto", a NoiseModel, or one per channel
    background: float | None = None
    read_noise: float | None = None
    gain: float | None = None
    regularization: float = 0.0
    damping: float | None = None
    accelerate: bool = False
    stop: str | None = None
    tolerance: float = 1e-3
    dering: float = 0.0
    saturation: object = None  # None, "auto" or a level in data units
    record: bool = False

    @property
    def needs_noise(self) -> bool:
        return (
            self.noise is not None
            or self.damping is not None
            or self.stop == "noise"
            or any(v is not None for v in (self.background, self.read_noise, self.gain))
        )


@dataclass
class ChannelInfo:
    """What happened to one channel (or to the luminance) in `richardson_lucy`.

    Attributes
    ----------
    iterations : int
        Iterations run.
    stopped : str
        Why it ended: ``'iterations'`` (all ran), ``'noise'`` (the data term reached the noise
        level), ``'change'`` (the estimate changed less than the tolerance), ``'no data'``.
    data_term : list of float
        The data term before each update, as a reduced Poisson deviance: the mean over observed
        pixels of the deviance in noise units, about 1 when the model fits the data to its noise
        (recorded when asked for, or needed by the stopping rule or acceleration). Without a
        noise model (plain RL) the deviance is of the data scaled to a maximum of 1, not in
        noise units: comparable between iterations only.
    noise : NoiseModel or None
        The noise model of the data term (None: plain Poisson RL on the data as given).
    saturated : int
        Pixels whose data is only a lower bound, as saturated (the detected ones and their
        neighbours): left out of the data term, and the model is raised to them, never pulled
        down.
    saturation : float or None
        The saturation level used.
    restarts : int
        Biggs-Andrews restarts after the data term grew.
    """

    iterations: int = 0
    stopped: str = "iterations"
    data_term: list = field(default_factory=list)
    noise: object = None
    saturated: int = 0
    saturation: float | None = None
    restarts: int = 0

    def to_dict(self) -> dict:
        """A JSON-friendly dict (no NaN)."""
        noise = None
        if self.noise is not None:
            noise = {
                key: (_finite(value) if isinstance(value, float) else value)
                for key, value in asdict(self.noise).items()
            }
        return {
            "iterations": self.iterations,
            "stopped": self.stopped,
            "data_term": [_finite(v) for v in self.data_term],
            "noise": noise,
            "saturated_pixels": self.saturated,
            "saturation": _finite(self.saturation),
            "restarts": self.restarts,
        }


@dataclass
class RestorationInfo:
    """What `richardson_lucy` did, returned with ``return_info=True``.

    Attributes
    ----------
    channels : list of ChannelInfo
        One per channel; one (the luminance) in luminance mode.
    options : dict
        The options in effect (method parameters, defaults filled in).
    """

    channels: list
    options: dict

    @property
    def iterations(self) -> int:
        """The most iterations any channel ran."""
        return max((c.iterations for c in self.channels), default=0)

    @property
    def stopped(self) -> str:
        """Why the iterations ended (channels that ended differently are joined by '/')."""
        reasons = dict.fromkeys(c.stopped for c in self.channels)
        return "/".join(reasons)

    def to_dict(self) -> dict:
        """A JSON-friendly dict (no NaN)."""
        return {
            "iterations": self.iterations,
            "stopped": self.stopped,
            "options": dict(self.options),
            "channels": [c.to_dict() for c in self.channels],
        }


def _finite(value):
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _settings(
    *,
    noise,
    background,
    read_noise,
    gain,
    regularization,
    damping,
    accelerate,
    stop,
    tolerance,
    dering,
    saturation,
    record,
    channels,
) -> _Settings:
    if isinstance(noise, str) and noise != "auto":
        msg = f"noise must be None, 'auto' or a NoiseModel (one per channel), got {noise!r}"
        raise GpudeconvError(msg)
    if isinstance(noise, (list, tuple)):
        if len(noise) != channels or not all(isinstance(n, NoiseModel) for n in noise):
            msg = f"noise must hold one NoiseModel per channel ({channels}), got {noise!r}"
            raise GpudeconvError(msg)
        noise = tuple(noise)
    elif noise is not None and noise != "auto" and not isinstance(noise, NoiseModel):
        msg = f"noise must be None, 'auto' or a NoiseModel, got {type(noise).__name__}"
        raise GpudeconvError(msg)
    for name, value in (("background", background), ("read_noise", read_noise), ("gain", gain)):
        if value is not None and not (
            isinstance(value, (int, float, np.number)) and math.isfinite(value)
        ):
            msg = f"{name} must be a finite number or None (estimated), got {value!r}"
            raise GpudeconvError(msg)
    if (read_noise is None) != (gain is None):
        msg = (
            "read_noise (electrons) and gain (electrons per ADU) go together: give both or neither"
        )
        raise GpudeconvError(msg)
    regularization = _non_negative("regularization", regularization, "e.g. 0.002")
    if damping is not None:
        damping = _non_negative("damping", damping, "a threshold in noise sigmas, e.g. 1")
        if damping == 0:
            damping = None
    if stop is not None and stop not in STOP_RULES:
        msg = f"stop must be None, 'noise' or 'change', got {stop!r}"
        raise GpudeconvError(msg)
    tolerance = _non_negative("tolerance", tolerance, "a relative change, e.g. 0.001")
    dering = _non_negative("dering", dering, "a strength from 0 (off) to 1")
    if dering > 1:
        msg = f"dering must be a strength from 0 (off) to 1 (full), got {dering!r}"
        raise GpudeconvError(msg)
    if saturation is not None and saturation != "auto":
        if not (isinstance(saturation, (int, float, np.number)) and math.isfinite(saturation)):
            msg = f"saturation must be None, 'auto' or a level in data units, got {saturation!r}"
            raise GpudeconvError(msg)
        saturation = float(saturation)
    return _Settings(
        noise=noise,
        background=None if background is None else float(background),
        read_noise=None if read_noise is None else float(read_noise),
        gain=None if gain is None else float(gain),
        regularization=regularization,
        damping=damping,
        accelerate=bool(accelerate),
        stop=stop,
        tolerance=tolerance,
        dering=dering,
        saturation=saturation,
        record=bool(record),
    )


def _non_negative(name: str, value, example: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        msg = f"{name} must be a number, got {value!r}; {example}"
        raise GpudeconvError(msg)
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        msg = f"{name} must be a finite number >= 0, got {value!r}; {example}"
        raise GpudeconvError(msg)
    return value


def richardson_lucy(
    image,
    psf,
    iterations: int = 30,
    *,
    backend: str | Backend | None = None,
    noise=None,
    background: float | None = None,
    read_noise: float | None = None,
    gain: float | None = None,
    regularization: float = 0.0,
    damping: float | None = None,
    accelerate: bool = False,
    stop: str | None = None,
    tolerance: float = 1e-3,
    dering: float = 0.0,
    saturation=None,
    luminance: bool = False,
    return_info: bool = False,
    record_fit: bool = True,
    progress: bool = False,
    callback: Callable[[int, int], None] | None = None,
):
    """Restore a blurred image by Richardson-Lucy iterations, plain or regularized.

    Parameters
    ----------
    image : (H, W) or (C, H, W) array_like (NumPy or CuPy)
        The observed image; colour channel-first, restored channel by channel (or by its
        luminance, ``luminance=True``). Non-finite pixels are no-data: they carry no weight in
        the fit and come back as NaN.
    psf : (k, k) or (C, k, k) array_like, or PSFField or FieldWindow (or one per channel)
        The PSF, odd sides, normalized to sum 1 internally; one for all channels or one each.
        A :class:`~gpudeconv.PSFField` made for this image's shape restores with a PSF that
        varies across the field (:class:`~gpudeconv.operators.SpatiallyVaryingConvolution`);
        ``field.window(y0, x0, H, W)`` restores a tile of the field's image with its own part of
        the field.
    iterations : int
        Most iterations to run (10 to 50 is typical; more sharpens noise). A stopping rule may
        end earlier.
    backend : {'auto', 'numpy', 'cupy'} or Backend, optional
        Where to compute; NumPy input comes back as NumPy, CuPy input as CuPy.
    noise : None, 'auto', NoiseModel or list of NoiseModel
        The data term. None (default): plain Poisson RL on the data as given (negative data is
        lifted by a pedestal). ``'auto'``: sky background and noise estimated from each channel
        (:func:`~gpudeconv.restore.noise.estimate_noise`), and the Poisson-plus-Gaussian data
        term of Snyder et al. [4]_: the sky is a known background under the restored light, so
        faint sky is neither driven to zero nor sharpened into grain. A NoiseModel (one per
        channel) gives the model itself (the tile driver measures one for the whole mosaic).
        Damping, ``stop='noise'`` and any of the next three parameters imply ``'auto'``.
    background : float, optional
        Sky level (data units) of the noise model instead of the estimate.
    read_noise, gain : float, optional
        Read noise in electrons and gain in electrons per data unit, both or neither: the
        Gaussian part of the noise model instead of the estimate.
    regularization : float
        Total-variation strength :math:`\\lambda` (Dey et al. [5]_), 0 for none; 0.002 to 0.01
        is typical. Smooths noise while keeping edges. A gradient under a tenth of the noise, or
        under :math:`8 \\lambda u` at a pixel of value :math:`u`, counts as flat: below that
        floor the explicit TV step would overshoot and grow a checkerboard on noise-free flat
        areas (clipped cores, smooth high-SNR lunar detail).
    damping : float, optional
        White's damped RL [6]_: stop fitting where the model is within this many noise sigmas
        of the data (1 is typical); None for none.
    accelerate : bool
        Biggs-Andrews vector extrapolation [7]_: about half the iterations for the same fit, with
        non-negativity kept and a restart whenever the data term grows.
    stop : {None, 'noise', 'change'}
        End early when the data term reaches the noise level (the mean deviance per observed
        pixel falls to 1), or when the estimate changes by less than ``tolerance`` (relative RMS)
        in one iteration. The reason is in the returned info.
    tolerance : float
        The relative change of ``stop='change'``.
    dering : float
        0 (off) to 1 (full): the estimate may not fall below a smooth lower envelope of the
        observed image (a grey opening as wide as the PSF, smoothed; a few noise sigmas under
        the local background, nebulosity included) less ``1 / dering - 1`` noise sigmas: the
        dark rings that RL digs around bright stars are held near the local background, as
        PixInsight's deringing does. 1 holds them at the envelope, 0.5 one sigma under it.
    saturation : None, 'auto' or float
        Pixels at or above this level, and their neighbours, are censored data (Whyte et al.
        [8]_): the true light there is at least what was recorded, so the model is raised where
        it falls short of them and left free where it exceeds them. Saturated stars keep a
        bright, peaked core and the light that clipping took from it, instead of the flat or
        hollow core of plain RL. ``'auto'`` takes the data's maximum plateau
        (`~gpudeconv.restore.noise.saturation_level`).
    luminance : bool
        Colour only: restore the luminance (the mean of the channels) and put the original
        chrominance back (each channel gains the luminance's change), for noisy colour data.
        One PSF for all channels (per-channel PSFs are averaged).
    return_info : bool
        Also return a :class:`RestorationInfo` (iterations, why they stopped, the data term of
        every iteration, the noise models).
    record_fit : bool
        With ``return_info``: compute the data term of every iteration (one more pass over the
        image an iteration, 5-15 %); False records it only where a stopping rule or the
        acceleration computes it anyway.
    progress : bool
        Show a tqdm progress bar over all iterations of all channels.
    callback : callable(done, total), optional
        Called after each iteration with the iterations done and the total (all channels).

    Returns
    -------
    restored : ndarray, shape of ``image``
        float32, or float64 for float64 input.
    info : RestorationInfo
        With ``return_info=True`` only.

    Notes
    -----
    Each iteration, with :math:`H` the blur, :math:`w` the data weights (0 on no-data and
    saturated pixels), :math:`b` the background and :math:`\\alpha` the read-noise shift,

    .. math:: u \\leftarrow
              \\frac{u}{H^T w - \\lambda\\,\\mathrm{div}\\frac{\\nabla u}{|\\nabla u|}}
              \\cdot H^T\\!\\left(\\frac{w\\,[d + \\alpha]_+}{H u + b + \\alpha}\\right)

    (:math:`b = \\alpha = 0` for plain RL; the restored image is :math:`u + b`); on saturated
    pixels the ratio is raised to at least 1. Inside the frame
    :math:`H^T w = 1` and without the TV term this is the plain iteration of [1]_ and [2]_. The
    damped ratio replaces the ratio by White's damped form, its misfit the Poisson deviance on
    the photon share of the model and Pearson's symmetric :math:`(d - m)^2 / m` on the share
    :math:`\\alpha` (read noise, subtracted sky), whose nearly Gaussian noise the deviance's
    asymmetry would pull down. The estimate starts from the observed image, its no-data pixels
    from the mean of the data near them. The image is
    padded by reflection by the PSF radius, and the estimate reaches one more radius beyond,
    unobserved (:math:`w = 0`) [3]_, so borders neither darken nor ring and a flat image stays
    flat. Every option is a parameter of the same four steps (forward, ratio, adjoint,
    update), fused into single passes on the GPU.

    References
    ----------
    .. [1] Richardson, W. H. (1972), "Bayesian-based iterative method of image restoration",
           JOSA 62, 55. :doi:`10.1364/JOSA.62.000055`
    .. [2] Lucy, L. B. (1974), "An iterative technique for the rectification of observed
           distributions", AJ 79, 745. :doi:`10.1086/111605`
    .. [3] Bertero, M. & Boccacci, P. (2005), "A simple method for the reduction of boundary
           effects in the Richardson-Lucy approach to image deconvolution", A&A 437, 369.
           :doi:`10.1051/0004-6361:20052717`
    .. [4] Snyder, D. L., Hammoud, A. M. & White, R. L. (1993), "Image recovery from data
           acquired with a charge-coupled-device camera", JOSA A 10, 1014.
           :doi:`10.1364/JOSAA.10.001014`
    .. [5] Dey, N. et al. (2006), "Richardson-Lucy algorithm with total variation
           regularization for 3D confocal microscope deconvolution", Microsc. Res. Tech. 69, 260.
           :doi:`10.1002/jemt.20294`
    .. [6] White, R. L. (1994), "Image restoration using the damped Richardson-Lucy method",
           Proc. SPIE 2198, 1342. :doi:`10.1117/12.176813`
    .. [7] Biggs, D. S. C. & Andrews, M. (1997), "Acceleration of iterative image restoration
           algorithms", Applied Optics 36, 1766. :doi:`10.1364/AO.36.001766`
    .. [8] Whyte, O., Sivic, J. & Zisserman, A. (2014), "Deblurring shaken and partially
           saturated images", IJCV 110, 185. :doi:`10.1007/s11263-014-0727-3`
    """
    image = _as_image(image)
    backend = backend_for(image, backend)
    _validate_image(image)
    iterations = _validate_iterations(iterations)
    is_colour = image.ndim == 3
    channels = image.shape[0] if is_colour else 1
    if luminance and not is_colour:
        msg = "luminance=True restores the luminance of a colour (C, H, W) image; this is 2-D"
        raise GpudeconvError(msg)
    # the options of the steps, as a luminance restoration passes them on
    options = {
        "noise": noise,
        "background": background,
        "read_noise": read_noise,
        "gain": gain,
        "regularization": regularization,
        "damping": damping,
        "accelerate": accelerate,
        "stop": stop,
        "tolerance": tolerance,
        "dering": dering,
        "saturation": saturation,
    }
    settings = _settings(
        **options, record=return_info and record_fit, channels=1 if luminance else channels
    )
    dtype = backend.float_dtype(image.dtype)
    data = backend.asarray(image, dtype=dtype)
    _check_has_data(data if is_colour else data[None], backend.xp)
    if luminance:
        from .colour import luminance as luminance_of
        from .colour import recombine

        before = luminance_of(data)
        restored = richardson_lucy(
            before,
            _mean_psf(psf, channels, backend),
            iterations,
            backend=backend,
            **options,
            return_info=return_info,  # the data term costs a pass an iteration: only if asked
            record_fit=record_fit,
            progress=progress,
            callback=callback,
        )
        after, info = restored if return_info else (restored, None)
        result = recombine(data, before, after)
        result = result if is_cupy_array(image) else backend.to_host(result)
        if not return_info:
            return result
        info.options["luminance"] = True
        return result, info

    operators = _operators(psf, image.shape[-2:], channels, is_colour, backend)
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

    infos = []
    try:
        restored = backend.xp.empty_like(planes)
        for index in range(channels):
            plane_settings = settings
            if isinstance(settings.noise, tuple):
                plane_settings = replace(settings, noise=settings.noise[index])
            before = done
            restored[index], plane_info = _restore_plane(
                planes[index], operators[index], iterations, step, plane_settings, info=True
            )
            infos.append(plane_info)
            # a channel that stopped early hands its remaining iterations to the bar at once
            while done < before + iterations:
                step()
    finally:
        if bar is not None:
            bar.close()
    result = restored if is_colour else restored[0]
    result = result if is_cupy_array(image) else backend.to_host(result)
    if not return_info:
        return result
    return result, RestorationInfo(infos, _options_of(settings, iterations, luminance=False))


def _options_of(settings: _Settings, iterations: int, *, luminance: bool) -> dict:
    noise = settings.noise
    if isinstance(noise, NoiseModel) or isinstance(noise, tuple):
        noise = "given"
    elif noise is None and settings.needs_noise:
        noise = "auto"
    saturation = settings.saturation
    return {
        "iterations": iterations,
        "noise": noise,
        "background": settings.background,
        "read_noise": settings.read_noise,
        "gain": settings.gain,
        "regularization": settings.regularization,
        "damping": settings.damping,
        "accelerate": settings.accelerate,
        "stop": settings.stop,
        "tolerance": settings.tolerance if settings.stop == "change" else None,
        "dering": settings.dering,
        "saturation": saturation,
        "luminance": luminance,
    }


def _mean_psf(psf, channels: int, backend: Backend):
    """The one PSF of a luminance restoration: a field or 2-D PSF as is, per-channel ones
    averaged."""
    if isinstance(psf, (PSFField, FieldWindow)):
        return psf
    if isinstance(psf, (list, tuple)) and psf and isinstance(psf[0], (PSFField, FieldWindow)):
        msg = (
            "luminance=True restores one plane: give one PSF field for all channels, not one "
            "per channel"
        )
        raise GpudeconvError(msg)
    host = validate_psf(backend.to_host(psf), channels=channels)
    return host if host.ndim == 2 else host.mean(axis=0)


_PLAIN = _Settings()


def _restore_plane(
    observed,
    operator,
    iterations: int,
    step,
    settings: _Settings = _PLAIN,
    *,
    info: bool = False,
    window: bool = False,
):
    """RL on one 2-D plane on ``operator``'s backend; returns the restored plane (and its
    `ChannelInfo` with ``info``).

    The plane is padded by reflection by the PSF radius (the padded pixels count as observed),
    and the estimate extends by one more PSF radius of unobserved pixels (weight 0), so that the
    blur of every observed pixel is computed from estimated light only, never from zeros
    outside the array: a flat image is then an exact fixed point (Bertero & Boccacci 2005).

    With ``window``, the plane is a tile's read window (`gpudeconv.tiles.restore_window`): it
    may lie wholly in a clipped area that the image does not fill, and is restored as the image
    is there; the tile driver checks the whole image for unsaturated data instead.
    """
    backend = operator.backend
    xp = backend.xp
    dtype = observed.dtype.type
    record = ChannelInfo()
    valid = xp.isfinite(observed)
    has_nodata = not bool(valid.all())
    if has_nodata and not bool(valid.any()):
        record.stopped = "no data"
        restored = xp.full_like(observed, np.nan)
        return (restored, record) if info else restored

    # Saturated pixels (and their neighbours, off the sensor's linear range) are censored data:
    # the light there is at least what was recorded (the clipped response of Whyte et al.
    # 2014). Left out of the fit instead, they let the wings, over-predicted in the first
    # iterations, pull the core down: saturated stars came out hollow and dimmer than their
    # clipped data (they kept a third of it on a FWHM-3 star field).
    censored = None
    level = _saturation(observed, valid, settings.saturation, backend)
    if level is not None:
        censored = _grow(valid & (observed >= dtype(level)), xp)
        record.saturation, record.saturated = level, int(censored.sum())
        if not window and not bool((valid & ~censored).any()):
            raise GpudeconvError(all_saturated(level))

    # The data term, at unit scale: RL does not depend on the data's scale, and unit scale
    # keeps the division guard meaningful for flux-calibrated data (pixel values of 1e-14).
    model = _noise_model(observed, valid, settings, backend)
    record.noise = model
    values = observed[valid] if has_nodata else observed
    if model is None:  # plain RL: the data as given, lifted by a pedestal if it goes negative
        low, high = float(values.min()), float(values.max())
        pedestal = _pedestal(low, high)
        scale = (high + pedestal) or 1.0
        data = (observed + dtype(pedestal)) * dtype(1 / scale)
        shift, counts = 0.0, None
        start = data
    else:  # d + alpha ~ Poisson(H u + b), in counts of 1 / gain, u the restored light + alpha
        # The shift alpha makes the data's variance that of Poisson counts (Snyder et al.
        # 1993): the read noise's, and for sky-subtracted data the sky's that subtraction took
        # away. It lifts the restored light as a pedestal does, so faint sky keeps the noise it
        # has instead of the low-count regime's, where RL drives pixels to 0 and amplifies
        # noise. Only a background given by the caller is known sky b, left out of the
        # restored light (which positivity then keeps above it).
        shifted = xp.maximum(observed + dtype(model.offset), dtype(0))
        scale = float((shifted[valid] if has_nodata else shifted).max()) or 1.0
        data = shifted * dtype(1 / scale)
        sky = settings.background or 0.0
        pedestal = model.offset - sky  # removed from the restored light at the end
        shift = sky / scale
        counts = model.gain * scale  # counts per working unit
        # Kept off 0, where the multiplicative update could never move it, by a tenth of the
        # sky noise.
        floor = dtype(0.1 * model.sigma / scale)
        start = xp.maximum((observed + dtype(pedestal)) * dtype(1 / scale), floor)
    if has_nodata:
        data = xp.where(valid, data, dtype(0))
        # No-data pixels start from the mean of the data around them instead of 0, from which
        # RL cannot move; a mean of the whole image let far objects (a clipped disc) change the
        # restored pixels next to the no-data, and tiles differ from the whole image there.
        first = _nodata_start(start, valid, operator.radius, xp)
    else:
        first = start
    # Deringing's envelope is of the data; no-data pixels lend it their start (plus the sky the
    # start leaves out), not the 0 they have in `data`, which would pull the envelope, a local
    # minimum, to 0 within a PSF of every no-data border and leave the rings there unheld.
    enveloped = data
    if has_nodata and settings.dering > 0:
        enveloped = xp.where(valid, data, first + dtype(shift))

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
    estimate = xp.pad(xp.pad(first, frame, mode=mode), frame, mode="edge")
    del first
    norm = operator.adjoint(weight)
    damped = settings.damping is not None
    watch_fit = settings.record or settings.stop == "noise" or settings.accelerate
    # 1 on censored pixels, where the ratio is raised to at least 1: d / (H u) where the model
    # falls short of the data, 1 (no pull) where it exceeds it; 0 elsewhere (ratios are >= 0)
    lower_bound = None
    fit_weight = weight  # the data term's weights: censored pixels are no measurement
    if censored is not None:
        lower_bound = xp.pad(xp.pad(censored.astype(data.dtype), frame, mode=mode), frame)
        if watch_fit:
            fit_weight = weight * (1 - lower_bound)
    observed_count = float(fit_weight.sum()) if watch_fit else None
    if not watch_fit:
        fit_weight = None
    if not damped:
        weight = None  # only the normalization needs it
    del observed_weight, censored

    # the sky noise at unit scale: TV's and deringing's yardstick (plain RL: measured on the
    # data, no-data pixels left out, as NaN in `start`)
    sigma = None
    if settings.regularization > 0 or settings.dering > 0:
        sigma = model.sigma / scale if model is not None else _rough_sigma(start, xp)
    envelope = None
    if settings.dering > 0:
        source = padded if enveloped is data else xp.pad(enveloped, frame, mode=mode)
        envelope = _dering_floor(source, operator, shift, settings.dering, sigma, backend)
        del source
        envelope = xp.pad(envelope, frame)  # nothing to hold up in the unobserved ring
    del enveloped
    tv_norm = xp.empty_like(estimate) if settings.regularization > 0 else None
    # TV's gradient scale: below a tenth of the noise a gradient counts as flat.
    epsilon = 0.1 * sigma if sigma is not None else None
    damping = None
    if damped:
        # The offset alpha lifts the data to (observed + alpha) / scale: alpha / scale of the
        # model is Gaussian noise (read, subtracted sky), which the statistic fits with
        # Pearson's chi-square instead of the deviance (0 for a photon-dominated sky).
        damping = (counts / settings.damping**2, DAMPING_POWER, model.offset / scale)

    track_change = settings.accelerate or settings.stop == "change"
    change = xp.zeros_like(estimate) if track_change else None
    if settings.accelerate:
        previous = estimate.copy()
        previous_change = xp.zeros_like(estimate)
    alpha = 0.0
    core = (slice(2 * ry, 2 * ry + observed.shape[0]), slice(2 * rx, 2 * rx + observed.shape[1]))

    blurred = xp.empty_like(estimate)  # work buffers, allocated once
    correction = xp.empty_like(estimate)
    for iteration in range(iterations):
        if settings.accelerate:
            # y = x + alpha (x - x_previous), kept positive; previous <- x
            backend.ba_extrapolate(estimate, previous, alpha)
        operator.forward(estimate, out=blurred)
        if watch_fit:
            deviance = backend.rl_deviance(extended, blurred, fit_weight, background=shift)
            # in noise units: counts per working unit scale the Poisson deviance
            fit = deviance * (counts if counts is not None else 1.0) / observed_count
            record.data_term.append(fit)
        # The data is 0 wherever the weight is (no-data pixels, the unobserved ring), so the
        # plain ratio is already 0 there; the damped ratio is not and takes the weights.
        ratio = backend.rl_ratio(extended, blurred, weight, background=shift, damping=damping)
        if lower_bound is not None:
            xp.maximum(ratio, lower_bound, out=ratio)
        operator.adjoint(ratio, out=correction)
        scale_by = norm
        if tv_norm is not None:
            backend.rl_tv_norm(
                estimate, norm, tv_norm, strength=settings.regularization, epsilon=epsilon
            )
            scale_by = tv_norm
        backend.rl_update(estimate, correction, scale_by, floor=envelope, change=change)
        record.iterations = iteration + 1
        step()
        if settings.accelerate:
            alpha = _next_alpha(change, previous_change, xp)
            change, previous_change = previous_change, change
            fits = record.data_term
            if len(fits) >= 2 and fits[-1] > fits[-2]:
                alpha = 0.0  # the fit got worse: restart from plain steps
                record.restarts += 1
        if settings.stop == "noise" and record.data_term and record.data_term[-1] <= 1.0:
            record.stopped = "noise"
            break
        if settings.stop == "change":
            # previous holds the estimate before this iteration's extrapolation
            moved = estimate[core] - previous[core] if settings.accelerate else change[core]
            size = float(xp.linalg.norm(estimate[core]))
            if size > 0 and float(xp.linalg.norm(moved)) <= settings.tolerance * size:
                record.stopped = "change"
                break

    restored = estimate[core] * dtype(scale)
    if pedestal:
        restored -= dtype(pedestal)
    if has_nodata:
        restored = xp.where(valid, restored, dtype(np.nan))
    return (restored, record) if info else restored


def _next_alpha(change, previous_change, xp) -> float:
    """Biggs & Andrews' (1997) step length: the correlation of the last two RL steps, in
    [0, MAX_ACCELERATION]."""
    last = float(xp.vdot(previous_change.ravel(), previous_change.ravel()))
    if last <= 0:
        return 0.0
    cross = float(xp.vdot(change.ravel(), previous_change.ravel()))
    return min(max(cross / last, 0.0), MAX_ACCELERATION)


def _grow(mask, xp):
    """``mask`` with its 8 neighbours set: the pixels next to a clipped one are off the
    sensor's linear range too (blooming, the ramp to full well)."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    rows = grown.copy()
    grown[:, 1:] |= rows[:, :-1]
    grown[:, :-1] |= rows[:, 1:]
    return grown


def _nodata_start(start, valid, radius: tuple[int, int], xp):
    """``start`` with each no-data pixel set to a mean of the data near it: where RL starts.

    A no-data pixel within the PSF's ``radius`` + 1 of observed pixels takes the mean of the
    observed pixels in the box of those half-sides centred on it (normalized convolution [1]_
    with a box). These are all the no-data pixels whose start can reach the restored observed
    pixels: through the blur (within ``radius`` of one) or TV's term at such a pixel (one
    more); the others have no data behind them (norm ``H^T w`` 0) and keep their start. So the
    pixels next to no-data restore from the data near them only, whatever the rest of the image
    holds (a far bright object), and a tile, filled from its read window, starts them as the
    whole image does: the same operations on the same pixels, within ``radius`` + 1 of each
    (`gpudeconv.tiles`, "Halo"). Deeper pixels take the mean of the nearest coarser blocks
    with data (`_coarse_fill`). Two box sums (`_box_sum`) and about one pass more, once per
    restoration: on a 4096 x 4096 plane with a PSF of 25 pixels, 0.47 s on one core of the
    development VM, about one RL iteration with one FFTW thread (0.45 s). ``start`` itself is
    not changed.

    References
    ----------
    .. [1] Knutsson, H. & Westin, C.-F. (1993), "Normalized and differential convolution:
           methods for interpolation and filtering of incomplete and uncertain data", Proc.
           IEEE CVPR, 515.
    """
    values = xp.where(valid, start, start.dtype.type(0))
    half = (radius[0] + 1, radius[1] + 1)
    count = _box_sum(valid, half, xp)
    mean = _box_sum(values, half, xp) / xp.maximum(count, count.dtype.type(1))
    known = valid | (count > 0)
    del values, count
    filled = xp.where(valid, start, mean.astype(start.dtype, copy=False))
    del mean
    if bool(known.all()):
        return filled
    return xp.where(known, filled, _coarse_fill(filled, known, xp))


def _coarse_fill(filled, known, xp):
    """Values for the pixels that are not ``known`` (a plane holds some) from coarser grids:
    the mean of the known pixels in the 3 x 3 blocks of 2, 4, 8 ... pixels around each, from
    the finest grid where those blocks hold any (a pixel ``d`` deep into the unknown takes
    them from within about ``4 d``). The blocks lie on the plane's grid, so a tile's values
    differ from the whole image's there; `_nodata_start` gives these pixels no part in the
    restored observed pixels. Geometrically smaller planes: about one pass over the plane."""
    sums = xp.where(known, filled, filled.dtype.type(0))
    counts = known.astype(filled.dtype)
    shapes, levels = [], []
    while True:
        shapes.append(sums.shape)
        sums, counts = _halve(sums, xp), _halve(counts, xp)
        near = _box_sum(counts, (1, 1), xp)
        mean = _box_sum(sums, (1, 1), xp) / xp.maximum(near, near.dtype.type(1))
        has = near > 0
        levels.append((mean, has))
        if bool(has.all()):
            break
    values = levels[-1][0]
    for (mean, has), shape in zip(levels[-2::-1], shapes[-1:0:-1], strict=True):
        values = xp.where(has, mean, _double(values, shape, xp))
    return _double(values, shapes[0], xp)


def _halve(plane, xp):
    """The sums of ``plane``'s 2 x 2 blocks (a last odd row or column padded with 0)."""
    rows, columns = plane.shape
    plane = xp.pad(plane, ((0, rows % 2), (0, columns % 2)))
    return plane.reshape(plane.shape[0] // 2, 2, plane.shape[1] // 2, 2).sum(axis=(1, 3))


def _double(plane, shape, xp):
    """Each pixel of ``plane`` as a 2 x 2 block, cut to ``shape``: `_halve`'s grid back."""
    plane = xp.repeat(xp.repeat(plane, 2, axis=0), 2, axis=1)
    return plane[: shape[0], : shape[1]]


def _box_sum(image, half: tuple[int, int], xp):
    """The sums of the non-negative 2-D ``image`` (values or a mask) over the boxes of
    half-sides ``half`` = (rows, columns) centred on each pixel, 0 outside the image, in
    ``image``'s float dtype (float32 for a mask).

    Along each axis, a box of width ``2 h + 1`` is the sum of the window sums of its binary
    digits' widths, built by doubling (``s_2w(i) = s_w(i) + s_w(i + w)``): about
    ``2 log2(2 h + 1)`` additions of shifted planes, fast along either axis on both backends
    (NumPy's cumulative sum down the columns was 10 times slower than a row-by-row addition),
    no cancellation (the terms are non-negative) and the same operations on the same pixels
    wherever the box lies: a tile's sums are the whole image's, bit for bit.
    """
    if image.dtype.kind != "f":
        image = image.astype(np.float32)
    for axis, h in enumerate(half):
        n = image.shape[axis]
        width = 2 * h + 1
        line = (slice(None),) * axis  # the index up to ``axis``
        frame = [(0, 0), (0, 0)]
        frame[axis] = (h, h)
        windows = xp.pad(image, frame)  # windows[i]: the sum of the padded line's [i, i + w)
        boxes, offset, w = None, 0, 1
        while True:
            if width & w:
                part = windows[line + (slice(offset, offset + n),)]
                if boxes is None:
                    boxes = part.copy()
                else:
                    boxes += part
                offset += w
            if 2 * w > width:
                break
            length = windows.shape[axis] - w
            head = windows[line + (slice(0, length),)]
            windows = head + windows[line + (slice(w, w + length),)]
            w *= 2
        del windows
        image = boxes
    return image


def _saturation(observed, valid, saturation, backend: Backend) -> float | None:
    if saturation is None:
        return None
    if saturation == "auto":
        from .noise import saturation_level

        return saturation_level(backend.to_host(observed))
    return float(saturation)


def _noise_model(observed, valid, settings: _Settings, backend: Backend):
    if not settings.needs_noise:
        return None
    if isinstance(settings.noise, NoiseModel):
        return settings.noise
    return estimate_noise(
        backend.to_host(observed),
        background=settings.background,
        read_noise=settings.read_noise,
        gain=settings.gain,
    )


def _rough_sigma(data, xp) -> float:
    """A robust noise level of ``data`` from the median absolute difference of neighbours."""
    difference = xp.abs(data[:, 1:] - data[:, :-1])
    return float(xp.median(difference[xp.isfinite(difference)])) * 1.4826 / math.sqrt(2) or 1e-6


def _dering_floor(padded, operator, shift: float, strength: float, sigma: float, backend):
    """The lower bound of the estimate that deringing keeps: a smooth lower envelope of the
    (padded, unit-scale) data above the model's known sky, less ``1 / strength - 1`` noise
    sigmas (strength 1: the envelope itself; 0.5: one sigma under it; towards 0: no bound).

    A grey opening as wide as the PSF removes every star (their blur is no wider) and keeps the
    local background, nebulosity included; a box mean of the same width smooths the opening's
    steps. The envelope lies a few noise sigmas under the local background (the opening takes
    minima), so the bound holds the deep dark rings of RL up without clipping the sky's noise.
    Computed on ``backend`` (its ``ndimage`` filters), where ``padded`` lives.
    """
    size = (2 * operator.radius[0] + 1, 2 * operator.radius[1] + 1)
    opened = backend.ndimage.grey_opening(padded, size=size, mode="reflect")
    smooth = backend.ndimage.uniform_filter(opened, size=size, mode="reflect")
    allowance = shift + (1 / strength - 1) * sigma
    bound = backend.xp.maximum(smooth - padded.dtype.type(allowance), 0)
    return bound.astype(padded.dtype, copy=False)


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
