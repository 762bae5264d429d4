"""The CLI's argument parser: a bad option or config key is reported in one line, with the closest valid option."""

from __future__ import annotations

import difflib
import re
import sys
from typing import Any, NoReturn

from lightning.pytorch.cli import LightningArgumentParser


class OneLineErrorParser(LightningArgumentParser):
    """LightningArgumentParser that reports a bad option in one line, with the closest valid option, instead of the
    full usage; option prefixes are not accepted (a typo that is a prefix of a real option must not pass)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {one_line(message)}{suggestion(message, parser)} (`{prog} --help` lists options)\n")
        self.exit(2)


def one_line(message: str) -> str:
    """jsonargparse's multi-line messages joined into one, with `<class 'int'>` shortened to `int`."""
    text = ""
    for line in (line.strip(" -") for line in message.splitlines()):
        if line:
            separator = "" if not text else " " if text.endswith(":") else "; "
            text += separator + line
    return re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", text)


def _options(parser: Any) -> list[str]:
    """Every `--option` of the parser and of its subcommands' parsers."""
    options = []
    for action in parser._actions:
        options += [s for s in action.option_strings if s.startswith("--")]
        for sub in getattr(action, "_name_parser_map", {}).values():
            options += _options(sub)
    return options


def suggestion(message: str, parser: Any) -> str:
    """`; did you mean --x?` for each unknown option or config key in ``message`` that is close to a real one."""
    unknown = []
    if "unrecognized arguments:" in message:
        unknown += re.findall(r"(--[\w.\-]+)", message.split("unrecognized arguments:", 1)[1])
    # An unknown key in a config file: `Group 'trainer' does not accept option 'max_epochz'` or `Subcommand 'fit'
    # does not accept option 'trainer.max_epochz'`.
    pattern = r"(?:Group '([\w.]+)'|Subcommand '\w+') does not accept option '([\w.]+)'"
    unknown += [f"--{group}.{key}" if group else f"--{key}" for group, key in re.findall(pattern, message)]
    options = _options(parser)
    hints = []
    for key in dict.fromkeys(unknown):
        close = difflib.get_close_matches(key, options, n=1, cutoff=0.75)
        if close:
            hints.append(f"did you mean {close[0]} (for {key})?")
    return "; " + "; ".join(hints) if hints else ""
