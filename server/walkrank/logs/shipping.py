"""Shipping closed log files to object storage (a server whose `logs_dir` is a store URI).

The log writers (walkrank.logs.candidates, walkrank.logs.events) write their partitioned Parquet to
local disk exactly as without a store: a file becomes visible under its final name
(`part-*.parquet`) only once it is complete, so every visible file is closed and never
written again. `LogShipper` copies those files to the same relative path under the store URI
and deletes the local file only after the store reports the object with the local file's
size (an S3 object appears whole or not at all). So:

- nothing is lost on a failed upload: the file stays and the next pass (every `interval`
  seconds) tries again; each failed pass is counted (`walkrank_log_ship_failures_total`) and
  logged, once per run of failures;
- nothing is lost on a restart: the first pass, at start, ships what an earlier process left
  (a file uploaded just before a crash, and not yet deleted, is found in the store with its
  size and only deleted);
- a pass stops at its first failure (the store is down or refusing: the others would fail
  the same way) and the files left are `walkrank_log_ship_pending_files`.

Partition directories are left in place: a writer may be creating a file in one.
"""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

import pyarrow.fs as pafs
from prometheus_client import CollectorRegistry, Counter, Gauge

from walkrank.storage import open_store, store_error

log = logging.getLogger(__name__)

#: The log directories under `logs_dir` that are shipped (evaluation reports are not logs).
SHIPPED = ("candidates", "events")
_CHUNK = 8 << 20


class LogShipper:
    """A background thread shipping the closed log files under `local` to `uri`."""

    def __init__(
        self,
        local: Path,
        uri: str,
        *,
        interval: float = 10.0,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.local = Path(local)
        self.uri = uri
        self.interval = interval
        self._filesystem, self._root = open_store(uri)
        self.shipped = Counter(
            "walkrank_log_shipped_files",
            "Closed log files uploaded to the store, verified, and deleted locally",
            registry=registry,
        )
        self.failures = Counter(
            "walkrank_log_ship_failures",
            "Log shipping passes stopped by a failed upload or check (retried next pass)",
            registry=registry,
        )
        self.pending = Gauge(
            "walkrank_log_ship_pending_files",
            "Closed log files waiting on local disk to be shipped after the last pass",
            registry=registry,
        )
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one pass at a time (the thread's and close()'s)
        self._failing = False
        self.last_error: str | None = None  # why the last pass stopped; None when it did not
        self._thread = threading.Thread(target=self._run, name="walkrank-log-ship", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread, then one last pass for the files the writers closed last (those
        it cannot ship stay on disk for the next start)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.ship()

    def closed_files(self) -> list[Path]:
        """Every closed log file waiting under `local`, oldest name first."""
        files: list[Path] = []
        for name in SHIPPED:
            directory = self.local / name
            if directory.is_dir():
                files.extend(
                    path
                    for path in directory.rglob("part-*.parquet")
                    if not any(part.startswith(".") for part in path.relative_to(self.local).parts)
                )
        return sorted(files, key=lambda path: path.name)

    def ship(self) -> int:
        """One pass: ship every closed file, stopping at the first failure; files shipped."""
        with self._lock:
            files = self.closed_files()
            shipped = 0
            try:
                for path in files:
                    if self._ship_one(path):
                        self.shipped.inc()
                    shipped += 1
            except Exception as exc:
                self.failures.inc()
                problem = str(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
                self.last_error = problem
                if not self._failing:
                    log.error(
                        "log shipping to %s failing (%d files waiting, retried every %.0f s): %s",
                        self.uri,
                        len(files) - shipped,
                        self.interval,
                        problem,
                    )
                self._failing = True
            else:
                if self._failing:
                    log.info("log shipping to %s works again", self.uri)
                self._failing = False
                self.last_error = None
            self.pending.set(len(files) - shipped)
            return shipped

    def _ship_one(self, path: Path) -> bool:
        """Upload `path`, check the store has it whole, delete it locally. False when another
        shipper (a replica sharing the directory) took it first."""
        relative = path.relative_to(self.local).as_posix()
        target = f"{self._root}/{relative}"
        try:
            size = path.stat().st_size
            if self._stored_size(target, relative) != size:
                with (
                    open(path, "rb") as source,
                    self._filesystem.open_output_stream(target) as sink,
                ):
                    shutil.copyfileobj(source, sink, _CHUNK)
                stored = self._stored_size(target, relative)
                if stored != size:
                    raise OSError(
                        f"{self.uri}/{relative}: the store holds {stored} bytes after the "
                        f"upload of {size}"
                    )
        except FileNotFoundError:
            if path.exists():
                raise
            return False
        path.unlink(missing_ok=True)
        return True

    def _stored_size(self, target: str, relative: str) -> int | None:
        try:
            info = self._filesystem.get_file_info(target)
        except OSError as exc:
            raise OSError(str(store_error(f"{self.uri}/{relative}", "check", exc))) from None
        return info.size if info.type == pafs.FileType.File else None

    def _run(self) -> None:
        while True:
            self.ship()
            if self._stop.wait(self.interval):
                return
