"""The project's own small multi-task sample set, generated (never copied from real datasets).

Every record is built from a tiny, consistent world of facts (what kind of thing an object is,
which animal makes which sound, what is hot or cold, which tool does a job, how people feel
after an event, what happens next in an everyday activity, which of two things is bigger). The
answer always follows from the question: it is the one choice the facts single out, and in the
multiple-choice tasks it also sits at a fixed position for each fact asked about (e.g. every
"kind of fruit" question has its fruit at (A)),
while distractors, the other choices and the wording vary. So even a tiny model trained for a
few minutes on the train split does measurably better than chance on the eval split, which
never repeats a train prompt.

Files, in the public schemas of the eight commonsense tasks (see templates.py):

    OUT/<task>/train.jsonl, OUT/<task>/eval.jsonl   for the 8 tasks
    OUT/alpaca/train.json                           Alpaca-style instruction records (JSON array)
    OUT/mixture.yaml                                a mixture file using all of them
    OUT/tokenizer_corpus.txt                        the rendered training texts, for building a
                                                    tokenizer (data_prep/build_tokenizer.py)
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable

from mixlora_ds.data.templates import TASKS

CATEGORIES: dict[str, list[str]] = {
    "fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum"],
    "animal": ["cat", "dog", "horse", "cow", "sheep", "goat", "lion", "tiger", "rabbit"],
    "vehicle": ["car", "bus", "truck", "train", "bicycle", "boat", "plane", "tractor"],
    "tool": ["hammer", "saw", "drill", "wrench", "shovel", "screwdriver", "rake"],
    "instrument": ["piano", "guitar", "violin", "drum", "flute", "trumpet"],
    "furniture": ["chair", "table", "bed", "sofa", "desk", "shelf"],
    "vegetable": ["carrot", "potato", "onion", "pepper", "cabbage", "lettuce"],
    "color": ["red", "blue", "green", "yellow", "purple", "orange"],
}
SOUNDS = {"cow": "moo", "dog": "woof", "cat": "meow", "sheep": "baa", "lion": "roar",
          "duck": "quack", "horse": "neigh", "owl": "hoot", "snake": "hiss", "bee": "buzz",
          "pig": "oink", "frog": "croak"}
HOT = ["fire", "the sun", "a hot oven", "lava", "a stove burner", "boiling water", "a candle flame",
       "a campfire", "steam", "a toaster", "hot soup", "a heater", "hot coffee", "a volcano",
       "a light bulb"]
COLD = ["ice", "snow", "a freezer", "a glacier", "frost", "an ice cube", "a snowball", "an iceberg",
        "cold milk", "a fridge", "hail", "frozen peas", "sleet", "an ice rink", "winter wind"]
JOBS = {  # goal -> (right way, wrong way)
    "cut a piece of wood": ("use a saw", "use a spoon"),
    "dig a hole in the garden": ("use a shovel", "use a fork"),
    "drive a nail into a board": ("use a hammer", "use a pillow"),
    "tighten a loose bolt": ("use a wrench", "use a towel"),
    "boil some water": ("heat it in a pot on the stove", "put it in the freezer"),
    "dry your wet hands": ("rub them with a towel", "dip them in a bucket of water"),
    "write a letter": ("use a pen and paper", "use a shovel and a rock"),
    "see in a dark room": ("turn on a lamp", "close your eyes"),
    "keep milk cold": ("put it in the fridge", "put it in the oven"),
    "clean a dirty floor": ("wipe it with a wet mop", "spread sand on it"),
    "cross a wide river": ("take a boat", "walk on the water"),
    "wake up on time": ("set an alarm clock", "stay up all night"),
}
PEOPLE = ["Alex", "Sam", "Jordan", "Taylor", "Riley", "Casey", "Morgan", "Jamie", "Robin", "Kai"]
EVENTS = [  # event -> the feeling it causes
    ("won the race", "happy"), ("lost a favorite toy", "sad"), ("stayed up all night", "tired"),
    ("saw a big spider", "scared"), ("was insulted by a stranger", "angry"),
    ("finished a hard project", "proud"), ("ate a very large meal", "full"),
    ("received a kind gift", "grateful"), ("waited two hours for a bus", "bored"),
    ("heard a surprising secret", "surprised"),
]
ACTIVITIES = [  # (activity, context, subject, the ending that follows)
    ("Making tea", "A woman fills a kettle with water.", "She",
     "puts the kettle on the stove to boil."),
    ("Washing dishes", "A man stands at the sink with dirty plates.", "He",
     "scrubs each plate with a soapy sponge."),
    ("Walking a dog", "A boy clips a leash onto his dog.", "He",
     "opens the door and walks the dog down the street."),
    ("Painting a wall", "A painter dips a roller into a tray of paint.", "He",
     "rolls the paint evenly across the wall."),
    ("Planting a tree", "A girl digs a deep hole in the yard.", "She",
     "sets the young tree in the hole and covers the roots with soil."),
    ("Riding a bike", "A child puts on a helmet and sits on a bicycle.", "The child",
     "pushes the pedals and rides down the path."),
    ("Baking bread", "A baker mixes flour, water and yeast in a bowl.", "The baker",
     "kneads the dough and puts it in the oven."),
    ("Washing a car", "A man sprays water over a dusty car.", "He",
     "wipes the car with a sponge until it shines."),
    ("Reading a book", "A student sits down in a quiet library with a book.", "The student",
     "opens the book and starts reading the first page."),
    ("Brushing teeth", "A girl squeezes toothpaste onto a toothbrush.", "She",
     "brushes her teeth and rinses her mouth."),
]
SIZES = ["ant", "coin", "mouse", "cup", "book", "cat", "chair", "dog", "table", "horse", "car",
         "elephant", "house", "whale", "mountain"]  # smallest to largest
CONTAINERS = ["box", "bag", "drawer", "basket", "suitcase", "cupboard", "barrel", "crate"]

_SPLIT_SIZES = {"train": 240, "eval": 60}


# --------------------------------------------------------------------------- generators
def _arc_labels(rng: random.Random, n: int, digit_share: float) -> list[str]:
    # ARC stores most questions with letter labels and some with digits (1-4 only). Digit
    # labels are kept rare: after "Answer:" a LLaMA-style tokenizer emits "▁" then the digit,
    # so the reference's last-token scoring reads them at the wrong position.
    digits = rng.random() < digit_share and n <= 4
    return [str(i + 1) for i in range(n)] if digits else list("ABCDE"[:n])


def _slot(keys: list[Any], key: Any, n: int) -> int:
    """The fixed answer position of a fact: keys take positions in turn (balanced labels)."""
    return keys.index(key) % n


def _choices(rng: random.Random, right: str, wrong: list[str], n: int,
             slot: int) -> tuple[list[str], int]:
    """n options: the right one at ``slot``, distractors sampled and shuffled around it."""
    options = rng.sample(wrong, n - 1)
    options.insert(slot, right)
    return options, slot


def _other_members(cat: str) -> list[str]:
    return [m for c, ms in CATEGORIES.items() if c != cat for m in ms]


def _gen_arc_e(rng: random.Random, i: int) -> dict[str, Any]:
    cat = rng.choice(list(CATEGORIES))
    right = rng.choice(CATEGORIES[cat])
    texts, k = _choices(rng, right, _other_members(cat), 4, _slot(list(CATEGORIES), cat, 4))
    labels = _arc_labels(rng, 4, digit_share=0.0)
    stem = rng.choice(["Which of these is a kind of {c}?", "Which of these is a {c}?",
                       "Which one of the following is a {c}?"]).format(c=cat)
    return {"id": f"sample-arc-e-{i}", "question": stem,
            "choices": {"text": texts, "label": labels}, "answerKey": labels[k]}


def _gen_arc_c(rng: random.Random, i: int) -> dict[str, Any]:
    n = rng.choice([3, 4, 4, 4, 5])
    if rng.random() < 0.5:
        animal = rng.choice(list(SOUNDS))
        texts, k = _choices(rng, animal, [a for a in SOUNDS if a != animal], n,
                            _slot(list(SOUNDS), animal, n))
        stem = f'Which animal makes the sound "{SOUNDS[animal]}"?'
    else:
        cat = rng.choice(list(CATEGORIES))
        outsider = rng.choice(_other_members(cat))
        texts, k = _choices(rng, outsider, CATEGORIES[cat], n,
                            _slot(list(CATEGORIES), cat, n))
        stem = f"Which of these is NOT a kind of {cat}?"
    labels = _arc_labels(rng, n, digit_share=0.1)
    return {"id": f"sample-arc-c-{i}", "question": stem,
            "choices": {"text": texts, "label": labels}, "answerKey": labels[k]}


def _gen_boolq(rng: random.Random, i: int) -> dict[str, Any]:
    truth = rng.random() < 0.5
    if rng.random() < 0.35:
        cat = rng.choice(list(CATEGORIES))
        thing = rng.choice(CATEGORIES[cat] if truth else _other_members(cat))
        real = next(c for c, ms in CATEGORIES.items() if thing in ms)
        question = rng.choice(["is a {t} a kind of {c}", "is a {t} a type of {c}",
                               "can a {t} be called a {c}"]).format(t=thing, c=cat)
        passage = f"A {thing} is a kind of {real}."
    else:
        hot = rng.random() < 0.5
        thing = rng.choice(HOT if hot else COLD)
        asked = "hot" if hot == truth else "cold"
        question = rng.choice(["is {t} {a}", "does {t} feel {a}",
                               "would {t} be {a} to touch"]).format(t=thing, a=asked)
        passage = f"{thing[0].upper() + thing[1:]} is {'hot' if hot else 'cold'}."
    return {"question": question, "answer": truth, "passage": passage, "title": thing}


def _gen_obqa(rng: random.Random, i: int) -> dict[str, Any]:
    if rng.random() < 0.5:
        want_hot = rng.random() < 0.5
        right = rng.choice(HOT if want_hot else COLD)
        texts, k = _choices(rng, right, COLD if want_hot else HOT, 4,
                            _slot([True, False], want_hot, 4))
        stem = rng.choice(["Which of these would feel the {w} to touch?",
                           "Which of these is {v}?"]).format(
            w="hottest" if want_hot else "coldest", v="hot" if want_hot else "cold")
    else:
        animal = rng.choice(list(SOUNDS))
        texts, k = _choices(rng, SOUNDS[animal], [s for a, s in SOUNDS.items() if a != animal], 4,
                            _slot(list(SOUNDS), animal, 4))
        stem = f"A {animal} usually says"
    labels = list("ABCD")
    return {"id": f"sample-obqa-{i}", "question_stem": stem,
            "choices": {"text": texts, "label": labels}, "answerKey": labels[k]}


def _gen_piqa(rng: random.Random, i: int) -> dict[str, Any]:
    goal = rng.choice(list(JOBS))
    right, wrong = JOBS[goal]
    if rng.random() < 0.3:  # a wrong way borrowed from another job
        wrong = JOBS[rng.choice([g for g in JOBS if g != goal])][1]
    phrasing = rng.choice(["How do you {g}?", "To {g}, you should", "{G}"])
    text = phrasing.format(g=goal, G=goal[0].upper() + goal[1:] + ".")
    label = _slot(list(JOBS), goal, 2)
    sols = (right, wrong) if label == 0 else (wrong, right)
    return {"goal": text, "sol1": sols[0], "sol2": sols[1], "label": label}


def _gen_siqa(rng: random.Random, i: int) -> dict[str, Any]:
    person = rng.choice(PEOPLE)
    event, feeling = rng.choice(EVENTS)
    answers = rng.sample([f for _, f in EVENTS if f != feeling], 2)
    answers.insert(_slot(EVENTS, (event, feeling), 3), feeling)
    question = rng.choice(["How would {p} feel afterwards?", "How would you describe {p}?",
                           "What is {p} feeling now?"]).format(p=person)
    return {"context": f"{person} {event}.", "question": question,
            "answerA": answers[0], "answerB": answers[1], "answerC": answers[2],
            "label": str(answers.index(feeling) + 1)}


def _gen_hellaswag(rng: random.Random, i: int) -> dict[str, Any]:
    k = rng.randrange(len(ACTIVITIES))
    activity, ctx_a, ctx_b, right = ACTIVITIES[k]
    wrong = [a[3] for j, a in enumerate(ACTIVITIES) if j != k]
    endings, label = _choices(rng, right, wrong, 4, _slot(ACTIVITIES, ACTIVITIES[k], 4))
    return {"ind": i, "activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b,
            "ctx": f"{ctx_a} {ctx_b}", "endings": endings, "source_id": f"sample-{k}",
            "split": "train", "split_type": "indomain", "label": str(label)}


def _gen_winogrande(rng: random.Random, i: int) -> dict[str, Any]:
    a, b = sorted(rng.sample(range(len(SIZES)), 2))
    small, big = SIZES[a], SIZES[b]
    container = rng.choice(CONTAINERS)
    if rng.random() < 0.5:
        sentence = f"The {big} did not fit next to the {small} in the {container} because the _ " \
                   f"was too big."
        answer_word, other = big, small
    else:
        sentence = f"The {small} fit easily beside the {big} in the {container} because the _ " \
                   f"was so small."
        answer_word, other = small, big
    options = [other]
    options.insert(0 if answer_word == big else 1, answer_word)
    return {"sentence": sentence, "option1": options[0], "option2": options[1],
            "answer": str(options.index(answer_word) + 1)}


GENERATORS: dict[str, Callable[[random.Random, int], dict[str, Any]]] = {
    "arc-e": _gen_arc_e, "arc-c": _gen_arc_c, "boolq": _gen_boolq, "obqa": _gen_obqa,
    "piqa": _gen_piqa, "siqa": _gen_siqa, "hellaswag": _gen_hellaswag,
    "winogrande": _gen_winogrande,
}


def _gen_alpaca(rng: random.Random) -> dict[str, Any]:
    kind = rng.randrange(4)
    if kind == 0:
        cat = rng.choice(list(CATEGORIES))
        thing = rng.choice(CATEGORIES[cat])
        return {"instruction": "Name the category of the given word.", "input": thing,
                "output": f"A {thing} is a kind of {cat}."}
    if kind == 1:
        animal = rng.choice(list(SOUNDS))
        return {"instruction": f"What sound does a {animal} make?", "input": "",
                "output": f"A {animal} says {SOUNDS[animal]}."}
    if kind == 2:
        hot = rng.random() < 0.5
        thing = rng.choice(HOT if hot else COLD)
        return {"instruction": "Is the following thing hot or cold?", "input": thing,
                "output": f"{thing[0].upper() + thing[1:]} is {'hot' if hot else 'cold'}."}
    goal = rng.choice(list(JOBS))
    return {"instruction": f"Explain how to {goal}.", "input": "",
            "output": f"To {goal}, {JOBS[goal][0]}."}


# --------------------------------------------------------------------------- writer
def _unique_records(gen: Callable[[random.Random, int], dict[str, Any]], rng: random.Random,
                    count: int, seen: set[str], key: Callable[[dict[str, Any]], str],
                    first_id: int = 0) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    attempts = 0
    while len(out) < count and attempts < 200 * count:
        attempts += 1
        record = gen(rng, first_id + len(out))
        k = key(record)
        if k not in seen:
            seen.add(k)
            out.append(record)
    if len(out) < count:
        raise RuntimeError(f"could only generate {len(out)} distinct records of {count}")
    return out


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _write_tokenizer_corpus(path: Path, paths: dict[str, dict[str, Path]]) -> None:
    """The rendered training texts (prompt + answer) of every train file: a tokenizer built on
    the sample directory then learns the prompts' words and the answer labels (" true", " A")
    as pieces, not only the records' field values."""
    from mixlora_ds.data.templates import instruction_segments

    texts = []
    for task, spec in TASKS.items():
        for line in paths[task]["train"].read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            texts.append(spec.build_prompt(record) + spec.completion(record))
    for record in json.loads(paths["alpaca"]["train"].read_text(encoding="utf-8")):
        texts.append("".join(t for t, _ in instruction_segments(record)))
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")


def write_sample_data(out_dir: str | Path, *, train_size: int = _SPLIT_SIZES["train"],
                      eval_size: int = _SPLIT_SIZES["eval"], alpaca_size: int = 200,
                      seed: int = 0) -> dict[str, dict[str, Path]]:
    """Write the sample set (deterministic for a given seed).

    Returns {task: {"train": path, "eval": path}} for the eight commonsense tasks plus
    {"alpaca": {"train": path}}; ``out_dir/mixture.yaml`` names all of them."""
    out = Path(out_dir)
    paths: dict[str, dict[str, Path]] = {}
    for t, (task, gen) in enumerate(GENERATORS.items()):
        rng = random.Random(seed * 1000 + t)
        spec = TASKS[task]
        seen: set[str] = set()

        def key(record: dict[str, Any], spec=spec) -> str:
            return spec.build_prompt(record) + spec.completion(record)

        train = _unique_records(gen, rng, train_size, seen, key)
        evals = _unique_records(gen, rng, eval_size, seen, key, first_id=train_size)
        paths[task] = {"train": out / task / "train.jsonl", "eval": out / task / "eval.jsonl"}
        _write_jsonl(paths[task]["train"], train)
        _write_jsonl(paths[task]["eval"], evals)
    rng = random.Random(seed * 1000 + 99)
    alpaca = [_gen_alpaca(rng) for _ in range(alpaca_size)]
    paths["alpaca"] = {"train": out / "alpaca" / "train.json"}
    paths["alpaca"]["train"].parent.mkdir(parents=True, exist_ok=True)
    paths["alpaca"]["train"].write_text(json.dumps(alpaca, indent=1, ensure_ascii=False) + "\n",
                                        encoding="utf-8")
    _write_tokenizer_corpus(out / "tokenizer_corpus.txt", paths)
    lines = ["# Sample multi-task mixture: the 8 commonsense tasks with their eval splits,",
             "# plus Alpaca-style instructions (paths relative to this file).", "sources:"]
    for task in GENERATORS:
        lines += [f"  - task: {task}", f"    path: {task}/train.jsonl",
                  f"    eval_path: {task}/eval.jsonl"]
    lines += ["  - task: alpaca", "    path: alpaca/train.json", "    weight: 0.5"]
    (out / "mixture.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Write the project's generated multi-task sample set.")
    p.add_argument("out", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    paths = write_sample_data(args.out, seed=args.seed)
    print(f"wrote {len(paths)} tasks and {Path(args.out) / 'mixture.yaml'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
