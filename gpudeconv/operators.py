"""Blur operators: ``forward`` (blur) and its exact transpose ``adjoint``.

Operators compute linear convolution of the array they are given, zero outside it; padding for
image borders is the caller's job (ARCHITECTURE.md, "Operators").
"""

from __future__ import annotations

import numpy as np

from ._errors import GpudeconvError
from .backend import Backend, get_backend
from .psf import validate_psf

__all__ = ["Convolution"]

_METHODS = ("auto", "fft", "direct")


class Convolution:
    """Convolution by one PSF everywhere (shift-invariant blur).

    Parameters
    ----------
    psf : (k, k) array_like
        Odd sides; normalized to sum 1.
    backend : {'auto', 'numpy', 'cupy'} or Backend, optional
    method : {'auto', 'fft', 'direct'}
        ``'auto'`` sums directly for PSFs up to the backend's ``direct_max_size`` (7 on the GPU;
        none on the CPU, where the threaded FFT was faster even for 3x3) and uses FFTs otherwise.

    Notes
    -----
    .. math:: (Hx)_i = \\sum_j x_j\\, h_{i-j}, \\qquad (H^T y)_j = \\sum_i y_i\\, h_{i-j}

    with ``h`` indexed from its centre (index ``k // 2`` at offset 0) and ``x`` zero outside
    the array. The FFT path pads each axis by at least the PSF radius, so the circular wrap of
    the transform never reaches the returned window; the OTF is computed once per array shape.
    """

    def __init__(self, psf, backend: str | Backend | None = None, *, method: str = "auto"):
        if method not in _METHODS:
            msg = f"method must be one of {', '.join(_METHODS)}, got {method!r}"
            raise GpudeconvError(msg)
        self.backend = get_backend(backend)
        host_psf = validate_psf(self.backend.to_host(psf))
        if host_psf.ndim != 2:
            msg = f"Convolution takes one 2-D PSF, got shape {host_psf.shape}"
            raise GpudeconvError(msg)
        self._host_psf = host_psf
        self.shape = host_psf.shape
        self.radius = (self.shape[0] // 2, self.shape[1] // 2)
        if method == "auto":
            method = "direct" if max(self.shape) <= self.backend.direct_max_size else "fft"
        self.method = method
        self._psf = {}  # dtype -> PSF on the backend
        self._plans = {}  # (shape, dtype) -> (fft_shape, otf, adjoint otf)

    @property
    def psf(self) -> np.ndarray:
        """The normalized PSF (float64 NumPy)."""
        return self._host_psf

    def _psf_as(self, dtype):
        key = np.dtype(dtype)
        if key not in self._psf:
            self._psf[key] = self.backend.asarray(self._host_psf, dtype=key)
        return self._psf[key]

    def _plan(self, shape, dtype):
        """FFT shape, OTF and adjoint OTF for images of ``shape``: computed once, then reused."""
        key = (tuple(shape[-2:]), np.dtype(dtype))
        plan = self._plans.get(key)
        if plan is None:
            height, width = key[0]
            # at least the PSF radius of margin for the wrap, and room for the PSF itself
            fft_shape = self.backend.fft_shape(
                (
                    max(height + self.radius[0], self.shape[0]),
                    max(width + self.radius[1], self.shape[1]),
                )
            )
            otf = self.backend.otf(self._psf_as(dtype), fft_shape)
            plan = (fft_shape, otf, self.backend.adjoint_otf(otf))
            self._plans[key] = plan
        return plan

    def _apply(self, x, adjoint: bool, out):
        backend = self.backend
        x = backend.asarray(x)
        if x.ndim < 2:
            msg = f"Convolution needs arrays of at least 2 dimensions, got shape {x.shape}"
            raise GpudeconvError(msg)
        if x.ndim > 2:  # a stack of planes, each convolved on its own
            if out is None:
                out = backend.xp.empty_like(x)
            for index in np.ndindex(*x.shape[:-2]):
                self._apply(x[index], adjoint, out[index])
            return out
        if self.method == "direct":
            kernel = self._psf_as(x.dtype)
            return backend.direct_convolve(x, kernel, adjoint=adjoint, out=out)
        fft_shape, otf, adjoint_otf = self._plan(x.shape, x.dtype)
        return backend.fft_convolve(x, adjoint_otf if adjoint else otf, fft_shape, out=out)

    def forward(self, x, out=None):
        """Blur ``x``: ``y_i = sum_j x_j h_{i-j}`` (linear, zero outside). Same shape as ``x``;
        written into ``out`` when given (same shape and dtype), else a new array."""
        return self._apply(x, adjoint=False, out=out)

    def adjoint(self, y, out=None):
        """The exact transpose of :meth:`forward`: correlation with the PSF."""
        return self._apply(y, adjoint=True, out=out)

    def __repr__(self) -> str:
        return (
            f"Convolution(psf {self.shape[0]}x{self.shape[1]}, {self.method}, {self.backend.name})"
        )
