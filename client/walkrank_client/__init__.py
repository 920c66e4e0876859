"""Typed Python client for the WalkRank gRPC API.

`from walkrank_client import WalkRankClient`; the generated messages and stubs are in
`walkrank_client.pb` (`pb.recommender_pb2`, `pb.admin_pb2`, `pb.events_pb2`, and `*_pb2_grpc`),
generated from protos/ by tools/codegen.py (`make stubs`).
"""

from __future__ import annotations

from walkrank_client.client import UserQuery, WalkRankClient, WalkRankClientError

__all__ = ["UserQuery", "WalkRankClient", "WalkRankClientError"]
