"""maze2d: a procedural maze drawn with PIL; the agent sees a new image after every move.

The maze is a function of the row's seed (randomised depth-first search on a size x size grid). The
agent starts top-left, the goal is bottom-right. Each turn the model answers `Move: up|down|left|right`
(the last such line counts); a wall or a malformed answer leaves the agent in place. The episode ends at
the goal or when max_steps run out. Reward (extra_info.reward): "goal" (the default) is 1 at the goal, else
0; "progress" is the share of the shortest route covered, 1 - moves left / moves at the start (1 at the goal,
negative when the agent ends farther away than it began), so a group learns from episodes that get closer
before any reaches the goal. Success (`correct`) is reaching the goal either way.
"""

from __future__ import annotations

from ...data.mazes import MAX_FRAME_PX, MOVE_RE, VARIANTS, frame_part, first_prompt, goal_distances, make_maze, step
from ...errors import UserError
from .base import Env, StepResult, extra_int

REWARDS = ("goal", "progress")


class Maze2dEnv(Env):
    @classmethod
    def turn_limit(cls, record: dict) -> int:
        return extra_int(record, "max_steps", 20, 1, 1000)

    @classmethod
    def settings(cls, record: dict) -> dict:
        """A record's maze settings from its extra_info, each checked (UserError naming the record and the key)."""
        extra = record.get("extra_info") or {}
        where = f"record {record.get('id', '?')!r}: extra_info"
        out = {"seed": extra_int(record, "seed", 0, 0, 2**63 - 1), "size": extra_int(record, "maze_size", 5, 2, 64),
               "max_turns": cls.turn_limit(record), "cell": extra_int(record, "cell_px", 28, 4, 512),
               "reward": extra.get("reward", "goal"), "variant": extra.get("variant", "hard")}
        if out["reward"] not in REWARDS:
            raise UserError(f"{where}.reward must be one of {', '.join(REWARDS)}, got {str(out['reward'])[:40]!r}")
        if out["variant"] not in VARIANTS:
            raise UserError(f"{where}.variant must be one of {', '.join(VARIANTS)}, got {str(out['variant'])[:40]!r}")
        if out["size"] * out["cell"] > MAX_FRAME_PX:
            raise UserError(f"{where}: a maze of {out['size']} cells of {out['cell']} px draws frames "
                            f"{out['size'] * out['cell']} px a side; at most {MAX_FRAME_PX}")
        return out

    @classmethod
    def check_record(cls, record: dict) -> None:
        cls.settings(record)

    def reset(self, record: dict) -> list[dict]:
        self.record = record
        extra = record.get("extra_info") or {}
        s = self.settings(record)
        self.seed, self.size, self.max_turns, self.cell = s["seed"], s["size"], s["max_turns"], s["cell"]
        self.reward_mode = s["reward"]
        self.maze = make_maze(self.seed, self.size, s["variant"])
        self.distance = goal_distances(self.maze, self.size)
        self.agent, self.turn = (0, 0), 0
        return first_prompt(extra)

    def _image_part(self) -> dict:
        return frame_part(self.maze, self.size, self.agent, self.cell)

    def step(self, text: str) -> StepResult:
        self.turn += 1
        found = MOVE_RE.findall(text[-500:])
        info = {"format_ok": bool(found)}
        if found:
            move = found[-1].lower()
            if move in self.maze[self.agent]:
                self.agent = step(self.maze, self.agent, move)
                note = f"You moved {move}."
            else:
                note = f"A wall blocks {move}; you stay."
        else:
            note = "No valid move found; answer with one line like Move: up."
        reached = self.agent == (self.size - 1, self.size - 1)
        info.update(correct=reached, position=list(self.agent))
        if reached or self.turn >= self.max_turns:  # the closing frame is for reports: the model never sees it
            end = [{"role": "user", "content": [self._image_part(), {"type": "text", "text": note}]}]
            return StepResult(end, self._final_reward(reached), True,
                              {**info, "done_reason": "goal" if reached else "max_steps"})
        return StepResult([{"role": "user", "content": [self._image_part(), {"type": "text", "text": note}]}],
                          0.0, False, info)

    def _final_reward(self, reached: bool) -> float:
        if self.reward_mode == "goal" or reached:
            return float(reached)
        start = self.distance[(0, 0)]
        return 1.0 - self.distance[self.agent] / start
