"""Writes the tiny corpus, probe set and tokenizer that configs/corpus_tiny.toml ships with
(configs/corpus_tiny/): procedurally generated documents in three groups (arithmetic facts, short
stories, small Python functions), prompt -> target probes of each group's regularity (the sum, the found
object, the operator), then a byte-level BPE tokenizer trained on the documents. Deterministic:
rerunning rewrites the same files. `python scripts/make_corpus_fixture.py`"""
import json
import random
from pathlib import Path

from capshape.tasks.corpus import train_tokenizer

OUT = Path(__file__).resolve().parent.parent / "configs" / "corpus_tiny"
NAMES = ["Mia", "Tom", "Ana", "Leo", "Sara", "Ben", "Ivy", "Max"]
THINGS = ["ball", "kite", "book", "cup", "hat", "box", "shell", "key"]
COLOURS = ["red", "blue", "green", "small", "old", "shiny"]
PLACES = ["garden", "kitchen", "park", "school", "beach", "attic"]
OPS = [("plus", lambda a, b: a + b), ("minus", lambda a, b: a - b), ("times", lambda a, b: a * b)]
FUNCS = [("add", "+"), ("sub", "-"), ("mul", "*")]


def arithmetic(rng: random.Random) -> str:
    facts = []
    for _ in range(rng.randint(4, 8)):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        word, fn = rng.choice(OPS)
        facts.append(f"{a} {word} {b} is {fn(a, b)}.")
    return " ".join(facts)


def story(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    thing, colour, place = rng.choice(THINGS), rng.choice(COLOURS), rng.choice(PLACES)
    lines = [f"{a} found a {colour} {thing} in the {place}.", f"{a} showed the {thing} to {b}.",
             f"{b} smiled and said it was the best {thing} in the {place}.", f"Then {a} and {b} went home."]
    return " ".join(lines[:rng.randint(2, 4)])


def code(rng: random.Random) -> str:
    name, op = rng.choice(FUNCS)
    x, y = rng.sample("abxyzn", 2)
    body = [f"def {name}({x}, {y}):", f"    return {x} {op} {y}", "", f"print({name}({rng.randint(0, 9)}, {rng.randint(0, 9)}))"]
    return "\n".join(body)


def probes(rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(40):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        word, fn = rng.choice(OPS)
        rows.append({"prompt": f"{a} {word} {b} is", "target": f" {fn(a, b)}.", "group": "arithmetic"})
        name, other, thing = rng.choice(NAMES), rng.choice(NAMES), rng.choice(THINGS)
        rows.append({"prompt": f"{name} found a {rng.choice(COLOURS)} {thing} in the {rng.choice(PLACES)}. {name} showed the",
                     "target": f" {thing}", "group": "stories"})
        func, op = rng.choice(FUNCS)
        x, y = rng.sample("abxyzn", 2)
        rows.append({"prompt": f"def {func}({x}, {y}):\n    return {x}", "target": f" {op} {y}", "group": "code"})
    return rows


def main() -> None:
    rng = random.Random(0)
    OUT.mkdir(parents=True, exist_ok=True)
    rows = [{"text": make(rng), "group": group} for group, make in (("arithmetic", arithmetic), ("stories", story),
                                                                     ("code", code)) for _ in range(150)]
    rng.shuffle(rows)
    corpus = OUT / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(row) + "\n" for row in rows))
    probe_file = OUT / "probes.jsonl"
    probe_file.write_text("".join(json.dumps(row) + "\n" for row in probes(random.Random(1))))
    train_tokenizer([corpus], OUT / "tokenizer", vocab_size=300)
    print(f"wrote {corpus} ({len(rows)} documents), {probe_file} and {OUT / 'tokenizer'}")


if __name__ == "__main__":
    main()
