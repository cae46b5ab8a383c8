"""Streamed (tile by tile, file to file) against in-core Richardson-Lucy, on the same backend.

The streamed case is `gpudeconv.tiles.deconvolve_file` from a float32 FITS mosaic (in the page
cache after the warm-up) to a FITS output: the pedestal pass over the input, every tile read
with its halo, restored, its core written and fsynced and journaled, the output renamed. Its
peer is `richardson_lucy` of the same image held in memory (NumPy in, NumPy out: on the GPU it
includes the transfers). They run round by round, interleaved (the peer in pytest-benchmark's
untimed ``setup`` of each round, timed on its own clock), and the best round of each counts.

``extra_info``: ``mpix_it_per_s`` (streamed, best round), ``in_core_mpix_it_per_s``, their
``ratio`` (target >= 0.85), ``tile``, ``halo``, ``tiles``, ``pixel_overhead`` (pixels restored
per image pixel: the halos and RL's reflected frame, which bound the ratio on a backend whose
time is proportional to pixels), ``device``.

    pytest bench/test_tiles_bench.py --benchmark-only --rl-psf-size 25   (PYTHONPATH=.)
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from astropy.io import fits

import gpudeconv as gd
from gpudeconv import bench, tiles

#: Image side and iterations of the comparison.
SIZE = 4096
ITERATIONS = 10


def _backend(name: str):
    if name == "numpy-1thread":
        # FFTW on one thread: two threads waiting for a core that another process holds made
        # single runs vary 3x on the shared 2-core VM (bench/README.md)
        from gpudeconv.backend._numpy import NumPyBackend

        return NumPyBackend(workers=1)
    if name not in gd.available_backends():
        from gpudeconv.backend import _cupy_status

        pytest.skip(f"{name} backend unavailable: {_cupy_status()[1]}")
    return gd.get_backend(name)


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory, field):
    """The star field of ``SIZE`` as a float32 FITS file."""
    path = tmp_path_factory.mktemp("tiles-bench") / "mosaic.fits"
    fits.PrimaryHDU(field(SIZE)).writeto(path)
    return path


@pytest.mark.parametrize("tile", [1024, 2048, None], ids=["tile1024", "tile2048", "planned"])
@pytest.mark.parametrize("backend_name", ["numpy", "numpy-1thread", "cupy"])
def test_streamed_against_in_core(benchmark, backend_name, tile, settings, field, mosaic):
    backend = _backend(backend_name)
    psf = settings["psf"]
    image = field(SIZE)
    output = mosaic.parent / f"sharp-{backend_name}-{tile}.fits"
    in_core_times = []

    def streamed():
        report = tiles.deconvolve_file(
            mosaic,
            output,
            psf,
            ITERATIONS,
            backend=backend,
            tile=tile,
            overwrite=True,
            progress=False,
        )
        backend.synchronize()
        return report

    def in_core():
        start = time.perf_counter()
        gd.richardson_lucy(image, psf, ITERATIONS, backend=backend)
        backend.synchronize()
        in_core_times.append(time.perf_counter() - start)

    report = streamed()  # warm-up: FFT plans for the tile shape, the file in the page cache
    in_core()
    in_core_times.clear()
    benchmark.group = f"streamed vs in-core {SIZE}x{SIZE}, {ITERATIONS} it"
    benchmark.pedantic(streamed, setup=in_core, rounds=3, iterations=1)

    plan = tiles.plan_tiles(
        (SIZE, SIZE), psf_size=psf.shape[0], iterations=ITERATIONS, backend=backend, tile=tile
    )
    radius = psf.shape[0] // 2
    extended = (plan.read_shape[0] + 4 * radius) * (plan.read_shape[1] + 4 * radius)
    overhead = len(plan) * extended / ((SIZE + 4 * radius) ** 2)
    benchmark.extra_info.update(
        backend=backend.name,
        device=backend.device_name(),
        size=SIZE,
        iterations=ITERATIONS,
        psf_size=int(psf.shape[0]),
        tile=report.tile,
        halo=report.halo,
        tiles=report.tiles_total,
        pixel_overhead=round(overhead, 3),
    )
    if benchmark.stats is not None:  # None under --benchmark-disable
        best = benchmark.stats.stats.min
        rate = bench.throughput(SIZE, ITERATIONS, best)
        in_core_rate = bench.throughput(SIZE, ITERATIONS, min(in_core_times))
        benchmark.extra_info.update(
            mpix_it_per_s=rate,
            in_core_mpix_it_per_s=in_core_rate,
            ratio=rate / in_core_rate,
        )
        print(
            f"\n{backend.name} {SIZE}² {ITERATIONS} it, tile {report.tile} halo {report.halo} "
            f"({report.tiles_total} tiles, pixel overhead {overhead:.2f}x): streamed "
            f"{rate:.1f} MPix·it/s, in-core {in_core_rate:.1f} MPix·it/s, "
            f"ratio {rate / in_core_rate:.2f}"
        )
    assert np.isfinite(fits.getdata(output)[:: SIZE // 8, :: SIZE // 8]).all()
