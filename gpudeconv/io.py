"""Reading and writing images: FITS, TIFF, PNG and JPEG.

``read_image`` returns the stored pixels unchanged in value and dtype, grey ``(H, W)`` or
channel-first colour ``(C, H, W)``, with an ``astropy.io.fits.Header``; ``write_image`` writes
such an array atomically (an output appears whole or not at all); ``provenance_header`` records
how an image was restored as HISTORY cards.

Formats and libraries:

- FITS (``.fits``, ``.fit``, ``.fts`` and their ``.gz``): astropy, memory-mapped, first image HDU.
- TIFF (``.tif``, ``.tiff``): tifffile; 8 to 64-bit integers, 16 to 64-bit floats.
- PNG (``.png``) and JPEG (``.jpg``, ``.jpeg``): Pillow; 8 and 16-bit grey PNG, 8-bit colour PNG
  and JPEG.

Pillow 13 can neither write nor read 16 bits per channel in colour (it has no such mode:
``Image.fromarray`` of a ``(H, W, 3)`` uint16 array raises ``TypeError``, and a 16-bit RGB PNG
is decoded to 8-bit 'RGB'). Writing one is therefore refused with a pointer to TIFF or FITS, and
reading one warns that the low byte is lost.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import struct
import textwrap
import warnings
import zlib
from pathlib import Path

import numpy as np
import tifffile
from astropy.io import fits
from PIL import Image, ImageOps, PngImagePlugin

from ._errors import GpudeconvError, GpudeconvWarning
from ._version import __version__

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "check_output_path",
    "provenance_header",
    "read_image",
    "write_image",
]

_FORMAT_OF_EXTENSION = {
    ".fits": "FITS",
    ".fit": "FITS",
    ".fts": "FITS",
    ".fits.gz": "FITS",
    ".fit.gz": "FITS",
    ".fts.gz": "FITS",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
}

#: File name extensions that `read_image` and `write_image` understand (case-insensitive).
SUPPORTED_EXTENSIONS = tuple(_FORMAT_OF_EXTENSION)

# Keywords that describe the layout of the stored array rather than the observation: astropy
# regenerates them for the array actually written, and a stale copy would corrupt the file.
# BLANK goes too: it names a raw integer value of the *input* encoding, which may be a real
# pixel value in the output.
_STRUCTURAL_KEYWORDS = re.compile(
    r"^(SIMPLE|BITPIX|NAXIS\d*|EXTEND|BZERO|BSCALE|BLANK|PCOUNT|GCOUNT|GROUPS|XTENSION"
    r"|CHECKSUM|DATASUM)$"
)

# What each writer accepts; anything else is refused before a file is touched.
_WRITABLE_DTYPES = {
    "FITS": frozenset(np.dtype(t) for t in "u1 i1 i2 u2 i4 u4 i8 u8 f4 f8".split()),
    "TIFF": frozenset(np.dtype(t) for t in "u1 i1 i2 u2 i4 u4 i8 u8 f2 f4 f8".split()),
    "PNG": frozenset(np.dtype(t) for t in "u1 u2".split()),
    "JPEG": frozenset([np.dtype("u1")]),
}

# What the libraries raise for a file they cannot parse (truncated, corrupt, not that format);
# astropy raises TypeError for a truncated data unit, Pillow SyntaxError for a broken PNG.
_FITS_ERRORS = (OSError, ValueError, TypeError, EOFError, IndexError, zlib.error, fits.VerifyError)
_TIFF_ERRORS = (OSError, ValueError, TypeError, EOFError, IndexError, KeyError, struct.error)
_PILLOW_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)

_TIFF_ALPHA = (tifffile.EXTRASAMPLE.ASSOCALPHA, tifffile.EXTRASAMPLE.UNASSALPHA)

# Characters of a HISTORY card's text (80 less the keyword and its padding).
_HISTORY_WIDTH = 72

# A JPEG comment segment holds at most 65533 bytes.
_JPEG_COMMENT_LIMIT = 65000


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, fits.Header]:
    """Read a FITS, TIFF, PNG or JPEG image, keeping the stored values and dtype.

    Parameters
    ----------
    path : str or path-like
        Image file; the format follows the extension (see `SUPPORTED_EXTENSIONS`). It is opened
        read-only.

    Returns
    -------
    data : (H, W) or (C, H, W) ndarray
        The pixels in native byte order and in the stored dtype (uint8, uint16, int16, int32,
        float32, float64, ...): the caller converts, nothing is clipped. Colour is channel-first;
        a leading axis of length 1 is squeezed away. FITS integers with BZERO/BSCALE come back as
        physical values (astropy's scaling; unsigned 16-bit as uint16).
    header : astropy.io.fits.Header
        For FITS, a copy of the image HDU's header, whole. For the other formats, a header with
        ``ORIGFMT`` (the file format) and ``ORIGBITS`` (bits per sample in the file).

    Raises
    ------
    GpudeconvError
        If the file is missing, a folder, of an unsupported type, unreadable, holds no image,
        holds an image that is not 2-D grey or 3-D channel-first, is smaller than 2 pixels on a
        side, holds complex or 1-bit data, or is a multi-page TIFF stack.

    Warns
    -----
    GpudeconvWarning
        When an alpha channel is dropped (deconvolving transparency makes no sense), or when a
        16-bit colour PNG is read at 8 bits per channel.

    Notes
    -----
    FITS is read from the first HDU holding image data: the primary HDU, else the first
    ``ImageHDU`` or ``CompImageHDU``. A TIFF's layout is taken from its axes metadata: ``YXS``
    (samples last) and ``SYX`` (planar) are colour, ``CYX`` (ImageJ/OME channels) too; extra
    samples flagged as alpha are dropped, as is anything past the three samples of an RGB image.
    A JPEG's EXIF orientation is applied, so the image is the one the user sees in a viewer.
    """
    path = _validate_input_path(path)
    fmt = _validate_extension(path)
    # Readers return their warnings so that each is raised here, pointing at the caller.
    if fmt == "FITS":
        data, header, notes = _read_fits(path)
    elif fmt == "TIFF":
        data, header, notes = _read_tiff(path)
    else:
        data, header, notes = _read_pillow(path, fmt)
    data = _validate_image(data, path)
    for note in notes:
        warnings.warn(note, GpudeconvWarning, stacklevel=2)
    return data, header


def write_image(
    path: str | os.PathLike,
    data: np.ndarray,
    header: fits.Header | None = None,
    *,
    dtype=None,
    overwrite: bool = False,
) -> Path:
    """Write an image atomically as FITS, TIFF, PNG or JPEG.

    Parameters
    ----------
    path : str or path-like
        Output file; the format follows the extension (see `SUPPORTED_EXTENSIONS`). Its folder
        must exist and be writable.
    data : (H, W) or (C, H, W) ndarray
        Grey or channel-first colour image. PNG and JPEG take 1 or 3 channels.
    header : astropy.io.fits.Header, optional
        For FITS, its cards are copied into the primary HDU, less the structural ones (SIMPLE,
        BITPIX, NAXIS*, EXTEND, BZERO, BSCALE, BLANK, PCOUNT, GCOUNT, GROUPS, XTENSION, CHECKSUM,
        DATASUM) that astropy regenerates. For the other formats its HISTORY lines are written
        as text: TIFF ImageDescription, PNG ``Description``, JPEG comment.
    dtype : dtype, optional
        Stored dtype. By default FITS and TIFF keep the data's dtype, except that floats are
        written as float32 (float64 on request); PNG is written as uint8 if the data are uint8,
        else uint16; JPEG as uint8. PNG accepts {uint8, uint16} (uint16 only for grey), JPEG
        {uint8}.
    overwrite : bool, optional
        Replace an existing file. Default False: an existing file is an error.

    Returns
    -------
    pathlib.Path
        The path written.

    Raises
    ------
    GpudeconvError
        If the extension is not supported, the file exists and ``overwrite`` is False, the
        folder is missing or not writable, the data are not a real 2-D or 3-D array, the dtype
        does not suit the format, or the file cannot be written (disk full, permission).

    Warns
    -----
    GpudeconvWarning
        When converting to an integer dtype clips pixels outside its range or replaces NaN
        by 0 (each with a count), or when float data within [0, 1] are written as integers
        without rescaling.

    Notes
    -----
    Floats converted to integers are rounded to the nearest integer, then clipped to the
    dtype's range; values are never rescaled. The file is written to a temporary file in the
    target's folder (named ``.<name>.<random>.tmp<ext>``), flushed to disk and renamed onto
    the target with `os.replace`; on any failure the temporary file is removed, so an output
    appears whole or not at all.
    """
    target = Path(path)
    _validate_output_path(target, overwrite=overwrite)
    fmt = _validate_extension(target)
    image = _validate_output_data(data, fmt)
    out_dtype = _validate_output_dtype(dtype, image, fmt)
    image = _convert_dtype(image, out_dtype)
    if fmt == "FITS":
        hdu = fits.PrimaryHDU(data=image, header=_data_cards(header))
        _write_atomically(target, lambda tmp: _write_fits(tmp, hdu, target))
    elif fmt == "TIFF":
        _write_atomically(target, lambda tmp: _write_tiff(tmp, image, header))
    else:
        _write_atomically(target, lambda tmp: _write_pillow(tmp, image, header, fmt))
    return target


def provenance_header(
    header: fits.Header | None,
    *,
    method: str,
    psf,
    iterations: int,
    backend: str,
    extra: dict | None = None,
) -> fits.Header:
    """Return a copy of ``header`` with HISTORY cards saying how the image was restored.

    Parameters
    ----------
    header : astropy.io.fits.Header or None
        The input image's header; it is not modified. None starts from an empty header.
    method : str
        Restoration method, e.g. ``'richardson_lucy'``.
    psf : object
        The PSF, described by its ``str`` (e.g. ``'Moffat fwhm=3.1 beta=2.5'`` or a file name).
    iterations : int
        Iterations run.
    backend : str
        Backend used, e.g. ``'cupy'`` or ``'numpy'``.
    extra : dict, optional
        More items, each recorded as ``'gpudeconv <key>: <value>'``.

    Returns
    -------
    astropy.io.fits.Header
        The copy, with the lines ``'gpudeconv <version>: <method>, <iterations> iterations,
        backend <backend>'``, ``'gpudeconv PSF: <psf>'`` and the ``extra`` items appended.

    Notes
    -----
    FITS cards hold printable ASCII only, so other characters are written as backslash escapes
    (``σ`` becomes ``\\u03c3``) and line breaks as spaces. A line longer than a card's 72
    characters is wrapped at spaces over several HISTORY cards; joined with spaces they give
    the line back.
    """
    result = fits.Header() if header is None else header.copy()
    lines = [
        f"gpudeconv {__version__}: {method}, {iterations} iterations, backend {backend}",
        f"gpudeconv PSF: {psf}",
        *(f"gpudeconv {key}: {value}" for key, value in (extra or {}).items()),
    ]
    for line in lines:
        # Wrapped here at spaces: astropy would cut mid-word at 72 characters and drop the
        # space at the cut, so the lines would not read back as written.
        for part in textwrap.wrap(_printable_ascii(line), _HISTORY_WIDTH, break_on_hyphens=False):
            result.add_history(part)
    return result


# --- validation -----------------------------------------------------------------------------


def _validate_input_path(path) -> Path:
    path = Path(path)
    if path.is_dir():
        msg = f"input {path} is a folder, not an image file: give the path of an image file"
        raise GpudeconvError(msg)
    if not path.exists():
        msg = f"input image {path} does not exist: check the path"
        raise GpudeconvError(msg)
    return path


def _validate_extension(path: Path) -> str:
    """Return the format ('FITS', 'TIFF', 'PNG', 'JPEG') that ``path``'s extension names."""
    extension = _extension_of(path)
    if extension is None:
        suffix = path.suffix or "none"
        msg = (
            f"{path} has an unsupported extension ({suffix}): use one of "
            f"{', '.join(SUPPORTED_EXTENSIONS)}"
        )
        raise GpudeconvError(msg)
    return _FORMAT_OF_EXTENSION[extension]


def _extension_of(path: Path) -> str | None:
    name = path.name.lower()
    for extension in _FORMAT_OF_EXTENSION:
        if name.endswith(extension) and len(name) > len(extension):
            return extension
    return None


def _validate_image(data: np.ndarray, path: Path) -> np.ndarray:
    """Check a freshly read array and bring it to native byte order and (H, W) / (C, H, W)."""
    if data.dtype.kind == "c":
        msg = (
            f"{path} holds complex data ({data.dtype}); deconvolution needs real intensities: "
            "store the real image"
        )
        raise GpudeconvError(msg)
    if data.dtype.kind == "b":
        raise _one_bit(path)
    if data.dtype.kind not in "uif":
        msg = f"{path} holds non-numeric data ({data.dtype}): give a greyscale or colour image"
        raise GpudeconvError(msg)
    while data.ndim > 2 and data.shape[0] == 1:
        data = data[0]
    if data.ndim not in (2, 3):
        msg = (
            f"{path} holds a {data.ndim}-D array of shape {data.shape}: expected a 2-D (H, W) "
            "image or a 3-D (C, H, W) colour cube"
        )
        raise GpudeconvError(msg)
    height, width = data.shape[-2:]
    if height < 2 or width < 2:
        msg = f"{path} is {height}x{width} pixels: an image needs at least 2 pixels on each side"
        raise GpudeconvError(msg)
    if not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))
    return data


def _one_bit(path: Path) -> GpudeconvError:
    msg = (
        f"{path} is a 1-bit (black and white) image, which has no grey levels to deconvolve: "
        "give a greyscale or colour image"
    )
    return GpudeconvError(msg)


def _validate_output_path(target: Path, *, overwrite: bool) -> None:
    if target.is_dir():
        msg = f"output {target} is a folder: give a file name, e.g. {target / 'restored.fits'}"
        raise GpudeconvError(msg)
    if (target.exists() or target.is_symlink()) and not overwrite:
        msg = f"output {target} exists; pass --overwrite to replace it (overwrite=True in Python)"
        raise GpudeconvError(msg)
    folder = target.parent
    if not folder.exists():
        msg = f"output folder {folder} does not exist: choose another output path or create it"
        raise GpudeconvError(msg)
    if not folder.is_dir():
        msg = f"output folder {folder} is not a folder: choose another output path"
        raise GpudeconvError(msg)
    if not os.access(folder, os.W_OK | os.X_OK):
        msg = f"output folder {folder} is not writable: choose another output path"
        raise GpudeconvError(msg)


def check_output_path(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Refuse an output path that :func:`write_image` would refuse, before any work is done.

    Checks the extension, that the path is not a folder, that it does not exist (unless
    ``overwrite``) and that its folder exists and is writable; returns it as a ``Path``.
    """
    target = Path(path)
    _validate_output_path(target, overwrite=overwrite)
    _validate_extension(target)
    return target


def _validate_output_data(data, fmt: str) -> np.ndarray:
    if not isinstance(data, np.ndarray):
        msg = (
            f"data must be a NumPy array, got {type(data).__name__}: convert it first "
            "(e.g. cupy.asnumpy)"
        )
        raise GpudeconvError(msg)
    if data.dtype.kind not in "uif":
        msg = f"data must hold real numbers, got dtype {data.dtype}"
        raise GpudeconvError(msg)
    if data.ndim == 3 and data.shape[0] == 1:
        data = data[0]
    if data.ndim not in (2, 3) or min(data.shape) < 1:
        msg = f"data must be a (H, W) or (C, H, W) image, got shape {data.shape}"
        raise GpudeconvError(msg)
    if fmt in ("PNG", "JPEG") and data.ndim == 3 and data.shape[0] != 3:
        msg = (
            f"{fmt} holds grey or RGB images, got {data.shape[0]} channels: "
            "write TIFF or FITS for other channel counts"
        )
        raise GpudeconvError(msg)
    return data


def _validate_output_dtype(dtype, image: np.ndarray, fmt: str) -> np.dtype:
    if dtype is None:
        if fmt in ("FITS", "TIFF"):
            out = np.dtype(np.float32) if image.dtype.kind == "f" else image.dtype
        elif fmt == "PNG":
            out = np.dtype(np.uint8) if image.dtype == np.uint8 else np.dtype(np.uint16)
        else:
            out = np.dtype(np.uint8)
    else:
        try:
            out = np.dtype(dtype)
        except TypeError as exc:
            msg = f"dtype {dtype!r} is not a NumPy dtype: use e.g. 'float32' or 'uint16'"
            raise GpudeconvError(msg) from exc
    out = out.newbyteorder("=")
    allowed = _WRITABLE_DTYPES[fmt]
    if out not in allowed:
        names = ", ".join(sorted(str(t) for t in allowed))
        msg = f"{fmt} cannot store dtype {out}: use one of {{{names}}}"
        raise GpudeconvError(msg)
    if fmt == "PNG" and out == np.uint16 and image.ndim == 3:
        # Decided by experiment: Pillow 13 has no 16-bit-per-channel colour mode, so
        # Image.fromarray of (H, W, 3) uint16 raises TypeError. Rather than drop 8 bits
        # behind the user's back, point to the formats that keep them.
        msg = (
            "16-bit colour PNG cannot be written (Pillow has no 16-bit RGB mode): write TIFF or "
            "FITS for 16-bit colour, or pass dtype='uint8' for an 8-bit PNG"
        )
        raise GpudeconvError(msg)
    return out


# --- dtype conversion -------------------------------------------------------------------------


def _convert_dtype(image: np.ndarray, out: np.dtype) -> np.ndarray:
    """Convert to ``out``: round, count and clip what does not fit, NaN to 0; never rescale."""
    if image.dtype == out:
        return image
    if out.kind == "f":
        return image.astype(out)
    info = np.iinfo(out)
    if image.dtype.kind == "f":
        # float16 cannot even hold the bounds of uint16 (float16(65535) overflows to inf).
        image = image.astype(np.promote_types(image.dtype, np.float32), copy=False)
        nan = np.isnan(image)
        n_nan = int(np.count_nonzero(nan))
        values = np.rint(image)
        if n_nan:
            values[nan] = 0
            msg = f"{n_nan} NaN pixel(s) written as 0 in the {out} output"
            warnings.warn(msg, GpudeconvWarning, stacklevel=3)
        largest = float(np.max(image, where=np.isfinite(image), initial=-np.inf))
        if 0 < largest <= 1:
            msg = (
                f"the float data lie within [0, 1] but are written as {out} without rescaling, "
                f"so the image will be almost black: multiply by {info.max} first if they are "
                "normalised"
            )
            warnings.warn(msg, GpudeconvWarning, stacklevel=3)
        low, high = _float_bounds(info, values.dtype)
    else:
        values = image
        low, high = info.min, info.max
    n_low = int(np.count_nonzero(values < low))
    n_high = int(np.count_nonzero(values > high))
    if n_low or n_high:
        msg = (
            f"{n_low + n_high} pixel(s) outside the {out} range [{info.min}, {info.max}] clipped "
            f"({n_low} below, {n_high} above): write float32 (FITS or TIFF) to keep them"
        )
        warnings.warn(msg, GpudeconvWarning, stacklevel=3)
        values = np.clip(values, low, high)
    return values.astype(out)


def _float_bounds(info: np.iinfo, dtype: np.dtype) -> tuple[np.floating, np.floating]:
    """The widest range of ``dtype`` floats that cast into the integer type of ``info``."""
    # The float nearest an integer bound may lie beyond it (float32(2**31 - 1) is 2**31, and
    # float16(65535) is inf), and casting it would overflow: step inward to the next float.
    zero = dtype.type(0)
    low, high = dtype.type(info.min), dtype.type(info.max)
    if not np.isfinite(high) or int(high) > info.max:
        high = np.nextafter(high, zero)
    if not np.isfinite(low) or int(low) < info.min:
        low = np.nextafter(low, zero)
    return low, high


# --- readers ------------------------------------------------------------------------------


def _unreadable(path: Path, fmt: str, exc: BaseException) -> GpudeconvError:
    # Library messages may span lines; the CLI prints one.
    reason = " ".join(str(exc).split()) or type(exc).__name__
    msg = f"{path} is not a readable {fmt} file ({reason}): check that it is an image"
    return GpudeconvError(msg)


def _read_fits(path: Path) -> tuple[np.ndarray, fits.Header, list[str]]:
    data = header = None
    try:
        # memmap=None, not True: True makes astropy refuse any image with BZERO/BSCALE/BLANK
        # ("Cannot load a memory-mapped image"), i.e. every uint16 FITS; None memory-maps
        # unscaled data and reads scaled data into memory.
        with fits.open(path, mode="readonly", memmap=None) as hdul:
            hdu_names = [f"{type(hdu).__name__} {hdu.name!r}" for hdu in hdul]
            for hdu in hdul:
                if _holds_image(hdu):
                    # Copy out of the memmap so the file can close; native byte order.
                    stored = hdu.data
                    data = np.array(stored, dtype=stored.dtype.newbyteorder("="), copy=True)
                    header = hdu.header.copy()
                    break
    except _FITS_ERRORS as exc:
        raise _unreadable(path, "FITS", exc) from exc
    if data is None:
        msg = (
            f"{path} holds no image data (HDUs: {', '.join(hdu_names)}): give a FITS file "
            "with an image"
        )
        raise GpudeconvError(msg)
    return data, header, []


def _holds_image(hdu) -> bool:
    # From the header alone: touching .data would read (or decompress) every HDU on the way.
    if isinstance(hdu, fits.GroupsHDU) or not hdu.is_image:
        return False
    naxis = hdu.header.get("NAXIS", 0)
    return naxis > 0 and all(hdu.header.get(f"NAXIS{i}", 0) > 0 for i in range(1, naxis + 1))


def _read_tiff(path: Path) -> tuple[np.ndarray, fits.Header, list[str]]:
    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                msg = f"{path} holds no image: give a TIFF file with an image"
                raise GpudeconvError(msg)
            series = tif.series[0]
            page = series.keyframe
            shape, axes = _tiff_layout(series, path)
            if page.bitspersample == 1:
                raise _one_bit(path)
            photometric = page.photometric
            if photometric not in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.RGB):
                msg = (
                    f"{path} is a {photometric.name} TIFF, which is not supported: save it as "
                    "greyscale or RGB"
                )
                raise GpudeconvError(msg)
            data = series.asarray().reshape(shape)
            extrasamples = tuple(page.extrasamples)
            bits = page.bitspersample
    except GpudeconvError:
        raise
    except _TIFF_ERRORS as exc:
        raise _unreadable(path, "TIFF", exc) from exc
    notes = []
    if axes == "YXS":
        data = np.moveaxis(data, -1, 0)
    if "S" in axes:
        data = _drop_extra_samples(data, photometric, extrasamples, path, notes)
    return data, _origin_header("TIFF", bits), notes


def _tiff_layout(series, path: Path) -> tuple[tuple[int, ...], str]:
    """Shape and axes of ``series`` without length-1 axes other than Y and X."""
    kept = [(n, a) for n, a in zip(series.shape, series.axes, strict=True) if a in "YX" or n > 1]
    shape = tuple(n for n, _ in kept)
    axes = "".join(a for _, a in kept)
    if axes not in ("YX", "YXS", "SYX", "CYX"):
        msg = (
            f"{path} is a multi-page TIFF stack (axes {series.axes!r}, shape {series.shape}), "
            "not one grey or colour image: save each image as its own file"
        )
        raise GpudeconvError(msg)
    return shape, axes


def _drop_extra_samples(data, photometric, extrasamples, path: Path, notes) -> np.ndarray:
    """Keep the colour samples of a channel-first TIFF; drop alpha with a warning."""
    if photometric == tifffile.PHOTOMETRIC.RGB:
        keep = [0, 1, 2]
    else:
        # Unspecified extra samples of a greyscale image are data channels (tifffile writes a
        # planar (C, H, W) array that way); only samples flagged as alpha go.
        n_grey = data.shape[0] - len(extrasamples)
        keep = list(range(n_grey))
        keep += [n_grey + i for i, kind in enumerate(extrasamples) if kind not in _TIFF_ALPHA]
    return _keep_channels(data, keep, path, notes)


def _keep_channels(data: np.ndarray, keep: list[int], path: Path, notes: list[str]) -> np.ndarray:
    """Channels ``keep`` of channel-first ``data``, squeezed if one; a note for any dropped."""
    if len(keep) < data.shape[0]:
        notes.append(
            f"{path}: dropped {data.shape[0] - len(keep)} alpha channel(s); deconvolving "
            "transparency makes no sense"
        )
        data = data[keep]
    return data[0] if data.shape[0] == 1 else data


# Pillow modes read through a conversion to a mode below.
_PILLOW_CONVERSIONS = {
    "PA": "RGBA",
    "CMYK": "RGB",
    "YCbCr": "RGB",
    "RGBX": "RGB",
    "RGBa": "RGBA",
    "La": "LA",
    "LAB": "RGB",
    "HSV": "RGB",
}
# Number of colour channels of each mode read as is; anything past them is alpha.
_PILLOW_COLOUR_CHANNELS = {
    "L": 1,
    "LA": 1,
    "RGB": 3,
    "RGBA": 3,
    "I": 1,
    "F": 1,
    "I;16": 1,
    "I;16L": 1,
    "I;16B": 1,
    "I;16N": 1,
}


def _read_pillow(path: Path, fmt: str) -> tuple[np.ndarray, fits.Header, list[str]]:
    try:
        with Image.open(path) as opened:
            # Pillow identifies by content: a JPEG named .png is still read, as JPEG.
            fmt = opened.format or fmt
            # A camera JPEG may be stored sideways with an EXIF orientation; apply it so the
            # result matches what the user sees (the output carries no EXIF to undo it).
            im = ImageOps.exif_transpose(opened)
            if im.mode == "1":
                raise _one_bit(path)
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode in _PILLOW_CONVERSIONS:
                im = im.convert(_PILLOW_CONVERSIONS[im.mode])
            if im.mode not in _PILLOW_COLOUR_CHANNELS:
                msg = f"{path} has colour mode {im.mode!r}, which is not supported: save it as RGB"
                raise GpudeconvError(msg)
            mode = im.mode
            data = np.array(im)
    except GpudeconvError:
        raise
    except _PILLOW_ERRORS as exc:
        raise _unreadable(path, fmt, exc) from exc
    notes = []
    bits = 8 * data.dtype.itemsize
    if fmt == "PNG":
        bits, colour_type = _png_ihdr(path)
        if bits == 16 and colour_type in (2, 4, 6):
            notes.append(
                f"{path} is a 16-bit colour PNG, which Pillow reads at 8 bits per channel: the "
                "low byte is lost; convert it to 16-bit TIFF or FITS to keep full precision"
            )
    if mode == "I" and data.size and data.min() >= 0 and data.max() <= np.iinfo(np.uint16).max:
        # Older Pillow decodes 16-bit grey PNG as 32-bit 'I'; the values are 16-bit.
        data = data.astype(np.uint16)
    if data.ndim == 3:
        colour = list(range(_PILLOW_COLOUR_CHANNELS[mode]))
        data = _keep_channels(np.moveaxis(data, -1, 0), colour, path, notes)
    return data, _origin_header(fmt, bits), notes


def _png_ihdr(path: Path) -> tuple[int, int]:
    """Bit depth and colour type from a PNG's IHDR chunk (PNG spec, section 11.2.2)."""
    with open(path, "rb") as file:
        head = file.read(26)
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return 8, 0
    return head[24], head[25]


def _origin_header(fmt: str, bits: int) -> fits.Header:
    header = fits.Header()
    header["ORIGFMT"] = (fmt, "format of the file read")
    header["ORIGBITS"] = (int(bits), "bits per sample in the file read")
    return header


# --- writers ------------------------------------------------------------------------------


def _write_atomically(target: Path, write) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``target``, then rename it onto ``target``."""
    tmp = _create_temporary(target)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            reason = " ".join(str(exc).split())
            msg = f"could not write {target} ({reason}): check free space and permissions"
            raise GpudeconvError(msg) from exc
        raise
    # Make the rename itself durable; not every platform lets a folder be opened.
    with contextlib.suppress(OSError):
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _create_temporary(target: Path) -> Path:
    extension = target.name[-len(_extension_of(target)) :]
    for _ in range(100):
        # Same folder (so os.replace is a rename), hidden, and ending in the target's extension
        # so that the libraries pick the same format (astropy compresses '.fits.gz').
        tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp{extension}"
        try:
            # O_EXCL: never clobber a file; 0o666 so the umask applies as for any new file
            # (tempfile.mkstemp would leave the output readable by its owner only).
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        except PermissionError as exc:
            msg = f"output folder {target.parent} is not writable: choose another output path"
            raise GpudeconvError(msg) from exc
        os.close(fd)
        return tmp
    msg = f"could not create a temporary file in {target.parent}: choose another output path"
    raise GpudeconvError(msg)


def _fsync(path: Path) -> None:
    # Reopened read-write: Windows cannot flush a read-only handle.
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _data_cards(header: fits.Header | None) -> fits.Header:
    """Copy of ``header`` without the structural keywords astropy regenerates."""
    cards = fits.Header() if header is None else header.copy()
    for keyword in set(cards.keys()):
        if _STRUCTURAL_KEYWORDS.match(keyword):
            cards.remove(keyword, ignore_missing=True, remove_all=True)
    return cards


def _write_fits(tmp: Path, hdu: fits.PrimaryHDU, target: Path) -> None:
    try:
        # 'fix' repairs what it can of a foreign header and says so in an astropy warning.
        hdu.writeto(tmp, overwrite=True, output_verify="fix")
    except fits.VerifyError as exc:
        reason = " ".join(str(exc).split())
        msg = f"the header for {target} has cards that cannot be written ({reason}): fix them"
        raise GpudeconvError(msg) from exc


def _history_text(header: fits.Header | None) -> str:
    if header is None or "HISTORY" not in header:
        return ""
    return "\n".join(str(line) for line in header["HISTORY"])


def _write_tiff(tmp: Path, image: np.ndarray, header: fits.Header | None) -> None:
    if image.ndim == 3 and image.shape[0] == 3:
        array, photometric, planar = np.moveaxis(image, 0, -1), "rgb", "contig"
    elif image.ndim == 3:
        # Not RGB: one page holding C greyscale samples stored plane by plane, read back as
        # (C, H, W) through its 'SYX' axes.
        array, photometric, planar = image, "minisblack", "separate"
    else:
        array, photometric, planar = image, "minisblack", None
    tifffile.imwrite(
        tmp,
        np.ascontiguousarray(array),
        photometric=photometric,
        planarconfig=planar,
        description=_history_text(header) or None,
        # metadata=None: no tifffile JSON description, so ours is the ImageDescription.
        metadata=None,
        software=f"gpudeconv {__version__}",
    )


def _write_pillow(tmp: Path, image: np.ndarray, header: fits.Header | None, fmt: str) -> None:
    array = np.moveaxis(image, 0, -1) if image.ndim == 3 else image
    picture = Image.fromarray(np.ascontiguousarray(array))
    text = _history_text(header)
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("Software", f"gpudeconv {__version__}")
        if text:
            info.add_text("Description", text)
        picture.save(tmp, format="PNG", pnginfo=info)
    else:
        # Quality 95 without chroma subsampling: the defaults (75, 4:2:0) smear star colours.
        options = {"quality": 95, "subsampling": 0}
        if text:
            options["comment"] = text.encode("ascii", "backslashreplace")[-_JPEG_COMMENT_LIMIT:]
        picture.save(tmp, format="JPEG", **options)


def _printable_ascii(text: str) -> str:
    text = " ".join(text.splitlines())
    return text.encode("ascii", "backslashreplace").decode("ascii")
