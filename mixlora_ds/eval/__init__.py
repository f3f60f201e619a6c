"""Commonsense-QA evaluation: accuracy tables and expert-load profiles for MixLoRA, LoRA and DoRA.

    from mixlora_ds.eval import EvalOptions, evaluate_tasks, load_task
    task = load_task("arc-e", "data/arc-e/eval.jsonl")
    [result] = evaluate_tasks(model, tokenizer, [task], EvalOptions(batch_size=16))
    print(result.accuracy, result.expert_load["share_std_mean"])
"""

from mixlora_ds.data.prompt_batch import pad_batch
from mixlora_ds.eval.evaluator import SCORINGS, EvalOptions, TaskResult, evaluate_task, evaluate_tasks
from mixlora_ds.eval.report import markdown_table, results_document, write_json, write_tensorboard
from mixlora_ds.eval.router_profile import ExpertLoadProfiler
from mixlora_ds.eval.scoring import label_token_ids, last_token_logits
from mixlora_ds.eval.tasks_io import (
    BUILTIN_TASKS,
    EvalExample,
    EvalTask,
    TaskError,
    custom_task,
    find_task_file,
    load_task,
)

__all__ = [
    "BUILTIN_TASKS",
    "SCORINGS",
    "EvalExample",
    "EvalOptions",
    "EvalTask",
    "ExpertLoadProfiler",
    "TaskError",
    "TaskResult",
    "custom_task",
    "evaluate_task",
    "evaluate_tasks",
    "find_task_file",
    "label_token_ids",
    "last_token_logits",
    "load_task",
    "markdown_table",
    "pad_batch",
    "results_document",
    "write_json",
    "write_tensorboard",
]
