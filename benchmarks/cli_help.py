"""How long ``sdetr --help`` takes (issue #14's target: under 2 s), against a bare Python start measured in
the same run.

    python benchmarks/cli_help.py [--repeats 7]

Each round runs, in alternating order, ``python -c pass`` (the interpreter alone: the floor any command
pays) and ``python -m sdetr.platform.cli --help`` (what the ``sdetr`` script runs), each in a fresh
process; it prints the medians and their ratio. The CLI imports torch, Ray and MLflow only inside the
handlers that use them, so ``--help`` pays for argparse and the light modules only.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "sdetr --help": [sys.executable, "-m", "sdetr.platform.cli", "--help"],
}


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    for cmd in COMMANDS.values():  # warm the file cache once, untimed
        timed(cmd)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    names = list(COMMANDS)
    for i in range(args.repeats):
        for name in names if i % 2 == 0 else reversed(names):
            times[name].append(timed(COMMANDS[name]))
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    for name, ts in times.items():
        print(f"{name:16s} median {medians[name]:.3f} s  (min {min(ts):.3f}, max {max(ts):.3f}, n={len(ts)})")
    help_s = medians["sdetr --help"]
    print(f"ratio sdetr --help / python -c pass: {help_s / medians['python -c pass']:.1f}")
    print(f"target sdetr --help < 2 s: {'met' if help_s < 2.0 else 'NOT met'} ({help_s:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
