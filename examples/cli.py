"""The examples' command line: LightningCLI with any model and data module, configured from YAML.

Usage (from the repository root)::

    python -m examples.cli fit --config examples/configs/mnist1d_layca.yaml
    python -m examples.cli fit --config examples/configs/mnist1d_layca.yaml --trainer.max_epochs=5
    python -m examples.cli fit --config examples/configs/digits_layca.yaml \\
        --trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor
    python -m examples.cli fit --config examples/configs/mnist1d_sgd.yaml --print_config

Models, data modules, callbacks, the optimizer and its LR scheduler are all given by ``class_path``/``init_args``;
``LaycaCallback`` wraps the optimizer that the ``optimizer:`` section builds.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import ArgsType, LightningCLI

from lightning_layca.callbacks.monitor import FIGURE_FILENAME


class ExamplesCLI(LightningCLI):
    """LightningCLI that says, after ``fit``, where the logs and the rotation figure are and how to view them."""

    def after_fit(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero or trainer.logger is None or trainer.log_dir is None:
            return
        log_dir = Path(trainer.log_dir)
        lines = [f"TensorBoard logs: {log_dir}"]
        if (log_dir / FIGURE_FILENAME).is_file():
            lines.append(f"Layer rotation curves: {log_dir / FIGURE_FILENAME}")
        lines.append(f"View them next to accuracy: tensorboard --logdir {trainer.logger.save_dir or log_dir}")
        print("\n".join(lines))


def main(args: ArgsType = None, run: bool = True) -> LightningCLI:
    """Build the CLI from ``args`` (``sys.argv`` when ``None``) and, if ``run``, run its subcommand."""
    return ExamplesCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
