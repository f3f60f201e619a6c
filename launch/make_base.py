#!/usr/bin/env python
"""Write a base model with random weights to a local directory (config.json + safetensors).

Training from ``model.config`` draws random weights inside ZeRO-3's partitioned initialisation,
which evaluation cannot reproduce. Saving the base once gives training and evaluation the same
weights (it draws them exactly as ``launch/evaluate.py --model-config NAME --seed S`` does):

    python launch/make_base.py --model-config tiny --vocab-size 1024 --seed 42 \
        --tokenizer runs/demo/tokenizer --out runs/demo/base
    python launch/make_base.py --run-config configs/tiny.yaml --out runs/demo/base
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
    p.add_argument("--seed", type=int, default=None, help="default: the run config's seed, else 0")
    p.add_argument("--vocab-size", type=int, default=None, help="override the config's vocabulary size")
    p.add_argument("--tokenizer", help="tokenizer directory copied beside the weights")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    from mixlora_ds.inference import build_model_from_config
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
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: {model.config.model_type} with {n:,} random parameters (seed {seed or 0})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
