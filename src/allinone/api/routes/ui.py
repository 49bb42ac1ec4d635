"""The web page (``GET /`` and ``/ui``), its assets (``/ui/assets/...``, shipped in the package,
nothing fetched from the internet) and the two small JSON routes it reads: ``/ui/config``
(whether the API needs a key) and ``/health/history`` (the last hour of memory, queue, active
sequences and rates). All public, like ``/health`` and ``/metrics``: the page asks for an API
key itself when the server requires one and sends it as a bearer token to the /v1 routes."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from allinone import __version__
from allinone.api.state import Server

UI_DIR = Path(__file__).resolve().parent.parent / "ui"

router = APIRouter(tags=["ui"])


@router.get("/", include_in_schema=False)
@router.get("/ui", include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse((UI_DIR / "index.html").read_text(encoding="utf-8"))


@router.get("/ui/config", summary="What the web page needs first: whether a key is required")
async def ui_config(state: Server) -> dict:
    return {
        "auth_required": bool(state.api_keys),
        "model": state.lifecycle.backend.model_id if state.lifecycle.backend is not None else None,
        "version": __version__,
    }


@router.get(
    "/health/history",
    summary="The last hour of RSS, RssAnon + VmSwap, queue depth, active sequences, generated "
    "tokens/s and API requests/s, one point per memory sample (oldest first)",
)
async def health_history(state: Server) -> dict:
    history = state.history
    return history.to_dict() if history is not None else {"points": []}
