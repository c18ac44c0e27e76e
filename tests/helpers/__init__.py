"""Shared test helpers (random checkpoints, ...)."""
