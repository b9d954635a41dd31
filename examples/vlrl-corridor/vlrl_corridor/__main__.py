"""python -m vlrl_corridor OUT: write OUT/train.jsonl (200 records) and OUT/val.jsonl (20, fixed seed)."""

import json
import sys
from pathlib import Path

from . import make_records

out = Path(sys.argv[1] if len(sys.argv) > 1 else "data/corridor")
out.mkdir(parents=True, exist_ok=True)
for split, n, seed in (("train", 200, 0), ("val", 20, 1_000_000)):
    with open(out / f"{split}.jsonl", "w") as f:
        for r in make_records(n, seed, split):
            f.write(json.dumps(r) + "\n")
print(f"wrote {out}/train.jsonl and {out}/val.jsonl")
