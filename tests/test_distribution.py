"""The distribution: ``python -m build`` makes an sdist and a wheel that hold the package and what installs it, with
complete metadata, and the wheel installs into a fresh virtual environment and trains there.

The fresh environment gets its dependencies from this one's site-packages through a ``.pth`` path entry (no network,
nothing downloaded), while ``lightning_layca`` itself comes from the installed wheel.
"""

from __future__ import annotations

import email.parser
import os
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from email.message import Message
from pathlib import Path

import pytest

import lightning_layca

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the parser pip vendors
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
MODULES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "lightning_layca").rglob("*.py"))
NOT_DISTRIBUTED = ("tests/", "docs/", "examples/", "benchmarks/", ".ci/")
ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
"""The environment of the fresh venv's processes: nothing points them at the checkout."""


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # Without isolation: the build uses this environment's setuptools (the `test` extra), no download.
    command = [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BuildBackendWarning" not in result.stdout + result.stderr
    return out


def only(directory: Path, pattern: str) -> Path:
    (path,) = directory.glob(pattern)
    return path


def wheel_metadata(wheel: Path) -> Message:
    with zipfile.ZipFile(wheel) as archive:
        text = archive.read(f"lightning_layca-{lightning_layca.__version__}.dist-info/METADATA").decode()
    return email.parser.Parser().parsestr(text)


def test_the_wheel_holds_the_typed_package_and_its_license_and_nothing_else(dist: Path) -> None:
    wheel = only(dist, f"lightning_layca-{lightning_layca.__version__}-py3-none-any.whl")
    names = zipfile.ZipFile(wheel).namelist()
    info = f"lightning_layca-{lightning_layca.__version__}.dist-info/"
    package = sorted(n for n in names if not n.startswith(info))
    assert package == sorted([*MODULES, "lightning_layca/py.typed"])
    assert f"{info}licenses/LICENSE" in names
    assert not [n for n in names if n.startswith(NOT_DISTRIBUTED)]


def test_the_sdist_holds_the_package_and_what_builds_it_but_no_tests_or_docs(dist: Path) -> None:
    sdist = only(dist, f"lightning_layca-{lightning_layca.__version__}.tar.gz")
    prefix = f"lightning_layca-{lightning_layca.__version__}/"
    with tarfile.open(sdist) as archive:
        names = [m.name.removeprefix(prefix) for m in archive.getmembers() if m.isfile()]
    for needed in ("pyproject.toml", "README.md", "LICENSE", "lightning_layca/py.typed", *MODULES):
        assert needed in names, needed
    assert not [n for n in names if n.startswith(NOT_DISTRIBUTED)]


def test_the_metadata_says_what_pyproject_says_with_an_spdx_license(dist: Path) -> None:
    metadata = wheel_metadata(only(dist, "*.whl"))
    assert metadata["Name"] == "lightning-layca"
    assert metadata["Version"] == lightning_layca.__version__
    assert tuple(int(x) for x in metadata["Metadata-Version"].split(".")) >= (2, 4)
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata.get_all("License-File") == ["LICENSE"]
    assert "License" not in metadata, "the deprecated License field"
    assert not [c for c in metadata.get_all("Classifier") or [] if c.startswith("License ::")]
    assert metadata["Requires-Python"] == PYPROJECT["requires-python"]
    assert metadata["Summary"] == PYPROJECT["description"]
    assert metadata["Description-Content-Type"] == "text/markdown"
    assert "Typing :: Typed" in metadata.get_all("Classifier")
    requires = metadata.get_all("Requires-Dist") or []
    unconditional = {r.replace(" ", "") for r in requires if "extra ==" not in r}
    assert unconditional == {_canonical(r) for r in PYPROJECT["dependencies"]}
    assert set(metadata.get_all("Provides-Extra") or []) == set(PYPROJECT["optional-dependencies"])


def _canonical(requirement: str) -> str:
    """``lightning>=2.4,<3`` as the metadata writes it (``lightning<3,>=2.4``)."""
    from packaging.requirements import Requirement

    req = Requirement(requirement)
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    return f"{req.name}{extras}{req.specifier}"


def test_the_wheel_installs_into_a_fresh_environment_and_trains_there(dist: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    target_paths = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    site_packages = Path(target_paths.stdout.strip())
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index"]
    result = subprocess.run(
        [*install, str(only(dist, "*.whl"))], env=ENV, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (site_packages / "lightning_layca" / "py.typed").is_file(), result.stdout
    # Then the dependencies, from this environment, as plain path entries: its own .pth files (an editable install of
    # the checkout) stay inactive. Written after the install, so that pip does not find the package there.
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (site_packages / "dependencies.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))

    script = tmp_path / "fit.py"
    script.write_text(FIT_SCRIPT)
    result = subprocess.run(
        [str(python), str(script), str(tmp_path / "logs")],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert Path(lines["package"]).is_relative_to(site_packages), lines["package"]
    assert lines["typed"] == "True"
    assert lines["steps"] == "4"
    assert float(lines["rotation"]) > 0.0
    assert lines["rotation_tags"] == "2"


FIT_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import lightning as L
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_layca as ll


    class Model(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("train/loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(32, 8), torch.randint(0, 3, (32,))), batch_size=8)
    logger = TensorBoardLogger(sys.argv[1], name="wheel", default_hp_metric=False)
    callback = ll.LaycaCallback(rotation_rate=0.1, figure=False)
    trainer = L.Trainer(
        max_epochs=1,
        logger=logger,
        callbacks=[callback],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Model(), data)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    tags = [t for t in events.Tags()["scalars"] if t.startswith("Rotation/")]
    print(f"package={ll.__file__}")
    print(f"typed={(Path(ll.__file__).parent / 'py.typed').is_file()}")
    print(f"steps={trainer.global_step}")
    print(f"rotation={min(callback.last_rotation.values())}")
    print(f"rotation_tags={len(tags)}")
    """
)
