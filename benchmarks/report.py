"""Rebuild every measured table in the README and docs from the records under ``results/``.

    python benchmarks/report.py            # rewrite the marked tables in README.md and docs/*.md
    python benchmarks/report.py --check    # exit 1 (and say where) if a page differs from its rebuild

A table in a page is marked by the source it is rebuilt from::

    <!-- table: record:results/tables/ptb-small.json -->
    | ... the table ... |
    <!-- /table -->

Sources: ``record:<path>`` (a table record written by the command that measured it, see
``benchmarks/records.py``; rendered with a line naming the record, its command, date and
machine), ``records:<path>,<path>,...`` (one-row records with the same columns joined into one table,
e.g. the server load runs of ``benchmarks/serve_load.py --record``), ``study:<name>`` (a study of ``benchmarks/converged_study.py``, from its per-run
records), ``study-budgets`` (the PTB study's test bpc at the 4-epoch cap, 12-epoch cap and
plateau) and ``channels-standin`` (the CIFAR-10 stand-in of ``benchmarks/channels_standin.py``, from
``results/channels/*.json``, seeds averaged). Nothing but ``results/`` is read, so the tables in the pages are exactly what the records say.
"""
from __future__ import annotations

import argparse
import difflib
import importlib.util
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
MARKED = re.compile(r"(<!-- table: (?P<source>[^>]+?) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def _module(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _machine_line(m: dict) -> str:
    parts = [m.get("cpu") or "CPU", f"{m.get('cores')} cores" if m.get("cores") else None,
             f"{m['memory_gib']:g} GiB" if m.get("memory_gib") else None, m.get("gpu")]
    return ", ".join(p for p in parts if p)


def render_record(path: Path) -> str:
    rec = _module("records").read_record(path)
    lines = ["| " + " | ".join(rec["columns"]) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(rec["columns"]))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rec["rows"]]
    cond = rec.get("conditions") or {}
    load = cond.get("load_average_at_start")
    extra = [f"{k.replace('_', ' ')} {v}" for k, v in cond.items() if k != "load_average_at_start" and v is not None]
    when = f"{rec['date']}, {_machine_line(rec['machine'])}, torch {rec['torch']}"
    if load:
        when += f", load average {load[0]:g} at the start"
    if extra:
        when += ", " + ", ".join(extra)
    rel = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    return "\n".join(lines) + f"\n\n*Record `{rel}`: `{rec['command']}` ({when}).*\n"


def render_records(paths: list[Path]) -> str:
    """Several one-table records with the same columns as one table: their rows in order, then one
    line per record naming it, its command, date and conditions."""
    first = _module("records").read_record(paths[0])
    body, notes = [], []
    for path in paths:
        table, _, note = render_record(path).partition("\n\n")
        lines = table.split("\n")
        if lines[0] != "| " + " | ".join(first["columns"]) + " |":
            raise ValueError(f"{path}: columns differ from {paths[0]}'s")
        body += lines[2:]
        notes.append(note.strip())
    return "\n".join(render_record(paths[0]).split("\n")[:2] + body) + "\n\n" + "\n".join(notes) + "\n"


def render_study(results: Path, study: str) -> str:
    return _module("converged_study").table(results, study)


def render_budgets(results: Path) -> str:
    cs = _module("converged_study")
    studies = ["ptb", "ptb-long", "ptb-plateau"]
    lines = ["| model | test bpc, 4-epoch cap | 12-epoch cap | plateau |", "|---|---:|---:|---:|"]
    for cell in cs.STUDIES["ptb"]["cells"]:
        cols = []
        for study in studies:
            vals = [r["test_bpc"] for r in cs._load(results, study) if r["cell"] == cell.key and r.get("status") == "ok"]
            cols.append(cs._fmt(vals, 3) if vals else "n/a")
        lines.append(f"| {cell.label.split(' (')[0]} | " + " | ".join(cols) + " |")
    return "\n".join(lines) + "\n"


def render(source: str, results: Path) -> str:
    kind, _, arg = source.strip().partition(":")
    if kind == "record":
        return render_record(REPO / arg)
    if kind == "records":
        return render_records([REPO / p.strip() for p in arg.split(",")])
    if kind == "study":
        return render_study(results, arg)
    if kind == "study-budgets":
        return render_budgets(results)
    if kind == "channels-standin":
        import json

        records = {p.stem: json.loads(p.read_text()) for p in sorted((results / "channels").glob("*.json"))}
        return _module("channels_standin").table(records)
    raise ValueError(f"unknown table source {source!r} (record:<path>, records:<paths>, study:<name>, "
                     "study-budgets, channels-standin)")


def rebuild(text: str, results: Path) -> str:
    return MARKED.sub(lambda m: m.group(1) + render(m.group("source"), results) + m.group(4), text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only compare; exit 1 if a page differs from its rebuild")
    p.add_argument("--results", default=str(REPO / "results"), help="the records folder (default: results/)")
    a = p.parse_args(argv)
    results, stale = Path(a.results), []
    for page in PAGES:
        path = REPO / page
        text = path.read_text()
        new = rebuild(text, results)
        if new == text:
            continue
        if a.check:
            stale.append(page)
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True), page,
                                                       f"{page} (rebuilt)", n=1))
        else:
            path.write_text(new)
            print(f"rebuilt the tables of {page}")
    if stale:
        print(f"\n{len(stale)} page(s) differ from their records: {', '.join(stale)} "
              "(python benchmarks/report.py rewrites them)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
