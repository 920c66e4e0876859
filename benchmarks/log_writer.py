"""Candidate log writer cost: CPU per logged request, in the writer process and on the request path.

Drives the server's writer (`ProcessLog` running a `CandidateLog` in a spawned child) with
home-feed-shaped batches (2,000 candidates, 18 features, the first of them `walk_score` as in
the shipped tenants, int pin ids), then reads the child's CPU time from /proc (user and
system: the system part is mostly writing and syncing the files). Quicker and steadier than
the serving benchmark's `log_writer_cpu_ms_per_call`, which it should track.

    python benchmarks/log_writer.py [--requests N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds

from walkrank.logs.candidates import CandidateBatch, CandidateLog
from walkrank.logs.process import ProcessLog

CANDIDATES = 2000
FEATURES = 18


def batches(count: int, seed: int) -> list[CandidateBatch]:
    """Home-feed-shaped batches: real features are a mix of scores, counts and flags."""
    rng = np.random.default_rng(seed)
    names = ["walk_score"] + [f"feature_{i}" for i in range(1, FEATURES)]
    out = []
    for i in range(count):
        features = np.empty((CANDIDATES, FEATURES), dtype=np.float32)
        features[:, :8] = rng.random((CANDIDATES, 8), dtype=np.float32)
        features[:, 8:13] = rng.integers(0, 50, (CANDIDATES, 5))
        features[:, 13:] = rng.integers(0, 2, (1, FEATURES - 13))
        visit_scores = rng.random(CANDIDATES, dtype=np.float32)
        features[:, 0] = visit_scores  # the walk_score feature is the visit score
        order = rng.permutation(CANDIDATES)
        returned = order < 50
        out.append(
            CandidateBatch(
                request_id=f"req-{seed}-{i:08d}",
                tenant="home",
                ts=1.7e9 + i * 0.01,
                user_id=f"user-{rng.integers(1_000_000)}",
                user_locale="en-US",
                user_interests=["sports", "cooking", "travel"],
                pin_ids=rng.integers(0, 10**7, CANDIDATES),
                feature_names=names,
                features=features,
                visit_scores=visit_scores,
                model_scores=rng.random(CANDIDATES, dtype=np.float32),
                ranks=order.astype(np.int32),
                returned=returned,
                model_version="v3",
                arm="default",
                propensities=returned.astype(np.float32),
            )
        )
    return out


def process_cpu_s(pid: int) -> np.ndarray:
    """[user, system] CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return np.array([int(fields[11]), int(fields[12])]) / os.sysconf("SC_CLK_TCK")


def measure(requests: int, seed: int) -> dict[str, float]:
    """Submit `requests` batches (waiting when the ring is full), flush, and report CPU."""
    records = batches(64, seed)
    with tempfile.TemporaryDirectory() as root:
        log = ProcessLog(partial(CandidateLog, Path(root)), name="bench-log")
        try:
            log.flush()
            child_before = process_cpu_s(log.pid)
            submit_cpu = 0.0
            started = time.monotonic()
            for i in range(requests):
                record = records[i % len(records)]
                while True:
                    before = time.thread_time()
                    accepted = log.submit(record)
                    submit_cpu += time.thread_time() - before
                    if accepted:
                        break
                    time.sleep(0.002)  # the ring is full: let the child catch up
            log.flush()
            elapsed = time.monotonic() - started
            child_cpu = process_cpu_s(log.pid) - child_before
        finally:
            log.close()
        lost = sum(log.lost.values()) - log.lost["queue_full"]
        files = list(Path(root, "candidates").rglob("*.parquet"))
        rows = ds.dataset(files, format="parquet").count_rows()
        size = sum(f.stat().st_size for f in files)
    if lost or rows != requests * CANDIDATES:
        raise SystemExit(f"log writer lost rows: {rows:,} written of {requests * CANDIDATES:,}")
    return {
        "writer_cpu_ms_per_request": round(child_cpu.sum() / requests * 1e3, 3),
        "writer_system_cpu_ms_per_request": round(child_cpu[1] / requests * 1e3, 3),
        "submit_cpu_ms_per_request": round(submit_cpu / requests * 1e3, 3),
        "file_bytes_per_request": round(size / requests),
        "elapsed_s": round(elapsed, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="batches per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs; figures are medians")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    if not sys.platform.startswith("linux"):
        raise SystemExit("log_writer.py reads CPU times from /proc: Linux only")
    runs = [measure(args.requests, seed) for seed in range(args.repeat)]
    report = {
        "candidates_per_request": CANDIDATES,
        "features": FEATURES,
        "requests": args.requests,
        **{key: float(np.median([run[key] for run in runs])) for key in runs[0]},
        "runs": runs,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
