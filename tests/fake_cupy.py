"""A stand-in for ``cupy`` and ``cupyx`` that runs ``gpudeconv.backend._cupy`` on the CPU, in tests.

The CuPy backend's own code runs unchanged; what it imports is this fake, and its raw kernels are
the unchanged ``kernels/*.cu`` built by ``tests/kernel_harness.py`` (g++, the CUDA emulation header,
AddressSanitizer) from the very ``code=`` text that the backend hands to ``cupy.RawModule``. So the
mistakes that on a GPU give silent garbage or a crash show here as exceptions: a grid or block that
is not a tuple, a Python ``int`` or ``float`` where the kernel takes an ``int`` or ``float`` (CuPy
passes them as ``long long`` and ``double``, which shifts every later argument), an array of the
wrong dtype, a non-contiguous array, a NumPy array where a device array belongs, a read past the
end of an array.

What is emulated, with CuPy 14's semantics (``/work/shared/reference/cupy-notes.md``)
-------------------------------------------------------------------------------------
* ``cupy.ndarray``: a ``numpy.ndarray`` subclass whose class says ``__module__ == 'cupy'`` and that
  has ``__cuda_array_interface__`` (so ``gpudeconv.backend.is_cupy_array`` recognises it);
  ``.get()`` returns a plain NumPy copy. Like CuPy it refuses to be mixed with NumPy arrays in
  ufuncs and array functions (``TypeError``), and reductions and scalar indexing return 0-d
  arrays, not NumPy scalars. ``numpy.asarray(device_array)`` cannot be refused by a subclass (real
  CuPy raises ``TypeError``): the fake does not catch an implicit device-to-host conversion.
* ``cupy.<anything else>`` is NumPy's function of that name, with the host-array check above and
  its array results made device arrays (``xp.pad``, ``xp.where``, ``xp.zeros``, ``xp.roll`` ...).
  ``cupy.asarray`` / ``cupy.array`` copy host data to the "device"; ``cupy.ascontiguousarray``
  takes device arrays only and returns its argument itself when no copy is needed.
* ``cupy.fft``: NumPy's transforms with CuPy's dtypes (float32 -> complex64 -> float32).
* ``cupy.RawModule`` / ``cupy.RawKernel``: lazy; ``name_expressions`` must name entry points of
  the source; ``kernel(grid, block, args, shared_mem=0, stream=None)`` maps ``args`` as CuPy's
  ``_pointer`` does (device array -> pointer, NumPy scalar by its dtype, Python ``int`` ->
  ``np.int64``, ``float`` -> ``np.float64``, ``complex`` -> ``np.complex128``, ``None`` -> NULL, a
  NumPy array of size one by value, any other NumPy array refused) and launches the entry point
  through the harness, which checks each argument against the compiled parameter types and
  writes the kernel's outputs back into the same device arrays.
* ``cupy.memoize``, ``cupy.cuda`` (``runtime``, ``Device``, streams, events timed by the host
  clock, errors),
  ``cupy.get_default_memory_pool``, ``cupyx.scipy.fft.next_fast_len`` (cuFFT's 2-3-5-7 lengths),
  ``cupyx.scipy.ndimage`` filters (SciPy's, honouring ``output=``).

Use :func:`install` from a fixture; every change it makes goes through ``monkeypatch`` and is
undone after the test: the fake modules leave ``sys.modules``, ``gpudeconv.backend._cupy``
(imported afresh under the fake) is forgotten, and ``gpudeconv.backend``'s cached backend
status and instances are the session's own again.
"""

from __future__ import annotations

import functools
import importlib
import math
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import kernel_harness as kh
import numpy as np
import scipy.ndimage

__all__ = ["FakeCuPy", "Launch", "install", "ndarray"]

VERSION = "14.2.0"
MODULE_NAMES = (
    "cupy",
    "cupy.cuda",
    "cupy.cuda.runtime",
    "cupy.cuda.driver",
    "cupy.cuda.memory",
    "cupy.cuda.compiler",
    "cupy.fft",
    "cupyx",
    "cupyx.scipy",
    "cupyx.scipy.fft",
    "cupyx.scipy.ndimage",
)

# CUDA runtime status codes (cudaError_t) used by the fake.
NO_DEVICE = 100
INSUFFICIENT_DRIVER = 35
INVALID_DEVICE = 101
INVALID_RESOURCE_HANDLE = 400
_STATUS_NAMES = {
    NO_DEVICE: ("cudaErrorNoDevice", "no CUDA-capable device is detected"),
    INSUFFICIENT_DRIVER: (
        "cudaErrorInsufficientDriver",
        "CUDA driver version is insufficient for CUDA runtime version",
    ),
    INVALID_DEVICE: ("cudaErrorInvalidDevice", "invalid device ordinal"),
    INVALID_RESOURCE_HANDLE: ("cudaErrorInvalidResourceHandle", "invalid resource handle"),
}

#: The scalar types that CuPy passes to a kernel by their own size (cupy/cuda/function.pyx).
_KERNEL_SCALAR_TYPES = {np.dtype(code).type for code in "?bhilqBHILQefdFD"}


# ---------------------------------------------------------------------------- the device array
class ndarray(np.ndarray):
    """``cupy.ndarray``: "device" memory that is host memory, with CuPy's refusals."""

    __module__ = "cupy"

    @property
    def __cuda_array_interface__(self) -> dict:
        return {
            "shape": self.shape,
            "typestr": self.dtype.str,
            "descr": self.dtype.descr,
            "data": (self.__array_interface__["data"][0], False),
            "strides": None if self.flags.c_contiguous else self.strides,
            "version": 3,
            "stream": 1,
        }

    def get(self, stream=None, order="C", out=None, blocking=True) -> np.ndarray:
        """A NumPy copy of the data (device to host)."""
        host = np.array(self.view(np.ndarray), order=order, copy=True)
        if out is None:
            return host
        if not isinstance(out, np.ndarray) or isinstance(out, ndarray):
            raise TypeError(f"out must be a numpy.ndarray, got {type(out)}")
        if out.shape != self.shape or out.dtype != self.dtype:
            raise ValueError(
                f"out has shape {out.shape} and dtype {out.dtype}, the array "
                f"{self.shape} and {self.dtype}"
            )
        out[...] = host
        return out

    def set(self, arr, stream=None) -> None:
        """Copy the host array ``arr`` (same shape and dtype) into this array."""
        if not isinstance(arr, np.ndarray) or isinstance(arr, ndarray):
            raise TypeError(f"Only numpy.ndarray can be set to cupy.ndarray, got {type(arr)}")
        if arr.shape != self.shape or arr.dtype != self.dtype:
            raise ValueError(
                f"Shape or dtype mismatch: {arr.shape} {arr.dtype} into {self.shape} {self.dtype}"
            )
        if not self.flags.c_contiguous:
            raise RuntimeError("Cannot set to non-contiguous array")
        self.view(np.ndarray)[...] = arr

    def __getitem__(self, key):
        return _as_device(super().__getitem__(key))  # a 0-d array for one element, as CuPy

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        _refuse_host_arrays(f"cupy.{ufunc.__name__}", (*inputs, *(out or ())), kwargs)
        inputs = tuple(_host_view(x) for x in inputs)
        kwargs = {key: _host_view(value) for key, value in kwargs.items()}
        if out is not None:
            kwargs["out"] = tuple(_host_view(x) for x in out)
        result = getattr(ufunc, method)(*inputs, **kwargs)
        if out is None:
            return _as_device(result)
        if len(out) == 1:
            return out[0] if out[0] is not None else _as_device(result)
        return tuple(
            mine if mine is not None else _as_device(made)
            for mine, made in zip(out, result, strict=True)
        )

    def __array_function__(self, func, types, args, kwargs):
        foreign = [t for t in types if not issubclass(t, ndarray)]
        if foreign:
            raise TypeError(
                f"numpy.{func.__name__} was given a {foreign[0].__module__}."
                f"{foreign[0].__name__} beside a cupy.ndarray: {_HOST_ARRAY_ADVICE}"
            )
        return _as_device(super().__array_function__(func, types, args, kwargs))


_HOST_ARRAY_ADVICE = (
    "CuPy refuses NumPy arrays here (TypeError: Unsupported type <class 'numpy.ndarray'>); "
    "move the data with cupy.asarray first, or keep it on the host"
)


def _is_host_array(value) -> bool:
    return isinstance(value, np.ndarray) and not isinstance(value, ndarray)


def _refuse_host_arrays(where: str, args, kwargs) -> None:
    values = list(args) + list(kwargs.values())
    for value in list(values):
        if isinstance(value, (list, tuple)):
            values.extend(value)
    for value in values:
        if _is_host_array(value):
            raise TypeError(f"{where} got a numpy.ndarray {value.shape}: {_HOST_ARRAY_ADVICE}")


def _host_view(value):
    """The same memory as a plain NumPy array (for NumPy and SciPy to work on)."""
    return value.view(np.ndarray) if isinstance(value, ndarray) else value


def _as_device(value):
    """Array results as device arrays; NumPy scalars as 0-d device arrays, as CuPy returns."""
    if isinstance(value, ndarray):
        return value
    if isinstance(value, np.ndarray):
        return value.view(ndarray)
    if isinstance(value, np.generic):
        return np.asarray(value).view(ndarray)
    if type(value) in (tuple, list):
        return type(value)(_as_device(v) for v in value)
    return value


class _DeviceFunction:
    """A NumPy (or SciPy) function seen from CuPy: no host arrays in, device arrays out."""

    def __init__(self, name: str, function) -> None:
        self._name = name
        self._function = function
        functools.update_wrapper(self, function, updated=())

    def __call__(self, *args, **kwargs):
        _refuse_host_arrays(self._name, args, kwargs)
        args = tuple(_host_view(a) for a in args)
        kwargs = {key: _host_view(value) for key, value in kwargs.items()}
        return _as_device(self._function(*args, **kwargs))

    def __getattr__(self, attribute):
        value = getattr(self._function, attribute)
        if callable(value) and not isinstance(value, type):
            return _DeviceFunction(f"{self._name}.{attribute}", value)
        return value

    def __repr__(self) -> str:
        return f"<fake {self._name}>"


class _NumPyFallback(types.ModuleType):
    """A module whose missing attributes are those of a NumPy-side module, seen from CuPy."""

    def __init__(self, name: str, fallback, doc: str = "") -> None:
        super().__init__(name, doc)
        self._fallback = fallback

    def __getattr__(self, name):
        if name.startswith("__") or self._fallback is None:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        try:
            value = getattr(self._fallback, name)
        except AttributeError:
            raise AttributeError(
                f"module {self.__name__!r} (the fake) has no attribute {name!r}"
            ) from None
        if isinstance(value, types.ModuleType):
            msg = f"the fake {self.__name__} does not emulate the submodule {name!r}"
            raise AttributeError(msg)
        if callable(value) and not isinstance(value, type):
            value = _DeviceFunction(f"{self.__name__}.{name}", value)
        setattr(self, name, value)
        return value


# ---------------------------------------------------------------------------- what happened
@dataclass(frozen=True)
class Launch:
    """One kernel launch as the backend made it (after CuPy's argument mapping)."""

    name: str
    grid: tuple
    block: tuple
    argument_types: tuple[str, ...]


@dataclass
class FakeCuPy:
    """One installation of the fake: its modules, its settings and a record of what ran.

    Change the settings to play a machine without a usable GPU: ``device_count = 0``, or
    ``runtime_error = NO_DEVICE`` / ``INSUFFICIENT_DRIVER`` (every runtime call then raises
    ``CUDARuntimeError`` with that status).
    """

    cache_dir: Path | str | None = None
    sanitize: str | None = "address"
    timeout: float = kh.DEFAULT_TIMEOUT
    device_count: int = 1
    runtime_error: int | None = None
    device_name: bytes = b"Fake CUDA Device (CPU emulation)"
    compute_capability: str = "90"
    cuda_version: int = 13000
    total_memory: int = 80 * 2**30
    free_memory: int = 79 * 2**30
    pool_used: int = 0
    pool_total: int = 0
    current_device: int = 0
    #: every kernel launch that ran, in order
    launches: list[Launch] = field(default_factory=list)
    #: every ``RawModule`` made (a memoized loader makes one per device and key)
    raw_modules: list = field(default_factory=list)
    modules: dict[str, types.ModuleType] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.modules = _make_modules(self)

    @property
    def cupy(self) -> types.ModuleType:
        return self.modules["cupy"]

    def launched(self, prefix: str = "") -> list[Launch]:
        return [launch for launch in self.launches if launch.name.startswith(prefix)]

    # -------------------------------------------------------------- runtime checks
    def check_runtime(self) -> None:
        if self.runtime_error is not None:
            raise self.modules["cupy.cuda.runtime"].CUDARuntimeError(self.runtime_error)

    def check_device(self, device: int) -> None:
        self.check_runtime()
        if not 0 <= device < self.device_count:
            raise self.modules["cupy.cuda.runtime"].CUDARuntimeError(INVALID_DEVICE)

    def build(self, code: str, flags: tuple[str, ...]) -> kh.KernelModule:
        """The emulated module for ``code``, from the harness's content-keyed cache."""
        return kh.build_source(
            code,
            name="raw_module.cu",
            cache_dir=self.cache_dir,
            sanitize=self.sanitize,
            flags=flags,
        )


# ---------------------------------------------------------------------------- cupy
def _make_modules(state: FakeCuPy) -> dict[str, types.ModuleType]:
    cupy = _NumPyFallback("cupy", np, "The fake cupy of tests/fake_cupy.py.")
    cupy.__path__ = []
    cupy.__version__ = VERSION
    cupy.ndarray = ndarray
    cuda = _make_cuda(state)
    fft = _make_fft()

    def asarray(a, dtype=None, order=None, *, copy=None, blocking=False, device=None):
        return array(a, dtype=dtype, copy=copy, order=order or "K", blocking=blocking)

    def array(
        obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False, device=None
    ):
        if isinstance(obj, ndarray):
            dtype = obj.dtype if dtype is None else np.dtype(dtype)
            layout_ok = order in ("K", "A") or (
                obj.flags.c_contiguous if order == "C" else obj.flags.f_contiguous
            )
            if not copy and dtype == obj.dtype and layout_ok and obj.ndim >= ndmin:
                return obj
            if copy is False:
                raise ValueError("Unable to avoid copy while creating an array as requested.")
            return np.array(obj.view(np.ndarray), dtype=dtype, order=order, ndmin=ndmin).view(
                ndarray
            )
        if copy is False:
            raise ValueError("a host object cannot reach the device without a copy (copy=False)")
        # Host data always makes a new device array (a host-to-device copy).
        host = np.array(obj, dtype=dtype, order=order, copy=True, ndmin=ndmin)
        if host.dtype == object:
            raise ValueError("Unsupported dtype object")
        return host.view(ndarray)

    def ascontiguousarray(a, dtype=None):
        if not isinstance(a, ndarray):
            raise TypeError(
                "Argument 'a' has incorrect type (expected cupy._core.core._ndarray_base, got "
                f"{type(a).__name__}): cupy.ascontiguousarray takes device arrays only"
            )
        dtype = a.dtype if dtype is None else np.dtype(dtype)
        if a.flags.c_contiguous and dtype == a.dtype:
            return a  # no copy: the very same array, as CuPy returns
        return np.array(a.view(np.ndarray), dtype=dtype, order="C").view(ndarray)

    def asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
        if isinstance(a, ndarray):
            return a.get(stream=stream, order=order, out=out, blocking=blocking)
        host = np.asarray(a, order=order)
        if out is None:
            return host
        out[...] = host
        return out

    def get_array_module(*args):
        return cupy if any(isinstance(a, ndarray) for a in args) else np

    memos: list[dict] = []

    def memoize(for_each_device=False):
        def decorator(function):
            cache: dict = {}
            memos.append(cache)

            @functools.wraps(function)
            def memoized(*args, **kwargs):
                key = (args, frozenset(kwargs.items()))
                if for_each_device:
                    key = (state.current_device, key)
                if key not in cache:
                    cache[key] = function(*args, **kwargs)
                return cache[key]

            return memoized

        return decorator

    def clear_memo():
        for cache in memos:
            cache.clear()

    class RawModule:
        """``cupy.RawModule``: compiled (here: built by the harness) at first use."""

        def __init__(
            self,
            *,
            code=None,
            path=None,
            options=(),
            backend="nvrtc",
            translate_cucomplex=False,
            enable_cooperative_groups=False,
            name_expressions=None,
            jitify=None,
        ):
            if (code is None) == (path is None):
                raise TypeError("Exactly one of code and path keyword arguments must be given.")
            if backend not in ("nvrtc", "nvcc"):
                raise ValueError(f"backend must be 'nvrtc' or 'nvcc', got {backend!r}")
            if name_expressions is not None and backend != "nvrtc":
                raise ValueError("name_expressions is only supported for the NVRTC backend")
            self.code = Path(path).read_text() if path is not None else code
            if not isinstance(self.code, str):
                raise TypeError(f"code must be a str, got {type(self.code).__name__}")
            self.options = tuple(options)
            self.name_expressions = None if name_expressions is None else list(name_expressions)
            self._module = None
            state.raw_modules.append(self)

        @property
        def module(self) -> kh.KernelModule:
            if self._module is None:
                # g++ understands the preprocessor options; the rest are NVRTC's own.
                flags = tuple(o for o in self.options if o[:2] in ("-D", "-U", "-I"))
                try:
                    built = state.build(self.code, flags)
                except kh.BuildError as error:  # NVRTC's errors reach CuPy users this way
                    raise compiler.CompileException(str(error)) from None
                missing = [n for n in self.name_expressions or () if n not in built.signatures]
                if missing:
                    raise compiler.CompileException(
                        f"name expressions {missing} are not entry points of the source "
                        f"(it has {built.names})"
                    )
                self._module = built
            return self._module

        def get_function(self, name):
            if name not in self.module.signatures:
                raise cuda.driver.CUDADriverError(
                    f"CUDA_ERROR_NOT_FOUND: named symbol not found ({name!r}; the source has "
                    f"{self.module.names})"
                )
            return RawKernel(self.code, name, self.options, _module=self)

    class RawKernel:
        """``cupy.RawKernel`` / ``RawModule.get_function``: launches through the harness."""

        def __init__(
            self,
            code,
            name,
            options=(),
            backend="nvrtc",
            *,
            translate_cucomplex=False,
            enable_cooperative_groups=False,
            jitify=False,
            _module=None,
        ):
            self.code = code
            self.name = name
            self.options = tuple(options)
            self._raw_module = (
                _module
                if _module is not None
                else RawModule(code=code, options=options, backend=backend)
            )

        @property
        def attributes(self) -> dict:
            return {"max_threads_per_block": 1024, "shared_size_bytes": 0}

        def __call__(
            self, grid, block, args, *, shared_mem=0, stream=None, enable_cooperative_groups=False
        ):
            for what, value in (("grid", grid), ("block", block)):
                if not isinstance(value, tuple):
                    raise TypeError(
                        f"Argument '{what}' has incorrect type (expected tuple, got "
                        f"{type(value).__name__})"
                    )
            if shared_mem:
                raise NotImplementedError(
                    "dynamic shared memory is not emulated (kernel_harness.py: static "
                    "__shared__ arrays only)"
                )
            module = self._raw_module.module
            values = _kernel_arguments(self.name, tuple(args))
            module.launch(self.name, grid, block, values, timeout=state.timeout)
            state.launches.append(
                Launch(self.name, grid, block, tuple(_describe(v) for v in values))
            )

    class MemoryPool:
        def used_bytes(self) -> int:
            return state.pool_used

        def total_bytes(self) -> int:
            return state.pool_total

        def free_bytes(self) -> int:
            return state.pool_total - state.pool_used

        def free_all_blocks(self, stream=None) -> None:
            state.pool_total = state.pool_used

        def set_limit(self, size=None, fraction=None) -> None:
            pass

        def get_limit(self) -> int:
            return 0

    pool = MemoryPool()
    compiler = _module("cupy.cuda.compiler")
    compiler.CompileException = type("CompileException", (Exception,), {})
    cuda.compiler = compiler

    for function in (asarray, array, ascontiguousarray, asnumpy, get_array_module, memoize):
        setattr(cupy, function.__name__, function)
    cupy.asanyarray = asarray
    cupy.clear_memo = clear_memo
    cupy.RawModule = RawModule
    cupy.RawKernel = RawKernel
    cupy.get_default_memory_pool = lambda: pool
    cupy.get_default_pinned_memory_pool = lambda: pool
    cupy.cuda = cuda
    cupy.fft = fft
    cupy.is_available = cuda.is_available

    cupyx, scipy_namespace, cupyx_fft, ndimage = _make_cupyx(fft)
    modules = {
        "cupy": cupy,
        "cupy.cuda": cuda,
        "cupy.cuda.runtime": cuda.runtime,
        "cupy.cuda.driver": cuda.driver,
        "cupy.cuda.memory": cuda.memory,
        "cupy.cuda.compiler": compiler,
        "cupy.fft": fft,
        "cupyx": cupyx,
        "cupyx.scipy": scipy_namespace,
        "cupyx.scipy.fft": cupyx_fft,
        "cupyx.scipy.ndimage": ndimage,
    }
    assert set(modules) == set(MODULE_NAMES)
    return modules


def _module(name: str, doc: str = "") -> types.ModuleType:
    return types.ModuleType(name, doc or f"The fake {name} of tests/fake_cupy.py.")


def _kernel_arguments(name: str, args: tuple) -> tuple:
    """CuPy's mapping of kernel arguments (``_pointer`` in cupy/cuda/function.pyx)."""
    views: dict[int, np.ndarray] = {}
    values = []
    for index, value in enumerate(args):
        if value is None or isinstance(value, np.generic) and type(value) in _KERNEL_SCALAR_TYPES:
            values.append(value)  # NULL pointer, or a scalar of its own C type
        elif isinstance(value, ndarray):
            # One host view per device array, so an array passed twice stays one buffer.
            values.append(views.setdefault(id(value), value.view(np.ndarray)))
        elif isinstance(value, np.ndarray):
            if value.size != 1:
                raise TypeError(
                    f"{name} argument {index}: You are trying to pass a numpy.ndarray of shape "
                    f"{value.shape} as a kernel parameter. Only numpy.ndarrays of size one can "
                    "be passed by value. If you meant to pass a pointer to __global__ memory, "
                    "you need to pass a cupy.ndarray instead."
                )
            values.append(value.reshape(-1)[0])
        elif isinstance(value, int):  # bool too: CuPy tests int first
            values.append(np.int64(value))
        elif isinstance(value, float):
            values.append(np.float64(value))
        elif isinstance(value, complex):
            values.append(np.complex128(value))
        else:
            raise TypeError(f"{name} argument {index}: Unsupported type {type(value)}")
    return tuple(values)


def _describe(value) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, np.ndarray):
        return f"{value.dtype}*"
    return value.dtype.name


# ---------------------------------------------------------------------------- cupy.cuda
def _make_cuda(state: FakeCuPy) -> types.ModuleType:
    cuda = _module("cupy.cuda")
    cuda.__path__ = []
    runtime = _module("cupy.cuda.runtime")
    driver = _module("cupy.cuda.driver")
    memory = _module("cupy.cuda.memory")

    class CUDARuntimeError(RuntimeError):
        def __init__(self, status: int) -> None:
            self.status = status
            name, text = _STATUS_NAMES.get(status, (f"cudaError {status}", "unknown error"))
            super().__init__(f"{name}: {text}")

    class CUDADriverError(RuntimeError):
        pass

    class OutOfMemoryError(MemoryError):
        pass

    def getDeviceCount() -> int:  # noqa: N802  (CuPy's name)
        state.check_runtime()
        if state.device_count < 1:
            raise CUDARuntimeError(NO_DEVICE)
        return state.device_count

    def getDeviceProperties(device: int) -> dict:  # noqa: N802
        state.check_device(device)
        major, minor = state.compute_capability[:-1], state.compute_capability[-1]
        return {
            "name": state.device_name,
            "totalGlobalMem": state.total_memory,
            "major": int(major),
            "minor": int(minor),
            "multiProcessorCount": 132,
            "clockRate": 1980000,  # kHz, an H100 SXM's boost clock
            "maxThreadsPerBlock": 1024,
            "maxGridSize": (2**31 - 1, 65535, 65535),
        }

    def memGetInfo() -> tuple[int, int]:  # noqa: N802
        state.check_device(state.current_device)
        return state.free_memory, state.total_memory

    def getDevice() -> int:  # noqa: N802
        state.check_runtime()
        return state.current_device

    def deviceSynchronize() -> None:  # noqa: N802
        state.check_runtime()

    def runtimeGetVersion() -> int:  # noqa: N802  (CUDA's encoding: 1000 * major + 10 * minor)
        state.check_runtime()
        return state.cuda_version

    def driverGetVersion() -> int:  # noqa: N802
        state.check_runtime()
        return state.cuda_version

    for function in (
        getDeviceCount,
        getDeviceProperties,
        memGetInfo,
        getDevice,
        deviceSynchronize,
        runtimeGetVersion,
        driverGetVersion,
    ):
        setattr(runtime, function.__name__, function)
    runtime.CUDARuntimeError = CUDARuntimeError
    driver.CUDADriverError = CUDADriverError
    memory.OutOfMemoryError = OutOfMemoryError

    class Device:
        def __init__(self, device=None) -> None:
            self.id = state.current_device if device is None else int(device)

        @property
        def compute_capability(self) -> str:
            state.check_device(self.id)
            return state.compute_capability

        @property
        def mem_info(self) -> tuple[int, int]:
            state.check_device(self.id)
            return state.free_memory, state.total_memory

        def use(self) -> None:
            state.check_device(self.id)
            state.current_device = self.id

        def synchronize(self) -> None:
            state.check_device(self.id)

        def __enter__(self):
            self._previous = state.current_device
            self.use()
            return self

        def __exit__(self, *exc) -> None:
            state.current_device = self._previous

        def __int__(self) -> int:
            return self.id

        def __eq__(self, other) -> bool:
            return isinstance(other, Device) and other.id == self.id

        def __hash__(self) -> int:
            return hash(self.id)

        def __repr__(self) -> str:
            return f"<CUDA Device {self.id}>"

    class Stream:
        null = None

        def __init__(self, null=False, non_blocking=False, ptds=False) -> None:
            self.ptr = 0 if null else id(self)

        def synchronize(self) -> None:
            state.check_runtime()

        def use(self):
            return self

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            pass

    Stream.null = Stream(null=True)

    class Event:
        """``cupy.cuda.Event``: every fake launch has finished when it returns, so recording is
        reading the host clock."""

        def __init__(self, block=False, disable_timing=False, interprocess=False) -> None:
            self.disable_timing = disable_timing
            self.time: float | None = None

        def record(self, stream=None) -> None:
            state.check_runtime()
            self.time = time.perf_counter()

        def synchronize(self) -> None:
            state.check_runtime()
            if self.time is None:
                raise RuntimeError("the event was never recorded")

        @property
        def done(self) -> bool:
            return self.time is not None

    def get_elapsed_time(start_event, end_event) -> float:
        """Milliseconds between two recorded events, as CuPy returns them."""
        for event in (start_event, end_event):
            if event.disable_timing or event.time is None:
                raise CUDARuntimeError(INVALID_RESOURCE_HANDLE)
        return (end_event.time - start_event.time) * 1e3

    def is_available() -> bool:
        try:
            return getDeviceCount() > 0
        except CUDARuntimeError:
            return False

    cuda.runtime = runtime
    cuda.driver = driver
    cuda.memory = memory
    cuda.Device = Device
    cuda.Stream = Stream
    cuda.Event = Event
    cuda.get_elapsed_time = get_elapsed_time
    cuda.get_current_stream = lambda device_id=-1: Stream.null
    cuda.get_device_id = lambda: state.current_device
    cuda.is_available = is_available
    return cuda


# ---------------------------------------------------------------------------- cupy.fft
def _make_fft() -> types.ModuleType:
    fft = _NumPyFallback("cupy.fft", np.fft, "The fake cupy.fft: NumPy's FFTs in CuPy's dtypes.")

    def transform(name: str, kind: str):
        numpy_transform = getattr(np.fft, name)

        def run(a, *args, **kwargs):
            if not isinstance(a, ndarray):
                raise TypeError(f"cupy.fft.{name} needs a cupy.ndarray, got {type(a)}")
            _refuse_host_arrays(f"cupy.fft.{name}", args, kwargs)
            single = a.dtype.char in "efF"  # CuPy keeps single precision; float16 computes as 32
            if kind == "c2r":
                dtype = np.float32 if single else np.float64
            else:
                dtype = np.complex64 if single else np.complex128
            result = numpy_transform(a.view(np.ndarray), *args, **kwargs)
            return result.astype(dtype, copy=False).view(ndarray)

        run.__name__ = name
        return run

    kinds = {"rfft": "r2c", "rfft2": "r2c", "rfftn": "r2c", "ihfft": "r2c"}
    kinds |= {"irfft": "c2r", "irfft2": "c2r", "irfftn": "c2r", "hfft": "c2r"}
    kinds |= {n: "c2c" for n in ("fft", "ifft", "fft2", "ifft2", "fftn", "ifftn")}
    for name, kind in kinds.items():
        setattr(fft, name, transform(name, kind))

    class PlanCache:
        """``cupy.fft.config.get_plan_cache()``: no plans are made, so there is nothing to keep."""

        def clear(self) -> None:
            pass

        def set_size(self, size: int) -> None:
            pass

        def set_memsize(self, size: int) -> None:
            pass

    plan_cache = PlanCache()
    fft.config = _module("cupy.fft.config")
    fft.config.get_plan_cache = lambda: plan_cache
    return fft


# ---------------------------------------------------------------------------- cupyx
def next_fast_len(target, real=False) -> int:
    """cupyx.scipy.fft.next_fast_len: the next 2^a 3^b 5^c 7^d (cuFFT's radices); ``real`` is
    accepted for SciPy's interface and changes nothing."""
    if target == 0:
        return 0
    best = math.inf
    power7 = 1
    while power7 < 7 * target:
        power5 = power7
        while power5 < 5 * target:
            power3 = power5
            while power3 < 3 * target:
                length = power3
                while length < target:
                    length *= 2
                best = min(best, length)
                power3 *= 3
            power5 *= 5
        power7 *= 7
    return int(best)


def _filter(name: str):
    scipy_filter = getattr(scipy.ndimage, name)

    def run(input, *args, output=None, **kwargs):  # noqa: A002  (SciPy's name)
        where = f"cupyx.scipy.ndimage.{name}"
        if not isinstance(input, ndarray):
            raise TypeError(f"{where} needs a cupy.ndarray input, got {type(input)}")
        _refuse_host_arrays(where, (*args, output), kwargs)
        args = tuple(_host_view(a) for a in args)
        kwargs = {key: _host_view(value) for key, value in kwargs.items()}
        if isinstance(output, ndarray):
            if output.shape != input.shape:
                raise ValueError(f"output shape {output.shape} is not the input's {input.shape}")
            scipy_filter(input.view(np.ndarray), *args, output=output.view(np.ndarray), **kwargs)
            return output
        return _as_device(scipy_filter(input.view(np.ndarray), *args, output=output, **kwargs))

    run.__name__ = name
    return run


def _make_cupyx(fft: types.ModuleType):
    cupyx = _module("cupyx")
    cupyx.__path__ = []
    scipy_namespace = _module("cupyx.scipy")
    scipy_namespace.__path__ = []
    cupyx_fft = _NumPyFallback("cupyx.scipy.fft", None)
    cupyx_fft.next_fast_len = next_fast_len

    def scipy_style(name: str):
        transform = getattr(fft, name)

        def run(x, *args, overwrite_x=False, plan=None, **kwargs):
            if plan is not None:
                raise NotImplementedError("cuFFT plans are not emulated")
            return transform(x, *args, **kwargs)

        run.__name__ = name
        return run

    for name in ("rfft", "irfft", "rfft2", "irfft2", "rfftn", "irfftn", "fft", "ifft", "fft2"):
        setattr(cupyx_fft, name, scipy_style(name))
    ndimage = _NumPyFallback("cupyx.scipy.ndimage", None)
    for name in ("convolve", "correlate", "convolve1d", "correlate1d", "uniform_filter"):
        setattr(ndimage, name, _filter(name))
    ndimage.gaussian_filter = _filter("gaussian_filter")
    ndimage.grey_opening = _filter("grey_opening")

    def empty_pinned(shape, dtype=float, order="C"):
        return np.empty(shape, dtype=dtype, order=order)

    def zeros_pinned(shape, dtype=float, order="C"):
        return np.zeros(shape, dtype=dtype, order=order)

    cupyx.empty_pinned = empty_pinned
    cupyx.zeros_pinned = zeros_pinned
    cupyx.scipy = scipy_namespace
    scipy_namespace.fft = cupyx_fft
    scipy_namespace.ndimage = ndimage
    return cupyx, scipy_namespace, cupyx_fft, ndimage


# ---------------------------------------------------------------------------- installing
def install(
    monkeypatch,
    *,
    cache_dir: Path | str | None = None,
    sanitize: str | None = "address",
) -> FakeCuPy:
    """Put the fake ``cupy`` and ``cupyx`` in ``sys.modules`` for one test, through ``monkeypatch``.

    ``gpudeconv.backend._cupy`` is forgotten, so the next ``get_backend('cupy')`` imports it afresh
    against the fake, and ``gpudeconv.backend._cupy_status`` / ``_make`` are replaced by fresh
    caches of the same functions. ``monkeypatch``'s undo brings back the session's modules, its
    ``_cupy`` (if it had one) and its own, untouched caches.
    """
    fake = FakeCuPy(cache_dir=cache_dir, sanitize=sanitize)
    for name, module in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    backend = importlib.import_module("gpudeconv.backend")
    # Set, then delete: the undo of the pair removes whatever the test imported, and puts back
    # what was there before (a plain delitem/delattr records nothing when the name is absent).
    monkeypatch.setitem(sys.modules, "gpudeconv.backend._cupy", None)
    monkeypatch.delitem(sys.modules, "gpudeconv.backend._cupy")
    monkeypatch.setattr(backend, "_cupy", None, raising=False)
    monkeypatch.delattr(backend, "_cupy")
    monkeypatch.setattr(backend, "_cupy_status", _fresh_cache(backend._cupy_status))
    monkeypatch.setattr(backend, "_make", _fresh_cache(backend._make))
    return fake


def _fresh_cache(cached):
    """A new, empty ``functools.lru_cache`` of the function behind ``cached``."""
    return functools.lru_cache(maxsize=cached.cache_parameters()["maxsize"])(cached.__wrapped__)
