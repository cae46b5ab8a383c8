"""gpudeconv: fast, trustworthy Richardson-Lucy deconvolution for astrophotography.

NumPy on the CPU or CuPy on NVIDIA GPUs, chosen at run time::

    import gpudeconv as gd
    restored = gd.richardson_lucy(image, gd.psf.moffat(fwhm=3.5), iterations=30)
"""

from . import operators, psf, quality
from ._errors import GpudeconvError, GpudeconvWarning
from ._version import __version__
from .api import deconvolve
from .backend import available_backends, get_backend
from .io import read_image, write_image
from .psf import PSFField, estimate_psf
from .restore import NoiseModel, estimate_noise, richardson_lucy, wiener

__all__ = [
    "GpudeconvError",
    "GpudeconvWarning",
    "NoiseModel",
    "PSFField",
    "__version__",
    "available_backends",
    "deconvolve",
    "estimate_noise",
    "estimate_psf",
    "get_backend",
    "operators",
    "psf",
    "quality",
    "read_image",
    "richardson_lucy",
    "wiener",
    "write_image",
]
