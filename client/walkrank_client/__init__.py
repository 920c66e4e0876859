"""Typed Python client for the WalkRank gRPC API.

`from walkrank_client import WalkRankClient`; the generated messages and stubs are in
`walkrank_client.pb` (`pb.recommender_pb2`, `pb.admin_pb2`, `pb.events_pb2`, and `*_pb2_grpc`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from walkrank_client.client import UserQuery, WalkRankClient, WalkRankClientError

__all__ = ["UserQuery", "WalkRankClient", "WalkRankClientError"]


def __getattr__(name: str) -> Any:
    # Imported lazily: `python -m walkrank_client.codegen` must run even when the stubs that
    # the client imports are missing or broken, since it is what regenerates them.
    if name in __all__:
        from walkrank_client import client

        return getattr(client, name)
    raise AttributeError(f"module 'walkrank_client' has no attribute {name!r}")
