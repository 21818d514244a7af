"""Throughput of the Real-ESRGAN degradation on 8 x 512^2 crops (crops per second).

    python benchmarks/bench_degradation.py [--device cpu|cuda] [--runs 5] [--out FILE]

Each run degrades one batch of 8 random-content 512x512 crops with a different seed (so
the random branches vary as in training); the first run is a warm-up and not counted.
Writes a Markdown table to benchmarks/results/degradation_<device>.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))
sys.path.append(str(ROOT / "benchmarks"))

from machine import machine_name  # noqa: E402

from training.degradation import RealESRGANDegradation  # noqa: E402

BATCH, SIZE = 8, 512


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    out_path = args.out or ROOT / "benchmarks" / "results" / f"degradation_{device.type}.md"

    gen = torch.Generator().manual_seed(0)
    coarse = torch.rand(BATCH, 3, SIZE // 16, SIZE // 16, generator=gen)
    hr = torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bicubic").clamp(0, 1)
    hr = (hr + 0.05 * torch.rand(hr.shape, generator=gen)).clamp(0, 1).to(device)
    degrade = RealESRGANDegradation()

    load = os.getloadavg()
    seconds = []
    for run in range(args.runs + 1):
        _sync(device)
        start = time.perf_counter()
        lr = degrade(hr, torch.Generator().manual_seed(run))
        _sync(device)
        if run:  # run 0 is the warm-up
            seconds.append(time.perf_counter() - start)
    assert lr.shape == (BATCH, 3, SIZE // 4, SIZE // 4)

    median = statistics.median(seconds)
    text = "\n".join([
        "# Real-ESRGAN degradation throughput",
        "",
        f"Machine: {machine_name()}",
        f"Command: `python benchmarks/bench_degradation.py --device {device.type} --runs {args.runs}`",
        "",
        "| batch | crop | runs | median s / batch | min s / batch | crops / s (median) |",
        "|---|---|---|---|---|---|",
        f"| {BATCH} | {SIZE}x{SIZE} | {args.runs} | {median:.3f} | {min(seconds):.3f} | {BATCH / median:.2f} |",
        "",
        "Each run uses another seed, so blur kernels, resize factors and modes, noise type and the final",
        "order vary between runs, hence the spread (an up-resize in the first stage makes every later",
        "stage work on a larger image).",
        f"Load average (1, 5, 15 min) at the start: {', '.join(f'{v:.2f}' for v in load)}"
        " (the machine may be shared; the minimum is the best single-batch figure).",
        f"Per-run seconds: {', '.join(f'{s:.3f}' for s in seconds)}",
        "",
    ])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
