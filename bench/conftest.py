"""Settings and data for the throughput benchmarks (run with ``pytest bench/``, see README.md).

``bench/`` is not part of the test suite: ``pyproject.toml`` collects ``tests/`` only.
"""

from __future__ import annotations

import functools

import pytest

import gpudeconv as gd
from gpudeconv import bench


def pytest_addoption(parser):
    group = parser.getgroup("gpudeconv bench")
    group.addoption(
        "--rl-size", type=int, default=2048, help="image side of the CPU cases (default 2048)"
    )
    group.addoption(
        "--rl-gpu-size",
        type=int,
        default=4096,
        help="image side of the GPU-only cases (default 4096)",
    )
    group.addoption(
        "--rl-iterations", type=int, default=20, help="RL iterations per call (default 20)"
    )
    group.addoption(
        "--rl-psf-size", type=int, default=25, help="side of the Moffat PSF (default 25)"
    )


@pytest.fixture(scope="session")
def settings(pytestconfig):
    """Sizes, iterations and PSF of this run."""
    options = pytestconfig.option
    return {
        "size": options.rl_size,
        "gpu_size": options.rl_gpu_size,
        "iterations": options.rl_iterations,
        "psf": gd.psf.moffat(bench.BENCH_FWHM, size=options.rl_psf_size),
    }


@pytest.fixture(scope="session")
def field(settings):
    """``field(size)``: the float32 star field of that side, made once per session."""
    return functools.lru_cache(maxsize=None)(lambda size: bench.star_field(size, settings["psf"]))
