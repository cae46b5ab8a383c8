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
from gpudeconv.backend import NORM_FLOOR, RATIO_EPS, TV_STABILITY, _cupy_status, is_cupy_array
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
    for options in (
        {},
        {"background": 0.0},
        {"background": -0.0},
        {"background": np.int64(0)},
        {"damping": None},
    ):
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
    for bounds in ({}, {"lower": None, "upper": None}, {"floor": None, "change": None}):
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


# -------------------------------------------------- damping, floor, TV, extrapolation, deviance
# The formulas of White (1994), Dey et al. (2006) and Biggs & Andrews (1997), written here in
# float64 with NumPy alone.
def deviance_reference(observed, model):
    """2 (d log(d / m) - d + m), 2 m where d <= 0, in float64."""
    d, m = np.asarray(observed, np.float64), np.asarray(model, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        inside = d * np.log(np.where(d > 0, d, 1) / m) - d + m
    return np.where(d > 0, 2 * inside, 2 * m)


def damped_reference(observed, blurred, weight, *, background, scale, power, offset=0.0):
    """White's damped ratio in float64, its statistic the deviance on the Poisson share
    ``p = max(m - offset, 0) / m`` of the model and Pearson's chi-square on the rest."""
    m = np.maximum(np.asarray(blurred, np.float64) + background, RATIO_EPS)
    d = np.asarray(observed, np.float64)
    share = np.maximum(m - offset, 0) / m
    misfit = scale * (share * deviance_reference(d, m) + (1 - share) * (d - m) ** 2 / m)
    with np.errstate(over="ignore", invalid="ignore"):
        damped = 1 + misfit ** (power - 1) * (power - (power - 1) * misfit) * (d - m) / m
    ratio = np.where(misfit < 1, damped, d / m)
    return ratio if weight is None else weight * ratio


def dark_step_data(dtype, seed=7):
    """rl_step_data with pixels without photons under a faint model and negative pixels."""
    d = rl_step_data(dtype, seed)
    d["observed"][2, 10:30] = 0.0
    d["blurred"][2, 10:20] = 0.4  # U < 1 there: the damped ratio is near 1, not 0
    d["observed"][3, 10:20] = -5.0
    return d


# The float32 deviance cancels where the data are close to the model, which White's U**(N-1)
# amplifies about N (N - 1) times (test_kernels_emulated.DAMPED_RTOL): a float64 reference is
# met to 1e-4 in float32 (measured: 9e-6).
FORMULA_RTOL = {np.float32: 1e-4, np.float64: 1e-10}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "damping",
    [(0.02, 10.0), (0.5, 10), (0.1, 3.5), (0.02, 10.0, 100.0), (0.1, 3.5, 400)],
    ids=str,
)
@pytest.mark.parametrize("background", [0.0, 12.5])
def test_damped_ratio_follows_whites_formula(backend, dtype, damping, background):
    d = dark_step_data(dtype)
    scale, power, offset = (*damping, 0.0)[:3]
    expected = damped_reference(
        d["observed"],
        d["blurred"],
        d["weight"],
        background=background,
        scale=scale,
        power=power,
        offset=offset,
    )
    ratio = backend.rl_ratio(
        backend.asarray(d["observed"]),
        backend.asarray(d["blurred"].copy()),
        backend.asarray(d["weight"]),
        background=background,
        damping=damping,
    )
    ratio = backend.to_host(ratio)
    np.testing.assert_allclose(ratio, expected, rtol=FORMULA_RTOL[dtype], atol=1e-7)
    plain = d["weight"] * d["observed"] / np.maximum(d["blurred"] + dtype(background), RATIO_EPS)
    changed = np.abs(ratio - plain) > 1e-3 * np.abs(plain)
    assert 0.02 < changed.mean() < 0.98  # damped and undamped pixels both
    if background == 0:  # no photons, a faint model: about 1 where the weight is 1
        dark = (d["observed"][2, 10:20] == 0) & (d["weight"][2, 10:20] > 0)
        assert (ratio[2, 10:20][dark] > 0.5).all() and dark.sum() > 3


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_damped_ratio_offset_blends_in_pearson(backend, dtype):
    """Offset 0 is White's deviance bit for bit (raw frames restore as before); an offset
    above the model makes U Pearson's chi-square (d - m)^2 / m, which is larger than the
    deviance below the model and smaller above it."""
    d = dark_step_data(dtype)

    def ratio(damping):
        return backend.to_host(
            backend.rl_ratio(
                backend.asarray(d["observed"]),
                backend.asarray(d["blurred"].copy()),
                damping=damping,
            )
        )

    white = ratio((0.02, 10.0))
    np.testing.assert_array_equal(ratio((0.02, 10.0, 0.0)), white)
    pearson = ratio((0.02, 10.0, 1e9))
    expected = damped_reference(
        d["observed"], d["blurred"], None, background=0.0, scale=0.02, power=10.0, offset=1e9
    )
    np.testing.assert_allclose(pearson, expected, rtol=FORMULA_RTOL[dtype], atol=1e-7)
    # Where both are damped (U < 1) the deviance pulls further down below the model, Pearson's
    # less: the ratio - 1 keeps its sign and Pearson's damping is the stronger one there.
    m = np.maximum(d["blurred"].astype(np.float64), RATIO_EPS)
    below = (d["observed"] > 0.5 * m) & (d["observed"] < 0.95 * m)
    assert below.sum() > 50
    assert (np.abs(pearson[below] - 1) <= np.abs(white[below] - 1) * (1 + 1e-5)).all()
    plain = d["observed"] / m
    moving = below & (np.abs(white - 1) > 1e-3) & (np.abs(white - plain) > 1e-3 * plain)
    assert moving.sum() > 10 and (np.abs(pearson[moving] - 1) < np.abs(white[moving] - 1)).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "no-norm"])
@pytest.mark.parametrize("clamped", [True, False], ids=["clamp", "no-clamp"])
def test_update_floor_and_change(backend, dtype, norm, clamped):
    d = rl_step_data(dtype)
    bounds = {"lower": 100.0, "upper": 900.0} if clamped else {}
    stepped = plain_update(d, norm)
    if clamped:
        stepped = np.clip(stepped, dtype(100.0), dtype(900.0))
    floor = np.random.default_rng(2).uniform(200, 600, stepped.shape).astype(dtype)
    floor[10, :5] = np.nan  # a NaN floor raises nothing
    estimate = backend.asarray(d["estimate"].copy())
    change = backend.asarray(np.full(stepped.shape, np.nan, dtype))
    backend.rl_update(
        estimate,
        backend.asarray(d["correction"].copy()),
        backend.asarray(d["norm"]) if norm else None,
        floor=backend.asarray(floor),
        change=change,
        **bounds,
    )
    result, change = backend.to_host(estimate), backend.to_host(change)
    expected = np.where(stepped < floor, floor, stepped)  # NaN pixels stay NaN
    rtol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(result, expected, rtol=rtol)
    assert (result == floor).sum() > 100 and (result > floor).sum() > 100
    np.testing.assert_array_equal(np.isnan(result), np.isnan(d["estimate"]))
    np.testing.assert_array_equal(change, result - d["estimate"])  # new - old, exactly


def tv_reference(estimate, norm, *, strength, epsilon):
    """Dey et al.'s normalization in float64, with np.diff and np.pad; the gradient floor
    ``max(epsilon, TV_STABILITY strength u)`` at the gradient's own pixel."""
    u = np.asarray(estimate, np.float64)
    gx = np.pad(np.diff(u, axis=1), ((0, 0), (0, 1)))
    gy = np.pad(np.diff(u, axis=0), ((0, 1), (0, 0)))
    floor = np.maximum(epsilon, TV_STABILITY * strength * u)
    length = np.sqrt(gx**2 + gy**2 + floor**2)
    nx, ny = gx / length, gy / length
    div = np.diff(nx, axis=1, prepend=0.0) + np.diff(ny, axis=0, prepend=0.0)
    n = np.asarray(norm, np.float64)
    return np.where(n <= NORM_FLOOR, n, np.maximum(n - strength * div, 0.5 * n))


def tv_step_data(dtype, seed=8):
    """A star field as the estimate, norm 0.3 to 1 with an unobserved ring (norm 0)."""
    from helpers import star_field

    estimate = star_field((41, 57), seed=seed, n_stars=10).astype(dtype)
    norm = np.random.default_rng(seed).uniform(0.3, 1.0, estimate.shape).astype(dtype)
    norm[:2], norm[-2:], norm[:, :2], norm[:, -2:] = 0, 0, 0, 0
    return estimate, norm


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("strength", "epsilon"), [(0.005, 1.0), (0.3, 0.5)])
def test_tv_norm_follows_deys_formula(backend, dtype, strength, epsilon):
    estimate, norm = tv_step_data(dtype)
    out = backend.asarray(np.full(estimate.shape, np.nan, dtype))
    result = backend.rl_tv_norm(
        backend.asarray(estimate), backend.asarray(norm), out, strength=strength, epsilon=epsilon
    )
    assert result is out
    expected = tv_reference(estimate, norm, strength=strength, epsilon=epsilon)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(backend.to_host(out), expected, rtol=rtol)
    assert (np.abs(expected / np.where(norm > 0, norm, 1) - 1) > 1e-3).mean() > 0.3


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tv_norm_of_a_flat_image_is_the_norm(backend, dtype):
    _, norm = tv_step_data(dtype)
    flat = np.full(norm.shape, 123.0, dtype)
    out = backend.asarray(np.full(norm.shape, np.nan, dtype))
    backend.rl_tv_norm(backend.asarray(flat), backend.asarray(norm), out, strength=0.5, epsilon=0.1)
    np.testing.assert_array_equal(backend.to_host(out), norm)


def test_tv_divergence_is_the_negative_adjoint_of_the_gradient():
    """sum(grad u . p) = -sum(u div p) for any u and any p that is 0 where the gradient is (px
    on the last column, py on the last row), as the unit gradients of TV are."""
    from gpudeconv.backend._numpy import _divergence, _gradient

    rng = np.random.default_rng(4)
    u = rng.normal(size=(37, 53))
    px, py = rng.normal(size=u.shape), rng.normal(size=u.shape)
    px[:, -1] = 0.0
    py[-1] = 0.0
    gx, gy = _gradient(u, 0, u.shape[0])
    inner = np.sum(gx * px) + np.sum(gy * py)
    assert inner == pytest.approx(-np.sum(u * _divergence(px, py)), rel=1e-12)
    assert abs(inner) > 10  # not a trivial zero
    # a block of rows with the row above it gives the whole image's rows
    whole = _divergence(px, py)
    np.testing.assert_array_equal(_divergence(px[10:20], py[10:20], py[9]), whole[10:20])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extrapolation_follows_biggs_andrews(backend, dtype):
    d = rl_step_data(dtype)
    current = d["estimate"].copy()
    current[:, 0] = np.abs(current[:, 0])
    earlier = (current * np.random.default_rng(3).uniform(0.3, 2.5, current.shape)).astype(dtype)
    estimate, previous = backend.asarray(current.copy()), backend.asarray(earlier.copy())
    backend.ba_extrapolate(estimate, previous, 0.9, floor_fraction=0.25)
    stepped = current + dtype(0.9) * (current - earlier)
    expected = np.where(stepped < dtype(0.25) * current, dtype(0.25) * current, stepped)
    rtol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(backend.to_host(estimate), expected, rtol=rtol)
    np.testing.assert_array_equal(backend.to_host(previous), current)
    assert (expected == dtype(0.25) * current).sum() > 100  # the floor held pixels up


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "unweighted"])
@pytest.mark.parametrize("background", [0.0, -30.0])
def test_deviance_is_the_poisson_deviance(backend, dtype, weighted, background):
    d = dark_step_data(dtype)
    weight = d["weight"] if weighted else None
    model = np.maximum(d["blurred"].astype(np.float64) + background, RATIO_EPS)
    terms = deviance_reference(d["observed"], model)
    expected = np.sum(terms if weight is None else weight * terms)
    blurred = backend.asarray(d["blurred"])
    deviance = backend.rl_deviance(
        backend.asarray(d["observed"]),
        blurred,
        None if weight is None else backend.asarray(weight),
        background=background,
    )
    assert type(deviance) is float
    assert deviance == pytest.approx(expected, rel=1e-6 if dtype == np.float32 else 1e-12)
    np.testing.assert_array_equal(backend.to_host(blurred), d["blurred"])


@pytest.mark.parametrize(
    ("step", "options", "message"),
    [
        ("ratio", {"damping": 0.5}, r"damping must be None or a pair \(scale, power\)"),
        ("ratio", {"damping": (1, 2, 3, 4)}, r"damping must be None or a pair .* or a triple"),
        ("ratio", {"damping": (1, 2, "x")}, r"damping must be None or a pair"),
        ("ratio", {"damping": (0.5, 10, -1.0)}, r"damping offset must be a finite number >= 0"),
        ("ratio", {"damping": (0.5, 10, np.inf)}, r"damping offset must be .* got inf"),
        ("ratio", {"damping": (0.0, 10)}, r"damping scale must be a positive finite number"),
        ("ratio", {"damping": (np.inf, 10)}, r"damping scale must be .* got inf"),
        ("ratio", {"damping": (0.5, 0.9)}, r"damping power must be a finite number >= 1 .* 0.9"),
        ("ratio", {"damping": (0.5, np.nan)}, r"damping power must be .* got nan"),
        ("tv", {"strength": -0.1, "epsilon": 1.0}, r"TV strength must be a finite number >= 0"),
        ("tv", {"strength": np.nan, "epsilon": 1.0}, r"TV strength must be .* got nan"),
        ("tv", {"strength": 0.1, "epsilon": 0.0}, r"TV epsilon must be a positive finite"),
        ("tv", {"strength": 0.1, "epsilon": np.inf}, r"TV epsilon must be .* got inf"),
        ("extrapolate", {"alpha": 1.0}, r"alpha must be a number in \[0, 1\) .* got 1.0"),
        ("extrapolate", {"alpha": -0.1}, r"alpha must be a number in \[0, 1\)"),
        ("extrapolate", {"alpha": 0.5, "floor_fraction": 1.5}, r"floor_fraction must be .*1\]"),
        ("extrapolate", {"alpha": np.nan}, r"alpha must be .* got nan"),
    ],
)
def test_bad_step_settings_are_refused(backend, step, options, message):
    d = rl_step_data(np.float32)
    estimate = backend.asarray(d["estimate"].copy())
    blurred = backend.asarray(d["blurred"].copy())
    other = backend.asarray(d["correction"].copy())
    with pytest.raises(GpudeconvError, match=message) as caught:
        if step == "ratio":
            backend.rl_ratio(backend.asarray(d["observed"]), blurred, **options)
        elif step == "tv":
            backend.rl_tv_norm(estimate, backend.asarray(d["norm"]), other, **options)
        else:
            backend.ba_extrapolate(estimate, other, **options)
    assert isinstance(caught.value, ValueError)
    # refused before anything was written
    np.testing.assert_array_equal(backend.to_host(estimate), d["estimate"])
    np.testing.assert_array_equal(backend.to_host(blurred), d["blurred"])
    np.testing.assert_array_equal(backend.to_host(other), d["correction"])


def test_steps_refuse_arrays_they_cannot_write(backend):
    d = rl_step_data(np.float32)
    estimate = backend.asarray(d["estimate"].copy())
    norm = backend.asarray(d["norm"])
    with pytest.raises(ValueError, match="out must be an array of its own: .* estimate"):
        backend.rl_tv_norm(estimate, norm, estimate, strength=0.1, epsilon=1.0)
    with pytest.raises(ValueError, match="out must be an array of its own: .* norm"):
        backend.rl_tv_norm(estimate, norm, norm, strength=0.1, epsilon=1.0)
    with pytest.raises(ValueError, match=r"out must have the shape \(41, 57\)"):
        backend.rl_tv_norm(estimate, norm, estimate[:, :-1].copy(), strength=0.1, epsilon=1.0)
    with pytest.raises(ValueError, match="previous is written in place: .* float32"):
        backend.ba_extrapolate(estimate, backend.asarray(d["estimate"].astype(np.float64)), 0.5)
    with pytest.raises(ValueError, match="change is written in place"):
        backend.rl_update(estimate, norm, change=backend.xp.zeros((57, 41), np.float32).T)
    np.testing.assert_array_equal(backend.to_host(estimate), d["estimate"])


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


def test_row_parallel_stencil_and_sums_match_one_block():
    """The TV stencil reads a row of halo across block edges, and the deviance adds per-block
    sums: both as on one block, on an array large enough to be cut."""
    from gpudeconv.backend._base import Backend
    from gpudeconv.backend._numpy import NumPyBackend, _tv_norm_rows
    from gpudeconv.backend._parallel import by_row_ranges, map_rows, usable_cores

    rng = np.random.default_rng(6)
    shape = (1201, 1003)
    estimate = rng.gamma(2.0, 50.0, shape).astype(np.float32)
    norm = rng.uniform(0.2, 1.0, shape).astype(np.float32)
    norm[::97] = 0.0
    blocks = by_row_ranges(lambda start, stop: (start, stop), shape[0], estimate.size)
    assert blocks[0][0] == 0 and blocks[-1][1] == shape[0]
    assert all(stop == start for (_, stop), (start, _) in zip(blocks, blocks[1:], strict=False))
    assert (len(blocks) > 1) == (usable_cores() > 1)
    backend = NumPyBackend()
    out = np.full(shape, np.nan, np.float32)
    backend.rl_tv_norm(estimate, norm, out, strength=0.05, epsilon=1.0)
    whole = np.full(shape, np.nan, np.float32)
    strength = np.float32(0.05)
    _tv_norm_rows(
        estimate,
        norm,
        whole,
        0,
        shape[0],
        strength=strength,
        reach=np.float32(TV_STABILITY) * strength,
        epsilon=np.float32(1.0),
    )
    np.testing.assert_array_equal(out, whole)
    observed = rng.poisson(estimate).astype(np.float32)
    weight = (rng.random(shape) > 0.1).astype(np.float32)
    for w in (weight, None):
        parallel = backend.rl_deviance(observed, estimate, w, background=3.0)
        generic = Backend.rl_deviance(backend, observed, estimate, w, background=3.0)
        assert parallel == pytest.approx(generic, rel=1e-12)
    # an optional array left out reaches every block as None
    assert map_rows(lambda a, b: (len(a), b), estimate, None) == [
        (stop - start, None) for start, stop in blocks
    ]


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
