"""PSF models, checks, spatially varying PSF fields, and their estimation from an image's stars."""

from ._validate import validate_psf
from .estimate import REJECTION_REASONS, PSFEstimate, estimate_psf, fit_psf
from .field import PSFField, aberrated_field
from .limb import LimbEstimate, limb_fwhm
from .models import gaussian, moffat

__all__ = [
    "REJECTION_REASONS",
    "LimbEstimate",
    "PSFEstimate",
    "PSFField",
    "aberrated_field",
    "estimate_psf",
    "fit_psf",
    "gaussian",
    "limb_fwhm",
    "moffat",
    "validate_psf",
]
