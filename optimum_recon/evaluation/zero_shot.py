"""Zero-shot accuracy with EleutherAI's lm-evaluation-harness, run on the model in memory.

The harness is given the live model object (`HFLM(pretrained=model, tokenizer=...)`), never a path: a path would
make it reload the dense checkpoint, and an offloaded or freshly pruned model has no other copy of its weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Sequence

from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

# The seven zero-shot tasks of the reconstruction paper (and of SparseGPT and Wanda), as lm-eval names them.
PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


@dataclass
class TaskResult:
    """One task's metrics (``acc``, ``acc_norm`` and their ``_stderr`` when the task defines them).

    Attributes:
        task: The lm-eval task name.
        metrics: Metric name to value, lm-eval's ``",none"`` filter suffix removed.
        num_samples: How many documents were scored (after ``limit``).
    """

    task: str
    metrics: dict[str, float] = field(default_factory=dict)
    num_samples: int = 0

    @property
    def accuracy(self) -> float | None:
        """Plain accuracy (``acc``), the number the paper's tables report; ``None`` for tasks without it."""
        return self.metrics.get("acc")


def require_lm_eval() -> None:
    """Raise a clear `ImportError` when lm-eval is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "zero-shot evaluation uses EleutherAI's lm-evaluation-harness, which is not installed: "
            "pip install 'optimum-recon[eval]'"
        ) from err


def parse_tasks(tasks: str | Iterable[str] | None) -> list[str]:
    """``"boolq,rte"`` or a list, with ``paper`` expanding to the paper's seven tasks; duplicates dropped."""
    if tasks is None:
        return []
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names: list[str] = []
    for item in (i.strip() for i in items):
        for name in PAPER_TASKS if item == "paper" else (item,):
            if name and name not in names:
                names.append(name)
    return names


def _task_manager(include_path: str | os.PathLike | Sequence[str | os.PathLike] | None):
    from lm_eval.tasks import TaskManager

    if include_path is None:
        return TaskManager()
    paths = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"include_path {str(path)!r} does not exist: pass a folder of lm-eval task YAMLs.")
    return TaskManager(include_path=[str(p) for p in paths])


def evaluate_zero_shot(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: str | Iterable[str] = PAPER_TASKS,
    *,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    seed: int = 0,
) -> dict[str, TaskResult]:
    """Score ``model`` on lm-eval tasks (zero-shot unless ``num_fewshot``), on the weights it holds now.

    Args:
        model: A `transformers` causal LM, pruned or not, possibly dispatched with accelerate.
        tokenizer: Its tokenizer.
        tasks: lm-eval task names, comma-separated or a list; ``"paper"`` stands for the paper's seven.
        limit: Score only the first ``limit`` documents of each task (a fraction when < 1): quick, not comparable
            to published numbers.
        num_fewshot: Few-shot examples per prompt (default: each task's own setting, 0 for the paper's tasks).
        batch_size: Requests per forward pass.
        include_path: Folder(s) of extra task YAMLs (custom or local tasks).
        seed: Seed for lm-eval's sampling of documents and few-shot examples.

    Returns:
        Task name to `TaskResult`, including the sub-tasks of a task group.

    Raises:
        ImportError: When lm-eval is not installed.
        ValueError: For an unknown task name (with the closest known names).

    Example:
        ```python
        >>> from optimum_recon.evaluation.zero_shot import evaluate_zero_shot
        >>> results = evaluate_zero_shot(model, tokenizer, "arc_easy,boolq", limit=200)
        >>> results["arc_easy"].accuracy
        ```
    """
    require_lm_eval()
    import difflib

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    names = parse_tasks(tasks)
    if not names:
        raise ValueError("no task given: pass lm-eval task names such as 'boolq,arc_easy' (or 'paper').")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    manager = _task_manager(include_path)
    known = set(manager.all_tasks)
    unknown = [t for t in names if t not in known]
    if unknown:
        hints = {t: difflib.get_close_matches(t, known, n=3) for t in unknown}
        raise ValueError("unknown lm-eval task(s): " + "; ".join(
            f"{t!r}" + (f" (did you mean {', '.join(map(repr, h))}?)" if h else "") for t, h in hints.items()))
    was_training = model.training
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        output = simple_evaluate(model=lm, tasks=names, limit=limit, num_fewshot=num_fewshot, task_manager=manager,
                                 log_samples=False, random_seed=seed, numpy_random_seed=seed,
                                 torch_random_seed=seed, fewshot_random_seed=seed)
    finally:
        model.train(was_training)
    samples = (output or {}).get("n-samples", {})
    results = {}
    for task, values in (output or {}).get("results", {}).items():
        metrics = {}
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if filt == "none" and isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[metric] = float(value)
        count = samples.get(task, {})
        results[task] = TaskResult(task, metrics, int(count.get("effective", count.get("original", 0)) or 0))
    return results
