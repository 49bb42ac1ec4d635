"""Find task files: the built-in ones shipped in the package plus any user directory."""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

from pydantic import ValidationError

from allinone.serving.errors import InputError
from allinone.tasks.spec import TaskSpec


def load_task_file(path: Path) -> TaskSpec:
    """Parse and validate one TOML task file; InputError names the file and the problem."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"{path}: cannot read task file: {exc}") from exc
    data.setdefault("name", path.stem)
    try:
        return TaskSpec.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'task'}: {e['msg']}" for e in exc.errors()
        )
        raise InputError(f"{path}: invalid task: {problems}") from exc


class TaskRegistry:
    """All tasks known to a process, by name. User tasks may override built-in ones."""

    def __init__(self, tasks: dict[str, TaskSpec] | None = None) -> None:
        self._tasks: dict[str, TaskSpec] = dict(tasks or {})

    @classmethod
    def load(cls, extra_dirs: list[Path] | None = None) -> TaskRegistry:
        """Built-in tasks, then every ``*.toml`` in each of ``extra_dirs`` (later ones win)."""
        reg = cls()
        builtin = resources.files("allinone.tasks") / "builtin"
        for item in sorted(builtin.iterdir(), key=lambda p: p.name):
            if item.name.endswith(".toml"):
                with resources.as_file(item) as p:
                    reg.add(load_task_file(Path(p)))
        for d in extra_dirs or []:
            d = Path(d).expanduser()
            if not d.is_dir():
                raise InputError(f"tasks directory {d} does not exist")
            for p in sorted(d.glob("*.toml")):
                reg.add(load_task_file(p))
        return reg

    def add(self, task: TaskSpec) -> None:
        """Register (or replace) a task."""
        self._tasks[task.name] = task

    def get(self, name: str) -> TaskSpec:
        """The task called ``name``; InputError lists the known names otherwise."""
        try:
            return self._tasks[name]
        except KeyError:
            raise InputError(
                f"unknown task {name!r}; known tasks: {', '.join(sorted(self._tasks))}",
                param="task",
                not_found=True,
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __iter__(self):
        return iter(sorted(self._tasks.values(), key=lambda t: t.name))

    def __len__(self) -> int:
        return len(self._tasks)
