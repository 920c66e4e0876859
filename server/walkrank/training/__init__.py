"""Offline training for each tenant: labels from the candidate log and events, then models."""
