"""Richardson-Lucy iteration throughput, measured against peers in the same run.

``run_bench`` times ``gpudeconv.richardson_lucy`` on a synthetic float32 star field with a Moffat
PSF and, in the same process, the peers that a user would otherwise reach for:

- ``skimage``: :func:`skimage.restoration.richardson_lucy` (``clip=False``, float32 input);
- ``scipy.fft``: :func:`plain_scipy_rl`, a plain but careful ``scipy.fft`` RL (OTF computed once
  per call, ``rfft2``/``irfft2`` on all cores, ``next_fast_len`` shapes, reflect padding);
- ``cupy``: :func:`plain_cupy_rl`, the same iteration written with
  ``cupyx.scipy.signal.fftconvolve(..., mode='same')``, unfused (GPU only).

Throughput is in MPix·iterations/s: image pixels (without padding) times iterations, over the
best wall time of ``repeats`` runs, each taken after ``backend.synchronize()`` on both sides.
Every implementation first runs once untimed (building FFT plans and caches) and once more to
measure its peak memory; then ``repeats`` timed rounds run all implementations in turn, in a
rotating order, so that a busy spell on a shared machine, or the allocator state one leaves
behind, does not favour one of them. On a GPU the input is already on the device, so transfers
are not part of the figures. ``bench/`` holds the pytest-benchmark twin of
this module and ``bench/results/`` the recorded figures.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import scipy.fft
import scipy.signal

from ._errors import GpudeconvError
from ._version import __version__
from .backend import RATIO_EPS, Backend, available_backends, get_backend
from .backend._parallel import usable_cores
from .psf import moffat
from .restore import richardson_lucy

__all__ = [
    "BenchResult",
    "PEERS",
    "fftconvolve_rl",
    "format_results",
    "plain_cupy_rl",
    "plain_scipy_rl",
    "record_metadata",
    "run_bench",
    "skimage_rl",
    "star_field",
    "throughput",
    "write_record",
]

#: FWHM in pixels of the benchmark's Moffat PSF (beta 2.5): ordinary seeing on a 1"/px camera.
BENCH_FWHM = 3.5


# ---------------------------------------------------------------------------------------- data
def star_field(size: int, psf, *, seed: int = 0) -> np.ndarray:
    """A ``(size, size)`` float32 star field seen through ``psf``: sky, stars and noise, all > 0.

    About one star per 400 pixels with heavy-tailed (Pareto) fluxes, blurred by ``psf``, on a sky
    of ~100 counts with a gentle gradient, plus Gaussian noise of Poisson amplitude; clipped at
    1 count so that every pixel is positive, as RL expects of calibrated data.
    """
    rng = np.random.default_rng(seed)
    stars = max(1, size * size // 400)
    rows, cols = rng.integers(0, size, size=(2, stars))
    fluxes = np.minimum(500.0 * (1.0 + rng.pareto(1.3, stars)), 1e6)
    points = np.zeros((size, size), dtype=np.float32)
    np.add.at(points, (rows, cols), fluxes.astype(np.float32))
    scene = scipy.signal.fftconvolve(points, np.asarray(psf, dtype=np.float32), mode="same")
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    scene += 100.0 + 20.0 * ramp[None, :] + 10.0 * ramp[:, None]
    np.maximum(scene, 0.0, out=scene)
    scene += np.sqrt(scene) * rng.standard_normal((size, size), dtype=np.float32)
    np.maximum(scene, 1.0, out=scene)
    return scene.astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------- peers
def _normalized_psf(psf, dtype=np.float32) -> np.ndarray:
    psf = np.asarray(psf, dtype=np.float64)
    return (psf / psf.sum()).astype(dtype)


def plain_scipy_rl(image, psf, iterations: int, *, workers: int = -1) -> np.ndarray:
    """Plain Richardson-Lucy with ``scipy.fft``: the careful CPU code a user would write.

    The image is reflect-padded by the PSF radius (as gpudeconv does), the FFT shape is
    ``next_fast_len(padded + radius)`` per axis (enough that the circular wrap stays outside the
    padded window), the OTF is computed once, and each iteration is
    ``u *= Hᵀ(d / max(H u, eps))`` with ``rfft2``/``irfft2`` on ``workers`` threads and in-place
    spectrum products. The estimate starts from the padded data; float32 throughout.

    Returns the restored ``(H, W)`` float32 image.
    """
    image = np.asarray(image, dtype=np.float32)
    psf = _normalized_psf(psf)
    height, width = image.shape
    ry, rx = psf.shape[0] // 2, psf.shape[1] // 2
    observed = np.pad(image, ((ry, ry), (rx, rx)), mode="reflect")
    ph, pw = observed.shape
    shape = (
        scipy.fft.next_fast_len(ph + ry, real=True),
        scipy.fft.next_fast_len(pw + rx, real=True),
    )
    kernel = np.zeros(shape, dtype=np.float32)
    kernel[: psf.shape[0], : psf.shape[1]] = psf
    kernel = np.roll(kernel, (-ry, -rx), axis=(0, 1))
    otf = scipy.fft.rfft2(kernel, workers=workers)
    otf_conj = np.conj(otf)

    def convolve(x, transfer):
        spectrum = scipy.fft.rfft2(x, s=shape, workers=workers)
        spectrum *= transfer
        return scipy.fft.irfft2(spectrum, s=shape, workers=workers, overwrite_x=True)[:ph, :pw]

    estimate = observed.copy()
    for _ in range(iterations):
        blurred = convolve(estimate, otf)
        np.maximum(blurred, np.float32(RATIO_EPS), out=blurred)
        np.divide(observed, blurred, out=blurred)
        estimate *= convolve(blurred, otf_conj)
    return estimate[ry : ry + height, rx : rx + width]


def fftconvolve_rl(image, psf, iterations: int, *, xp=np, fftconvolve=scipy.signal.fftconvolve):
    """Plain Richardson-Lucy with ``fftconvolve(..., mode='same')``, unfused, for any ``xp``.

    The body of :func:`plain_cupy_rl` (``xp=cupy``, ``cupyx.scipy.signal.fftconvolve``); with
    NumPy and SciPy it checks that body on the CPU. Reflect padding by the PSF radius, the
    estimate starts from the data, ``u *= (d / max(h * u, eps)) ⋆ h``.
    """
    image = xp.asarray(image, dtype=xp.float32)
    psf = xp.asarray(_normalized_psf(psf))
    psf_mirror = xp.ascontiguousarray(psf[::-1, ::-1])
    height, width = image.shape
    ry, rx = psf.shape[0] // 2, psf.shape[1] // 2
    observed = xp.pad(image, ((ry, ry), (rx, rx)), mode="reflect")
    estimate = observed.copy()
    for _ in range(iterations):
        blurred = fftconvolve(estimate, psf, mode="same")
        ratio = observed / xp.maximum(blurred, RATIO_EPS)
        estimate *= fftconvolve(ratio, psf_mirror, mode="same")
    return estimate[ry : ry + height, rx : rx + width]


def plain_cupy_rl(image, psf, iterations: int):
    """Plain Richardson-Lucy on the GPU with ``cupyx.scipy.signal.fftconvolve`` (the GPU peer).

    Imports cupy, so call it only where ``'cupy' in gpudeconv.available_backends()``. Returns a
    CuPy array; the caller synchronizes.
    """
    import cupy
    import cupyx.scipy.signal

    return fftconvolve_rl(
        image, psf, iterations, xp=cupy, fftconvolve=cupyx.scipy.signal.fftconvolve
    )


def skimage_rl(image, psf, iterations: int) -> np.ndarray:
    """:func:`skimage.restoration.richardson_lucy` with ``clip=False`` on float32 input."""
    from skimage.restoration import richardson_lucy as skimage_richardson_lucy

    image = np.asarray(image, dtype=np.float32)
    return skimage_richardson_lucy(image, _normalized_psf(psf), num_iter=iterations, clip=False)


def _gpudeconv_rl(backend: Backend) -> Callable:
    def run(image, psf, iterations):
        return richardson_lucy(image, psf, iterations, backend=backend)

    return run


@dataclass(frozen=True)
class Peer:
    """A peer implementation: its label, the backend its arrays live on, and the function."""

    label: str
    backend: str
    function: Callable
    requires: str | None = None  # a module it imports, checked before running it


PEERS = {
    "skimage": Peer("skimage", "numpy", skimage_rl, requires="skimage"),
    "scipy.fft": Peer("scipy.fft plain", "numpy", plain_scipy_rl),
    "cupy": Peer("cupy plain", "cupy", plain_cupy_rl, requires="cupy"),
}
#: Peers measured when ``peers=True``, by the backend under test.
DEFAULT_PEERS = {"numpy": ("skimage", "scipy.fft"), "cupy": ("cupy",)}


# ------------------------------------------------------------------------------------ results
@dataclass(frozen=True)
class BenchResult:
    """One implementation's figures.

    ``seconds`` is the best of ``times`` (one full RL call each, warm); ``mpix_it_per_s`` is
    ``size**2 * iterations / seconds / 1e6``; ``peak_memory_bytes`` is the memory one call
    allocated beyond what existed before it: NumPy buffers traced by ``tracemalloc`` on the CPU
    (FFT library scratch not included), CuPy memory-pool growth on the GPU (cuFFT work areas
    included), or None where it was not measured.
    """

    name: str
    backend: str
    device: str
    size: int
    iterations: int
    seconds: float
    mpix_it_per_s: float
    peak_memory_bytes: int | None = None
    times: tuple[float, ...] = field(default_factory=tuple)

    @property
    def label(self) -> str:
        return f"{self.name} {self.backend} {self.size}² {self.iterations} it"


def throughput(size: int, iterations: int, seconds: float) -> float:
    """MPix·iterations per second for a ``size × size`` image."""
    return size * size * iterations / seconds / 1e6


def _time_once(function: Callable[[], object], backend: Backend) -> float:
    backend.synchronize()
    start = time.perf_counter()
    result = function()
    backend.synchronize()
    elapsed = time.perf_counter() - start
    del result
    return elapsed


def _peer_keys(peers, backend: Backend) -> list[str]:
    if peers is True:
        return list(DEFAULT_PEERS.get(backend.name, ()))
    if not peers:
        return []
    keys = [peers] if isinstance(peers, str) else list(peers)
    unknown = [key for key in keys if key not in PEERS]
    if unknown:
        msg = f"peers must be True, False or names from {', '.join(PEERS)}; got {unknown!r}"
        raise GpudeconvError(msg)
    return keys


def _peer_unavailable(peer: Peer) -> str | None:
    """Why ``peer`` cannot run here, or None."""
    if peer.backend not in available_backends():
        return f"the {peer.backend} backend is not available here"
    if peer.requires is not None:
        try:
            __import__(peer.requires)
        except ImportError:
            return f"{peer.requires} is not installed"
    return None


def _validate_bench(size, iterations, psf_size, repeats) -> None:
    for name, value, least in (("iterations", iterations, 1), ("repeats", repeats, 1)):
        if isinstance(value, bool) or int(value) != value or value < least:
            msg = f"{name} must be a positive integer, got {value!r}"
            raise GpudeconvError(msg)
    if isinstance(psf_size, bool) or int(psf_size) != psf_size or psf_size < 3 or psf_size % 2 == 0:
        msg = f"psf_size must be an odd integer >= 3, got {psf_size!r}; e.g. 25"
        raise GpudeconvError(msg)
    if isinstance(size, bool) or int(size) != size or size < max(32, 2 * psf_size):
        msg = (
            f"size must be an integer of at least {max(32, 2 * psf_size)} pixels (twice the PSF "
            f"and at least 32), got {size!r}; typical values are 2048 and 4096"
        )
        raise GpudeconvError(msg)


def run_bench(
    size: int = 2048,
    iterations: int = 20,
    *,
    backend: str | Backend | None = None,
    psf_size: int = 25,
    peers: bool | Sequence[str] = True,
    repeats: int = 3,
    measure_memory: bool = True,
    log: Callable[[str], object] | None = print,
) -> list[BenchResult]:
    """Measure RL iteration throughput of gpudeconv and its peers on one star field.

    Parameters
    ----------
    size : int
        Side of the square float32 test image (2048 and 4096 are the recorded sizes).
    iterations : int
        RL iterations per call (20 in the recorded figures).
    backend : {'auto', 'numpy', 'cupy'} or Backend, optional
        The gpudeconv backend under test; None follows ``GPUDECONV_BACKEND``, then ``'auto'``.
    psf_size : odd int
        Side of the Moffat PSF (FWHM 3.5 px, beta 2.5).
    peers : bool or sequence of {'skimage', 'scipy.fft', 'cupy'}
        True measures the peers of the backend (``skimage`` and ``scipy.fft`` on NumPy, ``cupy``
        on CuPy); peers that cannot run here are skipped with a message.
    repeats : int
        Timed calls per implementation; the best is reported.
    measure_memory : bool
        Spend one extra untimed call per implementation measuring its peak memory.
    log : callable(str), optional
        Receives progress lines and the final table (``print`` by default; None is silent).

    Returns
    -------
    results : list of BenchResult
        gpudeconv first, then the peers in the order given.
    """
    _validate_bench(size, iterations, psf_size, repeats)
    size, iterations, repeats = int(size), int(iterations), int(repeats)
    say = log if log is not None else (lambda line: None)
    tested = get_backend(backend)
    psf = moffat(BENCH_FWHM, size=int(psf_size))
    host_image = star_field(size, psf)
    inputs = {tested.name: tested.asarray(host_image)}

    say(
        f"Richardson-Lucy throughput: {size}² float32, {iterations} iterations, "
        f"Moffat PSF {psf_size}×{psf_size} (FWHM {BENCH_FWHM}), best of {repeats}"
    )
    plan = [("gpudeconv", _gpudeconv_rl(tested), tested)]
    for key in _peer_keys(peers, tested):
        peer = PEERS[key]
        why = _peer_unavailable(peer)
        if why is not None:
            say(f"  skipping peer {peer.label}: {why}")
            continue
        peer_backend = get_backend(peer.backend)
        if peer_backend.name not in inputs:
            inputs[peer_backend.name] = peer_backend.asarray(host_image)
        plan.append((peer.label, peer.function, peer_backend))

    calls = []
    for name, function, where in plan:
        say(f"  {name} ({where.name}): warm-up" + (", memory" if measure_memory else ""))
        image = inputs[where.name]

        def call(function=function, image=image):
            return function(image, psf, iterations)

        _time_once(call, where)  # builds FFT plans, measured FFT lengths, compiled kernels
        peak = where.peak_memory(call) if measure_memory else None
        calls.append((name, call, where, peak))
    # Rounds interleave the implementations, so that a busy spell on a shared machine slows
    # all of them rather than one, and rotate their order, so that none always runs right after
    # the same other one (which leaves the allocator and caches in its own state).
    times = {name: [] for name, *_ in calls}
    for round_ in range(repeats):
        say(f"  timed round {round_ + 1}/{repeats}")
        shift = round_ % len(calls)
        for name, call, where, _ in calls[shift:] + calls[:shift]:
            times[name].append(_time_once(call, where))
    results = []
    for name, _, where, peak in calls:
        seconds = min(times[name])
        results.append(
            BenchResult(
                name=name,
                backend=where.name,
                device=where.device_name(),
                size=size,
                iterations=iterations,
                seconds=seconds,
                mpix_it_per_s=throughput(size, iterations, seconds),
                peak_memory_bytes=peak,
                times=tuple(times[name]),
            )
        )
    say(format_results(results))
    return results


# ------------------------------------------------------------------------------------- output
def _ratios(result: BenchResult, results: Sequence[BenchResult]) -> list[tuple[str, float]]:
    """Speed-ups of ``result`` over the peers measured at the same size and iterations."""
    return [
        (other.name, other.seconds / result.seconds)
        for other in results
        if other.name != "gpudeconv"
        and other.size == result.size
        and other.iterations == result.iterations
    ]


def _mib(nbytes: int | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:.0f} MiB"


def format_results(results: Sequence[BenchResult]) -> str:
    """One line per result; gpudeconv lines end with the speed-up over each peer."""
    lines = []
    for result in results:
        line = (
            f"{result.label}: {result.seconds:.3g} s, {result.mpix_it_per_s:.1f} MPix·it/s, "
            f"peak {_mib(result.peak_memory_bytes)}"
        )
        if result.name == "gpudeconv":
            ratios = _ratios(result, results)
            if ratios:
                line += " (" + ", ".join(f"{ratio:.2f}x {name}" for name, ratio in ratios) + ")"
        lines.append(line)
    return "\n".join(lines)


def _version(*distributions: str) -> str | None:
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _cpu_model() -> str:
    """The CPU model, with the vector extensions that FFT libraries use (Linux)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    simd = [name for name in ("avx", "avx2", "fma", "avx512f") if name in flags]
    return f"{model} [{' '.join(simd)}]" if simd else model


#: Environment variables that change what a benchmark measures, recorded when set.
_ENV_RECORDED = (
    "GPUDECONV_BACKEND",
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "OPENBLAS_CORETYPE",
    "MKL_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
    "CUPY_CACHE_DIR",
)


def record_metadata(results: Sequence[BenchResult], *, command: str) -> dict:
    """Machine, date, command and versions for a results record."""
    versions = {
        "gpudeconv": __version__,
        "python": platform.python_version(),
        "scikit-image": _version("scikit-image"),
    }
    for name in sorted({result.backend for result in results}):
        versions.update(get_backend(name).versions())  # numpy, scipy, pyfftw; cupy, CUDA
    return {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "devices": sorted({result.device for result in results}),
        "host": {
            "cpu": _cpu_model(),
            "logical_cpus": os.cpu_count(),
            "usable_cpus": usable_cores(),
            "platform": platform.platform(),
        },
        "environment": {name: os.environ[name] for name in _ENV_RECORDED if name in os.environ},
        "versions": versions,
    }


def write_record(
    results: Sequence[BenchResult], path, *, command: str, notes: str | None = None
) -> Path:
    """Write the results with machine, date, command and versions to ``path``.

    ``.json`` writes JSON (``{"meta": ..., "results": [...]}``); any other suffix writes Markdown:
    the table of :func:`format_results`, the metadata and the figures as a Markdown table.
    ``notes`` (free text: load on the machine, caveats) is kept in either form. Parent folders
    are created. Returns the path written.
    """
    path = Path(path)
    meta = record_metadata(results, command=command)
    if notes:
        meta["notes"] = notes
    rows = []
    for result in results:
        row = asdict(result)
        row["times"] = list(result.times)
        row["speedup"] = dict(_ratios(result, results)) if result.name == "gpudeconv" else {}
        rows.append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
        return path
    lines = [
        f"# Richardson-Lucy throughput, {meta['date'][:10]}",
        "",
        f"- Date: {meta['date']}",
        f"- Command: `{command}`",
        f"- Devices: {'; '.join(meta['devices'])}",
        f"- Host: {meta['host']['cpu']}, {meta['host']['logical_cpus']} logical CPUs "
        f"({meta['host']['usable_cpus']} usable), {meta['host']['platform']}",
        "- Versions: "
        + ", ".join(f"{name} {value}" for name, value in meta["versions"].items() if value),
    ]
    environment = meta["environment"]
    lines.append(
        "- Environment: "
        + (", ".join(f"{name}={value}" for name, value in environment.items()) or "nothing set")
    )
    if notes:
        lines += ["", notes]
    lines += [
        "",
        "| implementation | backend | size | iterations | best s | MPix·it/s | peak memory "
        "| all runs s | gpudeconv speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result, row in zip(results, rows, strict=True):
        speedup = ", ".join(f"{ratio:.2f}x {name}" for name, ratio in row["speedup"].items())
        runs = ", ".join(f"{t:.4g}" for t in result.times)
        lines.append(
            f"| {result.name} | {result.backend} | {result.size}² | {result.iterations} "
            f"| {result.seconds:.4g} | {result.mpix_it_per_s:.1f} "
            f"| {_mib(result.peak_memory_bytes)} | {runs} | {speedup} |"
        )
    lines += ["", "```", format_results(results), "```", ""]
    path.write_text("\n".join(lines))
    return path
