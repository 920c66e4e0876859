"""Exceptions shared by every layer; the CLI and the gRPC interceptor map them once each."""

from __future__ import annotations


class WalkRankError(Exception):
    """Base of every error WalkRank raises on purpose (never a bug)."""


class DataError(WalkRankError):
    """An input file or table is unusable: the message names the file and the row or column."""


class ConfigError(WalkRankError):
    """A configuration file is invalid: the message names the file and the field."""


class ModelError(WalkRankError):
    """A model cannot be served: corrupt, mismatched features, or failed the validation gate."""
