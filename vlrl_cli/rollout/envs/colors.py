"""colors: one turn; reward 1 when the answer names the shape's colour, and nothing else."""

from __future__ import annotations

import re

from ...data.records import ground_truths
from .base import Env

WORD = re.compile(r"[a-z]+")


class ColorsEnv(Env):
    observation_images = 0  # its observations are text
    def score(self, text: str) -> tuple[float, dict]:
        truths = {t.strip().lower() for t in ground_truths(self.record)}
        options = set(self.record.get("extra_info", {}).get("colors") or [])
        words = WORD.findall(text[:200].lower())
        named = [w for w in words if w in options] if options else words
        format_ok = len(named) == 1  # exactly one colour named
        correct = format_ok and named[0] in truths
        return float(correct), {"correct": correct, "format_ok": format_ok}
