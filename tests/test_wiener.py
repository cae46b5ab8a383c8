"""Wiener deconvolution on synthetic star fields and a planet: sharper, flux kept, closer to the
truth, tame noise, dtype and colour policies, no-data pixels, errors, CuPy in and out."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.signal
from astropy.stats import sigma_clipped_stats
from helpers import to_numpy
from photutils.aperture import ApertureStats, CircularAnnulus, CircularAperture, aperture_photometry

import gpudeconv as gd
from gpudeconv import GpudeconvError
from gpudeconv.backend import is_cupy_array
from gpudeconv.measure import median_fwhm, select_measurable_stars
from gpudeconv.restore.wiener import wiener
from gpudeconv.synthetic import make_scene

SHAPE = (512, 512)


def planet(shape=(256, 256), *, seed=0, sky=50.0, dtype=np.float32):
    """A planet-like disk (limb darkening, bands, dark spots) of 20000 counts, blurred by a
    Gaussian of FWHM 5 px, with Poisson and read noise: (truth, observed, psf)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    yc, xc, radius = shape[0] / 2, shape[1] / 2, 0.35 * min(shape)
    r = np.hypot(rows - yc, cols - xc) / radius
    limb = np.sqrt(np.clip(1 - r**2, 0, 1)) ** 0.6
    bands = 1 + 0.25 * np.sin(2 * np.pi * (rows - yc) / (radius / 3))
    bands += 0.1 * np.sin(2 * np.pi * (rows - yc) / (radius / 9))
    spots = np.zeros(shape)
    for _ in range(4):
        y, x = rng.uniform(-radius / 2, radius / 2, 2) + (yc, xc)
        width = rng.uniform(1.5, 4)
        spots += 0.4 * np.exp(-((rows - y) ** 2 + (cols - x) ** 2) / (2 * width**2))
    truth = np.where(r < 1, 20000 * limb * (bands - np.clip(spots, 0, 0.6)), 0.0)
    psf = gd.psf.gaussian(5.0)
    padded = np.pad(truth, 20, mode="symmetric")
    blurred = scipy.signal.fftconvolve(padded, psf, mode="same")[20:-20, 20:-20] + sky
    observed = rng.poisson(np.clip(blurred, 0, None)) + rng.normal(0, 3, shape)
    return truth.astype(dtype), observed.astype(dtype), psf


def aperture_flux(image, stars, radius=10):
    """Aperture sums less the annulus median (2 to 2.8 radii) times the aperture's area."""
    xy = np.column_stack([stars["x"], stars["y"]])
    aperture = CircularAperture(xy, r=radius)
    annulus = CircularAnnulus(xy, 2 * radius, 2 * radius + 8)
    sky = ApertureStats(image, annulus).median
    return np.asarray(aperture_photometry(image, aperture)["aperture_sum"] - sky * aperture.area)


def sky_noise(image):
    return sigma_clipped_stats(image, sigma=3.0)[2]


def test_sharpens_stars_with_tame_noise():
    scene = make_scene(SHAPE, seed=0)
    restored = wiener(scene.observed, scene.psf)
    assert restored.dtype == np.float32 and restored.shape == SHAPE
    assert np.isfinite(restored).all()
    stars = select_measurable_stars(
        scene.stars, SHAPE, min_flux=100 * scene.noise_sigma, neighbours=scene.galaxies
    )
    assert len(stars) >= 10
    before, after = median_fwhm(scene.observed, stars), median_fwhm(restored, stars)
    assert after < 0.75 * before  # 4.3 px to about 2.9 px
    # The default keeps the sky noise within 3x (the unfloored optimum here: 8x).
    assert sky_noise(restored) < 3.2 * sky_noise(scene.observed)


def test_keeps_the_flux_of_isolated_stars():
    """At high signal (gain 1e4 e-/ADU) the aperture sums measure the filter, not the noise."""
    scene = make_scene(SHAPE, seed=0, gain=1e4, read_noise=0.0)
    restored = wiener(scene.observed, scene.psf)
    stars = select_measurable_stars(
        scene.stars, SHAPE, min_flux=500.0, isolation=30.0, neighbours=scene.galaxies
    )
    assert len(stars) >= 8
    ratio = aperture_flux(restored, stars) / aperture_flux(scene.observed, stars)
    np.testing.assert_allclose(ratio, 1.0, atol=0.02)
    assert restored.mean() == pytest.approx(scene.observed.mean(), rel=1e-3)


def test_noisy_star_fluxes_are_kept_on_average():
    scene = make_scene(SHAPE, seed=5)
    restored = wiener(scene.observed, scene.psf)
    stars = select_measurable_stars(
        scene.stars, SHAPE, min_flux=300 * scene.noise_sigma, neighbours=scene.galaxies
    )
    ratio = aperture_flux(restored, stars) / aperture_flux(scene.observed, stars)
    assert np.median(ratio) == pytest.approx(1.0, abs=0.02)


def test_restores_a_planet_closer_to_the_truth():
    truth, observed, psf = planet()
    before = np.sqrt(np.mean((observed - 50 - truth) ** 2))
    after = np.sqrt(np.mean((wiener(observed, psf) - 50 - truth) ** 2))
    assert after < 0.5 * before
    constant = np.sqrt(np.mean((wiener(observed, psf, nsr=1e-2) - 50 - truth) ** 2))
    assert constant < 0.6 * before


def test_float64_stays_float64_and_agrees_with_float32():
    truth, observed, psf = planet(dtype=np.float64)
    restored = wiener(observed, psf)
    assert restored.dtype == np.float64
    single = wiener(observed.astype(np.float32), psf)
    assert single.dtype == np.float32
    np.testing.assert_allclose(single, restored, atol=1e-4 * np.ptp(restored))
    assert wiener(np.round(observed).astype(np.uint16), psf).dtype == np.float32


def test_colour_restores_each_channel_alone():
    scenes = [make_scene((160, 176), seed=s, sky=50.0 * (s + 1)) for s in range(3)]
    image = np.stack([scene.observed for scene in scenes])
    psfs = np.stack([gd.psf.moffat(f, size=21) for f in (3.5, 4.0, 4.5)])
    together = wiener(image, psfs, nsr=1e-2)
    assert together.shape == image.shape and together.dtype == np.float32
    for c in range(3):
        alone = wiener(image[c], psfs[c], nsr=1e-2)
        np.testing.assert_allclose(together[c], alone, rtol=1e-6, atol=1e-6 * np.ptp(alone))
    shared = wiener(image, psfs[1])
    np.testing.assert_allclose(shared[2], wiener(image[2], psfs[1]), rtol=1e-6, atol=1e-3)


def test_nodata_pixels_stay_nodata_and_do_not_disturb_the_rest():
    plain = make_scene((256, 256), seed=4)
    bordered = make_scene((256, 256), seed=4, nan_border=16)
    observed = bordered.observed.copy()
    observed[100:103, 120:140] = np.nan  # a masked satellite trail
    restored = wiener(observed, plain.psf, nsr=1e-2)
    assert np.array_equal(np.isnan(restored), np.isnan(observed))
    reference = wiener(plain.observed, plain.psf, nsr=1e-2)
    # Far from the no-data pixels (beyond two PSF sides) the restorations agree (to 3e-4 of
    # the noise when written).
    far = np.zeros(observed.shape, dtype=bool)
    far[16 + 50 : -16 - 50, 16 + 50 : -16 - 50] = True
    far[100 - 50 : 103 + 50, 120 - 50 : 140 + 50] = False
    assert np.abs(restored - reference)[far].max() < 0.01 * plain.noise_sigma
    assert np.nanmax(np.abs(restored)) < 1.5 * np.nanmax(np.abs(reference))


def test_a_flat_frame_stays_flat():
    flat = np.full((96, 80), 250.0, dtype=np.float32)
    np.testing.assert_allclose(wiener(flat, gd.psf.gaussian(3.0)), 250.0, rtol=1e-5)
    holed = flat.copy()
    holed[40:44, 30:36] = np.nan
    restored = wiener(holed, gd.psf.moffat(3.0), nsr=1e-3)
    assert np.isnan(restored[40:44, 30:36]).all()
    np.testing.assert_allclose(restored[~np.isnan(holed)], 250.0, rtol=1e-5)


def test_a_larger_constant_nsr_trades_sharpness_for_noise():
    scene = make_scene((256, 256), seed=2)
    stars = select_measurable_stars(
        scene.stars, (256, 256), min_flux=100 * scene.noise_sigma, neighbours=scene.galaxies
    )
    sharp, soft = (wiener(scene.observed, scene.psf, nsr=nsr) for nsr in (1e-3, 1e-1))
    assert median_fwhm(sharp, stars) < median_fwhm(soft, stars)
    assert sky_noise(sharp) > 2 * sky_noise(soft)


def test_bad_input_is_refused_in_one_line():
    image = np.ones((64, 64), dtype=np.float32)
    psf = gd.psf.gaussian(3.0)
    field = gd.PSFField(np.stack([np.stack([psf, psf])] * 2), image.shape)
    cases = [
        ((image, field), {}, "wiener needs one PSF"),
        ((image, [field]), {}, "wiener needs one PSF"),
        ((image, psf), {"nsr": 0.0}, "nsr must be a positive"),
        ((image, psf), {"nsr": np.nan}, "nsr must be a positive"),
        ((image, psf), {"nsr": "auto"}, "nsr must be a positive"),
        ((np.ones(64), psf), {}, "image must be 2-D"),
        ((image, np.ones((4, 4))), {}, "sides must be odd"),
        ((np.stack([image] * 3), np.stack([psf] * 2)), {}, "holds 2 PSFs"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(GpudeconvError, match=message) as caught:
            wiener(*args, **kwargs)
        assert "\n" not in str(caught.value)


def test_all_nodata_plane_comes_back_nan():
    image = np.stack([np.full((40, 40), np.nan, np.float32), np.ones((40, 40), np.float32)])
    restored = wiener(image, gd.psf.gaussian(2.0))
    assert np.isnan(restored[0]).all()
    np.testing.assert_allclose(restored[1], 1.0, rtol=1e-5)


# ------------------------------------------------------------------------- the CuPy path
@pytest.fixture
def fake(monkeypatch, tmp_path):
    """The fake cupy of tests/fake_cupy.py: CuPy's rules on the CPU (no kernel is built)."""
    fake_cupy = pytest.importorskip("fake_cupy")
    return fake_cupy.install(monkeypatch, cache_dir=tmp_path)


def test_cupy_in_cupy_out(fake):
    scene = make_scene((128, 144), seed=3, nan_border=6)
    device = fake.cupy.asarray(scene.observed)
    restored = wiener(device, scene.psf)
    assert is_cupy_array(restored) and restored.dtype == np.float32
    reference = wiener(scene.observed, scene.psf, backend="numpy")
    host = to_numpy(restored)
    assert np.array_equal(np.isnan(host), np.isnan(reference))
    # cuFFT's lengths pad differently from the CPU's: close, not equal.
    scale = np.nanmax(np.abs(reference))
    np.testing.assert_allclose(host, reference, atol=2e-3 * scale)
    with pytest.raises(GpudeconvError, match="CuPy array was given"):
        wiener(device, scene.psf, backend="numpy")
