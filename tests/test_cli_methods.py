"""`gpudeconv deconvolve` with the restoration methods and options: the output is what the
API computes with the same options, the options are in HISTORY, --report writes the figures,
and every misuse is one line on stderr with nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.io import fits
from helpers import star_field
from test_cli import assert_one_line_error, run

import gpudeconv as gd

PSF = gd.psf.gaussian(3.0)  # the blur of star_field


def command(source, out, *flags) -> list:
    """``gpudeconv deconvolve`` of ``source`` into ``out`` with star_field's Gaussian PSF."""
    return ["deconvolve", source, "-o", out, "--psf-fwhm", "3", "--psf-model", "gaussian", *flags]


def history_of(path) -> str:
    return " ".join(str(line) for line in fits.getheader(path)["HISTORY"])


@pytest.fixture
def frame(tmp_path):
    """A 160 x 176 star field on a sky, with its camera in the header."""
    path = tmp_path / "frame.fits"
    header = fits.Header()
    header["GAIN"] = 1.0
    header["RDNOISE"] = 3.0
    fits.PrimaryHDU(star_field(seed=31, sky=200.0), header=header).writeto(path)
    return path


def test_regularized_accelerated_run_matches_the_api_and_reports(frame, tmp_path, capsys):
    out, report = tmp_path / "sharp.fits", tmp_path / "run.json"
    argv = command(frame, out, "--iterations", "40")
    argv += ["--accelerate", "--stop", "noise", "--dering", "0.5"]
    code, _, err = run([*argv, "--report", report, "--quiet"], capsys)
    assert code == 0, err
    image = fits.getdata(frame)
    expected, info = gd.richardson_lucy(
        image,
        PSF,
        40,
        noise="auto",
        read_noise=3.0,
        gain=1.0,
        accelerate=True,
        stop="noise",
        dering=0.5,
        saturation="auto",
        return_info=True,
    )
    np.testing.assert_allclose(fits.getdata(out), expected, rtol=1e-5, atol=1e-3)
    history = history_of(out)
    assert f"{info.iterations} iterations" in history
    assert "dering=0.5" in history and "accelerate=True" in history
    assert "stopped by noise" in history and "(given)" in history  # the header's camera
    figures = json.loads(report.read_text())
    assert figures["method"] == "rl"
    assert figures["run"]["iterations"] == info.iterations < 40
    assert figures["run"]["stopped"] == "noise"
    assert len(figures["run"]["channels"][0]["data_term"]) == info.iterations
    assert figures["fwhm"]["after"] < figures["fwhm"]["before"]
    assert figures["noise_gain"] > 0


def test_damped_strength_tv_and_wiener(frame, tmp_path, capsys):
    image = fits.getdata(frame)
    tv = tmp_path / "tv.fits"
    argv = command(frame, tv, "--iterations", "8")
    code, _, err = run([*argv, "--method", "rl-tv", "--quiet"], capsys)
    assert code == 0, err
    expected = gd.richardson_lucy(
        image,
        PSF,
        8,
        noise="auto",
        read_noise=3.0,
        gain=1.0,
        regularization=0.005,
        saturation="auto",
    )
    np.testing.assert_allclose(fits.getdata(tv), expected, rtol=1e-5, atol=1e-3)
    assert "regularization=0.005" in history_of(tv)
    damped = tmp_path / "damped.fits"
    argv = command(frame, damped, "--iterations", "8")
    code, _, err = run([*argv, "--method", "damped", "--regularization", "2", "--quiet"], capsys)
    assert code == 0, err
    expected = gd.richardson_lucy(
        image, PSF, 8, noise="auto", read_noise=3.0, gain=1.0, damping=2.0, saturation="auto"
    )
    np.testing.assert_allclose(fits.getdata(damped), expected, rtol=1e-5, atol=1e-3)
    assert "damping=2.0" in history_of(damped)
    filtered = tmp_path / "wiener.fits"
    argv = command(frame, filtered, "--method", "wiener")
    code, _, err = run([*argv, "--quiet"], capsys)
    assert code == 0, err
    np.testing.assert_allclose(fits.getdata(filtered), gd.wiener(image, PSF), rtol=1e-5, atol=1e-3)
    history = history_of(filtered)
    assert f"gpudeconv {gd.__version__}: wiener, one filter step, backend numpy" in history
    assert "iterations" not in history  # one step of the filter


def test_header_saturation_level_masks_the_clipped_cores(tmp_path, capsys):
    image = star_field(seed=32, sky=200.0)
    level = float(np.percentile(image, 99.8))
    path = tmp_path / "clipped.fits"
    header = fits.Header()
    header["SATURATE"] = level
    fits.PrimaryHDU(np.minimum(image, level), header=header).writeto(path)
    out = tmp_path / "out.fits"
    code, _, err = run(
        command(path, out, "--iterations", "5", "--quiet"),
        capsys,
    )
    assert code == 0, err
    assert f"saturation {level:.6g}" in history_of(out)


def test_luminance_mode_on_colour(tmp_path, capsys):
    colour = np.stack([star_field(seed=33, sky=100.0) * f for f in (1.0, 0.7, 0.5)])
    path = tmp_path / "colour.fits"
    fits.PrimaryHDU(colour).writeto(path)
    out = tmp_path / "out.fits"
    argv = command(path, out, "--iterations", "6")
    code, _, err = run([*argv, "--luminance", "--quiet"], capsys)
    assert code == 0, err
    result = fits.getdata(out)
    change = result - colour
    np.testing.assert_allclose(change[0], change[2], atol=1e-2)
    assert "luminance=True" in history_of(out)


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--method", "wiener", "--accelerate"], "--accelerate act on Richardson-Lucy"),
        (["--regularization", "0.01"], "--regularization sets the strength"),
        (["--stop", "soon"], "expected noise, change or change:TOL"),
        (["--stop", "change:-1"], "tolerance of change:TOL must be a positive"),
        (["--dering", "2"], "expected a strength from 0 to 1"),
        (["--saturation", "high"], "expected auto, none or a saturation level"),
        (["--read-noise", "3"], "--read-noise (electrons) and --gain"),
        (["--noise", "none", "--method", "damped"], "need the noise model"),
        (["--luminance"], "--luminance restores the luminance of a colour image"),
    ],
)
def test_method_misuse_is_one_line(frame, tmp_path, capsys, flags, match):
    out = tmp_path / "out.fits"
    code, _, err = run(
        command(frame, out, "--quiet", *flags),
        capsys,
    )
    assert_one_line_error(code, err, match)
    assert not out.exists()


def test_report_must_not_overwrite_the_input(frame, tmp_path, capsys):
    out = tmp_path / "out.fits"
    argv = command(frame, out, "--report", frame, "--quiet")
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, "is the input file")
    assert not out.exists()


def test_tiled_run_takes_the_local_options(frame, tmp_path, capsys):
    whole, tiled = tmp_path / "whole.fits", tmp_path / "tiled.fits"
    flags = ["--iterations", "8", "--method", "rl-tv", "--dering", "0.5", "--quiet"]
    code, _, err = run(command(frame, whole, *flags), capsys)
    assert code == 0, err
    code, _, err = run(command(frame, tiled, *flags, "--tile", "64"), capsys)
    assert code == 0, err
    expected, result = fits.getdata(whole), fits.getdata(tiled)
    span = float(expected.max() - expected.min())
    assert np.max(np.abs(result - expected)) <= 1e-4 * span
    history = history_of(tiled)
    assert "regularization=0.005" in history and "dering=0.5" in history


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--accelerate"], "accelerate"),
        (["--method", "wiener"], "--method wiener needs the whole image"),
        (["--report", "run.json"], "--report needs the whole image"),
    ],
)
def test_tiled_run_refuses_whole_image_options(frame, tmp_path, capsys, flags, match):
    out = tmp_path / "out.fits"
    code, _, err = run(command(frame, out, "--tile", "64", "--quiet", *flags), capsys)
    assert_one_line_error(code, err, match)
    assert not out.exists()


# --------------------------------------------------------------------------- learned method
@pytest.fixture
def learned_weights(tmp_path, monkeypatch):
    """Random network weights (fixed seed), named by GPUDECONV_LEARNED_WEIGHTS as the default:
    the packaged file may not exist yet, and trained weights would not test more here."""
    from test_learned_infer import he_weights

    from gpudeconv.learned.infer import WEIGHTS_ENV

    path = tmp_path / "net-test.npz"
    weights = he_weights(seed=4)
    weights.save(path)
    monkeypatch.setenv(WEIGHTS_ENV, str(path))
    return weights


def test_learned_method_matches_the_api_and_says_so(frame, tmp_path, capsys, learned_weights):
    from gpudeconv.learned.infer import learned_deconvolve

    out = tmp_path / "learned.fits"
    code, _, err = run(command(frame, out, "--method", "learned", "--quiet"), capsys)
    assert code == 0, err
    image = fits.getdata(frame)
    expected = learned_deconvolve(image, PSF, weights=learned_weights)
    assert np.abs(expected - image).max() > 10.0  # the random network changes the image
    np.testing.assert_allclose(fits.getdata(out), expected, rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(gd.deconvolve(image, PSF, method="learned"), expected)
    history = history_of(out)
    assert "learned network net-test.npz, tiles 512 + halo 24 px" in history
    assert f"gpudeconv {gd.__version__}: learned, network net-test.npz, backend numpy" in history
    assert "iterations" not in history  # the network has none


def test_learned_method_streams_with_tile(frame, tmp_path, capsys, learned_weights):
    out = tmp_path / "tiled.fits"
    code, _, err = run(
        command(frame, out, "--method", "learned", "--quiet", "--tile", "256"), capsys
    )
    assert code == 0, err
    image = fits.getdata(frame)
    restored = fits.getdata(out)
    assert restored.shape == image.shape and np.isfinite(restored).all()
    history = history_of(out)
    assert "learned network net-test.npz" in history and "normalization offset" in history
    assert f"gpudeconv {gd.__version__}: learned, network net-test.npz, backend numpy" in history
    assert "iterations" not in history  # as in memory: the network has none


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--accelerate", "--luminance"], "--accelerate, --luminance act on Richardson-Lucy"),
        (["--regularization", "0.1"], "--method learned is one network step"),
        (["--iterations", "50"], "--iterations act on Richardson-Lucy"),
        (["--saturation", "1000", "--noise", "none"], "--saturation, --noise act on"),
        (["--psf-fwhm", "20"], "use --method rl"),  # beyond twice the trained 8.05 px
    ],
)
def test_learned_misuse_is_one_line(frame, tmp_path, capsys, learned_weights, flags, match):
    out = tmp_path / "out.fits"
    code, _, err = run(command(frame, out, "--method", "learned", "--quiet", *flags), capsys)
    assert_one_line_error(code, err, match)
    assert not out.exists()


def test_learned_api_refuses_streaming_and_rl_options(frame, learned_weights):
    image = fits.getdata(frame)
    with pytest.raises(gd.GpudeconvError, match="multiple of 4 for the learned method"):
        gd.deconvolve(image, PSF, method="learned", tile=66)
    with pytest.raises(gd.GpudeconvError, match="takes the options weights and progress"):
        gd.deconvolve(image, PSF, method="learned", accelerate=True)
    with pytest.raises(gd.GpudeconvError, match="method 'learned' takes none"):
        gd.deconvolve(image, PSF, method="learned", regularization=0.1)


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--iterations", "50"], "--iterations act on Richardson-Lucy"),
        (["--saturation", "none"], "--saturation act on Richardson-Lucy"),
        (["--noise", "none"], "--noise act on Richardson-Lucy"),
        (["--read-noise", "3", "--gain", "1"], "--read-noise, --gain act on Richardson-Lucy"),
    ],
)
def test_wiener_refuses_the_rl_options_it_would_ignore(frame, tmp_path, capsys, flags, match):
    # These were accepted and silently ignored by the one-step Wiener filter.
    out = tmp_path / "out.fits"
    code, _, err = run(command(frame, out, "--method", "wiener", "--quiet", *flags), capsys)
    assert_one_line_error(code, err, match)
    assert not out.exists()


def test_default_iterations_and_saturation_go_with_wiener(frame, tmp_path, capsys):
    out = tmp_path / "out.fits"
    argv = command(frame, out, "--method", "wiener", "--saturation", "auto", "--noise", "auto")
    code, _, err = run([*argv, "--quiet"], capsys)
    assert code == 0, err
    plain = tmp_path / "plain.fits"
    code, _, err = run(command(frame, plain, "--quiet"), capsys)
    assert code == 0, err
    assert "30 iterations" in history_of(plain)


def test_tiled_learned_run_says_it_ran_the_network(frame, tmp_path, capsys, learned_weights):
    out = tmp_path / "tiled.fits"
    code, _, err = run(command(frame, out, "--method", "learned", "--tile", "128"), capsys)
    assert code == 0, err
    line = err.strip().splitlines()[-1]
    assert "learned network on" in line and "iterations" not in line, line


def test_wiener_api_refuses_rl_options(frame):
    # deconvolve(method='wiener', accelerate=True) raised TypeError from inside wiener().
    image = fits.getdata(frame)
    with pytest.raises(gd.GpudeconvError, match="method 'wiener' takes the option nsr"):
        gd.deconvolve(image, PSF, method="wiener", accelerate=True)
    assert gd.deconvolve(image, PSF, method="wiener", nsr=1e-3).shape == image.shape
