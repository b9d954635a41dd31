"""What the time limit on environment calls costs: a trivial step through env_call, unbounded and bounded.

    .venv/bin/python bench/env_call_overhead.py
"""
import time
from vlrl_cli.rollout import episodes
from vlrl_cli.rollout.envs.base import Env, StepResult
class E(Env):
    def reset(self, r): return r["prompt"]
    def step(self, t): return StepResult([], 1.0, False, {})
rec = {"id": "a", "env_class": "x", "prompt": [{"role": "user", "content": "hi"}]}
env = E()
for limit in (None, 60.0):
    E.time_limit_s = limit
    t = time.perf_counter()
    for _ in range(5000):
        episodes.env_call(env, "step", rec, "up")
    print(limit, (time.perf_counter() - t) / 5000 * 1e6, "us per call")
