"""The one user-error type and the one warning type of gpudeconv (STYLE.md, "Errors")."""

__all__ = ["GpudeconvError", "GpudeconvWarning"]


class GpudeconvError(ValueError):
    """A user error: bad input, option or file. The CLI prints it as one line and exits with 2."""


class GpudeconvWarning(UserWarning):
    """A legal but suspicious value (many iterations, a PSF far from sum 1, negative data)."""
