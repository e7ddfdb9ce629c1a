"""Every marked table in the README and docs equals its rebuild from the records in results/
(``python benchmarks/report.py --check``), and the rebuild renders records faithfully."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_pages_equal_their_rebuild_from_results(capsys):
    report = _module("report")
    code = report.main(["--check"])
    assert code == 0, capsys.readouterr().out
    marked = sum(len(report.MARKED.findall((REPO / page).read_text())) for page in report.PAGES)
    assert marked >= 6  # the study tables at least


def test_a_table_that_differs_from_its_record_is_found(tmp_path):
    report, records = _module("report"), _module("records")
    rec = records.write_record(tmp_path / "t.json", name="t", title="a table", columns=["model", "bpc"],
                               rows=[["LSTM", "2.564"], ["HyperLSTM", "2.078"]], values={"LSTM": 2.5644},
                               command="python benchmarks/x.py --steps 3")
    page = (f"text\n<!-- table: record:{rec} -->\n| model | bpc |\n|---|---:|\n| LSTM | 2.564 |\n"
            "| HyperLSTM | 2.070 |\n<!-- /table -->\nmore\n")
    rebuilt = report.rebuild(page, REPO / "results")
    assert "| HyperLSTM | 2.078 |" in rebuilt and "2.070" not in rebuilt
    assert "`python benchmarks/x.py --steps 3`" in rebuilt and rebuilt.startswith("text\n") and rebuilt.endswith("more\n")
    assert report.rebuild(rebuilt, REPO / "results") == rebuilt  # a rebuilt page is its own rebuild
    stored = records.read_record(rec)
    assert stored["machine"]["cores"] and stored["torch"] and stored["date"]
