"""The card's limits, measured with CuPy alone, and the floor of one Richardson-Lucy iteration.

    python bench/gpu_limits.py             # writes bench/results/DATE-<gpu>-limits.md and .json
    python bench/gpu_limits.py --sizes 2048 4096 8192 --repeats 20 --out bench/results

What it measures (every timing between CUDA events on the current stream, after warm-up runs,
the median of ``--repeats``):

* **device memory bandwidth**: ``cupy.copyto`` between two ``--copy-mib`` arrays (CuPy's own
  elementwise copy: one read and one write per element) and a raw-kernel triad
  ``a = b + s c`` (two reads, one write: the shape of RL's fused passes). Bytes moved, read plus
  written, per second.
* **FFT**: ``cupy.fft.rfft2`` then ``irfft2`` of a float32 ``n x n`` array (cuFFT through CuPy's
  plan cache, so plans are made once in the warm-up).
* **FP32 throughput**: a raw kernel whose threads each run 16 independent ``fmaf`` chains
  (``2 * 16 * rounds`` FLOP a thread); the datasheet peak beside it where the properties give it.
* **host <-> device**: ``ndarray.set`` / ``ndarray.get(out=)`` of ``--copy-mib`` from and to
  page-locked (``cupyx.empty_pinned``) and ordinary host memory.

From them, the floor of one RL iteration on an ``n x n`` float32 image: two ``rfft2 + irfft2``
pairs (the blur and its adjoint) plus the elementwise passes at the triad's bandwidth (see
:data:`ELEMENTWISE_PASSES`). No padding is counted: the floor is for the bare image, so a real
run's transforms (reflect-padded to a fast length) make it reachable only in part, and the
record says by how much a padded shape costs.

Nothing of gpudeconv is needed to measure; where the package imports, its CuPy backend adds the
card's FP32 peak and the padded shape its RL transforms at each size.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

#: The elementwise passes of one plain RL iteration, as (what, bytes read and written per image
#: pixel) in float32. A real-to-complex spectrum has n (n/2 + 1) complex64 values, 4 bytes per
#: image pixel, and so has the stored OTF.
ELEMENTWISE_PASSES = (
    ("blur: spectrum x OTF (read both, write the product)", 12),
    ("adjoint: spectrum x conj(OTF)", 12),
    ("fused ratio d / (H u): read d and H u, write the ratio", 12),
    ("fused update u * H^T r: read u and the correction, write u", 12),
)

#: The raw kernels: the FP32 throughput chain and the bandwidth triad.
KERNELS = r"""
// FP32 throughput: 16 independent fmaf chains a thread, rounds times; the sum is written so
// that nothing is optimized away. FLOP = 2 * 16 * rounds per thread.
extern "C" __global__ void gpudeconv_limits_fma(float* out, const float scale, const float step,
                                                const int rounds) {
    const long long thread = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    float chain[16];
#pragma unroll
    for (int k = 0; k < 16; ++k) chain[k] = (float)(threadIdx.x + k) * 1e-3f;
    for (int r = 0; r < rounds; ++r) {
#pragma unroll
        for (int k = 0; k < 16; ++k) chain[k] = fmaf(chain[k], scale, step);
    }
    float sum = 0.0f;
#pragma unroll
    for (int k = 0; k < 16; ++k) sum += chain[k];
    out[thread] = sum;
}

// Bandwidth triad a = b + s c over n elements, grid-stride.
extern "C" __global__ void gpudeconv_limits_triad(float* a, const float* b, const float* c,
                                                  const float s, const long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        a[i] = b[i] + s * c[i];
    }
}
"""

FMA_CHAINS = 16
MIB = 2**20


# ---------------------------------------------------------------------------- timing
def time_device(cupy, function: Callable[[], object], *, repeats: int, warmup: int = 2) -> list:
    """Seconds per call of ``function``, one CUDA event pair around each call, after ``warmup``
    untimed calls (FFT plans, kernel compilation, pool growth)."""
    for _ in range(warmup):
        function()
    cupy.cuda.get_current_stream().synchronize()
    seconds = []
    for _ in range(repeats):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        function()
        end.record()
        end.synchronize()
        seconds.append(cupy.cuda.get_elapsed_time(start, end) / 1e3)
    return seconds


def summary(seconds: list) -> dict:
    """Median, best and spread of a list of timings, in seconds."""
    return {
        "median_s": statistics.median(seconds),
        "min_s": min(seconds),
        "max_s": max(seconds),
        "repeats": len(seconds),
    }


# ---------------------------------------------------------------------------- measurements
def measure_bandwidth(cupy, kernels, *, nbytes: int, repeats: int, block: int) -> dict:
    """Device memory bandwidth of a copy and of a triad, in bytes moved (read + written) per s."""
    n = nbytes // 4
    a = cupy.zeros(n, dtype=cupy.float32)
    b = cupy.full(n, 1.5, dtype=cupy.float32)
    c = cupy.full(n, 0.25, dtype=cupy.float32)
    copy = summary(time_device(cupy, lambda: cupy.copyto(a, b), repeats=repeats))
    if not bool((a == b).all()):
        raise RuntimeError("cupy.copyto did not copy: the bandwidth figure would be meaningless")
    triad_kernel = kernels.get_function("gpudeconv_limits_triad")
    sms = _properties(cupy)["multiProcessorCount"]
    blocks = max(1, min(-(-n // block), 32 * sms))

    def triad():
        triad_kernel((blocks,), (block,), (a, b, c, np.float32(2.0), np.int64(n)))

    triad_time = summary(time_device(cupy, triad, repeats=repeats))
    if not bool((a == np.float32(2.0)).all()):  # 1.5 + 2 * 0.25
        raise RuntimeError("the triad kernel did not write a = b + 2 c everywhere")
    copy["bytes_per_s"] = 2 * n * 4 / copy["median_s"]
    triad_time["bytes_per_s"] = 3 * n * 4 / triad_time["median_s"]
    triad_time["grid"], triad_time["block"] = blocks, block
    return {"bytes": n * 4, "copy": copy, "triad": triad_time}


def fma_reference(threads: int, rounds: int, scale: float, step: float) -> np.ndarray:
    """What :data:`KERNELS`' FMA kernel writes for thread indices ``0 .. threads - 1`` of one
    block, in float32 (fused multiply-adds round once; float64 then float32 rounds the same for
    these values to within an ulp)."""
    lanes = np.arange(threads, dtype=np.float32)[:, None]
    chain = (lanes + np.arange(FMA_CHAINS, dtype=np.float32)) * np.float32(1e-3)
    for _ in range(rounds):
        chain = (chain.astype(np.float64) * scale + step).astype(np.float32)
    return chain.sum(axis=1, dtype=np.float32)


def measure_fma(cupy, kernels, *, blocks: int, block: int, rounds: int, repeats: int) -> dict:
    """FP32 FLOP/s of the FMA chains, and a check that the kernel computed them."""
    out = cupy.empty(blocks * block, dtype=cupy.float32)
    kernel = kernels.get_function("gpudeconv_limits_fma")
    scale, step = 0.999, 1e-4

    def run():
        kernel((blocks,), (block,), (out, np.float32(scale), np.float32(step), np.int32(rounds)))

    result = summary(time_device(cupy, run, repeats=repeats))
    expected = fma_reference(block, rounds, scale, step)
    got = cupy.asnumpy(out).reshape(blocks, block)
    if not np.allclose(got, expected[None, :], rtol=1e-4, atol=1e-6):
        raise RuntimeError("the FMA kernel's results are wrong: no FLOP figure from it")
    flop = 2.0 * FMA_CHAINS * rounds * blocks * block
    result.update(flop=flop, flop_per_s=flop / result["median_s"], grid=blocks, block=block)
    return result


def measure_fft(cupy, size: int, *, repeats: int) -> dict:
    """One ``rfft2`` + ``irfft2`` pair of a float32 ``size x size`` array."""
    x = cupy.full((size, size), 1.0, dtype=cupy.float32)
    shape = x.shape

    def pair():
        return cupy.fft.irfft2(cupy.fft.rfft2(x), s=shape)

    result = summary(time_device(cupy, pair, repeats=repeats))
    back = pair()
    if back.dtype != cupy.float32 or not bool(cupy.allclose(back, 1.0, atol=1e-4)):
        raise RuntimeError(f"rfft2 + irfft2 at {size}^2 did not return its float32 input")
    result["size"] = size
    return result


def measure_transfers(cupy, cupyx, *, nbytes: int, repeats: int) -> dict:
    """Host-to-device and device-to-host bytes per second, pinned and pageable."""
    n = nbytes // 4
    device = cupy.zeros(n, dtype=cupy.float32)
    figures = {}
    for kind, host in (
        ("pinned", cupyx.empty_pinned((n,), dtype=np.float32)),
        ("pageable", np.empty(n, dtype=np.float32)),
    ):
        host[...] = 3.0
        upload = summary(time_device(cupy, lambda host=host: device.set(host), repeats=repeats))
        download = summary(
            time_device(cupy, lambda host=host: device.get(out=host), repeats=repeats)
        )
        if not bool((host == 3.0).all()):
            raise RuntimeError(f"{kind} transfers did not round-trip the data")
        for timing in (upload, download):
            timing["bytes_per_s"] = n * 4 / timing["median_s"]
        figures[kind] = {"host_to_device": upload, "device_to_host": download}
    figures["bytes"] = n * 4
    return figures


# ---------------------------------------------------------------------------- the floor
def rl_iteration_floor(size: int, fft_pair_s: float, bytes_per_s: float) -> dict:
    """The least time one plain RL iteration on a ``size x size`` float32 image can take on a card
    whose ``rfft2 + irfft2`` pair at that size takes ``fft_pair_s`` and whose memory moves
    ``bytes_per_s``: two transform pairs plus :data:`ELEMENTWISE_PASSES`."""
    pixels = size * size
    bytes_per_pixel = sum(per_pixel for _, per_pixel in ELEMENTWISE_PASSES)
    fft_s = 2 * fft_pair_s
    elementwise_s = bytes_per_pixel * pixels / bytes_per_s
    seconds = fft_s + elementwise_s
    return {
        "size": size,
        "fft_s": fft_s,
        "elementwise_s": elementwise_s,
        "elementwise_bytes_per_pixel": bytes_per_pixel,
        "seconds": seconds,
        "mpix_it_per_s": pixels / 1e6 / seconds,
    }


# ---------------------------------------------------------------------------- facts
def _properties(cupy) -> dict:
    return cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)


def _attribute(cupy, number: int):
    """A ``cudaDeviceAttr`` of the current device, or None where the runtime does not answer."""
    try:
        return cupy.cuda.runtime.deviceGetAttribute(number, cupy.cuda.Device().id)
    except Exception:  # noqa: BLE001  (an attribute this runtime lacks: no figure)
        return None


def _dotted(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


def device_facts(cupy) -> dict:
    """Name, compute capability, memory, versions and datasheet peaks of the current device."""
    properties = _properties(cupy)
    name = properties["name"]
    name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
    # CUDA 13 dropped the clocks from cudaDeviceProp; the attributes still answer
    # (cudaDevAttrMemoryClockRate = 36, kHz; cudaDevAttrGlobalMemoryBusWidth = 37, bits).
    memory_clock = properties.get("memoryClockRate") or _attribute(cupy, 36)
    bus_width = properties.get("memoryBusWidth") or _attribute(cupy, 37)
    facts = {
        "name": name,
        "compute_capability": cupy.cuda.Device().compute_capability,
        "multiprocessors": properties["multiProcessorCount"],
        "memory_bytes": properties["totalGlobalMem"],
        "cupy": cupy.__version__,
        "cuda_runtime": _dotted(cupy.cuda.runtime.runtimeGetVersion()),
        "cuda_driver": _dotted(cupy.cuda.runtime.driverGetVersion()),
        # double data rate: two transfers a memory clock
        "datasheet_bytes_per_s": (
            2 * memory_clock * 1e3 * bus_width / 8 if memory_clock and bus_width else None
        ),
        "datasheet_flop_per_s": None,
    }
    try:
        import gpudeconv as gd

        facts["datasheet_flop_per_s"] = gd.get_backend("cupy").peak_flops()
    except Exception:  # noqa: BLE001  (gpudeconv is optional here)
        pass
    return facts


def engine_shapes(sizes, psf_size: int) -> dict:
    """The padded shape gpudeconv's RL transforms at each image side, ``None`` without the package.

    RL pads a plane by the PSF radius ``r`` twice (reflection, then the unobserved ring) and the
    FFT convolution adds ``r`` more against wrap-around, up to the backend's next fast length.
    """
    try:
        import gpudeconv as gd

        backend = gd.get_backend("cupy")
    except Exception:  # noqa: BLE001  (gpudeconv is optional here)
        return {str(size): None for size in sizes}
    radius = psf_size // 2
    return {str(size): list(backend.fft_shape((size + 5 * radius,) * 2)) for size in sizes}


def next_smooth(n: int, primes: tuple[int, ...]) -> int:
    """The least integer >= ``n`` whose prime factors are all in ``primes``."""
    candidate = max(int(n), 1)
    while True:
        rest = candidate
        for prime in primes:
            while rest % prime == 0:
                rest //= prime
        if rest == 1:
            return candidate
        candidate += 1


#: The padded lengths worth timing against the engine's: cuFFT's fastest radices first.
LENGTH_FAMILIES = {
    "2-3-5-7 (the engine's next_fast_len)": (2, 3, 5, 7),
    "2-3-5": (2, 3, 5),
    "2-3": (2, 3),
    "2": (2,),
}


def candidate_lengths(size: int, psf_size: int) -> dict[str, int]:
    """For an image side, the least padded length of each family past the engine's padding
    (``size + 5 r``, see :func:`engine_shapes`)."""
    least = size + 5 * (psf_size // 2)
    return {family: next_smooth(least, primes) for family, primes in LENGTH_FAMILIES.items()}


def measure_lengths(cupy, sizes, psf_size: int, *, repeats: int) -> list[dict]:
    """``rfft2 + irfft2`` time at each candidate padded length: which one cuFFT should get."""
    rows = []
    for size in sizes:
        timed = {}
        for family, length in candidate_lengths(size, psf_size).items():
            if length not in timed:
                timed[length] = measure_fft(cupy, length, repeats=repeats)["median_s"]
                cupy.fft.config.get_plan_cache().clear()
                cupy.get_default_memory_pool().free_all_blocks()
            rows.append({"size": size, "family": family, "length": length, "pair_s": timed[length]})
    return rows


# ---------------------------------------------------------------------------- the run
def measure(cupy, cupyx, options) -> dict:
    """Every figure of this module for the current device, as one JSON-ready dict."""
    kernels = cupy.RawModule(
        code=KERNELS, name_expressions=["gpudeconv_limits_fma", "gpudeconv_limits_triad"]
    )
    facts = device_facts(cupy)
    nbytes = int(options.copy_mib * MIB)
    bandwidth = measure_bandwidth(
        cupy, kernels, nbytes=nbytes, repeats=options.repeats, block=options.block
    )
    blocks = options.fma_blocks or 8 * facts["multiprocessors"]
    fma = measure_fma(
        cupy,
        kernels,
        blocks=blocks,
        block=options.block,
        rounds=options.fma_rounds,
        repeats=options.repeats,
    )
    if facts["datasheet_flop_per_s"]:
        fma["fraction_of_datasheet"] = fma["flop_per_s"] / facts["datasheet_flop_per_s"]
    transfers = measure_transfers(cupy, cupyx, nbytes=nbytes, repeats=options.repeats)
    ffts, floors = [], []
    for size in options.sizes:
        fft = measure_fft(cupy, size, repeats=options.repeats)
        ffts.append(fft)
        if size in options.floor_sizes:
            floors.append(
                rl_iteration_floor(size, fft["median_s"], bandwidth["triad"]["bytes_per_s"])
            )
        cupy.fft.config.get_plan_cache().clear()
        cupy.get_default_memory_pool().free_all_blocks()
    return {
        "device": facts,
        "bandwidth": bandwidth,
        "fma": fma,
        "transfers": transfers,
        "fft": ffts,
        "rl_floor": floors,
        "engine_fft_shapes": engine_shapes(options.floor_sizes, options.psf_size),
        "padded_lengths": measure_lengths(
            cupy, options.floor_sizes, options.psf_size, repeats=options.repeats
        ),
        "elementwise_passes": [list(p) for p in ELEMENTWISE_PASSES],
        "psf_size": options.psf_size,
    }


def _gb(value) -> str:
    return "n/a" if value is None else f"{value / 1e9:.1f}"


def _ms(value: float) -> str:
    return f"{value * 1e3:.3f}"


def format_markdown(figures: dict, *, command: str, date: str) -> str:
    """The Markdown record of :func:`measure`'s figures."""
    device = figures["device"]
    bandwidth, fma, transfers = figures["bandwidth"], figures["fma"], figures["transfers"]
    lines = [
        f"# GPU limits: {device['name']}",
        "",
        f"- date: {date}",
        f"- command: `{command}`",
        f"- device: {device['name']}, sm_{device['compute_capability']}, "
        f"{device['multiprocessors']} SMs, {device['memory_bytes'] / 2**30:.1f} GiB",
        f"- CUDA driver {device['cuda_driver']}, runtime {device['cuda_runtime']}, "
        f"CuPy {device['cupy']}, Python {platform.python_version()}",
        "",
        "| figure | median | best | unit |",
        "|---|---|---|---|",
        f"| device copy, `cupy.copyto`, {bandwidth['bytes'] / MIB:g} MiB (read + write) | "
        f"{_gb(bandwidth['copy']['bytes_per_s'])} | "
        f"{_gb(2 * bandwidth['bytes'] / bandwidth['copy']['min_s'])} | GB/s |",
        f"| device triad a = b + s c, raw kernel (2 reads + 1 write) | "
        f"{_gb(bandwidth['triad']['bytes_per_s'])} | "
        f"{_gb(3 * bandwidth['bytes'] / bandwidth['triad']['min_s'])} | GB/s |",
        f"| datasheet memory bandwidth | {_gb(device['datasheet_bytes_per_s'])} | | GB/s |",
        f"| FP32 FMA chains ({fma['grid']} x {fma['block']} threads) | "
        f"{fma['flop_per_s'] / 1e12:.2f} | {fma['flop'] / fma['min_s'] / 1e12:.2f} | TFLOP/s |",
        "| datasheet FP32 peak | "
        + (
            f"{device['datasheet_flop_per_s'] / 1e12:.2f}"
            if device["datasheet_flop_per_s"]
            else "n/a"
        )
        + " | | TFLOP/s |",
    ]
    for kind in ("pinned", "pageable"):
        for direction, label in (("host_to_device", "H->D"), ("device_to_host", "D->H")):
            timing = transfers[kind][direction]
            lines.append(
                f"| {label} {kind}, {transfers['bytes'] / MIB:g} MiB | "
                f"{_gb(timing['bytes_per_s'])} | "
                f"{_gb(transfers['bytes'] / timing['min_s'])} | GB/s |"
            )
    for fft in figures["fft"]:
        lines.append(
            f"| `rfft2` + `irfft2` float32 {fft['size']}² (median of {fft['repeats']}) | "
            f"{_ms(fft['median_s'])} | {_ms(fft['min_s'])} | ms |"
        )
    lines += [
        "",
        "## The floor of one RL iteration",
        "",
        "Two `rfft2 + irfft2` pairs (the blur and its adjoint) plus the elementwise passes at the "
        "triad's bandwidth, on the bare image (no padding):",
        "",
    ]
    lines += [f"- {what}: {per_pixel} B/px" for what, per_pixel in figures["elementwise_passes"]]
    lines += [
        "",
        "| image | FFTs | elementwise | one iteration | floor MPix·it/s | engine's FFT shape |",
        "|---|---|---|---|---|---|",
    ]
    for floor in figures["rl_floor"]:
        shape = figures["engine_fft_shapes"][str(floor["size"])]
        lines.append(
            f"| {floor['size']}² | {_ms(floor['fft_s'])} ms | {_ms(floor['elementwise_s'])} ms | "
            f"{_ms(floor['seconds'])} ms | {floor['mpix_it_per_s']:.0f} | "
            f"{'x'.join(map(str, shape)) if shape else 'n/a'} |"
        )
    lines += [
        "",
        "## Which padded length cuFFT should get",
        "",
        f"`rfft2` + `irfft2` at the least length of each family past the engine's padding "
        f"(image + 5 PSF radii, PSF side {figures['psf_size']}):",
        "",
        "| image | family | length | pair ms | per padded pixel, ns |",
        "|---|---|---|---|---|",
    ]
    for row in figures["padded_lengths"]:
        lines.append(
            f"| {row['size']}² | {row['family']} | {row['length']} | {_ms(row['pair_s'])} | "
            f"{row['pair_s'] / row['length'] ** 2 * 1e9:.3f} |"
        )
    return "\n".join(lines) + "\n"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "gpu"


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument(
        "--floor-sizes", type=int, nargs="+", default=None, help="default: 4096 and 8192 if timed"
    )
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--copy-mib", type=float, default=512.0)
    parser.add_argument("--fma-rounds", type=int, default=16384)
    parser.add_argument("--fma-blocks", type=int, default=0, help="default: 8 per SM")
    parser.add_argument("--block", type=int, default=256, help="threads per block")
    parser.add_argument("--psf-size", type=int, default=25, help="PSF of the engine's shapes")
    options = parser.parse_args(argv)
    if options.floor_sizes is None:
        options.floor_sizes = [s for s in options.sizes if s in (4096, 8192)] or options.sizes
    if options.repeats < 1 or options.copy_mib <= 0 or options.fma_rounds < 1:
        parser.error("--repeats, --copy-mib and --fma-rounds must be positive")
    return options


def main(argv=None) -> Path:
    options = parse_arguments(argv)
    import cupy
    import cupyx

    figures = measure(cupy, cupyx, options)
    date = datetime.date.today().isoformat()
    command = " ".join(["python", "bench/gpu_limits.py", *(sys.argv[1:] if argv is None else argv)])
    figures["date"], figures["command"] = date, command
    options.out.mkdir(parents=True, exist_ok=True)
    stem = options.out / f"{date}-{_slug(figures['device']['name'])}-limits"
    markdown = format_markdown(figures, command=command, date=date)
    stem.with_suffix(".json").write_text(json.dumps(figures, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown)
    print(markdown)
    return stem


if __name__ == "__main__":
    main()
