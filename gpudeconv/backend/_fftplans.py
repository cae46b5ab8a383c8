"""CPU FFT plans for repeated convolutions: buffers allocated once, FFTW where it is installed.

RL on the CPU is FFT-bound, and the rest of an iteration is memory traffic: a transform that
allocates, zero-pads and page-faults fresh 20 MB arrays every call costs a third more than the
transforms themselves (measured on a 2-core machine, 2048^2 images). A plan keeps one
zero-padded real input buffer, so only the image's window is written per call, and with pyFFTW
the spectrum and output buffers too.

pyFFTW plans with ``FFTW_MEASURE`` take seconds for large shapes, so the accumulated FFTW
"wisdom" is kept on disk (``$GPUDECONV_CACHE_DIR``, default ``~/.cache/gpudeconv``) and a shape
is measured once per machine.
"""

from __future__ import annotations

import base64
import json
import os
import platform
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import scipy.fft

from ._parallel import by_rows, usable_cores

__all__ = ["FFTPlan", "fftw_available", "get_plan"]

#: Plans kept per thread, at most this many and this many bytes of buffers (three of the padded
#: size each; the newest plan is always kept). A spatially-varying operator uses up to nine
#: shapes (edge and interior nodes along each axis) besides the whole image's.
_MAX_PLANS = 16
_MAX_PLAN_BYTES = 1 << 30
#: From this many elements FFTW measures its plans (seconds, once); below it estimates (instant).
_MEASURE_FROM = 1024 * 1024
#: Below this many elements FFTW runs on one thread. On the idle 2-core development VM two
#: threads gained nothing at 100x100 (0.052 ms against 0.071 ms a convolution pair) and from
#: 144x144 up were 1.4-1.8x faster. With the cores taken by other work, two threads were 10-300x
#: slower at every size (a hand-off waits for a busy core); see bench/README.md.
_THREADS_FROM = 120 * 120

try:  # pyFFTW is optional: scipy.fft does the same work, somewhat slower
    import pyfftw
except ImportError:  # pragma: no cover - depends on the platform's wheels
    pyfftw = None


def fftw_available() -> bool:
    return pyfftw is not None


class FFTPlan:
    """Real 2-D FFTs of one padded shape through ``scipy.fft``, with a reused input buffer.

    ``convolve(x, transfer)`` writes ``x`` into the top-left window of the zero-padded buffer,
    transforms, multiplies by ``transfer`` and transforms back; the returned full-size array
    may be reused by the next call.
    """

    library = "scipy.fft"

    def __init__(self, shape, dtype, workers: int = -1):
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.workers = workers
        self.real = self._zeros(self.shape, self.dtype)
        self._extent = (0, 0)

    def _zeros(self, shape, dtype):
        return np.zeros(shape, dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers this plan holds (the real input, the spectrum, the output)."""
        return 3 * self.real.nbytes

    def load(self, x) -> None:
        """Write ``x`` into the buffer's window; everything outside it is zero."""
        height, width = x.shape
        if height < self._extent[0] or width < self._extent[1]:
            self.real[...] = 0  # a larger image was here before: clear what it left outside
        by_rows(np.copyto, self.real[:height, :width], x)
        self._extent = (height, width)

    def transform(self, transfer):
        spectrum = scipy.fft.rfft2(self.real, workers=self.workers)
        spectrum *= transfer
        return scipy.fft.irfft2(spectrum, s=self.shape, workers=self.workers, overwrite_x=True)

    def convolve(self, x, transfer):
        self.load(x)
        return self.transform(transfer)


class FFTWPlan(FFTPlan):
    """The same through planned FFTW transforms (pyFFTW), every buffer allocated once."""

    library = "pyfftw"

    def __init__(self, shape, dtype, workers: int = -1):
        super().__init__(shape, dtype, workers)
        complex_dtype = np.result_type(self.dtype, np.complex64)
        self.spectrum = pyfftw.empty_aligned((shape[0], shape[1] // 2 + 1), complex_dtype)
        self.out = pyfftw.empty_aligned(self.shape, self.dtype)
        size = shape[0] * shape[1]
        flags = ("FFTW_MEASURE",) if size >= _MEASURE_FROM else ("FFTW_ESTIMATE",)
        threads = 1 if _forked else usable_cores() if workers == -1 else workers
        if size < _THREADS_FROM:
            threads = 1
        _load_wisdom()
        with _planner_lock:  # FFTW's planner and its wisdom are not thread-safe
            self._forward = pyfftw.FFTW(
                self.real, self.spectrum, axes=(0, 1), flags=flags, threads=threads
            )
            self._backward = pyfftw.FFTW(
                self.spectrum,
                self.out,
                axes=(0, 1),
                direction="FFTW_BACKWARD",
                flags=(*flags, "FFTW_DESTROY_INPUT"),
                threads=threads,
            )
            if "FFTW_MEASURE" in flags:
                _save_wisdom()
        self.real[...] = 0  # measuring scribbles over the buffers

    def _zeros(self, shape, dtype):
        return pyfftw.zeros_aligned(shape, dtype)

    def transform(self, transfer):
        self._forward()
        by_rows(np.multiply, self.spectrum, transfer, self.spectrum)
        self._backward()  # normalized by 1/N, as numpy's irfft2
        return self.out


_local = threading.local()
#: True in a process forked from one that had used FFTW's threads: their state does not survive
#: a fork (a threaded plan hangs in the child), so such a child plans single-threaded.
_forked = False


def _after_fork_in_child() -> None:
    global _local, _forked
    _local = threading.local()  # plans and buffers of the parent's threads
    _forked = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def get_plan(shape, dtype, *, library: str = "auto", workers: int = -1) -> FFTPlan:
    """The plan for FFTs of ``shape`` and real ``dtype`` on this thread (buffers are not shared
    between threads), created on first use; the least recently used plans are dropped."""
    if library == "auto":
        library = "pyfftw" if fftw_available() else "scipy.fft"
    plans = getattr(_local, "plans", None)
    if plans is None:
        plans = _local.plans = OrderedDict()
    key = (tuple(shape), np.dtype(dtype), library, workers)
    plan = plans.get(key)
    if plan is None:
        kind = FFTWPlan if library == "pyfftw" else FFTPlan
        plan = plans[key] = kind(shape, dtype, workers)
        while len(plans) > 1 and (
            len(plans) > _MAX_PLANS or sum(p.nbytes for p in plans.values()) > _MAX_PLAN_BYTES
        ):
            plans.popitem(last=False)
    else:
        plans.move_to_end(key)
    return plan


# --------------------------------------------------------------------------- FFTW wisdom on disk
_wisdom_loaded = False
_planner_lock = threading.RLock()


def _wisdom_path() -> Path:
    root = os.environ.get("GPUDECONV_CACHE_DIR") or Path.home() / ".cache" / "gpudeconv"
    name = f"fftw-wisdom-{platform.machine()}-pyfftw{pyfftw.__version__}.json"
    return Path(root) / name


def _load_wisdom() -> None:
    global _wisdom_loaded
    with _planner_lock:
        if _wisdom_loaded:
            return
        _wisdom_loaded = True
        try:
            stored = json.loads(_wisdom_path().read_text())
            if not (isinstance(stored, list) and len(stored) == 3):
                return  # not ours, or from another pyFFTW: FFTW measures again
            pyfftw.import_wisdom(tuple(base64.b64decode(item) for item in stored))
        except Exception:  # noqa: BLE001  (no wisdom yet, or unreadable: FFTW measures again)
            return


def _save_wisdom() -> None:
    path = _wisdom_path()
    with _planner_lock:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps([base64.b64encode(item).decode() for item in pyfftw.export_wisdom()])
            temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            temporary.write_text(text)
            os.replace(temporary, path)
        except OSError:
            pass  # a read-only home: plans are measured again next time, nothing else changes
