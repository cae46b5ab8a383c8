"""Restoration quality figures on synthetic scenes with a known truth (`gpudeconv.quality`)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

import gpudeconv as gd
from gpudeconv import quality
from gpudeconv.measure import select_measurable_stars
from gpudeconv.synthetic import make_scene

SHAPE = (512, 512)
PSF_FWHM = 4.0  # make_scene's default Moffat


@pytest.fixture(scope="module")
def field():
    """A rich field (500 stars, galaxies, nebula, NaN border) and its RL restoration."""
    scene = make_scene(SHAPE, seed=4, n_stars=500, nan_border=8)
    restored = gd.richardson_lucy(scene.observed, scene.psf, 30, backend="numpy")
    return scene, restored


@pytest.fixture(scope="module")
def saturated():
    """Stars clipped at 1000 ADU (sky 100), and plain RL run long enough to ring."""
    scene = make_scene((448, 448), seed=7, n_stars=200, saturation=1000.0, galaxies=False)
    restored = gd.richardson_lucy(scene.observed, scene.psf, 100, backend="numpy")
    return scene, restored


def _near(xy, positions, radius):
    """For each of ``xy``, the indices of ``positions`` within ``radius``."""
    return cKDTree(positions).query_ball_point(xy, radius)


def _clear_of_border(stars, margin):
    """The stars at least ``margin`` px from the frame's edges (and its NaN border)."""
    x, y = np.asarray(stars["x"]), np.asarray(stars["y"])
    height, width = SHAPE
    return stars[
        (x >= margin) & (y >= margin) & (x <= width - 1 - margin) & (y <= height - 1 - margin)
    ]


def _xy(table):
    return np.column_stack([np.asarray(table["x"]), np.asarray(table["y"])])


# --- stars ------------------------------------------------------------------------------------


def test_find_stars_recovers_the_bright_catalogue_stars(field):
    scene, _ = field
    found = quality.find_stars(scene.observed)
    assert set(found.colnames) >= {"x", "y", "peak", "flux", "sharpness", "saturated"}
    assert 3.5 < found.meta["fwhm"] < 5.5  # Gaussian fits to a Moffat of FWHM 4
    assert abs(found.meta["noise"] - scene.noise_sigma) < 0.1 * scene.noise_sigma
    assert np.all(np.diff(np.asarray(found["flux"])) <= 0)  # brightest first
    # Every bright star clear of the NaN border is found within half a pixel.
    bright = _clear_of_border(scene.stars[scene.stars["flux"] > 10_000], 20)
    distance, _ = cKDTree(_xy(found)).query(_xy(bright))
    assert len(distance) > 20
    assert np.all(distance < 0.5)
    # No detection on the NaN border.
    assert np.all((found["x"] >= 7.5) & (found["y"] >= 7.5))
    assert not found["saturated"].any()


def test_find_stars_threshold_and_given_fwhm(field):
    scene, _ = field
    default = quality.find_stars(scene.observed, fwhm=PSF_FWHM)
    strict = quality.find_stars(scene.observed, fwhm=PSF_FWHM, threshold=20.0)
    assert default.meta["fwhm"] == PSF_FWHM
    assert 0 < len(strict) < len(default)
    # A stricter threshold keeps a subset of the same detections.
    distance, _ = cKDTree(_xy(default)).query(_xy(strict))
    assert np.all(distance < 1e-6)


def test_find_stars_flags_each_saturated_star_once(saturated):
    scene, _ = saturated
    found = quality.find_stars(scene.observed)
    clipped = scene.observed >= scene.saturation
    labels, count = ndimage.label(clipped, structure=np.ones((3, 3)))
    centres = np.array(ndimage.center_of_mass(clipped, labels, range(1, count + 1)))[:, ::-1]
    assert count >= 5
    flagged = _xy(found[found["saturated"]])
    # One flagged detection per clipped core, and no flagged star without a clipped core.
    assert len(flagged) == count
    for near in _near(centres, flagged, 3.0):
        assert len(near) == 1


def test_find_stars_on_pure_noise_is_empty():
    rng = np.random.default_rng(1)
    noise = (100 + 10 * rng.standard_normal((128, 128))).astype(np.float32)
    found = quality.find_stars(noise, threshold=8.0)
    assert len(found) == 0
    assert {"x", "y", "peak", "flux", "saturated"} <= set(found.colnames)


# --- noise ------------------------------------------------------------------------------------


def test_empty_sky_mask_leaves_out_sources_and_no_data(field):
    scene, _ = field
    mask = quality.empty_sky_mask(scene.observed)
    assert mask.dtype == bool and mask.shape == SHAPE
    assert not mask[:8].any() and not mask[:, -8:].any()  # the NaN border
    assert 0.2 < mask.mean() < 0.9
    # No empty-sky pixel within 3 FWHM of a bright star (the undilated footprints come within
    # that of nearly all), nor within 2 effective radii of a galaxy.
    rows, cols = np.nonzero(mask)
    pixels = np.column_stack([cols, rows]).astype(float)
    bright = _clear_of_border(scene.stars[scene.stars["flux"] > 5_000], 20)
    assert len(bright) > 30
    for near in _near(_xy(bright), pixels, 3 * PSF_FWHM):
        assert not near
    for galaxy in scene.galaxies:
        assert not _near((galaxy["x"], galaxy["y"]), pixels, 2 * galaxy["r_eff"])
    # What is left is the sky: its noise is the scene's.
    sky = scene.observed[mask] - np.median(scene.observed[mask])
    assert abs(np.std(sky) - scene.noise_sigma) < 0.06 * scene.noise_sigma


def test_empty_sky_mask_dilate_and_too_little_sky(field):
    scene, _ = field
    narrow = quality.empty_sky_mask(scene.observed, dilate=2)
    wide = quality.empty_sky_mask(scene.observed, dilate=8)
    assert np.all(wide <= narrow)  # a subset
    assert wide.sum() < 0.8 * narrow.sum()
    with pytest.raises(gd.GpudeconvError, match=r"empty sky.*smaller dilate"):
        quality.empty_sky_mask(scene.observed, dilate=60)


def test_noise_gain_of_sharpening_and_smoothing(field):
    scene, restored = field
    gain = quality.noise_gain(scene.observed, restored)
    assert 1.2 < gain < 3.0
    smoothed = ndimage.gaussian_filter(scene.observed, 1.0)  # NaN border spreads, ignored
    assert quality.noise_gain(scene.observed, smoothed) < 0.6
    assert quality.noise_gain(scene.observed, scene.observed) == pytest.approx(1.0)
    # Doubling the noise about the same sky doubles the gain, whatever the mask.
    rng = np.random.default_rng(2)
    noisier = scene.observed + scene.noise_sigma * math.sqrt(3) * rng.standard_normal(SHAPE)
    mask = quality.empty_sky_mask(scene.observed)
    assert quality.noise_gain(scene.observed, noisier, mask=mask) == pytest.approx(2.0, rel=0.03)


# --- sharpness --------------------------------------------------------------------------------


def test_fwhm_by_region_after_rl_is_sharper_everywhere(field):
    scene, restored = field
    result = quality.fwhm_by_region(scene.observed, restored)
    assert result["grid"] == [3, 3]
    assert len(result["regions"]) == 9
    assert result["stars"] >= 12
    assert sum(region["stars"] for region in result["regions"]) == result["stars"]
    assert 3.8 < result["before"] < 4.6  # the Moffat's 4 px, read ~4 % high by the fit
    assert result["ratio"] < 0.75
    measured = [region for region in result["regions"] if region["stars"]]
    assert len(measured) >= 7
    for region in measured:
        assert region["after"] < 0.8 * region["before"]
    for region in result["regions"]:
        if not region["stars"]:
            assert region["before"] is None and region["after"] is None


def test_fwhm_by_region_at_catalogue_positions(field):
    scene, restored = field
    stars = select_measurable_stars(
        scene.stars, SHAPE, min_flux=5_000, isolation=3 * PSF_FWHM, neighbours=scene.galaxies
    )
    result = quality.fwhm_by_region(scene.observed, restored, grid=(2, 2), stars=stars)
    assert len(result["regions"]) == 4
    assert result["stars"] >= 0.8 * len(stars)
    assert result["after"] < 0.75 * result["before"]
    # The blur measured against itself has the same FWHM.
    same = quality.fwhm_by_region(scene.observed, scene.observed, stars=_xy(stars))
    assert same["ratio"] == pytest.approx(1.0)


# --- rings ------------------------------------------------------------------------------------


def test_ringing_score_finds_rl_dark_rings_around_saturated_stars(saturated):
    scene, restored = saturated
    found = quality.find_stars(scene.observed)
    stars = found[found["saturated"]]
    sigma = scene.noise_sigma
    before = quality.ringing_score(scene.observed, stars, fwhm=PSF_FWHM, sigma=sigma)
    after = quality.ringing_score(restored, stars, fwhm=PSF_FWHM, sigma=sigma)
    assert before["measured"] == after["measured"] >= 4
    # The blurred star falls smoothly to the sky: at most noise-deep dips.
    assert before["depth_sigma"] > -0.5
    # Plain RL digs a ring several sigma deep, around each saturated star.
    assert after["depth_sigma"] < -2.0
    assert after["depth"] < 5 * before["depth"] - 10.0
    for star_before, star_after in zip(before["stars"], after["stars"], strict=True):
        if star_after["depth"] is not None:
            assert star_after["depth"] < star_before["depth"]
            assert PSF_FWHM <= star_after["radius"] <= 4 * PSF_FWHM + 1


def test_ringing_score_of_a_clean_star_is_zero():
    yy, xx = np.mgrid[0:96, 0:96]
    star = 100 + 5000 * np.exp(-((xx - 48.2) ** 2 + (yy - 47.7) ** 2) / (2 * 1.7**2))
    score = quality.ringing_score(star, [(48.2, 47.7)], fwhm=4.0, sigma=1.0)
    assert score["stars"][0]["depth"] == 0.0
    assert score["stars"][0]["radius"] is None
    assert score["depth"] == 0.0
    # A dark ring of -30 at radius 9 is found, at its depth and radius.
    ring = np.where(np.abs(np.hypot(xx - 48.2, yy - 47.7) - 9) < 1.5, -30.0, 0.0)
    score = quality.ringing_score(star + ring, [(48.2, 47.7)], fwhm=4.0, sky=100.0, sigma=10.0)
    assert score["depth"] == pytest.approx(-30.0, abs=0.1)
    assert score["depth_sigma"] == pytest.approx(-3.0, abs=0.01)
    assert 8 <= score["stars"][0]["radius"] <= 10
    # A star whose annuli leave the image is not measured.
    edge = quality.ringing_score(star, [(3.0, 3.0)], fwhm=4.0)
    assert edge["measured"] == 0 and edge["depth"] is None


# --- photometry -------------------------------------------------------------------------------


def _isolated_bright(scene, min_flux):
    """Catalogue stars with no source of 2 % of their flux within 16 px, nor 20 % within 28."""
    xy = _xy(scene.stars)
    flux = np.asarray(scene.stars["flux"])
    every = np.vstack([xy, _xy(scene.galaxies)])
    every_flux = np.concatenate([flux, np.asarray(scene.galaxies["flux"])])
    tree = cKDTree(every)
    keep = []
    for i in np.nonzero(flux >= min_flux)[0]:
        close = [j for j in tree.query_ball_point(xy[i], 16) if j != i]
        far = [j for j in tree.query_ball_point(xy[i], 28) if j != i]
        if all(every_flux[j] < 0.02 * flux[i] for j in close) and all(
            every_flux[j] < 0.2 * flux[i] for j in far
        ):
            keep.append(i)
    return xy[keep], flux[keep]


def test_aperture_fluxes_match_the_catalogue():
    radius, border = 3 * PSF_FWHM, 6
    ratios, cut = [], 0
    for seed in (1, 2, 3):
        scene = make_scene(SHAPE, seed=seed, nan_border=border)
        xy, flux = _isolated_bright(scene, 10_000)
        measured = quality.aperture_fluxes(scene.observed, xy, radius=radius, annulus=(16, 24))
        # An aperture that reaches the NaN border (pixel edges at 5.5 and 505.5) has no flux.
        reach = np.minimum(
            xy.min(axis=1) - (border - 0.5), SHAPE[0] - border - 0.5 - xy.max(axis=1)
        )
        assert np.all(np.isnan(measured[reach < radius]))
        assert np.all(np.isfinite(measured[reach >= radius]))
        cut += int(np.count_nonzero(reach < radius))
        ratios.extend(measured[reach >= radius] / flux[reach >= radius])
    ratios = np.array(ratios)
    assert cut >= 1
    assert len(ratios) >= 8
    assert np.all(np.abs(ratios - 1) < 0.05)
    assert abs(np.median(ratios) - 1) < 0.015


def test_aperture_fluxes_background_and_edges():
    yy, xx = np.mgrid[0:64, 0:64]
    image = 50 + 0.1 * xx + 1000 * np.exp(-((xx - 30.3) ** 2 + (yy - 33.6) ** 2) / (2 * 1.5**2))
    total = 1000 * 2 * np.pi * 1.5**2
    for background in ("median", "mean"):
        flux = quality.aperture_fluxes(
            image, [(30.3, 33.6), (2.0, 30.0)], radius=8, background=background
        )
        assert flux[0] == pytest.approx(total, rel=1e-3)  # a linear sky cancels in the annulus
        assert np.isnan(flux[1])  # the aperture leaves the image
    assert quality.aperture_fluxes(image, np.zeros((0, 2)), radius=5).shape == (0,)


# --- fidelity ---------------------------------------------------------------------------------


def test_psnr_follows_the_noise(field):
    scene, _ = field
    truth = scene.truth
    rng = np.random.default_rng(5)
    data_range = float(truth.max() - truth.min())
    previous = math.inf
    for sigma in (1.0, 10.0, 100.0):
        noisy = truth + sigma * rng.standard_normal(truth.shape).astype(np.float32)
        value = quality.psnr(noisy, truth)
        assert value == pytest.approx(20 * math.log10(data_range / sigma), abs=0.05)
        assert value < previous
        previous = value
    assert quality.psnr(truth, truth) == math.inf
    # NaN pixels are left out; a given range replaces the reference's.
    holed = noisy.copy()
    holed[:50] = np.nan
    assert quality.psnr(holed, truth) == pytest.approx(previous, abs=0.1)
    assert quality.psnr(noisy, truth, data_range=10 * data_range) == pytest.approx(previous + 20)


# --- the report -------------------------------------------------------------------------------


def test_restoration_report_is_plain_json_with_real_figures(field):
    scene, restored = field
    info = {
        "iterations": np.int64(30),
        "stop": "iterations",
        "data_term": np.array([3.0, 2.0, np.nan]),
        "tolerance": float("inf"),
    }
    report = quality.restoration_report(scene.observed, restored, info=info)
    text = json.dumps(report, allow_nan=False)
    assert json.loads(text) == report
    assert report["shape"] == [512, 512] and report["channels"] == 1
    assert report["run"] == {
        "iterations": 30,
        "stop": "iterations",
        "data_term": [3.0, 2.0, None],
        "tolerance": None,
    }
    assert report["fwhm"]["ratio"] < 0.75
    assert report["stars"]["measured"] == report["fwhm"]["stars"] >= 12
    assert 1.2 < report["noise_gain"] < 3.0
    assert report["flux_ratio"] == pytest.approx(1.0, abs=0.03)
    assert report["noise"]["after"] > report["noise"]["before"]
    assert report["ringing"]["after"]["depth"] < report["ringing"]["before"]["depth"]
    assert report["ringing"]["after"]["measured"] == report["stars"]["bright"] == 10
    assert report["notes"] == []


def test_restoration_report_colour_uses_the_channel_mean(saturated):
    scene, restored = saturated
    gains = np.array([0.8, 1.0, 1.2], dtype=np.float32)[:, None, None]
    before = scene.observed[None] * gains
    after = restored[None] * gains
    report = quality.restoration_report(before, after, psf_fwhm=PSF_FWHM, bright=3, grid=(2, 2))
    plane = quality.restoration_report(
        scene.observed, restored, psf_fwhm=PSF_FWHM, bright=3, grid=(2, 2)
    )
    json.dumps(report, allow_nan=False)
    assert report["channels"] == 3
    assert report["psf_fwhm"] == PSF_FWHM
    assert report["fwhm"]["before"] == pytest.approx(plane["fwhm"]["before"], rel=1e-4)
    assert report["noise_gain"] == pytest.approx(plane["noise_gain"], rel=1e-3)
    assert report["stars"]["bright"] == 3
    # The brightest stars of a clipped frame are its saturated ones, and they ring.
    assert report["ringing"]["after"]["depth_sigma"] < -2.0


def test_restoration_report_without_stars_or_sky_says_why():
    rng = np.random.default_rng(3)
    flat = (100 + 10 * rng.standard_normal((96, 96))).astype(np.float32)
    report = quality.restoration_report(flat, flat, bright=5)
    json.dumps(report, allow_nan=False)
    assert report["fwhm"]["stars"] == 0 and report["fwhm"]["before"] is None
    assert report["flux_ratio"] is None
    assert report["ringing"] == {"before": None, "after": None}
    assert report["noise_gain"] == pytest.approx(1.0)
    assert any("no stars" in note for note in report["notes"])


# --- bad input ----------------------------------------------------------------------------------

PLANE = np.ones((64, 64), dtype=np.float32)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: quality.find_stars(np.ones(64)), r"2-D plane"),
        (lambda: quality.find_stars(np.ones((3, 64, 64))), r"restoration_report"),
        (lambda: quality.find_stars(np.ones((16, 64))), r"too small.*at least 32x32"),
        (lambda: quality.find_stars(np.full((64, 64), np.nan)), r"no data"),
        (lambda: quality.find_stars(PLANE.astype(complex)), r"real numbers"),
        (lambda: quality.find_stars(PLANE, fwhm=-1), r"fwhm must be a positive number"),
        (lambda: quality.find_stars(PLANE, threshold=0), r"threshold must be a positive"),
        (lambda: quality.empty_sky_mask(PLANE, sigma=np.nan), r"sigma must be a positive"),
        (lambda: quality.empty_sky_mask(PLANE, dilate=-3), r"dilate must be a radius"),
        (lambda: quality.noise_gain(PLANE, PLANE[:32]), r"same shape"),
        (lambda: quality.noise_gain(PLANE, PLANE, mask=PLANE), r"mask must be a boolean"),
        (lambda: quality.noise_gain(PLANE, PLANE, mask=PLANE < 0), r"at least 500"),
        (lambda: quality.fwhm_by_region(PLANE, PLANE, grid=(0, 2)), r"grid must be"),
        (lambda: quality.fwhm_by_region(PLANE, PLANE, grid=(65, 2)), r"more regions than"),
        (lambda: quality.fwhm_by_region(PLANE, PLANE, stars=[1, 2, 3]), r"\(x, y\) pairs"),
        (lambda: quality.ringing_score(PLANE, [(5, 5)], fwhm=0), r"fwhm must be a positive"),
        (lambda: quality.ringing_score(PLANE, [(5, 5)], fwhm=4, sky="x"), r"sky must be"),
        (lambda: quality.ringing_score(PLANE, [(5, 5)], fwhm=4, sigma=-1), r"sigma must be"),
        (lambda: quality.aperture_fluxes(PLANE, [(5, 5)], radius=0), r"radius must be"),
        (
            lambda: quality.aperture_fluxes(PLANE, [(5, 5)], radius=4, annulus=(3, 8)),
            r"annulus must be \(r_in, r_out\)",
        ),
        (
            lambda: quality.aperture_fluxes(PLANE, [(5, 5)], radius=4, background="mode"),
            r"background must be one of",
        ),
        (lambda: quality.psnr(PLANE, PLANE[:40]), r"same shape"),
        (lambda: quality.psnr(PLANE, PLANE), r"reference is constant.*data_range"),
        (lambda: quality.psnr(PLANE, PLANE, data_range=0), r"data_range must be"),
        (lambda: quality.restoration_report(PLANE, PLANE, info=[1]), r"info must be a dict"),
        (lambda: quality.restoration_report(PLANE, PLANE, bright=-1), r"bright must be"),
        (lambda: quality.restoration_report(PLANE, PLANE, psf_fwhm=0), r"psf_fwhm must be"),
        (
            lambda: quality.restoration_report(np.ones((64, 64, 3)), np.ones((64, 64, 3))),
            r"channel-last.*np.moveaxis",
        ),
        (lambda: quality.restoration_report(PLANE, PLANE[None].repeat(2, 0)), r"same shape"),
    ],
)
def test_bad_input_is_one_clear_error(call, match):
    with pytest.raises(gd.GpudeconvError, match=match):
        call()


def test_errors_are_one_line():
    with pytest.raises(gd.GpudeconvError) as error:
        quality.empty_sky_mask(np.ones((64, 64)), dilate=-1)
    assert "\n" not in str(error.value)
