"""The training loop's load/join/label/train steps on a Dask cluster (`--dask-scheduler`).

For logs too large for one process. The workers read the partitioned Parquet logs themselves
(one task per file of the window's date partitions, from local disk or a store URI such as
`s3://bucket/logs`, each worker opening the store with its own credentials) and train with
`xgboost.dask`; the client only ever holds the per-request times and the held-out requests.

Only the tenant's own events are read (its `events/tenant=` partition, and files written
before events had a tenant), so no other tenant's events can label its candidates.

Correctness of the distributed join: candidates and events are both hash-partitioned by
`request_id` (after casting the key to one dtype, so equal ids hash equally) into the same number
of partitions, so every event lands in the partition holding its candidates, and each pair
of partitions is joined and labelled by the same `join_candidates_events` / `build_labels`
the in-process path uses. A request therefore never straddles partitions, which also keeps
pairwise groups whole. The time split is decided once, on the client, from the per-request
times (the cut is the first held-out request), and applied per partition; negative sampling
draws with `seed + partition number`, so a rerun on the same partitioning samples the same rows.

The held-out requests come back to the client, where `pipeline.finish_training` exports, gates,
compares and publishes exactly as in process.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from walkrank.errors import DataError
from walkrank.logs.candidates import stored_columns, with_visit_scores
from walkrank.storage import Location, as_location, filesystem_of, join, store_error
from walkrank.tenants import TenantConfig
from walkrank.training.labels import join_candidates_events
from walkrank.training.pipeline import (
    EVENT_LAG_SECONDS,
    StepTimer,
    feature_matrix,
    model_targets,
    split_by_time,
    tenant_labels,
    training_params,
)

_KEY_DTYPE = "string[pyarrow]"
_DATE = re.compile(r"/date=(\d{4}-\d{2}-\d{2})/")
_EVENT_COLUMNS = ["request_id", "pin_id", "event", "score"]


def _in_window(path: str, lo: float | None, hi: float | None) -> bool:
    """Whether the file's date partition can hold rows of [lo, hi) (the exact bound is
    applied to the rows after); a file outside date partitions always can."""
    match = _DATE.search(path)
    if match is None:
        return True
    day = match.group(1)
    return (lo is None or day >= _day(lo)) and (hi is None or day <= _day(hi))


def _day(seconds: float) -> str:
    return pd.Timestamp(seconds, unit="s", tz="UTC").strftime("%Y-%m-%d")


def _parquet_files(filesystem: pafs.FileSystem, directory: str, where: Location) -> list[str]:
    """The visible Parquet files under `directory` (none when it does not exist)."""
    try:
        infos = filesystem.get_file_info(
            pafs.FileSelector(directory, recursive=True, allow_not_found=True)
        )
    except OSError as exc:
        raise store_error(str(where), "list the logs", exc) from None
    return sorted(
        info.path
        for info in infos
        if info.type == pafs.FileType.File
        and info.path.endswith(".parquet")
        and not any(part.startswith(".") for part in info.path[len(directory) :].split("/"))
    )


def _read_file(path: str, location: Location, wanted: list[str]) -> pd.DataFrame:
    """One log file's `wanted` columns, read where the task runs (a Dask worker) through
    the filesystem of `location`: a worker opens the store itself, with its own credentials."""
    filesystem, _ = filesystem_of(location)
    file = pq.ParquetFile(path, filesystem=filesystem)
    table = with_visit_scores(
        file.read(columns=stored_columns(wanted, file.schema_arrow.names)), wanted
    )
    if "pin_id" in table.column_names and pa.types.is_integer(table.schema.field("pin_id").type):
        # The candidate log stores integer pin ids as int64; every file reads as strings.
        index = table.schema.get_field_index("pin_id")
        table = table.set_column(index, "pin_id", table["pin_id"].cast(pa.string()))
    return table.to_pandas(types_mapper=pd.ArrowDtype)


def _read(
    location: Location,
    files: list[str],
    wanted: list[str],
    time_column: str,
    lo: float | None,
    hi: float | None,
):
    """The files of the window (by date partition) as a frame of one partition per file,
    read by the workers; None when there are none. DataError naming the first file when it
    lacks a wanted column."""
    import dask.dataframe as dd

    files = [path for path in files if _in_window(path, lo, hi)]
    if not files:
        return None
    filesystem, _ = filesystem_of(location)
    try:
        names = set(pq.read_schema(files[0], filesystem=filesystem).names)
    except OSError as exc:
        raise store_error(f"{location}: {files[0]}", "read", exc) from None
    missing = [name for name in stored_columns(wanted, list(names)) if name not in names]
    if missing:
        raise DataError(f"{files[0]}: the log has no column(s) {', '.join(missing)}")
    meta = _read_file(files[0], location, wanted).iloc[:0]
    frame = dd.from_map(_read_file, files, location=location, wanted=wanted, meta=meta)
    if lo is not None:
        frame = frame[frame[time_column] >= pd.Timestamp(lo, unit="s", tz="UTC")]
    if hi is not None:
        frame = frame[frame[time_column] < pd.Timestamp(hi, unit="s", tz="UTC")]
    frame = frame.assign(
        request_id=frame["request_id"].astype(_KEY_DTYPE), pin_id=frame["pin_id"].astype(_KEY_DTYPE)
    )
    return frame


def _tenant_events(logs_dir: Location, tenant: str, lo: float | None, hi: float | None):
    """The events that may label the tenant's candidates: its own, and those of files
    written before events had a tenant (`events/date=...`: the two layouts are listed
    apart). None when there are none."""
    import dask.dataframe as dd

    filesystem, root = filesystem_of(logs_dir)
    directory = f"{root}/events"
    columns = _EVENT_COLUMNS + ["timestamp"]
    files = _parquet_files(filesystem, directory, logs_dir)
    own = f"{directory}/tenant={tenant}/"
    frames = [
        _read(logs_dir, [p for p in files if p.startswith(own)], columns, "timestamp", lo, hi),
        _read(
            logs_dir,
            [p for p in files if p[len(directory) :].startswith("/date=")],
            columns,
            "timestamp",
            lo,
            hi,
        ),
    ]
    frames = [frame[_EVENT_COLUMNS] for frame in frames if frame is not None]
    if not frames:
        return None
    return frames[0] if len(frames) == 1 else dd.concat(frames)


def _arrow(frame: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(frame, preserve_index=False)


def _is_held_out(table: pa.Table, cut: tuple[int, str]) -> pa.Array:
    """Rows at or after the cut request in (time, request id) order: the held-out side."""
    ts = table["ts"].cast(pa.int64())
    after = pc.or_(
        pc.greater(ts, cut[0]),
        pc.and_(pc.equal(ts, cut[0]), pc.greater_equal(table["request_id"], cut[1])),
    )
    return pc.fill_null(after, False)


def _join_partition(candidates: pd.DataFrame, events: pd.DataFrame) -> pa.Table:
    return join_candidates_events(
        _arrow(candidates), _arrow(events.astype({"score": "float64[pyarrow]"}))
    )


def _training_partition(
    candidates: pd.DataFrame,
    events: pd.DataFrame,
    *,
    tenant: TenantConfig,
    strategy: str,
    objective: str,
    cut: tuple[int, str],
    seed: int,
    qid_stride: int,
    partition_info: dict | None = None,
) -> pd.DataFrame:
    """The labelled training rows of one partition: features, y, weight, qid."""
    joined = _join_partition(candidates, events)
    train = joined.filter(pc.invert(_is_held_out(joined, cut)))
    number = partition_info["number"] if partition_info else 0
    labels = tenant_labels(tenant, train, strategy, seed=seed + number)
    x = feature_matrix(train, list(tenant.features), what=f"tenant {tenant.name!r}")
    y, weights = model_targets(labels, objective)
    ids = train["request_id"].to_numpy(zero_copy_only=False)[labels.indices]
    out = pd.DataFrame(x[labels.indices], columns=[f"f_{n}" for n in tenant.features])
    out["y"] = y
    out["weight"] = np.ones(len(y), np.float32) if weights is None else weights
    # xgboost reads qid as uint32 and sorts a worker's partitions together by it: number the
    # requests densely per partition, offset by the partition (no two requests share a qid).
    _, local = np.unique(np.asarray(ids, dtype=object), return_inverse=True)
    out["qid"] = number * qid_stride + local.astype(np.int64)
    out["positive"] = (y > 0).astype(np.int64)
    return out.sort_values("qid", kind="stable").reset_index(drop=True)


def _held_out_partition(
    candidates: pd.DataFrame, events: pd.DataFrame, *, cut: tuple[int, str]
) -> pd.DataFrame:
    joined = _join_partition(candidates, events)
    return joined.filter(_is_held_out(joined, cut)).to_pandas()


def train_on_dask(
    tenant: TenantConfig,
    logs_dir: Location,
    scheduler: str,
    *,
    window: tuple[float | None, float | None],  # epoch seconds, from window_bounds
    strategy: str,
    objective: str,
    validation_fraction: float,
    seed: int,
    steps: StepTimer,
) -> tuple[Any, pa.Table, dict[str, float], dict[str, int]]:
    """(trained model, held-out joined table, label stats, row counts), as `_train_local`."""
    import dask.dataframe as dd
    import xgboost.dask as dxgb
    from distributed import Client

    from walkrank.ranking.fit import TrainedModel, resolve_params, xgboost_params

    lo, hi = window
    features = [f"f_{n}" for n in tenant.features]
    # A local directory or a store URI: the workers open its filesystem themselves.
    logs_dir = as_location(logs_dir)
    filesystem, root = filesystem_of(logs_dir)
    with Client(scheduler) as client:
        candidate_dir = join(logs_dir, "candidates", f"tenant={tenant.name}")
        files = _parquet_files(filesystem, f"{root}/candidates/tenant={tenant.name}", candidate_dir)
        try:
            candidates = _read(
                logs_dir,
                files,
                ["request_id", "ts", "pin_id", "visit_score", *features],
                "ts",
                lo,
                hi,
            )
        except DataError as exc:
            raise DataError(f"tenant {tenant.name!r}: {exc}") from None
        if candidates is None:
            raise DataError(
                f"no logged candidates for tenant {tenant.name!r} under "
                f"{candidate_dir}: nothing to train on"
            )
        events = _tenant_events(
            logs_dir,
            tenant.name,
            lo,
            None if hi is None else hi + EVENT_LAG_SECONDS,
        )
        if events is None:
            raise DataError(
                f"no events of tenant {tenant.name!r} under "
                f"{join(logs_dir, 'events')}: nothing labels the candidates"
            )

        requests = candidates[["request_id", "ts"]].drop_duplicates().compute()
        if requests.empty:
            raise DataError(f"no logged candidates for tenant {tenant.name!r} in the window")
        steps.done(
            "load",
            f"{len(requests):,} requests on {client.scheduler.address} "
            f"({candidates.npartitions} candidate partitions)",
        )
        n_partitions = max(candidates.npartitions, events.npartitions)
        if n_partitions * len(requests) >= 2**32:
            raise DataError(
                f"{n_partitions} partitions x {len(requests):,} requests overflow "
                "xgboost's 32-bit query ids; train on a shorter window"
            )
        candidates = candidates.shuffle("request_id", npartitions=n_partitions)
        events = events.shuffle("request_id", npartitions=n_partitions)
        _, held_out = split_by_time(_arrow(requests), validation_fraction)
        first = held_out.sort_by([("ts", "ascending"), ("request_id", "ascending")]).slice(0, 1)
        cut = (int(first["ts"].cast(pa.int64())[0].as_py()), str(first["request_id"][0]))

        meta = pd.DataFrame(
            {
                **{c: pd.Series(dtype=np.float32) for c in features},
                "y": pd.Series(dtype=np.float32),
                "weight": pd.Series(dtype=np.float32),
                "qid": pd.Series(dtype=np.int64),
                "positive": pd.Series(dtype=np.int64),
            }
        )
        train = dd.map_partitions(
            _training_partition,
            candidates,
            events,
            tenant=tenant,
            strategy=strategy,
            objective=objective,
            cut=cut,
            seed=seed,
            qid_stride=len(requests),
            meta=meta,
            align_dataframes=False,
        ).persist()
        held_out_meta = _held_out_partition(candidates._meta, events._meta, cut=cut)
        valid = _arrow(
            dd.map_partitions(
                _held_out_partition,
                candidates,
                events,
                cut=cut,
                meta=held_out_meta,
                align_dataframes=False,
            ).compute()
        )
        n_candidates, n_rows, n_positive = (
            int(v) for v in dd.compute(candidates.shape[0], train.shape[0], train["positive"].sum())
        )
        steps.done(
            "join",
            f"{n_rows:,} labelled training rows ({n_positive:,} positive), "
            f"{valid.num_rows:,} held-out candidates",
        )
        if n_rows == 0 or (strategy != "distillation" and n_positive in (0, n_rows)):
            raise DataError(
                f"tenant {tenant.name!r}: the training requests give "
                f"{n_rows} {strategy} rows with {n_positive} positives; are "
                "events reported for this window?"
            )

        resolved = resolve_params(training_params(tenant))
        # As in process (the tenant's regularisation, the converters' intercept, a linear
        # NDCG gain for graded labels); the workers pick their own thread counts. No early
        # stopping: the held-out requests are only gathered on the client.
        params = xgboost_params(resolved, objective, seed)
        params.pop("nthread")
        pairwise = objective == "pairwise"
        matrix = dxgb.DaskDMatrix(
            client,
            train[features],
            train["y"],
            weight=None if pairwise else train["weight"],
            qid=train["qid"] if pairwise else None,
        )
        output = dxgb.train(
            client,
            params,
            matrix,
            num_boost_round=resolved["n_estimators"],
            evals=[(matrix, "train")],
        )
        booster = output["booster"]
        # Trained from named columns; the served model takes a plain matrix in the tenant's
        # order (names are in the metadata), as the in-process booster does.
        booster.feature_names = None
        booster.feature_types = None
        history = output["history"]
        metrics = {
            f"{split}_{name}": float(values[-1])
            for split, by_metric in history.items()
            for name, values in by_metric.items()
        }
        metrics["n_train_rows"] = float(n_rows)
        trained = TrainedModel(
            booster=booster,
            metrics=metrics,
            params={"objective": objective, "seed": seed, **resolved},
        )
        weights = train["weight"]
        positive_weight, total_weight = dd.compute(
            weights[train["positive"] > 0].sum(), weights.sum()
        )
        steps.done(
            "train",
            f"xgboost.dask {objective} on {n_rows:,} rows, {resolved['n_estimators']} trees",
        )
    valid_requests = len(set(valid["request_id"].to_pylist()))
    stats = {
        "rows": n_rows,
        "positives": n_positive,
        "positive_weight": float(positive_weight),
        "negative_weight": float(total_weight - positive_weight),
    }
    rows = {
        "candidates": n_candidates,
        "train_rows": n_rows,
        "valid_rows": valid.num_rows,
        "train_requests": len(requests) - valid_requests,
        "valid_requests": valid_requests,
    }
    return trained, valid, stats, rows
