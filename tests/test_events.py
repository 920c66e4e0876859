"""Events (labels): row-level validation, the hourly event log, and `walkrank events import`."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from walkrank.cli import main
from walkrank.errors import DataError
from walkrank.logs.events import (
    EVENT_SCHEMA,
    EventLog,
    RequestOwners,
    read_event_file,
    read_events,
    validate_events,
)

T0 = 1_700_000_000  # 2023-11-14 22:13:20 UTC
NOW = 1_700_100_000.0


def test_validation_keeps_good_rows_and_explains_the_rest() -> None:
    accepted, report = validate_events(
        {
            "request_id": ["r1", "r1", " ", "r2", "r2", "r2", "r3", None, "r4"],
            "pin_id": [10, 11, 12, 13, 14, 15, 16, 17, None],
            "event": ["click", " Impression", "save", "like", None, "save", "hide", "save", "save"],
            "timestamp": [T0, None, T0, T0, T0, T0 * 1000, T0 + 7200, T0, T0],
            "score": [0.5, None, 1.0, 2.0, 3.0, 4.0, float("inf"), 1.0, 1.0],
        },
        tenant="home",
        now=NOW,
    )
    assert accepted.schema.equals(EVENT_SCHEMA)
    assert accepted["tenant"].to_pylist() == ["home", "home"]
    assert accepted["request_id"].to_pylist() == ["r1", "r1"]
    assert accepted["pin_id"].to_pylist() == ["10", "11"]
    assert accepted["event"].to_pylist() == ["click", "impression"]
    assert [t.timestamp() for t in accepted["timestamp"].to_pylist()] == [T0, NOW]
    assert accepted["score"].to_pylist() == [0.5, None]

    assert report.count == 7
    assert [(r.index, r.reason) for r in report.examples] == [
        (2, "request_id: missing"),
        (
            3,
            "event: unknown type 'like' (known: scored, impression, closeup, click, save, "
            "share, hide)",
        ),
        (4, "event: missing"),
        (5, "timestamp: 1700000000000 is not epoch seconds in 1970..2100 (milliseconds?)"),
        (6, "score: inf is not finite"),
        (7, "request_id: missing"),
        (8, "pin_id: missing"),
    ]
    assert report.by_problem == {
        "missing request_id": 2,
        "missing pin_id": 1,
        "missing event": 1,
        "unknown event type": 1,
        "bad timestamp": 1,
        "non-finite score": 1,
    }
    assert (
        validate_events(
            pa.table({"request_id": ["a"] * 30, "pin_id": ["p"] * 30, "event": ["nope"] * 30}),
            tenant="home",
            max_examples=4,
        )[1].lines()[-1]
        == "... and 26 more"
    )


def test_timestamps_in_every_accepted_form() -> None:
    text = [
        "2023-11-14T22:13:20Z",
        "2023-11-14 22:13:20",
        "2023-11-15T00:13:20+02:00",
        "1700000000",
        "",
        "yesterday",
    ]
    accepted, report = validate_events(
        {
            "request_id": ["r"] * 6,
            "pin_id": list("abcdef"),
            "event": ["impression"] * 6,
            "timestamp": text,
        },
        tenant="home",
        now=NOW,
    )
    assert [t.timestamp() for t in accepted["timestamp"].to_pylist()] == [T0] * 4 + [NOW]
    assert [(r.index, r.reason) for r in report.examples] == [
        (5, "timestamp: cannot read 'yesterday' (epoch seconds or ISO 8601)")
    ]

    typed = pa.array([T0 * 1000, None], pa.timestamp("ms", tz="America/New_York"))
    accepted, report = validate_events(
        pa.table(
            {
                "request_id": ["r", "r"],
                "pin_id": ["a", "b"],
                "event": ["save", "save"],
                "timestamp": typed,
            }
        ),
        tenant="home",
        now=NOW,
    )
    assert report.count == 0
    assert [t.timestamp() for t in accepted["timestamp"].to_pylist()] == [T0, NOW]


def test_missing_columns_and_unusable_types_name_the_column() -> None:
    with pytest.raises(DataError, match=r"upload\.csv: missing required column\(s\) event"):
        validate_events({"request_id": ["r"], "pin_id": ["p"]}, tenant="home", source="upload.csv")
    with pytest.raises(DataError, match="column 'pin_id' has type double"):
        validate_events({"request_id": ["r"], "pin_id": [1.5], "event": ["click"]}, tenant="home")
    with pytest.raises(DataError, match="cannot read the event columns"):
        validate_events(
            {"request_id": ["r", "s"], "pin_id": ["p"], "event": ["click"]}, tenant="home"
        )
    with pytest.raises(DataError, match="upload.csv: no tenant: name the tenant"):
        validate_events(
            {"request_id": ["r"], "pin_id": ["p"], "event": ["click"]}, source="upload.csv"
        )
    with pytest.raises(DataError, match="'../x' is not a tenant name"):
        validate_events({"request_id": ["r"], "pin_id": ["p"], "event": ["click"]}, tenant="../x")


def test_event_log_writes_tenant_and_hourly_partitions_and_reads_windows(tmp_path: Path) -> None:
    hours = np.array([0, 0, 1, 3, 3, 3])
    accepted, _ = validate_events(
        {
            "tenant": ["home", "mail", "home", "home", "mail", "home"],
            "request_id": [f"r{i}" for i in range(6)],
            "pin_id": ["p"] * 6,
            "event": ["impression"] * 6,
            "timestamp": T0 + hours * 3600,
            "score": np.linspace(0, 1, 6),
        }
    )
    log = EventLog(tmp_path)
    assert log.submit(accepted)
    assert log.close()
    partitions = sorted(
        p.parent.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("part-*.parquet")
    )
    assert partitions == [
        "events/tenant=home/date=2023-11-14/hour=22",
        "events/tenant=home/date=2023-11-14/hour=23",
        "events/tenant=home/date=2023-11-15/hour=01",
        "events/tenant=mail/date=2023-11-14/hour=22",
        "events/tenant=mail/date=2023-11-15/hour=01",
    ]
    assert not list(tmp_path.rglob(".*"))
    everything = read_events(tmp_path)
    assert everything.schema.equals(EVENT_SCHEMA)
    assert sorted(
        zip(everything["request_id"].to_pylist(), everything["tenant"].to_pylist(), strict=True)
    ) == [
        ("r0", "home"),
        ("r1", "mail"),
        ("r2", "home"),
        ("r3", "home"),
        ("r4", "mail"),
        ("r5", "home"),
    ]
    window = read_events(tmp_path, start=T0 + 3600, end=T0 + 3 * 3600)
    assert window["request_id"].to_pylist() == ["r2"]
    assert sorted(read_events(tmp_path, tenant="mail")["request_id"].to_pylist()) == ["r1", "r4"]

    with pytest.raises(DataError, match="takes the accepted table of validate_events"):
        EventLog(tmp_path / "other").submit(pa.table({"request_id": ["r"]}))


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_cli_imports_csv_and_reports_rejections(tmp_path: Path, capsys) -> None:
    source = write_csv(
        tmp_path / "events.csv",
        (
            "request_id,pin_id,event,timestamp,score\n"
            "r1,007,impression,1700000000,0.25\n"
            "r1,8,clik,1700000000,\n"
            "r2,9,save,2023-11-14T23:00:00Z,\n"
            "r2,,save,1700000000,abc\n"
        ),
    )
    logs = tmp_path / "logs"
    assert main(["events", "import", str(source), "--logs", str(logs), "--tenant", "home"]) == 0
    out = capsys.readouterr().out
    assert "2 accepted, 2 rejected" in out
    assert "row 2: event: unknown type 'clik'" in out
    assert "row 4: pin_id: missing" in out
    table = read_events(logs).sort_by("request_id")
    assert table["pin_id"].to_pylist() == ["007", "9"]  # ids stay text: no lost zeros
    assert table["score"].to_pylist() == [0.25, None]


def test_cli_imports_parquet(tmp_path: Path, capsys) -> None:
    source = tmp_path / "events.parquet"
    pq.write_table(
        pa.table(
            {"request_id": ["a", "b", "c"], "pin_id": [1, 2, 3], "event": ["click", "save", "hide"]}
        ),
        source,
    )
    logs = tmp_path / "logs"
    assert main(["events", "import", str(source), "--logs", str(logs), "--tenant", "home"]) == 0
    assert "3 accepted, 0 rejected" in capsys.readouterr().out
    assert read_events(logs).num_rows == 3


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("garbage.parquet", b"this is not parquet", "garbage.parquet: cannot read events"),
        ("ragged.csv", b"request_id,pin_id,event\nr1,1,click,extra\n", "ragged.csv: cannot read"),
        ("noevent.csv", b"request_id,pin_id\nr1,1\n", "noevent.csv: missing required column"),
        (
            "allbad.csv",
            b"request_id,pin_id,event\nr1,1,like\n,2,click\n",
            "allbad.csv: no valid event rows \\(2 rejected: row 1: event: unknown type 'like'",
        ),
        ("events.json", b"{}", "events.json: unknown file type"),
    ],
)
def test_cli_refuses_unusable_files(
    tmp_path: Path, capsys, name: str, content: bytes, message: str
) -> None:
    (tmp_path / name).write_bytes(content)
    assert (
        main(
            ["events", "import", str(tmp_path / name), "--logs", str(tmp_path), "--tenant", "home"]
        )
        == 2
    )
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "events").exists()


def test_cli_missing_file(tmp_path: Path, capsys) -> None:
    assert main(["events", "import", str(tmp_path / "nope.csv"), "--logs", str(tmp_path)]) == 2
    assert "nope.csv: no such file" in capsys.readouterr().err


def test_csv_reader_keeps_bad_cells_row_local(tmp_path: Path) -> None:
    # A text timestamp among numbers must reject one row, not fail the whole file.
    path = write_csv(
        tmp_path / "mixed.csv",
        "request_id,pin_id,event,timestamp\nr,1,click,1700000000\nr,2,click,soon\n",
    )
    accepted, report = validate_events(read_event_file(path), tenant="home")
    assert accepted.num_rows == 1 and report.count == 1


def test_cli_logs_default_to_the_server_configs_logs_dir(tmp_path: Path, capsys) -> None:
    config = tmp_path / "walkrank.yaml"
    config.write_text(
        "graph: graph\ntenants_dir: tenants\nmodels_dir: models\nlogs_dir: var/logs\n"
    )
    source = write_csv(tmp_path / "e.csv", "request_id,pin_id,event\nr1,1,save\n")
    assert main(["events", "import", str(source), "--config", str(config), "--tenant", "home"]) == 0
    assert "1 accepted, 0 rejected" in capsys.readouterr().out
    assert read_events(tmp_path / "var" / "logs").num_rows == 1


def test_cli_takes_the_tenant_from_the_file_or_the_command_line(tmp_path: Path, capsys) -> None:
    source = write_csv(
        tmp_path / "events.csv",
        (
            "tenant,request_id,pin_id,event\n"
            "home,r1,1,click\n"
            "mail,r2,2,save\n"
            ",r3,3,save\n"
            "../etc,r4,4,save\n"
        ),
    )
    logs = tmp_path / "logs"
    assert main(["events", "import", str(source), "--logs", str(logs)]) == 0
    out = capsys.readouterr().out
    assert "2 accepted, 2 rejected" in out and "row 3: tenant: missing" in out
    assert "row 4: tenant: '../etc' is not a tenant name" in out
    assert main(["events", "import", str(source), "--logs", str(logs), "--tenant", "mail"]) == 0
    out = capsys.readouterr().out
    assert "2 accepted, 2 rejected" in out
    assert "row 1: tenant: 'home', not 'mail' (the tenant these events are for)" in out
    table = read_events(logs)
    assert sorted(
        zip(table["tenant"].to_pylist(), table["request_id"].to_pylist(), strict=True)
    ) == [("home", "r1"), ("mail", "r2"), ("mail", "r2"), ("mail", "r3")]

    plain = write_csv(tmp_path / "plain.csv", "request_id,pin_id,event\nr1,1,click\n")
    assert main(["events", "import", str(plain), "--logs", str(logs)]) == 2
    assert "plain.csv: no tenant: name the tenant the events belong to" in capsys.readouterr().err


def test_event_files_from_before_tenants_are_still_read(tmp_path: Path) -> None:
    """Files written under events/date=.../hour=... with no tenant read with a null tenant,
    and label any tenant's candidates by request id, as they did when written."""
    legacy = tmp_path / "events" / "date=2023-11-14" / "hour=22"
    legacy.mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "request_id": ["old"],
                "pin_id": ["7"],
                "event": ["click"],
                "timestamp": pa.array([T0 * 1_000_000], pa.timestamp("us", tz="UTC")),
                "score": pa.array([None], pa.float64()),
            }
        ),
        legacy / "part-old.parquet",
    )
    accepted, _ = validate_events(
        {"request_id": ["new"], "pin_id": ["8"], "event": ["save"], "timestamp": [T0]},
        tenant="mail",
    )
    log = EventLog(tmp_path)
    assert log.submit(accepted) and log.close()

    everything = read_events(tmp_path).sort_by("request_id")
    assert everything.schema.equals(EVENT_SCHEMA)
    assert everything["tenant"].to_pylist() == ["mail", None]
    assert read_events(tmp_path, tenant="home")["request_id"].to_pylist() == ["old"]
    assert sorted(read_events(tmp_path, tenant="mail")["request_id"].to_pylist()) == ["new", "old"]


def test_request_owners_refuse_only_ids_known_for_other_tenants() -> None:
    owners = RequestOwners(3)
    owners.add("a", "home")
    owners.add("b", "mail")
    owners.add("b", "home")  # two tenants may use the same id
    owners.add("c", "home")
    ids, tenants = ["a", "b", "c", "never", None], ["mail"] * 5
    assert owners.foreign(ids, tenants).tolist() == [True, False, True, False, False]
    owners.add("d", "home")  # the oldest ("a") is forgotten: its events are accepted
    assert owners.foreign(["a", "d"], ["mail", "mail"]).tolist() == [False, True]
    accepted, report = validate_events(
        {"request_id": ["d", "b"], "pin_id": ["1", "2"], "event": ["click", "click"]},
        tenant="mail",
        owners=owners,
    )
    assert accepted["request_id"].to_pylist() == ["b"]
    assert [(r.index, r.reason) for r in report.examples] == [
        (0, "request_id: unknown request_id for this tenant")
    ]
    assert RequestOwners(0).foreign(["a"], ["mail"]).tolist() == [False]
    with pytest.raises(DataError, match="must be >= 0"):
        RequestOwners(-1)
