"""The examples' command line: LightningCLI with any model and data module, configured from YAML.

Usage (from the repository root)::

    python -m examples.cli fit --config examples/configs/mnist1d_layca.yaml
    python -m examples.cli fit --config examples/configs/mnist1d_layca.yaml --trainer.max_epochs=5
    python -m examples.cli fit --config examples/configs/mnist1d_sgd.yaml --print_config

Models, data modules, callbacks, the optimizer and its LR scheduler are all given by ``class_path``/``init_args``;
``LaycaCallback`` wraps the optimizer that the ``optimizer:`` section builds.
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import ArgsType, LightningCLI


def main(args: ArgsType = None, run: bool = True) -> LightningCLI:
    """Build the CLI from ``args`` (``sys.argv`` when ``None``) and, if ``run``, run its subcommand."""
    return LightningCLI(
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
