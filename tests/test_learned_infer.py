"""`learned_deconvolve`: the network over a whole image in overlapping tiles.

The network's weights here are random (He's initialization, fixed seeds): the tiling, the
normalization, the no-data and colour handling and the guard rails do not depend on whether
it is trained, and random weights make every mistake in them visible in the output.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import fake_cupy
import numpy as np
import pytest
from helpers import star_field

import gpudeconv as gd
from gpudeconv import GpudeconvError, GpudeconvWarning
from gpudeconv.backend import is_cupy_array
from gpudeconv.learned import infer, network
from gpudeconv.learned.data import normalize
from gpudeconv.learned.infer import BLEND, HALO, learned_deconvolve, load_weights
from gpudeconv.learned.network import Weights

PSF = gd.psf.gaussian(3.0)  # the blur of star_field


def he_weights(seed=0) -> Weights:
    """Random weights of the default architecture that keep activations at the inputs' scale
    (He's initialization) and give a correction of the order of the image's detail."""
    rng = np.random.default_rng(seed)
    arrays = OrderedDict()
    for name, shape in network.layer_shapes().items():
        if name.endswith(".weight"):
            std = np.sqrt(2.0 / np.prod(shape[1:]))
            arrays[name] = rng.normal(0.0, std, shape).astype(np.float32)
        else:
            arrays[name] = rng.normal(0.0, 0.05, shape).astype(np.float32)
    return Weights(arrays)


@pytest.fixture(scope="module")
def weights() -> Weights:
    return he_weights()


def scene(shape=(200, 236), seed=3) -> np.ndarray:
    """Stars on a sky with a gradient and a smooth nebula (float32, noisy)."""
    image = star_field(shape, seed=seed, sky=200.0).astype(np.float64)
    y, x = np.mgrid[: shape[0], : shape[1]]
    image += 20 * x / shape[1] + 60 * np.exp(
        -((y - 0.4 * shape[0]) ** 2 + (x - 0.6 * shape[1]) ** 2) / (2 * 40.0**2)
    )
    return image.astype(np.float32)


def span(image) -> float:
    return float(np.nanmax(image) - np.nanmin(image))


# ----------------------------------------------------------------------------- tiles
def test_the_blending_weights_sum_to_one():
    spans = infer._tile_spans(300, 64)
    assert spans[0] == (0, 64) and spans[-1] == (256, 300)  # 300 is a multiple of 4
    assert infer._tile_spans(301, 64)[-1] == (256, 304)
    total = np.zeros(304 + BLEND)
    for (start, stop), ramp in zip(spans, infer._ramps(spans), strict=True):
        assert ramp.shape == (stop - start + BLEND,)
        total[start : stop + BLEND] += ramp
    half = BLEND // 2
    np.testing.assert_allclose(total[half : half + 300], 1.0, atol=1e-7)


def test_tiled_equals_whole_image_inference(weights):
    image = scene()
    whole = learned_deconvolve(image, PSF, weights=weights, tile=1024)  # one tile
    tiled = learned_deconvolve(image, PSF, weights=weights, tile=64)  # 4 x 4 tiles
    assert whole.dtype == tiled.dtype == np.float32 and whole.shape == image.shape
    assert np.abs(whole - image).max() > 0.05 * span(image)  # the network does something
    # Measured: 1 float32 ulp of the brightest pixels (1.2e-7 of the range).
    assert np.abs(tiled - whole).max() <= 1e-6 * span(image)


def test_no_step_across_tile_boundaries(weights):
    image = scene((256, 288), seed=5)
    whole = learned_deconvolve(image, PSF, weights=weights, tile=1024)
    tiled = learned_deconvolve(image, PSF, weights=weights, tile=64)
    scale = normalize(image)[2]
    # the jump between neighbouring columns (rows) is the same with and without tile seams
    for axis in (0, 1):
        step_tiled, step_whole = np.diff(tiled, axis=axis), np.diff(whole, axis=axis)
        seams = np.arange(63, step_tiled.shape[axis], 64)
        across = np.take(step_tiled - step_whole, seams, axis=axis)
        assert np.abs(across).max() <= 1e-3 * scale  # a thousandth of the noise's 5 sigma


def test_the_tile_size_is_validated(weights):
    image = scene((64, 64))
    for tile in (30, 66, 64.0, True):
        with pytest.raises(GpudeconvError, match="tile must be a multiple of 4 of at least 32"):
            learned_deconvolve(image, PSF, weights=weights, tile=tile)


def test_the_halo_covers_the_reach():
    assert HALO > 23 and HALO % 4 == 0 and BLEND % 4 == 0


# ------------------------------------------------------------------ identity, data, colour
def test_zero_weights_return_the_image_exactly():
    image = scene((120, 140))
    image[10:14, 20:30] = np.nan
    restored = learned_deconvolve(image, PSF, weights=Weights.zeros(), tile=32)
    finite = np.isfinite(image)
    assert np.array_equal(restored[finite], image[finite])
    assert np.isnan(restored[~finite]).all()


def test_no_data_stays_no_data_and_the_scale_ignores_it(weights):
    image = scene((160, 176))
    holed = image.copy()
    holed[:, :40] = np.nan  # a border of no data, a quarter of the frame
    holed[90:96, 100:130] = np.inf
    restored = learned_deconvolve(holed, PSF, weights=weights, tile=64)
    bad = ~np.isfinite(holed)
    assert np.isnan(restored[bad]).all() and np.isfinite(restored[~bad]).all()
    # the noise scale is measured on the data alone: as on the crop without the border
    valid = ~bad
    offset, scale = infer._normalization(holed.astype(np.float64), valid)
    _, crop_offset, crop_scale = normalize(image[:, 40:])
    assert abs(scale / crop_scale - 1) < 0.05
    assert abs(offset - crop_offset) < 0.2 * crop_scale
    # far from the no-data pixels the restoration is that of the data
    reference = learned_deconvolve(image, PSF, weights=weights)
    far = np.s_[10:80, 80:]
    difference = np.abs(restored[far] - reference[far]).max()
    assert difference <= 0.1 * np.abs(reference[far] - image[far]).max()


def test_an_empty_plane_comes_back_empty(weights):
    image = np.stack([scene((64, 72)), np.full((64, 72), np.nan, np.float32)])
    restored = learned_deconvolve(image, PSF, weights=weights)
    assert np.isnan(restored[1]).all() and np.isfinite(restored[0]).all()


def test_colour_is_restored_channel_by_channel(weights):
    planes = [scene((96, 112), seed=seed) for seed in (1, 2, 3)]
    colour = np.stack(planes)
    restored = learned_deconvolve(colour, PSF, weights=weights, tile=64)
    assert restored.shape == colour.shape and restored.dtype == np.float32
    for plane, result in zip(planes, restored, strict=True):
        expected = learned_deconvolve(plane, PSF, weights=weights, tile=64)
        np.testing.assert_array_equal(result, expected)
    # one PSF per channel
    psfs = np.stack([gd.psf.gaussian(f, size=21) for f in (2.5, 3.0, 3.5)])
    per_channel = learned_deconvolve(colour, psfs, weights=weights)
    np.testing.assert_array_equal(
        per_channel[2], learned_deconvolve(planes[2], psfs[2], weights=weights)
    )
    assert not np.array_equal(per_channel[0], restored[0])


def test_float64_and_integers_come_back_float32(weights):
    image = scene((64, 72))
    expected = learned_deconvolve(image, PSF, weights=weights)
    np.testing.assert_array_equal(
        learned_deconvolve(image.astype(np.float64), PSF, weights=weights), expected
    )
    counts = np.round(image).astype(np.uint16)
    assert learned_deconvolve(counts, PSF, weights=weights).dtype == np.float32


# ---------------------------------------------------------------------------- PSF fields
def test_a_field_is_followed_and_tiles_agree(weights):
    image = scene((160, 200))
    field = gd.psf.field.aberrated_field(
        image.shape, (2, 3), fwhm_centre=2.5, fwhm_corner=4.5, elongation_corner=1.2
    )
    whole = learned_deconvolve(image, field, weights=weights, tile=1024)
    tiled = learned_deconvolve(image, field, weights=weights, tile=64)
    assert np.abs(tiled - whole).max() <= 1e-6 * span(image)
    window = learned_deconvolve(image, field.window(0, 0, *image.shape), weights=weights)
    np.testing.assert_array_equal(window, whole)
    # a uniform field is the PSF itself; a varying one changes the result
    uniform = gd.PSFField.uniform(PSF, image.shape)
    np.testing.assert_array_equal(
        learned_deconvolve(image, uniform, weights=weights),
        learned_deconvolve(image, PSF, weights=weights),
    )
    assert np.abs(whole - learned_deconvolve(image, PSF, weights=weights)).max() > 1.0


def test_a_field_of_another_shape_is_refused(weights):
    image = scene((64, 72))
    field = gd.PSFField.uniform(PSF, (64, 80))
    with pytest.raises(GpudeconvError, match="64x72"):
        learned_deconvolve(image, field, weights=weights)
    with pytest.raises(GpudeconvError, match="take the window of the tile's own size"):
        learned_deconvolve(image, field.window(0, 0, 60, 72), weights=weights)


# ---------------------------------------------------------------------------- guard rails
def test_a_psf_far_outside_the_training_range_is_refused(weights):
    image = scene((64, 72))
    # trained: FWHM 2 to 7 px at the patch centres, 1.7 to 8.05 px at the field nodes
    with pytest.raises(GpudeconvError, match=r"far outside .* FWHM 1.7 to 8.05 px.*--method rl"):
        learned_deconvolve(image, gd.psf.gaussian(17.0), weights=weights)
    with pytest.raises(GpudeconvError, match=r"axis ratio down to 0.1\d.*far outside"):
        learned_deconvolve(image, gd.psf.gaussian(6.0, ratio=0.15), weights=weights)


@pytest.mark.parametrize(
    "psf",
    [gd.psf.gaussian(9.5), gd.psf.moffat(1.3), gd.psf.gaussian(4.0, ratio=0.4, angle=30)],
    ids=["wide", "narrow", "elongated"],
)
def test_a_psf_outside_the_training_range_warns(weights, psf):
    image = scene((64, 72))
    with pytest.warns(GpudeconvWarning, match=r"outside the training range.*--method rl") as got:
        learned_deconvolve(image, psf, weights=weights)
    assert len(got) == 1 and "\n" not in str(got[0].message)
    assert got[0].filename == __file__  # stacklevel: the caller's line


def test_deep_sky_in_range_is_quiet(weights):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learned_deconvolve(scene((96, 112)), gd.psf.moffat(6.5, ratio=0.65), weights=weights)


def test_planetary_data_warns(weights):
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:128, :128]
    disk = np.where(np.hypot(y - 64, x - 60) < 40, 20000.0, 0.0)
    image = (disk + 100 + rng.normal(0, 5, disk.shape)).astype(np.float32)
    with pytest.warns(GpudeconvWarning, match="trained on deep-sky data only") as got:
        learned_deconvolve(image, PSF, weights=weights)
    assert got[0].filename == __file__


def test_noiseless_data_is_refused(weights):
    with pytest.raises(GpudeconvError, match="no measurable noise"):
        learned_deconvolve(np.ones((64, 64), np.float32), PSF, weights=weights)


def test_bad_images_are_refused(weights):
    with pytest.raises(GpudeconvError, match="at least 16 pixels"):
        learned_deconvolve(np.ones((8, 64), np.float32), PSF, weights=weights)
    with pytest.raises(GpudeconvError, match="2-D"):
        learned_deconvolve(np.ones((2, 2, 64, 64), np.float32), PSF, weights=weights)


# -------------------------------------------------------------------------------- weights
def test_weights_from_a_path_the_environment_or_the_package(weights, tmp_path, monkeypatch):
    image = scene((64, 72))
    expected = learned_deconvolve(image, PSF, weights=weights)
    path = tmp_path / "net.npz"
    weights.save(path)
    np.testing.assert_array_equal(learned_deconvolve(image, PSF, weights=path), expected)
    monkeypatch.setenv(infer.WEIGHTS_ENV, str(path))
    np.testing.assert_array_equal(learned_deconvolve(image, PSF), expected)
    monkeypatch.setenv(infer.WEIGHTS_ENV, str(tmp_path / "absent.npz"))
    with pytest.raises(GpudeconvError, match="GPUDECONV_LEARNED_WEIGHTS names .*not a file"):
        load_weights()
    monkeypatch.delenv(infer.WEIGHTS_ENV)
    monkeypatch.setattr(infer, "WEIGHTS_FILE", "absent-v0.npz")
    with pytest.raises(GpudeconvError, match="packaged weights are missing; reinstall"):
        load_weights()
    with pytest.raises(GpudeconvError, match="weights must be"):
        load_weights(3)


# ------------------------------------------------------------------------------- CuPy
@pytest.fixture
def fake(monkeypatch, tmp_path):
    return fake_cupy.install(monkeypatch, cache_dir=tmp_path)


def test_the_cupy_path_equals_the_numpy_path(fake, weights):
    cp = fake.cupy
    image = scene((96, 104))
    image[:3] = np.nan
    expected = learned_deconvolve(image, PSF, weights=weights, tile=64, backend="numpy")
    on_device = learned_deconvolve(cp.asarray(image), PSF, weights=weights, tile=64)
    assert is_cupy_array(on_device) and on_device.dtype == np.float32
    np.testing.assert_allclose(on_device.get(), expected, rtol=1e-5, atol=1e-3)
    from_host = learned_deconvolve(image, PSF, weights=weights, tile=64, backend="cupy")
    assert type(from_host) is np.ndarray
    np.testing.assert_allclose(from_host, expected, rtol=1e-5, atol=1e-3)


# --------------------------------------------------------------------------- streamed in tiles
def test_streamed_tiles_match_the_whole_image_with_one_normalization(tmp_path):
    """A mosaic streamed through the tile driver (`deconvolve_file`, tile=256) is the whole
    image restored in memory with the same (global) normalization: the halo covers the
    network's reach and the local mean's, and the windows start at multiples of 4."""
    from astropy.io import fits

    from gpudeconv.synthetic import make_scene
    from gpudeconv.tiles import deconvolve_file, learned_halo

    psf = gd.psf.moffat(4.0, beta=3.0, size=25)
    image = np.asarray(make_scene((600, 700), psf=psf, seed=5).observed, dtype=np.float32)
    source, target = tmp_path / "mosaic.fits", tmp_path / "restored.fits"
    fits.PrimaryHDU(image).writeto(source)
    net = load_weights()
    halo = learned_halo(psf, image.shape, 1)
    assert halo % 4 == 0 and halo >= HALO + BLEND // 2
    report = deconvolve_file(  # 30 iterations: RL's count, which the network does not run
        source, target, psf, 30, tile=256, progress=False, method="learned", backend="numpy"
    )
    assert report.tile == 256 and report.halo == halo and report.tiles_total == 9
    # one pass of the network over each pixel, not 30
    assert report.mpix_it_per_s == pytest.approx(600 * 700 / report.seconds / 1e6)
    (offset, scale) = report.normalization[0]
    _, whole_offset, whole_scale = normalize(image)
    assert offset == pytest.approx(whole_offset, rel=1e-3)
    assert scale == pytest.approx(whole_scale, rel=0.05)
    streamed = fits.getdata(target)
    whole = learned_deconvolve(
        image, psf, weights=net, normalization=(offset, scale), backend="numpy"
    )
    difference = np.abs(streamed - whole).max() / span(whole)
    print(f"tiled vs whole: {difference:.3g} of the range")
    assert difference < 1e-4
    assert np.abs(whole - image).max() > 0.01 * span(image)  # the network did something
    history = "\n".join(str(line) for line in fits.getheader(target)["HISTORY"])
    assert "learned" in history and "normalization offset" in history


def _streamed_warnings(image, tmp_path, name):
    from astropy.io import fits

    from gpudeconv.tiles import deconvolve_file

    source = tmp_path / f"{name}.fits"
    fits.PrimaryHDU(image).writeto(source)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        deconvolve_file(
            source,
            tmp_path / f"{name}-restored.fits",
            PSF,
            1,
            tile=128,
            progress=False,
            method="learned",
            backend="numpy",
        )
    return [str(w.message) for w in got if "trained on deep-sky data only" in str(w.message)]


def test_the_deep_sky_check_of_a_streamed_mosaic_is_the_whole_images(tmp_path):
    # A bright disc (3 % of the mosaic, 20000 ADU over a 200 ADU sky) fills ~15 % of the one
    # tile window around it: each window checked on its own warned there, where the whole image
    # (and an in-memory run) does not. The check is made once, on the mosaic's sample.
    rng = np.random.default_rng(2)
    image = star_field((400, 400), seed=4, sky=200.0)
    y, x = np.mgrid[:400, :400]
    image[np.hypot(y - 60, x - 60) < 40] += 20000.0
    image = (image + rng.normal(0, 2, image.shape)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learned_deconvolve(image, PSF, weights=load_weights())
    assert _streamed_warnings(image, tmp_path, "disc") == []
    # a planetary frame still warns, once for the mosaic rather than once a tile
    planet = np.where(np.hypot(y - 200, x - 190) < 150, 20000.0, 0.0) + 100.0
    planet = (planet + rng.normal(0, 5, planet.shape)).astype(np.float32)
    assert len(_streamed_warnings(planet, tmp_path, "planet")) == 1


def test_out_of_memory_halves_the_tile_to_a_multiple_of_4(weights, tmp_path, monkeypatch):
    """A tile of 132 (a multiple of 4, not of 8) that runs out of memory goes on at 64, not 66:
    every window still starts on a multiple of 4 and reaches the network whole, its halo
    untouched, and the mosaic is the whole image restored with the same normalization."""
    from astropy.io import fits

    from gpudeconv import tiles

    image = scene()
    source, target = tmp_path / "mosaic.fits", tmp_path / "restored.fits"
    fits.PrimaryHDU(image).writeto(source)
    windows = []
    restore = infer.learned_deconvolve

    def small_only(plane, *args, **kwargs):
        if plane.shape[-1] > 200:
            raise MemoryError("out of memory allocating 1.2 GiB")
        windows.append(plane.shape)
        return restore(plane, *args, **kwargs)

    monkeypatch.setattr(infer, "learned_deconvolve", small_only)
    with pytest.warns(GpudeconvWarning, match="with tiles of 132 pixels; going on with 64-pixel"):
        report = tiles.deconvolve_file(
            source,
            target,
            PSF,
            1,
            tile=132,
            progress=False,
            method="learned",
            backend="numpy",
            options={"weights": weights},
        )
    assert report.tile == 64 and report.tiles_total == 16
    plan = tiles._cut(image.shape, report.tile, report.halo)
    assert all(t.read[0] % 4 == 0 and t.read[2] % 4 == 0 for t in plan.tiles)
    assert windows == [plan.read_shape] * len(plan)  # none cut: the halo is whole
    whole = restore(
        image, PSF, weights=weights, normalization=report.normalization[0], backend="numpy"
    )
    assert np.abs(fits.getdata(target) - whole).max() <= 1e-4 * span(whole)


def test_learned_normalization_is_validated(weights):
    image = scene()
    with pytest.raises(GpudeconvError, match="normalization must be"):
        learned_deconvolve(image, PSF, weights=weights, normalization=(1.0, 0.0))
    given = learned_deconvolve(image, PSF, weights=weights, normalization=(200.0, 10.0))
    other = learned_deconvolve(image, PSF, weights=weights, normalization=(200.0, 20.0))
    assert np.abs(given - other).max() > 0
