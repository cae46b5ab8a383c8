"""Spatially varying PSFs: a regular grid of node PSFs over an image, bilinear in between.

Node ``(a, b)`` of an ``ny x nx`` grid over an ``H x W`` image sits at the centre of cell
``(a, b)``: row ``(a + 0.5) * H / ny - 0.5``, column ``(b + 0.5) * W / nx - 0.5`` (pixel centres
at integer coordinates). The PSF at any pixel mixes the (at most) four nearest nodes with
bilinear weights, clamped beyond the outer nodes, so the weights always sum to 1 and the mixed
PSF sums to 1 (ARCHITECTURE.md, "Operators").
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits

from .._errors import GpudeconvError
from ..backend import is_cupy_array
from ..io import _FITS_ERRORS, _FORMAT_OF_EXTENSION, _write_atomically, check_output_path
from . import models
from ._validate import validate_odd_size, validate_psf

__all__ = ["FieldWindow", "PSFField", "aberrated_field"]

#: Value of the GDKIND header keyword that marks a FITS file as a PSF field.
FIELD_KIND = "PSFFIELD"

_FITS_EXTENSIONS = tuple(ext for ext, fmt in _FORMAT_OF_EXTENSION.items() if fmt == "FITS")
_SHAPE_KEYS = ("GRIDNY", "GRIDNX", "IMAGEH", "IMAGEW", "PSFSIZE")


class PSFField:
    """PSFs at the nodes of a regular ny x nx grid over an image; bilinear in between.

    Parameters
    ----------
    psfs : (ny, nx, k, k) array_like
        The node PSFs, ``k`` odd; finite, non-negative, each with light in it. Each is
        normalized to sum 1. A CuPy array is copied to the host.
    image_shape : (H, W) tuple of int
        Shape of the image the grid covers; at most ``H`` node rows and ``W`` node columns.

    Attributes
    ----------
    psfs : (ny, nx, k, k) ndarray of float64
        The normalized node PSFs, read-only.
    image_shape : (H, W) tuple of int

    Notes
    -----
    Node ``(a, b)`` sits at the centre of cell ``(a, b)`` of the grid:

    .. math:: y_a = (a + \\tfrac12)\\,\\frac{H}{n_y} - \\tfrac12, \\qquad
              x_b = (b + \\tfrac12)\\,\\frac{W}{n_x} - \\tfrac12

    The PSF at pixel ``(y, x)`` is :math:`h_{y,x} = \\sum_{a,b} w_a(y)\\, w_b(x)\\, h_{ab}`,
    with the 1-D bilinear weights of `axis_weights` (clamped beyond the outer nodes).

    Examples
    --------
    >>> import gpudeconv as gd
    >>> field = gd.psf.aberrated_field((1000, 1500), (3, 4), fwhm_centre=3, fwhm_corner=6)
    >>> field.psf_at(0, 0).shape == (field.size, field.size)
    True
    """

    def __init__(self, psfs, image_shape):
        self._image_shape = _validate_image_shape(image_shape)
        array = _to_host(psfs)
        _validate_field_layout(array, self._image_shape)
        ny, nx, k, _ = array.shape
        normalized = np.empty((ny, nx, k, k), dtype=np.float64)
        for a in range(ny):
            for b in range(nx):
                normalized[a, b] = validate_psf(
                    array[a, b], name=f"PSF field node ({a}, {b})", warn_sum=False
                )
        normalized.setflags(write=False)
        self._psfs = normalized

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def uniform(cls, psf, image_shape) -> PSFField:
        """A 1 x 1 field: the same ``(k, k)`` PSF everywhere on an image of ``image_shape``."""
        array = _to_host(psf)
        if array.ndim != 2:
            msg = f"uniform takes one 2-D PSF, got shape {array.shape}"
            raise GpudeconvError(msg)
        return cls(array[None, None], image_shape)

    @classmethod
    def from_function(
        cls,
        function: Callable[[float, float], np.ndarray],
        image_shape,
        grid,
        *,
        size: int | None = None,
    ) -> PSFField:
        """Build a field from ``function(y, x)``, the PSF at pixel ``(y, x)``, called at each node.

        Parameters
        ----------
        function : callable
            Takes the node's row and column (floats, pixel coordinates) and returns a 2-D PSF
            with odd sides (e.g. ``lambda y, x: gd.psf.gaussian(3 + x / 500)``).
        image_shape : (H, W) tuple of int
        grid : (ny, nx) tuple of int
            Nodes along rows and columns.
        size : odd int, optional
            Side of the node PSFs. By default the largest side returned; smaller PSFs are
            padded with zeros around their centre, larger ones cropped symmetrically (the
            cropped light is lost and the rest normalized to sum 1).

        Returns
        -------
        PSFField
        """
        image_shape = _validate_image_shape(image_shape)
        ny, nx = _validate_grid(grid, image_shape)
        if size is not None:
            size = validate_odd_size(size)
        rows = _node_positions(image_shape[0], ny)
        cols = _node_positions(image_shape[1], nx)
        nodes = {}
        for a in range(ny):
            for b in range(nx):
                psf = _to_host(function(float(rows[a]), float(cols[b])))
                if psf.ndim != 2 or min(psf.shape) < 1:
                    msg = (
                        f"function returned shape {psf.shape} for node ({a}, {b}) at "
                        f"(y, x) = ({rows[a]:g}, {cols[b]:g}); it must return a 2-D PSF"
                    )
                    raise GpudeconvError(msg)
                if psf.shape[0] % 2 == 0 or psf.shape[1] % 2 == 0:
                    msg = (
                        f"function returned a {psf.shape[0]}x{psf.shape[1]} PSF for node "
                        f"({a}, {b}); its sides must be odd so that it has a centre pixel"
                    )
                    raise GpudeconvError(msg)
                nodes[a, b] = psf
        k = size if size is not None else max(max(p.shape) for p in nodes.values())
        psfs = np.zeros((ny, nx, k, k), dtype=np.float64)
        for (a, b), psf in nodes.items():
            psfs[a, b] = _centre_to_size(psf, k)
        return cls(psfs, image_shape)

    # --- geometry -------------------------------------------------------------------------

    @property
    def psfs(self) -> np.ndarray:
        """(ny, nx, k, k) float64 node PSFs, each summing to 1; read-only."""
        return self._psfs

    @property
    def image_shape(self) -> tuple[int, int]:
        """(H, W): shape of the image the grid covers."""
        return self._image_shape

    @property
    def grid(self) -> tuple[int, int]:
        """(ny, nx): nodes along rows and along columns."""
        return int(self._psfs.shape[0]), int(self._psfs.shape[1])

    @property
    def size(self) -> int:
        """k, the side of the node PSFs."""
        return int(self._psfs.shape[-1])

    @property
    def radius(self) -> int:
        """k // 2: how far a PSF reaches from its centre pixel."""
        return self.size // 2

    def node_rows(self) -> np.ndarray:
        """Row of each node row, ``(a + 0.5) * H / ny - 0.5`` for a in 0..ny-1 (float64)."""
        return _node_positions(self.image_shape[0], self.grid[0])

    def node_cols(self) -> np.ndarray:
        """Column of each node column, ``(b + 0.5) * W / nx - 0.5`` for b in 0..nx-1 (float64)."""
        return _node_positions(self.image_shape[1], self.grid[1])

    # --- interpolation ----------------------------------------------------------------------

    def axis_weights(self, coords, axis: int) -> tuple[np.ndarray, np.ndarray]:
        """Bilinear weights along one axis: the lower node and the weight of the upper one.

        Parameters
        ----------
        coords : array_like of float
            Pixel coordinates along ``axis`` (pixel centres at integers); they may lie outside
            the image (padding), where the outer node takes the whole weight.
        axis : {0, 1}
            0 for rows (image height ``H``, ``ny`` nodes), 1 for columns (``W``, ``nx``).

        Returns
        -------
        index : ndarray of int32, shape of ``coords``
            The lower node, in ``[0, n - 2]`` (0 when ``n == 1``).
        frac : ndarray of float64, shape of ``coords``
            In ``[0, 1]``: node ``index`` has weight ``1 - frac``, node ``index + 1`` weight
            ``frac`` (0 everywhere when ``n == 1``).

        Notes
        -----
        With ``n`` nodes over a length ``L``, exactly (other code depends on this rule):

        .. math:: t = \\operatorname{clip}\\left((c + \\tfrac12)\\,\\frac{n}{L} - \\tfrac12,
                  \\; 0, \\; n - 1\\right), \\quad
                  \\mathrm{index} = \\min(\\lfloor t \\rfloor, n - 2), \\quad
                  \\mathrm{frac} = t - \\mathrm{index}

        so ``t`` is the coordinate in node units (node ``a`` at ``t = a``).
        """
        if axis not in (0, 1):
            msg = f"axis must be 0 (rows) or 1 (columns), got {axis!r}"
            raise GpudeconvError(msg)
        c = np.asarray(coords, dtype=np.float64)
        length = self.image_shape[axis]
        n = self.grid[axis]
        if n == 1:
            return np.zeros(c.shape, dtype=np.int32), np.zeros(c.shape, dtype=np.float64)
        t = (c + 0.5) * n / length - 0.5
        t = np.clip(t, 0, n - 1)
        index = np.minimum(np.floor(t), n - 2)
        frac = t - index
        return index.astype(np.int32), frac

    def weights(self, y: float, x: float) -> np.ndarray:
        """(ny, nx) float64 weights of the nodes at pixel ``(y, x)``: sum 1, at most 4 non-zero."""
        return np.outer(self._axis_vector(y, 0), self._axis_vector(x, 1))

    def psf_at(self, y: float, x: float) -> np.ndarray:
        """(k, k) float64 PSF at pixel ``(y, x)``: the weighted sum of the node PSFs (sum 1)."""
        return np.tensordot(self.weights(y, x), self._psfs, axes=2)

    def _axis_vector(self, coord: float, axis: int) -> np.ndarray:
        index, frac = self.axis_weights(coord, axis)
        vector = np.zeros(self.grid[axis], dtype=np.float64)
        i, f = int(index), float(frac)
        vector[i] = 1.0 - f
        if f:
            vector[i + 1] = f
        return vector

    # --- files ------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the field as FITS: a 4-D float32 primary HDU with its geometry in the header.

        Parameters
        ----------
        path : str or path-like
            A FITS file name (``.fits``, ``.fit``, ``.fts``, optionally ``.gz``).
        overwrite : bool
            Replace an existing file. Default False: an existing file is an error.

        Returns
        -------
        pathlib.Path
            The path written.

        Notes
        -----
        The data are ``psfs`` as float32, so FITS lists the axes the other way round
        (``NAXIS1 = NAXIS2 = k``, ``NAXIS3 = nx``, ``NAXIS4 = ny``). The header holds
        ``GDKIND = 'PSFFIELD'``, ``GRIDNY``, ``GRIDNX``, ``IMAGEH``, ``IMAGEW`` and ``PSFSIZE``.
        The file is written beside the target and renamed onto it, so it appears whole or not
        at all.
        """
        target = Path(path)
        if not target.name.lower().endswith(_FITS_EXTENSIONS):
            msg = (
                f"a PSF field is saved as FITS, got {target}: use one of the extensions "
                f"{', '.join(_FITS_EXTENSIONS)}"
            )
            raise GpudeconvError(msg)
        target = check_output_path(target, overwrite=overwrite)
        hdu = fits.PrimaryHDU(data=self._psfs.astype(np.float32))
        ny, nx = self.grid
        height, width = self.image_shape
        header = hdu.header
        header["GDKIND"] = (FIELD_KIND, "gpudeconv spatially varying PSF field")
        header["GRIDNY"] = (ny, "node rows (ny), data axis NAXIS4")
        header["GRIDNX"] = (nx, "node columns (nx), data axis NAXIS3")
        header["IMAGEH"] = (height, "height H of the image the grid covers, pixels")
        header["IMAGEW"] = (width, "width W of the image the grid covers, pixels")
        header["PSFSIZE"] = (self.size, "side k of each node PSF, odd (NAXIS1, NAXIS2)")
        header.add_comment("Node (a, b) sits at the centre of cell (a, b) of a regular ny x nx")
        header.add_comment("grid: row (a + 0.5) * H / ny - 0.5, column (b + 0.5) * W / nx - 0.5,")
        header.add_comment("0-based, pixel centres at integers. The PSF at a pixel is the")
        header.add_comment("bilinear interpolation of the nearest nodes, clamped beyond the outer")
        header.add_comment("nodes. Each node PSF sums to 1, its centre at pixel (k//2, k//2).")
        _write_atomically(target, lambda tmp: hdu.writeto(tmp, overwrite=True))
        return target

    @classmethod
    def load(cls, path: str | os.PathLike) -> PSFField:
        """Read a field written by `save`.

        Raises
        ------
        GpudeconvError
            If the file is missing or unreadable, is not a PSF field (a plain 2-D PSF image
            is one PSF: pass it as such), or its data disagree with its header.
        """
        path = Path(path)
        if not path.is_file():
            msg = f"PSF field file {path} does not exist: check the path"
            raise GpudeconvError(msg)
        try:
            # memmap=None as in gpudeconv.io: memmap=True refuses scaled (BZERO) data.
            with fits.open(path, mode="readonly", memmap=None) as hdul:
                header = hdul[0].header.copy()
                if header.get("GDKIND") != FIELD_KIND:
                    raise _not_a_field(path, header)
                data = hdul[0].data
                data = None if data is None else np.array(data, dtype=np.float64)
        except GpudeconvError:
            raise
        except _FITS_ERRORS as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            msg = f"{path} is not a readable FITS file ({reason}): give a PSF field file"
            raise GpudeconvError(msg) from exc
        values = {}
        for key in _SHAPE_KEYS:
            value = header.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                msg = (
                    f"{path} is a damaged PSF field: header key {key} is {value!r}, expected a "
                    "positive integer; save the field again"
                )
                raise GpudeconvError(msg)
            values[key] = value
        expected = (values["GRIDNY"], values["GRIDNX"], values["PSFSIZE"], values["PSFSIZE"])
        found = None if data is None else data.shape
        if found != expected:
            msg = (
                f"{path} is a damaged PSF field: its data have shape {found} but its header "
                f"says (GRIDNY, GRIDNX, PSFSIZE, PSFSIZE) = {expected}; save the field again"
            )
            raise GpudeconvError(msg)
        try:
            return cls(data, (values["IMAGEH"], values["IMAGEW"]))
        except GpudeconvError as exc:
            msg = f"{path}: {exc}"
            raise GpudeconvError(msg) from exc

    @staticmethod
    def is_field_file(path: str | os.PathLike) -> bool:
        """Whether ``path`` is a FITS file whose primary header says ``GDKIND = 'PSFFIELD'``.

        Reads the primary header only. False for a missing, unreadable or non-FITS file, so
        that the caller reads it as a single PSF and reports what is wrong with it.
        """
        path = Path(path)
        if not path.name.lower().endswith(_FITS_EXTENSIONS) or not path.is_file():
            return False
        try:
            with fits.open(path, mode="readonly") as hdul:
                return hdul[0].header.get("GDKIND") == FIELD_KIND
        except _FITS_ERRORS:
            return False

    def window(self, y0: int, x0: int, height: int, width: int) -> FieldWindow:
        """The part of the field over rows ``y0 .. y0 + height`` and columns ``x0 .. x0 + width``
        of the image (it may reach beyond the image, where the outer nodes' PSFs hold): what a
        tile of a mosaic is restored with. ``richardson_lucy`` takes it for an image of
        ``(height, width)``."""
        return FieldWindow(self, (int(y0), int(x0)), (int(height), int(width)))

    def check_image_shape(self, shape, *, name: str = "the PSF field") -> None:
        """Refuse, in one line, an image whose ``(H, W)`` is not the one this field was made for
        (its nodes would sit in the wrong places)."""
        height, width = (int(n) for n in tuple(shape)[-2:])
        if (height, width) != self.image_shape:
            msg = (
                f"{name} was made for images of {self.image_shape[0]}x{self.image_shape[1]} "
                f"pixels, but the image is {height}x{width}; estimate or build the field for "
                "this image"
            )
            raise GpudeconvError(msg)

    def __repr__(self) -> str:
        ny, nx = self.grid
        height, width = self.image_shape
        k = self.size
        return f"PSFField(grid {ny}x{nx}, psf {k}x{k}, image {height}x{width})"


@dataclass(frozen=True)
class FieldWindow:
    """A window of a :class:`PSFField`: the field seen by an array of ``shape`` whose pixel
    (0, 0) lies at ``origin`` (row, column) of the field's image. Made by `PSFField.window`."""

    field: PSFField
    origin: tuple[int, int]
    shape: tuple[int, int]

    @property
    def radius(self) -> int:
        return self.field.radius

    def check_image_shape(self, shape, *, name: str = "the PSF field window") -> None:
        """Refuse an image whose ``(H, W)`` is not the window's."""
        height, width = (int(n) for n in tuple(shape)[-2:])
        if (height, width) != self.shape:
            msg = (
                f"{name} covers {self.shape[0]}x{self.shape[1]} pixels, but the image is "
                f"{height}x{width}; take the window of the tile's own size"
            )
            raise GpudeconvError(msg)


def aberrated_field(
    image_shape,
    grid,
    *,
    fwhm_centre: float,
    fwhm_corner: float,
    elongation_corner: float = 1.0,
    beta: float | None = None,
    size: int | None = None,
) -> PSFField:
    """A field whose PSF widens and stretches radially away from the image centre.

    A simple model of field curvature, sensor tilt and coma-like off-axis aberrations, for
    tests and demos.

    Parameters
    ----------
    image_shape : (H, W) tuple of int
    grid : (ny, nx) tuple of int
        Nodes along rows and columns.
    fwhm_centre, fwhm_corner : float
        Major-axis FWHM in pixels at the image centre and at the corners; linear in the
        distance from the centre in between.
    elongation_corner : float, >= 1
        Major over minor FWHM at the corners (1: round everywhere); linear in the distance
        from the centre, from 1 at the centre.
    beta : float, optional
        Moffat PSFs with this wing exponent; Gaussian PSFs if None.
    size : odd int, optional
        Side of the node PSFs; by default the largest automatic size of the models.

    Returns
    -------
    PSFField

    Notes
    -----
    With the centre :math:`(y_c, x_c) = ((H - 1)/2, (W - 1)/2)` and
    :math:`\\rho = \\sqrt{(y - y_c)^2 + (x - x_c)^2} / \\sqrt{y_c^2 + x_c^2}` (0 at the
    centre, 1 at the corner pixel centres), the node at :math:`(y, x)` gets

    .. math:: \\mathrm{FWHM} = f_c + (f_k - f_c)\\,\\rho, \\quad
              \\mathrm{ratio} = \\frac{1}{1 + (e_k - 1)\\,\\rho}, \\quad
              \\theta = \\operatorname{atan2}(y - y_c, x - x_c)

    The major axis points along the radius, through the image centre. :math:`\\theta` is in
    the convention of `gpudeconv.psf.gaussian`: degrees from +x (columns) towards +y (rows),
    which is counter-clockwise as FITS viewers draw the image (row 0 at the bottom) and
    clockwise when row 0 is drawn at the top (``matplotlib`` ``origin='upper'``).
    """
    image_shape = _validate_image_shape(image_shape)
    _validate_grid(grid, image_shape)
    for name, value in (("fwhm_centre", fwhm_centre), ("fwhm_corner", fwhm_corner)):
        if not (np.isfinite(value) and value > 0):
            msg = f"{name} must be a positive number of pixels, got {value!r}; typically 2 to 8"
            raise GpudeconvError(msg)
    if not (np.isfinite(elongation_corner) and elongation_corner >= 1):
        msg = (
            f"elongation_corner (major/minor FWHM at the corners) must be >= 1, got "
            f"{elongation_corner!r}; 1 is round, 1.5 is a clearly stretched star"
        )
        raise GpudeconvError(msg)
    yc = (image_shape[0] - 1) / 2
    xc = (image_shape[1] - 1) / 2
    corner = math.hypot(yc, xc)

    def psf(y: float, x: float) -> np.ndarray:
        rho = math.hypot(y - yc, x - xc) / corner if corner > 0 else 0.0
        shape = {
            "size": size,
            "ratio": 1.0 / (1.0 + (elongation_corner - 1.0) * rho),
            "angle": math.degrees(math.atan2(y - yc, x - xc)),
        }
        fwhm = fwhm_centre + (fwhm_corner - fwhm_centre) * rho
        if beta is None:
            return models.gaussian(fwhm, **shape)
        return models.moffat(fwhm, beta, **shape)

    return PSFField.from_function(psf, image_shape, grid, size=size)


# --- helpers --------------------------------------------------------------------------------


def _to_host(array) -> np.ndarray:
    return array.get() if is_cupy_array(array) else np.asarray(array)


def _node_positions(length: int, n: int) -> np.ndarray:
    return (np.arange(n, dtype=np.float64) + 0.5) * length / n - 0.5


def _centre_to_size(psf: np.ndarray, k: int) -> np.ndarray:
    """``psf`` (odd sides) padded with zeros or cropped around its centre to ``k x k``."""
    out = np.zeros((k, k), dtype=np.float64)
    # Offsets of the overlap, in psf and in out: centres align at psf.shape // 2 and k // 2.
    src, dst = [], []
    for side in psf.shape:
        half = min(side, k) // 2
        src.append(slice(side // 2 - half, side // 2 + half + 1))
        dst.append(slice(k // 2 - half, k // 2 + half + 1))
    out[tuple(dst)] = psf[tuple(src)]
    return out


def _not_a_field(path: Path, header: fits.Header) -> GpudeconvError:
    if header.get("NAXIS") == 2:
        msg = (
            f"{path} is a 2-D image, not a PSF field: use it as a single PSF (--psf FILE), or "
            "save a field with gpudeconv.PSFField.save"
        )
    else:
        msg = (
            f"{path} is not a PSF field (its primary header has no GDKIND = '{FIELD_KIND}'): "
            "give a file written by gpudeconv.PSFField.save or gpudeconv psf --grid"
        )
    return GpudeconvError(msg)


def _validate_image_shape(image_shape) -> tuple[int, int]:
    try:
        values = tuple(image_shape)
        height, width = (operator.index(v) for v in values)
    except (TypeError, ValueError):
        msg = f"image_shape must be (H, W), two positive integers, got {image_shape!r}"
        raise GpudeconvError(msg) from None
    if isinstance(values[0], bool) or isinstance(values[1], bool) or height < 1 or width < 1:
        msg = f"image_shape must be (H, W), two positive integers, got {image_shape!r}"
        raise GpudeconvError(msg)
    return int(height), int(width)


def _validate_grid(grid, image_shape: tuple[int, int]) -> tuple[int, int]:
    try:
        ny, nx = (operator.index(v) for v in tuple(grid))
    except (TypeError, ValueError):
        msg = f"grid must be (ny, nx), two positive integers, got {grid!r}; e.g. (3, 4)"
        raise GpudeconvError(msg) from None
    _check_grid_fits(ny, nx, image_shape)
    return int(ny), int(nx)


def _check_grid_fits(ny: int, nx: int, image_shape: tuple[int, int]) -> None:
    height, width = image_shape
    if ny < 1 or nx < 1:
        msg = f"a PSF field needs at least one node on each axis, got a {ny}x{nx} grid"
        raise GpudeconvError(msg)
    if ny > height or nx > width:
        msg = (
            f"a {ny}x{nx} grid of PSFs has more nodes than the {height}x{width} image has "
            "pixels along an axis: use at most one node per pixel (typically 3x3 to 8x8)"
        )
        raise GpudeconvError(msg)


def _validate_field_layout(array: np.ndarray, image_shape: tuple[int, int]) -> None:
    if array.ndim != 4:
        msg = (
            f"psfs must be a 4-D (ny, nx, k, k) array of node PSFs, got shape {array.shape}: "
            "for one PSF everywhere use PSFField.uniform(psf, image_shape)"
        )
        raise GpudeconvError(msg)
    ny, nx, ky, kx = array.shape
    if ky != kx:
        msg = (
            f"the node PSFs are {ky}x{kx}; they must be square (k x k): pad the short side "
            "with zeros around the centre"
        )
        raise GpudeconvError(msg)
    if ky % 2 == 0:
        msg = (
            f"the node PSFs are {ky}x{kx}; their side must be odd so that each has a centre "
            "pixel: crop or pad them by one row and column"
        )
        raise GpudeconvError(msg)
    _check_grid_fits(ny, nx, image_shape)
