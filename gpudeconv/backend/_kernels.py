"""Where the CUDA sources are, and how their text is prepared for compilation.

The ``.cu`` files live in the repository's top-level ``kernels/`` folder and are installed as
``gpudeconv/kernels/`` (see ``setup.py``). This module does not import cupy: the CPU emulation
tests and the packaging test read the same sources through it.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["BLOCK", "MAX_BLOCKS", "index_type", "kernel_dir", "kernel_path", "kernel_source"]

_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def kernel_dir() -> Path:
    """The folder holding the ``.cu`` files: installed package data, else the source tree."""
    for candidate in (_PACKAGE_DIR / "kernels", _PACKAGE_DIR.parent / "kernels"):
        if candidate.is_dir() and any(candidate.glob("*.cu")):
            return candidate
    msg = (
        f"the CUDA kernel sources were not found next to {_PACKAGE_DIR}; "
        "reinstall gpudeconv with 'pip install .' from a complete checkout"
    )
    raise FileNotFoundError(msg)


def kernel_path(name: str) -> Path:
    """Path of ``kernels/<name>``, e.g. ``kernel_path("rl_steps.cu")``."""
    path = kernel_dir() / name
    if not path.is_file():
        msg = f"CUDA kernel source {name!r} is missing from {path.parent}"
        raise FileNotFoundError(msg)
    return path


#: Threads per block and the most blocks of an elementwise launch; grid-stride loops cover the
#: rest of the array.
BLOCK = 256
MAX_BLOCKS = 65535


def index_type(size: int) -> str:
    """The C index type for arrays of ``size`` elements (cuCIM's ``large_int`` rule).

    A grid-stride loop's index runs up to one grid past the end of the array before it stops,
    so ``int`` is used only while ``size`` plus a whole grid still fits in it.
    """
    return "long long" if size + BLOCK * MAX_BLOCKS > 2**31 - 1 else "int"


def kernel_source(name: str, **defines: str) -> str:
    """The text of ``kernels/<name>`` with ``#define KEY VALUE`` lines put in front."""
    header = "".join(f"#define {key} {value}\n" for key, value in sorted(defines.items()))
    return header + kernel_path(name).read_text()
