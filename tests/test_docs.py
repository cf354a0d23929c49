"""The theory document and the references to it: each one names a section of docs/THEORY.md that exists.

Pure text (no JAX).  A reference is the word THEORY (not part of an identifier such as ``THEORY_TIMES``)
in the package, the tests, the experiments, the benchmarks, the scripts, README.md and docs/*.md; it
must read "docs/THEORY.md §N" or "§N.M", optionally followed by more sections ("§2, §4 and §6",
"§1-§13"), and every section it names must be a heading of docs/THEORY.md.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "THEORY.md"
SCANNED_DIRS = ("gradflow", "tests", "experiments", "benchmarks", "scripts")
TEXT_SUFFIXES = (".py", ".md", ".sh", ".txt", ".toml", ".cfg", ".ini", ".yml", ".yaml")

WORD = re.compile(r"\bTHEORY\b")
SECTION = r"§\d+(?:\.\d+)?"
REFERENCE = re.compile(rf"docs/THEORY\.md\s+({SECTION}(?:(?:,\s*|\s+and\s+|\s*[-–]\s*){SECTION})*)")
NUMBER = re.compile(r"§(\d+(?:\.\d+)?)")
HEADING = re.compile(r"^(#{2,3}) (.*)$")
TOP = re.compile(r"^(\d+)\. \S")
SUB = re.compile(r"^(\d+)\.(\d+) \S")

# sections 1-9 keep the numbering of the source summary, so "§7" means the cap wherever it is cited
KEPT_TITLES = {
    1: "The task",
    2: "The model",
    3: "The objective in closed form",
    4: "The dynamics",
    5: "What the theory predicts",
    6: "The authors' experiments",
    7: "Finite rollouts (the cap)",
    8: "Policy-gradient noise",
    9: "Data design",
}


def _headings() -> list[tuple[str, str]]:
    """(level "##" or "###", text) of every section heading of docs/THEORY.md, in order."""
    return [m.groups() for m in map(HEADING.match, DOC.read_text(encoding="utf-8").splitlines()) if m]


def _section_numbers() -> set[str]:
    """Every section and subsection number that is a heading: {"1", "1.1", ..., "13"}."""
    return {text.split(" ", 1)[0].rstrip(".") for _, text in _headings()}


def _scanned_files() -> list[Path]:
    files = [ROOT / "README.md"] + sorted(p for p in (ROOT / "docs").glob("*.md") if p != DOC)
    for folder in SCANNED_DIRS:
        files += sorted(
            p for p in (ROOT / folder).rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts
        )
    return [p for p in files if p.exists() and p.resolve() != Path(__file__).resolve()]


def find_references(text: str) -> list[tuple[int, str, list[str] | None]]:
    """(line, the line's text, the section numbers named) per reference; None where the form is wrong."""
    out = []
    for word in WORD.finditer(text):
        line = text.count("\n", 0, word.start()) + 1
        start = word.start() - len("docs/")
        match = REFERENCE.match(text, start) if start >= 0 and text[start : word.start()] == "docs/" else None
        sections = NUMBER.findall(match.group(1)) if match else None
        out.append((line, text.splitlines()[line - 1].strip(), sections))
    return out


def test_every_reference_names_an_existing_section():
    existing = _section_numbers()
    found, bad = 0, []
    for path in _scanned_files():
        for line, source, sections in find_references(path.read_text(encoding="utf-8")):
            found += 1
            where = f"{path.relative_to(ROOT)}:{line}: {source}"
            if sections is None:
                bad.append(f"{where}\n    not of the form 'docs/THEORY.md §N' or '§N.M'")
            for number in sections or []:
                if number not in existing:
                    bad.append(f"{where}\n    §{number} is not a heading of docs/THEORY.md")
    assert found >= 30, f"only {found} references found: is the scan still looking in the right places?"
    assert not bad, "references to docs/THEORY.md that do not resolve:\n" + "\n".join(bad)


def test_the_reference_check_catches_a_broken_reference():
    good = "see docs/THEORY.md §3.3 and (docs/THEORY.md §2, §4 and §6); docs/THEORY.md §1-§13"
    assert [s for _, _, s in find_references(good)] == [["3.3"], ["2", "4", "6"], ["1", "13"]]
    assert [s for _, _, s in find_references("THEORY.md section 7; THEORY: 0.22")] == [None, None]
    assert find_references("THEORY_TIMES[8]") == []
    assert "99" not in _section_numbers() and "3.99" not in _section_numbers()


def test_sections_are_numbered_consecutively():
    top, sub, current = [], {}, None
    for level, text in _headings():
        if level == "##":
            match = TOP.match(text)
            assert match, f"top-level heading without a number 'N. ': {text!r}"
            current = int(match.group(1))
            top.append(current)
            sub[current] = []
        else:
            match = SUB.match(text)
            assert match, f"subsection heading without a number 'N.M ': {text!r}"
            assert int(match.group(1)) == current, f"subsection {text!r} sits under section {current}"
            sub[current].append(int(match.group(2)))
    assert top == list(range(1, len(top) + 1)), f"top-level sections {top}"
    for section, numbers in sub.items():
        assert numbers == list(range(1, len(numbers) + 1)), f"subsections of §{section}: {numbers}"


def test_sections_1_to_9_keep_the_source_numbering():
    titles = {int(TOP.match(text).group(1)): text.split(" ", 1)[1] for level, text in _headings() if level == "##"}
    for number, title in KEPT_TITLES.items():
        assert titles.get(number) == title, f"§{number} must be {title!r}, got {titles.get(number)!r}"
