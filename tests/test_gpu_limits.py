"""``bench/gpu_limits.py`` without a GPU: its kernels, launches and record, through the fake CuPy.

The script runs on a lent GPU only a few minutes a session, so a mistake in it (a grid that is not
a tuple, a Python int where the kernel takes ``int``, a wrong FLOP or byte count) would cost that
time. Here its own code runs against ``tests/fake_cupy.py``: the raw kernels are built from the
script's source by the CUDA emulation and their results checked, and the floor's arithmetic is
checked by hand.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import fake_cupy
import kernel_harness as kh
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    kh.compiler() is None, reason="g++ not found: the CUDA emulation compiles kernels for the CPU"
)

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_limits.py"


@pytest.fixture(scope="module")
def limits():
    spec = importlib.util.spec_from_file_location("gpu_limits", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fake(monkeypatch, tmp_path_factory):
    configured = os.environ.get("GPUDECONV_EMU_CACHE")
    cache = configured if configured else tmp_path_factory.mktemp("gpu-limits-kernels")
    return fake_cupy.install(monkeypatch, cache_dir=cache)


def test_floor_is_two_transform_pairs_and_48_bytes_a_pixel(limits):
    # 4096^2 pixels, a pair in 2 ms, 2e12 B/s: 4 ms of FFTs, 48 * 4096^2 / 2e12 s of passes
    floor = limits.rl_iteration_floor(4096, 2e-3, 2e12)
    assert floor["elementwise_bytes_per_pixel"] == 48
    assert floor["fft_s"] == pytest.approx(4e-3)
    assert floor["elementwise_s"] == pytest.approx(48 * 4096**2 / 2e12)
    assert floor["seconds"] == pytest.approx(4e-3 + 48 * 4096**2 / 2e12)
    assert floor["mpix_it_per_s"] == pytest.approx(4096**2 / 1e6 / floor["seconds"])


def test_candidate_lengths_are_the_least_of_each_family(limits):
    # 4096 + 5 * 12 = 4156: 4200 = 2^3 3 5^2 7, 4320 = 2^5 3^3 5, 4374 = 2 3^7, 8192
    assert limits.candidate_lengths(4096, 25) == dict(
        zip(limits.LENGTH_FAMILIES, [4200, 4320, 4374, 8192], strict=True)
    )
    assert limits.next_smooth(1, (2,)) == 1 and limits.next_smooth(97, (2, 3)) == 108


def test_fma_reference_follows_the_recurrence(limits):
    reference = limits.fma_reference(threads=3, rounds=2, scale=0.5, step=1.0)
    # thread t, chain k starts at (t + k) / 1000 and goes x -> 0.5 x + 1 twice
    start = (np.arange(3)[:, None] + np.arange(16)) * 1e-3
    expected = (0.5 * (0.5 * start + 1) + 1).sum(axis=1)
    np.testing.assert_allclose(reference, expected, rtol=1e-6)


def test_measures_and_records_through_the_emulated_card(limits, fake, tmp_path, capsys):
    stem = limits.main(
        [
            "--out",
            str(tmp_path),
            "--sizes",
            "48",
            "64",
            "--floor-sizes",
            "64",
            "--repeats",
            "3",
            "--copy-mib",
            "0.0625",
            "--fma-rounds",
            "8",
            "--fma-blocks",
            "2",
            "--block",
            "32",
        ]
    )
    figures = json.loads(stem.with_suffix(".json").read_text())
    device = figures["device"]
    assert device["name"] == "Fake CUDA Device (CPU emulation)"
    assert (device["cuda_runtime"], device["cupy"]) == ("13.0", fake_cupy.VERSION)
    # every launch went through the emulated kernels with the C types they declare
    fma = fake.launched("gpudeconv_limits_fma")
    triad = fake.launched("gpudeconv_limits_triad")
    assert fma and triad
    assert fma[0].grid == (2,) and fma[0].block == (32,)
    assert triad[0].grid == (-(-16384 // 32),)
    assert figures["fma"]["flop"] == 2 * 16 * 8 * 2 * 32
    assert figures["bandwidth"]["bytes"] == 65536
    timing = figures["bandwidth"]["triad"]
    assert timing["bytes_per_s"] == pytest.approx(3 * 65536 / timing["median_s"])
    assert timing["repeats"] == 3
    assert [fft["size"] for fft in figures["fft"]] == [48, 64]
    (floor,) = figures["rl_floor"]
    pair = figures["fft"][1]["median_s"]
    assert floor["seconds"] == pytest.approx(
        2 * pair + 48 * 64**2 / figures["bandwidth"]["triad"]["bytes_per_s"]
    )
    # the engine's padded transform for a 25-px PSF: 64 + 5 * 12 = 124 -> 125 (5^3)
    assert figures["engine_fft_shapes"]["64"] == [125, 125]
    markdown = stem.with_suffix(".md").read_text()
    assert stem.name.endswith("fake-cuda-device-cpu-emulation-limits")
    assert "The floor of one RL iteration" in markdown
    assert "| 64² |" in markdown and "125x125" in markdown
    # 64 + 60 = 124: 125 (5^3), 125, 128 (2-3 smooth: 128), 128, each timed once
    lengths = [(row["family"], row["length"]) for row in figures["padded_lengths"]]
    assert lengths == list(zip(limits.LENGTH_FAMILIES, [125, 125, 128, 128], strict=True))
    assert "## Which padded length cuFFT should get" in markdown
    assert markdown in capsys.readouterr().out


def test_a_kernel_that_skips_work_is_caught(limits, fake, monkeypatch):
    # a triad that stops half-way must not give a bandwidth figure
    broken = limits.KERNELS.replace("i < n; i += stride", "i < n / 2; i += stride")
    assert broken != limits.KERNELS
    monkeypatch.setattr(limits, "KERNELS", broken)
    options = limits.parse_arguments(
        ["--sizes", "32", "--repeats", "1", "--copy-mib", "0.0625", "--block", "32"]
    )
    options.fma_blocks = 1
    with pytest.raises(RuntimeError, match="triad kernel did not write"):
        limits.measure(fake.cupy, fake.modules["cupyx"], options)
