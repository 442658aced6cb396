"""Files and folders that are never seen half-written.

Everything is first written next to its destination (the same filesystem, so the final rename is
atomic) and renamed over it only once complete; on an error the temporary is removed and the
destination is left as it was.

    with atomic_file("out.json") as tmp:      # any writer: tmp is a Path
        tmp.write_text(...)
    atomic_write_text("notes.md", text)
    atomic_write_json("result.json", data)
    with atomic_directory("checkpoints/final") as staging:
        save_everything_into(staging)          # then it replaces checkpoints/final whole
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: int | None = None) -> Iterator[Path]:
    """A temporary sibling of `path` to write; renamed onto `path` when the block succeeds.
    `mode`: permission bits for the result (a temporary file is private, 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        if mode is not None:
            os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_file(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | Path, data: Any, indent: int | None = 1, default=None) -> Path:
    """`data` as JSON; `default` as `json.dumps` takes it (e.g. `str` for paths)."""
    return atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=False, default=default) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """A staging folder next to `path`; when the block succeeds it replaces `path` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield staging
        replace_directory(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def replace_directory(source: Path, destination: Path) -> None:
    """Move the complete folder `source` to `destination`, replacing what is there: the old one
    is moved aside first and deleted last, so `destination` is always one whole folder or absent
    only for the instant between two renames."""
    if destination.exists():
        old = destination.with_name(f".{destination.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(destination, old)
        os.replace(source, destination)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, destination)


def move_into(source: Path, destination: Path) -> None:
    """Move every entry of the complete folder `source` into the existing folder `destination`
    (replacing entries of the same name), then remove `source`."""
    for entry in source.iterdir():
        target = destination / entry.name
        if target.is_dir() and not entry.is_dir():
            shutil.rmtree(target)
        if entry.is_dir() and target.exists():
            replace_directory(entry, target)
        else:
            os.replace(entry, target)
    source.rmdir()
