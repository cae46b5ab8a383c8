"""Richardson-Lucy with a PSFField: stars restored with the PSF of their own part of the field."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import to_numpy

import gpudeconv as gd
from gpudeconv import GpudeconvError
from gpudeconv.psf.field import aberrated_field

SHAPE = (320, 320)
SPACING = 32


def star_positions(shape=SHAPE, spacing=SPACING):
    rows = np.arange(spacing // 2, shape[0], spacing)
    cols = np.arange(spacing // 2, shape[1], spacing)
    return [(int(y), int(x)) for y in rows for x in cols]


def render_field_image(field, *, seed=0, sky=20.0, flux=2e4):
    """Stars rendered one by one with the true PSF at their position (field.psf_at), on a sky,
    with Poisson and read noise: written from the field's definition, not with the operator."""
    rng = np.random.default_rng(seed)
    r = field.radius
    image = np.full((SHAPE[0] + 2 * r, SHAPE[1] + 2 * r), sky)
    for y, x in star_positions():
        image[y : y + 2 * r + 1, x : x + 2 * r + 1] += flux * field.psf_at(y, x)
    image = image[r:-r, r:-r]
    image = rng.poisson(image).astype(np.float64) + rng.normal(0, 2.0, SHAPE)
    return np.clip(image, 0, None).astype(np.float32)


def moments(image, y, x, half=7):
    """Moment FWHM (of the equivalent Gaussian, geometric mean of the axes) and elongation
    (major/minor axis) of the star at (y, x), sky taken from the box's border."""
    box = image[y - half : y + half + 1, x - half : x + half + 1].astype(np.float64)
    border = np.concatenate([box[0], box[-1], box[:, 0], box[:, -1]])
    light = np.clip(box - np.median(border), 0, None)
    grid = np.arange(-half, half + 1)
    total = light.sum()
    my = (light.sum(axis=1) @ grid) / total
    mx = (light.sum(axis=0) @ grid) / total
    dy, dx = grid[:, None] - my, grid[None, :] - mx
    cov = (
        np.array(
            [
                [(light * dy * dy).sum(), (light * dy * dx).sum()],
                [(light * dy * dx).sum(), (light * dx * dx).sum()],
            ]
        )
        / total
    )
    minor, major = np.sqrt(np.linalg.eigvalsh(cov))
    return 2.3548 * np.sqrt(major * minor), major / minor


@pytest.fixture(scope="module")
def aberrated():
    field = aberrated_field(
        SHAPE, (5, 5), fwhm_centre=2.5, fwhm_corner=6.0, elongation_corner=2.0, size=21
    )
    return field, render_field_image(field)


def corner_stars():
    last = star_positions()[-1][0]
    first = SPACING // 2
    return [(first, first), (first, last), (last, first), (last, last)]


def test_the_true_field_restores_corner_stars_better_than_the_centre_psf(aberrated):
    field, image = aberrated
    centre_psf = field.psf_at((SHAPE[0] - 1) / 2, (SHAPE[1] - 1) / 2)
    with_field = gd.richardson_lucy(image, field, 30, backend="numpy")
    with_centre = gd.richardson_lucy(image, centre_psf, 30, backend="numpy")
    for y, x in corner_stars():
        blurred_fwhm, blurred_elongation = moments(image, y, x)
        field_fwhm, field_elongation = moments(with_field, y, x)
        centre_fwhm, centre_elongation = moments(with_centre, y, x)
        assert blurred_elongation > 1.6  # the corners really are aberrated
        assert field_fwhm <= 0.75 * centre_fwhm, (y, x, field_fwhm, centre_fwhm)
        assert field_elongation < centre_elongation - 0.2, (y, x)
        assert field_elongation < 1.35
    # and at the centre, where both PSFs agree, both restore alike
    centre = star_positions()[len(star_positions()) // 2 + SHAPE[1] // SPACING // 2]
    assert moments(with_field, *centre)[0] == pytest.approx(
        moments(with_centre, *centre)[0], rel=0.1
    )


def test_flux_is_kept(aberrated):
    field, image = aberrated
    restored = gd.richardson_lucy(image, field, 20, backend="numpy")
    assert restored.sum() == pytest.approx(image.sum(), rel=2e-3)


def test_a_one_node_field_is_the_single_psf(backend):
    image = render_field_image(aberrated_field(SHAPE, (1, 1), fwhm_centre=3, fwhm_corner=3))
    psf = gd.psf.moffat(3.0, size=15)
    field = gd.PSFField(psf[None, None], SHAPE)
    with_field = to_numpy(gd.richardson_lucy(backend.asarray(image), field, 10, backend=backend))
    with_psf = to_numpy(gd.richardson_lucy(backend.asarray(image), psf, 10, backend=backend))
    np.testing.assert_allclose(with_field, with_psf, rtol=2e-5, atol=2e-5 * with_psf.max())


def test_colour_nodata_and_one_field_per_channel(backend):
    field = aberrated_field((96, 112), (2, 2), fwhm_centre=2.0, fwhm_corner=3.5, size=11)
    rng = np.random.default_rng(1)
    plane = rng.random((96, 112)).astype(np.float32) + 1
    image = np.stack([plane, 2 * plane, 3 * plane])
    image[:, :5, :] = np.nan  # a no-data border
    shared = to_numpy(gd.richardson_lucy(backend.asarray(image), field, 5, backend=backend))
    each = to_numpy(gd.richardson_lucy(backend.asarray(image), [field] * 3, 5, backend=backend))
    np.testing.assert_array_equal(shared, each)
    assert np.isnan(shared[:, :5]).all() and np.isfinite(shared[:, 5:]).all()
    # RL does not depend on the scale of the data
    np.testing.assert_allclose(shared[1], 2 * shared[0], rtol=1e-5)


def test_a_field_for_another_image_is_refused():
    field = aberrated_field((100, 120), (2, 2), fwhm_centre=2.0, fwhm_corner=3.0)
    with pytest.raises(GpudeconvError, match="made for images of 100x120.*image is 90x120"):
        gd.richardson_lucy(np.ones((90, 120), np.float32), field, 3)
    with pytest.raises(GpudeconvError, match="2 PSF fields were given for an image of 3"):
        gd.richardson_lucy(np.ones((3, 100, 120), np.float32), [field, field], 3)


def test_a_window_of_the_field_restores_a_tile_like_the_whole(aberrated):
    """A tile with a halo, restored with its window of the field, matches the whole image's
    restoration in the tile's core: the tile driver's building block."""
    field, image = aberrated
    whole = gd.richardson_lucy(image, field, 10, backend="numpy")
    y0, x0, height, width = 40, 150, 150, 140  # tile with halo, off-centre, near a corner node
    tile = image[y0 : y0 + height, x0 : x0 + width]
    restored = gd.richardson_lucy(tile, field.window(y0, x0, height, width), 10, backend="numpy")
    halo = 40
    core = (slice(halo, -halo), slice(halo, -halo))
    expected = whole[y0 : y0 + height, x0 : x0 + width][core]
    np.testing.assert_allclose(restored[core], expected, rtol=2e-3, atol=2e-3 * expected.max())
    # the field at the tile's place matters: the centre node's PSF alone restores differently
    wrong = gd.richardson_lucy(tile, field.window(100, 100, height, width), 10, backend="numpy")
    assert np.abs(wrong[core] - expected).max() > 10 * np.abs(restored[core] - expected).max()
    with pytest.raises(GpudeconvError, match="covers 150x140 pixels, but the image is 150x141"):
        gd.richardson_lucy(image[:150, :141], field.window(0, 0, 150, 140), 3)
