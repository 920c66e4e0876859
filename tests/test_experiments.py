"""Exploration traffic and online experiments through a real server: arms, shares, stickiness,
propensities in the log, shadow models, per-arm metrics, and the tenant file's checks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
from prometheus_client import generate_latest
from test_server import REPO, busy_pins, make_config, publish_model, running

from walkrank.errors import ConfigError
from walkrank.graph.store import GraphStore
from walkrank.logs.candidates import read_candidates
from walkrank.serving.config import ServerConfig
from walkrank.tenants import load_tenant
from walkrank_client import WalkRankClientError

# related_pins (one query pin) with a small walk keeps a thousand requests quick.
SHIPPED_STEPS = "steps: 30_000"


@pytest.fixture()
def config(tmp_path: Path, small_graph: GraphStore) -> ServerConfig:
    """A server config whose related_pins tenant has models v1 and v2 published."""
    config = make_config(tmp_path, small_graph)
    for seed in (1, 2):
        publish_model(config.models_dir, config.tenants_dir, "related_pins", seed=seed)
    return config


def write_tenant(tenants: Path, extra: str, name: str = "related_pins") -> None:
    """The shipped tenant with a small walk and the `extra` sections appended."""
    path = tenants / f"{name}.yaml"
    text = path.read_text().split("\nexploration:\n")[0]  # the shipped share is replaced
    text = text.replace(SHIPPED_STEPS, "steps: 2_000").replace(
        "sample_rate: 0.5",
        "sample_rate: 1.0",  # every request logged
    )
    path.write_text(
        text.split("\n# --- experiments ---\n")[0] + "\n# --- experiments ---\n" + extra
    )


def within_binomial(count: int, n: int, share: float, sigmas: float = 4.0) -> bool:
    return abs(count - n * share) <= sigmas * math.sqrt(n * share * (1 - share)) + 1


def test_shares_are_honoured_sticky_per_user_and_changed_by_reload(
    config: ServerConfig, small_graph: GraphStore
) -> None:
    write_tenant(
        config.tenants_dir,
        "exploration:\n  share: 0.1\n  policy: shuffle_top\n  top: 300\n"
        "experiments:\n  arms:\n"
        "    - {name: control, model: 1, share: 0.6}\n"
        "    - {name: treatment, model: current, share: 0.4}\n",
    )
    query = busy_pins(small_graph, 1)
    n = 1200
    with running(config) as (server, client):
        arms = [
            client.recommend("related_pins", query, user_id=f"user{u}", seed=u) for u in range(n)
        ]
        names = [a.arm for a in arms]
        explored = names.count("explore")
        assert within_binomial(explored, n, 0.1)
        assert within_binomial(names.count("control"), n, 0.9 * 0.6)
        assert within_binomial(names.count("treatment"), n, 0.9 * 0.4)
        versions = {a.arm: {r.model_version for r in arms if r.arm == a.arm} for a in arms}
        assert versions == {"explore": {"shuffle_top"}, "control": {"v1"}, "treatment": {"v2"}}
        # Sticky: a user's later requests land in the same arm.
        again = [
            client.recommend("related_pins", query, user_id=f"user{u}", seed=u + 7).arm
            for u in range(0, n, 40)
        ]
        assert again == names[::40]
        # Without a user id a request is never explored; its experiment arm follows its id.
        anonymous = [
            client.recommend("related_pins", query, request_id=f"anon-{i}").arm for i in range(30)
        ]
        assert set(anonymous) == {"control", "treatment"}
        # A failed request counts under its arm too.
        with pytest.raises(WalkRankClientError):
            client.recommend("related_pins", query, user_id="user0", num_results=10_000)
        # Per-arm Prometheus counters and latency.
        text = generate_latest(server.metrics.registry).decode()
        assert (
            f'walkrank_arm_requests_total{{arm="{names[0]}",code="INVALID_ARGUMENT",'
            'tenant="related_pins"} 1.0' in text
        )
        for arm in ("explore", "control", "treatment"):
            count = names.count(arm) + again.count(arm) + anonymous.count(arm)
            assert (
                f'walkrank_arm_requests_total{{arm="{arm}",code="OK",tenant="related_pins"}} '
                f"{float(count)}" in text
            )
            assert f'walkrank_arm_seconds_count{{arm="{arm}",tenant="related_pins"}}' in text

        # New shares by Reload, no restart: everyone outside exploration goes to treatment.
        write_tenant(
            config.tenants_dir,
            "exploration:\n  share: 0.1\n  policy: shuffle_top\n  top: 300\n"
            "experiments:\n  arms:\n"
            "    - {name: control, model: 1, share: 0.0}\n"
            "    - {name: treatment, model: current, share: 1.0}\n",
        )
        changes = client.reload()
        assert any(c.tenant == "related_pins" and c.kind == "config" for c in changes.changes)
        after = [
            client.recommend("related_pins", query, user_id=f"user{u}", seed=u).arm
            for u in range(0, n, 10)
        ]
        assert set(after) == {"explore", "treatment"}
        # Exploration is its own hash: the same users explore before and after.
        assert [a == "explore" for a in after] == [a == "explore" for a in names[::10]]


def test_propensities_are_logged_per_candidate(tmp_path: Path, small_graph: GraphStore) -> None:
    config = make_config(tmp_path, small_graph)
    write_tenant(
        config.tenants_dir,
        "exploration:\n  share: 0.5\n  policy: shuffle_top\n  top: 300\n  sticky: request\n",
    )
    query = busy_pins(small_graph, 1)
    with running(config) as (server, client):
        answers = [
            client.recommend("related_pins", query, request_id=f"r{i}", num_results=20, seed=i)
            for i in range(40)
        ]
        # The same request id explores the same way (retries are reproducible).
        repeat = client.recommend("related_pins", query, request_id="r0", num_results=20, seed=0)
        assert [c.pin_id for c in repeat.candidates] == [c.pin_id for c in answers[0].candidates]
        server.candidate_log.flush()
    log = read_candidates(config.logs_dir, "related_pins")
    arms = {a.request_id: a.arm for a in answers}
    assert set(arms.values()) == {"explore", "default"}
    for answer in answers[1:]:  # r0 is logged twice
        arm = answer.arm
        rows = log.filter(pc.equal(log["request_id"], answer.request_id)).sort_by("rank")
        returned = rows["returned"].to_numpy(zero_copy_only=False)
        propensity = rows["propensity"].to_numpy()
        assert rows["arm"][0].as_py() == arm
        assert returned.sum() == 20
        # Candidate.propensity on the wire is the logged one of each returned pin.
        logged = dict(
            zip(rows["pin_id"].to_pylist(), propensity.astype(np.float32).tolist(), strict=True)
        )
        assert [c.propensity for c in answer.candidates] == [
            logged[c.pin_id] for c in answer.candidates
        ]
        if arm == "explore":
            top = min(300, rows.num_rows)
            assert rows["model_version"][0].as_py() == "shuffle_top"
            # Every one of the top candidates by visit count had the same chance.
            by_visits = np.argsort(-rows["visit_score"].to_numpy(), kind="stable")
            assert np.allclose(propensity[by_visits[:top]], 20 / top)
            assert (propensity[by_visits[top:]] == 0).all()
            assert returned[by_visits[:top]].sum() == 20
        else:
            assert rows["model_version"][0].as_py() == "visit_count"
            assert (propensity == returned).all()
        assert np.isnan(rows["shadow_score"].to_numpy()).all()


def test_exploration_requests_are_logged_whatever_the_sample_rate(
    tmp_path: Path, small_graph: GraphStore
) -> None:
    config = make_config(tmp_path, small_graph)
    write_tenant(
        config.tenants_dir,
        "exploration:\n  share: 0.5\n  policy: shuffle_top\n  top: 300\n  sticky: request\n",
    )
    path = config.tenants_dir / "related_pins.yaml"
    path.write_text(path.read_text().replace("sample_rate: 1.0", "sample_rate: 0.01"))
    query = busy_pins(small_graph, 1)
    with running(config) as (server, client):
        answers = [
            client.recommend("related_pins", query, request_id=f"r{i}", num_results=20)
            for i in range(40)
        ]
        server.candidate_log.flush()
    logged = set(read_candidates(config.logs_dir, "related_pins")["request_id"].to_pylist())
    explored = {a.request_id for a in answers if a.arm == "explore"}
    assert explored and explored <= logged
    assert len(logged - explored) <= 3  # the 1% sample of the others


def test_shadow_model_is_scored_and_logged_never_served(
    config: ServerConfig, small_graph: GraphStore
) -> None:
    write_tenant(config.tenants_dir, "")
    query = busy_pins(small_graph, 1)

    def answers(client, tag: str) -> list[tuple]:
        out = []
        for i in range(30):
            a = client.recommend(
                "related_pins", query, user_id=f"u{i}", request_id=f"{tag}{i}", seed=i
            )
            out.append((a.model_version, [(c.pin_id, c.score, c.rank) for c in a.candidates]))
        return out

    with running(config) as (server, client):
        before = answers(client, "plain")
        write_tenant(
            config.tenants_dir,
            "experiments:\n  arms:\n    - {name: main, model: current, share: 1.0}\n  shadow: 1\n",
        )
        client.reload()
        with_shadow = answers(client, "shadow")
        server.candidate_log.flush()
    assert with_shadow == before  # v2 serves; the shadow v1 changed nothing
    assert before[0][0] == "v2"
    log = read_candidates(config.logs_dir, "related_pins")
    shadowed = log.filter(pc.equal(log["shadow_version"], "v1"))
    assert shadowed.num_rows and not np.isnan(shadowed["shadow_score"].to_numpy()).any()
    # The shadow's scores are its own (v1), not the served model's (v2).
    assert not np.allclose(shadowed["shadow_score"].to_numpy(), shadowed["model_score"].to_numpy())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("exploration:\n  share: 0.9\n", r"exploration\.share: must be in \[0, 0\.5\]"),
        ("exploration:\n  policy: random\n", r"exploration\.policy: must be one of"),
        ("exploration:\n  top: 5\n", r"exploration\.top: 5 is below candidates\.max_return"),
        ("exploration:\n  sticky: device\n", r"exploration\.sticky: must be one of user"),
        (
            "experiments:\n  arms:\n    - {name: a, model: 1, share: 0.5}\n",
            r"experiments\.arms: shares must add up to 1, got 0\.5",
        ),
        (
            "experiments:\n  arms:\n    - {name: explore, model: 1, share: 1}\n",
            r"experiments\.arms\[0\]\.name: must be",
        ),
        (
            "experiments:\n  arms:\n    - {name: a, model: latest, share: 1}\n",
            r"experiments\.arms\[0\]\.model: must be an integer",
        ),
        (
            "experiments:\n  arms:\n    - {name: a, model: 1, share: 1, weight: 2}\n",
            r"experiments\.arms\[0\]\.weight: unknown field",
        ),
        (
            "experiments:\n  arms:\n    - {name: a, model: 1, share: 1}\n  shadow: -1\n",
            r"experiments\.shadow: must be >= 1",
        ),
    ],
)
def test_bad_settings_name_the_file_and_field(tmp_path: Path, extra: str, message: str) -> None:
    tenants = tmp_path / "tenants"
    tenants.mkdir()
    (tenants / "related_pins.yaml").write_text((REPO / "tenants" / "related_pins.yaml").read_text())
    write_tenant(tenants, extra)
    with pytest.raises(ConfigError, match=message) as info:
        load_tenant(tenants / "related_pins.yaml")
    assert str(info.value).startswith(str(tenants / "related_pins.yaml"))


def test_a_missing_arm_model_is_that_tenants_error_alone(
    tmp_path: Path, small_graph: GraphStore
) -> None:
    config = make_config(tmp_path, small_graph)
    publish_model(config.models_dir, config.tenants_dir, "related_pins", seed=1)
    write_tenant(
        config.tenants_dir,
        "experiments:\n  arms:\n    - {name: a, model: 1, share: 0.5}\n"
        "    - {name: b, model: 9, share: 0.5}\n",
    )
    with running(config) as (_, client):
        result = client.reload()
        assert [e.path for e in result.errors] == [str(config.models_dir / "related_pins")]
        assert "9" in result.errors[0].message
        answer = client.recommend("related_pins", busy_pins(small_graph, 1), user_id="x")
        assert answer.model_version == "v1"  # it keeps serving its current model
        assert client.recommend("homefeed", busy_pins(small_graph, 1)).arm == "default"
