"""The tile planner and the streaming driver (gpudeconv/tiles.py) and its file I/O (io.py).

Every restoration here is compared with the in-core ``richardson_lucy`` of the whole image. The
CPU backend runs FFTW on one thread: on a machine shared with other test runs, two FFTW threads
waiting for a busy core were 15x slower (bench/README.md), and the tiles' results do not depend
on the thread count.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import scipy.fft
import tifffile
from astropy.io import fits
from helpers import star_field

import gpudeconv as gd
from gpudeconv import GpudeconvError, GpudeconvWarning, tiles
from gpudeconv.backend._numpy import NumPyBackend
from gpudeconv.io import (
    ArrayTileReader,
    ArrayTileWriter,
    TileWriter,
    create_tile_output,
    open_tile_reader,
)

PSF = gd.psf.moffat(3.5)  # 25 x 25


@pytest.fixture(scope="module")
def cpu():
    return NumPyBackend(workers=1)


def image_range(image) -> float:
    return float(np.nanmax(image) - np.nanmin(image))


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def nan_wedge(image: np.ndarray) -> np.ndarray:
    """``image`` with a NaN wedge in its top-left corner (a mosaic's unobserved border)."""
    height, width = image.shape[-2:]
    rows, cols = np.mgrid[:height, :width]
    wedge = rows + cols * (height / width) < 0.35 * height
    out = image.copy()
    out[..., wedge] = np.nan
    return out


def write_fits(path, data, **cards):
    hdu = fits.PrimaryHDU(data)
    for key, value in cards.items():
        hdu.header[key] = value
    hdu.writeto(path)
    return path


def leftovers(folder, *keep) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name not in keep)


# ------------------------------------------------------------------------------ planning


@pytest.mark.parametrize(
    ("shape", "tile", "halo_iterations"),
    [((1000, 1537), 256, 20), ((3, 300, 410), 128, 2), ((90, 70), 256, 20)],
)
def test_the_cores_cover_the_image_once_and_windows_share_one_shape(shape, tile, halo_iterations):
    plan = tiles.plan_tiles(shape, psf_size=25, iterations=halo_iterations, tile=tile)
    height, width = shape[-2:]
    assert plan.halo == tiles.halo_for(25, halo_iterations)
    covered = np.zeros((height, width), dtype=int)
    for t in plan.tiles:
        y0, y1, x0, x1 = t.core
        covered[y0:y1, x0:x1] += 1
        assert y1 - y0 <= tile and x1 - x0 <= tile
        ry0, ry1, rx0, rx1 = t.read
        assert t.read_shape == plan.read_shape
        # the halo around the core is inside the window, unless the image ends first
        assert ry0 <= max(y0 - plan.halo, 0) and ry1 >= min(y1 + plan.halo, height)
        assert rx0 <= max(x0 - plan.halo, 0) and rx1 >= min(x1 + plan.halo, width)
        assert 0 <= ry0 and ry1 <= height and 0 <= rx0 and rx1 <= width
    np.testing.assert_array_equal(covered, 1)
    assert plan.grid[0] * plan.grid[1] == len(plan)
    assert plan.channels == (shape[0] if len(shape) == 3 else 1)


def test_the_halo_rule():
    # min(2 * iterations * r, 2 * k): the exact cone for few iterations, two PSF sides after
    assert tiles.halo_for(25, 1) == 24
    assert tiles.halo_for(25, 20) == 50
    assert tiles.halo_for(11, 100) == 22
    assert tiles.halo_for(57, 50) == 114


class BudgetBackend(NumPyBackend):
    """The CPU backend with a chosen amount of free memory."""

    def __init__(self, free: int, kind: str = "host"):
        super().__init__(workers=1)
        self._free, self._kind = free, kind

    def memory_info(self):
        return gd.backend.MemoryInfo(free=self._free, total=self._free, kind=self._kind)


def test_the_tile_follows_the_memory_budget():
    def planned(free, shape=(40000, 40000), kind="host"):
        backend = BudgetBackend(free, kind)
        return tiles.plan_tiles(shape, psf_size=25, iterations=30, backend=backend).tile

    def working_set(tile, channels=1):
        planes = tiles.WORKING_SET_PLANES + tiles.CHANNEL_PLANES * channels
        return planes * (tile + 2 * 50 + 4 * 12) ** 2 * 4

    assert planned(1 << 40) == 4096  # the CPU's cap
    assert planned(1 << 40, kind="device") == 8192
    tile = planned(2 * working_set(1024) + 1)  # half the free memory is the budget
    assert tile == 1024
    assert tiles.plan_tiles(
        (3, 40000, 40000), psf_size=25, iterations=30, backend=BudgetBackend(1 << 31)
    ).tile < planned(1 << 31)  # colour holds more per tile
    assert planned(1 << 20) == tiles.MIN_TILE
    assert planned(1 << 40, shape=(3000, 2000)) == 3000  # one tile: the whole image
    plan = tiles.plan_tiles(
        (3000, 2000), psf_size=25, iterations=30, backend=BudgetBackend(1 << 40)
    )
    assert len(plan) == 1 and plan.tiles[0].read == (0, 3000, 0, 2000)


@pytest.mark.parametrize("tile", [0, 8, 12.5, True, "512"])
def test_a_bad_tile_is_refused(tile):
    with pytest.raises(GpudeconvError, match="tile must be an integer side of at least 16"):
        tiles.plan_tiles((100, 100), psf_size=5, iterations=3, tile=tile)


# ------------------------------------------------------------------------------ seams


def test_tiles_of_256_match_the_whole_image(cpu, tmp_path):
    image = star_field((1024, 1536), seed=1, n_stars=900)
    whole = gd.richardson_lucy(image, PSF, 20, backend=cpu)
    plan = tiles.plan_tiles(image.shape, psf_size=25, iterations=20, tile=256)
    assert len(plan) == 24 and plan.halo == 50
    writer = create_tile_output(tmp_path / "out.fits", image.shape, np.float32, fmt="FITS")
    with writer:
        report = tiles.restore_tiled(
            ArrayTileReader(image), writer, PSF, 20, backend=cpu, plan=plan, progress=False
        )
    assert (report.tiles_total, report.tiles_done, report.tiles_skipped) == (24, 24, 0)
    tiled = fits.getdata(tmp_path / "out.fits")
    difference = np.abs(tiled - whole).max() / image_range(image)
    # measured 8.5e-6 (float32 rounding: the tiles are scaled and transformed at other sizes)
    assert difference <= 1e-3
    assert np.abs(whole - image).max() > 0.1 * image_range(image)  # it did sharpen


def test_a_pedestal_is_taken_over_the_whole_image(cpu, tmp_path):
    # sky-subtracted data: negative values. One pedestal per tile would lift each tile by a
    # different amount and leave seams; the driver lifts every tile by the whole image's.
    image = star_field((200, 260), seed=3, n_stars=80) - 60
    with pytest.warns(GpudeconvWarning, match="negative values"):
        whole = gd.richardson_lucy(image, PSF, 8, backend=cpu)
    plan = tiles.plan_tiles(image.shape, psf_size=25, iterations=8, tile=64)
    writer = create_tile_output(tmp_path / "out.fits", image.shape, np.float32, fmt="FITS")
    with writer, pytest.warns(GpudeconvWarning, match="pedestal of"):
        tiles.restore_tiled(ArrayTileReader(image), writer, PSF, 8, backend=cpu, plan=plan)
    tiled = fits.getdata(tmp_path / "out.fits")
    assert np.abs(tiled - whole).max() <= 1e-4 * image_range(image)


def test_a_psf_field_restores_each_tile_with_its_window(cpu, tmp_path):
    image = star_field((180, 240), seed=4, n_stars=60)
    field = gd.psf.aberrated_field(image.shape, (3, 4), fwhm_centre=2.5, fwhm_corner=4.5)
    whole = gd.richardson_lucy(image, field, 6, backend=cpu)
    path = write_fits(tmp_path / "in.fits", image)
    tiles.deconvolve_file(
        path, tmp_path / "out.fits", field, 6, backend=cpu, tile=64, progress=False
    )
    tiled = fits.getdata(tmp_path / "out.fits")
    assert np.abs(tiled - whole).max() <= 1e-4 * image_range(image)


def test_deconvolve_tiled_streams_a_file_or_an_array_into_an_array(cpu, tmp_path):
    image = star_field((230, 260), seed=17, n_stars=60)
    whole = gd.richardson_lucy(image, PSF, 5, backend=cpu)
    path = write_fits(tmp_path / "in.fits", image)
    from_file = tiles.deconvolve_tiled(path, PSF, 5, backend=cpu, tile=96)
    out = np.lib.format.open_memmap(
        tmp_path / "out.npy", mode="w+", dtype=np.float32, shape=image.shape
    )
    from_array = tiles.deconvolve_tiled(image, PSF, 5, backend=cpu, tile=96, out=out)
    assert from_array is out and from_file.dtype == np.float32
    for result in (from_file, np.load(tmp_path / "out.npy")):
        assert np.abs(result - whole).max() <= 1e-4 * image_range(image)
    with pytest.raises(GpudeconvError, match="out must be a C-contiguous array"):
        tiles.deconvolve_tiled(image, PSF, 5, backend=cpu, out=np.empty((10, 10), np.float32))


# ------------------------------------------------------------------------------ files


def test_fits_in_fits_out(cpu, tmp_path):
    image = nan_wedge(star_field((300, 410), seed=2, n_stars=120))
    path = write_fits(tmp_path / "mosaic.fits", image, OBJECT="M 31", EXPTIME=(600.0, "s"))
    before = sha256(path)
    whole = gd.richardson_lucy(image, PSF, 6, backend=cpu)
    report = tiles.deconvolve_file(
        path,
        tmp_path / "sharp.fits",
        PSF,
        6,
        backend=cpu,
        tile=128,
        progress=False,
        history="PSF measured from 40 stars",
        psf_description="Moffat fwhm=3.5 beta=2.5 size=25",
    )
    assert report.output == tmp_path / "sharp.fits" and report.tiles_total == 12
    assert report.tiles_done + report.tiles_skipped == 12 and report.mpix_it_per_s > 0
    assert sha256(path) == before  # the input is read-only to us
    assert leftovers(tmp_path) == ["mosaic.fits", "sharp.fits"]  # no partial, no journal

    data, header = gd.read_image(tmp_path / "sharp.fits")
    assert data.dtype == np.float32 and data.shape == image.shape
    assert header["OBJECT"] == "M 31" and header["EXPTIME"] == 600.0
    history = " ".join(header["HISTORY"])
    assert "rl, 6 iterations, backend numpy" in history
    assert "Moffat fwhm=3.5" in history and "PSF measured from 40 stars" in history
    assert "128 px, halo" in history
    wedge = np.isnan(image)
    np.testing.assert_array_equal(np.isnan(data), wedge)  # NaN kept, none inside
    # next to the wedge too (no-data pixels start from the data near them, as in the whole
    # image): measured 4.5e-6 of the range (4.7e-5 when each tile started them from its mean)
    assert np.abs(data[~wedge] - whole[~wedge]).max() <= 1e-4 * image_range(image)


def test_scaled_integer_fits_is_read_in_physical_units(cpu, tmp_path):
    image = np.clip(star_field((150, 170), seed=6, n_stars=40), 0, 65000).astype(np.uint16)
    path = tmp_path / "raw.fits"
    fits.PrimaryHDU(image).writeto(path)  # uint16: BITPIX 16 with BZERO 32768
    assert fits.getheader(path)["BZERO"] == 32768
    expected = gd.richardson_lucy(image, PSF, 4, backend=cpu)
    tiles.deconvolve_file(path, tmp_path / "out.fits", PSF, 4, backend=cpu, tile=64, progress=False)
    result = fits.getdata(tmp_path / "out.fits")
    assert np.abs(result - expected).max() <= 1e-4 * image_range(expected)


def test_tiff_in_tiff_out(cpu, tmp_path):
    image = star_field((200, 230), seed=7, n_stars=60)
    tifffile.imwrite(tmp_path / "in.tif", image, photometric="minisblack")
    whole = gd.richardson_lucy(image, PSF, 5, backend=cpu)
    tiles.deconvolve_file(
        tmp_path / "in.tif", tmp_path / "out.tif", PSF, 5, backend=cpu, tile=96, progress=False
    )
    data, header = gd.read_image(tmp_path / "out.tif")
    assert header["ORIGFMT"] == "TIFF" and data.dtype == np.float32
    assert np.abs(data - whole).max() <= 1e-4 * image_range(image)
    assert "5 iterations" in tifffile.TiffFile(tmp_path / "out.tif").pages[0].description


@pytest.mark.parametrize("fmt", ["fits", "tif"])
def test_a_colour_cube_tiles_with_all_its_channels(cpu, tmp_path, fmt, monkeypatch):
    base = star_field((160, 190), seed=8, n_stars=50)
    cube = np.stack([base, 0.6 * base + 5, nan_wedge(base)])  # RGB, the last with a wedge
    if fmt == "fits":
        write_fits(tmp_path / "in.fits", cube)
    else:  # RGB TIFF: samples interleaved in each pixel, in and out
        tifffile.imwrite(tmp_path / "in.tif", np.moveaxis(cube, 0, -1), photometric="rgb")
    whole = gd.richardson_lucy(cube, PSF, 5, backend=cpu)
    reads = []

    def recording(path):
        reader = open_tile_reader(path)
        read = reader.read
        reader.read = lambda window: reads.append(read(window)) or reads[-1]
        return reader

    monkeypatch.setattr(tiles, "open_tile_reader", recording)
    source, target = tmp_path / f"in.{fmt}", tmp_path / f"out.{fmt}"
    tiles.deconvolve_file(source, target, PSF, 5, backend=cpu, tile=64, progress=False)
    assert all(block.shape[0] == 3 for block in reads)  # every read holds every channel
    data, _ = gd.read_image(tmp_path / f"out.{fmt}")
    assert data.shape == cube.shape
    np.testing.assert_array_equal(np.isnan(data), np.isnan(cube))
    valid = ~np.isnan(cube)
    assert np.abs(data[valid] - whole[valid]).max() <= 1e-4 * image_range(cube)  # 1.9e-6


def test_compressed_tiff_needs_zarr(cpu, tmp_path, monkeypatch):
    image = star_field((120, 150), seed=9, n_stars=30)
    tifffile.imwrite(tmp_path / "in.tif", image, compression="zlib", tile=(32, 32))
    monkeypatch.setitem(sys.modules, "zarr", None)  # as if not installed
    with pytest.raises(GpudeconvError, match=r"compressed or tiled TIFF.*pip install zarr"):
        open_tile_reader(tmp_path / "in.tif")
    monkeypatch.undo()
    pytest.importorskip("zarr")
    with open_tile_reader(tmp_path / "in.tif") as reader:
        np.testing.assert_array_equal(reader.read((10, 70, 33, 101))[0], image[10:70, 33:101])


def test_windows_read_back_what_tifffile_and_astropy_read(tmp_path):
    cube = np.random.default_rng(0).normal(size=(4, 50, 60)).astype(np.float32)
    tifffile.imwrite(
        tmp_path / "planar.tif", cube, photometric="minisblack", planarconfig="separate"
    )
    write_fits(tmp_path / "cube.fits", cube[None])  # a leading axis of 1, squeezed as read_image
    for name in ("planar.tif", "cube.fits"):
        with open_tile_reader(tmp_path / name) as reader:
            assert reader.shape == (4, 50, 60) and reader.dtype == np.float32
            np.testing.assert_array_equal(reader.read((7, 31, 12, 59)), cube[:, 7:31, 12:59])
            np.testing.assert_array_equal(reader[1:3, 5:9, :], cube[1:3, 5:9, :])


def test_tiles_without_data_are_skipped(cpu, tmp_path):
    image = star_field((384, 384), seed=10, n_stars=40)
    image[:240, :240] = np.nan  # the first tile's core and halo (128 + 50) hold no data
    path = write_fits(tmp_path / "in.fits", image)
    report = tiles.deconvolve_file(path, tmp_path / "out.fits", PSF, 3, backend=cpu, tile=128)
    assert (report.tiles_done, report.tiles_skipped) == (8, 1)
    data = fits.getdata(tmp_path / "out.fits")
    np.testing.assert_array_equal(np.isnan(data), np.isnan(image))
    # windows mostly no-data restore as the whole image does: measured 9e-7 of the range
    whole = gd.richardson_lucy(image, PSF, 3, backend=cpu)
    valid = ~np.isnan(image)
    assert np.abs(data[valid] - whole[valid]).max() <= 1e-4 * image_range(image)


@pytest.mark.parametrize(
    ("method", "shape", "options"),
    [
        ("rl", (200, 200), None),
        ("rl", (200, 200), {"noise": "auto"}),
        ("rl", (3, 150, 160), None),
        ("learned", (200, 200), None),
        ("learned", (3, 150, 160), None),
    ],
)
def test_an_image_without_data_is_refused_before_any_file(cpu, tmp_path, method, shape, options):
    image = np.full(shape, np.nan, np.float32)
    image[(0,) * (len(shape) - 2) + (7, 9)] = np.inf
    path = write_fits(tmp_path / "in.fits", image)
    run = dict(backend=cpu, tile=64, progress=False, method=method, options=options)
    with pytest.raises(GpudeconvError, match=r"^the image holds no data \(every pixel is NaN"):
        tiles.deconvolve_file(path, tmp_path / "out.fits", PSF, 3, **run)
    assert leftovers(tmp_path) == ["in.fits"]
    with pytest.raises(GpudeconvError, match="holds no data"):
        tiles.deconvolve_tiled(image, PSF, 3, backend=cpu, tile=64, progress=False)


@pytest.mark.parametrize("iterations", [1, 2])
def test_tiles_match_the_whole_image_next_to_no_data(cpu, iterations):
    # A no-data pixel starts from the data within the PSF radius + 1 of it (rl._nodata_start),
    # in a tile as in the whole image: tiles of 64 cut through the wedge agree with it there
    # as far from it, from one iteration on, whose halo (2 r) is the shortest. Measured: 1.9e-6
    # and 1e-6 of the range (2.1e-3 and 3.1e-4 when each tile started them from its mean).
    image = nan_wedge(star_field((300, 410), seed=2, n_stars=120))
    plan = tiles.plan_tiles(image.shape, psf_size=25, iterations=iterations, tile=64)
    assert plan.halo == 24 * iterations
    tiled = np.empty(image.shape, np.float32)
    tiles.restore_tiled(
        ArrayTileReader(image),
        ArrayTileWriter(tiled),
        PSF,
        iterations,
        backend=cpu,
        plan=plan,
        progress=False,
    )
    whole = gd.richardson_lucy(image, PSF, iterations, backend=cpu)
    np.testing.assert_array_equal(np.isnan(tiled), np.isnan(image))
    assert np.nanmax(np.abs(tiled - whole)) <= 1e-4 * image_range(image)


@pytest.mark.parametrize(
    ("name", "match"),
    [("out.png", "written in place"), ("out.fits.gz", "written in place"), ("in.fits", "exists")],
)
def test_outputs_that_cannot_be_streamed_are_refused(cpu, tmp_path, name, match):
    path = write_fits(tmp_path / "in.fits", star_field((40, 40), n_stars=5))
    with pytest.raises(GpudeconvError, match=match):
        tiles.deconvolve_file(path, tmp_path / name, PSF, 2, backend=cpu)


# ------------------------------------------------------------------------------ resume


def stop_after(count):
    def on_tile(done, tile):
        if done == count:
            raise KeyboardInterrupt

    return on_tile


def test_an_interrupted_run_resumes_to_the_same_bytes(cpu, tmp_path):
    image = nan_wedge(star_field((260, 300), seed=11, n_stars=80))
    path = write_fits(tmp_path / "in.fits", image, OBJECT="NGC 7000")
    out = tmp_path / "sharp.fits"
    run = dict(backend=cpu, tile=96, progress=False)

    with pytest.raises(
        tiles.TileRunInterrupted,
        match=r"^interrupted after 4 of 12 tiles; run again with --resume to continue$",
    ):
        tiles.deconvolve_file(path, out, PSF, 5, on_tile=stop_after(4), **run)
    assert not out.exists()
    partial, journal = tmp_path / ".sharp.fits.partial", tmp_path / ".sharp.fits.journal"
    assert partial.exists() and journal.exists()
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    assert lines[0]["iterations"] == 5 and sum("core" in line for line in lines) == 4

    with pytest.raises(GpudeconvError, match="--resume.*--overwrite"):
        tiles.deconvolve_file(path, out, PSF, 5, **run)  # neither: refused, nothing lost
    assert partial.exists()

    report = tiles.deconvolve_file(path, out, PSF, 5, resume=True, **run)
    assert (report.tiles_resumed, report.tiles_done + report.tiles_skipped) == (4, 8)
    assert leftovers(tmp_path) == ["in.fits", "sharp.fits"]

    tiles.deconvolve_file(path, tmp_path / "straight.fits", PSF, 5, **run)
    assert sha256(out) == sha256(tmp_path / "straight.fits")


def test_a_resumed_run_transforms_at_the_lengths_of_the_run_it_continues(
    cpu, tmp_path, monkeypatch
):
    # Above 512 points the CPU backend times a few FFT lengths once per process, and another
    # process may pick another (which rounds differently): the journal pins them.
    from gpudeconv.backend import _numpy

    image = star_field((700, 700), seed=16, n_stars=100)
    path = write_fits(tmp_path / "in.fits", image)
    run = dict(backend=cpu, tile=512, progress=False)
    tiles.deconvolve_file(path, tmp_path / "straight.fits", PSF, 3, **run)
    with pytest.raises(tiles.TileRunInterrupted):
        tiles.deconvolve_file(path, tmp_path / "out.fits", PSF, 3, on_tile=stop_after(2), **run)
    journal = (tmp_path / ".out.fits.journal").read_text().splitlines()
    lengths = next(json.loads(line)["fft_lengths"] for line in journal if "fft_lengths" in line)
    assert "672" in lengths  # 612-pixel windows + 5 PSF radii

    measured = _numpy._measured_fast_length  # "another process": other lengths win the timing
    monkeypatch.setattr(_numpy, "_chosen_lengths", {})
    monkeypatch.setattr(
        _numpy, "_measured_fast_length", lambda n: scipy.fft.next_fast_len(measured(n) + 1)
    )
    tiles.deconvolve_file(path, tmp_path / "other.fits", PSF, 3, **run)
    assert sha256(tmp_path / "other.fits") != sha256(tmp_path / "straight.fits")
    tiles.deconvolve_file(path, tmp_path / "out.fits", PSF, 3, resume=True, **run)
    assert sha256(tmp_path / "out.fits") == sha256(tmp_path / "straight.fits")


def test_resuming_with_a_changed_input_or_psf_is_refused(cpu, tmp_path):
    image = star_field((200, 200), seed=12, n_stars=50)
    path = write_fits(tmp_path / "in.fits", image)
    out = tmp_path / "out.fits"
    run = dict(backend=cpu, tile=64, progress=False)
    with pytest.raises(tiles.TileRunInterrupted):
        tiles.deconvolve_file(path, out, PSF, 4, on_tile=stop_after(2), **run)

    with pytest.raises(
        GpudeconvError,
        match=r"^cannot resume .*: it was written with a different PSF; run with --overwrite",
    ):
        tiles.deconvolve_file(path, out, gd.psf.moffat(3.0, size=25), 4, resume=True, **run)
    with pytest.raises(GpudeconvError, match="with a different number of iterations;"):
        tiles.deconvolve_file(path, out, PSF, 5, resume=True, **run)
    other = gd.psf.moffat(3.0, size=25)
    with pytest.raises(
        GpudeconvError,
        match=r"with a different PSF, a different number of iterations and a different tile size;",
    ):
        tiles.deconvolve_file(path, out, other, 5, resume=True, **{**run, "tile": 100})
    with pytest.raises(GpudeconvError, match="with a different tile size;"):
        tiles.deconvolve_file(path, out, PSF, 4, resume=True, **{**run, "tile": 100})
    image[5, 5] += 1
    os.remove(path)
    write_fits(path, image)
    with pytest.raises(GpudeconvError, match=r"with a different input file \(changed") as caught:
        tiles.deconvolve_file(path, out, PSF, 4, resume=True, **run)
    assert "\n" not in str(caught.value)

    report = tiles.deconvolve_file(path, out, PSF, 4, overwrite=True, **run)
    assert report.tiles_resumed == 0 and out.exists()


def test_out_of_memory_halves_the_tile(cpu, tmp_path, monkeypatch):
    image = star_field((256, 320), seed=13, n_stars=60)
    whole = gd.richardson_lucy(image, PSF, 4, backend=cpu)
    restore = tiles.restore_window

    def small_only(planes, *args, **kwargs):
        if planes.shape[-1] > 200:
            raise MemoryError("out of memory allocating 1.2 GiB")
        return restore(planes, *args, **kwargs)

    monkeypatch.setattr(tiles, "restore_window", small_only)
    path = write_fits(tmp_path / "in.fits", image)
    with pytest.warns(GpudeconvWarning, match="with tiles of 160 pixels; going on with 80-pixel"):
        report = tiles.deconvolve_file(path, tmp_path / "out.fits", PSF, 4, backend=cpu, tile=160)
    assert report.tile == 80 and report.tiles_total == 16
    result = fits.getdata(tmp_path / "out.fits")
    assert np.abs(result - whole).max() <= 1e-4 * image_range(image)


# ------------------------------------------------------------------------------ memory


@pytest.mark.parametrize("options", [None, {"noise": "auto", "saturation": "auto"}])
def test_the_driver_reads_tile_windows_only(cpu, options):
    image = star_field((400, 600), seed=14, n_stars=60)
    windows = []

    class Recording(ArrayTileReader):
        def read(self, window):
            windows.append(tuple(window))
            return super().read(window)

    plan = tiles.plan_tiles(image.shape, psf_size=25, iterations=3, tile=100)
    writer = types.SimpleNamespace(write=lambda window, block: None, sync=lambda: None)
    tiles.restore_tiled(
        Recording(image), writer, PSF, 3, backend=cpu, plan=plan, progress=False, options=options
    )
    allowed = {t.read for t in plan.tiles} | {t.core for t in plan.tiles}
    assert set(windows) <= allowed
    # each core once (the range of the data for the pedestal, the noise model's boxes and the
    # saturation plateau), each window once
    assert sorted(windows) == sorted([t.core for t in plan.tiles] + [t.read for t in plan.tiles])
    largest = max((y1 - y0) * (x1 - x0) for y0, y1, x0, x1 in windows)
    assert largest == plan.read_shape[0] * plan.read_shape[1] < image.size / 5


RSS_SCRIPT = """
import sys
import numpy as np
from gpudeconv import tiles
from gpudeconv.backend._numpy import NumPyBackend
import gpudeconv as gd

def status(key):
    # VmHWM, not getrusage: ru_maxrss survives fork and exec, so a child started from a large
    # pytest process would report the parent's size
    with open("/proc/self/status") as lines:
        return next(int(l.split()[1]) * 1024 for l in lines if l.startswith(key + ":"))

backend = NumPyBackend(workers=1)
psf = gd.psf.moffat(3.5)
# the libraries and FFTW plans loaded on a small image, then the high-water mark reset
gd.richardson_lucy(np.ones((300, 300), np.float32), psf, 2, backend=backend)
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")
before = status("VmRSS")
tiles.deconvolve_file(*sys.argv[1:], psf, 2, backend=backend, tile=512, progress=False)
print(before, status("VmHWM"))
"""


@pytest.mark.skipif(
    not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs"
)
def test_peak_memory_stays_far_below_the_mosaic(tmp_path):
    side = 4096
    mosaic = tmp_path / "mosaic.fits"
    data = np.random.default_rng(1).uniform(50, 150, (side, side)).astype(np.float32)
    data[:, :300] = np.nan  # an unobserved strip
    fits.PrimaryHDU(data).writeto(mosaic)
    mosaic_bytes = data.nbytes  # 64 MiB
    del data
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(mosaic), str(tmp_path / "sharp.fits")],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=300,
    )
    before, peak = (int(n) for n in done.stdout.split()[-2:])
    # RL of the whole image in memory would hold ~15 arrays of its size (~1 GiB); tiles of 512
    # hold ~14 arrays of their extended 656 x 656 (24 MiB) and a few buffers: 31 MiB measured
    assert peak - before < 0.75 * mosaic_bytes, (before, peak)
    result = fits.getdata(tmp_path / "sharp.fits")
    assert result.shape == (side, side) and np.isnan(result[:, :300]).all()
    assert not np.isnan(result[:, 300:]).any()


# ------------------------------------------------------------------------------ the GPU path


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path_factory):
    """The CuPy backend on the fake cupy of tests/fake_cupy.py, with events on its streams."""
    kh = pytest.importorskip("kernel_harness")
    if kh.compiler() is None:
        pytest.skip("g++ not found: the CUDA emulation compiles kernels for the CPU")
    import fake_cupy

    cache = os.environ.get("GPUDECONV_EMU_CACHE") or tmp_path_factory.mktemp("fake-cupy-kernels")
    fake = fake_cupy.install(monkeypatch, cache_dir=cache)
    stream = fake.cupy.cuda.Stream
    events = []

    def record(self):
        event = types.SimpleNamespace(synchronize=lambda: None, done=True, stream=self)
        events.append(event)
        return event

    monkeypatch.setattr(stream, "record", record, raising=False)
    monkeypatch.setattr(stream, "wait_event", lambda self, event: None, raising=False)
    return types.SimpleNamespace(fake=fake, events=events, backend=gd.get_backend("cupy"))


def test_the_gpu_path_streams_through_pinned_buffers(fake_gpu, cpu, tmp_path):
    image = nan_wedge(star_field((90, 130), seed=15, n_stars=20))
    psf = gd.psf.gaussian(1.8, size=9)
    plan = tiles.plan_tiles(image.shape, psf_size=9, iterations=3, tile=48)
    results = {}
    for name, backend in (("numpy", cpu), ("cupy", fake_gpu.backend)):
        writer = create_tile_output(tmp_path / f"{name}.fits", image.shape, np.float32, fmt="FITS")
        with writer:
            tiles.restore_tiled(
                ArrayTileReader(image), writer, psf, 3, backend=backend, plan=plan, progress=False
            )
        results[name] = fits.getdata(tmp_path / f"{name}.fits")
    np.testing.assert_array_equal(np.isnan(results["cupy"]), np.isnan(image))
    valid = ~np.isnan(image)
    np.testing.assert_allclose(
        results["cupy"][valid], results["numpy"][valid], rtol=1e-5, atol=1e-6 * np.nanmax(image)
    )
    # an upload, a computation and a download recorded per tile with data, on two streams
    assert len(fake_gpu.events) >= 2 * len(plan)
    assert len({id(event.stream) for event in fake_gpu.events}) == 2


def test_tile_writer_round_trips_interleaved_and_planar_layouts(tmp_path):
    cube = np.arange(3 * 20 * 30, dtype=np.float32).reshape(3, 20, 30)
    for layout in ("planar", "interleaved"):
        path = tmp_path / layout
        path.write_bytes(b"\0" * (16 + cube.nbytes))
        with TileWriter(path, offset=16, shape=cube.shape, dtype=">f4", layout=layout) as writer:
            for y0, y1, x0, x1 in [(0, 7, 0, 30), (7, 20, 0, 11), (7, 20, 11, 30)]:
                writer.write((y0, y1, x0, x1), cube[:, y0:y1, x0:x1])
        stored = np.frombuffer(path.read_bytes()[16:], dtype=">f4")
        expected = cube if layout == "planar" else np.moveaxis(cube, 0, -1)
        np.testing.assert_array_equal(stored.reshape(expected.shape), expected)


def test_deconvolve_streams_paths_and_tiles(tmp_path):
    """`gd.deconvolve`: tile= streams through the tile driver (a path too when it does not fit
    in memory); the results agree with the in-core restoration (the noise model estimated on
    the whole image in both)."""
    data = star_field((150, 170), seed=31)
    path = tmp_path / "in.fits"
    fits.PrimaryHDU(data).writeto(path)
    psf = gd.psf.moffat(3.0, size=11)
    expected = gd.deconvolve(data, psf, iterations=6)
    span = float(expected.max() - expected.min())
    for image, tile in ((path, None), (path, 64), (data, 64)):
        result = gd.deconvolve(image, psf, iterations=6, tile=tile)
        assert result.shape == data.shape and result.dtype == np.float32
        assert np.abs(result - expected).max() <= 1e-3 * span
    with pytest.raises(gd.GpudeconvError, match="callback cannot be used when restoring in tiles"):
        gd.deconvolve(path, psf, iterations=2, tile=64, callback=print)


def test_a_field_for_another_image_leaves_no_files(tmp_path):
    data = star_field((120, 130), seed=32)
    source, target = tmp_path / "in.fits", tmp_path / "out.fits"
    fits.PrimaryHDU(data).writeto(source)
    field = gd.psf.aberrated_field((100, 100), (2, 2), fwhm_centre=2.0, fwhm_corner=3.0)
    for _ in range(2):  # the second run is refused for the same reason, not for leftovers
        with pytest.raises(GpudeconvError, match="made for images of 100x100"):
            tiles.deconvolve_file(source, target, field, 3, tile=64, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.fits"]


def test_a_full_disk_is_one_line_and_resumable(tmp_path, monkeypatch):
    import errno

    from gpudeconv.io import TileWriter

    data = star_field((120, 130), seed=33)
    source, target = tmp_path / "in.fits", tmp_path / "out.fits"
    fits.PrimaryHDU(data).writeto(source)
    psf = gd.psf.gaussian(2.0, size=7)
    original = TileWriter.write
    calls = {"n": 0}

    def fail_on_the_third(self, window, block):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, window, block)

    monkeypatch.setattr(TileWriter, "write", fail_on_the_third)
    with pytest.raises(GpudeconvError, match="No space left on device.*run again with --resume"):
        tiles.deconvolve_file(source, target, psf, 3, tile=48, progress=False)
    assert not target.exists()
    monkeypatch.setattr(TileWriter, "write", original)
    tiles.deconvolve_file(source, target, psf, 3, tile=48, progress=False, resume=True)
    reference = tmp_path / "reference.fits"
    tiles.deconvolve_file(source, reference, psf, 3, tile=48, progress=False)
    assert target.read_bytes() == reference.read_bytes()
