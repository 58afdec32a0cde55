"""The examples' data modules and models: offline, deterministic, the paper's layer style, clear dependency errors."""

from __future__ import annotations

import functools
import importlib
import math
import random
import re
import socket
import sys
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer

import lightning_layca as ll
from examples import cifar10_vgg, digits_cnn, mnist1d_cnn


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the examples must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_mnist1d_is_generated_offline_and_reproducibly(no_network: None) -> None:
    a = mnist1d_cnn.make_mnist1d(num_samples=300, train_split=0.8, seed=7)
    b = mnist1d_cnn.make_mnist1d(num_samples=300, train_split=0.8, seed=7)
    c = mnist1d_cnn.make_mnist1d(num_samples=300, train_split=0.8, seed=8)
    assert a["x"].shape == (240, mnist1d_cnn.SIGNAL_LENGTH)
    assert a["x_test"].shape == (60, mnist1d_cnn.SIGNAL_LENGTH)
    assert sorted(set(a["y"].tolist()) | set(a["y_test"].tolist())) == list(range(10))
    np.testing.assert_array_equal(a["x"], b["x"])
    np.testing.assert_array_equal(a["y_test"], b["y_test"])
    assert not np.array_equal(a["x"], c["x"])


def test_mnist1d_generation_leaves_the_global_random_state_alone() -> None:
    np.random.seed(123)
    random.seed(123)
    expected = (np.random.rand(), random.random())
    np.random.seed(123)
    random.seed(123)
    mnist1d_cnn.make_mnist1d(num_samples=50, train_split=0.8, seed=0)
    assert (np.random.rand(), random.random()) == expected


def test_mnist1d_datamodule_batches() -> None:
    dm = mnist1d_cnn.MNIST1DDataModule(num_samples=200, batch_size=32)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 40) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.int64
    assert len(dm.train_set) == 160 and len(dm.val_set) == 40  # type: ignore[arg-type]
    # The same seed gives the same first batch, whatever else drew random numbers in between.
    torch.manual_seed(99)
    x2, _ = next(iter(dm.train_dataloader()))
    torch.testing.assert_close(x, x2, rtol=0, atol=0)


def test_digits_datamodule_splits_all_images_into_unit_range_tensors() -> None:
    dm = digits_cnn.DigitsDataModule(val_fraction=0.2, seed=0)
    dm.setup("fit")
    train_x, train_y = dm.train_set.tensors  # type: ignore[union-attr]
    _, val_y = dm.val_set.tensors  # type: ignore[union-attr]
    assert len(train_y) + len(val_y) == 1797 and len(val_y) == 359
    assert train_x.shape[1:] == (1, 8, 8)
    assert float(train_x.min()) == 0.0 and float(train_x.max()) == 1.0
    assert set(val_y.tolist()) == set(range(10))


@pytest.mark.parametrize(
    ("model", "input_shape"),
    [
        (mnist1d_cnn.MNIST1DCNN(), (3, 40)),
        (digits_cnn.DigitsCNN(), (3, 1, 8, 8)),
        (cifar10_vgg.CIFAR10VGG("vgg11"), (2, 3, 32, 32)),
    ],
    ids=["mnist1d", "digits", "cifar10-vgg11"],
)
def test_models_have_only_layer_kernels_as_parameters(model: torch.nn.Module, input_shape: tuple[int, ...]) -> None:
    """As in the paper's models: no biases, no affine batch norm, so every trainable parameter is a layer."""
    assert model(torch.randn(*input_shape)).shape == (input_shape[0], 10)
    names = [name for name, _ in model.named_parameters()]
    assert names[-1] == "net.fc.weight" and names[0] == "net.conv1.weight"
    assert all(p.ndim >= 2 for p in model.parameters())


def test_vgg_variants_have_their_convolutions_and_one_linear_classifier() -> None:
    for variant in ("vgg11", "vgg13", "vgg16", "vgg19"):
        shapes = [p.shape for p in cifar10_vgg.CIFAR10VGG(variant).parameters()]  # type: ignore[arg-type]
        assert [len(s) for s in shapes] == [4] * (int(variant[3:]) - 3) + [2]
        assert shapes[0] == (64, 3, 3, 3) and shapes[-1] == (10, 512)


def test_unknown_vgg_variant_is_named_in_the_error() -> None:
    with pytest.raises(ValueError, match=r"'vgg12'.*vgg11, vgg13, vgg16, vgg19"):
        cifar10_vgg.CIFAR10VGG("vgg12")  # type: ignore[arg-type]


def test_cifar10_normalisation_maps_the_dataset_mean_to_zero() -> None:
    mean_image = torch.tensor(cifar10_vgg.CIFAR10_MEAN).view(3, 1, 1).expand(3, 32, 32) * 255
    out = cifar10_vgg.Normalize()(mean_image.round().to(torch.uint8))
    # Rounding to uint8 moves a pixel by at most 0.5/255; divided by the smallest std (0.2435).
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert float(out.abs().max()) <= 0.5 / 255 / 0.2435 + 1e-6


def test_cifar10_augmentation_is_a_shifted_or_flipped_window_of_the_padded_image() -> None:
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    normalize = cifar10_vgg.Normalize()
    padded = torch.nn.functional.pad(image, (4, 4, 4, 4))
    windows = [
        normalize(window)
        for top in range(9)
        for left in range(9)
        for window in (padded[:, top : top + 32, left : left + 32],)
        for window in (window, window.flip(-1))
    ]
    flipped = shifted = 0
    for _ in range(20):
        out = cifar10_vgg.RandomCropFlip(padding=4)(image)
        matches = [i for i, w in enumerate(windows) if torch.equal(out, w)]
        assert matches, "the augmented image is not a window of the padded image"
        flipped += matches[0] % 2
        shifted += matches[0] // 2 != 40  # index 40 = the centred window (top = left = 4)
    assert 0 < flipped < 20 and shifted > 0


def test_cifar10_datamodule_and_model_import_without_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail
    module = importlib.reload(cifar10_vgg)
    dm = module.CIFAR10DataModule(data_dir="unused")
    assert dm.dims == (3, 32, 32) and dm.num_classes == 10
    assert isinstance(dm.train_transform, module.RandomCropFlip)
    assert type(module.CIFAR10DataModule(augment=False).train_transform) is module.Normalize
    assert module.CIFAR10VGG()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ModuleNotFoundError, match=r"torchvision.*pip install 'lightning-layca\[vision\]'"):
        dm.prepare_data()


@pytest.mark.parametrize(
    ("module", "extra", "trigger"),
    [
        ("mnist1d", "examples", lambda: mnist1d_cnn.MNIST1DDataModule().prepare_data()),
        ("sklearn", "examples", lambda: digits_cnn.DigitsDataModule().prepare_data()),
    ],
    ids=["mnist1d", "scikit-learn"],
)
def test_a_missing_optional_dependency_names_the_extra_to_install(
    monkeypatch: pytest.MonkeyPatch, module: str, extra: str, trigger: object
) -> None:
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ModuleNotFoundError, match=rf"pip install 'lightning-layca\[{extra}\]'"):
        trigger()  # type: ignore[operator]


def test_bad_data_module_arguments_are_rejected_with_the_value() -> None:
    with pytest.raises(ValueError, match=r"train_split=1\.5"):
        mnist1d_cnn.MNIST1DDataModule(train_split=1.5)
    with pytest.raises(ValueError, match="`batch_size` must be a positive int, got 0"):
        digits_cnn.DigitsDataModule(batch_size=0)
    with pytest.raises(ValueError, match=r"`channels` must be a non-empty list of positive ints, got \[\]"):
        mnist1d_cnn.MNIST1DCNN(channels=[])


# ---------------------------------------------------------------------------------------------- the README's snippets
README = Path(__file__).resolve().parents[1] / "README.md"


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.DOTALL | re.MULTILINE)


class _ReadmeModel(mnist1d_cnn.MNIST1DCNN):
    """The README's ``model``: a user's LightningModule with its own optimizer."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


@pytest.fixture
def short_trainer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Make the snippets' ``L.Trainer(...)`` train for three steps, quietly, into ``tmp_path``."""
    short = functools.partial(
        Trainer,
        max_steps=3,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    monkeypatch.setattr(lightning, "Trainer", short)


def test_readme_has_the_documented_snippets() -> None:
    assert len(readme_blocks("python")) == 2 and len(readme_blocks("yaml")) == 1
    assert "make demo" in readme_blocks("bash")[0] and "make test" in readme_blocks("bash")[0]


@pytest.mark.parametrize("index", [0, 1], ids=["layca", "monitor-only"])
def test_readme_python_snippet_trains(index: int, short_trainer: None) -> None:
    torch.manual_seed(0)
    model = _ReadmeModel()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    namespace: dict[str, object] = {"model": model, "datamodule": mnist1d_cnn.MNIST1DDataModule(num_samples=400)}
    exec(compile(readme_blocks("python")[index], str(README), "exec"), namespace)

    trainer = namespace["trainer"]
    assert isinstance(trainer, Trainer) and trainer.global_step == 3
    (callback,) = [c for c in trainer.callbacks if isinstance(c, ll.LayerRotationMonitor)]  # type: ignore[attr-defined]
    # The monitor's last measurement is the cosine distance of the weights after the last logged step.
    assert set(callback.last_rotation) == {name.removesuffix(".weight") for name in initial}
    for name, p in model.named_parameters():
        w, w0 = p.detach().flatten(), initial[name].flatten()
        expected = 1 - float(torch.dot(w, w0) / (w.norm() * w0.norm()))
        assert callback.last_rotation[name.removesuffix(".weight")] == pytest.approx(expected, abs=1e-5)
    if index == 0:
        assert isinstance(callback, ll.LaycaCallback)
        assert isinstance(trainer.optimizers[0], ll.Layca)
        # Layca keeps every layer's norm; three steps rotate each layer by 3 * atan(3**-3) at most.
        for name, p in model.named_parameters():
            assert float(p.detach().norm()) == pytest.approx(float(initial[name].norm()), rel=1e-5)
            assert 0 < callback.last_rotation[name.removesuffix(".weight")] <= 1 - math.cos(3 * math.atan(3**-3)) + 1e-6
    else:
        assert type(callback) is ll.LayerRotationMonitor and type(trainer.optimizers[0]) is torch.optim.SGD


def test_readme_yaml_snippet_configures_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from examples.cli import main

    monkeypatch.setattr(sys, "argv", ["examples.cli"])
    snippet = tmp_path / "readme.yaml"
    snippet.write_text(readme_blocks("yaml")[0])
    configs = Path(__file__).resolve().parents[1] / "examples" / "configs"
    cli = main(
        [
            "fit",
            "--config",
            str(configs / "mnist1d_sgd.yaml"),
            "--config",
            str(snippet),
            "--data.init_args.num_samples=400",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.max_steps=1",
            "--trainer.log_every_n_steps=1",
            "--trainer.limit_val_batches=1",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_checkpointing=false",
        ]
    )
    layca = cli.trainer.optimizers[0]
    assert isinstance(layca, ll.Layca) and type(layca.optimizer) is torch.optim.SGD
    assert layca.rotation_rate == pytest.approx(3**-3, rel=1e-12) and repr(layca.schedule) == "DepthDecay(alpha=0.0)"
    assert layca.optimizer.defaults["momentum"] == 0.9 and layca.step_count == 1
    (scheduler,) = cli.trainer.lr_scheduler_configs
    assert isinstance(scheduler.scheduler, torch.optim.lr_scheduler.MultiStepLR)
    assert dict(scheduler.scheduler.milestones) == {10: 1, 15: 1}
