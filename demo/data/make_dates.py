"""Writes dates_train.jsonl and dates_heldout.jsonl: dates in words -> ISO 8601 (YYYY-MM-DD), fixed seed.

The two files hold different dates (no (year, month, day) twice); both use the same three question
phrasings and two word orders, so the held-out questions test the rule, not memory.

    python demo/data/make_dates.py
"""

import json
import random
from pathlib import Path

MONTHS = "January February March April May June July August September October November December".split()
PHRASINGS = ["Write {} as an ISO date.", "Convert {} to YYYY-MM-DD.", "What is {} in ISO 8601 format?"]


def main() -> None:
    rng = random.Random(14)
    seen: set[tuple[int, int, int]] = set()
    rows: list[dict[str, str]] = []
    while len(rows) < 96:
        y, m, d = rng.randint(1900, 2030), rng.randint(1, 12), rng.randint(1, 28)
        if (y, m, d) in seen:
            continue
        seen.add((y, m, d))
        words = f"{MONTHS[m - 1]} {d}, {y}" if len(rows) % 2 == 0 else f"{d} {MONTHS[m - 1]} {y}"
        question = PHRASINGS[len(rows) % 3].format(words)
        rows.append({"instruction": question, "input": "", "output": f"{y:04d}-{m:02d}-{d:02d}"})
    here = Path(__file__).parent
    for name, part in (("dates_train.jsonl", rows[:72]), ("dates_heldout.jsonl", rows[72:])):
        (here / name).write_text("".join(json.dumps(r) + "\n" for r in part))


if __name__ == "__main__":
    main()
