"""The environment interface: reset(record) -> first messages; step(text) -> StepResult.

An environment owns one episode. Observations are chat messages (text and/or images as data URIs),
appended to the context by the rollout loop. Model text is hostile input: environments parse it with
bounded regular expressions and never evaluate it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def is_count(value, least: int = 0) -> bool:
    """A whole number >= least, as an environment's turn limits and image counts must be (True is not one,
    though Python counts a bool as an int)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def is_time_limit(value) -> bool:
    """An environment's time_limit_s: a number of seconds > 0, or None (no limit)."""
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0)


def extra_int(record: dict, key: str, default: int | None, lo: int, hi: int) -> int | None:
    """An integer setting of a record's extra_info (a maze's size, a turn limit), or a UserError naming the
    record and the key: a row's "four" or 10**6 is its own mistake, not an internal error or an endless maze."""
    from ...errors import UserError

    value = (record.get("extra_info") or {}).get(key)
    if value is None:
        return default
    if not (is_count(value, lo) and value <= hi):
        raise UserError(f"record {record.get('id', '?')!r}: extra_info.{key} must be an integer in {lo}..{hi}, "
                        f"got {str(value)[:40]!r}")
    return value


@dataclass
class StepResult:
    observation: list[dict]  # messages to append; when done, never appended (its images show in reports)
    reward: float
    done: bool
    info: dict = field(default_factory=dict)  # correct, format_ok, done_reason, ... (reported in metrics)


class Env:
    """Base class: single-turn environments implement only `score`."""

    max_turns = 1
    observation_images = 1  # the most images one observation adds to the context (sizes the engine's image limit)
    # the longest one call (start, reset, step) may take before its record's episode fails as "did not return";
    # an environment that waits on something slow (a browser, a simulator) sets its own; None: no limit
    time_limit_s: float | None = 60.0

    @classmethod
    def turn_limit(cls, record: dict) -> int:
        """The most turns an episode of this record can take (before the episode starts)."""
        return cls.max_turns

    @classmethod
    def check_record(cls, record: dict) -> None:
        """Refuse a record this environment cannot play (a UserError naming the record and the key), without
        starting an episode: validate asks it of every row. An environment with settings of its own checks them."""
        cls.turn_limit(record)

    def reset(self, record: dict) -> list[dict]:
        self.record = record
        self.turn = 0
        return record["prompt"]

    def step(self, text: str) -> StepResult:
        self.turn += 1
        reward, info = self.score(text)
        return StepResult([], reward, True, {**info, "done_reason": "answered"})

    def score(self, text: str) -> tuple[float, dict]:
        raise NotImplementedError
