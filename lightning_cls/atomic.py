"""Write beside, then rename: a folder or file appears whole or not at all, never half-written."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_folder(final: str | Path, exist_ok: bool = False) -> Iterator[Path]:
    """Yield a new temporary folder beside ``final``; when the block succeeds it is renamed to ``final``.

    A rename within one file system is atomic, so a reader (another rank, a server, a later run) sees either no
    folder or the complete one; a crash or an error in the block removes the temporary folder instead. With
    ``exist_ok``, a ``final`` that another process completed meanwhile is kept and ours dropped: for caches, whose
    content depends only on their name.
    """
    final = Path(final)
    # Hidden, and named by our process id: a listing of the parent never shows it as a result, and two processes
    # writing the same folder at once do not share one.
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed earlier process that had our id
    tmp.mkdir(parents=True)
    try:
        yield tmp
        try:
            tmp.rename(final)
        except OSError:
            if not (exist_ok and final.is_dir()):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process got there first with the same content
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; when the block succeeds the file written there replaces ``final``.

    ``os.replace`` within one file system is atomic: a reader sees the old file or the new one, never a part; a crash
    or an error in the block removes the temporary file and leaves ``final`` as it was.
    """
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
