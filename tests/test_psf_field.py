"""PSFField: node placement, the bilinear interpolation rule, checks, FITS files, builders."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from astropy.io import fits

import gpudeconv as gd
from gpudeconv import GpudeconvError, PSFField


def moffat_stack(grid, size=15, seed=0):
    """(ny, nx, size, size) Moffat-like node PSFs of different widths, in data units (not sum 1)."""
    rng = np.random.default_rng(seed)
    ny, nx = grid
    c = np.arange(size) - size // 2
    r2 = c[:, None] ** 2 + c[None, :] ** 2
    stack = np.empty((ny, nx, size, size))
    for a in range(ny):
        for b in range(nx):
            alpha = rng.uniform(1.5, 3.0)
            stack[a, b] = rng.uniform(1e3, 1e5) * (1 + r2 / alpha**2) ** -2.5
    return stack


def dense_axis_weights(index, frac, n):
    """(len(coords), n) weights from axis_weights' (index, frac)."""
    index, frac = np.ravel(index), np.ravel(frac)
    dense = np.zeros((index.size, n))
    rows = np.arange(index.size)
    np.add.at(dense, (rows, index), 1 - frac)
    if n > 1:
        np.add.at(dense, (rows, index + 1), frac)
    return dense


def interp_weights(coords, nodes):
    """Clamped linear interpolation weights, independently: np.interp of each node's indicator
    (np.interp holds the end values beyond the outer nodes)."""
    eye = np.eye(len(nodes))
    return np.stack([np.interp(coords, nodes, eye[a]) for a in range(len(nodes))], axis=-1)


def principal_axes(psf):
    """Major-axis angle (degrees from +x = columns towards +y = rows) and the (minor, major)
    second moments of a PSF."""
    c = np.arange(psf.shape[0]) - psf.shape[0] // 2
    yy, xx = np.meshgrid(c, c, indexing="ij")
    p = psf / psf.sum()
    dy, dx = yy - (p * yy).sum(), xx - (p * xx).sum()
    mxx, myy, mxy = (p * dx * dx).sum(), (p * dy * dy).sum(), (p * dx * dy).sum()
    angle = 0.5 * math.degrees(math.atan2(2 * mxy, mxx - myy))
    return angle, np.linalg.eigvalsh([[mxx, mxy], [mxy, myy]])


def axis_difference(a, b):
    """Smallest difference between two axis directions (degrees, modulo 180)."""
    return abs((a - b + 90) % 180 - 90)


@pytest.fixture
def field():
    return PSFField(moffat_stack((3, 4)), (1000, 1500))


# --- geometry ----------------------------------------------------------------------------------


def test_nodes_sit_at_cell_centres(field):
    # cells of 1000/3 rows and 1500/4 = 375 columns; pixel centres at integers
    np.testing.assert_allclose(field.node_rows(), [1000 / 6 - 0.5, 499.5, 5000 / 6 - 0.5])
    np.testing.assert_allclose(field.node_cols(), [187.0, 562.0, 937.0, 1312.0])
    assert field.node_rows().dtype == np.float64
    assert field.grid == (3, 4) and field.size == 15 and field.radius == 7
    assert field.image_shape == (1000, 1500)
    assert field.psfs.shape == (3, 4, 15, 15) and field.psfs.dtype == np.float64
    assert repr(field) == "PSFField(grid 3x4, psf 15x15, image 1000x1500)"


def test_psfs_are_read_only_and_not_shared_with_the_input():
    stack = moffat_stack((2, 2))
    field = PSFField(stack, (64, 64))
    with pytest.raises(ValueError, match="read-only"):
        field.psfs[0, 0, 7, 7] = 1.0
    stack[0, 0] = 0.0
    assert field.psfs[0, 0].sum() == pytest.approx(1.0)


# --- the interpolation rule ------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1])
def test_axis_weights_put_all_weight_on_a_node_at_its_centre(field, axis):
    nodes = field.node_rows() if axis == 0 else field.node_cols()
    index, frac = field.axis_weights(nodes, axis)
    assert index.dtype == np.int32 and frac.dtype == np.float64
    dense = dense_axis_weights(index, frac, len(nodes))
    np.testing.assert_allclose(dense, np.eye(len(nodes)), atol=1e-12)


@pytest.mark.parametrize("axis", [0, 1])
def test_axis_weights_halfway_between_nodes_are_one_half(field, axis):
    nodes = field.node_rows() if axis == 0 else field.node_cols()
    index, frac = field.axis_weights((nodes[:-1] + nodes[1:]) / 2, axis)
    np.testing.assert_array_equal(index, np.arange(len(nodes) - 1))
    np.testing.assert_allclose(frac, 0.5, atol=1e-12)


def test_axis_weights_are_clamped_beyond_the_outer_nodes_and_the_image(field):
    rows = field.node_rows()
    # before the first node: in the image's first rows, and in padding above it
    index, frac = field.axis_weights([-200.0, -0.5, 0.0, 100.0, rows[0] - 1e-9], 0)
    np.testing.assert_array_equal(index, 0)
    np.testing.assert_array_equal(frac, 0.0)
    # after the last node: weight 1 on node ny - 1, i.e. index ny - 2 with frac 1
    index, frac = field.axis_weights([rows[-1] + 1, 999.0, 999.5, 1300.0], 0)
    np.testing.assert_array_equal(index, 1)
    np.testing.assert_array_equal(frac, 1.0)
    index, frac = field.axis_weights([-30.0, 1499.0, 1600.0], 1)
    np.testing.assert_array_equal(index, [0, 2, 2])
    np.testing.assert_array_equal(frac, [0.0, 1.0, 1.0])


def test_axis_weights_with_one_node_give_it_everything():
    field = PSFField(moffat_stack((1, 3)), (120, 90))
    coords = np.array([[-5.0, 0.0, 33.3], [60.0, 119.0, 400.0]])
    index, frac = field.axis_weights(coords, 0)
    assert index.shape == coords.shape and frac.shape == coords.shape
    np.testing.assert_array_equal(index, 0)
    np.testing.assert_array_equal(frac, 0.0)
    # the other axis has 3 nodes and still interpolates
    assert field.axis_weights(29.5, 1)[1] == pytest.approx(0.5)  # nodes at 14.5, 44.5


@pytest.mark.parametrize("axis", [0, 1])
def test_axis_weights_follow_the_formula_everywhere(field, axis):
    length = field.image_shape[axis]
    nodes = field.node_rows() if axis == 0 else field.node_cols()
    coords = np.random.default_rng(1).uniform(-0.2 * length, 1.2 * length, 2000)
    index, frac = field.axis_weights(coords, axis)
    assert ((frac >= 0) & (frac <= 1)).all()
    assert ((index >= 0) & (index <= len(nodes) - 2)).all()
    dense = dense_axis_weights(index, frac, len(nodes))
    np.testing.assert_allclose(dense, interp_weights(coords, nodes), atol=1e-12)


def test_axis_weights_refuse_a_third_axis(field):
    with pytest.raises(GpudeconvError, match="axis must be 0"):
        field.axis_weights([1.0], 2)


def test_weights_sum_to_one_with_at_most_four_nodes(field):
    rng = np.random.default_rng(2)
    for y, x in zip(rng.uniform(-50, 1050, 300), rng.uniform(-50, 1550, 300), strict=True):
        w = field.weights(y, x)
        assert w.shape == (3, 4) and w.dtype == np.float64
        assert w.sum() == pytest.approx(1.0, abs=1e-12)
        assert np.count_nonzero(w) <= 4 and (w >= 0).all()
        expected = np.outer(
            interp_weights(y, field.node_rows()), interp_weights(x, field.node_cols())
        )
        np.testing.assert_allclose(w, expected, atol=1e-12)


def test_psf_at_a_node_is_that_node(field):
    rows, cols = field.node_rows(), field.node_cols()
    for a, b in [(0, 0), (1, 2), (2, 3)]:
        np.testing.assert_allclose(field.psf_at(rows[a], cols[b]), field.psfs[a, b], atol=1e-12)
    # the corner pixel lies beyond the outer nodes: clamped to node (0, 0)
    np.testing.assert_allclose(field.psf_at(0, 0), field.psfs[0, 0], atol=1e-15)
    np.testing.assert_allclose(field.psf_at(999, 1499), field.psfs[2, 3], atol=1e-15)


def test_psf_at_halfway_is_the_average_of_the_nodes(field):
    rows, cols = field.node_rows(), field.node_cols()
    psfs = field.psfs
    y, x = (rows[0] + rows[1]) / 2, (cols[1] + cols[2]) / 2
    four = (psfs[0, 1] + psfs[0, 2] + psfs[1, 1] + psfs[1, 2]) / 4
    np.testing.assert_allclose(field.psf_at(y, x), four, atol=1e-12)
    np.testing.assert_allclose(field.psf_at(rows[2], x), (psfs[2, 1] + psfs[2, 2]) / 2, atol=1e-12)
    # halfway along rows, but beyond the last column node: only column 3 counts
    np.testing.assert_allclose(field.psf_at(y, 1450.0), (psfs[0, 3] + psfs[1, 3]) / 2, atol=1e-12)


def test_psf_at_sums_to_one(field):
    rng = np.random.default_rng(3)
    for y, x in zip(rng.uniform(0, 999, 50), rng.uniform(0, 1499, 50), strict=True):
        psf = field.psf_at(y, x)
        assert psf.shape == (15, 15) and psf.dtype == np.float64
        assert psf.sum() == pytest.approx(1.0, abs=1e-12)
        assert psf.min() >= 0


# --- checks ----------------------------------------------------------------------------------


def _with(stack, node, value):
    stack = stack.copy()
    stack[node] = value
    return stack


GOOD = moffat_stack((3, 3), size=11)


@pytest.mark.parametrize(
    ("psfs", "image_shape", "match"),
    [
        (moffat_stack((3, 3), size=12), (500, 500), r"12x12; their side must be odd"),
        (GOOD[..., :9], (500, 500), r"11x9; they must be square"),
        (_with(GOOD, (1, 2, 5, 5), np.nan), (500, 500), r"node \(1, 2\) contains NaN"),
        (_with(GOOD, (0, 1, 0, 3), -1.0), (500, 500), r"node \(0, 1\) has negative values"),
        (_with(GOOD, (2, 0), 0.0), (500, 500), r"node \(2, 0\) is all zeros"),
        (GOOD[0], (500, 500), r"4-D \(ny, nx, k, k\).*PSFField.uniform"),
        (GOOD[0, 0], (500, 500), r"4-D \(ny, nx, k, k\)"),
        (GOOD, (2, 500), r"3x3 grid .* more nodes than the 2x500 image"),
        (GOOD, (500, 2), r"more nodes than"),
        (GOOD[:0], (500, 500), r"at least one node"),
        (GOOD.astype(complex), (500, 500), r"node \(0, 0\) must hold real numbers"),
        (GOOD, (500,), r"image_shape must be \(H, W\)"),
        (GOOD, (500, 500, 3), r"image_shape must be \(H, W\)"),
        (GOOD, (500.5, 500), r"image_shape must be \(H, W\)"),
        (GOOD, (0, 500), r"image_shape must be \(H, W\)"),
    ],
)
def test_bad_fields_are_refused(psfs, image_shape, match):
    with pytest.raises(GpudeconvError, match=match):
        PSFField(psfs, image_shape)


def test_nodes_are_normalized_one_by_one_without_a_warning():
    stack = moffat_stack((2, 3), size=13)
    stack[1, 2] *= 1e-6  # a faint star cut-out and bright ones in one field
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        field = PSFField(stack.astype(np.float32), (300, 400))
    np.testing.assert_allclose(field.psfs.sum(axis=(2, 3)), 1.0, atol=1e-12)
    expected = stack / stack.sum(axis=(2, 3), keepdims=True)
    np.testing.assert_allclose(field.psfs, expected, rtol=1e-6)


def test_device_arrays_are_copied_to_the_host():
    class DeviceArray:
        """Looks like a CuPy array to is_cupy_array; only .get() gives its values."""

        __module__ = "cupy"
        __cuda_array_interface__ = {}

        def __init__(self, values):
            self.values = values

        def get(self):
            return self.values.copy()

    stack = moffat_stack((2, 2))
    field = PSFField(DeviceArray(stack), (100, 100))
    np.testing.assert_allclose(field.psfs, stack / stack.sum(axis=(2, 3), keepdims=True))
    uniform = PSFField.uniform(DeviceArray(stack[0, 0]), (100, 100))
    assert uniform.grid == (1, 1)


# --- builders --------------------------------------------------------------------------------


def test_uniform_field_is_the_psf_everywhere():
    psf = gd.psf.moffat(3.5, size=21)
    field = PSFField.uniform(psf, (480, 640))
    assert field.grid == (1, 1) and field.size == 21
    for y, x in [(0, 0), (240.5, 13.2), (479, 639), (-20, 700)]:
        np.testing.assert_allclose(field.psf_at(y, x), psf / psf.astype(np.float64).sum())
    with pytest.raises(GpudeconvError, match="one 2-D PSF"):
        PSFField.uniform(np.stack([psf, psf]), (480, 640))


def test_from_function_calls_each_node_and_centres_mixed_sizes():
    calls = []

    def psf(y, x):
        calls.append((y, x))
        size = 5 + (4 * len(calls)) % 12  # 9, 13, 5, 9, 13, 5
        return gd.psf.gaussian(2.0, size=size)

    field = PSFField.from_function(psf, (600, 900), (2, 3))
    expected_calls = [(y, x) for y in field.node_rows() for x in field.node_cols()]
    np.testing.assert_allclose(calls, expected_calls)
    assert all(type(y) is float and type(x) is float for y, x in calls)
    assert field.size == 13
    for a in range(2):
        for b in range(3):
            node = field.psfs[a, b]
            # the centre stays at the centre: a padded PSF is symmetric about (6, 6)
            assert np.unravel_index(np.argmax(node), node.shape) == (6, 6)
            np.testing.assert_allclose(node, node[::-1, ::-1], atol=1e-9)
    small = gd.psf.gaussian(2.0, size=5).astype(np.float64)
    np.testing.assert_allclose(field.psfs[0, 2, 4:9, 4:9], small / small.sum())
    assert field.psfs[0, 2, :4].sum() == 0 and field.psfs[0, 2, :, 9:].sum() == 0


def test_from_function_pads_or_crops_to_size():
    wide = gd.psf.gaussian(4.0, size=21).astype(np.float64)
    cropped = PSFField.from_function(lambda y, x: wide, (100, 100), (1, 2), size=9)
    inner = wide[6:15, 6:15]
    np.testing.assert_allclose(cropped.psfs[0, 1], inner / inner.sum())
    padded = PSFField.from_function(lambda y, x: wide, (100, 100), (1, 1), size=25)
    np.testing.assert_allclose(padded.psfs[0, 0, 2:23, 2:23], wide / wide.sum())
    assert padded.psfs[0, 0, :2].sum() == 0


@pytest.mark.parametrize(
    ("function", "options", "match"),
    [
        (lambda y, x: np.ones((4, 5)), {}, r"4x5 PSF for node \(0, 0\); its sides must be odd"),
        (lambda y, x: np.ones((3, 3, 3)), {}, r"shape \(3, 3, 3\) for node \(0, 0\)"),
        (lambda y, x: np.ones((3, 3)), {"size": 4}, r"size must be a positive odd integer"),
        (lambda y, x: -np.ones((3, 3)), {}, r"node \(0, 0\) has negative values"),
    ],
)
def test_from_function_refuses_bad_psfs(function, options, match):
    with pytest.raises(GpudeconvError, match=match):
        PSFField.from_function(function, (50, 50), (2, 2), **options)


def test_from_function_checks_the_grid_before_calling():
    def never(y, x):
        raise AssertionError("called")

    with pytest.raises(GpudeconvError, match="more nodes than"):
        PSFField.from_function(never, (10, 10), (3, 12))
    with pytest.raises(GpudeconvError, match=r"grid must be \(ny, nx\)"):
        PSFField.from_function(never, (10, 10), 3)


# --- FITS files ------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path):
    field = gd.psf.aberrated_field(
        (1200, 1800), (3, 4), fwhm_centre=2.5, fwhm_corner=5.0, elongation_corner=1.4, beta=3.0
    )
    path = field.save(tmp_path / "field.fits")
    assert path == tmp_path / "field.fits"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["field.fits"]  # no temporary left
    with fits.open(path) as hdul:
        header, data = hdul[0].header, hdul[0].data
        assert header["GDKIND"] == "PSFFIELD"
        assert (header["GRIDNY"], header["GRIDNX"]) == (3, 4)
        assert (header["IMAGEH"], header["IMAGEW"]) == (1200, 1800)
        assert header["PSFSIZE"] == field.size
        assert (header["NAXIS1"], header["NAXIS3"], header["NAXIS4"]) == (field.size, 4, 3)
        assert "(a + 0.5) * H / ny - 0.5" in str(header["COMMENT"])
        assert data.dtype == np.dtype(">f4")
        np.testing.assert_array_equal(data, field.psfs.astype(np.float32))
    loaded = PSFField.load(path)
    assert loaded.grid == field.grid and loaded.image_shape == field.image_shape
    assert loaded.size == field.size
    # the file holds float32; loading renormalizes in float64, within a float32 rounding step
    np.testing.assert_array_max_ulp(
        loaded.psfs.astype(np.float32), field.psfs.astype(np.float32), maxulp=1
    )
    np.testing.assert_allclose(loaded.psfs, field.psfs, rtol=np.finfo(np.float32).eps, atol=0)
    np.testing.assert_allclose(loaded.psf_at(10, 1700), field.psf_at(10, 1700), rtol=1e-6)


def test_save_refuses_to_overwrite_unless_asked(tmp_path):
    path = tmp_path / "field.fits"
    first = PSFField(moffat_stack((2, 2), seed=1), (200, 200))
    second = PSFField(moffat_stack((3, 3), seed=2), (300, 300))
    first.save(path)
    before = path.read_bytes()
    with pytest.raises(GpudeconvError, match="exists; pass --overwrite"):
        second.save(path)
    assert path.read_bytes() == before
    second.save(path, overwrite=True)
    assert PSFField.load(path).grid == (3, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["field.fits"]


def test_save_wants_a_fits_name_in_an_existing_folder(tmp_path):
    field = PSFField(moffat_stack((2, 2)), (200, 200))
    with pytest.raises(GpudeconvError, match="saved as FITS"):
        field.save(tmp_path / "field.png")
    with pytest.raises(GpudeconvError, match="does not exist"):
        field.save(tmp_path / "missing" / "field.fits")
    field.save(tmp_path / "field.fits.gz")
    np.testing.assert_allclose(PSFField.load(tmp_path / "field.fits.gz").psfs, field.psfs, 1e-6)


def test_a_plain_psf_image_is_not_a_field(tmp_path):
    path = tmp_path / "star.fits"
    fits.PrimaryHDU(gd.psf.moffat(3.0, size=25)).writeto(path)
    assert not PSFField.is_field_file(path)
    with pytest.raises(GpudeconvError, match="2-D image, not a PSF field: use it as a single PSF"):
        PSFField.load(path)
    cube = tmp_path / "cube.fits"
    fits.PrimaryHDU(np.ones((2, 2, 5, 5), dtype=np.float32)).writeto(cube)
    assert not PSFField.is_field_file(cube)
    with pytest.raises(GpudeconvError, match="not a PSF field .*GDKIND"):
        PSFField.load(cube)


def test_is_field_file(tmp_path):
    field_path = PSFField(moffat_stack((2, 2)), (200, 200)).save(tmp_path / "field.fits")
    assert PSFField.is_field_file(field_path)
    assert PSFField.is_field_file(str(field_path))
    garbage = tmp_path / "garbage.fits"
    garbage.write_bytes(b"not a FITS file at all" * 10)
    assert not PSFField.is_field_file(garbage)
    assert not PSFField.is_field_file(tmp_path / "missing.fits")
    assert not PSFField.is_field_file(tmp_path)
    assert not PSFField.is_field_file(tmp_path / "field.tif")


def test_load_refuses_damaged_and_missing_files(tmp_path):
    path = PSFField(moffat_stack((2, 3)), (200, 300)).save(tmp_path / "field.fits")
    fits.setval(path, "GRIDNX", value=4)
    with pytest.raises(GpudeconvError, match=r"damaged PSF field: its data have shape"):
        PSFField.load(path)
    fits.setval(path, "GRIDNX", value=3)
    fits.setval(path, "IMAGEW", value="wide")
    with pytest.raises(GpudeconvError, match="header key IMAGEW is 'wide'"):
        PSFField.load(path)
    with pytest.raises(GpudeconvError, match="does not exist"):
        PSFField.load(tmp_path / "missing.fits")
    garbage = tmp_path / "garbage.fits"
    garbage.write_bytes(b"\0" * 100)
    with pytest.raises(GpudeconvError, match="not a readable FITS file"):
        PSFField.load(garbage)


def test_load_names_the_file_and_node_of_bad_values(tmp_path):
    path = PSFField(moffat_stack((2, 2)), (200, 200)).save(tmp_path / "field.fits")
    with fits.open(path, mode="update") as hdul:
        hdul[0].data[1, 0, 3, 3] = np.nan
    with pytest.raises(GpudeconvError, match=r"field.fits: PSF field node \(1, 0\) contains NaN"):
        PSFField.load(path)


# --- aberrated_field -------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [None, 2.5])
def test_aberrated_field_widens_and_stretches_towards_the_corners(beta):
    # a wide image: the corner directions are not the diagonals of the array, so a flipped
    # angle sign or swapped axes would point the PSFs 64 degrees off
    field = gd.psf.aberrated_field(
        (1000, 1600), (3, 3), fwhm_centre=3.0, fwhm_corner=9.0, elongation_corner=2.0, beta=beta
    )
    np.testing.assert_allclose(field.psfs.sum(axis=(2, 3)), 1.0, atol=1e-12)
    centre_angle, (centre_minor, centre_major) = principal_axes(field.psfs[1, 1])
    assert centre_minor / centre_major == pytest.approx(1.0, abs=0.01)
    yc, xc = 499.5, 799.5
    rows, cols = field.node_rows(), field.node_cols()
    for a, b in [(0, 0), (0, 2), (2, 0), (2, 2)]:
        angle, (minor, major) = principal_axes(field.psfs[a, b])
        towards_centre = math.degrees(math.atan2(rows[a] - yc, cols[b] - xc))
        assert axis_difference(angle, towards_centre) < 2.0, (a, b, angle, towards_centre)
        assert minor / major < 0.6  # clearly elongated: FWHM ratio 0.6 at this node
        assert major > 3 * centre_major  # and much wider than at the centre
    # one row from the centre, in the middle column: stretched along the columns (angle 90)
    angle, (minor, major) = principal_axes(field.psfs[0, 1])
    assert axis_difference(angle, 90.0) < 1.0 and minor < major


def test_aberrated_field_follows_its_formula_at_a_node():
    image_shape, grid = (900, 1200), (4, 5)
    field = gd.psf.aberrated_field(
        image_shape, grid, fwhm_centre=2.0, fwhm_corner=6.0, elongation_corner=1.5, size=31
    )
    assert field.size == 31
    y, x = field.node_rows()[3], field.node_cols()[0]
    yc, xc = 449.5, 599.5
    rho = math.hypot(y - yc, x - xc) / math.hypot(yc, xc)
    expected = gd.psf.gaussian(
        2.0 + 4.0 * rho,
        size=31,
        ratio=1 / (1 + 0.5 * rho),
        angle=math.degrees(math.atan2(y - yc, x - xc)),
    ).astype(np.float64)
    np.testing.assert_allclose(field.psfs[3, 0], expected / expected.sum(), atol=1e-12)


def test_aberrated_field_checks_its_options():
    with pytest.raises(GpudeconvError, match="fwhm_corner must be a positive number"):
        gd.psf.aberrated_field((100, 100), (2, 2), fwhm_centre=3.0, fwhm_corner=-1.0)
    with pytest.raises(GpudeconvError, match="elongation_corner .* must be >= 1"):
        gd.psf.aberrated_field(
            (100, 100), (2, 2), fwhm_centre=3.0, fwhm_corner=4.0, elongation_corner=0.5
        )
