"""Numbers the documentation quotes from a results file match that file, and every number of it is quoted.

A quoted number follows right after a comment in the Markdown, ``<!-- quoted <file>.<key> -->`` (a line break may
take the place of a space; a line never starts with the comment, which would start an HTML block), where ``<file>``
names ``docs/results/<file>.json`` (written by one command, e.g. ``python -m benchmarks.demo_numbers``) and ``<key>`` an
entry of its ``numbers``. The number written must be that value rounded to as many decimals as are written. The test
reads the committed results: it does not rerun anything.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
PAGES = sorted([ROOT / "README.md", ROOT / "benchmarks" / "README.md", *(ROOT / "docs").glob("*.md")])
QUOTED = re.compile(r"<!--\s+quoted\s+(?P<file>\w+)\.(?P<key>[\w.]+)\s+-->(?P<number>-?\d+(?:\.\d+)?)")


def quotes() -> list[tuple[str, str, str, str]]:
    """``(page, results file, key, number as written)`` for every quoted number of every page."""
    return [
        (str(page.relative_to(ROOT)), m["file"], m["key"], m["number"])
        for page in PAGES
        for m in QUOTED.finditer(page.read_text(encoding="utf-8"))
    ]


def results(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / f"{name}.json").read_text(encoding="utf-8"))


def test_the_readme_and_the_tensorboard_page_quote_the_demo_numbers() -> None:
    pages = {page for page, file, _, _ in quotes() if file == "demo_numbers"}
    assert {"README.md", "docs/tensorboard.md"} <= pages


def test_every_quoted_number_is_its_results_value_rounded_as_written() -> None:
    wrong = []
    for page, file, key, number in quotes():
        numbers = results(file)["numbers"]
        if key not in numbers:
            wrong.append(f"{page}: {file}.{key} is not in docs/results/{file}.json")
            continue
        decimals = len(number.partition(".")[2])
        expected = f"{numbers[key]:.{decimals}f}"
        if expected != number:
            wrong.append(f"{page}: {file}.{key} is written {number}, the results file gives {expected}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("name", sorted({file for _, file, _, _ in quotes()}))
def test_every_number_of_a_results_file_is_quoted_and_the_versions_are_recorded(name: str) -> None:
    data = results(name)
    assert data["torch"] and data["lightning"] and data["command"].startswith("python -m benchmarks.")
    quoted = {key for _, file, key, _ in quotes() if file == name}
    assert sorted(set(data["numbers"]) - quoted) == [], "numbers no page quotes: drop them from the command"


def test_no_line_starts_with_a_quote_comment() -> None:
    # A line that starts with `<!--` starts an HTML block in CommonMark (GitHub): the rest of the paragraph would show
    # as raw text.
    starts = [str(page.relative_to(ROOT)) for page in PAGES if re.search(r"^\s*<!--\s+quoted", page.read_text(), re.M)]
    assert starts == []
