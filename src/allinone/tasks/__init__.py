"""Tasks are data: a prompt, labels and limits in a TOML file, served by the one loaded model."""

from allinone.serving.errors import InputError
from allinone.tasks.registry import TaskRegistry, load_task_file
from allinone.tasks.spec import Example, TaskSpec

__all__ = ["Example", "InputError", "TaskRegistry", "TaskSpec", "load_task_file"]
