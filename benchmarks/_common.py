"""Shared helpers of the benchmark scripts: timing, honest peak memory, machine description, CSV/JSON output."""

from __future__ import annotations

import csv
import ctypes
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
    reads the process's peak resident set: reset VmHWM, note VmRSS, call, read VmHWM. That is honest only while freed
    memory goes back to the OS, so the call runs with glibc in its "return" mode (`set_malloc`), and the "reuse" mode
    the timings run in is restored after it.
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
    set_malloc("return")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _proc_status_kib("VmRSS")
        out = fn()
        peak = _proc_status_kib("VmHWM") - before
        del out
    finally:
        set_malloc("reuse")
    return peak * 1024


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4


def set_malloc(mode: str) -> None:
    """Switches glibc's malloc, in this process, between two behaviours (a no-op where libc is not glibc):

    - "reuse": no block is mmapped and the heap is never trimmed, so freed memory is reused without page faults, as
      torch's CUDA caching allocator reuses its blocks. Timings run in this mode: by default glibc gives every block
      above its mmap threshold (at most 32 MiB) fresh pages from the kernel and returns them at free, so a call that
      allocates large temporaries pays page faults and zeroing on every use, a CPU-only cost (expensive on virtual
      machines that hand freed memory back to the host) that no GPU run has.
    - "return": every block above 64 KiB is mmapped and returned at free, after the heap's free pages are released:
      the peak resident set then measures what a call allocates, not what earlier calls left in the heap.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return
    if mode == "reuse":
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # mallopt takes an int: 2 GiB of free top before any trim
    elif mode == "return":
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
        libc.mallopt(_M_MMAP_MAX, 1 << 30)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)
    else:
        raise ValueError(mode)


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
