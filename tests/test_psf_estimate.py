"""PSF estimation from the image's own stars (``gpudeconv.psf.estimate``).

The scenes come from ``tests/psf_scenes.py``, which renders every star analytically at its
sub-pixel position without gpudeconv's PSF code; each is built and measured once per module.
"""

from __future__ import annotations

import math

import numpy as np
import psf_scenes
import pytest

import gpudeconv as gd
from gpudeconv.psf import PSFEstimate, PSFField, estimate

#: Accuracy asked of every recovered PSF: relative L2 of the 15 x 15 core, both normalized.
L2_TOLERANCE = 0.05


# --- scenes and their measurements, once per module -------------------------------------------


@pytest.fixture(scope="module")
def moffat_scene():
    """1024^2, elliptical Moffat (FWHM 3.5, beta 3, ratio 0.8, 30 deg) and all the defects."""
    return psf_scenes.make_scene(seed=1)


@pytest.fixture(scope="module")
def moffat_fit(moffat_scene):
    return gd.psf.fit_psf(moffat_scene.image)


@pytest.fixture(scope="module")
def gaussian_scene():
    """A Gaussian PSF whose major axis points at 125 deg (past 90: the angle must wrap)."""
    psf_at = psf_scenes.constant_psf(fwhm=4.0, ratio=0.7, angle=125.0, beta=None)
    return psf_scenes.make_scene(psf_at=psf_at, n_stars=400, seed=2)


@pytest.fixture(scope="module")
def field_scene():
    """A PSF that widens (FWHM 3 -> 5 px) and stretches radially towards the corners."""
    shape = (1024, 1024)
    psf_at = psf_scenes.varying_psf(
        shape, fwhm_centre=3.0, fwhm_corner=5.0, e_corner=0.25, beta=3.0
    )
    return psf_scenes.make_scene(shape, psf_at, n_stars=600, seed=5)


@pytest.fixture(scope="module")
def small_scene():
    """256^2 with few stars: quick checks of the interface and of the star-count errors."""
    return psf_scenes.make_scene(
        (256, 256), n_stars=70, n_hot=5, n_saturated=1, n_border=2, nan_columns=0, seed=7
    )


@pytest.fixture(scope="module")
def small_fit(small_scene):
    return gd.psf.fit_psf(small_scene.image)


def _nearest(stars, x, y):
    """Row of the detection nearest to (x, y) and its distance."""
    distance = np.hypot(np.asarray(stars["x"]) - x, np.asarray(stars["y"]) - y)
    row = int(np.argmin(distance))
    return row, float(distance[row])


# --- accuracy -------------------------------------------------------------------------------------


def test_moffat_psf_recovered(moffat_scene, moffat_fit):
    truth = moffat_scene.true_psf(0, 0)
    assert isinstance(moffat_fit, PSFEstimate)
    assert moffat_fit.model == "moffat"
    psf = moffat_fit.psf
    assert psf.ndim == 2 and psf.shape[0] == psf.shape[1] and psf.shape[0] % 2 == 1
    assert psf.shape[0] >= 15
    assert psf.sum() == pytest.approx(1.0)
    assert psfs_l2(psf, truth) <= L2_TOLERANCE
    parameters = moffat_fit.parameters_at(500, 500)
    assert set(parameters) == {"fwhm", "ratio", "angle", "beta"}
    assert parameters["fwhm"] == pytest.approx(3.5, rel=0.03)
    assert parameters["ratio"] == pytest.approx(0.8, abs=0.03)
    assert parameters["angle"] == pytest.approx(30.0, abs=3.0)
    assert parameters["beta"] == pytest.approx(3.0, rel=0.15)
    assert moffat_fit.background == pytest.approx(moffat_scene.sky, rel=0.1)
    # Sky 800 e- plus read noise 6 e-: sigma near 29 e-, a little more where the nebula lies.
    assert 25 < moffat_fit.noise < 40


def psfs_l2(psf, truth) -> float:
    return psf_scenes.relative_l2(psf, truth, size=15)


def test_gaussian_psf_and_wrapped_angle(gaussian_scene):
    result = gd.psf.fit_psf(gaussian_scene.image, model="gaussian")
    assert result.model == "gaussian"
    assert psfs_l2(result.psf, gaussian_scene.true_psf(0, 0)) <= L2_TOLERANCE
    parameters = result.parameters_at(100, 900)
    assert parameters["angle"] == pytest.approx(125.0, abs=3.0)
    assert parameters["ratio"] == pytest.approx(0.7, abs=0.03)
    assert parameters["fwhm"] == pytest.approx(4.0, rel=0.03)
    assert math.isnan(parameters["beta"])
    assert np.isnan(result.stars["beta"]).all()
    used = result.stars[result.stars["used"]]
    assert ((used["angle"] >= 0) & (used["angle"] < 180)).all()
    # Individual angles straddle nothing: 125 is far from the wrap at 0/180.
    assert np.median(used["angle"]) == pytest.approx(125.0, abs=3.0)


def test_empirical_psf_recovered(moffat_scene):
    result = gd.psf.fit_psf(moffat_scene.image, model="empirical")
    assert result.model == "empirical"
    assert result.psf.sum() == pytest.approx(1.0)
    assert (result.psf >= 0).all()
    assert psfs_l2(result.psf, moffat_scene.true_psf(0, 0)) <= L2_TOLERANCE


def test_empirical_psf_follows_what_the_model_misses(gaussian_scene):
    """Gaussian stars: the Moffat model alone (beta runs to its bound) is a few % off; the
    stacked residuals take the empirical PSF much closer."""
    result = gd.psf.fit_psf(gaussian_scene.image, model="empirical")
    truth = gaussian_scene.true_psf(0, 0)
    k = result.psf.shape[0]
    moffat_alone = estimate._render(result.parameters_at(511.5, 511.5), "moffat", k)
    assert psfs_l2(moffat_alone, truth) > 0.015
    assert psfs_l2(result.psf, truth) < psfs_l2(moffat_alone, truth) / 3


def test_field_nodes_match_the_truth(field_scene):
    result = gd.psf.fit_psf(field_scene.image, grid=(3, 3))
    field = result.psf
    assert isinstance(field, PSFField)
    assert field.grid == (3, 3) and field.image_shape == (1024, 1024)
    assert result.grid == (3, 3)
    errors = []
    for a, y in enumerate(field.node_rows()):
        for b, x in enumerate(field.node_cols()):
            errors.append(psfs_l2(field.psfs[a, b], field_scene.true_psf(y, x)))
            truth = field_scene.psf_at(y, x)
            assert result.parameters_at(y, x)["fwhm"] == pytest.approx(truth["fwhm"], rel=0.04)
    assert max(errors) <= L2_TOLERANCE, np.round(errors, 4)
    # The field varies: a single PSF for the whole image misses the corners.
    centre = field.psfs[1, 1]
    corner_truth = field_scene.true_psf(field.node_rows()[0], field.node_cols()[0])
    assert psfs_l2(centre, corner_truth) > 2 * max(errors)


def test_empirical_field_nodes_match_the_truth(field_scene):
    field = gd.estimate_psf(field_scene.image, grid=(3, 3), model="empirical")
    assert isinstance(field, PSFField) and field.grid == (3, 3)
    errors = [
        psfs_l2(field.psfs[a, b], field_scene.true_psf(y, x))
        for a, y in enumerate(field.node_rows())
        for b, x in enumerate(field.node_cols())
    ]
    assert max(errors) <= L2_TOLERANCE, np.round(errors, 4)


def test_empirical_field_needs_stars_around_each_node(field_scene):
    """Stars only in the left half: the right-hand node has none to stack."""
    image = field_scene.image[:512, :512].copy()
    image[:, 256:] = np.nan
    with pytest.raises(gd.GpudeconvError, match=r"PSF node \(0, 2\).*only 0 usable stars"):
        gd.estimate_psf(image, grid=(1, 3), model="empirical")
    # The Moffat field extrapolates its (clamped) polynomial instead.
    field = gd.estimate_psf(image, grid=(1, 3))
    assert field.grid == (1, 3)


def test_robust_estimate_beats_a_naive_average(moffat_scene, moffat_fit):
    """Free fits of every detection (hot pixels, saturated and blended stars included),
    averaged without rejection, miss by more than 10 %; the robust estimate does not."""
    truth = moffat_scene.true_psf(0, 0)
    image = moffat_scene.image.astype(np.float64) - moffat_fit.background
    fitter = estimate._StarFitter("moffat", 3.5)
    shapes = []
    for row in moffat_fit.stars:
        window = estimate._window(image.shape, row["x"], row["y"], 7)
        if window is None or not np.isfinite(image[window]).all():
            continue
        fit = fitter(image, window, row["x"], row["y"])
        if fit is not None:
            fwhm, ratio, angle = estimate._shape_of(fit["fwhm_mean"], fit["e1"], fit["e2"])
            shapes.append((fwhm, ratio, angle, fit["beta"]))
    assert len(shapes) > 0.9 * moffat_fit.found
    fwhm, ratio, angle, beta = np.mean(shapes, axis=0)
    naive = psf_scenes.true_psf({"fwhm": fwhm, "ratio": ratio, "angle": angle, "beta": beta})
    naive_error = psfs_l2(naive, truth)
    robust_error = psfs_l2(moffat_fit.psf, truth)
    assert naive_error > 0.10
    assert robust_error < naive_error / 5


# --- the report of stars -------------------------------------------------------------------------


def test_stars_table(moffat_fit):
    stars = moffat_fit.stars
    expected = ["x", "y", "flux", "peak", "fwhm", "ratio", "angle", "beta", "used", "reason"]
    assert stars.colnames == expected
    assert moffat_fit.found == len(stars)
    assert moffat_fit.used == int(stars["used"].sum()) > 200
    assert set(moffat_fit.rejected) == set(estimate.REJECTION_REASONS)
    assert moffat_fit.found == moffat_fit.used + sum(moffat_fit.rejected.values())
    reasons = set(stars["reason"])
    assert reasons <= {"", *estimate.REJECTION_REASONS}
    assert (stars["used"] == (stars["reason"] == "")).all()
    used = stars[stars["used"]]
    assert np.isfinite(used["fwhm"]).all() and (used["ratio"] <= 1).all()
    assert ((used["angle"] >= 0) & (used["angle"] < 180)).all()
    assert (used["beta"] == used["beta"][0]).all()  # fitted with beta fixed at the shared value
    # Shape columns are NaN only where no fit could be made.
    unfitted = ~np.isfinite(stars["fwhm"])
    assert set(stars["reason"][unfitted]) <= {"edge or no-data"}
    # Every clean star of the scene is found: the flux range reaches down to ~5 sigma.
    assert moffat_fit.found > 400


def test_hot_pixels_are_too_sharp(moffat_scene, moffat_fit):
    stars = moffat_fit.stars
    matched = [_nearest(stars, x, y) for x, y in moffat_scene.hot]
    matched = [row for row, distance in matched if distance < 1.5]
    assert len(matched) >= 0.9 * len(moffat_scene.hot)
    assert all(stars["reason"][row] == "too sharp" for row in matched)
    assert moffat_fit.rejected["too sharp"] >= len(matched)


def test_saturated_stars_are_refused_once(moffat_scene, moffat_fit):
    stars = moffat_fit.stars
    for x, y in moffat_scene.saturated:
        near = np.hypot(stars["x"] - x, stars["y"] - y) < 6
        assert near.sum() == 1  # found several times on its flat top, listed once
        assert stars["reason"][near][0] == "saturated"
    assert moffat_fit.rejected["saturated"] == len(moffat_scene.saturated)


def test_close_pair_is_blended(moffat_scene, moffat_fit):
    for x, y in moffat_scene.pair:
        row, distance = _nearest(moffat_fit.stars, x, y)
        assert distance < 1.5
        assert moffat_fit.stars["reason"][row] == "blended"


def test_stars_at_the_border_or_nan_are_refused(moffat_scene, moffat_fit):
    stars = moffat_fit.stars
    found = 0
    for x, y in moffat_scene.border:
        row, distance = _nearest(stars, x, y)
        if distance < 3:
            found += 1
            assert stars["reason"][row] == "edge or no-data"
    assert found >= len(moffat_scene.border) // 2


def test_flat_fielded_saturated_star_is_refused(small_scene, small_fit):
    """After a flat field the clipped pixels no longer share one value, nor the image's
    maximum: the star's flat top still gives it away."""
    ((x, y),) = small_scene.saturated
    row, _ = _nearest(small_fit.stars, x, y)
    assert small_fit.stars["reason"][row] == "saturated"
    rows, cols = np.indices(small_scene.image.shape, dtype=np.float32)
    flattened = small_scene.image * (1.0 + 2e-4 * cols + 3e-4 * rows)
    assert np.count_nonzero(flattened == np.nanmax(flattened)) < 3
    result = gd.psf.fit_psf(flattened)
    row, distance = _nearest(result.stars, x, y)
    assert distance < 3
    assert result.stars["reason"][row] == "saturated"


def test_saturation_level_given(small_scene, small_fit):
    """A given level refuses stars that reach it even when the data are not clipped."""
    default = small_fit
    level = float(np.percentile(default.stars["peak"][default.stars["used"]], 80))
    lowered = gd.psf.fit_psf(small_scene.image, saturation=level + small_scene.sky)
    assert lowered.rejected["saturated"] > default.rejected["saturated"]
    assert lowered.used < default.used


# --- interface --------------------------------------------------------------------------------


def test_estimate_psf_is_fit_psf_psf(small_scene, small_fit):
    psf = gd.estimate_psf(small_scene.image)
    np.testing.assert_array_equal(psf, small_fit.psf)
    assert gd.estimate_psf is estimate.estimate_psf


def test_colour_image_measured_on_the_channel_sum(small_scene, small_fit):
    grey = small_fit
    weights = np.array([0.3, 0.5, 0.2], dtype=np.float32)
    colour = weights[:, None, None] * small_scene.image[None]
    result = gd.psf.fit_psf(colour)
    np.testing.assert_allclose(result.psf, grey.psf, atol=1e-5)
    assert result.image_shape == small_scene.image.shape


class _DeviceArray:
    """What ``gpudeconv.backend.is_cupy_array`` takes for a CuPy array (a host copy inside)."""

    __module__ = "cupy"
    __cuda_array_interface__: dict = {}

    def __init__(self, host):
        self._host = host

    def get(self):
        return self._host.copy()


def test_device_array_is_moved_to_the_host(small_scene, small_fit):
    result = gd.psf.fit_psf(_DeviceArray(small_scene.image))
    assert isinstance(result.psf, np.ndarray)
    np.testing.assert_array_equal(result.psf, small_fit.psf)


def test_size_option(small_scene):
    result = gd.psf.fit_psf(small_scene.image, size=31)
    assert result.psf.shape == (31, 31)


# --- errors -----------------------------------------------------------------------------------


def test_blank_image_says_no_stars():
    blank = np.full((256, 256), 1000.0, dtype=np.float32)
    with pytest.raises(gd.GpudeconvError, match=r"no stars.*--psf-fwhm"):
        gd.estimate_psf(blank)


def test_noise_only_image_says_no_stars():
    noise = np.random.default_rng(3).normal(1000.0, 30.0, (512, 512)).astype(np.float32)
    with pytest.raises(gd.GpudeconvError, match=r"stars.*--psf-fwhm"):
        gd.estimate_psf(noise)


def test_all_nan_image():
    with pytest.raises(gd.GpudeconvError, match="no data"):
        gd.estimate_psf(np.full((128, 128), np.nan))


def test_image_too_small():
    with pytest.raises(gd.GpudeconvError, match="too small"):
        gd.estimate_psf(np.ones((20, 200)))


@pytest.mark.parametrize("model", ["airy", "", None, 3])
def test_bad_model(model):
    with pytest.raises(gd.GpudeconvError, match="model must be one of"):
        gd.estimate_psf(np.ones((64, 64)), model=model)


@pytest.mark.parametrize("grid", [(0, 3), (3,), "3x3", (2.5, 2), (300, 2)])
def test_bad_grid(grid):
    with pytest.raises(gd.GpudeconvError, match="grid"):
        gd.estimate_psf(np.ones((64, 64)), grid=grid)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"saturation": float("nan")}, "saturation must be"),
        ({"saturation": "high"}, "saturation must be"),
        ({"size": 24}, "size must be an odd integer"),
        ({"size": 1}, "size must be an odd integer"),
    ],
)
def test_bad_options(options, match):
    with pytest.raises(gd.GpudeconvError, match=match):
        gd.psf.fit_psf(np.ones((64, 64)), **options)


def test_bad_image_shape():
    with pytest.raises(gd.GpudeconvError, match=r"2-D \(H, W\)"):
        gd.estimate_psf(np.ones((2, 3, 64, 64)))


def test_grid_too_fine_for_the_stars(small_scene, small_fit):
    usable = small_fit.used
    side = math.isqrt(usable // estimate.STARS_PER_NODE)
    with pytest.raises(gd.GpudeconvError) as caught:
        gd.psf.fit_psf(small_scene.image, grid=(side + 1, side + 1))
    message = str(caught.value)
    assert "\n" not in message
    assert f"{usable} usable stars" in message
    assert f"at least {estimate.STARS_PER_NODE * (side + 1) ** 2}" in message
    assert f"up to {side}x{side}" in message
    # ... and the grid it suggests works.
    field = gd.psf.fit_psf(small_scene.image, grid=(side, side)).psf
    assert field.grid == (side, side)


def test_channel_last_colour_is_named():
    image = np.zeros((64, 80, 3), np.float32)
    with pytest.raises(gd.GpudeconvError, match=r"channel-last colour \(H, W, C\).*moveaxis"):
        gd.psf.fit_psf(image)


def test_saturated_stars_are_found_after_a_flat_field(moffat_scene):
    """Clipped cores that a flat field (0.3% pixel scatter) has scaled apart are no longer at
    one value: they are still the saturation plateau."""
    rng = np.random.default_rng(0)
    flat = rng.normal(1.0, 0.003, moffat_scene.image.shape).astype(np.float32)
    fit = gd.psf.fit_psf(moffat_scene.image * flat)
    assert fit.rejected["saturated"] == len(moffat_scene.saturated)
