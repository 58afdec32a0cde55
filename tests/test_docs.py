"""Every code snippet of the documentation (docs/*.md) runs as printed.

* ```python blocks run in order, one namespace per page (a page reads like a notebook), in a fresh working directory;
* ```pycon blocks are doctests: their printed output is checked;
* ```yaml blocks are LightningCLI configs of the examples: a complete one (with ``model:``) is instantiated, one with
  a ``LaycaCallback`` is also fitted for two batches on a small data set so its schedule meets the real layers; a
  fragment is layered on top of the demo config;
* ```bash blocks, the README's included, may only hold commands this file knows how to check: ``python -m
  examples.cli`` lines are parsed by the CLI (``--print_config``), ``pip install`` extras must exist, ``make`` targets
  and variables must exist; the Configuration page's own-model script (``python train.py``) trains from its YAML file.
"""

from __future__ import annotations

import contextlib
import doctest
import importlib.metadata
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
DEMO_CONFIG = ROOT / "examples" / "configs" / "mnist1d_layca.yaml"
FENCE = re.compile(r"^```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


SNIPPET = re.compile(r'^--8<-- "(?P<path>[^"]+)"$', re.MULTILINE)


def include_snippets(text: str) -> str:
    """Replace pymdownx.snippets lines (``--8<-- "path"``, relative to the repository root) by the file's text."""
    return SNIPPET.sub(lambda m: (ROOT / m["path"]).read_text().rstrip("\n"), text)


def fences(page: Path) -> list[tuple[str, str]]:
    """Every fenced block of ``page`` in order, as (language, text)."""
    return [(m["lang"], include_snippets(m["body"])) for m in FENCE.finditer(page.read_text())]


def blocks(page: Path, lang: str) -> list[str]:
    return [body for kind, body in fences(page) if kind == lang]


def block_after(page: Path, lang: str, index: int) -> tuple[str, str] | None:
    """The fenced block that follows the ``index``-th block of ``lang`` on ``page``."""
    positions = [i for i, (kind, _) in enumerate(fences(page)) if kind == lang]
    following = positions[index] + 1
    all_fences = fences(page)
    return all_fences[following] if following < len(all_fences) else None


def is_contained(part: Any, whole: Any) -> bool:
    """Whether every key and value of ``part`` is in ``whole`` (mappings by key, lists item by item)."""
    if isinstance(part, dict):
        return isinstance(whole, dict) and all(k in whole and is_contained(v, whole[k]) for k, v in part.items())
    if isinstance(part, list):
        return isinstance(whole, list) and len(part) == len(whole) and all(map(is_contained, part, whole))
    return bool(part == whole)


def pages_with(lang: str) -> list[Any]:
    return [pytest.param(page, id=page.stem) for page in sorted(DOCS.glob("*.md")) if blocks(page, lang)]


def indexed_blocks(lang: str, extra_pages: tuple[Path, ...] = ()) -> list[Any]:
    return [
        pytest.param(page, i, id=f"{page.stem}-{i}")
        for page in [*sorted(DOCS.glob("*.md")), *extra_pages]
        for i, _ in enumerate(blocks(page, lang))
    ]


def test_the_docs_have_snippets_of_every_kind_checked_here() -> None:
    found = {lang: sum(len(blocks(page, lang)) for page in DOCS.glob("*.md")) for lang in ("python", "yaml", "bash")}
    assert all(count > 0 for count in found.values()), found
    languages = {m["lang"] for page in DOCS.glob("*.md") for m in FENCE.finditer(page.read_text())}
    # "text" blocks hold formulas and tag names, not code.
    assert languages <= {"python", "pycon", "yaml", "bash", "text"}, languages


FORKS = ("ddp_fork", "ddp_notebook")
"""Strategies that fork the process that fits: a page that uses one runs in a fresh interpreter (see below)."""


@pytest.mark.parametrize("page", pages_with("python"))
def test_python_snippets_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    codes = blocks(page, "python")
    if any(f'"{strategy}"' in code for code in codes for strategy in FORKS):
        # A forked process inherits its parent's threads' locks, not the threads: forked from this test process, it
        # inherits what earlier tests left in it (gloo process groups of the in-process FSDP tests, whose destruction
        # in the child waits forever on a lock). A user's script forks from its own interpreter; so does this one.
        script = (  # the repository's root importable, as in this test process (the pages import `examples`)
            f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nnamespace = {{'__name__': 'docs_{page.stem}'}}\n"
            f"for i, code in enumerate({codes!r}):\n"
            f"    exec(compile(code, f'{page.name}[python block {{i}}]', 'exec'), namespace)\n"
        )
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        return
    namespace: dict[str, Any] = {"__name__": f"docs_{page.stem}"}
    for i, code in enumerate(codes):
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(code, f"{page.name}[python block {i}]", "exec"), namespace)


@pytest.mark.parametrize("page", pages_with("pycon"))
def test_pycon_snippets_print_what_the_page_shows(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    globs: dict[str, Any] = {}
    report: list[str] = []
    for i, text in enumerate(blocks(page, "pycon")):
        test = parser.get_doctest(text, globs, f"{page.name}[pycon block {i}]", str(page), 0)
        runner.run(test, out=report.append, clear_globs=False)
        globs = test.globs  # DocTest copies its globals: carry them to the page's next block
    result = runner.summarize(verbose=False)
    assert result.attempted > 0
    assert result.failed == 0, "".join(report)


@pytest.fixture(autouse=True)
def cli_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    # LightningCLI compares `args` with sys.argv, which holds pytest's own options here.
    monkeypatch.setattr("sys.argv", ["examples.cli"])


def run_cli(args: list[str]) -> Any:
    from examples.cli import main

    return main(args=args, run=False)


@pytest.mark.parametrize(("page", "index"), indexed_blocks("yaml"))
def test_yaml_snippets_are_valid_cli_configs(
    page: Path, index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml

    from lightning_layca import LaycaCallback, LayerRotationMonitor

    text = blocks(page, "yaml")[index]
    config = yaml.safe_load(text)
    assert isinstance(config, dict) and config, "a YAML snippet must be a mapping"
    if isinstance(config.get("model"), dict) and "class_path" not in config["model"]:
        assert "LightningCLI(MyModel, MyData)" in page.read_text()  # the own-model script's file: trained below
        return
    path = tmp_path / "snippet.yaml"
    path.write_text(text)
    monkeypatch.chdir(tmp_path)
    layered = [] if "model" in config else ["--config", str(DEMO_CONFIG)]
    # Small data and two batches: the callbacks wrap the real optimizer and validate their schedule on real layers.
    quick = [
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.logger=false",
    ]
    cli = run_cli([*layered, "--config", str(path), *quick])
    monitors = [cb for cb in cli.trainer.callbacks if isinstance(cb, LayerRotationMonitor)]
    assert monitors, "every YAML example configures LaycaCallback or LayerRotationMonitor"
    if "MNIST1DDataModule" in type(cli.datamodule).__name__:
        cli.datamodule.num_samples = 400
        cli.datamodule.batch_size = 32
    if any(isinstance(cb, LaycaCallback) for cb in monitors):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        layca = next(cb for cb in monitors if isinstance(cb, LaycaCallback))
        assert layca.laycas and all(opt.step_count == 2 for opt in layca.laycas.values())


def bash_commands(text: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def check_cli_command(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Parse a documented command line with the examples' CLI (without training); return the printed config."""
    from examples.cli import main

    assert argv[0] in {"fit", "validate", "test", "predict"}, argv
    print_config = [] if "--print_config" in argv else ["--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        main(args=[*argv, *print_config])
    assert exit_info.value.code in (0, None), f"examples.cli {' '.join(argv)} exited with {exit_info.value.code}"
    printed = capsys.readouterr().out
    assert "trainer:" in printed and "model:" in printed
    return printed


def check_pip_command(argv: list[str]) -> None:
    metadata = importlib.metadata.metadata("lightning-layca")
    extras = metadata.get_all("Provides-Extra") or []
    assert argv[:2] == ["pip", "install"], argv
    for arg in argv[2:]:
        if arg.startswith("-"):
            continue
        if arg == "build":  # the wheel builder, which the test extra installs too
            assert any(r.startswith("build") for r in metadata.get_all("Requires-Dist") or []), "add it to `test`"
            continue
        if arg.startswith("dist/"):  # the wheel `python -m build` writes (tests/test_distribution.py builds it)
            assert arg == f"dist/lightning_layca-{metadata['Version']}-py3-none-any.whl", arg
            continue
        match = re.fullmatch(r"(?:\.|lightning-layca)(?:\[(?P<extras>[\w,]+)\])?", arg)
        assert match, f"unexpected install target {arg!r}"
        for extra in filter(None, (match["extras"] or "").split(",")):
            assert extra in extras, f"pip install names the extra {extra!r}; pyproject.toml has {sorted(extras)}"


def check_make_command(argv: list[str]) -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.MULTILINE))
    variables = set(re.findall(r"^(\w+) \??:?=", makefile, re.MULTILINE))
    variables |= set(re.findall(r"\$\(origin (\w+)\)", makefile))
    for target in argv[1:]:
        if "=" in target:
            name = target.split("=", 1)[0]
            assert name in variables, f"make {target}: the Makefile's variables are {sorted(variables)}"
        else:
            assert target in targets, f"make {target}: the Makefile has {sorted(targets)}"


@pytest.mark.parametrize(("page", "index"), indexed_blocks("bash", extra_pages=(README,)))
def test_shell_snippets_are_commands_that_work(
    page: Path, index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    commands = bash_commands(blocks(page, "bash")[index])
    assert commands
    for command in commands:
        argv = shlex.split(command, comments=True)
        if argv[:3] == ["python", "-m", "examples.cli"]:
            monkeypatch.chdir(ROOT)  # the examples' configs are given relative to the repository root
            printed = check_cli_command(argv[3:], capsys)
            following = block_after(page, "bash", index)
            if "--print_config" in argv and following is not None and following[0] == "yaml":
                # The page shows what the command prints: it must be part of the real output.
                assert is_contained(yaml.safe_load(following[1]), yaml.safe_load(printed)), printed
        elif argv[0] == "pip":
            check_pip_command(argv)
        elif argv[0] == "make":
            check_make_command(argv)
        elif argv[0] in ("tensorboard", ".venv/bin/tensorboard"):
            # The examples' environment has it: `make demo` creates `.venv`, the Makefile serves logs/ the same way.
            assert argv[1:] == ["--logdir", "logs"], command
            assert "$(BIN)/tensorboard --logdir $(LOGDIR)" in (ROOT / "Makefile").read_text()
        elif argv == ["python", "-m", "build"]:
            assert (ROOT / "pyproject.toml").is_file()  # tests/test_distribution.py runs it
        elif argv[:2] == ["python", "train.py"]:
            assert "LightningCLI(MyModel, MyData)" in page.read_text()  # trained by test_own_model_script_...
        elif argv[:2] == ["python", "docs/take_screenshots.py"]:
            assert (ROOT / argv[1]).is_file()
        elif argv[0] == "mkdocs":
            assert argv[1] in {"build", "serve"}, command
        else:
            pytest.fail(f"{page.name}: no check for the shell command {command!r}; add one to tests/test_docs.py")


def test_the_api_reference_documents_every_public_name() -> None:
    import lightning_layca

    documented = set(re.findall(r"^::: lightning_layca\.(\w+)$", (DOCS / "api.md").read_text(), re.MULTILINE))
    public = {name for name in lightning_layca.__all__ if not name.startswith("__")}
    assert public - documented == set(), "add them to docs/api.md"


def test_own_model_script_trains_from_its_yaml_file_as_printed(tmp_path: Path) -> None:
    import subprocess
    import sys

    page = DOCS / "cli.md"
    kinds = fences(page)
    (script_index,) = [i for i, (lang, text) in enumerate(kinds) if "LightningCLI(MyModel, MyData)" in text]
    (_, script), (yaml_lang, config), (bash_lang, command) = kinds[script_index : script_index + 3]
    assert (yaml_lang, bash_lang) == ("yaml", "bash")
    (tmp_path / "train.py").write_text(script)
    (tmp_path / "train.yaml").write_text(config)
    argv = shlex.split(bash_commands(command)[0])
    assert argv == ["python", "train.py", "fit", "--config", "train.yaml"]
    quick = ["--trainer.max_steps=4", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    result = subprocess.run(
        [sys.executable, *argv[1:], *quick], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "will be overridden" not in result.stderr, "without `optimizer:` the model's configure_optimizers is used"
    (events,) = (tmp_path / "logs" / "my_model" / "version_0").glob("events.out.tfevents.*")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    assert {"Rotation/net.0", "Rotation/net.2", "Rotation_rate_summary/mean", "train/loss"} <= set(tags), tags
    assert "hp_metric" not in tags
