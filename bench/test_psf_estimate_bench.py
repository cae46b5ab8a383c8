"""PSF estimation from the stars of a 4096^2 frame, next to a plain photutils ePSF (benchmark).

Group ``PSF estimate 4096x4096`` (the side follows ``--rl-gpu-size``; it is a CPU measurement):

* ``gpudeconv-single``: :func:`gpudeconv.psf.fit_psf` (Moffat, one PSF) on a frame of ~6000
  stars with one PSF (FWHM 3.5 px, beta 3, axis ratio 0.8), 400 hot pixels and cosmic-ray
  streaks, 20 saturated stars, a nebula, a NaN strip (``tests/psf_scenes.py``).
* ``gpudeconv-grid3x3``: the same with ``grid=(3, 3)``, on a frame whose PSF widens from 3 to
  5 px and stretches towards the corners.
* ``photutils-epsf``: what a user would otherwise write: ``sigma_clipped_stats`` sky,
  ``DAOStarFinder`` (the 100 brightest below 80 % of saturation), ``extract_stars`` (25 px),
  ``EPSFBuilder`` (oversampling 2), on the single-PSF frame.

Every case runs once untimed first (imports, caches; that run gives the accuracy figures),
then 3 timed rounds. ``extra_info`` holds
the stars found and used, the relative L2 error of the PSF's 15 x 15 core against the truth
(worst node for the grid), MPix/s, and the peak NumPy memory of one call (``tracemalloc``).
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import gpudeconv as gd


def _scenes_module():
    """``tests/psf_scenes.py``, the scene generator of the tests (no package of its own)."""
    path = Path(__file__).resolve().parents[1] / "tests" / "psf_scenes.py"
    spec = importlib.util.spec_from_file_location("psf_scenes", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


psf_scenes = _scenes_module()


@pytest.fixture(scope="module")
def size(settings):
    return settings["gpu_size"]


@pytest.fixture(scope="module")
def single_scene(size):
    return psf_scenes.make_scene(
        (size, size),
        n_stars=6000 * size * size // 4096**2,
        n_hot=400,
        n_saturated=20,
        subsample=5,
        seed=3,
    )


@pytest.fixture(scope="module")
def field_scene(size):
    psf_at = psf_scenes.varying_psf(
        (size, size), fwhm_centre=3.0, fwhm_corner=5.0, e_corner=0.25, beta=3.0
    )
    return psf_scenes.make_scene(
        (size, size),
        psf_at,
        n_stars=6000 * size * size // 4096**2,
        n_hot=400,
        n_saturated=20,
        subsample=5,
        seed=4,
    )


def _photutils_epsf(image, saturation):
    """Sky, DAOStarFinder, extract_stars, EPSFBuilder: the ePSF on the pixel grid (23 x 23)."""
    from astropy.nddata import NDData
    from astropy.stats import sigma_clipped_stats
    from astropy.table import Table
    from photutils.detection import DAOStarFinder
    from photutils.psf import EPSFBuilder, extract_stars

    data = np.nan_to_num(image, nan=0.0)
    _, median, std = sigma_clipped_stats(data, sigma=3.0)
    data = data - median
    found = DAOStarFinder(
        5 * std, 3.5, n_brightest=100, peak_max=0.8 * (saturation - median)
    ).find_stars(data)
    stars = extract_stars(
        NDData(data), Table({"x": found["x_centroid"], "y": found["y_centroid"]}), size=25
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        epsf = EPSFBuilder(oversampling=2, maxiters=10, progress_bar=False)(stars).epsf
    yy, xx = np.mgrid[-11:12, -11:12].astype(np.float64)
    psf = epsf.evaluate(xx, yy, 1.0, 0.0, 0.0)
    return psf / psf.sum(), len(stars)


def _measure(benchmark, call, *, size: int, group_info: dict):
    benchmark.group = f"PSF estimate {size}x{size}"
    benchmark.extra_info.update(size=size, **group_info)
    benchmark.pedantic(call, rounds=3, warmup_rounds=0, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        best = benchmark.stats.stats.min
        benchmark.extra_info["mpix_per_s"] = size * size / best / 1e6
        benchmark.extra_info["peak_memory_bytes"] = gd.get_backend("numpy").peak_memory(call)


def test_fit_psf_single(benchmark, single_scene, size):
    result = gd.psf.fit_psf(single_scene.image)
    error = psf_scenes.relative_l2(result.psf, single_scene.true_psf(0, 0))
    info = {"case": "gpudeconv-single", "found": result.found, "used": result.used}
    _measure(
        benchmark,
        lambda: gd.psf.fit_psf(single_scene.image),
        size=size,
        group_info={**info, "l2_error": error},
    )
    assert error < 0.05


def test_fit_psf_grid(benchmark, field_scene, size):
    result = gd.psf.fit_psf(field_scene.image, grid=(3, 3))
    field = result.psf
    error = max(
        psf_scenes.relative_l2(field.psfs[a, b], field_scene.true_psf(y, x))
        for a, y in enumerate(field.node_rows())
        for b, x in enumerate(field.node_cols())
    )
    info = {"case": "gpudeconv-grid3x3", "found": result.found, "used": result.used}
    _measure(
        benchmark,
        lambda: gd.psf.fit_psf(field_scene.image, grid=(3, 3)),
        size=size,
        group_info={**info, "l2_error": error},
    )
    assert error < 0.05


def test_photutils_epsf_peer(benchmark, single_scene, size):
    psf, used = _photutils_epsf(single_scene.image, single_scene.saturation)
    error = psf_scenes.relative_l2(psf, single_scene.true_psf(0, 0))
    _measure(
        benchmark,
        lambda: _photutils_epsf(single_scene.image, single_scene.saturation),
        size=size,
        group_info={"case": "photutils-epsf", "used": used, "l2_error": error},
    )
