"""Nothing accepted is lost silently, through a real server: a killed candidate-log writer is
noticed, replaced and its unwritten rows counted, and the requests after it are logged."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from test_server import busy_pins, make_config, running

from walkrank.graph.store import GraphStore
from walkrank.logs.candidates import read_candidates


def test_a_killed_log_writer_is_replaced_and_later_requests_are_logged(
    tmp_path: Path, small_graph: GraphStore
) -> None:
    config = make_config(tmp_path, small_graph)
    query = busy_pins(small_graph, 6)
    with running(config) as (server, client):
        assert server.candidate_log.flush(timeout=60)  # the writer is up
        before = [client.recommend("homefeed", query[i : i + 1]) for i in range(3)]
        first = server.candidate_log.pid
        os.kill(first, signal.SIGKILL)
        start, tick = time.monotonic(), threading.Event()
        while server.candidate_log.pid == first:
            assert time.monotonic() - start < 1.0, "the dead writer was not replaced in 1 s"
            tick.wait(0.002)
        after = [client.recommend("homefeed", query[i : i + 1]) for i in range(3, 6)]
    assert not Path(f"/proc/{first}").exists()  # reaped, not a zombie

    logged = read_candidates(config.logs_dir, "homefeed")
    written = set(logged["request_id"].to_pylist())
    assert all(answer.request_id in written for answer in after)
    # The first requests were still in the dead writer's hands: lost, and counted so.
    lost = server.metrics.registry.get_sample_value(
        "walkrank_log_dropped_rows_total", {"log": "candidates", "reason": "writer_died"}
    )
    generated = sum(a.candidates_generated for a in before + after)
    assert lost == sum(a.candidates_generated for a in before) > 0
    assert logged.num_rows + lost == generated
