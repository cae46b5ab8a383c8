"""The network of `gpudeconv.learned.network` as a PyTorch module, for training.

PyTorch is an optional dependency (``pip install "gpudeconv[train]"``), imported only when a
function here is called. The module computes the same function as
`gpudeconv.learned.network.forward` (the architecture is described there), and its
``state_dict`` has the names and shapes of `network.layer_shapes`: `to_weights` and
`from_weights` convert between the two without renaming.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

from .._errors import GpudeconvError
from .network import MULTIPLE, Weights, _validate_config, layer_shapes

__all__ = ["build_model", "from_weights", "to_weights"]


def _torch():
    try:
        import torch
    except ImportError as error:
        msg = f'training the network needs PyTorch ({error}): pip install "gpudeconv[train]"'
        raise GpudeconvError(msg) from None
    return torch


@functools.cache
def _model_class():
    """The ``torch.nn.Module`` subclass, defined on first use so that importing this module
    does not import torch."""
    torch = _torch()
    nn, functional = torch.nn, torch.nn.functional

    class DeconvolutionUNet(nn.Module):
        """The U-Net of `gpudeconv.learned.network`: (N, 4, H, W) in, any H, W >= 4."""

        def __init__(self, config):
            super().__init__()
            self.config = _validate_config(config)
            for key, shape in layer_shapes(self.config).items():
                name, kind = key.split(".")
                if kind == "weight":
                    c_out, c_in, k, _ = shape
                    self.add_module(name, nn.Conv2d(c_in, c_out, k, padding=k // 2))
            # The correction starts at zero: the untrained network returns its input.
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

        def _block(self, name, x):
            x = functional.relu(getattr(self, f"{name}a")(x))
            return functional.relu(getattr(self, f"{name}b")(x))

        def forward(self, inputs):
            height, width = inputs.shape[-2:]
            pad = (-height % MULTIPLE, -width % MULTIPLE)
            x = inputs
            if any(pad):
                x = functional.pad(x, (0, pad[1], 0, pad[0]), mode="reflect")
            p1 = self._block("pattern1", x)
            p2 = self._block("pattern2", functional.avg_pool2d(p1, 2))
            f = self._block("fill_", functional.avg_pool2d(p2, 2))
            up = functional.interpolate(f, scale_factor=2, mode="nearest")
            r2 = self._block("rebuild2", torch.cat([up, p2], dim=1))
            up = functional.interpolate(r2, scale_factor=2, mode="nearest")
            r1 = self._block("rebuild1", torch.cat([up, p1], dim=1))
            output = x[:, :1] + self.out(r1)
            return output[:, :, :height, :width]

    return DeconvolutionUNet


def build_model(config=None):
    """A new network as a ``torch.nn.Module``, its output layer at zero (identity at start).

    Parameters
    ----------
    config : dict or None
        The architecture's settings (``{"widths": [w1, w2]}``) and any JSON-able metadata,
        kept as ``module.config``; None for `network.DEFAULT_CONFIG`.

    Returns
    -------
    module : torch.nn.Module
        Takes ``(N, 4, H, W)`` float32 tensors, returns ``(N, 1, H, W)``.

    Raises
    ------
    GpudeconvError
        If PyTorch is not installed, or for a bad config.
    """
    return _model_class()(config)


def to_weights(module) -> Weights:
    """The parameters of a module from `build_model` as `Weights` (float32 NumPy arrays)."""
    state = module.state_dict()
    arrays = OrderedDict(
        (name, state[name].detach().to("cpu", dtype=_torch().float32).numpy().copy())
        for name in layer_shapes(module.config)
        if name in state
    )
    return Weights(arrays, module.config)


def from_weights(weights: Weights):
    """A module from `build_model` holding ``weights`` (on the CPU, float32)."""
    torch = _torch()
    module = build_model(weights.config)
    state = OrderedDict(
        (name, torch.from_numpy(array.copy())) for name, array in weights.arrays.items()
    )
    module.load_state_dict(state)
    return module
