"""Backend selection, FFT lengths, memory figures and the NumPy twins of the fused steps."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.signal

import gpudeconv as gd
from gpudeconv import GpudeconvError
from gpudeconv.backend import NORM_FLOOR, RATIO_EPS, _cupy_status, is_cupy_array
from gpudeconv.backend._kernels import index_type, kernel_dir, kernel_path, kernel_source


def test_numpy_is_always_available():
    assert gd.available_backends()[0] == "numpy"
    assert gd.get_backend("numpy").name == "numpy"
    assert gd.get_backend(" NumPy ").name == "numpy"


def test_environment_variable_selects_backend(monkeypatch):
    monkeypatch.setenv("GPUDECONV_BACKEND", "numpy")
    assert gd.get_backend().name == "numpy"
    monkeypatch.setenv("GPUDECONV_BACKEND", "tpu")
    with pytest.raises(GpudeconvError, match="GPUDECONV_BACKEND must be one of auto, numpy, cupy"):
        gd.get_backend()


def test_unknown_backend_is_one_clear_error():
    with pytest.raises(
        GpudeconvError, match="backend must be one of auto, numpy, cupy, got 'cuda'"
    ):
        gd.get_backend("cuda")


def test_cupy_without_gpu_says_why(monkeypatch):
    usable, reason = _cupy_status()
    if usable:
        assert gd.get_backend("cupy").name == "cupy"
        return
    assert reason
    with pytest.raises(GpudeconvError, match="cupy backend was asked for but"):
        gd.get_backend("cupy")


def test_auto_falls_back_to_numpy_and_says_why_once(caplog, monkeypatch):
    if _cupy_status()[0]:
        pytest.skip("a GPU answers here: auto picks cupy")
    import gpudeconv.backend as backend_module

    monkeypatch.setattr(backend_module, "_said_why", False)
    monkeypatch.delenv("GPUDECONV_BACKEND", raising=False)
    with caplog.at_level(logging.INFO, logger="gpudeconv"):
        assert gd.get_backend().name == "numpy"
        assert gd.get_backend("auto").name == "numpy"
    messages = [r.getMessage() for r in caplog.records if "NumPy (CPU) backend" in r.getMessage()]
    assert len(messages) == 1


def test_is_cupy_array_does_not_confuse_numpy():
    assert not is_cupy_array(np.ones(3))
    assert not is_cupy_array([1, 2])


@pytest.mark.parametrize("n", [7, 100, 511, 2084, 4133])
def test_fft_length_is_smooth_and_close(backend, n):
    length = backend.fft_length(n)
    assert n <= length <= max(int(n * 1.1), n + 8)
    remainder = length
    for prime in (2, 3, 5, 7, 11):
        while remainder % prime == 0:
            remainder //= prime
    assert remainder == 1


def test_memory_info_and_device_name(backend):
    memory = backend.memory_info()
    assert 0 < memory.free <= memory.total
    assert memory.kind in {"host", "device"}
    assert backend.device_name()


def test_fused_steps_compute_the_rl_formulas(backend):
    rng = np.random.default_rng(3)
    observed = rng.random((33, 47)) * 100
    blurred = rng.random((33, 47)) * 100
    blurred[0, :5] = 0.0  # guarded
    weight = (rng.random((33, 47)) > 0.1).astype(np.float64)
    expected = weight * observed / np.maximum(blurred, RATIO_EPS)
    ratio = backend.rl_ratio(
        backend.asarray(observed), backend.asarray(blurred.copy()), backend.asarray(weight)
    )
    np.testing.assert_allclose(backend.to_host(ratio), expected, rtol=1e-12)
    assert np.isfinite(backend.to_host(ratio)).all()

    estimate = rng.random((33, 47))
    correction = rng.random((33, 47)) + 0.5
    norm = rng.random((33, 47))
    norm[5, :10] = 0.0
    norm[6, :10] = NORM_FLOOR / 2  # FFT round-off where no data is: never divided by
    updated = backend.asarray(estimate.copy())
    backend.rl_update(updated, backend.asarray(correction.copy()), backend.asarray(norm))
    expected = np.where(
        norm > NORM_FLOOR, estimate * correction / np.where(norm > 0, norm, 1), estimate
    )
    np.testing.assert_allclose(backend.to_host(updated), expected, rtol=1e-12)
    plain = backend.asarray(estimate.copy())
    backend.rl_update(plain, backend.asarray(correction))
    np.testing.assert_allclose(backend.to_host(plain), estimate * correction, rtol=1e-12)


def rl_step_data(dtype, seed=7):
    """Observed and blurred sky (about 50 to 5000), 0/1 weights, estimate with NaN pixels and
    values far out on both sides where norm is 0, correction, norm with pixels at the floor."""
    rng = np.random.default_rng(seed)
    shape = (41, 57)
    observed = (50 + rng.gamma(0.5, 400, shape)).astype(dtype)
    blurred = (observed * rng.uniform(0.7, 1.3, shape)).astype(dtype)
    blurred[0, :5] = 0.0  # guarded
    weight = (rng.random(shape) > 0.1).astype(dtype)
    estimate = (50 + rng.gamma(0.5, 400, shape)).astype(dtype)
    estimate[::2, 0], estimate[1::2, 0] = 1e7, -3.0  # kept pixels (norm 0), out of any bounds
    estimate[7, 7] = estimate[20, 30] = np.nan
    correction = rng.uniform(0.5, 1.5, shape).astype(dtype)
    norm = rng.uniform(0.3, 1.0, shape).astype(dtype)
    norm[:, :2] = 0.0
    norm[5, 10:20] = NORM_FLOOR / 2
    return dict(
        observed=observed,
        blurred=blurred,
        weight=weight,
        estimate=estimate,
        correction=correction,
        norm=norm,
    )


def run_update(backend, d, norm=True, **bounds):
    estimate = backend.asarray(d["estimate"].copy())
    backend.rl_update(
        estimate,
        backend.asarray(d["correction"].copy()),
        backend.asarray(d["norm"]) if norm else None,
        **bounds,
    )
    return backend.to_host(estimate)


def plain_update(d, norm=True):
    """The update's formula: u c / n where n > NORM_FLOOR (else u), or u c without norm."""
    if not norm:
        return d["estimate"] * d["correction"]
    divided = d["estimate"] * (d["correction"] / np.where(d["norm"] > 0, d["norm"], 1))
    return np.where(d["norm"] > NORM_FLOOR, divided, d["estimate"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("background", [12.5, -80.0])
def test_background_shifts_the_denominator(backend, dtype, background):
    d = rl_step_data(dtype)
    shift = dtype(background)
    eps = dtype(RATIO_EPS)
    expected = d["weight"] * (d["observed"] / np.maximum(d["blurred"] + shift, eps))
    ratio = backend.rl_ratio(
        backend.asarray(d["observed"]),
        backend.asarray(d["blurred"].copy()),
        backend.asarray(d["weight"]),
        background=background,
    )
    ratio = backend.to_host(ratio)
    np.testing.assert_allclose(ratio, expected, rtol=1e-6 if dtype == np.float32 else 1e-12)
    assert np.isfinite(ratio).all()
    plain = d["weight"] * (d["observed"] / np.maximum(d["blurred"], eps))
    assert (np.abs(ratio / np.where(plain > 0, plain, 1) - 1) > 1e-3).mean() > 0.8
    if background < 0:  # the guard holds for the shifted denominator too
        assert ((d["blurred"] + shift <= eps) & (d["weight"] > 0)).sum() > 5


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "unweighted"])
def test_ratio_without_background_is_unchanged_bit_for_bit(dtype, weighted):
    from gpudeconv.backend._numpy import NumPyBackend

    backend = NumPyBackend()
    d = rl_step_data(dtype)
    weight = d["weight"] if weighted else None
    expected = d["observed"] / np.maximum(d["blurred"], dtype(RATIO_EPS))
    if weighted:
        expected *= d["weight"]
    for options in ({}, {"background": 0.0}, {"background": -0.0}, {"background": np.int64(0)}):
        ratio = backend.rl_ratio(d["observed"], d["blurred"].copy(), weight, **options)
        np.testing.assert_array_equal(
            ratio.view(f"u{ratio.itemsize}"), expected.view(f"u{ratio.itemsize}")
        )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "no-norm"])
@pytest.mark.parametrize(
    ("lower", "upper"),
    [(100.0, 900.0), (100.0, None), (None, 900.0), (300.0, 300.0)],
    ids=["both", "lower", "upper", "equal"],
)
def test_clamp_bounds_are_respected(backend, dtype, norm, lower, upper):
    d = rl_step_data(dtype)
    unclamped = plain_update(d, norm)
    result = run_update(backend, d, norm, lower=lower, upper=upper)
    low = dtype(-np.inf if lower is None else lower)
    high = dtype(np.inf if upper is None else upper)
    inside = (unclamped >= low) & (unclamped <= high)
    rtol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(result[inside], unclamped[inside], rtol=rtol)
    # every pixel out of bounds sits exactly on its bound, kept pixels (norm 0) included
    assert (result[unclamped < low] == low).all() and (result[unclamped > high] == high).all()
    assert (unclamped < low).sum() + (unclamped > high).sum() > 100
    if norm:  # pixels without data behind them keep their value, then are clamped as well
        assert upper is None or (result[::2, 0] == high).all()  # from 1e7
        assert lower is None or (result[1::2, 0] == low).all()  # from -3
    # NaN stays NaN: the clamp compares, it does not pick the other operand as fmin/fmax do
    np.testing.assert_array_equal(np.isnan(result), np.isnan(d["estimate"]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "no-norm"])
def test_update_without_clamp_is_unchanged_bit_for_bit(dtype, norm):
    from gpudeconv.backend._numpy import NumPyBackend

    backend = NumPyBackend()
    d = rl_step_data(dtype)
    expected = plain_update(d, norm).view(f"u{np.dtype(dtype).itemsize}")
    for bounds in ({}, {"lower": None, "upper": None}):
        result = run_update(backend, d, norm, **bounds)
        np.testing.assert_array_equal(result.view(expected.dtype), expected)
    # open bounds on both sides: a clamp that changes nothing, NaN pixels included
    result = run_update(backend, d, norm, lower=-np.inf, upper=np.inf)
    np.testing.assert_array_equal(result.view(expected.dtype), expected)


@pytest.mark.parametrize(
    ("bounds", "message"),
    [
        ({"lower": 2, "upper": 1}, r"lower must be <= upper, got lower=2 > upper=1; swap them"),
        ({"lower": 1e3, "upper": -1.5}, r"got lower=1000 > upper=-1.5"),
        ({"lower": np.nan}, r"lower must be a number, or None for no bound on that side, got nan"),
        ({"lower": 0.0, "upper": np.float32("nan")}, r"upper must be a number, or None"),
    ],
)
def test_bad_clamp_bounds_are_refused(backend, bounds, message):
    d = rl_step_data(np.float32)
    estimate = backend.asarray(d["estimate"].copy())
    with pytest.raises(GpudeconvError, match=message) as caught:
        backend.rl_update(estimate, backend.asarray(d["correction"]), **bounds)
    assert isinstance(caught.value, ValueError)
    # refused before anything was written
    np.testing.assert_array_equal(backend.to_host(estimate), d["estimate"])


@pytest.mark.parametrize("background", [np.nan, np.inf, -np.inf])
def test_a_non_finite_background_is_refused(backend, background):
    d = rl_step_data(np.float32)
    blurred = backend.asarray(d["blurred"].copy())
    with pytest.raises(GpudeconvError, match="background must be a finite number .* got"):
        backend.rl_ratio(backend.asarray(d["observed"]), blurred, background=background)
    np.testing.assert_array_equal(backend.to_host(blurred), d["blurred"])


def test_kernel_sources_ship_with_the_package():
    import gpudeconv

    source = kernel_path("rl_steps.cu")
    assert source.is_file()
    package = Path(gpudeconv.__file__).resolve().parent
    installed = "site-packages" in str(package)
    if os.environ.get("CI"):
        assert installed, f"CI must test the installed package, not {package}"
    if installed:
        # a non-editable install must carry the .cu files inside the package
        assert kernel_dir() == package / "kernels"
    assert "gpudeconv_rl_ratio_float32" in kernel_source("rl_steps.cu", IDX="int")
    assert kernel_source("rl_steps.cu", IDX="long long").startswith("#define IDX long long\n")


def test_index_type_leaves_room_for_the_grid_stride_overshoot():
    from gpudeconv.backend._kernels import BLOCK, MAX_BLOCKS

    assert index_type(10**6) == "int"
    assert index_type(2**31 - 1 - BLOCK * MAX_BLOCKS) == "int"
    assert index_type(2**31 - BLOCK * MAX_BLOCKS) == "long long"  # i += stride would overflow
    assert index_type(2**31) == "long long"


@pytest.mark.parametrize("library", ["scipy.fft", "pyfftw"])
def test_cpu_fft_libraries_give_the_same_convolution(library):
    from gpudeconv.backend._fftplans import fftw_available
    from gpudeconv.backend._numpy import NumPyBackend

    if library == "pyfftw" and not fftw_available():
        pytest.skip("pyFFTW is not installed")
    backend = NumPyBackend(fft=library)
    assert backend.fft_library == library
    rng = np.random.default_rng(4)
    psf = gd.psf.moffat(3.0, size=13, ratio=0.6, angle=20)
    op = gd.operators.Convolution(psf, backend)
    kernel = op.psf  # the normalized float64 PSF
    # a large image, then smaller ones through the same cached plan: the buffer's zero padding
    # must not keep pixels of the earlier, larger image
    # (all these shapes pad to the same 96 x 108 FFT shape, so they share one plan)
    for shape in [(90, 101), (88, 101), (90, 100), (87, 99)]:
        assert op._plan(shape, np.float64)[0] == (96, 108)
        x = rng.random(shape)
        expected = scipy.signal.convolve2d(x, kernel, mode="same")
        np.testing.assert_allclose(op.forward(x), expected, rtol=1e-9, atol=1e-12)
        out = np.empty_like(x)
        assert op.adjoint(x, out=out) is out
        np.testing.assert_allclose(
            out, scipy.signal.correlate2d(x, kernel, mode="same"), rtol=1e-9, atol=1e-12
        )


def test_fft_library_choice_and_errors(monkeypatch):
    from gpudeconv.backend._fftplans import fftw_available
    from gpudeconv.backend._numpy import NumPyBackend

    monkeypatch.setenv("GPUDECONV_FFT", "scipy.fft")
    assert NumPyBackend().fft_library == "scipy.fft"
    monkeypatch.delenv("GPUDECONV_FFT")
    assert NumPyBackend().fft_library == ("pyfftw" if fftw_available() else "scipy.fft")
    with pytest.raises(GpudeconvError, match="fft must be one of auto, pyfftw, scipy.fft"):
        NumPyBackend(fft="mkl")


def test_fftw_wisdom_is_kept_on_disk(tmp_path, monkeypatch):
    from gpudeconv.backend import _fftplans

    if not _fftplans.fftw_available():
        pytest.skip("pyFFTW is not installed")
    monkeypatch.setenv("GPUDECONV_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_fftplans, "_wisdom_loaded", False)
    plan = _fftplans.FFTWPlan((1024, 1024), np.float32)  # large enough to be measured
    assert (plan.real == 0).all()
    stored = list(tmp_path.glob("fftw-wisdom-*.json"))
    assert len(stored) == 1 and stored[0].stat().st_size > 100
    assert not list(tmp_path.glob(".*tmp"))


def test_row_parallel_passes_cover_every_row_once():
    from gpudeconv.backend._numpy import NumPyBackend
    from gpudeconv.backend._parallel import by_rows

    rng = np.random.default_rng(5)
    shape = (1201, 1003)  # above the parallel threshold, rows not divisible by the workers
    observed = rng.random(shape, dtype=np.float32) * 100
    blurred = rng.random(shape, dtype=np.float32) * 100
    blurred[::97] = 0.0
    weight = (rng.random(shape) > 0.2).astype(np.float32)
    backend = NumPyBackend()
    ratio = backend.rl_ratio(observed, blurred.copy(), weight)
    np.testing.assert_allclose(ratio, weight * observed / np.maximum(blurred, RATIO_EPS), rtol=1e-6)
    visits = np.zeros(shape, dtype=np.int32)
    by_rows(lambda block: np.add(block, 1, out=block), visits)
    assert (visits == 1).all()
    estimate = rng.random(shape, dtype=np.float32)
    correction = rng.random(shape, dtype=np.float32)
    norm = rng.random(shape, dtype=np.float32)
    updated = estimate.copy()
    backend.rl_update(updated, correction.copy(), norm)
    expected = np.where(norm > NORM_FLOOR, estimate * correction / norm, estimate)
    np.testing.assert_allclose(updated, expected, rtol=1e-6)


def _restore_in_child(queue):
    image = np.ones((1100, 1100), np.float32)
    result = gd.richardson_lucy(image, gd.psf.gaussian(3.0, size=9), 1, backend="numpy")
    queue.put(float(result.mean()))


def test_forked_child_can_restore_after_the_parent_did():
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    image = np.ones((1100, 1100), np.float32)  # big enough for the thread pools and FFTW threads
    gd.richardson_lucy(image, gd.psf.gaussian(3.0, size=9), 1, backend="numpy")
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_restore_in_child, args=(queue,))
    child.start()
    child.join(timeout=120)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung in the inherited thread pools")
    assert child.exitcode == 0
    assert queue.get(timeout=5) == pytest.approx(1.0, rel=1e-4)


def test_a_damaged_fftw_wisdom_file_is_ignored(tmp_path, monkeypatch):
    from gpudeconv.backend import _fftplans

    if not _fftplans.fftw_available():
        pytest.skip("pyFFTW is not installed")
    monkeypatch.setenv("GPUDECONV_CACHE_DIR", str(tmp_path))
    for content in ("[]", "not json", '["x", "y", "z"]'):
        _fftplans._wisdom_path().write_text(content)
        monkeypatch.setattr(_fftplans, "_wisdom_loaded", False)
        _fftplans._load_wisdom()  # no exception: FFTW simply measures again
