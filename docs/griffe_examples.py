"""Adapt the package's docstrings to the API reference while the docs build; the docstrings stay as they are.

* ``Example:`` headings become ``Examples:``: griffe reads the singular heading as an admonition of plain Markdown,
  where doctest output such as ``[1.0, 0.5]`` turns into broken reference links, and the plural as its section of
  code blocks.
* Sphinx roles (``:class:`~lightning_layca.Uniform```, ``:meth:`cache_key```) become Markdown: a cross-reference when
  the target is a fully qualified ``lightning_layca`` name (the build fails if it is not documented), inline code
  otherwise.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_HEADING = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|obj|exc):`(?P<tilde>~?)(?P<target>[\w.]+)`")


def _role(match: re.Match[str]) -> str:
    target = match["target"]
    shown = target.rsplit(".", 1)[-1] if match["tilde"] else target
    if target.startswith("lightning_layca."):
        return f"[`{shown}`][{target}]"
    return f"`{shown}`"


class ExampleSections(griffe.Extension):
    """Rename ``Example:`` headings to ``Examples:`` and turn Sphinx roles into Markdown in every docstring."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = _HEADING.sub(r"\1Examples:", obj.docstring.value)
            obj.docstring.value = _ROLE.sub(_role, text)
