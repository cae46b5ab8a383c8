"""The noise model of a plane (sky, sky noise, Poisson-plus-Gaussian offset and gain) and the
saturation level, on synthetic scenes of known sky, gain and read noise."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from gpudeconv import GpudeconvError
from gpudeconv.restore.noise import NoiseModel, estimate_noise, saturation_level
from gpudeconv.synthetic import make_scene

SHAPE = (512, 512)


def with_glow(scene, gain, *, peak, seed=0):
    """The scene with a bright round nebula (Gaussian, sigma 48 px) added with its own photon
    noise at the scene's gain: levels from the sky to ``peak`` above it for a photon-transfer
    fit, while most of the frame stays sky. Poisson sums are Poisson, so the total still has
    var = (E[d] + r**2 / g) / g."""
    rng = np.random.default_rng(seed + 100)
    rows, cols = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]]
    yc, xc = rng.uniform(0.35, 0.65, 2) * np.array(SHAPE)
    glow = peak * np.exp(-((rows - yc) ** 2 + (cols - xc) ** 2) / (2 * 48.0**2))
    return scene.observed + (rng.poisson(glow * gain) / gain).astype(np.float32)


CAMERAS = [  # (sky ADU, gain e-/ADU, read noise e-): sky-dominated to read-noise-dominated
    (100.0, 1.0, 5.0),
    (1000.0, 2.0, 5.0),
    (20.0, 4.0, 10.0),
    (5.0, 1.0, 8.0),
    (50.0, 0.5, 6.0),
]


@pytest.mark.parametrize(("sky", "gain", "read_noise"), CAMERAS)
def test_photon_transfer_recovers_the_camera(sky, gain, read_noise):
    scene = make_scene(SHAPE, sky=sky, gain=gain, read_noise=read_noise, seed=3)
    offset = read_noise**2 / gain
    peak = 4 * (sky + offset)  # the nebula quintuples the variance at its peak
    model = estimate_noise(with_glow(scene, gain, peak=peak, seed=3))
    assert isinstance(model, NoiseModel)
    assert model.source == "photon-transfer"
    assert abs(model.background - sky) < 0.2 * scene.noise_sigma
    assert model.sigma == pytest.approx(scene.noise_sigma, rel=0.05)
    assert model.gain == pytest.approx(gain, rel=0.1)
    assert model.offset >= 0
    # The model's variance across the levels: at the sky (by construction) and at the peak.
    for level in (sky, sky + peak):
        predicted = (level + model.offset) / model.gain
        assert predicted == pytest.approx((level + offset) / gain, rel=0.1)


def test_faint_nebula_falls_back_to_a_photon_dominated_sky():
    """make_scene's nebula peaks at 3 sigma: too little range for a reliable fit."""
    scene = make_scene(SHAPE, sky=300.0, gain=2.0, read_noise=4.0, seed=1)
    model = estimate_noise(scene.observed)
    assert model.source == "sky"
    assert abs(model.background - scene.sky) < 0.1 * scene.noise_sigma
    assert model.sigma == pytest.approx(scene.noise_sigma, rel=0.05)
    assert model.offset == 0.0
    assert model.gain == pytest.approx(model.background / model.sigma**2)
    # Read noise is 8 % of the sky's variance here: the photon-only gain is close.
    assert model.gain == pytest.approx(2.0, rel=0.15)


@pytest.mark.parametrize("nebula", [False, True])
def test_sky_subtracted_data_gets_a_positive_equivalent_sky(nebula):
    scene = make_scene(SHAPE, sky=100.0, gain=1.0, read_noise=5.0, nebula=nebula, seed=2)
    model = estimate_noise(scene.observed - np.float32(scene.sky))
    assert model.source == "sky-subtracted"
    assert abs(model.background) < 0.1 * scene.noise_sigma
    assert model.sigma == pytest.approx(scene.noise_sigma, rel=0.05)
    assert model.background + model.offset == pytest.approx(3 * model.sigma)
    assert model.gain == pytest.approx(3 / model.sigma)


def test_sky_subtracted_with_a_bright_nebula_finds_the_lost_sky_by_photon_transfer():
    scene = make_scene(SHAPE, sky=100.0, gain=1.0, read_noise=5.0, seed=4)
    observed = with_glow(scene, 1.0, peak=500.0, seed=4) - np.float32(scene.sky)
    model = estimate_noise(observed)
    assert model.source == "photon-transfer"
    # The sky removed and the read noise come back together as the offset: 100 + 25.
    assert model.offset == pytest.approx(125.0, rel=0.2)
    assert model.gain == pytest.approx(1.0, rel=0.2)


def test_given_camera_and_background_are_honoured():
    scene = make_scene(SHAPE, sky=100.0, gain=1.0, read_noise=5.0, seed=5)
    model = estimate_noise(scene.observed, read_noise=6.0, gain=1.5)
    assert model.source == "given"
    assert model.offset == pytest.approx(36.0 / 1.5)
    assert model.gain == 1.5
    assert model.sigma == pytest.approx(scene.noise_sigma, rel=0.05)
    assert estimate_noise(scene.observed, background=97.5).background == 97.5
    given = estimate_noise(scene.observed, background=0, read_noise=0, gain=2)
    assert (given.background, given.offset, given.gain) == (0.0, 0.0, 2.0)


def test_nan_borders_and_infinite_pixels_are_ignored():
    plain = make_scene(SHAPE, sky=200.0, seed=6)
    bordered = make_scene(SHAPE, sky=200.0, seed=6, nan_border=20).observed
    bordered[100:110, 300] = np.inf  # no-data too
    model = estimate_noise(bordered)
    reference = estimate_noise(plain.observed)
    assert all(np.isfinite([model.background, model.sigma, model.offset, model.gain]))
    assert abs(model.background - reference.background) < 0.05 * plain.noise_sigma
    assert model.sigma == pytest.approx(reference.sigma, rel=0.02)
    assert model.sigma == pytest.approx(plain.noise_sigma, rel=0.05)


def test_a_gradient_does_not_count_as_noise():
    """Sky glow rising 300 ADU across the frame: each box's plane is fitted out."""
    scene = make_scene(SHAPE, sky=100.0, seed=7, nebula=False)
    ramp = np.linspace(0, 300, SHAPE[1], dtype=np.float32)[None, :]
    model = estimate_noise(scene.observed + ramp)
    assert model.sigma == pytest.approx(scene.noise_sigma, rel=0.05)


def test_integer_small_and_noiseless_planes():
    scene = make_scene((64, 48), sky=500.0, seed=8)
    counts = np.round(scene.observed).astype(np.uint16)
    model = estimate_noise(counts)
    assert model.sigma == pytest.approx(scene.noise_sigma, rel=0.15)
    tiny = estimate_noise(scene.observed[:12, :10])
    assert np.isfinite(tiny.sigma) and tiny.sigma > 0
    flat = estimate_noise(np.full((40, 40), 7.0, dtype=np.float32))
    assert flat.background == 7.0
    assert 0 < flat.sigma < 1e-4 and np.isfinite(flat.gain)


def test_bad_input_is_one_line_error():
    plane = np.ones((40, 40), dtype=np.float32)
    cases = [
        ((np.full((40, 40), np.nan, dtype=np.float32),), {}, "has no data"),
        ((np.ones((3, 40, 40)),), {}, "one 2-D image plane"),
        ((plane.astype(complex),), {}, "real numbers"),
        ((plane,), {"read_noise": 5.0}, "give both"),
        ((plane,), {"gain": 2.0}, "give both"),
        ((plane,), {"read_noise": 5.0, "gain": 0}, "gain must be a positive"),
        ((plane,), {"read_noise": True, "gain": 1.0}, "read_noise must be a non-negative"),
        ((plane,), {"read_noise": -1.0, "gain": 1.0}, "read_noise must be a non-negative"),
        ((plane,), {"background": np.nan}, "background must be a finite"),
        ((plane,), {"background": "sky"}, "background must be a finite"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(GpudeconvError, match=message) as caught:
            estimate_noise(*args, **kwargs)
        assert "\n" not in str(caught.value)


# ---------------------------------------------------------------------------------- saturation


def test_saturation_plateau_is_found():
    scene = make_scene(SHAPE, sky=100.0, seed=9, saturation=3000.0, nan_border=8)
    clipped = scene.observed == np.float32(3000.0)
    assert clipped.sum() >= 4  # the scene has saturated stars
    level = saturation_level(scene.observed)
    assert 3000.0 * (1 - 1e-4) < level < 3000.0
    assert np.array_equal(scene.observed >= level, clipped)


def test_unsaturated_scenes_have_no_plateau():
    for seed in range(4):
        assert saturation_level(make_scene(SHAPE, seed=seed).observed) is None


def test_quantized_unclipped_data_is_not_a_plateau():
    """An 8-bit planet: many pixels share the maximum value, but fewer than the level below."""
    rng = np.random.default_rng(10)
    rows, cols = np.mgrid[0:200, 0:200]
    disk = np.where(np.hypot(rows - 100, cols - 100) < 70, 180.0, 20.0)

    def eight_bit(light):
        return np.round(np.clip(light + rng.normal(0, 0.8, light.shape), 0, 255)).astype(np.uint8)

    unclipped = eight_bit(disk)
    assert unclipped.max() < 255 and (unclipped == unclipped.max()).sum() >= 4
    assert saturation_level(unclipped) is None
    assert 255 * (1 - 1e-4) < saturation_level(eight_bit(disk * 1.45)) < 255


def test_header_keyword_wins_over_plateau_and_given_level_over_all():
    scene = make_scene(SHAPE, sky=100.0, seed=9, saturation=3000.0)
    header = fits.Header()
    header["SATURATE"] = 18000.0
    header["DATAMAX"] = 19000.0
    assert saturation_level(scene.observed, header=header) == 18000.0
    assert saturation_level(scene.observed, header={"DATAMAX": 19000}) == 19000.0
    unsaturated = make_scene(SHAPE, seed=1).observed
    assert saturation_level(unsaturated, header={"DATAMAX": 65535}) == 65535.0
    assert saturation_level(scene.observed, header={"SATURATE": "n/a"}) < 3000.0
    assert saturation_level(scene.observed, header=header, level=15000) == 15000.0


def test_bad_saturation_level_is_refused():
    plane = np.ones((8, 8), dtype=np.float32)
    for bad in (np.nan, np.inf, "high", True):
        with pytest.raises(GpudeconvError, match="saturation must be a finite level"):
            saturation_level(plane, level=bad)
