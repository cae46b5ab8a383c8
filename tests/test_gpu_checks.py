"""``bench/gpu_checks.sh``, the one device call of the GPU calibration, rehearsed on the CPU.

A lent GPU comes with minutes of device time; a command of the script that no longer matches the
project (a renamed option, a moved function) would spend them on a traceback. The rehearsal runs
the same commands with the NumPy backend at small sizes: every step must pass, and with a
backend that is missing the script must stop after its first step instead of passing by skipping.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_checks.sh"

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None,
    reason="the script needs bash and coreutils' timeout",
)


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    # python3 on the PATH must be this interpreter (the script calls python3, as on the device);
    # a wrapper, not a link, so that a virtual environment's interpreter keeps its packages
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "python3"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    environment = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "OUT": str(tmp_path / "out"),
        "GPU_CHECKS_SMALL": "1",
        **env,
    }
    environment.pop("GPUDECONV_BACKEND", None)
    return subprocess.run(
        ["bash", str(SCRIPT)],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _summary(tmp_path: Path) -> dict[str, str]:
    rows = (tmp_path / "out" / "summary.md").read_text().splitlines()[2:]
    return {row.split("|")[1].strip(): row.split("|")[2].strip() for row in rows if "|" in row}


def test_the_steps_run_on_the_cpu(tmp_path):
    # the two pytest steps re-run parts of this suite: left out here
    result = _run(tmp_path, GPU_CHECKS_BACKEND="numpy", GPU_CHECKS_SKIP="tests bench-gpu")
    log = (tmp_path / "out" / "run.log").read_text()
    assert result.returncode == 0, result.stdout[-3000:] + log[-3000:]
    assert _summary(tmp_path) == {
        "card": "ok",
        "tests": "skipped (GPU_CHECKS_SKIP)",
        "record": "ok",
        "cli-bench": "ok",
        "tiles-vs-whole": "ok",
        "bench-gpu": "skipped (GPU_CHECKS_SKIP)",
        "tile-memory": "ok",
    }
    record = json.loads((tmp_path / "out" / "record.json").read_text())
    assert record["results"][0]["size"] == 256
    assert "largest difference of the range" in log
    # the reply of a device call ends with the summary table
    assert result.stdout.rstrip().splitlines()[-1].startswith("| tile-memory | ok |")


def test_a_missing_backend_stops_after_the_first_step(tmp_path):
    result = _run(tmp_path, GPU_CHECKS_BACKEND="nonexistent")
    assert result.returncode == 1
    assert list(_summary(tmp_path)) == ["card"]
    assert "the nonexistent backend is not available" in result.stdout
