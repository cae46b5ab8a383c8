"""Measure RL throughput with gpudeconv.bench.run_bench and record it in bench/results/.

    PYTHONPATH=. python bench/record.py --size 2048 --iterations 20 --backend numpy --repeats 5

writes ``bench/results/<date>-<cpu|gpu>-<backend>-<size>.md`` and ``.json`` (machine, date, this
command line, versions, figures and speed-ups over the peers).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
from pathlib import Path

from gpudeconv import get_backend
from gpudeconv.bench import run_bench, write_record

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--backend", default=None, help="auto, numpy or cupy")
    parser.add_argument("--psf-size", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--notes", default=None, help="free text kept in the record")
    parser.add_argument("--out", default=None, help="path without suffix (default: dated name)")
    args = parser.parse_args(argv)

    backend = get_backend(args.backend)
    load_before = os.getloadavg()
    results = run_bench(
        size=args.size,
        iterations=args.iterations,
        backend=backend,
        psf_size=args.psf_size,
        peers=not args.no_peers,
        repeats=args.repeats,
    )
    load_after = os.getloadavg()
    kind = "gpu" if backend.name == "cupy" else "cpu"
    stem = args.out or str(
        RESULTS / f"{datetime.date.today().isoformat()}-{kind}-{backend.name}-{args.size}"
    )
    command = shlex.join(["python", "bench/record.py", *(sys.argv[1:] if argv is None else argv)])
    notes = (
        f"Load average (1, 5, 15 min) before the run: {', '.join(f'{x:.2f}' for x in load_before)};"
        f" after: {', '.join(f'{x:.2f}' for x in load_after)}."
    )
    if args.notes:
        notes = f"{args.notes} {notes}"
    for suffix in (".md", ".json"):
        path = write_record(results, stem + suffix, command=command, notes=notes)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
