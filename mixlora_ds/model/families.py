"""What MixLoRA needs to know about each supported Hugging Face model family.

Only module *names* and shapes live here; nothing reads weight values (under ZeRO-3 they are
empty placeholders until gathered).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilySpec:
    model_types: tuple[str, ...]
    attention_projections: tuple[str, ...]
    ffn_input_projections: tuple[str, ...]
    """Projections whose outputs (concatenated in this order) form the FFN pre-activation."""
    ffn_output_projection: str
    gated: bool
    """True: h = act(gate) * up (pre-activation split in two halves); False: h = act(pre)."""

    @property
    def ffn_projections(self) -> tuple[str, ...]:
        return self.ffn_input_projections + (self.ffn_output_projection,)

    @property
    def all_projections(self) -> tuple[str, ...]:
        return self.attention_projections + self.ffn_projections


_LLAMA_LIKE = FamilySpec(
    model_types=("llama", "mistral", "qwen2", "gemma", "gemma2"),
    attention_projections=("q_proj", "k_proj", "v_proj", "o_proj"),
    ffn_input_projections=("gate_proj", "up_proj"),
    ffn_output_projection="down_proj",
    gated=True,
)
_PHI3 = FamilySpec(
    model_types=("phi3",),
    attention_projections=("qkv_proj", "o_proj"),
    ffn_input_projections=("gate_up_proj",),
    ffn_output_projection="down_proj",
    gated=True,
)
_PHI = FamilySpec(
    model_types=("phi",),
    attention_projections=("q_proj", "k_proj", "v_proj", "dense"),
    ffn_input_projections=("fc1",),
    ffn_output_projection="fc2",
    gated=False,
)

FAMILIES: dict[str, FamilySpec] = {t: spec for spec in (_LLAMA_LIKE, _PHI3, _PHI) for t in spec.model_types}


def family_for(model_type: str) -> FamilySpec:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"model_type {model_type!r} is not supported; supported: {sorted(FAMILIES)}"
        ) from None


def activation_name(hf_config) -> str:
    """The FFN activation a model family uses (Gemma 2 calls the field ``hidden_activation``)."""
    for key in ("hidden_activation", "hidden_act"):
        name = getattr(hf_config, key, None)
        if isinstance(name, str):
            return name
    raise ValueError(f"{type(hf_config).__name__} names no hidden activation")
