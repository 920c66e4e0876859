"""grpc.health.v1 with the tenants' statuses behind credentials.

The overall status (service "") stays open: load balancers probe it without keys. A tenant's
status (service = the tenant's name) needs, when auth is on, that tenant's API key or the
admin token, so nobody can list a server's tenants by probing names.
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from walkrank.serving.auth import Authenticator
from walkrank.serving.fields import TENANT_CHARS, check_length

OVERALL = health.OVERALL_HEALTH


class TenantHealth(health.HealthServicer):
    def __init__(self, auth: Authenticator) -> None:
        super().__init__()
        self._auth = auth

    def _authorize(self, service: str, context: grpc.ServicerContext) -> None:
        if service != OVERALL:
            check_length("service", service, TENANT_CHARS)
            self._auth.check_tenant_or_admin(context, service)

    def Check(self, request: health_pb2.HealthCheckRequest,
              context: grpc.ServicerContext) -> health_pb2.HealthCheckResponse:
        self._authorize(request.service, context)
        return super().Check(request, context)

    def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext,
              send_response_callback: Any = None) -> Any:
        self._authorize(request.service, context)
        return super().Watch(request, context, send_response_callback)
