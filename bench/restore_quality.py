"""The restoration-quality targets over several scenes, for the record (not a test).

    python bench/restore_quality.py [--sizes 512 1024] [--seeds 0 1 2 3] [--out FILE.md]

Runs tests/restore_targets.py (the figures that tests/test_restore_quality.py checks on one
scene) on deep-sky scenes of each size and seed and on planetary frames, and prints a Markdown
summary (written to ``--out`` too): per method the noise gain in empty sky and its ratio to
plain RL's, the star-FWHM reduction kept, the ring depth around saturated stars, the median
aperture flux ratio; the iterations Biggs-Andrews needs for the fit of 50 plain ones; PSNR on
the planet.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import restore_targets as targets  # noqa: E402

import gpudeconv as gd  # noqa: E402

COLUMNS = (
    "noise_gain",
    "noise_vs_rl",
    "fwhm_reduction",
    "reduction_kept",
    "ring_sigma",
    "flux_ratio",
    "flux_median",
    "stars",
    "saturated_flux",
)


def _row(name: str, row: dict) -> str:
    cells = [f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS]
    return f"| {name} | {row['iterations']} | " + " | ".join(cells) + " |"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    backend = gd.get_backend("numpy")
    lines = [
        f"# Restoration quality, {datetime.date.today()}",
        "",
        f"Command: `python bench/restore_quality.py --sizes {' '.join(map(str, args.sizes))} "
        f"--seeds {' '.join(map(str, args.seeds))}`  ",
        f"Machine: {backend.device_name()}, Python {platform.python_version()}, "
        f"gpudeconv {gd.__version__}. Scenes: `tests/restore_targets.py`.",
        "",
    ]
    for size in args.sizes:
        for seed in args.seeds:
            start = time.perf_counter()
            figures = targets.deep_sky_figures(size, seed)
            fast = figures["acceleration"]
            lines += [
                f"## Deep sky {size}x{size}, seed {seed} ({time.perf_counter() - start:.0f} s)",
                "",
                "| method | it | " + " | ".join(COLUMNS) + " |",
                "|---" * (len(COLUMNS) + 2) + "|",
                *(_row(name, row) for name, row in figures["methods"].items()),
                "",
                f"Biggs-Andrews: the data term of 50 plain iterations "
                f"({fast['plain_data_term_at_50']:.4f}) after "
                f"{fast['accelerated_iterations_to_reach']} accelerated iterations "
                f"({fast['accelerated_restarts']} restarts). Light of the saturated stars "
                f"in the observed frame: {figures['observed_saturated_flux']:.3f} of the truth.",
                "",
            ]
            print("\n".join(lines[-(len(figures["methods"]) + 7) :]), flush=True)
    lines += [
        "## Planetary (PSNR in dB against the truth, 50 iterations)",
        "",
        "| size | seed | blurred | rl | rl-tv | damped | wiener |",
        "|---" * 7 + "|",
    ]
    for seed in args.seeds:
        p = targets.planetary_figures(256, seed)
        lines.append(
            f"| 256 | {seed} | {p['blurred']:.2f} | {p['rl']:.2f} | {p['rl-tv']:.2f} | "
            f"{p['damped']:.2f} | {p['wiener']:.2f} |"
        )
    print("\n".join(lines[-(len(args.seeds) + 4) :]))
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
