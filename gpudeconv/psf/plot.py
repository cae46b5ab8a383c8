"""A picture of a PSF estimate: the image, each star's FWHM and elongation, the PSFs, the diagnosis.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no global state);
matplotlib is imported only when a map is drawn and is an optional dependency
(``pip install gpudeconv[plot]``).
"""

from __future__ import annotations

import importlib.util
import math
import os
import textwrap
from pathlib import Path

import numpy as np

from .._errors import GpudeconvError
from ..io import _write_atomically, check_output_path

__all__ = ["field_map", "have_matplotlib"]

#: Whisker length in pixels per unit of ellipticity (1 - minor/major), as a fraction of the
#: image's larger side: a star with minor/major = 0.8 draws a whisker 2% of the frame long.
_WHISKER_SCALE = 0.10
#: The displayed image is subsampled to at most this many pixels on its larger side.
_DISPLAY_SIDE = 1600
_INSTALL_HINT = "pip install 'gpudeconv[plot]' (or pip install matplotlib)"


def have_matplotlib() -> bool:
    """Whether matplotlib can be imported (checked without importing it)."""
    return importlib.util.find_spec("matplotlib") is not None


def field_map(
    path: str | os.PathLike,
    image,
    estimate,
    diagnosis=None,
    *,
    overwrite: bool = False,
    dpi: int = 110,
) -> Path:
    """Draw a PSF estimate over its image and save it as PNG.

    Parameters
    ----------
    path : str or path-like
        The PNG to write (atomically: a temporary file in the same folder, then renamed).
    image : (H, W) or (C, H, W) array_like
        The image the PSF was estimated from; colour channels are summed. NaN pixels are
        allowed (shown as the lowest level).
    estimate : PSFEstimate
        From `gpudeconv.psf.fit_psf`: its ``stars`` (used ones drawn as whiskers, rejected ones
        as small crosses), ``psf`` (one PSF as an inset, or a field's node PSFs at the nodes)
        and ``image_shape``.
    diagnosis : Diagnosis, optional
        From `gpudeconv.psf.diagnose`; its text becomes the caption.
    overwrite : bool
        Replace an existing file.
    dpi : int
        Resolution of the PNG.

    Returns
    -------
    pathlib.Path
        The path written.

    Notes
    -----
    The image is shown as FITS viewers show it, row 0 at the bottom (``origin='lower'``), the
    orientation the diagnosis names directions in, with an asinh stretch between the 0.5 and
    99.8 percentiles of the finite pixels. Each used star gets a whisker along its major axis,
    of length proportional to its ellipticity 1 - minor/major and coloured by its FWHM.
    """
    target = check_output_path(path, overwrite=overwrite)
    if not target.name.lower().endswith(".png"):
        msg = f"the PSF map is a PNG image, got {target}: give a .png path"
        raise GpudeconvError(msg)
    figure = _draw(_display_image(image), estimate, diagnosis, dpi)
    _write_atomically(target, lambda tmp: figure.savefig(tmp, format="png", dpi=dpi))
    return target


# --- drawing --------------------------------------------------------------------------------


def _matplotlib():
    try:
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.collections import LineCollection
        from matplotlib.colors import Normalize
        from matplotlib.figure import Figure
    except ImportError as exc:
        msg = f"drawing the PSF map needs matplotlib, which is not installed: {_INSTALL_HINT}"
        raise GpudeconvError(msg) from exc
    return Figure, FigureCanvasAgg, LineCollection, Normalize, colormaps


def _draw(display, estimate, diagnosis, dpi: int):
    Figure, FigureCanvasAgg, LineCollection, Normalize, colormaps = _matplotlib()
    height, width = (int(n) for n in estimate.image_shape)
    caption = _caption(estimate, diagnosis)
    fig_width = 10.0
    # The axes take 0.76 of the width; very tall images are shrunk to fit 14 inches.
    image_height = min(fig_width * 0.76 * height / width, 14.0)
    caption_height = 0.15 + 0.15 * len(caption)
    figure = Figure(figsize=(fig_width, image_height + caption_height + 1.1), dpi=dpi)
    FigureCanvasAgg(figure)
    bottom = (caption_height + 0.55) / figure.get_figheight()
    top = 1 - 0.55 / figure.get_figheight()
    axes = figure.add_axes((0.085, bottom, 0.76, top - bottom))
    colour_axes = figure.add_axes((0.87, bottom, 0.025, top - bottom))

    axes.imshow(
        display,
        origin="lower",
        cmap="gray",
        extent=(-0.5, width - 0.5, -0.5, height - 0.5),
        interpolation="nearest",
        aspect="equal",
    )
    stars = estimate.stars
    used = _column(stars, "used", bool, np.ones(len(stars), dtype=bool))
    x, y = _column(stars, "x", float), _column(stars, "y", float)
    fwhm = _column(stars, "fwhm", float)
    ratio = _column(stars, "ratio", float, np.ones(len(stars)))
    angle = np.radians(_column(stars, "angle", float, np.zeros(len(stars))))
    good = used & np.isfinite(fwhm) & np.isfinite(x) & np.isfinite(y)

    finite = fwhm[good]
    low, high = (float(np.min(finite)), float(np.max(finite))) if finite.size else (0.0, 1.0)
    if high - low < 0.05 * max(high, 1e-9):
        low, high = low - 0.05 * max(low, 1), high + 0.05 * max(high, 1)
    norm = Normalize(vmin=low, vmax=high)
    cmap = colormaps["plasma"]

    # Not too short on small frames either: 0.2 at least 16 px long.
    scale = max(_WHISKER_SCALE * max(height, width), 80.0)
    ellipticity = np.clip(1 - np.nan_to_num(ratio, nan=1.0), 0, 1)
    half = 0.5 * scale * ellipticity[good]
    dx, dy = half * np.cos(angle[good]), half * np.sin(angle[good])
    segments = np.stack(
        [
            np.column_stack([x[good] - dx, y[good] - dy]),
            np.column_stack([x[good] + dx, y[good] + dy]),
        ],
        axis=1,
    )
    whiskers = LineCollection(segments, cmap=cmap, norm=norm, linewidths=2.0)
    whiskers.set_array(fwhm[good])
    axes.add_collection(whiskers)
    axes.scatter(
        x[good],
        y[good],
        c=fwhm[good],
        cmap=cmap,
        norm=norm,
        s=9,
        linewidths=0,
        label=f"used stars ({int(good.sum())})",
    )
    rejected = ~used & np.isfinite(x) & np.isfinite(y)
    if rejected.any():
        axes.scatter(
            x[rejected],
            y[rejected],
            marker="x",
            s=10,
            linewidths=0.7,
            color="#4fc3f7",
            alpha=0.8,
            label=f"rejected ({int(rejected.sum())})",
        )
    _draw_psfs(axes, estimate.psf, height, width)
    axes.set_xlim(-0.5, width - 0.5)
    axes.set_ylim(-0.5, height - 0.5)
    axes.set_xlabel("x (column, px)")
    axes.set_ylabel("y (row, px; row 0 at the bottom)")
    reference = 0.2 * scale
    axes.set_title(
        _title(estimate)
        + f"\nwhiskers: major axis, length = 1 - minor/major (0.2 = {reference:.0f} px)",
        fontsize=9,
    )
    legend = axes.legend(loc="lower left", fontsize=8, framealpha=0.7)
    legend.get_frame().set_linewidth(0)
    colour = figure.colorbar(whiskers, cax=colour_axes)
    colour.set_label("FWHM (px, major axis)")
    figure.text(0.06, 0.03, "\n".join(caption), fontsize=8, family="monospace", va="bottom")
    return figure


def _draw_psfs(axes, psf, height: int, width: int) -> None:
    """PSF thumbnails: a field's node PSFs at their nodes, or one PSF in the upper-right."""
    psfs = getattr(psf, "psfs", None)
    if psfs is not None:
        rows, cols = psf.node_rows(), psf.node_cols()
        ny, nx = psf.grid
        side = 0.25 * min(height / ny, width / nx)
        for a in range(ny):
            for b in range(nx):
                bounds = (cols[b] - side / 2, rows[a] - side / 2, side, side)
                _thumbnail(axes, psfs[a, b], bounds, axes.transData)
    else:
        _thumbnail(axes, np.asarray(psf), (0.80, 0.78, 0.18, 0.18), axes.transAxes)


def _thumbnail(axes, psf: np.ndarray, bounds, transform) -> None:
    inset = axes.inset_axes(bounds, transform=transform)
    values = np.asarray(psf, dtype=np.float64)
    peak = float(np.max(values)) if values.size else 0.0
    shown = np.sqrt(np.clip(values / peak, 0, 1)) if peak > 0 else values
    inset.imshow(shown, origin="lower", cmap="magma", interpolation="nearest")
    inset.set_xticks([])
    inset.set_yticks([])
    for spine in inset.spines.values():
        spine.set_color("white")
        spine.set_linewidth(0.6)


def _title(estimate) -> str:
    found = getattr(estimate, "found", None)
    used = getattr(estimate, "used", None)
    model = getattr(estimate, "model", "PSF")
    height, width = (int(n) for n in estimate.image_shape)
    text = f"{model} PSF"
    try:
        parameters = estimate.parameters_at((height - 1) / 2, (width - 1) / 2)
        text += (
            f" at the centre: FWHM {parameters['fwhm']:.2f} px, minor/major "
            f"{parameters['ratio']:.2f}, angle {parameters['angle']:.0f} deg"
        )
    except (AttributeError, KeyError, TypeError, ValueError):
        pass
    if found is not None and used is not None:
        text += f"; {used} of {found} stars used"
    grid = getattr(estimate, "grid", None)
    if grid:
        text += f"; {grid[0]}x{grid[1]} field"
    return text


def _caption(estimate, diagnosis) -> list[str]:
    lines = []
    rejected = getattr(estimate, "rejected", None) or {}
    if rejected:
        parts = ", ".join(f"{reason} {count}" for reason, count in rejected.items() if count)
        if parts:
            lines.append(f"rejected: {parts}")
    if diagnosis is not None:
        for line in diagnosis.text().splitlines():
            indent = len(line) - len(line.lstrip())
            lines += textwrap.wrap(
                line,
                118,
                initial_indent="",
                subsequent_indent=" " * (indent + 4),
                break_on_hyphens=False,
            ) or [""]
    return lines


# --- helpers --------------------------------------------------------------------------------


def _display_image(image) -> np.ndarray:
    """A grey, subsampled, asinh-stretched copy of ``image`` in [0, 1]; NaN shown as 0."""
    data = np.asarray(image)
    if data.ndim == 3:
        data = np.sum(data, axis=0, dtype=np.float64)
    if data.ndim != 2:
        msg = f"the PSF map shows a (H, W) or (C, H, W) image, got shape {data.shape}"
        raise GpudeconvError(msg)
    step = max(1, math.ceil(max(data.shape) / _DISPLAY_SIDE))
    data = np.asarray(data[::step, ::step], dtype=np.float64)
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return np.zeros_like(data)
    low, high = np.percentile(finite, [0.5, 99.8])
    if not high > low:
        high = low + 1.0
    scaled = np.clip((np.nan_to_num(data, nan=low) - low) / (high - low), 0, 1)
    # asinh stretch: linear for faint signal, logarithmic for the bright cores.
    softening = 0.02
    return np.arcsinh(scaled / softening) / np.arcsinh(1 / softening)


def _column(table, name: str, kind, default=None) -> np.ndarray:
    if name in getattr(table, "colnames", ()):
        return np.asarray(table[name], dtype=kind)
    if default is None:
        msg = f"the star table lacks column {name!r}; give a PSF estimate from fit_psf"
        raise GpudeconvError(msg)
    return default
