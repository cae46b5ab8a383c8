"""The CUDA kernels, compiled for the CPU with tests/cuda_emulation.h, against their NumPy twins.

No GPU needed: tests/kernel_harness.py builds each ``kernels/*.cu`` with g++ (AddressSanitizer
on) and runs every launch in a child process with a deadline. The launch shapes are small and
odd so that the grid-stride loops wrap, and some launches have more threads than pixels.
"""

from __future__ import annotations

import functools
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
def backgrounds(dtype: str) -> dict[str, np.floating]:
    """Background levels of the ratio as the kernel's scalar type: none, a sky that shifts every
    denominator by a tenth to a half, and a negative level that sends 5% of them below eps (one
    of them to exactly 0)."""
    blurred = rl_data(dtype)["blurred"]
    scalar = dtype_type(dtype)
    return {
        "none": scalar(0.0),
        "sky": scalar(np.median(blurred) * 0.3),
        "negative": -np.quantile(blurred[blurred > 1], 0.05, method="lower"),
    }


def check_ratio(
    module, idx, dtype, grid, block, *, weighted: bool, in_place: bool, background=None
) -> np.ndarray:
    d = rl_data(dtype)
    background = dtype_type(dtype)(0.0) if background is None else background
    weight = d["weight"] if weighted else None
    expected = numpy_backend().rl_ratio(
        d["observed"].copy(), d["blurred"].copy(), weight, background=background
    )
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
            background,
            np.int32(weighted),
        ),
    )
    np.testing.assert_allclose(ratio, expected, rtol=RTOL[dtype], atol=0)
    return ratio


def clamp_data(dtype: str) -> dict[str, np.ndarray]:
    """rl_data with NaN pixels in the estimate and kept pixels (norm 0) far outside the bounds
    of :func:`clamps`, which cut the updated values at their 15th and 85th percentiles."""
    d = rl_data(dtype)
    estimate = d["estimate"]
    estimate[::2, 0] = 1e6  # kept pixels (norm[:, :3] == 0): above any upper bound
    estimate[1::2, 1] = -5.0  # ... and below any lower bound
    estimate.reshape(-1)[[100, 777, 1500]] = np.nan
    return d


def clamps(dtype: str) -> dict[str, tuple]:
    """(lower, upper) pairs as the kernel's scalar type; None is an open side."""
    d = clamp_data(dtype)
    updated = d["estimate"].copy()
    numpy_backend().rl_update(updated, d["correction"].copy(), d["norm"])
    low, high = np.nanquantile(updated, [0.15, 0.85], method="lower")
    return {"both": (low, high), "lower": (low, None), "upper": (None, high), "equal": (low, low)}


def launch_update(
    module,
    idx,
    dtype,
    grid,
    block,
    d,
    *,
    with_norm,
    clamp,
    has_clamp,
    floor=None,
    change=None,
    has_floor=None,
    has_change=None,
):
    """The update kernel on a copy of ``d["estimate"]``; ``clamp`` = (lower, upper), None open.

    ``floor`` (read) and ``change`` (written in place) are passed where given, else stand-ins;
    their flags follow them unless ``has_floor`` / ``has_change`` say otherwise."""
    lower, upper = clamp
    scalar = dtype_type(dtype)
    estimate = d["estimate"].copy()
    has_floor = floor is not None if has_floor is None else has_floor
    has_change = change is not None if has_change is None else has_change
    module.launch(
        f"gpudeconv_rl_update_{dtype}",
        grid,
        block,
        (
            estimate,
            d["correction"],
            d["norm"] if with_norm else d["correction"],
            d["correction"] if floor is None else floor,
            estimate if change is None else change,
            index_scalar(idx, estimate.size),
            d["floor"],
            scalar(-np.inf if lower is None else lower),
            scalar(np.inf if upper is None else upper),
            np.int32(with_norm),
            np.int32(has_clamp),
            np.int32(has_floor),
            np.int32(has_change),
        ),
    )
    return estimate


def check_update(
    module, idx, dtype, grid, block, *, with_norm: bool, clamp=(None, None)
) -> np.ndarray:
    """The update kernel against the NumPy backend, clamped to ``clamp`` = (lower, upper)."""
    lower, upper = clamp
    has_clamp = clamp != (None, None)
    d = clamp_data(dtype) if has_clamp else rl_data(dtype)
    expected = d["estimate"].copy()
    numpy_backend().rl_update(
        expected,
        d["correction"].copy(),
        d["norm"] if with_norm else None,
        lower=lower,
        upper=upper,
    )
    estimate = launch_update(
        module, idx, dtype, grid, block, d, with_norm=with_norm, clamp=clamp, has_clamp=has_clamp
    )
    np.testing.assert_allclose(estimate, expected, rtol=RTOL[dtype], atol=0)
    return estimate


def test_rl_steps_entry_points(rl_steps):
    module, _ = rl_steps
    steps = (
        "rl_ratio",
        "rl_damped_ratio",
        "rl_update",
        "rl_tv_norm",
        "ba_extrapolate",
        "rl_deviance",
    )
    assert sorted(module.names) == sorted(
        f"gpudeconv_{op}_{dtype}" for op in steps for dtype in RTOL
    )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_test_data_covers_the_edge_cases(dtype):
    d = rl_data(dtype)
    assert (d["blurred"] <= d["eps"]).sum() >= 30 and (d["blurred"] == d["eps"]).any()
    assert (d["weight"] == 0).any() and (d["norm"] == 0).any()
    assert (d["norm"] == d["floor"]).any() and ((d["norm"] > d["floor"]) & (d["norm"] < 0.01)).any()
    levels = backgrounds(dtype)
    assert all(level.dtype == np.dtype(dtype) for level in levels.values())
    shifted = d["blurred"] + levels["negative"]
    assert (shifted <= d["eps"]).sum() > 90 and (shifted == 0).any()  # the guard, shifted
    assert (d["blurred"] + levels["sky"] > 1.1 * d["blurred"]).mean() > 0.9
    # every clamp changes updated pixels, kept pixels, and leaves NaN and the pixels in between
    c = clamp_data(dtype)
    kept = c["norm"] <= c["floor"]
    for lower, upper in clamps(dtype).values():
        assert lower is None or lower.dtype == np.dtype(dtype)
        assert upper is None or upper.dtype == np.dtype(dtype)
        low = -np.inf if lower is None else lower
        high = np.inf if upper is None else upper
        assert ((c["estimate"] < low) & kept).any() or ((c["estimate"] > high) & kept).any()
        updated = c["estimate"].copy()
        numpy_backend().rl_update(updated, c["correction"].copy(), c["norm"])
        assert ((updated < low) | (updated > high)).sum() > 200
        assert low == high or ((updated > low) & (updated < high)).sum() > 1000
        assert np.isnan(updated).sum() == 3


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
@pytest.mark.parametrize("level", ["sky", "negative"])
@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "unweighted"])
def test_rl_ratio_with_background_matches_numpy(rl_steps, dtype, grid, block, level, weighted):
    module, idx = rl_steps
    background = backgrounds(dtype)[level]
    ratio = check_ratio(
        module, idx, dtype, grid, block, weighted=weighted, in_place=True, background=background
    )
    plain = numpy_backend().rl_ratio(rl_data(dtype)["observed"], rl_data(dtype)["blurred"])
    assert (ratio != plain).mean() > 0.8  # the background did shift the denominators
    assert np.isfinite(ratio).all()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "unweighted"])
def test_rl_ratio_without_background_is_the_numpy_ratio_bit_for_bit(rl_steps, dtype, weighted):
    module, idx = rl_steps
    d = rl_data(dtype)
    weight = d["weight"] if weighted else 1
    expected = weight * d["observed"] / np.maximum(d["blurred"], d["eps"])  # weights are 0 or 1
    ratio = check_ratio(module, idx, dtype, (3,), (32,), weighted=weighted, in_place=False)
    np.testing.assert_array_equal(ratio, expected)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("grid", "block"), LAUNCHES)
@pytest.mark.parametrize("with_norm", [True, False], ids=["norm", "no-norm"])
def test_rl_update_matches_numpy(rl_steps, dtype, grid, block, with_norm):
    module, idx = rl_steps
    check_update(module, idx, dtype, grid, block, with_norm=with_norm)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("grid", "block"), LAUNCHES)
@pytest.mark.parametrize("with_norm", [True, False], ids=["norm", "no-norm"])
@pytest.mark.parametrize("sides", ["both", "lower", "upper", "equal"])
def test_rl_update_with_clamp_matches_numpy(rl_steps, dtype, grid, block, with_norm, sides):
    module, idx = rl_steps
    lower, upper = clamps(dtype)[sides]
    estimate = check_update(
        module, idx, dtype, grid, block, with_norm=with_norm, clamp=(lower, upper)
    )
    finite = estimate[~np.isnan(estimate)]
    assert lower is None or (finite >= lower).all() and (finite == lower).sum() > 50
    assert upper is None or (finite <= upper).all() and (finite == upper).sum() > 50
    assert np.isnan(estimate).sum() == 3  # comparisons, not fmin/fmax: NaN stays NaN
    if with_norm:  # pixels without data behind them are clamped too
        kept = estimate[:, :2]
        assert lower is None or (kept[1::2, 1] == lower).all()
        assert upper is None or (kept[::2, 0] == upper).all()


def plain_update(d, *, with_norm: bool) -> np.ndarray:
    """The update's formula, written here: u c / n where n > floor, else u; or u c."""
    if not with_norm:
        return d["estimate"] * d["correction"]
    divided = d["estimate"] * (d["correction"] / np.where(d["norm"] > 0, d["norm"], 1))
    return np.where(d["norm"] > d["floor"], divided, d["estimate"])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("with_norm", [True, False], ids=["norm", "no-norm"])
def test_rl_update_without_clamp_is_the_formula_bit_for_bit(rl_steps, dtype, with_norm):
    """has_clamp = 0, even with tight bounds beside it: the plain update, NaN pixels and all;
    likewise has_floor and has_change."""
    module, idx = rl_steps
    d = clamp_data(dtype)
    expected = plain_update(d, with_norm=with_norm)
    tight = clamps(dtype)["both"]
    for clamp in [(None, None), tight]:
        estimate = launch_update(
            module, idx, dtype, (3,), (32,), d, with_norm=with_norm, clamp=clamp, has_clamp=False
        )
        np.testing.assert_array_equal(estimate, expected)
    assert (expected > tight[1]).sum() > 50 and np.isnan(expected).sum() == 3
    # has_floor = has_change = 0 beside a floor above most pixels and a change buffer: both
    # ignored, the buffer untouched
    change = np.full(SHAPE, -7.0, dtype)
    floor = np.full(SHAPE, np.nanmax(expected), dtype)
    estimate = launch_update(
        module,
        idx,
        dtype,
        (3,),
        (32,),
        d,
        with_norm=with_norm,
        clamp=tight,
        has_clamp=False,
        floor=floor,
        change=change,
        has_floor=False,
        has_change=False,
    )
    np.testing.assert_array_equal(estimate, expected)
    assert (change == -7.0).all()


# ---------------------------------------------------------------------------- damped ratio
#: The deviance d log(d/m) - d + m cancels where d ~ m: the 1-ulp differences between NumPy's
#: float32 log (its SIMD version) and the C library's logf (or CUDA's) become about ulp / |x| of
#: U (x = (d - m) / m), and r - 1 ~ N U^(N-1) x carries that times N - 1, so r may differ by
#: up to about N (N - 1) ulp: 90 x 4 x 1.2e-7 = 4e-5 for N = 10 and NumPy's 4-ulp log. Measured
#: 3.5e-6. float64 has no such differences here.
DAMPED_RTOL = {"float32": 5e-5, "float64": 1e-12}
#: (scale, power[, offset]): damp 4% to 80% of the pixels of damped_data; a non-integer power
#: too; an offset at the sky level of damped_data (about 50), so that its models are below it
#: (Pearson's statistic alone), at it and above it (a blend with the deviance)
DAMPINGS = {
    "mild": (0.05, 10.0),
    "strong": (0.5, 10.0),
    "power-2.5": (0.2, 2.5),
    "offset": (0.2, 10.0, 50.0),
}


def damped_data(dtype: str) -> dict[str, np.ndarray]:
    """rl_data with pixels without photons (a tenth of them under a faint model, where the
    damped ratio is near 1 and the weight decides) and negative pixels (bias-subtracted noise)."""
    d = rl_data(dtype)
    observed, blurred = d["observed"].reshape(-1), d["blurred"].reshape(-1)
    spots = np.random.default_rng(11).choice(observed.size, 40, replace=False)
    observed[spots[:30]] = 0.0
    blurred[spots[:10]] = 0.3
    observed[spots[30:]] = -2.0
    return d


def launch_damped_ratio(module, idx, dtype, grid, block, d, *, weighted, damping, background):
    """The damped ratio kernel in place on a copy of ``d["blurred"]``, as the backend runs it."""
    scalar = dtype_type(dtype)
    scale, power, offset = (*damping, 0.0)[:3]
    ratio = d["blurred"].copy()
    module.launch(
        f"gpudeconv_rl_damped_ratio_{dtype}",
        grid,
        block,
        (
            d["observed"],
            ratio,
            d["weight"] if weighted else d["observed"],
            ratio,
            index_scalar(idx, ratio.size),
            d["eps"],
            background,
            scalar(scale),
            scalar(power),
            scalar(offset),
            np.int32(weighted),
        ),
    )
    return ratio


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("grid", "block"), LAUNCHES)
@pytest.mark.parametrize("level", ["none", "sky", "negative"])
@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "unweighted"])
def test_rl_damped_ratio_matches_numpy(rl_steps, dtype, grid, block, level, weighted):
    module, idx = rl_steps
    d = damped_data(dtype)
    background = backgrounds(dtype)[level]
    weight = d["weight"] if weighted else None
    plain = numpy_backend().rl_ratio(
        d["observed"], d["blurred"].copy(), weight, background=background
    )
    dark_pixels = 0
    for damping in DAMPINGS.values():
        expected = numpy_backend().rl_ratio(
            d["observed"], d["blurred"].copy(), weight, background=background, damping=damping
        )
        ratio = launch_damped_ratio(
            module,
            idx,
            dtype,
            grid,
            block,
            d,
            weighted=weighted,
            damping=damping,
            background=background,
        )
        np.testing.assert_allclose(ratio, expected, rtol=DAMPED_RTOL[dtype], atol=0)
        assert np.isfinite(ratio).all()
        damped = np.abs(expected - plain) > 1e-3 * np.abs(plain)
        assert 50 < damped.sum() < damped.size - 50  # both branches of the formula ran
        # no photons under a faint model (U < 0.1): the damped ratio is near 1, not 0 as the
        # plain one, so only the weight can make it 0
        model = np.maximum(d["blurred"] + background, d["eps"])
        dark = (d["observed"] == 0) & (2 * damping[0] * model < 0.1)
        seen = dark & (d["weight"] > 0) if weighted else dark
        assert (ratio[seen] > 0.9).all() and (ratio[dark & ~seen] == 0).all()
        dark_pixels += seen.sum()
    assert dark_pixels >= 10 or level == "sky"  # a sky shifts every model above 1


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_rl_damped_ratio_with_offset_0_is_whites_bit_for_bit(emulation_cache, dtype):
    """Offset 0 (raw frames) computes White's U = s D exactly as the kernel did before the
    offset's Pearson share: raw frames restore bit for bit as before. An offset changes it."""
    module = kh.build_kernel("rl_steps.cu", IDX="int", cache_dir=emulation_cache)
    white = broken_rl_steps_edited(
        [("scale * damping_misfit(d, m, offset)", "scale * poisson_deviance(d, m)")],
        emulation_cache,
    )
    d = damped_data(dtype)
    scalar = dtype_type(dtype)
    for background in backgrounds(dtype).values():
        for damping in DAMPINGS.values():
            launch = functools.partial(
                launch_damped_ratio,
                idx="int",
                dtype=dtype,
                grid=(3,),
                block=(32,),
                d=d,
                weighted=True,
                background=background,
            )
            ratio = launch(module, damping=(*damping[:2], scalar(0.0)))
            np.testing.assert_array_equal(ratio, launch(white, damping=damping[:2]))
            if len(damping) == 3:
                blended = launch(module, damping=damping)
                assert (blended != ratio).sum() > 20


# ---------------------------------------------------------------------------- floor and change
def floor_data(dtype: str) -> dict[str, np.ndarray]:
    """clamp_data with a per-pixel floor about the updated values' median (20 pixels NaN: a
    NaN floor raises nothing) as ``pixel_floor``."""
    d = clamp_data(dtype)
    rng = np.random.default_rng(12)
    updated = d["estimate"].copy()
    numpy_backend().rl_update(updated, d["correction"].copy(), d["norm"])
    floor = (np.nanmedian(updated) * rng.uniform(0.5, 1.5, SHAPE)).astype(dtype)
    floor.reshape(-1)[rng.choice(floor.size, 20, replace=False)] = np.nan
    d["pixel_floor"] = floor
    return d


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("grid", "block"), LAUNCHES)
@pytest.mark.parametrize("with_norm", [True, False], ids=["norm", "no-norm"])
@pytest.mark.parametrize("variant", ["floor", "change", "floor-change", "clamp-floor-change"])
def test_rl_update_with_floor_and_change_matches_numpy(
    rl_steps, dtype, grid, block, with_norm, variant
):
    module, idx = rl_steps
    d = floor_data(dtype)
    floor = d["pixel_floor"] if "floor" in variant else None
    tracks = "change" in variant
    clamp = clamps(dtype)["both"] if variant.startswith("clamp") else (None, None)
    expected = d["estimate"].copy()
    expected_change = np.full(SHAPE, np.nan, dtype) if tracks else None
    numpy_backend().rl_update(
        expected,
        d["correction"].copy(),
        d["norm"] if with_norm else None,
        lower=clamp[0],
        upper=clamp[1],
        floor=floor,
        change=expected_change,
    )
    change = np.full(SHAPE, np.nan, dtype) if tracks else None
    estimate = launch_update(
        module,
        idx,
        dtype,
        grid,
        block,
        d,
        with_norm=with_norm,
        clamp=clamp,
        has_clamp=clamp != (None, None),
        floor=floor,
        change=change,
    )
    np.testing.assert_allclose(estimate, expected, rtol=RTOL[dtype], atol=0)
    assert np.isnan(estimate).sum() == 3  # comparisons: NaN stays NaN, a NaN floor is no floor
    if floor is not None:
        compared = ~np.isnan(floor) & ~np.isnan(estimate)
        assert (estimate[compared] >= floor[compared]).all()
        assert (estimate == floor).sum() > 200  # the floor raised pixels
    if tracks:  # one subtraction from the value before the step, exactly
        np.testing.assert_array_equal(change, estimate - d["estimate"])
        np.testing.assert_allclose(change, expected_change, rtol=RTOL[dtype], atol=0)


# ---------------------------------------------------------------------------- TV normalization
#: (strength, epsilon): a mild regularization, and a strong one that reaches the n / 2 bound
TV_SETTINGS = {"mild": (0.002, 1.0), "strong": (0.3, 0.5)}


def tv_data(dtype: str, *, ring: bool) -> tuple[np.ndarray, np.ndarray]:
    """A noisy star field as the estimate, norm between 0.2 and 1 with 20 pixels below the
    floor and, with ``ring``, a one-pixel border at the floor (RL's unobserved ring); without
    it every edge pixel computes its (one-sided) divergence."""
    rng = np.random.default_rng(13)
    estimate = sky(rng, dtype)
    norm = rng.uniform(0.2, 1.0, SHAPE).astype(dtype)
    floor = dtype_type(dtype)(norm_floor())
    norm.reshape(-1)[rng.choice(norm.size, 20, replace=False)] = floor * dtype_type(dtype)(0.5)
    if ring:
        norm[0], norm[-1], norm[:, 0], norm[:, -1] = floor, floor, floor, floor
    return estimate, norm


def launch_tv_norm(module, idx, dtype, grid, block, estimate, norm, *, strength, epsilon):
    scalar = dtype_type(dtype)
    out = np.full(SHAPE, np.nan, dtype)
    module.launch(
        f"gpudeconv_rl_tv_norm_{dtype}",
        grid,
        block,
        (
            estimate,
            norm,
            out,
            index_scalar(idx, out.size),
            index_scalar(idx, out.shape[1]),
            scalar(norm_floor()),
            scalar(strength),
            scalar(epsilon),
        ),
    )
    return out


def check_tv_norm(module, idx, dtype, grid, block, *, ring: bool, setting: str) -> np.ndarray:
    strength, epsilon = TV_SETTINGS[setting]
    estimate, norm = tv_data(dtype, ring=ring)
    expected = np.full(SHAPE, np.nan, dtype)
    numpy_backend().rl_tv_norm(estimate, norm, expected, strength=strength, epsilon=epsilon)
    out = launch_tv_norm(
        module, idx, dtype, grid, block, estimate, norm, strength=strength, epsilon=epsilon
    )
    np.testing.assert_allclose(out, expected, rtol=RTOL[dtype], atol=0)
    return out


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("grid", "block"), LAUNCHES)
@pytest.mark.parametrize("ring", [True, False], ids=["ring", "no-ring"])
def test_rl_tv_norm_matches_numpy(rl_steps, dtype, grid, block, ring):
    module, idx = rl_steps
    _, norm = tv_data(dtype, ring=ring)
    kept = norm <= dtype_type(dtype)(norm_floor())
    for setting in TV_SETTINGS:
        out = check_tv_norm(module, idx, dtype, grid, block, ring=ring, setting=setting)
        np.testing.assert_array_equal(out[kept], norm[kept])  # no data behind: norm itself
        assert (out[~kept] != norm[~kept]).mean() > 0.9  # the regularization acted
        bounded = (out == norm * dtype_type(dtype)(0.5)) & ~kept
        assert bounded.sum() > 10 if setting == "strong" else bounded.sum() == 0


# ---------------------------------------------------------------------------- extrapolation
def extrapolation_data(dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """A star field as the estimate, the previous estimate 0.2 to 3 times it (steps both
    ways, some that would overshoot below 0), a few zero and NaN pixels in each."""
    rng = np.random.default_rng(14)
    estimate = sky(rng, dtype)
    previous = (estimate * rng.uniform(0.2, 3.0, SHAPE)).astype(dtype)
    estimate[0, :5] = 0.0
    estimate.reshape(-1)[[100, 1500]] = np.nan
    previous.reshape(-1)[[777]] = np.nan
    return estimate, previous


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("grid", "block"), LAUNCHES)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.95])
def test_ba_extrapolate_matches_numpy(rl_steps, dtype, grid, block, alpha):
    module, idx = rl_steps
    start, before = extrapolation_data(dtype)
    expected, expected_previous = start.copy(), before.copy()
    numpy_backend().ba_extrapolate(expected, expected_previous, alpha)
    scalar = dtype_type(dtype)
    estimate, previous = start.copy(), before.copy()
    module.launch(
        f"gpudeconv_ba_extrapolate_{dtype}",
        grid,
        block,
        (estimate, previous, index_scalar(idx, estimate.size), scalar(alpha), scalar(0.1)),
    )
    np.testing.assert_allclose(estimate, expected, rtol=RTOL[dtype], atol=0)
    np.testing.assert_array_equal(previous, start)  # previous <- the estimate before the step
    np.testing.assert_array_equal(expected_previous, start)
    assert np.isnan(estimate).sum() == 3  # a NaN stays NaN, whichever array it came from
    floored = estimate == start * scalar(0.1)
    if alpha == 0.95:
        assert (floored & (start > 0)).sum() > 50  # the floor held up overshooting pixels
    if alpha > 0:
        assert (estimate > start).sum() > 300  # and the others moved both ways
        assert (estimate[start > 0] < start[start > 0]).sum() > 300


# ---------------------------------------------------------------------------- deviance
#: Launch shapes of the deviance: besides LAUNCHES (many trips round the grid-stride loop, one
#: thread for everything, idle threads), the backend's 256-thread blocks with 8x more blocks
#: than the pixels need (56 idle blocks must write 0), a block whose size is not a power of two
#: (the tree's guard) and CUDA's largest block (the whole shared tree).
DEVIANCE_LAUNCHES = [
    *LAUNCHES,
    pytest.param((64,), (256,), id="grid64x256"),
    pytest.param((5,), (96,), id="grid5x96"),
    pytest.param((2,), (1024,), id="grid2x1024"),
]
#: The float64 sums differ only by their order (a tree against NumPy's pairwise sum); float32
#: terms also by the ulp of logf against NumPy's log where d ~ m cancels. Measured (both index
#: types, every launch, level and weighting): totals 4.2e-8 (float32) and 4.3e-15 (float64),
#: one block's partial sum (32 to 1024 terms) 5.0e-7 and 2.2e-15.
DEVIANCE_RTOL = {"float32": 2e-7, "float64": 1e-13}
PARTIAL_RTOL = {"float32": 2e-6, "float64": 1e-13}


def deviance_data(dtype: str, kind: str) -> dict[str, np.ndarray]:
    """Data, model and weights of the data term, as the RL loop passes them.

    ``'fit'``: a noisy star field (counts, 50 sky) and its noise-free blur as the model, both
    scaled to a maximum of 1 as RL works: the model fits to the noise, about one deviance per
    pixel in counts, where d ~ m cancels. ``'edge-cases'``: damped_data (models at, below and
    far below eps, negative ones; data without photons, negative data). Both with a no-data
    border of NaN data and weight 0 (four columns) and 100 hot pixels of weight 0.
    """
    rng = np.random.default_rng(21)
    if kind == "fit":
        observed = star_field(SHAPE, seed=21, n_stars=8).astype(np.float64)
        model = star_field(SHAPE, seed=21, n_stars=8, noise=False).astype(np.float64)
        scale = observed.max()
        weight = np.ones(SHAPE, dtype)
        weight.reshape(-1)[rng.choice(weight.size, 100, replace=False)] = 0.0
        d = dict(
            observed=(observed / scale).astype(dtype),
            blurred=(model / scale).astype(dtype),
            weight=weight,
            eps=dtype_type(dtype)(ratio_eps()),
        )
    else:
        d = damped_data(dtype)
    d["weight"][:, :4] = 0.0
    d["observed"][:, :4] = np.nan
    return d


def deviance_terms(d, *, weighted: bool, background) -> np.ndarray:
    """weight * D(d, max(b + bg, eps)) of every pixel, in the data's dtype: the NumPy backend's
    formula (poisson_deviance, in its operation order) before its sum."""
    from gpudeconv.backend._base import poisson_deviance

    model = np.maximum(d["blurred"] + background, d["eps"])
    terms = poisson_deviance(d["observed"], model, xp=np)
    return terms * d["weight"] if weighted else terms


def launch_deviance(module, idx, dtype, grid, block, d, *, weighted, background) -> np.ndarray:
    """The deviance kernel's partial sums, one per block (NaN where a block wrote none)."""
    partial = np.full(grid[0], np.nan)
    module.launch(
        f"gpudeconv_rl_deviance_{dtype}",
        grid,
        block,
        (
            d["observed"],
            d["blurred"],
            d["weight"] if weighted else d["observed"],
            partial,
            index_scalar(idx, d["blurred"].size),
            d["eps"],
            background,
            np.int32(weighted),
        ),
    )
    return partial


def check_deviance(module, idx, dtype, grid, block, d, *, weighted, background) -> np.ndarray:
    """The kernel's partial sums against the NumPy backend's total and against each block's
    own pixels (block b sums the pixels i with (i // threads) % blocks == b); returns them."""
    weight = d["weight"] if weighted else None
    expected = numpy_backend().rl_deviance(
        d["observed"], d["blurred"], weight, background=background
    )
    partial = launch_deviance(
        module, idx, dtype, grid, block, d, weighted=weighted, background=background
    )
    np.testing.assert_allclose(partial.sum(), expected, rtol=DEVIANCE_RTOL[dtype], atol=0)
    terms = deviance_terms(d, weighted=weighted, background=background).astype(np.float64)
    owner = (np.arange(terms.size) // block[0]) % grid[0]
    by_block = np.bincount(owner, weights=terms.reshape(-1), minlength=grid[0])
    np.testing.assert_allclose(partial, by_block, rtol=PARTIAL_RTOL[dtype], atol=0)
    return partial


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("grid", "block"), DEVIANCE_LAUNCHES)
@pytest.mark.parametrize("kind", ["fit", "edge-cases"])
def test_rl_deviance_matches_numpy(rl_steps, dtype, grid, block, kind):
    module, idx = rl_steps
    d = deviance_data(dtype, kind)
    sums = []
    for weighted in (True, False):
        partial = check_deviance(
            module, idx, dtype, grid, block, d, weighted=weighted, background=d["eps"] * 0
        )
        assert np.isfinite(partial).all()  # NaN data: 2 m, times weight 0 where weighted
        busy = -(-d["blurred"].size // block[0])  # blocks after these have no pixel
        assert (partial[busy:] == 0).all()  # and write 0, not nothing
        sums.append(partial.sum())
    assert sums[0] < sums[1]  # the no-data border and the hot pixels were left out
    if kind == "fit":  # a fit to the noise: about one per observed pixel in counts
        counts = star_field(SHAPE, seed=21, n_stars=8).max()
        assert 0.7 < sums[0] * counts / (d["weight"] > 0).sum() < 1.5


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("level", ["sky", "negative"])
@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "unweighted"])
def test_rl_deviance_with_background_matches_numpy(rl_steps, dtype, level, weighted):
    module, idx = rl_steps
    d = deviance_data(dtype, "edge-cases")
    background = backgrounds(dtype)[level]
    partial = check_deviance(
        module, idx, dtype, (3,), (32,), d, weighted=weighted, background=background
    )
    plain = numpy_backend().rl_deviance(
        d["observed"], d["blurred"], d["weight"] if weighted else None
    )
    assert abs(partial.sum() - plain) > 0.01 * plain  # the background did shift the model


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_rl_deviance_treats_non_finite_pixels_as_numpy(rl_steps, dtype):
    """NaN data counts 2 m without weights and 0 under weight 0; a NaN model (or infinite data)
    makes the sum NaN, weighted or not, as NumPy's maximum and 0 * NaN do."""
    module, idx = rl_steps
    scalar = dtype_type(dtype)
    for case in ("nan-model", "inf-data", "nan-data"):
        d = deviance_data(dtype, "fit")
        if case == "nan-model":
            d["blurred"][10, 10] = np.nan
        elif case == "inf-data":
            d["observed"][:, 3] = np.inf  # in the no-data border
        for weighted in (True, False):
            with np.errstate(invalid="ignore"):  # NumPy's inf - inf
                partial = check_deviance(
                    module, idx, dtype, (3,), (32,), d, weighted=weighted, background=scalar(0.0)
                )
            assert np.isnan(partial.sum()) == (case != "nan-data")


# ---------------------------------------------------------------------------- broken kernels
def broken_rl_steps(old: str, new: str, count: int, emulation_cache):
    text = kh.kernels_module().kernel_source("rl_steps.cu", IDX="int")
    assert text.count(old) == count, f"rl_steps.cu changed: update this test's {old!r}"
    return kh.build_source(
        text.replace(old, new), name="rl_steps_broken.cu", cache_dir=emulation_cache
    )


def test_harness_catches_a_wrong_grid_stride(emulation_cache):
    module = broken_rl_steps("i += gpudeconv_grid_stride()", "i += blockDim.x", 6, emulation_cache)
    # Every block now redoes the pixels of the blocks after it: in-place steps go wrong.
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        check_update(module, "int", "float32", (3,), (32,), with_norm=False)
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        check_ratio(module, "int", "float64", (3,), (32,), weighted=True, in_place=True)


def test_harness_catches_a_read_past_the_end(emulation_cache):
    module = broken_rl_steps("i < n; i +=", "i <= n; i +=", 6, emulation_cache)
    with pytest.raises(kh.KernelError, match="AddressSanitizer"):
        check_update(module, "int", "float64", (3,), (32,), with_norm=True)


def test_a_ratio_that_drops_the_background_fails(emulation_cache):
    module = broken_rl_steps(
        "T b = blurred[i] + background;", "T b = blurred[i];", 1, emulation_cache
    )
    check_ratio(module, "int", "float32", (3,), (32,), weighted=True, in_place=True)
    background = backgrounds("float32")["sky"]
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        check_ratio(
            module,
            "int",
            "float32",
            (3,),
            (32,),
            weighted=True,
            in_place=True,
            background=background,
        )


WRONG_CLAMPS = {
    # fmax/fmin return the other operand for a NaN: NaN pixels become a bound
    "fmax-lower": ([("if (u < lower) u = lower;", "u = fmax(u, lower);")], "lower"),
    "fmin-upper": ([("if (u > upper) u = upper;", "u = fmin(u, upper);")], "upper"),
    # clamped in the divided branch only: pixels without data behind them escape the bounds
    "data-pixels-only": (
        [
            ("if (has_clamp) {", "if (false) {"),
            (
                "u = u * (correction[i] / w);",
                "u = u * (correction[i] / w);\n"
                "                if (has_clamp) u = u < lower ? lower : (u > upper ? upper : u);",
            ),
        ],
        "both",
    ),
}


def broken_rl_steps_edited(edits, emulation_cache):
    text = kh.kernels_module().kernel_source("rl_steps.cu", IDX="int")
    for old, new in edits:
        assert text.count(old) == 1, f"rl_steps.cu changed: update this test's {old!r}"
        text = text.replace(old, new)
    return kh.build_source(text, name="rl_steps_broken.cu", cache_dir=emulation_cache)


@pytest.mark.parametrize("mutant", list(WRONG_CLAMPS))
def test_a_wrong_clamp_fails(emulation_cache, mutant):
    edits, sides = WRONG_CLAMPS[mutant]
    module = broken_rl_steps_edited(edits, emulation_cache)
    check_update(module, "int", "float64", (3,), (32,), with_norm=True)  # no clamp: still right
    clamp = clamps("float64")[sides]
    with pytest.raises(AssertionError, match="Not equal to tolerance|nan location mismatch"):
        check_update(module, "int", "float64", (3,), (32,), with_norm=True, clamp=clamp)


def test_a_clamp_that_ignores_has_clamp_fails(emulation_cache):
    module = broken_rl_steps("if (has_clamp) {", "if (true) {", 1, emulation_cache)
    d = clamp_data("float64")
    estimate = launch_update(
        module,
        "int",
        "float64",
        (3,),
        (32,),
        d,
        with_norm=True,
        clamp=clamps("float64")["both"],
        has_clamp=False,
    )
    with pytest.raises(AssertionError, match="Mismatched elements"):
        np.testing.assert_array_equal(estimate, plain_update(d, with_norm=True))


def check_floor_and_change(module, idx, dtype):
    """The update with a floor and a change against the NumPy backend."""
    d = floor_data(dtype)
    expected = d["estimate"].copy()
    expected_change = np.zeros(SHAPE, dtype)
    numpy_backend().rl_update(
        expected, d["correction"].copy(), d["norm"], floor=d["pixel_floor"], change=expected_change
    )
    change = np.zeros(SHAPE, dtype)
    estimate = launch_update(
        module,
        idx,
        dtype,
        (3,),
        (32,),
        d,
        with_norm=True,
        clamp=(None, None),
        has_clamp=False,
        floor=d["pixel_floor"],
        change=change,
    )
    np.testing.assert_allclose(estimate, expected, rtol=RTOL[dtype], atol=0)
    np.testing.assert_allclose(change, expected_change, rtol=RTOL[dtype], atol=0)


def check_damped(module, idx, dtype):
    d = damped_data(dtype)
    background = backgrounds(dtype)["none"]  # pixels without photons under a faint model
    for damping in DAMPINGS.values():
        expected = numpy_backend().rl_ratio(
            d["observed"], d["blurred"].copy(), d["weight"], background=background, damping=damping
        )
        ratio = launch_damped_ratio(
            module,
            idx,
            dtype,
            (3,),
            (32,),
            d,
            weighted=True,
            damping=damping,
            background=background,
        )
        np.testing.assert_allclose(ratio, expected, rtol=DAMPED_RTOL[dtype], atol=0)


def check_extrapolate(module, idx, dtype):
    start, before = extrapolation_data(dtype)
    expected, expected_previous = start.copy(), before.copy()
    numpy_backend().ba_extrapolate(expected, expected_previous, 0.5)
    estimate, previous = start.copy(), before.copy()
    scalar = dtype_type(dtype)
    module.launch(
        f"gpudeconv_ba_extrapolate_{dtype}",
        (3,),
        (32,),
        (estimate, previous, index_scalar(idx, estimate.size), scalar(0.5), scalar(0.1)),
    )
    np.testing.assert_allclose(estimate, expected, rtol=RTOL[dtype], atol=0)
    np.testing.assert_allclose(previous, expected_previous, rtol=RTOL[dtype], atol=0)


def check_tv(module, idx, dtype):
    for setting in TV_SETTINGS:
        check_tv_norm(module, idx, dtype, (3,), (32,), ring=False, setting=setting)


def check_deviance_cases(module, idx, dtype):
    """The deviance on both data sets, weighted, with a non-power-of-two block; with a NaN model."""
    for kind in ("fit", "edge-cases"):
        d = deviance_data(dtype, kind)
        background = dtype_type(dtype)(0.0)
        check_deviance(module, idx, dtype, (5,), (96,), d, weighted=True, background=background)
    d = deviance_data(dtype, "fit")
    d["blurred"][10, 10] = np.nan
    check_deviance(module, idx, dtype, (5,), (96,), d, weighted=True, background=background)


WRONG_NEW_STEPS = {
    # the exponent N instead of N - 1
    "damped-power": (
        [("gpudeconv_pow(misfit, order)", "gpudeconv_pow(misfit, power)")],
        check_damped,
    ),
    # the deviance without its d <= 0 branch: 0 log 0 is NaN where there are no photons
    "damped-no-dark-branch": (
        [
            (
                "d > (T)0 ? (T)2 * (d * gpudeconv_log(d / m) - d + m) : (T)2 * m",
                "(T)2 * (d * gpudeconv_log(d / m) - d + m)",
            )
        ],
        check_damped,
    ),
    # the Poisson share p from the model alone, without the offset: White's deviance everywhere
    "damped-share-no-offset": (
        [("m > offset ? (m - offset) / m : (T)0", "m > offset ? m / m : (T)0")],
        check_damped,
    ),
    # p not clamped at 0 below the offset: a negative weight on the deviance
    "damped-share-unclamped": (
        [("m > offset ? (m - offset) / m : (T)0", "(m - offset) / m")],
        check_damped,
    ),
    # the statistics swapped: Pearson's on the Poisson share, the deviance on the rest
    "damped-blend-swapped": (
        [
            (
                "share * dev + ((T)1 - share) * pearson",
                "share * pearson + ((T)1 - share) * dev",
            )
        ],
        check_damped,
    ),
    # fmax picks the floor for a NaN pixel
    "floor-fmax": ([("if (u < f) u = f;", "u = fmax(u, f);")], check_floor_and_change),
    # the change measured from the unclamped, unfloored value
    "change-too-early": (
        [
            ("        if (has_change) {\n            change[i] = u - old;\n        }\n", ""),
            (
                "        if (has_clamp) {",
                "        if (has_change) change[i] = u - old;\n        if (has_clamp) {",
            ),
        ],
        check_floor_and_change,
    ),
    # TV without the neighbour above, or with the left neighbour's gy from the wrong row
    "tv-no-upper": (
        [("div = div - agy / tv_length(agx, agy, above, reach, epsilon);", "")],
        check_tv,
    ),
    # the left neighbour's gradient floored by this pixel's value, or no value floor at all
    "tv-floor-pixel": (
        [("tv_length(lgx, lgy, left, reach, epsilon)", "tv_length(lgx, lgy, u, reach, epsilon)")],
        check_tv,
    ),
    "tv-no-stability": (
        [("e = e > epsilon ? e : epsilon;", "e = epsilon;")],
        check_tv,
    ),
    "tv-left-gy-row": (
        [("estimate[i - 1 + width] - left", "estimate[i + width] - left")],
        check_tv,
    ),
    # previous overwritten before it is read: no extrapolation at all
    "extrapolate-order": (
        [
            ("        previous[i] = u;\n", ""),
            (
                "        const T lowest = floor_fraction * u;\n",
                "        const T lowest = floor_fraction * u;\n        previous[i] = u;\n",
            ),
        ],
        check_extrapolate,
    ),
    # the tree started at half the block: a block of 96 threads drops the sums of threads 2-3
    "deviance-tree-width": (
        [("unsigned int half = width / 2;", "unsigned int half = blockDim.x / 2;")],
        check_deviance_cases,
    ),
    # the guard as the damped ratio writes it: a NaN model becomes eps, the sum finite
    "deviance-nan-model-guarded": (
        [("m = m < eps ? eps : m;", "m = m > eps ? m : eps;")],
        check_deviance_cases,
    ),
    # the weight left out of the sum: no-data pixels count
    "deviance-unweighted": (
        [
            (
                "sum += (gpudeconv_sum)(has_weight ? weight[i] * dev : dev);",
                "sum += (gpudeconv_sum)dev;",
            )
        ],
        check_deviance_cases,
    ),
}


@pytest.mark.parametrize("mutant", list(WRONG_NEW_STEPS))
def test_a_wrong_new_step_fails(emulation_cache, mutant):
    """Each check passes on the real kernel and fails on a plausible mistake in it."""
    edits, check = WRONG_NEW_STEPS[mutant]
    check(kh.build_kernel("rl_steps.cu", IDX="int", cache_dir=emulation_cache), "int", "float64")
    broken = broken_rl_steps_edited(edits, emulation_cache)
    with pytest.raises(AssertionError, match="Not equal to tolerance|nan location mismatch"):
        check(broken, "int", "float64")


def test_a_deviance_without_its_tree_barrier_is_a_data_race(emulation_cache):
    """ThreadSanitizer finds no race in the deviance's block reduction, and the race that a
    missing barrier between the tree's levels leaves."""
    barrier = "sums[t] += sums[t + half];\n        __syncthreads();\n"
    text = kh.kernels_module().kernel_source("rl_steps.cu", IDX="int")
    assert text.count(barrier) == 1, "rl_steps.cu changed: update this test's barrier"
    good = kh.build_kernel("rl_steps.cu", IDX="int", cache_dir=emulation_cache, sanitize="thread")
    d = deviance_data("float64", "fit")
    background = np.float64(0.0)
    check_deviance(good, "int", "float64", (2,), (64,), d, weighted=True, background=background)
    racy = kh.build_source(
        text.replace(barrier, "sums[t] += sums[t + half];\n"),
        name="rl_steps_racy.cu",
        cache_dir=emulation_cache,
        sanitize="thread",
    )
    with pytest.raises(kh.KernelError, match="data race"):
        launch_deviance(
            racy, "int", "float64", (2,), (64,), d, weighted=True, background=background
        )


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
    n, eps, sky, one = index_scalar(idx, 8), np.float32(1e-12), np.float32(0.0), np.int32(1)
    name = "gpudeconv_rl_ratio_float32"
    module.launch(name, (1,), (8,), (a, a, a, a, n, eps, sky, one))  # the right call runs
    with pytest.raises(TypeError, match="pass np.int"):
        module.launch(name, (1,), (8,), (a, a, a, a, 8, eps, sky, one))  # a Python int
    with pytest.raises(TypeError, match="argument 6 is a C float32: pass np.float32"):
        module.launch(name, (1,), (8,), (a, a, a, a, n, eps, 0.0, one))  # a Python float
    with pytest.raises(TypeError, match="float64 array"):
        module.launch(name, (1,), (8,), (a, a, a.astype(np.float64), a, n, eps, sky, one))
    with pytest.raises(ValueError, match="C-contiguous"):
        module.launch(name, (1,), (4,), (a[::2], a[::2], a[::2], a[::2], n, eps, sky, one))
    with pytest.raises(ValueError, match="partly"):
        module.launch(name, (1,), (4,), (a, a[:4], a[4:], a[2:6], n, eps, sky, one))
    with pytest.raises(TypeError, match="tuple"):
        module.launch(name, 1, (8,), (a, a, a, a, n, eps, sky, one))
    with pytest.raises(TypeError, match="takes 8 arguments"):
        module.launch(name, (1,), (8,), (a, a, a, a, n, eps, one))  # the background forgotten
    with pytest.raises(kh.KernelError, match="invalid launch configuration"):
        module.launch(name, (1,), (2048,), (a, a, a, a, n, eps, sky, one))
    update = "gpudeconv_rl_update_float32"
    bounds = (np.float32(0.0), np.float32(1.0))
    flags = (one, one, one)
    module.launch(update, (1,), (8,), (a, a, a, a, a, n, eps, *bounds, *flags, one))
    with pytest.raises(TypeError, match="takes 13 arguments"):
        module.launch(update, (1,), (8,), (a, a, a, a, a, n, eps, *bounds, *flags))  # has_change
    with pytest.raises(TypeError, match="argument 12 is a C int32: pass np.int32"):
        module.launch(update, (1,), (8,), (a, a, a, a, a, n, eps, *bounds, *flags, True))


def test_entry_point_discovery_ignores_comments():
    source = """
    // extern "C" __global__ void gpudeconv_commented_float32(float* x) {}
    extern "C" __global__ void __launch_bounds__(256) gpudeconv_a_float32(float* x) {}
    extern "C"
    __global__ void gpudeconv_b_float64(double* x) {}
    """
    assert kh.entry_points(source) == ["gpudeconv_a_float32", "gpudeconv_b_float64"]
