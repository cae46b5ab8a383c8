"""The high-level entry that the command line uses: a file or array in, a restored array out."""

from __future__ import annotations

import os

import numpy as np

from ._errors import GpudeconvError
from .backend import Backend
from .restore import richardson_lucy
from .restore.rl import _as_image

__all__ = ["deconvolve", "METHODS", "method_options"]

#: rl: Richardson-Lucy; rl-tv: with total-variation regularization; damped: White's damped RL;
#: wiener: the closed-form Wiener filter; learned: the trained network
#: (`gpudeconv.learned.infer.learned_deconvolve`).
METHODS = ("rl", "rl-tv", "damped", "wiener", "learned")


def method_options(method: str, regularization: float | None = None) -> dict:
    """The `richardson_lucy` options of an RL ``method``, ``regularization`` its strength
    (None: the method's default): the TV weight of ``'rl-tv'``, the damping threshold in noise
    sigmas of ``'damped'``; ``'rl'`` takes none."""
    from .restore.rl import DEFAULT_DAMPING, DEFAULT_TV

    if method not in METHODS:
        msg = f"method must be one of {', '.join(METHODS)}, got {method!r}"
        raise GpudeconvError(msg)
    if method == "rl-tv":
        return {"regularization": DEFAULT_TV if regularization is None else regularization}
    if method == "damped":
        return {"damping": DEFAULT_DAMPING if regularization is None else regularization}
    if regularization is not None:
        msg = (
            f"regularization sets the strength of rl-tv (TV weight) or damped (threshold in "
            f"noise sigmas); method {method!r} takes none: drop it or choose one of those"
        )
        raise GpudeconvError(msg)
    return {}


def deconvolve(
    image,
    psf=None,
    *,
    method: str = "rl",
    iterations: int = 30,
    backend: str | Backend | None = None,
    tile: int | None = None,
    psf_grid: tuple[int, int] | None = None,
    regularization: float | None = None,
    **options,
):
    """Deconvolve an image (array or path) with the chosen method.

    Parameters
    ----------
    image : (H, W) or (C, H, W) array_like, or str / os.PathLike
        The image, or the path of a FITS, TIFF, PNG or JPEG file to read.
    psf : (k, k) or (C, k, k) array_like, or PSFField, optional
        The PSF, or a field of PSFs that varies across the image. None (the default) estimates
        it from the image's stars with `gpudeconv.estimate_psf` (Moffat model; colour images
        on the sum of their channels, one PSF for all).
    method : {'rl', 'rl-tv', 'damped', 'wiener', 'learned'}
        Richardson-Lucy; with total-variation regularization; White's damped RL; the Wiener
        filter (one PSF, no iterations: `gpudeconv.restore.wiener`); the trained network
        (no iterations, in memory: `gpudeconv.learned.infer.learned_deconvolve`). The RL
        methods fit the noise model estimated from the image (``noise='auto'``) unless
        ``noise=None`` is given.
    iterations : int
    backend : {'auto', 'numpy', 'cupy'} or Backend, optional
    tile : int, optional
        Restore in tiles of this side (plus halos; `gpudeconv.tiles`). Without it, a path or a
        ``numpy.memmap`` streams in tiles planned from the free memory when the whole image
        does not fit the memory budget, and is restored whole otherwise. Tiles take the RL
        options that act locally (`gpudeconv.tiles.TILE_OPTIONS`), with the noise model and
        saturation level measured once on the whole image; ``accelerate``, ``stop``,
        ``luminance``, ``callback``, the Wiener filter and the learned method (which tiles
        inside, in memory) are refused.
    psf_grid : (ny, nx) tuple of int, optional
        With ``psf=None``: estimate a `PSFField` on this grid of nodes instead of one PSF.
    regularization : float, optional
        The strength of ``'rl-tv'`` (TV weight, default 0.005) or ``'damped'`` (threshold in
        noise sigmas, default 2).
    **options
        Passed to the method: `richardson_lucy`'s options (``accelerate``, ``stop``,
        ``dering``, ``saturation``, ``luminance``, ``noise``, ``progress``...) or
        `gpudeconv.restore.wiener`'s (``nsr``) or `learned_deconvolve`'s (``weights``,
        ``progress``; its tile size only by calling it: ``tile=`` here means streaming).

    Returns
    -------
    restored : ndarray
        float32 (float64 for float64 input), same shape as the image.
    """
    extra = method_options(method, regularization)
    if not isinstance(image, (str, os.PathLike)):
        image = _as_image(image)  # a nested list, as NumPy takes it
    if psf is not None and psf_grid is not None:
        msg = (
            "psf_grid sets the grid of a PSF field estimated from the stars (psf=None); drop it "
            "when giving psf="
        )
        raise GpudeconvError(msg)
    if method == "learned":
        return _learned(image, psf, backend=backend, tile=tile, psf_grid=psf_grid, **options)
    streams = tile is not None or (
        isinstance(image, (str, os.PathLike, np.memmap)) and not _fits_in_memory(image, psf)
    )
    if streams:
        tile_options = _tile_options(method, extra, options)  # before a PSF is estimated
    if psf is None:
        from .psf.estimate import estimate_psf

        source = image
        if isinstance(image, (str, os.PathLike)):
            from .io import read_image

            source, _ = read_image(image)  # the estimate needs the stars of the whole frame
        psf = estimate_psf(source, grid=psf_grid)
    if streams:
        from .tiles import deconvolve_tiled

        return deconvolve_tiled(
            image,
            psf,
            iterations,
            backend=backend,
            tile=tile,
            progress=bool(options.get("progress", False)),
            options=tile_options,
        )
    if isinstance(image, (str, os.PathLike)):
        from .io import read_image

        image, _ = read_image(image)
    if method == "wiener":
        from .restore.wiener import wiener

        unknown = sorted(set(options) - {"nsr"})
        if unknown:
            msg = (
                f"method 'wiener' takes the option nsr, got {', '.join(unknown)} "
                "(Richardson-Lucy options): drop them or choose an RL method"
            )
            raise GpudeconvError(msg)
        return wiener(image, psf, backend=backend, **options)
    options.setdefault("noise", "auto")
    return richardson_lucy(image, psf, iterations, backend=backend, **extra, **options)


def _learned(image, psf, *, backend, tile, psf_grid, **options):
    """The learned method: in memory only (it tiles inside, with overlapping halos)."""
    from .learned.infer import learned_deconvolve

    unknown = sorted(set(options) - {"weights", "progress"})
    if unknown:
        msg = (
            f"method 'learned' takes the options weights and progress, got {', '.join(unknown)} "
            "(Richardson-Lucy or Wiener options): drop them or choose that method"
        )
        raise GpudeconvError(msg)
    if tile is not None or (
        isinstance(image, (str, os.PathLike, np.memmap)) and not _fits_in_memory(image, psf)
    ):
        return _learned_tiled(image, psf, backend=backend, tile=tile, **options)
    if isinstance(image, (str, os.PathLike)):
        from .io import read_image

        image, _ = read_image(image)
    if psf is None:
        from .psf.estimate import estimate_psf

        psf = estimate_psf(image, grid=psf_grid)
    return learned_deconvolve(image, psf, backend=backend, **options)


def _learned_tiled(image, psf, *, backend, tile, weights=None, progress=False):
    """The learned method streamed over tiles (`gpudeconv.tiles.restore_tiled`): a path or an
    array (a memory map) read one window at a time, into a float32 array."""
    from .backend import get_backend, is_cupy_array
    from .io import ArrayTileReader, ArrayTileWriter, open_tile_reader
    from .tiles import _cut, _fields_of, _psf_size, learned_halo, plan_tiles, restore_tiled

    if psf is None:
        msg = (
            "the learned method in tiles needs psf= (the estimate from the stars needs the "
            "whole frame in memory)"
        )
        raise GpudeconvError(msg)
    if is_cupy_array(image):
        msg = "tiles stream NumPy arrays and files; restore a CuPy array without tile="
        raise GpudeconvError(msg)
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile % 4):
        msg = f"tile must be a multiple of 4 for the learned method, got {tile!r}; e.g. 1024"
        raise GpudeconvError(msg)
    backend = get_backend(backend)
    reader = (
        open_tile_reader(image)
        if isinstance(image, (str, os.PathLike))
        else ArrayTileReader(np.asarray(image) if not isinstance(image, np.ndarray) else image)
    )
    with reader:
        fields = _fields_of(psf, reader.channels)
        plan = plan_tiles(
            reader.shape, psf_size=_psf_size(psf), iterations=1, backend=backend, tile=tile
        )
        halo = learned_halo(fields or psf, reader.shape[-2:], reader.channels)
        plan = _cut(reader.shape, plan.tile, halo)
        out = np.empty(reader.shape, dtype=np.float32)
        restore_tiled(
            reader,
            ArrayTileWriter(out),
            psf,
            1,
            backend=backend,
            plan=plan,
            progress=bool(progress),
            options={} if weights is None else {"weights": weights},
            method="learned",
        )
    return out


def _tile_options(method: str, extra: dict, options: dict) -> dict:
    """The `richardson_lucy` options of a tiled restoration: the method's and the caller's,
    with the noise model estimated (``noise='auto'``) by default, as in memory; refused in
    one line where tiles cannot follow."""
    from .tiles import _validate_options

    where = "when restoring in tiles (a path, a memory map or tile=)"
    if method == "wiener":
        msg = (
            f"method 'wiener' cannot be used {where}: the Wiener filter needs the spectrum of "
            "the whole frame; restore in memory (an array without tile=) or choose an RL method"
        )
        raise GpudeconvError(msg)
    if "callback" in options:
        msg = (
            f"callback cannot be used {where}: pass an in-memory array without tile=, or "
            "progress=True for a bar over the tiles"
        )
        raise GpudeconvError(msg)
    chosen = {**extra, **{key: value for key, value in options.items() if key != "progress"}}
    chosen.setdefault("noise", "auto")
    return _validate_options(chosen)


def _fits_in_memory(image, psf) -> bool:
    """Whether a path or memory map can be restored whole (a PSF of ``psf``'s size)."""
    from .io import open_tile_reader
    from .psf import PSFField
    from .tiles import fits_in_memory

    if isinstance(image, np.memmap):
        shape = image.shape
    else:
        try:
            shape = open_tile_reader(image).shape
        except GpudeconvError:  # not readable in parts (e.g. compressed TIFF without zarr)
            return True
    if psf is None:
        size = 63  # the estimate is not made yet: budget for a generous PSF
    elif isinstance(psf, PSFField):
        size = psf.size
    else:
        size = np.shape(psf)[-1]
    return fits_in_memory(shape, psf_size=size)
