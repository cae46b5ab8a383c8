"""Richardson-Lucy iteration throughput of gpudeconv next to its peers (pytest-benchmark).

Each group holds one image size, so gpudeconv and its peers print side by side. Every case
warms up once (FFT plans, caches, kernels), synchronizes the device at the end of each call, and
records MPix·iterations/s (from the best round), the device and the peak memory of one call in
``extra_info``. GPU inputs are on the device before timing starts.
"""

from __future__ import annotations

import pytest

import gpudeconv as gd
from gpudeconv import bench

#: case id -> (implementation, backend its arrays live on)
CASES = {
    "gpudeconv-numpy": ("gpudeconv", "numpy"),
    "scipy.fft-plain": ("scipy.fft", "numpy"),
    "skimage": ("skimage", "numpy"),
    "gpudeconv-cupy": ("gpudeconv", "cupy"),
    "cupy-plain": ("cupy", "cupy"),
}
CPU_SIZE_CASES = ["gpudeconv-numpy", "scipy.fft-plain", "skimage", "gpudeconv-cupy"]
GPU_SIZE_CASES = ["gpudeconv-cupy", "cupy-plain"]


def _implementation(name: str, backend):
    if name == "gpudeconv":
        return lambda image, psf, iterations: gd.richardson_lucy(
            image, psf, iterations, backend=backend
        )
    peer = bench.PEERS[name]
    if peer.requires is not None:
        pytest.importorskip(peer.requires)
    return peer.function


def _backend(name: str):
    if name not in gd.available_backends():
        from gpudeconv.backend import _cupy_status

        pytest.skip(f"{name} backend unavailable: {_cupy_status()[1]}")
    return gd.get_backend(name)


def _measure(benchmark, case: str, size: int, settings, field):
    name, backend_name = CASES[case]
    backend = _backend(backend_name)
    function = _implementation(name, backend)
    benchmark.group = f"RL {size}x{size}, {settings['iterations']} it, float32"
    time_restoration(benchmark, function, backend, size, settings, field, implementation=name)


def time_restoration(benchmark, function, backend, size: int, settings, field, **extra):
    """Time ``function(image, psf, iterations)`` on the field of side ``size`` (on ``backend``)
    and record MPix·it/s, the device and the peak memory in ``extra_info`` (with ``extra``)."""
    iterations, psf = settings["iterations"], settings["psf"]
    image = backend.asarray(field(size))

    def call():
        restored = function(image, psf, iterations)
        backend.synchronize()
        return restored

    benchmark.extra_info.update(
        backend=backend.name,
        device=backend.device_name(),
        size=size,
        iterations=iterations,
        psf_size=int(psf.shape[0]),
        **extra,
    )
    backend.synchronize()
    benchmark.pedantic(call, rounds=3, warmup_rounds=1, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        stats = benchmark.stats.stats
        benchmark.extra_info["mpix_it_per_s"] = bench.throughput(size, iterations, stats.min)
        benchmark.extra_info["mpix_it_per_s_mean"] = bench.throughput(size, iterations, stats.mean)
        benchmark.extra_info["peak_memory_bytes"] = backend.peak_memory(call)


@pytest.mark.parametrize("case", CPU_SIZE_CASES)
def test_rl_throughput(benchmark, case, settings, field):
    """The recorded CPU comparison: 2048², 20 it, gpudeconv NumPy vs skimage and scipy.fft."""
    _measure(benchmark, case, settings["size"], settings, field)


@pytest.mark.parametrize("case", GPU_SIZE_CASES)
def test_rl_throughput_gpu(benchmark, case, settings, field):
    """The recorded GPU comparison: 4096², 20 iterations, gpudeconv CuPy vs plain CuPy."""
    _measure(benchmark, case, settings["gpu_size"], settings, field)
