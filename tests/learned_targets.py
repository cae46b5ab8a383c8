"""The learned method's targets on held-out simulated scenes (seeds the training never drew),
next to 30 iterations of plain RL with the true PSF: shared by tests/test_learned_quality.py
and bench/learned_quality.py.

Per scene (`gpudeconv.learned.data.make_sample`, a patch larger than the training ones): PSNR
against the target (the truth through the 1.5-px target PSF), the median FWHM of the bright
isolated stars, the dark-ring depth around the brightest stars in sky sigmas, the sky's noise
ratio (std after / std before in empty sky) and the flux of the bright isolated stars
(flux-weighted, 3-FWHM apertures).
"""

from __future__ import annotations

import warnings

import numpy as np
from photutils.aperture import CircularAperture

import gpudeconv as gd
from gpudeconv import quality
from gpudeconv.learned.data import make_sample
from gpudeconv.learned.train import EVALUATION_SEED
from gpudeconv.measure import star_fwhm


def _bright_isolated(sample, size: int, fwhm: float, count: int = 12) -> np.ndarray:
    """Bright stars at least 4 FWHM from the edges and from any star a tenth as bright."""
    stars = sample.stars
    margin = 4 * fwhm
    chosen = []
    for x, y, flux in stars:
        if not (margin <= x < size - margin and margin <= y < size - margin):
            continue
        distance = np.hypot(stars[:, 0] - x, stars[:, 1] - y)
        crowd = (distance > 0) & (distance < 4 * fwhm) & (stars[:, 2] > 0.1 * flux)
        if not crowd.any() and flux > 100 * sample.noise_sigma:
            chosen.append((x, y, flux))
        if len(chosen) == count:
            break
    return np.array(chosen).reshape(-1, 3)


def evaluate_scene(seed_offset: int, restore, *, size: int = 256) -> dict:
    """The figures of one held-out scene for ``restore(observed_adu, sample) -> restored_adu``
    and for plain RL (30 iterations, true PSF field)."""
    sample = make_sample(EVALUATION_SEED + seed_offset, size=size)
    observed = sample.blurred * sample.scale + sample.offset
    target = sample.target * sample.scale + sample.offset
    span = float(target.max() - target.min())
    fwhm = float(sample.fwhm)
    stars = _bright_isolated(sample, size, fwhm)
    runs = {
        "observed": observed,
        "rl30": gd.richardson_lucy(observed, sample.field, 30),
        "learned": restore(observed, sample),
    }
    figures = {"seed": EVALUATION_SEED + seed_offset, "fwhm": fwhm, "stars": len(stars)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sky = quality.empty_sky_mask(observed)
        for name, image in runs.items():
            row = {"psnr": quality.psnr(image, target, data_range=span)}
            if len(stars):
                widths = star_fwhm(image, stars[:, :2])
                row["star_fwhm"] = float(np.nanmedian(widths))
                ring = quality.ringing_score(
                    image, stars[:4, :2], fwhm=fwhm, sigma=sample.noise_sigma
                )
                row["ring_sigma"] = ring["depth_sigma"]
                moved = CircularAperture(stars[:, :2], r=3 * fwhm).do_photometry(image - observed)
                row["flux_ratio"] = float(1 + moved[0].sum() / stars[:, 2].sum())
            row["noise_ratio"] = quality.noise_gain(observed, image, mask=sky)
            figures[name] = row
    return figures
