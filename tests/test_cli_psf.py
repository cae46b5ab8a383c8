"""PSF estimation from the command line: `gpudeconv psf`, `deconvolve --psf auto`, the PNG map,
and `gd.deconvolve(psf=None)`; every user error one line with exit code 2 and nothing written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from test_cli import assert_one_line_error, digest, run

import gpudeconv as gd
from gpudeconv import GpudeconvError
from gpudeconv.synthetic import make_scene

TRUE_FWHM, TRUE_BETA, TRUE_RATIO, TRUE_ANGLE = 3.5, 3.0, 0.8, 30.0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _have_matplotlib() -> bool:
    from gpudeconv.psf.plot import have_matplotlib

    return have_matplotlib()


needs_matplotlib = pytest.mark.skipif(
    not _have_matplotlib(), reason="matplotlib is not installed (pip install gpudeconv[plot])"
)


def snapshot(folder: Path) -> dict:
    return {p.name: digest(p) for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def scene():
    psf = gd.psf.moffat(TRUE_FWHM, beta=TRUE_BETA, ratio=TRUE_RATIO, angle=TRUE_ANGLE)
    return make_scene((512, 512), psf=psf, seed=7, n_stars=260)


@pytest.fixture
def stars_fits(scene, tmp_path) -> Path:
    path = tmp_path / "stars.fits"
    header = fits.Header()
    header["OBJECT"] = "NGC 7000"
    fits.PrimaryHDU(scene.observed, header=header).writeto(path)
    return path


def centred(kernel: np.ndarray, size: int) -> np.ndarray:
    """``kernel`` (odd sides) cropped or zero-padded around its centre to size x size, sum 1."""
    out = np.zeros((size, size))
    half = min(kernel.shape[0], size) // 2
    c, k = kernel.shape[0] // 2, size // 2
    out[k - half : k + half + 1, k - half : k + half + 1] = kernel[
        c - half : c + half + 1, c - half : c + half + 1
    ]
    return out / out.sum()


# --- gpudeconv psf ----------------------------------------------------------------------------


def test_psf_writes_a_psf_close_to_the_truth_a_report_and_a_map(scene, stars_fits, capsys):
    folder = stars_fits.parent
    before = digest(stars_fits)
    out, report_path, map_path = folder / "psf.fits", folder / "report.json", folder / "m.png"
    code, stdout, err = run(
        ["psf", stars_fits, "-o", out, "--report", report_path, "--map", map_path], capsys
    )
    assert code == 0, err
    assert digest(stars_fits) == before

    with fits.open(out) as hdul:
        kernel, header = hdul[0].data.astype(np.float64), hdul[0].header
    assert kernel.ndim == 2 and kernel.shape[0] == kernel.shape[1] and kernel.shape[0] % 2 == 1
    assert kernel.sum() == pytest.approx(1.0, rel=1e-4)
    assert header["PSFMODEL"] == "moffat" and header["NUSED"] > 20
    assert header["NFOUND"] >= header["NUSED"]
    assert header["FWHM"] == pytest.approx(TRUE_FWHM, rel=0.1)
    assert header["RATIO"] == pytest.approx(TRUE_RATIO, abs=0.07)
    assert abs((header["ANGLE"] - TRUE_ANGLE + 90) % 180 - 90) < 8
    size = max(kernel.shape[0], scene.psf.shape[0])
    truth = centred(np.asarray(scene.psf, dtype=np.float64), size)
    assert np.abs(centred(kernel, size) - truth).sum() < 0.2  # L1 distance of two unit-sum PSFs

    report = json.loads(report_path.read_text())
    assert report["model"] == "moffat" and report["grid"] is None
    assert report["image_shape"] == [512, 512]
    stars = report["stars"]
    assert stars["found"] >= stars["used"] == header["NUSED"]
    assert stars["found"] - stars["used"] == sum(stars["rejected"].values())
    assert report["psf"]["fwhm"] == pytest.approx(header["FWHM"], rel=1e-5)
    assert report["psf"]["ellipticity"] == pytest.approx(1 - TRUE_RATIO, abs=0.07)
    diagnosis = report["diagnosis"]
    assert diagnosis["stars"] == stars["used"] and diagnosis["findings"]
    # one PSF everywhere: nothing varies across the field; the stars are all stretched at 30 deg
    kinds = [f["kind"] for f in diagnosis["findings"]]
    assert "uniform" in kinds and "tilt" not in kinds and "collimation" not in kinds

    assert f"{stars['found']} found, {stars['used']} used" in stdout
    assert "FWHM" in stdout and "ellipticity" in stdout and "Field diagnosis" in stdout
    if _have_matplotlib():
        assert map_path.read_bytes()[:8] == PNG_SIGNATURE
        from PIL import Image

        with Image.open(map_path) as png:
            assert png.format == "PNG" and min(png.size) > 300
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary files


def test_psf_grid_writes_a_field_with_node_parameters(stars_fits, capsys):
    out, report_path = stars_fits.parent / "field.fits", stars_fits.parent / "field.json"
    code, stdout, err = run(
        ["psf", stars_fits, "-o", out, "--grid", "2x2", "--report", report_path, "--no-map"],
        capsys,
    )
    assert code == 0, err
    field = gd.PSFField.load(out)
    assert field.grid == (2, 2) and field.image_shape == (512, 512)
    for a in range(2):
        for b in range(2):
            assert field.psfs[a, b].sum() == pytest.approx(1.0, rel=1e-5)
    report = json.loads(report_path.read_text())
    assert report["grid"] == [2, 2] and len(report["nodes"]) == 4
    for node in report["nodes"]:
        assert node["fwhm"] == pytest.approx(TRUE_FWHM, rel=0.15)
    low, high = report["range"]["fwhm"]
    assert low <= report["psf"]["fwhm"] <= high
    assert "across the 2x2 field" in stdout
    assert not (stars_fits.parent / "field_map.png").exists()


@needs_matplotlib
def test_psf_map_is_written_next_to_the_output_by_default(stars_fits, capsys):
    code, _, err = run(["psf", stars_fits, "-o", stars_fits.parent / "p.fits", "--quiet"], capsys)
    assert code == 0, err
    assert (stars_fits.parent / "p_map.png").read_bytes()[:8] == PNG_SIGNATURE


def test_without_matplotlib_the_map_is_skipped_with_a_note(stars_fits, capsys, monkeypatch):
    import gpudeconv.psf.plot as plot

    monkeypatch.setattr(plot, "have_matplotlib", lambda: False)
    code, _, err = run(["psf", stars_fits, "-o", stars_fits.parent / "p.fits"], capsys)
    assert code == 0, err
    notes = [line for line in err.splitlines() if "note:" in line]
    assert len(notes) == 1 and "matplotlib" in notes[0] and "pip install" in notes[0]
    assert "error" not in err
    assert not (stars_fits.parent / "p_map.png").exists()
    code, _, err = run(
        [
            "psf",
            stars_fits,
            "-o",
            stars_fits.parent / "q.fits",
            "--map",
            stars_fits.parent / "q.png",
        ],
        capsys,
    )
    assert_one_line_error(code, err, "pip install")
    assert not (stars_fits.parent / "q.fits").exists()


def test_psf_overwrite_replaces_every_output(stars_fits, capsys):
    folder = stars_fits.parent
    outputs = [folder / "o.fits", folder / "o.json", folder / "o.png"]
    argv = ["psf", stars_fits, "-o", outputs[0], "--report", outputs[1], "--quiet"]
    argv += ["--map", outputs[2]] if _have_matplotlib() else ["--no-map"]
    for path in outputs:
        path.write_bytes(b"old")
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, "exists; pass --overwrite")
    assert all(p.read_bytes() == b"old" for p in outputs)
    code, _, err = run([*argv, "--overwrite"], capsys)
    assert code == 0, err
    assert fits.getdata(outputs[0]).ndim == 2
    assert json.loads(outputs[1].read_text())["stars"]["used"] > 0


# --- deconvolve --psf auto ----------------------------------------------------------------------


def test_deconvolve_psf_auto_saves_the_psf_and_names_it_in_history(stars_fits, capsys):
    folder = stars_fits.parent
    before = digest(stars_fits)
    out = folder / "sharp.fits"
    code, stdout, err = run(
        ["deconvolve", stars_fits, "-o", out, "--psf", "auto", "--iterations", "5"], capsys
    )
    assert code == 0, err
    assert digest(stars_fits) == before
    psf_path = folder / "sharp_psf.fits"
    kernel = fits.getdata(psf_path)
    with fits.open(out) as hdul:
        restored, header = hdul[0].data, hdul[0].header
    history = " ".join(str(h) for h in header["HISTORY"])
    assert "estimated from" in history and "stars (moffat, FWHM" in history
    assert "sharp_psf.fits" in history and header["OBJECT"] == "NGC 7000"
    assert header["HISTORY"] and "used" in stdout and "FWHM" in stdout
    assert "sharp_psf.fits" in err
    # the saved PSF is the one the restoration used (to its float32 storage)
    expected = gd.richardson_lucy(fits.getdata(stars_fits), kernel.astype(np.float64), 5)
    np.testing.assert_allclose(restored, expected, rtol=1e-3, atol=1e-2)


def test_deconvolve_psf_auto_with_a_grid_saves_a_field(stars_fits, capsys):
    out = stars_fits.parent / "sharp.fits"
    code, stdout, err = run(
        [
            "deconvolve",
            stars_fits,
            "-o",
            out,
            "--psf",
            "auto",
            "--psf-grid",
            "2x2",
            "--iterations",
            "3",
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    assert stdout == ""  # --quiet: no report
    field = gd.PSFField.load(stars_fits.parent / "sharp_psf.fits")
    assert field.grid == (2, 2)
    history = " ".join(str(h) for h in fits.getheader(out)["HISTORY"])
    assert "as a 2x2 field" in history


def test_deconvolve_psf_auto_on_colour_uses_one_psf(scene, tmp_path, capsys):
    cube = np.stack([scene.observed * w for w in (1.0, 0.8, 0.6)]).astype(np.float32)
    source = tmp_path / "rgb.fits"
    fits.PrimaryHDU(cube).writeto(source)
    out = tmp_path / "rgb_sharp.fits"
    code, _, err = run(
        ["deconvolve", source, "-o", out, "--psf", "auto", "--iterations", "3", "--quiet"], capsys
    )
    assert code == 0, err
    assert fits.getdata(out).shape == (3, 512, 512)
    assert fits.getdata(tmp_path / "rgb_sharp_psf.fits").ndim == 2


def test_psf_auto_takes_the_model_and_names_the_psf_beside_a_compressed_output(stars_fits, capsys):
    out = stars_fits.parent / "sharp.fit.gz"
    argv = ["deconvolve", stars_fits, "-o", out, "--psf", "auto", "--psf-model", "gaussian"]
    code, _, err = run([*argv, "--iterations", "1", "--quiet"], capsys)
    assert code == 0, err
    assert fits.getheader(stars_fits.parent / "sharp_psf.fits")["PSFMODEL"] == "gaussian"
    assert "(gaussian, FWHM" in " ".join(str(h) for h in fits.getheader(out)["HISTORY"])


# --- the Python entry ---------------------------------------------------------------------------


def test_api_deconvolve_estimates_the_psf(scene):
    image = scene.observed
    restored = gd.deconvolve(image, iterations=3)
    assert restored.shape == image.shape and np.isfinite(restored).all()
    field_restored = gd.deconvolve(image, iterations=2, psf_grid=(2, 2))
    assert field_restored.shape == image.shape
    with pytest.raises(GpudeconvError, match="psf_grid"):
        gd.deconvolve(image, gd.psf.moffat(3.0), psf_grid=(2, 2))


# --- the map on its own -------------------------------------------------------------------------


class HandMadeEstimate:
    """What field_map reads of a PSFEstimate, made by hand."""

    def __init__(self, psf, image_shape, n=40, seed=0):
        rng = np.random.default_rng(seed)
        height, width = image_shape
        used = np.arange(n) >= 5
        self.psf = psf
        self.model = "moffat"
        self.image_shape = image_shape
        self.grid = getattr(psf, "grid", None)
        self.found, self.used = n, int(used.sum())
        self.rejected = {"saturated": 2, "blended": 3}
        self.stars = Table(
            {
                "x": rng.uniform(0, width - 1, n),
                "y": rng.uniform(0, height - 1, n),
                "fwhm": rng.uniform(3, 5, n),
                "ratio": rng.uniform(0.6, 1, n),
                "angle": rng.uniform(0, 180, n),
                "used": used,
            }
        )

    def parameters_at(self, y, x):
        return {"fwhm": 4.0, "ratio": 0.9, "angle": 10.0, "beta": 3.0}


@needs_matplotlib
@pytest.mark.parametrize("colour", [False, True])
def test_field_map_draws_one_psf_or_a_field_atomically(tmp_path, colour):
    from gpudeconv.psf.diagnose import diagnose
    from gpudeconv.psf.plot import field_map

    shape = (300, 400)
    image = np.random.default_rng(1).normal(100, 3, shape).astype(np.float32)
    image[:20] = np.nan  # a no-data strip
    if colour:
        image = np.stack([image, image, image])
    field = gd.psf.field.aberrated_field(shape, (2, 3), fwhm_centre=3, fwhm_corner=5)
    for psf in (gd.psf.moffat(4.0, 3.0), field):
        estimate = HandMadeEstimate(psf, shape)
        path = tmp_path / f"map_{getattr(psf, 'grid', 'one')}.png"
        assert field_map(path, image, estimate, diagnose(estimate)) == path
        assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(GpudeconvError, match="exists"):
        field_map(path, image, estimate)
    with pytest.raises(GpudeconvError, match=r"\.png"):
        field_map(tmp_path / "map.tif", image, estimate)


def test_field_map_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    from gpudeconv.psf.plot import field_map

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    estimate = HandMadeEstimate(gd.psf.moffat(4.0), (64, 64))
    with pytest.raises(GpudeconvError, match=r"pip install 'gpudeconv\[plot\]'"):
        field_map(tmp_path / "m.png", np.ones((64, 64)), estimate)
    assert not (tmp_path / "m.png").exists()


# --- user errors ----------------------------------------------------------------------------------


def error_cases(folder: Path, stars: Path):
    noise = folder / "noise.fits"
    fits.PrimaryHDU(np.random.default_rng(3).normal(100, 5, (256, 256)).astype(np.float32)).writeto(
        noise
    )
    existing_psf = folder / "done.fits"
    existing_psf.write_bytes(b"keep")
    (folder / "taken_psf.fits").write_bytes(b"keep")
    (folder / "busy_map.png").write_bytes(b"keep")
    out = folder / "out.fits"
    return {
        "bad grid text": (["psf", stars, "-o", out, "--grid", "3by3"], "NYxNX"),
        "zero grid": (["psf", stars, "-o", out, "--grid", "0x2"], "positive integers"),
        "half a grid": (["psf", stars, "-o", out, "--grid", "3x"], "such as 3x3"),
        "bad psf-grid text": (
            ["deconvolve", stars, "-o", out, "--psf", "auto", "--psf-grid", "3-3"],
            "NYxNX",
        ),
        "psf-grid without auto": (
            ["deconvolve", stars, "-o", out, "--psf-fwhm", "3", "--psf-grid", "2x2"],
            "--psf auto",
        ),
        "noise-only psf": (["psf", noise, "-o", out, "--no-map"], "star"),
        "noise-only deconvolve": (["deconvolve", noise, "-o", out, "--psf", "auto"], "star"),
        "existing psf output": (["psf", stars, "-o", existing_psf], "exists; pass --overwrite"),
        "existing report": (
            ["psf", stars, "-o", out, "--report", existing_psf, "--no-map"],
            "exists; pass --overwrite",
        ),
        "existing default map": (
            ["psf", stars, "-o", folder / "busy.fits"],
            "--overwrite",
        ),
        "existing auto psf": (
            ["deconvolve", stars, "-o", folder / "taken.fits", "--psf", "auto"],
            "taken_psf.fits exists",
        ),
        "psf output not fits": (["psf", stars, "-o", folder / "psf.tif"], "FITS"),
        "map not png": (["psf", stars, "-o", out, "--map", folder / "m.jpg"], ".png"),
        "map and no-map": (
            ["psf", stars, "-o", out, "--map", folder / "m.png", "--no-map"],
            "not allowed",
        ),
        "report is the output": (["psf", stars, "-o", out, "--report", out], "two outputs"),
        "report is the input": (
            ["psf", stars, "-o", out, "--report", stars, "--overwrite"],
            "is the input file",
        ),
        "bad model": (["psf", stars, "-o", out, "--model", "airy"], "invalid choice"),
        "beta with auto": (
            ["deconvolve", stars, "-o", out, "--psf", "auto", "--psf-beta", "3"],
            "measured on the stars",
        ),
        "empirical model with fwhm": (
            ["deconvolve", stars, "-o", out, "--psf-fwhm", "3", "--psf-model", "empirical"],
            "--psf auto",
        ),
        "negative saturation": (["psf", stars, "-o", out, "--saturation", "-5"], "positive"),
    }


CASES = [
    "bad grid text",
    "zero grid",
    "half a grid",
    "bad psf-grid text",
    "psf-grid without auto",
    "noise-only psf",
    "noise-only deconvolve",
    "existing psf output",
    "existing report",
    "existing default map",
    "existing auto psf",
    "psf output not fits",
    "map not png",
    "map and no-map",
    "report is the output",
    "report is the input",
    "bad model",
    "beta with auto",
    "empirical model with fwhm",
    "negative saturation",
]


@pytest.mark.parametrize("case", CASES)
def test_user_errors_are_one_line_exit_2_nothing_written(case, stars_fits, capsys):
    if case == "existing default map" and not _have_matplotlib():
        pytest.skip("no default map without matplotlib")
    folder = stars_fits.parent
    argv, match = error_cases(folder, stars_fits)[case]
    before = snapshot(folder)
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, match)
    assert snapshot(folder) == before  # inputs untouched, no output or temporary file left
