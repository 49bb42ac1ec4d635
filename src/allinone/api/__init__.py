"""The HTTP API: OpenAI-compatible chat, task endpoints, health and readiness."""

from allinone.api.app import create_app

__all__ = ["create_app"]
