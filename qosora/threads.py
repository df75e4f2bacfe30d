"""Thread counts and wait policy that degrade gracefully on a machine shared with other work.

PyTorch's OpenMP threads spin-wait for their siblings at the end of every parallel region. When another process
holds one of the cores, a sibling is descheduled and the rest spin: on 2 cores with one busy process, training
steps went from seconds to 50-100 s. So, before torch is imported (OpenMP reads these once, at start-up):

    OMP_WAIT_POLICY = PASSIVE            idle threads sleep instead of spinning
    OMP_NUM_THREADS = cores free now     the cores this process may use minus those busy in a 0.2 s sample

Either variable already set by the user is left alone (set OMP_NUM_THREADS=N to pin the count).
"""

from __future__ import annotations

import os
import sys
import time


def _cpu_times() -> tuple[int, int] | None:
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values), idle


def busy_cores(interval: float = 0.2) -> float:
    """How many cores other processes kept busy over `interval` seconds (0.0 where /proc/stat is absent)."""
    first = _cpu_times()
    if first is None:
        return 0.0
    time.sleep(interval)
    second = _cpu_times()
    total, idle = second[0] - first[0], second[1] - first[1]
    return (os.cpu_count() or 1) * (total - idle) / total if total > 0 else 0.0


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def thread_settings(cores: int, busy: float, environ: dict) -> dict[str, str]:
    """The environment variables to add: a thread count and a sleeping wait policy when other work holds cores."""
    free = max(1, min(cores, round(cores - busy)))
    if free == cores:
        return {}
    settings = {"OMP_NUM_THREADS": str(free), "OMP_WAIT_POLICY": "PASSIVE"}
    return {k: v for k, v in settings.items() if k not in environ}


def configure_threads() -> None:
    """Apply `thread_settings` to this process; a no-op once torch (and so OpenMP) is loaded."""
    if "torch" in sys.modules:
        return
    os.environ.update(thread_settings(usable_cores(), busy_cores(), os.environ))
