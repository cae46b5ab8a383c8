"""The packaged network against 30 iterations of plain RL with the true PSF, on the first two
held-out scenes (tests/learned_targets.py; bench/learned_quality.py records eight)."""

from __future__ import annotations

import warnings

import learned_targets as targets
import pytest

from gpudeconv.learned.data import TARGET_FWHM
from gpudeconv.learned.infer import learned_deconvolve, load_weights


@pytest.fixture(scope="module")
def weights():
    return load_weights()


@pytest.mark.parametrize("scene", [0, 1])
def test_learned_beats_rl_on_held_out_scenes(weights, scene):
    def restore(observed, sample):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an in-range PSF on deep sky: no guard rail fires
            return learned_deconvolve(observed, sample.field, weights=weights, backend="numpy")

    figures = targets.evaluate_scene(scene, restore, size=256)
    learned, rl = figures["learned"], figures["rl30"]
    assert learned["psnr"] >= rl["psnr"] + 1.0
    assert learned["star_fwhm"] <= max(rl["star_fwhm"], 1.2 * TARGET_FWHM)
    assert learned["ring_sigma"] >= -2.0
    assert learned["noise_ratio"] <= 1.0
    assert abs(learned["flux_ratio"] - 1) <= 0.03
