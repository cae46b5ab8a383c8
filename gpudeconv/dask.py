"""The tile driver's work on a Dask cluster: many GPUs, or many machines.

`deconvolve_dask` runs the per-tile function of `gpudeconv.tiles` (`restore_window`) on the
blocks of a Dask array through ``dask.array.map_overlap``: each block is restored with a halo of
its neighbours' real pixels (``depth`` = the halo of `gpudeconv.tiles.halo_for`) and trimmed back
to its core. ``boundary='none'`` leaves the image's own edges unpadded, so that the restoration
pads them by reflection exactly as it pads a whole image: the result is the in-core one within
the seam tolerance that the halo gives (module docstring of `gpudeconv.tiles`). A negative image
is lifted by one pedestal per channel, from the whole array's range, as in-core.

The `richardson_lucy` options that act locally (``options=``, `gpudeconv.tiles.TILE_OPTIONS`)
are taken as by the tile driver: the noise model (``noise='auto'``) and the saturation level
(``saturation='auto'``) of each channel are measured once, on the client, from one read of the
blocks in order (`gpudeconv.tiles` module docstring, "Options"), and every block is restored
with them, so blocks agree with the in-core restoration as plain RL's do.

`run_on_cluster` does the same from a file to a file: the input is read block by block on the
workers (`gpudeconv.io.open_tile_reader`), each restored block is written in place into an
output made beside the target, which is renamed onto it when every block is in. The workers
must see the input and the output's folder at the same paths (one machine, or a shared file
system). There is no journal: an interrupted cluster run starts again.

GPUs
----
One worker per GPU, one thread each (CuPy's FFT plan cache and memory pool are per thread and
per device)::

    from dask_cuda import LocalCUDACluster
    from distributed import Client

    if __name__ == "__main__":
        with LocalCUDACluster(CUDA_VISIBLE_DEVICES="0,1") as cluster, Client(cluster):
            restored = deconvolve_dask(mosaic, psf, 30, backend="cupy").compute()

Each worker sees its GPU as device 0. ``rmm_pool_size`` reserves memory for RMM, which CuPy
uses only with ``rmm_allocator_external_lib_list=["cupy"]``: without it, leave it unset.
With ``backend="cupy"`` the blocks are moved to the GPU and back inside the per-block function,
so the Dask array stays a NumPy one and the client needs no GPU.

Command line (wired by `gpudeconv.cli`): ``--dask ADDRESS`` runs on the scheduler at ADDRESS
(``tcp://host:8786``), ``--workers N`` starts a local cluster of N worker processes; both call
`run_on_cluster`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from pathlib import Path

import numpy as np

from ._errors import GpudeconvError
from .backend import Backend, get_backend
from .psf import validate_psf
from .restore import rl

__all__ = ["deconvolve_dask", "run_on_cluster"]

_INSTALL = "pip install gpudeconv[dask]"


def _dask_array():
    """``dask.array``, imported on first use (gpudeconv does not need Dask otherwise)."""
    try:
        import dask.array
    except ImportError:
        msg = f"running on Dask needs dask[array]: {_INSTALL}"
        raise GpudeconvError(msg) from None
    return dask.array


def _distributed():
    try:
        import distributed
    except ImportError:
        msg = f"running on a Dask cluster needs dask.distributed: {_INSTALL}"
        raise GpudeconvError(msg) from None
    return distributed


def _backend_spec(backend):
    """What the per-block function gets: a name, or a NumPy backend (it pickles); a CuPy
    backend goes by name and is made again on each worker, on its own GPU (the client may have
    none)."""
    if isinstance(backend, Backend):
        return backend if backend.name == "numpy" else backend.name
    from .backend import BACKEND_NAMES

    if str(backend).strip().lower() not in BACKEND_NAMES:
        get_backend(backend)  # its one-line refusal, here rather than on every worker
    return backend


def _psf_spec(psf, channels: int, is_colour: bool, image_shape):
    """The PSF as the per-block function takes it: a validated host array, or a list of fields
    (one for all channels or one each), checked against the image."""
    from .tiles import _fields_of

    fields = _fields_of(psf, channels)
    if fields is None:
        return validate_psf(np.asarray(psf), channels=channels if is_colour else None)
    for field in fields:
        field.check_image_shape(image_shape)
    return fields


def _psf_size(psf) -> int:
    if isinstance(psf, list):
        return max(field.size for field in psf)
    return int(psf.shape[-1])


def _chunks(length: int, tile: int, depth: int) -> tuple[int, ...]:
    """Blocks of ``tile`` over ``length``, none shorter than ``depth`` (unless only one)."""
    return _chunks_of(
        (tile,) * (length // tile) + ((length % tile,) if length % tile else ()), depth
    )


def _chunks_of(chunks, depth: int) -> tuple[int, ...]:
    """``chunks`` with every block shorter than ``depth`` merged into its neighbour."""
    merged: list[int] = []
    for size in chunks:
        if merged and (merged[-1] < depth or size < depth):
            merged[-1] += size
        else:
            merged.append(int(size))
    return tuple(merged)


def _restore_block(
    block,
    *,
    psf,
    iterations: int,
    backend,
    pedestals,
    colour: int,
    depths,
    starts,
    settings=None,
    block_info=None,
):
    """Restore one overlapped block (map_overlap trims it after): ``block`` is ``(C, h, w)``
    for a colour image (``colour`` channels), ``(h, w)`` otherwise."""
    from .tiles import _window_operators, restore_window

    backend = get_backend(backend)
    location = block_info[0]["chunk-location"][-2:]
    # the block's first pixel in the image: its core's start less the overlap before it
    # (none at the image's edges, with boundary='none')
    y0, x0 = (
        start[index] - (depth if index else 0)
        for start, index, depth in zip(starts, location, depths, strict=True)
    )
    planes = block if colour else block[None]
    dtype = backend.float_dtype(block.dtype)
    shape = planes.shape[-2:]
    operators = _window_operators(psf, y0, x0, shape, colour, backend)
    restored = restore_window(
        backend.asarray(planes, dtype=dtype),
        operators,
        iterations,
        pedestals=pedestals,
        core=(slice(None), slice(None)),
        backend=backend,
        settings=settings,
    )
    restored = backend.to_host(restored)
    return restored if colour else restored[0]


def deconvolve_dask(
    array,
    psf,
    iterations: int,
    *,
    halo: int | None = None,
    backend: str | Backend = "numpy",
    tile: int | None = None,
    options: dict | None = None,
):
    """Richardson-Lucy on a Dask array, block by block with halos (``map_overlap``).

    Parameters
    ----------
    array : (H, W) or (C, H, W) dask or NumPy array
        The image; a NumPy array is cut into ``tile x tile`` blocks. The blocks are the tiles'
        cores: colour blocks hold every channel (the channel axis is made one chunk).
    psf : (k, k) or (C, k, k) array_like, or PSFField (or one per channel)
        As for `richardson_lucy`; a field is made for the whole image.
    iterations : int
    halo : int, optional
        Overlap of the blocks, in pixels; by default `gpudeconv.tiles.halo_for` of the PSF
        size and the iterations.
    backend : {'numpy', 'cupy', 'auto'} or Backend
        Where each block is restored, on its worker ('cupy': the worker's GPU).
    tile : int, optional
        Rechunk to ``tile x tile`` blocks; by default a dask array keeps its chunks and a NumPy
        array gets `plan_tiles`' tile for the backend.
    options : dict, optional
        `richardson_lucy`'s options that tiles take (`gpudeconv.tiles.restore_tiled`):
        ``noise``, ``background``, ``read_noise``, ``gain``, ``regularization``,
        ``damping``, ``dering``, ``saturation``; the others are refused in one line.

    Returns
    -------
    dask.array.Array
        float32 (float64 for float64 input), the image's shape and chunks; nothing is computed
        yet, except one pass over the blocks on this machine when the image may be negative
        (for the pedestals) or the options need the whole image's noise model or saturation
        level.

    Raises
    ------
    GpudeconvError
        Without Dask (``pip install gpudeconv[dask]``), or for bad input or options.
    """
    return _map_blocks(
        array, psf, iterations, halo=halo, backend=backend, tile=tile, options=options
    )[0]


def _map_blocks(array, psf, iterations, *, halo, backend, tile, options, stacklevel=4):
    """`deconvolve_dask`'s work: ``(restored, settings, measured)``, the settings of the
    options and what was measured on the whole image (`gpudeconv.tiles._Measured`)."""
    da = _dask_array()
    from .tiles import _measure, _tile_settings, _validate_tile, halo_for, plan_tiles

    iterations = rl._validate_iterations(iterations)
    rl._validate_image(array)
    is_colour = array.ndim == 3
    channels = array.shape[0] if is_colour else 1
    settings = _tile_settings(options, channels)
    dering = settings.dering > 0
    host_psf = _psf_spec(psf, channels, is_colour, array.shape[-2:])
    if halo is None:
        halo = halo_for(_psf_size(host_psf), iterations, dering=dering)
    halo = int(halo)
    if halo < 0:
        msg = f"halo must be a non-negative number of pixels, got {halo}"
        raise GpudeconvError(msg)
    if tile is not None:
        tile = _validate_tile(tile)
    elif not isinstance(array, da.Array):
        tile = plan_tiles(
            array.shape,
            psf_size=_psf_size(host_psf),
            iterations=iterations,
            backend=backend,
            dering=dering,
        ).tile
    image = array if isinstance(array, da.Array) else da.from_array(array, chunks=-1)
    # map_overlap needs blocks at least as deep as the halo (else it rechunks on its own, and
    # the blocks' positions would not be ours): a short last block joins the one before it
    rows, cols = (
        _chunks(length, tile, halo) if tile is not None else _chunks_of(chunks, halo)
        for length, chunks in zip(image.shape[-2:], image.chunks[-2:], strict=True)
    )
    image = image.rechunk(((channels,),) * is_colour + (rows, cols))
    dtype = Backend.float_dtype(image.dtype)

    starts = tuple(
        tuple(int(start) for start in np.cumsum((0, *chunks[:-1]))) for chunks in (rows, cols)
    )
    cores = [
        (y0, y0 + h, x0, x0 + w)
        for y0, h in zip(starts[0], rows, strict=True)
        for x0, w in zip(starts[1], cols, strict=True)
    ]

    def read(core):
        y0, y1, x0, x1 = core
        block = image[..., y0:y1, x0:x1]
        # one reader, read in order here: threads sharing a FITS or zarr handle could race
        block = np.asarray(block.compute(scheduler="synchronous"))
        return block if is_colour else block[None]

    measured = _measure(
        read,
        cores,
        image.shape,
        dtype,
        settings,
        unsigned=image.dtype.kind == "u",
        stacklevel=stacklevel,
    )
    pedestals = list(measured.pedestals)
    lifted = image.astype(dtype)
    if any(pedestals):
        shift = np.asarray(pedestals, dtype=dtype)
        lifted = lifted + (shift[:, None, None] if is_colour else shift[0])

    # no overlap along an axis of one block: it has no neighbour
    depths = tuple(halo if len(chunks) > 1 else 0 for chunks in (rows, cols))
    function = functools.partial(
        _restore_block,
        psf=host_psf,
        iterations=iterations,
        backend=_backend_spec(backend),
        pedestals=pedestals,
        colour=channels if is_colour else 0,
        depths=depths,
        starts=starts,
        settings=measured.channel_settings(settings),
    )
    depth = dict(enumerate((0,) * is_colour + depths))
    restored = lifted.map_overlap(
        function,
        depth=depth,
        boundary="none",
        trim=True,
        allow_rechunk=False,
        dtype=dtype,
        meta=np.empty((0,) * lifted.ndim, dtype=dtype),
    )
    return restored, settings, measured


def run_on_cluster(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    psf,
    iterations: int,
    *,
    address: str | None = None,
    workers: int | None = None,
    backend: str | Backend = "numpy",
    tile: int | None = None,
    overwrite: bool = False,
    history=None,
    header_extra: dict | None = None,
    psf_description: str | None = None,
    options: dict | None = None,
    method: str = "rl",
):
    """Restore an image file into another on a Dask cluster, block by block.

    Parameters
    ----------
    input_path, output_path : str or path-like
        As for `gpudeconv.tiles.deconvolve_file`; the workers must see both at these paths.
    psf, iterations
        As for `gpudeconv.tiles.deconvolve_file`.
    address : str, optional
        The scheduler's address (``tcp://host:8786``). By default a local cluster of worker
        processes (``distributed.LocalCluster``, one thread each) is started and stopped.
    workers : int, optional
        Worker processes of the local cluster (by default one per core).
    backend : {'numpy', 'cupy', 'auto'} or Backend
        Where the workers compute ('cupy' for dask-cuda workers).
    tile : int, optional
        Block side; by default `gpudeconv.tiles.plan_tiles`' tile for the backend's memory on
        this machine (give one when this machine lacks the workers' GPU).
    overwrite : bool
    history, header_extra, psf_description
        Header provenance, as for `gpudeconv.tiles.deconvolve_file`.
    options : dict, optional
        `richardson_lucy`'s options that tiles take, as for `deconvolve_dask`; recorded in
        the HISTORY with each channel's noise model and saturation level.
    method : str
        The method's name in the HISTORY (e.g. ``'rl-tv'``).

    Returns
    -------
    gpudeconv.tiles.TileRunReport
        ``tiles_done`` counts the blocks.
    """
    da = _dask_array()
    distributed = _distributed()
    from .io import (
        check_output_path,
        create_tile_output,
        open_tile_reader,
        provenance_header,
        tile_output_format,
    )
    from .tiles import (
        TileRunReport,
        _describe_psf,
        _fsync_folder,
        _history_items,
        _options_record,
        _partial_paths,
        _remove,
        _tile_settings,
        _validate_options,
        plan_tiles,
    )

    input_path, target = Path(input_path), Path(output_path)
    fmt = tile_output_format(target)
    check_output_path(target, overwrite=overwrite)
    name = backend.name if isinstance(backend, Backend) else str(backend)
    iterations = rl._validate_iterations(iterations)
    options = _validate_options(options)
    reader = open_tile_reader(input_path)
    reader.close()  # the workers open their own
    channels = reader.channels
    dering = _tile_settings(options, channels).dering > 0
    host_psf = _psf_spec(psf, channels, reader.ndim == 3, reader.shape[-2:])
    plan = plan_tiles(  # without a tile, from the memory of this machine's backend
        reader.shape,
        psf_size=_psf_size(host_psf),
        iterations=iterations,
        backend=backend if tile is None else "numpy",
        tile=tile,
        dering=dering,
    )
    chunks = ((-1,) if reader.ndim == 3 else ()) + (plan.tile, plan.tile)
    stat = input_path.stat()
    token = f"gpudeconv-read-{input_path.resolve()}-{stat.st_size}-{stat.st_mtime_ns}"
    meta = np.empty((0,) * reader.ndim, dtype=reader.dtype)
    image = da.from_array(reader, chunks=chunks, name=token, lock=False, asarray=False, meta=meta)
    partial, journal = _partial_paths(target)
    if journal.exists() and not overwrite:  # before the image is read for its statistics
        msg = (
            f"{target} has an interrupted tiled run to continue ({journal.name}): run again "
            "without Dask and with --resume, or pass --overwrite to start afresh"
        )
        raise GpudeconvError(msg)
    restored, settings, measured = _map_blocks(
        image,
        psf if isinstance(host_psf, list) else host_psf,  # validated once, warned once
        iterations,
        halo=plan.halo,
        backend=backend,
        tile=None,
        options=options,
    )
    header = provenance_header(
        reader.header,
        method=method,
        psf=psf_description or _describe_psf(psf),
        iterations=iterations,
        backend=name,
        extra={
            "tiles": f"{plan.tile} px, halo {plan.halo} px, on Dask",
            **_history_items(settings, measured, iterations),
            **(header_extra or {}),
        },
    )
    for line in [history] if isinstance(history, str) else list(history or ()):
        header.add_history(line)
    _remove(partial, journal)
    writer = create_tile_output(partial, reader.shape, restored.dtype, header, fmt=fmt)
    started = time.perf_counter()
    try:
        with contextlib.ExitStack() as stack:
            if address is None:
                cluster = stack.enter_context(
                    distributed.LocalCluster(
                        n_workers=workers,
                        threads_per_worker=1,
                        processes=True,
                        dashboard_address=":0",  # any free port: 8787 may be taken
                    )
                )
            try:
                client = distributed.Client(address if address is not None else cluster)
            except OSError as error:  # no scheduler there, refused, timed out
                msg = (
                    f"could not reach the Dask scheduler at {address} ({error}): check the "
                    "address (tcp://host:8786) and that the scheduler is running"
                )
                raise GpudeconvError(msg) from error
            stack.enter_context(client)
            da.store(restored, writer, lock=False, compute=True)
    except BaseException:
        _remove(partial)
        raise
    seconds = time.perf_counter() - started
    os.replace(partial, target)
    _fsync_folder(target.parent)
    blocks = int(np.prod(restored.numblocks))
    pixels = int(np.prod(reader.shape))
    return TileRunReport(
        output=target,
        shape=tuple(reader.shape),
        tile=plan.tile,
        halo=plan.halo,
        iterations=iterations,
        backend=name,
        tiles_total=blocks,
        tiles_done=blocks,
        tiles_skipped=0,
        tiles_resumed=0,
        seconds=seconds,
        mpix_it_per_s=pixels * iterations / seconds / 1e6 if seconds > 0 else 0.0,
        options=_options_record(settings),
        noise=measured.noise,
        saturation=measured.saturation,
    )
