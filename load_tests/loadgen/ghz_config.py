"""ghz configuration files (https://ghz.sh/docs/options): parse, validate, resolve paths.

One JSON file describes a load whichever engine sends it: ghz itself reads it with `--config`,
and the built-in generator reads the keys below with ghz's meaning and defaults (total 200,
concurrency 50, timeout 20s; `duration` overrides `total`; `duration-stop` close; `rps` is
the total rate shared by the workers; an array of messages in `data` is sent round-robin).
Any other ghz key is rejected by name, so a file never silently means something else to the
built-in generator.

Relative paths (`proto`, `import-paths`, `data-file`, `metadata-file`) resolve against the
working directory, not the config file's directory: that is what ghz v0.121 does, so a
config means the same files to both engines only when both run in the same directory.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from walkrank.errors import ConfigError

#: Keys the built-in generator honours, with ghz's meaning.
SUPPORTED_KEYS = frozenset(
    {
        "name",
        "proto",
        "import-paths",
        "call",
        "host",
        "insecure",
        "total",
        "duration",
        "concurrency",
        "connections",
        "rps",
        "timeout",
        "data",
        "data-file",
        "metadata",
        "metadata-file",
        "tags",
        "duration-stop",
    }
)
DEFAULT_TOTAL = 200
DEFAULT_CONCURRENCY = 50
DEFAULT_TIMEOUT_S = 20.0
#: ghz's `duration-stop` values: what happens to the calls in flight when a `duration` ends.
#: close (ghz's default): they are cut off and reported as failed (CANCELLED here; ghz says
#: UNAVAILABLE or CANCELLED); wait: they finish and count; ignore: they are cut off and left
#: out of the report.
DURATION_STOPS = ("close", "wait", "ignore")

#: ghz's call template variables (ghz.sh/docs/calldata). Only plain `{{.Name}}` actions are
#: supported; template functions (`{{randomString 8}}`, ...) are rejected by name.
TEMPLATE_VARIABLES = frozenset(
    {
        "WorkerID",
        "RequestNumber",
        "FullyQualifiedName",
        "MethodName",
        "ServiceName",
        "InputName",
        "OutputName",
        "IsClientStreaming",
        "IsServerStreaming",
        "Timestamp",
        "TimestampUnix",
        "TimestampUnixMilli",
        "TimestampUnixNano",
        "UUID",
    }
)
_ACTION_RE = re.compile(r"{{(.*?)}}")
_VARIABLE_RE = re.compile(r"\s*\.([A-Za-z]+)\s*")
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class GhzConfig:
    """A validated ghz config; paths are absolute (resolved against `workdir`)."""

    source: Path
    call: str
    #: The directory relative paths were resolved against: where ghz must run for the same.
    workdir: Path
    name: str = ""
    proto: Path | None = None
    import_paths: tuple[Path, ...] = ()
    host: str = ""
    insecure: bool = False
    total: int = DEFAULT_TOTAL
    duration_s: float | None = None
    duration_stop: str = "close"
    concurrency: int = DEFAULT_CONCURRENCY
    connections: int = 1
    rps: float | None = None
    timeout_s: float | None = DEFAULT_TIMEOUT_S
    #: The call messages as JSON text (one per element of ghz's data array), templates intact.
    messages: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def uses_reflection(self) -> bool:
        """ghz asks the server's reflection service when neither proto nor protoset is set."""
        return self.proto is None

    @property
    def service(self) -> str:
        return self.call.rpartition(".")[0]

    @property
    def method(self) -> str:
        return self.call.rpartition(".")[2]

    @property
    def label(self) -> str:
        return self.name or self.tags.get("tenant") or self.source.stem


def parse_duration(text: Any, where: str) -> float:
    """A Go duration string ("10s", "1m30s", "250ms") in seconds."""
    if not isinstance(text, str) or not text:
        raise ConfigError(f"{where}: expected a Go duration string such as '10s', got {text!r}")
    position, seconds = 0, 0.0
    for match in _DURATION_RE.finditer(text):
        if match.start() != position:
            break
        seconds += float(match.group(1)) * _UNIT_S[match.group(2)]
        position = match.end()
    if position != len(text):
        raise ConfigError(f"{where}: expected a Go duration string such as '10s', got {text!r}")
    return seconds


def check_template(text: str, where: str) -> None:
    """Reject template actions the built-in generator cannot evaluate, naming them."""
    for action in _ACTION_RE.findall(text):
        match = _VARIABLE_RE.fullmatch(action)
        if match is None or match.group(1) not in TEMPLATE_VARIABLES:
            raise ConfigError(
                f"{where}: template action '{{{{{action}}}}}' is not supported by the built-in "
                f"generator; use one of {{{{.{'}}, {{.'.join(sorted(TEMPLATE_VARIABLES))}}}}}"
            )


def render_template(text: str, values: dict[str, Any]) -> str:
    """Substitute `{{.Name}}` actions (validated by `check_template` beforehand)."""
    if "{{" not in text:
        return text

    def substitute(action: re.Match[str]) -> str:
        variable = _VARIABLE_RE.fullmatch(action.group(1))
        assert variable is not None  # check_template refuses any other action
        return str(values[variable.group(1)])

    return _ACTION_RE.sub(substitute, text)


def _positive_int(raw: dict[str, Any], key: str, where: str) -> int:
    value = raw[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{where}: {key}: expected a positive integer, got {value!r}")
    return value


def _string_map(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ConfigError(f"{where}: expected an object of string values, got {value!r}")
    return dict(value)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from exc


def _messages(data: Any, where: str) -> tuple[str, ...]:
    # ghz's checkData: one object, or a non-empty array of objects (sent round-robin).
    items = data if isinstance(data, list) else [data]
    if not items:
        raise ConfigError(f"{where}: the data array must not be empty")
    texts = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise ConfigError(
                f"{where}[{index}]: expected a JSON object (one call message), "
                f"got {type(item).__name__}"
            )
        text = json.dumps(item, separators=(",", ":"))
        check_template(text, f"{where}[{index}]")
        texts.append(text)
    return tuple(texts)


def _relative(base: Path, value: str) -> Path:
    return (base / value).resolve()


def _named_file(raw: dict[str, Any], key: str, path: Path, base: Path, where_from: str) -> Path:
    """The existing file a config key names, relative to `base` as ghz resolves it."""
    if not isinstance(raw[key], str):
        raise ConfigError(f"{path}: {key}: expected a path string")
    named = _relative(base, raw[key])
    if not named.is_file():
        raise ConfigError(f"{path}: {key}: no such file {named} {where_from}")
    return named


def load_ghz_config(path: str | Path, workdir: str | Path | None = None) -> GhzConfig:
    """Read and validate a ghz JSON config for the built-in generator.

    `workdir` (default: the current directory) is the directory relative paths resolve
    against, as ghz resolves them against the directory it runs in.
    """
    path = Path(path).resolve()
    base = Path.cwd() if workdir is None else Path(workdir).resolve()
    where_from = f"(relative paths resolve against the working directory {base}, as in ghz)"
    raw = _read_json(path, "ghz config")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object of ghz settings")
    unknown = sorted(set(raw) - SUPPORTED_KEYS)
    if unknown:
        raise ConfigError(
            f"{path}: ghz key {unknown[0]!r} is not supported by the built-in "
            f"generator (supported: {', '.join(sorted(SUPPORTED_KEYS))})"
        )
    if "call" not in raw:
        raise ConfigError(f"{path}: call: required (e.g. 'walkrank.v1.Recommender.Recommend')")
    call = raw["call"]
    if not isinstance(call, str):
        raise ConfigError(f"{path}: call: expected a string, got {call!r}")
    # ghz accepts 'package.Service/Method' and 'package.Service.Method'.
    call = call.replace("/", ".")
    if call.count(".") < 1 or not all(call.split(".")):
        raise ConfigError(f"{path}: call: expected 'package.Service.Method', got {raw['call']!r}")
    values: dict[str, Any] = {"source": path, "workdir": base, "call": call, "raw": raw}
    for key in ("name", "host", "proto"):
        if key in raw and not isinstance(raw[key], str):
            raise ConfigError(f"{path}: {key}: expected a string, got {raw[key]!r}")
    values["name"] = raw.get("name", "")
    values["host"] = raw.get("host", "")
    if "insecure" in raw:
        if not isinstance(raw["insecure"], bool):
            raise ConfigError(f"{path}: insecure: expected true or false")
        values["insecure"] = raw["insecure"]
    if raw.get("proto"):
        values["proto"] = _named_file(raw, "proto", path, base, where_from)
    paths = raw.get("import-paths", [])
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise ConfigError(f"{path}: import-paths: expected a list of directories")
    values["import_paths"] = tuple(_relative(base, p) for p in paths)
    missing = [p for p in values["import_paths"] if not p.is_dir()]
    if missing:
        raise ConfigError(f"{path}: import-paths: no such directory {missing[0]} {where_from}")
    for key in ("total", "concurrency", "connections"):
        if key in raw:
            values[key] = _positive_int(raw, key, str(path))
    if "rps" in raw:
        values["rps"] = float(_positive_int(raw, "rps", str(path)))
    if "duration" in raw:
        values["duration_s"] = parse_duration(raw["duration"], f"{path}: duration")
        if values["duration_s"] <= 0:
            raise ConfigError(f"{path}: duration: must be positive")
    if "duration-stop" in raw:
        stop = raw["duration-stop"]
        # ghz lower-cases the value (and silently takes an unknown one as close: refused here).
        if not isinstance(stop, str) or stop.lower() not in DURATION_STOPS:
            raise ConfigError(
                f"{path}: duration-stop: expected one of {', '.join(DURATION_STOPS)}, got {stop!r}"
            )
        values["duration_stop"] = stop.lower()
    if "timeout" in raw:
        timeout = parse_duration(raw["timeout"], f"{path}: timeout")
        values["timeout_s"] = timeout if timeout > 0 else None  # ghz: zero means no timeout
    if "data" in raw and "data-file" in raw:
        raise ConfigError(f"{path}: give either data or data-file, not both")
    if "data" in raw:
        values["messages"] = _messages(raw["data"], f"{path}: data")
    elif "data-file" in raw:
        data_path = _named_file(raw, "data-file", path, base, where_from)
        values["messages"] = _messages(_read_json(data_path, "data file"), str(data_path))
    else:
        values["messages"] = ("{}",)
    if "metadata" in raw and "metadata-file" in raw:
        raise ConfigError(f"{path}: give either metadata or metadata-file, not both")
    metadata_raw = raw.get("metadata")
    metadata_where = f"{path}: metadata"
    if "metadata-file" in raw:
        metadata_path = _named_file(raw, "metadata-file", path, base, where_from)
        metadata_raw, metadata_where = (
            _read_json(metadata_path, "metadata file"),
            str(metadata_path),
        )
    if metadata_raw is not None:
        metadata = _string_map(metadata_raw, metadata_where)
        for key, value in metadata.items():
            check_template(value, f"{metadata_where}.{key}")
        values["metadata"] = metadata
    if "tags" in raw:
        values["tags"] = _string_map(raw["tags"], f"{path}: tags")
    config = GhzConfig(**values)
    if config.connections > config.concurrency:
        raise ConfigError(
            f"{path}: connections ({config.connections}) must be <= concurrency "
            f"({config.concurrency})"
        )
    if config.duration_s is None and config.total < config.concurrency:
        # ghz refuses this too: every worker must have at least one request.
        raise ConfigError(
            f"{path}: total ({config.total}) must be >= concurrency ({config.concurrency})"
        )
    return config
