"""Fixtures for the evaluation and inference tests: tokenizers, tiny models, adapters, task files.

Everything is built here from nothing (no downloads): tokenizers are trained on a small synthetic
corpus, models are LLaMA-shaped with random weights, adapters get random (non-zero) weights so the
experts and LoRAs really change the outputs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.core.tiny_models import randomize_adapter as randomize_tiny_adapter

REPO = Path(__file__).resolve().parents[2]

TINY = dict(
    model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
)

_WORDS = ("red blue green yellow water stone tree bird fish cloud river light heavy warm cold fast slow "
          "small large metal glass plant animal sun moon rain snow wind sand ice fire").split()


# ----------------------------------------------------------------------------------- task records
def task_records(task: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` records of ``task`` in its public schema, with mixed answers and choice counts."""
    rnd = random.Random(f"{task}-{seed}")

    def phrase(k: int) -> str:
        return " ".join(rnd.choice(_WORDS) for _ in range(k))

    out = []
    for i in range(n):
        if task in ("arc-e", "arc-c", "obqa"):
            k = 4 if task == "obqa" else rnd.choice([3, 4, 5])
            labels = ["1", "2", "3", "4"][:k] if (task == "arc-c" and i % 3 == 0 and k <= 4) else list("ABCDE")[:k]
            q = {"question_stem" if task == "obqa" else "question": f"which {phrase(rnd.randint(2, 12))}?"}
            out.append({**q, "choices": {"label": labels, "text": [phrase(rnd.randint(1, 3)) for _ in labels]},
                        "answerKey": rnd.choice(labels)})
        elif task == "boolq":
            out.append({"question": f"is the {phrase(rnd.randint(2, 8))}", "answer": rnd.random() < 0.5,
                        "passage": f"The {phrase(rnd.randint(5, 20))}."})
        elif task == "piqa":
            out.append({"goal": phrase(rnd.randint(3, 9)), "sol1": phrase(3), "sol2": phrase(4), "label": rnd.randint(0, 1)})
        elif task == "siqa":
            out.append({"context": phrase(6), "question": f"what {phrase(3)}?", "answerA": phrase(2),
                        "answerB": phrase(2), "answerC": phrase(2), "label": str(rnd.randint(1, 3))})
        elif task == "hellaswag":
            out.append({"activity_label": phrase(2), "ctx": phrase(rnd.randint(4, 10)),
                        "endings": [phrase(3) for _ in range(4)], "label": rnd.randint(0, 3)})
        elif task == "winogrande":
            out.append({"sentence": f"the {phrase(3)} _ {phrase(3)}", "option1": phrase(1), "option2": phrase(1),
                        "answer": str(rnd.randint(1, 2))})
        else:
            raise KeyError(task)
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def corpus(n_per_task: int = 30) -> list[str]:
    """Prompt + answer texts of every task, the way training writes them."""
    from mixlora_ds.data.templates import TASKS

    texts = []
    for name, spec in TASKS.items():
        for rec in task_records(name, n_per_task, seed=99):
            texts.append(spec.build_prompt(rec) + spec.completion(rec))
    texts += [f"Answer: {lab}" for lab in ["1", "2", "3", "4", "A", "B", "C", "D", "E", "true", "false"]] * 20
    return texts


# ------------------------------------------------------------------------------------ tokenizers
def make_tokenizer(style: str, out_dir: Path, vocab_size: int = 600):
    """A trained BPE tokenizer saved to ``out_dir``, loadable with AutoTokenizer.

    "metaspace": SentencePiece-like, every word carries a "▁" space prefix (also the first word).
    "bytelevel": GPT-2-like byte-level BPE without a prefix space ("ĠA" inside a sentence, "A" alone).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    if style == "metaspace":
        tk = Tokenizer(models.BPE(unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        alphabet: list[str] = []
    elif style == "bytelevel":
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        raise ValueError(style)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tk.train_from_iterator(corpus(), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>")
    tok.save_pretrained(str(out_dir))
    return tok


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer("metaspace", d)
    return d


@pytest.fixture(scope="session")
def tokenizer(tok_dir):
    from mixlora_ds.data.tokenizer_io import load_tokenizer

    return load_tokenizer(tok_dir)


# ---------------------------------------------------------------------------------------- models
def tiny_config(tokenizer) -> dict:
    return dict(TINY, vocab_size=len(tokenizer))


def randomize_adapter(model, std: float = 0.3, seed: int = 1) -> None:
    """``tests.core.tiny_models.randomize_adapter``, a little wider by default for these tests."""
    randomize_tiny_adapter(model, std=std, seed=seed)


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory, tokenizer, tok_dir) -> Path:
    """A save_pretrained'd tiny base with the tokenizer beside it."""
    from mixlora_ds.model.presets import build_model_from_config

    d = tmp_path_factory.mktemp("base")
    build_model_from_config(tiny_config(tokenizer), seed=7).save_pretrained(str(d))
    for f in Path(tok_dir).iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    return d


def make_adapter(base_dir: Path, out_dir: Path, std: float = 0.3, **cfg) -> Path:
    from mixlora_ds import MixLoraConfig, inject_mixlora, save_mixlora_adapter
    from mixlora_ds.inference import load_base_model

    model = load_base_model(base_dir, dtype="float32", device="cpu")
    inject_mixlora(model, MixLoraConfig(**{"r": 4, "lora_alpha": 8, "num_experts": 4, "top_k": 2, **cfg}))
    randomize_adapter(model, std=std)
    save_mixlora_adapter(model, out_dir)
    return out_dir


@pytest.fixture(scope="session")
def mixlora_dir(tmp_path_factory, base_dir) -> Path:
    # Dropout well above zero: evaluation must switch it off.
    return make_adapter(base_dir, tmp_path_factory.mktemp("adapters") / "mixlora", lora_dropout=0.3)


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory, base_dir) -> Path:
    return make_adapter(base_dir, tmp_path_factory.mktemp("adapters") / "lora", peft_type="LORA", r=8, lora_alpha=16)


@pytest.fixture(scope="session")
def dora_dir(tmp_path_factory, base_dir) -> Path:
    return make_adapter(base_dir, tmp_path_factory.mktemp("adapters") / "dora", peft_type="LORA", use_dora=True)


@pytest.fixture(scope="session")
def mixlora_model(base_dir, mixlora_dir):
    from mixlora_ds.inference import load_for_inference

    model, _ = load_for_inference(base_dir, adapter=mixlora_dir, dtype="float32", device="cpu")
    return model


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """Eval files of all eight tasks as ``<task>/eval.jsonl``."""
    from mixlora_ds.eval import BUILTIN_TASKS

    d = tmp_path_factory.mktemp("tasks")
    for name in BUILTIN_TASKS:
        write_jsonl(d / name / "eval.jsonl", task_records(name, 12))
    return d


# ------------------------------------------------------------------ the project's own data path
@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    """The project's sample set (mixlora_ds.data.sample_data), small splits."""
    from mixlora_ds.data.sample_data import write_sample_data

    d = tmp_path_factory.mktemp("sample")
    write_sample_data(d, train_size=40, eval_size=16)
    return d


@pytest.fixture(scope="session")
def project_tok_dir(tmp_path_factory, sample_dir) -> Path:
    """The project's tokenizer (data_prep/build_tokenizer.py: sentencepiece BPE, LLaMA conventions)."""
    from data_prep.build_tokenizer import build_tokenizer

    return build_tokenizer([sample_dir], tmp_path_factory.mktemp("ptok") / "tokenizer", 512, num_threads=1)
