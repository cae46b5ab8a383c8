"""Train the learned deconvolution network on simulated sky (``python -m gpudeconv.learned.train``).

Every batch is drawn on the fly by `gpudeconv.learned.data.make_batch` from a seed of its own
(training step ``k`` of run seed ``s`` uses the seed ``TRAIN_SEEDS + s * 10**6 + k``), so a run
is reproducible from its seed and never sees the validation scenes (seeds from
``VALIDATION_SEED``) or the held-out evaluation scenes (seeds from ``EVALUATION_SEED``). The
loss is the mean absolute error to the target in the normalized units of `data.normalize` (1 =
5 noise sigmas): robust to the bright stars' large errors. Adam with a cosine-decaying rate.
PyTorch is needed (``pip install "gpudeconv[train]"``); CUDA when present, else the CPU.

Writes the weights (`gpudeconv.learned.network.Weights`, with the run's settings and figures
in their config), a JSON log of the losses and a PNG of the loss curves.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from .._errors import GpudeconvError
from .data import make_batch
from .torch_model import _torch, build_model, to_weights

__all__ = ["EVALUATION_SEED", "VALIDATION_SEED", "main", "train"]

TRAIN_SEEDS = 1_000_000_000
VALIDATION_SEED = 7_000_000
EVALUATION_SEED = 9_000_000
DEFAULT_WEIGHTS = Path(__file__).with_name("weights") / "learned-v1.npz"


def train(
    *,
    steps: int = 2000,
    batch: int = 12,
    size: int = 64,
    rate: float = 2e-3,
    seed: int = 0,
    validation: int = 48,
    validate_every: int = 100,
    threads: int | None = None,
    log=print,
) -> tuple[object, dict]:
    """Train a network from scratch; returns ``(module, history)``."""
    torch = _torch()
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * k / steps))
    )
    inputs, targets = make_batch(VALIDATION_SEED, validation, size=size)
    held_in = torch.from_numpy(inputs).to(device)
    held_out = torch.from_numpy(targets).to(device)
    identity = float(torch.mean(torch.abs(held_in[:, :1] - held_out)))
    history = {"step": [], "train": [], "validation": [], "identity": identity}
    running, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        x, y = make_batch(TRAIN_SEEDS + seed * 10**6 + step, batch, size=size)
        x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
        loss = torch.mean(torch.abs(model(x) - y))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        running.append(float(loss.detach()))
        if step % validate_every == 0 or step == steps:
            with torch.no_grad():
                score = float(torch.mean(torch.abs(model(held_in) - held_out)))
            history["step"].append(step)
            history["train"].append(float(np.mean(running)))
            history["validation"].append(score)
            running = []
            log(
                f"step {step}/{steps}: train {history['train'][-1]:.4f}, validation "
                f"{score:.4f} (input as output {identity:.4f}), "
                f"{time.perf_counter() - start:.0f} s"
            )
    history["seconds"] = time.perf_counter() - start
    history["device"] = device
    return model, history


def _plot(history: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    axes.plot(history["step"], history["train"], label="training batches")
    axes.plot(history["step"], history["validation"], label="validation scenes")
    axes.axhline(history["identity"], color="grey", linestyle=":", label="input as output")
    axes.set_xlabel("step")
    axes.set_ylabel("mean |output - target| (normalized units)")
    axes.set_yscale("log")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpudeconv.learned.train", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--size", type=int, default=64, help="patch side (multiple of 4)")
    parser.add_argument("--rate", type=float, default=2e-3, help="Adam's initial step size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS, help="weights (.npz)")
    parser.add_argument("--log-dir", type=Path, default=Path("learned-run"))
    args = parser.parse_args(argv)
    try:
        if args.steps < 1 or args.batch < 1 or args.size < 16 or args.size % 4:
            msg = "--steps and --batch must be positive, --size a multiple of 4 of at least 16"
            raise GpudeconvError(msg)
        model, history = train(
            steps=args.steps,
            batch=args.batch,
            size=args.size,
            rate=args.rate,
            seed=args.seed,
            threads=args.threads,
        )
        weights = to_weights(model.cpu())
        weights.config.update(
            {
                "trained": {
                    "steps": args.steps,
                    "batch": args.batch,
                    "size": args.size,
                    "rate": args.rate,
                    "seed": args.seed,
                    "device": history["device"],
                    "seconds": round(history["seconds"], 1),
                    "validation_l1": history["validation"][-1],
                    "identity_l1": history["identity"],
                }
            }
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        weights.save(args.out)
        args.log_dir.mkdir(parents=True, exist_ok=True)
        (args.log_dir / "history.json").write_text(json.dumps(history, indent=1) + "\n")
        _plot(history, args.log_dir / "loss.png")
    except GpudeconvError as error:
        print(f"gpudeconv: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} and {args.log_dir}/loss.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
