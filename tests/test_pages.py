"""The user pages (README.md, docs/*.md, the comments of configs/**/*.yaml) describe the software and
its measurements: for each figure the machine, the command, the conditions and the date. They say
nothing about how the work was organised (issue numbers, sessions, rounds, who ran what), and they
never point at a folder a user does not have (``../shared``: data live in the data folder,
``$HYPERNETWORKS_DATA``). Module docstrings in src/ follow the same rules."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: Process wording: (pattern, what it catches). Benchmark words stay allowed: "interleaved rounds",
#: "--rounds 7", "round trip", "rounding", "the HyperLSTM's lead of 0.49 bpc".
PROCESS = [
    (r"\bissues?\s*#?\d+", "an issue number"),
    (r"\(#\d+\)", "an issue or pull-request number"),
    (r"\b(?:PR|pull\s+request)\s*#?\d+", "a pull-request number"),
    (r"\bthe\s+issue\b", "'the issue'"),
    (r"\bsessions?\b", "a work session"),
    (r"\b(?:this|that|previous|latest|last|next|earlier|later)\s+round\b", "a work round"),
    (r"\bend[- ]of[- ](?:(?:this|the)[- ])?round\b", "a work round"),
    (r"\bround\s+\d+\b", "a numbered work round"),
    (r"\bagents?\b", "who shared the machine"),
    (r"\bthe\s+lead\b(?!\s+(?:of|over)\b)|\blead's\b", "who ran what"),
    (r"\b(?:was|were|is|be)\s+lent\b", "what was lent to whom"),
    (r"\breview(?:er|ers|ed)?\b", "a review"),
    (r"\bof\s+mine\b", "who ran what"),
    (r"\bthis\s+work\b", "the work rather than the software"),
]
SHARED = (r"\.\./shared\b", "a checkout-relative ../shared folder (use the data folder, $HYPERNETWORKS_DATA)")


def _pages() -> list[Path]:
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    return pages + sorted((REPO / "configs").rglob("*.yaml"))


def _text(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".yaml":  # only the comments of a recipe are prose
        return "\n".join(line.split("#", 1)[1] if "#" in line else "" for line in text.splitlines())
    return text


def _hits(text: str, rules) -> list[str]:
    """Every match, with its line; line breaks count as spaces, so a phrase wrapped over two lines
    ("a later\nsession") is found too."""
    flat = text.replace("\n", " ")
    found = []
    for pattern, what in rules:
        for m in re.finditer(pattern, flat, flags=re.IGNORECASE):
            lineno = text.count("\n", 0, m.start()) + 1
            context = flat[max(0, m.start() - 50):m.end() + 50].strip()
            found.append(f"line {lineno}: {m.group(0)!r} ({what}): ...{context}...")
    return found


def test_there_are_pages_to_check():
    names = {p.name for p in _pages()}
    assert {"README.md", "char_lm.md", "rnn_speed.md"} <= names
    assert sum(p.suffix == ".yaml" for p in _pages()) > 20


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_page_speaks_only_of_the_software(page):
    hits = _hits(_text(page), [*PROCESS, SHARED])
    assert not hits, f"{page.relative_to(REPO)} has process wording or a ../shared path:\n" + "\n".join(hits)


def _module_docstrings() -> list[tuple[Path, str]]:
    out = []
    for path in sorted((REPO / "src" / "hypernetworks").rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        if doc:
            out.append((path, doc))
    return out


def test_module_docstrings_speak_only_of_the_software():
    rules = [r for r in PROCESS if r[1] not in ("a work round", "a numbered work round")] + [SHARED]
    bad = []
    for path, doc in _module_docstrings():
        bad += [f"{path.relative_to(REPO)}: {h}" for h in _hits(doc, rules)]
    assert not bad, "module docstrings with process wording:\n" + "\n".join(bad)


@pytest.mark.parametrize("text", [
    "Measured at the end of this round on the 2-core CPU",
    "(issue 9; `python benchmarks/converged_study.py`)",
    "as asked in #14 (#14)",
    "run by the lead with the command",
    "The ChannelViT run came in a later\nsession on a nearly idle machine",
    "while five agents shared the two cores",
    "no GPU was lent to this session",
    "HYPERNETWORKS_DATA=../shared/data python benchmarks/static_speed.py",
])
def test_the_rules_catch_process_wording(text):
    assert _hits(text, [*PROCESS, SHARED])


@pytest.mark.parametrize("text", [
    "Times are medians of interleaved rounds (`--rounds 7`)",
    "results agree with the eager reference to rounding; state_dict round trip; XML round-trip",
    "the HyperLSTM's lead of about 0.49 bpc; at 4 epochs the lead over the LSTM",
    "HYPERNETWORKS_DATA=/path/to/data .venv/bin/python -m pytest -q",
    "one per class per round, the classes of a round in a random order",
])
def test_the_rules_leave_benchmark_words_alone(text):
    assert not _hits(text, [*PROCESS, SHARED])
