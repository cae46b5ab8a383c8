"""PSF models and checks (estimation from stars and spatially varying fields build on these)."""

from ._validate import validate_psf
from .models import gaussian, moffat

__all__ = ["gaussian", "moffat", "validate_psf"]
