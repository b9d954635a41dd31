"""Collect `bench/device_runs.sh recipe` rows (recipe_NAME.json, brought back from the device) into
bench/results/recipes.json: one entry per shipped recipe, with the device, the command and the commit.

    python3 bench/recipe_results.py DIR --commit abc1234 [--note "..."]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "recipes.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--commit", required=True)
    ap.add_argument("--note", default="")
    a = ap.parse_args()
    table = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for path in sorted(Path(a.dir).glob("recipe_*.json")):
        row = json.loads(path.read_text())
        name = row.get("name") or Path(row["recipe"]).stem
        row["commit"] = a.commit
        row["command"] = (f"PROMPTS={row['shape']['prompts_per_step']} STEPS={len(row['steps']) or '?'} "
                          f"GPU_GB={row['gpu_gb_cap'] or ''} bash bench/device_runs.sh recipe {name}")
        if row.get("sets"):  # a shipped recipe's shape on another released size
            row["command"] = (f"python3 bench/recipe_shape.py {row['recipe']} --prompts {row['shape']['prompts_per_step']} "
                              f"--steps {len(row['steps']) or '?'} --gpu-gb {row['gpu_gb_cap'] or ''} "
                              + " ".join(f"--set {s}" for s in row["sets"]) + " --out $OUT/recipe_NAME.json")
        if a.note:
            row["note"] = a.note
        table[name] = row
    shipped = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
    missing = [n for n in shipped if n not in table]
    RESULTS.write_text(json.dumps(dict(sorted(table.items())), indent=2) + "\n")
    print(json.dumps({"rows": len(table), "passed": sorted(n for n, r in table.items() if r.get("passed")),
                      "missing": missing}, indent=2))


if __name__ == "__main__":
    main()
