"""Writes the demo's data: "Is N even or odd?" -> "even" / "odd", train and held-out numbers disjoint.

    python recipes/data/make_demo_data.py

Deterministic (seeded); the JSONL files it writes are committed beside it.
"""

import json
import random
from pathlib import Path

here = Path(__file__).parent
rng = random.Random(0)
numbers = rng.sample(range(10, 100000), 2200)
rows = [{"prompt": f"Is {n} even or odd? ", "completion": "even" if n % 2 == 0 else "odd"} for n in numbers]
for name, part in (("parity_train.jsonl", rows[:2000]), ("parity_eval.jsonl", rows[2000:])):
    (here / name).write_text("".join(json.dumps(r) + "\n" for r in part))
