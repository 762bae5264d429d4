"""`python -m lightning_cls fit|validate|test|predict|calibrate|export|serve|monitor|registry|compare|deployment|
distill|store`: the Trainer subcommands (LightningCLI, `trainer_cli`), the extra subcommands, and the one place where
user errors (errors.py) become one `error: ...` line."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

from lightning_cls.errors import UserError

# Subcommands that are not Trainer methods: the module whose `main(argv)` runs each (`arg_parser.run_command`: the
# options are its function's typed signature and docstring). Imported when run, so that `fit` does not import the
# server's libraries.
EXTRA_MODULES = {
    "export": "lightning_cls.export.exporter",
    "serve": "lightning_cls.serving.server",
    "monitor": "lightning_cls.monitoring.monitor",
    "registry": "lightning_cls.lifecycle.registry",
    "compare": "lightning_cls.lifecycle.compare",
    "deployment": "lightning_cls.serving.deployment",
    "store": "lightning_cls.store.transfer",
    "distill": "lightning_cls.lifecycle.distill",
}


def _module_main(module: str) -> Callable[[list[str]], Any]:
    def run(argv: list[str]) -> Any:
        return importlib.import_module(module).main(argv)

    return run


def _calibrate(argv: list[str]) -> Any:
    from lightning_cls.trainer_cli import calibrate  # a `validate` run with LightningCLI

    return calibrate(argv)


EXTRA_COMMANDS: dict[str, Callable[[list[str]], Any]] = {
    "calibrate": _calibrate,
    **{name: _module_main(module) for name, module in EXTRA_MODULES.items()},
}


def main(args: list[str] | None = None) -> Any:
    """Run a subcommand. The one place that reports user errors: from the command line (`args` None), any
    ``UserError`` (errors.py: bad data, checkpoint, setting, input file or export), from every subcommand, prints one
    `error: ...` line and exits with status 1; called with `args` (tests, scripts), it is raised for the caller."""
    try:
        return _run(args)
    except UserError as err:
        if args is not None:  # called from Python (tests, scripts): the caller handles it
            raise
        sys.exit(f"error: {err}")  # from the command line: one line that says what to fix, no traceback


def _run(args: list[str] | None) -> Any:
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in EXTRA_COMMANDS:
        return EXTRA_COMMANDS[argv[0]](argv[1:])
    from lightning_cls.trainer_cli import run  # Lightning: imported only for the subcommands that use it

    return run(args, list(EXTRA_COMMANDS))
