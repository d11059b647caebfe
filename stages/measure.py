"""What a stage measures: peak device and host memory, and seconds."""

from __future__ import annotations

import sys
import time
from pathlib import Path


def reset_peak_memory(device) -> int:
    """Start measuring a stage's model work: reset the CUDA and host peaks (call it after the
    imports, just before loading weights). Returns the host RSS at this point."""
    reset_device_peak(device)
    reset_peak_rss()
    return current_rss()


def peak_memory(device) -> dict:
    """Peak memory so far: the device's peaks on a GPU (device_peak), plus the process's peak RSS always."""
    return {"host_peak_rss_bytes": peak_rss(), **device_peak(device)}


# ---------------------------------------------------------------------------------------------
# Device peaks (issue 18): CUDA (ROCm too) and XPU keep allocator peak counters; MPS keeps none, so
# a thread samples what Metal has allocated.

# How often the MPS sampler looks: a denoise step takes 0.1-2 s on Apple silicon, and the transient
# peaks inside one (attention scores) live for milliseconds to tens of them.
MPS_SAMPLE_SECONDS = 0.005


class MpsPeakSampler:
    """The most MPS memory seen since start(), sampled every MPS_SAMPLE_SECONDS on a daemon thread
    and on every peaks() call: current_allocated_memory() (tensors, like CUDA's allocated) and
    driver_allocated_memory() (all Metal allocations, caches included, like CUDA's reserved)."""

    def __init__(self, interval: float = MPS_SAMPLE_SECONDS) -> None:
        import threading

        self.interval, self.allocated, self.driver = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mps-peak-sampler", daemon=True)

    def start(self) -> MpsPeakSampler:
        self.sample()
        self._thread.start()
        return self

    def sample(self) -> None:
        import torch

        self.allocated = max(self.allocated, torch.mps.current_allocated_memory())
        self.driver = max(self.driver, torch.mps.driver_allocated_memory())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def peaks(self) -> dict:
        self.sample()
        return {"device_max_allocated_bytes": self.allocated, "device_max_reserved_bytes": self.driver}


# The sampler of this stage process, as torch.cuda's peak counters are per process: one stage
# measures one device, and reset_peak_memory starts it afresh.
_MPS_SAMPLERS: list[MpsPeakSampler] = []


def reset_device_peak(device) -> None:
    """Restart the device's peak counters (nothing on the CPU)."""
    import torch

    if device.type in ("cuda", "xpu"):
        getattr(torch, device.type).reset_peak_memory_stats(device)
    elif device.type == "mps":
        while _MPS_SAMPLERS:
            _MPS_SAMPLERS.pop().stop()
        _MPS_SAMPLERS.append(MpsPeakSampler().start())


def device_peak(device) -> dict:
    """The device's peak allocated and reserved bytes since reset_device_peak ({} on the CPU)."""
    import torch

    if device.type in ("cuda", "xpu"):
        backend = getattr(torch, device.type)
        return {"device_max_allocated_bytes": backend.max_memory_allocated(device),
                "device_max_reserved_bytes": backend.max_memory_reserved(device)}
    if device.type == "mps" and _MPS_SAMPLERS:
        return _MPS_SAMPLERS[-1].peaks()
    return {}


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
