"""The training loop end to end on real logs: CandidateLog/EventLog Parquet, XGBoost, ONNX, the
registry; and `walkrank train` / `walkrank evaluate` through the CLI entry point."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from walkrank.cli import main
from walkrank.errors import DataError
from walkrank.logs.candidates import CandidateBatch, CandidateLog
from walkrank.logs.events import EventLog, validate_events
from walkrank.logs.partitioned import WriterOptions
from walkrank.model_registry import ModelRegistry
from walkrank.storage import Location
from walkrank.tenants import TenantConfig, load_tenant
from walkrank.training.pipeline import TrainReport, evaluate_tenant, split_by_time, train_tenant

REPO = Path(__file__).resolve().parents[1]
START = datetime(2024, 5, 1, 10, 0, tzinfo=UTC).timestamp()
FEATURES = (
    "walk_score",
    "walk_visits",
    "pin_quality",
    "locale_match",
    "topic_in_interests",
    "query_topic_share",
)
N_REQUESTS = 120
CANDIDATES = 60
SHOWN = 8  # pins the client's full ranker impresses per request


def make_tenant(
    objective: str = "binary",
    strategy: str = "blended_funnel",
    features: tuple[str, ...] = FEATURES,
) -> TenantConfig:
    """The shipped home feed tenant, shrunk to the test world (fewer trees and features)."""
    tenant = load_tenant(REPO / "tenants" / "homefeed.yaml")
    return dataclasses.replace(
        tenant,
        features=features,
        ranker=dataclasses.replace(tenant.ranker, objective=objective, trees=30, max_depth=4),
        labels=dataclasses.replace(
            tenant.labels,
            strategy=strategy,
            negative_sample_rate=0.5,
            primary_metric="recall_impressions@10",
        ),
    )


def write_logs(
    logs: Path,
    *,
    tenant: str = "homefeed",
    seed: int = 0,
    noisy_requests: int = 0,
    n_requests: int = N_REQUESTS,
    user_locale: str | None = "en_US",
    visits_decide_from: int | None = None,
) -> None:
    """A logged world where the full ranker's choice depends on the features, not on visits.

    Requests come a minute apart. The full ranker impresses the SHOWN candidates of highest
    latent relevance (topic in interests, quality, locale match, a little walk score); users
    click or save some impressed pins; every candidate also gets a `scored` event (the full
    ranker's score, for distillation). The first `noisy_requests` requests get their events on
    random candidates instead: labels with no relation to the features. From request
    `visits_decide_from` on, the full ranker shows the top walk scores: visit count is perfect.
    """
    rng = np.random.default_rng(seed)
    candidate_log = CandidateLog(logs, WriterOptions(flush_seconds=3600))
    rows: dict[str, list] = {
        "request_id": [],
        "pin_id": [],
        "event": [],
        "timestamp": [],
        "score": [],
    }
    for r in range(n_requests):
        ts = START + 60.0 * r
        request_id = f"req-{seed}-{r:04d}"
        walk_score = rng.lognormal(2.0, 1.0, CANDIDATES).astype(np.float32)
        walk_score[::-1].sort()  # the walk hands candidates over in score order
        features = np.column_stack(
            [
                walk_score,
                np.round(walk_score * rng.uniform(0.5, 1.5, CANDIDATES)),
                rng.uniform(0, 1, CANDIDATES),
                rng.random(CANDIDATES) < 0.4,
                rng.random(CANDIDATES) < 0.3,
                rng.uniform(0, 1, CANDIDATES),
            ]
        ).astype(np.float32)
        latent = (
            2.0 * features[:, 4]
            + 1.5 * features[:, 2]
            + 1.0 * features[:, 3]
            + 0.2 * np.log(walk_score)
            + rng.normal(0, 0.3, CANDIDATES)
        )
        pins = np.array([f"p{r}-{i}" for i in range(CANDIDATES)])
        candidate_log.submit(
            CandidateBatch(
                request_id=request_id,
                tenant=tenant,
                ts=ts,
                user_id=f"u{r % 17}",
                user_locale=user_locale,
                user_interests=["food"],
                pin_ids=pins,
                feature_names=list(FEATURES),
                features=features,
                visit_scores=walk_score,
                model_scores=walk_score,
                ranks=np.arange(CANDIDATES, dtype=np.int32),
                returned=np.ones(CANDIDATES, dtype=bool),
                model_version="visit_count",  # what the server logs without a model
            )
        )
        order = np.argsort(-latent) if r >= noisy_requests else rng.permutation(CANDIDATES)
        if visits_decide_from is not None and r >= visits_decide_from:
            order = np.arange(CANDIDATES)
        shown = order[:SHOWN]
        actions = [(i, "save" if latent[i] > 2.5 else "click") for i in shown[:3]]
        for i, event in [(i, "impression") for i in shown] + actions:
            append_event(
                rows, request_id=request_id, pin_id=pins[i], event=event, timestamp=ts + 5.0
            )
        for i in range(CANDIDATES):
            score = float(latent[i] if r >= noisy_requests else rng.normal())
            append_event(
                rows,
                request_id=request_id,
                pin_id=pins[i],
                event="scored",
                timestamp=ts + 1.0,
                score=score,
            )
    assert candidate_log.close(60)
    write_events(logs, rows, tenant)


def append_event(rows: dict[str, list], **values: object) -> None:
    """Append one event to the columns `rows`; a column not given (`score`) gets None."""
    assert values.keys() <= rows.keys(), values.keys() - rows.keys()
    for column, column_values in rows.items():
        column_values.append(values.get(column))


def write_events(logs: Path, rows: dict[str, list], tenant: str = "homefeed") -> None:
    """Validate `rows` as `tenant`'s events (none may be rejected) and write them to the
    event log under `logs`."""
    accepted, report = validate_events(pa.table(rows), tenant=tenant, now=START + 86_400 * 30)
    assert report.count == 0
    event_log = EventLog(logs, WriterOptions(flush_seconds=3600))
    assert event_log.submit(accepted)
    assert event_log.close(60)


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("logs")
    write_logs(root)
    return root


def quiet(_: str) -> None:
    """Progress sink for tests (the CLI prints)."""


def train_on_dask(
    tenant: TenantConfig, logs: Location, models: Path, *, workers: int, processes: bool
) -> TrainReport:
    """`train_tenant` through xgboost.dask on a local cluster started for this one run."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=processes, dashboard_address=None
    ) as cluster:
        return train_tenant(
            tenant, logs, models, progress=quiet, dask_scheduler=cluster.scheduler_address
        )


def test_train_publishes_a_model_that_beats_visit_count(logs, tmp_path):
    messages: list[str] = []
    report = train_tenant(make_tenant(), logs, tmp_path / "models", progress=messages.append)
    assert report.version == 1 and report.refused is None
    comparison = report.comparison
    assert comparison.baseline == "visit count"
    assert comparison.requests == 24  # the last 20% of 120 requests
    primary = "recall_impressions@10"
    assert comparison.candidate_metrics[primary] > comparison.baseline_metrics[primary] + 0.2
    assert comparison.candidate_metrics["auc"] > comparison.baseline_metrics["auc"]
    # Progress names every long step with row counts.
    steps = [m.split("] ", 1)[1].split(":", 1)[0] for m in messages if m.startswith("[homefeed]")]
    for step in ("load", "join", "train", "gate", "publish"):
        assert step in steps, messages
    assert "7,200 candidates" in messages[0]

    registry = ModelRegistry(tmp_path / "models")
    loaded = registry.load("homefeed")
    assert loaded.version == 1
    assert list(loaded.metadata["feature_names"]) == list(FEATURES)
    assert loaded.metadata["gate"]["passed"] is True
    assert loaded.metadata["strategy"] == "blended_funnel"
    assert registry.current("homefeed").metrics[primary] == pytest.approx(
        comparison.candidate_metrics[primary]
    )


def test_training_does_not_depend_on_the_order_rows_were_logged_in(logs, tmp_path):
    """The server's writer logs requests in the order they finish; shuffled files must train
    the very same model."""
    shuffled = tmp_path / "shuffled"
    shutil.copytree(logs / "events", shuffled / "events")
    for path in (logs / "candidates").rglob("*.parquet"):
        table = pq.read_table(path)
        order = np.random.default_rng(1).permutation(table.num_rows)
        target = shuffled / path.relative_to(logs)
        target.parent.mkdir(parents=True, exist_ok=True)
        half = table.num_rows // 2  # and split across two files
        pq.write_table(table.take(order[:half]), target.with_name("part-b.parquet"))
        pq.write_table(table.take(order[half:]), target.with_name("part-a.parquet"))
    reports = [
        train_tenant(make_tenant(), root, tmp_path / name, progress=quiet)
        for root, name in ((logs, "models-a"), (shuffled, "models-b"))
    ]
    assert reports[0].comparison.candidate_metrics == reports[1].comparison.candidate_metrics
    model_bytes = [
        (tmp_path / name / "homefeed" / "1" / "model.onnx").read_bytes()
        for name in ("models-a", "models-b")
    ]
    assert model_bytes[0] == model_bytes[1]


def test_worse_model_is_refused_unless_forced(logs, tmp_path):
    models = tmp_path / "models"
    tenant = make_tenant()
    assert train_tenant(tenant, logs, models, progress=quiet).version == 1
    # New logs whose training requests carry random labels, while the held-out requests (the
    # last 20%) behave as before: the model trained on noise ranks them worse than v1.
    drifted = tmp_path / "drifted"
    write_logs(drifted, seed=1, noisy_requests=96)
    refused = train_tenant(tenant, drifted, models, progress=quiet)
    assert refused.version is None
    assert refused.comparison.baseline == "v1"
    assert "worse than v1" in refused.refused and "recall_impressions@10" in refused.refused
    assert ModelRegistry(models).current("homefeed").version == 1

    forced = train_tenant(tenant, drifted, models, force=True, progress=quiet)
    assert forced.version == 2 and forced.forced
    assert ModelRegistry(models).current("homefeed").version == 2


@pytest.mark.parametrize(
    ("strategy", "objective"),
    [
        ("engagement", "binary"),
        ("funnel", "binary"),
        ("blended_funnel", "binary"),
        ("blended_funnel", "pairwise"),
        ("distillation", "binary"),
    ],
)
def test_each_strategy_trains_without_publishing(logs, tmp_path, strategy, objective):
    report = train_tenant(
        make_tenant(objective=objective),
        logs,
        tmp_path / "models",
        strategy_override=strategy,
        publish=False,
        progress=quiet,
    )
    assert report.version is None and not (tmp_path / "models" / "homefeed").exists()
    assert report.strategy == strategy
    assert report.objective == ("regression" if strategy == "distillation" else objective)
    assert report.label_stats["rows"] > 0
    # Every strategy's labels follow the full ranker, so every model orders the held-out
    # candidates better than visit count does.
    comparison = report.comparison
    assert comparison.candidate_metrics["auc"] > comparison.baseline_metrics["auc"] + 0.1
    if strategy != "distillation":
        assert 0 < report.label_stats["positives"] < report.label_stats["rows"]


def test_pairwise_early_stopping_watches_ndcg_at_the_primary_metric_cut_off(logs, tmp_path):
    tenant = make_tenant(objective="pairwise")
    tenant = dataclasses.replace(
        tenant, labels=dataclasses.replace(tenant.labels, primary_metric="recall_actions@25")
    )
    report = train_tenant(tenant, logs, tmp_path / "models", publish=False, progress=quiet)
    assert "valid_ndcg@25" in report.metrics
    assert not any(name.endswith("@10") for name in report.metrics)


def test_negative_sampling_keeps_impressed_rows(logs, tmp_path):
    report = train_tenant(
        make_tenant(strategy="funnel"), logs, tmp_path / "models", publish=False, progress=quiet
    )
    train_requests = report.rows["train_requests"]
    assert train_requests == 96
    assert report.label_stats["positives"] == train_requests * SHOWN
    # Half of the 52 unimpressed candidates per request are kept (rate 0.5), weighted 2.
    negatives = report.label_stats["rows"] - report.label_stats["positives"]
    assert 0.4 * 52 * train_requests < negatives < 0.6 * 52 * train_requests


def test_split_keeps_whole_requests_on_one_side(logs):
    from walkrank.logs.candidates import read_candidates
    from walkrank.logs.events import read_events
    from walkrank.training.labels import join_candidates_events

    joined = join_candidates_events(read_candidates(logs, "homefeed"), read_events(logs))
    train, valid = split_by_time(joined, 0.25)
    train_ids = set(train["request_id"].to_pylist())
    valid_ids = set(valid["request_id"].to_pylist())
    assert not train_ids & valid_ids
    assert len(valid_ids) == 30 and train.num_rows + valid.num_rows == joined.num_rows
    assert max(train["ts"].to_pylist()) < min(valid["ts"].to_pylist())


def test_missing_feature_column_is_named(logs, tmp_path):
    tenant = make_tenant(features=(*FEATURES, "pin_age_days"))
    with pytest.raises(DataError, match="f_pin_age_days"):
        train_tenant(tenant, logs, tmp_path / "models", progress=quiet)


def test_empty_window_is_an_error(logs, tmp_path):
    later = (datetime(2025, 1, 1, tzinfo=UTC), datetime(2025, 1, 2, tzinfo=UTC))
    with pytest.raises(DataError, match="no logged candidates for tenant 'homefeed'"):
        train_tenant(make_tenant(), logs, tmp_path / "models", window=later, progress=quiet)
    with pytest.raises(DataError, match="not before"):
        train_tenant(
            make_tenant(), logs, tmp_path / "models", window=(later[1], later[0]), progress=quiet
        )


def test_window_restricts_training_requests(logs, tmp_path):
    window = (START, START + 60.0 * 50)  # the first 50 requests
    report = train_tenant(
        make_tenant(), logs, tmp_path / "models", window=window, publish=False, progress=quiet
    )
    assert report.rows["candidates"] == 50 * CANDIDATES
    assert report.comparison.requests == 10
    assert report.window["start"] == "2024-05-01T10:00:00Z"


def test_evaluate_writes_reports(logs, tmp_path):
    models = tmp_path / "models"
    train_tenant(make_tenant(), logs, models, progress=quiet)
    result = evaluate_tenant(
        make_tenant(), logs, models, k=10, out_dir=tmp_path / "eval", progress=quiet
    )
    paths = result.paths
    assert paths["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    document = json.loads(paths["json"].read_text())
    assert document["baseline"] == "visit count" and document["candidate"] == "v1"
    assert set(document["metrics"]) == {
        "recall_impressions@10",
        "recall_actions@10",
        "ndcg@10",
        "auc",
        "local_share@10",
    }
    lift = document["metrics"]["recall_impressions@10"]
    assert lift["candidate"] > lift["baseline"] and lift["lift"] > 0
    markdown = paths["markdown"].read_text()
    assert "| recall_actions@10 |" in markdown and "24 requests" in markdown
    # Every logged request was served by visit count, one of the two rankers compared.
    assert document["served_by"] == {"visit_count": 24}
    assert document["exposure_warning"].startswith("WARNING: 100% of these 24 requests")
    assert "**WARNING: 100%" in markdown


def _config(tmp_path: Path, logs: Path) -> Path:
    tenants = tmp_path / "tenants"
    tenants.mkdir()
    text = (REPO / "tenants" / "homefeed.yaml").read_text()
    text = text.replace("trees: 200", "trees: 30").replace("max_depth: 6", "max_depth: 4")
    text = re.sub(r"primary_metric: \S+", "primary_metric: recall_impressions@10", text)
    features = "".join(f"  - {name}\n" for name in FEATURES)
    head, rest = text.split("features:\n", 1)
    text = head + "features:\n" + features + rest[rest.index("\nranker:") :]
    (tenants / "homefeed.yaml").write_text(text)
    config = tmp_path / "walkrank.yaml"
    config.write_text(f"graph: graph\ntenants_dir: tenants\nmodels_dir: models\nlogs_dir: {logs}\n")
    return config


def test_cli_train_and_evaluate(logs, tmp_path, capsys):
    config = str(_config(tmp_path, logs))
    assert main(["train", "--tenant", "homefeed", "--config", config]) == 0
    out = capsys.readouterr().out
    assert "published homefeed v1" in out and "| recall_impressions@10 |" in out
    assert main(["train", "--tenant", "homefeed", "--config", config, "--search"]) in (0, 1)
    out = capsys.readouterr().out
    assert "models tried" in out and out.count("passed") >= 8

    out_dir = tmp_path / "report"
    assert (
        main(
            [
                "evaluate",
                "--tenant",
                "homefeed",
                "--config",
                config,
                "--k",
                "10",
                "--out",
                str(out_dir),
            ]
        )
        == 0
    )
    assert (out_dir / "evaluation.png").read_bytes()[:4] == b"\x89PNG"
    assert "| auc |" in capsys.readouterr().out

    # A window past the log's end: a clear error and a non-zero exit code.
    assert (
        main(
            ["train", "--tenant", "homefeed", "--config", config, "--since", "2030-01-01T00:00:00"]
        )
        == 2
    )
    assert "no logged candidates" in capsys.readouterr().err
    assert main(["train", "--tenant", "nosuch", "--config", config]) == 2


def test_cli_refuses_worse_model_with_exit_code(logs, tmp_path, capsys):
    config_path = _config(tmp_path, logs)
    config = str(config_path)
    assert main(["train", "--tenant", "homefeed", "--config", config]) == 0
    drifted = tmp_path / "drifted"
    write_logs(drifted, seed=2, noisy_requests=96)
    config_path.write_text(config_path.read_text().replace(str(logs), str(drifted)))
    capsys.readouterr()
    assert main(["train", "--tenant", "homefeed", "--config", config]) == 1
    assert "refusing to publish" in capsys.readouterr().err
    assert main(["train", "--tenant", "homefeed", "--config", config, "--force"]) == 0
    assert ModelRegistry(tmp_path / "models").current("homefeed").version == 2


def test_early_stopping_keeps_the_best_round_and_reports_the_fit(logs, tmp_path):
    tenant = make_tenant()
    tenant = dataclasses.replace(
        tenant,
        ranker=dataclasses.replace(
            tenant.ranker, trees=400, learning_rate=0.3, early_stopping_rounds=5
        ),
    )
    messages: list[str] = []
    report = train_tenant(
        tenant, logs, tmp_path / "models", publish=False, progress=messages.append
    )
    rounds = int(report.metrics["rounds"])
    assert 1 <= rounds < 400  # the held-out loss stopped improving long before 400 rounds
    assert report.trials[0].rounds == rounds and report.trials[0].chosen
    line = next(m for m in messages if "] train:" in m)
    assert f"{rounds} of 400 rounds" in line and "held out" in line and "auc" in line
    off = dataclasses.replace(
        tenant, ranker=dataclasses.replace(tenant.ranker, trees=40, early_stopping_rounds=0)
    )
    assert (
        train_tenant(off, logs, tmp_path / "m2", publish=False, progress=quiet).metrics["rounds"]
        == 40
    )


def test_search_tries_the_grid_and_keeps_the_best_that_passes_the_gate(logs, tmp_path):
    tenant = make_tenant()
    grid = {"max_depth": (2, 4), "min_child_weight": (1.0, 50.0)}
    tenant = dataclasses.replace(tenant, ranker=dataclasses.replace(tenant.ranker, search=grid))
    messages: list[str] = []
    report = train_tenant(tenant, logs, tmp_path / "models", search=True, progress=messages.append)
    assert [t.settings for t in report.trials] == [
        {"max_depth": d, "min_child_weight": w} for d in (2, 4) for w in (1.0, 50.0)
    ]
    assert all(t.gate == "passed" for t in report.trials)
    chosen = [t for t in report.trials if t.chosen]
    assert len(chosen) == 1
    assert chosen[0].primary == max(t.primary for t in report.trials)
    primary = "recall_impressions@10"
    assert report.comparison.candidate_metrics[primary] == pytest.approx(chosen[0].primary)
    table = next(m for m in messages if "models tried" in m)
    assert "| model | max_depth | min_child_weight | rounds |" in table
    assert table.count("passed") == 4 and "(kept)" in table
    loaded = ModelRegistry(tmp_path / "models").load("homefeed")
    assert len(loaded.metadata["search"]) == 4
    assert loaded.metadata["training_params"]["max_depth"] == chosen[0].settings["max_depth"]


def test_search_never_publishes_a_model_that_loses_to_visit_count(tmp_path):
    """Training requests carry noise; on the held-out ones the client shows the top walk
    scores, so visit count is perfect there and no searched model may be published."""
    logs = tmp_path / "logs"
    write_logs(logs, seed=3, noisy_requests=96, visits_decide_from=96)
    tenant = make_tenant()
    report = train_tenant(tenant, logs, tmp_path / "models", search=True, progress=quiet)
    assert len(report.trials) == 8 and report.version is None
    assert "worse than visit count" in report.refused
    assert not (tmp_path / "models" / "homefeed").exists()


def test_a_model_that_loses_to_visit_count_is_refused_even_when_it_beats_the_serving_one(
    logs, tmp_path
):
    models = tmp_path / "models"
    tenant = make_tenant()
    # v1 is forced in from noise: worse than visit count on the held-out requests.
    noisy = tmp_path / "noisy"
    write_logs(noisy, seed=4, noisy_requests=N_REQUESTS, visits_decide_from=96)
    assert train_tenant(tenant, noisy, models, force=True, progress=quiet).version == 1
    again = train_tenant(
        dataclasses.replace(tenant, ranker=dataclasses.replace(tenant.ranker, max_depth=2)),
        noisy,
        models,
        progress=quiet,
    )
    assert again.comparison.baseline == "v1" and again.visit_count is not None
    assert again.visit_count.baseline == "visit count"
    assert again.version is None and "worse than" in again.refused


def test_report_says_when_the_data_has_no_locales(tmp_path):
    logs = tmp_path / "logs"
    write_logs(logs, user_locale=None)
    messages: list[str] = []
    report = train_tenant(
        make_tenant(), logs, tmp_path / "models", publish=False, progress=messages.append
    )
    assert "local_share@10" not in report.comparison.candidate_metrics
    table = next(m for m in messages if "held-out requests:" in m)
    assert "local_share@10: no locales in data" in table and "| local_share" not in table


def test_cli_refuses_to_use_the_demo_world_unless_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no ./walkrank.yaml here
    assert main(["train", "--tenant", "homefeed"]) == 2
    err = capsys.readouterr().err
    assert "no --config and no ./walkrank.yaml" in err and "--demo" in err
    assert main(["evaluate", "--tenant", "homefeed"]) == 2
    assert "--demo" in capsys.readouterr().err
    events = tmp_path / "events.csv"
    events.write_text("request_id,pin_id,event\nr1,1,save\n")
    assert main(["events", "import", str(events)]) == 2
    assert "--demo" in capsys.readouterr().err
    assert not (tmp_path / "var").exists()  # nothing was built or written


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["binary", "pairwise"])
def test_dask_path_matches_the_in_process_split(logs, tmp_path, objective):
    tenant = make_tenant(objective=objective)
    local = train_tenant(tenant, logs, tmp_path / "local", publish=False, progress=quiet)
    report = train_on_dask(tenant, logs, tmp_path / "models", workers=1, processes=False)
    assert report.version == 1
    assert ModelRegistry(tmp_path / "models").load("homefeed").metadata["gate"]["passed"]
    # Same held-out requests and candidates, same positives (only negatives are sampled).
    assert report.comparison.requests == local.comparison.requests == 24
    assert report.comparison.candidates == local.comparison.candidates
    assert report.rows["candidates"] == N_REQUESTS * CANDIDATES
    assert report.label_stats["positives"] == local.label_stats["positives"] == 96 * SHOWN
    primary = "recall_impressions@10"
    assert (
        report.comparison.candidate_metrics[primary]
        > report.comparison.baseline_metrics[primary] + 0.2
    )
