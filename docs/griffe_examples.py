"""Let the API reference render the package's ``Example:`` sections as runnable examples.

The package's Google-style docstrings head their doctests with ``Example:``. griffe reads that singular heading as an
admonition of plain Markdown, where doctest output such as ``[1.0, 0.5]`` turns into broken reference links; the
plural ``Examples:`` is its section of code blocks. This griffe extension renames the heading while the docs build,
so the package's docstrings stay as they are.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_HEADING = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rename ``Example:`` headings to ``Examples:`` in every docstring griffe loads."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _HEADING.sub(r"\1Examples:", obj.docstring.value)
