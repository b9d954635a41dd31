"""maze2d: a procedural maze drawn with PIL; the agent sees a new image after every move.

The maze is a function of the row's seed (randomised depth-first search on a size x size grid). The
agent starts top-left, the goal is bottom-right. Each turn the model answers `Move: up|down|left|right`
(the last such line counts); a wall or a malformed answer leaves the agent in place. Reward 1 on reaching
the goal, else 0 when max_steps run out.
"""

from __future__ import annotations

from ...data.mazes import MOVE_RE, MOVES, frame_part, first_prompt, make_maze
from .base import Env, StepResult

class Maze2dEnv(Env):
    @classmethod
    def turn_limit(cls, record: dict) -> int:
        return int((record.get("extra_info") or {}).get("max_steps", 20))

    def reset(self, record: dict) -> list[dict]:
        self.record = record
        extra = record.get("extra_info") or {}
        self.seed, self.size = int(extra.get("seed", 0)), int(extra.get("maze_size", 5))
        self.max_turns = int(extra.get("max_steps", 20))
        self.cell = int(extra.get("cell_px", 28))
        self.maze = make_maze(self.seed, self.size)
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
                dx, dy = MOVES[move]
                self.agent = (self.agent[0] + dx, self.agent[1] + dy)
                note = f"You moved {move}."
            else:
                note = f"A wall blocks {move}; you stay."
        else:
            note = "No valid move found; answer with one line like Move: up."
        reached = self.agent == (self.size - 1, self.size - 1)
        info.update(correct=reached, position=list(self.agent))
        if reached or self.turn >= self.max_turns:
            return StepResult([], float(reached), True, {**info, "done_reason": "goal" if reached else "max_steps"})
        return StepResult([{"role": "user", "content": [self._image_part(), {"type": "text", "text": note}]}],
                          0.0, False, info)
