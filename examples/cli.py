"""The examples' command line: LightningCLI with any model and data module, configured from YAML.

Usage (from the repository root)::

    python -m examples.cli fit --config examples/configs/mnist1d_layca.yaml
    python -m examples.cli fit --config examples/configs/mnist1d_layca.yaml --trainer.max_epochs=5
    python -m examples.cli fit --config examples/configs/digits_layca.yaml \\
        --trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor
    python -m examples.cli fit --config examples/configs/mnist1d_sgd.yaml --print_config

Models, data modules, callbacks, the optimizer and its LR scheduler are all given by ``class_path``/``init_args``;
``LaycaCallback`` wraps the optimizer that the ``optimizer:`` section builds.

A configuration mistake is reported in a few lines: a one-line usage instead of the list of every option, and of a
nested value (a schedule's argument inside a callback inside ``trainer.callbacks``) only the path to the value and
what is wrong with it, not the alternatives the parser also tried.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import sys
import warnings
from pathlib import Path
from typing import IO, NoReturn

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from lightning_layca import LayerRotationMonitor
from lightning_layca.callbacks.monitor import FIGURE_FILENAME

PROG = "python -m examples.cli"

# Lightning advertises its cloud services at every fit ("💡 Tip: ..."): not what a demo is about.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: not str(record.msg).startswith("💡 Tip:")
)
# Lightning 2.6 still uses a pytree class that torch >= 2.10 deprecates; nothing the examples can change.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)

_BRANCH = re.compile(
    r"^(?P<indent>[ -]*)(?:Parser key \"(?P<key>[^\"]+)\"|Problem with given class_path '(?P<cls>[^']+)'):$"
)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" -"))


def condense_parse_error(message: str) -> str:
    """Reduce jsonargparse's report of a bad nested value to the path of the value and what is wrong with it.

    For a value inside a class inside a union (``trainer.callbacks`` is a list of callbacks, a callback or None),
    jsonargparse reports why every alternative failed, then prints the whole given value. The one alternative that
    went deepest is the one the user meant: the report keeps the path to it and its own message. A message with no
    nesting, or with several alternatives equally deep, is returned unchanged.

    Example:
        >>> print(condense_parse_error('''Parser key "trainer.callbacks":
        ...   Errors:
        ...     - Problem with given class_path 'lightning_layca.DepthDecay':
        ...         Parser key "alpha":
        ...           Not of type SignedOpenUnitInterval: 1.5 is not in the open interval (-1, 1)
        ...     - Expected a <class 'NoneType'>
        ...   Given value: [...]'''))
        Parser key "trainer.callbacks" > lightning_layca.DepthDecay > "alpha":
          Not of type SignedOpenUnitInterval: 1.5 is not in the open interval (-1, 1)
    """
    lines = message.splitlines()
    branches = [i for i, line in enumerate(lines) if _BRANCH.match(line)]
    if len(branches) < 2:
        return message
    depth = max(_indent(lines[i]) for i in branches)
    (deepest, *others) = [i for i in branches if _indent(lines[i]) == depth]
    if others:
        return message
    detail = []
    for line in lines[deepest + 1 :]:
        if line.strip() and _indent(line) <= depth:
            break
        if line.strip():
            detail.append("  " + line.strip())
    path, limit = [], depth + 1
    for line in reversed(lines[: deepest + 1]):
        if not line.strip() or _indent(line) >= limit:
            continue
        limit = _indent(line)
        if m := _BRANCH.match(line):
            path.append(f'"{m["key"]}"' if m["key"] else m["cls"])
    if not detail:
        return message
    return "\n".join([f"Parser key {' > '.join(reversed(path))}:", *detail])


class ExamplesParser(LightningArgumentParser):
    """LightningCLI's parser with short error reports: a one-line usage and condensed nested errors."""

    def print_usage(self, file: IO[str] | None = None) -> None:
        """Print one line instead of every option (``--help`` still lists them)."""
        (file or sys.stderr).write(f"usage: {self.prog} --config FILE [--KEY=VALUE ...]\n")

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """Report ``message`` (condensed when it is about a nested value, once, where it is printed) and exit."""
        super().error(condense_parse_error(message) if self.exit_on_error else message, ex)


def tensorboard_command(logdir: str | os.PathLike[str]) -> str:
    """The command that serves ``logdir`` with the TensorBoard of the running Python environment, as typed here.

    ``tensorboard`` alone is "command not found" unless the environment is activated: the command names the script
    next to this interpreter (relative to the working directory when below it), or runs the module.

    Example:
        >>> tensorboard_command("logs").endswith("tensorboard --logdir logs")
        True
    """
    bin_dir = Path(sys.executable).parent
    script = bin_dir / ("tensorboard.exe" if os.name == "nt" else "tensorboard")
    if script.is_file():
        executable = [_as_typed(script)]
    else:
        executable = [_as_typed(Path(sys.executable)), "-m", "tensorboard.main"]
    return shlex.join([*executable, "--logdir", os.fspath(logdir)])


def _as_typed(path: Path) -> str:
    """``path`` relative to the working directory when below it (``.venv/bin/x``), else as it is."""
    try:
        return os.fspath(path.relative_to(Path.cwd()))
    except ValueError:
        return os.fspath(path)


class ExamplesCLI(LightningCLI):
    """LightningCLI that checks the callbacks' layer patterns before ``fit``, and says after it where the logs and
    the rotation figure are and how to view them."""

    def before_fit(self) -> None:
        # Lightning creates the logger's version folder just before the callbacks' `setup` hook, where the callbacks
        # check their arguments against the model (patterns that match no layer, an optimizer the module cannot
        # have): checked here first, a mistake leaves no empty run behind and is reported as a configuration error.
        for callback in self.trainer.callbacks:
            if isinstance(callback, LayerRotationMonitor):
                try:
                    callback.check_module(self.model)
                except (ValueError, MisconfigurationException) as error:
                    self.parser.error(str(error))

    def after_fit(self) -> None:
        print_where_the_logs_are(self.trainer)


def print_where_the_logs_are(trainer: Trainer) -> None:
    """After a fit, print (on global rank 0) where the logs and the rotation figure are, and how to view them.

    Call it on every process: the log folder is broadcast from global rank 0.
    """
    if trainer.logger is None:
        return
    log_dir_name = trainer.log_dir  # a broadcast from rank 0: every process must ask
    if not trainer.is_global_zero or log_dir_name is None:
        return
    log_dir = Path(log_dir_name)
    lines = [f"TensorBoard logs: {log_dir}"]
    if (log_dir / FIGURE_FILENAME).is_file():
        lines.append(f"Layer rotation curves: {log_dir / FIGURE_FILENAME}")
    command = tensorboard_command(trainer.logger.save_dir or log_dir)
    lines.append(f"View them next to accuracy: {command}   (then open http://localhost:6006)")
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
        parser_class=ExamplesParser,
        parser_kwargs={"prog": PROG},
    )


if __name__ == "__main__":
    # The examples' networks are small: two threads per operation are at most twice as fast as one on an idle CPU,
    # and when another process holds the second core every operation waits for it (on a busy 2-core machine the
    # demo took 3 min 15 s with two threads, 35 s with one). OMP_NUM_THREADS chooses otherwise.
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    main()
