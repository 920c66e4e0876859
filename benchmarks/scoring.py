"""Scoring throughput: xgboost vs onnxruntime (hummingbird, onnxmltools) vs WalkRank's Scorer.

Every engine runs on ONE thread (OMP/MKL/torch/onnxruntime/xgboost all set to 1) so the
comparison is per core; serving scales by running requests on several cores. Figures are
medians over repeated calls in this one run; the ratio is against xgboost's inplace_predict
measured here, not against a number from elsewhere.

    python benchmarks/scoring.py [--quick] [--json PATH]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from functools import partial  # noqa: E402

import numpy as np  # noqa: E402

from walkrank.ranking.convert import to_onnx  # noqa: E402
from walkrank.ranking.fit import train_model  # noqa: E402
from walkrank.ranking.scorer import Scorer, onnx_session  # noqa: E402

N_FEATURES = 32
MODELS = ((100, 6), (200, 6))
BATCHES = (1, 100, 2000, 5000)
ENGINES = ("xgboost", "ort_hummingbird", "ort_onnxmltools", "walkrank_served")


def _train(n_trees: int, depth: int) -> object:
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(20_000, N_FEATURES)).astype(np.float32)
    signal = rows[:, 0] + rows[:, 1] * rows[:, 2] + np.sin(2 * rows[:, 3]) + rows[:, 4:8].sum(1)
    labels = (signal + 0.5 * rng.normal(size=rows.shape[0]) > 0).astype(np.float32)
    params = {"n_estimators": n_trees, "max_depth": depth, "nthread": 1}
    booster = train_model(rows, labels, objective="binary", params=params).booster
    booster.set_param({"nthread": 1})
    return booster


def _median_seconds(call: Callable[[], object], budget_s: float, min_reps: int) -> float:
    call()  # warm: first-call allocations, numba dispatch
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - started < budget_s:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run(quick: bool) -> dict:
    budget_s, min_reps = (0.05, 5) if quick else (0.5, 20)
    rows_all = np.random.default_rng(1).normal(size=(max(BATCHES), N_FEATURES)).astype(np.float32)
    results: dict = {"models": {}}
    max_abs_diff = 0.0
    for n_trees, depth in MODELS:
        booster = _train(n_trees, depth)
        hb_session = onnx_session(to_onnx(booster, N_FEATURES, "hummingbird"))
        oml_bytes = to_onnx(booster, N_FEATURES, "onnxmltools")
        oml_session = onnx_session(oml_bytes)
        scorer = Scorer.from_onnx(oml_bytes, N_FEATURES)
        label = f"{n_trees}x{depth}"
        entry: dict = {"engine_served": scorer.engine, "reason": scorer.reason, "batches": {}}
        print(
            f"\nmodel {n_trees} trees depth {depth}, {N_FEATURES} features; "
            f"served by {scorer.engine} ({scorer.reason})"
        )
        print(f"{'batch':>6} {'engine':<17} {'us/call':>10} {'rows/s':>12} {'vs xgboost':>10}")
        for batch in BATCHES:
            rows = np.ascontiguousarray(rows_all[:batch])
            feed = {"features": rows}
            engines: dict[str, Callable[[], object]] = {
                "xgboost": partial(booster.inplace_predict, rows),
                "ort_hummingbird": partial(hb_session.run, ["score"], feed),
                "ort_onnxmltools": partial(oml_session.run, ["score"], feed),
                "walkrank_served": partial(scorer.score, rows),
            }
            served = scorer.score(rows)
            diff = float(np.max(np.abs(served - oml_session.run(["score"], feed)[0])))
            max_abs_diff = max(max_abs_diff, diff)
            cell = {"max_abs_diff_served_vs_onnxruntime": diff}
            for name in ENGINES:
                seconds = _median_seconds(engines[name], budget_s, min_reps)
                cell[name] = {"us_per_call": seconds * 1e6, "rows_per_second": batch / seconds}
            reference = cell["xgboost"]["rows_per_second"]
            for name in ENGINES:
                figures = cell[name]
                figures["ratio_vs_xgboost"] = figures["rows_per_second"] / reference
                print(
                    f"{batch:>6} {name:<17} {figures['us_per_call']:>10.1f} "
                    f"{figures['rows_per_second']:>12,.0f} {figures['ratio_vs_xgboost']:>9.2f}x"
                )
            entry["batches"][str(batch)] = cell
        results["models"][label] = entry

    headline = results["models"]["100x6"]["batches"]["2000"]
    results.update(
        served_rows_per_second_b2000=headline["walkrank_served"]["rows_per_second"],
        xgboost_rows_per_second_b2000=headline["xgboost"]["rows_per_second"],
        ratio_vs_xgboost_b2000=headline["walkrank_served"]["ratio_vs_xgboost"],
        max_abs_diff=max_abs_diff,
        threads=1,
        quick=quick,
        machine=platform.processor() or platform.machine(),
    )
    print(
        f"\nserved path, 100 trees depth 6, batch 2000: "
        f"{results['served_rows_per_second_b2000']:,.0f} rows/s = "
        f"{results['ratio_vs_xgboost_b2000']:.2f}x xgboost inplace_predict "
        f"({results['xgboost_rows_per_second_b2000']:,.0f} rows/s), one thread each; "
        f"max |served - onnxruntime| = {max_abs_diff:.2g}"
    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    args = parser.parse_args()
    results = run(args.quick)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
