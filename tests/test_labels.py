"""Label building on a small hand-made log: each strategy's targets and weights, negative
down-sampling, local labels, and the same labels from logs written and read back for real."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from walkrank.errors import ConfigError, DataError
from walkrank.logs.candidates import CandidateBatch, CandidateLog, read_candidates
from walkrank.logs.events import EventLog, read_events, validate_events
from walkrank.training.labels import build_labels, join_candidates_events

T0 = 1_700_000_000.0
WEIGHTS = {"impression": 1.0, "closeup": 2.0, "click": 3.0, "save": 5.0, "hide": 4.0}

# Row: request, pin, pin locale matches the user's?
CANDIDATES = [
    ("r1", "a", 1),
    ("r1", "b", 0),
    ("r1", "c", 1),
    ("r1", "d", 0),
    ("r1", "e", 1),
    ("r2", "a", 0),
    ("r2", "f", 1),
    ("r2", "g", 0),
]
EVENTS = [
    ("r1", "a", "impression", None),
    ("r1", "a", "save", None),
    ("r1", "b", "impression", None),
    ("r1", "c", "impression", None),
    ("r1", "c", "click", None),
    ("r1", "c", "hide", None),
    ("r1", "e", "scored", 0.7),  # scored by the full ranker, not shown
    ("r2", "a", "impression", None),
    ("r2", "a", "click", None),
    ("r2", "a", "scored", 0.9),
    ("r2", "f", "impression", None),
    ("r2", "f", "closeup", None),
    ("r9", "z", "click", None),  # not a logged candidate: ignored
]


def candidates_table() -> pa.Table:
    request, pin, match = zip(*CANDIDATES, strict=True)
    return pa.table(
        {
            "request_id": list(request),
            "pin_id": list(pin),
            "user_interests": [["travel"]] * len(pin),
            "f_locale_match": np.array(match, dtype=np.float32),
        }
    )


def events_table() -> pa.Table:
    request, pin, event, score = zip(*EVENTS, strict=True)
    accepted, report = validate_events(
        {
            "request_id": list(request),
            "pin_id": list(pin),
            "event": list(event),
            "timestamp": [T0] * len(pin),
            "score": list(score),
        },
        tenant="home",
    )
    assert report.count == 0
    return accepted


@pytest.fixture(scope="module")
def joined() -> pa.Table:
    return join_candidates_events(candidates_table(), events_table())


def test_join_gives_each_candidate_its_outcome(joined: pa.Table) -> None:
    assert joined["pin_id"].to_pylist() == [p for _, p, _ in CANDIDATES]  # candidate order
    assert joined["user_interests"].to_pylist()[0] == ["travel"]
    assert joined["n_impression"].to_pylist() == [1, 1, 1, 0, 0, 1, 1, 0]
    assert joined["n_save"].to_pylist() == [1, 0, 0, 0, 0, 0, 0, 0]
    assert joined["n_click"].to_pylist() == [0, 0, 1, 0, 0, 1, 0, 0]
    assert joined["n_closeup"].to_pylist() == [0, 0, 0, 0, 0, 0, 1, 0]
    assert joined["n_hide"].to_pylist() == [0, 0, 1, 0, 0, 0, 0, 0]
    assert joined["n_scored"].to_pylist() == [0, 0, 0, 0, 1, 1, 0, 0]
    assert joined["impressed"].to_pylist() == [True, True, True, False, False, True, True, False]
    assert joined["full_score"].to_pylist() == [None, None, None, None, 0.7, 0.9, None, None]


def labels(joined: pa.Table, strategy: str, **options) -> tuple[list, list, list]:
    options = {
        "weights": WEIGHTS,
        "local_label_weight": 1.0,
        "negative_sample_rate": 1.0,
        "seed": 0,
        **options,
    }
    label_set = build_labels(joined, strategy, **options)
    assert label_set.y.dtype == np.float32 and label_set.sample_weight.dtype == np.float32
    return (label_set.indices.tolist(), label_set.y.tolist(), label_set.sample_weight.tolist())


@pytest.mark.parametrize(
    ("strategy", "y", "weight"),
    [
        # Actioned pins are positives. a: saved (5); c: clicked but hidden -> negative weighted
        # by hide (4); a@r2: clicked (3); f: closeup (2); b: shown, not actioned; d, e, g: never
        # shown.
        ("engagement", [1, 0, 0, 0, 0, 1, 1, 0], [5, 1, 4, 1, 1, 3, 2, 1]),
        # Impressed pins are positives, all weighted alike but the hidden one.
        ("funnel", [1, 1, 0, 0, 0, 1, 1, 0], [1, 1, 4, 1, 1, 1, 1, 1]),
        # Impressed pins are positives, actions weighted above impressions.
        ("blended_funnel", [1, 1, 0, 0, 0, 1, 1, 0], [5, 1, 4, 1, 1, 3, 2, 1]),
    ],
)
def test_each_strategy_labels_and_weights_every_candidate(
    joined: pa.Table, strategy: str, y: list[int], weight: list[int]
) -> None:
    assert labels(joined, strategy) == (list(range(8)), y, weight)


def test_distillation_regresses_on_logged_full_ranker_scores(joined: pa.Table) -> None:
    indices, y, weight = labels(joined, "distillation")
    assert indices == [4, 5] and weight == [1, 1]
    np.testing.assert_allclose(y, [0.7, 0.9], rtol=1e-6)


def test_only_the_tenants_weighted_actions_count(joined: pa.Table) -> None:
    email = {"impression": 1.0, "click": 3.0}  # saves and closeups are not this tenant's goal
    assert labels(joined, "engagement", weights=email) == (
        list(range(8)),
        [0, 0, 0, 0, 0, 1, 0, 0],
        [1, 1, 1, 1, 1, 3, 1, 1],
    )


def test_local_labels_weigh_local_positives(joined: pa.Table) -> None:
    # Locale matches: rows 0, 2, 4, 6. Positives among them (0, 6) double; negatives do not,
    # or the boost would cancel out.
    assert labels(joined, "blended_funnel", local_label_weight=2.0) == (
        list(range(8)),
        [1, 1, 0, 0, 0, 1, 1, 0],
        [10, 1, 4, 1, 1, 3, 4, 1],
    )
    assert labels(joined, "distillation", local_label_weight=2.0)[2] == [2, 1]

    by_column = join_candidates_events(
        candidates_table()
        .drop_columns(["f_locale_match"])
        .append_column("pin_locale", pa.array(["ja", "en", "ja", "en", "ja", "en", "ja", "en"]))
        .append_column("user_locale", pa.array(["ja"] * 5 + ["fr"] * 2 + [None])),
        events_table(),
    )
    # Now rows 0, 2, 4 match (r2's user is French): only row 0 is a local positive.
    assert labels(by_column, "funnel", local_label_weight=3.0)[2] == [3, 1, 4, 1, 1, 1, 1, 1]
    with pytest.raises(DataError, match="local labels need the pin locale"):
        build_labels(
            joined.drop_columns(["f_locale_match"]),
            "funnel",
            weights=WEIGHTS,
            local_label_weight=2.0,
        )


def test_negative_down_sampling_keeps_labels_and_reweights(joined: pa.Table) -> None:
    for seed in range(6):
        indices, y, weight = labels(joined, "funnel", negative_sample_rate=0.5, seed=seed)
        never_shown = [i for i in indices if i in (3, 4, 7)]
        assert [i for i in indices if i not in (3, 4, 7)] == [0, 1, 2, 5, 6]
        assert [w for i, w in zip(indices, weight, strict=True) if i in never_shown] == [2.0] * len(
            never_shown
        )
        assert [w for i, w in zip(indices, weight, strict=True) if i not in never_shown] == [
            1,
            1,
            4,
            1,
            1,
        ]
    assert labels(joined, "funnel", negative_sample_rate=0.5, seed=3) == labels(
        joined, "funnel", negative_sample_rate=0.5, seed=3
    )


def test_negative_down_sampling_is_unbiased_at_scale() -> None:
    n = 40_000
    shown = np.zeros(n, dtype=bool)
    shown[:400] = True
    table = pa.table(
        {"request_id": [f"r{i // 100}" for i in range(n)], "pin_id": [str(i) for i in range(n)]}
    )
    events = pa.table(
        {
            "request_id": table["request_id"].filter(shown),
            "pin_id": table["pin_id"].filter(shown),
            "event": ["impression"] * 400,
        }
    )
    joined = join_candidates_events(table, events)
    a = build_labels(joined, "funnel", weights=WEIGHTS, negative_sample_rate=0.1, seed=1)
    b = build_labels(joined, "funnel", weights=WEIGHTS, negative_sample_rate=0.1, seed=2)
    for label_set in (a, b):
        negatives = label_set.y == 0
        assert label_set.n_positive == 400
        assert abs(negatives.sum() - 0.1 * (n - 400)) < 0.05 * 0.1 * (n - 400)
        # Sum of weights estimates the full negative count.
        assert abs(label_set.sample_weight[negatives].sum() - (n - 400)) < 0.05 * (n - 400)
    assert not np.array_equal(a.indices, b.indices)


def test_bad_label_settings_name_the_problem(joined: pa.Table) -> None:
    with pytest.raises(ConfigError, match="unknown label strategy 'clicks'"):
        build_labels(joined, "clicks", weights=WEIGHTS)
    with pytest.raises(ConfigError, match="unknown event type\\(s\\) like"):
        build_labels(joined, "funnel", weights={"like": 1.0})
    with pytest.raises(ConfigError, match="save must be a finite weight >= 0"):
        build_labels(joined, "funnel", weights={"save": -1.0})
    with pytest.raises(ConfigError, match="negative_sample_rate must be in \\(0, 1\\]"):
        build_labels(joined, "funnel", weights=WEIGHTS, negative_sample_rate=0.0)
    with pytest.raises(DataError, match="lacks column 'n_hide'"):
        build_labels(joined.drop_columns(["n_hide"]), "funnel", weights=WEIGHTS)
    with pytest.raises(DataError, match="events table lacks column\\(s\\) event"):
        join_candidates_events(candidates_table(), events_table().drop_columns(["event"]))


def test_labels_from_logs_written_and_read_back(tmp_path: Path, joined: pa.Table) -> None:
    candidate_log = CandidateLog(tmp_path)
    for request in ("r1", "r2"):
        rows = [(p, m) for r, p, m in CANDIDATES if r == request]
        k = len(rows)
        candidate_log.submit(
            CandidateBatch(
                request_id=request,
                tenant="home",
                ts=T0,
                user_id="u",
                user_locale="en",
                user_interests=["travel"],
                pin_ids=np.array([p for p, _ in rows]),
                feature_names=["visits", "locale_match"],
                features=np.array([[10.0, m] for _, m in rows], dtype=np.float32),
                visit_scores=np.ones(k, np.float32),
                model_scores=np.ones(k, np.float32),
                ranks=np.arange(k, dtype=np.int32),
                returned=np.ones(k, bool),
                model_version="1",
            )
        )
    assert candidate_log.close()
    event_log = EventLog(tmp_path)
    event_log.submit(events_table())
    assert event_log.close()

    from_disk = join_candidates_events(read_candidates(tmp_path, "home"), read_events(tmp_path))
    assert from_disk.num_rows == 8
    for strategy in ("engagement", "funnel", "blended_funnel", "distillation"):
        assert labels(from_disk, strategy, local_label_weight=2.0) == labels(
            joined, strategy, local_label_weight=2.0
        )
