"""PSF models, checks and spatially varying PSF fields (estimation from stars builds on these)."""

from ._validate import validate_psf
from .field import PSFField, aberrated_field
from .models import gaussian, moffat

__all__ = ["PSFField", "aberrated_field", "gaussian", "moffat", "validate_psf"]
