"""How long a process of the pack takes to exit once its work is done: Python's own shutdown
(`sys.exit(main())`) against host.run_main (gc.freeze() first), after the imports of a CLI or
trainer run (torch, ComfyUI's comfy.sd, the trainer). Runs alternate between the two.

    python benchmarks/bench_exit.py [--runs 5]      -> benchmarks/results/exit_cpu.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from machine import machine_name  # noqa: E402

from d3sr_core.atomic_file import write_text_atomic  # noqa: E402

# The child: the imports of a CLI / trainer process, then "work done" (a timestamp), then exit.
CHILD = """
import sys, time
from d3sr_core import host
host.import_comfy(cpu=True)
import comfy.sd, training.trainer

def main():
    print(time.time(), flush=True)
    return 0

if sys.argv[1] == "run_main":
    host.run_main(main)
sys.exit(main())
"""


def exit_seconds(mode: str) -> float:
    """Seconds from the child's last line of work to its exit having been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, mode], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    done = float(proc.stdout.readline())
    proc.wait()
    end = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"the child ({mode}) exited with {proc.returncode}")
    return end - done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"sys.exit": [], "run_main": []}
    for _ in range(args.runs):
        for mode in times:
            times[mode].append(exit_seconds(mode))
    plain, frozen = (statistics.median(times[m]) for m in times)
    lines = ["# Process exit after the work is done (CPU)", "",
             f"Machine: {machine_name()}", "",
             f"Command: `python benchmarks/bench_exit.py --runs {args.runs}` (runs alternated).", "",
             "| exit | median | runs |", "|---|---|---|"]
    for mode, ts in times.items():
        runs = ", ".join(f"{t:.2f}" for t in ts)
        lines.append(f"| {mode} | {statistics.median(ts):.2f} s | {runs} |")
    lines += ["", f"run_main / sys.exit: **{frozen / plain:.2f}** ({plain - frozen:.2f} s less per process)."]
    out = os.path.join(ROOT, "benchmarks", "results", "exit_cpu.md")
    write_text_atomic(out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
