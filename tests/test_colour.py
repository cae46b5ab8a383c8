"""Luminance mode helpers: the luminance of a colour image, and replacing it exactly."""

from __future__ import annotations

import numpy as np
import pytest

from gpudeconv import GpudeconvError
from gpudeconv.restore.colour import luminance, recombine
from gpudeconv.synthetic import make_scene

RGB = (0.2126, 0.7152, 0.0722)


def colour_image(dtype=np.float32, shape=(96, 112)):
    """Three channels of one sky with different brightness, noise and a NaN border."""
    channels = [
        make_scene(shape, seed=1, sky=sky, gain=gain, nan_border=4, dtype=dtype).observed
        for sky, gain in ((80.0, 1.0), (120.0, 2.0), (60.0, 0.5))
    ]
    return np.stack(channels)


def test_default_luminance_is_the_channel_mean():
    image = colour_image()
    result = luminance(image)
    assert result.shape == image.shape[1:] and result.dtype == np.float32
    np.testing.assert_allclose(result, image.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(luminance(image, (2, 2, 2)), result, rtol=1e-6)
    assert np.array_equal(np.isnan(result), np.isnan(image).any(axis=0))


def test_weights_are_normalized():
    image = colour_image(np.float64)
    weighted = luminance(image, np.array(RGB) * 10)
    expected = sum(w * plane for w, plane in zip(RGB, image, strict=True)) / sum(RGB)
    np.testing.assert_allclose(weighted, expected, rtol=1e-12)
    assert weighted.dtype == np.float64


def test_recombine_with_the_same_luminance_is_the_image():
    image = colour_image()
    before = luminance(image, RGB)
    assert np.array_equal(recombine(image, before, before), image, equal_nan=True)


def test_recombine_sets_the_luminance_and_keeps_the_chrominance():
    image = colour_image(np.float64)
    before = luminance(image, RGB)
    after = 1.7 * before - 40.0  # e.g. a restored luminance, negative in places
    result = recombine(image, before, after)
    np.testing.assert_allclose(luminance(result, RGB), after, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(result - after, image - before, rtol=1e-12, atol=1e-9)


def test_integer_images_become_float32():
    image = np.round(np.nan_to_num(colour_image())).astype(np.uint16)
    assert luminance(image).dtype == np.float32
    level = luminance(image)
    assert recombine(image, level, level + 1).dtype == np.float32


def test_bad_input_is_refused():
    image = colour_image()
    level = luminance(image)
    cases = [
        (luminance, (image[0],), "channel-first colour image"),
        (luminance, (image, (1, 2)), "weights must be 3 numbers"),
        (luminance, (image, (1, -1, 1)), "non-negative"),
        (luminance, (image, (0, 0, 0)), "not all 0"),
        (luminance, (image, (1, np.nan, 1)), "finite"),
        (luminance, (image.astype(complex),), "real numbers"),
        (recombine, (image, level, level[:-1]), "luminance_after must have"),
        (recombine, (image, level[None], level), "luminance_before must have"),
    ]
    for function, args, message in cases:
        with pytest.raises(GpudeconvError, match=message) as caught:
            function(*args)
        assert "\n" not in str(caught.value)


@pytest.fixture
def fake(monkeypatch, tmp_path):
    fake_cupy = pytest.importorskip("fake_cupy")
    return fake_cupy.install(monkeypatch, cache_dir=tmp_path)


def test_cupy_stays_on_the_device(fake):
    from gpudeconv.backend import is_cupy_array

    image = colour_image()
    device = fake.cupy.asarray(image)
    level = luminance(device, RGB)
    assert is_cupy_array(level)
    result = recombine(device, level, level * 2)
    assert is_cupy_array(result)
    expected = recombine(image, luminance(image, RGB), luminance(image, RGB) * 2)
    np.testing.assert_allclose(result.get(), expected, rtol=1e-6)
    with pytest.raises(GpudeconvError, match="must be a CuPy array"):
        recombine(device, luminance(image), level)
