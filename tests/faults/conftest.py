"""Fixtures for the fault campaign: the end-to-end daemon helpers, shared."""

from __future__ import annotations

from ..e2e.conftest import daemon_factory

__all__ = ["daemon_factory"]
