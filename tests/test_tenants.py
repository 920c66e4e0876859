"""Tenant YAML: the shipped tenants load, and every kind of bad file is refused with a
ConfigError naming the file and the dotted field."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml

from walkrank.errors import ConfigError
from walkrank.features import feature_names
from walkrank.tenants import TenantConfig, load_tenant, load_tenants
from walkrank.walks.engine import WalkParams

TENANTS_DIR = Path(__file__).resolve().parents[1] / "tenants"
SHIPPED = ("email", "homefeed", "related_pins")


def shipped_raw(name: str = "homefeed") -> dict:
    return yaml.safe_load((TENANTS_DIR / f"{name}.yaml").read_text())


def write(directory: Path, name: str, raw) -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False))
    return path


def refusal(path: Path) -> str:
    """The message load_tenant refuses `path` with (the test fails when the file loads)."""
    with pytest.raises(ConfigError) as excinfo:
        load_tenant(path)
    return str(excinfo.value)


def test_every_shipped_tenant_loads():
    tenant_set = load_tenants(TENANTS_DIR)
    assert tenant_set.errors == {}
    assert sorted(tenant_set.configs) == list(SHIPPED)
    for name, config in tenant_set.configs.items():
        assert config.name == name
        assert config.source == TENANTS_DIR / f"{name}.yaml"
        assert isinstance(config.walk_params, WalkParams)
        assert config.walk_params.max_candidates == config.candidates.generate
        assert set(config.features) <= set(feature_names())


def test_shipped_tenants_differ_where_their_surfaces_differ():
    configs = load_tenants(TENANTS_DIR).configs
    home, related, email = configs["homefeed"], configs["related_pins"], configs["email"]

    assert home.query.source == "recent_pins" and email.query.source == "recent_pins"
    assert related.query.source == "viewed_pin" and related.query.max_pins == 1
    assert related.query.action_weights == {} and related.query.recency_half_life_hours is None
    assert home.walk.steps == 100_000 and related.walk.steps < home.walk.steps
    assert email.walk.steps < home.walk.steps
    assert related.walk.bias.by == "locale_topic" and related.walk.bias.strength > 0.5
    assert (home.candidates.generate, home.candidates.return_) == (2000, 500)
    assert (related.candidates.generate, related.candidates.return_) == (1000, 100)
    assert (email.candidates.generate, email.candidates.return_) == (500, 20)
    # Each tenant weights the action its surface is judged on highest.
    assert max(home.labels.weights, key=home.labels.weights.get) == "save"
    assert max(email.labels.weights, key=email.labels.weights.get) == "click"
    assert home.labels.strategy == "blended_funnel" and email.labels.strategy == "engagement"
    assert home.labels.local_label_weight > 1.0
    assert email.limits.max_in_flight < home.limits.max_in_flight
    assert (email.limits.priority, home.limits.priority) == ("batch", "interactive")
    assert email.logging.sample_rate < home.logging.sample_rate == 1.0
    assert home.labels.primary_metric == "recall_actions@50"
    # Below `return`: events exist only for returned pins, so K >= return is trivially 1.
    assert home.labels.primary_metric_k == 50


def test_walk_params_carry_every_walk_setting(tmp_path):
    config = load_tenant(TENANTS_DIR / "related_pins.yaml")
    assert config.walk_params == WalkParams(
        steps=30_000,
        restart_probability=0.7,
        early_stop_pins=150,
        early_stop_visits=8,
        bias_strength=0.8,
        bias_by="locale_topic",
        max_candidates=1000,
    )
    raw = shipped_raw()
    raw["walk"]["early_stopping"] = None
    no_stop = load_tenant(write(tmp_path, "homefeed", raw))
    assert no_stop.walk.early_stopping is None
    assert no_stop.walk_params.early_stop_pins == 0  # 0 turns early stopping off


def test_minimal_tenant_gets_documented_defaults(tmp_path):
    config = load_tenant(
        write(tmp_path, "search", {"name": "search", "query": {"source": "recent_pins"}})
    )
    assert config.features == tuple(feature_names())
    assert config.walk_params == WalkParams()
    assert (
        config.candidates.generate,
        config.candidates.return_,
        config.candidates.max_return,
    ) == (2000, 100, 2000)
    assert config.query.max_pins == 20 and config.query.recency_half_life_hours == 72.0
    assert dict(config.query.action_weights) == {"save": 1.0, "click": 0.5, "view": 0.2}
    assert (config.ranker.objective, config.ranker.converter) == ("binary", "onnxmltools")
    ranker = config.ranker
    assert (ranker.trees, ranker.max_depth, ranker.learning_rate) == (300, 4, 0.1)
    assert (ranker.min_child_weight, ranker.subsample, ranker.colsample_bytree) == (5.0, 0.8, 0.8)
    assert (ranker.reg_lambda, ranker.reg_alpha, ranker.gamma) == (1.0, 0.0, 0.0)
    assert ranker.early_stopping_rounds == 20
    assert len(ranker.search_grid()) == 8
    assert config.labels.strategy == "blended_funnel"
    assert config.labels.primary_metric == "recall_actions@50"
    assert (config.logging.sample_rate, config.limits.max_in_flight) == (1.0, 16)
    assert config.description == ""


@pytest.mark.parametrize("name", SHIPPED)
def test_effective_config_round_trips(tmp_path, name):
    config = load_tenant(TENANTS_DIR / f"{name}.yaml")
    again = load_tenant(write(tmp_path, name, config.to_dict()))
    assert again == config


def test_ranker_settings_reach_the_training_params(tmp_path):
    raw = shipped_raw()
    raw["ranker"].update(
        min_child_weight=12,
        subsample=0.6,
        colsample_bytree=0.5,
        reg_lambda=3,
        reg_alpha=0.1,
        gamma=0.2,
        early_stopping_rounds=None,
        search={"learning_rate": [0.05, 0.2], "max_depth": [3, 5, 7]},
    )
    ranker = load_tenant(write(tmp_path, "homefeed", raw)).ranker
    assert ranker.training_params() == {
        "n_estimators": 200,
        "max_depth": 6,
        "learning_rate": 0.1,
        "min_child_weight": 12.0,
        "subsample": 0.6,
        "colsample_bytree": 0.5,
        "reg_lambda": 3.0,
        "reg_alpha": 0.1,
        "gamma": 0.2,
        "early_stopping_rounds": 0,
    }
    # Every combination, the first setting varying slowest.
    assert ranker.search_grid() == [
        {"learning_rate": lr, "max_depth": depth} for lr in (0.05, 0.2) for depth in (3, 5, 7)
    ]
    raw["ranker"]["search"] = {}
    assert load_tenant(write(tmp_path, "homefeed", raw)).ranker.search_grid() == [{}]


def test_config_is_frozen():
    config = load_tenant(TENANTS_DIR / "homefeed.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.walk.steps = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.labels.weights["save"] = 100.0  # type: ignore[index]
    assert isinstance(config, TenantConfig)


def test_exponent_numbers_without_a_dot_are_numbers(tmp_path):
    text = (TENANTS_DIR / "homefeed.yaml").read_text()
    text = text.replace("learning_rate: 0.1", "learning_rate: 5e-2")
    text = text.replace("steps: 100_000", "steps: 1e5")
    config = load_tenant(write(tmp_path, "homefeed", text))
    assert config.ranker.learning_rate == pytest.approx(0.05)
    assert config.walk.steps == 100_000 and isinstance(config.walk.steps, int)


def _set(path: str, value):
    def edit(raw: dict) -> None:
        *parents, leaf = path.split(".")
        node = raw
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value

    return edit


def _drop(path: str):
    def edit(raw: dict) -> None:
        *parents, leaf = path.split(".")
        node = raw
        for key in parents:
            node = node[key]
        del node[leaf]

    return edit


INVALID = [
    # (edit, field, message fragment)
    (
        _set("walk.restart_probability", 1.5),
        "walk.restart_probability",
        "must be in (0, 1], got 1.5",
    ),
    (_set("walk.restart_probability", 0), "walk.restart_probability", "must be in (0, 1]"),
    (_set("walk.steps", "many"), "walk.steps", "must be an integer, got 'many'"),
    (_set("walk.steps", True), "walk.steps", "must be an integer, got true"),
    (_set("walk.steps", 2.5), "walk.steps", "must be an integer, got 2.5"),
    (_set("walk.steps", 0), "walk.steps", "must be in [1, 10000000], got 0"),
    (
        _set("walk.restart_probabilty", 0.5),
        "walk.restart_probabilty",
        "unknown field (did you mean 'restart_probability'?)",
    ),
    (_set("featurs", ["walk_score"]), "featurs", "unknown field (did you mean 'features'?)"),
    (
        _set("walk.bias.by", "country"),
        "walk.bias.by",
        "must be one of locale, locale_topic; got 'country'",
    ),
    (_set("walk.bias.strength", 1.2), "walk.bias.strength", "must be in [0, 1], got 1.2"),
    (
        _set("limits.priority", "urgent"),
        "limits.priority",
        "must be one of interactive, batch; got 'urgent'",
    ),
    (_set("walk.early_stopping.pins", 0), "walk.early_stopping.pins", "must be in [1,"),
    (_set("walk", [1, 2]), "walk", "expected a mapping of fields, got a list"),
    (_set("features", ["walk_score", "pin_colour"]), "features", "unknown features ['pin_colour']"),
    (_set("features", ["walk_score", "walk_score"]), "features", "more than once"),
    (_set("features", []), "features", "empty"),
    (_set("features", "walk_score"), "features", "must be a list of feature names"),
    (_set("name", "news_feed"), "name", "must match the file name 'homefeed', got 'news_feed'"),
    (_set("name", 7), "name", "must be text, got 7"),
    (_drop("name"), "name", "required field is missing"),
    (_drop("query.source"), "query.source", "required field is missing"),
    (_set("query.source", "search_query"), "query.source", "must be one of recent_pins"),
    (_set("query.max_pins", 500), "query.max_pins", "exceeds limits.max_query_pins (200)"),
    (
        _set("query.recency_half_life_hours", 0),
        "query.recency_half_life_hours",
        "must be > 0, got 0",
    ),
    (_set("query.action_weights", {}), "query.action_weights", "at least one event type"),
    (
        _set("query.action_weights", {"save": 0.0}),
        "query.action_weights",
        "at least one weight must be > 0",
    ),
    (
        _set("candidates.return", 1500),
        "candidates.return",
        "1500 exceeds candidates.max_return (1000)",
    ),
    (
        _set("candidates.max_return", 3000),
        "candidates.max_return",
        "exceeds candidates.generate (2000)",
    ),
    (_set("candidates.generate", -5), "candidates.generate", "must be in [1, 100000], got -5"),
    (_set("ranker.objective", "multiclass"), "ranker.objective", "must be one of binary"),
    (_set("ranker.learning_rate", float("nan")), "ranker.learning_rate", "got nan"),
    (_set("ranker.max_depth", 40), "ranker.max_depth", "must be in [1, 16], got 40"),
    (_set("ranker.objective", "pairwise"), None, None),  # valid with onnxmltools
    (_set("ranker.subsample", 0), "ranker.subsample", "must be in (0, 1], got 0"),
    (_set("ranker.colsample_bytree", 1.5), "ranker.colsample_bytree", "must be in (0, 1]"),
    (_set("ranker.min_child_weight", -1), "ranker.min_child_weight", "must be >= 0, got -1"),
    (_set("ranker.reg_lambda", "high"), "ranker.reg_lambda", "must be a number, got 'high'"),
    (_set("ranker.reg_alpha", -0.5), "ranker.reg_alpha", "must be >= 0"),
    (_set("ranker.gamma", float("inf")), "ranker.gamma", "got inf"),
    (
        _set("ranker.early_stopping_rounds", 2.5),
        "ranker.early_stopping_rounds",
        "must be an integer, got 2.5",
    ),
    (_set("ranker.early_stopping_rounds", None), None, None),  # null: off
    (
        _set("ranker.min_child_wieght", 5),
        "ranker.min_child_wieght",
        "unknown field (did you mean 'min_child_weight'?)",
    ),
    (
        _set("ranker.search", {"max_dept": [3, 4]}),
        "ranker.search.max_dept",
        "not a ranker setting (did you mean 'max_depth'?)",
    ),
    (
        _set("ranker.search", {"max_depth": [3, 40]}),
        "ranker.search.max_depth[1]",
        "must be in [1, 16], got 40",
    ),
    (
        _set("ranker.search", {"subsample": []}),
        "ranker.search.subsample",
        "must be a non-empty list of values",
    ),
    (
        _set("ranker.search", {"subsample": 0.5}),
        "ranker.search.subsample",
        "must be a non-empty list of values, got 0.5",
    ),
    (_set("ranker.search", {"max_depth": [3, 3]}), "ranker.search.max_depth", "repeats a value"),
    (
        _set(
            "ranker.search",
            {"max_depth": [2, 3, 4, 5], "trees": [10, 20, 30, 40], "gamma": [0, 1, 2, 3, 4]},
        ),
        "ranker.search",
        "80 combinations; at most 64",
    ),
    (_set("labels.strategy", "clicks"), "labels.strategy", "must be one of engagement"),
    (
        _set("labels.strategy", "distillation"),
        "labels.strategy",
        "strategy distillation needs ranker.objective regression, got binary",
    ),
    (
        _set("ranker.objective", "regression"),
        "labels.strategy",
        "strategy blended_funnel needs ranker.objective binary or pairwise, got regression",
    ),
    (_set("labels.weights.save", -1), "labels.weights.save", "must be >= 0, got -1"),
    (_set("labels.weights.Save", 1.0), "labels.weights.Save", "lower-case words"),
    (_set("labels.weights.upvote", 1.0), "labels.weights.upvote", "unknown event type; known"),
    (
        _set("labels.weights.sav", 1.0),
        "labels.weights.sav",
        "unknown event type (did you mean 'save'?)",
    ),
    (
        _set("labels.weights", {"click": 1.0}),
        "labels.weights",
        "strategy blended_funnel needs an impression weight > 0",
    ),
    (
        _set("labels.weights", {"impression": 1.0, "hide": 2.0}),
        "labels.weights",
        "needs at least one action weight > 0",
    ),
    (_set("labels.local_label_weight", 0.5), "labels.local_label_weight", "must be >= 1, got 0.5"),
    (
        _set("labels.negative_sample_rate", 0),
        "labels.negative_sample_rate",
        "must be in (0, 1], got 0",
    ),
    (_set("labels.primary_metric", "recall@50"), "labels.primary_metric", "must be <metric>@<k>"),
    (_set("labels.primary_metric", "ndcg@0"), "labels.primary_metric", "got 0"),
    (
        _set("labels.primary_metric", "ndcg@5000"),
        "labels.primary_metric",
        "k must be in [1, candidates.generate = 2000], got 5000",
    ),
    (_set("logging.sample_rate", 1.2), "logging.sample_rate", "must be in [0, 1], got 1.2"),
    (_set("logging.sample_rate", "all"), "logging.sample_rate", "must be a number, got 'all'"),
    (_set("limits.max_in_flight", 0), "limits.max_in_flight", "must be in [1, 100000], got 0"),
    (
        _set("limits.deadline", 100),
        "limits.deadline",
        "unknown field (did you mean 'deadline_ms'?)",
    ),
]


@pytest.mark.parametrize(("edit", "field", "fragment"), INVALID)
def test_invalid_field_names_file_and_field(tmp_path, edit, field, fragment):
    raw = copy.deepcopy(shipped_raw())
    edit(raw)
    path = write(tmp_path, "homefeed", raw)
    if field is None:
        load_tenant(path)
        return
    message = refusal(path)
    assert message.startswith(f"{path}: {field}: "), message
    assert fragment in message, message


def test_restart_probability_message_is_exact(tmp_path):
    raw = shipped_raw("email")
    raw["walk"]["restart_probability"] = 1.5
    path = write(tmp_path, "email", raw)
    assert refusal(path) == f"{path}: walk.restart_probability: must be in (0, 1], got 1.5"


@pytest.mark.parametrize(
    ("edit", "field", "fragment"),
    [
        (_set("query.max_pins", 3), "query.max_pins", "must be 1 with source viewed_pin, got 3"),
        (
            _set("query.action_weights", {"save": 1.0}),
            "query.action_weights",
            "only used with source recent_pins",
        ),
        (
            _set("ranker.converter", "hummingbird"),
            "ranker.converter",
            "hummingbird converts only objective binary",
        ),
    ],
)
def test_invalid_related_pins_fields(tmp_path, edit, field, fragment):
    raw = shipped_raw("related_pins")
    edit(raw)
    path = write(tmp_path, "related_pins", raw)
    message = refusal(path)
    assert message.startswith(f"{path}: {field}: "), message
    assert fragment in message, message


def test_engagement_needs_no_impression_weight_but_funnel_does(tmp_path):
    raw = shipped_raw("email")
    assert "impression" not in raw["labels"]["weights"]
    assert load_tenant(write(tmp_path, "email", raw)).labels.strategy == "engagement"
    raw["labels"]["strategy"] = "funnel"
    path = write(tmp_path, "email", raw)
    with pytest.raises(ConfigError, match="labels.weights: strategy funnel needs an impression"):
        load_tenant(path)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("name: homefeed\nquery: {source: recent_pins\n", "invalid YAML"),
        ("name: homefeed\n  query: [\n", "line 2, column"),
        ("", "the file is empty"),
        ("# only a comment\n", "the file is empty"),
        ("- homefeed\n- email\n", "top level: expected a mapping of fields, got a list"),
        (
            "name: homefeed\nquery: {source: recent_pins}\nquery: {source: viewed_pin}\n",
            "line 3, column 1: invalid YAML: duplicate key 'query'",
        ),
    ],
)
def test_unreadable_files_name_the_file(tmp_path, text, fragment):
    path = write(tmp_path, "homefeed", text)
    message = refusal(path)
    assert message.startswith(f"{path}: "), message
    assert fragment in message, message


def test_non_utf8_and_missing_files(tmp_path):
    path = tmp_path / "homefeed.yaml"
    path.write_bytes(b"name: home\xfffeed\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_tenant(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_tenant(tmp_path / "absent.yaml")


def test_load_tenants_reports_broken_files_and_loads_the_rest(tmp_path):
    write(tmp_path, "homefeed", shipped_raw("homefeed"))
    write(tmp_path, "related_pins", shipped_raw("related_pins"))
    broken = shipped_raw("email")
    broken["walk"]["restart_probability"] = 1.5
    broken_path = write(tmp_path, "email", broken)
    misnamed = tmp_path / "search.yml"
    misnamed.write_text("name: search\nquery: {source: recent_pins}\n")
    (tmp_path / "README.md").write_text("tenants live here\n")
    (tmp_path / ".#homefeed.yaml").write_text("editor lock file")

    tenant_set = load_tenants(tmp_path)

    assert sorted(tenant_set.configs) == ["homefeed", "related_pins"]
    assert sorted(tenant_set.errors) == sorted([str(broken_path), str(misnamed)])
    assert tenant_set.errors[str(broken_path)] == (
        f"{broken_path}: walk.restart_probability: must be in (0, 1], got 1.5"
    )
    assert "must end in .yaml" in tenant_set.errors[str(misnamed)]


def test_symlinks_leading_out_of_the_directory_are_refused_unread(tmp_path):
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    tenants = tmp_path / "tenants"
    (tenants / "..data").mkdir(parents=True)  # a Kubernetes ConfigMap volume's layout
    write(tenants / "..data", "homefeed", shipped_raw("homefeed"))
    (tenants / "homefeed.yaml").symlink_to("..data/homefeed.yaml")
    (tenants / "leak.yaml").symlink_to(secret)
    (tenants / "around.yaml").symlink_to("../tenants/../passwd")
    (tenants / "loop.yaml").symlink_to("loop.yaml")

    tenant_set = load_tenants(tenants)

    assert sorted(tenant_set.configs) == ["homefeed"]
    assert sorted(Path(p).name for p in tenant_set.errors) == [
        "around.yaml",
        "leak.yaml",
        "loop.yaml",
    ]
    for message in tenant_set.errors.values():
        assert "a symlink to a file outside" in message and "root:" not in message


def test_errors_show_at_most_a_short_prefix_of_the_file(tmp_path):
    passwd_like = "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin\n"
    with pytest.raises(ConfigError, match="got a scalar") as excinfo:
        load_tenant(write(tmp_path, "homefeed", passwd_like))
    assert "root:" not in str(excinfo.value)
    raw = shipped_raw("homefeed")
    raw["ranker"]["objective"] = "y" * 5000
    with pytest.raises(
        ConfigError,
        match=r"ranker\.objective: .*'y{40}'\.\.\. \(5000 "
        r"characters\)",
    ) as excinfo:
        load_tenant(write(tmp_path, "homefeed", raw))
    assert len(str(excinfo.value)) < 300
    (tmp_path / "homefeed.yaml").write_text("# padding\n" * 200_000)
    with pytest.raises(ConfigError, match="larger than 1048576 bytes; not a tenant file"):
        load_tenant(tmp_path / "homefeed.yaml")


def test_load_tenants_needs_an_existing_directory(tmp_path):
    with pytest.raises(ConfigError, match="tenant directory does not exist"):
        load_tenants(tmp_path / "nowhere")
    assert load_tenants(tmp_path).configs == {}
