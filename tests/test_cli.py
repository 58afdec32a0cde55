"""LightningCLI: the documented YAML files train, every callback and schedule is configurable, mistakes stop early."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import lightning_layca as ll
from examples.cifar10_vgg import CIFAR10VGG, CIFAR10DataModule
from examples.cli import condense_parse_error, main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
SMALL_DATA = {
    "mnist1d_layca.yaml": ["--data.init_args.num_samples=400"],
    "mnist1d_sgd.yaml": ["--data.init_args.num_samples=400"],
    "digits_layca.yaml": ["--data.init_args.limit=300"],
}


@pytest.fixture(autouse=True)
def _no_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # LightningCLI warns when it gets `args` while sys.argv also holds arguments (pytest's own).
    monkeypatch.setattr(sys, "argv", ["examples.cli"])


def tiny_fit_args(log_dir: Path) -> list[str]:
    """One epoch of two training batches and one validation batch, logging every step, into ``log_dir``."""
    return [
        f"--trainer.logger.init_args.save_dir={log_dir}",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_checkpointing=false",
    ]


def instantiate(*args: str) -> Any:
    """Parse and build model, data module and trainer, without running anything."""
    return main(list(args), run=False)


def event_tags(log_dir: Path, kinds: tuple[str, ...] = ("scalars",)) -> list[str]:
    (events,) = log_dir.glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return [tag for kind in kinds for tag in accumulator.Tags()[kind]]


@pytest.mark.parametrize("config", sorted(SMALL_DATA))
def test_documented_config_trains_and_logs_rotation_next_to_accuracy(
    config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = main(["fit", "--config", str(CONFIGS / config), *tiny_fit_args(tmp_path), *SMALL_DATA[config]])

    assert cli.trainer.global_step == 2
    log_dir = Path(cli.trainer.log_dir)
    tags = event_tags(log_dir)
    for tag in ("Rotation/net.conv1", "Rotation/net.fc", "train/acc", "val/acc"):
        assert tag in tags, f"{tag} missing from {tags}"
    # TensorBoard's first screen (Time Series) lists the tag groups, the part before "/", in code-point order and
    # opens on the first: here the per-layer rotation, then the paper's figure, not `epoch` or a placeholder metric.
    groups = sorted({tag.split("/")[0] for tag in event_tags(log_dir, ("scalars", "images", "histograms"))})
    assert groups[:2] == ["Rotation", "Rotation_curves"], groups
    assert groups.index("Rotation_summary") < groups.index("epoch")
    assert "hp_metric" not in groups
    assert (log_dir / "layer_rotation_curves.png").stat().st_size > 0
    assert f"tensorboard --logdir {tmp_path}" in capsys.readouterr().out

    optimizer = cli.trainer.optimizers[0]
    if "layca" in config:
        assert isinstance(optimizer, ll.Layca) and isinstance(optimizer.optimizer, torch.optim.SGD)
        assert optimizer.rotation_rate == pytest.approx(3**-3, rel=1e-12)
        assert repr(optimizer.schedule) == "DepthDecay(alpha=0.0)"
        assert optimizer.layer_names[0] == "net.conv1.weight" and optimizer.layer_names[-1] == "net.fc.weight"
        assert "Rotation_rate_summary/mean" in tags
    else:
        assert type(optimizer) is torch.optim.SGD
        assert not any(tag.startswith("Rotation_rate") for tag in tags)


def test_cifar10_config_builds_without_torchvision_or_download() -> None:
    cli = instantiate("--config", str(CONFIGS / "cifar10_layca.yaml"))
    assert isinstance(cli.model, CIFAR10VGG) and cli.model.hparams["variant"] == "vgg16"
    assert isinstance(cli.datamodule, CIFAR10DataModule) and cli.datamodule.train_set is None
    (layca,) = [c for c in cli.trainer.callbacks if isinstance(c, ll.LaycaCallback)]
    assert layca.rotation_rate == pytest.approx(3**-3, rel=1e-12)
    assert cli.model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_print_config_shows_the_callbacks_with_their_nested_schedule(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "mnist1d_layca.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    (callback,) = printed["trainer"]["callbacks"]
    assert callback["class_path"] == "lightning_layca.LaycaCallback"
    assert callback["init_args"]["rotation_rate"] == pytest.approx(3**-3, rel=1e-12)
    schedule = {"class_path": "lightning_layca.DepthDecay", "init_args": {"alpha": 0.0}}
    assert callback["init_args"]["schedule"] == schedule
    assert printed["optimizer"]["class_path"] == "torch.optim.SGD"
    assert printed["lr_scheduler"]["class_path"] == "torch.optim.lr_scheduler.MultiStepLR"


def test_the_print_config_excerpt_of_the_docs_is_what_print_config_prints(capsys: pytest.CaptureFixture[str]) -> None:
    docs = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    command, excerpt = re.search(
        r"```bash\n(python -m examples.cli fit [^`]*--print_config)\n```\n\n"
        r"prints, among the rest:\n\n```yaml\n(.*?)```",
        docs,
        re.DOTALL,
    ).groups()  # type: ignore[union-attr]
    args = shlex.split(command.replace("\\\n", " "))[3:]
    with pytest.raises(SystemExit):
        main(args)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["callbacks"] == yaml.safe_load(excerpt)["trainer"]["callbacks"]


SCHEDULES_IN_YAML = {
    "Uniform": ({"class_path": "lightning_layca.Uniform"}, ll.Uniform()),
    "DepthDecay": ({"class_path": "lightning_layca.DepthDecay", "init_args": {"alpha": 0.6}}, ll.DepthDecay(0.6)),
    "ByName": (
        {"class_path": "lightning_layca.ByName", "init_args": {"patterns": {"net.fc*": 0.5}, "default": 2.0}},
        ll.ByName({"net.fc*": 0.5}, default=2.0),
    ),
    "EpochSwitch": (
        {
            "class_path": "lightning_layca.EpochSwitch",
            "init_args": {
                "schedules": [
                    {"class_path": "lightning_layca.DepthDecay", "init_args": {"alpha": -0.5}},
                    {"class_path": "lightning_layca.Uniform"},
                ],
                "milestones": [5],
            },
        },
        ll.EpochSwitch([ll.DepthDecay(-0.5), ll.Uniform()], milestones=[5]),
    ),
    "LayerWarmup": (
        {
            "class_path": "lightning_layca.LayerWarmup",
            "init_args": {
                "warmup_steps": 100,
                "schedule": {"class_path": "lightning_layca.DepthDecay", "init_args": {"alpha": 0.2}},
            },
        },
        ll.LayerWarmup(100, ll.DepthDecay(0.2)),
    ),
}


def test_every_exported_schedule_has_a_yaml_case() -> None:
    exported = {
        name
        for name in ll.__all__
        if isinstance(getattr(ll, name), type)
        and issubclass(getattr(ll, name), ll.RotationSchedule)
        and getattr(ll, name) is not ll.RotationSchedule
    }
    assert exported == set(SCHEDULES_IN_YAML)


@pytest.mark.parametrize("name", sorted(SCHEDULES_IN_YAML))
def test_each_schedule_is_configurable_from_yaml(name: str, tmp_path: Path) -> None:
    schedule_yaml, expected = SCHEDULES_IN_YAML[name]
    override = tmp_path / "schedule.yaml"
    callback = {"class_path": "lightning_layca.LaycaCallback", "init_args": {"schedule": schedule_yaml}}
    override.write_text(yaml.safe_dump({"trainer": {"callbacks": [callback]}}))
    cli = instantiate("--config", str(CONFIGS / "mnist1d_layca.yaml"), "--config", str(override))
    (layca,) = [c for c in cli.trainer.callbacks if isinstance(c, ll.LaycaCallback)]
    assert type(layca.schedule) is type(expected)
    assert repr(layca.schedule) == repr(expected)


def test_callbacks_are_configurable_from_the_command_line(tmp_path: Path) -> None:
    # The plain-SGD run switched to Layca with the paper's alpha = 0.3, then a monitor-only run built from a file
    # without callbacks.
    cli = instantiate(
        "--config",
        str(CONFIGS / "mnist1d_sgd.yaml"),
        "--trainer.callbacks=lightning_layca.LaycaCallback",
        "--trainer.callbacks.rotation_rate=0.1",
        "--trainer.callbacks.schedule=lightning_layca.DepthDecay",
        "--trainer.callbacks.schedule.alpha=0.3",
    )
    (layca,) = [c for c in cli.trainer.callbacks if isinstance(c, ll.LayerRotationMonitor)]
    assert type(layca) is ll.LaycaCallback and layca.rotation_rate == 0.1
    assert repr(layca.schedule) == "DepthDecay(alpha=0.3)"

    config = yaml.safe_load((CONFIGS / "mnist1d_sgd.yaml").read_text())
    del config["trainer"]["callbacks"]
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump(config))
    cli = instantiate(
        "--config",
        str(bare),
        "--trainer.callbacks+=lightning_layca.LayerRotationMonitor",
        "--trainer.callbacks.log_every_n_steps=5",
    )
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, ll.LayerRotationMonitor)]
    assert type(monitor) is ll.LayerRotationMonitor and monitor.log_every_n_steps == 5


MAX_ERROR_LINES = 15
"""A configuration mistake fits on one screen: usage, tip and the error, with the path to the bad value."""


def parse_error(args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Run the examples' CLI on ``args``, expect a parse error (exit code 2) that created nothing; return stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "mnist1d_layca.yaml"), *args, *tiny_fit_args(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.splitlines()) <= MAX_ERROR_LINES, err
    assert not list(tmp_path.glob("mnist1d_layca")), "nothing may be written before the configuration is valid"
    return err


def callback_file(tmp_path: Path, init_args: dict[str, Any]) -> list[str]:
    """``--config`` arguments of a file that gives the demo's LaycaCallback ``init_args``."""
    bad = tmp_path / "bad.yaml"
    callback = {"class_path": "lightning_layca.LaycaCallback", "init_args": init_args}
    bad.write_text(yaml.safe_dump({"trainer": {"callbacks": [callback]}}))
    return ["--config", str(bad)]


def test_a_bad_alpha_in_yaml_is_a_four_line_parse_error_naming_alpha_and_its_range(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    schedule = {"class_path": "lightning_layca.DepthDecay", "init_args": {"alpha": 1.5}}
    err = parse_error(callback_file(tmp_path, {"schedule": schedule}), tmp_path, capsys)
    assert err.splitlines() == [
        "usage: python -m examples.cli [options] fit --config FILE [--KEY=VALUE ...]",
        "tip: For details of accepted options run: python -m examples.cli fit --help",
        'error: Parser key "trainer.callbacks" > lightning_layca.LaycaCallback > "schedule" > '
        'lightning_layca.DepthDecay > "alpha":',
        "  Not of type SignedOpenUnitInterval: 1.5 is not in the open interval (-1, 1)",
    ]


@pytest.mark.parametrize(
    ("init_args", "message"),
    [
        (
            {"rotation_rate": "fast"},
            r"\"rotation_rate\":.*Not of type RotationRate: could not convert .*'fast'.*Literal\[.equilibrium.\]",
        ),
        ({"rotaton_rate": 0.1}, r"Option 'rotaton_rate' is not accepted"),
        (
            {"schedule": {"class_path": "lightning_layca.DepthDecy", "init_args": {"alpha": 0.5}}},
            r"lightning_layca.DepthDecy:\s+module 'lightning_layca' has no attribute 'DepthDecy'",
        ),
        (
            {"schedule": {"class_path": "lightning_layca.DepthDecay", "init_args": {"alpha": "high"}}},
            r"\"alpha\":\s+Not of type SignedOpenUnitInterval: could not convert .*'high'",
        ),
    ],
    ids=["wrong-type", "misspelled-argument", "unknown-schedule", "wrong-schedule-argument-type"],
)
def test_configuration_mistakes_are_rejected_by_the_parser_before_training(
    init_args: dict[str, Any], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = parse_error(callback_file(tmp_path, init_args), tmp_path, capsys)
    assert re.search(r"error: Parser key \"trainer.callbacks\"", err)
    assert re.search(message, err, flags=re.DOTALL), err


@pytest.mark.parametrize(
    ("option", "key", "accepted"),
    [
        ("--trainer.callbacks.rotation_rate=-0.1", "rotation_rate", "is not in (0, 1000]"),
        ("--trainer.callbacks.rotation_rate=1001", "rotation_rate", "is not in (0, 1000]"),
        ("--trainer.callbacks.schedule.alpha=-1", "alpha", "-1 is not in the open interval (-1, 1)"),
        ("--trainer.callbacks.reference_lr=0", "reference_lr", "does not conform to restriction v>0"),
        ("--trainer.callbacks.log_every_n_steps=0", "log_every_n_steps", "does not conform to restriction v>0"),
        ("--trainer.callbacks.every_n_epochs=0", "every_n_epochs", "0 does not conform to restriction v>0"),
        (
            "--trainer.callbacks.histogram_bins=2.5",
            "histogram_bins",
            "Not of type PositiveInt: invalid literal for int()",
        ),
        ("--trainer.callbacks.optimizers=-1", "optimizers", "does not conform to restriction v>=0"),
    ],
    ids=[
        "rotation_rate-negative",
        "rotation_rate-too-large",
        "alpha",
        "reference_lr",
        "log_every_n_steps",
        "every_n_epochs",
        "histogram_bins",
        "optimizers",
    ],
)
def test_out_of_range_numbers_are_parse_errors_that_name_the_argument_and_the_range(
    option: str, key: str, accepted: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = parse_error([option], tmp_path, capsys)
    assert f'> "{key}":' in err.splitlines()[2], err
    assert accepted in err, err


@pytest.mark.parametrize(
    ("schedule", "key", "accepted"),
    [
        ({"class_path": "lightning_layca.LayerWarmup", "init_args": {"warmup_steps": 0}}, "warmup_steps", "v>0"),
        ({"class_path": "lightning_layca.ByName", "init_args": {"patterns": {"net.fc*": -2.0}}}, "patterns", "v>=0"),
        (
            {"class_path": "lightning_layca.ByName", "init_args": {"patterns": {"a": 1}, "default": -1}},
            "default",
            "v>=0",
        ),
        (
            {
                "class_path": "lightning_layca.EpochSwitch",
                "init_args": {"schedules": [{"class_path": "lightning_layca.Uniform"}] * 2, "milestones": [0]},
            },
            "milestones",
            "0 does not conform to restriction v>0",
        ),
    ],
    ids=["warmup_steps", "ByName-multiplier", "ByName-default", "milestones"],
)
def test_out_of_range_schedule_arguments_are_parse_errors(
    schedule: dict[str, Any], key: str, accepted: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = parse_error(callback_file(tmp_path, {"schedule": schedule}), tmp_path, capsys)
    assert f'> "{key}":' in err.splitlines()[2], err
    assert accepted in err, err


DEMO_LAYERS = "net.conv1.weight, net.conv2.weight, net.conv3.weight, net.conv4.weight, net.fc.weight."
BY_NAME_TYPO = {"class_path": "lightning_layca.ByName", "init_args": {"patterns": {"net.conv9*": 0.5}}}


@pytest.mark.parametrize(
    ("init_args", "message"),
    [
        ({"include": "net.conv9*"}, "`include` pattern 'net.conv9*' matches no parameter. Available names: "),
        ({"schedule": BY_NAME_TYPO}, "ByName: pattern 'net.conv9*' matches no layer. Available names: "),
        (
            {
                "schedule": {
                    "class_path": "lightning_layca.EpochSwitch",
                    "init_args": {
                        "schedules": [{"class_path": "lightning_layca.Uniform"}, BY_NAME_TYPO],
                        "milestones": [5],
                    },
                }
            },
            "ByName: pattern 'net.conv9*' matches no layer. Available names: ",
        ),
        (
            {"optimizers": 5},
            "LaycaCallback: `optimizers=[5]` names optimizer(s) [5], but MNIST1DCNN uses automatic optimization",
        ),
    ],
    ids=["include", "by-name", "nested-by-name", "optimizer-index"],
)
def test_a_mistake_the_model_shows_stops_the_cli_in_a_few_lines_before_anything_is_written(
    init_args: dict[str, Any], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Nothing written: no version folder (TensorBoard would list it as an empty run), no config.yaml.
    err = parse_error(callback_file(tmp_path, init_args), tmp_path, capsys)
    assert not [p for p in tmp_path.iterdir() if p.name != "bad.yaml"]
    assert err.splitlines()[-1].startswith(f"error: {message}"), err
    if "Available names" in message:
        assert err.splitlines()[-1].endswith(DEMO_LAYERS), err


def test_an_unrelated_parse_error_is_reported_as_jsonargparse_wrote_it() -> None:
    tied = """Parser key "trainer.callbacks":
  Errors:
    - Problem with given class_path 'a.A':
        Option 'x' is not accepted
    - Problem with given class_path 'b.B':
        Option 'x' is not accepted"""
    assert condense_parse_error(tied) == tied
    assert condense_parse_error('Parser key "seed_everything":\n  Expected an int') == (
        'Parser key "seed_everything":\n  Expected an int'
    )


def test_without_matplotlib_the_run_trains_and_names_the_extra_that_draws_the_figure(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    config = "digits_layca.yaml"
    with pytest.warns(UserWarning, match=r"pip install 'lightning-layca\[plot\]'"):
        cli = main(["fit", "--config", str(CONFIGS / config), *tiny_fit_args(tmp_path), *SMALL_DATA[config]])
    assert cli.trainer.global_step == 2
    assert not (Path(cli.trainer.log_dir) / "layer_rotation_curves.png").exists()
    out = capsys.readouterr().out
    assert "Layer rotation curves:" not in out and f"tensorboard --logdir {tmp_path}" in out


def test_make_demo_entry_point_runs_as_a_module_from_the_repository_root() -> None:
    """``make demo`` runs ``python -m examples.cli`` on its config; here that command prints the configuration."""
    makefile = (ROOT / "Makefile").read_text()
    (demo_config,) = re.findall(r"^DEMO_CONFIG \?= (\S+)$", makefile, flags=re.MULTILINE)
    assert "$(BIN)/python -m examples.cli fit --config $(DEMO_CONFIG)" in makefile
    command = [sys.executable, "-m", "examples.cli", "fit", "--config", demo_config, "--print_config"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["model"]["class_path"] == "examples.mnist1d_cnn.MNIST1DCNN"
    assert printed["trainer"]["logger"]["init_args"]["save_dir"] == "logs"
    assert printed["trainer"]["callbacks"][0]["class_path"] == "lightning_layca.LaycaCallback"
