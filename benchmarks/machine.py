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


def _status_gb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in GiB; nan where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return float("nan")


def rss_gb() -> float:
    """This process's resident memory now (GiB)."""
    return _status_gb("VmRSS")


def peak_rss_gb() -> float:
    """This process's peak resident memory since start or the last reset_peak_rss() (GiB)."""
    return _status_gb("VmHWM")


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS mark of this process (Linux: clear_refs 5); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mem_available_gb() -> float:
    """The machine's MemAvailable (GiB)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return float("nan")
