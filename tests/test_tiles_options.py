"""The tile driver with `richardson_lucy`'s options (gpudeconv/tiles.py, "Options"): the noise
model and saturation level measured once on the whole image, each tile restored with them, the
result compared with the in-core restoration with the same resolved options.

The scene is a synthetic deep-sky field (`gpudeconv.synthetic.make_scene`) with clipped stars
and a NaN border, restored with FFTW on one thread as in test_tiles.py.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from astropy.io import fits

import gpudeconv as gd
from gpudeconv import GpudeconvError, GpudeconvWarning, tiles
from gpudeconv.api import method_options
from gpudeconv.backend._numpy import NumPyBackend
from gpudeconv.io import ArrayTileReader, ArrayTileWriter
from gpudeconv.restore.noise import BOX, NoiseModel, estimate_noise, saturation_level
from gpudeconv.synthetic import make_scene

ITERATIONS = 10


@pytest.fixture(scope="module")
def cpu():
    return NumPyBackend(workers=1)


@pytest.fixture(scope="module")
def scene():
    return make_scene((600, 700), seed=3, saturation=3000.0, nan_border=12)


def image_range(image) -> float:
    return float(np.nanmax(image) - np.nanmin(image))


def restore_in_tiles(image, psf, options, backend, tile=256, iterations=ITERATIONS):
    plan = tiles.plan_tiles(
        image.shape,
        psf_size=psf.shape[-1],
        iterations=iterations,
        tile=tile,
        dering=bool(options.get("dering")),
    )
    out = np.empty(image.shape, np.float32)
    report = tiles.restore_tiled(
        ArrayTileReader(image),
        ArrayTileWriter(out),
        psf,
        iterations,
        backend=backend,
        plan=plan,
        progress=False,
        options=options,
    )
    return out, report


def measure(image, options, tile=256):
    """What the driver measures on the whole image before the tiles."""
    reader = ArrayTileReader(image)
    plan = tiles.plan_tiles(image.shape, psf_size=25, iterations=ITERATIONS, tile=tile)
    settings = tiles._tile_settings(options, reader.channels)
    reads = []

    def read(core):
        reads.append(core)
        return reader.read(core)

    cores = [t.core for t in plan.tiles]
    measured = tiles._measure(
        read, cores, reader.shape, np.float32, settings, unsigned=False, stacklevel=2
    )
    return measured, len(reads) / len(cores)


# ------------------------------------------------------------------------------ the seams


@pytest.mark.parametrize(
    ("options", "sky_subtracted"),
    [
        ({"noise": "auto"}, True),  # the model's offset lifts the data: no pedestal
        ({"noise": "auto", "regularization": 0.005}, False),  # rl-tv
        ({"noise": "auto", "damping": 3.0}, False),  # damped
        ({"noise": "auto", "dering": 0.5}, False),
        ({"noise": "auto", "saturation": "auto"}, False),
    ],
    ids=["noise-auto", "rl-tv", "damped", "dering", "saturation-auto"],
)
def test_tiles_with_options_match_the_whole_image(cpu, scene, options, sky_subtracted):
    image = scene.observed - scene.sky if sky_subtracted else scene.observed
    tiled, report = restore_in_tiles(image, scene.psf, options, cpu)
    model, level = report.noise[0], report.saturation[0]
    assert isinstance(model, NoiseModel)
    assert (level is not None) == ("saturation" in options)
    resolved = {**options, "noise": model, "saturation": level}
    whole = gd.richardson_lucy(image, scene.psf, ITERATIONS, backend=cpu, **resolved)
    span = image_range(image)
    np.testing.assert_array_equal(np.isnan(tiled), np.isnan(image))
    # measured (the largest difference over the range): 5.5e-6 to 5.6e-6, 9.6e-6 with TV,
    # next to the NaN border too, whose pixels start from the data near them in a tile as in
    # the whole image (7e-4 to 1.2e-3 there when each tile started them from its mean)
    assert np.nanmax(np.abs(tiled - whole)) <= 1e-4 * span
    # the option did act: plain RL of the same data is far from it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GpudeconvWarning)  # sky-subtracted: a pedestal
        plain, _ = restore_in_tiles(image, scene.psf, {}, cpu)
    assert np.nanmax(np.abs(plain - whole)) > 5e-3 * span


def test_deringing_one_iteration_keeps_its_floor_within_the_halo(cpu, scene):
    # The floor of a pixel is measured on the data within 3 PSF radii of it: one iteration
    # needs a halo of 3 r, not the 2 r of plain RL (measured: 3e-4 at the cores' edges with 2 r).
    image = scene.observed[:300, :340]
    assert tiles.halo_for(25, 1, dering=True) == 36 and tiles.halo_for(25, 1) == 24
    assert tiles.halo_for(25, 10, dering=True) == tiles.halo_for(25, 10) == 50
    options = {"noise": "auto", "dering": 1.0}
    tiled, report = restore_in_tiles(image, scene.psf, options, cpu, tile=128, iterations=1)
    whole = gd.richardson_lucy(image, scene.psf, 1, backend=cpu, noise=report.noise[0], dering=1)
    assert np.nanmax(np.abs(tiled - whole)) <= 1e-5 * image_range(image)  # 5e-7


def clipped_disc(scene, radius=160):
    """400 x 440 pixels of the scene (inside its NaN border) with a bright disc clipped at the
    scene's level of 3000, as the Moon or a bright star's core: the read windows of the tiles
    of 96 around its centre (row and column 240) hold saturated pixels only."""
    from scipy import signal

    image = scene.observed[12:412, 12:452].astype(np.float64)
    y, x = np.mgrid[: image.shape[0], : image.shape[1]]
    disc = np.where((y - 240) ** 2 + (x - 240) ** 2 < radius**2, 20000.0, 0.0)
    image += signal.oaconvolve(disc, scene.psf, mode="same")
    return np.minimum(image, 3000.0).astype(np.float32)


@pytest.mark.parametrize("options", [{}, {"noise": "auto", "saturation": "auto"}])
def test_a_far_clipped_disc_leaves_the_tiles_next_to_no_data_as_the_whole_image(
    cpu, scene, options
):
    # A clipped disc 200 px from the scene's NaN border raised the mean of the data, from which
    # the whole image started its no-data pixels, and not that of the tiles far from it: they
    # differed by 1.3e-2 of the range next to the border. Now every no-data pixel starts from
    # the data near it, in a tile as in the whole image: measured 6.6e-6 and 8e-6.
    from scipy import signal

    y, x = np.mgrid[: scene.observed.shape[0], : scene.observed.shape[1]]
    disc = np.where((y - 312) ** 2 + (x - 350) ** 2 < 100**2, 20000.0, 0.0)
    image = np.minimum(scene.observed + signal.oaconvolve(disc, scene.psf, mode="same"), 3000.0)
    image = image.astype(np.float32)  # NaN where the scene has no data
    tiled, report = restore_in_tiles(image, scene.psf, options, cpu)
    resolved = {**options, "noise": report.noise[0], "saturation": report.saturation[0]}
    whole = gd.richardson_lucy(image, scene.psf, ITERATIONS, backend=cpu, **resolved)
    np.testing.assert_array_equal(np.isnan(tiled), np.isnan(scene.observed))
    assert np.nanmax(np.abs(tiled - whole)) <= 1e-4 * image_range(image)


@pytest.mark.parametrize(
    "options", [{"noise": "auto", "saturation": "auto"}, {"saturation": 2900.0}]
)
def test_a_tile_inside_a_clipped_area_is_restored_as_the_whole_image_is(cpu, scene, options):
    # A window with no unsaturated pixel is no error in tiles: the whole image has data to fit,
    # and the tile restores as it does there (the in-memory restoration's check is on the
    # whole image, `tiles._check_saturation`).
    image = clipped_disc(scene)
    tiled, report = restore_in_tiles(image, scene.psf, options, cpu, tile=96)
    level = report.saturation[0]
    assert level is not None
    plan = tiles.plan_tiles(image.shape, psf_size=25, iterations=ITERATIONS, tile=96)
    saturated = [
        t
        for t in plan.tiles
        if (image[t.read[0] : t.read[1], t.read[2] : t.read[3]] >= level).all()
    ]
    assert saturated  # the case under test: a window without any unsaturated pixel
    resolved = {**options, "noise": report.noise[0], "saturation": level}
    whole = gd.richardson_lucy(image, scene.psf, ITERATIONS, backend=cpu, **resolved)
    # measured: 6e-6 of the range (no NaN border here), as for the other options
    assert np.abs(tiled - whole).max() <= 1e-4 * image_range(image)


def test_an_image_saturated_everywhere_is_refused_in_tiles_as_in_memory(cpu, scene):
    image = clipped_disc(scene)[200:280, 200:280]  # inside the disc: all at 3000
    psf = scene.psf
    match = r"^every pixel is at or above the saturation level 2900; give a higher saturation"
    with pytest.raises(GpudeconvError, match=match):
        gd.richardson_lucy(image, psf, 2, backend=cpu, saturation=2900.0)
    # data the driver otherwise does not read before the tiles (unsigned, plain RL), and colour
    for data, where in (
        (image, ""),
        (image.astype(np.uint16), ""),
        (np.stack([image - 500, image]), " of channel 1"),
    ):
        with pytest.raises(GpudeconvError, match=match.replace("pixel", "pixel" + where)) as caught:
            tiles.deconvolve_tiled(
                data, psf, 2, backend=cpu, tile=32, options={"saturation": 2900.0}
            )
        assert "\n" not in str(caught.value)


# ------------------------------------------------------------------------------ measuring


def test_the_noise_model_is_measured_on_the_whole_images_boxes(scene):
    image = scene.observed
    whole = estimate_noise(image)
    # 18 x 21 boxes: all of them are sampled, the model is the whole image's, whatever the tiles
    for tile in (96, 256):
        measured, reads = measure(image, {"noise": "auto"}, tile=tile)
        assert measured.noise == (whole,) and measured.pedestals == (0.0,) and reads == 1

    # a colour image: one model per channel, each its own
    cube = np.stack([image, 0.5 * image, image[::-1] + 40])
    measured, _ = measure(cube, {"noise": "auto", "read_noise": 5.0, "gain": 1.0})
    assert measured.noise == tuple(
        estimate_noise(plane, read_noise=5.0, gain=1.0) for plane in cube.astype(np.float32)
    )


def test_a_large_images_noise_sample_is_a_regular_subset(scene, monkeypatch):
    # as a mosaic of more than SAMPLE_BOXES boxes is sampled: here 100 of the 378 boxes
    monkeypatch.setattr(tiles, "SAMPLE_BOXES", 100)
    whole = estimate_noise(scene.observed)
    measured, _ = measure(scene.observed, {"noise": "auto"}, tile=128)
    sampled = measured.noise[0]
    # measured: sigma -0.1 %, sky -0.005 sigma (4096 of 6724 boxes of a 2600^2 scene: -0.2 %)
    assert abs(sampled.sigma / whole.sigma - 1) <= 0.03
    assert abs(sampled.background - whole.background) <= 0.1 * whole.sigma
    assert sampled.source == whole.source
    # memory: a 40000^2 mosaic keeps SAMPLE_BOXES boxes, whatever the tiles
    big = tiles._NoiseSample((40000, 40000), np.float32)
    assert big.planes.size <= tiles.SAMPLE_BOXES * BOX**2
    assert big.planes.shape[1] // BOX >= 4 and big.planes.shape[2] // BOX >= 4


@pytest.mark.parametrize("kept", [tiles.TOP_VALUES, 8])
def test_saturation_auto_is_the_whole_images_plateau(scene, monkeypatch, kept):
    # 109 pixels clipped at 3000: with 8 values kept, the plateau and the level under it are
    # counted by reading the image again
    monkeypatch.setattr(tiles, "TOP_VALUES", kept)
    rng = np.random.default_rng(5)
    flat = rng.normal(100, 10, (200, 230)).astype(np.float32)
    few = flat.copy()
    few.flat[rng.integers(0, few.size, 3)] = 500  # 3 pixels are not a plateau
    steps = flat.copy()
    steps.flat[rng.permutation(steps.size)[:40]] = [500] * 30 + [400] * 10  # a plateau
    ladder = flat.copy()
    ladder.flat[rng.permutation(steps.size)[:50]] = [500] * 30 + [400] * 20  # integer-like
    for image, clipped in ((scene.observed, True), (few, False), (steps, True), (ladder, False)):
        measured, reads = measure(image, {"saturation": "auto"}, tile=96)
        assert measured.saturation == (saturation_level(image),)
        assert (measured.saturation[0] is not None) == clipped
        assert reads == 1 or kept == 8


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"accelerate": True}, r"^accelerate=True cannot be used in tiles: .*restore in memory"),
        ({"stop": "noise"}, r"^stop='noise' cannot be used in tiles: .*restore in memory"),
        ({"luminance": True}, r"^luminance=True cannot be used in tiles: .*not supported in"),
        ({"return_info": True}, r"^return_info=True cannot be used in tiles: .*TileRunReport"),
        ({"nsr": 0.1}, r"^'nsr' is not an option of a tiled restoration; the options are noise"),
        ({"dering": 2.0}, r"^dering must be a strength from 0"),
        ({"noise": [None, None]}, r"^noise must hold one NoiseModel per channel"),
        ("tv", r"^options must be a dict"),
    ],
)
def test_options_tiles_cannot_take_are_refused_in_one_line(cpu, options, match):
    image = np.ones((64, 64), np.float32)
    with pytest.raises(GpudeconvError, match=match) as caught:
        tiles.deconvolve_tiled(image, gd.psf.gaussian(1.5, size=7), 2, backend=cpu, options=options)
    assert "\n" not in str(caught.value)


def test_their_off_values_are_taken(cpu):
    image = np.random.default_rng(1).uniform(50, 60, (64, 64)).astype(np.float32)
    off = {"accelerate": False, "stop": None, "luminance": False, "return_info": False}
    psf = gd.psf.gaussian(1.5, size=7)
    result = tiles.deconvolve_tiled(image, psf, 2, backend=cpu, tile=32, options=off)
    expected = tiles.deconvolve_tiled(image, psf, 2, backend=cpu, tile=32)
    np.testing.assert_array_equal(result, expected)


def test_deconvolve_streams_with_the_methods_options(tmp_path, scene):
    image = scene.observed[:200, :230]
    path = tmp_path / "in.fits"
    fits.PrimaryHDU(image).writeto(path)
    psf = scene.psf
    for method in ("rl-tv", "damped"):
        in_memory = gd.deconvolve(image, psf, method=method, iterations=5)
        streamed = gd.deconvolve(path, psf, method=method, iterations=5, tile=96)
        assert np.nanmax(np.abs(streamed - in_memory)) <= 1e-4 * image_range(image)  # 2e-6
    with pytest.raises(GpudeconvError, match=r"^method 'wiener' cannot be used when restoring"):
        gd.deconvolve(path, psf, method="wiener", tile=96)
    with pytest.raises(GpudeconvError, match=r"^accelerate=True cannot be used in tiles"):
        gd.deconvolve(path, psf, iterations=5, tile=96, accelerate=True)


# ------------------------------------------------------------------------------ files


def test_the_header_records_the_options_and_each_channels_model(cpu, scene, tmp_path):
    image = scene.observed[:200, 150:380]  # a clipped star at (60, 115)
    path = tmp_path / "in.fits"
    fits.PrimaryHDU(image).writeto(path)
    options = {"noise": "auto", "regularization": 0.005, "saturation": "auto"}
    report = tiles.deconvolve_file(
        path, tmp_path / "out.fits", scene.psf, 4, backend=cpu, tile=96, progress=False,
        options=options, method="rl-tv",
    )  # fmt: skip
    model, level = report.noise[0], report.saturation[0]
    assert model == estimate_noise(image) and level == saturation_level(image)
    assert report.options["regularization"] == 0.005 and report.options["noise"] == "auto"
    history = " ".join(fits.getheader(tmp_path / "out.fits")["HISTORY"])
    assert "rl-tv, 4 iterations" in history
    assert "options: noise=auto regularization=0.005 saturation=auto" in history
    assert f"sky {model.background:.6g} sigma {model.sigma:.4g}" in history
    assert f"({model.source}); saturation {level:.6g}" in history


def stop_after(count):
    def on_tile(done, tile):
        if done == count:
            raise KeyboardInterrupt

    return on_tile


def test_a_resumed_run_takes_the_journals_models_and_refuses_other_options(
    cpu, scene, tmp_path, monkeypatch
):
    image = scene.observed[:260, 100:400]
    path = tmp_path / "in.fits"
    fits.PrimaryHDU(image).writeto(path)
    out = tmp_path / "out.fits"
    options = {"noise": "auto", "damping": 3.0, "saturation": "auto"}
    run = dict(backend=cpu, tile=96, progress=False)
    with pytest.raises(tiles.TileRunInterrupted):
        tiles.deconvolve_file(
            path, out, scene.psf, 3, on_tile=stop_after(4), options=options, **run
        )
    first = json.loads((tmp_path / ".out.fits.journal").read_text().splitlines()[0])
    assert first["options"]["damping"] == 3.0
    assert first["measured"]["noise"][0]["sigma"] == estimate_noise(image).sigma

    with pytest.raises(
        GpudeconvError,
        match=r"^cannot resume .* with different options \(damping\); run with --overwrite",
    ):
        tiles.deconvolve_file(
            path, out, scene.psf, 3, resume=True, options={**options, "damping": 2.0}, **run
        )
    with pytest.raises(
        GpudeconvError, match=r"with different options \(damping, noise, saturation\);"
    ):
        tiles.deconvolve_file(path, out, scene.psf, 3, resume=True, **run)

    def measured_again(*args, **kwargs):
        raise AssertionError("a resumed run takes the journal's models")

    monkeypatch.setattr(tiles, "_measure", measured_again)
    report = tiles.deconvolve_file(path, out, scene.psf, 3, resume=True, options=options, **run)
    assert report.tiles_resumed == 4
    monkeypatch.undo()
    tiles.deconvolve_file(path, tmp_path / "straight.fits", scene.psf, 3, options=options, **run)
    assert out.read_bytes() == (tmp_path / "straight.fits").read_bytes()


def test_resuming_with_another_method_names_the_method(cpu, scene, tmp_path):
    path = tmp_path / "in.fits"
    fits.PrimaryHDU(scene.observed[:200, 100:300]).writeto(path)
    out = tmp_path / "out.fits"
    run = dict(backend=cpu, tile=96, progress=False)
    tv = method_options("rl-tv")
    with pytest.raises(tiles.TileRunInterrupted):
        tiles.deconvolve_file(
            path, out, scene.psf, 3, on_tile=stop_after(2), options=tv, method="rl-tv", **run
        )

    with pytest.raises(
        GpudeconvError,
        match=r"^cannot resume .*: it was written with a different method \(rl-tv, now rl\); run",
    ):
        tiles.deconvolve_file(path, out, scene.psf, 3, resume=True, **run)
    with pytest.raises(
        GpudeconvError, match=r"with a different method \(rl-tv, now learned\); run"
    ):
        tiles.deconvolve_file(path, out, scene.psf, 3, resume=True, method="learned", **run)

    # a journal from before the RL methods were named: their options tell them apart
    journal = tmp_path / ".out.fits.journal"
    lines = journal.read_text().splitlines()
    first = json.loads(lines[0])
    del first["method"]
    journal.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    with pytest.raises(GpudeconvError, match=r"with different options \(regularization\); run"):
        tiles.deconvolve_file(path, out, scene.psf, 3, resume=True, **run)
    with pytest.raises(GpudeconvError, match=r"a different method \(an RL method, now learned\)"):
        tiles.deconvolve_file(path, out, scene.psf, 3, resume=True, method="learned", **run)
    report = tiles.deconvolve_file(
        path, out, scene.psf, 3, resume=True, options=tv, method="rl-tv", **run
    )
    assert report.tiles_resumed == 2 and out.exists()
