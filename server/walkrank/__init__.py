"""WalkRank: Pixie random-walk candidate generation with per-tenant lightweight ranking."""

__version__ = "0.1.0"
