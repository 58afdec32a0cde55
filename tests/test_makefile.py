"""The Makefile's install route: which torch it installs, and that another choice reinstalls it.

Checked with ``make --dry-run`` on a stand-in virtual environment (its stamps written by hand): the commands make would
run are printed, nothing is installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

MAKE = shutil.which("make") or "make"


def dry_run(venv: Path, *assignments: str, path: str | None = None) -> list[str]:
    """The commands ``make demo`` would run with ``venv`` as its environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_REQ", "TORCH_INDEX", "VENV")}
    if path is not None:
        env["PATH"] = path
    command = [MAKE, "--no-print-directory", "--dry-run", "demo", f"VENV={venv}", *assignments]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True)
    return result.stdout.splitlines()


def installed(venv: Path, torch_choice: str) -> Path:
    """A stand-in for an environment whose torch was installed with ``torch_choice`` and project installed after."""
    venv.mkdir(parents=True, exist_ok=True)
    (venv / ".torch").write_text(torch_choice + "\n")
    stamp = venv / ".installed"
    stamp.touch()
    later = time.time() + 10  # newer than pyproject.toml and the torch stamp, whatever the clock's resolution
    os.utime(stamp, (later, later))
    return venv


def torch_installs(commands: list[str]) -> list[str]:
    return [c for c in commands if "pip install" in c and "torch" in c and "-e " not in c]


def test_an_unchanged_torch_choice_installs_nothing(tmp_path: Path) -> None:
    venv = installed(tmp_path / "venv", "torch==2.13.0")
    commands = dry_run(venv, "TORCH_REQ=torch==2.13.0", "TORCH_INDEX=")
    assert commands == [f"{venv}/bin/python -m examples.cli fit --config examples/configs/mnist1d_layca.yaml"]


@pytest.mark.parametrize(
    ("assignments", "install"),
    [
        (["TORCH_REQ=torch==2.12.0", "TORCH_INDEX="], '-m pip install --quiet "torch==2.12.0"'),
        (["TORCH_REQ=torch==2.13.0", f"TORCH_INDEX={CPU_INDEX}"], f'"torch==2.13.0" --index-url {CPU_INDEX}'),
    ],
    ids=["another-requirement", "another-index"],
)
def test_another_torch_choice_replaces_the_installed_torch_then_reinstalls_the_project(
    tmp_path: Path, assignments: list[str], install: str
) -> None:
    venv = installed(tmp_path / "venv", "torch==2.13.0")
    commands = dry_run(venv, *assignments)
    (uninstall,) = [i for i, c in enumerate(commands) if "pip uninstall" in c and "torch" in c]
    (reinstall,) = [i for i, c in enumerate(torch_installs(commands)) if install in c]
    assert uninstall < commands.index(torch_installs(commands)[reinstall])
    project = [i for i, c in enumerate(commands) if "pip install --quiet -e" in c]
    assert project and project[0] > uninstall
    assert commands[-1].endswith("-m examples.cli fit --config examples/configs/mnist1d_layca.yaml")


def fake_tools(directory: Path, **scripts: str) -> str:
    """A PATH of ``directory`` holding shell scripts named after ``scripts`` and the real ``cat``."""
    directory.mkdir(exist_ok=True)
    (directory / "cat").symlink_to(shutil.which("cat") or "/bin/cat")
    for name, body in scripts.items():
        (directory / name).write_text(f"#!/bin/sh\n{body}\n")
        (directory / name).chmod(0o755)
    return str(directory)


def test_by_default_linux_without_an_nvidia_gpu_gets_pytorchs_cpu_index(tmp_path: Path) -> None:
    commands = dry_run(tmp_path / "venv", path=fake_tools(tmp_path / "bin", uname="echo Linux"))
    assert any(c.endswith(f'install --quiet "torch>=2.4" --index-url {CPU_INDEX}') for c in commands), commands


def test_by_default_a_gpu_or_another_system_gets_torch_from_pypi(tmp_path: Path) -> None:
    gpu = fake_tools(tmp_path / "gpu", uname="echo Linux", **{"nvidia-smi": "echo 'GPU 0: NVIDIA H100'"})
    mac = fake_tools(tmp_path / "mac", uname="echo Darwin")
    for path in (gpu, mac):
        commands = dry_run(tmp_path / "venv", path=path)
        assert any(c.endswith('install --quiet "torch>=2.4" ') for c in commands), commands
        assert not any("--index-url" in c for c in commands)
