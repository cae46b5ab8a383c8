"""Richardson-Lucy against an independent float64 reference, colour, dtypes, no-data pixels."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
from helpers import reference_rl, star_field, to_numpy

import gpudeconv as gd
from gpudeconv import GpudeconvError, GpudeconvWarning
from gpudeconv.restore import rl


def relative_error(result, reference, margin):
    inner = (slice(margin, -margin), slice(margin, -margin))
    return np.max(np.abs(result[inner] - reference[inner])) / np.max(np.abs(reference[inner]))


@pytest.mark.parametrize("iterations", [1, 10, 30])
def test_grey_matches_float64_reference(backend, iterations):
    image = star_field(seed=1)
    psf = gd.psf.moffat(3.0, beta=2.5, size=15, ratio=0.8, angle=30)
    xp_image = backend.asarray(image)
    result = to_numpy(gd.richardson_lucy(xp_image, psf, iterations, backend=backend))
    assert result.dtype == np.float32
    assert result.shape == image.shape
    assert relative_error(result, reference_rl(image, psf, iterations), margin=16) <= 2e-3


@pytest.mark.parametrize("iterations", [1, 10, 30])
def test_colour_per_channel_psfs_match_reference(backend, iterations):
    channels = np.stack([star_field(seed=s, fwhm=f) for s, f in ((2, 2.5), (3, 3.0), (4, 3.5))])
    psfs = np.stack([gd.psf.gaussian(f, size=13) for f in (2.5, 3.0, 3.5)])
    result = to_numpy(gd.richardson_lucy(channels, psfs, iterations, backend=backend))
    assert result.shape == channels.shape
    for c in range(3):
        reference = reference_rl(channels[c], psfs[c], iterations)
        assert relative_error(result[c], reference, margin=16) <= 2e-3


def test_colour_with_one_psf_equals_channels_run_alone(backend):
    channels = np.stack([star_field(seed=s) for s in (5, 6)])
    psf = gd.psf.moffat(3.0, size=15)
    together = to_numpy(gd.richardson_lucy(channels, psf, 5, backend=backend))
    for c in range(2):
        alone = to_numpy(gd.richardson_lucy(channels[c], psf, 5, backend=backend))
        np.testing.assert_allclose(together[c], alone, rtol=1e-6, atol=1e-6)


def test_rl_sharpens_stars(backend):
    image = star_field(seed=7, fwhm=3.5, n_stars=30, noise=False)
    psf = gd.psf.gaussian(3.5, size=21)
    result = to_numpy(gd.richardson_lucy(image, psf, 30, backend=backend))
    peak = np.unravel_index(np.argmax(image[20:-20, 20:-20]), image[20:-20, 20:-20].shape)
    y, x = peak[0] + 20, peak[1] + 20
    assert result[y, x] > 2 * image[y, x]  # the light gathers back towards the point
    np.testing.assert_allclose(result[20:-20, 20:-20].sum(), image[20:-20, 20:-20].sum(), rtol=0.02)


def test_small_psf_uses_direct_sum_and_matches_reference(backend):
    image = star_field(seed=8, fwhm=1.5)
    psf = gd.psf.gaussian(1.5, size=5)
    result = to_numpy(gd.richardson_lucy(image, psf, 10, backend=backend))
    assert relative_error(result, reference_rl(image, psf, 10), margin=8) <= 2e-3


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (np.uint8, np.float32),
        (np.uint16, np.float32),
        (np.int32, np.float32),
        (np.float16, np.float32),
        (np.float32, np.float32),
        (np.float64, np.float64),
    ],
)
def test_dtype_policy(backend, dtype, expected):
    image = star_field(shape=(48, 40), seed=9)
    image = np.clip(image / image.max() * 200, 0, 200).astype(dtype)
    result = gd.richardson_lucy(
        backend.asarray(image), gd.psf.gaussian(2.0, size=7), 3, backend=backend
    )
    assert result.dtype == expected


@pytest.mark.parametrize(
    ("restore", "float64"),
    [
        (lambda image, psf: gd.richardson_lucy(image, psf, 3), np.float64),
        (lambda image, psf: gd.wiener(image, psf), np.float64),
        *(
            (
                lambda image, psf, method=method: gd.deconvolve(
                    image, psf, method=method, iterations=3
                ),
                np.float32 if method == "learned" else np.float64,
            )
            for method in ("rl", "wiener", "learned")
        ),
        (lambda image, psf: gd.deconvolve(image, psf, iterations=3, tile=32), np.float64),
    ],
    ids=["richardson_lucy", "wiener", "deconvolve", "deconvolve-wiener", "learned", "tiles"],
)
@pytest.mark.filterwarnings("ignore:.*trained on deep-sky data:gpudeconv.GpudeconvWarning")
def test_a_nested_list_is_taken_as_numpy_takes_it(restore, float64):
    image = np.round(star_field(shape=(40, 44), seed=13))
    psf = gd.psf.gaussian(2.0, size=7)
    floats, integers = image.astype(np.float64), image.astype(np.int32)
    # the dtype policy: float64 kept (the network gives float32), integers become float32
    for array, dtype in (
        (floats, float64),
        (integers, np.float32),
        (floats.astype(np.float32), np.float32),
    ):
        result = restore(array.tolist() if array.dtype != np.float32 else list(array), psf)
        assert result.dtype == dtype
        np.testing.assert_array_equal(result, restore(array, psf))
    with pytest.raises(GpudeconvError, match=r"^image must be an \(H, W\) or \(C, H, W\) array;"):
        restore([[1.0, 2.0, 3.0], [4.0, 5.0]], psf)


def test_numpy_in_numpy_out_and_device_arrays_stay_on_device(backend):
    image = star_field(shape=(40, 44), seed=10)
    psf = gd.psf.gaussian(2.0, size=9)
    host_result = gd.richardson_lucy(image, psf, 2, backend=backend)
    assert isinstance(host_result, np.ndarray)
    device_result = gd.richardson_lucy(backend.asarray(image), psf, 2, backend=backend)
    assert type(device_result) is type(backend.asarray(image))


def test_nodata_pixels_stay_nan_and_carry_no_weight(backend):
    image = star_field(shape=(200, 210), seed=11)
    psf = gd.psf.gaussian(2.5, size=9)
    with_border = image.copy()
    border = 24
    with_border[:border] = np.nan
    with_border[:, -border:] = np.nan
    with_border[40, 30] = np.inf  # a hot, non-finite pixel (outside the compared core)
    result = to_numpy(gd.richardson_lucy(with_border, psf, 5, backend=backend))
    invalid = ~np.isfinite(with_border)
    assert np.isnan(result[invalid]).all()
    assert np.isfinite(result[~invalid]).all()
    # Far from the no-data pixels (5 iterations spread influence by about 5 * 2 * 4 = 40 px),
    # the restoration equals RL of the valid part alone: no-data acts as an image border.
    valid_part = image[border:, : image.shape[1] - border]
    alone = reference_rl(valid_part, psf, 5)
    core = result[border:, : image.shape[1] - border][45:-45, 45:-45]
    np.testing.assert_allclose(core[:, :], alone[45:-45, 45:-45], rtol=2e-3, atol=0.05)
    # Even next to the border the estimate stays close to the data (no blow-up).
    assert np.nanmax(np.abs(result - image)[~invalid]) < 10 * image.max()


def test_zero_and_negative_data_never_produce_nan(backend):
    image = star_field(shape=(64, 64), seed=12)
    zeros = image.copy()
    zeros[:20] = 0.0
    result = to_numpy(gd.richardson_lucy(zeros, gd.psf.gaussian(2.0, size=9), 20, backend=backend))
    assert np.isfinite(result).all()
    negative = image - 2 * float(np.median(image))
    with pytest.warns(GpudeconvWarning, match="negative values.*pedestal"):
        result = to_numpy(
            gd.richardson_lucy(negative, gd.psf.gaussian(2.0, size=9), 10, backend=backend)
        )
    assert np.isfinite(result).all()
    # The pedestal is removed again: the sky level comes back where it was.
    assert abs(np.median(result) - np.median(negative)) < 0.05 * np.ptp(negative)


@pytest.mark.parametrize("method", ["rl", "rl-tv", "damped", "wiener", "learned"])
def test_an_image_without_data_is_refused_a_channel_without_data_is_nan(backend, method):
    psf = gd.psf.gaussian(2.0, size=5)
    nothing = np.full((2, 32, 32), np.nan, dtype=np.float32)
    nothing[1, 3, 4] = np.inf
    for image in (nothing[0], nothing):  # grey, and colour with no data in any channel
        with pytest.raises(GpudeconvError, match=r"^the image holds no data \(every pixel is NaN"):
            gd.deconvolve(backend.asarray(image), psf, method=method, iterations=3, backend=backend)
    if method == "learned":  # its own tests keep the empty plane of a colour image
        return
    colour = np.stack([star_field(shape=(32, 32), seed=5), nothing[0]])
    result = to_numpy(
        gd.deconvolve(backend.asarray(colour), psf, method=method, iterations=3, backend=backend)
    )
    assert np.isnan(result[1]).all() and np.isfinite(result[0]).all()


def test_progress_callback_counts_all_iterations():
    calls = []
    image = np.stack([star_field(shape=(32, 32), seed=s) for s in (1, 2)])
    gd.richardson_lucy(
        image, gd.psf.gaussian(2.0, size=5), 4, callback=lambda d, t: calls.append((d, t))
    )
    assert calls == [(i, 8) for i in range(1, 9)]


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (np.ones(50, dtype=np.float32), "2-D"),
        (np.ones((2, 3, 20, 20), dtype=np.float32), "2-D"),
        (np.ones((20, 20), dtype=np.complex64), "real numbers"),
        (np.ones((1, 20), dtype=np.float32), "too small"),
    ],
)
def test_bad_images_are_refused(image, match):
    with pytest.raises(GpudeconvError, match=match):
        gd.richardson_lucy(image, gd.psf.gaussian(2.0, size=5), 3)


@pytest.mark.parametrize("iterations", [0, -3, 2.5, True])
def test_bad_iterations_are_refused(iterations):
    with pytest.raises(GpudeconvError, match="iterations must be a positive integer"):
        gd.richardson_lucy(np.ones((20, 20), np.float32), gd.psf.gaussian(2.0, size=5), iterations)


def test_many_iterations_warn():
    with pytest.warns(GpudeconvWarning, match="amplify noise"):
        gd.richardson_lucy(np.ones((12, 12), np.float32), gd.psf.gaussian(1.0, size=3), 501)


@pytest.mark.parametrize(
    ("psf", "match"),
    [
        (np.ones((4, 5)), "odd"),
        (np.full((5, 5), np.nan), "NaN"),
        (np.zeros((5, 5)), "all zeros"),
        (np.pad([[1.0]], 2) - 0.1, "negative"),
        (np.ones((2, 5, 5)), "2 PSFs but the image has 3"),
        (np.ones(5), "2-D"),
    ],
)
def test_bad_psfs_are_refused(psf, match):
    image = np.ones((3, 20, 20), np.float32)
    with pytest.raises(GpudeconvError, match=match):
        gd.richardson_lucy(image, psf, 2)


def test_unnormalized_psf_warns_and_is_normalized():
    image = star_field(shape=(48, 48), seed=3)
    psf = gd.psf.gaussian(2.0, size=7)
    with pytest.warns(GpudeconvWarning, match="normalized"):
        scaled = gd.richardson_lucy(image, psf * 1000, 5)
    np.testing.assert_allclose(scaled, gd.richardson_lucy(image, psf, 5), rtol=1e-5)


def test_deconvolve_entry_reads_paths_and_refuses_missing_psf(tmp_path):
    image = star_field(shape=(40, 40), seed=4)
    path = tmp_path / "in.fits"
    gd.write_image(path, image)
    psf = gd.psf.gaussian(2.0, size=7)
    # the high-level entry fits the noise model estimated from the image
    np.testing.assert_allclose(
        gd.deconvolve(path, psf, iterations=3),
        gd.richardson_lucy(image, psf, 3, noise="auto"),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        gd.deconvolve(path, psf, iterations=3, noise=None),
        gd.richardson_lucy(image, psf, 3),
        rtol=1e-6,
    )
    tv = gd.deconvolve(image, psf, method="rl-tv", iterations=3, regularization=0.01)
    np.testing.assert_allclose(
        tv, gd.richardson_lucy(image, psf, 3, noise="auto", regularization=0.01), rtol=1e-6
    )
    with pytest.raises(GpudeconvError, match="PSF"):
        gd.deconvolve(image)
    with pytest.raises(GpudeconvError, match="method must be"):
        gd.deconvolve(image, psf, method="magic")


def test_flat_image_stays_flat_up_to_the_borders(backend):
    flat = np.full((96, 110), 100.0, dtype=np.float32)
    result = to_numpy(gd.richardson_lucy(flat, gd.psf.moffat(4.0), 100, backend=backend))
    # float32 round-off only (zeros beyond the padding used to darken the edges by 9%)
    assert np.abs(result - 100.0).max() < 100.0 * 2e-4


def test_nodata_next_to_the_border(backend):
    image = np.full((80, 90), 100.0, dtype=np.float32)
    image[:, 1] = np.nan
    result = to_numpy(gd.richardson_lucy(image, gd.psf.moffat(4.0), 30, backend=backend))
    assert np.isnan(result[:, 1]).all()
    np.testing.assert_allclose(result[:, 0], 100.0, rtol=1e-3)


@pytest.mark.parametrize("scale", [1e-16, 1e12])
def test_result_does_not_depend_on_the_data_units(backend, scale):
    image = star_field(shape=(64, 72), seed=13)
    psf = gd.psf.gaussian(2.5, size=11)
    reference = to_numpy(gd.richardson_lucy(image, psf, 10, backend=backend))
    scaled = to_numpy(gd.richardson_lucy(image * np.float32(scale), psf, 10, backend=backend))
    np.testing.assert_allclose(scaled / np.float32(scale), reference, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------- the start of no-data pixels
def clipped_disc(shape, centre, radius, psf, level=30000.0):
    """A bright disc (the Moon, a bright star's core) blurred by ``psf`` and clipped at
    ``level``, as a float32 plane to add to a star field."""
    y, x = np.mgrid[: shape[0], : shape[1]]
    disc = np.where((y - centre[0]) ** 2 + (x - centre[1]) ** 2 < radius**2, 1e5, 0.0)
    return np.minimum(scipy.ndimage.convolve(disc, psf, mode="constant"), level)


@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 1e-3), ("float64", 1e-9)])
def test_nodata_next_to_the_data_does_not_see_far_objects(backend, dtype, tolerance):
    # No-data pixels start from the mean of the data near them (rl._nodata_start), not of the
    # whole image: a clipped disc 200 px from a NaN border (beyond the 100 px that 10
    # iterations of this PSF spread influence) leaves the pixels beside the border as they
    # were, up to the rounding of the data's other scale (measured: 1.2e-4 of the sky in
    # float32, as far from the border; 4e-13 in float64). Started from the mean of the whole
    # image, they moved by 1.28 times the sky.
    psf = gd.psf.gaussian(2.5, size=11)
    image = star_field((360, 300), seed=21, n_stars=150).astype(dtype)
    lit = np.minimum(image + clipped_disc(image.shape, (280, 150), 50, psf), 30000.0)
    for plane in (image, lit):
        plane[:20] = np.nan  # an unobserved border
        plane[:60, :40] = np.nan  # and a corner
    dark = to_numpy(gd.richardson_lucy(image, psf, 10, backend=backend))
    bright = to_numpy(gd.richardson_lucy(lit.astype(dtype), psf, 10, backend=backend))
    beside = (slice(20, 40), slice(40, 300))  # the 20 rows next to the NaN border
    level = float(np.median(dark[beside]))
    assert np.abs(bright[beside] - dark[beside]).max() <= tolerance * level
    assert np.abs(bright[300:] - dark[300:]).max() > level  # the disc did change the image


def test_nodata_start_is_the_mean_of_the_data_near_it(backend):
    # Normalized convolution: a no-data pixel within the PSF radius + 1 of data takes the mean
    # of the data in that box; deeper ones (a mosaic half unobserved) a mean of data near them
    # too; the data itself is untouched, bit for bit.
    xp = backend.xp
    image = star_field((120, 150), seed=22, n_stars=40)
    image[:, :70] = np.nan  # half unobserved, 70 px deep
    image[100:, 120:] = np.nan  # and a corner
    valid = np.isfinite(image)
    start = to_numpy(rl._nodata_start(backend.asarray(image), xp.asarray(valid), (4, 5), xp))
    assert start.dtype == np.float32 and np.isfinite(start).all()
    np.testing.assert_array_equal(start[valid], image[valid])
    for y, x in [(0, 69), (50, 64), (119, 69), (60, 65), (100, 125), (110, 120), (105, 124)]:
        box = image[max(y - 5, 0) : y + 6, max(x - 6, 0) : x + 7]
        assert start[y, x] == pytest.approx(np.nanmean(box.astype(np.float64)), rel=1e-5)
    # deeper, a mean of the data within about 4 times the depth: brighter stars 80 px or more
    # from the pixels 6 to 15 px deep leave them as they were
    assert image[valid].min() <= start.min() and start.max() <= image[valid].max()
    brighter = image.copy()
    brighter[:, 145:] *= 3
    again = to_numpy(rl._nodata_start(backend.asarray(brighter), xp.asarray(valid), (4, 5), xp))
    np.testing.assert_array_equal(again[:, 55:65], start[:, 55:65])


def test_nodata_start_of_a_window_is_the_whole_planes(backend):
    # Within the PSF radius + 1 of data (the pixels whose start reaches the restored data), a
    # tile's window starts its no-data pixels as the whole plane does, bit for bit.
    xp = backend.xp
    image = star_field((200, 240), seed=23, n_stars=60)
    rows, columns = np.mgrid[:200, :240]
    image[rows + columns < 150] = np.nan  # a wedge
    image[150:, 200:] = np.nan
    radius = (6, 6)

    def start(plane):
        valid = np.isfinite(plane)
        return to_numpy(rl._nodata_start(backend.asarray(plane), xp.asarray(valid), radius, xp))

    whole, window = start(image), start(image[30:190, 25:230])
    near = scipy.ndimage.binary_dilation(np.isfinite(image), np.ones((15, 15), bool))
    inside = np.zeros_like(near)
    inside[37:183, 32:223] = True  # the window less 7 px (radius + 1) on each side
    assert (near & inside & np.isnan(image)).sum() > 1000  # the case under test
    compared = (near & inside)[30:190, 25:230]
    np.testing.assert_array_equal(window[compared], whole[30:190, 25:230][compared])


def test_an_image_without_nodata_starts_from_its_data(backend, monkeypatch):
    # Without no-data the start is the data itself, as before the local fill: no fill runs.
    def refuse(*args):
        raise AssertionError("no-data fill on an image without no-data")

    monkeypatch.setattr(rl, "_nodata_start", refuse)
    image = star_field((64, 80), seed=24)
    psf = gd.psf.gaussian(2.0, size=9)
    result = to_numpy(gd.richardson_lucy(image, psf, 5, backend=backend))
    reference = reference_rl(image, psf, 5)
    assert relative_error(result, reference, 8) < 1e-4
