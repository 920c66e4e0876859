"""Pixie random walks: candidate generation from a request's query pins."""

from walkrank.walks.engine import WalkParams, WalkResult, step_budgets, walk

__all__ = ["WalkParams", "WalkResult", "step_budgets", "walk"]
