"""`walkrank experiments report` on synthetic logs and events whose arms differ by a known
amount: the report recovers the difference, with intervals, and calls it significant; two
arms that do not differ are not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from test_training_pipeline import FEATURES, START, _config, append_event, write_events

from walkrank.cli import main
from walkrank.logs.candidates import CandidateBatch, CandidateLog
from walkrank.logs.partitioned import WriterOptions

RETURNED = 20
# Per arm: (share of returned pins the full ranker shows, share of those a user clicks).
ARMS = {"control": (0.20, 0.25), "treatment": (0.26, 0.25), "twin": (0.20, 0.25)}


def write_arm_logs(logs: Path, users: int = 300, requests_per_user: int = 3) -> None:
    rng = np.random.default_rng(4)
    candidate_log = CandidateLog(logs, WriterOptions(flush_seconds=3600))
    events: dict[str, list] = {"request_id": [], "pin_id": [], "event": [], "timestamp": []}
    names = list(ARMS)
    for u in range(users):
        arm = names[u % len(names)]  # sticky per user, as the server assigns
        shown_rate, click_rate = ARMS[arm]
        for q in range(requests_per_user):
            request_id, ts = f"{arm}-{u}-{q}", START + 10.0 * (u * requests_per_user + q)
            pins = np.array([f"p{u}-{q}-{i:02d}" for i in range(2 * RETURNED)])
            features = rng.random((len(pins), len(FEATURES)), dtype=np.float32)
            returned = np.arange(len(pins)) < RETURNED
            candidate_log.submit(
                CandidateBatch(
                    request_id=request_id,
                    tenant="homefeed",
                    ts=ts,
                    user_id=f"user{u}",
                    user_locale="en_US",
                    user_interests=[],
                    pin_ids=pins,
                    feature_names=list(FEATURES),
                    features=features,
                    visit_scores=features[:, 0],
                    model_scores=features[:, 0],
                    ranks=np.arange(len(pins), dtype=np.int32),
                    returned=returned,
                    model_version="v1" if arm != "treatment" else "v2",
                    arm=arm,
                    propensities=returned.astype(np.float32),
                )
            )
            shown = np.flatnonzero(returned & (rng.random(len(pins)) < shown_rate))
            for i in shown:
                kinds = ["impression"] + (["click"] if rng.random() < click_rate else [])
                for kind in kinds:
                    append_event(
                        events,
                        request_id=request_id,
                        pin_id=pins[i],
                        event=kind,
                        timestamp=ts + 2.0,
                    )
    assert candidate_log.close(60)
    write_events(logs, events)


def test_report_recovers_a_known_difference(tmp_path: Path, capsys) -> None:
    logs = tmp_path / "logs"
    write_arm_logs(logs)
    config = _config(tmp_path, logs)
    out = tmp_path / "report"
    code = main(
        [
            "experiments",
            "report",
            "--tenant",
            "homefeed",
            "--control",
            "control",
            "--config",
            str(config),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| treatment | 300 | 100 | v2 300 |" in printed
    document = json.loads((out / "experiments.json").read_text())
    assert document["control"] == "control"
    arms = document["arms"]
    assert arms["control"]["users"] == 100 and arms["control"]["returned"] == 300 * RETURNED
    funnel = arms["treatment"]["lift"]["funnel_efficiency"]
    true_lift = ARMS["treatment"][0] / ARMS["control"][0] - 1  # +30%
    assert funnel["low"] < true_lift < funnel["high"]
    assert arms["treatment"]["significant"]["funnel_efficiency"] is True
    assert arms["twin"]["significant"]["funnel_efficiency"] is False
    control = arms["control"]["metrics"]["funnel_efficiency"]
    assert control["low"] < ARMS["control"][0] < control["high"]
    # Actions per thousand returned: shown rate x click rate x 1000.
    actions = arms["treatment"]["metrics"]["actions_per_1000"]
    assert actions["low"] < 1000 * 0.26 * 0.25 < actions["high"]
    assert "significant" in (out / "experiments.md").read_text()


def test_unknown_control_arm_is_an_error_naming_the_arms(tmp_path: Path, capsys) -> None:
    logs = tmp_path / "logs"
    write_arm_logs(logs, users=6, requests_per_user=1)
    config = _config(tmp_path, logs)
    args = ["experiments", "report", "--tenant", "homefeed", "--config", str(config)]
    assert main([*args, "--control", "nope"]) == 2
    assert "no logged request of control arm 'nope' (arms logged: control, treatment, twin)" in (
        capsys.readouterr().err
    )
