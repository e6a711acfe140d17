"""What every benchmark of this folder shares: the methods, timing, peak memory, the machine and the JSON report.

Example:
    >>> import torch
    >>> seconds = timed(lambda: torch.ones(8) * 2, torch.device("cpu"), repeats=3, warmup=1)
    >>> seconds >= 0
    True
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from anomalib_faprompt.methods import METHODS as METHOD_LIST
from anomalib_faprompt.signatures import constructor_parameters

#: Every method of the package (``anomalib_faprompt.methods.METHODS``), by short name: its Lightning class.
METHODS = {name: method.load() for name, method in METHOD_LIST.items()}


def accepted_settings(model_class: type, config: dict[str, Any]) -> dict[str, Any]:
    """The settings of ``config`` that ``model_class`` takes (``feature_layers`` only where a method has them)."""
    parameters = constructor_parameters(model_class)  # its own and those it passes on (``**kwargs``) to its bases
    return {key: value for key, value in config.items() if key in parameters}


def synchronise(device: torch.device) -> None:
    """Wait for queued GPU work, so wall time covers it (nothing to wait for on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time of ``function`` in seconds, after ``warmup`` untimed runs.

    Args:
        function: Work to time.
        device: Device it runs on (synchronised before reading the clock).
        repeats: Timed runs.
        warmup: Untimed runs before them.
    """
    for _ in range(warmup):
        function()
    synchronise(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronise(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _resident_mb() -> float:
    """Current resident set size of this process in MiB (Linux), else the peak so far."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMemory:
    """Peak memory during a ``with`` block: CUDA allocator peak, or sampled process RSS on CPU.

    Args:
        device: Device whose memory to watch.
        interval: Sampling period in seconds on CPU.

    Example:
        >>> with PeakMemory(torch.device("cpu")) as peak:
        ...     _ = torch.ones(1024, 1024)
        >>> peak.megabytes > 0
        True
    """

    def __init__(self, device: torch.device, interval: float = 0.005) -> None:
        self.device = device
        self.interval = interval
        self.megabytes = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.megabytes = max(self.megabytes, _resident_mb())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.megabytes = _resident_mb()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.device.type == "cuda":
            synchronise(self.device)
            self.megabytes = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.megabytes = max(self.megabytes, _resident_mb())


#: The CPU flags that decide which speed targets hold (int8 dot products, bf16, AMX tiles).
CPU_FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu() -> dict[str, Any]:
    """The CPU's model name and the flags of :data:`CPU_FLAGS_OF_INTEREST` it has (Linux ``/proc/cpuinfo``)."""
    name, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return {"cpu": name, "cpu_flags": [flag for flag in CPU_FLAGS_OF_INTEREST if flag in flags],
            "cpu_cores": os.cpu_count()}  # fmt: skip


def machine(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on: device, CPU name and flags, threads, versions, how memory is read."""
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        **cpu(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "memory": "CUDA allocator peak" if device.type == "cuda" else "process peak RSS (sampled)",
    }


def emit(report: dict[str, Any], output: str | None) -> dict[str, Any]:
    """Print the JSON report and, if ``output`` is given, write it there atomically; returns it."""
    text = json.dumps(report, indent=2)
    print(text)
    if output:
        path = Path(output)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(text + "\n")
        temporary.replace(path)
    return report
