"""MkDocs hooks: publish the benchmarks' own README and reports, so their numbers are written in one place only.

* ``--8<-- "benchmarks/README.md"`` on a line of its own is replaced by that file, with its relative links rebased
  so that they still point at the files next to it (done here rather than by ``pymdownx.snippets``, which would leave
  those links pointing into ``docs/``);
* every other file under ``benchmarks/`` (reports under ``results/``, scripts) is published at the same path, so
  those links resolve, and ``mkdocs build --strict`` still fails on a link to a file that does not exist.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = ("benchmarks",)
_INCLUDE = re.compile(r'^--8<-- "(?P<path>(?:' + "|".join(PUBLISHED) + r')/[^"]+\.md)"[ \t]*$', re.MULTILINE)
_INLINE_LINK = re.compile(r"(?P<head>!?\[[^\]]*\]\()(?P<target>[^)\s]+)(?P<tail>[^)]*\))")
_REFERENCE_LINK = re.compile(r"^(?P<head>\[[^\]]+\]:[ \t]*)(?P<target>\S+)", re.MULTILINE)
_SKIPPED_PARTS = {"__pycache__", ".ipynb_checkpoints"}


def _rebase(target: str, source_dir: str, page_dir: str) -> str:
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith(("#", "/")):
        return target
    path, hash_, anchor = target.partition("#")
    rebased = posixpath.relpath(posixpath.normpath(posixpath.join(source_dir, path)), page_dir or ".")
    return rebased + hash_ + anchor


def _included(match: re.Match[str], page_dir: str) -> str:
    source = match["path"]
    text = (ROOT / source).read_text(encoding="utf-8")
    source_dir = posixpath.dirname(source)

    def inline(m: re.Match[str]) -> str:
        return m["head"] + _rebase(m["target"], source_dir, page_dir) + m["tail"]

    def reference(m: re.Match[str]) -> str:
        return m["head"] + _rebase(m["target"], source_dir, page_dir)

    return _REFERENCE_LINK.sub(reference, _INLINE_LINK.sub(inline, text))


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """Include the published READMEs with their links rebased to the including page."""
    page_dir = posixpath.dirname(page.file.src_uri)
    return _INCLUDE.sub(lambda m: _included(m, page_dir), markdown)


def on_files(files: Files, config: Any) -> Files:
    """Publish the files under ``benchmarks/`` (except its README, included in a page) at the same paths."""
    for folder in PUBLISHED:
        for path in sorted((ROOT / folder).rglob("*")):
            relative = path.relative_to(ROOT)
            if not path.is_file() or (path.name == "README.md" and path.parent == ROOT / folder):
                continue
            if any(part in _SKIPPED_PARTS or part.startswith(".") for part in relative.parts):
                continue
            files.append(File.generated(config, relative.as_posix(), abs_src_path=str(path)))
    return files
