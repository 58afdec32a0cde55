"""Publishing a benchmark's markdown report: printed, and written to ``--out`` when one is given."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def publish(lines: Sequence[str], out: Path | None) -> str:
    """Print the report and write it to ``out`` (its folder created) when given; return its text."""
    report = "\n".join(lines) + "\n"
    print(report, end="")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
    return report
