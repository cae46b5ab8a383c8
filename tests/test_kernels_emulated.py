"""The CUDA kernels, compiled for the CPU with tests/cuda_emulation.h, against their NumPy twins.

No GPU needed: tests/kernel_harness.py builds each ``kernels/*.cu`` with g++ (AddressSanitizer
on) and runs every launch in a child process with a deadline. The launch shapes are small and
odd so that the grid-stride loops wrap, and some launches have more threads than pixels.
"""

from __future__ import annotations

import os
import time

import kernel_harness as kh
import numpy as np
import pytest
from helpers import star_field

pytestmark = pytest.mark.skipif(
    kh.compiler() is None, reason="g++ not found: the CUDA emulation compiles kernels for the CPU"
)

SHAPE = (37, 53)  # n = 1961: odd, not a multiple of any block size
RTOL = {"float32": 1e-6, "float64": 1e-12}
LAUNCHES = [
    pytest.param((3,), (32,), id="grid3x32"),  # 96 threads: ~20 trips round the loop
    pytest.param((1,), (1,), id="grid1x1"),  # one thread does everything
    pytest.param((40,), (64,), id="grid40x64"),  # 2560 threads > n: the tail threads idle
]


@pytest.fixture(scope="session")
def emulation_cache(tmp_path_factory):
    """Built kernels for this session (``GPUDECONV_EMU_CACHE`` makes it persistent)."""
    configured = os.environ.get("GPUDECONV_EMU_CACHE")
    return configured if configured else tmp_path_factory.mktemp("cuda-emulation")


@pytest.fixture(scope="session", params=["int", "long long"], ids=["idx32", "idx64"])
def rl_steps(request, emulation_cache):
    module = kh.build_kernel("rl_steps.cu", IDX=request.param, cache_dir=emulation_cache)
    return module, request.param


def numpy_backend():
    from gpudeconv.backend._numpy import NumPyBackend

    return NumPyBackend()


def ratio_eps():
    from gpudeconv.backend._base import RATIO_EPS

    return RATIO_EPS


def norm_floor():
    from gpudeconv.backend._base import NORM_FLOOR

    return NORM_FLOOR


# ---------------------------------------------------------------------------- data
def sky(rng, dtype) -> np.ndarray:
    """A noisy star field (tests/helpers.py) in ``dtype``, with full-precision float64 values."""
    image = star_field(SHAPE, seed=int(rng.integers(2**31)), n_stars=8).astype(np.float64)
    return (image * rng.uniform(0.999, 1.001, SHAPE)).astype(dtype)


def rl_data(dtype: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Observed image, blurred estimate (values at and below eps), weights, norm (values at and
    below the floor), correction, estimate; eps and floor as the kernel's scalar type."""
    rng = np.random.default_rng(seed)
    eps = np.dtype(dtype).type(ratio_eps())
    floor = np.dtype(dtype).type(norm_floor())
    observed = sky(rng, dtype)
    blurred = (sky(rng, dtype) * rng.uniform(0.8, 1.2, SHAPE)).astype(dtype)
    flat = blurred.reshape(-1)
    spots = rng.choice(flat.size, 40, replace=False)
    flat[spots[:10]] = 0.0
    flat[spots[10:20]] = eps * dtype_type(dtype)(0.01)
    flat[spots[20:30]] = -1e-3  # FFT ringing
    flat[spots[30:]] = eps
    weight = np.ones(SHAPE, dtype)
    weight[:, :4] = 0.0  # a no-data border
    weight.reshape(-1)[rng.choice(weight.size, 100, replace=False)] = 0.0  # hot pixels
    norm = rng.uniform(0.2, 1.0, SHAPE).astype(dtype)
    norm[:, :3] = 0.0
    flat = norm.reshape(-1)
    spots = rng.choice(flat.size, 30, replace=False)
    flat[spots[:10]] = floor * dtype_type(dtype)(0.5)
    flat[spots[10:20]] = floor
    flat[spots[20:]] = floor * dtype_type(dtype)(1.5)
    correction = rng.uniform(0.5, 1.5, SHAPE).astype(dtype)
    estimate = sky(rng, dtype)
    return dict(
        observed=observed,
        blurred=blurred,
        weight=weight,
        norm=norm,
        correction=correction,
        estimate=estimate,
        eps=eps,
        floor=floor,
    )


def dtype_type(dtype: str):
    return np.dtype(dtype).type


def index_scalar(idx: str, n: int):
    return np.int64(n) if idx == "long long" else np.int32(n)


# ---------------------------------------------------------------------------- comparisons
def check_ratio(module, idx, dtype, grid, block, *, weighted: bool, in_place: bool) -> None:
    d = rl_data(dtype)
    weight = d["weight"] if weighted else None
    expected = numpy_backend().rl_ratio(d["observed"].copy(), d["blurred"].copy(), weight)
    blurred = d["blurred"].copy()
    ratio = blurred if in_place else np.full(SHAPE, np.nan, dtype)
    module.launch(
        f"gpudeconv_rl_ratio_{dtype}",
        grid,
        block,
        (
            d["observed"],
            blurred,
            weight if weighted else d["observed"],
            ratio,
            index_scalar(idx, ratio.size),
            d["eps"],
            np.int32(weighted),
        ),
    )
    np.testing.assert_allclose(ratio, expected, rtol=RTOL[dtype], atol=0)


def check_update(module, idx, dtype, grid, block, *, with_norm: bool) -> None:
    d = rl_data(dtype)
    expected = d["estimate"].copy()
    numpy_backend().rl_update(expected, d["correction"].copy(), d["norm"] if with_norm else None)
    estimate = d["estimate"].copy()
    module.launch(
        f"gpudeconv_rl_update_{dtype}",
        grid,
        block,
        (
            estimate,
            d["correction"],
            d["norm"] if with_norm else d["correction"],
            index_scalar(idx, estimate.size),
            d["floor"],
            np.int32(with_norm),
        ),
    )
    np.testing.assert_allclose(estimate, expected, rtol=RTOL[dtype], atol=0)


def test_rl_steps_entry_points(rl_steps):
    module, _ = rl_steps
    assert sorted(module.names) == sorted(
        f"gpudeconv_rl_{op}_{dtype}" for op in ("ratio", "update") for dtype in RTOL
    )


def test_test_data_covers_the_edge_cases():
    d = rl_data("float32")
    assert (d["blurred"] <= d["eps"]).sum() >= 30 and (d["blurred"] == d["eps"]).any()
    assert (d["weight"] == 0).any() and (d["norm"] == 0).any()
    assert (d["norm"] == d["floor"]).any() and ((d["norm"] > d["floor"]) & (d["norm"] < 0.01)).any()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("grid", "block"), LAUNCHES)
@pytest.mark.parametrize(
    ("weighted", "in_place"),
    [(True, True), (False, False), (True, False)],
    ids=["weighted-in-place", "unweighted", "weighted"],
)
def test_rl_ratio_matches_numpy(rl_steps, dtype, grid, block, weighted, in_place):
    module, idx = rl_steps
    check_ratio(module, idx, dtype, grid, block, weighted=weighted, in_place=in_place)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("grid", "block"), LAUNCHES)
@pytest.mark.parametrize("with_norm", [True, False], ids=["norm", "no-norm"])
def test_rl_update_matches_numpy(rl_steps, dtype, grid, block, with_norm):
    module, idx = rl_steps
    check_update(module, idx, dtype, grid, block, with_norm=with_norm)


# ---------------------------------------------------------------------------- broken kernels
def broken_rl_steps(old: str, new: str, count: int, emulation_cache):
    text = kh.kernels_module().kernel_source("rl_steps.cu", IDX="int")
    assert text.count(old) == count, f"rl_steps.cu changed: update this test's {old!r}"
    return kh.build_source(
        text.replace(old, new), name="rl_steps_broken.cu", cache_dir=emulation_cache
    )


def test_harness_catches_a_wrong_grid_stride(emulation_cache):
    module = broken_rl_steps("i += gpudeconv_grid_stride()", "i += blockDim.x", 2, emulation_cache)
    # Every block now redoes the pixels of the blocks after it: in-place steps go wrong.
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        check_update(module, "int", "float32", (3,), (32,), with_norm=False)
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        check_ratio(module, "int", "float64", (3,), (32,), weighted=True, in_place=True)


def test_harness_catches_a_read_past_the_end(emulation_cache):
    module = broken_rl_steps("i < n; i +=", "i <= n; i +=", 2, emulation_cache)
    with pytest.raises(kh.KernelError, match="AddressSanitizer"):
        check_update(module, "int", "float64", (3,), (32,), with_norm=True)


# ---------------------------------------------------------------------------- the emulation itself
TEST_KERNELS = r"""
// Kernels that exercise the emulation: block reduction through __shared__ and __syncthreads,
// warp reductions through shuffles, index mapping, a divergent barrier, a hang.
#define TILE 1024

/// partial[b] = sum of x over block b's grid-stride pixels (2-D grid and block, power-of-two
/// threads a block); *total += the same through atomicAdd.
extern "C" __global__ void __launch_bounds__(1024)
gpudeconv_test_block_sum_float64(const double* __restrict__ x, double* __restrict__ partial,
                                 double* total, int n) {
    __shared__ double tile[TILE];
    const int t = threadIdx.x + threadIdx.y * blockDim.x;
    const int threads = blockDim.x * blockDim.y;
    const int b = blockIdx.x + blockIdx.y * gridDim.x;
    double s = 0.0;
    for (int i = b * threads + t; i < n; i += gridDim.x * gridDim.y * threads) s += x[i];
    tile[t] = s;
    __syncthreads();
    for (int half = threads / 2; half > 0; half /= 2) {
        if (t < half) tile[t] += tile[t + half];
        __syncthreads();  // REDUCTION BARRIER
    }
    if (t == 0) {
        partial[b] = tile[0];
        atomicAdd(total, tile[0]);
    }
}

/// down[w] = sum of x over warp w (shuffle down); all[i] = the same on every lane (xor).
extern "C" __global__ void gpudeconv_test_warp_sum_int32(const int* x, int* down, int* all,
                                                         int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    int v = i < n ? x[i] : 0;
    int w = v;
    for (int d = 16; d > 0; d /= 2) v += __shfl_down_sync(0xffffffffu, v, d);
    for (int d = 16; d > 0; d /= 2) w += __shfl_xor_sync(0xffffffffu, w, d);
    if ((threadIdx.x & 31) == 0) down[i / 32] = v;
    all[i] = w;
}

/// Eight ints per thread: blockIdx, threadIdx, threads a block, blocks a grid.
extern "C" __global__ void gpudeconv_test_indices_int32(int* out) {
    const int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    int* o = out + 8 * (b * blockDim.x * blockDim.y * blockDim.z + t);
    o[0] = blockIdx.x; o[1] = blockIdx.y; o[2] = blockIdx.z;
    o[3] = threadIdx.x; o[4] = threadIdx.y; o[5] = threadIdx.z;
    o[6] = blockDim.x * blockDim.y * blockDim.z;
    o[7] = gridDim.x * gridDim.y * gridDim.z;
}

/// Reads one element past the end of a __shared__ tile of blockDim.x elements.
extern "C" __global__ void gpudeconv_test_shared_overrun_float32(float* out) {
    __shared__ float tile[64];
    tile[threadIdx.x] = 1.0f;
    __syncthreads();
    out[threadIdx.x] = tile[threadIdx.x + 1];
}

/// Thread 0 returns before the barrier the others wait at: hangs (or worse) on a GPU.
extern "C" __global__ void gpudeconv_test_early_return_float32(float* out) {
    __shared__ float tile[TILE];
    if (threadIdx.x == 0) return;
    tile[threadIdx.x] = (float)threadIdx.x;
    __syncthreads();
    out[threadIdx.x] = tile[blockDim.x - threadIdx.x];
}

/// Thread 0 waits for a flag nobody sets while the others wait for it at the barrier.
extern "C" __global__ void gpudeconv_test_stuck_float32(float* out) {
    volatile float* flag = out;
    if (threadIdx.x == 0) {
        while (flag[0] == 0.0f) {
        }
    }
    __syncthreads();
    out[threadIdx.x + 1] = 1.0f;
}
"""


@pytest.fixture(scope="session")
def test_kernels(emulation_cache):
    return kh.build_source(TEST_KERNELS, name="emulation_tests.cu", cache_dir=emulation_cache)


def block_sum(module, grid, block, n=1961, seed=1):
    x = np.random.default_rng(seed).integers(-1000, 1000, n).astype(np.float64)  # exact sums
    blocks, threads = int(np.prod(grid)), int(np.prod(block))
    partial = np.full(blocks, np.nan)
    total = np.zeros(1)
    module.launch("gpudeconv_test_block_sum_float64", grid, block, (x, partial, total, np.int32(n)))
    owner = (np.arange(n) // threads) % blocks
    expected = np.array([x[owner == b].sum() for b in range(blocks)])
    return partial, total, expected


@pytest.mark.parametrize(
    ("grid", "block"),
    [((5,), (64,)), ((3, 2), (16, 8)), ((2,), (1024,)), ((7,), (1,))],
    ids=["5x64", "3x2-16x8", "2x1024", "7x1"],
)
def test_shared_memory_and_syncthreads(test_kernels, grid, block):
    partial, total, expected = block_sum(test_kernels, grid, block)
    np.testing.assert_array_equal(partial, expected)
    assert total[0] == expected.sum()


def test_warp_shuffles(test_kernels):
    check_warp_shuffles(test_kernels)


def check_warp_shuffles(module):
    n = 150  # the last warp of the second block is partly past n
    x = np.random.default_rng(2).integers(-50, 50, n).astype(np.int32)
    grid, block = (3,), (64,)
    threads = 3 * 64
    padded = np.zeros(threads, np.int32)
    padded[:n] = x
    down = np.full(threads // 32, -1, np.int32)
    everywhere = np.full(threads, -1, np.int32)
    module.launch("gpudeconv_test_warp_sum_int32", grid, block, (x, down, everywhere, np.int32(n)))
    warp_sums = padded.reshape(-1, 32).sum(axis=1)
    np.testing.assert_array_equal(down, warp_sums)
    np.testing.assert_array_equal(everywhere, np.repeat(warp_sums, 32))


def test_thread_and_block_indices(test_kernels):
    grid, block = (3, 2, 2), (4, 3, 2)
    out = np.full((2, 2, 3, 2, 3, 4, 8), -1, np.int32)  # bz by bx tz ty tx, 8 values
    test_kernels.launch("gpudeconv_test_indices_int32", grid, block, (out,))
    bz, by, bx, tz, ty, tx = np.indices(out.shape[:-1])
    for k, expected in enumerate((bx, by, bz, tx, ty, tz)):
        np.testing.assert_array_equal(out[..., k], expected)
    assert (out[..., 6] == 24).all() and (out[..., 7] == 12).all()


def test_shared_memory_overrun_is_caught(test_kernels):
    with pytest.raises(kh.KernelError, match="AddressSanitizer: global-buffer-overflow"):
        test_kernels.launch(
            "gpudeconv_test_shared_overrun_float32", (1,), (64,), (np.zeros(64, np.float32),)
        )


def test_divergent_barrier_fails_fast(test_kernels):
    start = time.monotonic()
    with pytest.raises(kh.KernelError, match=r"__syncthreads\(\).*divergent barrier"):
        test_kernels.launch(
            "gpudeconv_test_early_return_float32",
            (2,),
            (32,),
            (np.zeros(33, np.float32),),
            timeout=20,
        )
    assert time.monotonic() - start < 10


def test_hang_is_a_timeout_not_a_stall(test_kernels):
    start = time.monotonic()
    with pytest.raises(kh.KernelTimeout, match="did not finish within 2 s"):
        test_kernels.launch(
            "gpudeconv_test_stuck_float32", (1,), (32,), (np.zeros(33, np.float32),), timeout=2
        )
    assert time.monotonic() - start < 8


def test_missing_barrier_is_a_data_race(emulation_cache):
    """ThreadSanitizer sees the race a missing __syncthreads leaves, and none with it there."""
    racy = TEST_KERNELS.replace("__syncthreads();  // REDUCTION BARRIER", "")
    assert racy != TEST_KERNELS
    good = kh.build_source(
        TEST_KERNELS, name="emulation_tests.cu", cache_dir=emulation_cache, sanitize="thread"
    )
    partial, _, expected = block_sum(good, (2,), (64,))
    np.testing.assert_array_equal(partial, expected)
    check_warp_shuffles(good)
    bad = kh.build_source(
        racy, name="emulation_tests_racy.cu", cache_dir=emulation_cache, sanitize="thread"
    )
    with pytest.raises(kh.KernelError, match="data race"):
        block_sum(bad, (2,), (64,))


# ---------------------------------------------------------------------------- harness checks
def test_launch_checks_arguments_like_a_strict_cupy(rl_steps):
    module, idx = rl_steps
    a = np.ones(8, np.float32)
    n, eps, one = index_scalar(idx, 8), np.float32(1e-12), np.int32(1)
    name = "gpudeconv_rl_ratio_float32"
    with pytest.raises(TypeError, match="pass np.int"):
        module.launch(name, (1,), (8,), (a, a, a, a, 8, eps, one))  # a Python int
    with pytest.raises(TypeError, match="float64 array"):
        module.launch(name, (1,), (8,), (a, a, a.astype(np.float64), a, n, eps, one))
    with pytest.raises(ValueError, match="C-contiguous"):
        module.launch(name, (1,), (4,), (a[::2], a[::2], a[::2], a[::2], n, eps, one))
    with pytest.raises(ValueError, match="partly"):
        module.launch(name, (1,), (4,), (a, a[:4], a[4:], a[2:6], n, eps, one))
    with pytest.raises(TypeError, match="tuple"):
        module.launch(name, 1, (8,), (a, a, a, a, n, eps, one))
    with pytest.raises(TypeError, match="takes 7 arguments"):
        module.launch(name, (1,), (8,), (a, a, a, a, n, eps))
    with pytest.raises(kh.KernelError, match="invalid launch configuration"):
        module.launch(name, (1,), (2048,), (a, a, a, a, n, eps, one))


def test_entry_point_discovery_ignores_comments():
    source = """
    // extern "C" __global__ void gpudeconv_commented_float32(float* x) {}
    extern "C" __global__ void __launch_bounds__(256) gpudeconv_a_float32(float* x) {}
    extern "C"
    __global__ void gpudeconv_b_float64(double* x) {}
    """
    assert kh.entry_points(source) == ["gpudeconv_a_float32", "gpudeconv_b_float64"]
