"""The gpudeconv command: a real run, and every user error as one line with exit code 2."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from helpers import star_field

import gpudeconv as gd
from gpudeconv.cli import main


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def observed(tmp_path) -> Path:
    path = tmp_path / "observed.fits"
    header = fits.Header()
    header["OBJECT"] = "M 42"
    header["EXPTIME"] = 300.0
    fits.PrimaryHDU(star_field(shape=(96, 104), seed=21), header=header).writeto(path)
    return path


def run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, match):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("gpudeconv: error: ")
    assert "Traceback" not in err
    assert match in lines[0], lines[0]


def test_deconvolve_with_model_psf_writes_fits_with_history(observed, tmp_path, capsys):
    before = digest(observed)
    out = tmp_path / "sharp.fits"
    code, _, err = run(
        ["deconvolve", observed, "-o", out, "--psf-fwhm", "3", "--iterations", "12", "--quiet"],
        capsys,
    )
    assert code == 0, err
    assert digest(observed) == before
    with fits.open(out) as hdul:
        data = hdul[0].data
        header = hdul[0].header
    assert data.dtype.kind == "f" and data.dtype.itemsize == 4 and data.shape == (96, 104)
    assert header["OBJECT"] == "M 42" and header["EXPTIME"] == 300.0
    history = "\n".join(str(line) for line in header["HISTORY"])
    assert "gpudeconv" in history and "12 iterations" in history and "Moffat fwhm=3" in history
    image = fits.getdata(observed)
    expected = gd.richardson_lucy(image, gd.psf.moffat(3.0), 12)
    np.testing.assert_allclose(data, expected, rtol=1e-5, atol=1e-4)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_deconvolve_with_psf_file_and_gaussian_model(observed, tmp_path, capsys):
    psf_path = tmp_path / "psf.fits"
    fits.PrimaryHDU(gd.psf.gaussian(2.5) * 40.0).writeto(psf_path)
    out = tmp_path / "a.fits"
    code, _, err = run(
        ["deconvolve", observed, "-o", out, "--psf", psf_path, "--quiet", "--iterations", "5"],
        capsys,
    )
    assert code == 0, err
    out2 = tmp_path / "b.fits"
    code, _, err = run(
        [
            "deconvolve",
            observed,
            "-o",
            out2,
            "--psf-fwhm",
            "2.5",
            "--psf-model",
            "gaussian",
            "--quiet",
            "--iterations",
            "5",
        ],
        capsys,
    )
    assert code == 0, err
    # a file PSF that sums to 40 is normalized: the same result as the same model
    np.testing.assert_allclose(fits.getdata(out), fits.getdata(out2), rtol=1e-5, atol=1e-4)


def test_deconvolve_with_a_psf_field_file(observed, tmp_path, capsys):
    field = gd.psf.field.aberrated_field(
        (96, 104), (2, 3), fwhm_centre=2.0, fwhm_corner=3.5, elongation_corner=1.5
    )
    field_path = field.save(tmp_path / "field.fits")
    out = tmp_path / "sharp.fits"
    code, _, err = run(
        ["deconvolve", observed, "-o", out, "--psf", field_path, "--quiet", "--iterations", "6"],
        capsys,
    )
    assert code == 0, err
    with fits.open(out) as hdul:
        data, header = hdul[0].data, hdul[0].header
    assert "field field.fits (2x3 nodes" in "\n".join(str(h) for h in header["HISTORY"])
    expected = gd.richardson_lucy(fits.getdata(observed), gd.PSFField.load(field_path), 6)
    np.testing.assert_allclose(data, expected, rtol=1e-5, atol=1e-4)

    other = gd.psf.field.aberrated_field((50, 60), (2, 2), fwhm_centre=2.0, fwhm_corner=3.0)
    other_path = other.save(tmp_path / "other.fits")
    code, _, err = run(
        ["deconvolve", observed, "-o", tmp_path / "x.fits", "--psf", other_path], capsys
    )
    assert_one_line_error(code, err, "made for images of 50x60 pixels, but the image is 96x104")
    assert not (tmp_path / "x.fits").exists()


def test_colour_tiff_16_bit_round_trip(tmp_path, capsys):
    import tifffile

    rgb = np.stack([star_field(shape=(64, 72), seed=s) for s in (1, 2, 3)])
    rgb16 = np.clip(rgb / rgb.max() * 60000, 0, 65535).astype(np.uint16)
    source = tmp_path / "rgb.tif"
    tifffile.imwrite(source, np.moveaxis(rgb16, 0, -1), photometric="rgb")
    out = tmp_path / "rgb_sharp.tif"
    code, _, err = run(
        ["deconvolve", source, "-o", out, "--psf-fwhm", "2.5", "--quiet", "--iterations", "5"],
        capsys,
    )
    assert code == 0, err
    result = tifffile.imread(out)
    assert result.dtype == np.uint16 and result.shape == (64, 72, 3)


def test_overwrite_replaces_existing_output(observed, tmp_path, capsys):
    out = tmp_path / "sharp.fits"
    out.write_bytes(b"old")
    code, _, err = run(
        ["deconvolve", observed, "-o", out, "--psf-fwhm", "3", "--quiet", "--iterations", "2"],
        capsys,
    )
    assert_one_line_error(code, err, "exists; pass --overwrite")
    assert out.read_bytes() == b"old"
    code, _, err = run(
        [
            "deconvolve",
            observed,
            "-o",
            out,
            "--psf-fwhm",
            "3",
            "--quiet",
            "--iterations",
            "2",
            "--overwrite",
        ],
        capsys,
    )
    assert code == 0, err
    assert fits.getdata(out).shape == (96, 104)


def write_fits(path: Path, data) -> Path:
    fits.PrimaryHDU(np.asarray(data)).writeto(path)
    return path


def error_cases(tmp: Path, observed: Path):
    fwhm = ["--psf-fwhm", "3"]
    unwritable = tmp / "a_file"
    unwritable.write_text("not a folder")
    not_image = tmp / "notes.fits"
    not_image.write_text("SIMPLE = this is not a FITS file at all")
    return {
        "missing input": (
            ["deconvolve", tmp / "missing.fits", "-o", tmp / "o.fits", *fwhm],
            "missing.fits",
        ),
        "missing psf file": (
            ["deconvolve", observed, "-o", tmp / "o.fits", "--psf", tmp / "nopsf.fits"],
            "nopsf.fits",
        ),
        "psf with nan": (
            [
                "deconvolve",
                observed,
                "-o",
                tmp / "o.fits",
                "--psf",
                write_fits(tmp / "nan.fits", np.full((5, 5), np.nan)),
            ],
            "NaN",
        ),
        "psf all zeros": (
            [
                "deconvolve",
                observed,
                "-o",
                tmp / "o.fits",
                "--psf",
                write_fits(tmp / "zero.fits", np.zeros((5, 5))),
            ],
            "all zeros",
        ),
        "psf negative": (
            [
                "deconvolve",
                observed,
                "-o",
                tmp / "o.fits",
                "--psf",
                write_fits(tmp / "neg.fits", np.pad([[1.0]], 2) - 0.2),
            ],
            "negative",
        ),
        "psf even": (
            [
                "deconvolve",
                observed,
                "-o",
                tmp / "o.fits",
                "--psf",
                write_fits(tmp / "even.fits", np.ones((4, 4))),
            ],
            "odd",
        ),
        "1-D image": (
            [
                "deconvolve",
                write_fits(tmp / "line.fits", np.ones(50, np.float32)),
                "-o",
                tmp / "o.fits",
                *fwhm,
            ],
            "1-D",
        ),
        "4-D image": (
            [
                "deconvolve",
                write_fits(tmp / "cube4.fits", np.ones((2, 3, 8, 8), np.float32)),
                "-o",
                tmp / "o.fits",
                *fwhm,
            ],
            "4-D",
        ),
        "not an image": (["deconvolve", not_image, "-o", tmp / "o.fits", *fwhm], "notes.fits"),
        "zero iterations": (
            ["deconvolve", observed, "-o", tmp / "o.fits", *fwhm, "--iterations", "0"],
            "positive integer",
        ),
        "negative iterations": (
            ["deconvolve", observed, "-o", tmp / "o.fits", *fwhm, "--iterations", "-5"],
            "positive integer",
        ),
        "unknown backend": (
            ["deconvolve", observed, "-o", tmp / "o.fits", *fwhm, "--backend", "opencl"],
            "backend must be one of",
        ),
        "output is input": (
            ["deconvolve", observed, "-o", observed, *fwhm, "--overwrite"],
            "is the input file",
        ),
        "unwritable folder": (
            ["deconvolve", observed, "-o", unwritable / "o.fits", *fwhm],
            "choose another output path",
        ),
        "missing folder": (
            ["deconvolve", observed, "-o", tmp / "nope" / "o.fits", *fwhm],
            "does not exist",
        ),
        "no psf": (["deconvolve", observed, "-o", tmp / "o.fits"], "--psf"),
        "bad fwhm": (
            ["deconvolve", observed, "-o", tmp / "o.fits", "--psf-fwhm", "-2"],
            "positive number",
        ),
        "bad ratio": (
            ["deconvolve", observed, "-o", tmp / "o.fits", *fwhm, "--psf-ratio", "3"],
            "ratio",
        ),
        "bad extension": (["deconvolve", observed, "-o", tmp / "o.xyz", *fwhm], "extension"),
        "float to png": (
            ["deconvolve", observed, "-o", tmp / "o.png", *fwhm],
            "write the output as .fits or .tif",
        ),
        "output is a folder": (
            ["deconvolve", observed, "-o", tmp, *fwhm, "--overwrite"],
            "is a folder",
        ),
        "beta with gaussian": (
            [
                "deconvolve",
                observed,
                "-o",
                tmp / "o.fits",
                *fwhm,
                "--psf-model",
                "gaussian",
                "--psf-beta",
                "3",
            ],
            "Moffat",
        ),
        **{
            f"image without data{name}": (
                # a named backend: no note on the choice of 'auto' comes before the error
                ["deconvolve", nothing, "-o", tmp / "o.fits", *fwhm, "--backend", "numpy", *flags],
                "the image holds no data (every pixel is NaN or infinite)",
            )
            for nothing in [write_fits(tmp / "nothing.fits", np.full((2, 40, 48), np.nan))]
            for name, flags in [
                ("", []),
                (" tiled", ["--tile", "16"]),
                (" wiener", ["--method", "wiener"]),
                (" learned", ["--method", "learned"]),
                (" learned tiled", ["--method", "learned", "--tile", "16"]),
            ]
        },
    }


CASES = [
    "missing input",
    "missing psf file",
    "psf with nan",
    "psf all zeros",
    "psf negative",
    "psf even",
    "1-D image",
    "4-D image",
    "not an image",
    "zero iterations",
    "negative iterations",
    "unknown backend",
    "output is input",
    "unwritable folder",
    "missing folder",
    "no psf",
    "bad fwhm",
    "bad ratio",
    "bad extension",
    "float to png",
    "beta with gaussian",
    "output is a folder",
    "image without data",
    "image without data tiled",
    "image without data wiener",
    "image without data learned",
    "image without data learned tiled",
]


@pytest.mark.parametrize("case", CASES)
def test_user_errors_are_one_line_exit_2_nothing_written(case, observed, tmp_path, capsys):
    argv, match = error_cases(tmp_path, observed)[case]
    before = {p.name: digest(p) for p in tmp_path.iterdir() if p.is_file()}
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, match)
    after = {p.name: digest(p) for p in tmp_path.iterdir() if p.is_file()}
    assert after == before  # inputs untouched, no output or temporary file left behind


def test_installed_command_reports_errors_as_one_line(observed, tmp_path):
    exe = shutil.which("gpudeconv")
    argv = [exe] if exe else [sys.executable, "-m", "gpudeconv.cli"]
    result = subprocess.run(
        [
            *argv,
            "deconvolve",
            str(observed),
            "-o",
            str(tmp_path / "o.fits"),
            "--psf-fwhm",
            "3",
            "--iterations",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "iterations" in result.stderr


def test_info_lists_backends_and_versions(capsys):
    code, out, _ = run(["info"], capsys)
    assert code == 0
    assert "backends: numpy" in out and "numpy" in out and "scipy" in out
    assert "selected backend:" in out and "GiB free" in out


def test_progress_bar_shows_on_stderr(observed, tmp_path, capsys):
    code, _, err = run(
        ["deconvolve", observed, "-o", tmp_path / "p.fits", "--psf-fwhm", "3", "--iterations", "3"],
        capsys,
    )
    assert code == 0
    assert "Richardson-Lucy" in err or "it/s" in err or "3/3" in err
    assert "MPix*it/s" in err


def test_env_backend_is_respected(observed, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GPUDECONV_BACKEND", "numpy")
    code, _, err = run(
        ["deconvolve", observed, "-o", tmp_path / "e.fits", "--psf-fwhm", "3", "--iterations", "2"],
        capsys,
    )
    assert code == 0 and "on numpy" in err
    assert os.path.exists(tmp_path / "e.fits")


def test_compressed_fits_output(observed, tmp_path, capsys):
    out = tmp_path / "sharp.fit.gz"
    code, _, err = run(
        ["deconvolve", observed, "-o", out, "--psf-fwhm", "3", "--iterations", "2", "--quiet"],
        capsys,
    )
    assert code == 0, err
    assert out.read_bytes()[:2] == b"\x1f\x8b"  # gzip
    assert fits.getdata(out).shape == (96, 104)


def test_cli_says_why_the_gpu_is_not_used(observed, tmp_path, capsys, monkeypatch):
    from gpudeconv.backend import _cupy_status

    if _cupy_status()[0]:
        pytest.skip("a GPU answers here")
    import gpudeconv.backend as backend_module

    monkeypatch.setattr(backend_module, "_said_why", False)
    monkeypatch.delenv("GPUDECONV_BACKEND", raising=False)
    code, _, err = run(
        ["deconvolve", observed, "-o", tmp_path / "w.fits", "--psf-fwhm", "3", "--iterations", "1"],
        capsys,
    )
    assert code == 0
    assert "using the NumPy (CPU) backend" in err


def test_sweep_is_a_command(tmp_path, capsys):
    """`gpudeconv sweep`, wired into the command: a planet (no stars), a contact sheet out."""
    from test_limb import synthetic_planet

    planet = tmp_path / "planet.fits"
    fits.PrimaryHDU(synthetic_planet(fwhm=3.0).astype(np.float32)).writeto(planet)
    sheet = tmp_path / "sheet.png"
    code, out, err = run(
        ["sweep", planet, "-o", sheet, "--psf-fwhm", "2,3", "--iterations", "3"], capsys
    )
    assert code == 0, err
    assert sheet.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "FWHM 2" in out and "FWHM 3" in out
    code, _, err = run(["sweep", planet, "-o", sheet, "--psf-fwhm", "1:2"], capsys)
    assert_one_line_error(code, err, "start:stop:step")


def test_deconvolve_in_tiles_matches_the_whole_image(observed, tmp_path, capsys):
    whole, tiled = tmp_path / "whole.fits", tmp_path / "tiled.fits"
    common = ["--psf-fwhm", "3", "--iterations", "8", "--quiet"]
    code, _, err = run(["deconvolve", observed, "-o", whole, *common], capsys)
    assert code == 0, err
    code, _, err = run(["deconvolve", observed, "-o", tiled, "--tile", "48", *common], capsys)
    assert code == 0, err
    with fits.open(tiled) as hdul:
        data, header = hdul[0].data, hdul[0].header
    assert header["OBJECT"] == "M 42"
    expected = fits.getdata(whole)
    span = float(expected.max() - expected.min())
    assert np.abs(data - expected).max() <= 1e-3 * span
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "observed.fits",
        "tiled.fits",
        "whole.fits",
    ]


def test_ctrl_c_exits_130_tiled_with_the_resume_advice(observed, tmp_path, capsys, monkeypatch):
    from gpudeconv import tiles

    deconvolve_file = tiles.deconvolve_file

    def stopped_after_two_tiles(*args, **kwargs):
        def on_tile(done, tile):
            if done == 2:
                raise KeyboardInterrupt

        return deconvolve_file(*args, **kwargs, on_tile=on_tile)

    out = tmp_path / "o.fits"
    argv = ["deconvolve", observed, "-o", out, "--psf-fwhm", "3", "--iterations", "3", "--quiet"]
    monkeypatch.setattr(tiles, "deconvolve_file", stopped_after_two_tiles)
    code, _, err = run([*argv, "--tile", "48"], capsys)
    assert code == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == (
        "gpudeconv: interrupted after 2 of 6 tiles; run again with --resume to continue"
    ), err
    assert "Traceback" not in err and not out.exists()
    monkeypatch.undo()
    code, _, err = run([*argv, "--tile", "48", "--resume"], capsys)
    assert code == 0 and out.exists(), err

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gd.restore, "richardson_lucy", interrupted)  # in memory, the same code
    code, _, err = run([*argv, "--overwrite"], capsys)
    assert code == 130 and err.splitlines()[-1].startswith("gpudeconv: interrupted"), err


def test_tile_options_that_cannot_go_together(observed, tmp_path, capsys):
    out = tmp_path / "o.fits"
    code, _, err = run(
        [
            "deconvolve",
            observed,
            "-o",
            out,
            "--psf-fwhm",
            "3",
            "--dask",
            "tcp://x:1",
            "--workers",
            "2",
        ],
        capsys,
    )
    assert_one_line_error(code, err, "give one of them")
    code, _, err = run(
        ["deconvolve", observed, "-o", out, "--psf-fwhm", "3", "--workers", "2", "--resume"], capsys
    )
    assert_one_line_error(code, err, "cannot resume")
    code, _, err = run(
        ["deconvolve", observed, "-o", tmp_path / "o.png", "--psf-fwhm", "3", "--tile", "48"],
        capsys,
    )
    assert code == 2 and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "o.png").exists()


def test_wide_images_that_fit_in_memory_are_not_streamed(tmp_path, capsys):
    """A 4200-px-wide 16-bit TIFF fits in memory: restored whole, it keeps its bit depth (a
    streamed output would be float) and may be written as PNG too."""
    import tifffile

    image = (star_field(shape=(40, 4200), seed=5, n_stars=80) * 20).astype(np.uint16)
    source = tmp_path / "wide.tif"
    tifffile.imwrite(source, image)
    for name in ("out.tif", "out.png"):
        code, _, err = run(
            [
                "deconvolve",
                source,
                "-o",
                tmp_path / name,
                "--psf-fwhm",
                "2",
                "--iterations",
                "2",
                "--quiet",
            ],
            capsys,
        )
        assert code == 0, err
    assert tifffile.imread(tmp_path / "out.tif").dtype == np.uint16


def test_psf_file_refuses_model_shape_flags(observed, tmp_path, capsys):
    # --psf-ratio/--psf-angle describe a model PSF: with a PSF file they were silently ignored.
    psf_path = write_fits(tmp_path / "psf.fits", gd.psf.moffat(3.0))
    for flags in (["--psf-ratio", "0.5"], ["--psf-angle", "30"]):
        out = tmp_path / "o.fits"
        code, _, err = run(
            ["deconvolve", observed, "-o", out, "--psf", psf_path, "--quiet", *flags], capsys
        )
        assert_one_line_error(code, err, "cannot go with --psf FILE")
        assert not out.exists()


@pytest.mark.parametrize("name", ["sharp.fits.gz", "sharp.fit.gz", "sharp.FITS"])
def test_integer_input_gives_float_fits_output_also_compressed(tmp_path, capsys, name):
    # A .fits.gz output of a 16-bit input was written as uint16, clipped below 0 with a
    # warning, although FITS outputs are float32.
    import tifffile

    source = tmp_path / "frame.tif"
    tifffile.imwrite(source, np.clip(star_field(shape=(64, 72), seed=5), 0, None).astype("u2"))
    out = tmp_path / name
    code, _, err = run(
        ["deconvolve", source, "-o", out, "--psf-fwhm", "2.5", "--quiet", "--iterations", "3"],
        capsys,
    )
    assert code == 0, err
    assert "clipped" not in err
    data, _ = gd.read_image(out)
    assert data.dtype == np.float32


@pytest.mark.parametrize(
    ("dtype", "channels", "name", "match"),
    [
        ("u2", 1, "o.jpg", "JPEG holds 8-bit pixels and the input's are uint16"),
        ("u2", 3, "o.png", "16-bit colour cannot be written as PNG"),
        ("u1", 5, "o.png", "PNG holds grey or RGB images and the input has 5 channels"),
        ("i2", 1, "o.png", "the input's are int16: write the output as .tif or .fits"),
    ],
)
def test_png_jpeg_outputs_they_cannot_hold_are_refused_before_restoring(
    tmp_path, capsys, monkeypatch, dtype, channels, name, match
):
    # These were refused by the writer only after the whole restoration, with Python advice
    # (dtype='uint8') or none.
    import gpudeconv.cli as cli

    def no_restore(*args, **kwargs):
        raise AssertionError("restored before refusing the output")

    monkeypatch.setattr(cli, "_restore", no_restore)
    field = np.clip(star_field(shape=(48, 56), seed=9), 0, 200)
    data = np.stack([field] * channels) if channels > 1 else field
    source = write_fits(tmp_path / "in.fits", data.astype(dtype))
    assert gd.read_image(source)[0].dtype == np.dtype(dtype)
    out = tmp_path / name
    argv = ["deconvolve", source, "-o", out, "--psf-fwhm", "2.5", "--quiet", "--backend", "numpy"]
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, match)
    assert not out.exists()


def test_user_errors_on_a_cpu_machine_are_one_line(observed, tmp_path, capsys, monkeypatch):
    # With --backend auto and no GPU, the note on why the CPU is used came before the error,
    # so every user error past the arguments was two lines.
    import gpudeconv.backend as backend_module

    monkeypatch.setattr(backend_module, "_said_why", False)
    monkeypatch.setattr(backend_module, "_cupy_status", lambda: (False, "no GPU in this test"))
    monkeypatch.delenv("GPUDECONV_BACKEND", raising=False)
    out = tmp_path / "o.fits"
    cases = [
        (["--psf", tmp_path / "nopsf.fits"], "PSF file"),
        (["--psf", tmp_path], "is a folder: check the --psf path"),
        (["--psf-fwhm", "3", "--psf-ratio", "2"], "ratio"),
    ]
    for flags, match in cases:
        code, _, err = run(["deconvolve", observed, "-o", out, "--quiet", *flags], capsys)
        assert_one_line_error(code, err, match)
    code, _, err = run(["deconvolve", tmp_path / "none.fits", "-o", out, "--psf-fwhm", "3"], capsys)
    assert_one_line_error(code, err, "does not exist")
    code, _, err = run(["deconvolve", observed, "-o", out, "--psf-fwhm", "3"], capsys)
    assert code == 0 and "using the NumPy (CPU) backend" in err  # the note still comes


def test_log_lines_go_to_the_current_stderr(monkeypatch):
    # The handler kept the stderr of the first main() call: a later note (why the CPU is used)
    # went to a stale, possibly closed stream ("ValueError: I/O operation on closed file").
    import io
    import logging

    from gpudeconv.cli import _show_log_lines

    logger = logging.getLogger("gpudeconv")
    monkeypatch.setattr(logger, "handlers", [])
    first, later = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    _show_log_lines()
    monkeypatch.setattr(sys, "stderr", later)
    first.close()
    logger.info("gpudeconv: a note")
    assert later.getvalue() == "gpudeconv: a note\n"
