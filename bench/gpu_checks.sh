#!/usr/bin/env bash
# Every GPU check of the project in one device call (issue 9: "GPU calibration"), sized to fit a
# lent machine's short lease: about 5 minutes on an H100/H200 with 16 cores.
#
# On the development machine, once per session (the GPU image lacks astropy and photutils):
#     ../shared/tools/device-wheels.sh            # downloads them into .whl/ (git-ignored)
# Then one call of the device tool, with carry [".whl"] and timeout_s 540:
#     bash bench/gpu_checks.sh
# and copy what comes back ($OUT: summary.md, run.log, the limits and bench records) into
# bench/results/ with the date and the device in the names.
#
# Rehearsal on the CPU (same commands, small sizes, no GPU-only step; tests/test_gpu_checks.py
# runs it with GPU_CHECKS_SKIP="tests bench-gpu", the steps named there left out):
#     GPU_CHECKS_BACKEND=numpy GPU_CHECKS_SMALL=1 OUT=/tmp/checks bash bench/gpu_checks.sh
#
# Steps, each under its own time limit; a failing step is recorded and the next one runs:
#   1. the card: nvidia-smi, versions
#   2. bench/gpu_limits.py: bandwidth, FFT pairs 2048²-8192², FP32 FMA, transfers, the RL floor
#   3. the CuPy-parametrized tests (`-k cupy`), fused kernels and operators against NumPy
#   4. bench/record.py at 4096² and `gpudeconv bench` at 8192², beside the plain CuPy RL
#   5. pytest bench/ GPU cases: RL, SV operator and fused steps, option costs, streamed vs in-core
#   6. the streaming driver: a 12000² FITS mosaic through 4096 tiles (bench/tile_memory.py), and
#      a mosaic restored in tiles against the same image restored whole, on the GPU
# The last lines printed are summary.md: step, status, seconds.
set -uo pipefail
cd "$(dirname "$0")/.."

backend=${GPU_CHECKS_BACKEND:-cupy}
out=${OUT:-/tmp/gpu-checks}
mkdir -p "$out"
if [ -n "${GPU_CHECKS_SMALL:-}" ]; then
    size=256 big=512 mosaic=1024 tile=256 iterations=3 limit_scale=4
else
    size=4096 big=8192 mosaic=12000 tile=4096 iterations=20 limit_scale=1
fi
log="$out/run.log"
summary="$out/summary.md"
: >"$log"
printf '| step | status | seconds |\n|---|---|---|\n' >"$summary"
export PYTHONUNBUFFERED=1 GPUDECONV_BACKEND="$backend"

# The wheels carried in .whl/ (astropy, pyerfa, astropy-iers-data, photutils) go to .site/ where
# python3 lacks them; the project imports from the working tree.
if ! python3 -c "import astropy, photutils" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target .site .whl/*.whl >>"$log" 2>&1 || echo "wheels: install failed" | tee -a "$log"
    export PYTHONPATH="$PWD/.site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

# The whole script ends within GPU_CHECKS_BUDGET seconds (default 480: a device call of
# timeout_s 540 keeps a minute for the start of python and the transfers): a step gets the least
# of its own limit and what is left, and is skipped when under 20 s are left.
deadline=$(($(date +%s) + ${GPU_CHECKS_BUDGET:-480}))

# step NAME SECONDS COMMAND...: run under a time limit, log it, add a row to the summary
step() {
    local name=$1 seconds=$(($2 * limit_scale)) started status left
    shift 2
    started=$(date +%s)
    case " ${GPU_CHECKS_SKIP:-} " in
        *" $name "*)
            printf '| %s | skipped (GPU_CHECKS_SKIP) | 0 |\n' "$name" | tee -a "$summary"
            return
            ;;
    esac
    left=$((deadline - started))
    if [ "$left" -lt 20 ]; then
        printf '| %s | skipped (budget spent) | 0 |\n' "$name" | tee -a "$summary"
        return
    fi
    [ "$seconds" -gt "$left" ] && seconds=$left
    printf '\n===== %s (limit %ss): %s\n' "$name" "$seconds" "$*" | tee -a "$log"
    timeout --kill-after=10 "$seconds" "$@" >>"$log" 2>&1
    status=$?
    case $status in
        0) status=ok ;;
        124 | 137) status="timed out" ;;
        *) status="failed (exit $status)" ;;
    esac
    printf '| %s | %s | %s |\n' "$name" "$status" "$(($(date +%s) - started))" | tee -a "$summary"
}

pytest_flags=(-q -p no:cacheprovider -o addopts=-ra)
if python3 -c "import xdist" 2>/dev/null; then
    pytest_flags+=(-n 4)
fi

step card 30 bash -c 'nvidia-smi || true; python3 -c "import sys, numpy, scipy; print(sys.version); print(\"numpy\", numpy.__version__, \"scipy\", scipy.__version__)"; python3 -m gpudeconv.cli info'
# Without the backend every later step would pass by skipping: stop here instead.
if ! python3 -c "import sys, gpudeconv as gd; sys.exit('$backend' not in gd.available_backends())"; then
    echo "the $backend backend is not available (see run.log): nothing else is checked" | tee -a "$summary"
    cat "$summary"
    exit 1
fi

if [ "$backend" = cupy ]; then
    step limits 120 python3 bench/gpu_limits.py --out "$out/limits"
    for file in "$out"/limits/*-limits.md "$out"/limits/*-limits.json; do
        [ -e "$file" ] && mv "$file" "$out/limits.${file##*.}"
    done
    rmdir "$out/limits" 2>/dev/null
fi

# The tests whose backend fixture or name says cupy; the CPU emulations of CUDA stay out.
step tests 200 python3 -m pytest tests "${pytest_flags[@]}" -k cupy \
    --ignore=tests/test_cupy_backend_emulated.py --ignore=tests/test_kernels_emulated.py \
    --ignore=tests/test_sv_kernel_emulated.py --ignore=tests/test_gpu_limits.py \
    --junitxml="$out/tests.xml"

step record 90 python3 bench/record.py --size "$size" --iterations "$iterations" \
    --backend "$backend" --repeats 5 --out "$out/record"
step cli-bench 90 python3 -m gpudeconv.cli bench --size "$big" --iterations "$iterations" \
    --backend "$backend"

step tiles-vs-whole 120 python3 - "$size" "$tile" "$iterations" "$backend" <<'PY'
"""A mosaic larger than a tile, restored file to file in tiles and restored whole, on one backend."""

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.ndimage
from astropy.io import fits

import gpudeconv as gd
from gpudeconv import bench, tiles

size, tile, iterations = (int(v) for v in sys.argv[1:4])
backend = gd.get_backend(sys.argv[4])
psf = gd.psf.moffat(bench.BENCH_FWHM, size=25)
image = bench.star_field(size, psf)
image[: size // 8, : size // 5] = np.nan  # a mosaic's unobserved corner
with tempfile.TemporaryDirectory() as folder:
    source, target = Path(folder) / "mosaic.fits", Path(folder) / "sharp.fits"
    fits.PrimaryHDU(image).writeto(source)
    started = time.perf_counter()
    tiles.deconvolve_file(
        source, target, psf, iterations, backend=backend, tile=tile // 2, progress=False
    )
    streamed_s = time.perf_counter() - started
    streamed = fits.getdata(target)
started = time.perf_counter()
whole = backend.to_host(gd.richardson_lucy(backend.asarray(image), psf, iterations, backend=backend))
whole_s = time.perf_counter() - started
# Tiles and whole agree to rounding everywhere, next to the no-data corner too (no-data pixels
# start from the data near them, in a tile as in the whole image); both figures are reported.
observed = np.isfinite(whole)
near_nan = scipy.ndimage.binary_dilation(~observed, iterations=64)
span = float(np.nanmax(whole) - np.nanmin(whole))
difference = np.abs(streamed - whole) / span
far, near = float(np.max(difference[~near_nan])), float(np.max(difference[observed & near_nan]))
same_nan = bool(np.array_equal(np.isnan(streamed), ~observed))
mpix_it = size * size * iterations / 1e6
print(f"backend {backend.name} ({backend.device_name()}), {size}² in tiles of {tile // 2}")
print(f"streamed {streamed_s:.2f} s = {mpix_it / streamed_s:.1f} MPix·it/s (FITS to FITS)")
print(f"whole    {whole_s:.2f} s = {mpix_it / whole_s:.1f} MPix·it/s (host in, host out)")
print(f"largest difference of the range: {far:.2e} (over 64 px from no-data), {near:.2e} (within)")
print(f"NaN where the input has none or the reverse: {not same_nan}")
sys.exit(0 if far < 1e-4 and near < 1e-4 and same_nan else 1)
PY

# GPU cases only (the CPU ones are the development machine's to measure)
step bench-gpu 180 python3 -m pytest bench -q -p no:cacheprovider -o addopts= --benchmark-only \
    -k "cupy or gpu or sv_operator or rl_steps" \
    --rl-size "$size" --rl-gpu-size "$size" --rl-iterations "$iterations" \
    --benchmark-json="$out/bench.json"

# 2000 MB: the CUDA context, CuPy and four pinned 4096-tile buffers (~300 MB) on top of the CPU's
# 400 MB target; the mosaic is 576 MB, in-core RL would take ~8 GB of host memory.
step tile-memory 120 python3 bench/tile_memory.py --size "$mosaic" --tile "$tile" \
    --iterations "$iterations" --backend "$backend" --target-mb 2000
# What was asked of each step and how it went; the device call's reply ends with this.
echo
echo "files in $out:"
ls -1 "$out" | sed 's/^/  /'
echo
cat "$summary"
! grep -q "failed\|timed out" "$summary"
