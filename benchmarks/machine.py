"""What every benchmark shares about the machine: its description for results files (CPU
model, cores, RAM, versions, GPU), this process's memory, and waiting for free memory on a
shared machine."""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch


def machine_name() -> str:
    """'<CPU model>, N cores, M GiB RAM, torch V threads T, Python P, <GPU or no GPU>'."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        ram = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2 ** 30:.0f} GiB RAM"
    except (OSError, ValueError):
        ram = "RAM unknown"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {ram}, torch {torch.__version__} threads "
            f"{torch.get_num_threads()}, Python {platform.python_version()}, {gpu}")


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


def wait_for_memory(need_gb: float, wait_min: float, who: str) -> None:
    """Block until the machine has `need_gb` GiB available (it is shared), at most `wait_min`
    minutes; then SystemExit with a message that starts with `who` (the benchmark)."""
    deadline = time.time() + 60 * wait_min
    while mem_available_gb() < need_gb:
        if time.time() > deadline:
            raise SystemExit(f"{who}: only {mem_available_gb():.1f} GB available after waiting "
                             f"{wait_min:g} min; {need_gb:g} GB are needed. Try again on a quieter machine.")
        time.sleep(20)


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


def median_time(fn, runs: int, warmup: int) -> float:
    """Median wall time of `fn()` in seconds, CUDA-synchronised, after `warmup` calls."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
