"""The restoration-quality targets of the regularized RL methods, measured on synthetic scenes
with known truth: shared by tests/test_restore_quality.py (thresholds) and
bench/restore_quality.py (the figures of the record, over several seeds and sizes).

Every figure compares methods run side by side on the same scene, at the same iterations:

* noise gain in empty sky (std after / std before) and star-FWHM reduction, for rl, rl-tv and
  damped (`deep_sky_figures`);
* the iterations Biggs-Andrews needs to reach the data term of 50 plain RL iterations;
* the depth of the dark ring around saturated stars with and without deringing;
* aperture flux of isolated unsaturated stars, restored over observed, for every method;
* PSNR against the truth on a planetary-like scene (`planetary_figures`).
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.signal
from photutils.aperture import CircularAperture

import gpudeconv as gd
from gpudeconv import quality
from gpudeconv.api import method_options
from gpudeconv.measure import select_measurable_stars
from gpudeconv.synthetic import make_scene

#: The deep-sky scene: a Moffat seeing of 4 px FWHM, sky 100 ADU, read noise 5 e-, gain 1, and
#: cores clipped at 3000 ADU (the brightest stars saturate).
SATURATION = 3000.0
ITERATIONS = 50


def deep_sky_scene(size: int = 512, seed: int = 0):
    return make_scene(
        (size, size), seed=seed, sky=100.0, read_noise=5.0, gain=1.0, saturation=SATURATION
    )


def _restore(observed, psf, method: str, iterations: int = ITERATIONS, **options):
    if method == "wiener":
        return gd.deconvolve(observed, psf, method="wiener"), None
    options = {"noise": "auto", **method_options(method), **options}
    return gd.richardson_lucy(observed, psf, iterations, return_info=True, **options)


def _isolated_stars(scene, observed):
    """Unsaturated, isolated stars well above the noise: (x, y) for photometry."""
    peak_limit = 0.5 * SATURATION
    # a star's blurred peak is about its flux times the PSF's peak
    max_flux = peak_limit / float(scene.psf.max())
    chosen = select_measurable_stars(
        scene.stars,
        observed.shape,
        min_flux=200 * scene.noise_sigma,
        max_flux=max_flux,
        isolation=16.0,
        neighbours=scene.galaxies,
    )
    return np.column_stack([chosen["x"], chosen["y"]])


def _saturated_stars(scene, observed, count: int = 8):
    """The brightest stars whose core is clipped, away from the edges."""
    chosen = []
    margin = 40
    for row in scene.stars:
        x, y = float(row["x"]), float(row["y"])
        if not (
            margin <= x < observed.shape[1] - margin and margin <= y < observed.shape[0] - margin
        ):
            continue
        if observed[int(round(y)), int(round(x))] >= SATURATION:
            chosen.append((x, y))
        if len(chosen) == count:
            break
    return np.array(chosen).reshape(-1, 2)


def _catalogue_flux(scene, positions) -> np.ndarray:
    index = {(float(x), float(y)): float(f) for x, y, f in scene.stars.iterrows("x", "y", "flux")}
    return np.array([index[(float(x), float(y))] for x, y in positions])


def deep_sky_figures(size: int = 512, seed: int = 0) -> dict:
    """Every deep-sky figure of the targets on one scene (see the module's docstring)."""
    scene = deep_sky_scene(size, seed)
    observed, psf = scene.observed, scene.psf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sky = quality.empty_sky_mask(observed)
    isolated = _isolated_stars(scene, observed)
    saturated = _saturated_stars(scene, observed)
    fwhm = 4.0
    radius = 3 * fwhm
    flux = _catalogue_flux(scene, isolated)
    saturated_flux = _catalogue_flux(scene, saturated).sum()
    clipped = CircularAperture(saturated, r=4 * fwhm).do_photometry(observed - scene.sky)[0]
    figures = {
        "size": size,
        "seed": seed,
        "iterations": ITERATIONS,
        "observed_saturated_flux": float(clipped.sum() / saturated_flux),
        "methods": {},
    }
    # (method, iterations, options): accelerated RL at the iterations that reach the fit of
    # 50 plain ones (`_acceleration`), the rest at 50
    acceleration = _acceleration(observed, psf)
    reached = acceleration["accelerated_iterations_to_reach"] or ITERATIONS
    runs = {
        "rl": ("rl", ITERATIONS, {}),
        "rl-tv": ("rl-tv", ITERATIONS, {}),
        "damped": ("damped", ITERATIONS, {}),
        "rl+accelerate": ("rl", reached, {"accelerate": True}),
        "rl+dering": ("rl", ITERATIONS, {"dering": 1.0}),
        "rl+saturation": ("rl", ITERATIONS, {"saturation": "auto"}),
        "wiener": ("wiener", 0, {}),
    }
    sigma = scene.noise_sigma
    for name, (method, iterations, options) in runs.items():
        restored, info = _restore(observed, psf, method, iterations, **options)
        row = {"iterations": iterations}
        # the light of the saturated stars (within 4 FWHM, above the sky) against the truth:
        # clipping took some of it from the observed frame
        light = CircularAperture(saturated, r=4 * fwhm).do_photometry(restored - scene.sky)[0]
        row["saturated_flux"] = float(light.sum() / saturated_flux)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row["noise_gain"] = quality.noise_gain(observed, restored, mask=sky)
            row["fwhm"] = quality.fwhm_by_region(observed, restored)
            ring = quality.ringing_score(restored, saturated, fwhm=fwhm, sigma=sigma)
        row["ring_sigma"] = ring["depth_sigma"]
        # The light a restoration moved into or out of each star's aperture, against the
        # star's true flux: the sky, nebula and neighbours cancel in the difference.
        moved = CircularAperture(isolated, r=radius).do_photometry(restored - observed)[0]
        ratio = 1 + moved / flux
        finite = np.isfinite(ratio)
        row["flux_ratio"] = float(1 + moved[finite].sum() / flux[finite].sum())
        # Flux-weighted over the stars (the faint ones' apertures are noise-dominated after
        # a restoration amplifies noise), and the median of the per-star ratios
        row["flux_median"] = float(np.nanmedian(ratio))
        row["flux_spread"] = float(np.nanpercentile(np.abs(ratio - 1), 90))
        row["stars"] = int(np.count_nonzero(np.isfinite(ratio)))
        if info is not None:
            row["data_term"] = info.channels[0].data_term
        figures["methods"][name] = row
    plain = figures["methods"]["rl"]
    reduction = (plain["fwhm"]["before"] - plain["fwhm"]["after"]) / plain["fwhm"]["before"]
    for row in figures["methods"].values():
        fwhm_row = row["fwhm"]
        row["fwhm_reduction"] = (fwhm_row["before"] - fwhm_row["after"]) / fwhm_row["before"]
        row["reduction_kept"] = row["fwhm_reduction"] / reduction
        row["noise_vs_rl"] = row["noise_gain"] / plain["noise_gain"]
    figures["acceleration"] = acceleration
    return figures


def _acceleration(observed, psf) -> dict:
    """Iterations of Biggs-Andrews to reach the data term of 50 plain RL iterations."""
    _, plain = _restore(observed, psf, "rl", ITERATIONS + 1)
    # data_term[k] is the fit of the estimate after k updates
    target = plain.channels[0].data_term[ITERATIONS]
    _, fast = _restore(observed, psf, "rl", ITERATIONS + 1, accelerate=True)
    fits = fast.channels[0].data_term
    reached = next((k for k, value in enumerate(fits) if value <= target), None)
    return {
        "plain_data_term_at_50": target,
        "accelerated_iterations_to_reach": reached,
        "accelerated_restarts": fast.channels[0].restarts,
    }


def planet_scene(size: int = 256, seed: int = 0, fwhm: float = 5.0, peak: float = 20000.0):
    """A planetary-like frame: a limb-darkened disc with belts and spots on a dark sky, blurred
    by a Gaussian of ``fwhm`` and with Poisson noise at ``peak`` electrons (gain 1) plus read
    noise: high signal, no stars. Returns ``(truth, observed, psf)``."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size].astype(np.float64)
    centre, radius = (size - 1) / 2, 0.38 * size
    r = np.hypot(y - centre, x - centre) / radius
    inside = r < 1
    mu = np.sqrt(np.clip(1 - r**2, 0, 1))
    disc = np.where(inside, 0.4 + 0.6 * mu, 0.0)
    latitude = (y - centre) / radius
    belts = 1 - 0.25 * (np.sin(9 * latitude) > 0.3) - 0.15 * (np.sin(23 * latitude + 1) > 0.6)
    truth = disc * belts
    for _ in range(6):
        cy, cx = centre + rng.uniform(-0.6, 0.6, 2) * radius
        spot = rng.uniform(2, 6)
        truth *= 1 - 0.4 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * spot**2)) * inside
    truth = truth * peak + 20.0
    psf = gd.psf.gaussian(fwhm)
    blurred = scipy.signal.fftconvolve(np.pad(truth, 32, mode="edge"), psf, mode="same")[
        32:-32, 32:-32
    ]
    observed = rng.poisson(np.clip(blurred, 0, None)).astype(np.float64)
    observed += rng.normal(0, 5.0, observed.shape)
    return truth.astype(np.float32), observed.astype(np.float32), psf


def planetary_figures(size: int = 256, seed: int = 0) -> dict:
    """PSNR against the truth: the blurred frame, plain RL and regularized RL at 50 iterations."""
    truth, observed, psf = planet_scene(size, seed)
    figures = {"blurred": quality.psnr(observed, truth)}
    for method in ("rl", "rl-tv", "damped"):
        restored, _ = _restore(observed, psf, method)
        figures[method] = quality.psnr(restored, truth)
    restored, _ = _restore(observed, psf, "wiener")
    figures["wiener"] = quality.psnr(restored, truth)
    return figures
