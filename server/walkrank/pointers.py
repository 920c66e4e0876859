"""Durable version pointers and publish locks, shared by the model registry and the graph
repository (`walkrank.model_registry`, `walkrank.graph.repository`).

A pointer (`CURRENT`, `LAST_VERSION`) is one line holding a positive version number. It is
written to a temporary file, fsynced and renamed over the old one (`os.replace`), then the
directory is fsynced, so a reader sees the old number or the new one and a crash keeps one of
them. Publishes are serialised with an advisory `flock` on a lock file, which conflicts between
separate `open()` calls even inside one process, so threads are serialised as well as processes.
"""

from __future__ import annotations

import fcntl
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from walkrank.errors import WalkRankError

VERSION_RE = re.compile(r"[1-9][0-9]*")


def read_version(path: Path, error: type[WalkRankError]) -> int | None:
    """The version number a pointer file holds, None when it does not exist; `error` (naming
    the file) when it holds anything but a positive number."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read version pointer: {exc}") from exc
    if not VERSION_RE.fullmatch(text):
        raise error(f"{path}: expected a positive version number, got {text[:40]!r}")
    return int(text)


def write_version(path: Path, version: int) -> None:
    """Replace a pointer file atomically and durably. The temporary name is the writing
    thread's own: two threads of one process (a Reload and the graph watcher) may write the
    same pointer at once."""
    temp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    write_durable(temp, f"{version}\n".encode())
    os.replace(temp, path)
    fsync_path(path.parent)


def write_durable(path: Path, payload: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_path(path: Path) -> None:
    """Make a directory's entries, or a closed file's data, durable (fsync reaches either
    through any descriptor)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` (created if missing) for the block."""
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
