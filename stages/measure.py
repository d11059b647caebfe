"""What a stage measures: peak device and host memory, and seconds."""

from __future__ import annotations

import sys
import time
from pathlib import Path


def reset_peak_memory(device) -> int:
    """Start measuring a stage's model work: reset the CUDA and host peaks (call it after the
    imports, just before loading weights). Returns the host RSS at this point."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reset_peak_rss()
    return current_rss()


def peak_memory(device) -> dict:
    """Peak memory so far: CUDA allocator peaks on a GPU, plus the process's peak RSS always."""
    import torch

    peaks = {"host_peak_rss_bytes": peak_rss()}
    if device.type == "cuda":
        peaks["device_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        peaks["device_max_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return peaks


def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS counter (VmHWM), so the peak measures this stage's work and
    not the import of torch and friends. Linux only; elsewhere the peak is the process's."""
    try:
        Path("/proc/self/clear_refs").write_text("5", encoding="utf-8")
    except OSError:
        pass


def peak_rss() -> int:
    """Peak resident set size since the last reset_peak_rss (Linux VmHWM), else since process start:
    the peak working set on Windows, ru_maxrss on macOS (bytes there, KiB on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    import psutil

    info = psutil.Process().memory_info()
    if sys.platform == "win32":
        return int(getattr(info, "peak_wset", info.rss))
    try:
        import resource  # macOS and other Unixes; Windows has none
    except ImportError:
        return int(info.rss)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(int(maxrss if sys.platform == "darwin" else maxrss * 1024), int(info.rss))


def current_rss() -> int:
    """Resident set size now, to tell a stage's own memory from the interpreter's (psutil: any OS)."""
    import psutil

    try:
        return int(psutil.Process().memory_info().rss)
    except psutil.Error:
        return 0


def format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


class Clock:
    """Wall-clock seconds since creation, for records and summaries."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 3)
