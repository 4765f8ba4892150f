"""Serving: an OpenAI-compatible HTTP server with per-request routing, live skill acquisition, Prometheus
metrics, API keys for mutations and JSON logs. ``dylora serve DIR`` runs it; ``create_app`` builds it.

Names are imported on first use, so ``dylora`` commands other than ``serve`` do not load the web stack.
"""

from __future__ import annotations

import importlib

_NAMES = {"create_app": "app", "ROUTING_HEADER": "app", "ServerConfig": "config", "API_KEY_ENV": "config",
          "BackgroundServer": "server", "ServedSystem": "system", "SystemFiles": "system"}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
