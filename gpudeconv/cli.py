"""The ``gpudeconv`` command: deconvolve, psf, sweep, info, demo, bench.

Every user error ends as one line on stderr (what is wrong and what to do) with exit code 2; the
input is never modified and no partial output is left behind (outputs are written atomically).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from ._errors import GpudeconvError, GpudeconvWarning
from ._version import __version__

__all__ = ["main"]

USER_ERROR = 2
INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
DEFAULT_ITERATIONS = 30  # --iterations when not given (the RL methods only)
_INTEGER_ONLY = (".png", ".jpg", ".jpeg")  # formats that hold no floating-point pixels
_FITS_NAMES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fts.gz")  # PSFs are saved as FITS


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line, like every other user error."""

    def error(self, message: str):
        raise GpudeconvError(f"{message} (see '{self.prog} --help')")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        msg = f"expected a positive integer, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (np.isfinite(value) and value > 0):
        msg = f"expected a positive number, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _grid(text: str) -> tuple[int, int]:
    """``'3x4'`` -> ``(3, 4)``: node rows by node columns."""
    parts = text.strip().lower().split("x")
    try:
        ny, nx = (int(part) for part in parts)
    except ValueError:
        ny = nx = 0
    if ny < 1 or nx < 1:
        msg = f"expected a grid NYxNX of two positive integers such as 3x3, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return ny, nx


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gpudeconv",
        description="Richardson-Lucy deconvolution for astrophotography, on NVIDIA GPUs or CPUs.",
    )
    parser.add_argument("--version", action="version", version=f"gpudeconv {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    run = commands.add_parser("deconvolve", help="restore an image file")
    run.add_argument("input", metavar="IN", help="FITS, TIFF, PNG or JPEG image")
    run.add_argument("-o", "--output", required=True, metavar="OUT", help="output image path")
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--psf",
        metavar="FILE|auto",
        help="PSF image (FITS/TIFF/PNG, odd sides), a PSF field FITS (varies across the image), "
        "or 'auto' to estimate it from the image's stars (saved as <OUT stem>_psf.fits)",
    )
    source.add_argument(
        "--psf-fwhm", type=_positive_float, metavar="F", help="model PSF FWHM in pixels"
    )
    run.add_argument(
        "--psf-grid",
        type=_grid,
        metavar="NYxNX",
        help="with --psf auto: estimate a PSF field on this grid of nodes (e.g. 3x3)",
    )
    run.add_argument(
        "--psf-model",
        choices=("moffat", "gaussian", "empirical"),
        default=None,
        help="PSF shape (default moffat; gaussian for planetary/lunar seeing; empirical: the "
        "stars' own stacked profile, with --psf auto only)",
    )
    run.add_argument("--psf-beta", type=float, metavar="B", help="Moffat beta (default 2.5)")
    run.add_argument(
        "--psf-ratio", type=float, default=1.0, metavar="R", help="minor/major FWHM (default 1)"
    )
    run.add_argument(
        "--psf-angle", type=float, default=0.0, metavar="A", help="major axis angle, degrees"
    )
    run.add_argument(
        "--iterations",
        type=_positive_int,
        default=None,
        metavar="N",
        help=f"Richardson-Lucy iterations (default {DEFAULT_ITERATIONS})",
    )
    run.add_argument("--backend", default=None, metavar="{auto,numpy,cupy}")
    run.add_argument("--overwrite", action="store_true", help="replace an existing output")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_method_arguments(run)
    tiles = run.add_argument_group(
        "mosaics", "restore in tiles streamed from and to the files (FITS or TIFF output)"
    )
    tiles.add_argument(
        "--tile",
        type=_positive_int,
        metavar="N",
        help="tiles of N x N pixels plus halos (default: planned from free memory; large "
        "images stream on their own)",
    )
    tiles.add_argument(
        "--resume", action="store_true", help="continue an interrupted tiled run into OUT"
    )
    tiles.add_argument(
        "--dask", metavar="ADDRESS", help="run the tiles on a Dask scheduler (tcp://host:8786)"
    )
    tiles.add_argument(
        "--workers",
        type=_positive_int,
        metavar="N",
        help="run the tiles on a local Dask cluster of N worker processes",
    )

    psf = commands.add_parser(
        "psf",
        help="estimate the PSF (or a PSF field) from the image's stars, with a report",
        description="Estimate the PSF from the image's stars, save it, report the stars' "
        "shapes and what they say about the optics (tilt, curvature, coma, collimation).",
    )
    psf.add_argument("input", metavar="IN", help="FITS, TIFF, PNG or JPEG image with stars")
    psf.add_argument(
        "-o", "--output", required=True, metavar="PSF.fits", help="the PSF or PSF field (FITS)"
    )
    psf.add_argument(
        "--grid", type=_grid, metavar="NYxNX", help="a PSF field on NY x NX nodes (e.g. 3x3)"
    )
    psf.add_argument(
        "--model",
        choices=("moffat", "gaussian", "empirical"),
        default="moffat",
        help="fitted PSF model (default moffat); empirical: the stars' stacked profile",
    )
    psf.add_argument(
        "--saturation",
        type=_positive_float,
        metavar="ADU",
        help="stars reaching this level are left out (default: found from the data)",
    )
    psf.add_argument("--report", metavar="REPORT.json", help="also write the report as JSON")
    maps = psf.add_mutually_exclusive_group()
    maps.add_argument(
        "--map",
        metavar="MAP.png",
        help="PNG map of the stars' shapes and the PSFs (default <PSF stem>_map.png)",
    )
    maps.add_argument("--no-map", action="store_true", help="write no PNG map")
    psf.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    psf.add_argument("--quiet", action="store_true", help="print no report")

    info = commands.add_parser("info", help="backends, device, memory, versions")
    info.add_argument("--backend", default=None, metavar="{auto,numpy,cupy}")

    demo = commands.add_parser("demo", help="make a star field, restore it, save a comparison")
    demo.add_argument("--outdir", default=".", help="folder for the demo files (default .)")
    demo.add_argument("--backend", default=None, metavar="{auto,numpy,cupy}")

    bench = commands.add_parser("bench", help="iteration throughput in MPix*iterations/s")
    bench.add_argument("--size", type=_positive_int, default=2048, metavar="N")
    bench.add_argument("--iterations", type=_positive_int, default=20, metavar="N")
    bench.add_argument("--backend", default=None, metavar="{auto,numpy,cupy}")
    bench.add_argument("--no-peers", action="store_true", help="time gpudeconv only")

    from .sweep import add_parser as add_sweep_parser  # planetary/lunar: a contact sheet of PSFs

    add_sweep_parser(commands)
    return parser


def _add_method_arguments(run) -> None:
    method = run.add_argument_group("method", "how to restore (defaults improve a stacked image)")
    method.add_argument(
        "--method",
        choices=("rl", "rl-tv", "damped", "wiener", "learned"),
        default="rl",
        help="rl: Richardson-Lucy; rl-tv: with total-variation regularization (less noise); "
        "damped: White's damped RL (stops fitting within the noise); wiener: one-step "
        "Wiener filter; learned: the trained network (deep-sky, FWHM 2-7 px; the environment "
        "variable GPUDECONV_LEARNED_WEIGHTS names another weight file)",
    )
    method.add_argument(
        "--regularization",
        type=_non_negative_float,
        metavar="S",
        help="strength: the TV weight of rl-tv (default 0.005), the damping threshold in noise "
        "sigmas of damped (default 2)",
    )
    method.add_argument(
        "--accelerate",
        action="store_true",
        help="Biggs-Andrews acceleration: about half the iterations for the same fit",
    )
    method.add_argument(
        "--stop",
        type=_stop_rule,
        metavar="noise|change[:TOL]",
        help="end early when the fit reaches the noise level, or when the estimate changes by "
        "less than TOL per iteration (default 0.001); --iterations stays the most",
    )
    method.add_argument(
        "--dering",
        type=_fraction,
        default=0.0,
        metavar="S",
        help="0-1: hold the dark rings around bright stars at S x the local background "
        "(default 0, off)",
    )
    method.add_argument(
        "--saturation",
        type=_saturation,
        default="auto",
        metavar="auto|LEVEL|none",
        help="treat saturated pixels as lower bounds of the light: auto (default) from the "
        "header's SATURATE or DATAMAX or the data's maximum plateau, a level, or none",
    )
    method.add_argument(
        "--luminance",
        action="store_true",
        help="colour: restore the luminance and keep the original chrominance (noisy colour)",
    )
    method.add_argument(
        "--noise",
        choices=("auto", "none"),
        default="auto",
        help="data term: auto (default) fits the sky background and the Poisson + read noise "
        "estimated from the image; none fits the data as plain Poisson counts",
    )
    method.add_argument(
        "--read-noise",
        type=_non_negative_float,
        metavar="E",
        help="read noise in electrons (with --gain; default: header RDNOISE or estimated)",
    )
    method.add_argument(
        "--gain",
        type=_positive_float,
        metavar="G",
        help="electrons per data unit (with --read-noise; default: header GAIN or estimated)",
    )
    method.add_argument(
        "--report",
        metavar="REPORT.json",
        help="write star FWHM before/after by region, noise gain, ringing, the fit per "
        "iteration and why it stopped",
    )


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (np.isfinite(value) and value >= 0):
        msg = f"expected a number >= 0, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _fraction(text: str) -> float:
    value = _non_negative_float(text)
    if value > 1:
        msg = f"expected a strength from 0 to 1, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _stop_rule(text: str) -> tuple[str, float]:
    """``'noise'`` -> ('noise', 0.001); ``'change:1e-4'`` -> ('change', 1e-4)."""
    rule, _, tolerance = text.strip().lower().partition(":")
    if rule not in ("noise", "change") or (tolerance and rule != "change"):
        msg = f"expected noise, change or change:TOL (e.g. change:0.001), got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    try:
        value = float(tolerance) if tolerance else 1e-3
    except ValueError:
        value = float("nan")
    if not (np.isfinite(value) and value > 0):
        msg = f"the tolerance of change:TOL must be a positive number, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return rule, value


def _saturation(text: str):
    """``'auto'``, ``'none'`` (None) or a level."""
    word = text.strip().lower()
    if word in ("auto", "none"):
        return None if word == "none" else "auto"
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not np.isfinite(value):
        msg = f"expected auto, none or a saturation level in data units, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


# ---------------------------------------------------------------------------- deconvolve
def _check_output(input_path: Path, output_path: Path, overwrite: bool) -> None:
    """Refuse bad output paths before any work is done."""
    from .io import check_output_path

    same = output_path.resolve() == input_path.resolve() or (
        output_path.exists() and input_path.exists() and os.path.samefile(input_path, output_path)
    )
    if same:
        msg = f"output {output_path} is the input file; choose another -o path (inputs are kept)"
        raise GpudeconvError(msg)
    check_output_path(output_path, overwrite=overwrite)


def _model_psf(args) -> tuple[np.ndarray, str]:
    from . import psf as psf_models

    model = args.psf_model or "moffat"
    if model == "gaussian" and args.psf_beta is not None:
        msg = "--psf-beta applies to the Moffat model only; drop it or use --psf-model moffat"
        raise GpudeconvError(msg)
    shape = {"ratio": args.psf_ratio, "angle": args.psf_angle}
    if model == "gaussian":
        kernel = psf_models.gaussian(args.psf_fwhm, **shape)
        text = f"Gaussian fwhm={args.psf_fwhm:g}"
    else:
        beta = 2.5 if args.psf_beta is None else args.psf_beta
        kernel = psf_models.moffat(args.psf_fwhm, beta, **shape)
        text = f"Moffat fwhm={args.psf_fwhm:g} beta={beta:g}"
    if args.psf_ratio != 1.0 or args.psf_angle != 0.0:
        text += f" ratio={args.psf_ratio:g} angle={args.psf_angle:g}"
    return kernel, f"{text} size={kernel.shape[0]}"


def _file_psf(path: str, channels: int | None, image_shape) -> tuple[object, str]:
    """The PSF of ``--psf FILE``: a PSF image, or a PSF field saved by ``PSFField.save``."""
    from .io import read_image
    from .psf import PSFField, validate_psf

    if not Path(path).is_file():
        what = "is a folder" if Path(path).is_dir() else "does not exist"
        msg = f"PSF file {path} {what}: check the --psf path (or give --psf-fwhm or --psf auto)"
        raise GpudeconvError(msg)
    if PSFField.is_field_file(path):
        field = PSFField.load(path)
        field.check_image_shape(image_shape, name=f"the PSF field {path}")
        ny, nx = field.grid
        return field, f"field {Path(path).name} ({ny}x{nx} nodes, {field.size}x{field.size})"
    data, _ = read_image(path)
    kernel = validate_psf(data, name=f"PSF file {path}", channels=channels, warn_sum=False)
    return kernel, f"file {Path(path).name} ({kernel.shape[-2]}x{kernel.shape[-1]})"


def _output_dtype(output_path: Path, input_dtype: np.dtype, result_dtype: np.dtype):
    """Integer inputs keep their bit depth in TIFF/PNG/JPEG outputs; FITS outputs are float."""
    suffix = output_path.suffix.lower()
    if input_dtype.kind in "ui" and not output_path.name.lower().endswith(_FITS_NAMES):
        return input_dtype
    if suffix in _INTEGER_ONLY:
        msg = (
            f"the input holds floating-point values, which {suffix} cannot store; "
            "write the output as .fits or .tif"
        )
        raise GpudeconvError(msg)
    return result_dtype


def _check_output_layout(output_path: Path, shape, dtype: np.dtype) -> None:
    """Refuse, before restoring, what PNG and JPEG cannot hold: other channel counts than grey
    or RGB, 16-bit JPEG, 16-bit colour PNG, integers wider than 16 bits."""
    suffix = output_path.suffix.lower()
    if suffix not in _INTEGER_ONLY:
        return
    name = "PNG" if suffix == ".png" else "JPEG"
    channels = shape[0] if len(shape) == 3 else 1
    if channels not in (1, 3):
        msg = (
            f"{name} holds grey or RGB images and the input has {channels} channels: write the "
            "output as .tif or .fits"
        )
        raise GpudeconvError(msg)
    dtype = np.dtype(dtype)
    if dtype == np.uint8:
        return
    if name == "PNG" and dtype == np.uint16:
        if channels == 1:
            return
        msg = (
            "16-bit colour cannot be written as PNG (Pillow has no 16-bit RGB mode): write the "
            "output as .tif or .fits to keep the 16 bits"
        )
        raise GpudeconvError(msg)
    holds = "8-bit" if name == "JPEG" else "8 or 16-bit unsigned"
    msg = (
        f"{name} holds {holds} pixels and the input's are {dtype}: write the output as .tif or "
        ".fits to keep them"
    )
    raise GpudeconvError(msg)


def _validate_psf_options(args) -> None:
    """Refuse PSF options that do not go together, before any work."""
    auto = args.psf == "auto"
    if args.psf_grid is not None and not auto:
        msg = (
            "--psf-grid NYxNX sets the grid of a PSF field estimated from the stars: use it with "
            "--psf auto (a saved field goes with --psf FILE)"
        )
        raise GpudeconvError(msg)
    if auto:
        if args.psf_beta is not None or args.psf_ratio != 1.0 or args.psf_angle != 0.0:
            msg = (
                "--psf-beta/--psf-ratio/--psf-angle describe a model PSF; with --psf auto they "
                "are measured on the stars: drop them"
            )
            raise GpudeconvError(msg)
    elif args.psf is not None:
        if (
            args.psf_model
            or args.psf_beta is not None
            or args.psf_ratio != 1.0
            or args.psf_angle != 0.0
        ):
            msg = (
                "--psf-model/--psf-beta/--psf-ratio/--psf-angle describe a model PSF; they "
                "cannot go with --psf FILE, whose shape is the file's: drop them"
            )
            raise GpudeconvError(msg)
    elif args.psf_model == "empirical":
        msg = "--psf-model empirical is measured on the stars: use it with --psf auto"
        raise GpudeconvError(msg)


def _deconvolve(args) -> int:
    from .backend import get_backend, requested_backend
    from .io import provenance_header, read_image, write_image

    input_path, output_path = Path(args.input), Path(args.output)
    _validate_psf_options(args)
    _validate_tile_options(args)
    _validate_method_options(args)
    if args.iterations is None:
        args.iterations = DEFAULT_ITERATIONS
    auto = args.psf == "auto"
    # A named backend is checked at once; 'auto' is resolved once the paths, the image and
    # the PSF have passed their checks, so that a user error on a machine without a GPU is
    # not preceded by the note on why the CPU is used.
    backend = None if requested_backend(args.backend) == "auto" else get_backend(args.backend)
    _check_output(input_path, output_path, args.overwrite)
    psf_path = _beside(output_path, "_psf.fits") if auto else None
    if psf_path is not None:
        _check_output(input_path, psf_path, args.overwrite)
    report_path = Path(args.report) if args.report else None
    if report_path is not None:
        _check_text_output(input_path, report_path, args.overwrite)
    _check_distinct(output_path, psf_path, report_path)
    # The shape, without reading the pixels: a mosaic may not fit in memory.
    shape, dtype = _image_layout(input_path)
    # What the output format cannot hold is refused now, before any work.
    _check_output_layout(output_path, shape, _output_dtype(output_path, dtype, np.float32))
    channels = shape[0] if len(shape) == 3 else None
    if args.luminance and channels is None:
        msg = (
            f"--luminance restores the luminance of a colour image, and {input_path.name} is "
            "grey (one channel): drop --luminance"
        )
        raise GpudeconvError(msg)
    estimate = None
    if auto:
        from .tiles import fits_in_memory

        if not fits_in_memory(shape, psf_size=63, backend="numpy"):
            msg = (
                f"the image ({'x'.join(map(str, shape))}) is too large to load for estimating "
                "its PSF: estimate it on a crop with `gpudeconv psf`, then pass --psf FILE"
            )
            raise GpudeconvError(msg)
        image, _ = read_image(input_path)  # the estimate needs the stars of the whole frame
        estimate = _fit_psf(image, grid=args.psf_grid, model=args.psf_model or "moffat")
        del image
        kernel = estimate.psf
        psf_text = f"{_estimate_text(estimate)}; saved as {psf_path.name}"
        if not args.quiet:
            print("\n".join(_report_lines(_psf_report(estimate))))
    elif args.psf is not None:
        kernel, psf_text = _file_psf(args.psf, channels, shape[-2:])
    else:
        kernel, psf_text = _model_psf(args)

    if backend is None:
        backend = get_backend(args.backend)
    if _streams(args, shape, kernel, backend):
        report = _deconvolve_tiled(args, input_path, output_path, kernel, psf_text, backend)
        if estimate is not None:
            _save_psf(estimate, psf_path, input_path, overwrite=args.overwrite)
        if not args.quiet:
            how = (
                _ONE_STEP[args.method]
                if args.method in _ONE_STEP
                else f"{args.iterations} iterations"
            )
            print(
                f"gpudeconv: wrote {output_path} ({report.tiles_done} of {report.tiles_total} "
                f"tiles of {report.tile} + halo {report.halo}, {how} on "
                f"{report.backend}, {report.seconds:.1f} s, {report.mpix_it_per_s:.1f} MPix*it/s)",
                file=sys.stderr,
            )
        return 0

    image, header = read_image(input_path)
    out_dtype = _output_dtype(output_path, image.dtype, backend.float_dtype(image.dtype))
    _check_output_layout(output_path, image.shape, out_dtype)  # before the long work
    start = time.perf_counter()
    restored, info, history = _restore(args, image, header, kernel, backend)
    elapsed = time.perf_counter() - start
    iterations = info.iterations if info is not None else 0
    header = provenance_header(
        header,
        method=args.method,
        psf=psf_text,
        iterations=info.iterations if info is not None else None,
        steps=_steps(args.method),
        backend=backend.name,
        extra=history,
    )
    if estimate is not None:
        # After the long work: an interrupted run leaves neither file.
        _save_psf(estimate, psf_path, input_path, overwrite=args.overwrite)
    if report_path is not None:
        _write_restoration_report(report_path, image, restored, info, args, psf_text)
    write_image(output_path, restored, header, dtype=out_dtype, overwrite=args.overwrite)
    if not args.quiet:
        pixels = int(np.prod(image.shape))
        rate = pixels * max(iterations, 1) / elapsed / 1e6
        saved = f" and its PSF {psf_path}" if psf_path is not None else ""
        how = (
            f"{iterations} iterations, stopped by {info.stopped}"
            if info is not None and info.stopped not in ("iterations", "")
            else (f"{iterations} iterations" if info is not None else _ONE_STEP[args.method])
        )
        print(
            f"gpudeconv: wrote {output_path}{saved} ({args.method}, {how} on "
            f"{backend.name}, {elapsed:.1f} s, {rate:.1f} MPix*it/s)",
            file=sys.stderr,
        )
    return 0


#: How the methods without iterations say what they did.
_ONE_STEP = {"wiener": "Wiener filter", "learned": "learned network"}


def _steps(method: str) -> str | None:
    """What a method without iterations ran, for the HISTORY (None for the RL methods)."""
    if method == "learned":
        from .learned.infer import weights_name

        return f"network {weights_name()}"
    return "one filter step" if method == "wiener" else None


def _restore(args, image, header, kernel, backend):
    """Restore ``image`` as the method options say: ``(restored, info, history)``, ``info`` a
    `RestorationInfo` (None for Wiener and learned) and ``history`` the HISTORY items."""
    from .restore import richardson_lucy

    if args.method == "wiener":
        from .psf import PSFField
        from .restore.wiener import wiener

        if isinstance(kernel, PSFField):
            msg = "--method wiener takes one PSF, not a PSF field: use an RL method for a field"
            raise GpudeconvError(msg)
        restored = wiener(image, kernel, backend=backend)
        return restored, None, {"options": "Wiener filter, noise-to-signal from the image"}
    if args.method == "learned":
        from .learned.infer import BLEND, DEFAULT_TILE, HALO, learned_deconvolve, weights_name

        restored = learned_deconvolve(image, kernel, backend=backend, progress=not args.quiet)
        tiles = f"tiles {DEFAULT_TILE} + halo {HALO} px, blended over {BLEND} px"
        return restored, None, {"options": f"learned network {weights_name()}, {tiles}"}
    restored, info = richardson_lucy(
        image,
        kernel,
        args.iterations,
        backend=backend,
        return_info=True,
        record_fit=bool(args.report),  # the fit of every iteration only for the report
        progress=not args.quiet,
        **_rl_options(args, header),
    )
    return restored, info, _history(info)


def _rl_options(args, header) -> dict:
    """The `richardson_lucy` options of the method flags (``header`` supplies the camera's
    read noise, gain and saturation level when the flags do not)."""
    from .api import method_options

    options = method_options(args.method, args.regularization)
    options.update(_noise_options(args, header))
    options["saturation"] = _saturation_option(args.saturation, header)
    if args.stop is not None:
        options["stop"], options["tolerance"] = args.stop
    if args.accelerate:
        options["accelerate"] = True
    if args.dering:
        options["dering"] = args.dering
    if args.luminance:
        options["luminance"] = True
    return options


def _validate_method_options(args) -> None:
    """RL-only flags with ``--method wiener`` or ``learned``, and a strength without a
    regularized method."""
    if args.method in ("wiener", "learned"):
        # --saturation auto and --noise auto are the defaults: only a change is refused.
        given = [
            flag
            for flag, value in (
                ("--iterations", args.iterations is not None),
                ("--accelerate", args.accelerate),
                ("--stop", args.stop is not None),
                ("--dering", bool(args.dering)),
                ("--regularization", args.regularization is not None),
                ("--luminance", args.luminance),
                ("--saturation", args.saturation != "auto"),
                ("--noise", args.noise != "auto"),
                ("--read-noise", args.read_noise is not None),
                ("--gain", args.gain is not None),
            )
            if value
        ]
        if given:
            msg = (
                f"{', '.join(given)} act on Richardson-Lucy iterations; --method {args.method} "
                f"is one {'filter' if args.method == 'wiener' else 'network'} step: drop them "
                "or choose an RL method"
            )
            raise GpudeconvError(msg)
    elif args.regularization is not None and args.method == "rl":
        msg = (
            "--regularization sets the strength of --method rl-tv (TV weight) or damped "
            "(threshold in noise sigmas): choose one of them or drop it"
        )
        raise GpudeconvError(msg)


def _noise_options(args, header) -> dict:
    """The data term's options: ``--noise``, and read noise and gain from the flags or the
    header (GAIN or EGAIN, RDNOISE or READNOIS, both needed)."""
    if args.noise == "none":
        if args.read_noise is not None or args.gain is not None:
            msg = "--read-noise and --gain describe the noise model: drop them with --noise none"
            raise GpudeconvError(msg)
        if args.method == "damped" or (args.stop is not None and args.stop[0] == "noise"):
            msg = "damped RL and --stop noise need the noise model: drop --noise none"
            raise GpudeconvError(msg)
        return {"noise": None}
    if (args.read_noise is None) != (args.gain is None):
        msg = "--read-noise (electrons) and --gain (electrons per ADU) go together: give both"
        raise GpudeconvError(msg)
    read_noise, gain = args.read_noise, args.gain
    if read_noise is None and header is not None:
        read_noise = _header_number(header, ("RDNOISE", "READNOIS", "RON"))
        gain = _header_number(header, ("GAIN", "EGAIN"))
        if read_noise is None or gain is None or gain <= 0 or read_noise < 0:
            read_noise = gain = None
    return {"noise": "auto", "read_noise": read_noise, "gain": gain}


def _header_number(header, keys) -> float | None:
    for key in keys:
        value = header.get(key) if hasattr(header, "get") else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
            return float(value)
    return None


def _saturation_option(saturation, header):
    """``--saturation auto`` takes the header's SATURATE or DATAMAX before the data's plateau."""
    if saturation != "auto" or header is None:
        return saturation
    level = _header_number(header, ("SATURATE", "DATAMAX"))
    return "auto" if level is None else level


def _history(info) -> dict:
    """HISTORY items: the options in effect and how each channel's fit went."""
    options = info.options
    chosen = [
        f"{key}={value}"
        for key, value in options.items()
        if key != "iterations" and value not in (None, False, 0, 0.0)
    ]
    lines = {"options": " ".join(chosen) or "plain"}
    for index, channel in enumerate(info.channels):
        parts = [f"{channel.iterations} iterations, stopped by {channel.stopped}"]
        if channel.noise is not None:
            model = channel.noise
            parts.append(
                f"sky {model.background:.6g} sigma {model.sigma:.4g} offset {model.offset:.4g} "
                f"gain {model.gain:.4g} ({model.source})"
            )
        if channel.saturation is not None:
            parts.append(f"saturation {channel.saturation:.6g} ({channel.saturated} px masked)")
        if channel.restarts:
            parts.append(f"{channel.restarts} acceleration restarts")
        lines[f"channel {index}" if len(info.channels) > 1 else "fit"] = "; ".join(parts)
    return lines


def _write_restoration_report(path: Path, before, after, info, args, psf_text: str) -> None:
    from .io import write_text
    from .quality import restoration_report

    report = restoration_report(before, after, info=None if info is None else info.to_dict())
    report = {
        "input": args.input,
        "output": args.output,
        "method": args.method,
        "psf": psf_text,
        **report,
    }
    write_text(path, json.dumps(report, indent=2, allow_nan=False) + "\n")


def _validate_tile_options(args) -> None:
    if args.dask is not None and args.workers is not None:
        msg = "--dask ADDRESS uses an existing cluster, --workers N starts one: give one of them"
        raise GpudeconvError(msg)
    if args.resume and (args.dask is not None or args.workers is not None):
        msg = "--resume continues a run on this machine; a Dask run cannot resume: drop --resume"
        raise GpudeconvError(msg)


def _image_layout(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """The input's shape and dtype from its header where the tile reader can, else by reading
    it."""
    from .io import open_tile_reader, read_image

    try:
        reader = open_tile_reader(path)
    except GpudeconvError:  # e.g. a compressed TIFF without zarr: fine in memory
        data = read_image(path)[0]
        return tuple(data.shape), data.dtype
    shape, dtype = tuple(reader.shape), np.dtype(reader.dtype)
    reader.close()
    return shape, dtype


def _streams(args, shape, kernel, backend) -> bool:
    """Whether to restore in tiles: asked for, or the whole image does not fit the memory
    budget (then only into FITS or TIFF, which can be written tile by tile)."""
    if args.tile or args.resume or args.dask is not None or args.workers is not None:
        return True
    from .psf import PSFField
    from .tiles import fits_in_memory

    size = kernel.size if isinstance(kernel, PSFField) else np.shape(kernel)[-1]
    if fits_in_memory(shape, psf_size=size, backend=backend):
        return False
    if Path(args.output).suffix.lower() not in (".fits", ".fit", ".fts", ".tif", ".tiff"):
        msg = (
            f"the image ({'x'.join(map(str, shape))}) is too large to restore in memory and "
            f"{Path(args.output).suffix} cannot be written tile by tile: write .fits or .tif"
        )
        raise GpudeconvError(msg)
    return True


def _deconvolve_tiled(args, input_path, output_path, kernel, psf_text, backend):
    from .io import open_tile_reader

    if args.method == "learned" and (args.dask is not None or args.workers is not None):
        msg = (
            "--method learned streams on this machine only: drop --dask/--workers, or use an "
            "RL method on a cluster"
        )
        raise GpudeconvError(msg)
    if args.method == "wiener" or args.report:
        what = "--method wiener" if args.method == "wiener" else "--report"
        msg = (
            f"{what} needs the whole image in memory and this run streams in tiles (too large, "
            "or --tile/--resume/--dask/--workers): use an RL method without it"
        )
        raise GpudeconvError(msg)
    if args.method == "learned":
        options = {}
    else:
        options = _rl_options(args, open_tile_reader(input_path).header)
    if args.dask is not None or args.workers is not None:
        from .dask import run_on_cluster

        return run_on_cluster(
            input_path,
            output_path,
            kernel,
            args.iterations,
            address=args.dask,
            workers=args.workers,
            backend=backend.name,
            tile=args.tile,
            overwrite=args.overwrite,
            psf_description=psf_text,
            options=options,
            method=args.method,
        )
    from .tiles import deconvolve_file

    return deconvolve_file(
        input_path,
        output_path,
        kernel,
        args.iterations,
        backend=backend,
        tile=args.tile,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.quiet,
        psf_description=psf_text,
        options=options,
        method=args.method,
    )


# ---------------------------------------------------------------------------- psf
def _psf(args) -> int:
    from .io import read_image
    from .psf.diagnose import diagnose

    input_path, output_path = Path(args.input), Path(args.output)
    _check_fits_name(output_path, "-o")
    _check_output(input_path, output_path, args.overwrite)
    report_path = Path(args.report) if args.report else None
    if report_path is not None:
        _check_text_output(input_path, report_path, args.overwrite)
    map_path = _map_path(args, input_path, output_path)
    _check_distinct(output_path, report_path, map_path)

    image, _ = read_image(input_path)
    estimate = _fit_psf(image, grid=args.grid, model=args.model, saturation=args.saturation)
    diagnosis = diagnose(estimate)
    report = _psf_report(estimate, diagnosis)
    report = {"input": str(input_path), "output": str(output_path), **report}

    written = []
    if map_path is not None:
        # First: drawing is the step most likely to fail, and it then leaves nothing behind.
        from .psf.plot import field_map

        field_map(map_path, image, estimate, diagnosis, overwrite=args.overwrite)
        written.append(map_path)
    _save_psf(estimate, output_path, input_path, overwrite=args.overwrite)
    written.insert(0, output_path)
    if report_path is not None:
        from .io import write_text

        write_text(report_path, json.dumps(report, indent=2, allow_nan=False) + "\n")
        written.append(report_path)
    if not args.quiet:
        print("\n".join([*_report_lines(report), diagnosis.text()]))
        print(f"gpudeconv: wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0


def _fit_psf(image, *, grid, model: str, saturation: float | None = None):
    from .psf.estimate import fit_psf

    return fit_psf(image, grid=grid, model=model, saturation=saturation)


def _beside(path: Path, suffix: str) -> Path:
    """``path`` with its image extension (``.fits``, ``.fit.gz``, ...) replaced by ``suffix``."""
    from .io import SUPPORTED_EXTENSIONS

    name = path.name
    for extension in sorted(SUPPORTED_EXTENSIONS, key=len, reverse=True):
        if name.lower().endswith(extension) and len(name) > len(extension):
            name = name[: -len(extension)]
            break
    else:
        name = path.stem or name
    return path.with_name(name + suffix)


def _check_fits_name(path: Path, option: str) -> None:
    if not path.name.lower().endswith(_FITS_NAMES):
        msg = (
            f"{option} {path}: the PSF is saved as FITS; give a name ending in "
            f"{', '.join(_FITS_NAMES)}"
        )
        raise GpudeconvError(msg)


def _check_text_output(input_path: Path, path: Path, overwrite: bool) -> None:
    from .io import _validate_output_path

    if path.exists() and input_path.exists() and os.path.samefile(input_path, path):
        msg = f"output {path} is the input file; choose another path (inputs are kept)"
        raise GpudeconvError(msg)
    _validate_output_path(path, overwrite=overwrite)


def _map_path(args, input_path: Path, output_path: Path) -> Path | None:
    """Where the PNG map goes, checked; None without a map (and a note if matplotlib is missing)."""
    from .psf.plot import _INSTALL_HINT, have_matplotlib

    if args.no_map:
        return None
    if args.map is None:
        if not have_matplotlib():
            if not args.quiet:
                print(
                    f"gpudeconv: note: no PSF map drawn: matplotlib is not installed; "
                    f"{_INSTALL_HINT}",
                    file=sys.stderr,
                )
            return None
        path = _beside(output_path, "_map.png")
        if path.exists() and not args.overwrite:
            msg = (
                f"output {path} (the PSF map) exists; pass --overwrite to replace it, --map to "
                "choose another path or --no-map"
            )
            raise GpudeconvError(msg)
    else:
        path = Path(args.map)
        if not path.name.lower().endswith(".png"):
            msg = f"--map {path}: the PSF map is a PNG image; give a name ending in .png"
            raise GpudeconvError(msg)
        if not have_matplotlib():
            msg = f"--map needs matplotlib, which is not installed: {_INSTALL_HINT}"
            raise GpudeconvError(msg)
    _check_output(input_path, path, args.overwrite)
    return path


def _check_distinct(*paths: Path | None) -> None:
    seen = {}
    for path in paths:
        if path is None:
            continue
        key = path.resolve()
        if key in seen:
            msg = f"{seen[key]} is given for two outputs; give each output its own path"
            raise GpudeconvError(msg)
        seen[key] = path


def _save_psf(estimate, path: Path, input_path: Path, *, overwrite: bool) -> None:
    """The estimated PSF as a 2-D FITS image with its parameters, or the field's own file."""
    from astropy.io import fits

    from .io import write_image

    psf = estimate.psf
    if hasattr(psf, "psfs"):
        psf.save(path, overwrite=overwrite)
        return
    height, width = estimate.image_shape
    parameters = estimate.parameters_at((height - 1) / 2, (width - 1) / 2)
    header = fits.Header()
    header["GDKIND"] = ("PSF", "gpudeconv PSF estimated from stars")
    header["PSFMODEL"] = (estimate.model, "fitted model: moffat, gaussian or empirical")
    # FITS cards cannot hold NaN: a value that is not finite (beta of a Gaussian) is left out.
    numbers = [
        ("FWHM", parameters.get("fwhm"), "major-axis FWHM at the centre, pixels"),
        ("RATIO", parameters.get("ratio"), "minor/major FWHM"),
        ("ANGLE", parameters.get("angle"), "major axis, deg from +x toward +y"),
        ("BETA", parameters.get("beta"), "Moffat wing exponent"),
        ("SKYLEVEL", estimate.background, "background level, image units"),
        ("SKYNOISE", estimate.noise, "background noise (sigma), image units"),
    ]
    for key, value, comment in numbers:
        if value is not None and np.isfinite(value):
            header[key] = (round(float(value), 6), comment)
    header["NFOUND"] = (int(estimate.found), "stars detected")
    header["NUSED"] = (int(estimate.used), "stars the PSF was estimated from")
    header["IMAGEH"] = (int(height), "height of the image the PSF was estimated on")
    header["IMAGEW"] = (int(width), "width of the image the PSF was estimated on")
    header.add_history(f"gpudeconv {__version__} psf: estimated from {input_path.name}")
    kernel = np.asarray(psf, dtype=np.float32)
    write_image(path, kernel, header, overwrite=overwrite)


# --- the report: counts, parameters, per-node parameters (the CLI prints it, --report saves it)


def _psf_report(estimate, diagnosis=None) -> dict:
    """Counts and fitted parameters of an estimate (and its diagnosis), JSON-ready."""
    height, width = (int(n) for n in estimate.image_shape)
    psf = estimate.psf
    grid = getattr(psf, "grid", None)
    size = int(psf.size) if grid is not None else int(np.asarray(psf).shape[-1])
    report = {
        "gpudeconv": __version__,
        "model": estimate.model,
        "image_shape": [height, width],
        "grid": list(grid) if grid is not None else None,
        "psf_size": size,
        "stars": {
            "found": int(estimate.found),
            "used": int(estimate.used),
            "rejected": {str(k): int(v) for k, v in estimate.rejected.items()},
        },
        "background": _number(estimate.background),
        "noise": _number(estimate.noise),
    }
    if grid is None:
        parameters = estimate.parameters_at((height - 1) / 2, (width - 1) / 2)
        report["psf"] = _parameters(parameters)
    else:
        nodes = []
        for a, row in enumerate(psf.node_rows()):
            for b, col in enumerate(psf.node_cols()):
                values = _parameters(estimate.parameters_at(float(row), float(col)))
                nodes.append({"node": [a, b], "y": float(row), "x": float(col), **values})
        report["psf"] = _central(nodes)
        report["range"] = _ranges(nodes, report["psf"]["angle"])
        report["nodes"] = nodes
    used = _used_fwhm(estimate.stars)
    report["stars"]["fwhm_median"] = _number(np.median(used)) if used.size else None
    if diagnosis is not None:
        report["diagnosis"] = diagnosis.as_dict()
    return report


def _parameters(parameters: dict) -> dict:
    ratio = _number(parameters["ratio"])
    return {
        "fwhm": _number(parameters["fwhm"]),
        "ratio": ratio,
        "ellipticity": None if ratio is None else 1.0 - ratio,
        "angle": _number(float(parameters["angle"]) % 180),
        "beta": _number(parameters.get("beta", float("nan"))),
    }


def _central(nodes: list[dict]) -> dict:
    """Median of each parameter over the nodes; the axial mean for the angle."""
    central = {}
    for key in ("fwhm", "ratio", "ellipticity", "beta"):
        values = [n[key] for n in nodes if n[key] is not None]
        central[key] = float(np.median(values)) if values else None
    doubled = np.radians(2 * np.array([n["angle"] for n in nodes if n["angle"] is not None]))
    weights = np.array([n["ellipticity"] or 0.0 for n in nodes if n["angle"] is not None])
    if doubled.size and weights.sum() > 0:
        mean = np.arctan2(np.sum(weights * np.sin(doubled)), np.sum(weights * np.cos(doubled)))
        central["angle"] = float(np.degrees(mean) / 2 % 180)
    else:
        central["angle"] = float(nodes[0]["angle"]) if nodes and nodes[0]["angle"] else 0.0
    return central


def _ranges(nodes: list[dict], angle: float) -> dict:
    """[min, max] of each parameter over the nodes; angles unwrapped around ``angle`` (so they
    may leave [0, 180): 170 to 190 rather than 10 to 170 for angles close to 0)."""
    ranges = {}
    for key in ("fwhm", "ratio", "ellipticity", "beta"):
        values = [n[key] for n in nodes if n[key] is not None]
        ranges[key] = [float(min(values)), float(max(values))] if values else None
    offsets = [(n["angle"] - angle + 90) % 180 - 90 for n in nodes if n["angle"] is not None]
    ranges["angle"] = [angle + min(offsets), angle + max(offsets)] if offsets else None
    return ranges


def _used_fwhm(stars) -> np.ndarray:
    fwhm = np.asarray(stars["fwhm"], dtype=np.float64)
    if "used" in stars.colnames:
        fwhm = fwhm[np.asarray(stars["used"], dtype=bool)]
    return fwhm[np.isfinite(fwhm)]


def _number(value) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def _report_lines(report: dict) -> list[str]:
    """The short report for people: stars, PSF parameters, the field's spread."""
    stars = report["stars"]
    rejected = sum(stars["rejected"].values())
    reasons = ", ".join(f"{name} {count}" for name, count in stars["rejected"].items() if count)
    line = f"stars: {stars['found']} found, {stars['used']} used, {rejected} rejected"
    lines = [line + (f" ({reasons})" if reasons else "")]
    psf = report["psf"]
    beta = f", beta {psf['beta']:.2f}" if psf.get("beta") is not None else ""
    size = report["psf_size"]
    where = "at the centre" if report["grid"] is None else "median of the nodes"
    lines.append(
        f"PSF ({report['model']}, {size}x{size}, {where}): FWHM {psf['fwhm']:.2f} px, "
        f"ellipticity {psf['ellipticity']:.2f} (minor/major {psf['ratio']:.2f}), "
        f"angle {psf['angle']:.0f} deg{beta}"
    )
    if report["grid"] is not None:
        ny, nx = report["grid"]
        spread = report["range"]
        low, high = spread["angle"]
        # Angles are axial (mod 180): the range is unwrapped around the central angle, and one
        # wider than 90 deg (a radial pattern) has no meaningful ends.
        angles = f"angle {low:.0f} to {high:.0f} deg" if high - low < 90 else "angles every way"
        lines.append(
            f"across the {ny}x{nx} field: FWHM {spread['fwhm'][0]:.2f} to {spread['fwhm'][1]:.2f} "
            f"px, ellipticity {spread['ellipticity'][0]:.2f} to {spread['ellipticity'][1]:.2f}, "
            f"{angles}"
        )
    lines.append(
        f"background {report['background']:.4g}, noise {report['noise']:.3g} (image units)"
        if report["background"] is not None and report["noise"] is not None
        else "background and noise not measured"
    )
    return lines


def _estimate_text(estimate) -> str:
    """The PSF line of the output's HISTORY: 'estimated from N stars (model, FWHM ...)'."""
    report = _psf_report(estimate)
    psf = report["psf"]
    beta = f", beta {psf['beta']:.2f}" if psf.get("beta") is not None else ""
    shape = (
        f"FWHM {psf['fwhm']:.2f} px, minor/major {psf['ratio']:.2f}, angle {psf['angle']:.0f} deg"
        f"{beta}"
    )
    size = report["psf_size"]
    if report["grid"] is None:
        return f"estimated from {estimate.used} stars ({estimate.model}, {shape}, {size}x{size})"
    ny, nx = report["grid"]
    low, high = report["range"]["fwhm"]
    return (
        f"estimated from {estimate.used} stars as a {ny}x{nx} field ({estimate.model}, median "
        f"{shape}, FWHM {low:.2f} to {high:.2f} px across the field, {size}x{size})"
    )


# ---------------------------------------------------------------------------- info
def _info(args) -> int:
    import platform

    import astropy

    from .backend import _cupy_status, available_backends, get_backend

    python = platform.python_version()
    print(f"gpudeconv {__version__}, python {python}, astropy {astropy.__version__}")
    print(f"backends: {', '.join(available_backends())}")
    usable, reason = _cupy_status()
    if not usable:
        print(f"cupy: unavailable: {reason}")
    chosen = get_backend(args.backend)
    print(f"selected backend: {chosen.name}")
    for name in available_backends():
        backend = get_backend(name)
        memory = backend.memory_info()
        libraries = ", ".join(f"{key} {value}" for key, value in backend.versions().items())
        print(f"  {name}: {backend.device_name()}; {libraries}")
        print(
            f"    {memory.kind} memory {memory.free / 2**30:.1f} GiB free "
            f"of {memory.total / 2**30:.1f} GiB"
        )
    return 0


# ---------------------------------------------------------------------------- demo, bench
def _demo(args) -> int:
    from .demo import run_demo

    run_demo(args.outdir, backend=args.backend)
    return 0


def _bench(args) -> int:
    from .bench import run_bench

    run_bench(
        size=args.size, iterations=args.iterations, backend=args.backend, peers=not args.no_peers
    )
    return 0


def _sweep(args) -> int:
    from .sweep import run

    return run(args)


_COMMANDS = {
    "deconvolve": _deconvolve,
    "psf": _psf,
    "sweep": _sweep,
    "info": _info,
    "demo": _demo,
    "bench": _bench,
}


def _show_warning(message, category, filename, lineno, file=None, line=None):
    stream = file or sys.stderr
    if issubclass(category, GpudeconvWarning):
        print(f"gpudeconv: warning: {message}", file=stream)
    else:
        print(
            warnings.formatwarning(message, category, filename, lineno, line), end="", file=stream
        )


class _StderrHandler(logging.StreamHandler):
    """A handler writing to the current ``sys.stderr``, not the one of the first `main` call:
    `main` may run many times in one process (tests, notebooks) with stderr redirected."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _show_log_lines() -> None:
    """Print the library's INFO lines (e.g. why the GPU is not used) as 'gpudeconv: ...'."""
    logger = logging.getLogger("gpudeconv")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 success, 2 user error, 130 Ctrl-C)."""
    warnings.showwarning = _show_warning
    _show_log_lines()
    try:
        args = _build_parser().parse_args(argv)
        return _COMMANDS[args.command](args)
    except GpudeconvError as error:
        from .tiles import TileRunInterrupted

        if isinstance(error, TileRunInterrupted):  # Ctrl-C, as below: the run can go on
            print(f"gpudeconv: {error}", file=sys.stderr)
            return INTERRUPTED
        print(f"gpudeconv: error: {error}", file=sys.stderr)
        return USER_ERROR
    except MemoryError:
        print(
            "gpudeconv: error: out of memory; close other programs, use a machine or GPU with more "
            "memory, or crop the image",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("gpudeconv: interrupted; no output was written", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
