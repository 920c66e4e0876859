"""The request boundary: every call of every service (Recommender, Admin, health, reflection)
is decoded here, its credentials checked first, and WalkRank exceptions turned into gRPC
status codes, in one place.

gRPC would run a handler's request deserializer itself, on its polling thread, and answer a
message that does not parse (random bytes, a string field that is not UTF-8) with INTERNAL
"Exception deserializing request!" and a logged traceback per call. The boundary registers
the handlers without a deserializer (gRPC hands over the bytes) and parses in the handler
instead, so an undecodable request is what it is, the client's error: INVALID_ARGUMENT with
one line naming the message type and the problem. Client errors are never logged; they are
counted in `walkrank_client_errors_total{tenant,reason}` (tenant "unknown" until the request
names a tenant the server has).

A call over its tenant's quota is refused before any of that (`Shed`): the tenant its
`x-walkrank-tenant` header names (the SDK and Envoy send it) is checked against the tenant's
in-flight count as gRPC's polling thread hands the call over, and a call of a full tenant is
given a handler that reads nothing: it checks the credentials (the key must be one that may
call that tenant) and refuses RESOURCE_EXHAUSTED, on a thread of its own (`REFUSAL_THREADS`),
so refusals neither wait behind served calls for a worker thread nor add runnable threads
that queue for the GIL. A call that passes that check is checked again, on its worker
thread, before it is decoded. The header only ever earns a refusal: an admitted call's
request must name the header's tenant (`walkrank.serving.auth.check_tenant_header`), and the
request's tenant is what it is admitted under, with its key checked against it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError

from walkrank.errors import ConfigError, DataError, ModelError, WalkRankError
from walkrank.serving.auth import TENANT_HEADER, metadata_value
from walkrank.serving.errors import InvalidArgument, RequestError
from walkrank.serving.metrics import ServerMetrics
from walkrank.serving.workers import FrontDoor

log = logging.getLogger(__name__)

#: The tenant a call is for, once it named one the server has: the client-error metric's
#: label. gRPC runs every call in a fresh `contextvars.Context`, so it never leaks.
CALL_TENANT: ContextVar[str] = ContextVar("walkrank_call_tenant", default="unknown")
#: Status details are sent in a trailer: one line, at most this long.
MAX_DETAILS_CHARS = 512

#: A check on the call's metadata (credentials) run before its message is decoded.
Guard = Callable[[grpc.ServicerContext], None]
#: Given the tenant a call's header names, the refusal to end it with when that tenant has no
#: free in-flight slot (it raises: PermissionDenied for a key that may not call the tenant,
#: else QuotaExceeded, counted as the tenant's); None when it has one or is no tenant.
Shed = Callable[[str], Callable[[grpc.ServicerContext], NoReturn] | None]
#: Threads that send the early refusals. Each refusal is short and never waits, so one is
#: enough; more would only queue for the GIL beside the served calls.
REFUSAL_THREADS = 1


def status_of(exc: WalkRankError) -> grpc.StatusCode:
    if isinstance(exc, RequestError):
        return grpc.StatusCode[exc.code]
    if isinstance(exc, ModelError | ConfigError | DataError):
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INTERNAL


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= MAX_DETAILS_CHARS else line[: MAX_DETAILS_CHARS - 1] + "…"


def _decoder(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    """Parse a request's bytes; InvalidArgument (reason "undecodable") when they do not."""
    if deserializer is None:
        return lambda data: data
    message_type = getattr(deserializer, "__self__", None)
    name = getattr(getattr(message_type, "DESCRIPTOR", None), "full_name", "request message")

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as exc:
            # upb says e.g. "Error parsing message with type 'X': String field had bad UTF-8".
            problem = str(exc).rpartition("': ")[2] or "unparseable"
            raise InvalidArgument(
                "request",
                f"not a valid {name} ({len(data)} bytes): {problem}",
                reason="undecodable",
            ) from None

    return decode


def _no_guard(context: grpc.ServicerContext) -> None:
    """Services without a guard check credentials (if at all) once they read the message."""


def _like(wrapper: Callable[..., Any], behavior: Callable[..., Any]) -> Callable[..., Any]:
    # gRPC reads these off the behavior (health's Watch is non-blocking, for one).
    for name in ("experimental_non_blocking", "experimental_thread_pool"):
        if hasattr(behavior, name):
            setattr(wrapper, name, getattr(behavior, name))
    return wrapper


class RequestBoundary(grpc.ServerInterceptor):
    """Wraps each method's handler once (cached by method) with guard, decode, the front
    door and errors.

    `guards` maps a service's full name (`walkrank.v1.Admin`) to a check of the call's
    metadata run before anything else, so a call without credentials costs no decoding.
    `shed` maps a method's full name (`/walkrank.v1.Recommender/Recommend`) to the quota
    check of the tenant its header names (module docstring), run before the guard's call is
    even given a worker thread. Calls with one request message then go through `door`
    (`walkrank.serving.workers`) in the lane `lane` names for their message; streaming
    requests (reflection) bypass it.
    """

    def __init__(
        self,
        metrics: ServerMetrics,
        guards: Mapping[str, Guard] | None = None,
        door: FrontDoor | None = None,
        lane: Callable[[Any], str] = lambda message: "",
        shed: Mapping[str, Shed] | None = None,
    ) -> None:
        self._metrics = metrics
        self._guards = dict(guards or {})
        self._door = door
        self._lane = lane
        self._shed = dict(shed or {})
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}
        self._refusals = futures.ThreadPoolExecutor(REFUSAL_THREADS, "walkrank-refusal")

    def close(self) -> None:
        """Stop the refusal thread (once the server has stopped taking calls)."""
        self._refusals.shutdown(wait=False)

    @contextmanager
    def _inside(self, message: Any) -> Iterator[None]:
        if self._door is None:
            yield
        else:
            with self._door.through(self._lane(message)):
                yield

    def intercept_service(
        self, continuation: Callable[..., Any], handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        shed = self._shed.get(method)
        if shed is not None:
            tenant = metadata_value(handler_call_details.invocation_metadata, TENANT_HEADER)
            refusal = shed(tenant) if tenant is not None else None
            if refusal is not None:
                return self._refusal(method, refusal)
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, self._wrap(method, handler))
            self._wrapped[method] = cached
        return cached[1]

    def fail(self, context: grpc.ServicerContext, exc: WalkRankError) -> NoReturn:  # type: ignore[misc]
        """End the call with `exc`'s status; client errors are counted, internal ones logged."""
        code = status_of(exc)
        if code is grpc.StatusCode.INTERNAL:
            log.exception("internal error")
        elif isinstance(exc, RequestError):
            self._metrics.client_errors.labels(CALL_TENANT.get(), exc.reason).inc()
        context.abort(code, _one_line(str(exc)))

    def _guard(self, method: str) -> Guard:
        return self._guards.get(method.lstrip("/").rpartition("/")[0], _no_guard)

    def _refusal(
        self, method: str, refusal: Callable[[grpc.ServicerContext], NoReturn]
    ) -> grpc.RpcMethodHandler:
        """A handler that ends the call with `refusal` once its credentials pass, on the
        refusal thread. It is a client-streaming handler whatever the method (the wire does
        not say): gRPC then never reads the request, where a unary one would first wait for
        the message to arrive."""
        check, fail = self._guard(method), self.fail

        def refuse(requests: Iterator[bytes], context: grpc.ServicerContext) -> NoReturn:
            try:
                check(context)
                refusal(context)
            except WalkRankError as exc:
                fail(context, exc)

        refuse.experimental_thread_pool = self._refusals  # type: ignore[attr-defined]
        return grpc.stream_unary_rpc_method_handler(refuse)

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        guard = self._guard(method)
        shed = self._shed.get(method)
        if shed is None:
            check = guard
        else:

            def check(context: grpc.ServicerContext) -> None:
                """The guard, then the quota check again: the tenant may have filled up
                since the polling thread looked."""
                guard(context)
                tenant = metadata_value(context.invocation_metadata(), TENANT_HEADER)
                refusal = shed(tenant) if tenant is not None else None
                if refusal is not None:
                    refusal(context)

        decode = _decoder(handler.request_deserializer)
        fail = self.fail
        inside = self._inside

        def returning(behavior: Callable[..., Any]) -> Callable[..., Any]:
            """The wrapper of a one-request behavior that returns its answer: a unary one, or
            a non-blocking stream (which takes a callback after the context)."""

            def call(request: bytes, context: grpc.ServicerContext, *callback: Any) -> Any:
                try:
                    check(context)
                    message = decode(request)
                    with inside(message):
                        return behavior(message, context, *callback)
                except WalkRankError as exc:
                    fail(context, exc)

            return _like(call, behavior)

        if handler.unary_unary is not None:
            return handler._replace(
                unary_unary=returning(handler.unary_unary), request_deserializer=None
            )
        if handler.unary_stream is not None:
            stream = handler.unary_stream
            if getattr(stream, "experimental_non_blocking", False):
                return handler._replace(unary_stream=returning(stream), request_deserializer=None)

            def unary_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[Any]:
                try:
                    check(context)
                    message = decode(request)
                    with inside(message):
                        yield from stream(message, context)
                except WalkRankError as exc:
                    fail(context, exc)

            return handler._replace(
                unary_stream=_like(unary_stream, stream), request_deserializer=None
            )
        if handler.stream_unary is not None:
            client_stream = handler.stream_unary

            def stream_unary(requests: Iterator[bytes], context: grpc.ServicerContext) -> Any:
                try:
                    check(context)
                    return client_stream(map(decode, requests), context)
                except WalkRankError as exc:
                    fail(context, exc)

            return handler._replace(
                stream_unary=_like(stream_unary, client_stream), request_deserializer=None
            )
        both = handler.stream_stream

        def stream_stream(
            requests: Iterator[bytes], context: grpc.ServicerContext
        ) -> Iterator[Any]:
            try:
                check(context)
                yield from both(map(decode, requests), context)
            except WalkRankError as exc:
                fail(context, exc)

        return handler._replace(stream_stream=_like(stream_stream, both), request_deserializer=None)
