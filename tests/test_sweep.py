"""PSF sweeps on a synthetic planet: ranges, restorations, scores, contact sheets, the command."""

from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
from astropy.io import fits
from PIL import Image
from test_limb import synthetic_planet

from gpudeconv import GpudeconvError
from gpudeconv.sweep import (
    AUTO_CROP,
    SweepResult,
    add_parser,
    auto_crop,
    contact_sheet,
    parse_range,
    range_around,
    run,
    sheet_picture,
    sweep,
)


@pytest.fixture(scope="module")
def planet() -> np.ndarray:
    """A 96 x 112 frame holding a banded disc of radius 30 px blurred by FWHM 3 px."""
    return synthetic_planet(3.0, shape=(96, 112), centre=(47.2, 57.6), radius=30.0, darkening=0.3)


@pytest.fixture(scope="module")
def result(planet) -> SweepResult:
    return sweep(planet, [2.0, 3.0, 4.5], iterations=(5, 10), backend="numpy")


def assert_one_line(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def files_in(folder) -> list[str]:
    return sorted(os.listdir(folder))


# --- parse_range ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.5:4:0.5", [1.5, 2.0, 2.5, 3.0, 3.5, 4.0]),
        ("0.1:0.3:0.1", [0.1, 0.2, 0.3]),  # the stop survives 0.1 + 0.1 + 0.1 = 0.30000000000000004
        ("1:2:0.3", [1.0, 1.3, 1.6, 1.9]),  # a stop between steps is not reached
        ("2:2:1", [2.0]),
        ("2,2.5,3", [2.0, 2.5, 3.0]),
        (" 3 , 2 ", [3.0, 2.0]),
        ("30", [30.0]),
        ("1e1", [10.0]),
    ],
)
def test_parse_range(text, expected):
    assert parse_range(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("1:2", "three parts"),
        ("1:2:3:4", "three parts"),
        ("1:2:0", "step must be positive"),
        ("1:2:-0.5", "step must be positive"),
        ("4:1:0.5", "stops (1) before it starts (4)"),
        ("a,b", "'a' is not a number"),
        ("1:x:1", "'x' is not a number"),
        ("2,,3", "'' is not a number"),
        ("nan", "not a number"),
        ("1,inf", "not a number"),
        ("0,1", "must be positive"),
        ("-1:1:0.5", "must be positive"),
        ("1:1000:1", "at most 48"),
    ],
)
def test_parse_range_errors_are_one_line_with_an_example(text, fragment):
    with pytest.raises(GpudeconvError) as error:
        parse_range(text, name="--psf-fwhm")
    assert_one_line(error, fragment, "--psf-fwhm")
    if fragment != "at most 48":
        assert "e.g. 1.5:4:0.5" in str(error.value)


def test_range_around_spans_0_6_to_1_6():
    assert range_around(3.0) == [1.8, 2.4, 3.0, 3.6, 4.2, 4.8]
    small = range_around(1.0)
    assert small[0] == 0.6 and small[-1] == 1.6 and len(small) == 6


# --- sweep ------------------------------------------------------------------------------------


def test_sweep_panels_labels_and_shapes(planet, result):
    assert result.labels == [
        "FWHM 2 px, 5 it",
        "FWHM 2 px, 10 it",
        "FWHM 3 px, 5 it",
        "FWHM 3 px, 10 it",
        "FWHM 4.5 px, 5 it",
        "FWHM 4.5 px, 10 it",
    ]
    assert result.crop == (0, 0, 96, 112)  # a frame under 512 x 512 is restored whole
    np.testing.assert_array_equal(result.original, planet)
    assert len(result.restorations) == 6
    for panel in result.panels:
        assert panel.image.shape == planet.shape
        assert panel.image.dtype == np.float32
        assert np.isfinite([panel.sharpness, panel.noise, panel.overshoot]).all()
    assert result.model == "gaussian" and result.beta is None and result.backend == "numpy"
    assert result.psf_text == "Gaussian"


def test_sweep_restores_with_each_width(planet, result):
    """Each panel is what richardson_lucy gives with that PSF: wider PSFs sharpen more."""
    import gpudeconv as gd

    panel = result.panels[3]
    psf = gd.psf.gaussian(3.0, size=gd.psf.gaussian(4.5).shape[0])
    expected = gd.richardson_lucy(planet, psf, 10, backend="numpy")
    np.testing.assert_allclose(panel.image, expected, rtol=1e-5, atol=1e-3)
    sharpness = [p.sharpness for p in result.panels if p.iterations == 10]
    assert sharpness == sorted(sharpness) and sharpness[0] > 1.0


def test_overshoot_grows_past_the_true_width_and_the_hint_stays_below(planet):
    """The limb rings once the PSF is wider than the blur (FWHM 3 px here)."""
    swept = sweep(planet, [1.5, 2.25, 3.0, 4.5, 6.0], iterations=15, backend="numpy")
    overshoot = {p.fwhm: p.overshoot for p in swept.panels}
    assert overshoot[6.0] > 3 * overshoot[3.0]
    assert overshoot[6.0] > overshoot[4.5] > overshoot[3.0]
    assert 2.25 <= swept.best.fwhm <= 4.5
    assert swept.best in swept.panels


def test_sweep_moffat_and_explicit_crop(planet):
    swept = sweep(planet, [2.5], model="moffat", beta=3.0, iterations=3, crop=(10, 20, 48, 64))
    np.testing.assert_array_equal(swept.original, planet[10:58, 20:84])
    assert swept.panels[0].image.shape == (48, 64)
    assert swept.crop == (10, 20, 48, 64)
    assert swept.psf_text == "Moffat beta 3"
    assert sweep(planet, [2.5], model="moffat", iterations=1).beta == 2.5


def test_sweep_colour_and_nan(planet):
    cube = np.stack([planet, 0.8 * planet, 0.6 * planet])
    cube[:, :8, :8] = np.nan  # a no-data corner
    swept = sweep(cube, [3.0], iterations=3, backend="numpy")
    restored = swept.panels[0].image
    assert restored.shape == cube.shape
    assert np.isnan(restored[:, :8, :8]).all() and np.isfinite(restored[:, 8:, 8:]).all()
    assert np.isfinite([swept.panels[0].sharpness, swept.panels[0].noise]).all()
    picture = sheet_picture(swept)
    assert picture.ndim == 3 and picture.shape[0] == 3  # colour stays colour


def test_auto_crop_finds_the_disc():
    frame = synthetic_planet(3.0, shape=(320, 360), centre=(230.0, 100.0), radius=40.0)
    y, x, h, w = auto_crop(frame, limit=160)
    assert h <= 160 and w <= 160
    assert y <= 230 - 40 and y + h >= 230 + 40 and x <= 100 - 40 and x + w >= 100 + 40
    assert 0 <= y and y + h <= 320 and 0 <= x and x + w <= 360


def test_auto_crop_large_object_and_blank_frame():
    moon = synthetic_planet(3.0, shape=(300, 300), centre=(180.0, 160.0), radius=120.0)
    y, x, h, w = auto_crop(moon, limit=128)
    assert (h, w) == (128, 128)
    assert abs(y + h / 2 - 180) <= 2 and abs(x + w / 2 - 160) <= 2  # centred on the Moon
    assert auto_crop(np.zeros((700, 600)), limit=AUTO_CROP) == (94, 44, 512, 512)
    assert auto_crop(np.zeros((100, 90))) == (0, 0, 100, 90)


@pytest.mark.parametrize(
    ("arguments", "options", "fragment"),
    [
        ([[]], {}, "fwhms is empty"),
        ([[2.0, -1.0]], {}, "positive numbers"),
        ([[2.0, float("nan")]], {}, "positive numbers"),
        ([["3"]], {}, "positive numbers"),
        ([[2.0]], {"model": "airy"}, "'gaussian', 'moffat'"),
        ([[2.0]], {"beta": 3.0}, "Moffat model only"),
        ([[2.0]], {"model": "moffat", "beta": 0.5}, "greater than 1"),
        ([[2.0]], {"iterations": 0}, "positive whole numbers"),
        ([[2.0]], {"iterations": (10, 2.5)}, "positive whole numbers"),
        ([[2.0]], {"iterations": ()}, "iterations is empty"),
        ([[2.0]], {"crop": (0, 0, 8, 8)}, "at least 16 px"),
        ([[2.0]], {"crop": (90, 0, 32, 32)}, "inside the 96x112 image"),
        ([[2.0]], {"crop": (0, 0, 32)}, "four whole numbers"),
        ([[2.0]], {"crop": (0, 0, 32.5, 32)}, "four whole numbers"),
        ([list(np.arange(1, 26) / 5)], {"iterations": (5, 10)}, "at most 48"),
    ],
)
def test_sweep_errors_are_one_line(planet, arguments, options, fragment):
    with pytest.raises(GpudeconvError) as error:
        sweep(planet, *arguments, **options)
    assert_one_line(error, fragment)


@pytest.mark.parametrize(
    ("image", "fragment"),
    [
        (np.zeros((8, 64)), "too small"),
        (np.zeros((64,)), "2-D"),
        (np.full((32, 32), np.nan), "no finite pixel"),
        (np.zeros((32, 32), dtype=complex), "real numbers"),
    ],
)
def test_sweep_refuses_bad_images(image, fragment):
    with pytest.raises(GpudeconvError) as error:
        sweep(image, [2.0])
    assert_one_line(error, fragment)


# --- the contact sheet ------------------------------------------------------------------------


def test_contact_sheet_grid(tmp_path, result):
    path = contact_sheet(tmp_path / "sheet.png", result, columns=4, zoom=2)
    assert path == tmp_path / "sheet.png"
    assert files_in(tmp_path) == ["sheet.png"]  # no temporary file left behind
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "L"
        width, height = image.size
        picture = np.asarray(image)
        description = image.text.get("Description", "")
    # 7 tiles (the original and 6 panels) in rows of 4: 2 rows; 6 px gaps and border.
    assert width == 4 * 2 * 112 + 5 * 6
    bar = (height - 3 * 6) / 2 - 2 * 96  # the label bar above each crop
    assert bar == int(bar) and 10 <= bar <= 40
    bar = int(bar)
    # Each tile shows the bright disc at its centre and dark sky in its corner.
    for index in range(7):
        row, column = divmod(index, 4)
        x0 = 6 + column * (2 * 112 + 6)
        y0 = 6 + row * (2 * 96 + bar + 6) + bar
        assert picture[y0 + 2 * 47, x0 + 2 * 58] > 150
        assert picture[y0 + 4, x0 + 4] < 60
    assert (picture[height - 6 - 2 * 96 :, 6 + 3 * (2 * 112 + 6) :] == 24).all()  # empty slot
    assert "gpudeconv sweep: Gaussian PSF" in description
    assert "FWHM 4.5 px, 10 it" in description


def test_contact_sheet_uses_the_original_stretch(result):
    """One stretch for all: the original's 99.9th percentile is white in every tile, so the
    sharper panels clip more pixels at 255 than the original."""
    picture = sheet_picture(result, columns=7, zoom=1)
    bar = picture.shape[0] - 12 - 96
    tiles = [picture[6 + bar : 6 + bar + 96, 6 + i * 118 : 6 + i * 118 + 112] for i in range(7)]
    original_white = np.count_nonzero(tiles[0] == 255)
    assert original_white <= 0.01 * tiles[0].size
    assert np.count_nonzero(tiles[6] == 255) > original_white  # FWHM 4.5, 10 it rings


def test_contact_sheet_default_layout_and_without_original(result):
    with_original = sheet_picture(result)  # 7 tiles: 3 columns, 3 rows; zoom 256 // 112 = 2
    assert with_original.shape[1] == 3 * 224 + 4 * 6
    without = sheet_picture(result, original=False)  # 6 tiles: 3 columns, 2 rows
    assert without.shape[1] == with_original.shape[1]
    assert without.shape[0] < with_original.shape[0]


def test_contact_sheet_refuses_to_overwrite(tmp_path, result):
    path = tmp_path / "sheet.png"
    path.write_bytes(b"keep me")
    with pytest.raises(GpudeconvError) as error:
        contact_sheet(path, result)
    assert_one_line(error, "exists", "--overwrite")
    assert path.read_bytes() == b"keep me"
    contact_sheet(path, result, overwrite=True)
    with Image.open(path) as image:
        assert image.format == "PNG"
    assert files_in(tmp_path) == ["sheet.png"]


def test_contact_sheet_failed_write_leaves_nothing(tmp_path, result, monkeypatch):
    def full_disk(self, fp, *args, **kwargs):
        with open(fp, "wb") as stream:
            stream.write(b"\x89PNG partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(GpudeconvError) as error:
        contact_sheet(tmp_path / "sheet.png", result)
    assert_one_line(error, "could not write")
    assert files_in(tmp_path) == []  # neither the sheet nor a temporary file


@pytest.mark.parametrize(
    ("name", "options", "fragment"),
    [
        ("sheet.jpg", {}, "*.png"),
        ("sheet.png", {"columns": 0}, "columns"),
        ("sheet.png", {"zoom": 1.5}, "zoom"),
        ("missing/sheet.png", {}, "does not exist"),
    ],
)
def test_contact_sheet_errors(tmp_path, result, name, options, fragment):
    with pytest.raises(GpudeconvError) as error:
        contact_sheet(tmp_path / name, result, **options)
    assert_one_line(error, fragment)
    assert files_in(tmp_path) == []


# --- the command ------------------------------------------------------------------------------


def command(argv, parser_class=argparse.ArgumentParser):
    parser = argparse.ArgumentParser(prog="gpudeconv")
    commands = parser.add_subparsers(dest="command", parser_class=parser_class)
    add_parser(commands)
    return parser.parse_args([str(a) for a in argv])


@pytest.fixture(scope="module")
def planet_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("input") / "jupiter.fits"
    image = synthetic_planet(3.0, shape=(128, 128), centre=(63.4, 65.1), radius=40.0)
    fits.PrimaryHDU(image).writeto(path)
    return path


def test_command_with_a_range(planet_file, tmp_path, capsys):
    out = tmp_path / "sheet.png"
    args = command(["sweep", planet_file, "-o", out, "--psf-fwhm", "2:4:1", "--iterations", "4,8"])
    assert run(args) == 0
    captured = capsys.readouterr()
    assert "sweep: Gaussian PSF, FWHM 2, 3, 4 px (as given); 4, 8 iterations" in captured.out
    assert "FWHM 3 px, 8 it: sharpness" in captured.out
    assert "hint: FWHM" in captured.out and "the eye decides" in captured.out
    assert f"gpudeconv: wrote {out}" in captured.err
    assert files_in(tmp_path) == ["sheet.png"]
    with Image.open(out) as image:
        assert "FWHM 4 px, 8 it" in image.text["Description"]


def test_command_auto_fwhm_centres_the_range_on_the_limb(planet_file, tmp_path, capsys):
    out = tmp_path / "auto.png"
    argv = ["sweep", planet_file, "-o", out, "--iterations", "3", "--crop", "20,20,88,88"]
    assert run(command(argv)) == 0
    printed = capsys.readouterr().out
    assert "limb estimate: FWHM" in printed
    estimate = float(printed.split("limb estimate: FWHM ")[1].split()[0])
    assert estimate == pytest.approx(3.0, rel=0.1)
    line = next(line for line in printed.splitlines() if line.startswith("sweep:"))
    widths = [float(v) for v in line.split("FWHM ")[1].split(" px")[0].split(", ")]
    assert widths == range_around(estimate) and len(widths) == 6
    assert "0.6x to 1.6x the limb estimate" in line
    assert "crop 88x88 at row 20, column 20" in line
    assert out.exists()

    explicit = tmp_path / "explicit.png"
    argv = ["sweep", planet_file, "-o", explicit, "--auto-fwhm", "--iterations", "2", "--quiet"]
    assert run(command(argv)) == 0
    assert explicit.exists()


def test_command_quiet_prints_nothing(planet_file, tmp_path, capsys):
    out = tmp_path / "quiet.png"
    argv = ["sweep", planet_file, "-o", out, "--psf-fwhm", "2,3", "--iterations", "2"]
    assert run(command([*argv, "--quiet", "--psf-model", "moffat", "--psf-beta", "3"])) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    with Image.open(out) as image:
        assert "Moffat beta 3" in image.text["Description"]


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--psf-fwhm", "2:4", "--iterations", "2"], "start:stop:step"),
        (["--psf-fwhm", "2,3", "--auto-fwhm"], "use one of them"),
        (["--psf-fwhm", "2", "--iterations", "2.5"], "whole numbers"),
        (["--psf-fwhm", "2", "--iterations", "0"], "positive, e.g. 30, 30,50 or 10:50:20"),
        (["--psf-fwhm", "2", "--iterations", "9:3:2"], "before it starts (9); e.g. 30, 30,50"),
        (["--psf-fwhm", "2", "--psf-beta", "3"], "Moffat model only"),
        (["--psf-fwhm", "2", "--psf-model", "moffat", "--psf-beta", "1"], "greater than 1"),
        (["--psf-fwhm", "2", "--psf-model", "moffat", "--psf-beta", "x"], "greater than 1"),
        (["--psf-fwhm", "2", "--crop", "1,2,3"], "Y,X,H,W"),
        (["--psf-fwhm", "2", "--crop", "0,0,500,500"], "inside the 128x128 image"),
        (["--psf-fwhm", "2", "--backend", "tpu"], "tpu"),
    ],
)
def test_command_errors_are_one_line(planet_file, tmp_path, extra, fragment):
    args = command(["sweep", planet_file, "-o", tmp_path / "sheet.png", *extra])
    with pytest.raises(GpudeconvError) as error:
        run(args)
    assert_one_line(error, fragment)
    assert files_in(tmp_path) == []


def test_command_output_errors(planet_file, tmp_path):
    with pytest.raises(GpudeconvError) as error:
        run(command(["sweep", planet_file, "-o", tmp_path / "sheet.tif", "--psf-fwhm", "2"]))
    assert_one_line(error, "*.png")

    existing = tmp_path / "sheet.png"
    existing.write_bytes(b"old")
    with pytest.raises(GpudeconvError) as error:
        run(command(["sweep", planet_file, "-o", existing, "--psf-fwhm", "2"]))
    assert_one_line(error, "exists", "--overwrite")
    assert existing.read_bytes() == b"old"
    argv = ["sweep", planet_file, "-o", existing, "--psf-fwhm", "2", "--iterations", "2"]
    assert run(command([*argv, "--overwrite", "--quiet"])) == 0
    assert existing.read_bytes() != b"old"

    with pytest.raises(GpudeconvError) as error:
        run(command(["sweep", tmp_path / "nope.fits", "-o", tmp_path / "x.png", "--psf-fwhm", "2"]))
    assert_one_line(error, "does not exist")


def test_command_refuses_to_write_over_its_input(tmp_path):
    picture = np.clip(synthetic_planet(3.0, shape=(64, 64), centre=(32, 32), radius=20), 0, 255)
    source = tmp_path / "saturn.png"
    Image.fromarray(picture.astype(np.uint8)).save(source)
    before = source.read_bytes()
    with pytest.raises(GpudeconvError) as error:
        run(command(["sweep", source, "-o", source, "--psf-fwhm", "2", "--overwrite"]))
    assert_one_line(error, "is the input file")
    assert source.read_bytes() == before


def test_command_without_a_disc_explains_what_to_do(tmp_path):
    noise = tmp_path / "noise.fits"
    fits.PrimaryHDU(np.random.default_rng(3).normal(100, 5, (96, 96))).writeto(noise)
    with pytest.raises(GpudeconvError) as error:
        run(command(["sweep", noise, "-o", tmp_path / "sheet.png"]))
    assert_one_line(error, "no planetary or lunar disc", "--psf-fwhm")
    assert files_in(tmp_path) == ["noise.fits"]


def test_command_usage_errors_with_the_cli_parser(planet_file, tmp_path):
    """Wired under the CLI's parser class, argparse mistakes are one-line GpudeconvErrors too."""
    from gpudeconv.cli import _Parser

    with pytest.raises(GpudeconvError) as error:
        command(["sweep", planet_file], parser_class=_Parser)  # no -o
    assert_one_line(error, "-o/--output")
    with pytest.raises(GpudeconvError) as error:
        command(["sweep", planet_file, "-o", "s.png", "--psf-model", "airy"], _Parser)
    assert_one_line(error, "invalid choice")


def test_add_parser_returns_the_subparser():
    parser = argparse.ArgumentParser()
    sub = add_parser(parser.add_subparsers(dest="command"))
    assert isinstance(sub, argparse.ArgumentParser)
    args = parser.parse_args(["sweep", "in.fits", "-o", "s.png"])
    assert (args.command, args.psf_fwhm, args.iterations, args.psf_model) == (
        "sweep",
        None,
        "30",
        "gaussian",
    )
