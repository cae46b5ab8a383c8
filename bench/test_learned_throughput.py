"""Throughput of the learned method's inference next to Richardson-Lucy in the same run
(pytest-benchmark; ``pytest bench/test_learned_throughput.py``).

The learned method is one network pass in overlapping 512-px tiles; RL is 30 iterations (the
count the learned method is compared with for quality). Both on the star field of
``--rl-size`` (default 2048) with the benchmark PSF; figures in MPix/s (image pixels per second
for the whole restoration) in ``extra_info``.
"""

from __future__ import annotations

import pytest
from test_rl_throughput import _backend

import gpudeconv as gd
from gpudeconv import bench

RL_ITERATIONS = 30


@pytest.mark.parametrize("backend_name", ["numpy", "cupy"])
@pytest.mark.parametrize("method", ["learned", "rl30"])
def test_learned_vs_rl(benchmark, method, backend_name, settings, field):
    backend = _backend(backend_name)
    size = settings["size"] if backend_name == "numpy" else settings["gpu_size"]
    psf = settings["psf"]
    image = backend.asarray(field(size))
    if method == "learned":
        from gpudeconv.learned.infer import learned_deconvolve, load_weights

        weights = load_weights()

        def call():
            return learned_deconvolve(image, psf, weights=weights, backend=backend)
    else:

        def call():
            return gd.richardson_lucy(image, psf, RL_ITERATIONS, backend=backend)

    def timed():
        result = call()
        backend.synchronize()
        return result

    benchmark.group = f"learned vs RL {size}x{size}, {backend_name}"
    benchmark.extra_info.update(method=method, device=backend.device_name(), size=size)
    benchmark.pedantic(timed, rounds=2, warmup_rounds=1, iterations=1)
    if benchmark.stats is not None:
        benchmark.extra_info["mpix_per_s"] = size * size / 1e6 / benchmark.stats.stats.min
        benchmark.extra_info["equivalent_rl_mpix_it_per_s"] = (
            bench.throughput(size, RL_ITERATIONS, benchmark.stats.stats.min)
            if method == "rl30"
            else None
        )
