"""Spatially-varying restoration: the operator's two methods, its automatic choice, the fused
RL steps, each next to a peer in the same run (pytest-benchmark; GPU cases skip without CuPy).

Groups:

* ``SV RL``: Richardson-Lucy with a 4x4 :class:`~gpudeconv.PSFField` (an aberrated field, PSF
  25 px) next to the same RL with one PSF: what a varying PSF costs.
* ``SV operator k=K``: one forward + one adjoint at ``--rl-gpu-size`` (GPU) with the direct
  kernel, the per-node FFTs and ``auto``, next to ``cupyx.scipy.ndimage.convolve`` +
  ``correlate`` with one PSF of the same size (a shift-invariant direct sum). ``extra_info``
  holds ``gflops`` (2 k^2 per pixel and direction: the useful work), ``gflops_executed`` (times
  the node passes the kernel makes) and ``fraction_of_peak`` (executed over the card's FP32 peak).
* ``RL steps``: the fused ratio + update kernels against the same two steps as separate CuPy
  operations.
"""

from __future__ import annotations

import numpy as np
import pytest

import gpudeconv as gd
from gpudeconv.psf.field import aberrated_field

SV_GRID = (4, 4)


def _backend(name: str):
    if name not in gd.available_backends():
        from gpudeconv.backend import _cupy_status

        pytest.skip(f"{name} backend unavailable: {_cupy_status()[1]}")
    return gd.get_backend(name)


def _field(size: int, psf_size: int, grid=SV_GRID):
    return aberrated_field(
        (size, size),
        grid,
        fwhm_centre=3.0,
        fwhm_corner=6.0,
        elongation_corner=1.8,
        beta=2.5,
        size=psf_size,
    )


def _timed(benchmark, backend, call, *, pixels: int, sweeps: int, group: str, **info):
    """Time ``call``; MPix·it/s counts ``sweeps`` passes over ``pixels`` per call."""

    def run():
        result = call()
        backend.synchronize()
        return result

    benchmark.group = group
    benchmark.extra_info.update(backend=backend.name, device=backend.device_name(), **info)
    backend.synchronize()
    benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)
    if benchmark.stats is not None:
        best = benchmark.stats.stats.min
        benchmark.extra_info["mpix_it_per_s"] = pixels * sweeps / best / 1e6
    return benchmark


SV_RL_CASES = {
    "numpy-field": ("numpy", "field"),
    "numpy-single": ("numpy", "single"),
    "cupy-field": ("cupy", "field"),
    "cupy-single": ("cupy", "single"),
}


@pytest.mark.parametrize("case", list(SV_RL_CASES))
def test_sv_rl_throughput(benchmark, case, settings, field):
    backend_name, kind = SV_RL_CASES[case]
    backend = _backend(backend_name)
    size = settings["size"] if backend_name == "numpy" else settings["gpu_size"]
    psf_field = _field(size, settings["psf"].shape[0])
    psf = psf_field if kind == "field" else psf_field.psf_at((size - 1) / 2, (size - 1) / 2)
    image = backend.asarray(field(size))
    iterations = settings["iterations"]
    _timed(
        benchmark,
        backend,
        lambda: gd.richardson_lucy(image, psf, iterations, backend=backend),
        pixels=size * size,
        sweeps=iterations,
        group=f"SV RL {size}x{size}, {iterations} it, grid {SV_GRID[0]}x{SV_GRID[1]}",
        kind=kind,
        size=size,
        iterations=iterations,
    )


@pytest.mark.parametrize("method", ["direct", "fft", "auto", "ndimage-single"])
@pytest.mark.parametrize("psf_size", [15, 31])
def test_sv_operator_throughput(benchmark, method, psf_size, settings):
    backend = _backend("cupy")
    size = settings["gpu_size"]
    x = backend.asarray(np.random.default_rng(0).random((size, size), dtype=np.float32))
    info = {"method": method, "psf_size": psf_size, "size": size}
    if method == "ndimage-single":
        single = gd.operators.Convolution(
            _field(size, psf_size).psfs[0, 0], backend, method="direct"
        )
        operator = single
        passes = 1.0
    else:
        operator = gd.operators.SpatiallyVaryingConvolution(
            _field(size, psf_size), backend, method=method
        )
        info["chosen"] = operator.method_for(x.shape)
        info["estimated_seconds"] = operator.costs(x.shape)
        passes = operator.kernel_passes(x.shape)
    info["node_passes"] = passes

    def call():
        blurred = operator.forward(x)
        return operator.adjoint(blurred)

    _timed(
        benchmark,
        backend,
        call,
        pixels=size * size,
        sweeps=1,
        group=f"SV operator k={psf_size} {size}x{size} (forward + adjoint)",
        **info,
    )
    if benchmark.stats is not None:
        best = benchmark.stats.stats.min
        useful = 2 * 2.0 * psf_size**2 * size * size  # forward and adjoint, 2 FLOP per MAC
        benchmark.extra_info["gflops"] = useful / best / 1e9
        executed = useful * passes if method == "direct" else None
        if executed is not None:
            benchmark.extra_info["gflops_executed"] = executed / best / 1e9
            peak = backend.peak_flops()
            if peak:
                benchmark.extra_info["fraction_of_peak"] = executed / best / peak


@pytest.mark.parametrize("how", ["fused", "separate"])
def test_rl_steps_throughput(benchmark, how, settings):
    from gpudeconv.backend import NORM_FLOOR, RATIO_EPS

    backend = _backend("cupy")
    xp = backend.xp
    size = settings["gpu_size"]
    rng = np.random.default_rng(1)
    observed, blurred, correction, estimate = (
        backend.asarray(rng.random((size, size), dtype=np.float32) + 0.5) for _ in range(4)
    )
    norm = backend.asarray(np.ones((size, size), np.float32))
    eps, floor = np.float32(RATIO_EPS), np.float32(NORM_FLOOR)

    if how == "fused":

        def call():
            backend.rl_ratio(observed, blurred)
            backend.rl_update(estimate, correction, norm)

    else:

        def call():
            ratio = observed / xp.maximum(blurred, eps)
            blurred[...] = ratio
            seen = norm > floor
            estimate[...] = xp.where(
                seen, estimate * (correction / xp.where(seen, norm, 1)), estimate
            )

    _timed(
        benchmark,
        backend,
        call,
        pixels=size * size,
        sweeps=1,
        group=f"RL steps {size}x{size} (ratio + normalized update)",
        how=how,
        size=size,
    )
