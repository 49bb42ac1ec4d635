"""Decision routes: OpenAI's ``POST /v1/decisions`` and TypeSafe's ``POST /v1/systemone``.

Both are thin adapters over ``DecisionService`` (one engine request per decision: the input is
evaluated once, each question is a branch). Errors: ``/v1/decisions`` answers with the OpenAI
envelope and a ``param`` path (``questions[2].choices``); ``/v1/systemone`` with TypeSafe's
shapes (422 ``detail[]`` for validation, ``{"detail": {"error_type", "message"}}`` otherwise);
see ``errors.py``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError

from allinone.api.decisions_protocol import (
    ChoiceQuestion,
    DecisionRequest,
    DecisionResponse,
    DecisionUsage,
    FunctionCallItem,
    InputImagePart,
    InputJsonPart,
    InputMessage,
    InputTextPart,
    InputTokensDetails,
    NoulQuestion,
    OutputTextPart,
    PredicateQuestion,
    RefusalPart,
    SOChoiceAnswer,
    SOChoiceQuestion,
    SONoulAnswer,
    SOScoreAnswer,
    SOScoreQuestion,
    SystemOneRequest,
    SystemOneResponse,
    SystemOneUsage,
    TaskDecisionRequest,
    TaskDecisionResponse,
)
from allinone.api.protocol import ClassifyUsage
from allinone.backends.base import PromptTooLongError
from allinone.decisions import (
    DecisionError,
    DecisionResult,
    DecisionService,
    Option,
    Question,
    Strategy,
    choice_texts,
    compact_json,
    openai_answer,
    predicate,
    task_questions,
)
from allinone.errors import InvalidRequestError, NotFoundError, PayloadTooLargeError, to_api_error
from allinone.tasks import TaskError

router = APIRouter(tags=["decisions"])

# Model names a decision request may use besides the served model's id: TypeSafe's SDK sends
# "jev-latest" unless told otherwise (CCS requirement request.model-alias).
MODEL_ALIASES = ("jev-latest", "jev-preview")


def _check_model(state: Any, model: str) -> str:
    served = state.require_service().backend.model_id
    if model not in (served, *MODEL_ALIASES):
        known = ", ".join((served, *MODEL_ALIASES))
        raise NotFoundError(
            f"model {model!r} not found; use one of: {known}", param="model", code="model_not_found"
        )
    return served


def _invalid(route: str, message: str, param: str) -> Exception:
    """A limit or rule broken: 400 with ``param`` on /v1/decisions, a 422 ``detail[]`` entry on
    /v1/systemone."""
    if route == "systemone":
        loc = ("body", *param.replace("]", "").replace("[", ".").split("."))
        return RequestValidationError(
            [{"type": "value_error", "loc": loc, "msg": message, "input": None}]
        )
    return InvalidRequestError(message, param=param)


def _text(value: Any) -> str:
    """A TypeSafe Text (string, object or array) as the model sees it."""
    return value if isinstance(value, str) else compact_json(value)


def _parts(parts: list, where: str) -> str:
    out = []
    for j, part in enumerate(parts):
        if isinstance(part, InputImagePart):
            raise InvalidRequestError(
                "images are not supported: this server runs a text-only model; send text or "
                "input_json parts",
                param=f"{where}[{j}]",
            )
        if isinstance(part, InputJsonPart):
            out.append(compact_json(part.data))
        elif isinstance(part, InputTextPart | OutputTextPart):
            out.append(part.text)
        elif isinstance(part, RefusalPart):
            out.append(part.refusal)
    return "\n".join(out)


def render_input(value: str | list) -> str:
    """OpenAI ``input`` as one text: a string as it is; items in order, one paragraph each
    (messages of roles other than ``user`` prefixed with their role, tool calls and outputs as
    tagged lines), parts of a message joined by newlines, ``input_json`` as compact JSON."""
    if isinstance(value, str):
        return value
    paragraphs, calls = [], set()
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if isinstance(item, InputMessage):
            content = item.content
            text = content if isinstance(content, str) else _parts(content, f"{where}.content")
            paragraphs.append(text if item.role == "user" else f"{item.role}: {text}")
        elif item.type in ("function_call", "custom_tool_call"):
            calls.add(item.call_id)
            args = item.arguments if isinstance(item, FunctionCallItem) else item.input
            paragraphs.append(f"tool call {item.name} ({item.call_id}): {args}")
        else:
            if item.call_id not in calls:
                raise InvalidRequestError(
                    f"{where}: output for call_id {item.call_id!r}, but no earlier tool call "
                    "has that call_id",
                    param=f"{where}.call_id",
                )
            out = item.output
            text = out if isinstance(out, str) else _parts(out, f"{where}.output")
            paragraphs.append(f"tool output ({item.call_id}): {text}")
    return "\n\n".join(paragraphs)


def _openai_questions(body: DecisionRequest, limits: Any) -> list[Question]:
    questions = []
    for i, q in enumerate(body.questions):
        where = f"questions[{i}]"
        instr = q.instructions
        text = instr if isinstance(instr, str) else _parts(instr, f"{where}.instructions")
        if isinstance(q, PredicateQuestion):
            questions.append(predicate(text, q.x_calibration))
        elif isinstance(q, ChoiceQuestion):
            n, most = len(q.choices), limits.decision_max_options
            if not 2 <= n <= most:
                raise InvalidRequestError(
                    f"a choice question needs 2 to {most} choices, got {n} "
                    "(ALLINONE_DECISION_MAX_OPTIONS)",
                    param=f"{where}.choices",
                )
            seen: set[tuple[type, Any]] = set()
            for j, c in enumerate(q.choices):
                key = (type(c.value), c.value)  # "true" and true are different choices
                if key in seen:
                    raise InvalidRequestError(
                        f"each choice must be unique: {compact_json(c.value)} repeats",
                        param=f"{where}.choices[{j}].value",
                    )
                seen.add(key)
            values = tuple(c.value for c in q.choices)
            options = tuple(
                Option(t, c.description)
                for t, c in zip(choice_texts(values), q.choices, strict=True)
            )
            questions.append(Question("choice", text, options, q.x_calibration, values=values))
        else:
            n, most = len(q.levels), limits.decision_max_levels
            if not 2 <= n <= most:
                raise InvalidRequestError(
                    f"a score question needs 2 to {most} levels, got {n} "
                    "(ALLINONE_DECISION_MAX_LEVELS)",
                    param=f"{where}.levels",
                )
            options = tuple(Option(lv.label, lv.description) for lv in q.levels)
            questions.append(Question("score", text, options, q.x_calibration))
    return questions


def _systemone_questions(body: SystemOneRequest, limits: Any) -> list[Question]:
    questions = []
    for qid, q in body.questions.items():
        where = f"questions.{qid}"
        if not qid:
            raise _invalid("systemone", "a question id must be a non-empty string", "questions")
        instr = "" if q.instructions is None else _text(q.instructions)
        if isinstance(q, NoulQuestion):
            crit = q.criteria
            yes = None if crit is None or crit.true is None else _text(crit.true)
            no = None if crit is None or crit.false is None else _text(crit.false)
            if not instr and yes is None and no is None:
                raise _invalid(
                    "systemone",
                    "a noul question needs instructions or a described outcome (criteria)",
                    where,
                )
            questions.append(Question("predicate", instr, (Option("yes", yes), Option("no", no))))
        elif isinstance(q, SOChoiceQuestion):
            most = limits.decision_max_options
            if len(q.criteria) > most:
                raise _invalid(
                    "systemone",
                    f"a choice question has at most {most} options, got {len(q.criteria)} "
                    "(ALLINONE_DECISION_MAX_OPTIONS)",
                    f"{where}.criteria",
                )
            options = tuple(
                Option(name, None if d is None else _text(d)) for name, d in q.criteria.items()
            )
            questions.append(Question("choice", instr, options))
        elif isinstance(q, SOScoreQuestion):
            most = limits.decision_max_levels
            if len(q.criteria) > most:
                raise _invalid(
                    "systemone",
                    f"a score question has 2 to {most} levels, got {len(q.criteria)} "
                    "(ALLINONE_DECISION_MAX_LEVELS)",
                    f"{where}.criteria",
                )
            questions.append(Question("score", instr, tuple(Option(_text(c)) for c in q.criteria)))
        else:
            raise _invalid(
                "systemone",
                "box questions need a vision model; this server runs a text-only model",
                f"{where}.type",
            )
    return questions


async def _decide(
    request: Request,
    route: str,
    text: str,
    questions: list[Question],
    strategy: str | None = None,
) -> DecisionResult:
    """Check the limits, run the decision under the route's timeout and cancellation.
    ``strategy``: the request's ``x_strategy`` (None: the server's default)."""
    state = request.app.state.server
    limits = state.settings.server
    try:
        parsed = Strategy.parse(strategy) if strategy is not None else None
        service = DecisionService(state.require_service(), parsed)
    except DecisionError as exc:
        raise _invalid(route, str(exc), "x_strategy") from exc
    n, most = len(questions), limits.decision_max_questions
    if not 1 <= n <= most:
        raise _invalid(
            route,
            f"send 1 to {most} questions per request, got {n} (ALLINONE_DECISION_MAX_QUESTIONS)",
            "questions",
        )
    budget = limits.decision_max_prompt_tokens
    tokens = service.count_tokens(text, questions)
    if tokens > budget:
        raise PayloadTooLargeError(
            f"the input and questions take {tokens} tokens; at most {budget} per request "
            "(ALLINONE_DECISION_MAX_PROMPT_TOKENS): send fewer or shorter questions",
            param="questions",
            code="request_too_large",
        )
    try:
        result = await state.bounded(
            service.decide_async(text, questions), "the decision", request=request
        )
    except DecisionError as exc:
        raise _invalid(route, str(exc), exc.param or "questions") from exc
    except (ValueError, TaskError, PromptTooLongError) as exc:
        raise _invalid(route, str(exc), "input" if route == "decisions" else "state") from exc
    state.metrics.decisions.labels(route).inc()
    for q in questions:
        state.metrics.decision_questions.labels(q.kind).inc()
    return result


@router.post(
    "/v1/decisions",
    response_model=DecisionResponse,
    summary="OpenAI Decisions API: predicate, choice and score questions about one input",
)
async def decisions(body: DecisionRequest, request: Request) -> DecisionResponse:
    state = request.app.state.server
    served = _check_model(state, body.model)
    questions = _openai_questions(body, state.settings.server)
    result = await _decide(
        request, "decisions", render_input(body.input), questions, body.x_strategy
    )
    answers = [
        openai_answer(q.name, a) for q, a in zip(body.questions, result.answers, strict=True)
    ]
    usage = DecisionUsage(
        input_tokens=result.input_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=result.cached_tokens),
        total_tokens=result.input_tokens,
    )
    return DecisionResponse.model_validate({"answers": answers, "model": served, "usage": usage})


@router.post(
    "/v1/decide",
    response_model=TaskDecisionResponse,
    summary="Run a decide task: its named questions about one input, answered together",
)
async def decide_task(body: TaskDecisionRequest, request: Request) -> TaskDecisionResponse:
    state = request.app.state.server
    request.state.task = body.task
    service = state.require_service()
    try:
        task = service.tasks.get(body.task)
        if task.kind != "decide":
            raise TaskError(f"task {body.task!r} is a {task.kind} task, not a decide task")
        text = task.prepare_input(body.input)
    except TaskError as exc:
        raise to_api_error(exc, param=getattr(exc, "param", None) or "task") from exc
    questions = task_questions(task)
    result = await _decide(request, "decide", text, questions)
    return TaskDecisionResponse(
        task=task.name,
        model=service.backend.model_id,
        answers={
            tq.name: openai_answer(tq.name, a)
            for tq, a in zip(task.questions, result.answers, strict=True)
        },
        usage=ClassifyUsage(prompt_tokens=result.input_tokens, cached_tokens=result.cached_tokens),
        latency_ms=round(result.latency_ms, 2),
    )


@router.post(
    "/v1/systemone",
    response_model=SystemOneResponse,
    summary="TypeSafe System One API: noul, choice and score questions keyed by id",
)
async def systemone(body: SystemOneRequest, request: Request) -> SystemOneResponse:
    state = request.app.state.server
    served = _check_model(state, body.model)
    if body.assets:
        raise _invalid(
            "systemone",
            "assets (images) need a vision model; this server runs a text-only model",
            "assets",
        )
    questions = _systemone_questions(body, state.settings.server)
    result = await _decide(request, "systemone", _text(body.state), questions, body.x_strategy)
    answers: dict[str, SONoulAnswer | SOChoiceAnswer | SOScoreAnswer] = {}
    for (qid, q), a in zip(body.questions.items(), result.answers, strict=True):
        mass = round(a.label_mass, 6)
        if isinstance(q, NoulQuestion):
            answers[qid] = SONoulAnswer(
                noul=a.probability_true, x_label_mass=mass, x_strategy=a.strategy
            )
        elif isinstance(q, SOChoiceQuestion):
            names = list(q.criteria)
            answers[qid] = SOChoiceAnswer(
                choice=names[a.top],
                probabilities=dict(zip(names, a.probabilities, strict=True)),
                confidence=a.confidence,
                x_label_mass=mass,
                x_strategy=a.strategy,
            )
        else:
            assert isinstance(q, SOScoreQuestion)
            answers[qid] = SOScoreAnswer(
                score=a.score,
                legend={str(i): c for i, c in enumerate(q.criteria)},
                probabilities={str(i): p for i, p in enumerate(a.probabilities)},
                confidence=a.confidence,
                x_label_mass=mass,
                x_strategy=a.strategy,
            )
    return SystemOneResponse(
        model=served, answers=answers, usage=SystemOneUsage(input_tokens=result.input_tokens)
    )
