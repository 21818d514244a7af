"""Name the machine a benchmark ran on (CPU model, cores, GPU) for results files."""

from __future__ import annotations

import os
import platform

import torch


def machine_name() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} threads {torch.get_num_threads()}, {gpu}"
