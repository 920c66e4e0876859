"""GraphStore: the memory-mapped pin–board graph one server process holds.

The graph directory is the interface (docs/architecture.md): one `.npy` file per array and a
`manifest.json` with counts, vocabularies, schema, build options and a checksum per array.
Loading maps every array with `mmap_mode="r"` (a 20M-edge graph maps in milliseconds) and by
default verifies it first, checksums and structure, in ~0.3 s: a corrupt file is a DataError
naming it, never a crash in the kernels. External-id lookup is a `searchsorted` over sorted
ids, never a dict. Mapped files must never change in place; `GraphLease` and `graph build`
see to that for our own tools (docs/serving.md, "Graph: verification and publishing").
"""

from __future__ import annotations

import bisect
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from walkrank.errors import DataError
from walkrank.graph.integrity import check_structure

MANIFEST = "manifest.json"
FORMAT_VERSION = 3  # 3: key runs (pin/board_run_offsets, pin/board_key_runs)

#: Arrays every graph directory holds, in the order they are written and checked.
ARRAY_FIELDS: tuple[str, ...] = (
    "pin_offsets",
    "pin_adj",
    "board_offsets",
    "board_adj",
    "pin_locale",
    "pin_topic",
    "board_locale",
    "board_topic",
    "pin_key",
    "board_key",
    "pin_locale_ends",
    "board_locale_ends",
    "pin_run_offsets",
    "pin_key_runs",
    "board_run_offsets",
    "board_key_runs",
    "pin_quality",
    "pin_created_at",
    "pin_ids_sorted",
    "pin_ids_order",
    "pin_ids",
    "board_ids_sorted",
    "board_ids_order",
    "board_ids",
)


class GraphArrays(NamedTuple):
    """What `walks.kernels.walk_query_pin` reads of the base graph (`GraphStore.walk_arrays`)."""

    pin_offsets: np.ndarray
    pin_adj: np.ndarray
    board_offsets: np.ndarray
    board_adj: np.ndarray
    pin_locale_ends: np.ndarray
    board_locale_ends: np.ndarray
    pin_run_offsets: np.ndarray
    pin_key_runs: np.ndarray
    board_run_offsets: np.ndarray
    board_key_runs: np.ndarray
    run_shift: np.int64


class DeltaArrays(NamedTuple):
    """What the walk kernel reads of a real-time delta segment (`GraphStore.delta_arrays`):
    CSR over every node, base and new; all None (`NO_DELTA`) for a graph without a delta, for
    which numba compiles the kernel without the delta's code."""

    pin_delta_offsets: np.ndarray | None
    pin_delta_adj: np.ndarray | None
    board_delta_offsets: np.ndarray | None
    board_delta_adj: np.ndarray | None


NO_DELTA = DeltaArrays(None, None, None, None)


#: Extra numeric pin columns are stored as `pin_column.<name>.npy` (float32, NaN when missing).
PIN_COLUMN_PREFIX = "pin_column."
#: When the edges carry `created_at`: each pin's edge times (float64 epoch seconds, the earliest
#: of duplicates, NaN when unknown), ascending within the pin, read through `pin_offsets`.
PIN_EDGE_TIMES = "pin_edge_times"


def array_checksum(path: Path) -> str:
    """blake2b of the whole `.npy` file: header included, so a dtype or shape change is caught."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "blake2b").hexdigest()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from exc


class GraphLease:
    """A shared advisory lock on a graph directory, held by a server for as long as it serves
    the graph: `build_graph(..., replace=True)` takes the lock exclusively and refuses a
    directory it cannot get, so nothing of ours swaps a graph a server maps (docs/serving.md).
    """

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        for _ in range(3):
            fd = _open_dir(root)
            fcntl.flock(fd, fcntl.LOCK_SH)
            # A replace may have swapped the path between the open and the lock: the lock
            # must be on the directory the files will be mapped from.
            if _same_directory(fd, root):
                self._fd: int | None = fd
                return
            os.close(fd)
        raise DataError(f"{root}: the graph directory keeps being replaced; start again")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def load_for_serving(path: str | Path) -> tuple[GraphStore, GraphLease]:
    """Lease a graph directory, then load it verified; the caller releases the lease when it
    stops serving. A corrupt graph is a DataError naming the file (and nothing is held)."""
    lease = GraphLease(path)
    try:
        return GraphStore.load(path, verify=True), lease
    except BaseException:
        lease.release()
        raise


@contextmanager
def exclusive_graph_lock(root: Path) -> Iterator[None]:
    """Hold `root` exclusively for a replace; DataError when a server holds it."""
    fd = _open_dir(root)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(
                f"{root}: a running server is serving this graph; build into a new directory "
                f"and point the server's graph setting at it (docs/serving.md)"
            ) from None
        yield
    finally:
        os.close(fd)


def _open_dir(root: Path) -> int:
    try:
        return os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise DataError(f"{root}: cannot open the graph directory: {exc.strerror}") from exc


def _same_directory(fd: int, root: Path) -> bool:
    try:
        now = os.stat(root)
    except OSError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


@dataclass(frozen=True, eq=False)
class GraphStore:
    """One bipartite pin–board graph: CSR both ways, bias keys, pin features, id maps."""

    path: Path
    manifest: dict[str, Any]
    locales: tuple[str, ...]
    topics: tuple[str, ...]
    pin_offsets: np.ndarray
    pin_adj: np.ndarray
    board_offsets: np.ndarray
    board_adj: np.ndarray
    pin_locale: np.ndarray
    pin_topic: np.ndarray
    board_locale: np.ndarray
    board_topic: np.ndarray
    pin_key: np.ndarray
    board_key: np.ndarray
    pin_locale_ends: np.ndarray  # [pin, locale]: end of that locale's boards in its list
    board_locale_ends: np.ndarray  # [board, locale]: end of that locale's pins in its list
    # A node's key runs, runs[run_offsets[n]:run_offsets[n + 1]]: `key << shift | end`, one
    # per distinct bias key among its neighbours, where that key's neighbours end in its list.
    pin_run_offsets: np.ndarray
    pin_key_runs: np.ndarray
    board_run_offsets: np.ndarray
    board_key_runs: np.ndarray
    pin_quality: np.ndarray
    pin_created_at: np.ndarray
    pin_ids_sorted: np.ndarray
    pin_ids_order: np.ndarray
    pin_ids: np.ndarray
    board_ids_sorted: np.ndarray
    board_ids_order: np.ndarray
    board_ids: np.ndarray
    pin_columns: dict[str, np.ndarray] = field(default_factory=dict)
    pin_edge_times: np.ndarray | None = None  # PIN_EDGE_TIMES; None: the edges had no times

    # -- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> GraphStore:
        """Memory-map a graph directory, by default verified first (checksums and structure).

        A corrupt file is a DataError naming it, never a crash in the walk kernels; the
        checks take about 0.5 s for a 20M-edge graph (docs/serving.md). `verify=False` only
        maps the files: for tools that read a graph they just built.
        """
        root = Path(path)
        manifest = read_manifest(root)
        if verify:
            verify_checksums(root, manifest)
        arrays = {name: _load_array(root, name) for name in ARRAY_FIELDS}
        pin_columns = {
            name: _load_array(root, PIN_COLUMN_PREFIX + name)
            for name in manifest["schema"].get("pin_columns", [])
        }
        if PIN_EDGE_TIMES in manifest["checksums"]:
            arrays[PIN_EDGE_TIMES] = _load_array(root, PIN_EDGE_TIMES)
        store = cls(
            path=root,
            manifest=manifest,
            locales=tuple(manifest["vocab"]["locales"]),
            topics=tuple(manifest["vocab"]["topics"]),
            pin_columns=pin_columns,
            **arrays,
        )
        store._check_shapes()
        if verify:
            check_structure(store)
        return store

    def verify(self) -> None:
        """Recompute every checksum and re-check the structure; DataError names the file."""
        verify_checksums(self.path, self.manifest)
        check_structure(self)

    def _check_shapes(self) -> None:
        counts = self.manifest["counts"]
        expected = {
            "pin_offsets": counts["pins"] + 1,
            "pin_adj": counts["edges"],
            "board_offsets": counts["boards"] + 1,
            "board_adj": counts["edges"],
            "pin_run_offsets": counts["pins"] + 1,
            "board_run_offsets": counts["boards"] + 1,
        }
        for name in (
            "pin_locale",
            "pin_topic",
            "pin_key",
            "pin_quality",
            "pin_created_at",
            "pin_ids_sorted",
            "pin_ids_order",
            "pin_ids",
        ):
            expected[name] = counts["pins"]
        for name in (
            "board_locale",
            "board_topic",
            "board_key",
            "board_ids_sorted",
            "board_ids_order",
            "board_ids",
        ):
            expected[name] = counts["boards"]
        shapes: dict[str, tuple[int, ...]] = {name: (n,) for name, n in expected.items()}
        n_locales = len(self.manifest["vocab"]["locales"])
        shapes["pin_locale_ends"] = (counts["pins"], n_locales)
        shapes["board_locale_ends"] = (counts["boards"], n_locales)
        arrays = {name: getattr(self, name) for name in shapes}
        for name, column in self.pin_columns.items():
            shapes[PIN_COLUMN_PREFIX + name] = (counts["pins"],)
            arrays[PIN_COLUMN_PREFIX + name] = column
        if self.pin_edge_times is not None:
            shapes[PIN_EDGE_TIMES] = (counts["edges"],)
            arrays[PIN_EDGE_TIMES] = self.pin_edge_times
        for name, shape in shapes.items():
            actual = arrays[name].shape
            if actual != shape:
                raise DataError(
                    f"{self.path / (name + '.npy')}: shape {actual} does not match the "
                    f"manifest counts {shape}"
                )

    # -- counts and vocabularies -----------------------------------------------------------
    @property
    def n_pins(self) -> int:
        return int(self.pin_ids.shape[0])

    @property
    def n_boards(self) -> int:
        return int(self.board_ids.shape[0])

    @property
    def n_edges(self) -> int:
        return int(self.pin_adj.shape[0])

    @property
    def n_locales(self) -> int:
        return len(self.locales)

    @property
    def n_topics(self) -> int:
        return len(self.topics)

    @property
    def run_shift(self) -> int:
        """Bits below the key in a key run (`key << shift | end`)."""
        return int(self.manifest["key_runs"]["shift"])

    @property
    def walk_arrays(self) -> GraphArrays:
        """What `walks.kernels.walk_query_pin` reads of the base graph."""
        return GraphArrays(
            self.pin_offsets,
            self.pin_adj,
            self.board_offsets,
            self.board_adj,
            self.pin_locale_ends,
            self.board_locale_ends,
            self.pin_run_offsets,
            self.pin_key_runs,
            self.board_run_offsets,
            self.board_key_runs,
            np.int64(self.run_shift),
        )

    @property
    def delta_arrays(self) -> DeltaArrays:
        """What the walk kernel reads of a real-time delta: `NO_DELTA`, a graph without one."""
        return NO_DELTA

    @property
    def pin_max_degree(self) -> int:
        """The largest number of boards of a pin (the walk's budget formula reads it)."""
        return int(self.manifest["degree"]["pin_max"])

    def pin_values(self, values: np.ndarray, pins: np.ndarray, missing: float) -> np.ndarray:
        """A per-pin array's `values` (`pin_locale`, a pin column...) at dense pins; `missing`
        for a pin the array has no row for (a new pin of the real-time delta)."""
        return np.asarray(values)[pins]

    @property
    def has_delta(self) -> bool:
        """Whether walks read a real-time delta segment besides these arrays
        (`walkrank.graph.delta.LiveGraph`)."""
        return False

    def pin_degrees(self, pins: np.ndarray) -> np.ndarray:
        """int64 number of boards of each dense pin."""
        pins = np.asarray(pins, np.int64)
        return np.asarray(self.pin_offsets[pins + 1] - self.pin_offsets[pins], np.int64)

    def locale_code(self, locale: str | None) -> int:
        """Category code of a locale; missing or unknown -> len(locales) (the 'missing' code)."""
        return _code(self.locales, locale)

    def topic_code(self, topic: str | None) -> int:
        """Category code of a topic; missing or unknown -> len(topics) (the 'missing' code)."""
        return _code(self.topics, topic)

    def bias_key(self, locale: int, topic: int) -> int:
        """Neighbour sort key `locale * (T + 1) + topic` (docs/architecture.md)."""
        return int(locale) * (self.n_topics + 1) + int(topic)

    # -- external <-> dense ids ------------------------------------------------------------
    def pin_index(self, external_ids: Sequence[Any] | np.ndarray) -> np.ndarray:
        """Dense int32 pin ids for external ids; -1 where unknown."""
        return _lookup(self.pin_ids_sorted, self.pin_ids_order, external_ids)

    def board_index(self, external_ids: Sequence[Any] | np.ndarray) -> np.ndarray:
        """Dense int32 board ids for external ids; -1 where unknown."""
        return _lookup(self.board_ids_sorted, self.board_ids_order, external_ids)

    def pin_external(self, dense_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """External pin ids (int64 or str) for dense ids."""
        return self.pin_ids[_dense(dense_ids, self.n_pins, "pin")]

    def board_external(self, dense_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """External board ids (int64 or str) for dense ids."""
        return self.board_ids[_dense(dense_ids, self.n_boards, "board")]

    # -- adjacency ---------------------------------------------------------------------------
    def pin_degree(self) -> np.ndarray:
        return np.diff(self.pin_offsets)

    def board_degree(self) -> np.ndarray:
        return np.diff(self.board_offsets)

    def boards_of(self, pin: int) -> np.ndarray:
        return self.pin_adj[self.pin_offsets[pin] : self.pin_offsets[pin + 1]]

    def pins_of(self, board: int) -> np.ndarray:
        return self.board_adj[self.board_offsets[board] : self.board_offsets[board + 1]]


def read_manifest(root: Path) -> dict[str, Any]:
    """Parse and sanity-check `manifest.json`; DataError names the file on any problem."""
    path = root / MANIFEST
    if not root.is_dir():
        raise DataError(f"{root}: graph directory does not exist")
    if not path.is_file():
        raise DataError(f"{path}: missing; not a graph directory (run `walkrank graph build`)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable manifest: {exc}") from exc
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: unreadable manifest: expected a JSON object")
    for key in ("format_version", "counts", "vocab", "schema", "checksums"):
        if key not in manifest:
            raise DataError(f"{path}: manifest lacks the field {key!r}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise DataError(
            f"{path}: format_version {manifest['format_version']} is not supported "
            f"(expected {FORMAT_VERSION}); rebuild the graph"
        )
    _check_manifest_fields(path, manifest)
    return manifest


def _check_manifest_fields(path: Path, manifest: dict[str, Any]) -> None:
    """The fields loading and walking read, with the types they read them as."""

    def need(ok: bool, field: str, expected: str) -> None:
        if not ok:
            raise DataError(f"{path}: {field}: expected {expected}; the manifest is corrupt")

    def is_count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    def is_names(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)

    counts, vocab = manifest["counts"], manifest["vocab"]
    need(isinstance(counts, dict), "counts", "an object")
    for key in ("pins", "boards", "edges"):
        need(is_count(counts.get(key)), f"counts.{key}", "a count")
    need(isinstance(vocab, dict), "vocab", "an object")
    for key in ("locales", "topics"):
        need(is_names(vocab.get(key)), f"vocab.{key}", "a list of names")
    need(
        isinstance(manifest["schema"], dict)
        and is_names(manifest["schema"].get("pin_columns", [])),
        "schema.pin_columns",
        "a list of names",
    )
    checksums = manifest["checksums"]
    need(
        isinstance(checksums, dict)
        and all(
            isinstance(v, str) and "/" not in k and not k.startswith(".")
            for k, v in checksums.items()
        ),
        "checksums",
        "an object of array name -> checksum",
    )
    degree = manifest.get("degree")
    need(isinstance(degree, dict) and is_count(degree.get("pin_max")), "degree.pin_max", "a count")
    runs = manifest.get("key_runs")
    need(
        isinstance(runs, dict) and is_count(runs.get("shift")) and 1 <= runs["shift"] <= 32,
        "key_runs.shift",
        "an integer in [1, 32]",
    )


def verify_checksums(root: Path, manifest: dict[str, Any]) -> None:
    """Compare each array file against the manifest; DataError names the array that differs.

    Files are hashed on a few threads (hashlib releases the GIL), so the time is about the
    largest file's: ~0.3 s for a 20M-edge graph whose pages are cached.
    """
    checksums: dict[str, str] = manifest["checksums"]
    for name in ARRAY_FIELDS:
        if name not in checksums:
            raise DataError(f"{root / MANIFEST}: no checksum recorded for array {name!r}")
    paths = {name: root / f"{name}.npy" for name in checksums}
    for name, path in paths.items():
        if not path.is_file():
            raise DataError(f"{path}: array {name!r} listed in the manifest is missing")
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        actual = dict(zip(paths, pool.map(array_checksum, paths.values()), strict=True))
    for name, expected in checksums.items():
        if actual[name] != expected:
            raise DataError(
                f"{paths[name]}: checksum mismatch for array {name!r} "
                f"(manifest {expected[:16]}..., file {actual[name][:16]}...); the file is "
                f"corrupt or was changed after the build, rebuild the graph"
            )


def _load_array(root: Path, name: str) -> np.ndarray:
    path = root / f"{name}.npy"
    try:
        # A plain ndarray view of the mapping: indexing an np.memmap builds memmap objects
        # through Python-level hooks, GIL time on every feature lookup of every request.
        return np.load(path, mmap_mode="r", allow_pickle=False).view(np.ndarray)
    except FileNotFoundError as exc:
        raise DataError(f"{path}: array {name!r} is missing from the graph directory") from exc
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable array {name!r}: {exc}") from exc


def _code(vocab: tuple[str, ...], value: str | None) -> int:
    if value is None:
        return len(vocab)
    # Vocabularies are sorted at build time, so a binary search replaces a dict.
    i = bisect.bisect_left(vocab, value)
    return i if i < len(vocab) and vocab[i] == value else len(vocab)


def _lookup(sorted_ids: np.ndarray, order: np.ndarray, external: Any) -> np.ndarray:
    query = np.asarray(external)
    if query.dtype.kind == "U" and not isinstance(external, np.ndarray):
        # Keep the caller's strings: numpy's fixed-width text drops trailing NULs, which
        # would make "1000000001\0" the id 1000000001.
        query = np.array(external, dtype=object)
    if query.ndim == 0:
        query = query.reshape(1)
    n = sorted_ids.shape[0]
    if query.size == 0 or n == 0:
        return np.full(query.shape, -1, dtype=np.int32)
    if sorted_ids.dtype.kind == "U":
        unrepresentable = np.zeros(query.shape, dtype=bool)
        if query.dtype == object:
            unrepresentable.flat[:] = [isinstance(v, str) and v.endswith("\0") for v in query.flat]
        result = _search(sorted_ids, order, query.astype(str))
        result[unrepresentable] = -1
        return result
    if query.dtype.kind in "iu":
        return _search(sorted_ids, order, query.astype(np.int64))
    if query.dtype.kind == "f":
        whole = np.isfinite(query) & (query == np.round(query))
        result = np.full(query.shape, -1, dtype=np.int32)
        result[whole] = _search(sorted_ids, order, query[whole].astype(np.int64))
        return result
    # Text or object queries against integer ids: only an id's canonical spelling names it.
    result = np.full(query.shape, -1, dtype=np.int32)
    parsed = [_canonical_int(value) for value in query.flat]
    ok = np.array([value is not None for value in parsed], dtype=bool).reshape(query.shape)
    result[ok] = _search(
        sorted_ids, order, np.array([v for v in parsed if v is not None], dtype=np.int64)
    )
    return result


def _canonical_int(value: object) -> int | None:
    """The int64 id a query value names, or None.

    Integers (and whole floats) name themselves; text names an id only in the id's own
    spelling, `str(id)`: ASCII digits, '-' for a negative id, no leading zeros, nothing
    around them. `int()` would also read ' 1', '+1', '1_000', '١' (Arabic-Indic one),
    so those would have resolved to somebody else's pin.
    """
    if isinstance(value, str):
        digits = value[1:] if value.startswith("-") else value
        if not (digits.isascii() and digits.isdigit()):
            return None
        number = int(value)
        if str(number) != value:  # leading zeros, "-0"
            return None
    elif (isinstance(value, int | np.integer) and not isinstance(value, bool)) or (
        isinstance(value, float | np.floating) and float(value).is_integer()
    ):
        number = int(value)
    else:
        return None
    return number if -(2**63) <= number < 2**63 else None


def _search(sorted_ids: np.ndarray, order: np.ndarray, query: np.ndarray) -> np.ndarray:
    n = sorted_ids.shape[0]
    pos = np.searchsorted(sorted_ids, query)
    pos_clipped = np.minimum(pos, n - 1)
    found = (pos < n) & (sorted_ids[pos_clipped] == query)
    return np.where(found, order[pos_clipped], -1).astype(np.int32)


def _dense(dense_ids: Any, n: int, kind: str) -> np.ndarray:
    ids = np.asarray(dense_ids)
    if ids.dtype.kind not in "iu":
        raise DataError(f"dense {kind} ids must be integers, got dtype {ids.dtype}")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= n):
        raise DataError(f"dense {kind} id out of range [0, {n}): min {ids.min()}, max {ids.max()}")
    return ids
