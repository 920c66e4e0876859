"""API-key checks: a key names the tenants it may call; admin calls need the admin token.

Header names are shared with the client SDK: `x-api-key`, `x-admin-token` and
`x-walkrank-tenant` (the tenant Envoy admits a call under, `walkrank.envoy`).
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

import grpc

from walkrank.serving.config import AuthConfig
from walkrank.serving.errors import InvalidArgument, PermissionDenied, Unauthenticated, quote

API_KEY_HEADER = "x-api-key"
ADMIN_TOKEN_HEADER = "x-admin-token"
#: The tenant a Recommender call is for (the SDK sends it): Envoy admits the call under that
#: tenant's quota (walkrank.envoy), so it must name the request's tenant.
TENANT_HEADER = "x-walkrank-tenant"


def metadata_value(metadata: Sequence[tuple[str, str]] | None, name: str) -> str | None:
    """The first value of `name` in a call's metadata (a `ServicerContext`'s, or the
    `HandlerCallDetails` an interceptor sees before the call has a context)."""
    for key, value in metadata or ():
        if key == name:
            return value
    return None


def _header(context: grpc.ServicerContext, name: str) -> str | None:
    return metadata_value(context.invocation_metadata(), name)


def check_tenant_header(context: grpc.ServicerContext, tenant: str) -> None:
    """A call's `x-walkrank-tenant` header, when it has one, names its request's tenant:
    Envoy admits the call under that tenant's quota, so a header naming another tenant
    would spend that tenant's quota."""
    header = _header(context, TENANT_HEADER)
    if header is not None and header != tenant:
        raise InvalidArgument(
            TENANT_HEADER,
            f"names tenant {quote(header)} but the request is for {quote(tenant)}",
            reason="tenant_header",
        )


def _matches(candidate: str, secrets: frozenset[str]) -> bool:
    # Constant-time comparison against every key, so timing does not reveal a prefix.
    return any(hmac.compare_digest(candidate.encode(), s.encode()) for s in secrets)


class Authenticator:
    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self._all_keys = (
            frozenset().union(*config.tenant_keys.values()) if config.tenant_keys else frozenset()
        )

    def authenticate(self, context: grpc.ServicerContext) -> None:
        """The call carries a key of some tenant: checked from metadata alone, before the
        request is decoded (which tenant it may call is checked once the request names one)."""
        if not self.config.enabled:
            return
        key = _header(context, API_KEY_HEADER)
        if not key:
            raise Unauthenticated(f"missing {API_KEY_HEADER} metadata")
        if not _matches(key, self._all_keys):
            raise Unauthenticated("unknown API key")

    def check_tenant(self, context: grpc.ServicerContext, tenant: str) -> None:
        if not self.config.enabled:
            return
        key = _header(context, API_KEY_HEADER)
        if not key:
            raise Unauthenticated(f"missing {API_KEY_HEADER} metadata")
        if _matches(key, self.config.tenant_keys.get(tenant, frozenset())):
            return
        if _matches(key, self._all_keys):
            raise PermissionDenied(f"this API key may not call tenant {quote(tenant)}")
        raise Unauthenticated("unknown API key")

    def check_admin(self, context: grpc.ServicerContext) -> None:
        if not self.config.enabled:
            return
        token = _header(context, ADMIN_TOKEN_HEADER)
        if not token:
            raise Unauthenticated(f"admin calls need {ADMIN_TOKEN_HEADER} metadata")
        if not self._is_admin(token):
            raise PermissionDenied("invalid admin token")

    def check_tenant_or_admin(self, context: grpc.ServicerContext, tenant: str) -> None:
        """The tenant's own key, or the admin token (per-tenant health)."""
        if not self.config.enabled:
            return
        token = _header(context, ADMIN_TOKEN_HEADER)
        if token and self._is_admin(token):
            return
        self.check_tenant(context, tenant)

    def _is_admin(self, token: str) -> bool:
        admin = self.config.admin_token
        return admin is not None and admin != "" and _matches(token, frozenset({admin}))
