r"""Commonsense accuracy of a base model plus a MixLoRA / LoRA / DoRA adapter.

One process (CPU or one GPU):
    python launch/evaluate.py --base-model path/to/base --adapter runs/tiny/adapter \
        --tasks arc-e,boolq --data-dir data/sample --output results.json --markdown results.md

Data-parallel over ranks (each rank holds a replica and scores every N-th example; rank 0 writes):
    torchrun --standalone --nproc_per_node 8 launch/evaluate.py ...
    deepspeed --num_gpus 8 launch/evaluate.py ...

A base with random weights from a config, drawn as launch/make_base.py draws them (a base saved by
make_base.py and given to --base-model is the same model):
    python launch/evaluate.py --model-config tiny --seed 42 --tokenizer data/tokenizer ...

Scoring is the reference's by default (next-token label logits after "Answer:"; ARC over all nine
labels; BoolQ without its passage; over-long prompts cut at the end). --per-record-labels,
--boolq-passage and --truncation left are the corrected variants (--corrected sets all three).
--scoring label-loglik scores every label by the log-likelihood of all its tokens (exact where a
label is several tokens, e.g. "true" with a small vocabulary or " 1" = "▁", "1" with LLaMA's);
--scoring loglik scores each answer text by its log-likelihood, as lm-eval-style tools do.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from mixlora_ds.eval import (  # noqa: E402
    BUILTIN_TASKS,
    SCORINGS,
    EvalOptions,
    TaskError,
    evaluate_task,
    find_task_file,
    load_task,
    markdown_table,
    results_document,
    write_json,
    write_tensorboard,
)
from mixlora_ds.eval.report import write_text  # noqa: E402
from mixlora_ds.eval.tasks_io import parse_name_path  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model")
    src.add_argument("--base-model", help="local Hugging Face model directory")
    src.add_argument("--model-config", help="instead of --base-model: a preset (tiny, llama2-7b), a config.json or a "
                                            "run YAML's model.config; "
                                            "random weights drawn from --seed")
    src.add_argument("--seed", type=int, default=0, help="seed of the random base weights (--model-config)")
    src.add_argument("--adapter", help="adapter directory (MixLoRA, LoRA or DoRA); none = the base model alone")
    src.add_argument("--tokenizer", help="tokenizer directory (default: the base model or adapter directory)")
    src.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    src.add_argument("--device", default="auto")
    src.add_argument("--no-merge-lora", action="store_true",
                     help="keep LoRA layers separate instead of folding them into the base weights")

    data = p.add_argument_group("tasks")
    data.add_argument("--tasks", default="", help=f"comma-separated, from {', '.join(BUILTIN_TASKS)}")
    data.add_argument("--data-dir", help="directory holding the task files (TASK/SPLIT.jsonl, TASK.SPLIT.jsonl, ...)")
    data.add_argument("--split", default="eval", help="eval (the task's evaluation split), test, validation, train")
    data.add_argument("--task-file", action="append", default=[], metavar="TASK=PATH",
                      help="file of a built-in task (overrides --data-dir for it); repeatable")
    data.add_argument("--custom-task", action="append", default=[], metavar="NAME=PATH",
                      help="a custom multiple-choice JSONL task; repeatable")
    data.add_argument("--limit", type=int, help="first N examples of each task")

    sc = p.add_argument_group("scoring")
    sc.add_argument("--scoring", choices=SCORINGS, default="logits")
    sc.add_argument("--per-record-labels", action="store_true", help="score each record over its own labels (ARC)")
    sc.add_argument("--boolq-passage", action="store_true", help="put BoolQ's passage before the question")
    sc.add_argument("--truncation", choices=("right", "left"), default="right")
    sc.add_argument("--corrected", action="store_true", help="all three corrected variants")
    sc.add_argument("--batch-size", type=int, default=16)
    sc.add_argument("--max-length", type=int, default=512)
    sc.add_argument("--padding-side", choices=("left", "right"), default="left")
    sc.add_argument("--no-expert-profile", action="store_true")

    out = p.add_argument_group("output")
    out.add_argument("--output", help="JSON result file")
    out.add_argument("--markdown", help="markdown table file")
    out.add_argument("--log-dir", help="TensorBoard directory")
    out.add_argument("--step", type=int, default=0, help="TensorBoard step (e.g. the checkpoint's)")
    out.add_argument("--method", help="row name in the table (default: the adapter directory name)")
    out.add_argument("--save-predictions", action="store_true", help="per-example predictions in the JSON")
    out.add_argument("--no-progress", action="store_true",
                     help="no progress bars (neither the evaluation's nor transformers' weight loading)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p


def _init_distributed() -> tuple[int, int]:
    """Join the launcher's process group when there is one (torchrun, deepspeed, srun, mpirun)."""
    from mixlora_ds import dist

    dist.map_launcher_env()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    dist.init_distributed()
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.local_rank())
    return dist.rank(), dist.world_size()


def _load_tasks(args):
    per_record = args.per_record_labels or args.corrected
    passage = args.boolq_passage or args.corrected
    names = list(dict.fromkeys(t.strip() for t in args.tasks.split(",") if t.strip()))
    files = dict(parse_name_path(s, "--task-file") for s in args.task_file)
    unknown = [n for n in list(names) + list(files) if n not in BUILTIN_TASKS]
    if unknown:
        raise TaskError(f"unknown task(s) {unknown}; known tasks: {list(BUILTIN_TASKS)} "
                        "(a custom multiple-choice JSONL goes to --custom-task NAME=PATH)")
    names += [n for n in files if n not in names]
    tasks = []
    for name in names:
        if name in files:
            path = files[name]
        elif args.data_dir:
            path = find_task_file(args.data_dir, name, args.split)
        else:
            raise TaskError(f"task {name!r}: give --data-dir or --task-file {name}=PATH")
        tasks.append(load_task(name, path, per_record_labels=per_record, boolq_passage=passage, limit=args.limit))
    for spec in args.custom_task:
        name, path = parse_name_path(spec, "--custom-task")
        if name in names or any(t.name == name for t in tasks):
            raise TaskError(f"--custom-task {name!r}: the name is already taken by another task")
        tasks.append(load_task(name, path, custom=True, limit=args.limit))
    if not tasks:
        raise TaskError("no tasks: give --tasks, --task-file or --custom-task")
    return tasks


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (args.base_model is None) == (args.model_config is None):
        print("error: give exactly one of --base-model and --model-config", file=sys.stderr)
        return 2
    rank, world = _init_distributed()
    try:
        return _run(args, rank, world)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run(args, rank: int, world: int) -> int:
    try:
        # Tasks first: a typo in a task name should not cost a model load.
        tasks = _load_tasks(args)
        if args.no_progress:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # transformers' bars ("Loading weights") have their own switch
        from mixlora_ds.inference import load_for_inference

        t0 = time.perf_counter()
        model, tokenizer = load_for_inference(
            args.base_model, adapter=args.adapter, model_config=args.model_config, tokenizer=args.tokenizer,
            seed=args.seed, dtype=args.dtype, device=args.device, merge_lora=not args.no_merge_lora,
        )
        load_s = time.perf_counter() - t0
        options = EvalOptions(
            scoring=args.scoring,
            batch_size=args.batch_size,
            max_length=args.max_length,
            truncation="left" if args.corrected else args.truncation,
            padding_side=args.padding_side,
            profile_experts=not args.no_expert_profile,
            progress=not args.no_progress,
        )
        results = []
        t0 = time.perf_counter()
        for task in tasks:
            results.append(evaluate_task(model, tokenizer, task, options, rank=rank, world_size=world))
        eval_s = time.perf_counter() - t0
    except (TaskError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rank != 0:
        return 0

    method = args.method or (Path(args.adapter).name if args.adapter else "base")
    meta = {
        "method": method,
        "base_model": args.base_model,
        "model_config": args.model_config,
        "seed": args.seed if args.model_config else None,
        "adapter": args.adapter,
        "scoring": args.scoring,
        "per_record_labels": args.per_record_labels or args.corrected,
        "boolq_passage": args.boolq_passage or args.corrected,
        "truncation": options.truncation,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "world_size": world,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "load_seconds": round(load_s, 3),
        "eval_seconds": round(eval_s, 3),
        "examples_per_second": round(sum(r.n for r in results) / max(eval_s, 1e-9), 3),
    }
    doc = results_document(results, meta)
    if args.save_predictions:
        for r in results:
            doc["tasks"][r.task]["predictions"] = r.predictions
    table = markdown_table({method: {r.task: r.accuracy for r in results}}, [r.task for r in results])
    if args.output:
        write_json(args.output, doc)
    if args.markdown:
        write_text(args.markdown, table)
    if args.log_dir:
        write_tensorboard(args.log_dir, results, step=args.step)
    print(table, end="")
    for r in results:
        load = r.expert_load
        extra = f", expert-load std {load['share_std_mean']:.4f} (mean over {load['layers']} layers)" if load else ""
        print(f"{r.task}: {r.correct}/{r.n} correct{extra}" + (f", {r.truncated} truncated" if r.truncated else ""))
    return 0


if __name__ == "__main__":
    from mixlora_ds.dist import exit_now

    exit_now(main())
