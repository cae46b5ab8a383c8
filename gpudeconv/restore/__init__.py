"""The restoration algorithms, written once for both backends: Richardson-Lucy and its
regularized, damped and accelerated forms (`richardson_lucy`), the Wiener filter (`wiener`),
the noise model of their data term (`estimate_noise`) and the luminance helpers (`colour`)."""

from .noise import NoiseModel, estimate_noise, saturation_level
from .rl import ChannelInfo, RestorationInfo, richardson_lucy
from .wiener import wiener

__all__ = [
    "ChannelInfo",
    "NoiseModel",
    "RestorationInfo",
    "estimate_noise",
    "richardson_lucy",
    "saturation_level",
    "wiener",
]
