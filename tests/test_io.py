"""Tests of gpudeconv.io: round trips per format, errors, warnings and atomic writes."""

import hashlib
import os
import stat
import struct
import warnings
import zlib

import numpy as np
import pytest
import tifffile
from astropy.io import fits
from PIL import Image

from gpudeconv import io as gio
from gpudeconv._errors import GpudeconvError, GpudeconvWarning
from gpudeconv._version import __version__
from gpudeconv.io import SUPPORTED_EXTENSIONS, provenance_header, read_image, write_image

SHAPE = (64, 80)


def star_field(shape=SHAPE, *, seed=0, peak=5000.0, sky=300.0):
    """A float32 star field: sky, Gaussian stars of various brightness and Poisson-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.indices(shape[-2:], dtype=np.float32)
    image = np.full(shape[-2:], sky, np.float32)
    for _ in range(25):
        cy, cx = rng.uniform(0, shape[-2]), rng.uniform(0, shape[-1])
        sigma = rng.uniform(0.8, 2.5)
        image += peak * rng.uniform(0.05, 1) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / sigma**2)
    image += rng.normal(0, np.sqrt(image)).astype(np.float32)
    return image.astype(np.float32)


def colour_field(shape=SHAPE, **kwargs):
    """Three different channels, so that a swapped or transposed axis shows."""
    base = star_field(shape, **kwargs)
    return np.stack([base, 0.6 * base + 50, 0.3 * base[::-1] + 20]).astype(np.float32)


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_png16(path, pixels):
    """A 16-bit colour PNG, which Pillow cannot write: filter 0 rows, one IDAT (PNG spec)."""
    height, width, channels = pixels.shape
    colour_type = {2: 4, 3: 2, 4: 6}[channels]
    rows = b"".join(b"\x00" + pixels[i].astype(">u2").tobytes() for i in range(height))

    def chunk(kind, body):
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# --- FITS --------------------------------------------------------------------------------------


def test_fits_float32_grey_round_trip(tmp_path, no_warnings):
    image = star_field()
    path = write_image(tmp_path / "grey.fits", image)
    assert fits.getheader(path)["BITPIX"] == -32
    data, header = read_image(path)
    assert data.dtype == np.float32 and data.dtype.isnative  # FITS stores big-endian
    np.testing.assert_array_equal(data, image)
    assert header["NAXIS1"] == SHAPE[1] and header["NAXIS2"] == SHAPE[0]


def test_fits_float64_written_as_float32_unless_asked(tmp_path):
    image = star_field().astype(np.float64)
    default = write_image(tmp_path / "default.fits", image)
    wide = write_image(tmp_path / "wide.fits", image, dtype=np.float64)
    assert read_image(default)[0].dtype == np.float32
    assert read_image(wide)[0].dtype == np.float64
    assert fits.getheader(wide)["BITPIX"] == -64


def test_fits_cube_stays_channel_first(tmp_path):
    cube = colour_field()
    path = write_image(tmp_path / "cube.fits", cube)
    assert fits.getheader(path)["NAXIS3"] == 3
    data, _ = read_image(path)
    assert data.shape == (3, *SHAPE)
    np.testing.assert_array_equal(data, cube)


def test_fits_gz_round_trip(tmp_path):
    image = star_field()
    path = write_image(tmp_path / "grey.fits.gz", image)
    assert path.read_bytes()[:2] == b"\x1f\x8b"  # gzip, as the extension says
    np.testing.assert_array_equal(read_image(path)[0], image)


def test_fits_leading_singleton_axis_squeezed(tmp_path):
    image = star_field()
    fits.PrimaryHDU(image[np.newaxis]).writeto(tmp_path / "one.fits")
    data, _ = read_image(tmp_path / "one.fits")
    assert data.shape == SHAPE
    np.testing.assert_array_equal(data, image)


def test_fits_bscale_bzero_give_physical_values(tmp_path):
    rng = np.random.default_rng(1)
    raw = rng.integers(-3000, 3000, SHAPE, dtype=np.int16)
    hdu = fits.PrimaryHDU(raw)
    hdu.header["BSCALE"] = 2.0
    hdu.header["BZERO"] = 100.0
    hdu.writeto(tmp_path / "scaled.fits")
    stored = fits.getdata(tmp_path / "scaled.fits", do_not_scale_image_data=True)
    np.testing.assert_array_equal(stored, raw)  # the fixture really stores scaled integers
    data, _ = read_image(tmp_path / "scaled.fits")
    np.testing.assert_allclose(data, raw * 2.0 + 100.0)


def test_fits_uint16_round_trip_through_bzero(tmp_path, no_warnings):
    rng = np.random.default_rng(2)
    image = rng.integers(0, 65536, SHAPE, dtype=np.uint16)
    image[0, 0], image[0, 1] = 0, 65535
    path = write_image(tmp_path / "u16.fits", image)
    header = fits.getheader(path)
    assert header["BITPIX"] == 16 and header["BZERO"] == 32768
    data, _ = read_image(path)
    assert data.dtype == np.uint16
    np.testing.assert_array_equal(data, image)


def test_fits_first_image_extension_read_when_primary_empty(tmp_path):
    image = star_field()
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(image, name="SCI")]).writeto(
        tmp_path / "ext.fits"
    )
    data, header = read_image(tmp_path / "ext.fits")
    np.testing.assert_array_equal(data, image)
    assert header["EXTNAME"] == "SCI"


def test_fits_compressed_image_read(tmp_path):
    counts = star_field().astype(np.int32)
    compressed = fits.CompImageHDU(counts, compression_type="RICE_1")
    fits.HDUList([fits.PrimaryHDU(), compressed]).writeto(tmp_path / "rice.fits")
    data, _ = read_image(tmp_path / "rice.fits")
    np.testing.assert_array_equal(data, counts)


def test_fits_header_cards_kept_and_history_written(tmp_path):
    source = fits.Header()
    source["OBJECT"] = ("M51", "target")
    source["EXPTIME"] = 300.0
    source["LONGSTR"] = "a long string value " * 8  # needs CONTINUE cards
    # Structural cards of some uint16 input: copied blindly they would shift the float output.
    source["BITPIX"], source["NAXIS"], source["BZERO"], source["BSCALE"] = 16, 3, 32768, 1
    source["BLANK"] = -32768
    psf = "Moffat fwhm=3.1 beta=2.5 from stars " + ", ".join(f"({i}, {2 * i})" for i in range(30))
    header = provenance_header(
        source,
        method="richardson_lucy",
        psf=psf,
        iterations=30,
        backend="numpy",
        extra={"tile": 512},
    )
    image = star_field()
    path = write_image(tmp_path / "out.fits", image, header)

    data, read = read_image(path)
    np.testing.assert_array_equal(data, image)
    assert read["OBJECT"] == "M51" and read.comments["OBJECT"] == "target"
    assert read["EXPTIME"] == 300.0 and read["LONGSTR"] == source["LONGSTR"]
    assert "BZERO" not in read and "BLANK" not in read and read["NAXIS"] == 2
    history = [str(line) for line in read["HISTORY"]]
    assert history[0] == f"gpudeconv {__version__}: richardson_lucy, 30 iterations, backend numpy"
    # The long PSF line is wrapped at spaces over several cards; joined they give it back.
    assert len(history) > 3 and " ".join(history[1:-1]) == f"gpudeconv PSF: {psf}"
    assert all(len(line) <= 72 for line in history)
    assert history[-1] == "gpudeconv tile: 512"
    with open(path, "rb") as file:
        assert len(file.read()) % 2880 == 0  # a valid FITS layout: whole 2880-byte blocks


def test_provenance_header_copies_and_escapes():
    source = fits.Header({"OBJECT": "M51"})
    header = provenance_header(
        source, method="rl", psf="Gaussian σ=1.2\nfrom stars", iterations=10, backend="cupy"
    )
    assert "HISTORY" not in source  # the input is not modified
    assert header["OBJECT"] == "M51"
    assert list(header["HISTORY"])[1] == "gpudeconv PSF: Gaussian \\u03c3=1.2 from stars"
    fresh = provenance_header(None, method="rl", psf="p", iterations=1, backend="numpy")
    assert list(fresh["HISTORY"]) == [
        f"gpudeconv {__version__}: rl, 1 iterations, backend numpy",
        "gpudeconv PSF: p",
    ]
    assert all(len(card.image) == 80 for card in header.cards)


# --- TIFF --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_tiff_grey_round_trip(tmp_path, dtype, no_warnings):
    image = star_field(peak=200.0, sky=20.0) if dtype == np.uint8 else star_field()
    image = np.clip(image, 0, None).round().astype(dtype) if dtype != np.float32 else image
    path = write_image(tmp_path / "grey.tif", image)
    data, header = read_image(path)
    assert data.dtype == dtype and data.shape == SHAPE
    np.testing.assert_array_equal(data, image)
    assert header["ORIGFMT"] == "TIFF" and header["ORIGBITS"] == 8 * np.dtype(dtype).itemsize


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_tiff_rgb_written_samples_last_read_channel_first(tmp_path, dtype):
    cube = colour_field().astype(dtype)
    path = write_image(tmp_path / "rgb.tiff", cube)
    with tifffile.TiffFile(path) as tif:
        assert tif.series[0].axes == "YXS"
        assert tif.pages[0].photometric == tifffile.PHOTOMETRIC.RGB
        np.testing.assert_array_equal(tif.asarray(), np.moveaxis(cube, 0, -1))
    data, _ = read_image(path)
    np.testing.assert_array_equal(data, cube)


def test_tiff_planar_rgb_read_channel_first(tmp_path):
    cube = colour_field().astype(np.uint16)
    tifffile.imwrite(tmp_path / "planar.tif", cube, photometric="rgb", planarconfig="separate")
    data, _ = read_image(tmp_path / "planar.tif")
    np.testing.assert_array_equal(data, cube)


def test_tiff_rgba_alpha_dropped_with_warning(tmp_path):
    cube = colour_field().astype(np.uint16)
    alpha = np.full(SHAPE, 65535, np.uint16)
    tifffile.imwrite(tmp_path / "rgba.tif", np.dstack([*cube, alpha]), photometric="rgb")
    with pytest.warns(GpudeconvWarning, match="dropped 1 alpha channel"):
        data, _ = read_image(tmp_path / "rgba.tif")
    np.testing.assert_array_equal(data, cube)


def test_tiff_grey_alpha_dropped_with_warning(tmp_path):
    grey = star_field().astype(np.uint16)
    pixels = np.dstack([grey, np.full(SHAPE, 65535, np.uint16)])
    tifffile.imwrite(
        tmp_path / "la.tif", pixels, photometric="minisblack", extrasamples=["unassalpha"]
    )
    with pytest.warns(GpudeconvWarning, match="alpha"):
        data, _ = read_image(tmp_path / "la.tif")
    np.testing.assert_array_equal(data, grey)


def test_tiff_five_channels_round_trip_planar(tmp_path, no_warnings):
    cube = np.stack([star_field(seed=s) for s in range(5)])
    path = write_image(tmp_path / "five.tif", cube)
    data, _ = read_image(path)
    np.testing.assert_array_equal(data, cube)


def test_tiff_imagej_channels_read_channel_first(tmp_path):
    cube = colour_field()
    tifffile.imwrite(tmp_path / "hyper.tif", cube, imagej=True, metadata={"axes": "CYX"})
    data, _ = read_image(tmp_path / "hyper.tif")
    np.testing.assert_array_equal(data, cube)


def test_history_written_as_text_in_tiff_png_jpeg(tmp_path):
    header = provenance_header(
        None, method="richardson_lucy", psf="Moffat fwhm=3", iterations=20, backend="numpy"
    )
    history = [str(line) for line in header["HISTORY"]]
    image = np.clip(star_field() / 25, 0, 255)
    with tifffile.TiffFile(write_image(tmp_path / "hist.tif", image, header)) as tif:
        assert tif.pages[0].description.splitlines() == history
    with Image.open(write_image(tmp_path / "hist.png", image, header)) as png:
        assert png.text["Description"].splitlines() == history
    with Image.open(write_image(tmp_path / "hist.jpg", image, header)) as jpeg:
        assert jpeg.info["comment"].decode().splitlines() == history


# --- PNG and JPEG ------------------------------------------------------------------------------


def test_png_8bit_grey_round_trip(tmp_path, no_warnings):
    image = np.clip(star_field(peak=200.0, sky=20.0), 0, 255).round().astype(np.uint8)
    path = write_image(tmp_path / "grey.png", image)
    with Image.open(path) as written:
        assert written.mode == "L"
    data, header = read_image(path)
    assert data.dtype == np.uint8
    np.testing.assert_array_equal(data, image)
    assert header["ORIGFMT"] == "PNG" and header["ORIGBITS"] == 8


def test_png_8bit_rgb_round_trip(tmp_path):
    cube = np.clip(colour_field(peak=200.0, sky=20.0), 0, 255).round().astype(np.uint8)
    path = write_image(tmp_path / "rgb.png", cube)
    with Image.open(path) as written:
        assert written.mode == "RGB"
    data, _ = read_image(path)
    np.testing.assert_array_equal(data, cube)


def test_png_16bit_grey_round_trip_from_float(tmp_path, no_warnings):
    image = star_field()
    path = write_image(tmp_path / "grey16.png", image)  # float data: uint16 by default
    data, header = read_image(path)
    assert data.dtype == np.uint16 and header["ORIGBITS"] == 16
    np.testing.assert_array_equal(data, np.rint(image).astype(np.uint16))


def test_png_16bit_rgb_refused_8bit_on_request(tmp_path):
    cube = colour_field()
    with pytest.raises(GpudeconvError, match="16-bit colour PNG cannot be written.*TIFF or FITS"):
        write_image(tmp_path / "rgb16.png", cube)
    assert not (tmp_path / "rgb16.png").exists()
    small = np.clip(cube / 40, 0, 255)
    data, _ = read_image(write_image(tmp_path / "rgb8.png", small, dtype="uint8"))
    np.testing.assert_array_equal(data, np.rint(small).astype(np.uint8))


def test_png_16bit_rgb_read_warns_low_byte_lost(tmp_path):
    pixels = np.moveaxis(colour_field(), 0, -1).round().astype(np.uint16)
    write_png16(tmp_path / "rgb16.png", pixels)
    with pytest.warns(GpudeconvWarning, match="16-bit colour PNG.*low byte is lost"):
        data, header = read_image(tmp_path / "rgb16.png")
    assert header["ORIGBITS"] == 16
    np.testing.assert_array_equal(data, np.moveaxis(pixels >> 8, -1, 0))


def test_png_rgba_and_grey_alpha_dropped_with_warning(tmp_path):
    cube = np.clip(colour_field(peak=200.0, sky=20.0), 0, 255).astype(np.uint8)
    alpha = np.full(SHAPE, 128, np.uint8)
    Image.fromarray(np.dstack([*cube, alpha])).save(tmp_path / "rgba.png")
    Image.fromarray(np.dstack([cube[0], alpha])).save(tmp_path / "la.png")
    with pytest.warns(GpudeconvWarning, match="alpha"):
        rgb, _ = read_image(tmp_path / "rgba.png")
    with pytest.warns(GpudeconvWarning, match="alpha"):
        grey, _ = read_image(tmp_path / "la.png")
    np.testing.assert_array_equal(rgb, cube)
    np.testing.assert_array_equal(grey, cube[0])


def test_png_palette_read_as_rgb(tmp_path):
    cube = np.clip(colour_field(peak=200.0, sky=20.0), 0, 255).astype(np.uint8)
    palette = Image.fromarray(np.moveaxis(cube, 0, -1)).quantize(colors=64)
    palette.save(tmp_path / "palette.png")
    data, _ = read_image(tmp_path / "palette.png")
    expected = np.moveaxis(np.array(palette.convert("RGB")), -1, 0)
    assert data.shape == (3, *SHAPE)
    np.testing.assert_array_equal(data, expected)


def test_jpeg_exif_orientation_applied(tmp_path):
    image = np.clip(star_field() / 25, 0, 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: viewers rotate it 90 degrees clockwise
    Image.fromarray(image).save(tmp_path / "camera.jpg", exif=exif, quality=95)
    data, _ = read_image(tmp_path / "camera.jpg")
    assert data.shape == SHAPE[::-1]
    assert np.abs(data.astype(float) - np.rot90(image, -1)).mean() < 3.0


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_8bit_round_trip_approximately(tmp_path, channels, no_warnings):
    image = np.clip(colour_field(peak=200.0, sky=20.0), 0, 255)[:channels]
    path = write_image(tmp_path / "out.jpg", image)
    data, header = read_image(path)
    expected = np.rint(image if channels == 3 else image[0])
    assert data.dtype == np.uint8 and data.shape == expected.shape
    assert np.abs(data - expected).mean() < 3.0  # quality 95, no chroma subsampling
    assert header["ORIGFMT"] == "JPEG"


# --- write: atomicity, overwrite, folders --------------------------------------------------------


@pytest.mark.parametrize("name", ["out.fits", "out.fits.gz", "out.tif", "out.png", "out.jpg"])
def test_write_leaves_only_the_target(tmp_path, name):
    write_image(tmp_path / name, np.clip(star_field(), 0, 255))
    assert os.listdir(tmp_path) == [name]


def test_write_uses_hidden_temporary_with_same_extension(tmp_path, monkeypatch):
    seen = []
    real = tifffile.imwrite

    def spy(file, *args, **kwargs):
        seen.append(file)
        return real(file, *args, **kwargs)

    monkeypatch.setattr(gio.tifffile, "imwrite", spy)
    write_image(tmp_path / "out.tiff", star_field())
    (tmp,) = seen
    assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.name.endswith(".tiff")


def test_failed_write_leaves_nothing_and_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "out.tif"
    target.write_bytes(b"previous result")

    def half_written(file, *args, **kwargs):
        with open(file, "wb") as handle:
            handle.write(b"II*\x00 partial")
        raise RuntimeError("writer crashed midway")

    monkeypatch.setattr(gio.tifffile, "imwrite", half_written)
    with pytest.raises(RuntimeError, match="crashed midway"):
        write_image(target, star_field(), overwrite=True)
    assert target.read_bytes() == b"previous result"
    assert os.listdir(tmp_path) == ["out.tif"]

    target.unlink()
    with pytest.raises(RuntimeError):
        write_image(target, star_field())
    assert os.listdir(tmp_path) == []


def test_disk_error_becomes_user_error_and_leaves_nothing(tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fits.PrimaryHDU, "writeto", disk_full)
    with pytest.raises(GpudeconvError, match=r"could not write .*out\.fits.*No space left"):
        write_image(tmp_path / "out.fits", star_field())
    assert os.listdir(tmp_path) == []


def test_existing_output_refused_then_replaced_with_overwrite(tmp_path):
    target = write_image(tmp_path / "out.fits", star_field(seed=1))
    before = sha256(target)
    with pytest.raises(GpudeconvError, match="exists; pass --overwrite to replace it"):
        write_image(target, star_field(seed=2))
    assert sha256(target) == before
    write_image(target, star_field(seed=2), overwrite=True)
    np.testing.assert_array_equal(read_image(target)[0], star_field(seed=2))


def test_output_permissions_follow_umask(tmp_path):
    mask = os.umask(0o022)
    try:
        target = write_image(tmp_path / "out.fits", star_field())
    finally:
        os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_output_folder_missing_or_a_file(tmp_path):
    with pytest.raises(GpudeconvError, match=r"folder .*nowhere does not exist: choose another"):
        write_image(tmp_path / "nowhere" / "out.fits", star_field())
    (tmp_path / "plain.txt").write_text("not a folder")
    with pytest.raises(GpudeconvError, match=r"plain\.txt is not a folder: choose another"):
        write_image(tmp_path / "plain.txt" / "out.fits", star_field())
    with pytest.raises(GpudeconvError, match="is a folder"):
        write_image(tmp_path, star_field())


def test_permission_denied_on_create_is_user_error(tmp_path, monkeypatch):
    # The os.access check can pass where creating fails (ACLs, read-only mounts, root squash).
    real_open = os.open

    def denied(path, *args, **kwargs):
        if os.path.dirname(path) == str(tmp_path):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(gio.os, "open", denied)
    with pytest.raises(GpudeconvError, match="is not writable: choose another output path"):
        write_image(tmp_path / "out.fits", star_field())
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permission bits")
def test_output_folder_not_writable(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(GpudeconvError, match="locked is not writable: choose another"):
            write_image(locked / "out.fits", star_field())
    finally:
        locked.chmod(0o700)


# --- write: dtypes and warnings ------------------------------------------------------------------


def test_float_to_uint16_clipping_warns_with_count(tmp_path):
    image = star_field()
    image[0, :3] = [-5.0, -1e6, -np.inf]
    image[1, :2] = [65535.6, 1e9]
    with pytest.warns(
        GpudeconvWarning, match=r"5 pixel\(s\) outside the uint16 range.*3 below, 2 "
    ):
        path = write_image(tmp_path / "out.tif", image, dtype=np.uint16)
    data, _ = read_image(path)
    assert list(data[0, :3]) == [0, 0, 0] and list(data[1, :2]) == [65535, 65535]
    np.testing.assert_array_equal(data[2:], np.rint(image[2:]).astype(np.uint16))


def test_nan_to_integer_warns_with_count(tmp_path):
    image = star_field()
    image[5, 5] = image[6, 7] = np.nan
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = write_image(tmp_path / "out.png", image)
    # Exactly our warning: no NumPy "invalid value encountered in cast" from casting NaN.
    assert [(w.category, str(w.message)) for w in caught] == [
        (GpudeconvWarning, "2 NaN pixel(s) written as 0 in the uint16 output")
    ]
    data, _ = read_image(path)
    assert data[5, 5] == 0 and data[6, 7] == 0 and data[5, 6] == round(float(image[5, 6]))


def test_unit_range_floats_to_integer_warn(tmp_path):
    with pytest.warns(GpudeconvWarning, match=r"within \[0, 1\].*without rescaling"):
        write_image(tmp_path / "dark.png", star_field() / star_field().max())


def test_in_range_conversion_is_silent(tmp_path, no_warnings):
    write_image(tmp_path / "out.fits", star_field(), dtype="int32")
    write_image(tmp_path / "out.png", star_field().astype(np.uint16))


@pytest.mark.parametrize(
    ("name", "data", "kwargs", "match"),
    [
        ("out.bmp", star_field(), {}, r"unsupported extension \(\.bmp\).*\.fits, .*\.jpeg"),
        ("out.jpg", star_field(), {"dtype": "uint16"}, r"JPEG cannot store dtype uint16"),
        ("out.png", star_field(), {"dtype": "float32"}, r"PNG cannot store dtype float32"),
        ("out.fits", star_field(), {"dtype": "nonsense"}, r"is not a NumPy dtype"),
        ("out.png", np.zeros((4, 8, 8)), {}, r"PNG holds grey or RGB images, got 4 channels"),
        ("out.fits", [[1.0, 2.0], [3.0, 4.0]], {}, r"must be a NumPy array, got list"),
        ("out.fits", np.zeros(10), {}, r"\(H, W\) or \(C, H, W\) image, got shape \(10,\)"),
        ("out.fits", np.zeros((4, 4), complex), {}, r"real numbers, got dtype complex128"),
    ],
)
def test_write_errors(tmp_path, name, data, kwargs, match):
    with pytest.raises(GpudeconvError, match=match):
        write_image(tmp_path / name, data, **kwargs)
    assert os.listdir(tmp_path) == []


# --- read: input untouched, errors ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["in.fits", "in.tif", "in.png"])
def test_read_leaves_input_bytes_unchanged(tmp_path, name):
    path = write_image(tmp_path / name, star_field())
    before, mtime = sha256(path), path.stat().st_mtime_ns
    read_image(path)
    assert sha256(path) == before and path.stat().st_mtime_ns == mtime


def _fits_with(data):
    def make(path):
        fits.PrimaryHDU(data).writeto(path)

    return make


def _table_only(path):
    table = fits.BinTableHDU.from_columns([fits.Column(name="flux", format="E", array=[1.0])])
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(path)


def _truncated_fits(path):
    fits.PrimaryHDU(star_field()).writeto(path)
    path.write_bytes(path.read_bytes()[:5000])


def _tiff_with(data, **kwargs):
    def make(path):
        tifffile.imwrite(path, data, **kwargs)

    return make


@pytest.mark.parametrize(
    ("name", "make", "match"),
    [
        ("missing.fits", None, r"missing\.fits does not exist: check the path"),
        ("folder.fits", lambda p: p.mkdir(), r"folder\.fits is a folder, not an image file"),
        ("image.bmp", lambda p: p.write_bytes(b"BM"), r"unsupported extension \(\.bmp\): use"),
        ("noext", lambda p: p.write_bytes(b"x"), r"unsupported extension \(none\)"),
        (
            "junk.fits",
            lambda p: p.write_bytes(b"hello " * 600),
            r"junk\.fits is not a readable FITS file \(.*\): check that it is an image",
        ),
        ("cut.fits", _truncated_fits, r"cut\.fits is not a readable FITS file"),
        ("empty.fits", lambda p: p.write_bytes(b""), r"empty\.fits is not a readable FITS file"),
        (
            "junk.tif",
            lambda p: p.write_bytes(b"not a tiff " * 10),
            r"junk\.tif is not a readable TIFF file \(.*\): check that it is an image",
        ),
        (
            "junk.png",
            lambda p: p.write_bytes(b"not a png " * 10),
            r"junk\.png is not a readable PNG file \(.*\): check that it is an image",
        ),
        ("table.fits", _table_only, r"holds no image data \(HDUs: .*BinTableHDU"),
        ("line.fits", _fits_with(np.zeros(50, np.float32)), r"holds a 1-D array of shape \(50,\)"),
        ("hyper.fits", _fits_with(np.zeros((2, 3, 8, 8), np.float32)), r"holds a 4-D array"),
        ("thin.fits", _fits_with(np.zeros((1, 50), np.float32)), r"is 1x50 pixels: .*at least 2"),
        ("complex.tif", _tiff_with(np.zeros((8, 8), np.complex64)), r"holds complex data"),
        ("bilevel.tif", _tiff_with(np.zeros((8, 8), bool)), r"1-bit \(black and white\)"),
        (
            "stack.tif",
            _tiff_with(np.zeros((5, 8, 8), np.uint16), photometric="minisblack"),
            r"multi-page TIFF stack \(axes 'QYX', shape \(5, 8, 8\)\).*its own file",
        ),
    ],
)
@pytest.mark.filterwarnings("ignore:File may have been truncated")
def test_read_errors(tmp_path, name, make, match):
    path = tmp_path / name
    if make is not None:
        make(path)
    with pytest.raises(GpudeconvError, match=match) as info:
        read_image(path)
    assert "\n" not in str(info.value)  # the CLI prints one line


def test_supported_extensions_listed():
    assert set(SUPPORTED_EXTENSIONS) >= {
        ".fits",
        ".fit",
        ".fts",
        ".fits.gz",
        ".tif",
        ".tiff",
        ".png",
        ".jpg",
        ".jpeg",
    }
    assert read_image.__module__ == "gpudeconv.io" and gio.__all__ == [
        "SUPPORTED_EXTENSIONS",
        "check_output_path",
        "provenance_header",
        "read_image",
        "write_image",
    ]


@pytest.mark.parametrize(
    ("name", "says"), [("out.fits.gz", "gzip-compressed FITS"), ("out.png", "(PNG)")]
)
def test_tile_output_refusal_names_the_format(tmp_path, name, says):
    from gpudeconv.io import tile_output_format

    with pytest.raises(GpudeconvError) as error:
        tile_output_format(tmp_path / name)
    message = str(error.value)
    assert says in message and "compressed or" not in message and "\n" not in message
