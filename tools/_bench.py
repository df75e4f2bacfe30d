"""Shared benchmark plumbing: run a child process, return its wall time and peak RSS; medians; JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def run_child(args: list[str], env: dict | None = None) -> dict:
    """Run `python args...` and return wall seconds, peak RSS (bytes) and the child's last stdout line as JSON."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "BITSANDBYTES_NOWELCOME": "1", **(env or {})}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out, err = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"child {args} failed:\n{err[-3000:]}")
    return {"seconds": wall, "peak_rss_bytes": usage.ru_maxrss * 1024, "child": _json_result(out)}


def _json_result(out: str):
    """The child's result: its whole stdout as JSON, else its last line that is a JSON object."""
    try:
        return json.loads(out)
    except json.JSONDecodeError:
        last = [l for l in out.splitlines() if l.startswith("{")]
        return json.loads(last[-1]) if last else None


def median(xs):
    return statistics.median(xs)


_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_tile", "f16c", "fma")


def cpu_flags() -> list[str]:
    """The instruction-set flags that decide onnxruntime's int4 and PyTorch's bf16 speed (from /proc/cpuinfo)."""
    try:
        line = next(l for l in open("/proc/cpuinfo") if l.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return sorted(set(line.split(":", 1)[1].split()) & set(_FLAGS))


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu_flags": cpu_flags()}


def write_json(path: str | Path, obj: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2))
    print(f"wrote {path}")
