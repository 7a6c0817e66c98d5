"""The one error type of a precompute run's settings (its own module: precompute, fleet and indexing
raise it, and precompute imports them)."""

from __future__ import annotations

from storage.errors import UserError


class PrecomputeError(UserError, ValueError):
    """Bad settings for a precompute run: one line, cause and fix."""
