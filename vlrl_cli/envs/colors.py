"""colors: one turn; reward 1 when the answer names the shape's colour, and nothing else."""

from __future__ import annotations

import re

from .base import Env

WORD = re.compile(r"[a-z]+")


class ColorsEnv(Env):
    def score(self, text: str) -> tuple[float, dict]:
        truth = str(self.record["reward_spec"]["ground_truth"]).strip().lower()
        options = set(self.record.get("extra_info", {}).get("colors") or [])
        words = WORD.findall(text[:200].lower())
        named = [w for w in words if w in options] if options else words
        format_ok = len(named) == 1  # exactly one colour named
        correct = format_ok and named[0] == truth
        return float(correct), {"correct": correct, "format_ok": format_ok}
