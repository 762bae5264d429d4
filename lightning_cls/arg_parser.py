"""One command shape: a subcommand's options are its function's typed signature and docstring (`run_command`), and
a bad option or config key is reported in one line, with the closest valid option (`bad_option`: what
`run_command` raises and `cli.OneLineErrorParser` prints for the Trainer subcommands)."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import typing
from collections.abc import Callable
from typing import Any, NoReturn

from jsonargparse import ActionConfigFile, ArgumentParser

from lightning_cls.errors import ConfigError, UserError

PROG = "python -m lightning_cls"
# A function, a dict of them (the subcommands), or a class (its methods the subcommands): see `run_command`.
Command = Callable[..., Any] | type | dict[str, Callable[..., Any]]


def run_command(
    command: Command, argv: list[str], name: str, *, description: str | None = None, config_file: bool = False
) -> Any:
    """Parse ``argv`` as the options of `python -m lightning_cls NAME`, built from the typed signature and docstring
    of ``command``, and return what it returns. ``command`` is
    - a function: each parameter is an option (`--name value`; a positional-only one is a positional argument), and
      a parameter typed with a dataclass (settings such as `DriftThresholds`) gives its fields as flat options
      (`--psi_warning`, not `--thresholds.psi_warning`), the dataclass being built from them;
    - a dict of such functions: the subcommands (`NAME ACTION --option ...`);
    - a class: its constructor's parameters are options given before the subcommand, its public methods the
      subcommands.

    ``description``: by default the docstring's first paragraph. ``config_file``: also `--config FILE` (and
    `--print_config`). A bad option, and any ``UserError`` that ``command`` raises, reach the caller (`cli.main`
    prints one `error: ...` line) with a message that begins with `NAME:` (`NAME ACTION:` once a subcommand runs).
    """
    label = name
    try:
        values = command_parser(command, name, description, config_file).parse_args(argv).as_dict()
        if not _actions(command):
            return _call(command, values)
        action = values["subcommand"]
        label = f"{name} {action}"
        if inspect.isclass(command):
            return _call(command, values[action], action, instance=_call(command, values))
        return _call(command[action], values[action])
    except UserError as err:  # the command named once, here, for every command; `cli.main` prints the line
        err.args = (f"{label}: {err}",)
        raise


def command_parser(
    command: Command, name: str, description: str | None = None, config_file: bool = False
) -> CommandParser:
    """The parser of `python -m lightning_cls NAME` that `run_command` uses: its `--help` is the documentation of
    ``command``'s options."""
    parser = CommandParser(prog=f"{PROG} {name}", description=description or _first_paragraph(command))
    if config_file:
        parser.add_argument("--config", action=ActionConfigFile, help="Path to a configuration file.")
    if not isinstance(command, dict):
        _add_options(parser, command)
    actions = _actions(command)
    if actions:
        subcommands = parser.add_subcommands(required=True)
        for action, function in actions.items():
            subparser = CommandParser(description=_first_paragraph(function))
            _add_options(subparser, *((command, action) if inspect.isclass(command) else (function, None)))
            subcommands.add_subcommand(action, subparser, help=_first_paragraph(function))
    return parser


class CommandParser(ArgumentParser):
    """jsonargparse's parser, for which a bad option is a ``ConfigError`` of one line naming it and the closest valid
    one (reported by `cli.main`), not the usage and an exit; option prefixes are not accepted (a typo that is a
    prefix of a real option must not pass)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # jsonargparse parsing a value for itself expects its ArgumentError
            super().error(message, ex)
        raise ConfigError(bad_option(message, ex, self))


def _first_paragraph(command: Any) -> str | None:
    doc = inspect.getdoc(command) if not isinstance(command, dict) else None
    return doc.split("\n\n")[0] if doc else None


def _actions(command: Any) -> dict[str, Callable[..., Any]]:
    """The subcommands: a dict's functions, or a class's public methods (in the order written); none for a function."""
    if isinstance(command, dict):
        return command
    if inspect.isclass(command):
        return {k: v for k, v in vars(command).items() if inspect.isfunction(v) and not k.startswith("_")}
    return {}


def _target(owner: Any, method: str | None) -> Callable[..., Any]:
    """What the options are the parameters of: a function, a method, or a class's constructor."""
    if method:
        return getattr(owner, method)
    return owner.__init__ if inspect.isclass(owner) else owner


def _parameters(owner: Any, method: str | None = None) -> list[inspect.Parameter]:
    return [p for p in inspect.signature(_target(owner, method)).parameters.values() if p.name != "self"]


def _settings(owner: Any, method: str | None = None) -> dict[str, type]:
    """The parameters typed with a dataclass (settings, given as flat options) and their dataclasses."""
    names = {p.name for p in _parameters(owner, method)}
    hints = typing.get_type_hints(owner if dataclasses.is_dataclass(owner) else _target(owner, method))
    return {
        name: hint
        for name, hint in hints.items()
        if name in names and inspect.isclass(hint) and dataclasses.is_dataclass(hint)
    }


def _add_options(parser: ArgumentParser, owner: Any, method: str | None = None) -> None:
    """The options of a function, a class's constructor (``owner`` a class) or method, and of their settings."""
    every = {p.name for p in _parameters(owner, method)}
    settings = _settings(owner, method)
    positional = {p.name for p in _parameters(owner, method) if p.kind is inspect.Parameter.POSITIONAL_ONLY}
    for as_positional, names in ((True, positional), (False, every - positional - set(settings))):
        if names:
            options = {"as_group": False, "as_positional": as_positional, "skip": every - names}
            if method:
                parser.add_method_arguments(owner, method, **options)
            elif inspect.isclass(owner):
                parser.add_class_arguments(owner, **options)
            else:
                parser.add_function_arguments(owner, **options)
    for settings_class in settings.values():
        _add_options(parser, settings_class)


def _call(owner: Any, values: dict[str, Any], method: str | None = None, instance: Any = None) -> Any:
    """Call the function, method (of ``instance``) or class with the parsed ``values``, its settings built."""
    settings = _settings(owner, method)
    args, kwargs = [], {}
    for p in _parameters(owner, method):
        value = _call(settings[p.name], values) if p.name in settings else values[p.name]
        if p.kind is inspect.Parameter.POSITIONAL_ONLY:
            args.append(value)
        else:
            kwargs[p.name] = value
    return (getattr(instance, method) if method else owner)(*args, **kwargs)


def bad_option(message: str, ex: Exception | None, parser: Any) -> str:
    """jsonargparse's error about an option or config key, in one line: the culprit, the closest valid option, and
    the `--help` that lists them (of the subcommand's parser when the error is in a subcommand)."""
    parser = getattr(ex, "subcommand_parser", None) or parser
    prog = parser.prog.replace(" [options]", "")
    return f"{one_line(message)}{suggestion(message, parser)} (`{prog} --help` lists options)"


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
    # An unknown key in a config file: `Group 'trainer' does not accept option 'max_epochz'`, `Subcommand 'fit'
    # does not accept option 'trainer.max_epochz'`, or (a command without groups) `Option 'psi_warnin' is not accepted`.
    pattern = r"(?:Group '([\w.]+)'|Subcommand '\w+') does not accept option '([\w.]+)'"
    unknown += [f"--{group}.{key}" if group else f"--{key}" for group, key in re.findall(pattern, message)]
    unknown += [f"--{key}" for key in re.findall(r"Option '([\w.]+)' is not accepted", message)]
    options = _options(parser)
    hints = []
    for key in dict.fromkeys(unknown):
        close = difflib.get_close_matches(key, options, n=1, cutoff=0.75)
        if close:
            hints.append(f"did you mean {close[0]} (for {key})?")
    return "; " + "; ".join(hints) if hints else ""
