"""Blur operators: ``forward`` (blur) and its exact transpose ``adjoint``.

Operators compute linear convolution of the array they are given, zero outside it; padding for
image borders is the caller's job (ARCHITECTURE.md, "Operators").
"""

from __future__ import annotations

import numpy as np

from ._errors import GpudeconvError
from .backend import Backend, get_backend, sv_tile
from .psf import PSFField, validate_psf

__all__ = ["Convolution", "SpatiallyVaryingConvolution"]

_METHODS = ("auto", "fft", "direct")


class _Operator:
    """What every blur operator shares: arrays moved to its backend, stacks of planes taken one
    plane at a time, ``forward``/``adjoint`` with ``out=``. Subclasses blur one 2-D plane."""

    backend: Backend

    def _apply_plane(self, x, adjoint: bool, out):
        raise NotImplementedError

    def _apply(self, x, adjoint: bool, out):
        backend = self.backend
        x = backend.asarray(x)
        if x.ndim < 2:
            msg = (
                f"{type(self).__name__} needs arrays of at least 2 dimensions, got shape {x.shape}"
            )
            raise GpudeconvError(msg)
        if x.ndim > 2:  # a stack of planes, each convolved on its own
            if out is None:
                out = backend.xp.empty_like(x)
            for index in np.ndindex(*x.shape[:-2]):
                self._apply_plane(x[index], adjoint, out[index])
            return out
        return self._apply_plane(x, adjoint, out)

    def forward(self, x, out=None):
        """Blur ``x``: ``y_i = sum_j x_j h_j[i - j]`` with ``h_j`` the PSF at source pixel ``j``
        (linear, zero outside). Same shape as ``x`` (2-D, or a stack of planes); written into
        ``out`` when given (same shape and dtype), else a new array."""
        return self._apply(x, adjoint=False, out=out)

    def adjoint(self, y, out=None):
        """The exact transpose of :meth:`forward`: ``x_j = sum_i y_i h_j[i - j]`` (correlation
        with the PSF of each pixel)."""
        return self._apply(y, adjoint=True, out=out)


class Convolution(_Operator):
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

    def _apply_plane(self, x, adjoint: bool, out):
        backend = self.backend
        if self.method == "direct":
            kernel = self._psf_as(x.dtype)
            return backend.direct_convolve(x, kernel, adjoint=adjoint, out=out)
        fft_shape, otf, adjoint_otf = self._plan(x.shape, x.dtype)
        return backend.fft_convolve(x, adjoint_otf if adjoint else otf, fft_shape, out=out)

    def __repr__(self) -> str:
        return (
            f"Convolution(psf {self.shape[0]}x{self.shape[1]}, {self.method}, {self.backend.name})"
        )


class _AxisLayout:
    """The interpolation of the field's nodes along one axis of an array (rows or columns).

    ``lower``/``frac`` are the tables of ``kernels/sv_convolve.cu`` (host NumPy); ``weights[n]``
    is node n's weight at every index (``1 - frac`` or ``frac``, computed in the working dtype
    exactly as the kernel does); ``support[n]`` the first and last index where it is non-zero
    (None where node n does not reach this array) and ``region[n]`` the support widened by the
    PSF radius and clipped: where the node's light lands (forward) or is gathered from (adjoint).
    """

    def __init__(self, field: PSFField, axis: int, origin: int, length: int, dtype) -> None:
        coords = origin + np.arange(length, dtype=np.float64)
        lower, frac = field.axis_weights(coords, axis)
        self.lower = np.ascontiguousarray(lower, dtype=np.int32)
        self.frac = np.ascontiguousarray(frac, dtype=dtype)
        one = self.frac.dtype.type(1)
        radius = field.radius
        self.weights, self.support, self.region = [], [], []
        for node in range(field.grid[axis]):
            weight = np.where(
                self.lower == node,
                one - self.frac,
                np.where(self.lower + 1 == node, self.frac, self.frac.dtype.type(0)),
            )
            nonzero = np.flatnonzero(weight)
            self.weights.append(weight)
            if nonzero.size == 0:
                self.support.append(None)
                self.region.append(None)
                continue
            first, last = int(nonzero[0]), int(nonzero[-1])
            self.support.append((first, last + 1))
            self.region.append((max(first - radius, 0), min(last + 1 + radius, length)))

    def active(self) -> list[int]:
        return [node for node, span in enumerate(self.support) if span is not None]

    def tile_nodes(self, tile: int, reach: int) -> float:
        """Mean number of nodes that a kernel tile of ``tile`` pixels (plus ``reach``) touches."""
        length = self.lower.size
        starts = np.arange(0, length, tile)
        first = np.maximum(starts - reach, 0)
        last = np.minimum(starts + tile - 1 + reach, length - 1)
        low = self.lower[first] + (self.frac[first] >= 1)
        high = self.lower[last] + (self.frac[last] > 0)
        return float(np.mean(high - low + 1))


class _Layout:
    """Everything per array shape and dtype: tables, node spans, device copies, the method."""

    def __init__(self, operator: SpatiallyVaryingConvolution, shape, dtype) -> None:
        backend = operator.backend
        field = operator.field
        self.rows = _AxisLayout(field, 0, operator.origin[0], shape[0], dtype)
        self.cols = _AxisLayout(field, 1, operator.origin[1], shape[1], dtype)
        self.tables = tuple(
            backend.asarray(table)
            for table in (self.rows.lower, self.rows.frac, self.cols.lower, self.cols.frac)
        )
        self.row_weights = [backend.asarray(w[:, None]) for w in self.rows.weights]
        self.col_weights = [backend.asarray(w[None, :]) for w in self.cols.weights]
        self.nodes = [(a, b) for a in self.rows.active() for b in self.cols.active()]
        self.costs = operator._costs(self, shape)
        self.method = (
            operator.requested_method
            if operator.requested_method != "auto"
            else min(self.costs, key=self.costs.get)
        )

    def regions(self, a: int, b: int) -> tuple[slice, slice, slice, slice]:
        """Rows and columns of node (a, b)'s region, and of its support inside that region."""
        (r0, r1), (c0, c1) = self.rows.region[a], self.cols.region[b]
        (s0, s1), (t0, t1) = self.rows.support[a], self.cols.support[b]
        return slice(r0, r1), slice(c0, c1), slice(s0 - r0, s1 - r0), slice(t0 - c0, t1 - c0)


class SpatiallyVaryingConvolution(_Operator):
    """Convolution by a PSF that varies across the field (a :class:`~gpudeconv.PSFField`).

    Parameters
    ----------
    field : PSFField
        Node PSFs on a regular grid; the PSF of a pixel is the bilinear mix of its four
        nearest nodes (clamped beyond the outer nodes).
    backend : {'auto', 'numpy', 'cupy'} or Backend, optional
    method : {'auto', 'fft', 'direct'}
        ``'fft'``: a sum over nodes of FFT convolutions of weighted images, each limited to the
        rows and columns its weight reaches. ``'direct'``: the direct sum, as one raw CUDA
        kernel on the GPU (PSFs up to 31 px; ``kernels/sv_convolve.cu``) and as the same sum
        over nodes with direct convolutions elsewhere (its exact, slow, NumPy twin). ``'auto'``
        picks the cheaper by a cost model of the backend (:attr:`costs`), per array shape.
    origin : (int, int)
        Field coordinates of the array's pixel (0, 0): ``(-p, -p)`` for an image padded by
        ``p``, the tile's corner for a tile of a mosaic. Arrays may have any shape; pixels beyond
        the field's outer nodes take the outer nodes' PSFs.

    Notes
    -----
    With :math:`h_n` the node PSFs and :math:`w_n` their bilinear weights (:math:`\\sum_n w_n = 1`),

    .. math::

        (Hx)_i = \\sum_j x_j\\, h_j[i-j] = \\sum_n \\bigl(h_n * (w_n x)\\bigr)_i, \\qquad
        (H^T y)_j = \\sum_n w_n[j]\\, (h_n \\star y)_j

    where :math:`h_j = \\sum_n w_n[j] h_n` is the PSF at source pixel :math:`j`: each source
    spreads its light with the PSF at its own position [1]_ [2]_, so flux is conserved away from
    the edges and the adjoint is the exact transpose.

    References
    ----------
    .. [1] Nagy, J. G. & O'Leary, D. P. (1998), "Restoring images degraded by spatially variant
           blur", SIAM J. Sci. Comput. 19, 1063. :doi:`10.1137/S106482759528507X`
    .. [2] Denis, L., Thiebaut, E., Soulez, F., Becker, J.-M. & Mourya, R. (2015), "Fast
           approximations of shift-variant blur", IJCV 115, 253.
           :doi:`10.1007/s11263-015-0817-x`
    """

    def __init__(
        self,
        field: PSFField,
        backend: str | Backend | None = None,
        *,
        method: str = "auto",
        origin: tuple[int, int] = (0, 0),
    ):
        if not isinstance(field, PSFField):
            msg = (
                f"SpatiallyVaryingConvolution takes a gpudeconv.PSFField, got "
                f"{type(field).__name__}; use Convolution for a single PSF"
            )
            raise GpudeconvError(msg)
        if method not in _METHODS:
            msg = f"method must be one of {', '.join(_METHODS)}, got {method!r}"
            raise GpudeconvError(msg)
        self.field = field
        self.backend = get_backend(backend)
        self.requested_method = method
        self.origin = (int(origin[0]), int(origin[1]))
        self.size = field.size
        self.shape = (field.size, field.size)
        self.radius = (field.radius, field.radius)
        self._psfs = {}  # dtype -> (ny, nx, k, k) on the backend
        self._layouts = {}  # (shape, dtype) -> _Layout
        self._plans = {}  # (node, region shape, dtype) -> (fft_shape, otf, adjoint otf)

    # ------------------------------------------------------------------ planning
    def _psfs_as(self, dtype):
        key = np.dtype(dtype)
        if key not in self._psfs:
            self._psfs[key] = self.backend.asarray(self.field.psfs, dtype=key)
        return self._psfs[key]

    def _layout(self, shape, dtype) -> _Layout:
        key = (tuple(shape[-2:]), np.dtype(dtype))
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = _Layout(self, key[0], key[1])
        return layout

    def _fft_shape(self, region_shape) -> tuple[int, int]:
        k = self.size
        return self.backend.fft_shape(tuple(max(n + k // 2, k) for n in region_shape))

    def _costs(self, layout: _Layout, shape) -> dict[str, float]:
        """Estimated seconds of one forward (or adjoint) application by each method."""
        rates = self.backend.cost_rates
        k = self.size
        areas, ffts = [], []
        for a, b in layout.nodes:
            (r0, r1), (c0, c1) = layout.rows.region[a], layout.cols.region[b]
            areas.append((r1 - r0) * (c1 - c0))
            size = int(np.prod(self._fft_shape((r1 - r0, c1 - c0))))
            ffts.append(size * np.log2(size))
        calls = len(layout.nodes) * rates.call
        costs = {
            "fft": float(sum(ffts) / rates.fft + calls),
            "direct": float(sum(areas) * k * k / rates.direct + calls),
        }
        if k <= self.backend.sv_kernel_max_size and rates.sv_kernel > 0:
            passes = self._kernel_passes(layout)
            costs["direct"] = float(
                shape[0] * shape[1] * k * k * passes / rates.sv_kernel + rates.call
            )
        return costs

    def _kernel_passes(self, layout: _Layout) -> float:
        # a block of the kernel stages its tile once for each node that touches it
        tile_rows, tile_cols = sv_tile(layout.rows.frac.dtype.itemsize)
        reach = self.size // 2
        return layout.rows.tile_nodes(tile_rows, reach) * layout.cols.tile_nodes(tile_cols, reach)

    def kernel_passes(self, shape, dtype=np.float32) -> float:
        """Mean number of node passes that the direct kernel makes per pixel for arrays of
        ``shape`` (its work is ``k^2`` multiply-adds per pass): the benchmarks' FLOP count."""
        return self._kernel_passes(self._layout(shape, dtype))

    def method_for(self, shape, dtype=np.float32) -> str:
        """The method used for arrays of ``shape`` (``'fft'`` or ``'direct'``)."""
        return self._layout(shape, dtype).method

    def costs(self, shape, dtype=np.float32) -> dict[str, float]:
        """The cost model's estimate, in seconds, of each method for arrays of ``shape``."""
        return dict(self._layout(shape, dtype).costs)

    def _otf(self, a: int, b: int, region_shape, dtype):
        key = (a, b, tuple(region_shape), np.dtype(dtype))
        plan = self._plans.get(key)
        if plan is None:
            fft_shape = self._fft_shape(region_shape)
            otf = self.backend.otf(self._psfs_as(dtype)[a, b], fft_shape)
            plan = self._plans[key] = (fft_shape, otf, self.backend.adjoint_otf(otf))
        return plan

    # ------------------------------------------------------------------ applying
    def _node_convolve(self, layout: _Layout, a: int, b: int, region, adjoint: bool):
        if layout.method == "direct":
            psf = self._psfs_as(region.dtype)[a, b]
            return self.backend.direct_convolve(region, psf, adjoint=adjoint)
        fft_shape, otf, adjoint_otf = self._otf(a, b, region.shape, region.dtype)
        return self.backend.fft_convolve(region, adjoint_otf if adjoint else otf, fft_shape)

    def _apply_plane(self, x, adjoint: bool, out):
        backend = self.backend
        layout = self._layout(x.shape, x.dtype)
        if layout.method == "direct" and self.size <= backend.sv_kernel_max_size:
            return backend.sv_direct(
                x, self._psfs_as(x.dtype), layout.tables, adjoint=adjoint, out=out
            )
        result = backend.xp.zeros_like(x)
        for a, b in layout.nodes:
            rows, cols, support_rows, support_cols = layout.regions(a, b)
            wy, wx = layout.row_weights[a][rows], layout.col_weights[b][:, cols]
            if adjoint:  # x_j += w_n[j] (h_n correlated with y)_j over the node's support
                gathered = self._node_convolve(layout, a, b, x[rows, cols], adjoint=True)
                weight = wy[support_rows] * wx[:, support_cols]
                result[rows, cols][support_rows, support_cols] += (
                    weight * gathered[support_rows, support_cols]
                )
            else:  # y += h_n * (w_n x), landing in the node's region
                weighted = x[rows, cols] * wy * wx
                result[rows, cols] += self._node_convolve(layout, a, b, weighted, adjoint=False)
        if out is None:
            return result
        out[...] = result
        return out

    def __repr__(self) -> str:
        ny, nx = self.field.grid
        return (
            f"SpatiallyVaryingConvolution(grid {ny}x{nx}, psf {self.size}x{self.size}, "
            f"{self.requested_method}, {self.backend.name})"
        )
