"""Run the CUDA kernels of ``kernels/*.cu`` on the CPU, for tests on machines without a GPU.

How it works
------------
1. **Build.** The ``.cu`` text (for ``kernels/`` files exactly what the CuPy loader compiles:
   :func:`gpudeconv.backend._kernels.kernel_source` with its ``#define`` lines in front) is written
   next to a generated ``main.cpp`` that ``#include``-s it and lists every
   ``extern "C" __global__ void NAME(...)`` entry point found in it. g++ compiles that with
   ``-std=c++20 -O1 -pthread -include cuda_emulation.h`` (the header beside this file emulates
   ``threadIdx``, ``__syncthreads``, ``__shared__``, atomics, shuffles ...; its opening comment
   states the execution model and the rules), so the ``.cu`` itself is never edited. By default
   the build also has AddressSanitizer and two UndefinedBehaviorSanitizer checks: a read past the
   end of an array (or of a ``__shared__`` tile), a signed index overflow or a bad shift fails
   the launch. ``sanitize="thread"`` builds with ThreadSanitizer instead, which reports the
   races on shared memory that a missing ``__syncthreads`` leaves (the emulated barrier is made
   so that it orders threads exactly as a barrier does, and no more).
   The result is **one executable per (source, defines, flags)**, cached in a directory keyed by
   the SHA-256 of everything that goes into it (source, header, generated main, flags, compiler
   version), so a rebuild happens only when something changed; concurrent builders are safe (the
   build is renamed into place). The parameter types of each entry point are asked of the
   compiler (``exe --describe``, from C++ templates), not parsed from the text: ``IDX`` and any
   other macro or typedef is resolved exactly as the compiler sees it.
2. **Launch.** :meth:`KernelModule.launch` takes CuPy's ``RawKernel`` arguments: ``grid`` and
   ``block`` tuples and an argument tuple of NumPy arrays (device pointers) and NumPy scalars. It
   is *stricter* than CuPy: arrays must be C-contiguous with the dtype of the pointer, scalars
   must be NumPy scalars of the parameter's exact C type (``np.int32`` for ``int``, ``np.int64``
   for ``long long``, ``np.float32`` for ``float``; a Python ``int`` is refused because CuPy
   would pass it as ``long long``). Arrays are written to files in a temporary directory; the
   executable reads them into exact-size heap buffers, runs the grid (blocks one after another,
   the threads of a block as ``std::thread`` s), and writes the non-const arrays back, which are
   then copied into the caller's arrays in place, as the kernel would have done on the device.
   Arguments that are the same array stay one buffer (``ratio`` aliasing ``blurred``); partial
   overlaps are refused.
3. **Deadline.** Every launch is a child process run by ``subprocess.run(..., timeout=...)``:
   a kernel that hangs (a spin loop, a deadlock) raises :class:`KernelTimeout` after ``timeout``
   seconds instead of stalling the test session, and a crash (segfault, sanitizer report, a
   divergent ``__syncthreads`` that the header detects) raises :class:`KernelError` with the
   child's stderr, instead of taking pytest down. This was chosen over an in-process ``ctypes``
   call (no way to stop a hung thread, and a crash kills the interpreter) and over a forked
   child (forking a threaded interpreter is unsafe). A build takes about 2 s, a launch of a
   small grid 10 to 50 ms.

Adding a kernel
---------------
A new ``kernels/<concern>.cu`` needs nothing here: ``build_kernel("<concern>.cu", IDX="int",
...)`` finds its entry points. Its parameters must be pointers and arithmetic scalars; shared
memory must be static-size ``__shared__`` arrays (no ``extern __shared__``); it must not rely on
``__shared__`` memory being zero. Compare against the NumPy twin as
``tests/test_kernels_emulated.py`` does for ``rl_steps.cu``.

Environment: ``CXX`` (compiler, default ``g++``), ``GPUDECONV_EMU_CACHE`` (a persistent cache
directory; the tests otherwise use a per-session temporary one).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "BuildError",
    "KernelError",
    "KernelModule",
    "KernelTimeout",
    "Parameter",
    "build_kernel",
    "build_source",
    "compiler",
    "entry_points",
    "kernels_module",
]

HEADER = Path(__file__).resolve().with_name("cuda_emulation.h")
REPO = Path(__file__).resolve().parent.parent
DEFAULT_TIMEOUT = 30.0
BUILD_TIMEOUT = 300.0

_BASE_FLAGS = ("-std=c++20", "-O1", "-g1", "-pthread", "-fno-omit-frame-pointer")
_SANITIZE_FLAGS = {
    None: (),
    "address": (
        # Two UBSan checks only: the whole of -fsanitize=undefined triples the build time.
        "-fsanitize=address,signed-integer-overflow,shift",
        "-fno-sanitize-recover=all",
    ),
    "thread": ("-fsanitize=thread",),
}
_CHILD_ENV = {
    "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:exitcode=71",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1:exitcode=73",
    "TSAN_OPTIONS": "halt_on_error=1:exitcode=72:report_signal_unsafe=0",
}

_ENTRY = re.compile(
    r'extern\s+"C"\s+__global__\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?void\s+'
    r"(?:__launch_bounds__\s*\([^)]*\)\s*)?([A-Za-z_]\w*)\s*\("
)
_COMMENTS = re.compile(r"//[^\n]*|/\*.*?\*/", re.DOTALL)

_SCALAR_DTYPES = {
    "f4": np.dtype(np.float32),
    "f8": np.dtype(np.float64),
    "i1": np.dtype(np.int8),
    "i2": np.dtype(np.int16),
    "i4": np.dtype(np.int32),
    "i8": np.dtype(np.int64),
    "u1": np.dtype(np.uint8),
    "u2": np.dtype(np.uint16),
    "u4": np.dtype(np.uint32),
    "u8": np.dtype(np.uint64),
    "b1": np.dtype(np.bool_),
}


class BuildError(RuntimeError):
    """g++ could not compile the kernel source with the emulation header."""


class KernelError(RuntimeError):
    """An emulated launch failed: a crash, a sanitizer report or a divergent barrier."""


class KernelTimeout(KernelError):
    """An emulated launch did not finish before its deadline (a hang)."""


# ---------------------------------------------------------------------------- discovery
def compiler() -> str | None:
    """The C++ compiler (``$CXX`` or ``g++``) if it is on PATH, else None."""
    return shutil.which(os.environ.get("CXX", "g++"))


def entry_points(source: str) -> list[str]:
    """Names of the ``extern "C" __global__`` kernels of a CUDA source, comments ignored."""
    return _ENTRY.findall(_COMMENTS.sub(" ", source))


@functools.lru_cache(maxsize=1)
def kernels_module():
    """``gpudeconv.backend._kernels`` (imported by path if the package does not import)."""
    try:
        from gpudeconv.backend import _kernels
    except ImportError:
        path = REPO / "gpudeconv" / "backend" / "_kernels.py"
        spec = importlib.util.spec_from_file_location("_gpudeconv_kernels_by_path", path)
        _kernels = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_kernels)
    return _kernels


# ---------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class Parameter:
    """One kernel parameter as the compiler sees it, from its code (e.g. ``*cf4``, ``i8``)."""

    code: str

    @property
    def pointer(self) -> bool:
        return self.code.startswith("*")

    @property
    def const(self) -> bool:
        return self.code.startswith("*c")

    @property
    def dtype(self) -> np.dtype | None:
        """The element dtype (None for ``void*`` and structs: any array is accepted)."""
        return _SCALAR_DTYPES.get(self.code.lstrip("*c"))

    def describe(self) -> str:
        if not self.pointer:
            return str(self.dtype)
        element = str(self.dtype) if self.dtype is not None else "void"
        return f"{'const ' if self.const else ''}{element}*"


def _scalar_argument(parameter: Parameter, value, where: str) -> str:
    dtype = parameter.dtype
    if dtype is None:
        raise TypeError(f"{where}: parameter type {parameter.code} is not supported")
    if not isinstance(value, np.generic) or value.dtype != dtype:
        kind = type(value).__name__
        got = f"{kind} ({value.dtype})" if isinstance(value, np.generic) else kind
        raise TypeError(
            f"{where} is a C {parameter.describe()}: pass np.{dtype.name}(...), got {got} "
            "(CuPy passes a Python int as long long and a float as double)"
        )
    if dtype.kind == "f":
        return float(value).hex()
    if dtype.kind == "b":
        return str(int(bool(value)))
    return str(int(value))


def _dim3(value, what: str) -> tuple[int, int, int]:
    if not isinstance(value, tuple) or not 1 <= len(value) <= 3:
        raise TypeError(f"{what} must be a tuple of 1 to 3 ints, as CuPy requires, got {value!r}")
    dims = tuple(int(v) for v in value) + (1,) * (3 - len(value))
    if any(d <= 0 for d in dims):
        raise ValueError(f"{what} dimensions must be positive, got {value!r}")
    return dims


# ---------------------------------------------------------------------------- the module
class KernelModule:
    """The entry points of one built source; :meth:`launch` runs one of them."""

    def __init__(
        self, executable: Path, signatures: dict[str, tuple[Parameter, ...]], source_name: str
    ) -> None:
        self.executable = executable
        self.signatures = signatures
        self.source_name = source_name
        self.last_output = ""  # stdout and stderr of the last launch (a kernel's printf)

    @property
    def names(self) -> list[str]:
        return list(self.signatures)

    def __repr__(self) -> str:
        return f"KernelModule({self.source_name!r}, {self.names})"

    def launch(
        self,
        name: str,
        grid: tuple,
        block: tuple,
        args: Sequence,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        """Run ``name<<<grid, block>>>(*args)``; non-const arrays are updated in place."""
        if name not in self.signatures:
            raise KeyError(f"{self.source_name} has no entry point {name!r}: {self.names}")
        parameters = self.signatures[name]
        if len(args) != len(parameters):
            raise TypeError(f"{name} takes {len(parameters)} arguments, got {len(args)}")
        dims = _dim3(grid, "grid") + _dim3(block, "block")
        with tempfile.TemporaryDirectory(prefix="gpudeconv-emu-") as work:
            argv, outputs = self._arguments(name, parameters, args, Path(work))
            command = [str(self.executable), name, *map(str, dims), *argv]
            try:
                result = subprocess.run(
                    command,
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                    env={**os.environ, **_CHILD_ENV},
                    check=False,
                )
            except subprocess.TimeoutExpired as error:
                stderr = error.stderr or ""
                if isinstance(stderr, bytes):
                    stderr = stderr.decode(errors="replace")
                raise KernelTimeout(
                    f"{name}<<<{dims[:3]}, {dims[3:]}>>> ({self.source_name}) did not finish "
                    f"within {timeout:g} s: a hang (spin loop or deadlock) {_tail(stderr)}"
                ) from None
            self.last_output = result.stdout + result.stderr
            if result.returncode != 0:
                raise KernelError(
                    f"{name}<<<{dims[:3]}, {dims[3:]}>>> ({self.source_name}) failed with "
                    f"{_status(result.returncode)}:\n{_excerpt(result.stderr)}"
                )
            for array, path in outputs:
                array[...] = np.fromfile(path, dtype=array.dtype).reshape(array.shape)

    def _arguments(self, name, parameters, args, work: Path):
        argv: list[str] = []
        files: list[tuple[np.ndarray, Path]] = []
        outputs: dict[int, tuple[np.ndarray, Path]] = {}
        for index, (parameter, value) in enumerate(zip(parameters, args, strict=True)):
            where = f"{name} argument {index}"
            if not parameter.pointer:
                argv.append(_scalar_argument(parameter, value, where))
                continue
            if value is None:
                argv.append("null")
                continue
            if not isinstance(value, np.ndarray):
                raise TypeError(f"{where} is a {parameter.describe()}: pass a NumPy array")
            if not value.flags.c_contiguous:
                raise ValueError(f"{where}: arrays must be C-contiguous (kernels ignore strides)")
            if parameter.dtype is not None and value.dtype != parameter.dtype:
                raise TypeError(f"{where} is a {parameter.describe()}, got a {value.dtype} array")
            path = None
            for other, other_path in files:
                if _same_memory(value, other):
                    path = other_path
                elif np.shares_memory(value, other):
                    raise ValueError(f"{where} overlaps another argument only partly")
            if path is None:
                path = work / f"arg{index}.bin"
                value.tofile(path)
                files.append((value, path))
            if not parameter.const and value.flags.writeable:
                outputs.setdefault(id(value), (value, path))
            elif not parameter.const:
                raise ValueError(f"{where} is a {parameter.describe()} but the array is read-only")
            argv.append(f"@{path}")
        return argv, list(outputs.values())


def _same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    return (
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and a.nbytes == b.nbytes
    )


def _status(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    meaning = {
        70: "an emulation error",
        71: "an AddressSanitizer report",
        72: "a ThreadSanitizer report",
        73: "an UndefinedBehaviorSanitizer report",
    }.get(returncode, "an error")
    return f"exit status {returncode} ({meaning})"


def _excerpt(text: str, head: int = 4000, tail: int = 1500) -> str:
    """The start (a sanitizer's diagnosis and first frames) and the end of a long report."""
    text = text.strip()
    if len(text) <= head + tail:
        return text
    return f"{text[:head]}\n...\n{text[-tail:]}"


def _tail(text: str, limit: int = 2000) -> str:
    text = text.strip()
    return text if len(text) <= limit else "...\n" + text[-limit:]


# ---------------------------------------------------------------------------- building
_MAIN = """\
// Generated by tests/kernel_harness.py: the entry points of {name} for the emulation runner.
#include "{name}"

static const gpudeconv_emu::Entry gpudeconv_emu_entries[] = {{
{entries}
}};

int main(int argc, char** argv) {{
    return gpudeconv_emu::run_main(gpudeconv_emu_entries, argc, argv);
}}
"""

_BUILT: dict[str, KernelModule] = {}


@functools.lru_cache(maxsize=4)
def _compiler_version(cxx: str) -> str:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout


def default_cache_dir() -> Path:
    configured = os.environ.get("GPUDECONV_EMU_CACHE")
    if configured:
        return Path(configured)
    user = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"gpudeconv-emu-{user}"


def build_source(
    source: str,
    *,
    name: str = "kernel.cu",
    cache_dir: str | Path | None = None,
    sanitize: str | None = "address",
    flags: Sequence[str] = (),
) -> KernelModule:
    """Compile CUDA ``source`` (text) for the CPU; cached by content hash."""
    cxx = compiler()
    if cxx is None:
        raise BuildError("no C++ compiler: set CXX or install g++")
    if sanitize not in _SANITIZE_FLAGS:
        raise ValueError(f"sanitize must be one of {list(_SANITIZE_FLAGS)}, got {sanitize!r}")
    names = entry_points(source)
    if not names:
        raise BuildError(f'{name} has no extern "C" __global__ entry point')
    if not re.fullmatch(r"[\w.-]+", name):
        raise ValueError(f"source name {name!r} must be a plain file name")
    main = _MAIN.format(
        name=name, entries="\n".join(f"    GPUDECONV_EMU_ENTRY({n})," for n in names)
    )
    command = [
        cxx,
        *_BASE_FLAGS,
        *_SANITIZE_FLAGS[sanitize],
        *flags,
        "-include",
        str(HEADER),
        "main.cpp",
        "-o",
        "kernel",
    ]
    digest = hashlib.sha256()
    for part in (
        source,
        name,
        HEADER.read_text(),
        main,
        "\0".join(command),
        _compiler_version(cxx),
    ):
        digest.update(part.encode())
        digest.update(b"\0")
    key = digest.hexdigest()[:24]
    if key in _BUILT:
        return _BUILT[key]

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / key
    if not (target / "signatures.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=root))
        try:
            (staging / name).write_text(source)
            (staging / "main.cpp").write_text(main)
            result = subprocess.run(
                command,
                cwd=staging,
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT,
                check=False,
            )
            if result.returncode != 0:
                raise BuildError(
                    f"g++ could not build {name} for the emulation:\n"
                    f"{' '.join(command)}\n{_tail(result.stderr, 8000)}"
                )
            described = subprocess.run(
                [str(staging / "kernel"), "--describe"],
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, **_CHILD_ENV},
                check=False,
            )
            if described.returncode != 0:
                raise BuildError(f"{name}: the built runner failed:\n{described.stderr}")
            signatures = {}
            for line in described.stdout.splitlines():
                entry, _, codes = line.partition("\t")
                signatures[entry] = codes.split()
            (staging / "signatures.json").write_text(json.dumps(signatures, indent=1))
            try:
                staging.rename(target)
            except OSError:  # another process built it first
                if not (target / "signatures.json").is_file():
                    raise
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    signatures = json.loads((target / "signatures.json").read_text())
    module = KernelModule(
        target / "kernel",
        {entry: tuple(Parameter(code) for code in codes) for entry, codes in signatures.items()},
        name,
    )
    _BUILT[key] = module
    return module


def build_kernel(
    filename: str,
    *,
    cache_dir: str | Path | None = None,
    sanitize: str | None = "address",
    flags: Sequence[str] = (),
    **defines: str,
) -> KernelModule:
    """Build ``kernels/<filename>`` with ``#define KEY VALUE`` lines in front, like the loader.

    A ``#line`` directive after the defines makes compiler errors and sanitizer reports point
    at the file in ``kernels/`` and its own line numbers."""
    kernels = kernels_module()
    source = kernels.kernel_source(filename, **defines)
    lines = source.splitlines(keepends=True)
    path = kernels.kernel_path(filename)
    lines.insert(len(defines), f'#line 1 "{path}"\n')
    return build_source(
        "".join(lines), name=filename, cache_dir=cache_dir, sanitize=sanitize, flags=flags
    )


if __name__ == "__main__":  # pragma: no cover - a quick manual check
    module = build_kernel(sys.argv[1] if len(sys.argv) > 1 else "rl_steps.cu", IDX="int")
    for entry, parameters in module.signatures.items():
        print(entry, ", ".join(p.describe() for p in parameters))
