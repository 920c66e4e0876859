"""Graph repository on disk: versioned graph directories behind a `CURRENT` pointer.

```
<repo>/CURRENT              the version a server serves: one line, the version number
<repo>/LAST_VERSION         highest version number ever handed out
<repo>/<version>/           a graph directory (manifest.json + read-only .npy files)
<repo>/.publishing-<v>-*/   a publish in progress (its builder holds a lock on it)
```

The layout is the model registry's (`walkrank.model_registry`) and is safe to read while a publish
runs for the same reasons: a version is built inside a staging directory in the repository
and renamed into place in one `os.rename`, verified, and only then does `CURRENT` move
(`walkrank.pointers`), so a server reloading sees the old version or the new one, never half
a graph. A version directory is never written again, so a server may map it for as long as it
likes. Version numbers only grow: LAST_VERSION is bumped before the build starts.

Retention deletes the oldest versions beyond `keep`, but never the one `CURRENT` names nor one
a server holds (`GraphLease`: a shared lock on the directory, taken for as long as anything in
the server still reads the graph). A version being deleted is held exclusively, so a server
cannot lease it half deleted. Docs: docs/graphs.md.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from walkrank.errors import DataError
from walkrank.graph.store import MANIFEST, GraphStore, read_manifest
from walkrank.pointers import (
    VERSION_RE,
    exclusive_lock,
    fsync_path,
    read_version,
    write_version,
)

CURRENT_FILE = "CURRENT"
LAST_VERSION_FILE = "LAST_VERSION"
_LOCK_FILE = ".publish.lock"
_STAGING_PREFIX = ".publishing-"
_DELETING_PREFIX = ".deleting-"
#: Versions kept by default besides the current one and those a server holds.
DEFAULT_KEEP = 3


@dataclass(frozen=True)
class GraphVersion:
    """One version of a repository, summarised from its manifest (listing, not verifying)."""

    version: int
    path: Path
    current: bool
    held: bool  # a server holds it (serving it, or finishing calls on it)
    created_at: str | None
    counts: dict[str, int]
    problem: str | None = None  # why its manifest cannot be read


def is_repository(path: Path) -> bool:
    """A directory with a version pointer (and not itself a graph directory)."""
    return (path / CURRENT_FILE).is_file() or (path / LAST_VERSION_FILE).is_file()


def resolve_graph(source: str | Path) -> tuple[Path, str]:
    """The directory to serve for a `graph:` setting and its version label.

    A repository serves the version `CURRENT` names (label: the number); a plain graph
    directory is served as it is (label: its content id, see `content_id`).
    """
    source = Path(source)
    if (source / MANIFEST).is_file():
        return source, content_id(read_manifest(source))
    if is_repository(source):
        repository = GraphRepository(source)
        version = repository.current_version()
        if version is None:
            raise DataError(
                f"{source / CURRENT_FILE}: no graph published yet "
                f"(run `walkrank graph build ... --publish {source}`)"
            )
        directory = repository.version_dir(version)
        if not directory.is_dir():
            raise DataError(
                f"{source / CURRENT_FILE}: points at version {version}, whose "
                f"directory {directory} does not exist"
            )
        return directory, str(version)
    if not source.is_dir():
        raise DataError(f"{source}: graph directory does not exist")
    raise DataError(
        f"{source}: neither a graph directory (no {MANIFEST}) nor a graph "
        f"repository (no {CURRENT_FILE}); build one with `walkrank graph build`"
    )


def content_id(manifest: dict[str, Any]) -> str:
    """A short id of a graph's contents (a hash of its array checksums): two directories with
    the same id hold the same graph, whatever their paths."""
    digest = hashlib.blake2b(
        json.dumps(manifest["checksums"], sort_keys=True).encode(), digest_size=6
    )
    return digest.hexdigest()


class GraphRepository:
    """Versioned graphs under one root directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    # -- reading -------------------------------------------------------------------------

    def version_dir(self, version: int) -> Path:
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise DataError(f"graph version must be a positive integer, got {version!r}")
        return self.root / str(version)

    def version_numbers(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(
            int(p.name) for p in self.root.iterdir() if p.is_dir() and VERSION_RE.fullmatch(p.name)
        )

    def current_version(self) -> int | None:
        return read_version(self.root / CURRENT_FILE, DataError)

    def versions(self) -> list[GraphVersion]:
        """Every version, oldest first."""
        current = self.current_version()
        return [self._describe(v, v == current) for v in self.version_numbers()]

    # -- writing -------------------------------------------------------------------------

    def publish(
        self, build: Callable[[Path], Any], keep: int | None = DEFAULT_KEEP
    ) -> GraphVersion:
        """Build a new version with `build(directory)`, verify it, make it CURRENT, then
        apply retention (`keep` versions besides the current and held ones; None keeps all).

        The build writes into a staging directory of the repository; nothing a server may
        map is touched, and a failed or interrupted build leaves no version behind.
        """
        self._check_root()
        with self._lock():
            self._remove_abandoned()
            version = self._reserve_version()
        staging = Path(tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{version}-", dir=self.root))
        try:
            with _held(staging, fcntl.LOCK_EX):  # marks the staging directory as in use
                built = staging / "graph"
                build(built)
                GraphStore.load(built, verify=True)  # never publish what a server would refuse
                os.rename(built, self.version_dir(version))
            fsync_path(self.root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        with self._lock():
            write_version(self.root / CURRENT_FILE, version)
            if keep is not None:
                self._prune(keep)
        return self._describe(version, True)

    def rollback(self, version: int | None = None) -> GraphVersion:
        """Point CURRENT at `version`, or at the newest version older than CURRENT; the target
        is verified first, so a rollback never points servers at a graph they would refuse."""
        with self._lock():
            current = self.current_version()
            known = self.version_numbers()
            if version is None:
                if current is None:
                    raise DataError(f"{self.root}: cannot roll back: no graph is published")
                older = [v for v in known if v < current]
                if not older:
                    raise DataError(
                        f"{self.root}: cannot roll back: version {current} is the oldest there is"
                    )
                version = older[-1]
            elif version not in known:
                raise DataError(
                    f"{self.root}: cannot roll back to version {version}: no such "
                    f"version (known: {', '.join(map(str, known)) or 'none'})"
                )
            try:
                GraphStore.load(self.version_dir(version), verify=True)
            except DataError as exc:
                raise DataError(f"cannot roll back to version {version}: {exc}") from exc
            write_version(self.root / CURRENT_FILE, version)
        return self._describe(version, True)

    def prune(self, keep: int) -> list[int]:
        """Delete versions beyond the newest `keep`, never CURRENT nor one a server holds;
        returns the versions deleted."""
        with self._lock():
            return self._prune(keep)

    # -- internals -----------------------------------------------------------------------

    def _check_root(self) -> None:
        if (self.root / MANIFEST).is_file():
            raise DataError(
                f"{self.root}: is a graph directory, not a graph repository; "
                f"publish into a new directory"
            )
        if self.root.exists() and not self.root.is_dir():
            raise DataError(f"{self.root}: exists and is not a directory")
        if (
            self.root.is_dir()
            and not is_repository(self.root)
            and any(not p.name.startswith(".") for p in self.root.iterdir())
        ):
            raise DataError(
                f"{self.root}: directory is not empty and is not a graph "
                f"repository; refusing to publish into it"
            )
        self.root.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def _lock(self) -> Iterator[None]:
        with exclusive_lock(self.root / _LOCK_FILE):
            yield

    def _reserve_version(self) -> int:
        last = read_version(self.root / LAST_VERSION_FILE, DataError) or 0
        version = max([last, *self.version_numbers()]) + 1
        write_version(self.root / LAST_VERSION_FILE, version)
        return version

    def _remove_abandoned(self) -> None:
        """Staging and deleting directories whose process died (nobody holds their lock)."""
        for entry in self.root.iterdir():
            if entry.name.startswith((_STAGING_PREFIX, _DELETING_PREFIX)) and entry.is_dir():
                with _try_held(entry) as free:
                    if free:
                        shutil.rmtree(entry, ignore_errors=True)

    def _prune(self, keep: int) -> list[int]:
        if keep < 0:
            raise DataError(f"keep must be >= 0, got {keep}")
        current = self.current_version()
        old = [v for v in self.version_numbers() if v != current]
        deleted = []
        for version in old[: max(0, len(old) - keep)]:
            directory = self.version_dir(version)
            with _try_held(directory) as free:
                if not free:  # a server maps it: it goes on a later publish or prune
                    continue
                doomed = self.root / f"{_DELETING_PREFIX}{version}"
                os.rename(directory, doomed)
                shutil.rmtree(doomed)
            deleted.append(version)
        return deleted

    def _describe(self, version: int, current: bool) -> GraphVersion:
        directory = self.version_dir(version)
        with _try_held(directory) as free:
            held = not free
        created = dt.datetime.fromtimestamp(directory.stat().st_mtime, dt.UTC)
        created_at = created.isoformat(timespec="seconds").replace("+00:00", "Z")
        try:
            counts = dict(read_manifest(directory)["counts"])
        except DataError as exc:
            return GraphVersion(version, directory, current, held, created_at, {}, str(exc))
        return GraphVersion(version, directory, current, held, created_at, counts)


@contextmanager
def _held(directory: Path, operation: int) -> Iterator[None]:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, operation)
        yield
    finally:
        os.close(fd)


@contextmanager
def _try_held(directory: Path) -> Iterator[bool]:
    """Hold `directory` exclusively if nobody else holds it; yields whether it could."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
