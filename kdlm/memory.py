"""Resident-memory readings of the current process, shared by training, `kdlm plan`, evaluation and benchmarks.

On Linux the peak is VmHWM, the high-water mark of this process's own address space. `ru_maxrss` is not used
there: Linux carries it over `exec`, so a `kdlm` process started by a large parent (a notebook, a benchmark
driver) would report the parent's peak instead of its own.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Optional

MiB = 2**20


def proc_status_mb(field: str) -> Optional[float]:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM, ...) in MiB; None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**10
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident set in MiB: VmHWM on Linux, else ru_maxrss (bytes on macOS, KiB elsewhere)."""
    hwm = proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage / MiB if sys.platform == "darwin" else usage / 2**10


def current_rss_mb() -> float:
    """This process's resident set now, in MiB (the peak so far where /proc is missing)."""
    current = proc_status_mb("VmRSS")
    return current if current is not None else peak_rss_mb()


def reset_peak_rss() -> float:
    """Reset the peak to the current resident set where Linux allows it; returns the baseline to subtract."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset VmHWM to the current RSS
        current = proc_status_mb("VmRSS")
        if current is not None:
            return current
    except OSError:
        pass
    return peak_rss_mb()
