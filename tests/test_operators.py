"""The shift-invariant Convolution operator: linear convolution, exact adjoint, cached OTFs."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.signal
from helpers import to_numpy

import gpudeconv as gd
from gpudeconv import GpudeconvError


def asymmetric_psf(size=11):
    """An elongated, tilted, off-centre-weighted PSF: convolution and correlation differ."""
    psf = gd.psf.moffat(4.0, size=size, ratio=0.5, angle=35).astype(np.float64)
    psf[size // 2 + 2, size // 2 - 3] += 0.2
    return psf / psf.sum()


@pytest.mark.parametrize("method", ["fft", "direct"])
@pytest.mark.parametrize("shape", [(37, 52), (64, 41), (129, 130)])
def test_forward_is_linear_convolution_zero_outside(backend, method, shape):
    rng = np.random.default_rng(0)
    x = rng.random(shape)
    psf = asymmetric_psf()
    op = gd.operators.Convolution(psf, backend, method=method)
    result = to_numpy(op.forward(backend.asarray(x)))
    expected = scipy.signal.convolve2d(x, psf, mode="same", boundary="fill")
    np.testing.assert_allclose(result, expected, rtol=1e-10, atol=1e-12)


def test_point_source_lands_where_it_is_with_the_psf_unflipped(backend):
    psf = asymmetric_psf(9)
    x = np.zeros((31, 33))
    x[12, 20] = 1.0
    result = to_numpy(gd.operators.Convolution(psf, backend).forward(backend.asarray(x)))
    np.testing.assert_allclose(result[8:17, 16:25], psf, atol=1e-12)
    assert result.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["fft", "direct"])
@pytest.mark.parametrize(("dtype", "rtol"), [(np.float64, 1e-12), (np.float32, 2e-6)])
def test_adjoint_identity(backend, method, dtype, rtol):
    rng = np.random.default_rng(1)
    shape = (45, 38)
    x = rng.random(shape).astype(dtype)
    y = rng.random(shape).astype(dtype)
    op = gd.operators.Convolution(asymmetric_psf(), backend, method=method)
    hx = to_numpy(op.forward(backend.asarray(x))).astype(np.float64)
    hty = to_numpy(op.adjoint(backend.asarray(y))).astype(np.float64)
    left = np.vdot(hx, y.astype(np.float64))
    right = np.vdot(x.astype(np.float64), hty)
    assert left == pytest.approx(right, rel=rtol)
    # The adjoint is correlation: the transpose, not the same operator.
    assert not np.allclose(hty, hx)


def test_adjoint_is_correlation(backend):
    rng = np.random.default_rng(2)
    y = rng.random((40, 47))
    psf = asymmetric_psf()
    result = to_numpy(gd.operators.Convolution(psf, backend).adjoint(backend.asarray(y)))
    expected = scipy.signal.correlate2d(y, psf, mode="same", boundary="fill")
    np.testing.assert_allclose(result, expected, rtol=1e-10, atol=1e-12)


def test_otf_is_cached_per_shape_and_dtype(backend):
    op = gd.operators.Convolution(asymmetric_psf(), backend, method="fft")
    x = backend.asarray(np.ones((30, 30), np.float32))
    op.forward(x)
    op.adjoint(x)
    op.forward(backend.asarray(np.ones((30, 30), np.float32)))
    assert len(op._plans) == 1
    op.forward(backend.asarray(np.ones((30, 31), np.float32)))
    op.forward(backend.asarray(np.ones((30, 31), np.float64)))
    assert len(op._plans) == 3


def test_float32_stays_float32(backend):
    op = gd.operators.Convolution(asymmetric_psf(), backend)
    out = op.forward(backend.asarray(np.ones((20, 20), np.float32)))
    assert out.dtype == np.float32


def test_method_choice_by_size(backend):
    small = gd.operators.Convolution(np.ones((5, 5)) / 25, backend)
    assert small.method == ("direct" if backend.direct_max_size >= 5 else "fft")
    assert gd.operators.Convolution(np.ones((25, 25)) / 625, backend).method == "fft"
    assert gd.get_backend("numpy").direct_max_size == 0  # the threaded FFT wins on the CPU
    with pytest.raises(GpudeconvError, match="method must be one of"):
        gd.operators.Convolution(np.ones((5, 5)) / 25, method="wavelet")


def test_image_smaller_than_the_psf(backend):
    psf = gd.psf.gaussian(6.0, size=21, ratio=0.5)
    x = np.random.default_rng(6).random((3, 40))
    result = to_numpy(gd.operators.Convolution(psf, backend).forward(backend.asarray(x)))
    expected = scipy.signal.convolve2d(x, psf.astype(np.float64) / psf.sum(), mode="same")
    np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-9)
