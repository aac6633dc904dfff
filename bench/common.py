"""Helpers shared by the benchmark driver and its in-process worker: machine facts, BLAS
choice, percentiles, CPU accounting. Standard library only, so the driver stays light."""

from __future__ import annotations

import os
import platform
import statistics
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Debian's libopenblas0-pthread; mlx-cpu's bundled reference BLAS is far slower (DESIGN.md).
OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def find_openblas() -> str | None:
    for path in OPENBLAS_CANDIDATES:
        if os.path.exists(path):
            return path
    return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_facts(blas: str) -> dict[str, object]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(),
        "mlx": version("mlx"),
        "mlx_lm": version("mlx-lm"),
        "grpcio": version("grpcio"),
        "httpx": version("httpx"),
        "lmlink": version("lmlink"),
        "blas": blas,
        "loadavg_at_start": os.getloadavg()[0],
    }


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]; nan for no values."""
    if not values:
        return float("nan")
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def process_cpu_seconds(pid: int) -> float:
    """User+system CPU of a whole process (all threads) from /proc; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the ")" the fields start at #3 (state): utime is #14, stime #15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def process_memory(pid: int) -> dict[str, float]:
    """Resident memory of a process in MB (10^6 bytes) from /proc/PID/status: `rss_mb` now
    (VmRSS) and `peak_rss_mb` (VmHWM, the high-water mark since it started: model load,
    prefill buffers and caches included). nan when the process is gone or there is no /proc.
    """
    found = {"VmRSS": float("nan"), "VmHWM": float("nan")}
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        key, _, value = line.partition(":")
        if key in found:  # "VmRSS:\t  123456 kB"
            found[key] = int(value.split()[0]) * 1024 / 1e6
    return {"rss_mb": found["VmRSS"], "peak_rss_mb": found["VmHWM"]}


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (everything but idle and iowait)."""
    try:
        parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0
    ticks = [int(p) for p in parts]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    # guest time is already counted in user/nice.
    busy = sum(ticks[:8]) - idle
    return busy / CLOCK_TICKS


def eprint(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def publish(result: dict, text: str, json_path: str | None, tag: str, started: float) -> None:
    """Print a finished run's Markdown and write its JSON (every number) if asked."""
    import json
    import os
    import time
    from pathlib import Path

    result["machine"]["loadavg_at_end"] = os.getloadavg()[0]
    result["elapsed_s"] = time.perf_counter() - started
    print(text)
    print(f"\n(run took {result['elapsed_s']:.0f} s)")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2, default=float) + "\n")
        eprint(f"{tag}: wrote {json_path}")
