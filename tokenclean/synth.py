"""A generated SFT set whose token labels are known: the embedded default's data.

A small world of fictional people with fixed attributes (city, job, pet, hobbies).
Questions ask for attributes; responses wrap the answer in boilerplate of varying
length ("Sure! ... I hope this helps!"), and a known fraction of responses carry a
*wrong* attribute value. Every response therefore has three kinds of token with a
known label: informative answer tokens, boilerplate/connective tokens, and corrupted
answer tokens. That lets the demo measure selection precision/recall exactly.

The same world also yields the base model's pretraining text, in which every fact
appears with *random* values: the base model learns the language and the value
vocabulary, not the facts, which is what the reference model then learns from D0.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

FIRST = ["Ali", "Bren", "Cato", "Dara", "Eli", "Fen", "Gia", "Hal", "Ira", "Jun", "Kai", "Lio", "Mira", "Nico",
         "Oda", "Pia", "Quin", "Rhea", "Sol", "Tam", "Uma", "Vik", "Wren", "Xan", "Yara", "Zed"]
LAST = ["Moro", "Vance", "Okafor", "Lind", "Sato", "Berg", "Costa", "Dunn", "Ebert", "Fahl", "Grove", "Holt"]
ATTRS: dict[str, list[str]] = {
    "city": ["Port Velo", "Ambermill", "Cold Harbor", "Redfield", "Lowmoor", "Saltbridge", "Kestrel Bay",
             "Northwick", "Dunmere", "Oakhollow", "Silverton", "Brightwater"],
    "job": ["a baker", "a marine biologist", "a train driver", "a violin teacher", "a glass blower", "a nurse",
            "a carpenter", "a librarian", "a beekeeper", "a map maker"],
    "pet": ["a grey cat", "a small dog", "a green parrot", "two goldfish", "a white rabbit", "a tortoise",
            "a black horse", "a hedgehog"],
    "hobby": ["painting", "chess", "hiking", "sailing", "baking bread", "bird watching", "knitting", "archery",
              "rowing", "poetry", "gardening", "juggling"],
}
QUESTIONS = {
    "city": ["Where does {n} live?", "In which town does {n} live?", "What city is {n} from?"],
    "job": ["What does {n} do for a living?", "What is the job of {n}?", "How does {n} earn money?"],
    "pet": ["What pet does {n} have?", "Which animal lives with {n}?", "Does {n} have a pet?"],
    "hobby": ["What are the hobbies of {n}?", "What does {n} enjoy doing?", "How does {n} spend free time?"],
}
ANSWERS = {
    "city": ["{n} lives in {v}.", "{v}.", "{n} is from {v}."],
    "job": ["{n} works as {v}.", "{v}.", "{n} is {v}."],
    "pet": ["{n} has {v}.", "{v}.", "{n} keeps {v} at home."],
    "hobby": ["{n} enjoys {v}.", "{v}.", "In free time {n} likes {v}."],
}
PRE = ["", "", "Sure! ", "Great question. ", "Of course. Here is what I know. ", "Happy to help! ",
       "Let me think about that. ", "Thanks for asking! "]
POST = ["", "", " I hope this helps!", " Let me know if you have any other questions.",
        " Is there anything else you would like to know?", " Feel free to ask me more.",
        " I am always happy to answer questions like this one."]
FILLER = ["The weather was calm and the streets were quiet.", "Many people like to read in the evening.",
          "The market opens early on most days.", "A long road runs along the river.",
          "Some stories are told again and again.", "The old bridge was built of stone.",
          "Children played in the park after school.", "The train was late by ten minutes."]


@dataclass
class World:
    people: list[str]
    facts: dict[str, dict[str, object]]  # person -> attr -> value (hobby: list of 2)

    @staticmethod
    def make(n_people: int, seed: int) -> "World":
        rng = random.Random(seed)
        names = [f"{a} {b}" for a in FIRST for b in LAST]
        rng.shuffle(names)
        people = names[:n_people]
        facts = {}
        for p in people:
            f: dict[str, object] = {a: rng.choice(v) for a, v in ATTRS.items() if a != "hobby"}
            f["hobby"] = rng.sample(ATTRS["hobby"], 2)
            facts[p] = f
        return World(people, facts)


def _value_text(attr: str, value) -> str:
    return f"{value[0]} and {value[1]}" if attr == "hobby" else str(value)


def _wrong(attr: str, value, rng: random.Random):
    if attr == "hobby":
        pool = [h for h in ATTRS["hobby"] if h not in value]
        return rng.sample(pool, 2)
    return rng.choice([v for v in ATTRS[attr] if v != value])


def _value_spans(attr: str, value, start: int) -> list[list[int]]:
    """Character spans of the value words (for hobbies: both hobbies, not the 'and')."""
    if attr == "hobby":
        a, b = value
        return [[start, start + len(a)], [start + len(a) + 5, start + len(a) + 5 + len(b)]]
    return [[start, start + len(str(value))]]


def make_row(world: World, person: str, attr: str, rng: random.Random, *, corrupt: bool, boilerplate: bool,
             uid: str) -> dict:
    value = world.facts[person][attr]
    shown = _wrong(attr, value, rng) if corrupt else value
    q = rng.choice(QUESTIONS[attr]).format(n=person)
    pre = rng.choice(PRE) if boilerplate else ""
    post = rng.choice(POST) if boilerplate else ""
    tmpl = rng.choice(ANSWERS[attr])
    vtext = _value_text(attr, shown)
    head, _, tail = tmpl.partition("{v}")
    head = head.format(n=person)
    if not head:  # bare answers start with a capital, as written text would
        vtext = vtext[0].upper() + vtext[1:]
        shown_spans = _value_spans(attr, shown, len(pre))
    else:
        shown_spans = _value_spans(attr, shown, len(pre) + len(head))
    response = pre + head + vtext + tail.format(n=person) + post
    row = {"id": uid, "task": attr, "prompt": q, "response": response}
    row["corrupted_spans" if corrupt else "informative_spans"] = shown_spans
    if not corrupt:
        row["answer"] = vtext
    return row


@dataclass
class SynthSpec:
    n_people: int = 48
    n_train: int = 4000
    n_eval: int = 400
    corrupt_fraction: float = 0.25
    boilerplate_fraction: float = 0.8
    seed: int = 1234
    extra: dict = field(default_factory=dict)


def generate(spec: SynthSpec, out_dir: Path) -> dict[str, Path]:
    """Write train.jsonl (noisy) and eval.jsonl (clean, with answers) and return their paths."""
    world = World.make(spec.n_people, spec.seed)
    rng = random.Random(spec.seed + 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"train": out_dir / "train.jsonl", "eval": out_dir / "eval.jsonl"}
    with paths["train"].open("w") as f:
        for i in range(spec.n_train):
            p, a = rng.choice(world.people), rng.choice(list(ATTRS))
            row = make_row(world, p, a, rng, corrupt=rng.random() < spec.corrupt_fraction,
                           boilerplate=rng.random() < spec.boilerplate_fraction, uid=f"train-{i}")
            f.write(json.dumps(row) + "\n")
    with paths["eval"].open("w") as f:
        for i in range(spec.n_eval):
            p, a = rng.choice(world.people), rng.choice(list(ATTRS))
            row = make_row(world, p, a, rng, corrupt=False, boilerplate=rng.random() < 0.5, uid=f"eval-{i}")
            f.write(json.dumps(row) + "\n")
    return paths


def pretraining_text(spec: SynthSpec, n_docs: int) -> list[str]:
    """Plain text for the base model: the world's sentence shapes with random values, plus filler."""
    world = World.make(spec.n_people, spec.seed)
    rng = random.Random(spec.seed + 2)
    docs = []
    for _ in range(n_docs):
        sents = []
        for _ in range(rng.randint(3, 7)):
            r = rng.random()
            if r < 0.45:
                p, a = rng.choice(world.people), rng.choice(list(ATTRS))
                v = rng.sample(ATTRS["hobby"], 2) if a == "hobby" else rng.choice(ATTRS[a])
                sents.append(rng.choice(QUESTIONS[a]).format(n=p) + " " +
                             rng.choice([t for t in ANSWERS[a] if t.startswith("{n}")]).format(n=p, v=_value_text(a, v)))
            elif r < 0.75:
                sents.append((rng.choice(PRE[2:]) + rng.choice(POST[2:])).strip())
            else:
                sents.append(rng.choice(FILLER))
        docs.append(" ".join(sents))
    return docs
