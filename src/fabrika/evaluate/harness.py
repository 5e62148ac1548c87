"""Standard benchmarks through lm-evaluation-harness, used as a library on an HF model directory.

Tasks are lm-eval's own names (hellaswag, arc_easy, mmlu, ...) or tasks defined in YAML files under
`include_path`, which is also how a team evaluates on its own data offline. The numbers are lm-eval's
(metric, value, stderr per task), folded into the evaluate stage's results.json.
"""

from __future__ import annotations

import math
from typing import Any

from fabrika.errors import FabrikaError


def run_harness(model_dir: str, tasks: list[str], include_path: str | None = None, limit: int | float | None = None,
                num_fewshot: int | None = None, batch_size: int = 8, device: str | None = None) -> dict[str, Any]:
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise FabrikaError("standard benchmarks need lm-eval: pip install 'lm-eval>=0.4.8'") from None
    import torch

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise FabrikaError(f"evaluate.harness.tasks: unknown task(s) {', '.join(unknown)} (lm-eval knows "
                           f"{len(manager.all_tasks)} tasks; custom ones need include_path)")
    results = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": model_dir, "dtype": "float32" if not torch.cuda.is_available() else "auto"},
        tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
        device=device or ("cuda" if torch.cuda.is_available() else "cpu"), log_samples=False)
    out: dict[str, Any] = {}
    for task, metrics in results["results"].items():
        row = {}
        for key, value in metrics.items():
            if key == "alias" or not isinstance(value, (int, float)):
                continue
            name, _, _filter = key.partition(",")
            if isinstance(value, float) and math.isnan(value):
                value = None
            row[name] = value
        out[task] = row
    return out
