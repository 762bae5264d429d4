"""One command shape (`arg_parser.run_command`): the options are a function's typed signature and docstring,
settings dataclasses give flat options, subcommands are functions or methods, and every bad option or user error
reaches `cli.main` named after the command."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest

from lightning_cls.arg_parser import run_command
from lightning_cls.cli import main
from lightning_cls.errors import ConfigError, InputError


@dataclass(frozen=True)
class Limits:
    """Limits.

    Args:
        low: The lower limit.
        high: The upper limit.
    """

    low: float = 0.1
    high: float = 0.9


def report(path: str, rows: int = 10, limits: Limits = Limits()) -> dict:
    """Report on a file.

    Args:
        path: The file to read.
        rows: How many rows.
        limits: When a value is out of bounds.
    """
    if rows < 0:
        raise InputError(f"--rows={rows} is negative.")
    return {"path": path, "rows": rows, "limits": limits}


def test_a_function_and_its_settings_are_flat_options(tmp_path, capsys):
    out = run_command(report, ["--path", "a.csv", "--high", "0.5"], "report")
    assert out == {"path": "a.csv", "rows": 10, "limits": Limits(0.1, 0.5)}
    config = tmp_path / "report.yaml"
    config.write_text("path: b.csv\nlow: 0.2\n")
    out = run_command(report, [f"--config={config}", "--rows", "3"], "report", config_file=True)
    assert out == {"path": "b.csv", "rows": 3, "limits": Limits(0.2, 0.9)}
    with pytest.raises(SystemExit) as done:
        run_command(report, ["--help"], "report")
    assert done.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for text in ("python -m lightning_cls report", "Report on a file.", "--low LOW The lower limit.", "--rows ROWS"):
        assert text in help_text
    assert "--config" not in help_text and "--limits" not in help_text


def test_a_bad_option_or_a_user_error_is_one_line_naming_the_command(tmp_path):
    with pytest.raises(ConfigError) as err:
        run_command(report, ["--path", "a", "--hihg", "1"], "report")
    message = str(err.value)
    assert message.startswith("report: unrecognized arguments: --hihg 1") and "\n" not in message
    assert "did you mean --high (for --hihg)?" in message and "`python -m lightning_cls report --help`" in message
    config = tmp_path / "typo.yaml"
    config.write_text("path: a\nhihg: 1\n")
    with pytest.raises(
        ConfigError, match=r"^report: Option 'hihg' is not accepted; did you mean --high \(for --hihg\)"
    ):
        run_command(report, [f"--config={config}"], "report", config_file=True)
    with pytest.raises(ConfigError, match=r'^report: Parser key "rows": Expected a int'):
        run_command(report, ["--path", "a", "--rows", "many"], "report")
    with pytest.raises(InputError, match=r"^report: --rows=-1 is negative\.$"):
        run_command(report, ["--path", "a", "--rows", "-1"], "report")


class Shelf:
    """Books on a shelf."""

    def __init__(self, shelf: str = "main") -> None:
        """
        Args:
            shelf: Which shelf.
        """
        self.shelf = shelf

    def add(self, title: str, copies: int = 1) -> list:
        """add a book

        Args:
            title: Its title.
            copies: How many.
        """
        return [self.shelf, title, copies]

    def find(self, title: str, /) -> list:
        """find a book

        Args:
            title: Its title.
        """
        if title == "lost":
            raise InputError(f"no book {title!r}")
        return [self.shelf, title]

    def _private(self) -> None:
        """Not a subcommand."""


def test_subcommands_from_functions_or_a_classs_methods():
    commands = {"report": report, "twice": lambda: 2}
    assert run_command(commands, ["report", "--path", "x", "--low", "0"], "tool")["limits"] == Limits(0.0, 0.9)
    # A class: its constructor's options before the subcommand, a positional-only parameter given by position.
    assert run_command(Shelf, ["--shelf", "top", "add", "--title", "Dune"], "shelf") == ["top", "Dune", 1]
    assert run_command(Shelf, ["find", "Dune"], "shelf") == ["main", "Dune"]
    with pytest.raises(InputError, match=r"^shelf find: no book 'lost'$"):
        run_command(Shelf, ["find", "lost"], "shelf")
    with pytest.raises(ConfigError, match=r"^shelf: .*'_private'.*`python -m lightning_cls shelf --help`"):
        run_command(Shelf, ["_private"], "shelf")
    with pytest.raises(ConfigError, match=r"did you mean --copies \(for --copie\)\?.*shelf add --help"):
        run_command(Shelf, ["add", "--title", "x", "--copie", "2"], "shelf")


@pytest.mark.parametrize(
    "args",
    [["export"], ["serve"], ["monitor"], ["compare"], ["registry", "show"], ["deployment", "promote"]],
    ids=lambda args: " ".join(args),
)
def test_every_extra_command_reports_a_bad_option_in_one_line_with_status_1(args, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning_cls", *args, "--bogus", "1"])
    with pytest.raises(SystemExit) as done:
        main()
    message = done.value.code  # a string: Python prints it and exits with status 1
    assert isinstance(message, str) and "\n" not in message, message
    assert message.startswith(f"error: {args[0]}: unrecognized arguments: --bogus 1"), message
    assert f"`python -m lightning_cls {' '.join(args)} --help` lists options" in message


def test_deployment_names_the_action_and_an_unreachable_service(capsys):
    from lightning_cls.serving.deployment import ServiceError

    with pytest.raises(ServiceError, match=r"^deployment show: http://127\.0\.0\.1:9 is unreachable"):
        main(["deployment", "show", "--url", "http://127.0.0.1:9", "--timeout", "5"])
    with pytest.raises(ConfigError, match=r"^deployment: .*'shadow', 'canary'.*deployment set --help"):
        main(["deployment", "set", "--mode", "sideways"])
    assert not capsys.readouterr().out


def test_registry_help_lists_its_actions_and_the_global_option(capsys):
    with pytest.raises(SystemExit) as done:
        main(["registry", "--help"])
    assert done.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--registry_uri" in out and all(a in out for a in ("register", "alias", "promote", "show", "resolve"))
