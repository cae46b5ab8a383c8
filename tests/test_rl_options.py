"""The options of Richardson-Lucy (noise model, TV, damping, acceleration, stopping, masks,
deringing, luminance) against independent float64 references and their promised behaviour."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.ndimage
import scipy.signal
from helpers import reference_regularized_rl, star_field, to_numpy

import gpudeconv as gd
from gpudeconv import GpudeconvError
from gpudeconv.restore import rl
from gpudeconv.restore.noise import NoiseModel
from gpudeconv.synthetic import make_scene

PSF = gd.psf.gaussian(3.0, size=13)  # the blur of star_field


def field(seed=1):
    return star_field(seed=seed, sky=200.0)


def given_model(image) -> NoiseModel:
    """A fixed noise model for ``image`` (the references need the same numbers)."""
    return NoiseModel(background=200.0, sigma=15.0, offset=9.0, gain=1.0, source="given")


def inner_error(result, reference, margin=16):
    inner = (slice(margin, -margin), slice(margin, -margin))
    return np.max(np.abs(result[inner] - reference[inner])) / np.max(np.abs(reference[inner]))


@pytest.mark.parametrize(
    ("known", "tv", "damping"),
    [
        (None, 0.0, None),
        (200.0, 0.0, None),
        (None, 0.01, None),
        (200.0, 0.0, 1.0),
        (None, 0.005, 2.0),
    ],
    ids=str,
)
def test_variants_match_float64_reference(backend, known, tv, damping):
    image = field()
    model = given_model(image)
    result = gd.richardson_lucy(
        backend.asarray(image),
        PSF,
        12,
        backend=backend,
        noise=model,
        background=known,
        regularization=tv,
        damping=damping,
    )
    reference = reference_regularized_rl(
        image,
        PSF,
        12,
        background=known or 0.0,
        offset=model.offset,
        gain=model.gain,
        sigma=model.sigma,
        tv=tv,
        damping=damping,
    )
    assert inner_error(to_numpy(result), reference) <= 2e-3


def test_damping_of_sky_subtracted_data_matches_float64_reference(backend):
    """Sky-subtracted data (no zero point, a large offset): the damped ratio's statistic is
    Pearson's chi-square on the offset's share of the model, the deviance on the rest."""
    image = field() - np.float32(200.0)
    model = NoiseModel(background=0.0, sigma=15.0, offset=45.0, gain=0.2, source="given")
    options = {"background": 0.0, "offset": 45.0, "gain": 0.2, "sigma": 15.0}
    result = gd.richardson_lucy(
        backend.asarray(image), PSF, 12, backend=backend, noise=model, damping=1.0
    )
    reference = reference_regularized_rl(image, PSF, 12, damping=1.0, **options)
    assert inner_error(to_numpy(result), reference) <= 2e-3
    # on the faint sky too, where the statistics differ (the deviance alone: 2.5 ADU off)
    inner = (slice(16, -16), slice(16, -16))
    assert np.max(np.abs(to_numpy(result)[inner] - reference[inner])) <= 0.02 * model.sigma


#: The PSF of a sky-subtracted deep-sky frame: make_scene's sky 100 ADU, read noise 5 e, gain 1
#: (sigma 11.2 ADU), its median subtracted. The noise model lifts it by about 3 sigma (offset
#: ~35 ADU, ~9 counts), whose Poisson skew is 5 times that of the sky's true noise.
SKY_PSF = gd.psf.moffat(4.0, beta=3.0, size=25)


def test_damping_keeps_the_sky_of_sky_subtracted_data(backend):
    """White's deviance alone pulled the sky of sky-subtracted frames down (0.15 sigma below
    the truth and 0.09 sigma below plain RL after 10 iterations here, a sixth of the frame's
    light): its asymmetry fits Poisson counts, not the nearly Gaussian noise that the offset
    stands for."""
    scene = make_scene((192, 192), seed=1, psf=SKY_PSF)
    level = np.float32(np.median(scene.observed))
    image = scene.observed - level
    sky = scene.truth < 0.5
    sigma = scene.noise_sigma

    def restored(**options):
        return to_numpy(
            gd.richardson_lucy(backend.asarray(image), SKY_PSF, 10, backend=backend, **options)
        )

    plain, damped = restored(noise="auto"), restored(damping=rl.DEFAULT_DAMPING)
    truth = scene.truth + scene.sky - level
    sky_error = float(np.median((damped - truth)[sky]))
    assert abs(sky_error) < 0.05 * sigma  # was -0.15 sigma
    # the sky's median moves no further down than plain RL moves it (was 0.09 sigma further)
    assert np.median(damped) >= np.median(plain) - 0.01 * sigma
    # and the frame's light within 0.06 sigma a pixel (+0.04 sigma; was -0.09 sigma)
    assert abs(float(np.mean(damped - truth))) < 0.06 * sigma


def test_damping_of_raw_frames_is_whites_deviance(backend, monkeypatch):
    """A raw frame's photon-dominated sky has no offset: the damped ratio gets offset 0, which
    is White's deviance bit for bit (test_backend), so raw frames restore as before."""
    scene = make_scene((96, 96), seed=2, psf=SKY_PSF)
    passed = []
    ratio = backend.rl_ratio

    def recording(*args, damping=None, **kwargs):
        passed.append(damping)
        return ratio(*args, damping=damping, **kwargs)

    monkeypatch.setattr(backend, "rl_ratio", recording)
    gd.richardson_lucy(
        backend.asarray(scene.observed), SKY_PSF, 3, backend=backend, damping=rl.DEFAULT_DAMPING
    )
    assert len(passed) == 3 and all(damping[2] == 0.0 for damping in passed)


def test_noise_model_keeps_a_flat_sky_flat(backend):
    rng = np.random.default_rng(3)
    image = (200.0 + rng.normal(0, 1e-3, (96, 112))).astype(np.float32)
    model = NoiseModel(background=200.0, sigma=1.0, offset=0.0, gain=200.0, source="given")
    result = to_numpy(
        gd.richardson_lucy(
            backend.asarray(image), PSF, 20, backend=backend, noise=model, background=200.0
        )
    )
    assert np.all(np.abs(result - 200.0) < 0.15)  # held at the sky, within a tenth of sigma


def checkerboard(image) -> float:
    """The amplitude of the finest pattern, ``mean((-1)^(i+j) u)``."""
    rows, cols = np.indices(image.shape)
    return abs(float(np.mean(np.where((rows + cols) % 2, -1.0, 1.0) * image)))


def test_tv_leaves_noise_free_flat_areas_flat(backend):
    # A flat frame with a clipped plateau, no noise (a saturated core, smooth high-SNR lunar
    # detail): TV's gradients there are all under its floor. With a floor of a tenth of the noise
    # alone the explicit TV step overshot and grew a checkerboard (1.6e-3 of the level on the
    # flat, 8e-3 on the plateau at strength 0.02); 8 tv u as the floor damps it.
    image = np.full((160, 176), 1000.0, np.float32)
    image[60:100, 70:110] = 3000.0
    psf = gd.psf.moffat(4.0, beta=3.0, size=25)
    for strength in (0.005, 0.02):
        result = to_numpy(
            gd.richardson_lucy(
                backend.asarray(image), psf, 50, backend=backend, regularization=strength
            )
        )
        assert checkerboard(result[4:34, 4:44]) < 1e-6 * 1000.0
        assert checkerboard(result[64:96, 74:106]) < 1e-5 * 3000.0
        assert np.ptp(result[4:34, 4:44]) < 3e-4 * 1000.0  # and flat (plain RL: 3e-5)


def test_deringing_holds_the_rings_next_to_no_data_too(backend):
    # Two equal bright stars on a 200 ADU sky, one 8 px from a mosaic's no-data edge. The
    # envelope is a local minimum of the data: with no-data read as 0 it fell to 0 within a PSF
    # of the edge, and that star's dark ring kept 93 ADU of 200 where the other kept 171.
    rng = np.random.default_rng(0)
    psf = gd.psf.moffat(4.0, beta=3.0, size=25)
    truth = np.full((120, 200), 200.0)
    truth[30, 50] += 2e5
    truth[80, 150] += 2e5
    blurred = scipy.signal.fftconvolve(truth, psf, mode="same")
    image = rng.poisson(np.maximum(blurred, 0)).astype(np.float32)
    image[:22, :100] = np.nan
    rows, cols = np.indices(image.shape)

    def ring_floor(result, y, x):
        ring = (np.hypot(rows - y, cols - x) > 3) & (np.hypot(rows - y, cols - x) < 10)
        return float(np.nanmin(result[ring]))

    result = to_numpy(
        gd.richardson_lucy(backend.asarray(image), psf, 50, backend=backend, dering=1)
    )
    near, far = ring_floor(result, 30, 50), ring_floor(result, 80, 150)
    assert far > 150  # deringing works away from the edge (plain RL: 36)
    assert near > 0.95 * far
    assert np.isnan(result[:22, :100]).all() and np.isfinite(result[22:]).all()


def test_auto_noise_lifts_sky_subtracted_data_by_its_photon_level(backend):
    # Sky-subtracted data lost its zero point: the noise model's offset puts the sky back at
    # the level its noise says, so RL neither drives the sky's dips to 0 nor leaves it there.
    image = field(seed=4) - 200.0
    sky = (slice(0, 40), slice(120, 176))
    restored, info = gd.richardson_lucy(
        backend.asarray(image), PSF, 30, backend=backend, noise="auto", return_info=True
    )
    restored = to_numpy(restored)
    model = info.channels[0].noise
    assert abs(model.background) < 0.5 * model.sigma
    assert model.offset >= 3 * model.sigma - model.background - 1e-6
    assert abs(np.median(restored[sky]) - np.median(image[sky])) < 0.5 * model.sigma
    assert np.mean(restored[sky] < np.median(image[sky]) - 2 * model.sigma) > 0.01
    assert len(info.channels[0].data_term) == 30


def test_acceleration_fits_faster(backend):
    image = field(seed=5)
    _, slow = gd.richardson_lucy(image, PSF, 20, backend=backend, noise="auto", return_info=True)
    _, fast = gd.richardson_lucy(
        image, PSF, 20, backend=backend, noise="auto", accelerate=True, return_info=True
    )
    assert fast.channels[0].data_term[-1] < slow.channels[0].data_term[-1]
    result = to_numpy(gd.richardson_lucy(image, PSF, 20, backend=backend, accelerate=True))
    assert np.all(np.isfinite(result)) and result.min() >= -1e-3


def test_stop_rules_end_early_and_say_why(backend):
    image = field(seed=6)
    _, info = gd.richardson_lucy(
        image, PSF, 200, backend=backend, stop="change", tolerance=5e-3, return_info=True
    )
    assert info.stopped == "change" and 1 < info.iterations < 200
    _, info = gd.richardson_lucy(
        image, PSF, 200, backend=backend, stop="noise", accelerate=True, return_info=True
    )
    assert info.stopped == "noise" and info.iterations < 100
    assert info.channels[0].data_term[-1] <= 1.0 < info.channels[0].data_term[0]
    _, info = gd.richardson_lucy(image, PSF, 3, backend=backend, return_info=True)
    assert info.stopped == "iterations" and info.iterations == 3
    json.dumps(info.to_dict(), allow_nan=False)


def test_saturated_pixels_leave_the_fit(backend):
    image = field(seed=7)
    level = float(np.percentile(image, 99.9))
    clipped = np.minimum(image, level)
    _, info = gd.richardson_lucy(
        clipped, PSF, 5, backend=backend, saturation=level, return_info=True
    )
    masked = info.channels[0].saturated
    assert masked >= np.count_nonzero(clipped >= level)
    _, info = gd.richardson_lucy(
        clipped, PSF, 5, backend=backend, saturation="auto", return_info=True
    )
    assert info.channels[0].saturation == pytest.approx(level, rel=1e-3)


def test_saturated_stars_keep_a_bright_core_and_their_light(backend):
    # Stars clipped at a third of their peaks or less. Their pixels are lower bounds of the
    # light: the restoration may add light there, never take it away. Left out of the fit, the
    # clipped cores came out hollow, under half the level, with a third of the clipped flux.
    truth = star_field(seed=3, n_stars=25, sky=200.0)
    level = float(np.percentile(truth, 99.7))
    clipped = np.minimum(truth, level)
    restored = to_numpy(
        gd.richardson_lucy(backend.asarray(clipped), PSF, 30, backend=backend, saturation=level)
    )
    # each star with the 10 pixels around its clipped core: what RL moves stays inside
    around = scipy.ndimage.binary_dilation(clipped >= level, iterations=10)
    stars, count = scipy.ndimage.label(around)
    assert count >= 5
    labels = np.arange(1, count + 1)

    def light(image):
        return scipy.ndimage.sum(image - 200.0, stars, labels)

    assert np.all(light(restored) >= 0.99 * light(clipped))
    assert light(restored).sum() >= 1.1 * light(clipped).sum()  # some of the clipped light
    assert np.all(light(restored) <= 1.05 * light(truth))  # and invents none
    peaks = scipy.ndimage.maximum_position(truth, stars, labels)
    assert all(restored[peak] >= level for peak in peaks)  # bright, not hollow


@pytest.mark.parametrize("options", [{"dering": 0.5}, {"regularization": 0.01}], ids=str)
def test_a_wide_nodata_border_changes_nothing_inside(backend, options):
    # Plain RL measures its noise level (deringing's allowance, TV's gradient scale) on the
    # data: no-data pixels must not count, or two thirds of no-data made it 0.
    image = field(seed=2)
    bordered = image.copy()
    bordered[:, :116] = np.nan
    inside = (slice(20, -20), slice(136, -20))
    restored = to_numpy(gd.richardson_lucy(bordered, PSF, 20, backend=backend, **options))
    alone = to_numpy(gd.richardson_lucy(image[:, 116:], PSF, 20, backend=backend, **options))
    error = np.abs(restored[inside] - alone[20:-20, 20:-20]).max() / np.ptp(alone)
    assert error <= 1e-4


def test_no_pass_is_made_that_no_option_asked_for(backend, monkeypatch):
    # The data term costs a pass and a device sync an iteration, and the noise level of plain
    # RL a median: neither without an option or return_info that uses it.
    deviances = []
    real = type(backend).rl_deviance

    def counted(self, *args, **kwargs):
        deviances.append(1)
        return real(self, *args, **kwargs)

    def unasked(*args):
        raise AssertionError("the noise level was measured without TV or deringing")

    monkeypatch.setattr(type(backend), "rl_deviance", counted)
    monkeypatch.setattr(rl, "_rough_sigma", unasked)
    image = field(seed=10)
    colour = np.stack([image, 0.8 * image, 0.6 * image])
    gd.richardson_lucy(colour, PSF, 3, backend=backend, luminance=True, noise="auto")
    level = float(np.percentile(image, 99.9))
    gd.richardson_lucy(np.minimum(image, level), PSF, 3, backend=backend, saturation=level)
    assert deviances == []
    _, info = gd.richardson_lucy(
        colour, PSF, 3, backend=backend, luminance=True, noise="auto", return_info=True
    )
    assert len(deviances) == 3 and len(info.channels[0].data_term) == 3
    assert info.options["luminance"] is True


def test_dering_holds_the_estimate_above_its_envelope(backend):
    image = field(seed=8)
    plain = to_numpy(gd.richardson_lucy(image, PSF, 60, backend=backend))
    held = to_numpy(gd.richardson_lucy(image, PSF, 60, backend=backend, dering=1.0))
    # RL digs under the sky next to stars; deringing keeps the minimum near the sky's
    assert held.min() > plain.min()
    assert held.min() > 200.0 - 6 * 15.0


def test_luminance_mode_changes_every_channel_alike(backend):
    channels = np.stack([field(seed=s) * f for s, f in ((9, 1.0), (9, 0.8), (9, 0.6))])
    result = to_numpy(gd.richardson_lucy(channels, PSF, 10, backend=backend, luminance=True))
    change = result - channels
    np.testing.assert_allclose(change[0], change[1], atol=1e-2)
    np.testing.assert_allclose(change[1], change[2], atol=1e-2)
    lum = to_numpy(gd.richardson_lucy(channels.mean(axis=0), PSF, 10, backend=backend))
    np.testing.assert_allclose(result.mean(axis=0), lum, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"regularization": -1}, "regularization must be a finite number >= 0"),
        ({"damping": float("nan")}, "damping must be a finite number >= 0"),
        ({"stop": "never"}, "stop must be None, 'noise' or 'change'"),
        ({"dering": 2}, "dering must be a strength from 0"),
        ({"saturation": "high"}, "saturation must be None, 'auto' or a level"),
        ({"noise": "loud"}, "noise must be None, 'auto' or a NoiseModel"),
        ({"read_noise": 5.0}, "read_noise (electrons) and gain"),
        ({"saturation": 0.0}, "every pixel is at or above the saturation level 0"),
        ({"luminance": True}, "luminance=True restores the luminance of a colour"),
    ],
)
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(GpudeconvError) as caught:
        gd.richardson_lucy(field(), PSF, 2, **options)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_info_without_the_fit_history_costs_no_data_term(backend):
    image = field(seed=11)
    _, info = gd.richardson_lucy(
        image, PSF, 4, backend=backend, noise="auto", return_info=True, record_fit=False
    )
    assert info.iterations == 4 and info.channels[0].data_term == []
    _, info = gd.richardson_lucy(
        image, PSF, 4, backend=backend, accelerate=True, return_info=True, record_fit=False
    )
    assert len(info.channels[0].data_term) == 4  # the acceleration's restart rule needs it
