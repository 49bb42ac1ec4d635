"""The task layer: turns task files into prompts for the backend and results for callers.

Nothing here knows which engine runs the model; the CLI and the HTTP API both go through it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from allinone import calibration
from allinone.backends.base import (
    Backend,
    Finished,
    GenerationParams,
    Prompt,
    RequestHandle,
    Segment,
)
from allinone.decisions import Opposites, QuestionPriors
from allinone.serving.errors import InputError
from allinone.tasks import TaskRegistry, TaskSpec

# Chat templates wrap each message in markup (ChatML: <|im_start|>, role, newlines, <|im_end|>);
# history budgets count it per message so a long chat of short turns still fits.
MESSAGE_OVERHEAD_TOKENS = 6


def softmax_labels(labels: list[str], logps: list[float]) -> dict[str, float]:
    """Label log-probabilities normalised into probabilities over the labels (sum 1)."""
    top = max(logps)
    exps = [math.exp(lp - top) for lp in logps]
    total = sum(exps)
    return {lab: e / total for lab, e in zip(labels, exps, strict=True)}


@dataclass
class ClassifyResult:
    """One classified text: the winning label and every label's probability."""

    task: str
    label: str
    scores: dict[str, float]
    latency_ms: float
    prompt_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list[float] = field(default_factory=list)
    calibrated: bool = False
    flagged: bool | None = None
    category: str | None = None

    def to_dict(self) -> dict:
        """The JSON shape used by the CLI and the API (screening fields only when set)."""
        out = {
            "task": self.task,
            "label": self.label,
            "scores": self.scores,
            "latency_ms": round(self.latency_ms, 2),
        }
        if self.flagged is not None:
            out["flagged"] = self.flagged
            if self.category is not None:
                out["category"] = self.category
        return out


@dataclass
class ExtractResult:
    """An extract task's answer: a JSON object whose keys are the task's fields."""

    task: str
    output: dict[str, str]
    latency_ms: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # label fields' probabilities

    def to_dict(self) -> dict:
        """The JSON shape used by the CLI and the API."""
        return {
            "task": self.task,
            "output": self.output,
            "scores": self.scores,
            "latency_ms": round(self.latency_ms, 2),
        }


@dataclass
class ClassifyJob:
    """A submitted classification, waiting for the engine."""

    task: TaskSpec
    handle: RequestHandle
    started: float = field(default_factory=time.perf_counter)


@dataclass
class ChatPlan:
    """A chat request ready for the engine: the prompt, the sampling, and what was dropped."""

    prompt: Prompt
    params: GenerationParams
    dropped_messages: int = 0


def bound_history(
    messages: list[dict[str, str]], budget: int, count: Callable[[str], int]
) -> tuple[list[dict[str, str]], int]:
    """Keep the newest turns whose tokens fit ``budget``; the last message always stays.

    System messages are not counted against the budget and are kept. Returns the kept messages
    and how many were dropped (oldest first). A kept history never starts with an assistant turn.
    """
    system = [m for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    if not turns:
        return messages, 0
    kept = [turns[-1]]
    used = count(_counted_text(turns[-1]))
    for m in reversed(turns[:-1]):
        cost = count(_counted_text(m))
        if used + cost > budget:
            break
        kept.append(m)
        used += cost
    kept.reverse()
    # A kept history starts with a user turn: an assistant reply or a tool result without
    # the turn that asked for it would confuse the model.
    while len(kept) > 1 and kept[0]["role"] in ("assistant", "tool"):
        kept.pop(0)
    return system + kept, len(turns) - len(kept)


def _counted_text(message: dict) -> str:
    """What of a message takes tokens: its text and any tool calls it made."""
    text = message.get("content") or ""
    if message.get("tool_calls"):
        text += json.dumps(message["tool_calls"], ensure_ascii=False)
    return text


class TaskService:
    """Runs tasks on one backend: classification by label scoring, chat by generation."""

    def __init__(
        self,
        backend: Backend,
        tasks: TaskRegistry,
        default_max_tokens: int = 256,
        decision_strategy: dict[str, str] | None = None,
    ):
        self.backend = backend
        # the model's decision strategy per question kind when a request names none
        # ({"*": ..., "predicate": ...}; empty: the server default)
        self.decision_strategy = decision_strategy or {}
        self.tasks = tasks
        self.default_max_tokens = default_max_tokens
        self.calibrations: dict[str, calibration.Calibration] = {}
        # running per-question priors of decisions (the ``+prior`` strategies), per process
        self.decision_priors = QuestionPriors()
        self.decision_opposites = Opposites()  # predicates' opposites (``+contrast``)

    def load_calibrations(self, cache_dir: Path) -> list[str]:
        """Use every stored calibration that matches this model and the tasks as they are now;
        returns the names of the calibrated tasks."""
        for task in self.tasks:
            if task.kind != "classify":
                continue
            path = calibration.calibration_path(cache_dir, self.backend.model_id, task.name)
            cal = calibration.load(path, task)
            if cal is not None:
                self.calibrations[task.name] = cal
        return sorted(self.calibrations)

    # -- classification ----------------------------------------------------------------------
    def classify_prompt(self, task: TaskSpec, text: str) -> Prompt:
        """System prompt and few-shot turns form the cached prefix; the text is the body."""
        messages = [{"role": "system", "content": task.system}]
        for ex in task.examples:
            messages.append({"role": "user", "content": ex.input})
            messages.append({"role": "assistant", "content": ex.output})
        messages.append({"role": "user", "content": task.prepare_input(text)})
        return self.backend.render_chat(messages, n_prefix_messages=len(messages) - 1)

    def classify_task(self, name: str) -> TaskSpec:
        """The classify task called ``name`` (InputError if unknown or not a classifier)."""
        task = self.tasks.get(name)
        if task.kind != "classify":
            raise InputError(f"task {name!r} is a {task.kind} task, not a classifier")
        return task

    def submit_classify(self, task_name: str, text: str) -> ClassifyJob:
        """Validate and queue one text; the job is finished by ``classify_result``."""
        task = self.classify_task(task_name)
        prompt = self.classify_prompt(task, text)
        return ClassifyJob(task, self.backend.score_choices(prompt, task.labels))

    def classify_result(
        self, job: ClassifyJob, finished: Finished, calibrated: bool = True
    ) -> ClassifyResult:
        """Normalise label log-probabilities (biased by the task's calibration, if any and
        ``calibrated``) into probabilities over the labels."""
        raw = list(finished.result)
        cal = self.calibrations.get(job.task.name) if calibrated else None
        logps = cal.apply(job.task.labels, raw) if cal else raw
        scores = softmax_labels(job.task.labels, logps)
        # Ties go to the earlier label, so the answer is deterministic.
        label = job.task.labels[max(range(len(logps)), key=lambda i: (logps[i], -i))]
        return ClassifyResult(
            task=job.task.name,
            label=label,
            scores=scores,
            latency_ms=(time.perf_counter() - job.started) * 1000,
            prompt_tokens=finished.usage.prompt_tokens,
            cached_tokens=finished.usage.cached_tokens,
            logprobs=raw,
            calibrated=cal is not None,
        )

    def submit_many(self, task_name: str, texts: list[str]) -> list[ClassifyJob]:
        """Queue every text, or none: if one is refused, those already queued are cancelled."""
        jobs: list[ClassifyJob] = []
        try:
            for t in texts:
                jobs.append(self.submit_classify(task_name, t))
        except BaseException:
            for j in jobs:
                j.handle.cancel()
            raise
        return jobs

    def _flag(self, task_name: str, results: list[ClassifyResult]) -> list[int]:
        """Mark screening results as flagged; the indices that still need a category."""
        task = self.tasks.get(task_name)
        if task.flag_unless is None:
            return []
        for r in results:
            r.flagged = r.label != task.flag_unless
        return [i for i, r in enumerate(results) if r.flagged and task.category_task]

    def classify(self, task_name: str, texts: list[str]) -> list[ClassifyResult]:
        """Classify texts (all queued at once so the engine can batch them); blocking.
        Flagged texts of a screening task get a category from its category task."""
        jobs = self.submit_many(task_name, texts)
        results = [self.classify_result(j, j.handle.result()) for j in jobs]
        need = self._flag(task_name, results)
        if need:
            cat_task = self.tasks.get(task_name).category_task
            assert cat_task is not None  # _flag finds texts only for tasks that have one
            cats = self.classify(cat_task, [texts[i] for i in need])
            for i, c in zip(need, cats, strict=True):
                results[i].category = c.label
        return results

    async def classify_async(self, task_name: str, texts: list[str]) -> list[ClassifyResult]:
        """Async form of ``classify``; cancels outstanding work if the caller goes away."""
        jobs = self.submit_many(task_name, texts)
        try:
            results = [self.classify_result(j, await j.handle.result_async()) for j in jobs]
        finally:
            for j in jobs:
                j.handle.cancel()  # no-op for finished ones
        need = self._flag(task_name, results)
        if need:
            cat_task = self.tasks.get(task_name).category_task
            assert cat_task is not None  # _flag finds texts only for tasks that have one
            cats = await self.classify_async(cat_task, [texts[i] for i in need])
            for i, c in zip(need, cats, strict=True):
                results[i].category = c.label
        return results

    # -- extraction --------------------------------------------------------------------------
    def extract(self, task_name: str, text: str) -> ExtractResult:
        """Answer an extract task as JSON, one field at a time, so the answer always parses.

        The assistant's reply is written as ``{"field": "`` ...: a text field is generated
        after its opening quote until the model closes it (or its cap), a label field is
        scored like a classification at that point. Values are escaped by ``json.dumps``."""
        steps = self._extract_steps(task_name, text)
        handle = next(steps)
        while True:
            try:
                handle = steps.send(handle.result())
            except StopIteration as done:
                return done.value

    async def extract_async(self, task_name: str, text: str) -> ExtractResult:
        """Async form of ``extract``: no worker thread; if the caller goes away, the field being
        answered is cancelled in the engine and no later field starts."""
        steps = self._extract_steps(task_name, text)
        handle = next(steps)
        try:
            while True:
                fin = await handle.result_async()
                try:
                    handle = steps.send(fin)
                except StopIteration as done:
                    return done.value
        finally:
            handle.cancel()  # no-op once finished

    def _extract_steps(
        self, task_name: str, text: str
    ) -> Generator[RequestHandle, Finished, ExtractResult]:
        """The extraction as a generator: yields each field's engine request, receives its
        Finished, returns the result; ``extract`` and ``extract_async`` drive it."""
        task = self.tasks.get(task_name)
        if task.kind != "extract":
            raise InputError(f"task {task_name!r} is a {task.kind} task, not an extract task")
        started = time.perf_counter()
        messages = [{"role": "system", "content": task.system}]
        for ex in task.examples:
            messages += [
                {"role": "user", "content": ex.input},
                {"role": "assistant", "content": ex.output},
            ]
        messages.append({"role": "user", "content": task.prepare_input(text)})
        base = self.backend.render_chat(messages, n_prefix_messages=len(messages) - 1)
        output: dict[str, str] = {}
        scores: dict[str, dict[str, float]] = {}
        usage_prompt = usage_gen = 0
        for i, fld in enumerate(task.fields):
            # The reply so far, ending just inside the opening quote of this field's value.
            partial = json.dumps(output, ensure_ascii=False)[:-1] if output else "{"
            partial += (", " if output else "") + json.dumps(fld.name) + ': "'
            prompt = Prompt(base.prefix, (*base.body, Segment(partial, special=False)))
            if fld.type == "label":
                fin = yield self.backend.score_choices(prompt, fld.labels)
                value = fld.labels[max(range(len(fld.labels)), key=lambda k: fin.result[k])]
                scores[fld.name] = softmax_labels(fld.labels, list(fin.result))
            else:
                params = GenerationParams(
                    max_tokens=fld.max_tokens, stop=['"', "\n"], max_chars=fld.max_chars
                )
                fin = yield self.backend.generate(prompt, params)
                value = fin.result.strip() if isinstance(fin.result, str) else ""
            output[fld.name] = value
            usage_prompt += fin.usage.prompt_tokens if i == 0 else 0
            usage_gen += fin.usage.completion_tokens
        return ExtractResult(
            task.name,
            output,
            (time.perf_counter() - started) * 1000,
            usage_prompt,
            usage_gen,
            scores,
        )

    # -- chat --------------------------------------------------------------------------------
    def plan_chat(
        self,
        task: TaskSpec | None,
        messages: list[dict[str, str]],
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        seed: int | None = None,
        tools: list[dict] | None = None,
        options: dict[str, Any] | None = None,
    ) -> ChatPlan:
        """Build the prompt and sampling for a chat. With a task: its system prompt (unless the
        caller sent one), its history budget, input limit and reply caps apply. ``tools`` go to
        the chat template; ``options`` are further ``GenerationParams`` fields (logit_bias,
        penalties, grammar, logprobs)."""
        if not messages:
            raise InputError("messages is empty: send at least one user message")
        if messages[-1]["role"] not in ("user", "tool"):
            raise InputError("the last message must come from the user (or be a tool result)")
        messages = [dict(m) for m in messages]
        dropped = 0
        if task is not None and messages[-1]["role"] == "user":
            messages[-1]["content"] = task.prepare_input(messages[-1]["content"])
            if not any(m["role"] == "system" for m in messages):
                messages.insert(0, {"role": "system", "content": task.system})
            cap = task.output.max_tokens
            messages, dropped = bound_history(
                messages, self._history_budget(messages, task.history_tokens, cap), self._cost
            )
            params = GenerationParams(
                max_tokens=min(max_tokens or cap, cap),
                temperature=task.temperature if temperature is None else temperature,
                top_p=top_p,
                stop=list(stop or []),
                max_chars=task.output.max_chars,
                seed=seed,
            )
        else:
            reply = max_tokens or self.default_max_tokens
            budget = self._history_budget(messages, self.backend.context_tokens, reply)
            messages, dropped = bound_history(messages, budget, self._cost)
            params = GenerationParams(
                max_tokens=max_tokens or self.default_max_tokens,
                temperature=0.0 if temperature is None else temperature,
                top_p=top_p,
                stop=list(stop or []),
                seed=seed,
            )
        if options:
            params = dataclasses.replace(params, **options)
        n_prefix = 1 if messages[0]["role"] == "system" and len(messages) > 1 else 0
        if tools:
            n_prefix = 0  # the template writes the tools into the system turn
        prompt = self.backend.render_chat(messages, n_prefix, tools=tools)
        return ChatPlan(prompt, params, dropped)

    def _cost(self, text: str) -> int:
        return self.backend.count_tokens(text) + MESSAGE_OVERHEAD_TOKENS

    def _history_budget(self, messages: list[dict[str, str]], wanted: int, reply: int) -> int:
        """The task's history budget, shrunk so system prompt + history + reply fit a sequence."""
        system = sum(self._cost(m["content"]) for m in messages if m["role"] == "system")
        room = self.backend.context_tokens - system - min(reply, 256) - 2 * MESSAGE_OVERHEAD_TOKENS
        return max(0, min(wanted, room))

    def submit_chat(self, plan: ChatPlan, n: int = 1) -> list[RequestHandle]:
        """Queue a planned chat for ``n`` choices; each handle streams one choice's text."""
        return self.backend.generate_n(plan.prompt, plan.params, n)
