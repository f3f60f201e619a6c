"""Offline data preparation: tokenize and pack multi-task instruction data into shards.

Run it before training, e.g. as its own batch job:

    mixlora-prepare --mixture configs/data/commonsense8.yaml --tokenizer TOKENIZER_DIR \
        --seq-len 512 --out prepared/ --num-proc 8

    python data_prep/prepare.py --input data/arc-e/train.jsonl:arc-e \
        --eval-input data/arc-e/eval.jsonl:arc-e --input alpaca.json:alpaca \
        --tokenizer TOKENIZER_DIR --seq-len 512 --out prepared/

``--input PATH[:TASK]`` takes a commonsense task (arc-e, arc-c, boolq, obqa, piqa, siqa,
hellaswag, winogrande) in its public schema, or instruction records (TASK = instruction
(detected per record), alpaca, pair or chat; the default). ``hf:TASK`` loads a task's public
dataset by name when the machine is online. Flags override the settings of a mixture file.
Exit status: 0 on success, 2 on bad input (message names file, line and field) or an --out that
cannot be published (an existing file, a directory that is not an earlier prepare output, or an
output another job published there first), 130 when interrupted; the output directory is then
left as it was.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

from mixlora_ds.data.encode import OVERLONG_POLICIES
from mixlora_ds.data.errors import DataError
from mixlora_ds.data.pipeline import PrepareConfig, clear_stop, forking, prepare, request_stop
from mixlora_ds.data.sources import SourceSpec, load_mixture, parse_input_arg
from mixlora_ds.data.templates import INSTRUCTION_TEMPLATES

# Mixture-file settings and the PrepareConfig fields they set.
_SETTINGS = {"tokenizer", "seq_len", "seed", "num_proc", "skip_invalid", "append_eos",
             "train_on_prompt", "overlong", "instruction_template", "rows_per_shard",
             "pack_window_tokens", "eval_fraction", "out"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixlora-prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--mixture", help="YAML mixture file: sources with weights/sample counts and "
                                     "eval splits, plus optional settings")
    p.add_argument("--input", action="append", default=[], metavar="PATH[:TASK]",
                   help="training input (repeatable)")
    p.add_argument("--eval-input", action="append", default=[], metavar="PATH[:TASK]",
                   help="held-out evaluation input, written as split 'eval' (repeatable)")
    p.add_argument("--eval-fraction", type=float, default=None,
                   help="hold out this fraction of each --input source as its eval split")
    p.add_argument("--tokenizer", help="local Hugging Face tokenizer directory")
    p.add_argument("--seq-len", type=int, help="packed row length in tokens")
    p.add_argument("--out", help="output directory (written atomically)")
    p.add_argument("--num-proc", type=int, help="tokenizer worker processes (default 1)")
    p.add_argument("--seed", type=int, help="seed of held-out and weighted sampling (default 42)")
    p.add_argument("--skip-invalid", action="store_true", default=None,
                   help="skip invalid records (counted per file and reason in the manifest) "
                        "instead of failing")
    eos = p.add_mutually_exclusive_group()
    eos.add_argument("--eos", dest="append_eos", action="store_true", default=None,
                     help="append EOS to every example (default)")
    eos.add_argument("--no-eos", dest="append_eos", action="store_false",
                     help="do not append EOS (the reference's behaviour)")
    p.add_argument("--train-on-prompt", action="store_true", default=None,
                   help="train on prompt tokens too (default: loss on the response only)")
    p.add_argument("--overlong", choices=OVERLONG_POLICIES,
                   help="examples longer than --seq-len: truncate (default; dropped if no "
                        "response token is left) or drop")
    p.add_argument("--instruction-template", choices=sorted(INSTRUCTION_TEMPLATES),
                   help="prompt template of Alpaca-style records (default alpaca)")
    p.add_argument("--rows-per-shard", type=int, help="packed rows per shard (default 2048)")
    p.add_argument("--pack-window-tokens", type=int,
                   help="tokens buffered per packing window (default 4194304)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out that is an earlier prepare output (a "
                        "manifest.json and the train/eval shards, nothing else)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> PrepareConfig:
    settings: dict[str, Any] = {}
    sources: list[SourceSpec] = []
    if args.mixture:
        sources, settings = load_mixture(args.mixture)
        unknown = sorted(set(settings) - _SETTINGS)
        if unknown:
            raise DataError(f"{args.mixture}: unknown setting(s) {unknown}; known: "
                            f"{sorted(_SETTINGS)}", reason="bad_value", field=unknown[0])
        base = Path(args.mixture).parent
        for key in ("tokenizer", "out"):
            if isinstance(settings.get(key), str) and not os.path.isabs(settings[key]):
                settings[key] = str(base / settings[key])
    cli = {"tokenizer": args.tokenizer, "seq_len": args.seq_len, "out": args.out,
           "num_proc": args.num_proc, "seed": args.seed, "skip_invalid": args.skip_invalid,
           "append_eos": args.append_eos, "train_on_prompt": args.train_on_prompt,
           "overlong": args.overlong, "instruction_template": args.instruction_template,
           "rows_per_shard": args.rows_per_shard, "pack_window_tokens": args.pack_window_tokens,
           "eval_fraction": args.eval_fraction}
    settings.update({k: v for k, v in cli.items() if v is not None})
    sources += [parse_input_arg(a, "train") for a in args.input]
    sources += [parse_input_arg(a, "eval") for a in args.eval_input]
    eval_fraction = settings.pop("eval_fraction", None)
    if eval_fraction:
        # Hold out from training sources that have no eval source of their own task.
        with_eval = {s.task for s in sources if s.split == "eval"}
        for s in sources:
            if (s.split == "train" and s.task not in with_eval and s.eval_fraction is None
                    and s.eval_count is None):
                s.eval_fraction = eval_fraction
                s.__post_init__()  # re-validate the value
    for required in ("tokenizer", "seq_len", "out"):
        if settings.get(required) is None:
            raise DataError(f"setting '{required}' is required (--{required.replace('_', '-')} "
                            f"or the mixture file)", reason="bad_value", field=required)
    return PrepareConfig(sources=sources, overwrite=args.overwrite, progress=args.progress,
                         **settings)


_main_pid = os.getpid()  # the process that installed the handler (main() sets it)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    # A batch scheduler ends jobs with SIGTERM: unwind like Ctrl-C so the temporary output
    # directory is removed and worker processes are stopped.
    if os.getpid() != _main_pid:
        # A worker forked before its initializer restored the default handler, terminated by the
        # pool's shutdown: stop now. (Raising there can be swallowed by at-fork hooks, and a
        # worker that lives on keeps the pool's shutdown waiting for ever.)
        os._exit(128 + signum)
    request_stop()
    if not forking():  # while workers are forked, the pipeline stops right after instead
        raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    global _main_pid
    _main_pid = os.getpid()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if in_main_thread else None
    clear_stop()
    try:
        prepare(config_from_args(args))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; output left unchanged", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
