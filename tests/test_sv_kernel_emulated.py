"""kernels/sv_convolve.cu on the CPU (tests/cuda_emulation.h) against its NumPy twin.

The twin is the operator's sum over nodes with direct convolutions (``method='direct'`` on the
NumPy backend), itself checked against a scatter sum in test_sv_operator.py. The interpolation
tables are built here from ``PSFField.axis_weights``, as the kernel's header comment states them.
Shapes are odd and span several blocks in both directions (tiles of 32 columns by 64 rows in
float32, 32 rows in float64), with node boundaries inside tiles and halos across block edges.
"""

from __future__ import annotations

import os
import sys

import fake_cupy
import kernel_harness as kh
import numpy as np
import pytest
from test_sv_operator import distinct_field

import gpudeconv as gd
from gpudeconv.backend import is_cupy_array
from gpudeconv.backend._kernels import sv_launch

pytestmark = pytest.mark.skipif(
    kh.compiler() is None, reason="g++ not found: the CUDA emulation compiles kernels for the CPU"
)

RTOL = {"float32": 1e-5, "float64": 1e-12}


@pytest.fixture(scope="session")
def emulation_cache(tmp_path_factory):
    configured = os.environ.get("GPUDECONV_EMU_CACHE")
    return configured if configured else tmp_path_factory.mktemp("sv-emulation")


def tables(field, shape, dtype, origin=(0, 0)):
    rows = field.axis_weights(origin[0] + np.arange(shape[0], dtype=np.float64), 0)
    cols = field.axis_weights(origin[1] + np.arange(shape[1], dtype=np.float64), 1)
    return (
        rows[0].astype(np.int32),
        rows[1].astype(dtype),
        cols[0].astype(np.int32),
        cols[1].astype(dtype),
    )


def run_kernel(module, field, x, *, adjoint, origin=(0, 0), grid=None):
    dtype = x.dtype
    out = np.full_like(x, np.nan)  # every pixel must be written
    launch_grid, block = sv_launch(x.shape, dtype.itemsize)
    name = f"gpudeconv_sv_{'adjoint' if adjoint else 'forward'}_{dtype.name}"
    row_node, row_frac, col_node, col_frac = tables(field, x.shape, dtype, origin)
    psfs = np.ascontiguousarray(field.psfs, dtype=dtype)
    module.launch(
        name,
        grid or launch_grid,
        block,
        (
            x,
            out,
            psfs,
            row_node,
            row_frac,
            col_node,
            col_frac,
            np.int32(x.shape[0]),
            np.int32(x.shape[1]),
            np.int32(field.grid[1]),
        ),
    )
    return out


def twin(field, x, *, adjoint, origin=(0, 0)):
    op = gd.operators.SpatiallyVaryingConvolution(field, "numpy", method="direct", origin=origin)
    return op.adjoint(x) if adjoint else op.forward(x)


def check(module, field, x, *, adjoint, origin=(0, 0)):
    result = run_kernel(module, field, x, adjoint=adjoint, origin=origin)
    expected = twin(field, x, adjoint=adjoint, origin=origin)
    assert not np.isnan(result).any(), "the kernel left pixels unwritten"
    scale = np.abs(expected).max()
    np.testing.assert_allclose(result, expected, rtol=0, atol=RTOL[x.dtype.name] * scale)


@pytest.fixture(
    scope="session", params=[("int", 7), ("long long", 5)], ids=["idx32-k7", "idx64-k5"]
)
def sv_module(request, emulation_cache):
    idx, size = request.param
    return kh.build_kernel(
        "sv_convolve.cu", IDX=idx, KSIZE=str(size), cache_dir=emulation_cache
    ), size


def test_entry_points(sv_module):
    module, _ = sv_module
    assert sorted(module.names) == sorted(
        f"gpudeconv_sv_{d}_{t}" for d in ("forward", "adjoint") for t in ("float32", "float64")
    )


@pytest.mark.parametrize("adjoint", [False, True], ids=["forward", "adjoint"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("shape", "grid"), [((70, 45), (3, 2)), ((37, 52), (1, 4))])
def test_kernel_equals_its_numpy_twin(sv_module, shape, grid, dtype, adjoint):
    module, size = sv_module
    field = distinct_field(shape, grid, size, seed=11)
    x = np.random.default_rng(3).random(shape).astype(dtype)
    check(module, field, x, adjoint=adjoint)


@pytest.mark.parametrize("adjoint", [False, True], ids=["forward", "adjoint"])
def test_padded_array_with_origin(sv_module, adjoint):
    module, size = sv_module
    field = distinct_field((40, 36), (2, 3), size, seed=12)
    x = np.random.default_rng(4).random((67, 41)).astype(np.float32)
    check(module, field, x, adjoint=adjoint, origin=(-9, -3))


def test_largest_psf(emulation_cache):
    """k = 31: the biggest halo and shared tile (27 KB in float32)."""
    module = kh.build_kernel("sv_convolve.cu", IDX="int", KSIZE="31", cache_dir=emulation_cache)
    field = distinct_field((66, 40), (2, 2), 31, seed=13)
    x = np.random.default_rng(5).random((66, 40)).astype(np.float32)
    check(module, field, x, adjoint=False)
    check(module, field, x, adjoint=True)


# ---------------------------------------------------------------------------- it can fail
def broken(old: str, new: str, emulation_cache, sanitize="address"):
    text = kh.kernels_module().kernel_source("sv_convolve.cu", IDX="int", KSIZE="7")
    assert text.count(old) == 1, f"sv_convolve.cu changed: update this test's {old!r}"
    return kh.build_source(
        text.replace(old, new),
        name="sv_convolve_broken.cu",
        cache_dir=emulation_cache,
        sanitize=sanitize,
    )


@pytest.mark.parametrize(
    ("old", "new"),
    [
        # the halo staged one row short: sources above the tile are lost
        ("row0 - R, col0 - R, true", "row0 - R + 1, col0 - R, true"),
        # the last node row of a tile forgotten: light of the lower node goes missing
        ("*last = table[hi] + (frac[hi] > T(0) ? 1 : 0);", "*last = table[hi];"),
        # the forward's PSF not flipped: correlation instead of convolution
        ("!adjoint);", "false);"),
        # column weights read from the row table
        (
            "sv_axis_weight<T>(b, col_node[col], col_frac[col]);\n            }",
            "sv_axis_weight<T>(b, row_node[col], col_frac[col]);\n            }",
        ),
    ],
    ids=["halo", "node-range", "flip", "weights"],
)
def test_a_broken_kernel_fails(emulation_cache, old, new):
    module = broken(old, new, emulation_cache)
    field = distinct_field((70, 45), (3, 2), 7, seed=14)
    x = np.random.default_rng(6).random((70, 45)).astype(np.float32)
    with pytest.raises((AssertionError, kh.KernelError)):
        check(module, field, x, adjoint=False)


def test_a_missing_barrier_is_a_data_race(emulation_cache):
    """Without the barrier before staging the next node, threads overwrite the tile that
    others still read: ThreadSanitizer reports it on the CPU."""
    old = "__syncthreads();  // the previous node's tiles have been read by every thread"
    module = broken(old, "", emulation_cache, sanitize="thread")
    field = distinct_field((40, 33), (2, 2), 7, seed=15)
    x = np.random.default_rng(7).random((40, 33)).astype(np.float32)
    with pytest.raises(kh.KernelError, match="data race"):
        run_kernel(module, field, x, adjoint=False)


# ---------------------------------------------------------------------------- through the backend
def test_cupy_backend_launches_the_kernel(monkeypatch, emulation_cache):
    """The CuPy backend's own launch code (defines, grid, block, argument types) against the
    fake cupy of tests/fake_cupy.py, and the operator's automatic choice of the kernel."""
    fake = fake_cupy.install(monkeypatch, cache_dir=emulation_cache)
    field = distinct_field((75, 66), (3, 3), 9, seed=16)
    x = np.random.default_rng(8).random((75, 66)).astype(np.float32)
    op = gd.operators.SpatiallyVaryingConvolution(field, "cupy")
    assert op.method_for(x.shape) == "direct"  # the GPU's kernel wins for k = 9
    for adjoint in (False, True):
        result = (op.adjoint if adjoint else op.forward)(fake.cupy.asarray(x))
        assert is_cupy_array(result) and result.dtype == np.float32
        expected = twin(field, x, adjoint=adjoint)
        np.testing.assert_allclose(result.get(), expected, rtol=0, atol=1e-5 * expected.max())
    names = [launch.name for launch in fake.launches]
    assert names == ["gpudeconv_sv_forward_float32", "gpudeconv_sv_adjoint_float32"]
    (module,) = fake.raw_modules
    assert "#define KSIZE 9\n" in module.code and "#define IDX int\n" in module.code


def test_fp32_peak_of_the_device(monkeypatch, emulation_cache):
    """The benchmarks report the SV kernel as a fraction of this: an H100 SXM's 67 TFLOP/s."""
    fake_cupy.install(monkeypatch, cache_dir=emulation_cache)
    assert gd.get_backend("cupy").peak_flops() == pytest.approx(2 * 128 * 132 * 1.98e9)
    assert gd.get_backend("numpy").peak_flops() is None


def test_a_kernel_that_does_not_compile_is_one_clear_line(monkeypatch, emulation_cache):
    fake_cupy.install(monkeypatch, cache_dir=emulation_cache)
    backend = gd.get_backend("cupy")  # imports gpudeconv.backend._cupy under the fake
    loader = sys.modules["gpudeconv.backend._cupy"]
    original = loader.kernel_source
    monkeypatch.setattr(
        loader, "kernel_source", lambda *a, **k: original(*a, **k) + "\nthis is not C++;\n"
    )
    field = distinct_field((40, 40), (2, 2), 5, seed=17)
    op = gd.operators.SpatiallyVaryingConvolution(field, "cupy", method="direct")
    x = backend.asarray(np.ones((40, 40), np.float32))
    with pytest.raises(gd.GpudeconvError) as caught:
        op.forward(x)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("compiling kernels/sv_convolve.cu (IDX=int, KSIZE=5) for this GPU")
    assert "error" in message and "--backend numpy" in message
