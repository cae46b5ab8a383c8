"""The deconvolution network: its weights and its forward pass on gpudeconv's own backends.

The network is a small two-level U-Net. Its input is an image patch and the local PSF
(`gpudeconv.learned.data.psf_maps`), four channels of linear data normalized as
``(data - sky) / (5 sigma)`` (`gpudeconv.learned.data.normalize`); it predicts a correction that
is added to the image channel, so that an untrained (all-zero) network returns its input and the
network only has to learn the difference between the blurred and the sharp sky.

Architecture (``widths = (w1, w2)``, default ``(24, 48)``; every 3x3 convolution has zero
('same') padding and is followed by a ReLU)::

    input (4, H, W): image, FWHM / 4, e1, e2
    pattern1   conv3x3 4 -> w1, conv3x3 w1 -> w1                     (H, W)        -> p1
    pattern2   avgpool 2x2, conv3x3 w1 -> w2, conv3x3 w2 -> w2       (H/2, W/2)    -> p2
    fill       avgpool 2x2, conv3x3 w2 -> w2, conv3x3 w2 -> w2       (H/4, W/4)    -> f
    rebuild2   nearest x2 of f, concatenated with p2 (upsampled channels first),
               conv3x3 2 w2 -> w2, conv3x3 w2 -> w2                  (H/2, W/2)    -> r2
    rebuild1   nearest x2 of r2, concatenated with p1,
               conv3x3 w2 + w1 -> w1, conv3x3 w1 -> w1               (H, W)        -> r1
    out        conv1x1 w1 -> 1, no ReLU; output = input image channel + out(r1)

The three roles: ``pattern`` layers recognize local structure (stars, edges, noise) at full and
half resolution, ``fill`` sees the widest context (a quarter-resolution view that spans the
wings of the PSF), and ``rebuild`` brings that context back to full resolution, with the skip
connections supplying the detail the pooling lost.

- Parameters: 161,977 with the default widths (648 KB as float32), see `parameter_count`.
- Receptive field: 44 x 44 pixels (`RECEPTIVE_FIELD`): 1 + 4 (two 3x3 at full resolution) + 1
  (pooling) + 8 (two at half) + 2 (pooling) + 16 (two at quarter) + 8 (two at half) + 4 (two at
  full) = 44, checked in the tests by changing one input pixel. An output pixel sees 20 to 23
  pixels on each side, depending on its place in the 4 x 4 pooling cell (20 + 1 + 23 = 44).
  That covers the support of a 7-pixel-FWHM PSF (about 25 pixels across, +-12 pixels) with
  room for the wings and the neighbours' PSFs.
- Sides: the pooling needs sides that are multiples of 4. `forward` pads the bottom and right
  edges by reflection up to the next multiple of 4 and crops the result back, so any side of at
  least 4 pixels is accepted. The pooling cells are aligned to the array's pixel (0, 0): the
  network commutes with shifts by multiples of 4 only, so tiles of one image must start at
  multiples of 4 to be restored exactly alike (and need a halo of at least 23 pixels).

The forward pass here is written once with the backend's ``xp`` (NumPy on the CPU, CuPy on the
GPU) and computes the same function as `gpudeconv.learned.torch_model` (PyTorch, for training)
on the same `Weights`, so that inference needs no PyTorch. A 3x3 convolution is nine matrix
products of the ``(C_out, C_in)`` tap matrices with shifted views of the zero-padded input laid
out flat, torch's cross-correlation exactly.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._errors import GpudeconvError
from ..backend import Backend, backend_for

__all__ = [
    "DEFAULT_CONFIG",
    "FORMAT_VERSION",
    "IN_CHANNELS",
    "MULTIPLE",
    "RECEPTIVE_FIELD",
    "Weights",
    "forward",
    "layer_shapes",
    "parameter_count",
]

#: Input channels: the normalized image, then FWHM / 4, e1, e2 of the local PSF.
IN_CHANNELS = 4
#: Image sides the layers work on are multiples of this (two 2x2 poolings).
MULTIPLE = 4
#: Side of the square of input pixels that one output pixel depends on (default architecture;
#: it does not depend on the widths).
RECEPTIVE_FIELD = 44
#: Version of the ``.npz`` weight files written by `Weights.save`.
FORMAT_VERSION = 1
#: The architecture's settings: channels of the full- and half-resolution levels.
DEFAULT_CONFIG: dict[str, Any] = {"widths": [24, 48]}

_FORMAT_KEY = "__format_version__"
_CONFIG_KEY = "__config__"


def _validate_config(config) -> dict[str, Any]:
    """A copy of ``config`` (a JSON-able dict) with ``widths`` as a list of two positive ints."""
    if config is None:
        config = DEFAULT_CONFIG
    if not isinstance(config, dict):
        msg = f"config must be a dict such as {DEFAULT_CONFIG}, got {type(config).__name__}"
        raise GpudeconvError(msg)
    config = json.loads(json.dumps(config))  # a deep copy; refuses what a weight file can't hold
    widths = config.get("widths", DEFAULT_CONFIG["widths"])
    if (
        not isinstance(widths, list)
        or len(widths) != 2
        or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths)
    ):
        msg = f"config['widths'] must be two positive integers, e.g. [24, 48], got {widths!r}"
        raise GpudeconvError(msg)
    config["widths"] = widths
    return config


def layer_shapes(config=None) -> OrderedDict[str, tuple[int, ...]]:
    """The shape of every parameter, named and ordered as in the PyTorch module's ``state_dict``.

    Parameters
    ----------
    config : dict or None
        The architecture's settings (``{"widths": [w1, w2]}``); None for `DEFAULT_CONFIG`.

    Returns
    -------
    shapes : OrderedDict of str to tuple of int
        ``"<layer>.weight"``: ``(C_out, C_in, k, k)``, ``"<layer>.bias"``: ``(C_out,)``.
    """
    w1, w2 = _validate_config(config)["widths"]
    layers = [
        ("pattern1a", IN_CHANNELS, w1, 3),
        ("pattern1b", w1, w1, 3),
        ("pattern2a", w1, w2, 3),
        ("pattern2b", w2, w2, 3),
        ("fill_a", w2, w2, 3),
        ("fill_b", w2, w2, 3),
        ("rebuild2a", 2 * w2, w2, 3),
        ("rebuild2b", w2, w2, 3),
        ("rebuild1a", w2 + w1, w1, 3),
        ("rebuild1b", w1, w1, 3),
        ("out", w1, 1, 1),
    ]
    shapes: OrderedDict[str, tuple[int, ...]] = OrderedDict()
    for name, c_in, c_out, k in layers:
        shapes[f"{name}.weight"] = (c_out, c_in, k, k)
        shapes[f"{name}.bias"] = (c_out,)
    return shapes


@dataclass
class Weights:
    """The parameters of the network, as float32 NumPy arrays.

    Attributes
    ----------
    arrays : OrderedDict of str to ndarray of float32
        Named and ordered as the PyTorch module's ``state_dict`` (`layer_shapes`).
    config : dict
        The architecture's settings (``widths``) and any JSON-able metadata a trainer adds
        (normalization, data settings, provenance); saved with the weights.
    """

    arrays: OrderedDict[str, np.ndarray]
    config: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_CONFIG))

    def __post_init__(self) -> None:
        self.config = _validate_config(self.config)
        self.arrays = _validate_arrays(self.arrays, self.config, source="Weights")

    @classmethod
    def zeros(cls, config=None) -> Weights:
        """All-zero weights: the network that returns its input image unchanged."""
        shapes = layer_shapes(config)
        arrays = OrderedDict((name, np.zeros(shape, np.float32)) for name, shape in shapes.items())
        return cls(arrays, _validate_config(config))

    @property
    def parameter_count(self) -> int:
        """Number of scalar parameters (161,977 with the default widths)."""
        return parameter_count(self.config)

    def save(self, path: str | os.PathLike) -> None:
        """Write the weights to ``path`` (an ``.npz`` file, written under exactly that name),
        with the format version and the config."""
        extra = {
            _FORMAT_KEY: np.array(FORMAT_VERSION, np.int64),
            _CONFIG_KEY: np.array(json.dumps(self.config)),
        }
        with open(path, "wb") as file:
            np.savez(file, **self.arrays, **extra)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Weights:
        """Read weights written by `save`.

        Raises
        ------
        GpudeconvError
            If the file cannot be read as weights, was written in another format version, or
            holds arrays whose names or shapes are not those of its architecture.
        """
        try:
            with np.load(path, allow_pickle=False) as archive:
                contents = {name: archive[name] for name in archive.files}
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            msg = f"cannot read network weights from {os.fspath(path)!r}: {error}"
            raise GpudeconvError(msg) from None
        version = contents.pop(_FORMAT_KEY, None)
        config_text = contents.pop(_CONFIG_KEY, None)
        if version is None or config_text is None:
            msg = (
                f"{os.fspath(path)!r} is not a gpudeconv weight file (no format version or config)"
            )
            raise GpudeconvError(msg)
        if int(version) != FORMAT_VERSION:
            msg = (
                f"{os.fspath(path)!r} has weight format version {int(version)}; this gpudeconv "
                f"reads version {FORMAT_VERSION}: use the gpudeconv release that wrote it"
            )
            raise GpudeconvError(msg)
        try:
            config = _validate_config(json.loads(str(config_text)))
        except ValueError as error:  # JSONDecodeError, GpudeconvError
            msg = f"{os.fspath(path)!r} has an unreadable network config: {error}"
            raise GpudeconvError(msg) from None
        return cls(_validate_arrays(contents, config, source=os.fspath(path)), config)


def _validate_arrays(arrays, config, *, source: str) -> OrderedDict[str, np.ndarray]:
    """``arrays`` as float32 host arrays in `layer_shapes` order; names and shapes must match."""
    shapes = layer_shapes(config)
    names = set(arrays)
    missing, unexpected = [n for n in shapes if n not in names], sorted(names - set(shapes))
    if missing or unexpected:
        msg = (
            f"{source}: the arrays do not match the network of widths {config['widths']}: "
            f"missing {missing}, unexpected {unexpected}"
        )
        raise GpudeconvError(msg)
    ordered: OrderedDict[str, np.ndarray] = OrderedDict()
    for name, shape in shapes.items():
        array = np.asarray(arrays[name])
        if array.shape != shape:
            msg = f"{source}: {name} must have the shape {shape}, got {array.shape}"
            raise GpudeconvError(msg)
        if not np.issubdtype(array.dtype, np.floating):
            msg = f"{source}: {name} must hold floating-point numbers, got dtype {array.dtype}"
            raise GpudeconvError(msg)
        ordered[name] = np.ascontiguousarray(array, dtype=np.float32)
    return ordered


def _validate_inputs(inputs, xp):
    if inputs.ndim not in (3, 4) or inputs.shape[-3] != IN_CHANNELS:
        msg = (
            f"inputs must be (N, {IN_CHANNELS}, H, W) or ({IN_CHANNELS}, H, W): the normalized "
            f"image then FWHM/4, e1, e2; got shape {inputs.shape}"
        )
        raise GpudeconvError(msg)
    if min(inputs.shape[-2:]) < MULTIPLE:
        msg = f"inputs must be at least {MULTIPLE} x {MULTIPLE} pixels, got {inputs.shape[-2:]}"
        raise GpudeconvError(msg)
    if not bool(xp.isfinite(inputs).all()):
        msg = "inputs have NaN or infinite values; fill no-data pixels before the network"
        raise GpudeconvError(msg)


def forward(inputs, weights: Weights, *, backend: str | Backend | None = None):
    """The network's output for a batch of inputs.

    Parameters
    ----------
    inputs : (N, 4, H, W) or (4, H, W) ndarray
        The normalized image, then the three PSF maps (FWHM / 4, e1, e2), each side at least 4
        pixels; finite. NumPy or CuPy; computed in float32.
    weights : Weights
    backend : {'auto', 'numpy', 'cupy'}, Backend or None
        Where to compute; CuPy input always runs (and stays) on the GPU, NumPy input comes back
        as NumPy whichever backend ran it (`gpudeconv.backend.backend_for`).

    Returns
    -------
    output : (N, 1, H, W) or (1, H, W) ndarray of float32
        The restored image, on the inputs' scale: the image channel plus the network's
        correction.

    Notes
    -----
    Sides that are not multiples of 4 are padded at the bottom and right by reflection, and the
    output is cropped back. Images are processed one at a time, so the working memory is that
    of one image, whatever N: about 700 bytes per pixel at the default widths, at its peak in
    the first convolution of ``rebuild1`` (691 MiB measured for a 1024 x 1024 image).
    """
    chosen = backend_for(inputs, backend)
    xp = chosen.xp
    batch = chosen.asarray(inputs, dtype=np.float32)
    _validate_inputs(batch, xp)
    single = batch.ndim == 3
    if single:
        batch = batch[None]
    params = {name: chosen.asarray(array) for name, array in weights.arrays.items()}
    taps = {
        name[: -len(".weight")]: _tap_matrices(array, xp)
        for name, array in params.items()
        if name.endswith(".weight")
    }
    biases = {
        name[: -len(".bias")]: array for name, array in params.items() if name.endswith(".bias")
    }
    n, _, height, width = batch.shape
    output = xp.empty((n, 1, height, width), dtype=np.float32)
    for index in range(n):
        output[index] = _forward_one(batch[index], taps, biases, xp)
    if single:
        output = output[0]
    if not chosen.is_own_array(inputs) and chosen.name != "numpy":
        return chosen.to_host(output)
    return output


def _tap_matrices(weight, xp):
    """``(C_out, C_in, k, k)`` weights as ``k * k`` contiguous ``(C_out, C_in)`` matrices,
    tap ``dy * k + dx`` first."""
    c_out, c_in, k, _ = weight.shape
    return xp.ascontiguousarray(weight.transpose(2, 3, 0, 1).reshape(k * k, c_out, c_in))


def _forward_one(image, taps, biases, xp):
    """One ``(4, H, W)`` input to its ``(1, H, W)`` output."""
    height, width = image.shape[-2:]
    pad = (-height % MULTIPLE, -width % MULTIPLE)
    if any(pad):
        image = xp.pad(image, ((0, 0), (0, pad[0]), (0, pad[1])), mode="reflect")

    def block(name, parts):
        first = _conv3x3(parts, taps[f"{name}a"], biases[f"{name}a"], xp)
        return _conv3x3([(first, 1)], taps[f"{name}b"], biases[f"{name}b"], xp)

    p1 = block("pattern1", [(image, 1)])
    p2 = block("pattern2", [(_avg_pool(p1), 1)])
    f = block("fill_", [(_avg_pool(p2), 1)])
    r2 = block("rebuild2", [(f, 2), (p2, 1)])
    r1 = block("rebuild1", [(r2, 2), (p1, 1)])
    correction = xp.tensordot(taps["out"][0], r1, axes=1) + biases["out"][:, None, None]
    correction += image[:1]
    return correction[:, :height, :width]


def _conv3x3(parts, taps, bias, xp):
    """ReLU of the 3x3 cross-correlation, zero-padded ('same'), of the channels of ``parts``
    stacked in order, plus ``bias``: torch's ``relu(conv2d(cat(parts), w, b, padding=1))``.

    ``parts`` is a list of ``(array, factor)``: a ``(C, H / factor, W / factor)`` array enters
    upsampled by ``factor`` (1 or 2, nearest neighbour: each pixel a 2x2 block), written
    straight into the padded input without an upsampled copy.

    The input is laid out zero-padded in rows of ``W + 2`` pixels and flattened, so that each
    tap ``(dy, dx)`` reads a contiguous window starting ``dy (W + 2) + dx`` further along: nine
    ``(C_out, C_in) @ (C_in, H (W + 2))`` products without copies of shifted images. Output
    columns ``W`` and ``W + 1`` of each row mix the wrap-around and are cropped (one spare row
    at the bottom keeps the last windows inside the buffer).
    """
    part, factor = parts[0]
    height, width = part.shape[-2] * factor, part.shape[-1] * factor
    row = width + 2
    length = height * row
    channels = sum(part.shape[0] for part, _ in parts)
    padded = xp.zeros((channels, height + 3, row), dtype=np.float32)
    start = 0
    for part, factor in parts:
        stop = start + part.shape[0]
        for dy in range(factor):
            for dx in range(factor):
                padded[start:stop, 1 + dy : height + 1 : factor, 1 + dx : width + 1 : factor] = part
        start = stop
    flat = padded.reshape(channels, (height + 3) * row)
    out = xp.matmul(taps[0], flat[:, :length])
    product = xp.empty_like(out)
    for tap in range(1, 9):
        offset = (tap // 3) * row + tap % 3
        xp.matmul(taps[tap], flat[:, offset : offset + length], out=product)
        out += product
    out += bias[:, None]
    xp.maximum(out, 0, out=out)
    return out.reshape(-1, height, row)[:, :, :width]


def _avg_pool(x):
    """2x2 average pooling (stride 2) of ``(C, H, W)``, H and W even, summed as torch sums."""
    return (x[:, 0::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 0::2] + x[:, 1::2, 1::2]) * 0.25


def parameter_count(config=None) -> int:
    """Number of scalar parameters of the network of ``config`` (161,977 by default)."""
    return sum(math.prod(shape) for shape in layer_shapes(config).values())
