"""Peak resident memory of the streaming driver on a mosaic larger than its budget.

Writes a 12000 x 12000 float32 FITS mosaic (576 MB; a sky with noise and stars, a NaN wedge over
one corner as a mosaic's unobserved edge, a few header cards) into a temporary folder, row strip
by row strip, then restores it file to file with `gpudeconv.tiles.deconvolve_file` (tile 1024,
2 iterations by default) in a child process and reports that process's peak resident set size,
file-backed pages of memory maps included: its ``VmHWM`` (from ``/proc``), and ``/usr/bin/time
-v``'s "Maximum resident set size" where that exists. Then it checks the output, again strip by
strip: header cards kept with HISTORY added, NaN in the wedge, no NaN elsewhere.

Target: peak RSS <= 400 MB whatever the mosaic's size (the whole mosaic in memory would be
576 MB for the input alone, ~8 GB for in-core RL).

    python bench/tile_memory.py [--size 12000] [--tile 1024] [--iterations 2] [--backend numpy]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits

CHILD = """
import sys, time
import gpudeconv as gd
from gpudeconv import tiles

source, target, tile, iterations, backend = sys.argv[1:]
started = time.perf_counter()
report = tiles.deconvolve_file(
    source, target, gd.psf.moffat(3.5), int(iterations), backend=backend, tile=int(tile),
    progress=False, header_extra={"bench": "tile_memory"},
)
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
print("REPORT", report)
print("VMHWM", peak)
"""

STRIP = 500


def wedge_rows(size: int, rows: slice) -> np.ndarray:
    """Where the NaN wedge is, in ``rows`` of the mosaic: below the anti-diagonal of the
    top-left corner, a quarter of the side deep."""
    y = np.arange(rows.start, rows.stop)[:, None]
    x = np.arange(size)[None, :]
    return y + x < size // 4


def write_mosaic(path: Path, size: int, seed: int = 0) -> None:
    """A float32 ``size x size`` FITS written strip by strip (never the whole in memory)."""
    rng = np.random.default_rng(seed)
    header = fits.PrimaryHDU(data=np.zeros((1, 1), dtype=np.float32)).header
    header["NAXIS1"] = header["NAXIS2"] = size
    header["OBJECT"] = ("Cygnus mosaic", "synthetic, bench/tile_memory.py")
    header["EXPTIME"] = (36000.0, "s")
    block = header.tostring().encode("ascii")
    with open(path, "wb") as file:
        file.write(block)
        for y0 in range(0, size, STRIP):
            rows = slice(y0, min(y0 + STRIP, size))
            height = rows.stop - rows.start
            sky = 100.0 + rng.normal(0.0, 3.0, (height, size))
            stars = rng.random((height, size)) < 1 / 400
            sky[stars] += rng.pareto(1.5, int(stars.sum())) * 200
            sky[wedge_rows(size, rows)] = np.nan
            file.write(sky.astype(">f4").tobytes())
        data_bytes = size * size * 4
        file.write(b"\0" * (-data_bytes % 2880))


def check_output(path: Path, size: int) -> list[str]:
    """What is wrong with the restored mosaic (nothing: an empty list), read strip by strip."""
    problems = []
    with fits.open(path, memmap=False) as hdul:
        header = hdul[0].header
        if header.get("OBJECT") != "Cygnus mosaic" or header.get("EXPTIME") != 36000.0:
            problems.append("the input's header cards were not kept")
        history = " ".join(str(line) for line in header.get("HISTORY", []))
        if "iterations" not in history:
            problems.append("no HISTORY line about the restoration")
        for y0 in range(0, size, STRIP):
            rows = slice(y0, min(y0 + STRIP, size))
            data = hdul[0].section[rows, :]
            wedge = wedge_rows(size, rows)
            if not np.isnan(data[wedge]).all():
                problems.append(f"rows {rows.start}-{rows.stop}: a value in the NaN wedge")
            if np.isnan(data[~wedge]).any():
                problems.append(f"rows {rows.start}-{rows.stop}: NaN inside the observed region")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=12000)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--target-mb", type=float, default=400.0)
    args = parser.parse_args(argv)

    folder = Path(tempfile.mkdtemp(prefix="gpudeconv-tile-memory-"))
    try:
        source, target = folder / "mosaic.fits", folder / "sharp.fits"
        started = time.perf_counter()
        write_mosaic(source, args.size)
        print(
            f"mosaic: {args.size}x{args.size} float32, {source.stat().st_size / 1e6:.0f} MB "
            f"written in {time.perf_counter() - started:.1f} s"
        )
        command = [
            sys.executable,
            "-c",
            CHILD,
            str(source),
            str(target),
            str(args.tile),
            str(args.iterations),
            args.backend,
        ]
        if Path("/usr/bin/time").exists():  # GNU time: its child's maximum RSS
            command = ["/usr/bin/time", "-v", *command]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), *sys.path]),
        }
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            print(done.stdout, done.stderr, file=sys.stderr)
            return 1
        lines = done.stdout.splitlines()
        vmhwm = next(int(line.split()[1]) for line in lines if line.startswith("VMHWM"))
        report = next(line for line in lines if line.startswith("REPORT"))
        maxrss = next(
            (
                int(line.split(":")[1]) * 1024
                for line in done.stderr.splitlines()
                if "Maximum resident set size" in line
            ),
            None,
        )
        problems = check_output(target, args.size)
        peak_mb = vmhwm / 1e6
        print(
            f"machine: {platform.node()} {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}"
        )
        print(
            f"run: tile {args.tile}, {args.iterations} iterations, backend {args.backend}, "
            f"{elapsed:.1f} s wall"
        )
        print(report.replace("REPORT ", "report: "))
        print(
            f"peak RSS (VmHWM): {peak_mb:.0f} MB"
            + (f"; /usr/bin/time -v maximum RSS: {maxrss / 1e6:.0f} MB" if maxrss else "")
        )
        verdict = "met" if peak_mb <= args.target_mb else "NOT met"
        print(f"target <= {args.target_mb:.0f} MB: {verdict}")
        print(
            "checks: "
            + (
                "header kept, NaN wedge kept, no NaN in the observed region"
                if not problems
                else "; ".join(problems)
            )
        )
        return 0 if not problems and peak_mb <= args.target_mb else 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
