"""GraphStore: the memory-mapped pin–board graph one server process holds.

The graph directory is the interface (docs/architecture.md): one `.npy` file per array and a
`manifest.json` with counts, vocabularies, schema, build options and a checksum per array.
Loading maps every array with `mmap_mode="r"`, so a 20M-edge graph opens in milliseconds and
pages in on first touch; external-id lookup is a `searchsorted` over sorted ids, never a dict.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from walkrank.errors import DataError

MANIFEST = "manifest.json"
FORMAT_VERSION = 2

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
    "pin_quality",
    "pin_created_at",
    "pin_ids_sorted",
    "pin_ids_order",
    "pin_ids",
    "board_ids_sorted",
    "board_ids_order",
    "board_ids",
)

#: Extra numeric pin columns are stored as `pin_column.<name>.npy` (float32, NaN when missing).
PIN_COLUMN_PREFIX = "pin_column."


def array_checksum(path: Path) -> str:
    """blake2b of the whole `.npy` file: header included, so a dtype or shape change is caught."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "blake2b").hexdigest()


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
    pin_quality: np.ndarray
    pin_created_at: np.ndarray
    pin_ids_sorted: np.ndarray
    pin_ids_order: np.ndarray
    pin_ids: np.ndarray
    board_ids_sorted: np.ndarray
    board_ids_order: np.ndarray
    board_ids: np.ndarray
    pin_columns: dict[str, np.ndarray] = field(default_factory=dict)

    # -- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, verify: bool = False) -> GraphStore:
        """Memory-map a graph directory; `verify=True` first checks every array's checksum."""
        root = Path(path)
        manifest = read_manifest(root)
        if verify:
            verify_checksums(root, manifest)
        arrays = {name: _load_array(root, name) for name in ARRAY_FIELDS}
        pin_columns = {
            name: _load_array(root, PIN_COLUMN_PREFIX + name)
            for name in manifest["schema"].get("pin_columns", [])
        }
        store = cls(
            path=root,
            manifest=manifest,
            locales=tuple(manifest["vocab"]["locales"]),
            topics=tuple(manifest["vocab"]["topics"]),
            pin_columns=pin_columns,
            **arrays,
        )
        store._check_shapes()
        return store

    def verify(self) -> None:
        """Recompute every array's checksum; DataError names the first array that differs."""
        verify_checksums(self.path, self.manifest)

    def _check_shapes(self) -> None:
        counts = self.manifest["counts"]
        expected = {
            "pin_offsets": counts["pins"] + 1,
            "pin_adj": counts["edges"],
            "board_offsets": counts["boards"] + 1,
            "board_adj": counts["edges"],
        }
        for name in ("pin_locale", "pin_topic", "pin_key", "pin_quality", "pin_created_at",
                     "pin_ids_sorted", "pin_ids_order", "pin_ids"):
            expected[name] = counts["pins"]
        for name in ("board_locale", "board_topic", "board_key", "board_ids_sorted",
                     "board_ids_order", "board_ids"):
            expected[name] = counts["boards"]
        shapes = {name: (n,) for name, n in expected.items()}
        n_locales = len(self.manifest["vocab"]["locales"])
        shapes["pin_locale_ends"] = (counts["pins"], n_locales)
        shapes["board_locale_ends"] = (counts["boards"], n_locales)
        for name, shape in shapes.items():
            actual = getattr(self, name).shape
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
    for key in ("format_version", "counts", "vocab", "schema", "checksums"):
        if key not in manifest:
            raise DataError(f"{path}: manifest lacks the field {key!r}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise DataError(
            f"{path}: format_version {manifest['format_version']} is not supported "
            f"(expected {FORMAT_VERSION}); rebuild the graph"
        )
    return manifest


def verify_checksums(root: Path, manifest: dict[str, Any]) -> None:
    """Compare each array file against the manifest; DataError names the array that differs."""
    checksums: dict[str, str] = manifest["checksums"]
    for name in ARRAY_FIELDS:
        if name not in checksums:
            raise DataError(f"{root / MANIFEST}: no checksum recorded for array {name!r}")
    for name, expected in checksums.items():
        path = root / f"{name}.npy"
        if not path.is_file():
            raise DataError(f"{path}: array {name!r} listed in the manifest is missing")
        actual = array_checksum(path)
        if actual != expected:
            raise DataError(
                f"{path}: checksum mismatch for array {name!r} "
                f"(manifest {expected[:16]}..., file {actual[:16]}...)"
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
    if query.ndim == 0:
        query = query.reshape(1)
    n = sorted_ids.shape[0]
    if query.size == 0 or n == 0:
        return np.full(query.shape, -1, dtype=np.int32)
    ids_are_text = sorted_ids.dtype.kind == "U"
    if ids_are_text:
        query = query.astype(str)
    elif query.dtype.kind in "iu":
        query = query.astype(np.int64)
    elif query.dtype.kind == "f":
        whole = np.isfinite(query) & (query == np.round(query))
        result = np.full(query.shape, -1, dtype=np.int32)
        result[whole] = _lookup(sorted_ids, order, query[whole].astype(np.int64))
        return result
    else:
        # Text or object queries against integer ids: parse what parses, the rest is unknown.
        result = np.full(query.shape, -1, dtype=np.int32)
        parsed = np.zeros(query.shape, dtype=np.int64)
        ok = np.zeros(query.shape, dtype=bool)
        for i, value in enumerate(query.ravel()):
            try:
                parsed.flat[i] = int(value)
                ok.flat[i] = True
            except (TypeError, ValueError, OverflowError):
                pass
        result[ok] = _lookup(sorted_ids, order, parsed[ok])
        return result
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
