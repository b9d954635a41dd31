"""geometry3k: grade the last \\boxed{} answer; optionally a multi-turn "check answer" tool with k tries.

With `tries > 1`, a wrong boxed answer gets the observation "incorrect, try again" and the episode goes
on; the reward is 1 for a correct answer at any try, and `first_try_correct` is reported apart.
"""

from __future__ import annotations

from ...data.records import ground_truths
from ..rewards import grade_any
from .base import Env, StepResult


class Geometry3kEnv(Env):
    observation_images = 0  # its observations are text
    def __init__(self, tries: int = 1):
        self.max_turns = tries

    def step(self, text: str) -> StepResult:
        self.turn += 1
        g = grade_any(text, ground_truths(self.record))
        info = {"correct": g.correct, "format_ok": g.format_ok, "grade": g.reason,
                "first_try_correct": g.correct and self.turn == 1}
        if g.correct or self.turn >= self.max_turns:
            return StepResult([], float(g.correct), True, {**info, "done_reason": "answered" if g.correct else "out_of_tries"})
        hint = "Your answer is incorrect. Try again; put the final answer in \\boxed{}." if g.format_ok else \
            "No \\boxed{} answer found. Put the final answer in \\boxed{}."
        return StepResult([{"role": "user", "content": [{"type": "text", "text": hint}]}], 0.0, False, info)
