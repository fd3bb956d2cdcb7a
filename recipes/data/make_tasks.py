"""Write the small tasks with references (and RL4LMs' two synthetic tasks) next to this file.

- data2text-train.jsonl / data2text-test.jsonl: restaurant facts -> one sentence (an E2E-style data-to-text
  task): `prompt`, `references` (3 phrasings written from the facts), `meta` (the facts).
- increasing_numbers.jsonl: prompts asking for numbers; RL4LMs' reward counts the leading increasing run.
- dates.jsonl: prompts asking for a sentence (a third show an example date); RL4LMs' reward is 1 when
  it holds a YYYY-MM-DD date.

Deterministic (fixed seed, no network); the texts are written here and released as CC0 (public domain).
Run from anywhere: `python recipes/data/make_tasks.py`.
"""
from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent
SEED = 4321

NAMES = ["The Olive Tree", "Blue Door", "Copper Kettle", "The Green Fig", "Saffron House", "Harbor Lights",
         "The Little Oak", "Maple Corner", "Red Lantern", "The Golden Pear", "Stone Bridge", "Juniper",
         "The Wandering Goat", "Silver Spoon", "Cedar Hall", "The Quiet Fox"]
FOODS = ["Italian", "Indian", "Japanese", "French", "Mexican", "Greek", "Thai", "Chinese"]
AREAS = [("riverside", "by the river"), ("city centre", "in the city centre"), ("old town", "in the old town"),
         ("harbour", "near the harbour")]
PRICES = [("cheap", "cheap", "low prices"), ("moderate", "moderately priced", "moderate prices"),
          ("high", "expensive", "high prices")]
FAMILY = [("yes", "family-friendly", "welcomes children"), ("no", "not family-friendly", "is not for children")]
FORMS = ["Describe this restaurant in one sentence: {facts}", "Write one sentence for a guide from these facts: {facts}",
         "Turn these facts into a sentence: {facts}"]


def _row(name, food, area, price, family, form):
    facts = f"name={name}; food={food}; area={area[0]}; price={price[0]}; family={family[0]}"
    refs = [
        f"{name} is {'an' if price[1][0] in 'aeiou' else 'a'} {price[1]} {food} restaurant {area[1]} that is {family[1]}.",
        f"{area[1].capitalize()}, {name} serves {food} food at {price[2]} and {family[2]}.",
        f"For {food} food at {price[2]}, try {name} {area[1]}; it {family[2]}.",
    ]
    return {"prompt": form.format(facts=facts), "references": refs,
            "meta": {"name": name, "food": food, "area": area[0], "price": price[0], "family": family[0]}}


def data2text(rng: random.Random) -> tuple[list[dict], list[dict]]:
    grid = list(itertools.product(NAMES, FOODS, AREAS, PRICES, FAMILY))
    rng.shuffle(grid)
    rows = [_row(*g, rng.choice(FORMS)) for g in grid[:240]]
    return rows[:200], rows[200:]


def increasing_numbers(rng: random.Random) -> list[dict]:
    forms = ["Write a list of numbers.", "Count upward from {n}.", "Write {k} numbers.", "List some numbers after {n}.",
             "Give me numbers in a row, starting at {n}."]
    rows, seen = [], set()
    while len(rows) < 100:
        text = rng.choice(forms).format(n=rng.randint(0, 50), k=rng.randint(3, 9))
        if text not in seen:
            seen.add(text)
            rows.append({"prompt": text})
    return rows


def dates(rng: random.Random) -> list[dict]:
    """A third of the prompts show a date in the rewarded form (a 135M model then writes one about half the
    time), a third ask for a date in other words, a third do not ask: RL has a signal to start from and
    the evaluation shows whether the habit spreads to the prompts that give no example."""
    topics = ["a birthday", "a holiday", "a meeting", "a concert", "a trip", "a deadline", "a wedding", "a launch",
              "a game", "a festival", "an exam", "a move", "a visit", "a dinner", "a release", "a race"]
    shown = ["Write a sentence about {t} with its date (like {d}).", "When is {t}? Give the date like {d}."]
    asked = ["Tell me about {t} in one line, with its date.", "Mention the day of {t}."]
    plain = ["Write a sentence about {t}.", "When is {t}? Answer in one sentence."]
    rows = []
    for t in topics:
        for f in shown + asked + plain:
            d = f"{rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
            rows.append({"prompt": f.format(t=t, d=d)})
    rng.shuffle(rows)
    return rows


def _write(name: str, rows: list[dict]) -> None:
    with open(OUT / name, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    rng = random.Random(SEED)
    train, test = data2text(rng)
    _write("data2text-train.jsonl", train)
    _write("data2text-test.jsonl", test)
    _write("increasing_numbers.jsonl", increasing_numbers(rng))
    _write("dates.jsonl", dates(rng))


if __name__ == "__main__":
    main()
