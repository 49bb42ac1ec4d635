"""Per-label bias calibration for classify tasks.

A small model leans towards some labels whatever the input (the Qwen 1.5B leans to 负面). A bias
per label, added to the label log-probabilities before they are compared, corrects that lean.
The bias is fitted on a labelled dev set by maximum likelihood (a softmax over the biased scores;
convex, so plain gradient descent finds the optimum) and stored per model and task in the cache,
keyed by a hash of the task's prompt and labels so that editing the task invalidates it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from allinone.tasks import TaskSpec

log = logging.getLogger(__name__)


@dataclass
class Calibration:
    """A fitted bias per label, for one model and one version of one task."""

    model: str
    task: str
    task_hash: str
    bias: dict[str, float]
    fitted_on: str = ""
    n: int = 0
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    created: float = 0.0

    def apply(self, labels: list[str], logps: list[float]) -> list[float]:
        """Biased scores, in label order."""
        return [lp + self.bias.get(lab, 0.0) for lab, lp in zip(labels, logps, strict=True)]


def task_hash(task: TaskSpec) -> str:
    """Changes whenever anything that shapes the label scores changes."""
    basis = json.dumps(
        {
            "system": task.system,
            "labels": task.labels,
            "examples": [e.model_dump() for e in task.examples],
        },
        ensure_ascii=False,
        sort_keys=True,
    )
    return hashlib.sha256(basis.encode()).hexdigest()[:16]


def calibration_path(cache_dir: Path, model_id: str, task_name: str) -> Path:
    """Where the calibration of ``task_name`` on ``model_id`` is stored."""
    return Path(cache_dir) / "calibration" / model_id / f"{task_name}.json"


def save(cal: Calibration, path: Path) -> Path:
    """Write a calibration file (creating folders)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(cal), ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def load(path: Path, task: TaskSpec) -> Calibration | None:
    """The calibration at ``path`` if it exists and matches the task as it is now."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        cal = Calibration(**data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        log.warning("ignoring unreadable calibration %s: %s", path, exc)
        return None
    if cal.task_hash != task_hash(task) or set(cal.bias) != set(task.labels):
        log.warning(
            "ignoring calibration %s: task %r changed since it was fitted; run "
            "`allinone calibrate` again",
            path,
            task.name,
        )
        return None
    return cal


def fit_bias(logps: np.ndarray, gold: np.ndarray, steps: int = 2000, lr: float = 0.5) -> np.ndarray:
    """Biases b maximising sum_i log softmax(logps_i + b)[gold_i]; the mean bias is 0.

    ``logps``: (n, L) label log-probabilities; ``gold``: (n,) label indices."""
    n, n_labels = logps.shape
    onehot = np.zeros((n, n_labels))
    onehot[np.arange(n), gold] = 1.0
    b = np.zeros(n_labels)
    for _ in range(steps):
        z = logps + b
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        grad = (p - onehot).mean(axis=0)
        b -= lr * grad
        if np.abs(grad).max() < 1e-7:
            break
    return b - b.mean()


def new_calibration(task: TaskSpec, model_id: str, bias: np.ndarray, **info) -> Calibration:
    """Wrap fitted biases for saving."""
    return Calibration(
        model=model_id,
        task=task.name,
        task_hash=task_hash(task),
        bias={lab: float(v) for lab, v in zip(task.labels, bias, strict=True)},
        created=time.time(),
        **info,
    )
