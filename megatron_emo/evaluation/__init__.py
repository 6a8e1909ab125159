"""Task evaluation of EMO models with lm-evaluation-harness.

Offline local tasks from the embedded corpus (``local_tasks``) and lm-eval runs / task
calibration data for EMO models (``harness``).

Nothing here imports megatron; ``lm_eval`` is imported only when a function needs it.
"""

from megatron_emo.evaluation.harness import (
    evaluate_model,
    make_task_manager,
    summarize_results,
    task_calibration_texts,
)
from megatron_emo.evaluation.local_tasks import (
    LOCAL_GROUP,
    build_domain_items,
    local_task_names,
    write_local_tasks,
)

__all__ = ["LOCAL_GROUP", "build_domain_items", "evaluate_model", "local_task_names",
           "make_task_manager", "summarize_results", "task_calibration_texts",
           "write_local_tasks"]
