"""The blur measured on a planet's limb, on synthetic planets blurred by a known Gaussian."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.signal

from gpudeconv import GpudeconvError
from gpudeconv.psf.limb import (
    LimbEstimate,
    _blurred_sqrt,
    bright_region,
    limb_fwhm,
    noise_sigma,
    otsu_threshold,
)


def synthetic_planet(
    fwhm,
    *,
    shape=(320, 320),
    centre=(158.3, 163.7),
    radius=100.0,
    darkening=0.0,
    bands=0.15,
    level=1000.0,
    sky=20.0,
    noise=3.0,
    seed=0,
):
    """A banded disc, linearly limb-darkened by ``darkening`` (I = 1 - u (1 - mu)), integrated
    over pixels (4 x 4 sub-samples), blurred by a point-sampled Gaussian of ``fwhm`` pixels with
    scipy.signal, plus a sky and Gaussian noise; float32. Written here, independent of the
    package."""
    sub = 4
    y = (np.arange(shape[0] * sub) + 0.5) / sub - 0.5
    x = (np.arange(shape[1] * sub) + 0.5) / sub - 0.5
    yy, xx = np.meshgrid(y, x, indexing="ij")
    r2 = ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / radius**2
    mu = np.sqrt(np.clip(1 - r2, 0, None))
    stripes = 1 + bands * np.sin(2 * np.pi * (yy - centre[0]) / 23.0)
    disc = (r2 < 1) * (1 - darkening * (1 - mu)) * stripes
    truth = disc.reshape(shape[0], sub, shape[1], sub).mean(axis=(1, 3)) * level + sky
    sigma = fwhm / (2 * math.sqrt(2 * math.log(2)))
    half = int(math.ceil(5 * sigma))
    grid = np.arange(-half, half + 1)
    kernel = np.exp(-(grid[:, None] ** 2 + grid[None, :] ** 2) / (2 * sigma**2))
    kernel /= kernel.sum()
    blurred = scipy.signal.fftconvolve(truth, kernel, mode="same")
    rng = np.random.default_rng(seed)
    return (blurred + rng.normal(0.0, noise, shape)).astype(np.float32)


def assert_one_line(error: pytest.ExceptionInfo) -> None:
    message = str(error.value)
    assert "\n" not in message and message, message


# --- accuracy ---------------------------------------------------------------------------------


@pytest.mark.parametrize("darkening", [0.0, 0.5], ids=["uniform", "limb-darkened"])
@pytest.mark.parametrize("fwhm", [3.0, 5.0])
def test_recovers_the_gaussian_fwhm(fwhm, darkening):
    image = synthetic_planet(fwhm, darkening=darkening)
    estimate = limb_fwhm(image)
    assert isinstance(estimate, LimbEstimate)
    # Measured: within 1.2 % (the issue asks for 10 %).
    assert estimate.fwhm == pytest.approx(fwhm, rel=0.05)
    assert estimate.sigma == pytest.approx(estimate.fwhm / 2.3548, rel=1e-3)
    assert estimate.centre == pytest.approx((158.3, 163.7), abs=1.0)
    assert estimate.radius == pytest.approx(100.0, abs=3.0)
    assert estimate.n_profiles >= 0.7 * estimate.n_angles
    assert 0 < estimate.uncertainty < 0.05 * fwhm
    assert estimate.sigmas.shape == estimate.angles.shape == (estimate.n_profiles,)
    assert "FWHM" in str(estimate)


def test_limb_darkening_is_not_read_as_blur():
    """The square-root ramp of the model absorbs limb darkening: a strongly darkened and a
    uniform disc of the same blur give the same width (a plain erf fit reads 1.9x)."""
    uniform = limb_fwhm(synthetic_planet(3.0, darkening=0.0, bands=0.0)).fwhm
    darkened = limb_fwhm(synthetic_planet(3.0, darkening=0.6, bands=0.0)).fwhm
    assert darkened == pytest.approx(uniform, rel=0.03)


def test_disc_cut_by_the_frame():
    image = synthetic_planet(3.0, centre=(160.0, 280.0), darkening=0.3)
    estimate = limb_fwhm(image)
    assert estimate.fwhm == pytest.approx(3.0, rel=0.05)
    assert estimate.centre[1] == pytest.approx(280.0, abs=1.5)


def test_colour_channels_are_summed():
    cube = np.stack([synthetic_planet(4.0, seed=seed) for seed in range(3)])
    assert limb_fwhm(cube).fwhm == pytest.approx(4.0, rel=0.05)


def test_nan_pixels_are_ignored():
    image = synthetic_planet(3.0)
    image[:20, :] = np.nan  # a no-data border from registration
    assert limb_fwhm(image).fwhm == pytest.approx(3.0, rel=0.05)


def test_small_disc_and_integer_data():
    image = synthetic_planet(3.0, shape=(128, 128), centre=(60.0, 66.0), radius=30.0)
    estimate = limb_fwhm(np.clip(np.round(image), 0, 65535).astype(np.uint16))
    assert estimate.fwhm == pytest.approx(3.0, rel=0.05)
    assert estimate.radius == pytest.approx(30.0, abs=1.5)


def test_options_change_the_sampling():
    estimate = limb_fwhm(synthetic_planet(3.0), n_angles=48, max_fwhm=10.0)
    assert estimate.n_angles == 48
    assert estimate.fwhm == pytest.approx(3.0, rel=0.05)


# --- failures -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image",
    [
        np.random.default_rng(5).normal(100.0, 10.0, (320, 320)),
        np.random.default_rng(6).poisson(50.0, (256, 256)).astype(np.float32),
        np.full((200, 200), 7.0, dtype=np.float32),
    ],
    ids=["gaussian-noise", "poisson-noise", "flat"],
)
def test_no_disc_is_one_line_error(image):
    with pytest.raises(GpudeconvError, match="no planetary or lunar disc found") as error:
        limb_fwhm(image)
    assert_one_line(error)
    assert "--psf-fwhm" in str(error.value)


def test_gradient_without_edge_is_refused():
    rng = np.random.default_rng(1)
    ramp = np.tile(np.linspace(0.0, 100.0, 320), (320, 1)) + rng.normal(0.0, 1.0, (320, 320))
    with pytest.raises(GpudeconvError, match="limb|disc") as error:
        limb_fwhm(ramp)
    assert_one_line(error)


def test_frame_filled_by_the_disc_is_refused():
    image = synthetic_planet(3.0, radius=400.0, centre=(160.0, 160.0))
    with pytest.raises(GpudeconvError, match="limb") as error:
        limb_fwhm(image)
    assert_one_line(error)


@pytest.mark.parametrize(
    ("image", "options", "match"),
    [
        (np.zeros((20, 20)), {}, "too small"),
        (np.zeros((4, 64, 64, 2)), {}, "2-D"),
        (np.zeros((64, 64), dtype=complex), {}, "real numbers"),
        (np.full((64, 64), np.nan), {}, "NaN"),
        (np.zeros((64, 64)), {"n_angles": 3}, "n_angles"),
        (np.zeros((64, 64)), {"n_angles": 12.5}, "n_angles"),
        (np.zeros((64, 64)), {"max_fwhm": -1.0}, "max_fwhm"),
        (np.zeros((64, 64)), {"max_fwhm": "wide"}, "max_fwhm"),
    ],
)
def test_bad_input_is_one_line_error(image, options, match):
    with pytest.raises(GpudeconvError, match=match) as error:
        limb_fwhm(image, **options)
    assert_one_line(error)


# --- the pieces -------------------------------------------------------------------------------


def test_blurred_square_root_matches_numerical_integration():
    """h(z) = E[sqrt(max(z + N, 0))] and h'(z), checked by quadrature, across the table's
    edges (z = -8 and the switch to the asymptotic series at z = 30)."""
    z = np.array([-9.0, -3.0, -1.0, 0.0, 0.5, 2.0, 7.0, 29.9, 30.1, 55.0])
    n = np.linspace(-12, 12, 200001)
    density = np.exp(-(n**2) / 2) / math.sqrt(2 * math.pi)
    expected = [np.trapezoid(np.sqrt(np.clip(v + n, 0, None)) * density, n) for v in z]
    # h'(z) = E[1 / (2 sqrt(z + N)); z + N > 0], by finite differences of the quadrature.
    step = 1e-3
    slope = [
        (
            np.trapezoid(np.sqrt(np.clip(v + step + n, 0, None)) * density, n)
            - np.trapezoid(np.sqrt(np.clip(v - step + n, 0, None)) * density, n)
        )
        / (2 * step)
        for v in z
    ]
    value, derivative = _blurred_sqrt(z)
    np.testing.assert_allclose(value, expected, atol=2e-5)
    np.testing.assert_allclose(derivative, slope, atol=2e-4)


def test_otsu_threshold_splits_two_populations():
    rng = np.random.default_rng(2)
    values = np.concatenate([rng.normal(10, 2, 5000), rng.normal(50, 4, 3000), [1e6]])
    threshold = otsu_threshold(values)
    assert 14 < threshold < 40  # between the classes, not pulled up by the hot pixel
    skimage_filters = pytest.importorskip("skimage.filters")
    reference = skimage_filters.threshold_otsu(values[:-1])  # without the hot pixel
    assert threshold == pytest.approx(reference, abs=0.5)


def test_bright_region_keeps_dark_belts_and_ignores_moons():
    """Belts at 40 % of the disc's level reach the limb: Otsu's cut alone would split the
    disc into stripes."""
    image = synthetic_planet(3.0, bands=0.6)
    image[40:44, 20:24] += 3000.0  # a bright moon, smaller than the disc
    mask = bright_region(image)
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    disc = np.hypot(yy - 158.3, xx - 163.7) < 95
    assert mask[disc].all()  # dark bands filled
    assert not mask[40:44, 20:24].any()
    assert bright_region(np.zeros((32, 32))) is None


def test_noise_sigma_ignores_structure():
    rng = np.random.default_rng(4)
    smooth = synthetic_planet(3.0, noise=0.0).astype(np.float64)
    noisy = smooth + rng.normal(0.0, 5.0, smooth.shape)
    assert noise_sigma(noisy) == pytest.approx(5.0, rel=0.1)
