"""Typed Python client for the WalkRank gRPC API."""
