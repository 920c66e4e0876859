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
from walkrank.events import (
    EVENT_SCHEMA,
    EventLog,
    read_event_file,
    read_events,
    validate_events,
)

T0 = 1_700_000_000  # 2023-11-14 22:13:20 UTC
NOW = 1_700_100_000.0


def test_validation_keeps_good_rows_and_explains_the_rest() -> None:
    accepted, report = validate_events({
        "request_id": ["r1", "r1", " ", "r2", "r2", "r2", "r3", None, "r4"],
        "pin_id": [10, 11, 12, 13, 14, 15, 16, 17, None],
        "event": ["click", " Impression", "save", "like", None, "save", "hide", "save", "save"],
        "timestamp": [T0, None, T0, T0, T0, T0 * 1000, T0 + 7200, T0, T0],
        "score": [0.5, None, 1.0, 2.0, 3.0, 4.0, float("inf"), 1.0, 1.0],
    }, now=NOW)
    assert accepted.schema.equals(EVENT_SCHEMA)
    assert accepted["request_id"].to_pylist() == ["r1", "r1"]
    assert accepted["pin_id"].to_pylist() == ["10", "11"]
    assert accepted["event"].to_pylist() == ["click", "impression"]
    assert [t.timestamp() for t in accepted["timestamp"].to_pylist()] == [T0, NOW]
    assert accepted["score"].to_pylist() == [0.5, None]

    assert report.count == 7
    assert [(r.index, r.reason) for r in report.examples] == [
        (2, "request_id: missing"),
        (3, "event: unknown type 'like' (known: scored, impression, closeup, click, save, "
            "share, hide)"),
        (4, "event: missing"),
        (5, "timestamp: 1700000000000 is not epoch seconds in 1970..2100 (milliseconds?)"),
        (6, "score: inf is not finite"),
        (7, "request_id: missing"),
        (8, "pin_id: missing"),
    ]
    assert report.by_problem == {"missing request_id": 2, "missing pin_id": 1,
                                 "missing event": 1, "unknown event type": 1,
                                 "bad timestamp": 1, "non-finite score": 1}
    assert validate_events(pa.table({"request_id": ["a"] * 30, "pin_id": ["p"] * 30,
                                     "event": ["nope"] * 30}),
                           max_examples=4)[1].lines()[-1] == "... and 26 more"


def test_timestamps_in_every_accepted_form() -> None:
    text = ["2023-11-14T22:13:20Z", "2023-11-14 22:13:20", "2023-11-15T00:13:20+02:00",
            "1700000000", "", "yesterday"]
    accepted, report = validate_events(
        {"request_id": ["r"] * 6, "pin_id": list("abcdef"), "event": ["impression"] * 6,
         "timestamp": text}, now=NOW)
    assert [t.timestamp() for t in accepted["timestamp"].to_pylist()] == [T0] * 4 + [NOW]
    assert [(r.index, r.reason) for r in report.examples] == [
        (5, "timestamp: cannot read 'yesterday' (epoch seconds or ISO 8601)")]

    typed = pa.array([T0 * 1000, None], pa.timestamp("ms", tz="America/New_York"))
    accepted, report = validate_events(
        pa.table({"request_id": ["r", "r"], "pin_id": ["a", "b"], "event": ["save", "save"],
                  "timestamp": typed}), now=NOW)
    assert report.count == 0
    assert [t.timestamp() for t in accepted["timestamp"].to_pylist()] == [T0, NOW]


def test_missing_columns_and_unusable_types_name_the_column() -> None:
    with pytest.raises(DataError, match=r"upload\.csv: missing required column\(s\) event"):
        validate_events({"request_id": ["r"], "pin_id": ["p"]}, source="upload.csv")
    with pytest.raises(DataError, match="column 'pin_id' has type double"):
        validate_events({"request_id": ["r"], "pin_id": [1.5], "event": ["click"]})
    with pytest.raises(DataError, match="cannot read the event columns"):
        validate_events({"request_id": ["r", "s"], "pin_id": ["p"], "event": ["click"]})


def test_event_log_writes_hourly_partitions_and_reads_windows(tmp_path: Path) -> None:
    hours = np.array([0, 0, 1, 3, 3, 3])
    accepted, _ = validate_events({
        "request_id": [f"r{i}" for i in range(6)], "pin_id": ["p"] * 6,
        "event": ["impression"] * 6, "timestamp": T0 + hours * 3600,
        "score": np.linspace(0, 1, 6)})
    log = EventLog(tmp_path)
    assert log.submit(accepted)
    assert log.close()
    partitions = sorted(p.parent.relative_to(tmp_path).as_posix()
                        for p in tmp_path.rglob("part-*.parquet"))
    assert partitions == ["events/date=2023-11-14/hour=22", "events/date=2023-11-14/hour=23",
                          "events/date=2023-11-15/hour=01"]
    assert not list(tmp_path.rglob(".*"))
    everything = read_events(tmp_path)
    assert everything.schema.equals(EVENT_SCHEMA)
    assert sorted(everything["request_id"].to_pylist()) == [f"r{i}" for i in range(6)]
    window = read_events(tmp_path, start=T0 + 3600, end=T0 + 3 * 3600)
    assert window["request_id"].to_pylist() == ["r2"]

    with pytest.raises(DataError, match="takes the accepted table of validate_events"):
        EventLog(tmp_path / "other").submit(pa.table({"request_id": ["r"]}))


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_cli_imports_csv_and_reports_rejections(tmp_path: Path, capsys) -> None:
    source = write_csv(tmp_path / "events.csv", (
        "request_id,pin_id,event,timestamp,score\n"
        "r1,007,impression,1700000000,0.25\n"
        "r1,8,clik,1700000000,\n"
        "r2,9,save,2023-11-14T23:00:00Z,\n"
        "r2,,save,1700000000,abc\n"
    ))
    logs = tmp_path / "logs"
    assert main(["events", "import", str(source), "--logs", str(logs)]) == 0
    out = capsys.readouterr().out
    assert "2 accepted, 2 rejected" in out
    assert "row 2: event: unknown type 'clik'" in out
    assert "row 4: pin_id: missing" in out
    table = read_events(logs).sort_by("request_id")
    assert table["pin_id"].to_pylist() == ["007", "9"]  # ids stay text: no lost zeros
    assert table["score"].to_pylist() == [0.25, None]


def test_cli_imports_parquet(tmp_path: Path, capsys) -> None:
    source = tmp_path / "events.parquet"
    pq.write_table(pa.table({"request_id": ["a", "b", "c"], "pin_id": [1, 2, 3],
                             "event": ["click", "save", "hide"]}), source)
    logs = tmp_path / "logs"
    assert main(["events", "import", str(source), "--logs", str(logs)]) == 0
    assert "3 accepted, 0 rejected" in capsys.readouterr().out
    assert read_events(logs).num_rows == 3


@pytest.mark.parametrize(("name", "content", "message"), [
    ("garbage.parquet", b"this is not parquet", "garbage.parquet: cannot read events"),
    ("ragged.csv", b"request_id,pin_id,event\nr1,1,click,extra\n", "ragged.csv: cannot read"),
    ("noevent.csv", b"request_id,pin_id\nr1,1\n", "noevent.csv: missing required column"),
    ("allbad.csv", b"request_id,pin_id,event\nr1,1,like\n,2,click\n",
     "allbad.csv: no valid event rows \\(2 rejected: row 1: event: unknown type 'like'"),
    ("events.json", b"{}", "events.json: unknown file type"),
])
def test_cli_refuses_unusable_files(tmp_path: Path, capsys, name: str, content: bytes,
                                    message: str) -> None:
    (tmp_path / name).write_bytes(content)
    assert main(["events", "import", str(tmp_path / name), "--logs", str(tmp_path)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "events").exists()


def test_cli_missing_file(tmp_path: Path, capsys) -> None:
    assert main(["events", "import", str(tmp_path / "nope.csv"), "--logs", str(tmp_path)]) == 2
    assert "nope.csv: no such file" in capsys.readouterr().err


def test_csv_reader_keeps_bad_cells_row_local(tmp_path: Path) -> None:
    # A text timestamp among numbers must reject one row, not fail the whole file.
    path = write_csv(tmp_path / "mixed.csv", "request_id,pin_id,event,timestamp\n"
                     "r,1,click,1700000000\nr,2,click,soon\n")
    accepted, report = validate_events(read_event_file(path))
    assert accepted.num_rows == 1 and report.count == 1


def test_cli_logs_default_to_the_server_configs_logs_dir(tmp_path: Path, capsys) -> None:
    config = tmp_path / "walkrank.yaml"
    config.write_text("graph: graph\ntenants_dir: tenants\nmodels_dir: models\n"
                      "logs_dir: var/logs\n")
    source = write_csv(tmp_path / "e.csv", "request_id,pin_id,event\nr1,1,save\n")
    assert main(["events", "import", str(source), "--config", str(config)]) == 0
    assert "1 accepted, 0 rejected" in capsys.readouterr().out
    assert read_events(tmp_path / "var" / "logs").num_rows == 1
