"""A request's ``model``: the served model's id, or a task's name."""

from __future__ import annotations

from allinone.service import TaskService
from allinone.serving.errors import InputError
from allinone.tasks import TaskSpec


def resolve_model(
    service: TaskService,
    model: str,
    tasks: bool = True,
    aliases: tuple[str, ...] = (),
    param: str = "model",
) -> TaskSpec | None:
    """None for the served model's id (or one of ``aliases``), the task for a task's name
    (with ``tasks``); otherwise InputError (404 ``model_not_found``) listing the names this
    route answers to."""
    if model == service.backend.model_id or model in aliases:
        return None
    if tasks and model in service.tasks:
        return service.tasks.get(model)
    names = (t.name for t in service.tasks) if tasks else ()
    known = [service.backend.model_id, *aliases, *names]
    raise InputError(
        f"model {model!r} not found; use one of: {', '.join(known)}",
        param=param,
        not_found=True,
        code="model_not_found",
    )
