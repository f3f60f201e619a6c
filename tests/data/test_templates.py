"""Prompt texts (character for character those of the reference's qa_tasks.py), labels, and the
validation errors of every task and instruction format."""

from __future__ import annotations

import pytest

from mixlora_ds.data.errors import DataError
from mixlora_ds.data.templates import (TASKS, detect_instruction_format, format_instruction,
                                       instruction_segments)

ARC = {"question": "Which is a fruit?", "choices": {"label": ["A", "B", "C"],
                                                     "text": ["dog", "apple", "car"]},
       "answerKey": "B"}

# (task, record, exact reference prompt, gold label, labels of this record, choice texts)
CASES = [
    ("arc-e", ARC,
     "Please choose the correct answer to the question: Which is a fruit? (A) dog (B) apple (C) car"
     "\nAnswer:", "B", ["A", "B", "C"], ["dog", "apple", "car"]),
    ("arc-c", {"question": "Q?", "choices": {"label": ["1", "2", "3", "4"],
                                            "text": ["a", "b", "c", "d"]}, "answerKey": "4"},
     "Please choose the correct answer to the question: Q? (1) a (2) b (3) c (4) d\nAnswer:", "4",
     ["1", "2", "3", "4"], ["a", "b", "c", "d"]),
    ("boolq", {"question": "is ice cold", "answer": True, "passage": "unused"},
     "Please answer the following question with true or false: is ice cold?\nAnswer:", "true",
     ["true", "false"], ["true", "false"]),
    ("obqa", {"question_stem": "The sun is", "choices": {"label": list("ABCD"),
                                                         "text": ["hot", "cold", "wet", "blue"]},
              "answerKey": "A"},
     "Please choose the correct answer to the question: The sun is (A) hot (B) cold (C) wet (D) blue"
     "\nAnswer:", "A", list("ABCD"), ["hot", "cold", "wet", "blue"]),
    ("piqa", {"goal": "Cut wood.", "sol1": "use a spoon", "sol2": "use a saw", "label": 1},
     "Below is a common task along with two possible solutions labeled (A) and (B). Please select "
     "the appropriate solution to achieve the task:\nCut wood.\n\n(A) use a spoon\n(B) use a saw\n"
     "\nCorrect solution:", "B", ["A", "B"], ["use a spoon", "use a saw"]),
    ("siqa", {"context": "Sam won.", "question": "How does Sam feel?", "answerA": "sad",
              "answerB": "happy", "answerC": "tired", "label": "2"},
     "Please choose the correct answer to the question.\nQuestion: Sam won. How does Sam feel?\n"
     "(A) sad\n(B) happy\n(C) tired\nAnswer:", "B", ["A", "B", "C"], ["sad", "happy", "tired"]),
    ("hellaswag", {"activity_label": "Making tea", "ctx": "She fills a kettle.",
                   "endings": ["boils it.", "eats it.", "paints it.", "sells it."], "label": "0"},
     "Please choose the correct ending to complete the given sentence.\nSentence: Making tea. She "
     "fills a kettle.\n(A) boils it.\n(B) eats it.\n(C) paints it.\n(D) sells it.\nAnswer:", "A",
     list("ABCD"), ["boils it.", "eats it.", "paints it.", "sells it."]),
    ("winogrande", {"sentence": "The whale is bigger than the ant because the _ is big.",
                    "option1": "ant", "option2": "whale", "answer": "2"},
     "Please choose the correct answer to fill in the blank to complete the given sentence.\n"
     "Sentence: The whale is bigger than the ant because the _ is big.\n(A) ant\n(B) whale\n"
     "Answer:", "B", ["A", "B"], ["ant", "whale"]),
]


@pytest.mark.parametrize("task,record,prompt,gold,labels,texts", CASES, ids=[c[0] for c in CASES])
def test_reference_prompt_and_labels(task, record, prompt, gold, labels, texts):
    spec = TASKS[task]
    spec.validate(record, "f.jsonl:1")
    assert spec.build_prompt(record) == prompt
    assert spec.answer_label(record) == gold
    assert spec.completion(record) == " " + gold  # the reference appends " " + label
    assert spec.choice_labels(record) == labels
    assert spec.choice_texts(record) == texts
    assert gold in spec.labels and set(labels) <= set(spec.labels)


def test_task_label_sets_are_the_references():
    assert sorted(TASKS) == sorted(["arc-e", "arc-c", "boolq", "obqa", "piqa", "siqa", "hellaswag",
                                    "winogrande"])
    assert TASKS["arc-e"].labels == ["1", "2", "3", "4", "A", "B", "C", "D", "E"]
    assert TASKS["arc-c"].labels == TASKS["arc-e"].labels
    assert TASKS["boolq"].labels == ["true", "false"]
    assert TASKS["obqa"].labels == list("ABCD")
    assert TASKS["piqa"].labels == ["A", "B"]
    assert TASKS["siqa"].labels == ["A", "B", "C"]
    assert TASKS["hellaswag"].labels == list("ABCD")
    assert TASKS["winogrande"].labels == ["A", "B"]


def test_integer_and_string_labels_agree():
    piqa = {"goal": "g", "sol1": "a", "sol2": "b"}
    assert TASKS["piqa"].answer_label({**piqa, "label": 0}) == "A"
    assert TASKS["piqa"].answer_label({**piqa, "label": "1"}) == "B"
    hs = {"activity_label": "a", "ctx": "c", "endings": ["1", "2", "3", "4"]}
    assert TASKS["hellaswag"].answer_label({**hs, "label": 3}) == "D"
    assert TASKS["hellaswag"].answer_label({**hs, "label": "3"}) == "D"


# (task, change to a valid record, field named in the error, reason)
BAD = [
    ("arc-e", {"question": None}, "question", "bad_type"),
    ("arc-e", {"answerKey": "F"}, "answerKey", "unknown_label"),
    ("arc-e", {"choices": {"label": ["A", "Z"], "text": ["x", "y"]}}, "choices.label",
     "unknown_label"),
    ("arc-e", {"choices": {"label": ["A", "B"], "text": ["x"]}}, "choices", "bad_value"),
    ("arc-e", {"choices": {"label": ["A", "A"], "text": ["x", "y"]}}, "choices.label",
     "bad_value"),
    ("arc-e", {"choices": {"label": ["A", "B"], "text": ["x", 3]}}, "text[1]", "bad_type"),
    ("boolq", {"answer": "yes"}, "answer", "bad_type"),
    ("boolq", {"question": "  "}, "question", "empty_field"),
    ("piqa", {"label": 2}, "label", "unknown_label"),
    ("piqa", {"label": True}, "label", "bad_type"),  # a JSON boolean is not the integer 1
    ("siqa", {"label": "0"}, "label", "unknown_label"),
    ("hellaswag", {"endings": "boils it."}, "endings", "bad_type"),
    ("winogrande", {"answer": "3"}, "answer", "unknown_label"),
]

_VALID = {task: record for task, record, *_ in CASES}


@pytest.mark.parametrize("task,change,field,reason", BAD,
                         ids=[f"{t}-{f}-{r}" for t, _, f, r in BAD])
def test_validate_names_file_line_and_field(task, change, field, reason):
    record = {**_VALID[task], **change}
    with pytest.raises(DataError) as info:
        TASKS[task].validate(record, "data/x.jsonl:17")
    msg = str(info.value)
    assert msg.startswith("data/x.jsonl:17: ")
    assert field in msg
    assert info.value.reason == reason


def test_missing_field_and_non_object():
    with pytest.raises(DataError, match=r"f:3: missing field 'goal'") as info:
        TASKS["piqa"].validate({"sol1": "a", "sol2": "b", "label": 0}, "f:3")
    assert info.value.reason == "missing_field" and info.value.field == "goal"
    with pytest.raises(DataError, match="must be a JSON object, got array"):
        TASKS["boolq"].validate([1, 2], "f:4")


def test_alpaca_prompts_match_alpaca_lora_text():
    with_input = format_instruction({"instruction": "Add.", "input": "1 2", "output": "3"})
    assert with_input == (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
        "Add.\n\n### Input:\n1 2\n\n### Response:\n", "3")
    no_input = format_instruction({"instruction": "Say hi.", "input": "", "output": "hi"})
    assert no_input == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n", "hi")
    assert format_instruction({"instruction": "Say hi.", "output": "hi"}, template="moe_peft") == (
        "### Instruction:\nSay hi.\n\n### Output:\n", "hi")


def test_pair_and_chat_formats():
    assert format_instruction({"prompt": "2+2=", "response": "4"}) == ("2+2=", "4")
    chat = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello"},
                         {"role": "user", "content": "Bye"},
                         {"role": "assistant", "content": "Goodbye"}]}
    assert detect_instruction_format(chat) == "chat"
    segments = instruction_segments(chat)
    assert "".join(t for t, _ in segments) == (
        "System: Be brief.\nUser: Hi\nAssistant: Hello\nUser: Bye\nAssistant: Goodbye")
    assert [t for t, trained in segments if trained] == ["Hello", "Goodbye"]
    prompt, response = format_instruction(chat)
    assert response == "Goodbye" and prompt.endswith("User: Bye\nAssistant: ")


@pytest.mark.parametrize("record,fragment,reason", [
    ({"instruction": "x"}, "missing field 'output'", "missing_field"),
    ({"instruction": "x", "output": ""}, "field 'output' is empty", "empty_field"),
    ({"instruction": "x", "input": 5, "output": "y"}, "field 'input' must be a string", "bad_type"),
    ({"text": "x"}, "not an instruction record", "missing_field"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "last message must be from the assistant",
     "bad_value"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0]", "bad_value"),
])
def test_instruction_errors(record, fragment, reason):
    with pytest.raises(DataError) as info:
        instruction_segments(record, "chat.jsonl:9")
    assert str(info.value).startswith("chat.jsonl:9: ")
    assert fragment in str(info.value)
    assert info.value.reason == reason
