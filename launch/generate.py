r"""Generate text with a base model plus a MixLoRA / LoRA / DoRA adapter (KV cache; bf16 on GPU).

    python launch/generate.py --base-model path/to/base --adapter runs/tiny/adapter \
        --prompt "Please answer the following question with true or false: is water wet?\nAnswer:"
    python launch/generate.py --base-model ... --adapter ... --prompts-file prompts.txt --output out.jsonl
    python launch/generate.py ... --sample --temperature 0.8 --top-p 0.95 --seed 1

--prompt may be repeated; "\n" in it is a newline. --prompts-file holds one prompt per line, or JSONL
records with a "prompt" field (a .jsonl file). Greedy decoding unless --sample. --chat sends each
prompt as a user turn through the tokenizer's chat template (instruction-tuned bases):

    python launch/generate.py --base-model runs/real/base --chat --prompt "What is the capital of France?"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mixlora_ds.inference import generate, load_for_inference  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-model", help="local Hugging Face model directory")
    p.add_argument("--model-config", help="instead of --base-model: a preset (tiny, llama2-7b), config.json or run "
                                          "YAML's model.config; "
                                          "random weights from --model-seed")
    p.add_argument("--model-seed", type=int, default=0)
    p.add_argument("--adapter", help="adapter directory; none = the base model alone")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the base model or adapter directory)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeatable")
    p.add_argument("--prompts-file", help="one prompt per line, or JSONL with a 'prompt' field")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user turn in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step (slow)")
    p.add_argument("--static-cache", action="store_true",
                   help="a static KV cache; on a GPU Transformers then compiles the decode step into CUDA "
                        "graphs: worth its compile time for long or repeated generation")
    p.add_argument("--no-merge-lora", action="store_true",
                   help="keep LoRA layers separate instead of folding them into the base weights")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    p.add_argument("--device", default="auto")
    p.add_argument("--output", help="write JSONL {prompt, completion} here instead of printing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar while transformers loads the weights")
    return p


def read_prompts(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: prompts file not found")
    prompts = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{lineno}: invalid JSON: {e.msg}") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise ValueError(f"{p}:{lineno}: field 'prompt' is missing or not a string")
            prompts.append(rec["prompt"])
        else:
            prompts.append(line.replace("\\n", "\n"))
    if not prompts:
        raise ValueError(f"{p}: no prompts")
    return prompts


def chat_prompts(tokenizer, prompts: list[str]) -> list[str]:
    """Each prompt as one user turn, rendered with the assistant's turn opened (the template carries
    its own special tokens, so no BOS is added on top)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat: the tokenizer has no chat template (chat_template.jinja or tokenizer_config.json)")
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          tokenize=False) for p in prompts]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if (args.base_model is None) == (args.model_config is None):
            raise ValueError("give exactly one of --base-model and --model-config")
        prompts = [p.replace("\\n", "\n") for p in args.prompt]
        if args.prompts_file:
            prompts += read_prompts(args.prompts_file)
        if not prompts:
            raise ValueError("no prompts: give --prompt or --prompts-file")
        if args.no_progress:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # transformers' bars ("Loading weights") have their own switch
        model, tokenizer = load_for_inference(
            args.base_model, adapter=args.adapter, model_config=args.model_config, tokenizer=args.tokenizer,
            seed=args.model_seed, dtype=args.dtype, device=args.device, merge_lora=not args.no_merge_lora,
        )
        inputs = chat_prompts(tokenizer, prompts) if args.chat else prompts
        completions = generate(
            model, tokenizer, inputs, add_bos=not args.chat,
            max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
            top_p=args.top_p, top_k=args.top_k, seed=args.seed, batch_size=args.batch_size,
            use_cache=not args.no_cache, cache_implementation="static" if args.static_cache else None,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lines = [json.dumps({"prompt": p, "completion": c}, ensure_ascii=False) for p, c in zip(prompts, completions)]
    if args.output:
        from mixlora_ds.utils.atomic import atomic_write_text

        atomic_write_text(args.output, "\n".join(lines) + "\n")
    else:
        for p, c in zip(prompts, completions):
            print(f"{p}{c}\n{'-' * 40}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
