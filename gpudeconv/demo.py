"""The embedded demo: a deep-sky scene made on the spot, blurred, restored and compared.

``gpudeconv demo`` calls :func:`run_demo`; so does ``python -m gpudeconv.demo [OUTDIR]``. The
README's picture, ``docs/demo_comparison.png``, is the ``demo_comparison.png`` of
``python -m gpudeconv.demo OUTDIR --size 416`` (840 pixels wide, shown at 1:1 so that
resampling does not blur the difference).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits

from ._errors import GpudeconvError
from .backend import Backend, get_backend
from .io import provenance_header, write_image
from .measure import median_fwhm, select_measurable_stars, star_fwhm
from .psf import moffat
from .restore import richardson_lucy
from .synthetic import make_scene

__all__ = ["DemoResult", "autostretch", "comparison_picture", "midtone_transfer", "run_demo"]

#: The known blur: 4 px seeing with moderate Moffat wings.
PSF_FWHM = 4.0
PSF_BETA = 3.0
#: A stack of 20 frames (gain 20 e-/ADU) after background extraction: the sky was brought down
#: to a pedestal of 25 ADU, and the noise it leaves (about 3 ADU RMS, modelled as Gaussian, the
#: read-noise term) stays. A high sky in the data makes plain RL ring deeper around bright stars.
SKY = 25.0
GAIN = 20.0
READ_NOISE = 60.0
#: The zoomed row enlarges a region of about this many pixels (at least 3 times) to the frame's
#: width, so that single stars show their pixels.
ZOOM_REGION = 170
#: Measured stars: peak at least 30 sigma above the sky, isolated within 3 FWHM.
_MIN_PEAK_SNR = 30.0
#: Stars are fitted in a 5x5 box, about 1.25 model FWHM, before and after alike (see measure.py).
_FWHM_BOX = 5
_FILE_NAMES = ("demo_observed.fits", "demo_restored.fits", "demo_comparison.png")


@dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` made and measured.

    Attributes
    ----------
    observed_path, restored_path, comparison_path : pathlib.Path
        The observed and restored FITS images (float32) and the side-by-side PNG.
    fwhm_before, fwhm_after : float
        Median FWHM (pixels) of the measured stars in the observed and the restored image.
    fwhm_truth_psf : float
        FWHM of the true PSF measured the same way (its model FWHM is :data:`PSF_FWHM`).
    n_stars_measured : int
        Stars that entered the medians (isolated, bright, unsaturated).
    iterations : int
        Richardson-Lucy iterations run.
    backend : str
        Backend that restored the image, ``'numpy'`` or ``'cupy'``.
    seconds : float
        Wall time of the whole demo.
    restore_seconds : float
        Wall time of the restoration alone.
    """

    observed_path: Path
    restored_path: Path
    comparison_path: Path
    fwhm_before: float
    fwhm_after: float
    fwhm_truth_psf: float
    n_stars_measured: int
    iterations: int
    backend: str
    seconds: float
    restore_seconds: float

    @property
    def paths(self) -> tuple[Path, Path, Path]:
        """The three files written: observed FITS, restored FITS, comparison PNG."""
        return (self.observed_path, self.restored_path, self.comparison_path)


def _validate_size(size) -> int:
    if isinstance(size, bool) or int(size) != size or not 256 <= size <= 8192:
        msg = f"size must be an integer number of pixels from 256 to 8192, got {size!r}; e.g. 1024"
        raise GpudeconvError(msg)
    return int(size)


def run_demo(
    outdir: str | os.PathLike = ".",
    *,
    size: int = 1024,
    iterations: int = 30,
    backend: str | Backend | None = None,
    seed: int = 2,
    overwrite: bool = True,
    progress: bool = True,
    log: Callable[[str], object] | None = print,
) -> DemoResult:
    """Make a blurred, noisy deep-sky scene, restore it, and save both with a comparison.

    Parameters
    ----------
    outdir : str or path-like
        Folder for ``demo_observed.fits``, ``demo_restored.fits`` and ``demo_comparison.png``;
        made if missing.
    size : int
        Side of the square scene in pixels.
    iterations : int
        Richardson-Lucy iterations.
    backend : {'auto', 'numpy', 'cupy'} or Backend, optional
        Where to restore (see :func:`gpudeconv.get_backend`).
    seed : int
        Seed of the scene.
    overwrite : bool
        Replace existing demo files; if False and one exists, nothing is computed.
    progress : bool
        Show a progress bar over the iterations.
    log : callable(str), optional
        Where the report lines go (None: nowhere).

    Returns
    -------
    DemoResult

    Notes
    -----
    The scene (see :func:`gpudeconv.synthetic.make_scene`) holds a field of stars of many
    brightnesses, one compact cluster, a few galaxies and faint nebulosity, blurred by a Moffat
    PSF (FWHM 4 px, beta 3), with the noise of a background-extracted stack (a pedestal of
    25 ADU, noise about 3 ADU). It is restored with that same PSF. Star FWHMs are measured by
    Gaussian fits at the catalogue positions of bright isolated stars (:mod:`gpudeconv.measure`);
    the medians are over the stars measured in both images.
    """
    started = time.perf_counter()
    size = _validate_size(size)
    say = log if log is not None else (lambda line: None)
    folder = Path(outdir)
    if folder.exists() and not folder.is_dir():
        msg = f"demo output folder {folder} is a file; give a folder (--outdir DIR)"
        raise GpudeconvError(msg)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        msg = f"cannot create the demo output folder {folder} ({error.strerror}); choose another"
        raise GpudeconvError(msg) from None
    paths = tuple(folder / name for name in _FILE_NAMES)
    if not overwrite:
        existing = [str(p) for p in paths if p.exists()]
        if existing:
            msg = f"{', '.join(existing)} already exist(s); pass overwrite=True or another folder"
            raise GpudeconvError(msg)
    engine = get_backend(backend)

    psf = moffat(PSF_FWHM, beta=PSF_BETA)
    psf_text = f"Moffat fwhm={PSF_FWHM} beta={PSF_BETA}"
    scene = make_scene(
        (size, size), psf=psf, seed=seed, sky=SKY, gain=GAIN, read_noise=READ_NOISE, clusters=1
    )
    say(
        f"scene: {size}x{size} px, {len(scene.stars)} stars, {len(scene.galaxies)} galaxies, "
        f"nebulosity, sky {SKY:g} ADU (noise {scene.noise_sigma:.2f}), blurred by {psf_text}"
    )
    say(f"restoring: Richardson-Lucy, {iterations} iterations, backend {engine.name}")
    tick = time.perf_counter()
    restored = richardson_lucy(scene.observed, psf, iterations, backend=engine, progress=progress)
    restore_seconds = time.perf_counter() - tick
    say(f"restored in {restore_seconds:.1f} s")

    stars = select_measurable_stars(
        scene.stars,
        scene.observed.shape,
        min_flux=_MIN_PEAK_SNR * scene.noise_sigma / float(psf.max()),
        isolation=3 * PSF_FWHM,
        neighbours=scene.galaxies,
    )
    box = _FWHM_BOX
    before = star_fwhm(scene.observed, stars, box=box)
    after = star_fwhm(restored, stars, box=box)
    measured = np.isfinite(before) & np.isfinite(after)
    n_measured = int(measured.sum())
    if n_measured == 0:
        msg = f"no star could be measured in the {size}x{size} scene; use a larger size"
        raise GpudeconvError(msg)
    fwhm_before = float(np.median(before[measured]))
    fwhm_after = float(np.median(after[measured]))
    padded_psf = np.pad(psf, 4 * box)
    centre = padded_psf.shape[0] // 2
    fwhm_psf = median_fwhm(padded_psf, [(centre, centre)], box=box)
    say(
        f"median star FWHM ({n_measured} stars): observed {fwhm_before:.2f} px -> restored "
        f"{fwhm_after:.2f} px (true PSF measured the same way: {fwhm_psf:.2f} px; "
        f"model FWHM {PSF_FWHM:g} px)"
    )

    observed_header = _scene_header(scene, psf_text, seed)
    restored_header = provenance_header(
        observed_header,
        method="rl",
        psf=psf_text,
        iterations=iterations,
        backend=engine.name,
        extra={"demo": "restored with the true PSF"},
    )
    write_image(paths[0], scene.observed, observed_header, overwrite=overwrite)
    write_image(paths[1], restored, restored_header, overwrite=overwrite)
    picture = comparison_picture(
        scene.observed,
        restored,
        labels=("observed", f"restored (RL, {iterations} it)"),
        captions=(f"star FWHM {fwhm_before:.2f} px", f"star FWHM {fwhm_after:.2f} px"),
        zoom_centre=_zoom_centre(scene),
        zoom=max(3, round(size / ZOOM_REGION)),
    )
    write_image(paths[2], picture, restored_header, overwrite=overwrite)
    for path in paths:
        say(f"wrote {path}")
    seconds = time.perf_counter() - started
    say(f"demo done in {seconds:.1f} s")
    return DemoResult(
        observed_path=paths[0],
        restored_path=paths[1],
        comparison_path=paths[2],
        fwhm_before=fwhm_before,
        fwhm_after=fwhm_after,
        fwhm_truth_psf=fwhm_psf,
        n_stars_measured=n_measured,
        iterations=int(iterations),
        backend=engine.name,
        seconds=seconds,
        restore_seconds=restore_seconds,
    )


def _scene_header(scene, psf_text: str, seed: int) -> fits.Header:
    header = fits.Header()
    header["OBJECT"] = ("gpudeconv demo", "synthetic deep-sky scene")
    header["SKYLEVEL"] = (scene.sky, "[ADU] background added to the scene")
    header["SKYNOISE"] = (round(scene.noise_sigma, 4), "[ADU] noise of a background pixel")
    header.add_history(f"gpudeconv demo scene: seed {seed}, blurred by {psf_text}")
    return header


def _zoom_centre(scene) -> tuple[float, float]:
    """(row, column) of the zoomed region: the cluster, else the frame's centre."""
    if len(scene.clusters):
        return float(scene.clusters["y"][0]), float(scene.clusters["x"][0])
    height, width = scene.observed.shape
    return height / 2, width / 2


# --- the comparison picture -----------------------------------------------------------------


def midtone_transfer(x: np.ndarray, midtone: float) -> np.ndarray:
    """The midtone transfer function: maps 0 to 0, 1 to 1 and ``midtone`` to 1/2.

    .. math:: \\mathrm{MTF}_m(x) = \\frac{(m - 1)\\,x}{(2m - 1)\\,x - m}
    """
    return (midtone - 1) * x / ((2 * midtone - 1) * x - midtone)


def autostretch(reference: np.ndarray, *, background: float = 0.12, clip_sigma: float = 2.8):
    """A screen stretch fitted to ``reference``, as astro-imaging software shows linear data.

    The black point sits ``clip_sigma`` robust sigmas (1.4826 MAD) below the median, the white
    point at the maximum, and the midtones are balanced so the median lands at ``background``.

    Returns
    -------
    stretch : callable(ndarray) -> ndarray of uint8
        Applies the same stretch to any image (NaN shows black), so images compare fairly.
    """
    values = reference[np.isfinite(reference)].astype(np.float64)
    median = float(np.median(values))
    sigma = 1.4826 * float(np.median(np.abs(values - median)))
    black = median - clip_sigma * sigma
    white = float(values.max())
    span = max(white - black, np.finfo(np.float64).tiny)
    # Midtone that sends the median to `background` (the MTF is its own inverse in m and x).
    level = min(max((median - black) / span, 1e-9), 1.0)
    midtone = float(midtone_transfer(np.float64(level), background))

    def stretch(image: np.ndarray) -> np.ndarray:
        x = np.clip((np.nan_to_num(image, nan=black) - black) / span, 0.0, 1.0)
        return np.round(255 * midtone_transfer(x, midtone)).astype(np.uint8)

    return stretch


def comparison_picture(
    observed: np.ndarray,
    restored: np.ndarray,
    *,
    labels: tuple[str, str] = ("observed", "restored"),
    captions: tuple[str, str] | None = None,
    zoom_centre: tuple[float, float] | None = None,
    zoom: int = 3,
) -> np.ndarray:
    """Side-by-side picture of two images under one stretch, with a zoomed row below.

    Parameters
    ----------
    observed, restored : (H, W) ndarray
        The stretch is fitted to ``observed`` and applied to both.
    labels : (str, str)
        Names of the two columns, shown above both rows.
    captions : (str, str), optional
        More text after the names in the first row (e.g. a measurement).
    zoom_centre : (row, column), optional
        Centre of the region shown enlarged (``zoom`` times, nearest neighbour) in the second
        row; it is outlined in the first. By default the frame's centre.
    zoom : int
        Enlargement of the second row; the region is ``1/zoom`` of the frame's side.

    Returns
    -------
    picture : (rows, columns) ndarray of uint8
    """
    from PIL import Image, ImageDraw

    stretch = autostretch(observed)
    panels = [stretch(observed), stretch(restored)]
    height, width = observed.shape
    crop_h, crop_w = height // zoom, width // zoom
    centre = zoom_centre if zoom_centre is not None else (height / 2, width / 2)
    top = int(np.clip(round(centre[0] - crop_h / 2), 0, height - crop_h))
    left = int(np.clip(round(centre[1] - crop_w / 2), 0, width - crop_w))
    crops = [
        np.kron(p[top : top + crop_h, left : left + crop_w], np.ones((zoom, zoom), np.uint8))
        for p in panels
    ]

    gap = 8
    font = _label_font(max(12, round(width / 48)))
    bar = _label_height(font) + 8
    canvas_w = 2 * width + gap
    zoom_h = crops[0].shape[0]
    canvas = Image.new("L", (canvas_w, 2 * bar + height + gap + zoom_h), color=24)
    draw = ImageDraw.Draw(canvas)
    top_labels = [
        label if captions is None else f"{label}  -  {caption}"
        for label, caption in zip(labels, captions or labels, strict=True)
    ]
    zoom_labels = [f"{label}, {zoom}x zoom" for label in labels]
    for column, (panel, crop) in enumerate(zip(panels, crops, strict=True)):
        x0 = column * (width + gap)
        canvas.paste(Image.fromarray(panel), (x0, bar))
        canvas.paste(Image.fromarray(crop), (x0, 2 * bar + height + gap))
        draw.text((x0 + 6, 4), top_labels[column], fill=235, font=font)
        draw.text((x0 + 6, bar + height + gap + 4), zoom_labels[column], fill=235, font=font)
        draw.rectangle(
            (x0 + left - 1, bar + top - 1, x0 + left + crop_w, bar + top + crop_h),
            outline=160,
        )
    return np.asarray(canvas)


def _label_font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError):
        # Pillow without FreeType has only the small bitmap font.
        return ImageFont.load_default()


def _label_height(font) -> int:
    return int(math.ceil(font.getbbox("Ag")[3]))


def _main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m gpudeconv.demo", description=__doc__)
    parser.add_argument("outdir", nargs="?", default=".")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--seed", type=int, default=2)
    args = parser.parse_args(argv)
    run_demo(
        args.outdir,
        size=args.size,
        iterations=args.iterations,
        backend=args.backend,
        seed=args.seed,
    )


if __name__ == "__main__":
    _main()
