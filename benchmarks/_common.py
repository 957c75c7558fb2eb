"""Shared helpers of the benchmark scripts: timing, honest peak memory, machine description, CSV/JSON output."""

from __future__ import annotations

import csv
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch


RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on, recorded next to them."""
    cpu = platform.processor()
    try:
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        pass
    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device) -> float:
    """Wall-clock seconds of one call, with the GPU drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def _proc_status_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def peak_extra_memory(fn, device: torch.device) -> int:
    """Peak memory (bytes) `fn` needs beyond what was allocated before it, outputs included.

    CUDA: `torch.cuda.max_memory_allocated` after a reset. CPU: tracemalloc does not see torch's allocations, so this
    reads the process's peak resident set: reset VmHWM, note VmRSS, call, read VmHWM. It is honest only when freed
    memory goes back to the OS, which `ensure_mmap_threshold` arranges (glibc otherwise keeps freed heap pages).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del out
        return peak
    Path("/proc/self/clear_refs").write_text("5")
    before = _proc_status_kib("VmRSS")
    out = fn()
    peak = _proc_status_kib("VmHWM") - before
    del out
    return peak * 1024


def ensure_mmap_threshold() -> None:
    """Re-executes this script with glibc's mmap threshold fixed at 64 KiB, so every tensor larger than that is
    mmapped and returned to the OS when freed: the peak RSS then measures what a call allocates, not what an earlier
    call left in the heap. (A fixed threshold also stops glibc from raising it after large frees.)"""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def median(values):
    return statistics.median(values) if values else float("nan")


def write_results(stem: str, rows: list[dict], meta: dict, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Writes `rows` as `<stem>.csv` and `{"meta": meta, "rows": rows}` as `<stem>.json`; returns both paths."""
    out_dir = Path(out_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.json"
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    return csv_path, json_path


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain fixed-width table of `columns` (floats with 3 significant digits)."""

    def fmt(value):
        if isinstance(value, float):
            return f"{value:.3g}"
        return "" if value is None else str(value)

    cells = [[fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)
