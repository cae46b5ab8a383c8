"""Static checks of ``kernels/*.cu``: nvcc compiles each one, entry point names, opening comment.

The nvcc checks compile the file as it is (the ``#ifndef IDX`` default) and with
``-DIDX="long long"`` for sm_80 and sm_90, warnings as errors; they skip where nvcc is not on
PATH (CuPy compiles these sources with NVRTC at run time, which needs no nvcc).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import kernel_harness as kh
import pytest

SOURCES = sorted(kh.kernels_module().kernel_dir().glob("*.cu"))
NVCC = shutil.which("nvcc")
DTYPES = r"float16|float32|float64|complex64|complex128|u?int(?:8|16|32|64)|bool"
ENTRY_NAME = re.compile(rf"gpudeconv_[a-z][a-z0-9]*(?:_[a-z0-9]+)*_(?:{DTYPES})")
# The element type an entry point's parameter list must not mention, by dtype suffix.
FOREIGN_TYPE = {"float32": r"\bdouble\b", "float64": r"\bfloat\b"}


def by_name(path) -> str:
    return path.name


def uncommented(path) -> str:
    return re.sub(r"//[^\n]*|/\*.*?\*/", " ", path.read_text(), flags=re.DOTALL)


def test_kernel_sources_exist():
    assert "rl_steps.cu" in [path.name for path in SOURCES]


@pytest.mark.parametrize("source", SOURCES, ids=by_name)
def test_entry_points_are_named_gpudeconv_op_dtype(source):
    names = kh.entry_points(source.read_text())
    assert names, f'{source.name} has no extern "C" __global__ entry point'
    assert len(names) == len(set(names)), f"{source.name} defines an entry point twice"
    wrong = [name for name in names if not ENTRY_NAME.fullmatch(name)]
    assert not wrong, f"{source.name}: entry points must be gpudeconv_<op>_<dtype>: {wrong}"
    # A __global__ without extern "C" gets a mangled name that CuPy cannot look up by name.
    kernels = len(re.findall(r"\b__global__\b", uncommented(source)))
    assert kernels == len(names), f'{source.name}: every __global__ must be extern "C"'


@pytest.mark.parametrize("source", SOURCES, ids=by_name)
def test_entry_point_parameters_match_their_dtype(source):
    text = uncommented(source)
    for name in kh.entry_points(text):
        dtype = name.rsplit("_", 1)[1]
        if dtype not in FOREIGN_TYPE:
            continue
        parameters = re.search(rf"\b{name}\s*\(([^)]*)\)", text).group(1)
        assert not re.search(FOREIGN_TYPE[dtype], parameters), (
            f"{source.name}: {name} takes a parameter of another precision: {parameters}"
        )


@pytest.mark.parametrize("source", SOURCES, ids=by_name)
def test_source_opens_with_the_maths(source):
    lines = source.read_text().splitlines()
    if lines and lines[0].lstrip().startswith("/*"):
        block = source.read_text().split("*/", 1)[0].splitlines()
    else:
        block = []
        for line in lines:
            if not line.lstrip().startswith("//"):
                break
            block.append(line)
    assert len(block) >= 3, f"{source.name} must open with a comment block stating its maths"
    assert re.search(r"=|←|<-", "\n".join(block)), (
        f"{source.name}: the opening comment should state the formula it computes"
    )


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("index", [None, "long long"], ids=["idx-default", "idx-long-long"])
@pytest.mark.parametrize("source", SOURCES, ids=by_name)
def test_nvcc_compiles(source, arch, index):
    command = [NVCC, f"-arch={arch}", "-Werror", "all-warnings", "-c", "-o", os.devnull]
    if index is not None:
        command.append(f"-DIDX={index}")
    result = subprocess.run(
        [*command, str(source)], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, f"{' '.join(command)} {source.name}:\n{result.stderr}"


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("size", [3, 31])
def test_nvcc_compiles_the_sv_kernel_for_every_psf_size(size):
    """The PSF side is compiled in: the smallest and the largest (the static shared-memory
    tile of 31 is 38 KB in float64, under the 48 KB limit), with at most a word of register
    spill (ptxas spills 8 bytes of the float32 forward at k = 31 on sm_90: an address)."""
    source = kh.kernels_module().kernel_path("sv_convolve.cu")
    command = [NVCC, "-arch=sm_90", "-Werror", "all-warnings", "-Xptxas", "-v", f"-DKSIZE={size}"]
    result = subprocess.run(
        [*command, "-c", "-o", os.devnull, str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", result.stderr)]
    assert len(spills) == 4 and max(spills) <= 8, result.stderr


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
def test_the_sv_kernel_refuses_psf_sizes_it_cannot_hold():
    source = kh.kernels_module().kernel_path("sv_convolve.cu")
    for size in (33, 8):
        result = subprocess.run(
            [NVCC, "-arch=sm_90", f"-DKSIZE={size}", "-c", "-o", os.devnull, str(source)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode != 0 and "KSIZE must be odd and at most 31" in result.stderr
