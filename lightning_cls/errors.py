"""The errors a user can fix, one family: each message names the culprit (file, column, row, label, option, value)
and what to change. `cli.main` turns any of them into one `error: ...` line, for every subcommand."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class UserError(ValueError):
    """Base of every error caused by input, files or settings rather than by a bug. A ValueError, so that code
    catching ValueError (jsonargparse, for one) keeps working."""


class ConfigError(UserError):
    """A setting that cannot work as given; the message names the option and what to set instead."""


class CheckpointError(UserError):
    """A checkpoint file that is missing, truncated, tampered with or not a checkpoint; the message names it."""


class DataError(UserError):
    """Input data that cannot be used as given; the message names the file, column, row or label."""


class InputError(UserError):
    """A file, folder or setting that cannot be used as given; the message names it and what is wrong."""


class ExportError(UserError):
    """An export that cannot be made as asked; the message names the path or setting."""


@contextmanager
def hub_errors(option: str, name: str) -> Iterator[None]:
    """Turn transformers' failure to find a model or tokenizer into a ``ConfigError`` naming the option to fix."""
    try:
        yield
    except (OSError, ValueError) as err:
        raise ConfigError(_not_found(option, name, err)) from err


def _not_found(option: str, name: str, err: BaseException) -> str:
    reason = first_line(err)
    if not name.strip():  # Path("") is the current folder: it "exists"
        return f"{option} is empty: give a local folder or a hub name (an unset environment variable in a config?)."
    if Path(name).expanduser().exists():
        return f"{option}={name!r}: the folder exists but cannot be loaded ({reason})."
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        return f"{option}={name!r}: there is no such folder. Give an existing local folder or a hub name."
    return (
        f"{option}={name!r} is not a local folder, and the Hugging Face hub did not provide it ({reason}). "
        "Check the name, or give a local folder (offline: set HF_HUB_OFFLINE=1 to fail fast)."
    )


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message, shortened: enough to say what went wrong."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# How a sent value is named in a message (a request's field, a feedback item): its kind, or its JSON cut short.
def kind_of(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, int | float) else type(value).__name__)


def short(value: Any, limit: int = 60) -> str:
    """A sent value for a message: its JSON, cut at ``limit`` characters."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."
