"""One summary for both engines: what ghz prints, computed the same way.

`count` includes failed calls; `rps` is count / total wall time (ghz's "Requests/sec");
latencies are per call from send to the last response message, in milliseconds. Status codes
use gRPC's canonical names (RESOURCE_EXHAUSTED); ghz's Go names (ResourceExhausted) are
converted when its JSON report is read.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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


def summarize(label: str, engine: str, latencies_ms: np.ndarray, codes: list[str],
              total_s: float, errors: dict[str, int], messages_received: int = 0,
              tags: dict[str, str] | None = None) -> Summary:
    latencies = np.asarray(latencies_ms, dtype=np.float64)
    counts: dict[str, int] = {}
    for code in codes:
        counts[code] = counts.get(code, 0) + 1
    if len(latencies):
        p50, p90, p99 = (float(v) for v in np.percentile(latencies, PERCENTILES))
        average, fastest, slowest = (float(latencies.mean()), float(latencies.min()),
                                     float(latencies.max()))
    else:
        p50 = p90 = p99 = average = fastest = slowest = float("nan")
    return Summary(label=label, engine=engine, count=len(latencies), total_s=total_s,
                   rps=len(latencies) / total_s if total_s > 0 else 0.0, average_ms=average,
                   fastest_ms=fastest, slowest_ms=slowest, p50_ms=p50, p90_ms=p90, p99_ms=p99,
                   status_codes=dict(sorted(counts.items())), errors=errors,
                   messages_received=messages_received, tags=dict(tags or {}))


def canonical_code(go_name: str) -> str:
    """ghz's Go status names to gRPC's canonical ones: ResourceExhausted -> RESOURCE_EXHAUSTED."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", go_name).upper()


def from_ghz_json(label: str, report: dict[str, Any], tags: dict[str, str] | None = None
                  ) -> Summary:
    """Summary of a ghz `--format json` report (durations there are Go nanoseconds)."""
    ns = 1e-6
    percentiles = {int(row["percentage"]): row["latency"] * ns
                   for row in report.get("latencyDistribution") or []}
    missing = [p for p in PERCENTILES if p not in percentiles]
    if missing:
        raise ValueError(f"ghz report for {label} has no {missing} latency percentiles")
    return Summary(
        label=label, engine="ghz", count=int(report["count"]), total_s=report["total"] * 1e-9,
        rps=float(report["rps"]), average_ms=report["average"] * ns,
        fastest_ms=report["fastest"] * ns, slowest_ms=report["slowest"] * ns,
        p50_ms=percentiles[50], p90_ms=percentiles[90], p99_ms=percentiles[99],
        status_codes={canonical_code(k): int(v) for k, v in
                      sorted((report.get("statusCodeDistribution") or {}).items())},
        errors={k: int(v) for k, v in (report.get("errorDistribution") or {}).items()},
        tags=dict(tags or {}))


def _codes(codes: dict[str, int]) -> str:
    return ", ".join(f"{code} {n}" for code, n in codes.items())


def markdown_table(summaries: list[Summary]) -> str:
    lines = ["| run | engine | count | req/s | p50 ms | p90 ms | p99 ms | status codes |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    lines += [f"| {s.label} | {s.engine} | {s.count} | {s.rps:.1f} | {s.p50_ms:.1f} | "
              f"{s.p90_ms:.1f} | {s.p99_ms:.1f} | {_codes(s.status_codes)} |" for s in summaries]
    return "\n".join(lines)


def write_results(out: Path, name: str, title: str, summaries: list[Summary],
                  extra: dict[str, Any] | None = None, notes: list[str] | None = None) -> None:
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
