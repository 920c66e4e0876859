"""One summary for both engines: what ghz prints, computed the same way.

`count` includes failed calls; `rps` is count / total wall time (ghz's "Requests/sec");
latencies are per call from send to the last response message, in milliseconds. As in ghz's
report (runner/reporter.go): the average is over every call, fastest, slowest and the
percentiles over the successful calls only, and a percentile is the nearest-rank value (no
interpolation); with no successful call they are NaN. Status codes use gRPC's canonical
names (RESOURCE_EXHAUSTED); ghz's Go names (ResourceExhausted) are converted when its JSON
report is read.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Summary:
    label: str
    engine: str
    count: int
    total_s: float
    rps: float
    average_ms: float
    fastest_ms: float
    slowest_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    status_codes: dict[str, int]
    errors: dict[str, int] = field(default_factory=dict)
    messages_received: int = 0
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> int:
        return self.status_codes.get("OK", 0)

    @property
    def error_count(self) -> int:
        return self.count - self.ok

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "error_count": self.error_count}


def write_report(path: Path | None, report: dict[str, Any]) -> None:
    """A benchmark's report as indented JSON at `path` (its folder made); nothing when None."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def nearest_rank(sorted_values: np.ndarray, percentage: int) -> float:
    """ghz's percentile: the value at rank ceil(p/100 * n), counted from 1."""
    rank = percentage / 100 * len(sorted_values)
    index = int(rank) - 1 if rank == int(rank) else int(rank)
    return float(sorted_values[max(index, 0)])


def summarize(
    label: str,
    engine: str,
    latencies_ms: np.ndarray,
    codes: list[str],
    total_s: float,
    errors: dict[str, int],
    messages_received: int = 0,
    tags: dict[str, str] | None = None,
) -> Summary:
    latencies = np.asarray(latencies_ms, dtype=np.float64)
    counts: dict[str, int] = {}
    for code in codes:
        counts[code] = counts.get(code, 0) + 1
    ok = np.sort(latencies[np.asarray(codes) == "OK"]) if len(latencies) else latencies
    average = float(latencies.mean()) if len(latencies) else float("nan")
    if len(ok):
        p50, p90, p99 = (nearest_rank(ok, p) for p in PERCENTILES)
        fastest, slowest = float(ok[0]), float(ok[-1])
    else:
        p50 = p90 = p99 = fastest = slowest = float("nan")
    return Summary(
        label=label,
        engine=engine,
        count=len(latencies),
        total_s=total_s,
        rps=len(latencies) / total_s if total_s > 0 else 0.0,
        average_ms=average,
        fastest_ms=fastest,
        slowest_ms=slowest,
        p50_ms=p50,
        p90_ms=p90,
        p99_ms=p99,
        status_codes=dict(sorted(counts.items())),
        errors=errors,
        messages_received=messages_received,
        tags=dict(tags or {}),
    )


# ghz names status codes as Go's codes.Code.String() does: OK, Canceled, ResourceExhausted...
_GO_STATUS_NAMES = {
    "Canceled": "CANCELLED",
    **{
        "OK"
        if code is grpc.StatusCode.OK
        else "".join(w.capitalize() for w in code.name.split("_")): code.name
        for code in grpc.StatusCode
        if code is not grpc.StatusCode.CANCELLED
    },
}


def canonical_code(go_name: str) -> str:
    """ghz's Go status names to gRPC's canonical ones: ResourceExhausted -> RESOURCE_EXHAUSTED."""
    return _GO_STATUS_NAMES.get(go_name, go_name)


def from_ghz_json(
    label: str, report: dict[str, Any], tags: dict[str, str] | None = None
) -> Summary:
    """Summary of a ghz `--format json` report (durations there are Go nanoseconds)."""
    ns = 1e-6
    percentiles = {
        int(row["percentage"]): row["latency"] * ns
        for row in report.get("latencyDistribution") or []
    }
    status_codes = {
        canonical_code(k): int(v)
        for k, v in sorted((report.get("statusCodeDistribution") or {}).items())
    }
    missing = [p for p in PERCENTILES if p not in percentiles]
    if missing and status_codes.get("OK"):
        raise ValueError(f"ghz report for {label} has no {missing} latency percentiles")
    nan = float("nan")
    ok = bool(status_codes.get("OK"))  # ghz reports 0 for what it could not measure
    return Summary(
        label=label,
        engine="ghz",
        count=int(report["count"]),
        total_s=report["total"] * 1e-9,
        rps=float(report["rps"]),
        average_ms=report["average"] * ns,
        fastest_ms=report["fastest"] * ns if ok else nan,
        slowest_ms=report["slowest"] * ns if ok else nan,
        p50_ms=percentiles.get(50, nan),
        p90_ms=percentiles.get(90, nan),
        p99_ms=percentiles.get(99, nan),
        status_codes=status_codes,
        errors={k: int(v) for k, v in (report.get("errorDistribution") or {}).items()},
        tags=dict(tags or {}),
    )


def _codes(codes: dict[str, int]) -> str:
    return ", ".join(f"{code} {n}" for code, n in codes.items())


def markdown_table(summaries: list[Summary]) -> str:
    lines = [
        "| run | engine | count | req/s | p50 ms | p90 ms | p99 ms | status codes |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    lines += [
        f"| {s.label} | {s.engine} | {s.count} | {s.rps:.1f} | {s.p50_ms:.1f} | "
        f"{s.p90_ms:.1f} | {s.p99_ms:.1f} | {_codes(s.status_codes)} |"
        for s in summaries
    ]
    return "\n".join(lines)


def write_results(
    out: Path,
    name: str,
    title: str,
    summaries: list[Summary],
    extra: dict[str, Any] | None = None,
    notes: list[str] | None = None,
) -> None:
    """`<name>.json` (machine-readable) and `<name>.md` (for people) under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {"runs": [s.to_dict() for s in summaries], **(extra or {})}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    text = [f"# {title}", "", markdown_table(summaries), ""]
    for summary in summaries:
        if summary.errors:
            text.append(f"Errors of {summary.label}:")
            text += [f"- {n} x {message}" for message, n in summary.errors.items()]
            text.append("")
    text += notes or []
    (out / f"{name}.md").write_text("\n".join(text).rstrip() + "\n")
