"""The deconvolution network: weights, the NumPy/CuPy forward pass, and its PyTorch twin.

The forward pass of `gpudeconv.learned.network` is checked against an independent reference
(float64, `scipy.signal.correlate` per channel pair, pooling and upsampling by reshape and
Kronecker product), against PyTorch on the same weights where torch is installed (it is no
test dependency), and on the CuPy backend through tests/fake_cupy.py.
"""

from __future__ import annotations

import sys
from collections import OrderedDict

import fake_cupy
import numpy as np
import pytest
import scipy.signal

import gpudeconv as gd
from gpudeconv import GpudeconvError
from gpudeconv.backend import is_cupy_array
from gpudeconv.learned import network
from gpudeconv.learned.network import FORMAT_VERSION, RECEPTIVE_FIELD, Weights, forward

TINY = {"widths": [2, 3]}


def network_inputs(shape, seed=0) -> np.ndarray:
    """Inputs of realistic ranges, ``(N, 4, H, W)`` float32: a normalized star field (noise of
    standard deviation 0.2, a sky gradient, stars of peak 0.5 to 40) and smooth PSF maps
    (FWHM / 4 from 0.6 to 1.6, e1 and e2 within +-0.2)."""
    n, _, height, width = shape
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width].astype(np.float64)
    inputs = np.empty(shape, np.float32)
    for index in range(n):
        image = rng.normal(0.0, 0.2, (height, width)) + 0.3 * x / width
        for _ in range(max(3, height * width // 200)):
            cy, cx = rng.uniform(-5, height + 5), rng.uniform(-5, width + 5)
            peak, sigma = np.exp(rng.uniform(np.log(0.5), np.log(40))), rng.uniform(0.8, 3.0)
            image += peak * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma**2))
        inputs[index, 0] = image
        inputs[index, 1] = 0.6 + (y + x) / (height + width)
        inputs[index, 2] = 0.2 * np.cos(x / width * 3 + index)
        inputs[index, 3] = 0.2 * np.sin(y / height * 2 - index)
    return inputs


def random_weights(config=None, seed=1, scale=0.15) -> Weights:
    rng = np.random.default_rng(seed)
    arrays = OrderedDict(
        (name, rng.normal(0.0, scale, shape).astype(np.float32))
        for name, shape in network.layer_shapes(config).items()
    )
    return Weights(arrays, config)


# ------------------------------------------------------------------- an independent reference
def reference_forward(image: np.ndarray, weights: Weights) -> np.ndarray:
    """The network on one ``(4, H, W)`` input in float64, written from the architecture's
    description with ``scipy.signal.correlate`` (zero-padded 'same' cross-correlation)."""
    w = {name: array.astype(np.float64) for name, array in weights.arrays.items()}
    height, width = image.shape[-2:]
    x = np.pad(image.astype(np.float64), ((0, 0), (0, -height % 4), (0, -width % 4)), "reflect")

    def conv(x, name):
        kernel, bias = w[f"{name}.weight"], w[f"{name}.bias"]
        out = np.empty((kernel.shape[0], *x.shape[1:]))
        for o in range(kernel.shape[0]):
            out[o] = bias[o] + sum(
                scipy.signal.correlate(x[i], kernel[o, i], mode="same") for i in range(x.shape[0])
            )
        return out

    def block(x, name):
        return np.maximum(conv(np.maximum(conv(x, f"{name}a"), 0), f"{name}b"), 0)

    def pool(x):
        c, h, wd = x.shape
        return x.reshape(c, h // 2, 2, wd // 2, 2).mean(axis=(2, 4))

    def up(x):
        return np.kron(x, np.ones((1, 2, 2)))

    p1 = block(x, "pattern1")
    p2 = block(pool(p1), "pattern2")
    f = block(pool(p2), "fill_")
    r2 = block(np.concatenate([up(f), p2]), "rebuild2")
    r1 = block(np.concatenate([up(r2), p1]), "rebuild1")
    out = x[:1] + conv(r1, "out")
    return out[:, :height, :width]


# -------------------------------------------------------------------------- architecture
def test_the_architecture_is_compact():
    weights = Weights.zeros()
    assert weights.parameter_count == network.parameter_count() == 161_977
    assert sum(array.nbytes for array in weights.arrays.values()) <= 2 * 2**20
    assert list(weights.arrays)[:2] == ["pattern1a.weight", "pattern1a.bias"]
    assert weights.arrays["pattern1a.weight"].shape == (24, 4, 3, 3)
    assert weights.arrays["rebuild1a.weight"].shape == (24, 72, 3, 3)
    assert weights.arrays["out.weight"].shape == (1, 24, 1, 1)
    assert all(array.dtype == np.float32 for array in weights.arrays.values())


# ----------------------------------------------------------------- NumPy forward, no torch
@pytest.mark.parametrize("shape", [(2, 4, 32, 40), (1, 4, 21, 27), (1, 4, 4, 5)])
def test_forward_equals_the_correlate_reference(shape):
    inputs = network_inputs(shape, seed=3)
    weights = random_weights(TINY, scale=0.4)
    output = forward(inputs, weights, backend="numpy")
    assert output.shape == (shape[0], 1, *shape[2:]) and output.dtype == np.float32
    for index in range(shape[0]):
        expected = reference_forward(inputs[index], weights)
        assert np.abs(expected - inputs[index, :1]).max() > 0.5  # the network does something
        np.testing.assert_allclose(output[index], expected, rtol=1e-5, atol=2e-5)


def test_one_image_in_one_image_out():
    inputs = network_inputs((1, 4, 24, 28), seed=4)
    weights = random_weights(TINY)
    single = forward(inputs[0], weights, backend="numpy")
    assert single.shape == (1, 24, 28)
    np.testing.assert_array_equal(single, forward(inputs, weights, backend="numpy")[0])


def test_each_image_of_a_batch_is_its_own():
    inputs = network_inputs((3, 4, 20, 24), seed=5)
    weights = random_weights(TINY)
    batch = forward(inputs, weights, backend="numpy")
    alone = forward(inputs[1:2], weights, backend="numpy")
    np.testing.assert_array_equal(batch[1:2], alone)


@pytest.mark.parametrize("shape", [(2, 4, 64, 64), (1, 4, 45, 70)])
def test_zero_weights_return_the_image_exactly(shape):
    inputs = network_inputs(shape, seed=6)
    output = forward(inputs, Weights.zeros(), backend="numpy")
    np.testing.assert_array_equal(output, inputs[:, :1])


def test_the_output_bias_adds_to_the_image():
    weights = Weights.zeros(TINY)
    weights.arrays["out.bias"][0] = 0.5
    inputs = network_inputs((1, 4, 17, 13), seed=7)
    np.testing.assert_array_equal(forward(inputs, weights, backend="numpy"), inputs[:, :1] + 0.5)


def test_float64_and_lists_are_computed_in_float32():
    inputs = network_inputs((1, 4, 16, 16), seed=8)
    weights = random_weights(TINY)
    output = forward(inputs.astype(np.float64), weights, backend="numpy")
    assert output.dtype == np.float32
    np.testing.assert_array_equal(output, forward(inputs, weights, backend="numpy"))
    assert forward(inputs[0].tolist(), weights, backend="numpy").dtype == np.float32


def test_the_receptive_field_is_as_documented():
    """A change of one input pixel moves outputs up to 20..23 pixels away, and no further."""
    weights = random_weights(scale=0.05)
    weights.arrays.update((name, np.abs(a)) for name, a in list(weights.arrays.items()))
    base = np.zeros((4, 64, 64), np.float32)
    reaches = set()
    for offset in range(4):
        bumped = base.copy()
        bumped[1, 32 + offset, 32 + offset] = 1.0
        change = forward(bumped, weights, backend="numpy") - forward(base, weights, backend="numpy")
        rows = np.flatnonzero(np.abs(change[0]).max(axis=1) > 0)
        reaches.add((32 + offset - rows.min(), rows.max() - 32 - offset))
    assert {above + below + 1 for above, below in reaches} == {RECEPTIVE_FIELD}
    assert min(min(r) for r in reaches) == 20 and max(max(r) for r in reaches) == 23


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((4, 16), "must be \\(N, 4, H, W\\)"),
        ((1, 3, 16, 16), "must be \\(N, 4, H, W\\)"),
        ((1, 4, 3, 16), "at least 4 x 4"),
    ],
)
def test_forward_refuses_bad_shapes(shape, match):
    with pytest.raises(GpudeconvError, match=match):
        forward(np.zeros(shape, np.float32), Weights.zeros(TINY), backend="numpy")


def test_forward_refuses_nan():
    inputs = network_inputs((1, 4, 16, 16))
    inputs[0, 0, 3, 3] = np.nan
    with pytest.raises(GpudeconvError, match="NaN or infinite"):
        forward(inputs, Weights.zeros(TINY), backend="numpy")


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"widths": [24]}, "two positive integers"),
        ({"widths": [0, 4]}, "two positive integers"),
        ({"widths": [2.5, 4]}, "two positive integers"),
        ([24, 48], "must be a dict"),
    ],
)
def test_bad_configs_are_refused(config, match):
    with pytest.raises(GpudeconvError, match=match):
        Weights.zeros(config)


def test_weights_must_match_their_config():
    arrays = Weights.zeros().arrays
    with pytest.raises(GpudeconvError, match="missing \\['out.weight'\\]"):
        Weights(OrderedDict((k, v) for k, v in arrays.items() if k != "out.weight"))
    with pytest.raises(
        GpudeconvError,
        match="pattern2a.weight must have the shape \\(32, 24, 3, 3\\), got \\(48, 24, 3, 3\\)",
    ):
        Weights(arrays, {"widths": [24, 32]})


# ------------------------------------------------------------------------------ weight files
def test_save_and_load_round_trip(tmp_path):
    weights = random_weights(TINY)
    weights.config["noise_units"] = 5.0
    path = tmp_path / "net.weights"  # written under exactly this name, no ".npz" added
    weights.save(path)
    loaded = Weights.load(path)
    assert loaded.config == {"widths": [2, 3], "noise_units": 5.0}
    assert list(loaded.arrays) == list(weights.arrays)
    for name, array in weights.arrays.items():
        np.testing.assert_array_equal(loaded.arrays[name], array)
        assert loaded.arrays[name].dtype == np.float32


def _write(path, arrays, version=FORMAT_VERSION, config='{"widths": [2, 3]}'):
    extra = {}
    if version is not None:
        extra["__format_version__"] = np.array(version)
    if config is not None:
        extra["__config__"] = np.array(config)
    with open(path, "wb") as file:
        np.savez(file, **arrays, **extra)


def test_load_refuses_what_it_cannot_use(tmp_path):
    arrays = dict(Weights.zeros(TINY).arrays)
    cases = [
        ({"version": 2}, "format version 2; this gpudeconv reads version 1"),
        ({"version": None}, "not a gpudeconv weight file"),
        ({"config": "{widths"}, "unreadable network config"),
        ({"config": '{"widths": [2, 4]}'}, "pattern2a.weight must have the shape \\(4, 2, 3, 3\\)"),
    ]
    for index, (options, match) in enumerate(cases):
        path = tmp_path / f"case{index}.npz"
        _write(path, arrays, **options)
        with pytest.raises(GpudeconvError, match=match) as caught:
            Weights.load(path)
        assert "\n" not in str(caught.value)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(GpudeconvError, match="cannot read network weights from"):
        Weights.load(garbage)
    with pytest.raises(GpudeconvError, match="cannot read network weights from"):
        Weights.load(tmp_path / "missing.npz")


# ---------------------------------------------------------------------------- CuPy (emulated)
@pytest.fixture
def fake(monkeypatch, tmp_path):
    return fake_cupy.install(monkeypatch, cache_dir=tmp_path)


def test_the_cupy_forward_equals_the_numpy_forward(fake):
    cp = fake.cupy
    inputs = network_inputs((2, 4, 21, 26), seed=9)
    weights = random_weights(TINY)
    expected = forward(inputs, weights, backend="numpy")
    on_device = forward(cp.asarray(inputs), weights)
    assert is_cupy_array(on_device) and on_device.dtype == np.float32
    np.testing.assert_allclose(on_device.get(), expected, rtol=1e-6, atol=1e-6)
    from_host = forward(inputs, weights, backend="cupy")
    assert type(from_host) is np.ndarray
    np.testing.assert_allclose(from_host, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(GpudeconvError, match="CuPy array was given with backend='numpy'"):
        forward(cp.asarray(inputs), weights, backend="numpy")
    assert gd.get_backend("cupy").name == "cupy"


# ------------------------------------------------------------------------------ PyTorch twin
def _torch_or_skip():
    """torch, or a skip: PyTorch is the training extra, not a test dependency."""
    return pytest.importorskip(
        "torch",
        reason='PyTorch is not importable (pip install "gpudeconv[train]"): no torch twin',
        exc_type=ImportError,  # a broken install skips too
    )


@pytest.mark.parametrize("shape", [(2, 4, 64, 64), (1, 4, 45, 70)])
def test_the_numpy_forward_equals_torch(shape):
    torch = _torch_or_skip()
    from gpudeconv.learned.torch_model import build_model, to_weights

    torch.manual_seed(0)
    module = build_model()
    # He's initialization keeps activations at the inputs' scale through the depth (torch's
    # default shrinks them), and the output layer, built at zero, gets values too.
    for layer in module.children():
        torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        torch.nn.init.normal_(layer.bias, 0.0, 0.05)
    weights = to_weights(module)
    inputs = network_inputs(shape, seed=10)
    with torch.no_grad():
        expected = module(torch.from_numpy(inputs)).numpy()
    output = forward(inputs, weights, backend="numpy")
    assert np.abs(expected - inputs[:, :1]).max() > 1.0  # not the identity
    print(f"max |numpy - torch| = {np.abs(output - expected).max():.2e}")
    assert np.abs(output - expected).max() <= 1e-4


def test_torch_weights_round_trip_and_start_as_identity(tmp_path):
    torch = _torch_or_skip()
    from gpudeconv.learned.torch_model import build_model, from_weights, to_weights

    module = build_model({"widths": [8, 16], "note": "kept"})
    inputs = network_inputs((1, 4, 20, 24), seed=11)
    with torch.no_grad():
        np.testing.assert_array_equal(module(torch.from_numpy(inputs)).numpy(), inputs[:, :1])
    weights = random_weights({"widths": [8, 16]})
    weights.save(tmp_path / "w.npz")
    rebuilt = from_weights(Weights.load(tmp_path / "w.npz"))
    again = to_weights(rebuilt)
    assert again.config == {"widths": [8, 16]}
    for name, array in weights.arrays.items():
        np.testing.assert_array_equal(again.arrays[name], array)
    assert to_weights(module).config == {"widths": [8, 16], "note": "kept"}


def test_a_missing_torch_is_one_line(monkeypatch):
    from gpudeconv.learned import torch_model

    monkeypatch.setitem(sys.modules, "torch", None)  # import torch then raises ImportError
    with pytest.raises(GpudeconvError, match='pip install "gpudeconv\\[train\\]"'):
        torch_model._torch()
