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

# The tile-by-tile readers and writers at the end of this module serve gpudeconv.tiles and
# gpudeconv.dask; they are importable from here but not part of the package's namespace.
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
    iterations: int | None,
    backend: str,
    extra: dict | None = None,
    steps: str | None = None,
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
    iterations : int or None
        Iterations run; None for a method without iterations (the Wiener filter, the learned
        network), which ``steps`` describes instead.
    backend : str
        Backend used, e.g. ``'cupy'`` or ``'numpy'``.
    extra : dict, optional
        More items, each recorded as ``'gpudeconv <key>: <value>'``.
    steps : str, optional
        What a method without iterations ran, in place of the iteration count, e.g.
        ``'network learned-v1.npz'`` or ``'one filter step'``.

    Returns
    -------
    astropy.io.fits.Header
        The copy, with the lines ``'gpudeconv <version>: <method>, <iterations> iterations,
        backend <backend>'`` (``<steps>`` in place of the iterations when they are None),
        ``'gpudeconv PSF: <psf>'`` and the ``extra`` items appended.

    Notes
    -----
    FITS cards hold printable ASCII only, so other characters are written as backslash escapes
    (``σ`` becomes ``\\u03c3``) and line breaks as spaces. A line longer than a card's 72
    characters is wrapped at spaces over several HISTORY cards; joined with spaces they give
    the line back.
    """
    result = fits.Header() if header is None else header.copy()
    ran = [method, f"{iterations} iterations" if iterations is not None else steps]
    lines = [
        f"gpudeconv {__version__}: {', '.join(filter(None, ran))}, backend {backend}",
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
    try:
        # memmap=None, not True: True makes astropy refuse any image with BZERO/BSCALE/BLANK
        # ("Cannot load a memory-mapped image"), i.e. every uint16 FITS; None memory-maps
        # unscaled data and reads scaled data into memory.
        with fits.open(path, mode="readonly", memmap=None) as hdul:
            hdu = _image_hdu(hdul, path)
            # Copy out of the memmap so the file can close; native byte order.
            stored = hdu.data
            data = np.array(stored, dtype=stored.dtype.newbyteorder("="), copy=True)
            header = hdu.header.copy()
    except GpudeconvError:
        raise
    except _FITS_ERRORS as exc:
        raise _unreadable(path, "FITS", exc) from exc
    return data, header, []


def _image_hdu(hdul, path: Path):
    """The first HDU of ``hdul`` holding image data; one line if there is none."""
    for hdu in hdul:
        if _holds_image(hdu):
            return hdu
    hdu_names = [f"{type(hdu).__name__} {hdu.name!r}" for hdu in hdul]
    msg = (
        f"{path} holds no image data (HDUs: {', '.join(hdu_names)}): give a FITS file with an image"
    )
    raise GpudeconvError(msg)


def _holds_image(hdu) -> bool:
    # From the header alone: touching .data would read (or decompress) every HDU on the way.
    if isinstance(hdu, fits.GroupsHDU) or not hdu.is_image:
        return False
    naxis = hdu.header.get("NAXIS", 0)
    return naxis > 0 and all(hdu.header.get(f"NAXIS{i}", 0) > 0 for i in range(1, naxis + 1))


def _read_tiff(path: Path) -> tuple[np.ndarray, fits.Header, list[str]]:
    try:
        with tifffile.TiffFile(path) as tif:
            series, shape, axes = _tiff_series(tif, path)
            page = series.keyframe
            data = series.asarray().reshape(shape)
            photometric = page.photometric
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


def _tiff_series(tif, path: Path):
    """The first series of ``tif``, its shape and axes without length-1 axes other than Y and
    X; one line for what cannot be read (no image, 1-bit, a palette or CMYK TIFF, a stack)."""
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
    return series, shape, axes


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
    keep = _tiff_colour_samples(data.shape[0], photometric, extrasamples)
    return _keep_channels(data, keep, path, notes)


def _tiff_colour_samples(samples: int, photometric, extrasamples) -> list[int]:
    """Indices of the samples of a TIFF pixel that are colour, not alpha."""
    if photometric == tifffile.PHOTOMETRIC.RGB:
        return [0, 1, 2]
    # Unspecified extra samples of a greyscale image are data channels (tifffile writes a
    # planar (C, H, W) array that way); only samples flagged as alpha go.
    n_grey = samples - len(extrasamples)
    keep = list(range(n_grey))
    keep += [n_grey + i for i, kind in enumerate(extrasamples) if kind not in _TIFF_ALPHA]
    return keep


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


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, as the images are: a temporary file in
    the same folder, flushed, then renamed onto ``path`` (reports, journals' companions)."""
    target = Path(path)
    _write_atomically(target, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return target


def _create_temporary(target: Path) -> Path:
    known = _extension_of(target)
    extension = target.name[-len(known) :] if known else target.suffix
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


# --- tile by tile: windows of images larger than memory ----------------------------------------
#
# The streaming driver (gpudeconv/tiles.py) reads each tile's window from the input and writes
# each tile's core into the output, so that the process never holds the whole mosaic. Resident
# memory counts the file-backed pages of a memory map too (ARCHITECTURE.md, "Tiles and
# streams"): FITS is read through astropy's ``hdu.section`` from a file opened without a memory
# map, TIFF through a memory map opened for one window and dropped after it (or zarr for
# compressed and tiled TIFF), and outputs are written with ``os.pwrite``, which leaves nothing
# mapped.

#: Formats a streamed output can be written in: an uncompressed data block written in place.
TILE_OUTPUT_FORMATS = ("FITS", "TIFF")


def _read_into(fd: int, buffer: np.ndarray, position: int) -> int:
    """Read ``buffer``'s bytes from ``position`` of ``fd``; the bytes read."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [buffer], position)
    os.lseek(fd, position, os.SEEK_SET)  # Windows: no positioned reads (one reader per fd)
    data = os.read(fd, buffer.nbytes)
    memoryview(buffer).cast("B")[: len(data)] = data
    return len(data)


def _write_at(fd: int, data: memoryview, position: int) -> int:
    """Write ``data`` at ``position`` of ``fd``; the bytes written."""
    if hasattr(os, "pwrite"):
        return os.pwrite(fd, data, position)
    os.lseek(fd, position, os.SEEK_SET)  # Windows: no positioned writes (one writer per fd)
    return os.write(fd, data)


class TileReader:
    """Windows of an image, read without reading the rest of it.

    Attributes
    ----------
    path : pathlib.Path or None
        The file read (None for an array).
    shape : (H, W) or (C, H, W) tuple of int
        The image's shape, as `read_image` would return it.
    dtype : numpy.dtype
        The stored (physical) dtype, native byte order.
    header : astropy.io.fits.Header
        As `read_image` returns it.

    Readers pickle by path (for Dask workers) and can be indexed like an array of ``shape``
    (``reader[..., y0:y1, x0:x1]``), which is what ``dask.array.from_array`` asks of them.
    """

    path: Path | None = None
    shape: tuple[int, ...]
    dtype: np.dtype
    header: fits.Header

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def channels(self) -> int:
        """C, the number of channels (1 for a grey image)."""
        return self.shape[0] if len(self.shape) == 3 else 1

    def read(self, window) -> np.ndarray:
        """Rows ``y0:y1`` and columns ``x0:x1`` of every channel, ``window = (y0, y1, x0, x1)``:
        a new ``(C, y1 - y0, x1 - x0)`` array in native byte order and the stored dtype."""
        y0, y1, x0, x1 = (int(v) for v in window)
        return self._read(y0, y1, x0, x1)

    def _read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        raise NotImplementedError

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if any(not isinstance(k, slice) for k in key) or len(key) > self.ndim:
            msg = f"tile readers take slices over the {self.ndim} axes, got {key!r}"
            raise TypeError(msg)
        key = (slice(None),) * (self.ndim - len(key)) + key
        block = self.read(_window_of(key, self.shape))
        return block[key[0]] if self.ndim == 3 else block[0]

    def close(self) -> None:  # noqa: B027  (readers without an open file have nothing to close)
        """Release the file (reading again reopens it)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for name in self._unpicklable:
            state[name] = None
        return state

    _unpicklable: tuple[str, ...] = ()


def _window_of(key: tuple, shape) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)`` of the slices ``key`` over the last two axes of ``shape``."""
    rows = key[-2].indices(shape[-2])
    cols = key[-1].indices(shape[-1])
    if rows[2] != 1 or cols[2] != 1:
        msg = f"tile windows take unit steps, got {key!r}"
        raise TypeError(msg)
    return rows[0], rows[1], cols[0], cols[1]


def open_tile_reader(path: str | os.PathLike) -> TileReader:
    """A :class:`TileReader` for a FITS, TIFF, PNG or JPEG file.

    FITS images (uncompressed, tile-compressed or with BZERO/BSCALE) are read through astropy's
    ``hdu.section`` with no memory map; uncompressed TIFF through a memory map of one window at a
    time; compressed or tiled TIFF through zarr (``tifffile.imread(aszarr=True)``) where it is
    installed. PNG and JPEG cannot be read in parts: they are read whole (they are never mosaics
    of gigapixels).

    Raises
    ------
    GpudeconvError
        As `read_image` for a missing, unsupported or unreadable file; and for a compressed
        or tiled TIFF without zarr.
    """
    path = _validate_input_path(path)
    fmt = _validate_extension(path)
    if fmt == "FITS":
        return FitsTileReader(path)
    if fmt == "TIFF":
        return TiffTileReader(path)
    data, header = read_image(path)
    reader = ArrayTileReader(data, header)
    reader.path = path
    return reader


def _validate_tile_shape(shape: tuple[int, ...], path) -> tuple[int, ...]:
    """``shape`` without leading length-1 axes, checked as `read_image` checks an image."""
    while len(shape) > 2 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) not in (2, 3):
        msg = (
            f"{path} holds a {len(shape)}-D array of shape {shape}: expected a 2-D (H, W) "
            "image or a 3-D (C, H, W) colour cube"
        )
        raise GpudeconvError(msg)
    if min(shape[-2:]) < 2:
        msg = (
            f"{path} is {shape[-2]}x{shape[-1]} pixels: an image needs at least 2 pixels on "
            "each side"
        )
        raise GpudeconvError(msg)
    return tuple(int(n) for n in shape)


def _validate_tile_dtype(dtype: np.dtype, path) -> np.dtype:
    if dtype.kind == "c":
        msg = (
            f"{path} holds complex data ({dtype}); deconvolution needs real intensities: "
            "store the real image"
        )
        raise GpudeconvError(msg)
    if dtype.kind not in "uif":
        msg = f"{path} holds non-numeric data ({dtype}): give a greyscale or colour image"
        raise GpudeconvError(msg)
    return dtype.newbyteorder("=")


class ArrayTileReader(TileReader):
    """Windows of an in-memory (or memory-mapped) ``(H, W)`` or ``(C, H, W)`` array."""

    def __init__(self, array, header: fits.Header | None = None):
        self._array = array
        self.shape = _validate_tile_shape(tuple(array.shape), "the image")
        self.dtype = _validate_tile_dtype(np.dtype(array.dtype), "the image")
        self.header = fits.Header() if header is None else header
        self._planes = np.reshape(array, (-1, *self.shape[-2:]))

    def _read(self, y0, y1, x0, x1):
        window = self._planes[:, y0:y1, x0:x1]
        return np.array(window, dtype=self.dtype, copy=True)


#: FITS BITPIX -> the stored (big-endian) dtype
_FITS_BITPIX = {8: ">u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}


class FitsTileReader(TileReader):
    """Windows of the first image HDU of a FITS file.

    Stored values that are the physical ones (no BZERO, BSCALE or BLANK) of an uncompressed
    file are read with one ``os.preadv`` per row of the window, straight into the array
    returned: nothing is mapped, so no page of the mosaic stays resident (a memory map of the
    window, dropped after it, peaked 30 MB higher on a 12000-pixel-wide mosaic: the kernel maps
    64 KB around each page touched). Anything else (scaled integers, tile-compressed HDUs,
    ``.gz`` files) goes through astropy's ``hdu.section`` on a file opened with
    ``memmap=False``, which applies the scaling and reads row by row through Python (10x
    slower). With astropy's own memory map the pages read would stay resident while the file
    is open: 300 MB after reading every window of a 256 MB image, against 70 MB without.
    """

    _unpicklable = ("_hdul", "_hdu", "_fd")

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._hdul = self._hdu = self._fd = None
        hdu = self._open()
        header = hdu.header
        full = tuple(int(header[f"NAXIS{i}"]) for i in range(int(header["NAXIS"]), 0, -1))
        self.shape = _validate_tile_shape(full, self.path)
        self._lead = (0,) * (len(full) - len(self.shape))
        self.header = header.copy()
        try:
            # a 1x1 window: an index of integers alone gives a Python scalar, not the dtype
            probe = np.asarray(hdu.section[(0,) * (len(full) - 2) + (slice(0, 1),) * 2])
        except _FITS_ERRORS as exc:
            raise _unreadable(self.path, "FITS", exc) from exc
        self.dtype = _validate_tile_dtype(probe.dtype, self.path)
        self._full_shape = full
        self._raw = None  # (offset, stored dtype) where the stored values are the physical ones
        stored = _FITS_BITPIX.get(int(header["BITPIX"]))
        scaled = any(key in header for key in ("BZERO", "BSCALE", "BLANK")) and (
            header.get("BZERO", 0) != 0 or header.get("BSCALE", 1) != 1 or header["BITPIX"] > 0
        )
        compressed = isinstance(hdu, fits.CompImageHDU) or not isinstance(
            hdu, (fits.PrimaryHDU, fits.ImageHDU)
        )
        if stored and not scaled and not compressed and self._hdul._file.compression is None:
            self._raw = (int(hdu.fileinfo()["datLoc"]), np.dtype(stored))
            self.close()

    def _open(self):
        if self._hdu is None:
            try:
                self._hdul = fits.open(self.path, mode="readonly", memmap=False)
                self._hdu = _image_hdu(self._hdul, self.path)
            except GpudeconvError:
                self.close()
                raise
            except _FITS_ERRORS as exc:
                self.close()
                raise _unreadable(self.path, "FITS", exc) from exc
        return self._hdu

    def _read(self, y0, y1, x0, x1):
        key = (*self._lead, *((slice(None),) if len(self.shape) == 3 else ()))
        key = (*key, slice(y0, y1), slice(x0, x1))
        try:
            if self._raw is not None:
                window = self._read_raw(y0, y1, x0, x1)
            else:
                window = np.asarray(self._open().section[key])
                window = np.array(window, dtype=self.dtype, copy=True)
        except _FITS_ERRORS as exc:
            raise _unreadable(self.path, "FITS", exc) from exc
        return window if window.ndim == 3 else window[None]

    def _read_raw(self, y0, y1, x0, x1) -> np.ndarray:
        offset, stored = self._raw
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        height, width = self._full_shape[-2:]
        planes = int(np.prod(self._full_shape[:-2], dtype=np.int64))
        window = np.empty((planes, y1 - y0, x1 - x0), dtype=stored)
        item = stored.itemsize
        row_bytes = (x1 - x0) * item
        for plane in range(planes):
            for y in range(y0, y1):
                row = window[plane, y - y0]
                position = offset + ((plane * height + y) * width + x0) * item
                if _read_into(self._fd, row, position) != row_bytes:
                    msg = f"the data of {self.path} end early (row {y}): the file is truncated"
                    raise OSError(msg)
        return window.astype(self.dtype)  # to native byte order

    def close(self) -> None:
        if self._hdul is not None:
            self._hdul.close()
        if self._fd is not None:
            os.close(self._fd)
        self._hdul = self._hdu = self._fd = None


class TiffTileReader(TileReader):
    """Windows of the first image of a TIFF file.

    Uncompressed, contiguous data is read through ``tifffile.memmap`` opened for one window and
    dropped after it, so that no page of the mosaic stays resident. Compressed or tiled data
    needs zarr (``tifffile.imread(aszarr=True)`` decodes only the strips or tiles a window
    touches); without it the reader refuses in one line.
    """

    _unpicklable = ("_zarr", "_store")

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._zarr = self._store = None
        try:
            with tifffile.TiffFile(self.path) as tif:
                series, shape, axes = _tiff_series(tif, self.path)
                page = series.keyframe
                keep = None
                if "S" in axes:
                    samples = shape[axes.index("S")]
                    keep = _tiff_colour_samples(samples, page.photometric, page.extrasamples)
                    if len(keep) < samples:
                        warnings.warn(
                            f"{self.path}: dropped {samples - len(keep)} alpha channel(s); "
                            "deconvolving transparency makes no sense",
                            GpudeconvWarning,
                            stacklevel=3,
                        )
                self._series_axes = series.axes
                self._series_shape = tuple(series.shape)
                self._mappable = series.dataoffset is not None
                dtype = np.dtype(series.dtype)
                bits = page.bitspersample
        except GpudeconvError:
            raise
        except _TIFF_ERRORS as exc:
            raise _unreadable(self.path, "TIFF", exc) from exc
        self._axes = axes
        self._keep = keep
        height, width = shape[axes.index("Y")], shape[axes.index("X")]
        channels = len(keep) if keep is not None else (shape[0] if len(shape) == 3 else 1)
        image_shape = (channels, height, width) if channels > 1 else (height, width)
        self.shape = _validate_tile_shape(image_shape, self.path)
        self.dtype = _validate_tile_dtype(dtype, self.path)
        self.header = _origin_header("TIFF", bits)
        if not self._mappable:
            try:
                import zarr  # noqa: F401
            except ImportError:
                msg = (
                    f"{self.path} is a compressed or tiled TIFF, which cannot be read tile by "
                    "tile without zarr: pip install zarr, or convert it to FITS or uncompressed "
                    "TIFF"
                )
                raise GpudeconvError(msg) from None

    def _key(self, y0, y1, x0, x1) -> tuple:
        """Index of the window in the series' own axes (length-1 axes other than Y, X: 0)."""
        key = []
        for axis, length in zip(self._series_axes, self._series_shape, strict=True):
            if axis == "Y":
                key.append(slice(y0, y1))
            elif axis == "X":
                key.append(slice(x0, x1))
            else:
                key.append(slice(None) if length > 1 else 0)
        return tuple(key)

    def _read(self, y0, y1, x0, x1):
        key = self._key(y0, y1, x0, x1)
        try:
            if self._mappable:
                mapped = tifffile.memmap(self.path, mode="r", series=0)
                window = np.array(mapped[key], copy=True)
                del mapped  # unmapped now: none of its pages stay resident
            else:
                window = np.asarray(self._open_zarr()[key])
        except _TIFF_ERRORS as exc:
            raise _unreadable(self.path, "TIFF", exc) from exc
        if self._axes == "YXS":
            window = np.moveaxis(window, -1, 0)
        if self._keep is not None:
            window = window[self._keep]
        window = np.array(window, dtype=self.dtype, copy=True)
        return window if window.ndim == 3 else window[None]

    def _open_zarr(self):
        if self._zarr is None:
            import zarr

            self._store = tifffile.imread(self.path, aszarr=True, series=0, level=0)
            self._zarr = zarr.open(self._store, mode="r")
        return self._zarr

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
        self._zarr = self._store = None


class TileWriter:
    """Writes windows of a ``(C, H, W)`` image into the data block of a file made by
    :func:`create_tile_output`, in place, with ``os.pwrite`` (nothing is memory-mapped).

    Parameters
    ----------
    path : path-like
        The file; it exists and has its data block at ``offset``.
    offset : int
        Byte offset of the data block.
    shape : (H, W) or (C, H, W) tuple of int
    dtype : numpy.dtype
        Stored dtype, with its byte order (``'>f4'`` in FITS).
    layout : {'planar', 'interleaved'}
        Channel after channel (FITS, planar TIFF), or channels interleaved in each pixel
        (RGB TIFF).
    """

    def __init__(self, path, *, offset: int, shape, dtype, layout: str = "planar"):
        if layout not in ("planar", "interleaved"):
            msg = f"layout must be 'planar' or 'interleaved', got {layout!r}"
            raise ValueError(msg)
        self.path = Path(path)
        self.offset = int(offset)
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.layout = layout
        self._fd = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def data_bytes(self) -> int:
        """Bytes of the data block."""
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def describe(self) -> dict:
        """What reopens this writer: ``TileWriter(path, **writer.describe())``."""
        return {
            "offset": self.offset,
            "shape": list(self.shape),
            "dtype": self.dtype.str,
            "layout": self.layout,
        }

    def _descriptor(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | getattr(os, "O_BINARY", 0))
        return self._fd

    def write(self, window, block) -> None:
        """Write ``block``, ``(C, y1 - y0, x1 - x0)`` (or 2-D for one channel), at
        ``window = (y0, y1, x0, x1)`` of every channel."""
        y0, y1, x0, x1 = (int(v) for v in window)
        block = np.asarray(block)
        channels = self.shape[0] if self.ndim == 3 else 1
        height, width = self.shape[-2:]
        block = block.reshape(channels, y1 - y0, x1 - x0)
        item = self.dtype.itemsize
        fd = self._descriptor()
        if self.layout == "interleaved":
            rows = np.ascontiguousarray(np.moveaxis(block, 0, -1), dtype=self.dtype)
            runs = [((y * width + x0) * channels * item, rows[y - y0]) for y in range(y0, y1)]
        else:
            planes = np.ascontiguousarray(block, dtype=self.dtype)
            runs = []
            for c in range(channels):
                if x0 == 0 and x1 == width:  # whole rows: one contiguous run per channel
                    runs.append((((c * height + y0) * width) * item, planes[c]))
                    continue
                for y in range(y0, y1):
                    runs.append((((c * height + y) * width + x0) * item, planes[c, y - y0]))
        for position, values in runs:
            data = memoryview(values).cast("B")
            written = 0
            while written < len(data):
                written += _write_at(fd, data[written:], self.offset + position + written)

    def __setitem__(self, key, value) -> None:
        # what dask.array.store asks of a target
        key = key if isinstance(key, tuple) else (key,)
        key = (slice(None),) * (self.ndim - len(key)) + key
        if self.ndim == 3 and key[0].indices(self.shape[0]) != (0, self.shape[0], 1):
            msg = "a TileWriter writes every channel of a window at once"
            raise ValueError(msg)
        # one descriptor per call: Dask workers write through pickled copies of the writer
        try:
            self.write(_window_of(key, self.shape), value)
            self.sync()
        finally:
            self.close()

    def sync(self) -> None:
        """Make what was written durable (``fsync``)."""
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fd"] = None
        return state

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ArrayTileWriter:
    """Writes windows into an ``(H, W)`` or ``(C, H, W)`` array (in memory, or a
    ``numpy.memmap``, flushed by `sync`): the in-memory twin of :class:`TileWriter`."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.shape = tuple(array.shape)
        self._planes = array.reshape(-1, *self.shape[-2:])  # a view: C-contiguous arrays only

    def write(self, window, block) -> None:
        y0, y1, x0, x1 = (int(v) for v in window)
        self._planes[:, y0:y1, x0:x1] = np.reshape(block, (-1, y1 - y0, x1 - x0))

    def sync(self) -> None:
        if isinstance(self.array, np.memmap):
            self.array.flush()

    def close(self) -> None:
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tile_output_format(path: str | os.PathLike) -> str:
    """The format of a streamed output path: 'FITS' or 'TIFF' (uncompressed); one line for
    anything else."""
    path = Path(path)
    fmt = _validate_extension(path)
    if fmt not in TILE_OUTPUT_FORMATS or path.name.lower().endswith(".gz"):
        what = f"gzip-compressed {fmt}" if fmt in TILE_OUTPUT_FORMATS else fmt
        msg = (
            f"a tile-by-tile output is written in place, which {path.name} ({what}) does not "
            "allow: write .fits or .tif, then convert"
        )
        raise GpudeconvError(msg)
    return fmt


def create_tile_output(
    path: str | os.PathLike,
    shape,
    dtype,
    header: fits.Header | None = None,
    *,
    fmt: str,
) -> TileWriter:
    """Create ``path`` as an image file of ``shape`` and float ``dtype`` whose data block is not
    yet written (a sparse file: no pixel is written here), and return its :class:`TileWriter`.

    Parameters
    ----------
    path : path-like
        The file to create (a temporary name: the caller renames it when every tile is in).
    shape : (H, W) or (C, H, W) tuple of int
    dtype : {float32, float64}
    header : astropy.io.fits.Header, optional
        FITS: the cards, less the structural ones, as `write_image` writes them. TIFF: its
        HISTORY as ImageDescription.
    fmt : {'FITS', 'TIFF'}

    Notes
    -----
    FITS: the header (``BITPIX`` -32 or -64, ``NAXISn`` of ``shape``) then a big-endian data
    block padded to 2880 bytes, which the file system leaves unallocated until written. TIFF:
    ``tifffile.memmap`` writes the tags and reserves contiguous data (RGB interleaved, other
    channel counts planar, as `write_image` stores them); the map it returns is dropped at once.
    """
    path = Path(path)
    shape = tuple(int(n) for n in shape)
    dtype = np.dtype(dtype).newbyteorder("=")
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        msg = f"a streamed output is float32 or float64, got {dtype}"
        raise GpudeconvError(msg)
    try:
        if fmt == "FITS":
            head = _fits_header_bytes(header, shape, dtype, path)
            data_bytes = int(np.prod(shape)) * dtype.itemsize
            with open(path, "wb") as file:
                file.write(head)
                file.truncate(len(head) + -(-data_bytes // 2880) * 2880)
            return TileWriter(path, offset=len(head), shape=shape, dtype=dtype.newbyteorder(">"))
        colour = len(shape) == 3
        rgb = colour and shape[0] == 3
        mapped = tifffile.memmap(
            path,
            shape=(*shape[1:], 3) if rgb else shape,
            dtype=dtype,
            photometric="rgb" if rgb else "minisblack",
            planarconfig=("contig" if rgb else "separate") if colour else None,
            description=_history_text(header) or None,
            metadata=None,
            software=f"gpudeconv {__version__}",
        )
        offset, stored = int(mapped.offset), mapped.dtype
        del mapped
        layout = "interleaved" if rgb else "planar"
        return TileWriter(path, offset=offset, shape=shape, dtype=stored, layout=layout)
    except OSError as exc:
        reason = " ".join(str(exc).split())
        msg = f"could not create {path} ({reason}): check free space and permissions"
        raise GpudeconvError(msg) from exc


def _fits_header_bytes(header, shape, dtype: np.dtype, path: Path) -> bytes:
    """The primary header of a FITS image of ``shape`` and float ``dtype`` with ``header``'s
    cards, padded to 2880 bytes, as astropy would write it."""
    hdu = fits.PrimaryHDU(data=np.zeros((1,) * len(shape), dtype=dtype), header=_data_cards(header))
    try:
        # 'fix' repairs what it can of a foreign header, as _write_fits does.
        hdu.verify("fix")
    except fits.VerifyError as exc:
        reason = " ".join(str(exc).split())
        msg = f"the header for {path} has cards that cannot be written ({reason}): fix them"
        raise GpudeconvError(msg) from exc
    for axis, length in enumerate(reversed(shape), start=1):
        hdu.header[f"NAXIS{axis}"] = length
    return hdu.header.tostring().encode("ascii")
