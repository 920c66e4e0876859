"""grpc.health.v1: Check and Watch, with the tenants' statuses behind credentials.

The overall status (service "") stays open: load balancers probe it without keys. A tenant's
status (service = the tenant's name) needs, when auth is on, that tenant's API key or the
admin token, so nobody can list a server's tenants by probing names.

Not grpc_health's `HealthServicer`: it sends a Watch's responses while holding the lock that
gRPC's polling thread takes to close an ended Watch, and a send waits for that very thread,
so a Watch starting while another ended could wedge the server (every later call waited). Here
the status lock is never held while sending; sends are ordered by a lock of their own, which
the polling thread never takes.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from walkrank.serving.auth import Authenticator
from walkrank.serving.fields import TENANT_CHARS, check_length

OVERALL = ""
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN

Send = Callable[[health_pb2.HealthCheckResponse | None], None]


class TenantHealth(health_pb2_grpc.HealthServicer):
    def __init__(self, auth: Authenticator) -> None:
        self._auth = auth
        self._lock = threading.Lock()  # statuses and watchers; never held while sending
        self._sending = threading.Lock()  # a watcher sees the statuses in the order set
        self._status: dict[str, int] = {OVERALL: SERVING}
        self._watchers: dict[str, set[Send]] = {}
        self._shutting_down = False

    def _authorize(self, service: str, context: grpc.ServicerContext) -> None:
        if service != OVERALL:
            check_length("service", service, TENANT_CHARS)
            self._auth.check_tenant_or_admin(context, service)

    def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        self._authorize(request.service, context)
        with self._lock:
            status = self._status.get(request.service)
        if status is None:
            context.set_code(grpc.StatusCode.NOT_FOUND)
            context.set_details("unknown service")
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=status)

    def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext, send: Send
    ) -> None:
        """The current status now, then every change until the call ends (non-blocking:
        the call holds no thread while it waits)."""
        service = request.service
        self._authorize(service, context)
        with self._sending:
            with self._lock:
                status = self._status.get(service, SERVICE_UNKNOWN)
                self._watchers.setdefault(service, set()).add(send)
            send(health_pb2.HealthCheckResponse(status=status))
        if not context.add_callback(functools.partial(self._closed, service, send)):
            self._closed(service, send)  # it ended before the callback could be added

    Watch.experimental_non_blocking = True  # type: ignore[attr-defined]

    def _closed(self, service: str, send: Send) -> None:
        with self._lock:
            watchers = self._watchers.get(service)
            if watchers is not None:
                watchers.discard(send)
                if not watchers:
                    del self._watchers[service]
        send(None)

    def set(self, service: str, status: int) -> None:
        """Set a service's status and tell its watchers (ignored once shutting down)."""
        with self._sending:
            with self._lock:
                if self._shutting_down:
                    return
                self._status[service] = status
                watchers = list(self._watchers.get(service, ()))
            for send in watchers:
                send(health_pb2.HealthCheckResponse(status=status))

    def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING, for good."""
        with self._lock:
            services = list(self._status)
        for service in services:
            self.set(service, NOT_SERVING)
        with self._lock:
            self._shutting_down = True
