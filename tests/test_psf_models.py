"""Gaussian and Moffat PSF models: normalization, widths, ellipticity and orientation."""

from __future__ import annotations

import numpy as np
import pytest

import gpudeconv as gd
from gpudeconv import GpudeconvError


def profile_fwhm(psf, direction_deg):
    """FWHM along a line through the centre at ``direction_deg`` (from +x towards +y), by
    sampling the array bilinearly every 0.01 px and finding the half-maximum crossings."""
    from scipy.ndimage import map_coordinates

    centre = psf.shape[0] // 2
    t = np.arange(-centre, centre, 0.01)
    theta = np.radians(direction_deg)
    rows = centre + t * np.sin(theta)
    cols = centre + t * np.cos(theta)
    values = map_coordinates(psf.astype(np.float64), [rows, cols], order=3)
    above = t[values >= values.max() / 2]
    return above.max() - above.min()


@pytest.mark.parametrize("model", ["gaussian", "moffat"])
@pytest.mark.parametrize("fwhm", [3.0, 6.0])
def test_round_models_have_the_asked_fwhm_and_sum_one(model, fwhm):
    psf = getattr(gd.psf, model)(fwhm, size=41)
    assert psf.dtype == np.float32 and psf.shape == (41, 41)
    assert psf.sum() == pytest.approx(1.0, abs=1e-5)
    assert np.unravel_index(np.argmax(psf), psf.shape) == (20, 20)
    # pixel integration widens a profile slightly: within 5% of the asked FWHM
    assert profile_fwhm(psf, 0) == pytest.approx(fwhm, rel=0.05)
    assert profile_fwhm(psf, 90) == pytest.approx(fwhm, rel=0.05)


@pytest.mark.parametrize("model", ["gaussian", "moffat"])
def test_elliptical_axes_and_angle(model):
    psf = getattr(gd.psf, model)(8.0, size=51, ratio=0.5, angle=90)
    # major axis along +y (rows), minor along x
    assert profile_fwhm(psf, 90) == pytest.approx(8.0, rel=0.05)
    assert profile_fwhm(psf, 0) == pytest.approx(4.0, rel=0.08)
    tilted = getattr(gd.psf, model)(8.0, size=51, ratio=0.5, angle=30)
    assert profile_fwhm(tilted, 30) == pytest.approx(8.0, rel=0.05)
    assert profile_fwhm(tilted, 120) == pytest.approx(4.0, rel=0.08)


def test_moffat_beta_controls_wings():
    steep = gd.psf.moffat(4.0, beta=6.0, size=41)
    heavy = gd.psf.moffat(4.0, beta=1.5, size=41)
    assert heavy[20, 35] > 5 * steep[20, 35]


def test_automatic_size_is_odd_and_holds_the_profile():
    for psf in (gd.psf.gaussian(4.0), gd.psf.moffat(4.0), gd.psf.moffat(2.0, beta=4.5)):
        assert psf.shape[0] % 2 == 1 and psf.shape[0] == psf.shape[1]
        edge = max(psf[0].max(), psf[:, 0].max())
        assert edge < 2e-3 * psf.max()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fwhm": 0}, "fwhm must be a positive"),
        ({"fwhm": float("nan")}, "fwhm must be a positive"),
        ({"fwhm": 500}, "not a plausible"),
        ({"fwhm": 3, "ratio": 0}, "ratio"),
        ({"fwhm": 3, "ratio": 1.5}, "ratio"),
        ({"fwhm": 3, "size": 10}, "odd"),
        ({"fwhm": 3, "angle": float("inf")}, "angle"),
    ],
)
def test_bad_model_parameters(kwargs, match):
    with pytest.raises(GpudeconvError, match=match):
        gd.psf.gaussian(**kwargs)


def test_bad_moffat_beta():
    with pytest.raises(GpudeconvError, match="beta must be greater than 1"):
        gd.psf.moffat(3.0, beta=1.0)
