"""A generated SFT set whose token labels are known: the embedded default's data.

Responses wrap a fictional person's attributes in boilerplate, and a known fraction carry one wrong value, so every
response token is labelled informative, boilerplate or corrupted and the demo measures precision/recall exactly.
The world and its pretraining text: docs/design.md ("The embedded default").
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from tokenclean.config import EmbeddedConfig

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
    def make(n_people: int, seed: int) -> World:
        rng = random.Random(seed)
        names = [f"{a} {b}" for a in FIRST for b in LAST]
        rng.shuffle(names)
        return World(names[:n_people], {}).randomized(rng)

    def randomized(self, rng: random.Random) -> World:
        """Same people, freshly drawn facts."""
        facts = {}
        for p in self.people:
            f: dict[str, object] = {a: rng.choice(v) for a, v in ATTRS.items() if a != "hobby"}
            f["hobby"] = rng.sample(ATTRS["hobby"], 2)
            facts[p] = f
        return World(self.people, facts)


PROFILE_QUESTIONS = ["Tell me about {n}.", "Who is {n}?", "What do you know about {n}?", "Describe {n}."]


def _wrong(attr: str, value: str, rng: random.Random, avoid=()) -> str:
    return rng.choice([v for v in ATTRS[attr] if v != value and v not in avoid])


def _join(pieces: list[tuple[str, int]]) -> tuple[str, list[list[int]], list[list[int]]]:
    """Concatenate (text, label) pieces; label 1 = true fact, 2 = corrupted fact, 0 = other."""
    text, good, bad, pos = "", [], [], 0
    for piece, label in pieces:
        if label == 1:
            good.append([pos, pos + len(piece)])
        elif label == 2:
            bad.append([pos, pos + len(piece)])
        text += piece
        pos += len(piece)
    return text, good, bad


def make_row(world: World, person: str, kind: str, rng: random.Random, *, corrupt: bool, boilerplate: bool,
             uid: str) -> dict:
    """One SFT row. ``kind`` is an attribute (single-fact question) or 'profile' (all facts).

    A corrupted row has exactly one wrong value; its other values stay true, which is
    the case token-level cleaning handles and sample-level filtering cannot.
    """
    facts = world.facts[person]
    slots = [("city", facts["city"]), ("job", facts["job"]), ("pet", facts["pet"]),
             ("hobby", facts["hobby"][0]), ("hobby", facts["hobby"][1])]
    if kind == "profile":
        q = rng.choice(PROFILE_QUESTIONS).format(n=person)
        frame = [f"{person} lives in ", 0, ", works as ", 1, ", has ", 2, " and enjoys ", 3, " and ", 4, "."]
        used = [0, 1, 2, 3, 4]
    else:
        q = rng.choice(QUESTIONS[kind]).format(n=person)
        tmpl = rng.choice(ANSWERS[kind])
        used = [3, 4] if kind == "hobby" else [[s[0] for s in slots].index(kind)]
        head, _, tail = tmpl.partition("{v}")
        vals: list = [used[0]] if kind != "hobby" else [3, " and ", 4]
        frame = ([head.format(n=person)] if head else []) + vals + [tail.format(n=person)]
    bad_slot = rng.choice(used) if corrupt else None
    pieces: list[tuple[str, int]] = [(rng.choice(PRE) if boilerplate else "", 0)]
    for item in frame:
        if isinstance(item, str):
            pieces.append((item, 0))
            continue
        attr, value = slots[item]
        label = 1
        if item == bad_slot:
            value, label = _wrong(attr, value, rng, avoid=facts["hobby"] if attr == "hobby" else ()), 2
        if len(pieces) == 1:
            value = value[0].upper() + value[1:]  # a bare answer starts the sentence
        pieces.append((value, label))
    pieces.append((rng.choice(POST) if boilerplate else "", 0))
    response, good, bad = _join(pieces)
    row = {"id": uid, "task": kind, "prompt": q, "response": response, "informative_spans": good}
    if bad:
        row["corrupted_spans"] = bad
    if kind != "profile" and not corrupt:
        row["answer"] = "".join(p for p, lab in pieces if lab == 1) if kind != "hobby" else \
            response[good[0][0]:good[-1][1]]
    return row


_DEMO = EmbeddedConfig()  # the demo's sizes are stated once, in the config


@dataclass
class SynthSpec:
    n_people: int = _DEMO.n_people
    n_train: int = _DEMO.n_train
    n_eval: int = _DEMO.n_eval
    corrupt_fraction: float = _DEMO.corrupt_fraction
    boilerplate_fraction: float = 0.5
    seed: int = _DEMO.seed
    extra: dict = field(default_factory=dict)


def generate(spec: SynthSpec, out_dir: Path) -> dict[str, Path]:
    """Write train.jsonl (noisy) and eval.jsonl (clean, with answers) and return their paths."""
    world = World.make(spec.n_people, spec.seed)
    rng = random.Random(spec.seed + 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"train": out_dir / "train.jsonl", "eval": out_dir / "eval.jsonl"}
    kinds = list(ATTRS) + ["profile"] * len(ATTRS)
    with paths["train"].open("w") as f:
        for i in range(spec.n_train):
            p, a = rng.choice(world.people), rng.choice(kinds)
            row = make_row(world, p, a, rng, corrupt=rng.random() < spec.corrupt_fraction,
                           boilerplate=rng.random() < spec.boilerplate_fraction, uid=f"train-{i}")
            f.write(json.dumps(row) + "\n")
    with paths["eval"].open("w") as f:
        for i in range(spec.n_eval):
            p, a = rng.choice(world.people), rng.choice(list(ATTRS))
            row = make_row(world, p, a, rng, corrupt=False, boilerplate=rng.random() < 0.5, uid=f"eval-{i}")
            f.write(json.dumps(row) + "\n")
    return paths


def pretraining_text(spec: SynthSpec, n_docs: int, eos: str = "</s>") -> list[str]:
    """Text for the base model: chat transcripts of the same shape with *random* facts, plus prose, so that the
    tiny base knows the chat format and the value vocabulary, as a real base does, but not the facts."""
    from tokenclean.tasks.template import render_tulu

    world = World.make(spec.n_people, spec.seed)
    rng = random.Random(spec.seed + 2)
    kinds = list(ATTRS) + ["profile"] * len(ATTRS)
    docs = []
    for _ in range(n_docs):
        if rng.random() < 0.75:
            noise = world.randomized(rng)
            turns = []
            for _ in range(rng.randint(1, 3)):
                row = make_row(noise, rng.choice(noise.people), rng.choice(kinds), rng, corrupt=False,
                               boilerplate=rng.random() < spec.boilerplate_fraction, uid="")
                turns += [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
            docs.append(render_tulu(turns, eos).text)
        else:
            sents = [rng.choice(FILLER) if rng.random() < 0.6 else (rng.choice(PRE[2:]) + rng.choice(POST[2:])).strip()
                     for _ in range(rng.randint(3, 7))]
            docs.append(" ".join(sents))
    return docs
