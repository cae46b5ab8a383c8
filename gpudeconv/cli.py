"""The ``gpudeconv`` command: deconvolve, info, demo, bench.

Every user error ends as one line on stderr (what is wrong and what to do) with exit code 2; the
input is never modified and no partial output is left behind (outputs are written atomically).
"""

from __future__ import annotations

import argparse
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
_INTEGER_ONLY = (".png", ".jpg", ".jpeg")  # formats that hold no floating-point pixels


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
        metavar="FILE",
        help="PSF image (FITS/TIFF/PNG, odd sides) or a PSF field FITS (varies across the image)",
    )
    source.add_argument(
        "--psf-fwhm", type=_positive_float, metavar="F", help="model PSF FWHM in pixels"
    )
    run.add_argument(
        "--psf-model",
        choices=("moffat", "gaussian"),
        default=None,
        help="model PSF shape (default moffat; gaussian for planetary/lunar seeing)",
    )
    run.add_argument("--psf-beta", type=float, metavar="B", help="Moffat beta (default 2.5)")
    run.add_argument(
        "--psf-ratio", type=float, default=1.0, metavar="R", help="minor/major FWHM (default 1)"
    )
    run.add_argument(
        "--psf-angle", type=float, default=0.0, metavar="A", help="major axis angle, degrees"
    )
    run.add_argument("--iterations", type=_positive_int, default=30, metavar="N")
    run.add_argument("--method", choices=("rl",), default="rl", help="rl: Richardson-Lucy")
    run.add_argument("--backend", default=None, metavar="{auto,numpy,cupy}")
    run.add_argument("--overwrite", action="store_true", help="replace an existing output")
    run.add_argument("--quiet", action="store_true", help="no progress bar")

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
    return parser


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
    if input_dtype.kind in "ui" and suffix not in (".fits", ".fit", ".fts"):
        return input_dtype
    if suffix in _INTEGER_ONLY:
        msg = (
            f"the input holds floating-point values, which {suffix} cannot store; "
            "write the output as .fits or .tif"
        )
        raise GpudeconvError(msg)
    return result_dtype


def _deconvolve(args) -> int:
    from .backend import get_backend
    from .io import provenance_header, read_image, write_image
    from .restore import richardson_lucy

    input_path, output_path = Path(args.input), Path(args.output)
    backend = get_backend(args.backend)
    _check_output(input_path, output_path, args.overwrite)
    image, header = read_image(input_path)
    channels = image.shape[0] if image.ndim == 3 else None
    if args.psf is not None:
        if args.psf_model or args.psf_beta is not None:
            msg = "--psf-model/--psf-beta describe a model PSF; they cannot go with --psf FILE"
            raise GpudeconvError(msg)
        kernel, psf_text = _file_psf(args.psf, channels, image.shape[-2:])
    else:
        kernel, psf_text = _model_psf(args)
    out_dtype = _output_dtype(output_path, image.dtype, backend.float_dtype(image.dtype))

    start = time.perf_counter()
    restored = richardson_lucy(
        image, kernel, args.iterations, backend=backend, progress=not args.quiet
    )
    elapsed = time.perf_counter() - start
    header = provenance_header(
        header, method=args.method, psf=psf_text, iterations=args.iterations, backend=backend.name
    )
    write_image(output_path, restored, header, dtype=out_dtype, overwrite=args.overwrite)
    if not args.quiet:
        pixels = int(np.prod(image.shape))
        rate = pixels * args.iterations / elapsed / 1e6
        print(
            f"gpudeconv: wrote {output_path} ({args.iterations} iterations on {backend.name}, "
            f"{elapsed:.1f} s, {rate:.1f} MPix*it/s)",
            file=sys.stderr,
        )
    return 0


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


_COMMANDS = {"deconvolve": _deconvolve, "info": _info, "demo": _demo, "bench": _bench}


def _show_warning(message, category, filename, lineno, file=None, line=None):
    stream = file or sys.stderr
    if issubclass(category, GpudeconvWarning):
        print(f"gpudeconv: warning: {message}", file=stream)
    else:
        print(
            warnings.formatwarning(message, category, filename, lineno, line), end="", file=stream
        )


def _show_log_lines() -> None:
    """Print the library's INFO lines (e.g. why the GPU is not used) as 'gpudeconv: ...'."""
    logger = logging.getLogger("gpudeconv")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 success, 2 user error)."""
    warnings.showwarning = _show_warning
    _show_log_lines()
    try:
        args = _build_parser().parse_args(argv)
        return _COMMANDS[args.command](args)
    except GpudeconvError as error:
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
        return 130


if __name__ == "__main__":
    sys.exit(main())
