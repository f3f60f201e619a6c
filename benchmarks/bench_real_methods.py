"""LoRA, DoRA, MixLoRA and MixDoRA on a real pretrained base, single-task and multi-task: the paper's
table layout (accuracy per task + AVG) plus wall time per epoch, every method with the same steps,
batch and data.

    python launch/make_base.py --smollm2 --out runs/real/base
    python benchmarks/bench_real_methods.py --base runs/real/base --out bench_real.json

The tasks are the project's synthetic sample tasks (mixlora_ds/data/sample_data.py), so the table shows
relative behaviour and speed of the methods on one real model, not the paper's numbers.

Single process, plain PyTorch AdamW (no DeepSpeed), so the same script runs on a CPU or one GPU.
Budgets follow the paper's relation, scaled down: MixLoRA/MixDoRA r=8, 4 experts, top-2 on all
projections; LoRA/DoRA r=32 (about as many trainable parameters). Single-task ("ST") trains one
adapter per task for ``--steps`` steps each; multi-task ("MT") one adapter on all tasks shuffled
together for ``--steps`` x number-of-tasks steps, so both see the same examples. An epoch is one pass
over a task's training examples; wall time per epoch is measured on the multi-task run.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = {
    "LoRA": dict(peft_type="LORA", r=32, lora_alpha=64),
    "DoRA": dict(peft_type="LORA", r=32, lora_alpha=64, use_dora=True),
    "MixLoRA": dict(peft_type="MIXLORA", r=8, lora_alpha=16, num_experts=4, top_k=2),
    "MixDoRA": dict(peft_type="MIXLORA", r=8, lora_alpha=16, num_experts=4, top_k=2, use_dora=True),
}


def encode_examples(tok, task: str, records: list[dict], seq_len: int) -> list[tuple[list[int], int]]:
    """(ids, prompt length) per record: the reference template, the answer and EOS; loss on the answer."""
    from mixlora_ds.data.templates import TASKS

    spec, out = TASKS[task], []
    for rec in records:
        prompt = tok.encode(spec.build_prompt(rec), add_special_tokens=False)
        answer = tok.encode(spec.completion(rec), add_special_tokens=False) + [tok.eos_token_id]
        out.append(((prompt + answer)[:seq_len], len(prompt)))
    return out


def batch_tensors(batch, pad_id: int, device):
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id)
    labels = torch.full((len(batch), width), -100)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (seq, n_prompt) in enumerate(batch):
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, n_prompt : len(seq)] = torch.tensor(seq[n_prompt:])
        mask[i, : len(seq)] = 1
    return ids.to(device), labels.to(device), mask.to(device)


def train_adapter(base_dir, method: str, examples, steps: int, batch_size: int, lr: float, device, dtype,
                  seed: int) -> tuple[torch.nn.Module, float]:
    """A fresh base with the method's adapter, trained ``steps`` steps; returns it and seconds spent."""
    from mixlora_ds import MixLoraConfig, inject_mixlora
    from mixlora_ds.inference import load_base_model
    from mixlora_ds.model.aux_loss import mixlora_aux_loss

    model = load_base_model(base_dir, dtype=dtype, device=device)
    torch.manual_seed(seed)
    inject_mixlora(model, MixLoraConfig(**METHODS[method], lora_dropout=0.05, router_aux_loss_coef=0.001,
                                        target_modules=TARGETS))
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # adapter weights in fp32 (the base may be bf16), as mixed-precision training keeps them
        p.data = p.data.float()
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 20)))
    order = random.Random(seed)
    pool: list = []
    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        if len(pool) < batch_size:
            fresh = list(examples)
            order.shuffle(fresh)
            pool += fresh
        batch, pool = pool[:batch_size], pool[batch_size:]
        ids, labels, mask = batch_tensors(batch, model.config.pad_token_id or 0, device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            loss = out.loss + mixlora_aux_loss(model, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    model.eval()
    return model, seconds


def accuracy(model, tok, data_dir: Path, task: str, limit: int) -> float:
    from mixlora_ds.eval.evaluator import EvalOptions, evaluate_task
    from mixlora_ds.eval.tasks_io import find_task_file, load_task

    task_ = load_task(task, find_task_file(data_dir, task, "eval"), limit=limit)
    res = evaluate_task(model, tok, task_, EvalOptions(progress=False, profile_experts=False))
    return res.accuracy


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="a converted base directory (launch/make_base.py --smollm2)")
    p.add_argument("--tasks", default="boolq,piqa")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--train-size", type=int, default=128, help="training examples per task")
    p.add_argument("--eval-size", type=int, default=64, help="held-out examples per task")
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto: bf16 autocast on GPU, fp32 on CPU")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="bench_real_work", help="where the sample data is written")
    p.add_argument("--out", required=True, help="JSON results; a markdown table goes to stdout")
    args = p.parse_args(argv)

    from mixlora_ds.data.sample_data import write_sample_data
    from mixlora_ds.eval.report import markdown_table
    from mixlora_ds.eval.tasks_io import read_records
    from mixlora_ds.data.tokenizer_io import load_tokenizer
    from mixlora_ds.inference import resolve_device, resolve_dtype
    from mixlora_ds.utils.atomic import atomic_write_text

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    tasks, methods = args.tasks.split(","), args.methods.split(",")
    tok = load_tokenizer(args.base)
    paths = write_sample_data(args.work, train_size=args.train_size, eval_size=args.eval_size, seed=args.seed)
    data = {t: encode_examples(tok, t, [r for _, r in read_records(paths[t]["train"])], args.seq_len) for t in tasks}

    table: dict[str, dict[str, float]] = {}
    runs = []

    def record(row: str, model, trained_on: list[str], seconds: float, steps: int) -> None:
        accs = {t: accuracy(model, tok, Path(args.work), t, args.eval_size) for t in trained_on}
        table.setdefault(row, {}).update(accs)
        epochs = steps * args.batch_size / sum(len(data[t]) for t in trained_on)
        runs.append(dict(row=row, tasks=trained_on, steps=steps, train_seconds=round(seconds, 2),
                         seconds_per_epoch=round(seconds / epochs, 2), accuracy=accs))
        print(f"{row:<12} {','.join(trained_on):<20} {steps:>4} steps {seconds:8.1f} s "
              f"({seconds / epochs:.1f} s/epoch) {accs}", flush=True)

    base = None
    for method in ["base"] + methods:
        if method == "base":
            from mixlora_ds.inference import load_base_model

            base = load_base_model(args.base, dtype=dtype, device=device)
            table["base"] = {t: accuracy(base, tok, Path(args.work), t, args.eval_size) for t in tasks}
            del base
            continue
        for t in tasks:
            model, seconds = train_adapter(args.base, method, data[t], args.steps, args.batch_size, args.lr,
                                           device, dtype, args.seed)
            record(f"{method} (ST)", model, [t], seconds, args.steps)
            del model
        mixed = [ex for t in tasks for ex in data[t]]
        steps = args.steps * len(tasks)
        model, seconds = train_adapter(args.base, method, mixed, steps, args.batch_size, args.lr, device, dtype,
                                       args.seed)
        record(f"{method} (MT)", model, tasks, seconds, steps)
        del model

    meta = dict(base=str(args.base), device=str(device), dtype=str(dtype).replace("torch.", ""),
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                torch=torch.__version__, date=time.strftime("%Y-%m-%d"), args=vars(args))
    atomic_write_text(args.out, json.dumps(dict(meta=meta, table=table, runs=runs), indent=2) + "\n")
    print(markdown_table(table, tasks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
