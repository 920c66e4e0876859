"""Real-time edges: an in-memory delta segment that walks read together with the mapped base.

New pin–board edges (and new pins and boards) arrive while serving, through `Admin.AddEdges`
or a tenant's saves on boards (`ReportEvents`, per tenant opt-in). They go into a
`DeltaSegment`, in external ids, and are published every `flush_s` (and at the end of each
AddEdges call) as an immutable `DeltaSnapshot`: per node kind, a CSR of the delta
neighbours over every node, base and new (int32 offsets: 4 bytes a pin or board while the
delta is not empty), so a walk finds a node's delta list with one load it prefetches a pass
ahead, as it does the base list. (A rank bitmap over only the nodes with delta edges takes
0.25 bytes a node, but its second, dependent load per step made the walks clearly slower.)
A `LiveGraph` is the base `GraphStore` with a snapshot attached: the walk kernel draws a
node's neighbour from its base list followed by its delta list, and new pins and boards get
dense ids past the base's. A request takes one `LiveGraph` at its start, so it sees one
consistent snapshot to its end.

Bounds: at most `max_edges` edges (a batch that would pass it is refused whole, never
evicting edges already accepted: `DeltaFull`, RESOURCE_EXHAUSTED on the wire); the fold into
a new base graph is `walkrank graph compact`, after which the delta restarts empty.
Durability: with an append log, every accepted batch is one checksummed record, written and
fsync'd before the call returns; the log is replayed at startup, and a truncated or corrupt
tail is reported (naming the file and offset), set aside and counted, never a crash.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import struct
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from numba import njit

from walkrank.errors import DataError, WalkRankError
from walkrank.graph.store import DeltaArrays, GraphStore, _canonical_int
from walkrank.logs.events import MAX_EPOCH_SECONDS  # an edge's created_at: as an event's time

log = logging.getLogger(__name__)

#: Most edges in one AddEdges message (one batch: one log record, one lock hold).
MAX_BATCH_EDGES = 10_000
#: Manifest key of a compacted graph: which append-log records it folded in.
MANIFEST_KEY = "realtime"

_RECORD = struct.Struct("<4sII")  # magic, payload bytes, crc32 of the payload
_MAGIC = b"WRDE"
_MAX_RECORD_BYTES = 64 << 20
ID_CHARS = 128  # as walkrank.serving.fields.ID_CHARS
_EMPTY = np.zeros(1, np.int32)  # delta offsets of no node


class BadEdge(WalkRankError):
    """An edge that cannot be added; `field` names it (`edges[3].pin_id`)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class DeltaFull(WalkRankError):
    """A batch that would take the delta past `realtime.max_edges`."""


@dataclass(frozen=True)
class Edge:
    """One pin–board edge in external ids; `created_at` in epoch seconds or None."""

    pin_id: str
    board_id: str
    created_at: float | None = None


@dataclass(frozen=True)
class AddResult:
    added: int  # new edges
    duplicates: int  # already in the base graph or the delta (or twice in the batch)
    new_pins: int
    new_boards: int


# -- snapshots ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Side:
    """One node kind's delta adjacency: CSR over every node, base and new (4 bytes a node:
    the walk reads a node's delta list with one load, as it reads its base list)."""

    offsets: np.ndarray  # int32[nodes + 1]
    adj: np.ndarray  # int32[edges]: neighbour dense ids (base or new)


def _side(nodes: np.ndarray, neighbours: np.ndarray, n_total: int) -> _Side:
    offsets = np.zeros(n_total + 1, np.int32)
    np.cumsum(np.bincount(nodes, minlength=n_total), out=offsets[1:])
    return _Side(offsets, neighbours[np.argsort(nodes, kind="stable")].astype(np.int32))


@dataclass(frozen=True, eq=False)
class DeltaSnapshot:
    """What walks read of the delta at one moment; immutable, shared by the calls on it."""

    pins: _Side
    boards: _Side
    n_pins: int  # base + new
    n_boards: int
    edges: int
    pin_max_degree: int  # base and delta together
    new_pin_ids: tuple[Any, ...]  # external ids of pins past the base, in dense order
    new_board_ids: tuple[Any, ...]
    new_pin_created_at: np.ndarray  # float64, NaN when unknown

    @property
    def walk_arrays(self) -> DeltaArrays:
        return DeltaArrays(self.pins.offsets, self.pins.adj, self.boards.offsets, self.boards.adj)

    def pin_delta_degree(self, pins: np.ndarray) -> np.ndarray:
        offsets = self.pins.offsets
        return np.asarray(offsets[pins + 1] - offsets[pins], np.int64)


@dataclass(frozen=True, eq=False)
class LiveGraph(GraphStore):
    """The base graph with a delta snapshot: what requests walk while real-time edges exist.

    Dense ids past the base's are new pins and boards; their per-pin attributes are missing
    (locale, topic, quality), except `pin_created_at`, the earliest created_at of their
    edges when given."""

    delta: DeltaSnapshot | None = None
    new_pin_index: dict[Any, int] = field(default_factory=dict)
    new_board_index: dict[Any, int] = field(default_factory=dict)

    @classmethod
    def of(cls, base: GraphStore, snapshot: DeltaSnapshot) -> LiveGraph:
        values = {f.name: getattr(base, f.name) for f in dataclasses.fields(GraphStore)}
        n_base_pins, n_base_boards = base.n_pins, base.n_boards
        return cls(
            **values,
            delta=snapshot,
            new_pin_index={k: n_base_pins + i for i, k in enumerate(snapshot.new_pin_ids)},
            new_board_index={k: n_base_boards + i for i, k in enumerate(snapshot.new_board_ids)},
        )

    def _snapshot(self) -> DeltaSnapshot:
        assert self.delta is not None
        return self.delta

    @property
    def n_pins(self) -> int:
        return self._snapshot().n_pins

    @property
    def n_boards(self) -> int:
        return self._snapshot().n_boards

    @property
    def n_edges(self) -> int:
        return int(self.pin_adj.shape[0]) + self._snapshot().edges

    @property
    def base_pins(self) -> int:
        return int(self.pin_ids.shape[0])

    @property
    def has_delta(self) -> bool:
        return True

    @property
    def delta_arrays(self) -> DeltaArrays:
        return self._snapshot().walk_arrays

    @property
    def pin_max_degree(self) -> int:
        return self._snapshot().pin_max_degree

    def pin_degrees(self, pins: np.ndarray) -> np.ndarray:
        pins = np.asarray(pins, np.int64)
        base = self.base_pins
        inside = np.minimum(pins, base)
        degree = self.pin_offsets[np.minimum(pins + 1, base)] - self.pin_offsets[inside]
        return np.asarray(degree, np.int64) + self._snapshot().pin_delta_degree(pins)

    def pin_values(self, values: np.ndarray, pins: np.ndarray, missing: float) -> np.ndarray:
        pins = np.asarray(pins)
        column = np.asarray(values)
        base = self.base_pins
        if pins.size == 0 or int(pins.max()) < base:
            return column[pins]
        new = pins >= base
        out = column[np.where(new, 0, pins)]
        if values is self.pin_created_at:
            out[new] = self._snapshot().new_pin_created_at[pins[new] - base]
        else:
            out[new] = missing
        return out

    def pin_index(self, external_ids: Sequence[Any] | np.ndarray) -> np.ndarray:
        found = super().pin_index(external_ids)
        return _with_new(found, external_ids, self.new_pin_index, self.pin_ids.dtype)

    def board_index(self, external_ids: Sequence[Any] | np.ndarray) -> np.ndarray:
        found = super().board_index(external_ids)
        return _with_new(found, external_ids, self.new_board_index, self.board_ids.dtype)

    def pin_external(self, dense_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        return _external(self.pin_ids, self._snapshot().new_pin_ids, dense_ids, "pin")

    def board_external(self, dense_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        return _external(self.board_ids, self._snapshot().new_board_ids, dense_ids, "board")


def _id_key(value: Any, dtype: np.dtype) -> Any:
    """The key a new node's external id has in `LiveGraph.new_*_index`: an int for a graph of
    integer ids (only its canonical spelling names it), else the string."""
    if dtype.kind in "iu":
        return _canonical_int(value)
    return value if isinstance(value, str) else None


def _with_new(
    found: np.ndarray, external: Any, index: dict[Any, int], dtype: np.dtype
) -> np.ndarray:
    missing = np.flatnonzero(found < 0)
    if missing.size == 0 or not index:
        return found
    values = np.asarray(external, dtype=object).reshape(-1)
    for i in missing:
        key = _id_key(values[i], dtype)
        if key is not None:
            found.flat[i] = index.get(key, -1)
    return found


def _external(base_ids: np.ndarray, new_ids: tuple[Any, ...], dense: Any, kind: str) -> np.ndarray:
    """External ids of dense ids, base or new, in the base's kind of array (int64, or text)."""
    ids = np.asarray(dense, np.int64)
    n_base = base_ids.shape[0]
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= n_base + len(new_ids)):
        raise DataError(f"dense {kind} id out of range [0, {n_base + len(new_ids)})")
    if ids.size == 0 or int(ids.max()) < n_base:
        return base_ids[ids]
    out = np.empty(ids.shape, dtype=object)
    inside = ids < n_base
    out[inside] = base_ids[ids[inside]]
    out[~inside] = [new_ids[i - n_base] for i in ids[~inside]]
    return out.astype(np.int64 if base_ids.dtype.kind in "iu" else np.str_)


@njit(nogil=True, cache=True)
def _known_edges(
    pin_offsets: np.ndarray,
    pin_adj: np.ndarray,
    delta_offsets: np.ndarray,
    delta_adj: np.ndarray,
    pins: np.ndarray,
    boards: np.ndarray,
) -> np.ndarray:
    """Whether each (pin, board) edge is in the base graph or in a snapshot's pin-side delta
    CSR (`delta_offsets`, `delta_adj`)."""
    n_pins = pin_offsets.shape[0] - 1
    n_indexed = delta_offsets.shape[0] - 1
    out = np.zeros(pins.shape[0], np.bool_)
    for e in range(pins.shape[0]):
        p = pins[e]
        if p < n_pins:
            for i in range(pin_offsets[p], pin_offsets[p + 1]):
                if pin_adj[i] == boards[e]:
                    out[e] = True
        if p < n_indexed:
            for i in range(delta_offsets[p], delta_offsets[p + 1]):
                if delta_adj[i] == boards[e]:
                    out[e] = True
    return out


# -- the append log ----------------------------------------------------------------------


@dataclass
class ReplayReport:
    records: int = 0
    edges: int = 0
    skipped_bytes: int = 0  # a truncated or corrupt tail, set aside
    skipped_records: int = 0  # whole records whose ids this graph cannot hold
    problem: str | None = None


def encode_record(seq: int, edges: Sequence[Edge]) -> bytes:
    payload = json.dumps(
        {"seq": seq, "edges": [[e.pin_id, e.board_id, e.created_at] for e in edges]},
        separators=(",", ":"),
    ).encode()
    return _RECORD.pack(_MAGIC, len(payload), zlib.crc32(payload)) + payload


def decode_record(record: bytes) -> list[Edge]:
    """The edges of one record `encode_record` wrote (its checksum already checked)."""
    payload = json.loads(record[_RECORD.size :])
    return [Edge(str(p), str(b), None if t is None else float(t)) for p, b, t in payload["edges"]]


def read_log(path: Path) -> tuple[list[tuple[int, list[Edge]]], int, str | None]:
    """The log's records (seq, edges), the byte length of its good prefix, and what is wrong
    with the rest (None when the file ends on a record boundary)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0, None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the real-time edge log: {exc.strerror}") from exc
    records: list[tuple[int, list[Edge]]] = []
    at = 0
    while at < len(data):
        if len(data) - at < _RECORD.size:
            return records, at, f"truncated record header at byte {at}"
        magic, size, crc = _RECORD.unpack_from(data, at)
        body = data[at + _RECORD.size : at + _RECORD.size + size]
        if magic != _MAGIC or size > _MAX_RECORD_BYTES:
            return records, at, f"no record at byte {at} (bad magic or size)"
        if len(body) < size:
            return records, at, f"truncated record at byte {at} ({len(body)} of {size} bytes)"
        if zlib.crc32(body) != crc:
            return records, at, f"checksum mismatch in the record at byte {at}"
        try:
            seq = int(json.loads(body)["seq"])
            records.append((seq, decode_record(data[at : at + _RECORD.size + size])))
        except (ValueError, KeyError, TypeError) as exc:
            return records, at, f"unreadable record at byte {at}: {exc}"
        at += _RECORD.size + size
    return records, at, None


class AppendLog:
    """Accepted batches, one checksummed record each, fsync'd before the call returns."""

    def __init__(self, path: Path, held: int) -> None:
        self.path = path
        self._held = held  # `_lock_beside`'s descriptor, released by `close`
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "ab")  # noqa: SIM115 (held open for the server's life)
        except OSError as exc:
            raise DataError(f"{path}: cannot open the real-time edge log: {exc.strerror}") from exc

    def append(self, record: bytes) -> None:
        self._file.write(record)
        self._file.flush()
        os.fsync(self._file.fileno())

    def rewrite(self, records: Sequence[bytes]) -> None:
        """Replace the log with `records` (after a compaction), atomically."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as out:
            out.writelines(records)
            out.flush()
            os.fsync(out.fileno())
        self._file.close()
        os.replace(tmp, self.path)
        self._file = open(self.path, "ab")  # noqa: SIM115

    def close(self) -> None:
        self._file.close()
        os.close(self._held)


def _lock_beside(path: Path) -> int:
    """Hold `<log>.lock` exclusively: one server per log, since a second one appending would
    interleave its records with ours. DataError naming the log when another holds it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise DataError(f"{path}: cannot open the real-time edge log: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DataError(
            f"{path}: another server process holds this real-time edge log; give each server "
            "its own realtime.log"
        ) from None
    return fd


def recover_log(path: Path) -> tuple[list[tuple[int, list[Edge]]], ReplayReport]:
    """Read the log for replay; a bad tail is logged, copied to `<log>.skipped` and cut off
    so new records follow the good ones."""
    records, good, problem = read_log(path)
    report = ReplayReport(len(records), sum(len(e) for _, e in records))
    if problem is not None:
        size = path.stat().st_size
        report.skipped_bytes = size - good
        report.problem = f"{path}: {problem}; {size - good} bytes skipped"
        log.warning("real-time edge log %s", report.problem)
        with open(path, "rb") as f:
            f.seek(good)
            path.with_name(path.name + ".skipped").write_bytes(f.read())
        os.truncate(path, good)
    return records, report


# -- the segment -------------------------------------------------------------------------


class DeltaSegment:
    """The real-time edges of one server: accepts batches, publishes snapshots, keeps the log.

    `view()` is what a request walks: the base graph while the delta is empty, else the
    `LiveGraph` of the last published snapshot.
    """

    def __init__(
        self,
        base: GraphStore,
        *,
        max_edges: int,
        log_path: Path | None = None,
        flush_s: float = 0.2,
    ) -> None:
        self.max_edges = max_edges
        self.flush_s = flush_s
        self._lock = threading.Lock()  # the edge lists and the log
        self._publish_lock = threading.Lock()
        self._base = base
        self._view: GraphStore = base
        self._dirty = False
        self._seq = 0
        # Every batch applied, encoded as in the log (smaller than Edge objects): what a new
        # base graph gets again (`rebase`), and what the log keeps after a compaction.
        self._records: list[tuple[int, bytes]] = []
        self._reset(base)
        self.replay = ReplayReport()
        self.dropped_saves = 0  # tenants' saves refused at max_edges (`add_saves`)
        self._log: AppendLog | None = None
        if log_path is not None:
            held = _lock_beside(log_path)
            try:
                records, self.replay = recover_log(log_path)
                folded = folded_through(base)
                for seq, edges in records:
                    self._seq = max(self._seq, seq)
                    if seq <= folded:
                        continue
                    try:
                        for i, edge in enumerate(edges):
                            _check_edge(edge, f"record {seq} edges[{i}]", base)
                    except BadEdge as exc:  # a log written for a graph with other id types
                        log.warning("real-time edge log %s: %s; record skipped", log_path, exc)
                        self.replay.skipped_records += 1
                        continue
                    self._apply(edges, seq, encode_record(seq, edges))
                self._log = AppendLog(log_path, held)
            except BaseException:
                os.close(held)
                raise
            self.publish()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="walkrank-delta", daemon=True)
        self._thread.start()

    def _reset(self, base: GraphStore) -> None:
        self._pins: list[np.ndarray] = []
        self._boards: list[np.ndarray] = []
        # Duplicates are found in the base graph, in the last snapshot (`_indexed`, the pin
        # side's offsets and adjacency) and in the keys added since (`pin << 32 | board`).
        self._indexed: tuple[np.ndarray, np.ndarray] = (_EMPTY, _EMPTY)
        self._pending: set[int] = set()
        self._capturing: set[int] = set()  # keys of the snapshot being built
        self._new_pins: dict[Any, int] = {}
        self._new_boards: dict[Any, int] = {}
        self._new_pin_ids: list[Any] = []
        self._new_board_ids: list[Any] = []
        self._created: list[float] = []
        self._edges = 0

    @property
    def edges(self) -> int:
        return self._edges

    def view(self) -> GraphStore:
        return self._view

    # -- adding --------------------------------------------------------------------------
    def add(self, edges: Sequence[Edge], field: str = "edges") -> AddResult:
        """Check, log and add one batch (all or nothing); BadEdge names the first bad edge,
        DeltaFull says the limit. Visible to walks after the next `publish()`."""
        if len(edges) > MAX_BATCH_EDGES:
            raise BadEdge(field, f"{len(edges)} edges in one batch, at most {MAX_BATCH_EDGES:,}")
        for i, edge in enumerate(edges):
            _check_edge(edge, f"{field}[{i}]", self._base)
        with self._lock:
            if self._edges + len(edges) > self.max_edges:
                raise DeltaFull(
                    f"the real-time delta holds {self._edges:,} edges and "
                    f"realtime.max_edges is {self.max_edges:,}: a batch of {len(edges):,} "
                    "edges is refused (compact the graph with `walkrank graph compact` to "
                    "fold the delta into a new version)"
                )
            seq = self._seq + 1
            record = encode_record(seq, edges)
            if self._log is not None:
                self._log.append(record)
            self._seq = seq
            return self._apply(edges, seq, record)

    def _apply(self, edges: Sequence[Edge], seq: int, record: bytes) -> AddResult:
        base = self._base
        pins = base.pin_index([e.pin_id for e in edges]).astype(np.int64)
        boards = base.board_index([e.board_id for e in edges]).astype(np.int64)
        new_pins = new_boards = 0
        for i, edge in enumerate(edges):
            if pins[i] < 0:
                key = _id_key(edge.pin_id, base.pin_ids.dtype)
                if key not in self._new_pins:
                    self._new_pins[key] = base.n_pins + len(self._new_pin_ids)
                    self._new_pin_ids.append(key)
                    self._created.append(np.nan)
                    new_pins += 1
                pins[i] = self._new_pins[key]
                if edge.created_at is not None:
                    at = pins[i] - base.n_pins
                    self._created[at] = np.fmin(self._created[at], edge.created_at)
            if boards[i] < 0:
                key = _id_key(edge.board_id, base.board_ids.dtype)
                if key not in self._new_boards:
                    self._new_boards[key] = base.n_boards + len(self._new_board_ids)
                    self._new_board_ids.append(key)
                    new_boards += 1
                boards[i] = self._new_boards[key]
        known = _known_edges(base.pin_offsets, base.pin_adj, *self._indexed, pins, boards)
        keep = np.zeros(len(edges), bool)
        for i in range(len(edges)):
            key = (int(pins[i]) << 32) | int(boards[i])
            if not known[i] and key not in self._pending and key not in self._capturing:
                self._pending.add(key)
                keep[i] = True
        self._pins.append(pins[keep].astype(np.int32))
        self._boards.append(boards[keep].astype(np.int32))
        added = int(keep.sum())
        self._edges += added
        self._records.append((seq, record))
        self._dirty = self._dirty or added > 0 or new_pins > 0
        return AddResult(added, len(edges) - added, new_pins, new_boards)

    def check(self, edge: Edge, field: str) -> None:
        """BadEdge naming `field` when `add` would refuse the edge."""
        _check_edge(edge, field, self._base)

    def add_saves(self, edges: Sequence[Edge]) -> int:
        """Add a tenant's reported saves, best effort: batches past `max_edges` are dropped
        (the events themselves were kept), counted in `dropped_saves` and logged. Returns
        the edges added."""
        added = 0
        for at in range(0, len(edges), MAX_BATCH_EDGES):
            batch = edges[at : at + MAX_BATCH_EDGES]
            try:
                added += self.add(batch).added
            except DeltaFull as exc:
                self.dropped_saves += len(batch)
                log.warning("saves not added as real-time edges: %s", exc)
        return added

    # -- publishing ----------------------------------------------------------------------
    def publish(self) -> None:
        """Build and swap in a snapshot of everything added so far, if anything was."""
        with self._publish_lock:
            with self._lock:
                if not self._dirty:
                    return
                self._dirty = False
                base = self._base
                pins = np.concatenate(self._pins) if self._pins else np.zeros(0, np.int32)
                boards = np.concatenate(self._boards) if self._boards else np.zeros(0, np.int32)
                self._pins, self._boards = [pins], [boards]
                new_pin_ids = tuple(self._new_pin_ids)
                new_board_ids = tuple(self._new_board_ids)
                created = np.array(self._created, np.float64)
                self._capturing, self._pending = self._pending, set()
            if pins.shape[0] == 0:
                with self._lock:
                    self._capturing = set()
                    self._view = base
                return
            n_pins, n_boards = base.n_pins + len(new_pin_ids), base.n_boards + len(new_board_ids)
            pin_side = _side(pins, boards, n_pins)
            delta_degree = np.diff(pin_side.offsets)
            nodes = np.flatnonzero(delta_degree)
            inside = np.minimum(nodes, base.n_pins)
            degree = delta_degree[nodes] + (
                base.pin_offsets[np.minimum(nodes + 1, base.n_pins)] - base.pin_offsets[inside]
            )
            snapshot = DeltaSnapshot(
                pins=pin_side,
                boards=_side(boards, pins, n_boards),
                n_pins=n_pins,
                n_boards=n_boards,
                edges=int(pins.shape[0]),
                pin_max_degree=max(base.pin_max_degree, int(degree.max())),
                new_pin_ids=new_pin_ids,
                new_board_ids=new_board_ids,
                new_pin_created_at=created,
            )
            view = LiveGraph.of(base, snapshot)
            with self._lock:  # the snapshot now finds the captured edges' duplicates
                self._indexed = (pin_side.offsets, pin_side.adj)
                self._capturing = set()
                self._view = view

    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            try:
                self.publish()
            except Exception:  # a failed publish leaves the last snapshot serving
                log.exception("real-time delta: publishing a snapshot failed")

    # -- a new base ----------------------------------------------------------------------
    def rebase(self, base: GraphStore) -> int:
        """Serve the delta on a new base graph: the edges it folded in (a compaction of this
        log) are dropped, the others resolved again against its ids; the log is rewritten
        with the records kept. Returns the edges kept."""
        with self._publish_lock, self._lock:
            folded = folded_through(base)
            kept = [(seq, record) for seq, record in self._records if seq > folded]
            self._base = base
            self._reset(base)
            self._records = []
            for seq, record in kept:
                self._apply(decode_record(record), seq, record)
            if self._log is not None:
                self._log.rewrite([record for _, record in kept])
            self._dirty = True
            self._view = base
        self.publish()
        return self._edges

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            if self._log is not None:
                self._log.close()


def folded_through(graph: GraphStore) -> int:
    """The last append-log record a compacted graph folded in (0: none). A delta that moves
    onto the graph drops the records up to it (edges the graph has anyway count as
    duplicates, so this only keeps the log short)."""
    build = graph.manifest.get("build")
    source = build.get("source") if isinstance(build, dict) else None  # build_graph(source=)
    info = source.get(MANIFEST_KEY) if isinstance(source, dict) else None
    if isinstance(info, dict) and isinstance(info.get("through_seq"), int):
        return int(info["through_seq"])
    return 0


def compaction_tables(
    base: GraphStore, log_path: Path
) -> tuple[dict[str, pa.Table], dict[str, Any]]:
    """`build_graph`'s edges, pins and boards tables for the base graph plus the append
    log's edges not folded in yet, and the `source` to record (`MANIFEST_KEY`).

    Pin and board attributes are the base's (categories by name: a new graph may code them
    otherwise); new pins carry the earliest created_at of their edges. A partial last record
    is a server writing it: left for the next compaction.
    """
    records, _, problem = read_log(log_path)
    if problem is not None:
        log.info("real-time edge log %s: %s; left for the next compaction", log_path, problem)
    folded = folded_through(base)
    edges = [e for seq, batch in records if seq > folded for e in batch]
    for i, edge in enumerate(edges):
        try:
            _check_edge(edge, f"edge {i}", base)
        except BadEdge as exc:
            raise DataError(f"{log_path}: {exc}; not a log of this graph's ids") from None

    def ids(values: list[str], like: np.ndarray) -> np.ndarray:
        if like.dtype.kind in "iu":
            return np.array([_canonical_int(v) for v in values], dtype=np.int64)
        return np.array(values, dtype=object)

    degree = np.diff(base.pin_offsets)
    edge_table = pa.table(
        {
            "pin_id": np.concatenate(
                [np.repeat(base.pin_ids, degree), ids([e.pin_id for e in edges], base.pin_ids)]
            ),
            "board_id": np.concatenate(
                [base.board_ids[base.pin_adj], ids([e.board_id for e in edges], base.board_ids)]
            ),
        }
    )
    schema = base.manifest["schema"]
    known = set(base.pin_ids.tolist())
    created: dict[Any, float] = {}
    for pin, edge in zip(ids([e.pin_id for e in edges], base.pin_ids).tolist(), edges, strict=True):
        if pin not in known and edge.created_at is not None:
            created[pin] = min(created.get(pin, edge.created_at), edge.created_at)
    n_new = len(created)
    new_ids = np.array(list(created), np.int64 if base.pin_ids.dtype.kind in "iu" else object)
    pins: dict[str, Any] = {"pin_id": np.concatenate([base.pin_ids, new_ids])}

    def names(codes: np.ndarray, vocab: tuple[str, ...], extra: int) -> list[str | None]:
        named = np.array([*vocab, None], dtype=object)[np.asarray(codes)]
        return [*named.tolist(), *([None] * extra)]

    if "pins.locale" in schema:
        pins["locale"] = names(base.pin_locale, base.locales, n_new)
    if "pins.topic" in schema:
        pins["topic"] = names(base.pin_topic, base.topics, n_new)
    if "pins.quality" in schema:
        pins["quality"] = np.concatenate([base.pin_quality, np.full(n_new, np.nan, np.float32)])
    if "pins.created_at" in schema or "edges.created_at" in schema or created:
        pins["created_at"] = np.concatenate([base.pin_created_at, list(created.values())])
    for column, values in base.pin_columns.items():
        pins[column] = np.concatenate([values, np.full(n_new, np.nan, np.float32)])
    boards: dict[str, Any] = {"board_id": base.board_ids}
    if "boards.locale" in schema:
        boards["locale"] = names(base.board_locale, base.locales, 0)
    if "boards.topic" in schema:
        boards["topic"] = names(base.board_topic, base.topics, 0)
    through = max([seq for seq, _ in records], default=folded)
    source = {MANIFEST_KEY: {"log": str(log_path), "through_seq": through, "edges": len(edges)}}
    tables = {"edges": edge_table, "pins": pa.table(pins), "boards": pa.table(boards)}
    return tables, source


def _check_edge(edge: Edge, field: str, base: GraphStore) -> None:
    """BadEdge naming the field of an id the graph's id type cannot hold, or a bad time."""
    for name, value, dtype in (
        ("pin_id", edge.pin_id, base.pin_ids.dtype),
        ("board_id", edge.board_id, base.board_ids.dtype),
    ):
        if not value:
            raise BadEdge(f"{field}.{name}", "required")
        if len(value) > ID_CHARS:
            raise BadEdge(f"{field}.{name}", f"{len(value)} characters, at most {ID_CHARS}")
        if dtype.kind in "iu" and _canonical_int(value) is None:
            raise BadEdge(
                f"{field}.{name}",
                f"{value[:64]!r} is not an integer id in decimal (the graph's ids are integers)",
            )
        if value.endswith("\0"):
            raise BadEdge(f"{field}.{name}", "ends with a NUL character")
    at = edge.created_at
    if at is not None and not (np.isfinite(at) and 0 <= at < MAX_EPOCH_SECONDS):
        raise BadEdge(
            f"{field}.created_at",
            f"{at!r} is not epoch seconds in [0, {MAX_EPOCH_SECONDS:.0f}) (1970 to 2100)",
        )
