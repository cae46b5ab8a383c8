"""Tile planning and the streaming driver: mosaics larger than GPU memory or RAM.

A mosaic is restored tile by tile (ARCHITECTURE.md, "Tiles and streams"): each tile's *read
window* (its core plus a halo of real neighbouring pixels) is read from the input file, restored
by Richardson-Lucy on the backend, and only its *core* is written, in place, into the output
file. Cores tile the image without overlap; host memory holds a few tiles whatever the mosaic's
size. The output is built under a temporary name and renamed when complete; a journal of the
finished tiles lets an interrupted run resume and give the same bytes as an uninterrupted one.

Halo
----
Each RL iteration blurs (reach ``r = k // 2`` for a ``k x k`` PSF) and blurs back (``r`` again),
so after ``n`` iterations a pixel depends on the data within ``2 n r``: a halo that wide gives
the whole-image result exactly (up to float32 rounding). In practice the influence of far pixels
decays much faster. Measured on a 1024 x 1536 noisy star field (900 stars, fluxes over three
decades) and on a synthetic deep-sky scene (stars, galaxies, nebula), tiles of 256 with
neighbouring tiles' real pixels as halo, against the whole image restored at once (NumPy
backend, 2-core VM), the largest difference over the image as a fraction of the image's range,
for each halo tried (in pixels):

======================  ===  ===========  ===========  ===========  ===========
PSF (side k)            it   halo: diff   halo: diff   halo: diff   halo: diff
======================  ===  ===========  ===========  ===========  ===========
Gaussian FWHM 3 (11)    20   8: 4.6e-4    16: 8.7e-6   32: 8.7e-6   64: 8.9e-6
Gaussian FWHM 3 (11)    100  8: 3.6e-3    16: 5.1e-5   24: 2.2e-5   32: 1.8e-5
Moffat FWHM 3.5 (25)    20   8: 1.3e-2    16: 7.1e-5   32: 1.2e-5   48: 1.6e-5
Moffat FWHM 3.5 (25)    100  8: 7.3e-3    16: 1.9e-4   24: 5.3e-5   32: 8.7e-6
Moffat FWHM 8 (57)      20   32: 4.8e-4   48: 3.9e-5   64: 2.3e-5   96: 2.3e-5
Moffat FWHM 8 (57)      50   32: 2.8e-3   48: 1.3e-4   64: 1.0e-4   96: 1.1e-4
scene, Moffat 3.5 (25)  100  25: 3.9e-5   50: 5.1e-5   75: 6.6e-5
======================  ===  ===========  ===========  ===========  ===========

(no halo at all: 1.2 to 1.5, a visible grid). The difference falls by one to three decades per
extra ``k/3`` of halo until it reaches the float32 rounding floor (1e-5 to 1e-4 of the range:
the tile and the whole image are scaled and transformed at different sizes), at a halo of 0.6
to 1.5 PSF sides for 20 to 100 iterations. The rule keeps a margin over that, and never more
than the exact cone::

    halo = min(2 * iterations * r, 2 * k)

(`halo_for`). Image borders need no halo: a read window that reaches the image's edge is padded
by reflection there exactly as the whole image is.

Tile size
---------
From the memory budget of the backend (`Backend.memory_info`: free device memory on a GPU,
available RAM on the CPU), unless forced. RL holds about 14 arrays of the size of the *extended*
tile (the read window plus ``2 r`` of reflected and unobserved frame on each side): measured with
`Backend.peak_memory` on the NumPy backend at 500 to 1000 px with PSFs of 25 and 57 px, the peak
was 13.9 to 14.2 extended planes, FFTW's plan buffers included. The driver holds 6 more planes
per channel (the tile on the host, twice for prefetching, its copy on the backend, the restored
core, twice for the download). The tile side is the largest multiple of 256 for which
``(14 + 6 C) * (tile + 2 halo + 4 r)**2 * itemsize`` fits in half the free memory, capped at
4096 on the CPU (larger tiles gain nothing there and crowd a shared machine) and 8192 on a GPU.
A CuPy out-of-memory error halves the tile and the run goes on (with a warning).

No-data and negative data
-------------------------
NaN (any non-finite value) is no-data, as in `richardson_lucy`: it carries no weight and comes
back NaN. A tile whose whole read window is no-data is not restored; NaN is written for its core.
Data with negative values (sky-subtracted frames) is lifted by one pedestal per channel taken
from the whole image's range, as `richardson_lucy` lifts a whole image: a pedestal per tile
would restore each tile from differently lifted data and show the seams. That costs one read of
the input before the tiles (skipped for unsigned integers, which cannot be negative, unless the
options need it: see Options).

Options
-------
The tiles take the options of `richardson_lucy` that act on a pixel's neighbourhood
(`TILE_OPTIONS`): the noise model of the data term (``noise``, ``background``, ``read_noise``,
``gain``), TV regularization, White's damping, deringing and saturation masks. Every tile of a
channel is restored with one noise model and one saturation level, measured on the whole image
in the read of every core that finds the pedestals: a model or a level of each tile's own would
restore the tiles from different data terms and show the seams.

* The noise model: `~gpudeconv.restore.noise.estimate_noise` measures boxes of 32 x 32 pixels.
  The read keeps the boxes of each channel that it would measure on the whole image, all of them
  up to `SAMPLE_BOXES` (4096: an image of about 2000 x 2000), a regular subset of their rows and
  columns beyond, laid side by side in one plane (16 MiB per channel in float32, whatever the
  mosaic's size), and the model is estimated on that plane: the whole image's model itself up
  to 4096 boxes; on scenes of 2600 x 2600 and 1500 x 5000 pixels (6724 and 7296 boxes), sigma
  within 0.2 % and the sky within 0.005 sigma of it. The boxes lie on the image's grid, not on
  the tiles', so the model does not depend on the tile size. With a model the data needs no
  pedestal: the model's offset lifts it. Restoring a 4096 x 4096 FITS mosaic in tiles of 512
  with ``noise='auto'`` peaked 67 MB above the libraries, against 34 MB for plain RL.
* ``saturation='auto'``: `~gpudeconv.restore.noise.saturation_level`'s plateau of the whole
  image, exactly: the read keeps each channel's range and its `TOP_VALUES` largest values (2 MiB
  per channel); a plateau, or a level under it, of more pixels than that is counted by one or
  two more reads. A channel whose every pixel is at or above its level (given or measured) is
  refused, as `richardson_lucy` refuses such an image; a tile whose window is all saturated
  (inside a clipped area larger than the window) is restored as the whole image is there.
* ``accelerate`` and ``stop`` are refused: Biggs-Andrews' step length and the stopping point
  come from the fit of the whole tile, so tiles would step or stop differently and seam.
  ``luminance`` is not in tiles yet; ``return_info`` neither (`TileRunReport` holds the models).

The halo rule holds with them. TV's term at a pixel reads the estimate within 1 pixel, damping
and saturation masks change the ratio pixel by pixel (the mask grows by 1 pixel): all within
the ``2 r`` per iteration of the blur and its adjoint. The deringing floor of a pixel is a grey
opening (reach ``2 r``) and a box mean (``r``) of the data, computed on the tile's read window:
with a halo of at least ``3 r`` every core pixel's floor is the whole image's. Two PSF sides
(``4 r + 2``) hold it from 2 iterations on; for one, `halo_for` takes the exact cone of
deringing, ``(2 n + 1) r`` (one iteration with a halo of ``2 r`` differed by 3e-4 of the range at
the cores' edges, by 8e-7 with ``3 r``). No-data pixels start from the mean of the data within
``r + 1`` of them (`gpudeconv.restore.rl`), on the read window as on the whole image, which
widens the exact cone next to no-data to ``(2 n + 1) r + 1``. The rule keeps ``2 r`` for one
iteration: a window of that halo cuts only the outer part of the boxes of no-data pixels more
than ``r - 1`` from the core, whose start weighs little there. With one iteration, tiles of 64
across a NaN wedge differed from the whole image by 1.9e-6 of the range (2.1e-3 when each tile
started them from the mean of its data).

Measured on a 600 x 700 deep-sky scene (`gpudeconv.synthetic.make_scene`: Moffat PSF of 25
pixels, stars clipped at 3000, a NaN border of 12 pixels), 10 iterations, tiles of 256 (halo 50),
against `richardson_lucy` of the whole image with the same model and level: the largest
difference over the range, 40 pixels or more inside the NaN border (and next to it):

===========================  ===============  ===============
options                      tiles            Dask blocks
===========================  ===============  ===============
(plain RL)                   8.0e-6 (8.0e-6)  5.3e-6 (7.3e-6)
noise, sky-subtracted data   6.1e-6 (6.1e-6)  6.3e-6 (7.1e-6)
regularization 0.005         4.6e-6 (6.1e-6)  3.6e-6 (1.3e-5)
damping 3                    7.8e-6 (7.8e-6)  5.8e-6 (7.8e-6)
dering 0.5                   6.0e-6 (7.1e-6)  5.6e-6 (7.1e-6)
saturation 'auto'            7.1e-6 (7.1e-6)  8.1e-6 (8.1e-6)
===========================  ===============  ===============

(noise ``'auto'`` in all but the first). Next to no-data, the tiles and blocks start their
no-data pixels as the whole image does, from the data near them; when each started them from
the mean of its own data they differed there by 7.3e-4 to 1.7e-3, and by 1.3e-2 with a clipped
disc 200 px from the border in the scene. TV with saturation masks: in a clipped star's core
(weight 0) TV alone holds the estimate, and round-off grows there: the whole image's own result
moved by 2.7e-3 of the range when its FFT sizes changed (7 columns cropped far away), and tiles
differed by 3.3e-3. Without a noise model (``noise=None``), TV's gradient scale and deringing's
allowance come from each tile's own rough noise level (the median difference of neighbours):
8e-5 (TV) and 3.5e-4 (dering 0.5) of the range; with one (the default of `gpudeconv.deconvolve`
and the command line), from the model's sigma.

Memory
------
Restoring a 12000 x 12000 float32 FITS mosaic (576 MB) with tiles of 1024 and 2 iterations on
the NumPy backend peaked at 285 MB resident (``bench/tile_memory.py``, imports included);
RL of the whole image in memory would need about 8 GB.

Streams
-------
While a tile is restored, a reader thread reads the next tile's window from disk into one of two
host buffers (pinned on a GPU, so that their upload is asynchronous), the next tile is uploaded
on a second stream, and the previous tile's core is downloaded on that stream and written. All
tiles share one read-window shape (windows at the image's edges are shifted inwards rather than
cut), so that one FFT plan and one OTF serve every tile.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ._errors import GpudeconvError, GpudeconvWarning
from .backend import Backend, get_backend
from .io import (
    TileReader,
    TileWriter,
    check_output_path,
    create_tile_output,
    open_tile_reader,
    provenance_header,
    tile_output_format,
)
from .psf import PSFField, validate_psf
from .restore import noise, rl
from .restore.noise import NoiseModel

__all__ = [
    "Tile",
    "TilePlan",
    "TileRunInterrupted",
    "TileRunReport",
    "deconvolve_file",
    "deconvolve_tiled",
    "fits_in_memory",
    "halo_for",
    "learned_halo",
    "plan_tiles",
    "restore_tiled",
]

#: Halo in PSF sides: a margin over the measured knee of the seam error, 0.6 to 1.5 sides.
HALO_PSF_SIDES = 2
#: Arrays of the extended tile that RL holds at its peak (measured: 13.9 to 14.2).
WORKING_SET_PLANES = 14
#: Tile-sized buffers the driver holds per channel beside RL's working set.
CHANNEL_PLANES = 6
#: Part of the free memory a planned tile may use.
MEMORY_FRACTION = 0.5
#: Largest planned tile side, by memory kind.
MAX_TILE = {"host": 4096, "device": 8192}
#: Planned tile sides are multiples of this ...
TILE_STEP = 256
#: ... down to this, below which the halo would cost more than the core.
MIN_TILE = 64
#: The `richardson_lucy` options a tiled run takes: each acts on a pixel's neighbourhood only,
#: given one noise model and one saturation level for the whole image (module docstring).
TILE_OPTIONS = (
    "noise",
    "background",
    "read_noise",
    "gain",
    "regularization",
    "damping",
    "dering",
    "saturation",
)
#: At most this many boxes (of `gpudeconv.restore.noise.BOX` pixels) of each channel are kept
#: for its noise model: all of an image of up to about 2000 x 2000 pixels, a regular subset of a
#: larger one's (16 MiB per channel in float32).
SAMPLE_BOXES = 4096
#: The largest values of each channel kept for its saturation plateau (2 MiB per channel); a
#: plateau or the level under it holding more costs one or two more reads of the image.
TOP_VALUES = 1 << 18

_JOURNAL_FORMAT = "gpudeconv tile journal"
_JOURNAL_VERSION = 1


# --------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Tile:
    """One tile: the ``core`` it writes and the ``read`` window it is restored from.

    Both are ``(y0, y1, x0, x1)``, rows ``y0:y1`` and columns ``x0:x1`` of the image; the read
    window holds the core and at least ``halo`` pixels around it, except at the image's edges.
    """

    index: int
    core: tuple[int, int, int, int]
    read: tuple[int, int, int, int]

    @property
    def core_shape(self) -> tuple[int, int]:
        y0, y1, x0, x1 = self.core
        return y1 - y0, x1 - x0

    @property
    def read_shape(self) -> tuple[int, int]:
        y0, y1, x0, x1 = self.read
        return y1 - y0, x1 - x0

    @property
    def core_in_read(self) -> tuple[slice, slice]:
        """Where the core lies in an array of the read window."""
        y0, y1, x0, x1 = self.core
        return slice(y0 - self.read[0], y1 - self.read[0]), slice(
            x0 - self.read[2], x1 - self.read[2]
        )


@dataclass(frozen=True)
class TilePlan:
    """How an image of ``shape`` is cut: cores of ``tile x tile`` (smaller in the last row and
    column) read with a ``halo``; ``grid`` is (tile rows, tile columns) and ``read_shape`` the
    one shape of every read window."""

    shape: tuple[int, ...]
    tile: int
    halo: int
    tiles: tuple[Tile, ...]
    grid: tuple[int, int]
    read_shape: tuple[int, int]

    def __len__(self) -> int:
        return len(self.tiles)

    @property
    def channels(self) -> int:
        return self.shape[0] if len(self.shape) == 3 else 1


def halo_for(psf_size: int, iterations: int, *, dering: bool = False) -> int:
    """The halo, in pixels, that makes tiles agree with the whole image:
    ``min(2 * iterations * r, 2 * k)`` for a PSF of side ``k = 2 r + 1`` (module docstring).

    With ``dering`` the exact cone is ``(2 * iterations + 1) * r``: the deringing floor of a
    pixel is measured on the data within ``3 r`` of it (module docstring, "Options")."""
    radius = int(psf_size) // 2
    cone = (2 * int(iterations) + (1 if dering else 0)) * radius
    return int(min(cone, HALO_PSF_SIDES * int(psf_size)))


def _validate_tile(tile) -> int:
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < 16:
        msg = f"tile must be an integer side of at least 16 pixels, got {tile!r}; e.g. 1024"
        raise GpudeconvError(msg)
    return int(tile)


def _validate_shape(shape) -> tuple[int, ...]:
    shape = tuple(int(n) for n in shape)
    if len(shape) not in (2, 3) or min(shape[-2:]) < 2 or min(shape) < 1:
        msg = f"shape must be (H, W) or (C, H, W) of an image, got {shape}"
        raise GpudeconvError(msg)
    return shape


def plan_tiles(
    shape,
    *,
    psf_size: int,
    iterations: int,
    backend: str | Backend | None = None,
    tile: int | None = None,
    channels: int = 1,
    dtype=np.float32,
    dering: bool = False,
) -> TilePlan:
    """Cut an image into tiles that fit the backend's memory, with a halo that hides the seams.

    Parameters
    ----------
    shape : (H, W) or (C, H, W) tuple of int
        The image's shape; a 3-D shape gives the channels.
    psf_size : int
        Side ``k`` of the PSF (of the node PSFs of a field).
    iterations : int
        RL iterations: the halo is ``min(2 * iterations * (k // 2), 2 * k)`` (`halo_for`).
    backend : {'auto', 'numpy', 'cupy'} or Backend, optional
        Whose free memory sets the tile size.
    tile : int, optional
        Force cores of ``tile x tile`` pixels. By default, the largest multiple of 256 whose
        working set fits half the free memory (module docstring), at most 4096 on the CPU and
        8192 on a GPU; the whole image when it fits in one tile.
    channels : int
        Channels restored together, for a 2-D ``shape`` (colour images give theirs).
    dtype : {float32, float64}
        Working dtype.
    dering : bool
        Whether the restoration derings (``dering > 0``): its floor reaches one PSF radius
        further (`halo_for`).

    Returns
    -------
    TilePlan
    """
    shape = _validate_shape(shape)
    if len(shape) == 3:
        channels = shape[0]
    height, width = shape[-2:]
    halo = halo_for(psf_size, iterations, dering=dering)
    if tile is None:
        tile = _tile_from_budget(
            (height, width), channels, halo, int(psf_size) // 2, get_backend(backend), dtype
        )
    tile = _validate_tile(tile)
    return _cut(shape, min(tile, max(height, width)), halo)


def fits_in_memory(
    shape, *, psf_size: int, backend: Backend | str | None = None, dtype=np.float32
) -> bool:
    """Whether the whole image of ``shape`` ((H, W) or (C, H, W)) can be restored at once within
    the backend's memory budget (the test the CLI and `gpudeconv.deconvolve` stream by)."""
    backend = get_backend(backend)
    channels = shape[0] if len(shape) == 3 else 1
    height, width = shape[-2:]
    frame = 4 * (int(psf_size) // 2)
    planes = WORKING_SET_PLANES + CHANNEL_PLANES * channels
    need = planes * (height + frame) * (width + frame) * np.dtype(dtype).itemsize
    return need <= MEMORY_FRACTION * backend.memory_info().free


def _tile_from_budget(image, channels, halo, radius, backend: Backend, dtype) -> int:
    info = backend.memory_info()
    budget = MEMORY_FRACTION * info.free
    itemsize = np.dtype(dtype).itemsize
    planes = WORKING_SET_PLANES + CHANNEL_PLANES * channels

    def need(side: int) -> float:
        return planes * (side + 2 * halo + 4 * radius) ** 2 * itemsize

    # the whole image if it fits: no seams and no halo work at all
    if max(image) <= MAX_TILE.get(info.kind, MAX_TILE["host"]) and need(max(image)) <= budget:
        return max(image)
    side = MAX_TILE.get(info.kind, MAX_TILE["host"])
    while side > TILE_STEP and need(side) > budget:
        side -= TILE_STEP
    while side > MIN_TILE and need(side) > budget:
        side //= 2
    return max(side, MIN_TILE)


def _cut(shape: tuple[int, ...], tile: int, halo: int) -> TilePlan:
    height, width = shape[-2:]
    read_h, read_w = min(height, tile + 2 * halo), min(width, tile + 2 * halo)
    rows = [(y, min(y + tile, height)) for y in range(0, height, tile)]
    cols = [(x, min(x + tile, width)) for x in range(0, width, tile)]
    tiles = []
    for y0, y1 in rows:
        # one window shape for all: at the edges the window shifts inwards (more context, and
        # one FFT plan for every tile) instead of being cut
        ry0 = min(max(y0 - halo, 0), height - read_h)
        for x0, x1 in cols:
            rx0 = min(max(x0 - halo, 0), width - read_w)
            read = (ry0, ry0 + read_h, rx0, rx0 + read_w)
            tiles.append(Tile(len(tiles), (y0, y1, x0, x1), read))
    return TilePlan(shape, tile, halo, tuple(tiles), (len(rows), len(cols)), (read_h, read_w))


# --------------------------------------------------------------------------------- options

#: Options of `richardson_lucy` that tiles refuse (when set), and why.
_WHOLE_FIT_OPTIONS = {
    "accelerate": (
        "Biggs-Andrews acceleration takes its step length from the fit of the whole tile, so "
        "each tile would step differently and the seams would show; restore in memory, or drop "
        "it"
    ),
    "stop": (
        "a stopping rule ends when the fit of the whole tile says so, so tiles would stop after "
        "different iterations and the seams would show; restore in memory, or drop it"
    ),
    "luminance": (
        "restoring the luminance is not supported in tiles yet; restore in memory, or drop it "
        "to restore each channel"
    ),
    "return_info": (
        "tiles return no RestorationInfo: the noise model and saturation level of each channel "
        "are in the TileRunReport (and the output's HISTORY); drop it"
    ),
}


def _learned_options(options) -> dict:
    """The options of a tiled learned run: ``weights`` only (`learned_deconvolve`'s)."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        msg = f"options must be a dict, got {type(options).__name__}; e.g. {{'weights': path}}"
        raise GpudeconvError(msg)
    unknown = sorted(set(options) - {"weights"})
    if unknown:
        msg = (
            f"method 'learned' in tiles takes the option weights only, got {', '.join(unknown)} "
            "(Richardson-Lucy options): drop them or choose an RL method"
        )
        raise GpudeconvError(msg)
    return dict(options)


def _validate_options(options) -> dict:
    """``options`` (`richardson_lucy` keywords) as a dict, each refused in one line unless a
    tile can take it: `TILE_OPTIONS`, ``tolerance`` (of ``stop``), and the refused ones at their
    off values (``accelerate=False``, ``stop=None``...)."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        msg = (
            f"options must be a dict of richardson_lucy keywords, got {type(options).__name__}; "
            "e.g. {'regularization': 0.005}"
        )
        raise GpudeconvError(msg)
    for key, value in options.items():
        if key in TILE_OPTIONS or key == "tolerance":
            continue
        if key in _WHOLE_FIT_OPTIONS:
            if value is None or value is False:
                continue
            msg = f"{key}={value!r} cannot be used in tiles: {_WHOLE_FIT_OPTIONS[key]}"
            raise GpudeconvError(msg)
        msg = (
            f"{key!r} is not an option of a tiled restoration; the options are "
            f"{', '.join(TILE_OPTIONS)}"
        )
        raise GpudeconvError(msg)
    return dict(options)


def _tile_settings(options, channels: int) -> rl._Settings:
    """The validated `richardson_lucy` settings of a tiled run (``noise`` and ``saturation``
    still as given: `_measure` resolves them for the whole image)."""
    options = _validate_options(options)
    return rl._settings(
        noise=options.get("noise"),
        background=options.get("background"),
        read_noise=options.get("read_noise"),
        gain=options.get("gain"),
        regularization=options.get("regularization", 0.0),
        damping=options.get("damping"),
        accelerate=False,
        stop=None,
        tolerance=options.get("tolerance", 1e-3),
        dering=options.get("dering", 0.0),
        saturation=options.get("saturation"),
        record=False,
        channels=channels,
    )


def _estimates_noise(settings: rl._Settings) -> bool:
    """Whether the noise model is measured on the image (not given)."""
    return settings.needs_noise and not isinstance(settings.noise, (NoiseModel, tuple))


def _options_record(settings: rl._Settings) -> dict:
    """The options of ``settings`` as JSON values (a resumed run must have the same)."""
    given = settings.noise
    if isinstance(given, NoiseModel):
        given = asdict(given)
    elif isinstance(given, tuple):
        given = [asdict(model) for model in given]
    return {
        "noise": given,
        "background": settings.background,
        "read_noise": settings.read_noise,
        "gain": settings.gain,
        "regularization": settings.regularization,
        "damping": settings.damping,
        "dering": settings.dering,
        "saturation": settings.saturation,
    }


_PLAIN_RECORD = _options_record(rl._PLAIN)


@dataclass(frozen=True)
class _Measured:
    """What every tile shares, measured on the whole image before them, per channel: the
    pedestal that lifts negative data (0 with a noise model, whose offset lifts it), the noise
    model (None without one) and the saturation level (None without one)."""

    pedestals: tuple
    noise: tuple
    saturation: tuple
    #: the learned method's ``(offset, scale)`` of each channel (None for a channel without
    #: data), empty for the RL methods
    normalization: tuple = ()

    def channel_settings(self, settings: rl._Settings) -> list[rl._Settings]:
        """The settings of each channel's restoration: its noise model and saturation level.

        The level is in the data as the tile restores it, lifted by the pedestal."""
        result = []
        for channel, (pedestal, model, level) in enumerate(
            zip(self.pedestals, self.noise, self.saturation, strict=True)
        ):
            given = settings.noise
            if isinstance(given, tuple):
                model = given[channel]
            elif isinstance(given, NoiseModel):
                model = given
            if level is not None and pedestal:
                level += pedestal
            result.append(
                replace(
                    settings, noise=model if model is not None else settings.noise, saturation=level
                )
            )
        return result

    def record(self) -> dict:
        return {
            "pedestals": list(self.pedestals),
            "noise": [None if m is None else asdict(m) for m in self.noise],
            "saturation": list(self.saturation),
            "normalization": [None if n is None else list(n) for n in self.normalization],
        }

    @classmethod
    def from_record(cls, record: dict) -> _Measured:
        return cls(
            tuple(float(p) for p in record["pedestals"]),
            tuple(None if m is None else NoiseModel(**m) for m in record["noise"]),
            tuple(None if v is None else float(v) for v in record["saturation"]),
            tuple(
                None if n is None else (float(n[0]), float(n[1]))
                for n in record.get("normalization", ())
            ),
        )


def _history_items(settings: rl._Settings, measured: _Measured, iterations: int) -> dict:
    """HISTORY items of a tiled run: the options in effect (as the in-memory CLI writes them)
    and each channel's noise model and saturation level."""
    options = rl._options_of(settings, iterations, luminance=False)
    chosen = [
        f"{key}={value}"
        for key, value in options.items()
        if key != "iterations" and value not in (None, False, 0, 0.0)
    ]
    items = {"options": " ".join(chosen) or "plain"}
    channels = len(measured.noise)
    for channel, (model, level) in enumerate(
        zip(measured.channel_settings(settings), measured.saturation, strict=True)
    ):
        model = model.noise if isinstance(model.noise, NoiseModel) else None
        parts = [f"{iterations} iterations"]
        if model is not None:
            parts.append(
                f"sky {model.background:.6g} sigma {model.sigma:.4g} offset {model.offset:.4g} "
                f"gain {model.gain:.4g} ({model.source})"
            )
        if level is not None:
            parts.append(f"saturation {level:.6g}")
        if len(parts) > 1:
            items[f"channel {channel}" if channels > 1 else "fit"] = "; ".join(parts)
    return items


def _learned_history(measured: _Measured, options: dict) -> dict:
    """HISTORY items of a tiled learned run: the network and each channel's normalization."""
    from .learned.infer import weights_name

    name = weights_name(options.get("weights"))
    items = {"options": f"learned network {name}, one normalization per channel for the mosaic"}
    count = len(measured.normalization)
    for channel, norm in enumerate(measured.normalization):
        if norm is not None:
            key = f"channel {channel}" if count > 1 else "fit"
            items[key] = f"normalization offset {norm[0]:.6g} scale {norm[1]:.6g}"
    return items


class _NoiseSample:
    """The boxes of each channel that `~gpudeconv.restore.noise.estimate_noise` measures, filled
    in from the cores as they are read, laid side by side in one plane per channel.

    The boxes lie on the whole image's grid of ``BOX``-pixel boxes, as `estimate_noise` cuts
    them: all of them for up to `SAMPLE_BOXES` boxes, else a regular subset of rows and columns
    of boxes. Laid in a plane of ``rows x columns`` boxes in the same order, `estimate_noise`
    cuts the plane into the very same boxes, so its model of the sample is its model of the
    whole image up to `SAMPLE_BOXES` boxes. The boxes do not depend on the tiles (a box cut by
    a core's edge is filled from both cores), so neither does the model. An image less than 32
    pixels across, which `estimate_noise` measures as one box, is sampled whole."""

    def __init__(self, shape, dtype):
        channels = shape[0] if len(shape) == 3 else 1
        height, width = shape[-2:]
        box = min(noise.BOX, height // 4, width // 4)
        self.box = box
        if box < noise.MIN_BOX:
            self.rows = self.cols = None
            self.planes = np.full((channels, height, width), np.nan, dtype=dtype)
            return
        ny, nx = height // box, width // box
        count = SAMPLE_BOXES
        ky = min(ny, max(4, min(count // 4, round(np.sqrt(count * ny / nx)))))
        kx = min(nx, max(4, count // ky))
        self.rows = (np.arange(ky) * ny) // ky  # box indices, regularly spread
        self.cols = (np.arange(kx) * nx) // kx
        self.planes = np.full((channels, ky * box, kx * box), np.nan, dtype=dtype)

    def add(self, core, block) -> None:
        """Copy the parts of the sampled boxes in ``core`` (y0, y1, x0, x1) from ``block``."""
        y0, y1, x0, x1 = core
        if self.rows is None:
            self.planes[:, y0:y1, x0:x1] = block
            return
        box = self.box
        first_row = np.searchsorted(self.rows * box + box, y0, side="right")
        last_row = np.searchsorted(self.rows * box, y1, side="left")
        first_col = np.searchsorted(self.cols * box + box, x0, side="right")
        last_col = np.searchsorted(self.cols * box, x1, side="left")
        for i in range(first_row, last_row):
            top = int(self.rows[i]) * box
            a0, a1 = max(top, y0), min(top + box, y1)
            for j in range(first_col, last_col):
                left = int(self.cols[j]) * box
                b0, b1 = max(left, x0), min(left + box, x1)
                self.planes[
                    :,
                    i * box + a0 - top : i * box + a1 - top,
                    j * box + b0 - left : j * box + b1 - left,
                ] = block[:, a0 - y0 : a1 - y0, b0 - x0 : b1 - x0]


class _TopValues:
    """The largest finite values of each channel (at most `TOP_VALUES`) below ``below`` (all
    by default), and how many finite values were at or above it."""

    def __init__(self, channels: int, below=None):
        self.below = below
        self.values = [np.empty(0) for _ in range(channels)]
        self.offered = np.zeros(channels, dtype=np.int64)  # finite values below `below`
        self.above = np.zeros(channels, dtype=np.int64)

    def add(self, block) -> None:
        for channel, plane in enumerate(block):
            values = plane.ravel()
            wanted = np.isfinite(values)
            if self.below is not None:
                above = wanted & (values >= self.below[channel])
                self.above[channel] += np.count_nonzero(above)
                wanted &= ~above
            self.offered[channel] += np.count_nonzero(wanted)
            kept = self.values[channel]
            if kept.size >= TOP_VALUES:
                wanted &= values > kept.min()  # the rest cannot enter
            values = values[wanted]
            if values.size > TOP_VALUES:  # in the working dtype: a tile may be large
                values = np.partition(values, values.size - TOP_VALUES)[-TOP_VALUES:]
            pool = np.concatenate([kept, values.astype(np.float64)])
            if pool.size > TOP_VALUES:
                pool = np.partition(pool, pool.size - TOP_VALUES)[-TOP_VALUES:]
            self.values[channel] = pool

    def complete(self, channel: int) -> bool:
        """Whether no value below ``below`` was left out."""
        return self.offered[channel] <= TOP_VALUES


def _plateau(top: _TopValues, channel: int, low: float, high: float, rescan) -> float | None:
    """`gpudeconv.restore.noise.saturation_level`'s plateau of the whole channel, from its range
    ``low, high`` and its largest values; ``rescan(channel, below)`` reads the image again for
    the channel's `_TopValues` (of one channel) below a level when they do not decide: a
    plateau, or the level under it, of more than `TOP_VALUES` pixels."""
    if top.offered[channel] < noise.PLATEAU_PIXELS or not low < high:
        return None
    tolerance = noise.PLATEAU_TOLERANCE * (high - low)
    level = high - tolerance
    values, complete = top.values[channel], top.complete(channel)
    if complete or level > values.min():
        count = int(np.count_nonzero(values >= level))
        below = values[values < level]
    else:  # every value kept is on the plateau: count it, and keep the largest under it
        under = rescan(channel, level)
        count, below, complete = int(under.above[0]), under.values[0], under.complete(0)
    if count < noise.PLATEAU_PIXELS:
        return None
    following = float(below.max())  # below is not empty: low < level
    edge = following - tolerance
    if complete or edge > below.min():
        next_count = int(np.count_nonzero(below >= edge))
    else:  # the level under the plateau holds more than was kept: count it
        next_count = int(rescan(channel, edge).above[0]) - count
    if count <= 2 * next_count:
        return None
    return level


def _measure(
    read,
    cores,
    shape,
    dtype,
    settings: rl._Settings,
    *,
    unsigned: bool,
    stacklevel: int,
    learned: bool = False,
) -> _Measured:
    """What the tiles share (`_Measured`), from one read of every core: ``read(core)`` returns
    the ``(C, h, w)`` block of a core ``(y0, y1, x0, x1)`` of an image of ``shape``, ``dtype``
    is the working dtype.

    Reads nothing for ``unsigned`` data (which cannot be negative) without options that need
    the image (a noise model to estimate, or a saturation level: checked against the data's
    range, `_check_saturation`). For the ``learned`` method, each channel's normalization
    (`_normalizations`) from the noise model's sample, and no pedestal."""
    channels = shape[0] if len(shape) == 3 else 1
    estimates = _estimates_noise(settings) or learned
    sample = _NoiseSample(shape, dtype) if estimates else None
    top = _TopValues(channels) if settings.saturation == "auto" else None
    low = np.full(channels, np.inf)
    high = np.full(channels, -np.inf)
    if sample is not None or top is not None or settings.saturation is not None or not unsigned:
        for core in cores:
            # the working dtype, as the whole image is measured by richardson_lucy
            block = np.asarray(read(core), dtype=dtype)
            planes = block.reshape(channels, -1)
            finite = np.isfinite(planes)
            low = np.minimum(low, np.min(planes, axis=1, where=finite, initial=np.inf))
            high = np.maximum(high, np.max(planes, axis=1, where=finite, initial=-np.inf))
            if sample is not None:
                sample.add(core, block)
            if top is not None:
                top.add(block)
        if not np.isfinite(low).any():  # before any output is made
            raise GpudeconvError(rl.NO_DATA)
    models = [None] * channels
    if isinstance(settings.noise, tuple):
        models = list(settings.noise)
    elif isinstance(settings.noise, NoiseModel):
        models = [settings.noise] * channels
    elif sample is not None and learned:
        normalization = _normalizations(sample, low)
        del sample
        return _Measured((0.0,) * channels, (None,) * channels, (None,) * channels, normalization)
    elif sample is not None:
        for channel in range(channels):
            if not np.isfinite(low[channel]):
                continue  # no data at all: every tile of it is skipped
            if np.count_nonzero(np.isfinite(sample.planes[channel])) < 2:
                msg = (
                    f"channel {channel} has too little data in the sampled boxes to estimate "
                    "its noise model; give noise=NoiseModel(...) or restore in memory"
                )
                raise GpudeconvError(msg)
            models[channel] = noise.estimate_noise(
                sample.planes[channel],
                background=settings.background,
                read_noise=settings.read_noise,
                gain=settings.gain,
            )
        del sample
    if settings.needs_noise:
        pedestals = [0.0] * channels  # the model's offset lifts the data
    else:
        pedestals = pedestals_of(low, high, stacklevel=stacklevel + 1)
    levels = [settings.saturation] * channels
    if top is not None:

        def rescan(channel: int, below: float) -> _TopValues:
            under = _TopValues(1, below=(below,))
            for core in cores:
                under.add(np.asarray(read(core), dtype=dtype)[channel : channel + 1])
            return under

        levels = [
            _plateau(top, channel, float(low[channel]), float(high[channel]), rescan)
            for channel in range(channels)
        ]
    _check_saturation(levels, low, dtype)
    return _Measured(tuple(pedestals), tuple(models), tuple(levels))


def _check_saturation(levels, low, dtype) -> None:
    """Refuse a channel whose every pixel is at or above its saturation level, from its
    smallest value ``low`` over the whole image, as `richardson_lucy` refuses such an image.

    The check is the whole image's, not each tile's: a tile's window may lie wholly in a
    clipped area larger than it (a lunar disc, a bright star's core) and is restored as the
    whole image is there (`restore_window`)."""
    colour = len(levels) > 1
    for channel, (level, lowest) in enumerate(zip(levels, low, strict=True)):
        if level is None or not np.isfinite(lowest):
            continue  # no level, or no data: every tile of the channel is skipped
        if np.dtype(dtype).type(lowest) >= np.dtype(dtype).type(level):
            where = f" of channel {channel}" if colour else ""
            raise GpudeconvError(rl.all_saturated(level, where))


def _normalizations(sample: _NoiseSample, low) -> tuple:
    """The learned method's ``(offset, scale)`` of each channel, as `gpudeconv.learned.data
    .normalize` measures them (median, ``NOISE_UNITS`` robust noise sigmas), on the noise
    model's sample of the whole image: one for all the tiles. None for a channel without
    data."""
    from .learned.infer import _check_deep_sky, _normalization

    result = []
    for channel, plane in enumerate(sample.planes):
        if not np.isfinite(low[channel]):
            result.append(None)
            continue
        valid = np.isfinite(plane)
        if np.count_nonzero(valid) < 9:
            msg = (
                f"channel {channel} has too little data in the sampled boxes to measure its "
                "noise for the learned method; restore it in memory"
            )
            raise GpudeconvError(msg)
        offset, scale = _normalization(plane.astype(np.float64), valid)
        if not scale > 0:
            msg = (
                f"channel {channel} has no measurable noise (robust sigma 0): the learned "
                "method measures its scale in noise sigmas; use --method rl for noiseless or "
                "synthetic data"
            )
            raise GpudeconvError(msg)
        # the windows are restored with this normalization and do not check on their own: a
        # window over a bright galaxy is not planetary data when the mosaic is not
        _check_deep_sky((plane - offset) / scale, valid)
        result.append((offset, scale))
    return tuple(result)


def learned_halo(psf, shape, channels: int) -> int:
    """The halo of the learned method for ``psf`` (a host array or fields, as `_Run` holds
    it) on an image of ``shape``: the network's reach (``HALO + BLEND / 2``) plus that of the
    local mean (3 sigma of its Gaussian of ``FLUX_WIDTH`` times the largest FWHM), rounded up
    to a multiple of 4 (the network pools 4 x 4)."""
    from .learned.data import _node_shapes
    from .learned.infer import BLEND, FLUX_WIDTH, HALO, _psf_fields
    from .learned.network import MULTIPLE

    sources = psf if isinstance(psf, list) else [psf]
    fwhm = 0.0
    for source in sources:
        image_shape = source.image_shape if isinstance(source, PSFField) else shape
        for fld, _ in _psf_fields(source, image_shape, channels, get_backend("numpy")):
            fwhm = max(fwhm, float(_node_shapes(fld)[..., 0].max()))
    sigma = FLUX_WIDTH * fwhm / 2.3548
    reach = HALO + BLEND // 2 + math.ceil(3 * sigma)
    return -(-reach // MULTIPLE) * MULTIPLE


# --------------------------------------------------------------------------------- the driver


class TileRunInterrupted(GpudeconvError):
    """A tiled run stopped by the user (Ctrl-C): the partial output and its journal are kept.

    The command line prints it as one line and exits with 130, as for any Ctrl-C."""

    def __init__(self, done: int, total: int):
        self.done, self.total = done, total
        super().__init__(
            f"interrupted after {done} of {total} tiles; run again with --resume to continue"
        )


@dataclass(frozen=True)
class TileRunReport:
    """What a tiled run did.

    ``tiles_done`` tiles were restored now, ``tiles_skipped`` held no data (written as NaN),
    ``tiles_resumed`` were already in the output from an interrupted run; ``mpix_it_per_s`` is
    the restored pixels (of all channels) times iterations (1 for the learned method) per
    second of ``seconds``.
    ``options`` are the options in effect (`richardson_lucy`'s, as JSON values), ``noise`` the
    noise model of each channel (None without one) and ``saturation`` each channel's level
    (None without one), measured on the whole image.
    """

    output: Path | None
    shape: tuple[int, ...]
    tile: int
    halo: int
    iterations: int
    backend: str
    tiles_total: int
    tiles_done: int
    tiles_skipped: int
    tiles_resumed: int
    seconds: float
    mpix_it_per_s: float
    options: dict = field(default_factory=lambda: dict(_PLAIN_RECORD))
    noise: tuple = ()
    saturation: tuple = ()
    #: the learned method's ``(offset, scale)`` of each channel (empty for RL)
    normalization: tuple = ()


class _OutOfMemory(Exception):
    """A tile did not fit: the pass stops after writing what it had, for a smaller tile."""


def _no_step() -> None:
    return None


def _covered(core, done: list[tuple[int, int, int, int]]) -> bool:
    y0, y1, x0, x1 = core
    return any(a <= y0 and y1 <= b and c <= x0 and x1 <= d for a, b, c, d in done)


class _Prefetcher:
    """Reads tiles ahead on one thread: while tile ``i`` is restored, tile ``i + 1`` is read from
    disk into the other of two host buffers (pinned on a GPU), cast to the working dtype, lifted
    by the pedestals and checked for data.

    A buffer is refilled only once the upload from it has happened (`release`)."""

    def __init__(self, reader: TileReader, tiles, buffers, pedestals):
        self._reader = reader
        self._tiles = tiles
        self._buffers = buffers
        self._pedestals = pedestals
        self._released = [None, None]
        self._futures = {}
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="gpudeconv-read")

    def _load(self, position: int):
        slot = position % 2
        if self._released[slot] is not None:
            self._released[slot].synchronize()
        buffer = self._buffers[slot]
        np.copyto(buffer, self._reader.read(self._tiles[position].read), casting="unsafe")
        for channel, pedestal in enumerate(self._pedestals):
            if pedestal:
                buffer[channel] += buffer.dtype.type(pedestal)
        has_data = bool(np.isfinite(buffer).any())
        return buffer, has_data

    def take(self, position: int):
        """``(buffer, has_data)`` of tile ``position``; starts reading the next one."""
        future = self._futures.pop(position, None)
        if future is None:
            future = self._executor.submit(self._load, position)
        if position + 1 < len(self._tiles):
            self._futures[position + 1] = self._executor.submit(self._load, position + 1)
        return future.result()

    def release(self, position: int, event) -> None:
        """Tile ``position``'s buffer may be refilled once ``event`` has happened."""
        self._released[position % 2] = event

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class _Journal:
    """JSON lines beside the partial output: the run's parameters, then one line per tile whose
    core is written and on disk (``{"core": [y0, y1, x0, x1]}``), one per change of tile size
    (``{"tile": n}``) and, before the first tile, the FFT lengths the backend chose by timing
    (``{"fft_lengths": {n: length}}``). Each line is flushed and fsynced before the run goes
    on."""

    def __init__(self, path: Path, params: dict, done=(), tile=None, fft_lengths=None):
        self.path = path
        self.params = params
        self.done = [tuple(core) for core in done]
        self.tile = params["tile"] if tile is None else tile
        #: FFT lengths the backend chose by timing ({n: length}), recorded with the first tile
        self.fft_lengths = fft_lengths

    @classmethod
    def create(cls, path: Path, params: dict) -> _Journal:
        journal = cls(path, params)
        with open(path, "w", encoding="utf-8") as file:
            file.write(json.dumps({"format": _JOURNAL_FORMAT, **params}) + "\n")
            file.flush()
            os.fsync(file.fileno())
        return journal

    @classmethod
    def load(cls, path: Path) -> _Journal | None:
        """The journal at ``path``; None if it is not one (or its first line is cut short)."""
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
            params = json.loads(lines[0])
        except (OSError, UnicodeDecodeError, ValueError, IndexError):
            return None
        if not isinstance(params, dict) or params.pop("format", None) != _JOURNAL_FORMAT:
            return None
        done, tile, lengths = [], params.get("tile"), None
        for line in lines[1:]:
            try:
                entry = json.loads(line)
            except ValueError:
                break  # a line cut short by a crash: everything before it holds
            if "core" in entry:
                done.append(tuple(entry["core"]))
            elif "tile" in entry:
                tile = entry["tile"]
            elif "fft_lengths" in entry:
                lengths = {int(n): int(length) for n, length in entry["fft_lengths"].items()}
        return cls(path, params, done, tile, lengths)

    def _append(self, entry: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps(entry) + "\n")
            file.flush()
            os.fsync(file.fileno())

    def record(self, core) -> None:
        self.done.append(tuple(core))
        self._append({"core": list(core)})

    def record_fft_lengths(self, lengths: dict) -> None:
        self.fft_lengths = dict(lengths)
        self._append({"fft_lengths": {str(n): length for n, length in lengths.items()}})

    def record_tile(self, tile: int) -> None:
        self.tile = tile
        self._append({"tile": tile})


class _Run:
    """The state of one `restore_tiled` call."""

    def __init__(
        self, reader, writer, psf, iterations, backend, journal, on_tile, settings, network=None
    ):
        #: the learned method's network (`gpudeconv.learned.network.Weights`), None for RL
        self.network = network
        self.reader = reader
        self.writer = writer
        self.iterations = iterations
        self.backend = backend
        self.journal = journal
        self.on_tile = on_tile
        self.channels = reader.channels
        self.is_colour = len(reader.shape) == 3
        self.colour = self.channels if self.is_colour else 0  # channels of a colour image
        self.dtype = backend.float_dtype(reader.dtype)
        self.fields = _fields_of(psf, self.channels)
        self.host_psf = None
        if self.fields is None:
            self.host_psf = validate_psf(
                backend.to_host(psf), channels=self.channels if self.is_colour else None
            )
        else:
            for field in self.fields:
                field.check_image_shape(reader.shape)
        self.operators = {}  # read shape -> operators (one per channel), reused by every tile
        self.settings = settings
        self.measured = _Measured(
            (0.0,) * self.channels, (None,) * self.channels, (None,) * self.channels
        )
        self.channel_settings = self.measured.channel_settings(settings)
        #: cores written, from earlier runs (the journal) and this one
        self.finished = list(journal.done) if journal is not None else []
        self.done = self.skipped = 0
        self.restored_pixels = 0
        self.started = time.perf_counter()

    # ----------------------------------------------------------------- per tile
    def _operators_for(self, tile: Tile):
        shape = tile.read_shape
        if self.fields is not None:
            return _window_operators(
                self.fields, tile.read[0], tile.read[2], shape, self.colour, self.backend
            )
        if shape not in self.operators:
            # only the current shape: the OTFs of a larger tile (before an out-of-memory
            # halving) would linger on the device
            self.operators = {
                shape: _window_operators(self.host_psf, 0, 0, shape, self.colour, self.backend)
            }
        return self.operators[shape]

    def _restore(self, planes, tile: Tile):
        """The restored core of ``tile`` from its read window ``planes`` (on the backend)."""
        if self.network is not None:
            return self._restore_learned(planes, tile)
        return restore_window(
            planes,
            self._operators_for(tile),
            self.iterations,
            pedestals=self.measured.pedestals,
            core=tile.core_in_read,
            backend=self.backend,
            settings=self.channel_settings,
        )

    def _restore_learned(self, planes, tile: Tile):
        """The learned method on ``tile``'s read window: each channel with the whole image's
        normalization and the local part of its PSF field (a plain PSF as it is), the core
        cut out. The window is first cut to start at a multiple of 4 (the network commutes
        with shifts by multiples of 4 only); the halo keeps its width, as the cores start at
        multiples of 4."""
        from .learned.infer import learned_deconvolve
        from .learned.network import MULTIPLE

        ry0, _, rx0, _ = tile.read
        dy, dx = -ry0 % MULTIPLE, -rx0 % MULTIPLE
        rows, cols = tile.core_in_read
        core = slice(rows.start - dy, rows.stop - dy), slice(cols.start - dx, cols.stop - dx)
        shape = (planes.shape[1] - dy, planes.shape[2] - dx)
        restored = self.backend.xp.empty((self.channels, *tile.core_shape), dtype=planes.dtype)
        for channel in range(self.channels):
            norm = self.measured.normalization[channel]
            plane = planes[channel, dy:, dx:]
            if norm is None or not self.backend.xp.isfinite(plane).any():
                restored[channel] = np.nan
                continue
            if self.fields is not None:
                fld = self.fields[channel if len(self.fields) > 1 else 0]
                psf = fld.window(ry0 + dy, rx0 + dx, *shape)
            else:
                psf = self.host_psf if self.host_psf.ndim == 2 else self.host_psf[channel]
            out = learned_deconvolve(
                plane, psf, weights=self.network, backend=self.backend, normalization=norm
            )
            restored[channel] = out[core]
        return restored

    # ----------------------------------------------------------------- statistics
    def measure(self, plan: TilePlan) -> None:
        """The pedestals, noise models and saturation levels of the whole image (`_measure`),
        from one read of every core, or as the journal of the run it continues has them."""
        if self.journal is not None and "measured" in self.journal.params:
            self.measured = _Measured.from_record(self.journal.params["measured"])
        else:
            self.measured = _measure(
                self.reader.read,
                [tile.core for tile in plan.tiles],
                self.reader.shape,
                self.dtype,
                self.settings,
                unsigned=self.reader.dtype.kind == "u",
                stacklevel=4,
                learned=self.network is not None,
            )
        self.channel_settings = self.measured.channel_settings(self.settings)

    # ----------------------------------------------------------------- one pass
    def run_pass(self, plan: TilePlan, tiles: list[Tile], bar) -> None:
        """Restore ``tiles`` (all of ``plan``'s read shape) with transfers overlapping the
        computation; raise `_OutOfMemory` (after writing what was finished) if a tile does not
        fit."""
        backend = self.backend
        channels = self.channels
        compute, copy = backend.stream(), backend.stream()
        read_shape = (channels, *plan.read_shape)
        try:
            in_buffers = [backend.pinned_empty(read_shape, self.dtype) for _ in range(2)]
            out_buffers = [
                backend.pinned_empty((channels * plan.tile * plan.tile,), self.dtype)
                for _ in range(2)
            ]
        except BaseException as exc:
            if backend.is_out_of_memory(exc):
                raise _OutOfMemory from exc
            raise
        prefetch = _Prefetcher(self.reader, tiles, in_buffers, self.measured.pedestals)
        pending = None  # the previous tile, whose core is on its way to the host

        def stage(position: int):
            buffer, has_data = prefetch.take(position)
            if not has_data:
                prefetch.release(position, None)
                return None
            with copy:
                device = backend.upload(buffer, stream=copy)
            uploaded = copy.record()
            prefetch.release(position, uploaded)
            return device, uploaded

        try:
            staged = stage(0) if tiles else None
            for position, tile in enumerate(tiles):
                current, finished = staged, None
                if current is not None:
                    device, uploaded = current
                    compute.wait_event(uploaded)
                    with compute:
                        core = self._restore(device, tile)
                    computed = compute.record()
                if position + 1 < len(tiles):
                    staged = stage(position + 1)  # overlaps this tile's iterations
                if current is not None:
                    copy.wait_event(computed)
                    size = channels * tile.core_shape[0] * tile.core_shape[1]
                    host = out_buffers[position % 2][:size].reshape(channels, *tile.core_shape)
                    with copy:
                        backend.download(core, host, stream=copy)
                    # the device arrays live until their copies are done
                    finished = (host, copy.record(), (device, core))
                if pending is not None:
                    self._finish(*pending, bar)
                pending = (tile, finished)
            if pending is not None:
                last, pending = pending, None
                self._finish(*last, bar)
        except BaseException as exc:
            if not backend.is_out_of_memory(exc):
                raise
            if pending is not None:
                self._finish(*pending, bar)  # computed before memory ran out: keep it
            raise _OutOfMemory from exc
        finally:
            prefetch.close()

    def _finish(self, tile: Tile, finished, bar) -> None:
        """Write ``tile``'s core (NaN for a tile without data), make it durable, journal it."""
        if finished is None:
            block = np.full((self.channels, *tile.core_shape), np.nan, dtype=self.dtype)
            self.skipped += 1
        else:
            block, downloaded, _ = finished
            downloaded.synchronize()
            self.done += 1
            self.restored_pixels += self.channels * tile.core_shape[0] * tile.core_shape[1]
        self.writer.write(tile.core, block)
        self.writer.sync()
        if self.journal is not None:
            if self.journal.fft_lengths is None:
                # before the first tile counts as done: a resumed run must transform at the
                # same lengths to give the same bytes
                self.journal.record_fft_lengths(self.backend.fft_lengths())
            self.journal.record(tile.core)
        self.finished.append(tile.core)
        if bar is not None:
            bar.update(1)
            elapsed = time.perf_counter() - self.started
            if self.done and elapsed > 0:
                rate = self.restored_pixels * self.iterations / elapsed / 1e6
                bar.set_postfix_str(f"{rate:.1f} MPix·it/s", refresh=False)
        if self.on_tile is not None:
            self.on_tile(self.done + self.skipped, tile)


def _window_operators(psf, y0: int, x0: int, shape, channels: int, backend: Backend):
    """One blur operator per channel for a read window of ``shape`` at row ``y0``, column ``x0``
    of an image of ``channels`` (0 for a grey image): ``psf`` is a validated host PSF array
    (the position does not matter), or a list of fields, one for all channels or one each
    (their windows are taken)."""
    if isinstance(psf, list):
        windows = [field.window(y0, x0, *shape) for field in psf]
        psf = windows[0] if len(windows) == 1 else windows
    return rl._operators(psf, shape, max(channels, 1), channels > 0, backend)


def restore_window(
    planes, operators, iterations: int, *, pedestals, core, backend: Backend, settings=None
):
    """The per-tile function: RL of each channel of a read window, the core cut out.

    Parameters
    ----------
    planes : (C, h, w) array on ``backend``
        The read window in the working dtype, each channel already lifted by its pedestal.
    operators : list of operators
        One per channel (`_window_operators`).
    iterations : int
    pedestals : sequence of float
        Subtracted from each channel after the restoration (0: none).
    core : (slice, slice)
        Rows and columns of the window to return.
    backend : Backend
    settings : sequence of rl._Settings, optional
        Each channel's `richardson_lucy` settings, with the whole image's noise model and
        saturation level (`_Measured.channel_settings`); plain RL by default.

    Returns
    -------
    (C, core rows, core columns) array on ``backend``
    """
    rows, cols = core
    channels = planes.shape[0]
    shape = (channels, *planes[0][rows, cols].shape)
    restored = backend.xp.empty(shape, dtype=planes.dtype)
    for channel in range(channels):
        plane = rl._restore_plane(
            planes[channel],
            operators[channel],
            iterations,
            _no_step,
            rl._PLAIN if settings is None else settings[channel],
            window=True,  # a window may lie wholly in a clipped area: `_measure` checks the image
        )
        restored[channel] = plane[rows, cols]
        if pedestals[channel]:
            restored[channel] -= planes.dtype.type(pedestals[channel])
    return restored


def pedestals_of(low, high, *, stacklevel: int = 3) -> list[float]:
    """The pedestal of each channel from its range ``low, high`` over the whole image, as the
    whole-image restoration lifts it (0 for non-negative data), with its warning for each
    negative channel.

    One pedestal for the whole image, not one per tile: tiles restored from differently lifted
    data would show their seams. ``stacklevel`` counts from here, as `warnings.warn` does."""
    pedestals = []
    for lo, hi in zip(low, high, strict=True):
        if not (np.isfinite(lo) and lo < 0):
            pedestals.append(0.0)
            continue
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            pedestals.append(rl._pedestal(float(lo), float(hi)))
        for warning in said:  # the same words, pointing at our caller's caller
            warnings.warn(warning.message, warning.category, stacklevel=stacklevel)
    return pedestals


def _fields_of(psf, channels: int) -> list[PSFField] | None:
    if isinstance(psf, PSFField):
        return [psf]
    if isinstance(psf, (list, tuple)) and psf and all(isinstance(p, PSFField) for p in psf):
        if len(psf) != channels:
            msg = f"{len(psf)} PSF fields were given for an image of {channels} channel(s)"
            raise GpudeconvError(msg)
        return list(psf)
    return None


def _psf_size(psf) -> int:
    if isinstance(psf, PSFField):
        return psf.size
    if isinstance(psf, (list, tuple)) and psf and all(isinstance(p, PSFField) for p in psf):
        return max(p.size for p in psf)
    return int(max(np.shape(psf)[-2:]))


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="tile", desc="tiles", leave=False)


def restore_tiled(
    reader: TileReader,
    writer: TileWriter,
    psf,
    iterations: int,
    *,
    backend: str | Backend | None = None,
    plan: TilePlan,
    journal: _Journal | None = None,
    progress: bool = True,
    on_tile: Callable[[int, Tile], None] | None = None,
    options: dict | None = None,
    method: str = "rl",
) -> TileRunReport:
    """Restore an image tile by tile from ``reader`` into ``writer``.

    Parameters
    ----------
    reader : gpudeconv.io.TileReader
        The input, read one window at a time (`gpudeconv.io.open_tile_reader`, or
        `gpudeconv.io.ArrayTileReader` for an array).
    writer : gpudeconv.io.TileWriter
        The output, written one core at a time (`gpudeconv.io.create_tile_output`).
    psf : (k, k) or (C, k, k) array_like, or PSFField (or one per channel)
        As for `richardson_lucy`; a field is made for the whole image and each tile is restored
        with ``field.window`` of its read window.
    iterations : int
    backend : {'auto', 'numpy', 'cupy'} or Backend, optional
    plan : TilePlan
        From `plan_tiles` for the reader's shape.
    journal : optional
        Where finished tiles are recorded; tiles already recorded in it are not restored again.
    progress : bool
        A tqdm bar over the tiles, with MPix·it/s and the time left.
    on_tile : callable(done, tile), optional
        Called after each tile's core is written (and journaled), with the tiles finished in
        this call so far.
    options : dict, optional
        Keyword options of `richardson_lucy` that act locally: ``noise``, ``background``,
        ``read_noise``, ``gain``, ``regularization``, ``damping``, ``dering``,
        ``saturation`` (`TILE_OPTIONS`). ``noise='auto'`` (or any option that implies a noise
        model) and ``saturation='auto'`` are measured once on the whole image, before the
        tiles (module docstring, "Options"). ``accelerate``, ``stop``, ``luminance`` and
        ``return_info`` are refused. With ``dering``, plan with ``dering=True``.
    method : {'rl', 'learned'}
        ``'learned'``: the trained network (`gpudeconv.learned.infer.learned_deconvolve`) on
        each tile, with one normalization per channel measured on the whole image; plan
        with the halo of `learned_halo`. ``options`` may then hold ``weights`` only, and
        ``iterations`` is not used. Any other name restores with RL.

    Returns
    -------
    TileRunReport
        With ``output=None``.

    Raises
    ------
    GpudeconvError
        For an option a tiled run cannot take, or a bad value.
    TileRunInterrupted
        On KeyboardInterrupt: what was written and journaled stays.

    Warns
    -----
    GpudeconvWarning
        When the backend runs out of memory and the tile is halved; when the image has
        negative values (a pedestal is added, as in `richardson_lucy`).
    """
    backend = get_backend(backend)
    iterations = rl._validate_iterations(iterations)
    if tuple(plan.shape) != tuple(reader.shape):
        msg = f"the plan is for an image of shape {plan.shape}, the input is {reader.shape}"
        raise GpudeconvError(msg)
    network = None
    if method == "learned":
        from .learned.infer import load_weights

        network = load_weights(_learned_options(options).get("weights"))
        options = None
    settings = _tile_settings(options, reader.channels)
    if journal is not None and journal.fft_lengths:
        backend.pin_fft_lengths(journal.fft_lengths)
    run = _Run(reader, writer, psf, iterations, backend, journal, on_tile, settings, network)
    if journal is not None and journal.tile != plan.tile:
        plan = _cut(plan.shape, journal.tile, plan.halo)  # as halved by an earlier run
    resumed = sum(_covered(tile.core, run.finished) for tile in plan.tiles)
    bar = _progress_bar(len(plan), resumed, progress)
    try:
        run.measure(plan)
        while True:
            todo = [tile for tile in plan.tiles if not _covered(tile.core, run.finished)]
            try:
                run.run_pass(plan, todo, bar)
                break
            except _OutOfMemory as exc:
                plan = _smaller(plan, backend, exc, learned=network is not None)
                if journal is not None:
                    journal.record_tile(plan.tile)
                if bar is not None:
                    bar.reset(total=len(plan))
                    bar.update(sum(_covered(t.core, run.finished) for t in plan.tiles))
    except KeyboardInterrupt:
        count = sum(_covered(tile.core, run.finished) for tile in plan.tiles)
        raise TileRunInterrupted(count, len(plan)) from None
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - run.started
    passes = 1 if network is not None else iterations  # the network is one pass, as Wiener is
    rate = run.restored_pixels * passes / seconds / 1e6 if seconds > 0 else 0.0
    return TileRunReport(
        output=None,
        shape=tuple(reader.shape),
        tile=plan.tile,
        halo=plan.halo,
        iterations=iterations,
        backend=backend.name,
        tiles_total=len(plan),
        tiles_done=run.done,
        tiles_skipped=run.skipped,
        tiles_resumed=resumed,
        seconds=seconds,
        mpix_it_per_s=rate,
        options=_options_record(settings),
        noise=run.measured.noise,
        saturation=run.measured.saturation,
        normalization=run.measured.normalization,
    )


def _smaller(
    plan: TilePlan, backend: Backend, error: BaseException, *, learned: bool = False
) -> TilePlan:
    """The plan with half the tile side, after running out of memory (said once, as a warning).

    For the ``learned`` method, half rounded down to a multiple of 4: its cores and windows
    must start on multiples of 4 (`_Run._restore_learned`), or the window is cut to one that
    does and loses up to 3 pixels of its halo."""
    backend.release_memory()
    tile = plan.tile // 2
    if learned:
        from .learned.network import MULTIPLE

        tile -= tile % MULTIPLE
    if tile < MIN_TILE:
        msg = (
            f"out of {backend.name} memory even with tiles of {plan.tile} pixels: free memory "
            "on the device, or run with --backend numpy"
        )
        raise GpudeconvError(msg) from error.__cause__
    warnings.warn(
        f"out of {backend.name} memory with tiles of {plan.tile} pixels; going on with "
        f"{tile}-pixel tiles (pass tile= / --tile to choose the size)",
        GpudeconvWarning,
        stacklevel=3,
    )
    return _cut(plan.shape, tile, plan.halo)


def deconvolve_tiled(
    image,
    psf,
    iterations: int = 30,
    *,
    backend: str | Backend | None = None,
    tile: int | None = None,
    out: np.ndarray | None = None,
    progress: bool = False,
    on_tile: Callable[[int, Tile], None] | None = None,
    options: dict | None = None,
) -> np.ndarray:
    """Richardson-Lucy tile by tile, into an array: what ``gd.deconvolve(..., tile=N)`` runs.

    Parameters
    ----------
    image : (H, W) or (C, H, W) NumPy array (or ``numpy.memmap``), or str / path-like
        The image, or a file read one tile window at a time (`gpudeconv.io.open_tile_reader`).
    psf, iterations, backend, tile
        As for `deconvolve_file`.
    out : (H, W) or (C, H, W) ndarray, optional
        Where the result goes (e.g. a ``numpy.memmap`` of a file larger than memory); by
        default a new float32 array (float64 for float64 input).
    progress : bool
        A tqdm bar over the tiles.
    on_tile : callable(done, tile), optional
    options : dict, optional
        `richardson_lucy`'s options that tiles take, as for `restore_tiled`.

    Returns
    -------
    ndarray
        ``out``, restored: the in-core result (with the same options and the whole image's
        noise model and saturation level) within the seam tolerance of the halo (module
        docstring); the working set is that of one tile.
    """
    from .backend import is_cupy_array
    from .io import ArrayTileReader, ArrayTileWriter

    if is_cupy_array(image):
        msg = (
            "tiles stream NumPy arrays and files; a CuPy array is already on the device: "
            "restore it with richardson_lucy, or pass cupy.asnumpy(image)"
        )
        raise GpudeconvError(msg)
    backend = get_backend(backend)
    iterations = rl._validate_iterations(iterations)
    options = _validate_options(options)  # before any work: a file may be large
    reader = (
        open_tile_reader(image)
        if isinstance(image, (str, os.PathLike))
        else ArrayTileReader(np.asarray(image) if not isinstance(image, np.ndarray) else image)
    )
    with reader:
        dtype = backend.float_dtype(reader.dtype)
        if out is None:
            out = np.empty(reader.shape, dtype=dtype)
        elif tuple(out.shape) != tuple(reader.shape) or not out.flags.c_contiguous:
            msg = (
                f"out must be a C-contiguous array of the image's shape {reader.shape}, got "
                f"{tuple(out.shape)}"
            )
            raise GpudeconvError(msg)
        plan = plan_tiles(
            reader.shape,
            psf_size=_psf_size(psf),
            iterations=iterations,
            backend=backend,
            tile=tile,
            dtype=dtype,
            dering=bool(options.get("dering")),
        )
        restore_tiled(
            reader,
            ArrayTileWriter(out),
            psf,
            iterations,
            backend=backend,
            plan=plan,
            progress=progress,
            on_tile=on_tile,
            options=options,
        )
    return out


# --------------------------------------------------------------------------------- files


def _partial_paths(target: Path) -> tuple[Path, Path]:
    """The partial output and its journal, hidden beside the target."""
    return (
        target.parent / f".{target.name}.partial",
        target.parent / f".{target.name}.journal",
    )


def _psf_digest(psf) -> str:
    """A hash of the PSF as it restores: the normalized array(s), or a field's nodes and shape."""
    digest = hashlib.sha256()
    fields = psf if isinstance(psf, (list, tuple)) else [psf]
    if all(isinstance(p, PSFField) for p in fields):
        for field in fields:
            digest.update(repr((field.image_shape, field.psfs.shape)).encode())
            digest.update(np.ascontiguousarray(field.psfs).tobytes())
    else:
        array = np.ascontiguousarray(validate_psf(np.asarray(psf), channels=None, warn_sum=False))
        digest.update(repr(array.shape).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _describe_psf(psf) -> str:
    if isinstance(psf, PSFField):
        ny, nx = psf.grid
        return f"field {ny}x{nx} nodes, {psf.size}x{psf.size}"
    if isinstance(psf, (list, tuple)) and psf and isinstance(psf[0], PSFField):
        return f"{len(psf)} fields, {psf[0].size}x{psf[0].size}"
    shape = np.shape(psf)
    return f"array {shape[-2]}x{shape[-1]}" + (f" x{shape[0]} channels" if len(shape) == 3 else "")


def _run_params(
    input_path: Path, psf, iterations, backend: Backend, plan: TilePlan, settings: rl._Settings
) -> dict:
    """What a resumed run must share with the one it continues (the journal's first line;
    ``"measured"``, the whole image's pedestals, noise models and saturation levels, is added
    once measured, and a resumed run takes them from there)."""
    stat = input_path.stat()
    return {
        "input": {
            "path": str(input_path.resolve()),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
        },
        "psf": _psf_digest(psf),
        "iterations": int(iterations),
        "backend": backend.name,
        "shape": list(plan.shape),
        "tile": plan.tile,
        "halo": plan.halo,
        "options": _options_record(settings),
    }


_WHAT_DIFFERS = {
    "input": "a different input file (changed since, or another one)",
    "psf": "a different PSF",
    "iterations": "a different number of iterations",
    "backend": "a different backend",
    "shape": "a different image shape",
    "tile": "a different tile size",
    "halo": "a different halo",
}
#: what follows from the method (as its options do): not named when the method differs
_OF_THE_METHOD = ("iterations", "halo")


def _check_resumable(journal: _Journal, params: dict, forced_tile: int | None) -> None:
    method = params["method"]
    # a journal from before the RL methods were named was written by one of them; their options
    # tell them apart
    was = journal.params.get("method", "an RL method" if method == "learned" else method)
    other_method = was != method
    differs = [f"a different method ({was}, now {method})"] if other_method else []
    differs += [
        what
        for key, what in _WHAT_DIFFERS.items()
        if key != "tile"
        and not (other_method and key in _OF_THE_METHOD)
        and journal.params.get(key) != params[key]
    ]
    # a journal from before the options were recorded was written by plain RL
    options = journal.params.get("options", _PLAIN_RECORD)
    if options != params["options"] and not other_method:
        names = sorted(
            key for key in params["options"] if options.get(key) != params["options"][key]
        )
        differs.append(f"different options ({', '.join(names) or 'their set'})")
    if forced_tile is not None and forced_tile != journal.params.get("tile"):
        differs.append(_WHAT_DIFFERS["tile"])
    if differs:
        listed = differs[0] if len(differs) == 1 else f"{', '.join(differs[:-1])} and {differs[-1]}"
        msg = (
            f"cannot resume from {journal.path.name}: it was written with {listed}; run with "
            "--overwrite (overwrite=True) to start again"
        )
        raise GpudeconvError(msg)


def _remove(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def deconvolve_file(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    psf,
    iterations: int,
    *,
    backend: str | Backend | None = None,
    tile: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    history: str | Sequence[str] | None = None,
    header_extra: dict | None = None,
    psf_description: str | None = None,
    on_tile: Callable[[int, Tile], None] | None = None,
    options: dict | None = None,
    method: str = "rl",
) -> TileRunReport:
    """Restore an image file into another, tile by tile, never holding the whole mosaic.

    Parameters
    ----------
    input_path : str or path-like
        FITS (uncompressed, tile-compressed, BZERO/BSCALE) or TIFF (uncompressed; compressed or
        tiled with zarr installed); PNG and JPEG are read whole. Grey ``(H, W)`` or
        channel-first colour ``(C, H, W)``: colour tiles over H and W with all channels.
    output_path : str or path-like
        ``.fits`` or ``.tif``/``.tiff`` (uncompressed), float32 (float64 for float64 input).
    psf : (k, k) or (C, k, k) array_like, or PSFField (or one per channel)
        As for `richardson_lucy`; a field is made for the input's shape.
    iterations : int
    backend : {'auto', 'numpy', 'cupy'} or Backend, optional
    tile : int, optional
        Core side in pixels; by default from the backend's free memory (`plan_tiles`).
    resume : bool
        Continue an interrupted run into the same output: the tiles in its journal are kept,
        the rest restored with the noise models and saturation levels the journal recorded,
        and the result is byte for byte that of an uninterrupted run (same machine and
        libraries). Refused in one line if the input, PSF, iterations, backend, method,
        options or forced tile differ. Without a journal to continue, the run starts afresh.
    overwrite : bool
        Replace an existing output, and the partial output of an interrupted run.
    progress : bool
        A tqdm bar over the tiles.
    history : str or sequence of str, optional
        More HISTORY lines for the output's header.
    header_extra : dict, optional
        Items recorded as ``'gpudeconv <key>: <value>'`` HISTORY lines (after the options
        and noise models, which an item of the same key replaces).
    psf_description : str, optional
        How the PSF is described in the header's ``'gpudeconv PSF:'`` line (e.g. ``'Moffat
        fwhm=3.5 beta=2.5 size=25'``); by default its shape.
    on_tile : callable(done, tile), optional
        Called after each tile is written and journaled (see `restore_tiled`).
    options : dict, optional
        `richardson_lucy`'s options that tiles take, as for `restore_tiled`; the HISTORY
        records them (``'gpudeconv options: ...'``) and each channel's noise model and
        saturation level (``'gpudeconv fit: ...'``, ``'gpudeconv channel <c>: ...'``), as the
        command line does in memory.
    method : str
        The method's name in the HISTORY (e.g. ``'rl-tv'``, of `gpudeconv.method_options`).
        ``'learned'`` restores with the trained network instead of RL (`restore_tiled`):
        ``options`` may hold ``weights`` only, ``iterations`` is not used, the halo is
        `learned_halo`'s, the tile a multiple of 4, and each channel's normalization is
        measured once on the whole image and recorded in the HISTORY.

    Returns
    -------
    TileRunReport

    Raises
    ------
    GpudeconvError
        For a bad input, output, PSF or option; for an output that exists without
        ``overwrite``; for a partial output left by an interrupted run when neither ``resume``
        nor ``overwrite`` is given; for a journal that does not match this run.
    TileRunInterrupted
        On KeyboardInterrupt (a `GpudeconvError`): the partial output and journal stay beside
        the target for ``resume=True``.

    Notes
    -----
    The output is built as ``.<name>.partial`` beside ``output_path``, with the journal
    ``.<name>.journal`` (JSON lines: this run's parameters, including the input's path, size
    and modification time and a hash of the PSF, then one line per tile written, each fsynced
    after the tile's pixels). When every tile is in, the partial file is renamed onto
    ``output_path`` and the journal removed: an output never appears half-written. The header
    is the input's (FITS) with HISTORY lines saying how the image was restored, as written
    when the run started.
    """
    input_path, target = Path(input_path), Path(output_path)
    fmt = tile_output_format(target)
    check_output_path(target, overwrite=overwrite)
    if target.exists() and input_path.exists() and os.path.samefile(input_path, target):
        msg = f"output {target} is the input file; choose another output path (inputs are kept)"
        raise GpudeconvError(msg)
    backend = get_backend(backend)
    iterations = rl._validate_iterations(iterations)
    learned = method == "learned"
    if tile is not None:
        tile = _validate_tile(tile)
        if learned and tile % 4:
            msg = f"tile must be a multiple of 4 for the learned method, got {tile}; e.g. 1024"
            raise GpudeconvError(msg)
    options = _learned_options(options) if learned else _validate_options(options)
    partial, journal_path = _partial_paths(target)
    with open_tile_reader(input_path) as reader:
        channels = reader.channels
        settings = _tile_settings(None if learned else options, channels)
        dtype = backend.float_dtype(reader.dtype)
        fields = _fields_of(psf, channels)
        if fields is None:  # checked (and normalized) before any file is made
            psf = validate_psf(
                backend.to_host(psf), channels=channels if reader.ndim == 3 else None
            )
        for field in fields or ():  # before any file is made, too
            field.check_image_shape(reader.shape)
        plan = plan_tiles(
            reader.shape,
            psf_size=_psf_size(psf),
            iterations=iterations,
            backend=backend,
            tile=tile,
            dtype=dtype,
            dering=settings.dering > 0,
        )
        if learned:
            halo = learned_halo(fields or psf, reader.shape[-2:], channels)
            plan = _cut(reader.shape, plan.tile, halo)
        journal = _resumable(partial, journal_path, resume=resume, overwrite=overwrite)
        params = _run_params(input_path, psf, iterations, backend, plan, settings)
        params["method"] = method
        if journal is not None:
            _check_resumable(journal, params, tile)
            plan = _cut(reader.shape, journal.params["tile"], plan.halo)
            writer = TileWriter(partial, **journal.params["output"])
            if partial.stat().st_size < writer.offset + writer.data_bytes:
                msg = (
                    f"the partial output {partial.name} is shorter than its journal says: run "
                    "with --overwrite (overwrite=True) to start again"
                )
                raise GpudeconvError(msg)
        else:
            _remove(partial, journal_path)
            # before the output is made: its header records them, and the journal keeps them
            # for a resumed run
            measured = _measure(
                reader.read,
                [t.core for t in plan.tiles],
                reader.shape,
                dtype,
                settings,
                unsigned=reader.dtype.kind == "u",
                stacklevel=3,
                learned=learned,
            )
            params["measured"] = measured.record()
            items = (
                _learned_history(measured, options)
                if learned
                else _history_items(settings, measured, iterations)
            )
            steps = None  # what a method without iterations ran
            if learned:
                from .learned.infer import weights_name

                steps = f"network {weights_name(options.get('weights'))}"
            header = provenance_header(
                reader.header,
                method=method,
                psf=psf_description or _describe_psf(psf),
                iterations=None if learned else iterations,  # the network has none
                steps=steps,
                backend=backend.name,
                extra={
                    "tiles": f"{plan.tile} px, halo {plan.halo} px",
                    **items,
                    **(header_extra or {}),
                },
            )
            for line in [history] if isinstance(history, str) else list(history or ()):
                header.add_history(line)
            writer = create_tile_output(partial, reader.shape, dtype, header, fmt=fmt)
            params["output"] = writer.describe()
            journal = _Journal.create(journal_path, params)
        try:
            with writer:
                report = restore_tiled(
                    reader,
                    writer,
                    psf,
                    iterations,
                    backend=backend,
                    plan=plan,
                    journal=journal,
                    progress=progress,
                    on_tile=on_tile,
                    options=options,
                    method="learned" if learned else "rl",
                )
                writer.sync()
        except OSError as error:  # a full disk, above all: the output is written as it goes
            reason = " ".join(str(error).split())
            msg = (
                f"could not read or write the tiles of {target.name} ({reason}): free space or "
                "fix permissions, then run again with --resume"
            )
            raise GpudeconvError(msg) from error
    if target.exists() and not overwrite:  # appeared while we worked
        msg = f"output {target} exists; pass --overwrite to replace it (overwrite=True in Python)"
        raise GpudeconvError(msg)
    try:
        os.replace(partial, target)
    except OSError as error:
        msg = f"could not rename {partial.name} to {target} ({error}); the result is in {partial}"
        raise GpudeconvError(msg) from error
    _fsync_folder(target.parent)
    _remove(journal_path)
    return TileRunReport(**{**report.__dict__, "output": target})


def _resumable(partial: Path, journal_path: Path, *, resume: bool, overwrite: bool):
    """The journal to continue, or None to start afresh; refuses to drop an interrupted run's
    work unless asked to."""
    leftover = partial.exists() or journal_path.exists()
    if not leftover:
        return None
    if resume:
        journal = _Journal.load(journal_path) if partial.exists() else None
        if journal is not None and "output" in journal.params:
            return journal
        return None  # nothing usable to continue: start again
    if not overwrite:
        msg = (
            f"{partial.name} is left from an interrupted run into this output: pass --resume "
            "(resume=True) to continue it or --overwrite (overwrite=True) to start again"
        )
        raise GpudeconvError(msg)
    return None
