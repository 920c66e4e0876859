"""The pin–board graph: build (tables -> directory), store (memory-mapped arrays), synthetic."""

from walkrank.graph.store import GraphStore

__all__ = ["GraphStore"]
