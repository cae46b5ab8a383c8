"""Shared fixtures: one test body runs on every backend (SciPy's ``xp`` fixture pattern)."""

from __future__ import annotations

import pytest

import gpudeconv as gd

BACKENDS = ["numpy", "cupy"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each test body runs on every backend; CuPy skips with a reason where no GPU answers."""
    name = request.param
    if name not in gd.available_backends():
        from gpudeconv.backend import _cupy_status

        pytest.skip(f"cupy backend unavailable: {_cupy_status()[1]}")
    return gd.get_backend(name)
