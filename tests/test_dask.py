"""gpudeconv.dask: the tiles' per-tile function under ``dask.array.map_overlap``, on a local
cluster of worker processes, compared with the in-core restoration."""

from __future__ import annotations

import importlib
import os
import sys

import numpy as np
import pytest
from astropy.io import fits
from helpers import star_field

import gpudeconv as gd
from gpudeconv import GpudeconvError, tiles
from gpudeconv.backend._numpy import NumPyBackend
from gpudeconv.restore.noise import estimate_noise
from gpudeconv.synthetic import make_scene

PSF = gd.psf.moffat(3.5)  # 25 x 25
# FFTW on one thread, as in test_tiles.py: the tests share their cores with other runs
CPU = NumPyBackend(workers=1)


def image_range(image) -> float:
    return float(np.nanmax(image) - np.nanmin(image))


def test_the_module_imports_without_dask(monkeypatch):
    for name in ("dask", "dask.array", "distributed"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    monkeypatch.delitem(sys.modules, "gpudeconv.dask", raising=False)
    module = importlib.import_module("gpudeconv.dask")
    with pytest.raises(GpudeconvError, match=r"needs dask\[array\]: pip install gpudeconv\[dask\]"):
        module.deconvolve_dask(np.ones((8, 8), np.float32), PSF, 2)
    with pytest.raises(GpudeconvError, match=r"pip install gpudeconv\[dask\]"):
        module.run_on_cluster("in.fits", "out.fits", PSF, 2)


da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
from gpudeconv.dask import deconvolve_dask, run_on_cluster  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes of one thread each, for the whole module."""
    with (
        distributed.LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None
        ) as local,
        distributed.Client(local) as client,
    ):
        yield client


def test_blocks_on_two_worker_processes_match_the_whole_image(cluster):
    image = star_field((512, 560), seed=21, n_stars=200)
    image[:40, :] = np.nan  # an unobserved border
    whole = gd.richardson_lucy(image, PSF, 10, backend=CPU)
    lazy = deconvolve_dask(image, PSF, 10, backend=CPU, tile=256)
    assert isinstance(lazy, da.Array) and lazy.dtype == np.float32
    assert lazy.chunks == ((256, 256), (256, 304))  # a block shorter than the halo joins
    result = cluster.compute(lazy).result()
    np.testing.assert_array_equal(np.isnan(result), np.isnan(image))
    valid = ~np.isnan(image)
    # halo min(2 * 10 * 12, 2 * 25) = 50: the seams sit at the float32 rounding floor, next to
    # the NaN border too (measured 4e-6 of the range)
    assert np.abs(result[valid] - whole[valid]).max() <= 1e-4 * image_range(image)


def test_colour_negative_data_and_fields_match_in_core():
    base = star_field((200, 260), seed=22, n_stars=60)
    cube = np.stack([base - 60, 0.5 * base, base + 3])  # sky-subtracted red: a pedestal
    with pytest.warns(gd.GpudeconvWarning, match="negative values"):
        whole = gd.richardson_lucy(cube, PSF, 5, backend=CPU)
    with pytest.warns(gd.GpudeconvWarning, match="negative values"):
        lazy = deconvolve_dask(da.from_array(cube, chunks=(1, 100, 100)), PSF, 5, backend=CPU)
    result = lazy.compute(scheduler="threads")
    assert np.abs(result - whole).max() <= 1e-4 * image_range(cube)

    field = gd.psf.aberrated_field(base.shape, (3, 3), fwhm_centre=2.5, fwhm_corner=4.5)
    whole = gd.richardson_lucy(base, field, 5, backend=CPU)
    result = deconvolve_dask(base, field, 5, backend=CPU, tile=96).compute(scheduler="threads")
    assert np.abs(result - whole).max() <= 1e-4 * image_range(base)


def test_run_on_cluster_writes_the_output_atomically(cluster, tmp_path):
    image = star_field((300, 340), seed=23, n_stars=90)
    path = tmp_path / "in.fits"
    hdu = fits.PrimaryHDU(image)
    hdu.header["OBJECT"] = "IC 1805"
    hdu.writeto(path)
    whole = gd.richardson_lucy(image, PSF, 6, backend=CPU)
    report = run_on_cluster(
        path,
        tmp_path / "out.fits",
        PSF,
        6,
        address=cluster.scheduler.address,
        backend=CPU,
        tile=128,
    )
    assert report.output == tmp_path / "out.fits" and report.tiles_total == 2 * 3  # 300 x 340
    assert sorted(os.listdir(tmp_path)) == ["in.fits", "out.fits"]
    data, header = gd.read_image(tmp_path / "out.fits")
    assert header["OBJECT"] == "IC 1805" and "on Dask" in " ".join(header["HISTORY"])
    assert np.abs(data - whole).max() <= 1e-3 * image_range(image)


def test_run_on_cluster_starts_its_own_local_cluster(tmp_path):
    image = np.stack([star_field((120, 150), seed=24, n_stars=30)] * 3)  # colour
    path = tmp_path / "in.fits"
    fits.PrimaryHDU(image).writeto(path)
    whole = gd.richardson_lucy(image, PSF, 3, backend=CPU)
    report = run_on_cluster(path, tmp_path / "out.fits", PSF, 3, workers=1, backend=CPU, tile=64)
    assert report.tiles_total == 2 * 2  # 120 x 150: blocks shorter than the halo joined
    data, _ = gd.read_image(tmp_path / "out.fits")
    assert data.shape == image.shape
    assert np.abs(data - whole).max() <= 1e-3 * image_range(image)


def test_options_on_blocks_match_the_tiles():
    # the noise model and the saturation level measured once on the client, as the tiles do
    scene = make_scene((300, 340), seed=3, saturation=3000.0, nan_border=12)
    image = scene.observed[:, ::-1].copy()  # a clipped star near a block's edge
    options = {"noise": "auto", "damping": 3.0, "dering": 0.5, "saturation": "auto"}
    tiled = tiles.deconvolve_tiled(image, scene.psf, 6, backend=CPU, tile=128, options=options)
    blocks = deconvolve_dask(image, scene.psf, 6, backend=CPU, tile=128, options=options)
    result = blocks.compute(scheduler="threads")
    np.testing.assert_array_equal(np.isnan(result), np.isnan(image))
    # Blocks at the edges are cut where tiles shift inwards, and each starts its no-data
    # pixels from the data near them as the tiles do: measured 7.6e-6 of the range next to the
    # NaN border (7.7e-3 when each started them from the mean of its own data), 1.2e-6 inside.
    assert np.nanmax(np.abs(result - tiled)) <= 1e-4 * image_range(image)
    plain = deconvolve_dask(image, scene.psf, 6, backend=CPU, tile=128).compute()
    assert np.nanmax(np.abs(plain - result)) > 1e-2 * image_range(image)  # they did act


def test_run_on_cluster_with_options_records_them(cluster, tmp_path):
    scene = make_scene((200, 230), seed=4, nan_border=8)
    path = tmp_path / "in.fits"
    fits.PrimaryHDU(scene.observed).writeto(path)
    options = {"noise": "auto", "regularization": 0.005}
    report = run_on_cluster(
        path,
        tmp_path / "out.fits",
        scene.psf,
        4,
        address=cluster.scheduler.address,
        backend=CPU,
        tile=96,
        options=options,
        method="rl-tv",
    )
    assert report.noise == (estimate_noise(scene.observed),)
    data, header = gd.read_image(tmp_path / "out.fits")
    history = " ".join(header["HISTORY"])
    assert (
        "rl-tv, 4 iterations" in history and "options: noise=auto regularization=0.005" in history
    )
    tiled = tiles.deconvolve_tiled(path, scene.psf, 4, backend=CPU, tile=96, options=options)
    assert np.nanmax(np.abs(data - tiled)) <= 1e-4 * image_range(scene.observed)  # 1.4e-6


def test_bad_input_is_refused_before_any_work():
    with pytest.raises(GpudeconvError, match="iterations must be a positive integer"):
        deconvolve_dask(np.ones((64, 64), np.float32), PSF, 0)
    with pytest.raises(GpudeconvError, match="image must be 2-D"):
        deconvolve_dask(np.ones((2, 2, 64, 64), np.float32), PSF, 3)
    field = gd.psf.aberrated_field((100, 100), (2, 2), fwhm_centre=2, fwhm_corner=3)
    with pytest.raises(GpudeconvError, match="made for images of 100x100"):
        deconvolve_dask(np.ones((64, 64), np.float32), field, 3)
    with pytest.raises(GpudeconvError, match=r"^stop='change' cannot be used in tiles: ") as caught:
        deconvolve_dask(np.ones((64, 64), np.float32), PSF, 3, options={"stop": "change"})
    assert "\n" not in str(caught.value)
    with pytest.raises(GpudeconvError, match="^accelerate=True cannot be used in tiles"):
        run_on_cluster("in.fits", "out.fits", PSF, 2, options={"accelerate": True})
