"""Turns WalkRank exceptions into gRPC status codes, in one place for every method."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from walkrank.errors import ConfigError, DataError, ModelError, WalkRankError
from walkrank.serving.errors import RequestError

log = logging.getLogger(__name__)


def status_of(exc: WalkRankError) -> grpc.StatusCode:
    if isinstance(exc, RequestError):
        return grpc.StatusCode[exc.code]
    if isinstance(exc, ModelError | ConfigError | DataError):
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INTERNAL


def _abort(context: grpc.ServicerContext, exc: WalkRankError) -> None:
    code = status_of(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("internal error")
    context.abort(code, str(exc))


def _wrap_unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
    def handler(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return behavior(request, context)
        except WalkRankError as exc:
            _abort(context, exc)

    return handler


def _wrap_stream(behavior: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    def handler(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from behavior(request, context)
        except WalkRankError as exc:
            _abort(context, exc)

    return handler


class ErrorInterceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation: Callable[..., Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=_wrap_unary(handler.unary_unary))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=_wrap_stream(handler.unary_stream))
        return handler
