"""Object storage (`s3://bucket/prefix`) for graph repositories, model registries and logs.

Servers map graphs and load models from local disk (a memory map needs a local file), so
object storage is a place to publish to and mirror from, through pyarrow's filesystems
(credentials, region and endpoint from the usual AWS settings: `AWS_ACCESS_KEY_ID`,
`AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL` for an S3-compatible server, or query parameters of
the URI such as `?endpoint_override=host:port&scheme=http`).

Both directions keep the layouts' promise that a reader sees an old or a new version, never
half of one (walkrank.model_registry, walkrank.graph.repository):

- `push(local, uri)` uploads every file under `local`, the version pointers (`CURRENT`,
  `LAST_VERSION`) last, so a store reader never finds a pointer naming a version whose files
  are not all there. Files already in the store with the same size are skipped (published
  versions never change); one with another size is refused, naming it. Hidden files (locks,
  staging and deletion directories) are never uploaded. One publisher per store.
- `pull(uri, local)` reads the pointers first, then downloads, of each numbered version
  directory beside a pointer, only the version it names (a repository's other versions stay
  in the store), each file to a temporary name then renamed; the pointers are written last
  and atomically. A pointer naming a version with no files is an error and the local pointer
  is left as it was.

Logs are immutable Parquet parts with unique names, so `push` copies each once. A server
whose `logs_dir` is a store URI writes them locally and ships each closed file itself
(`walkrank.logs.shipping`); readers (`walkrank train`, its Dask path) read them from the store
through the same filesystems (`location`, `join`, `filesystem_of`).

A server whose `graph` or `models_dir` is a store URI mirrors it into its `cache_dir`
(`mirror_dir`) with `refresh` (the graph: one read of `CURRENT` when nothing changed) and
`pull` (models), and serves the mirror as a local repository or registry.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

from walkrank.errors import ConfigError, DataError
from walkrank.pointers import VERSION_RE, read_version, write_version

if TYPE_CHECKING:
    from walkrank.graph.repository import GraphVersion

POINTERS = ("CURRENT", "LAST_VERSION")
_CHUNK = 8 << 20


@dataclass
class Transfer:
    """What a push or pull did: files copied and skipped (already there), bytes copied."""

    copied: list[str] = field(default_factory=list)
    skipped: int = 0
    bytes: int = 0


def is_remote(location: str | os.PathLike[str]) -> bool:
    """True for a URI with a scheme other than `file` (s3://, gs://, ...)."""
    scheme, sep, _ = str(location).partition("://")
    return bool(sep) and scheme not in ("", "file")


_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")


def open_store_uri(location: str) -> str:
    """`location` checked as a store URI (a known scheme, a bucket) without contacting the
    store, and without a trailing slash; ConfigError naming it otherwise."""
    scheme, _, rest = location.partition("://")
    if scheme not in _SCHEMES:
        raise ConfigError(
            f"{location}: not a usable storage location: unknown scheme {scheme!r} "
            f"(expected one of {', '.join(_SCHEMES)})"
        )
    base, sep, query = rest.partition("?")
    if not base.strip("/"):
        raise ConfigError(f"{location}: name a bucket ({scheme}://bucket/prefix)")
    return f"{scheme}://{base.rstrip('/')}{sep}{query}"


def open_store(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and root path of `uri`; ConfigError naming it when it is unusable."""
    try:
        filesystem, root = pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise ConfigError(f"{uri}: not a usable storage location: {exc}") from None
    root = root.rstrip("/")
    if not root:
        raise ConfigError(f"{uri}: name a bucket (s3://bucket/prefix)")
    return filesystem, root


def _listing(filesystem: pafs.FileSystem, root: str) -> dict[str, int]:
    """Every file under `root` by its path relative to it (POSIX), with its size."""
    try:
        infos = filesystem.get_file_info(
            pafs.FileSelector(root, recursive=True, allow_not_found=True)
        )
    except OSError as exc:
        raise DataError(f"{root}: cannot list: {exc}") from None
    prefix = root + "/"
    return {
        info.path[len(prefix) :]: info.size
        for info in infos
        if info.type == pafs.FileType.File and info.path.startswith(prefix)
    }


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in PurePosixPath(relative).parts)


def _is_pointer(relative: str) -> bool:
    return PurePosixPath(relative).name in POINTERS


def _order(relative: str) -> int:
    """Copy order, as a publish writes: files, then LAST_VERSION, then CURRENT."""
    name = PurePosixPath(relative).name
    return POINTERS[::-1].index(name) + 1 if name in POINTERS else 0


def push(local: Path, uri: str) -> Transfer:
    """Upload the tree under `local` to `uri`, pointers last (module docstring)."""
    if not local.is_dir():
        raise DataError(f"{local}: not a directory")
    filesystem, root = open_store(uri)
    remote = _listing(filesystem, root)
    files = sorted(
        str(p.relative_to(local).as_posix())
        for p in local.rglob("*")
        if p.is_file() and not _hidden(str(p.relative_to(local)))
    )
    done = Transfer()
    for relative in sorted(files, key=_order):  # pointers after everything they name
        path = local / relative
        size = path.stat().st_size
        if not _is_pointer(relative) and relative in remote:
            if remote[relative] != size:
                raise DataError(
                    f"{uri}/{relative}: already in the store with {remote[relative]}"
                    f" bytes, {path} has {size}; a published file never changes"
                )
            done.skipped += 1
            continue
        try:
            with (
                open(path, "rb") as source,
                filesystem.open_output_stream(f"{root}/{relative}") as target,
            ):
                shutil.copyfileobj(source, target, _CHUNK)
        except OSError as exc:
            raise DataError(f"{uri}/{relative}: cannot upload {path}: {exc}") from None
        done.copied.append(relative)
        done.bytes += size
    return done


def _read(filesystem: pafs.FileSystem, path: str) -> bytes:
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def _wanted(relative: str, pointers: dict[str, int]) -> bool:
    """Files of a numbered version directory beside a CURRENT pointer only when it names
    that version; every other file."""
    parts = PurePosixPath(relative).parts
    for depth, part in enumerate(parts[:-1]):
        if VERSION_RE.fullmatch(part):
            current = pointers.get(str(PurePosixPath(*parts[:depth], "CURRENT")))
            if current is not None and int(part) != current:
                return False
    return True


def pull(uri: str, local: Path, *, every_version: bool = False) -> Transfer:
    """Mirror `uri` into `local`: the versions the store's pointers name (`every_version`:
    all of them, for commands that list or roll back), pointers last."""
    try:
        return _pull(uri, local, every_version)
    except OSError as exc:  # the store failed under a read: one line naming it
        raise store_error(uri, "pull", exc) from None


def _pull(uri: str, local: Path, every_version: bool) -> Transfer:
    filesystem, root = open_store(uri)
    remote = _listing(filesystem, root)
    pointers: dict[str, int] = {}
    for relative in sorted(r for r in remote if _is_pointer(r)):  # before the listing is used
        text = _read(filesystem, f"{root}/{relative}").decode("ascii", "replace").strip()
        if not VERSION_RE.fullmatch(text):
            raise DataError(
                f"{uri}/{relative}: expected a positive version number, got {text[:40]!r}"
            )
        pointers[relative] = int(text)
    remote = _listing(filesystem, root)  # everything a pointer read above names is here now
    for relative, version in pointers.items():
        if PurePosixPath(relative).name == "CURRENT":
            version_dir = str(PurePosixPath(relative).parent / str(version))
            version_dir = version_dir.removeprefix("./")
            if not any(r.startswith(version_dir + "/") for r in remote):
                raise DataError(
                    f"{uri}/{relative} names version {version}, which has no files "
                    f"in the store; nothing pulled"
                )
    done = Transfer()
    for relative, size in sorted(remote.items()):
        if _is_pointer(relative) or _hidden(relative):
            continue
        if not every_version and not _wanted(relative, pointers):
            continue
        target = local / relative
        if target.is_file() and target.stat().st_size == size:
            done.skipped += 1
            continue
        _download(filesystem, f"{root}/{relative}", target, f"{uri}/{relative}")
        done.copied.append(relative)
        done.bytes += size
    for relative, version in sorted(pointers.items(), key=lambda item: _order(item[0])):
        target = local / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        write_version(target, version)
        done.copied.append(relative)
    return done


def _download(filesystem: pafs.FileSystem, path: str, target: Path, name: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as sink, filesystem.open_input_stream(path) as source:
            shutil.copyfileobj(source, sink, _CHUNK)
            sink.flush()
            os.fsync(sink.fileno())
        os.chmod(temp, 0o444)  # published files are never written again
        os.replace(temp, target)
    except OSError as exc:
        Path(temp).unlink(missing_ok=True)
        raise DataError(f"{name}: cannot download to {target}: {exc}") from None


# -- locations: a local path or a store URI, wherever a log directory is read -------------

Location = Path | str
"""A local directory (Path) or a store URI (str, `s3://bucket/prefix`)."""

_CREDENTIAL_SETTINGS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_PROFILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


def as_location(value: str | os.PathLike[str]) -> Location:
    """A store URI stays a string (without a trailing slash); anything else is a Path."""
    text = os.fspath(value)
    return text.rstrip("/") if is_remote(text) else Path(text)


def join(location: Location, *parts: str) -> Location:
    """`location / part / ...` for a path or a URI (a URI's query stays at its end)."""
    if isinstance(location, Path):
        return location.joinpath(*parts)
    base, sep, query = location.partition("?")
    return "/".join([base.rstrip("/"), *parts]) + sep + query


def filesystem_of(location: Location) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path pyarrow reads `location` with (local disk for a Path)."""
    if isinstance(location, Path) or not is_remote(location):
        return pafs.LocalFileSystem(), os.path.abspath(location)
    return open_store(location)


def store_error(uri: str, doing: str, exc: BaseException) -> DataError:
    """A one-line DataError naming `uri`; for S3 without credentials in the environment, or
    an access failure, it says where credentials come from."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    hint = ""
    if uri.startswith("s3://"):
        configured = (
            any(os.environ.get(name) for name in _CREDENTIAL_SETTINGS)
            or (Path.home() / ".aws" / "credentials").is_file()
        )
        if not configured:
            hint = (
                "; no AWS credentials are set in the environment (AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
            )
        elif any(word in message for word in ("ACCESS_DENIED", "ACCESS_KEY", "SIGNATURE")):
            hint = "; check the AWS credentials in the environment"
    return DataError(f"{uri}: cannot {doing}: {message}{hint}")


def check_store(uri: str) -> None:
    """DataError naming `uri` unless its bucket exists and answers (a listing of a missing
    bucket is just empty, which would read as 'nothing published')."""
    filesystem, root = open_store(uri)
    bucket = root.split("/", 1)[0]
    try:
        info = filesystem.get_file_info(bucket)
    except OSError as exc:
        raise store_error(uri, f"reach bucket {bucket!r}", exc) from None
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{uri}: bucket {bucket!r} does not exist")


def mirror_dir(cache_dir: Path, uri: str) -> Path:
    """Where a server keeps its local copy of `uri`: `<cache_dir>/<scheme>/<bucket>/<prefix>`
    (the query, e.g. an endpoint, is not part of it)."""
    scheme, _, rest = uri.partition("://")
    parts = [p for p in rest.partition("?")[0].split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise ConfigError(f"{uri}: '.' and '..' cannot name a store prefix")
    return cache_dir.joinpath(scheme, *parts)


def refresh(uri: str, local: Path) -> bool:
    """Bring the local mirror of a store repository (a `CURRENT` at its root) to the store's
    `CURRENT`: one read when it is there already, else a `pull`. True when files moved."""
    filesystem, root = open_store(uri)
    try:
        text = _read(filesystem, f"{root}/CURRENT").decode("ascii", "replace").strip()
    except FileNotFoundError:
        check_store(uri)
        raise DataError(
            f"{uri}/CURRENT: nothing published in the store (publish a repository there: "
            f"walkrank store push)"
        ) from None
    except OSError as exc:
        raise store_error(uri, "read CURRENT", exc) from None
    local_version = read_version(local / "CURRENT", DataError)
    if text == str(local_version) and (local / text).is_dir():
        return False
    pull(uri, local)
    return True


def sync_graph(uri: str, local: Path) -> bool:
    """`refresh` a graph repository's mirror, then delete its older versions no server maps
    (`GraphRepository.prune`; the newest other version stays, so a pull of the next version
    by another replica sharing the cache is never cut short). True when files moved."""
    from walkrank.graph.repository import GraphRepository

    moved = refresh(uri, local)
    if moved:
        GraphRepository(local).prune(1)
    return moved


def publish_graph(location: str, build: Callable[[Path], Any], keep: int | None) -> GraphVersion:
    """`GraphRepository(location).publish(build, keep)`, for a store URI too: the version is
    built and verified in a temporary repository numbered after the store's `LAST_VERSION`
    (the store's versions are not downloaded), then pushed, `CURRENT` last, then the store
    keeps `keep` versions besides CURRENT (`prune_store`; None keeps all). For a store, the
    version's `path` names the staging copy, deleted on return."""
    from walkrank.graph.repository import LAST_VERSION_FILE, GraphRepository

    if not is_remote(location):
        return GraphRepository(location).publish(build, keep=keep)
    uri = open_store_uri(location)
    if keep is not None:
        check_store_keep(keep)
    check_store(uri)
    filesystem, root = open_store(uri)
    last = 0
    for name in POINTERS:  # the highest number either pointer holds
        try:
            text = _read(filesystem, f"{root}/{name}").decode("ascii", "replace").strip()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise store_error(uri, f"read {name}", exc) from None
        if not VERSION_RE.fullmatch(text):
            raise DataError(f"{uri}/{name}: expected a positive version number, got {text[:40]!r}")
        last = max(last, int(text))
    with tempfile.TemporaryDirectory(prefix="walkrank-publish-") as temp:
        staging = Path(temp)
        if last:
            write_version(staging / LAST_VERSION_FILE, last)
        version = GraphRepository(staging).publish(build, keep=None)
        push(staging, uri)
    if keep is not None:
        prune_store(uri, keep)
    return version


# -- retention inside the store ------------------------------------------------------------


def check_store_keep(keep: int) -> None:
    """ConfigError unless `keep` can be a store's retention (`prune_store`)."""
    if keep < 1:
        raise ConfigError(
            f"--keep: must be >= 1 for a store (the newest version besides CURRENT stays "
            f"for replicas still pulling it), got {keep}"
        )


def prune_store(uri: str, keep: int) -> list[str]:
    """Delete old versions inside a store: in every directory with a `CURRENT` (a graph
    repository's root, each tenant of a model registry), the numbered version directories
    beyond the newest `keep` besides the ones a pointer (`CURRENT`, `LAST_VERSION`) names.
    Returns the deleted directories (relative to `uri`).

    `keep` must be >= 1: the newest version besides CURRENT stays, so a replica still pulling
    the version CURRENT named a moment ago (a store has no leases) is never cut short, and
    a rollback has a version to go to. Replicas serve local copies, so deleting a version in
    the store never reaches a graph or model being served. A prune is a publish: one
    publisher per store at a time."""
    check_store_keep(keep)
    uri = open_store_uri(uri)
    check_store(uri)
    filesystem, root = open_store(uri)
    try:
        return _prune_store(filesystem, root, uri, keep)
    except OSError as exc:
        raise store_error(uri, "prune", exc) from None


def _prune_store(filesystem: pafs.FileSystem, root: str, uri: str, keep: int) -> list[str]:
    remote = _listing(filesystem, root)
    versions: dict[PurePosixPath, set[int]] = {}
    for relative in remote:
        path = PurePosixPath(relative)
        for depth, part in enumerate(path.parts[:-1]):
            if VERSION_RE.fullmatch(part):
                versions.setdefault(PurePosixPath(*path.parts[:depth]), set()).add(int(part))
                break
    deleted = []
    for relative in sorted(r for r in remote if PurePosixPath(r).name == "CURRENT"):
        parent = PurePosixPath(relative).parent
        named = set()
        for pointer in POINTERS:
            named_by = str(parent / pointer).removeprefix("./")
            if named_by in remote:
                text = _read(filesystem, f"{root}/{named_by}").decode("ascii", "replace").strip()
                if not VERSION_RE.fullmatch(text):
                    raise DataError(
                        f"{uri}/{named_by}: expected a positive version number, got {text[:40]!r}"
                        "; nothing pruned there"
                    )
                named.add(int(text))
        others = sorted(versions.get(parent, set()) - named)
        for version in others[: max(0, len(others) - keep)]:
            directory = str(parent / str(version)).removeprefix("./")
            filesystem.delete_dir(f"{root}/{directory}")
            deleted.append(directory)
    return deleted
