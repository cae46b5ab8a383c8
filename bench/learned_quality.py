"""The learned method against 30 iterations of plain RL with the true PSF, on held-out
simulated scenes, for the record (not a test).

    python bench/learned_quality.py [--scenes 8] [--size 256] [--weights FILE] [--out FILE.md]

The figures are tests/learned_targets.py's (tests/test_learned_quality.py checks them on two
scenes): PSNR against the target, median FWHM of bright isolated stars, dark-ring depth around
the brightest in sky sigmas, sky noise ratio, flux of the bright stars.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import learned_targets as targets  # noqa: E402

import gpudeconv as gd  # noqa: E402
from gpudeconv.learned.infer import learned_deconvolve  # noqa: E402

METRICS = ("psnr", "star_fwhm", "ring_sigma", "noise_ratio", "flux_ratio")


def _cell(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--weights", default=None, help="weights file (default: packaged)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    def restore(observed, sample):
        return learned_deconvolve(observed, sample.field, weights=args.weights, backend="numpy")

    lines = [
        f"# Learned method vs RL 30 (true PSF), held-out scenes, {datetime.date.today()}",
        "",
        f"Command: `python bench/learned_quality.py --scenes {args.scenes} --size {args.size}`  ",
        f"Machine: {gd.get_backend('numpy').device_name()}. Scenes: "
        f"`gpudeconv.learned.data.make_sample` seeds from {targets.EVALUATION_SEED} (never "
        "drawn in training), PSNR against the 1.5-px target in dB.",
        "",
        "| seed | PSF FWHM | stars | method | " + " | ".join(METRICS) + " |",
        "|---" * (len(METRICS) + 4) + "|",
    ]
    gains = []
    for k in range(args.scenes):
        figures = targets.evaluate_scene(k, restore, size=args.size)
        gains.append(figures["learned"]["psnr"] - figures["rl30"]["psnr"])
        for name in ("observed", "rl30", "learned"):
            row = figures[name]
            cells = " | ".join(_cell(row.get(metric)) for metric in METRICS)
            lines.append(
                f"| {figures['seed']} | {figures['fwhm']:.2f} | {figures['stars']} | {name} | "
                f"{cells} |"
            )
        print("\n".join(lines[-3:]), flush=True)
    median = sorted(gains)[len(gains) // 2]
    lines += [
        "",
        f"PSNR gain of the learned method over RL 30: median {median:.2f} dB, "
        f"smallest {min(gains):.2f} dB.",
    ]
    print(lines[-1])
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
