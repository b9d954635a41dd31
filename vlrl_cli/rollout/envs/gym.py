"""Any gymnasium environment as a multi-turn image environment, with no glue code: every frame its `render()`
returns (an RGB array) goes into the context as an image, the model's text is parsed into an action, and the
episode's reward is the sum of its rewards.

Records name it as env_class `gymnasium:ID`, where ID is what `gymnasium.make` takes (a registered id, or
`mypkg.envs:Corridor-v0`, which imports `mypkg.envs` first so that it registers itself). Its `extra_info` may set:
    actions       the names of a Discrete action space, in order; the last name the answer mentions is the action
    action_parser "module:function": function(text, env) -> an action, or None when the text names none
    instruction   the text beside the first frame (default: lists the action names)
    seed          the reset's seed (a fixed one for validation episodes)
    max_steps     turns allowed (default 20)
    env_kwargs    keyword arguments for gymnasium.make
Needs `pip install gymnasium`. Model text is parsed by a bounded regular expression, never evaluated.
"""

from __future__ import annotations

import importlib
import re

from ...errors import UserError
from .base import Env, StepResult, extra_int


def _image_part(frame) -> dict:
    from PIL import Image

    from ...data.images import canonicalize

    return {"type": "image_url", "image_url": {"url": canonicalize(Image.fromarray(frame).convert("RGB")).data_uri}}


class GymEnv(Env):
    """One gymnasium episode; `gym_id` is set on the subclass `gym_env_class` makes for each id."""

    gym_id = ""
    observation_images = 1

    @classmethod
    def turn_limit(cls, record: dict) -> int:
        return extra_int(record, "max_steps", 20, 1, 100_000)

    def reset(self, record: dict) -> list[dict]:
        try:
            import gymnasium
        except ImportError:
            raise UserError(f"env_class gymnasium:{self.gym_id} needs gymnasium: pip install gymnasium") from None
        self.record, self.turn, self.total = record, 0, 0.0
        extra = record.get("extra_info") or {}
        self.max_turns = self.turn_limit(record)
        self.env = gymnasium.make(self.gym_id, render_mode="rgb_array", **(extra.get("env_kwargs") or {}))
        self.env.reset(seed=extra_int(record, "seed", None, 0, 2**63 - 1))
        self.actions = list(extra.get("actions") or [])
        self.parser = _load_parser(extra.get("action_parser")) if extra.get("action_parser") else None
        if self.parser is None and not self.actions:
            raise UserError(f"gymnasium:{self.gym_id}: a record needs extra_info.actions (the action names) or "
                            "extra_info.action_parser (module:function)")
        self.pattern = re.compile(r"\b(" + "|".join(re.escape(a) for a in self.actions) + r")\b", re.I) if self.actions else None
        text = extra.get("instruction") or f"Answer with one action: {', '.join(self.actions)}."
        return [{"role": "user", "content": [_image_part(self.env.render()), {"type": "text", "text": text}]}]

    def parse(self, text: str):
        if self.parser is not None:
            return self.parser(text, self.env)
        found = self.pattern.findall(text[-2000:])
        if not found:
            return None
        names = [a.lower() for a in self.actions]
        return names.index(found[-1].lower())

    def step(self, text: str) -> StepResult:
        self.turn += 1
        action = self.parse(text)
        terminated = truncated = False
        if action is None:
            note = f"No action found; answer with one of: {', '.join(self.actions) or 'a valid action'}."
        else:
            _, reward, terminated, truncated, _ = self.env.step(action)
            self.total += float(reward)
            note = f"Reward {float(reward):g}."
        info = {"format_ok": action is not None, "correct": bool(terminated and self.total > 0)}
        if terminated or truncated or self.turn >= self.max_turns:
            self.env.close()
            reason = "terminated" if terminated else "truncated" if truncated else "max_steps"
            return StepResult([], self.total, True, {**info, "done_reason": reason})
        return StepResult([{"role": "user", "content": [_image_part(self.env.render()), {"type": "text", "text": note}]}],
                          0.0, False, info)


def _load_parser(target: str):
    module, _, attr = str(target).partition(":")
    fn = getattr(importlib.import_module(module), attr, None)
    if not callable(fn):
        raise UserError(f"extra_info.action_parser {target!r}: not a function (module:function)")
    return fn


_CLASSES: dict[str, type] = {}


def _check_gym_id(gym_id: str) -> None:
    """UserError unless gymnasium.make could find `gym_id` (`ID`, or `module:ID`, which imports module first)."""
    try:
        import gymnasium
    except ImportError:
        raise UserError(f"env_class gymnasium:{gym_id} needs gymnasium: pip install gymnasium") from None
    module, _, name = gym_id.rpartition(":")
    if module:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            raise UserError(f"env_class gymnasium:{gym_id}: cannot import {module!r} ({e}); install its package, or "
                            "run from the folder that holds it (or put that folder on PYTHONPATH)") from None
        except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's module failed while importing: name it
            raise UserError(f"env_class gymnasium:{gym_id}: importing {module!r} failed: {type(e).__name__}: {e}") from None
    try:
        gymnasium.spec(name)
    except gymnasium.error.Error as e:
        raise UserError(f"env_class gymnasium:{gym_id}: {e}") from None


def gym_env_class(gym_id: str) -> type:
    """The environment class for one gymnasium id (made once per id), once the id is known to gymnasium: a typo in
    its module or name is found where the id is first read (validate, train's start), not in the first rollout."""
    if gym_id not in _CLASSES:
        _check_gym_id(gym_id)
        _CLASSES[gym_id] = type(f"Gym[{gym_id}]", (GymEnv,), {"gym_id": gym_id})
    return _CLASSES[gym_id]
