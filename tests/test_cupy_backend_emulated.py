"""The CuPy backend, run without a GPU: fake ``cupy`` (tests/fake_cupy.py) and emulated kernels.

``gpudeconv.backend._cupy`` is imported afresh against the fake, so its own launch code — the
``#define`` lines it puts in front of ``kernels/rl_steps.cu``, the kernel it picks by dtype, its
grid and block, the C types of its scalars, the arrays it passes — runs the unchanged ``.cu``
through tests/kernel_harness.py. Every result is compared with the NumPy backend's.
"""

from __future__ import annotations

import os
import sys

import fake_cupy
import kernel_harness as kh
import numpy as np
import pytest
import scipy.ndimage
from helpers import star_field
from test_kernels_emulated import (
    DAMPED_RTOL,
    DAMPINGS,
    DEVIANCE_RTOL,
    RTOL,
    TV_SETTINGS,
    backgrounds,
    clamp_data,
    clamps,
    damped_data,
    deviance_data,
    extrapolation_data,
    floor_data,
    rl_data,
    tv_data,
)

import gpudeconv as gd
from gpudeconv import GpudeconvError
from gpudeconv.backend import Backend, is_cupy_array
from gpudeconv.backend._numpy import NumPyBackend
from gpudeconv.restore import rl
from gpudeconv.restore.noise import NoiseModel

pytestmark = pytest.mark.skipif(
    kh.compiler() is None, reason="g++ not found: the CUDA emulation compiles kernels for the CPU"
)

SHAPE = (61, 75)


@pytest.fixture(scope="session")
def emulation_dir(tmp_path_factory):
    """Built kernels for this session (``GPUDECONV_EMU_CACHE`` makes it persistent)."""
    configured = os.environ.get("GPUDECONV_EMU_CACHE")
    return configured if configured else tmp_path_factory.mktemp("fake-cupy-kernels")


@pytest.fixture
def fake(monkeypatch, emulation_dir):
    """The fake cupy installed for one test; ``gpudeconv.backend._cupy`` imported under it."""
    return fake_cupy.install(monkeypatch, cache_dir=emulation_dir)


@pytest.fixture
def cupy_backend(fake):
    return gd.get_backend("cupy")


def cupy_module():
    """The freshly imported ``gpudeconv.backend._cupy`` (under the fake)."""
    return sys.modules["gpudeconv.backend._cupy"]


def sky_with_nodata(dtype=np.float32, seed=5, shape=SHAPE) -> np.ndarray:
    """A noisy star field (61x75 by default) with a few non-finite (no-data) pixels."""
    image = star_field(shape, seed=seed, n_stars=15).astype(dtype)
    image[3, 4] = image[30, 40] = image[60, 0] = np.nan
    image[17, -1] = np.inf
    return image


# ---------------------------------------------------------------------------- the fake itself
def test_the_fake_is_cupy_to_the_package(fake, cupy_backend):
    cp = fake.cupy
    device = cp.asarray(np.arange(6.0).reshape(2, 3))
    assert is_cupy_array(device) and type(device).__module__ == "cupy"
    host = device.get()
    assert type(host) is np.ndarray and host.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert "cupy" in gd.available_backends()
    assert type(cupy_backend).__name__ == "CuPyBackend" and cupy_backend.xp is cp
    assert gd.get_backend("cupy") is cupy_backend
    assert cupy_backend.device_name() == "Fake CUDA Device (CPU emulation) (GPU 0, sm_90)"
    memory = cupy_backend.memory_info()
    assert memory.kind == "device" and 0 < memory.free <= memory.total
    # CuPy's rules that the backend relies on or must respect:
    assert cp.ascontiguousarray(device) is device
    assert cp.fft.rfft2(cp.ones((4, 6), np.float32)).dtype == np.complex64
    assert cp.fft.irfft2(cp.ones((4, 4), np.complex64), s=(4, 6)).dtype == np.float32
    assert is_cupy_array(device.sum()) and device.sum().ndim == 0  # 0-d arrays, not scalars
    with pytest.raises(TypeError, match="Unsupported type"):
        device + np.ones((2, 3))
    with pytest.raises(TypeError, match="device arrays only"):
        cp.ascontiguousarray(np.ones(3))
    assert cupy_backend.fft_length(11) == 12 and cupy_backend.fft_length(127) == 128


def test_no_device_means_no_cupy_backend(fake):
    fake.runtime_error = fake_cupy.NO_DEVICE
    assert gd.available_backends() == ["numpy"]
    with pytest.raises(GpudeconvError, match="cudaErrorNoDevice"):
        gd.get_backend("cupy")
    assert gd.get_backend("auto").name == "numpy"


def test_the_fake_leaves_no_trace(emulation_dir):
    from gpudeconv import backend

    before = {name: sys.modules.get(name) for name in (*fake_cupy.MODULE_NAMES, "cupy")}
    status, make = backend._cupy_status, backend._make
    had_cupy_module = "gpudeconv.backend._cupy" in sys.modules
    with pytest.MonkeyPatch.context() as monkeypatch:
        fake = fake_cupy.install(monkeypatch, cache_dir=emulation_dir)
        assert gd.get_backend("cupy").name == "cupy"
        assert sys.modules["cupy"] is fake.cupy and backend._cupy.cupy is fake.cupy
    assert {name: sys.modules.get(name) for name in before} == before
    assert backend._cupy_status is status and backend._make is make
    assert ("gpudeconv.backend._cupy" in sys.modules) == had_cupy_module
    if not had_cupy_module:
        assert not hasattr(backend, "_cupy")
        assert "cupy" not in gd.available_backends()


# ---------------------------------------------------------------------------- fused steps
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "unweighted"])
@pytest.mark.parametrize("level", [None, "sky", "negative"], ids=["no-bg", "sky", "negative"])
def test_rl_ratio_matches_numpy(fake, cupy_backend, dtype, weighted, level):
    d = rl_data(dtype)
    weight = d["weight"] if weighted else None
    # the background as a Python float: the backend must hand the kernel the C type
    options = {} if level is None else {"background": float(backgrounds(dtype)[level])}
    expected = NumPyBackend().rl_ratio(d["observed"], d["blurred"].copy(), weight, **options)
    cp = fake.cupy
    blurred = cp.asarray(d["blurred"])
    ratio = cupy_backend.rl_ratio(
        cp.asarray(d["observed"]),
        blurred,
        None if weight is None else cp.asarray(weight),
        **options,
    )
    assert ratio is blurred  # in place, like the NumPy twin
    np.testing.assert_allclose(ratio.get(), expected, rtol=RTOL[dtype], atol=0)
    if level is not None:
        plain = NumPyBackend().rl_ratio(d["observed"], d["blurred"].copy(), weight)
        assert not np.allclose(ratio.get(), plain, rtol=1e-3)
    (launch,) = fake.launches
    assert launch.name == f"gpudeconv_rl_ratio_{dtype}"
    assert len(launch.grid) == 1 and launch.block == (256,)
    assert launch.argument_types == (*[f"{dtype}*"] * 4, "int32", dtype, dtype, "int32")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("with_norm", [True, False], ids=["norm", "no-norm"])
@pytest.mark.parametrize("sides", [None, "both", "lower", "upper"], ids=str)
def test_rl_update_matches_numpy(fake, cupy_backend, dtype, with_norm, sides):
    d = rl_data(dtype) if sides is None else clamp_data(dtype)
    norm = d["norm"] if with_norm else None
    # the bounds as Python floats: the backend must hand the kernel the C type
    bounds = (None, None) if sides is None else clamps(dtype)[sides]
    lower, upper = (None if bound is None else float(bound) for bound in bounds)
    expected = d["estimate"].copy()
    NumPyBackend().rl_update(expected, d["correction"].copy(), norm, lower=lower, upper=upper)
    cp = fake.cupy
    estimate = cp.asarray(d["estimate"])
    result = cupy_backend.rl_update(
        estimate,
        cp.asarray(d["correction"]),
        None if norm is None else cp.asarray(norm),
        lower=lower,
        upper=upper,
    )
    assert result is None
    np.testing.assert_allclose(estimate.get(), expected, rtol=RTOL[dtype], atol=0)
    if sides is not None:
        unclamped = d["estimate"].copy()
        NumPyBackend().rl_update(unclamped, d["correction"].copy(), norm)
        assert (expected != unclamped).sum() > 50  # the clamp did something
        assert np.isnan(estimate.get()).sum() == 3
    (launch,) = fake.launches
    assert launch.name == f"gpudeconv_rl_update_{dtype}"
    assert launch.argument_types == (*[f"{dtype}*"] * 5, "int32", *[dtype] * 3, *["int32"] * 4)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "unweighted"])
def test_rl_damped_ratio_matches_numpy(fake, cupy_backend, dtype, weighted):
    d = damped_data(dtype)
    weight = d["weight"] if weighted else None
    background = float(backgrounds(dtype)["none"])
    cp = fake.cupy
    # Python numbers, an int among them: the backend must hand the kernel the C types
    dampings = [*DAMPINGS.values(), (1, 10)]
    for damping in dampings:
        expected = NumPyBackend().rl_ratio(
            d["observed"], d["blurred"].copy(), weight, background=background, damping=damping
        )
        blurred = cp.asarray(d["blurred"])
        ratio = cupy_backend.rl_ratio(
            cp.asarray(d["observed"]),
            blurred,
            None if weight is None else cp.asarray(weight),
            background=background,
            damping=damping,
        )
        assert ratio is blurred  # in place, like the NumPy twin
        np.testing.assert_allclose(ratio.get(), expected, rtol=DAMPED_RTOL[dtype], atol=0)
    assert [launch.name for launch in fake.launches] == [
        f"gpudeconv_rl_damped_ratio_{dtype}"
    ] * len(dampings)
    assert fake.launches[0].argument_types == (
        *[f"{dtype}*"] * 4,
        "int32",
        *[dtype] * 5,  # eps, background, scale, power, offset
        "int32",
    )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("variant", ["floor", "change", "clamp-floor-change"])
def test_rl_update_with_floor_and_change_matches_numpy(fake, cupy_backend, dtype, variant):
    d = floor_data(dtype)
    floor = d["pixel_floor"] if "floor" in variant else None
    tracks = "change" in variant
    bounds = clamps(dtype)["both"] if variant.startswith("clamp") else (None, None)
    lower, upper = (None if bound is None else float(bound) for bound in bounds)
    expected = d["estimate"].copy()
    expected_change = np.zeros_like(expected) if tracks else None
    NumPyBackend().rl_update(
        expected,
        d["correction"].copy(),
        d["norm"],
        lower=lower,
        upper=upper,
        floor=floor,
        change=expected_change,
    )
    cp = fake.cupy
    estimate = cp.asarray(d["estimate"])
    change = cp.zeros(expected.shape, dtype) if tracks else None
    result = cupy_backend.rl_update(
        estimate,
        cp.asarray(d["correction"]),
        cp.asarray(d["norm"]),
        lower=lower,
        upper=upper,
        floor=None if floor is None else cp.asarray(floor),
        change=change,
    )
    assert result is None
    np.testing.assert_allclose(estimate.get(), expected, rtol=RTOL[dtype], atol=0)
    if tracks:
        np.testing.assert_allclose(change.get(), expected_change, rtol=RTOL[dtype], atol=0)
    if floor is not None:
        assert (estimate.get() == floor).sum() > 200
    (launch,) = fake.launches
    assert launch.name == f"gpudeconv_rl_update_{dtype}"
    assert launch.argument_types == (*[f"{dtype}*"] * 5, "int32", *[dtype] * 3, *["int32"] * 4)


def test_rl_update_refuses_outputs_it_cannot_write(fake, cupy_backend):
    cp = fake.cupy
    d = floor_data("float32")
    estimate = cp.asarray(d["estimate"])
    correction = cp.asarray(d["correction"])
    with pytest.raises(ValueError, match="change is written in place: it must be a C-contiguous"):
        cupy_backend.rl_update(estimate, correction, change=cp.zeros(estimate.shape, np.float64))
    with pytest.raises(ValueError, match="change is written in place"):
        cupy_backend.rl_update(
            estimate, correction, change=cp.zeros(estimate.shape[::-1], np.float32).T
        )
    with pytest.raises(ValueError, match=r"floor must have the shape \(37, 53\)"):
        cupy_backend.rl_update(estimate, correction, floor=cp.asarray(d["pixel_floor"][:, :-1]))
    np.testing.assert_array_equal(estimate.get(), d["estimate"])
    assert fake.launches == []


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_rl_tv_norm_matches_numpy(fake, cupy_backend, dtype):
    estimate, norm = tv_data(dtype, ring=False)
    cp = fake.cupy
    for strength, epsilon in TV_SETTINGS.values():
        expected = np.empty_like(estimate)
        NumPyBackend().rl_tv_norm(estimate, norm, expected, strength=strength, epsilon=epsilon)
        out = cp.empty(estimate.shape, dtype)
        result = cupy_backend.rl_tv_norm(
            cp.asarray(estimate), cp.asarray(norm), out, strength=strength, epsilon=epsilon
        )
        assert result is out
        np.testing.assert_allclose(out.get(), expected, rtol=RTOL[dtype], atol=0)
    assert [launch.name for launch in fake.launches] == [f"gpudeconv_rl_tv_norm_{dtype}"] * 2
    assert fake.launches[0].argument_types == (
        *[f"{dtype}*"] * 3,
        "int32",
        "int32",
        *[dtype] * 3,
    )


def test_rl_tv_norm_refuses_aliased_or_misshapen_arrays(fake, cupy_backend):
    cp = fake.cupy
    estimate, norm = (cp.asarray(a) for a in tv_data("float32", ring=False))
    settings = {"strength": 0.01, "epsilon": 1.0}
    with pytest.raises(ValueError, match="out must be an array of its own.*estimate"):
        cupy_backend.rl_tv_norm(estimate, norm, estimate, **settings)
    with pytest.raises(ValueError, match="out must be an array of its own.*norm"):
        cupy_backend.rl_tv_norm(estimate, norm, norm, **settings)
    with pytest.raises(ValueError, match="takes a 2-D estimate"):
        flat = estimate.reshape(-1)
        cupy_backend.rl_tv_norm(flat, norm.reshape(-1), cp.empty_like(flat), **settings)
    with pytest.raises(ValueError, match="out is written in place"):
        cupy_backend.rl_tv_norm(estimate, norm, cp.empty(estimate.shape, np.float64), **settings)
    assert fake.launches == []


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_ba_extrapolate_matches_numpy(fake, cupy_backend, dtype):
    start, before = extrapolation_data(dtype)
    expected, expected_previous = start.copy(), before.copy()
    NumPyBackend().ba_extrapolate(expected, expected_previous, 0.8, floor_fraction=0.2)
    cp = fake.cupy
    estimate, previous = cp.asarray(start), cp.asarray(before)
    assert cupy_backend.ba_extrapolate(estimate, previous, 0.8, floor_fraction=0.2) is None
    np.testing.assert_allclose(estimate.get(), expected, rtol=RTOL[dtype], atol=0)
    np.testing.assert_array_equal(previous.get(), start)
    (launch,) = fake.launches
    assert launch.name == f"gpudeconv_ba_extrapolate_{dtype}"
    assert launch.argument_types == (f"{dtype}*", f"{dtype}*", "int32", dtype, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "unweighted"])
@pytest.mark.parametrize("kind", ["fit", "edge-cases"])
def test_rl_deviance_matches_numpy(fake, cupy_backend, dtype, weighted, kind):
    """The fused deviance kernel, launched by the backend: the NumPy backend's sum."""
    assert type(cupy_backend).rl_deviance is not Backend.rl_deviance
    d = deviance_data(dtype, kind)  # NaN data on a no-data border of weight 0
    weight = d["weight"] if weighted else None
    # the background as a Python float: the backend must hand the kernel the C type
    background = 0.05 if kind == "fit" else float(backgrounds(dtype)["negative"])
    expected = NumPyBackend().rl_deviance(
        d["observed"], d["blurred"], weight, background=background
    )
    cp = fake.cupy
    blurred = cp.asarray(d["blurred"])
    deviance = cupy_backend.rl_deviance(
        cp.asarray(d["observed"]),
        blurred,
        None if weight is None else cp.asarray(weight),
        background=background,
    )
    assert type(deviance) is float and np.isfinite(deviance)
    assert deviance == pytest.approx(expected, rel=DEVIANCE_RTOL[dtype], abs=0)
    np.testing.assert_array_equal(blurred.get(), d["blurred"])  # read, not reused
    (launch,) = fake.launches
    assert launch.name == f"gpudeconv_rl_deviance_{dtype}"
    assert launch.grid == (-(-blurred.size // 256),) and launch.block == (256,)
    assert launch.argument_types == (
        *[f"{dtype}*"] * 3,
        "float64*",
        "int32",
        dtype,
        dtype,
        "int32",
    )


def test_rl_deviance_takes_any_layout_and_refuses_other_shapes(fake, cupy_backend):
    """Inputs are made C-contiguous in the model's dtype (float64 data, a transposed model);
    an array of another shape, which the kernel would read past, is refused."""
    d = deviance_data("float32", "fit")
    cp = fake.cupy
    expected = NumPyBackend().rl_deviance(d["observed"], d["blurred"], d["weight"])
    blurred_t = cp.asarray(np.ascontiguousarray(d["blurred"].T)).T  # Fortran order
    deviance = cupy_backend.rl_deviance(
        cp.asarray(d["observed"].astype(np.float64)), blurred_t, cp.asarray(d["weight"])
    )
    assert deviance == pytest.approx(expected, rel=DEVIANCE_RTOL["float32"], abs=0)
    with pytest.raises(ValueError, match=r"observed must have the shape \(37, 53\)"):
        cupy_backend.rl_deviance(cp.asarray(d["observed"][:, :-1]), cp.asarray(d["blurred"]))
    with pytest.raises(ValueError, match=r"weight must have the shape \(37, 53\)"):
        cupy_backend.rl_deviance(
            cp.asarray(d["observed"]), cp.asarray(d["blurred"]), cp.asarray(d["weight"][1:])
        )
    assert [launch.name for launch in fake.launches] == ["gpudeconv_rl_deviance_float32"]


def test_rl_steps_refuse_bad_scalars_before_launching(fake, cupy_backend):
    cp = fake.cupy
    d = rl_data("float32")
    estimate = cp.asarray(d["estimate"])
    correction = cp.asarray(d["correction"])
    with pytest.raises(GpudeconvError, match="lower must be <= upper, got lower=2 > upper=1"):
        cupy_backend.rl_update(estimate, correction, lower=2.0, upper=1.0)
    with pytest.raises(GpudeconvError, match="upper must be a number, or None"):
        cupy_backend.rl_update(estimate, correction, upper=float("nan"))
    with pytest.raises(GpudeconvError, match="background must be a finite number"):
        cupy_backend.rl_ratio(
            cp.asarray(d["observed"]), cp.asarray(d["blurred"]), background=np.inf
        )
    blurred = cp.asarray(d["blurred"])
    with pytest.raises(GpudeconvError, match="damping power must be a finite number >= 1"):
        cupy_backend.rl_ratio(cp.asarray(d["observed"]), blurred, damping=(0.5, 0.5))
    with pytest.raises(GpudeconvError, match="TV strength must be a finite number >= 0"):
        cupy_backend.rl_tv_norm(estimate, correction, blurred, strength=-1.0, epsilon=1.0)
    previous = cp.asarray(d["estimate"])
    with pytest.raises(GpudeconvError, match=r"alpha must be a number in \[0, 1\)"):
        cupy_backend.ba_extrapolate(estimate, previous, 1.0)
    with pytest.raises(GpudeconvError, match="background must be a finite number"):
        cupy_backend.rl_deviance(cp.asarray(d["observed"]), blurred, background=np.nan)
    np.testing.assert_array_equal(estimate.get(), d["estimate"])
    np.testing.assert_array_equal(blurred.get(), d["blurred"])
    assert fake.launches == []


# ---------------------------------------------------------------------------- FFT convolution
@pytest.mark.parametrize("into", [False, True], ids=["new", "out"])
def test_fft_convolve_lets_cufft_overwrite_and_scales_in_the_window_copy(fake, monkeypatch, into):
    # The spectrum is the convolution's own: cuFFT's C2R may destroy it (no defensive copy), and
    # the inverse is left unscaled ('forward'), the window's copy scaling by 1 / N instead.
    cp = fake.cupy
    cupy_backend = gd.get_backend("cupy")
    cupyx_fft = sys.modules["cupyx.scipy.fft"]
    calls = []
    inverse = cupyx_fft.irfft2

    def recording(x, *args, **kwargs):
        calls.append(kwargs)
        return inverse(x, *args, **kwargs)

    monkeypatch.setattr(cupyx_fft, "irfft2", recording)
    image = star_field(SHAPE, seed=5, n_stars=10)
    psf = gd.psf.moffat(3.0, size=11).astype(np.float32)
    fft_shape = (70, 84)  # 61 + 5 and 75 + 5, then room: any shape past the PSF radius
    cpu = NumPyBackend()
    expected = cpu.fft_convolve(image, cpu.otf(psf, fft_shape), fft_shape)
    otf = cupy_backend.otf(cp.asarray(psf), fft_shape)
    out = cp.full(SHAPE, np.nan, dtype=np.float32) if into else None
    result = cupy_backend.fft_convolve(cp.asarray(image), otf, fft_shape, out=out)
    assert result is out if into else result.flags.c_contiguous
    assert result.dtype == np.float32 and result.shape == SHAPE
    np.testing.assert_allclose(result.get(), expected, rtol=1e-5, atol=1e-6 * expected.max())
    assert calls == [{"s": fft_shape, "norm": "forward", "overwrite_x": True}]


# ---------------------------------------------------------------------------- the whole restoration
@pytest.mark.parametrize(
    ("shape", "psf_size", "method"),
    [
        pytest.param(SHAPE, 11, "fft", id="fft-11x11"),
        # 66 + 3 * 5 = 81 = 3**4: an odd last FFT axis, which irfft2 gets right only with s=.
        pytest.param((61, 66), 11, "fft", id="fft-11x11-odd-width"),
        pytest.param(SHAPE, 5, "direct", id="direct-5x5"),
    ],
)
def test_richardson_lucy_matches_numpy(fake, shape, psf_size, method):
    image = sky_with_nodata(shape=shape)
    psf = gd.psf.gaussian(1.6, size=psf_size)
    assert gd.operators.Convolution(psf).method == method
    if shape[1] == 66:  # image + reflected border (2 radii) + the FFT's zero margin (1 radius)
        assert gd.get_backend("cupy").fft_length(66 + 3 * 5) == 81
    expected = gd.richardson_lucy(image, psf, 5, backend="numpy")

    result = gd.richardson_lucy(fake.cupy.asarray(image), psf, 5, backend="cupy")
    assert is_cupy_array(result) and result.dtype == np.float32 and result.shape == shape
    host = result.get()
    np.testing.assert_array_equal(np.isnan(host), ~np.isfinite(image))
    valid = np.isfinite(image)
    # float32 FFTs of different lengths (cuFFT's 2-3-5-7 against the CPU's) round differently:
    # up to 1.1e-5 of a faint pixel beside a star, 6e-7 of the peak; direct sums agree exactly.
    peak = np.abs(expected[valid]).max()
    np.testing.assert_allclose(host[valid], expected[valid], rtol=1e-5, atol=1e-6 * peak)
    assert not np.allclose(host[valid], image[valid], rtol=1e-3)  # it did restore something

    # Two fused steps an iteration, through the emulated kernels; the module built once.
    names = [launch.name for launch in fake.launches]
    assert names == ["gpudeconv_rl_ratio_float32", "gpudeconv_rl_update_float32"] * 5
    assert len(fake.raw_modules) == 1 and "#define IDX int\n" in fake.raw_modules[0].code


def test_nodata_start_on_device_arrays_is_numpys(fake):
    """The start of no-data pixels (`rl._nodata_start`: box sums by doubling, coarser blocks
    for the pixels deep in a half-unobserved plane) with CuPy's array functions on device
    arrays: NumPy's, bit for bit, and the restoration that starts from it NumPy's too."""
    cp = fake.cupy
    image = star_field((120, 150), seed=22, n_stars=40)
    image[:, :70] = np.nan  # 70 px deep: the coarse blocks fill most of it
    image[100:, 120:] = np.nan
    valid = np.isfinite(image)
    expected = rl._nodata_start(image, valid, (4, 5), np)
    start = rl._nodata_start(cp.asarray(image), cp.asarray(valid), (4, 5), cp)
    assert is_cupy_array(start) and start.dtype == np.float32
    np.testing.assert_array_equal(start.get(), expected)
    psf = gd.psf.gaussian(2.0, size=9)
    expected = gd.richardson_lucy(image, psf, 3, backend="numpy")
    result = gd.richardson_lucy(cp.asarray(image), psf, 3, backend="cupy").get()
    np.testing.assert_array_equal(np.isnan(result), ~valid)
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6 * np.nanmax(expected))


# ---------------------------------------------------------------------- every option, end to end
#: The star field's own blur (tests/helpers.py: a Gaussian of 3 px FWHM).
FIELD_PSF = gd.psf.gaussian(3.0, size=13)
#: A given noise model: the field's sky and read-noise offset, and half its gain.
LOOSE_NOISE = NoiseModel(background=200.0, sigma=20.0, offset=9.0, gain=0.5, source="given")


def clipped_field() -> tuple[np.ndarray, float]:
    """An 80x96 star field on a 200 ADU sky whose brightest cores are clipped (25 pixels at the
    level), with a NaN border on two sides and an infinite pixel: no-data."""
    image = star_field((80, 96), seed=3, n_stars=20, sky=200.0)
    level = float(np.percentile(image, 99.7))
    image = np.minimum(image, level)
    image[:3] = np.nan
    image[:, :4] = np.nan
    image[40, 50] = np.inf
    return image, level


CLIPPED_LEVEL = clipped_field()[1]
#: The data terms of stop='noise' on the two backends, whose float32 FFTs round otherwise:
#: measured 2.2e-7 apart at most (5e-8 in the first iteration, from the same estimate).
DATA_TERM_RTOL = 1e-6

#: (iterations, options, the kernels an iteration launches, why it stops, after how many; the
#: data term of every iteration is recorded, one rl_deviance launch an iteration). The
#: stops lie >= 3 % from the rule's threshold on either side (relative change 0.0318 -> 0.0285
#: around 0.03, 0.0594 -> 0.0528 around 0.056; data term 1.028 -> 0.952 around 1), where the
#: backends' float32 rounding (1e-5) cannot move them.
OPTION_SETS = {
    "auto-noise-tv-dering-saturation-auto": (
        10,
        {"noise": "auto", "regularization": 0.005, "dering": 0.5, "saturation": "auto"},
        ("rl_deviance", "rl_ratio", "rl_tv_norm", "rl_update"),
        ("iterations", 10),
    ),
    "given-noise-background-damped-accelerated": (
        10,
        {"noise": LOOSE_NOISE, "background": 200.0, "damping": 2.0, "accelerate": True},
        ("ba_extrapolate", "rl_damped_ratio", "rl_deviance", "rl_update"),
        ("iterations", 10),
    ),
    "camera-noise-stop-noise": (
        20,
        {"read_noise": 3.0, "gain": 0.45, "stop": "noise"},
        ("rl_deviance", "rl_ratio", "rl_update"),
        ("noise", 7),
    ),
    "saturation-level-stop-change": (
        20,
        {"saturation": CLIPPED_LEVEL, "stop": "change", "tolerance": 0.03},
        ("rl_deviance", "rl_ratio", "rl_update"),
        ("change", 8),
    ),
    "plain-dering": (
        10,
        {"dering": 1.0},
        ("rl_deviance", "rl_ratio", "rl_update"),
        ("iterations", 10),
    ),
    "luminance-accelerated-stop-change": (
        20,
        {
            "luminance": True,
            "noise": "auto",
            "saturation": "auto",
            "accelerate": True,
            "stop": "change",
            "tolerance": 0.056,
        },
        ("ba_extrapolate", "rl_deviance", "rl_ratio", "rl_update"),
        ("change", 9),
    ),
}


@pytest.fixture
def fake_with_linalg(fake, monkeypatch):
    """The fake, with ``cupy.linalg``: ``stop='change'`` measures with ``xp.linalg.norm``,
    which CuPy 14 has (Frobenius norm of a 2-D array by default, as NumPy's) but the fake,
    which emulates no submodule, lacks."""
    monkeypatch.setattr(
        fake.cupy, "linalg", fake_cupy._NumPyFallback("cupy.linalg", np.linalg), raising=False
    )
    return fake


@pytest.mark.parametrize("name", OPTION_SETS)
def test_richardson_lucy_options_match_numpy(fake_with_linalg, name):
    """Every option of richardson_lucy through the CuPy backend's own code on CuPy input: the
    same restoration as NumPy's, the same story (iterations, why they stopped, restarts,
    saturated pixels, data term), and each option's fused kernel launched."""
    fake = fake_with_linalg
    iterations, options, kernels, (stopped, stopped_at) = OPTION_SETS[name]
    image, _ = clipped_field()
    if options.get("luminance"):
        image = np.stack([image, 0.8 * image, 0.6 * image])
    expected, expected_info = gd.richardson_lucy(
        image, FIELD_PSF, iterations, backend="numpy", return_info=True, **options
    )

    result, info = gd.richardson_lucy(
        fake.cupy.asarray(image), FIELD_PSF, iterations, backend="cupy", return_info=True, **options
    )
    assert is_cupy_array(result) and result.dtype == np.float32 and result.shape == image.shape
    host = result.get()
    valid = np.isfinite(image)
    np.testing.assert_array_equal(np.isnan(host), ~valid)  # no NaN leaks, none is lost
    # float32 FFTs of other lengths (cuFFT's 2-3-5-7) round otherwise: up to 1.1e-5 of the
    # range after 10 accelerated iterations. TV amplifies rounding on the no-data fill, which
    # the data term does not see (a pixel-scale pattern there is invisible through the PSF),
    # and passes it on to the data beside it: 1.3e-4, 4e-5, 1.4e-5 of the range 1, 2, 3 pixels
    # from the no-data, 3e-6 further in.
    error = np.abs(host - expected) / np.ptp(expected[valid])
    beside_gaps = scipy.ndimage.binary_dilation(~valid, iterations=3) & valid
    assert error[valid & ~beside_gaps].max() <= 2e-5
    assert error[valid].max() <= (5e-4 if "regularization" in options else 2e-5)
    assert not np.allclose(host[valid], image[valid], rtol=1e-3)  # it did restore something

    assert info.options == expected_info.options
    assert (info.iterations, info.stopped) == (expected_info.iterations, stopped)
    assert info.iterations == stopped_at
    assert len(info.channels) == len(expected_info.channels) == 1
    channel, expected_channel = info.channels[0], expected_info.channels[0]
    assert channel.restarts == expected_channel.restarts
    assert channel.noise == expected_channel.noise  # measured on the host, the same data
    assert (channel.saturation, channel.saturated) == (
        expected_channel.saturation,
        expected_channel.saturated,
    )
    if "saturation" in options:
        assert channel.saturated >= 25  # the clipped pixels and their neighbours
    assert len(channel.data_term) == channel.iterations
    np.testing.assert_allclose(channel.data_term, expected_channel.data_term, rtol=1e-4)

    launched = [launch.name for launch in fake.launches]
    assert sorted(set(launched)) == [f"gpudeconv_{kernel}_float32" for kernel in kernels]
    for kernel in kernels:  # one launch of each an iteration: the steps are fused
        assert launched.count(f"gpudeconv_{kernel}_float32") == info.iterations


def test_stop_noise_has_the_data_terms_of_numpy(fake):
    """stop='noise' ends at the same iteration on both backends, from the same data terms: the
    fused deviance kernel on the device against the NumPy backend's row-parallel sum."""
    image, _ = clipped_field()
    options = {"read_noise": 3.0, "gain": 0.45, "stop": "noise", "return_info": True}
    expected, expected_info = gd.richardson_lucy(image, FIELD_PSF, 20, backend="numpy", **options)
    result, info = gd.richardson_lucy(
        fake.cupy.asarray(image), FIELD_PSF, 20, backend="cupy", **options
    )
    channel, expected_channel = info.channels[0], expected_info.channels[0]
    assert (info.stopped, info.iterations) == (expected_info.stopped, expected_info.iterations)
    assert info.stopped == "noise" and 3 <= info.iterations < 20
    assert len(channel.data_term) == len(expected_channel.data_term) == info.iterations
    # the estimates differ by the FFTs' float32 rounding (cuFFT's lengths against the CPU's)
    np.testing.assert_allclose(channel.data_term, expected_channel.data_term, rtol=DATA_TERM_RTOL)
    assert channel.data_term[-1] <= 1.0 < channel.data_term[-2]
    assert [launch.name for launch in fake.launched("gpudeconv_rl_deviance")] == [
        "gpudeconv_rl_deviance_float32"
    ] * info.iterations


@pytest.fixture
def no_transfers_in_deringing(fake, monkeypatch):
    """Fails a test whose deringing envelope of device data copies data between host and
    device: a ``.get()`` of a device array, or a host array made a device array, while
    `rl._dering_floor` runs on device data. Returns the list of the envelopes it made there."""
    inside = []
    envelopes = []

    def refuse(what):
        if inside:
            raise AssertionError(f"_dering_floor made a {what} copy")

    real_get, real_asarray, real_array = fake_cupy.ndarray.get, fake.cupy.asarray, fake.cupy.array

    def get(self, *args, **kwargs):
        refuse("device-to-host")
        return real_get(self, *args, **kwargs)

    def to_device(real):
        def copy(obj, *args, **kwargs):
            if not isinstance(obj, fake_cupy.ndarray):
                refuse("host-to-device")
            return real(obj, *args, **kwargs)

        return copy

    real_floor = rl._dering_floor

    def dering_floor(padded, *args):
        if not is_cupy_array(padded):  # the NumPy backend's run
            return real_floor(padded, *args)
        inside.append(True)
        try:
            envelope = real_floor(padded, *args)
        finally:
            inside.pop()
        envelopes.append(envelope)
        return envelope

    monkeypatch.setattr(fake_cupy.ndarray, "get", get)
    monkeypatch.setattr(fake.cupy, "asarray", to_device(real_asarray))
    monkeypatch.setattr(fake.cupy, "array", to_device(real_array))
    monkeypatch.setattr(rl, "_dering_floor", dering_floor)
    return envelopes


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dering_envelope_is_computed_on_the_device(fake, cupy_backend, dtype, monkeypatch):
    """The envelope of the device data, by the backend's ndimage filters, without a copy to the
    host: the NumPy backend's envelope (SciPy's filters here too), bit for bit."""
    image, _ = clipped_field()
    data = np.pad(np.nan_to_num(image, nan=200.0, posinf=200.0), 12, mode="reflect")
    padded = (data / data.max()).astype(dtype)
    arguments = (0.01, 0.5, 0.02)  # shift, strength, sigma at unit scale
    expected = rl._dering_floor(
        padded, gd.operators.Convolution(FIELD_PSF), *arguments, NumPyBackend()
    )
    monkeypatch.setattr(
        fake_cupy.ndarray, "get", lambda *a, **k: pytest.fail("a device-to-host copy")
    )
    device = fake.cupy.asarray(padded)
    operator = gd.operators.Convolution(FIELD_PSF, cupy_backend)
    envelope = rl._dering_floor(device, operator, *arguments, cupy_backend)
    assert is_cupy_array(envelope) and envelope.dtype == dtype and envelope.shape == padded.shape
    np.testing.assert_array_equal(envelope.view(np.ndarray), expected)
    # a few noise sigmas (15 ADU) under the sky (200 ADU), less the allowance of 0.03
    sky, sigma = 200.0 / data.max(), 15.0 / data.max()
    assert sky - 6 * sigma - 0.03 < np.median(expected) < sky - sigma - 0.03
    assert (expected > 0).all() and (expected < padded).mean() > 0.9
    assert fake.launches == []  # SciPy-signature filters, no raw kernel


def test_dering_runs_on_the_device_in_richardson_lucy(fake, no_transfers_in_deringing):
    image, _ = clipped_field()
    options = {"dering": 1.0, "noise": LOOSE_NOISE}
    expected = gd.richardson_lucy(image, FIELD_PSF, 6, backend="numpy", **options)
    result = gd.richardson_lucy(fake.cupy.asarray(image), FIELD_PSF, 6, backend="cupy", **options)
    (envelope,) = no_transfers_in_deringing
    assert is_cupy_array(envelope)
    valid = np.isfinite(image)
    error = np.abs(result.get() - expected) / np.ptp(expected[valid])
    assert error[valid].max() <= 2e-5
    plain = gd.richardson_lucy(image, FIELD_PSF, 6, backend="numpy", noise=LOOSE_NOISE)
    assert np.nanmin(expected) > np.nanmin(plain)  # the envelope held the dark rings up


def test_numpy_input_on_the_cupy_backend_comes_back_as_numpy(fake):
    image = sky_with_nodata(np.float64, seed=9)
    psf = gd.psf.gaussian(1.3, size=5)
    expected = gd.richardson_lucy(image, psf, 3, backend="numpy")
    result = gd.richardson_lucy(image, psf, 3, backend="cupy")
    assert type(result) is np.ndarray and result.dtype == np.float64
    np.testing.assert_allclose(result, expected, rtol=1e-12, atol=0, equal_nan=True)
    assert {launch.name for launch in fake.launches} == {
        "gpudeconv_rl_ratio_float64",
        "gpudeconv_rl_update_float64",
    }


# ---------------------------------------------------------------------------- it can fail
def test_launch_mistakes_are_caught(fake, cupy_backend):
    cp = fake.cupy
    a = cp.ones(300, np.float32)
    kernel = cupy_module()._rl_kernel("rl_ratio", a)
    n, eps, sky, no = np.int32(a.size), np.float32(1e-12), np.float32(0.0), np.int32(0)
    kernel((2,), (256,), (a, a, a, a, n, eps, sky, no))  # the right call runs
    with pytest.raises(TypeError, match="pass np.int32.*got int"):
        kernel((2,), (256,), (a, a, a, a, a.size, eps, sky, no))  # Python int -> long long
    with pytest.raises(TypeError, match="pass np.float32.*got float64"):
        kernel((2,), (256,), (a, a, a, a, n, 1e-12, sky, no))  # Python float -> double
    with pytest.raises(TypeError, match="argument 6 is a C float32: pass np.float32.*float64"):
        kernel((2,), (256,), (a, a, a, a, n, eps, 0.0, no))  # the background as a Python float
    with pytest.raises(TypeError, match="takes 8 arguments, got 7"):
        kernel((2,), (256,), (a, a, a, a, n, eps, no))  # the background forgotten
    with pytest.raises(TypeError, match="expected tuple, got list"):
        kernel([2], (256,), (a, a, a, a, n, eps, sky, no))
    with pytest.raises(TypeError, match="expected tuple, got int"):
        kernel((2,), 256, (a, a, a, a, n, eps, sky, no))
    with pytest.raises(TypeError, match="numpy.ndarray of shape"):
        kernel((2,), (256,), (a.get(), a, a, a, n, eps, sky, no))  # a host array
    with pytest.raises(TypeError, match="got a float64 array"):
        kernel((2,), (256,), (a, a, a.astype(np.float64), a, n, eps, sky, no))
    with pytest.raises(ValueError, match="C-contiguous"):
        kernel((1,), (256,), (a[::2], a[::2], a[::2], a[::2], np.int32(150), eps, sky, no))
    with pytest.raises(kh.KernelError, match="AddressSanitizer"):
        kernel((2,), (256,), (a, a, a, a, np.int32(a.size + 1), eps, sky, no))  # n too large
    update = cupy_module()._rl_kernel("rl_update", a)
    bounds = (np.float32(-np.inf), np.float32(np.inf))
    update((2,), (256,), (a, a, a, a, a, n, eps, *bounds, no, no, no, no))  # the right call runs
    with pytest.raises(TypeError, match="argument 7 is a C float32: pass np.float32.*float64"):
        update((2,), (256,), (a, a, a, a, a, n, eps, -np.inf, np.inf, no, no, no, no))  # a float
    with pytest.raises(TypeError, match="argument 12 is a C int32: pass np.int32.*got int64"):
        update((2,), (256,), (a, a, a, a, a, n, eps, *bounds, no, no, no, False))  # a Python int


def test_a_backend_that_passes_python_ints_fails(fake, cupy_backend, monkeypatch):
    """What the tests above would say if _cupy.py had the classic mistakes."""
    cp = fake.cupy
    d = rl_data("float32")
    observed, blurred = cp.asarray(d["observed"]), cp.asarray(d["blurred"])
    module = cupy_module()
    with monkeypatch.context() as broken:
        broken.setattr(module, "_index", lambda array: array.size)
        with pytest.raises(TypeError, match="argument 4 is a C int32: pass np.int32"):
            cupy_backend.rl_ratio(observed, blurred)
    with monkeypatch.context() as broken:
        broken.setattr(module, "_launch_shape", lambda size: ([8], [256]))
        with pytest.raises(TypeError, match="Argument 'grid' has incorrect type"):
            cupy_backend.rl_ratio(observed, blurred)
    assert fake.launches == []
