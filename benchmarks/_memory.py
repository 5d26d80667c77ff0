"""Process memory for the benchmarks (Linux): resident-set size and its peak (VmHWM, reset through
/proc/self/clear_refs), and a fresh Python process per measured cell, so that one cell's freed memory (kept by the
allocator) cannot hide another's peak; and the report both print. Used by bench_quantized.py and bench_memory.py."""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident set (`VmRSS`) or its peak since the last `reset_peak` (`VmHWM`), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS, so RSS counts what is alive (glibc keeps them otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def reset_peak() -> None:
    """Start VmHWM again from the current resident set."""
    Path("/proc/self/clear_refs").write_text("5")


def in_fresh_process(script: str | os.PathLike, request: dict[str, Any]) -> Any:
    """`python script --worker JSON(request)` in a new process: the JSON its last stdout line holds, or
    {"error": its last stderr line}."""
    out = subprocess.run([sys.executable, str(script), "--worker", json.dumps(request)], capture_output=True,
                         text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit status {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def results_by_model(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Each model's cells in the order they ran."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        grouped.setdefault(result["model"], []).append(result)
    return grouped


def by_contender(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The cells that ran (no error), by contender."""
    return {r["contender"]: r for r in rows if "error" not in r}


def failed_row(row: dict[str, Any], empty_cells: int) -> str:
    """A table row for a cell that failed: model, contender, its error, then `empty_cells` empty cells."""
    return f"| {row['model']} | {row['contender']} | failed: {row['error']} |" + " |" * empty_cells


def verdict(ratio: float, goal: float) -> str:
    return "met" if ratio <= goal else "missed"


def report(table: str, verdicts: list[str], env: dict[str, Any], results: list[dict[str, Any]],
           json_path: Path | None) -> None:
    """Print the table, the verdicts and the environment (the load average now added); with `json_path`, also
    write the environment and the raw results there."""
    env["loadavg_end"] = os.getloadavg()
    print(table)
    print("\n".join(verdicts))
    print(f"environment: {env}")
    if json_path is not None:
        json_path.write_text(json.dumps({"environment": env, "results": results}, indent=2))
