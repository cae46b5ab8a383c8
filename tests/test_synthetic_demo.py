"""The synthetic scene, the star-FWHM measure and the demo, checked against what they promise."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from helpers import to_numpy
from PIL import Image

import gpudeconv as gd
from gpudeconv.demo import run_demo
from gpudeconv.measure import median_fwhm, select_measurable_stars, star_fwhm
from gpudeconv.synthetic import make_scene


@pytest.fixture(scope="module")
def scene():
    """A 512x512 field with every ingredient, as a stacked image (gain 20)."""
    return make_scene((512, 512), seed=11, gain=20.0, clusters=1)


def _measurable(scene, **options):
    return select_measurable_stars(
        scene.stars,
        scene.observed.shape,
        min_flux=30 * scene.noise_sigma / float(scene.psf.max()),
        isolation=12.0,
        neighbours=scene.galaxies,
        **options,
    )


# --- the scene --------------------------------------------------------------------------------


def test_scene_is_deterministic_by_seed():
    first = make_scene((128, 160), seed=3)
    again = make_scene((128, 160), seed=3)
    other = make_scene((128, 160), seed=4)
    assert first.observed.shape == (128, 160)
    assert first.observed.dtype == np.float32 and first.truth.dtype == np.float32
    np.testing.assert_array_equal(first.observed, again.observed)
    np.testing.assert_array_equal(first.truth, again.truth)
    np.testing.assert_array_equal(first.stars["flux"], again.stars["flux"])
    assert not np.array_equal(first.observed, other.observed)
    assert not np.array_equal(first.stars["x"], other.stars["x"])


def test_stars_span_decades_many_faint_few_bright(scene):
    flux = np.asarray(scene.stars["flux"])
    faintest = 25 * scene.noise_sigma
    assert flux.min() >= faintest and flux.max() <= faintest * 10**3.5
    assert np.log10(flux.max() / flux.min()) > 2.5
    faint = np.count_nonzero(flux < 10 * flux.min())
    bright = np.count_nonzero(flux > 100 * flux.min())
    assert faint > 4 * bright > 0
    x, y = np.asarray(scene.stars["x"]), np.asarray(scene.stars["y"])
    assert x.min() >= 3 and y.min() >= 3 and x.max() <= 508 and y.max() <= 508


def test_truth_holds_point_stars_at_their_positions():
    one = make_scene((64, 80), seed=5, n_stars=1, galaxies=False, nebula=False)
    star = one.stars[0]
    truth = one.truth.astype(np.float64)
    assert np.count_nonzero(truth) <= 4
    assert truth.sum() == pytest.approx(star["flux"], rel=1e-6)
    rows, cols = np.indices(truth.shape)
    # x is the column, y the row; the light's centroid is the star's position.
    assert (truth * cols).sum() / truth.sum() == pytest.approx(star["x"], abs=1e-4)
    assert (truth * rows).sum() / truth.sum() == pytest.approx(star["y"], abs=1e-4)


def test_blur_conserves_flux():
    # Photon noise so low (gain 1e7) that losing a single star's light would show.
    quiet = make_scene((384, 384), seed=9, gain=1e7, read_noise=0.0)
    observed = quiet.observed.astype(np.float64)
    signal = observed.sum() - quiet.sky * observed.size
    sigma = np.sqrt(observed.sum() / 1e7)
    assert 5 * sigma < float(quiet.stars["flux"].min())
    assert abs(signal - quiet.truth.astype(np.float64).sum()) < 5 * sigma


def test_background_noise_matches_its_model():
    blank = make_scene((256, 256), seed=1, n_stars=0, galaxies=False, nebula=False, gain=4.0)
    assert blank.noise_sigma == pytest.approx(np.sqrt(100 * 4 + 25) / 4)
    assert float(blank.observed.mean()) == pytest.approx(100.0, abs=0.1)
    assert float(blank.observed.std()) == pytest.approx(blank.noise_sigma, rel=0.02)


def test_saturation_and_nan_border():
    clipped = make_scene((128, 128), seed=2, saturation=2000.0, nan_border=5)
    observed = clipped.observed
    assert np.isnan(observed[:5]).all() and np.isnan(observed[:, -5:]).all()
    assert np.isfinite(observed[5:-5, 5:-5]).all()
    assert np.nanmax(observed) == 2000.0
    assert make_scene((128, 128), seed=2).observed.max() > 2000.0


def test_galaxies_and_nebula_add_light():
    bare = make_scene((256, 256), seed=7, galaxies=False, nebula=False)
    full = make_scene((256, 256), seed=7)
    assert len(bare.galaxies) == 0 and len(full.galaxies) >= 1
    extra = full.truth.astype(np.float64).sum() - bare.truth.astype(np.float64).sum()
    assert extra > float(full.galaxies["flux"].sum())
    # Faint nebulosity: a few sigma of the sky noise per pixel at its brightest, so well below
    # the bright stars, and spread (not a few specks).
    galaxy_free = make_scene((256, 256), seed=7, galaxies=False)
    nebula = galaxy_free.truth.astype(np.float64) - bare.truth.astype(np.float64)
    assert 1 * full.noise_sigma < nebula.max() < 5 * full.noise_sigma
    assert np.count_nonzero(nebula > 0.2 * nebula.max()) > 0.05 * nebula.size
    assert nebula.min() >= 0


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"shape": (16, 16)}, "shape"),
        ({"gain": 0}, "gain"),
        ({"saturation": 50.0}, "saturation"),
        ({"nan_border": 256}, "nan_border"),
        ({"dtype": np.int16}, "dtype"),
        ({"psf": np.ones((4, 4))}, "psf"),
    ],
)
def test_make_scene_rejects_bad_options(options, match):
    with pytest.raises(gd.GpudeconvError, match=match):
        make_scene(**options)


# --- measuring stars --------------------------------------------------------------------------


def test_measured_fwhm_of_observed_stars_matches_the_psf(scene):
    stars = _measurable(scene)
    assert len(stars) >= 10
    measured = median_fwhm(scene.observed, stars)
    assert measured == pytest.approx(4.0, rel=0.10)
    gaussian = make_scene((512, 512), psf=gd.psf.gaussian(3.0), seed=11, gain=20.0)
    assert median_fwhm(gaussian.observed, _measurable(gaussian)) == pytest.approx(3.0, rel=0.06)


def test_star_fwhm_refuses_stars_at_edges_nan_and_empty_sky():
    bordered = make_scene((256, 256), seed=4, nan_border=20, gain=20.0)
    stars = bordered.stars
    fwhm = star_fwhm(bordered.observed, stars, box=5)
    # With box 5 a star needs 15 clean pixels around it (the background annulus).
    x, y = np.asarray(stars["x"]), np.asarray(stars["y"])
    near_nan = (np.minimum(x, y) < 20 + 14) | (np.maximum(x, y) > 255 - 20 - 14)
    assert np.isnan(fwhm[near_nan]).all()
    assert np.isfinite(fwhm[~near_nan]).sum() >= 5
    empty = np.full((64, 64), 100.0) + np.random.default_rng(0).normal(0, 1, (64, 64))
    assert np.isnan(star_fwhm(empty, [(32.0, 32.0)], box=5)).all()
    assert np.isnan(median_fwhm(empty, np.zeros((0, 2))))
    with pytest.raises(gd.GpudeconvError, match="box"):
        star_fwhm(empty, [(32.0, 32.0)], box=4)


def test_select_measurable_stars_keeps_bright_isolated_ones():
    stars = Table(
        {
            "x": [50.0, 56.0, 120.0, 124.0, 5.0, 160.0, 170.0],
            "y": [50.0, 50.0, 120.0, 120.0, 90.0, 40.0, 40.0],
            "flux": [1e5, 2e3, 1e5, 5e4, 1e5, 500.0, 1e5],
        }
    )
    galaxy = Table({"x": [175.0], "y": [40.0], "flux": [3e4]})
    chosen = select_measurable_stars(
        stars, (200, 200), min_flux=1e3, isolation=12.0, neighbours=galaxy
    )
    # 0: faint neighbour only; 1: next to a 50x brighter star; 2 and 3: each other's rivals;
    # 4: at the edge; 5: too faint; 6: next to a galaxy.
    assert list(chosen["x"]) == [50.0]
    # A saturated star is not measured but still spoils its neighbours.
    unsaturated = select_measurable_stars(stars, (200, 200), min_flux=1e3, max_flux=5e4)
    assert len(unsaturated) == 0
    closer = select_measurable_stars(stars, (200, 200), min_flux=1e3, max_flux=5e4, isolation=3)
    assert list(closer["x"]) == [56.0, 124.0]


# --- restoring (the engine end to end) --------------------------------------------------------


def test_richardson_lucy_restores_smaller_stars(backend, scene):
    stars = _measurable(scene)
    restored = to_numpy(
        gd.richardson_lucy(backend.asarray(scene.observed), scene.psf, 30, backend=backend)
    )
    before = star_fwhm(scene.observed, stars, box=5)
    after = star_fwhm(restored, stars, box=5)
    both = np.isfinite(before) & np.isfinite(after)
    assert both.sum() >= 10
    assert np.median(after[both]) < 0.7 * np.median(before[both])
    assert (after[both] < before[both]).mean() > 0.9


# --- the demo ---------------------------------------------------------------------------------


def test_run_demo_writes_images_and_picture(tmp_path):
    lines = []
    result = run_demo(tmp_path / "out", size=256, iterations=20, progress=False, log=lines.append)
    observed_path, restored_path, picture_path = result.paths
    assert [p.name for p in result.paths] == [
        "demo_observed.fits",
        "demo_restored.fits",
        "demo_comparison.png",
    ]
    with fits.open(observed_path) as hdul:
        observed = hdul[0].data
        assert observed.dtype == np.dtype(">f4") and observed.shape == (256, 256)
    with fits.open(restored_path) as hdul:
        restored = hdul[0].data
        history = "\n".join(str(line) for line in hdul[0].header["HISTORY"])
        assert restored.dtype == np.dtype(">f4") and restored.shape == (256, 256)
    assert "rl, 20 iterations" in history and "Moffat fwhm=4.0 beta=3.0" in history
    assert f"backend {result.backend}" in history
    assert not np.allclose(observed, restored)
    with Image.open(picture_path) as picture:
        assert picture.width == 2 * 256 + 8
        assert picture.height > 2 * 256
    assert result.fwhm_after < 0.8 * result.fwhm_before
    assert result.fwhm_before == pytest.approx(result.fwhm_truth_psf, rel=0.10)
    assert result.n_stars_measured >= 3 and result.iterations == 20
    assert result.backend in gd.available_backends()
    report = "\n".join(lines)
    assert f"{result.fwhm_before:.2f}" in report and f"{result.fwhm_after:.2f}" in report
    assert str(picture_path) in report


def test_run_demo_keeps_existing_files_without_overwrite(tmp_path):
    (tmp_path / "demo_restored.fits").write_bytes(b"mine")
    with pytest.raises(gd.GpudeconvError, match="already exist"):
        run_demo(tmp_path, size=256, overwrite=False, progress=False, log=None)
    assert (tmp_path / "demo_restored.fits").read_bytes() == b"mine"
    assert not (tmp_path / "demo_observed.fits").exists()
    with pytest.raises(gd.GpudeconvError, match="size"):
        run_demo(tmp_path, size=64, log=None)
