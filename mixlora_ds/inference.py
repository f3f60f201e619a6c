"""Load a frozen base model plus an adapter for inference, and generate text with it.

    from mixlora_ds.inference import load_for_inference, generate
    model, tok = load_for_inference("path/to/base", adapter="runs/x/adapter")
    print(generate(model, tok, ["Please answer ... Answer:"], max_new_tokens=8))

The base comes from a local Hugging Face directory, or from a model config with random weights drawn
from a seed (``mixlora_ds.model.presets``: a preset name such as "tiny", a config.json path, a run
YAML or a mapping), so an adapter trained on such a base can be evaluated later. Adapters (MixLoRA,
LoRA or DoRA; reference-format files included) are checked against the model before loading
(``mixlora_ds.adapter_check``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from mixlora_ds.adapter_check import check_adapter
from mixlora_ds.adapter_io import load_mixlora_adapter
from mixlora_ds.data.prompt_batch import encode_prompt, pad_batch
from mixlora_ds.data.tokenizer_io import ensure_pad_token, find_tokenizer_dir, load_tokenizer, pad_id_of
from mixlora_ds.model.presets import build_model_from_config


# ------------------------------------------------------------------------------- device and dtype
def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """"auto" is bf16 on a GPU (the paper's base precision) and fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)} or 'auto'")
    return names[dtype]


# -------------------------------------------------------------------------------------- loading
def load_base_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    model_config: str | os.PathLike | Mapping[str, Any] | None = None,
    seed: int = 0,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = "auto",
    attn_implementation: str | None = "sdpa",
):
    """The frozen base in eval mode: a local HF directory, else random weights from ``model_config``."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if name_or_path is not None:
        from transformers import AutoModelForCausalLM

        path = Path(name_or_path)
        if not (path / "config.json").is_file():
            raise ValueError(f"{path}: not a model directory (no config.json); a model config goes to model_config")
        kwargs: dict[str, Any] = {"dtype": dt, "local_files_only": True}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        if dev.type != "cpu":
            kwargs["device_map"] = str(dev)  # straight onto the device: no full copy in host memory
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs).to(dev)
    elif model_config is not None:
        model = build_model_from_config(model_config, seed=seed, dtype=dt, device=dev)
    else:
        raise ValueError("give a base model directory or a model config")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def attach_adapter(model, adapter_dir: str | os.PathLike):
    """Check ``adapter_dir`` against ``model``, inject and load it in place; returns the model in eval mode."""
    check_adapter(model, adapter_dir)
    model = load_mixlora_adapter(model, str(adapter_dir))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_for_inference(
    base: str | os.PathLike | None = None,
    *,
    adapter: str | os.PathLike | None = None,
    model_config: str | os.PathLike | Mapping[str, Any] | None = None,
    tokenizer: str | os.PathLike | None = None,
    seed: int = 0,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = "auto",
    merge_lora: bool = True,
):
    """``(model, tokenizer)`` ready for scoring or generation (eval mode, no gradients).

    The tokenizer comes from ``tokenizer``, else the base directory, else the adapter directory.
    The base is loaded in ``dtype`` on the device; the adapter's tensors are created beside it in the
    dtype the core gives them (fp32 router and LoRA weights, as the reference keeps them).
    ``merge_lora`` folds plain LoRA / DoRA layers (MixLoRA's attention LoRAs, the LoRA baselines) into
    the frozen weights and keeps the expert stacks ready in ``dtype`` (``mixlora_ds.model.merge``):
    same outputs up to rounding to ``dtype``, and merged projections cost what the base model's do.
    """
    tok_dir = find_tokenizer_dir(tokenizer, base, adapter)
    if tok_dir is None:
        raise ValueError(f"no tokenizer found: give a tokenizer directory (looked in {tokenizer!r}, {base!r}, {adapter!r})")
    tok = ensure_pad_token(load_tokenizer(tok_dir))
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    model = load_base_model(base, model_config=model_config, seed=seed, dtype=dt, device=dev)
    if len(tok) > model.config.vocab_size:
        raise ValueError(
            f"tokenizer {tok_dir} has {len(tok)} tokens but the model's vocabulary is {model.config.vocab_size}"
        )
    if adapter is not None:
        model = attach_adapter(model, adapter)
        if merge_lora:
            from mixlora_ds.model.merge import prepare_for_inference

            prepare_for_inference(model, dt)
    # Inference only: a frozen adapter lets the layers cache their prepared (cast) weights.
    model.requires_grad_(False)
    return model.eval(), tok


# ----------------------------------------------------------------------------------- generation
@torch.inference_mode()
def generate_ids(
    model,
    prompts_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    eos_id: int | None,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    use_cache: bool = True,
    min_new_tokens: int = 0,
    cache_implementation: str | None = None,
) -> list[list[int]]:
    """New token ids per prompt (prompts batched together, left-padded), EOS and after cut off.

    ``cache_implementation="static"`` preallocates the KV cache; on a GPU Transformers then compiles
    the decode step into CUDA graphs: the fastest decoding, after a one-off compile.

    Sampling draws from a private copy of the RNG state seeded by ``seed``: same seed, same text, and
    the caller's RNG is left as it was.
    """
    device = next(model.parameters()).device
    batch = pad_batch(prompts_ids, pad_id, side="left").to(device)
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        do_sample=do_sample,
        use_cache=use_cache,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
    )
    if cache_implementation is not None and use_cache:
        kwargs["cache_implementation"] = cache_implementation
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
    else:
        # Neutral values so a model's generation_config cannot turn greedy decoding into sampling.
        kwargs.update(temperature=None, top_p=None, top_k=None)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out_BT = model.generate(input_ids=batch.input_ids_BS, attention_mask=batch.attention_mask_BS, **kwargs)
    new_BN = out_BT[:, batch.input_ids_BS.shape[1] :].tolist()
    result = []
    for row in new_BN:
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id)]
        result.append(row)
    return result


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    batch_size: int = 8,
    use_cache: bool = True,
    add_bos: bool = True,
    cache_implementation: str | None = None,
) -> list[str]:
    """Continuations of ``prompts`` (greedy unless ``do_sample``), decoded without special tokens."""
    if not prompts:
        return []
    pad_id = pad_id_of(tokenizer)
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [encode_prompt(tokenizer, p, add_bos=add_bos) for p in prompts[start : start + batch_size]]
        ids = generate_ids(
            model,
            chunk,
            pad_id=pad_id,
            eos_id=tokenizer.eos_token_id,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed + start,
            use_cache=use_cache,
            cache_implementation=cache_implementation,
        )
        texts.extend(tokenizer.decode(row, skip_special_tokens=True) for row in ids)
    return texts
