"""Model registry on disk: the directory layout is the interface (Triton-like).

```
<root>/<tenant>/CURRENT               serving pointer: one line, the version number
<root>/<tenant>/LAST_VERSION          highest version number ever handed out
<root>/<tenant>/<version>/model.onnx  the ranker
<root>/<tenant>/<version>/model.json  its metadata (below)
```

`model.json` holds whatever the exporter put in (feature names and order, converter,
objective, xgboost params, training window, validation metrics, gate report) plus what the
registry adds: `tenant`, `version`, `sha256` (of model.onnx) and `created_at` (ISO 8601 UTC,
kept when the exporter already set it). Required from the exporter: `feature_names` (non-empty
list of str) and `gate` with `passed: true`, so nothing that failed the validation gate is served.

Why the layout is safe to read while a publish runs: a version is written into a temp
directory inside `<root>/<tenant>/` and renamed into place in one `os.rename`, and CURRENT is
replaced (`os.replace`) only after that, so a reader sees the old or the new version, never a
half-written one. Version numbers only grow: LAST_VERSION is bumped before the files are
written, so neither a failed publish nor a deleted version directory frees its number.
Publishes of one tenant are serialised with an advisory file lock (threads and processes alike).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from walkrank.errors import ModelError
from walkrank.pointers import (
    VERSION_RE,
    exclusive_lock,
    fsync_path,
    read_version,
    write_durable,
    write_version,
)
from walkrank.tenants import TENANT_NAME_RE

MODEL_FILE = "model.onnx"
METADATA_FILE = "model.json"
CURRENT_FILE = "CURRENT"
LAST_VERSION_FILE = "LAST_VERSION"
_LOCK_FILE = ".publish.lock"
_TEMP_PREFIX = ".publishing-"


@dataclass(frozen=True)
class ModelVersion:
    """One published version, summarised from its model.json (listing, not verification).

    `problem` is set when model.json cannot be read; `ModelRegistry.load` is what verifies a
    version (checksum, ONNX parse) before it may serve.
    """

    tenant: str
    version: int
    path: Path
    created_at: str | None
    objective: str | None
    converter: str | None
    feature_names: tuple[str, ...]
    sha256: str | None
    metrics: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    problem: str | None = None


@dataclass(frozen=True)
class LoadedModel:
    """A verified model: its bytes match the recorded checksum and parse as ONNX."""

    version: int
    onnx_bytes: bytes = field(repr=False)
    metadata: Mapping[str, Any] = field(compare=False, hash=False)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(self.metadata["feature_names"])


class ModelRegistry:
    """Versioned per-tenant models under one root directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    # -- reading -------------------------------------------------------------------------

    def tenants(self) -> list[str]:
        """Tenants with a model directory (whether or not a version is published yet)."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and TENANT_NAME_RE.fullmatch(p.name)
        )

    def versions(self, tenant: str) -> list[ModelVersion]:
        """Every version directory of a tenant, oldest first."""
        return [self._describe(tenant, v) for v in self._version_numbers(tenant)]

    def current(self, tenant: str) -> ModelVersion | None:
        """The version CURRENT points at, or None before the first publish."""
        version = self._read_current(tenant)
        if version is None:
            return None
        if not self._version_dir(tenant, version).is_dir():
            raise ModelError(
                f"{self._tenant_dir(tenant) / CURRENT_FILE}: points at version {version}, "
                f"whose directory {self._version_dir(tenant, version)} does not exist"
            )
        return self._describe(tenant, version)

    def load(self, tenant: str, version: int | None = None) -> LoadedModel:
        """Read and verify a version (default: CURRENT); ModelError names the bad file."""
        if version is None:
            version = self._read_current(tenant)
            if version is None:
                raise ModelError(f"no model published for tenant {tenant!r} under {self.root}")
        version_dir = self._version_dir(tenant, version)
        if not version_dir.is_dir():
            raise ModelError(f"{version_dir}: version {version} of {tenant!r} does not exist")
        metadata = _read_metadata(version_dir / METADATA_FILE)
        model_path = version_dir / MODEL_FILE
        try:
            onnx_bytes = model_path.read_bytes()
        except OSError as exc:
            raise ModelError(f"{model_path}: cannot read model: {exc.strerror or exc}") from exc
        expected = metadata.get("sha256")
        if not isinstance(expected, str):
            raise ModelError(f"{version_dir / METADATA_FILE}: field 'sha256' is missing")
        actual = hashlib.sha256(onnx_bytes).hexdigest()
        if actual != expected:
            raise ModelError(
                f"{model_path}: checksum mismatch (sha256 {actual}, model.json records "
                f"{expected}); the file is corrupt or truncated ({len(onnx_bytes)} bytes)"
            )
        _parse_onnx(onnx_bytes, str(model_path))
        _check_feature_names(metadata, str(version_dir / METADATA_FILE))
        return LoadedModel(version, onnx_bytes, MappingProxyType(metadata))

    # -- writing -------------------------------------------------------------------------

    def publish(self, tenant: str, onnx_bytes: bytes, metadata: Mapping[str, Any]) -> ModelVersion:
        """Write a new version and make it CURRENT; refuses a model that failed the gate."""
        _check_tenant(tenant)
        _check_feature_names(metadata, "metadata")
        gate = metadata.get("gate")
        if not isinstance(gate, Mapping) or gate.get("passed") is not True:
            raise ModelError(
                f"refusing to publish for {tenant!r}: metadata has no passed validation gate "
                f"('gate': {{'passed': true, ...}}), got gate={gate!r}"
            )
        _parse_onnx(bytes(onnx_bytes), "model to publish")
        sha256 = hashlib.sha256(onnx_bytes).hexdigest()
        if metadata.get("sha256") not in (None, sha256):
            raise ModelError(
                f"refusing to publish for {tenant!r}: metadata sha256 {metadata['sha256']} "
                f"does not match the model bytes ({sha256})"
            )
        _to_json(metadata, tenant)  # fail before a version number is reserved
        tenant_dir = self._tenant_dir(tenant)
        with self._publish_lock(tenant):
            _remove_stale_temp_dirs(tenant_dir)
            version = self._next_version(tenant)
            record = dict(metadata)
            record.update(tenant=tenant, version=version, sha256=sha256)
            record.setdefault("created_at", _utc_now())
            document = _to_json(record, tenant)
            temp_dir = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{version}-", dir=tenant_dir))
            try:
                write_durable(temp_dir / MODEL_FILE, bytes(onnx_bytes))
                write_durable(temp_dir / METADATA_FILE, document.encode())
                os.chmod(temp_dir, 0o755)
                os.rename(temp_dir, self._version_dir(tenant, version))
            except BaseException:
                shutil.rmtree(temp_dir, ignore_errors=True)
                raise
            fsync_path(tenant_dir)
            write_version(tenant_dir / CURRENT_FILE, version)
        return self._describe(tenant, version)

    def rollback(self, tenant: str, version: int | None = None) -> ModelVersion:
        """Point CURRENT at `version`, or at the newest version older than CURRENT.

        The target is verified with `load` first, so a rollback never makes serving worse.
        """
        with self._publish_lock(tenant):
            current = self._read_current(tenant)
            if version is None:
                if current is None:
                    raise ModelError(f"cannot roll back {tenant!r}: no model is published")
                older = [v for v in self._version_numbers(tenant) if v < current]
                if not older:
                    raise ModelError(
                        f"cannot roll back {tenant!r}: version {current} is the oldest there is"
                    )
                version = older[-1]
            elif version not in self._version_numbers(tenant):
                known = ", ".join(map(str, self._version_numbers(tenant))) or "none"
                raise ModelError(
                    f"cannot roll back {tenant!r} to version {version}: no such version "
                    f"(known: {known})"
                )
            try:
                self.load(tenant, version)
            except ModelError as exc:
                raise ModelError(
                    f"cannot roll back {tenant!r} to version {version}: {exc}"
                ) from exc
            write_version(self._tenant_dir(tenant) / CURRENT_FILE, version)
        return self._describe(tenant, version)

    # -- internals -----------------------------------------------------------------------

    def _tenant_dir(self, tenant: str) -> Path:
        _check_tenant(tenant)
        return self.root / tenant

    def _version_dir(self, tenant: str, version: int) -> Path:
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ModelError(f"model version must be a positive integer, got {version!r}")
        return self._tenant_dir(tenant) / str(version)

    def _version_numbers(self, tenant: str) -> list[int]:
        tenant_dir = self._tenant_dir(tenant)
        if not tenant_dir.is_dir():
            return []
        names = (p.name for p in tenant_dir.iterdir() if p.is_dir())
        return sorted(int(name) for name in names if VERSION_RE.fullmatch(name))

    def _read_current(self, tenant: str) -> int | None:
        return read_version(self._tenant_dir(tenant) / CURRENT_FILE, ModelError)

    def _next_version(self, tenant: str) -> int:
        """Reserve a number above every number ever used, durably, before writing files."""
        tenant_dir = self._tenant_dir(tenant)
        last = read_version(tenant_dir / LAST_VERSION_FILE, ModelError) or 0
        version = max([last, *self._version_numbers(tenant)]) + 1
        write_version(tenant_dir / LAST_VERSION_FILE, version)
        return version

    @contextmanager
    def _publish_lock(self, tenant: str) -> Iterator[None]:
        tenant_dir = self._tenant_dir(tenant)
        tenant_dir.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(tenant_dir / _LOCK_FILE):
            yield

    def _describe(self, tenant: str, version: int) -> ModelVersion:
        version_dir = self._version_dir(tenant, version)
        try:
            metadata = _read_metadata(version_dir / METADATA_FILE)
        except ModelError as exc:
            return ModelVersion(
                tenant, version, version_dir, None, None, None, (), None, problem=str(exc)
            )
        names = metadata.get("feature_names")
        metrics = metadata.get("metrics")
        return ModelVersion(
            tenant=tenant,
            version=version,
            path=version_dir,
            created_at=_str_or_none(metadata.get("created_at")),
            objective=_str_or_none(metadata.get("objective")),
            converter=_str_or_none(metadata.get("converter")),
            feature_names=tuple(names) if isinstance(names, list) else (),
            sha256=_str_or_none(metadata.get("sha256")),
            metrics=MappingProxyType(dict(metrics) if isinstance(metrics, dict) else {}),
        )


def _check_tenant(tenant: str) -> None:
    if not isinstance(tenant, str) or not TENANT_NAME_RE.fullmatch(tenant):
        raise ModelError(f"invalid tenant name {tenant!r}: use 1-64 characters of a-z, 0-9 and _")


def _check_feature_names(metadata: Mapping[str, Any], where: str) -> None:
    names = metadata.get("feature_names")
    if (
        not isinstance(names, list | tuple)
        or not names
        or not all(isinstance(n, str) and n for n in names)
    ):
        raise ModelError(
            f"{where}: 'feature_names' must be a non-empty list of feature names, got {names!r}"
        )
    if len(set(names)) != len(names):
        raise ModelError(f"{where}: 'feature_names' has duplicates: {list(names)}")


def _parse_onnx(onnx_bytes: bytes, where: str) -> None:
    import onnx  # imported here: listing versions must not pay for it
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_model_from_string(onnx_bytes)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{where}: not a valid ONNX model: {exc}") from exc
    # An empty byte string parses as an empty ModelProto; a model must have a graph to run.
    if not model.graph.node or not model.graph.output:
        raise ModelError(f"{where}: not a valid ONNX model: the graph has no nodes or outputs")


def _read_metadata(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelError(f"{path}: cannot read metadata: {exc.strerror or exc}") from exc
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: invalid JSON: {exc}") from exc
    if not isinstance(metadata, dict):
        raise ModelError(f"{path}: expected a JSON object, got {type(metadata).__name__}")
    return metadata


def _to_json(record: Mapping[str, Any], tenant: str) -> str:
    def default(value: Any) -> Any:
        # numpy scalars and arrays (metrics, params) have tolist(); Paths become strings.
        if hasattr(value, "tolist"):
            return value.tolist()
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        raise TypeError(f"{type(value).__name__} is not JSON serialisable")

    try:
        return json.dumps(record, indent=2, sort_keys=True, default=default, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"refusing to publish for {tenant!r}: metadata: {exc}") from exc


def _remove_stale_temp_dirs(tenant_dir: Path) -> None:
    """Temp dirs left by a crashed publish; safe because publishes hold the lock."""
    for entry in tenant_dir.iterdir():
        if entry.name.startswith(_TEMP_PREFIX) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
