"""SpatiallyVaryingConvolution: the same function as an independent scatter sum, both methods."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import to_numpy

import gpudeconv as gd
from gpudeconv import GpudeconvError


def distinct_field(shape, grid, size=7, seed=0) -> gd.PSFField:
    """Node PSFs that all differ: elongated Moffats at varied angles, each with an off-centre
    bump, so that a mix-up of nodes, a flip or a transposition cannot go unseen."""
    rng = np.random.default_rng(seed)
    ny, nx = grid
    psfs = np.empty((ny, nx, size, size))
    for a in range(ny):
        for b in range(nx):
            psf = gd.psf.moffat(
                rng.uniform(1.5, 3.5),
                size=size,
                ratio=rng.uniform(0.4, 1.0),
                angle=rng.uniform(0, 180),
            ).astype(np.float64)
            psf[rng.integers(0, size), rng.integers(0, size)] += rng.uniform(0.05, 0.3)
            psfs[a, b] = psf / psf.sum()
    return gd.PSFField(psfs, shape)


def scatter_forward(x, field, origin=(0, 0)):
    """y[i] = sum_j x[j] h_j[i - j], source pixel by source pixel (h_j from field.psf_at)."""
    height, width = x.shape
    r = field.radius
    y = np.zeros((height + 2 * r, width + 2 * r))
    for row in range(height):
        for col in range(width):
            psf = field.psf_at(row + origin[0], col + origin[1])
            y[row : row + 2 * r + 1, col : col + 2 * r + 1] += x[row, col] * psf
    return y[r : r + height, r : r + width]


def scatter_adjoint(y, field, origin=(0, 0)):
    """x[j] = sum_i y[i] h_j[i - j]: the transpose, written from its definition."""
    height, width = y.shape
    r = field.radius
    padded = np.pad(y.astype(np.float64), r)
    x = np.empty((height, width))
    for row in range(height):
        for col in range(width):
            psf = field.psf_at(row + origin[0], col + origin[1])
            x[row, col] = np.sum(padded[row : row + 2 * r + 1, col : col + 2 * r + 1] * psf)
    return x


def relative_error(result, expected) -> float:
    return float(np.max(np.abs(result - expected)) / np.max(np.abs(expected)))


CASES = [((37, 52), (3, 4), 7), ((64, 40), (2, 2), 9), ((29, 31), (1, 3), 5)]


@pytest.mark.parametrize("method", ["fft", "direct"])
@pytest.mark.parametrize(("shape", "grid", "size"), CASES)
def test_forward_and_adjoint_equal_the_scatter_sum(backend, method, shape, grid, size):
    field = distinct_field(shape, grid, size)
    rng = np.random.default_rng(1)
    x = rng.random(shape).astype(np.float32)
    op = gd.operators.SpatiallyVaryingConvolution(field, backend, method=method)
    forward = to_numpy(op.forward(backend.asarray(x)))
    adjoint = to_numpy(op.adjoint(backend.asarray(x)))
    assert forward.dtype == np.float32
    assert relative_error(forward, scatter_forward(x, field)) < 1e-5
    assert relative_error(adjoint, scatter_adjoint(x, field)) < 1e-5


@pytest.mark.parametrize("method", ["fft", "direct"])
def test_a_padded_array_takes_its_origin_into_account(backend, method):
    """RL and tiles work on arrays that are not the field's image: origin places them."""
    field = distinct_field((40, 36), (2, 3), 7, seed=3)
    rng = np.random.default_rng(2)
    origin = (-6, 11)
    x = rng.random((50, 30))  # reaches beyond the image on both sides
    op = gd.operators.SpatiallyVaryingConvolution(field, backend, method=method, origin=origin)
    forward = to_numpy(op.forward(backend.asarray(x)))
    assert relative_error(forward, scatter_forward(x, field, origin)) < 1e-10
    adjoint = to_numpy(op.adjoint(backend.asarray(x)))
    assert relative_error(adjoint, scatter_adjoint(x, field, origin)) < 1e-10


@pytest.mark.parametrize("method", ["fft", "direct"])
def test_one_node_is_the_shift_invariant_convolution(backend, method):
    psf = distinct_field((1, 1), (1, 1), 11, seed=4).psfs[0, 0]
    field = gd.PSFField(psf[None, None], (45, 61))
    x = np.random.default_rng(3).random((45, 61))
    sv = gd.operators.SpatiallyVaryingConvolution(field, backend, method=method)
    si = gd.operators.Convolution(psf, backend)
    for direction in ("forward", "adjoint"):
        result = to_numpy(getattr(sv, direction)(backend.asarray(x)))
        expected = to_numpy(getattr(si, direction)(backend.asarray(x)))
        np.testing.assert_allclose(result, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["fft", "direct"])
@pytest.mark.parametrize(("dtype", "rtol"), [(np.float64, 1e-12), (np.float32, 3e-6)])
def test_adjoint_identity(backend, method, dtype, rtol):
    field = distinct_field((57, 70), (3, 4), 9, seed=5)
    rng = np.random.default_rng(4)
    x = rng.random((57, 70)).astype(dtype)
    y = rng.random((57, 70)).astype(dtype)
    op = gd.operators.SpatiallyVaryingConvolution(field, backend, method=method)
    hx = to_numpy(op.forward(backend.asarray(x))).astype(np.float64)
    hty = to_numpy(op.adjoint(backend.asarray(y))).astype(np.float64)
    assert np.vdot(hx, y) == pytest.approx(np.vdot(x.astype(np.float64), hty), rel=rtol)
    assert not np.allclose(hty, hx)


def test_flux_is_conserved_away_from_the_edges(backend):
    """Each source spreads its light with a PSF that sums to 1 (the physically right model)."""
    field = gd.psf.field.aberrated_field(
        (96, 128), (3, 4), fwhm_centre=2.0, fwhm_corner=4.0, elongation_corner=1.8
    )
    x = np.zeros((96, 128))
    x[20:76:7, 20:108:9] = 1.0  # sources at least a PSF radius inside
    op = gd.operators.SpatiallyVaryingConvolution(field, backend)
    assert to_numpy(op.forward(backend.asarray(x))).sum() == pytest.approx(x.sum(), rel=1e-10)


def test_stacks_of_planes_and_out(backend):
    field = distinct_field((33, 35), (2, 2), 5, seed=6)
    rng = np.random.default_rng(5)
    stack = rng.random((3, 33, 35)).astype(np.float32)
    op = gd.operators.SpatiallyVaryingConvolution(field, backend)
    out = backend.xp.zeros((3, 33, 35), dtype=np.float32)
    result = op.forward(backend.asarray(stack), out=out)
    assert result is out
    for plane in range(3):
        single = to_numpy(op.forward(backend.asarray(stack[plane])))
        np.testing.assert_array_equal(to_numpy(out[plane]), single)


def test_the_cost_model_chooses_per_shape():
    """On the CPU the FFT sum wins for any real image; direct only when forced (it is the
    exact twin of the GPU kernel, not a fast path)."""
    field = distinct_field((512, 512), (2, 2), 15, seed=7)
    op = gd.operators.SpatiallyVaryingConvolution(field, "numpy")
    costs = op.costs((512, 512))
    assert set(costs) == {"fft", "direct"}
    assert costs["direct"] > costs["fft"] > 0
    assert op.method_for((512, 512)) == "fft"
    forced = gd.operators.SpatiallyVaryingConvolution(field, "numpy", method="direct")
    assert forced.method_for((512, 512)) == "direct"


def test_bad_arguments_say_what_to_do():
    field = distinct_field((20, 20), (1, 1), 5)
    with pytest.raises(GpudeconvError, match="takes a gpudeconv.PSFField.*use Convolution"):
        gd.operators.SpatiallyVaryingConvolution(np.ones((5, 5)))
    with pytest.raises(GpudeconvError, match="method must be one of"):
        gd.operators.SpatiallyVaryingConvolution(field, method="fast")
    with pytest.raises(GpudeconvError, match="at least 2 dimensions"):
        gd.operators.SpatiallyVaryingConvolution(field).forward(np.ones(20))
