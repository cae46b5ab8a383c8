"""gpudeconv.bench: its peers compute RL correctly and its figures add up (no timing limits)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from helpers import reference_rl

import gpudeconv as gd
from gpudeconv import bench


@pytest.fixture(scope="module")
def scene():
    """A small star field and an asymmetric PSF (so that forward/adjoint mix-ups show)."""
    psf = gd.psf.moffat(3.0, size=11, ratio=0.6, angle=30.0)
    image = bench.star_field(96, psf, seed=3)[:, :90]  # not square either
    return image, psf


def test_star_field_is_positive_float32_with_stars():
    psf = gd.psf.moffat(3.5, size=25)
    image = bench.star_field(128, psf, seed=1)
    assert image.shape == (128, 128) and image.dtype == np.float32
    assert np.isfinite(image).all() and image.min() >= 1.0
    # stars: bright peaks well above a sky of ~100-130
    assert image.max() > 3 * np.median(image)


@pytest.mark.parametrize("peer", ["plain_scipy_rl", "fftconvolve_rl"])
def test_plain_peers_match_reference_rl(scene, peer):
    image, psf = scene
    expected = reference_rl(image, psf, 6, unobserved_ring=False)
    restored = getattr(bench, peer)(image, psf, 6)
    assert restored.shape == image.shape and restored.dtype == np.float32
    # RL sharpened the stars (a no-op or a wrong operator would not match below anyway)
    assert restored.max() > 1.2 * image.max()
    np.testing.assert_allclose(restored, expected, rtol=1e-4, atol=1e-4 * expected.max())


def test_plain_scipy_rl_matches_gpudeconv(scene):
    image, psf = scene
    ours = gd.richardson_lucy(image, psf, 6, backend="numpy")
    peer = bench.plain_scipy_rl(image, psf, 6)
    # The same iteration; only the border rule differs (gpudeconv estimates an unobserved ring
    # beyond the reflected frame, the peer takes zeros there), which shows within 2 PSF radii.
    inner = (slice(10, -10), slice(10, -10))
    np.testing.assert_allclose(peer[inner], ours[inner], rtol=1e-4, atol=1e-4 * peer.max())


def test_skimage_peer_does_not_clip(scene):
    pytest.importorskip("skimage")
    image, psf = scene
    restored = bench.skimage_rl(image, psf, 3)
    assert restored.dtype == np.float32
    assert restored.max() > 100  # skimage's default clip=True would cap at 1


def test_run_bench_reports_gpudeconv_and_peers():
    lines = []
    results = bench.run_bench(size=256, iterations=2, backend="numpy", repeats=1, log=lines.append)
    names = [result.name for result in results]
    expected = ["gpudeconv", "scipy.fft plain"]
    try:
        import skimage  # noqa: F401

        expected.insert(1, "skimage")
    except ImportError:
        pass
    assert names == expected
    device = gd.get_backend("numpy").device_name()
    for result in results:
        assert (result.backend, result.device, result.size, result.iterations) == (
            "numpy",
            device,
            256,
            2,
        )
        assert len(result.times) == 1 and result.seconds == min(result.times)
        assert math.isfinite(result.seconds) and result.seconds > 0
        assert result.mpix_it_per_s == pytest.approx(256 * 256 * 2 / result.seconds / 1e6)
        assert result.peak_memory_bytes is not None and result.peak_memory_bytes > 256 * 256 * 4
    table = lines[-1]
    speedup = results[-1].seconds / results[0].seconds
    assert f"{speedup:.2f}x scipy.fft plain" in table
    assert "gpudeconv numpy 256² 2 it" in table


def test_run_bench_without_peers_or_memory():
    results = bench.run_bench(
        size=64,
        iterations=1,
        backend="numpy",
        psf_size=9,
        peers=False,
        repeats=2,
        measure_memory=False,
        log=None,
    )
    assert [result.name for result in results] == ["gpudeconv"]
    assert results[0].peak_memory_bytes is None and len(results[0].times) == 2


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"size": 16}, "size must be an integer of at least"),
        ({"iterations": 0}, "iterations must be a positive integer"),
        ({"psf_size": 24}, "psf_size must be an odd integer"),
        ({"peers": ["matlab"]}, "peers must be True, False or names"),
    ],
)
def test_run_bench_validates_options(options, match):
    with pytest.raises(gd.GpudeconvError, match=match):
        bench.run_bench(**{"size": 64, "backend": "numpy", "log": None, **options})


def _fake_results():
    common = {"backend": "numpy", "device": "Test CPU (2 cores)", "size": 512, "iterations": 20}
    return [
        bench.BenchResult("gpudeconv", seconds=1.0, mpix_it_per_s=5.24, times=(1.0, 1.1), **common),
        bench.BenchResult("skimage", seconds=3.5, mpix_it_per_s=1.5, times=(3.5,), **common),
    ]


@pytest.mark.parametrize("suffix", [".md", ".json"])
def test_write_record_names_device_and_command(tmp_path, suffix):
    command = "gpudeconv bench --size 512 --iterations 20 --backend numpy"
    path = bench.write_record(
        _fake_results(),
        tmp_path / "results" / f"record{suffix}",
        command=command,
        notes="idle machine",
    )
    text = path.read_text()
    assert "Test CPU (2 cores)" in text and command in text and "idle machine" in text
    assert "3.50x skimage" in text or '"skimage": 3.5' in text
    if suffix == ".json":
        record = json.loads(text)
        assert record["meta"]["command"] == command
        assert record["meta"]["versions"]["numpy"] == np.__version__
        assert record["results"][0]["speedup"] == {"skimage": 3.5}
