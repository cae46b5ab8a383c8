"""Backend selection: NumPy on the CPU or CuPy on a CUDA device, chosen at run time.

``get_backend(name)`` resolves, in order, the explicit ``name``, the environment variable
``GPUDECONV_BACKEND``, then ``"auto"``: CuPy if it imports *and* a CUDA device answers, else NumPy,
saying why once.
"""

from __future__ import annotations

import functools
import logging
import os

from .._errors import GpudeconvError
from ._base import (
    NORM_FLOOR,
    RATIO_EPS,
    TV_STABILITY,
    Backend,
    CostRates,
    MemoryInfo,
    is_cupy_array,
)
from ._kernels import sv_tile
from ._numpy import NumPyBackend

__all__ = [
    "Backend",
    "CostRates",
    "MemoryInfo",
    "NORM_FLOOR",
    "RATIO_EPS",
    "TV_STABILITY",
    "available_backends",
    "backend_for",
    "get_backend",
    "is_cupy_array",
    "requested_backend",
    "sv_tile",
]

BACKEND_NAMES = ("auto", "numpy", "cupy")
ENV_VAR = "GPUDECONV_BACKEND"

logger = logging.getLogger("gpudeconv")


@functools.lru_cache(maxsize=1)
def _cupy_status() -> tuple[bool, str]:
    """(usable, reason): whether CuPy imports and a device answers; computed once per process."""
    try:
        from . import _cupy
    except ImportError as error:
        return False, f"CuPy is not installed ({error}); install gpudeconv[cuda12] or [cuda13]"
    except Exception as error:  # a broken CUDA installation fails in odd ways
        return False, f"CuPy failed to import ({type(error).__name__}: {error})"
    return _cupy.device_answers()


@functools.cache
def _make(name: str) -> Backend:
    if name == "numpy":
        return NumPyBackend()
    from ._cupy import CuPyBackend

    return CuPyBackend()


def available_backends() -> list[str]:
    """Names of the backends usable here, CPU first: ``["numpy"]`` or ``["numpy", "cupy"]``."""
    names = ["numpy"]
    if _cupy_status()[0]:
        names.append("cupy")
    return names


_said_why = False


def _fall_back(reason: str) -> Backend:
    global _said_why
    if not _said_why:
        _said_why = True
        logger.info("gpudeconv: using the NumPy (CPU) backend: %s", reason)
    return _make("numpy")


def requested_backend(name: str | None = None) -> str:
    """The backend name asked for, lower case: ``name``, else ``GPUDECONV_BACKEND``, else
    ``'auto'`` (not checked: `get_backend` does that)."""
    if name is None:
        name = os.environ.get(ENV_VAR, "").strip() or "auto"
    return str(name).strip().lower()


def get_backend(name: str | Backend | None = None) -> Backend:
    """Return the backend called ``name``.

    Parameters
    ----------
    name : {'auto', 'numpy', 'cupy'}, Backend or None
        ``None`` reads ``GPUDECONV_BACKEND`` and defaults to ``'auto'``: CuPy when it imports and a
        CUDA device answers, else NumPy (the reason is logged once, at INFO level).

    Raises
    ------
    GpudeconvError
        For an unknown name, or ``'cupy'`` on a machine where CuPy cannot run.
    """
    if isinstance(name, Backend):
        return name
    source = ENV_VAR if name is None and ENV_VAR in os.environ else "backend"
    if name is None:
        name = os.environ.get(ENV_VAR, "").strip() or "auto"
    key = requested_backend(name)
    if key not in BACKEND_NAMES:
        msg = f"{source} must be one of {', '.join(BACKEND_NAMES)}, got {name!r}"
        raise GpudeconvError(msg)
    if key == "numpy":
        return _make("numpy")
    usable, reason = _cupy_status()
    if key == "cupy":
        if not usable:
            msg = f"the cupy backend was asked for but {reason}; use --backend numpy (or auto)"
            raise GpudeconvError(msg)
        return _make("cupy")
    return _make("cupy") if usable else _fall_back(reason)


def backend_for(array, backend: str | Backend | None = None) -> Backend:
    """The backend to run ``array`` on; a CuPy array always runs on (and stays on) the GPU.

    NumPy input may run on either backend and comes back as NumPy; CuPy input with the numpy
    backend is refused rather than copied behind the caller's back.
    """
    if is_cupy_array(array):
        chosen = get_backend("cupy" if backend is None else backend)
        if chosen.name != "cupy":
            msg = (
                f"a CuPy array was given with backend={chosen.name!r}; pass cupy.asnumpy(array) "
                "for a CPU run, or leave the backend as 'cupy'"
            )
            raise GpudeconvError(msg)
        return chosen
    return get_backend(backend)
