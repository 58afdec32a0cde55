"""MkDocs hooks: publish the benchmarks' own README and reports, so their numbers are written in one place only.

* ``--8<-- "benchmarks/README.md"`` on a line of its own is replaced by that file, with its relative links rebased
  so that they still point at the files next to it (done here rather than by ``pymdownx.snippets``, which would leave
  those links pointing into ``docs/``); links of the published reports into ``docs/`` are rebased likewise;
* every other file under ``benchmarks/`` (reports under ``results/``, scripts), and every repository file their
  Markdown links to, is published at the same path, so those links resolve, and ``mkdocs build --strict`` still
  fails on a link to a file that does not exist.
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
    """Rewrite a link written in the repository file at ``source_dir`` for the site page at ``page_dir``.

    Repository files outside ``docs/`` are published at their repository path; ``docs/x`` is the site's ``x``.
    """
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith(("#", "/")):
        return target
    path, hash_, anchor = target.partition("#")
    in_repository = posixpath.normpath(posixpath.join(source_dir, path))
    on_site = in_repository.removeprefix("docs/") if in_repository.startswith("docs/") else in_repository
    return posixpath.relpath(on_site, page_dir or ".") + hash_ + anchor


def _rebase_links(text: str, source_dir: str, page_dir: str) -> str:
    def inline(m: re.Match[str]) -> str:
        return m["head"] + _rebase(m["target"], source_dir, page_dir) + m["tail"]

    def reference(m: re.Match[str]) -> str:
        return m["head"] + _rebase(m["target"], source_dir, page_dir)

    return _REFERENCE_LINK.sub(reference, _INLINE_LINK.sub(inline, text))


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """Include the published READMEs, and fix the links of published pages, for where they are on the site."""
    page_dir = posixpath.dirname(page.file.src_uri)
    if page.file.src_uri.startswith(tuple(f"{folder}/" for folder in PUBLISHED)):
        # A page published from the repository: its site path is its repository path, except for links into docs/.
        return _rebase_links(markdown, page_dir, page_dir)
    return _INCLUDE.sub(
        lambda m: _rebase_links((ROOT / m["path"]).read_text(encoding="utf-8"), posixpath.dirname(m["path"]), page_dir),
        markdown,
    )


def _linked_repository_files(markdown_file: Path) -> list[Path]:
    """Files of the repository, outside ``docs/``, that a published Markdown file links to."""
    text = markdown_file.read_text(encoding="utf-8")
    targets = [m["target"] for m in _INLINE_LINK.finditer(text)] + [m["target"] for m in _REFERENCE_LINK.finditer(text)]
    linked = []
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith(("#", "/")):
            continue
        path = (markdown_file.parent / target.partition("#")[0]).resolve()
        if path.is_file() and path.is_relative_to(ROOT) and not path.is_relative_to(ROOT / "docs"):
            linked.append(path)
    return linked


def on_files(files: Files, config: Any) -> Files:
    """Publish the files under ``benchmarks/`` (except its README, included in a page) at the same paths.

    Files elsewhere in the repository that they link to (a script, a module) are published at their paths too.
    """
    published: set[Path] = set()
    for folder in PUBLISHED:
        for path in sorted((ROOT / folder).rglob("*")):
            relative = path.relative_to(ROOT)
            if not path.is_file() or any(part in _SKIPPED_PARTS or part.startswith(".") for part in relative.parts):
                continue
            if path.suffix == ".md":
                published.update(_linked_repository_files(path))
            if path.name == "README.md" and path.parent == ROOT / folder:
                continue
            published.add(path)
    for path in sorted(published):
        if path.name == "README.md" and path.parent.relative_to(ROOT).as_posix() in PUBLISHED:
            continue
        files.append(File.generated(config, path.relative_to(ROOT).as_posix(), abs_src_path=str(path)))
    return files
