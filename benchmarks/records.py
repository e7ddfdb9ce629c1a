"""Records of measured figures: one JSON file per table under ``results/``, written by the command
that measured it, so that every published figure has its command, machine, versions and date.

    {"name", "title", "command", "date", "machine": {...}, "torch", "python",
     "conditions": {...}, "columns": [...], "rows": [[...], ...], "values": {...}}

``columns`` and ``rows`` are the table as published (strings, already formatted); ``values`` holds
the raw numbers they were formatted from. ``benchmarks/report.py`` renders the tables into the
pages from these files alone.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def machine() -> dict[str, Any]:
    """What the figures were measured on: CPU model, cores, memory, GPU (if torch sees one)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory, "gpu": gpu, "os": platform.platform()}


def conditions(**extra: Any) -> dict[str, Any]:
    load = None
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    # what else ran (e.g. "none: background trainings paused with SIGSTOP"), as the person measuring states it
    other = os.environ.get("BENCHMARK_OTHER_PROCESSES")
    return {"load_average_at_start": load, **({"other_processes": other} if other else {}), **extra}


def command_line(argv: list[str] | None = None) -> str:
    """The command as a user would type it from the repository root."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0])
    try:
        script = script.resolve().relative_to(REPO)
    except ValueError:
        pass
    return " ".join(["python", shlex.quote(str(script)), *map(shlex.quote, argv[1:])])


def write_record(path: str | os.PathLike, *, name: str, title: str, columns: list[str], rows: list[list[Any]],
                 values: dict[str, Any] | None = None, command: str | None = None,
                 extra_conditions: dict[str, Any] | None = None, started: dict[str, Any] | None = None) -> Path:
    """Write the record of one table. ``started``: :func:`conditions` taken when the measurement began."""
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    record = {
        "name": name,
        "title": title,
        "command": command or command_line(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": machine(),
        "torch": torch_version,
        "python": platform.python_version(),
        "conditions": {**(started or conditions()), **(extra_conditions or {})},
        "columns": list(columns),
        "rows": [[str(c) for c in row] for row in rows],
        "values": values or {},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def emit_table(columns: list[str], rows: list[list[Any]], record: str | os.PathLike | None = None, *,
               title: str, started: dict[str, Any] | None = None, values: dict[str, Any] | None = None) -> None:
    """Print the table as markdown and, when ``record`` names a path, write it there as a record."""
    print("| " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * (len(columns) - 1))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    if record:
        path = write_record(record, name=Path(record).stem, title=title, columns=columns, rows=rows,
                            started=started, values=values)
        print(f"\nwrote {path}")


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    record = json.loads(Path(path).read_text())
    for key in ("name", "command", "date", "machine", "torch", "columns", "rows"):
        if key not in record:
            raise ValueError(f"{path}: not a table record (no {key!r})")
    return record
