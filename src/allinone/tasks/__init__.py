"""Tasks are data: a prompt, labels and limits in a TOML file, served by the one loaded model."""

from allinone.tasks.registry import TaskRegistry, load_task_file
from allinone.tasks.spec import Example, TaskError, TaskSpec, UnknownTaskError

__all__ = ["Example", "TaskError", "TaskRegistry", "TaskSpec", "UnknownTaskError", "load_task_file"]
