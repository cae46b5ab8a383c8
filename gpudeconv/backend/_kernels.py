"""Where the CUDA sources are, and how their text is prepared for compilation.

The ``.cu`` files live in the repository's top-level ``kernels/`` folder and are installed as
``gpudeconv/kernels/`` (see ``setup.py``). This module does not import cupy: the CPU emulation
tests and the packaging test read the same sources through it.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "BLOCK",
    "MAX_BLOCKS",
    "SV_BLOCK",
    "SV_MAX_SIZE",
    "index_type",
    "kernel_dir",
    "kernel_path",
    "kernel_source",
    "sv_launch",
    "sv_tile",
]

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


#: ``kernels/sv_convolve.cu``: threads of a block (x, y), the largest PSF side it compiles for,
#: and the rows each thread computes per dtype (itemsize 4 or 8); kept equal to the .cu's.
SV_BLOCK = (32, 8)
SV_MAX_SIZE = 31
_SV_ROWS = {4: 8, 8: 4}
#: CUDA's limit on gridDim.y
_MAX_GRID_Y = 65535


def sv_tile(itemsize: int) -> tuple[int, int]:
    """Rows and columns of the output tile of one block of ``kernels/sv_convolve.cu``."""
    return SV_BLOCK[1] * _SV_ROWS[itemsize], SV_BLOCK[0]


def sv_launch(shape, itemsize: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Grid and block of ``kernels/sv_convolve.cu`` for a 2-D array of ``shape``.

    One block computes an output tile of 32 columns by ``8 * rows`` rows.
    """
    height, width = shape
    tile_height, tile_width = sv_tile(itemsize)
    grid = (-(-width // tile_width), -(-height // tile_height))
    if grid[1] > _MAX_GRID_Y:
        msg = (
            f"an array of {height} rows is too tall for one spatially-varying kernel launch "
            f"(at most {_MAX_GRID_Y * tile_height}); restore it in tiles"
        )
        raise ValueError(msg)
    return grid, SV_BLOCK


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
