"""Training data for learned deconvolution: deterministic, shaped, sharper targets, honest maps."""

from __future__ import annotations

import math

import numpy as np
import pytest

import gpudeconv as gd
from gpudeconv.learned.data import (
    FWHM_UNIT,
    TARGET_FWHM,
    NoiseRange,
    PSFRange,
    denormalize,
    make_batch,
    make_sample,
    normalize,
    psf_maps,
)
from gpudeconv.measure import median_fwhm

NO_SATURATION = NoiseRange(saturated_fraction=0.0)


def _ellipticity(ratio: float, angle: float) -> tuple[float, float]:
    e = (1 - ratio) / (1 + ratio)
    theta = math.radians(angle)
    return e * math.cos(2 * theta), e * math.sin(2 * theta)


def test_same_seed_same_arrays_and_batches_independent_of_count():
    first, again = make_sample(7), make_sample(7)
    for name in ("blurred", "target", "clean", "psf_maps", "stars"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert not np.array_equal(make_sample(8).blurred, first.blurred)

    inputs, targets = make_batch(3, 4, size=32)
    fewer_inputs, fewer_targets = make_batch(3, 2, size=32)
    np.testing.assert_array_equal(inputs[:2], fewer_inputs)
    np.testing.assert_array_equal(targets[:2], fewer_targets)
    third = make_sample(np.random.SeedSequence(3, spawn_key=(2,)), size=32)
    np.testing.assert_array_equal(inputs[2, 0], third.blurred)
    np.testing.assert_array_equal(inputs[2, 1:], third.psf_maps)
    np.testing.assert_array_equal(targets[2, 0], third.target)
    assert not np.array_equal(inputs[0], inputs[1])


def test_shapes_dtypes_and_drawn_parameters_in_range():
    inputs, targets = make_batch(0, 6, size=48)
    assert inputs.shape == (6, 4, 48, 48) and inputs.dtype == np.float32
    assert targets.shape == (6, 1, 48, 48) and targets.dtype == np.float32
    assert np.isfinite(inputs).all() and np.isfinite(targets).all()
    psf_range = PSFRange()
    for seed in range(6):
        sample = make_sample(seed, size=48)
        for name in ("blurred", "target", "clean"):
            assert getattr(sample, name).shape == (48, 48)
            assert getattr(sample, name).dtype == np.float32
        assert sample.psf_maps.shape == (3, 48, 48) and sample.psf_maps.dtype == np.float32
        assert psf_range.fwhm[0] <= sample.fwhm <= psf_range.fwhm[1]
        assert sample.beta is None or psf_range.beta[0] <= sample.beta <= psf_range.beta[1]
        # the FWHM map stays near the drawn FWHM: variation of at most 15 % (+ measuring error)
        fwhm_map = sample.psf_maps[0] * FWHM_UNIT
        assert 0.8 * sample.fwhm < fwhm_map.min() <= fwhm_map.max() < 1.2 * sample.fwhm
        # background noise of standard deviation 0.2 after normalization
        assert 0.15 < np.std(sample.blurred - sample.clean) < 0.3


def test_target_is_sharper_than_input():
    ratios, sharp = [], []
    for seed in range(6):
        sample = make_sample(
            seed, size=96, psf_range=PSFRange(fwhm=(4.0, 5.0)), noise_range=NO_SATURATION
        )
        x, y, flux = sample.stars.T
        bright = (x > 15) & (x < 80) & (y > 15) & (y < 80) & (flux > 50 * sample.noise_sigma)
        if not bright.any():
            continue
        observed = denormalize(sample.blurred, sample.offset, sample.scale)
        target = denormalize(sample.target, sample.offset, sample.scale)
        before = median_fwhm(observed, sample.stars[bright, :2])
        after = median_fwhm(target, sample.stars[bright, :2])
        if np.isfinite(before) and np.isfinite(after):
            ratios.append(after / before)
            sharp.append(after)
    assert len(ratios) >= 3
    assert max(ratios) < 0.6
    assert np.median(sharp) == pytest.approx(TARGET_FWHM, rel=0.25)


def test_target_keeps_the_flux_of_isolated_stars():
    size, radius = 64, 9
    yy, xx = np.mgrid[0:size, 0:size]
    checked = 0
    for seed in range(30):
        sample = make_sample(
            seed,
            size=size,
            noise_range=NO_SATURATION,
            psf_range=PSFRange(fwhm=(3.0, 4.0), gaussian_fraction=1.0),
        )
        clean = denormalize(sample.clean, sample.offset, sample.scale).astype(np.float64)
        target = denormalize(sample.target, sample.offset, sample.scale).astype(np.float64)
        for x, y, flux in sample.stars:
            if not (radius <= x <= size - 1 - radius and radius <= y <= size - 1 - radius):
                continue
            aperture = (xx - x) ** 2 + (yy - y) ** 2 <= radius**2
            blurred_flux = (clean - sample.sky)[aperture].sum()
            if not 0.98 < blurred_flux / flux < 1.05:  # not isolated: neighbours, nebula
                continue
            sharp_flux = (target - sample.sky)[aperture].sum()
            assert sharp_flux == pytest.approx(blurred_flux, rel=0.01)
            checked += 1
    assert checked >= 3


@pytest.mark.parametrize("beta", [None, 2.5, 4.0])
def test_psf_maps_recover_a_known_field(beta):
    shape = (93, 123)  # nodes on pixel centres: rows 15, 46, 77, columns 20, 61, 102
    field = gd.psf.aberrated_field(
        shape, (3, 3), fwhm_centre=3.5, fwhm_corner=6.0, elongation_corner=1.4, beta=beta
    )
    maps = psf_maps(field, shape)
    assert maps.shape == (3, *shape) and maps.dtype == np.float32
    yc, xc = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    corner = math.hypot(yc, xc)
    for y in field.node_rows():
        for x in field.node_cols():
            rho = math.hypot(y - yc, x - xc) / corner
            fwhm = 3.5 + 2.5 * rho
            e1, e2 = _ellipticity(1 / (1 + 0.4 * rho), math.degrees(math.atan2(y - yc, x - xc)))
            row, col = round(y), round(x)
            assert maps[0, row, col] * FWHM_UNIT == pytest.approx(fwhm, rel=0.05)
            assert maps[1, row, col] == pytest.approx(e1, abs=0.03)
            assert maps[2, row, col] == pytest.approx(e2, abs=0.03)
    # bilinear between nodes: halfway between two node columns is their mean
    rows, cols = field.node_rows().astype(int), field.node_cols().astype(int)
    middle = (cols[0] + cols[1]) // 2
    weight = (middle - field.node_cols()[0]) / (field.node_cols()[1] - field.node_cols()[0])
    expected = (1 - weight) * maps[:, rows[0], cols[0]] + weight * maps[:, rows[0], cols[1]]
    np.testing.assert_allclose(maps[:, rows[0], middle], expected, atol=1e-5)


def test_psf_maps_of_one_psf_and_of_a_tile():
    psf = gd.psf.moffat(4.0, 3.0, ratio=0.7, angle=40.0)
    maps = psf_maps(psf, (20, 30))
    e1, e2 = _ellipticity(0.7, 40.0)
    np.testing.assert_allclose(maps[0] * FWHM_UNIT, 4.0, rtol=0.05)
    np.testing.assert_allclose(maps[1], e1, atol=0.03)
    np.testing.assert_allclose(maps[2], e2, atol=0.03)
    assert np.ptp(maps, axis=(1, 2)).max() == 0

    field = gd.psf.aberrated_field((100, 100), (3, 3), fwhm_centre=3, fwhm_corner=6)
    whole = psf_maps(field, (100, 100))
    np.testing.assert_array_equal(
        psf_maps(field, (30, 40), origin=(50, 20)), whole[:, 50:80, 20:60]
    )


def test_normalize_round_trip_and_scale():
    rng = np.random.default_rng(1)
    image = (300 + rng.normal(0, 4.0, size=(80, 80))).astype(np.float32)
    image[40, 40] += 5000
    normalized, offset, scale = normalize(image)
    assert normalized.dtype == np.float32
    assert offset == pytest.approx(300, abs=0.5)
    assert scale == pytest.approx(5 * 4.0, rel=0.1)
    np.testing.assert_allclose(denormalize(normalized, offset, scale), image, rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: make_sample(-1), "seed must be a non-negative integer"),
        (lambda: make_sample(0, size=8), "size must be an integer of at least 16"),
        (lambda: make_sample(0, psf_range="wide"), "psf_range must be"),
        (lambda: make_sample(0, noise_range=None), "noise_range must be"),
        (lambda: make_batch(0, 0), "count must be a positive integer"),
        (lambda: PSFRange(fwhm=(7.0, 2.0)), r"PSFRange.fwhm must be a \(low, high\) pair"),
        (lambda: PSFRange(ratio=(0.5, 1.2)), "PSFRange.ratio"),
        (lambda: PSFRange(gaussian_fraction=1.5), "gaussian_fraction must be a fraction"),
        (lambda: PSFRange(grid=9), "PSFRange.grid must be an integer from 1 to 4"),
        (lambda: NoiseRange(gain=(0.0, 4.0)), "NoiseRange.gain"),
        (lambda: normalize(np.ones(5)), "image must be 2-D"),
        (lambda: normalize(np.full((8, 8), np.nan)), "NaN or infinite"),
        (lambda: normalize(np.ones((8, 8))), "no measurable noise"),
        (lambda: denormalize(np.ones((2, 2)), 0.0, 0.0), "scale must be positive"),
        (lambda: psf_maps(np.ones((4, 4)), (8, 8)), "odd"),
        (lambda: psf_maps(gd.psf.gaussian(3.0), (0, 8)), "shape must be"),
        (lambda: psf_maps(gd.psf.gaussian(3.0), (8, 8), origin=(0.5, 0)), "origin must be"),
    ],
)
def test_bad_arguments_raise_one_line_errors(call, match):
    with pytest.raises(gd.GpudeconvError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
