"""Decision serving: OpenAI's decisions (``/v1/decisions``), decide tasks (``/v1/decide``)
and TypeSafe's System One (``/v1/systemone``), each an adapter from its wire request to
questions for ``DecisionService`` (one engine request per decision: the input is evaluated
once, each question is a branch) and back. Errors are ``InputError`` naming the field as the
wire format writes it; each route's error dialect gives them their shape."""

from __future__ import annotations

from typing import Any

from fastapi import Request

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
from allinone.decisions import (
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
from allinone.errors import PayloadTooLargeError
from allinone.serving.errors import InputError
from allinone.serving.models import resolve_model
from allinone.serving.scope import RequestScope

# Model names a decision request may use besides the served model's id: TypeSafe's SDK sends
# "jev-latest" unless told otherwise (CCS requirement request.model-alias).
MODEL_ALIASES = ("jev-latest", "jev-preview")


def _text(value: Any) -> str:
    """A TypeSafe Text (string, object or array) as the model sees it."""
    return value if isinstance(value, str) else compact_json(value)


def _parts(parts: list, where: str) -> str:
    out = []
    for j, part in enumerate(parts):
        if isinstance(part, InputImagePart):
            raise InputError(
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
                raise InputError(
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
                raise InputError(
                    f"a choice question needs 2 to {most} choices, got {n} "
                    "(ALLINONE_DECISION_MAX_OPTIONS)",
                    param=f"{where}.choices",
                )
            seen: set[tuple[type, Any]] = set()
            for j, c in enumerate(q.choices):
                key = (type(c.value), c.value)  # "true" and true are different choices
                if key in seen:
                    raise InputError(
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
                raise InputError(
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
            raise InputError("a question id must be a non-empty string", "questions")
        instr = "" if q.instructions is None else _text(q.instructions)
        if isinstance(q, NoulQuestion):
            crit = q.criteria
            yes = None if crit is None or crit.true is None else _text(crit.true)
            no = None if crit is None or crit.false is None else _text(crit.false)
            if not instr and yes is None and no is None:
                raise InputError(
                    "a noul question needs instructions or a described outcome (criteria)",
                    where,
                )
            questions.append(Question("predicate", instr, (Option("yes", yes), Option("no", no))))
        elif isinstance(q, SOChoiceQuestion):
            most = limits.decision_max_options
            if len(q.criteria) > most:
                raise InputError(
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
                raise InputError(
                    f"a score question has 2 to {most} levels, got {len(q.criteria)} "
                    "(ALLINONE_DECISION_MAX_LEVELS)",
                    f"{where}.criteria",
                )
            questions.append(Question("score", instr, tuple(Option(_text(c)) for c in q.criteria)))
        else:
            raise InputError(
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
    """Check the limits, run the decision within the request's bounds (``RequestScope``).
    ``route``: the metrics label; ``strategy``: the request's ``x_strategy`` (None: the
    server's default)."""
    state = request.app.state.server
    limits = state.settings.server
    parsed = Strategy.parse(strategy) if strategy is not None else None
    service = DecisionService(state.admission.require_service(), parsed)
    n, most = len(questions), limits.decision_max_questions
    if not 1 <= n <= most:
        raise InputError(
            f"send 1 to {most} questions per request, got {n} (ALLINONE_DECISION_MAX_QUESTIONS)",
            param="questions",
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
    scope = RequestScope(state, request, "the decision")
    result = await scope.run(service.decide_async(text, questions))
    state.metrics.decisions.labels(route).inc()
    for q in questions:
        state.metrics.decision_questions.labels(q.kind).inc()
    return result


async def openai_decisions(body: DecisionRequest, request: Request) -> DecisionResponse:
    """OpenAI's decisions: ``input`` (a string or items) and typed questions, answers in order."""
    request.state.input_param = "input"
    service = request.app.state.server.admission.require_service()
    resolve_model(service, body.model, tasks=False, aliases=MODEL_ALIASES)
    questions = _openai_questions(body, request.app.state.server.settings.server)
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
    served = service.backend.model_id
    return DecisionResponse.model_validate({"answers": answers, "model": served, "usage": usage})


async def task_decision(body: TaskDecisionRequest, request: Request) -> TaskDecisionResponse:
    """A decide task: its named questions about ``input``."""
    request.state.task = body.task
    request.state.input_param = "input"
    service = request.app.state.server.admission.require_service()
    task = service.tasks.get(body.task)
    if task.kind != "decide":
        raise InputError(f"task {body.task!r} is a {task.kind} task, not a decide task", "task")
    text = task.prepare_input(body.input)
    result = await _decide(request, "decide", text, task_questions(task))
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


async def systemone(body: SystemOneRequest, request: Request) -> SystemOneResponse:
    """TypeSafe's System One: questions keyed by id about ``state``."""
    request.state.input_param = "state"
    state = request.app.state.server
    service = state.admission.require_service()
    resolve_model(service, body.model, tasks=False, aliases=MODEL_ALIASES)
    if body.assets:
        raise InputError(
            "assets (images) need a vision model; this server runs a text-only model", "assets"
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
        model=service.backend.model_id,
        answers=answers,
        usage=SystemOneUsage(input_tokens=result.input_tokens),
    )
