"""Prompt templates: the eight commonsense tasks and instruction-style records.

The commonsense prompts reproduce, character for character, the texts of the reference training
framework (MoE-PEFT ``tasks/qa_tasks.py``; the same in m-LoRA 0.3.1), so accuracies compare with
the paper. In training the text is ``prompt + " " + answer_label``; in evaluation the prompt alone,
scored on the next-token logits of the task's labels.

Public API (the data-layer contract):
    TASKS: dict[str, TaskSpec]
    TaskSpec: name, labels, build_prompt, answer_label, choice_labels, choice_texts, validate,
              completion (the trained text appended to the prompt)
    format_instruction(record) -> (prompt, response)    Alpaca / prompt-response / chat messages
    instruction_segments(record) -> [(text, trained)]    the same, with every assistant turn trained
    TEMPLATE_VERSION, template_fingerprint()
"""

from __future__ import annotations

import hashlib
from typing import Any

from mixlora_ds.data.errors import DataError

# Bump when any text below changes: prepared data records it, and the fingerprint catches edits
# that forget to bump it.
TEMPLATE_VERSION = "1"

Record = dict[str, Any]


# --------------------------------------------------------------------------- field checks
def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)


def _require_object(record: Any, where: str) -> Record:
    if not isinstance(record, dict):
        raise DataError(f"{where}: record must be a JSON object, got {_type_name(record)}",
                        reason="bad_type")
    return record


def _field(record: Record, field: str, where: str, kind: type | tuple[type, ...],
           *, non_empty: bool = False) -> Any:
    """Return record[field] checked against ``kind``; a missing or mistyped field is a DataError."""
    if field not in record:
        raise DataError(f"{where}: missing field '{field}'", reason="missing_field", field=field)
    value = record[field]
    # bool is a subclass of int: a JSON true must not pass as the integer 1.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        expected = " or ".join(_type_name_of(k) for k in _as_tuple(kind))
        raise DataError(f"{where}: field '{field}' must be {expected}, got {_type_name(value)} "
                        f"{_short(value)}", reason="bad_type", field=field)
    if non_empty and isinstance(value, str) and not value.strip():
        raise DataError(f"{where}: field '{field}' is empty", reason="empty_field", field=field)
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _type_name_of(kind: type) -> str:
    return {bool: "a boolean", int: "an integer", str: "a string", list: "an array",
            dict: "an object"}.get(kind, kind.__name__)


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _str_list(record: Record, field: str, where: str, *, min_len: int, max_len: int) -> list[str]:
    value = _field(record, field, where, list)
    if not min_len <= len(value) <= max_len:
        raise DataError(f"{where}: field '{field}' must have {min_len} to {max_len} entries, "
                        f"got {len(value)}", reason="bad_value", field=field)
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise DataError(f"{where}: field '{field}[{i}]' must be a string, got "
                            f"{_type_name(item)} {_short(item)}", reason="bad_type",
                            field=f"{field}[{i}]")
    return value


def _index_label(record: Record, field: str, where: str, mapping: dict[Any, int]) -> int:
    """Map an integer-or-string label field to a 0-based choice index, or raise unknown_label."""
    value = _field(record, field, where, (int, str))
    if value not in mapping:
        allowed = sorted({str(k) for k in mapping})
        raise DataError(f"{where}: field '{field}': unknown label {_short(value)}, expected one of "
                        f"{allowed}", reason="unknown_label", field=field)
    return mapping[value]


def _digits(first: int, count: int) -> dict[Any, int]:
    """{first: 0, str(first): 0, first+1: 1, ...}: labels stored as ints or digit strings."""
    out: dict[Any, int] = {}
    for i in range(count):
        out[first + i] = i
        out[str(first + i)] = i
    return out


# --------------------------------------------------------------------------- task specs
class TaskSpec:
    """One commonsense task: its public schema, reference prompt and label set.

    ``labels`` is the task's full label set as the reference scores it (ARC: 9 labels);
    ``choice_labels(record)`` the labels valid for one record.
    """

    name: str
    labels: list[str]
    hf_path: str
    hf_config: str | None
    train_split: str
    eval_split: str
    fields: tuple[str, ...]

    def __init__(self, name: str, labels: list[str], hf_path: str, hf_config: str | None,
                 train_split: str, eval_split: str, fields: tuple[str, ...]) -> None:
        self.name = name
        self.labels = list(labels)
        self.hf_path = hf_path
        self.hf_config = hf_config
        self.train_split = train_split
        self.eval_split = eval_split
        self.fields = fields

    def __repr__(self) -> str:
        return f"TaskSpec({self.name!r})"

    # Subclasses implement the four record methods; validate() runs first and guarantees the
    # fields they read exist with the right types.
    def validate(self, record: Any, where: str = "record") -> None:
        raise NotImplementedError

    def build_prompt(self, record: Record) -> str:
        raise NotImplementedError

    def answer_label(self, record: Record) -> str:
        raise NotImplementedError

    def choice_labels(self, record: Record) -> list[str]:
        raise NotImplementedError

    def choice_texts(self, record: Record) -> list[str]:
        raise NotImplementedError

    def completion(self, record: Record) -> str:
        """The trained text that follows the prompt, as the reference appends it."""
        return " " + self.answer_label(record)


class _ChoicesTask(TaskSpec):
    """ARC and OpenBookQA: a question, ``choices{label,text}`` and ``answerKey``."""

    def __init__(self, question_field: str, **kw: Any) -> None:
        super().__init__(fields=(question_field, "choices", "answerKey"), **kw)
        self.question_field = question_field

    def validate(self, record: Any, where: str = "record") -> None:
        record = _require_object(record, where)
        _field(record, self.question_field, where, str, non_empty=True)
        choices = _field(record, "choices", where, dict)
        labels = _str_list(choices, "label", f"{where}: field 'choices'", min_len=2,
                           max_len=len(self.labels))
        texts = _str_list(choices, "text", f"{where}: field 'choices'", min_len=2,
                          max_len=len(self.labels))
        if len(labels) != len(texts):
            raise DataError(f"{where}: field 'choices': {len(labels)} labels but {len(texts)} "
                            f"texts", reason="bad_value", field="choices")
        if len(set(labels)) != len(labels):
            raise DataError(f"{where}: field 'choices.label': duplicate labels {labels}",
                            reason="bad_value", field="choices.label")
        for lab in labels:
            if lab not in self.labels:
                raise DataError(f"{where}: field 'choices.label': unknown label {lab!r} for task "
                                f"{self.name} (labels {self.labels})", reason="unknown_label",
                                field="choices.label")
        key = _field(record, "answerKey", where, str)
        if key not in labels:
            raise DataError(f"{where}: field 'answerKey': unknown label {key!r}, not one of the "
                            f"choices {labels}", reason="unknown_label", field="answerKey")

    def build_prompt(self, record: Record) -> str:
        prompt = "Please choose the correct answer to the question: " + record[self.question_field]
        choices = record["choices"]
        for label, text in zip(choices["label"], choices["text"]):
            prompt += f" ({label}) {text}"
        return prompt + "\nAnswer:"

    def answer_label(self, record: Record) -> str:
        return record["answerKey"]

    def choice_labels(self, record: Record) -> list[str]:
        return list(record["choices"]["label"])

    def choice_texts(self, record: Record) -> list[str]:
        return list(record["choices"]["text"])


class _BoolQ(TaskSpec):
    def __init__(self) -> None:
        super().__init__(name="boolq", labels=["true", "false"], hf_path="google/boolq",
                         hf_config=None, train_split="train", eval_split="validation",
                         fields=("question", "answer"))

    def validate(self, record: Any, where: str = "record") -> None:
        record = _require_object(record, where)
        _field(record, "question", where, str, non_empty=True)
        _field(record, "answer", where, bool)

    def build_prompt(self, record: Record) -> str:
        # The passage is not used: the reference asks the bare question.
        return ("Please answer the following question with true or false: "
                f"{record['question']}?\nAnswer:")

    def answer_label(self, record: Record) -> str:
        return "true" if record["answer"] else "false"

    def choice_labels(self, record: Record) -> list[str]:
        return ["true", "false"]

    def choice_texts(self, record: Record) -> list[str]:
        return ["true", "false"]


class _PIQA(TaskSpec):
    def __init__(self) -> None:
        super().__init__(name="piqa", labels=["A", "B"], hf_path="piqa", hf_config=None,
                         train_split="train", eval_split="validation",
                         fields=("goal", "sol1", "sol2", "label"))

    def validate(self, record: Any, where: str = "record") -> None:
        record = _require_object(record, where)
        for f in ("goal", "sol1", "sol2"):
            _field(record, f, where, str, non_empty=True)
        _index_label(record, "label", where, _digits(0, 2))

    def build_prompt(self, record: Record) -> str:
        prompt = "Below is a common task along with two possible solutions labeled (A) and (B)."
        prompt += f" Please select the appropriate solution to achieve the task:\n{record['goal']}\n"
        prompt += f"\n(A) {record['sol1']}\n(B) {record['sol2']}\n"
        return prompt + "\nCorrect solution:"

    def answer_label(self, record: Record) -> str:
        return self.labels[_digits(0, 2)[record["label"]]]

    def choice_labels(self, record: Record) -> list[str]:
        return ["A", "B"]

    def choice_texts(self, record: Record) -> list[str]:
        return [record["sol1"], record["sol2"]]


class _SIQA(TaskSpec):
    def __init__(self) -> None:
        super().__init__(name="siqa", labels=["A", "B", "C"], hf_path="social_i_qa",
                         hf_config=None, train_split="train", eval_split="validation",
                         fields=("context", "question", "answerA", "answerB", "answerC", "label"))

    def validate(self, record: Any, where: str = "record") -> None:
        record = _require_object(record, where)
        _field(record, "context", where, str, non_empty=True)
        _field(record, "question", where, str, non_empty=True)
        for f in ("answerA", "answerB", "answerC"):
            _field(record, f, where, str, non_empty=True)
        _index_label(record, "label", where, _digits(1, 3))

    def build_prompt(self, record: Record) -> str:
        prompt = "Please choose the correct answer to the question.\n"
        prompt += f"Question: {record['context']} {record['question']}"
        prompt += f"\n(A) {record['answerA']}"
        prompt += f"\n(B) {record['answerB']}"
        prompt += f"\n(C) {record['answerC']}"
        return prompt + "\nAnswer:"

    def answer_label(self, record: Record) -> str:
        return self.labels[_digits(1, 3)[record["label"]]]

    def choice_labels(self, record: Record) -> list[str]:
        return ["A", "B", "C"]

    def choice_texts(self, record: Record) -> list[str]:
        return [record["answerA"], record["answerB"], record["answerC"]]


class _HellaSwag(TaskSpec):
    def __init__(self) -> None:
        super().__init__(name="hellaswag", labels=["A", "B", "C", "D"], hf_path="Rowan/hellaswag",
                         hf_config=None, train_split="train", eval_split="validation",
                         fields=("activity_label", "ctx", "endings", "label"))

    def validate(self, record: Any, where: str = "record") -> None:
        record = _require_object(record, where)
        _field(record, "activity_label", where, str, non_empty=True)
        _field(record, "ctx", where, str, non_empty=True)
        endings = _str_list(record, "endings", where, min_len=2, max_len=4)
        index = _index_label(record, "label", where, _digits(0, 4))
        if index >= len(endings):
            raise DataError(f"{where}: field 'label': unknown label {record['label']!r}, only "
                            f"{len(endings)} endings", reason="unknown_label", field="label")

    def build_prompt(self, record: Record) -> str:
        prompt = "Please choose the correct ending to complete the given sentence.\n"
        prompt += f"Sentence: {record['activity_label']}. {record['ctx']}"
        for label, text in zip(self.labels, record["endings"]):
            prompt += f"\n({label}) {text}"
        return prompt + "\nAnswer:"

    def answer_label(self, record: Record) -> str:
        return self.labels[_digits(0, 4)[record["label"]]]

    def choice_labels(self, record: Record) -> list[str]:
        return self.labels[: len(record["endings"])]

    def choice_texts(self, record: Record) -> list[str]:
        return list(record["endings"])


class _WinoGrande(TaskSpec):
    def __init__(self) -> None:
        super().__init__(name="winogrande", labels=["A", "B"], hf_path="winogrande",
                         hf_config="winogrande_debiased", train_split="train",
                         eval_split="validation", fields=("sentence", "option1", "option2", "answer"))

    def validate(self, record: Any, where: str = "record") -> None:
        record = _require_object(record, where)
        _field(record, "sentence", where, str, non_empty=True)
        _field(record, "option1", where, str, non_empty=True)
        _field(record, "option2", where, str, non_empty=True)
        _index_label(record, "answer", where, _digits(1, 2))

    def build_prompt(self, record: Record) -> str:
        prompt = ("Please choose the correct answer to fill in the blank to complete the given "
                  "sentence.\n")
        prompt += f"Sentence: {record['sentence']}"
        prompt += f"\n(A) {record['option1']}\n(B) {record['option2']}"
        return prompt + "\nAnswer:"

    def answer_label(self, record: Record) -> str:
        return self.labels[_digits(1, 2)[record["answer"]]]

    def choice_labels(self, record: Record) -> list[str]:
        return ["A", "B"]

    def choice_texts(self, record: Record) -> list[str]:
        return [record["option1"], record["option2"]]


_ARC_LABELS = ["1", "2", "3", "4", "A", "B", "C", "D", "E"]

TASKS: dict[str, TaskSpec] = {
    "arc-e": _ChoicesTask("question", name="arc-e", labels=_ARC_LABELS, hf_path="allenai/ai2_arc",
                          hf_config="ARC-Easy", train_split="train", eval_split="test"),
    "arc-c": _ChoicesTask("question", name="arc-c", labels=_ARC_LABELS, hf_path="allenai/ai2_arc",
                          hf_config="ARC-Challenge", train_split="train", eval_split="test"),
    "boolq": _BoolQ(),
    "obqa": _ChoicesTask("question_stem", name="obqa", labels=["A", "B", "C", "D"],
                         hf_path="allenai/openbookqa", hf_config="main", train_split="train",
                         eval_split="test"),
    "piqa": _PIQA(),
    "siqa": _SIQA(),
    "hellaswag": _HellaSwag(),
    "winogrande": _WinoGrande(),
}


# --------------------------------------------------------------------------- instruction data
INSTRUCTION_TEMPLATES: dict[str, dict[str, str]] = {
    # Alpaca-LoRA's text (the reference's "alpaca" template).
    "alpaca": {
        "prompt_input": "Below is an instruction that describes a task, paired with an input that "
                        "provides further context. Write a response that appropriately completes "
                        "the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}"
                        "\n\n### Response:\n",
        "prompt_no_input": "Below is an instruction that describes a task. Write a response that "
                           "appropriately completes the request.\n\n### Instruction:\n"
                           "{instruction}\n\n### Response:\n",
    },
    # The reference framework's default template.
    "moe_peft": {
        "prompt_input": "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Output:\n",
        "prompt_no_input": "### Instruction:\n{instruction}\n\n### Output:\n",
    },
}

# Chat records are rendered as plain "Role: content" lines: the tokenizers built here have no
# chat template, and a fixed text keeps prepared data independent of tokenizer configs.
CHAT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}

INSTRUCTION_FORMATS = ("alpaca", "pair", "chat")


def detect_instruction_format(record: Any, where: str = "record") -> str:
    """Which instruction schema a record uses: 'alpaca', 'pair' or 'chat'."""
    record = _require_object(record, where)
    if "messages" in record:
        return "chat"
    if "instruction" in record:
        return "alpaca"
    if "prompt" in record:
        return "pair"
    raise DataError(f"{where}: not an instruction record: expected fields 'instruction' and "
                    f"'output' (Alpaca), 'prompt' and 'response' (pair) or 'messages' (chat); got "
                    f"fields {sorted(record)[:8]}", reason="missing_field", field="instruction")


def instruction_segments(record: Any, where: str = "record", template: str = "alpaca",
                         fmt: str | None = None) -> list[tuple[str, bool]]:
    """Render an instruction record as ``[(text, trained), ...]``; joined, the texts are the
    training text, and ``trained`` marks the response spans (every assistant turn in a chat)."""
    fmt = fmt or detect_instruction_format(record, where)
    record = _require_object(record, where)
    if fmt == "alpaca":
        if template not in INSTRUCTION_TEMPLATES:
            raise DataError(f"unknown instruction template {template!r}, expected one of "
                            f"{sorted(INSTRUCTION_TEMPLATES)}", reason="bad_value")
        instruction = _field(record, "instruction", where, str, non_empty=True)
        extra = record.get("input")
        if extra is not None and not isinstance(extra, str):
            raise DataError(f"{where}: field 'input' must be a string, got {_type_name(extra)}",
                            reason="bad_type", field="input")
        output = _field(record, "output", where, str, non_empty=True)
        texts = INSTRUCTION_TEMPLATES[template]
        if extra:
            prompt = texts["prompt_input"].format(instruction=instruction, input=extra)
        else:
            prompt = texts["prompt_no_input"].format(instruction=instruction)
        return [(prompt, False), (output, True)]
    if fmt == "pair":
        prompt = _field(record, "prompt", where, str, non_empty=True)
        key = "response" if "response" in record or "completion" not in record else "completion"
        response = _field(record, key, where, str, non_empty=True)
        return [(prompt, False), (response, True)]
    if fmt == "chat":
        return _chat_segments(record, where)
    raise DataError(f"{where}: unknown instruction format {fmt!r}, expected one of "
                    f"{list(INSTRUCTION_FORMATS)}", reason="bad_value")


def _chat_segments(record: Record, where: str) -> list[tuple[str, bool]]:
    messages = _field(record, "messages", where, list)
    if not messages:
        raise DataError(f"{where}: field 'messages' is empty", reason="empty_field",
                        field="messages")
    segments: list[tuple[str, bool]] = []
    pending = ""  # untrained text accumulated since the last assistant turn
    for i, message in enumerate(messages):
        at = f"{where}: field 'messages[{i}]'"
        if not isinstance(message, dict):
            raise DataError(f"{at} must be an object, got {_type_name(message)}", reason="bad_type",
                            field=f"messages[{i}]")
        role = _field(message, "role", at, str)
        if role not in CHAT_ROLES:
            raise DataError(f"{at}: field 'role': unknown role {role!r}, expected one of "
                            f"{list(CHAT_ROLES)}", reason="bad_value", field=f"messages[{i}].role")
        content = _field(message, "content", at, str, non_empty=role == "assistant")
        if role == "assistant":
            segments.append((pending + "Assistant: ", False))
            segments.append((content, True))
            pending = "\n"
        else:
            pending += f"{CHAT_ROLES[role]}: {content}\n"
    if messages[-1].get("role") != "assistant":
        raise DataError(f"{where}: field 'messages': the last message must be from the assistant "
                        f"(nothing to train on after it)", reason="bad_value", field="messages")
    return segments


def format_instruction(record: Any, template: str = "alpaca",
                       where: str = "record") -> tuple[str, str]:
    """(prompt, response) of an Alpaca, prompt/response or chat record. For a chat, the response
    is the last assistant turn and the prompt the conversation before it."""
    segments = instruction_segments(record, where, template)
    prompt = "".join(text for text, _ in segments[:-1])
    return prompt, segments[-1][0]


# --------------------------------------------------------------------------- fingerprint
_CANONICAL: dict[str, Record] = {
    "arc-e": {"question": "Q?", "choices": {"label": ["A", "B"], "text": ["x", "y"]},
              "answerKey": "B"},
    "arc-c": {"question": "Q?", "choices": {"label": ["1", "2"], "text": ["x", "y"]},
              "answerKey": "1"},
    "boolq": {"question": "q", "answer": True},
    "obqa": {"question_stem": "Q", "choices": {"label": ["A", "B"], "text": ["x", "y"]},
             "answerKey": "A"},
    "piqa": {"goal": "g", "sol1": "a", "sol2": "b", "label": 1},
    "siqa": {"context": "c", "question": "q", "answerA": "a", "answerB": "b", "answerC": "c",
             "label": "3"},
    "hellaswag": {"activity_label": "act", "ctx": "c", "endings": ["a", "b", "c", "d"],
                  "label": "2"},
    "winogrande": {"sentence": "s _", "option1": "a", "option2": "b", "answer": "2"},
}


def template_fingerprint() -> str:
    """sha256 over every template rendered on fixed records: changes whenever any text does."""
    h = hashlib.sha256(TEMPLATE_VERSION.encode())
    for name, record in _CANONICAL.items():
        spec = TASKS[name]
        h.update(f"{name}\0{spec.build_prompt(record)}\0{spec.completion(record)}\0".encode())
    chat = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                         {"role": "assistant", "content": "a"}]}
    for template in sorted(INSTRUCTION_TEMPLATES):
        for rec in ({"instruction": "i", "input": "x", "output": "o"},
                    {"instruction": "i", "output": "o"}):
            h.update(repr(instruction_segments(rec, template=template)).encode())
    h.update(repr(instruction_segments({"prompt": "p", "response": "r"})).encode())
    h.update(repr(instruction_segments(chat)).encode())
    return h.hexdigest()
