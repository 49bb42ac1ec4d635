"""The HTTP API: routes per wire format over ``allinone.serving``; ``create_app`` builds it.

``create_app`` is imported on first use, so the serving layer may import this package's
protocol modules without building the app."""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from allinone.api.app import create_app

        return create_app
    raise AttributeError(name)
