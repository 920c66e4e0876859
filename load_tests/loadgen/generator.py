"""The built-in load generator: ghz's load model on `grpc.aio`, spread over processes.

Like ghz, `concurrency` workers share one connection per process and call back to back (or
paced so that all workers together send `rps` calls per second); `total` calls, or as many as
fit in `duration`, the calls in flight at its end handled as the config's `duration-stop`
says (close, ghz's default: cut off and counted CANCELLED; wait: awaited; ignore: cut off and
not counted).
Several processes are used because one asyncio loop tops out near one core of Python; each
process takes its share of the workers, calls and rate. Requests without template actions
are serialized once and sent as bytes, responses are not decoded: the generator's own cost is
kept small and measured (`cpu_s`), since it shares the machine with the server.

Configs given together run at the same time (a mixed-tenant run), all starting on one signal.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import queue
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format

from loadgen.ghz_config import GhzConfig, load_ghz_config, render_template
from loadgen.method import MethodSpec, resolve_method
from loadgen.report import Summary, summarize
from walkrank.errors import ConfigError

READY_TIMEOUT_S = 60.0
#: The error message of a call cut off by `duration-stop: close`.
CUT_OFF = "rpc error: code = CANCELLED desc = cut off at the end of the duration (duration-stop)"


@dataclass
class ProcessResult:
    """What one process (or the in-process run) measured for one config."""

    latencies_ms: list[float] = field(default_factory=list)
    codes: list[str] = field(default_factory=list)
    sent_at: list[float] = field(default_factory=list)  # time.monotonic() of each call
    errors: dict[str, int] = field(default_factory=dict)
    messages_received: int = 0
    started: float = 0.0  # time.monotonic(), comparable across processes on one machine
    finished: float = 0.0
    cpu_s: float = 0.0  # user + system CPU of the process during its run


@dataclass(frozen=True)
class RunResult:
    config: GhzConfig
    summary: Summary
    generator_cpu_s: float | None  # None when run in the caller's process
    processes: int
    # Every call: when it was sent (time.monotonic(), comparable across this machine's
    # processes), its latency and its code, for figures over a time window (graph swaps).
    sent_at: np.ndarray = field(default_factory=lambda: np.zeros(0))
    latencies_ms: np.ndarray = field(default_factory=lambda: np.zeros(0))
    codes: tuple[str, ...] = ()


def _share(amount: int, parts: int, index: int) -> int:
    return amount // parts + (1 if index < amount % parts else 0)


def _parse(spec: MethodSpec, text: str, where: str) -> bytes:
    try:
        return json_format.Parse(text, spec.request_class()).SerializeToString()
    except json_format.ParseError as exc:
        raise ConfigError(f"{where}: not a valid {spec.input_name} message: {exc}") from None


class _Requests:
    """Call payloads and metadata per request number, rendered as ghz renders them."""

    def __init__(self, config: GhzConfig, spec: MethodSpec) -> None:
        self.config = config
        self.spec = spec
        self._templated = ["{{" in text for text in config.messages]
        self._fixed = [
            None if templated else _parse(spec, text, f"{config.source}: data[{i}]")
            for i, (text, templated) in enumerate(
                zip(config.messages, self._templated, strict=True)
            )
        ]
        self._metadata_templated = any("{{" in v for v in config.metadata.values())
        self._metadata = tuple(config.metadata.items())

    def template_values(self, worker_id: str, number: int) -> dict[str, Any]:
        now = time.time_ns()
        return {
            "WorkerID": worker_id,
            "RequestNumber": number,
            "FullyQualifiedName": self.config.call,
            "MethodName": self.config.method,
            "ServiceName": self.config.service,
            "InputName": self.spec.input_name,
            "OutputName": self.spec.output_name,
            "IsClientStreaming": "false",
            "IsServerStreaming": "true" if self.spec.server_streaming else "false",
            "Timestamp": datetime.fromtimestamp(now / 1e9, UTC).isoformat(timespec="seconds"),
            "TimestampUnix": now // 10**9,
            "TimestampUnixMilli": now // 10**6,
            "TimestampUnixNano": now,
            "UUID": str(uuid.uuid4()),
        }

    def get(self, worker_id: str, number: int) -> tuple[bytes, tuple[tuple[str, str], ...]]:
        index = number % len(self._fixed)
        payload, metadata = self._fixed[index], self._metadata
        if payload is None or self._metadata_templated:
            values = self.template_values(worker_id, number)
            if payload is None:
                payload = _parse(
                    self.spec,
                    render_template(self.config.messages[index], values),
                    f"{self.config.source}: data[{index}] (request {number})",
                )
            if self._metadata_templated:
                metadata = tuple((k, render_template(v, values)) for k, v in metadata)
        return payload, metadata


async def _run_share(
    config: GhzConfig,
    spec: MethodSpec,
    target: str,
    index: int,
    parts: int,
    start: Callable[[], Any],
) -> ProcessResult:
    """One process's share: its workers, calls and rate, on one channel."""
    concurrency = _share(config.concurrency, parts, index)
    total = None if config.duration_s is not None else _share(config.total, parts, index)
    rate = config.rps * concurrency / config.concurrency if config.rps else None
    requests = _Requests(config, spec)
    result = ProcessResult()
    # ghz spreads the workers evenly over `connections` connections; a local subchannel pool
    # keeps gRPC from folding identical channels into one connection.
    options = [
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    channels = [
        grpc.aio.insecure_channel(target, options=options)
        for _ in range(max(1, _share(config.connections, parts, index)))
    ]
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), READY_TIMEOUT_S)
        calls = [
            channel.unary_stream(spec.path)
            if spec.server_streaming
            else channel.unary_unary(spec.path)
            for channel in channels
        ]
        await start()
        loop_start = time.monotonic()
        deadline = loop_start + config.duration_s if config.duration_s is not None else None
        issued = 0

        async def worker(worker: int) -> None:
            nonlocal issued
            worker_id = f"p{index}w{worker}"
            call = calls[worker % len(calls)]
            while True:
                local = issued
                if (total is not None and local >= total) or (
                    deadline is not None and time.monotonic() >= deadline
                ):
                    return
                issued += 1
                if rate is not None:
                    delay = loop_start + local / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    if deadline is not None and time.monotonic() >= deadline:
                        return
                number = local * parts + index
                payload, metadata = requests.get(worker_id, number)
                sent, sent_at = time.perf_counter(), time.monotonic()
                try:
                    if spec.server_streaming:
                        async for _ in call(payload, timeout=config.timeout_s, metadata=metadata):
                            result.messages_received += 1
                    else:
                        await call(payload, timeout=config.timeout_s, metadata=metadata)
                        result.messages_received += 1
                    code = "OK"
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                    message = f"rpc error: code = {code} desc = {exc.details()}"
                    result.errors[message] = result.errors.get(message, 0) + 1
                except asyncio.CancelledError:  # cut off at the end of the duration
                    if config.duration_stop == "close":
                        result.latencies_ms.append((time.perf_counter() - sent) * 1e3)
                        result.sent_at.append(sent_at)
                        result.codes.append("CANCELLED")
                        result.errors[CUT_OFF] = result.errors.get(CUT_OFF, 0) + 1
                    raise
                result.latencies_ms.append((time.perf_counter() - sent) * 1e3)
                result.sent_at.append(sent_at)
                result.codes.append(code)

        result.started = loop_start
        workers = [asyncio.create_task(worker(w)) for w in range(concurrency)]
        if deadline is not None and config.duration_stop != "wait":
            await asyncio.wait(workers, timeout=max(0.0, deadline - time.monotonic()))
            for task in workers:
                task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        for task in workers:  # a worker's own failure (not the cut-off) is the run's
            if not task.cancelled() and (error := task.exception()) is not None:
                raise error
        result.finished = time.monotonic()
    finally:
        for channel in channels:
            await channel.close()
    return result


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _child(
    config_path: str,
    workdir: str,
    target: str,
    index: int,
    parts: int,
    ready: Any,
    go: Any,
    results: Any,
) -> None:
    """Entry point of one generator process (spawned: no state inherited from the parent)."""
    try:
        config = load_ghz_config(config_path, workdir)
        spec = resolve_method(config, target)
        cpu_at_start = 0.0

        async def start() -> None:
            nonlocal cpu_at_start
            ready.put(index)
            await asyncio.get_running_loop().run_in_executor(None, go.wait)
            cpu_at_start = _cpu_seconds()

        result = asyncio.run(_run_share(config, spec, target, index, parts, start))
        result.cpu_s = _cpu_seconds() - cpu_at_start
        results.put((config_path, index, result, None))
    except BaseException as exc:  # report, so the parent fails with the cause, never hangs
        ready.put(index)
        results.put((config_path, index, None, f"{type(exc).__name__}: {exc}"))


def _combine(config: GhzConfig, parts: list[ProcessResult], processes: int) -> RunResult:
    latencies = np.concatenate([np.asarray(p.latencies_ms) for p in parts])
    codes = [code for p in parts for code in p.codes]
    errors: dict[str, int] = {}
    for part in parts:
        for message, n in part.errors.items():
            errors[message] = errors.get(message, 0) + n
    wall = max(p.finished for p in parts) - min(p.started for p in parts)
    summary = summarize(
        config.label,
        "builtin",
        latencies,
        codes,
        wall,
        errors,
        sum(p.messages_received for p in parts),
        config.tags,
    )
    cpu = sum(p.cpu_s for p in parts) if processes else None
    return RunResult(
        config=config,
        summary=summary,
        generator_cpu_s=cpu,
        processes=processes,
        sent_at=np.concatenate([np.asarray(p.sent_at) for p in parts]),
        latencies_ms=latencies,
        codes=tuple(codes),
    )


def _processes_for(config: GhzConfig, processes: int) -> int:
    return max(1, min(processes, config.concurrency))


def run_load(configs: list[GhzConfig], target: str, processes: int = 2) -> list[RunResult]:
    """Run the configs at the same time against `target` ("host:port").

    `processes`: generator processes per config; 0 runs everything in this process (tests,
    or a server that is not on this machine's cores).
    """
    if not configs:
        raise ValueError("no ghz configs to run")
    if processes == 0:
        return asyncio.run(_run_in_process(configs, target))
    context = mp.get_context("spawn")
    ready, results, go = context.Queue(), context.Queue(), context.Event()
    children = []
    for config in configs:
        parts = _processes_for(config, processes)
        for index in range(parts):
            child = context.Process(
                target=_child,
                args=(
                    str(config.source),
                    str(config.workdir),
                    target,
                    index,
                    parts,
                    ready,
                    go,
                    results,
                ),
                daemon=True,
            )
            child.start()
            children.append(child)
    try:
        for _ in children:
            ready.get(timeout=READY_TIMEOUT_S)
        go.set()
        collected: dict[str, list[ProcessResult]] = {str(c.source): [] for c in configs}
        for _ in children:
            path, index, result, failure = _next_result(results, children)
            if failure is not None:
                raise RuntimeError(f"load generator process {index} for {path} failed: {failure}")
            assert result is not None  # a child sends a result or a failure
            collected[path].append(result)
    finally:
        go.set()
        for child in children:
            child.join(timeout=5)
            if child.is_alive():
                child.terminate()
    return [_combine(c, collected[str(c.source)], _processes_for(c, processes)) for c in configs]


def _next_result(
    results: Any, children: list[Any]
) -> tuple[str, int, ProcessResult | None, str | None]:
    while True:
        try:
            return results.get(timeout=1.0)
        except queue.Empty:
            dead = [c for c in children if c.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(
                    f"load generator process {dead[0].pid} died with exit code {dead[0].exitcode}"
                ) from None


async def _run_in_process(configs: list[GhzConfig], target: str) -> list[RunResult]:
    specs = [await asyncio.to_thread(resolve_method, c, target) for c in configs]
    go = asyncio.Event()
    waiting = 0

    async def start() -> None:
        nonlocal waiting
        waiting += 1
        if waiting == len(configs):
            go.set()
        await go.wait()

    parts = await asyncio.gather(
        *(_run_share(c, s, target, 0, 1, start) for c, s in zip(configs, specs, strict=True))
    )
    # This process may host the server too, so its CPU time is not the generator's own.
    return [_combine(c, [p], 0) for c, p in zip(configs, parts, strict=True)]
