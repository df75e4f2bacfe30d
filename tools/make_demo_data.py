"""Write qosora/data/demo.jsonl: a small generated task of our own for the README's first command.

Two-digit arithmetic with the worked answer in GSM8K's format (`... #### n`), as {"prompt", "completion"}
records, so `qosora eval --metric exact-match` works on it too. Deterministic (seed 0); no external data.

    python tools/make_demo_data.py [--n 400] [--out qosora/data/demo.jsonl]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def make(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op = rng.choice("+-*")
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        word = {"+": "plus", "-": "minus", "*": "times"}[op]
        rows.append({"prompt": f"What is {a} {word} {b}?\n", "completion": f"{a} {op} {b} = {value}\n#### {value}"})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "qosora" / "data" / "demo.jsonl"))
    args = p.parse_args()
    rows = make(args.n, args.seed)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} records to {args.out}")


if __name__ == "__main__":
    main()
