import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vlrl_cli.rollout.envs import resolve_env
from vlrl_cli.rollout.envs.maze2d import Maze2dEnv
from vlrl_cli.data.mazes import make_maze, shortest_moves as solve
from vlrl_cli.data.images import image_from_uri
from vlrl_cli.rollout.rewards import grade_boxed, to_number
from vlrl_process import run_vlrl


@pytest.mark.parametrize("text,truth", [
    ("so x = \\boxed{12}", "12"),
    ("\\boxed{12.0}", "12"),
    ("\\boxed{\\frac{2\\sqrt{2}}{5}}", "\\frac { 2 \\sqrt { 2 } } { 5 }"),
    ("\\boxed{\\dfrac{\\sqrt{2}}{10}}", "\\frac { \\sqrt { 2 } } { 10 }"),
    ("\\boxed{5\\sqrt{3}}", "5 \\sqrt { 3 }"),
    ("\\boxed{60^\\circ}", "60"),
    ("\\boxed{ 0.28284 }", "\\frac{2\\sqrt{2}}{10}"),
    ("\\boxed{2\\pi}", "6.28319"),
    ("first \\boxed{3} then \\boxed{13.5}", "13.5"),
])
def test_equivalent_forms_are_correct(text, truth):
    g = grade_boxed(text, truth)
    assert g.correct and g.format_ok, g


@pytest.mark.parametrize("text,truth,reason", [
    ("the answer is 12", "12", "no_boxed"),
    ("\\boxed{13}", "12", "mismatch"),
    ("\\boxed{x + }", "12", "unparsed"),
    ("\\boxed{__import__('os').system('echo hi')}", "12", "unparsed"),
    ("\\boxed{12", "12", "no_boxed"),
])
def test_wrong_or_malformed_answers(text, truth, reason):
    g = grade_boxed(text, truth)
    assert not g.correct and g.reason == reason, g


def test_model_text_is_never_evaluated():
    with pytest.raises(ValueError):
        to_number("open('x')")
    assert to_number("\\frac{1}{2}") == 0.5


def test_pathological_inputs_return_in_bounded_time():
    t = time.time()
    for text in ("\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}", "\\boxed{9^{9^{9^{9^{9}}}}}",
                 "\\boxed{" + "1" * 150 + "^" + "9" * 40 + "}", "x" * 1_000_000, "\\boxed{" + "(" * 90 + "1" + ")" * 90 + "}",
                 "\\boxed{" + "\\sqrt{" * 60 + "2" + "}" * 60 + "}", "\\boxed{" + "2^" * 90 + "2}"):
        assert not grade_boxed(text, "12").correct
    assert time.time() - t < 5


# what real models write for Geometry3K-style problems; the truth as the dataset gives it
REALISTIC = [
    ("Find x. ... so \\boxed{x = 5}", "5", True),
    ("\\boxed{x=\\frac{40}{3}}", "\\frac{40}{3}", True),
    ("\\boxed{y = 2\\sqrt{3}}", "2\\sqrt{3}", True),
    ("\\boxed{m \\angle ABC = 60^\\circ}", "60", True),
    ("\\boxed{AB \\approx 7.21}", "7.21", True),
    ("\\boxed{12 \\mathrm{cm}}", "12", True),
    ("\\boxed{48 \\mathrm{cm}^2}", "48", True),
    ("\\boxed{48 \\text{ cm}^{2}}", "48", True),
    ("\\boxed{25 \\text{ square units}}", "25", True),
    ("\\boxed{36\\text{ ft}}", "36", True),
    ("\\boxed{2\\sqrt{13}}", "7.21", True),  # the truth is the exact value rounded to 2 decimals
    ("\\boxed{\\frac{36}{5}}", "7.2", True),
    ("\\boxed{\\sqrt{52}}", "7.2", True),  # 7.2111 rounds to 7.2 at the truth's precision
    ("\\boxed{7.3}", "7.2", False),
    ("\\boxed{7.26}", "7.2", False),
    ("\\boxed{2\\sqrt{13}}", "7.2111", True),  # 4 decimals: no rounding rule, but within rel 1e-4
    ("\\boxed{x = 4}", "5", False),
    ("\\boxed{\\frac{5}{2}}", "2.5", True),
    ("\\boxed{45^{\\circ}}", "45", True),
    ("\\boxed{45 \\text{ degrees}}", "45", True),
    ("\\boxed{3\\pi}", "9.42", True),
    ("\\boxed{\\$12}", "12", False),
    ("\\boxed{}", "", False),
    ("\\boxed{ }", " ", False),
]


@pytest.mark.parametrize("text,truth,correct", REALISTIC)
def test_realistic_answer_forms(text, truth, correct):
    g = grade_boxed(text, truth)
    assert g.correct == correct, g


def test_empty_and_non_string_inputs_are_graded_or_refused_cleanly():
    assert grade_boxed("\\boxed{}", "").correct is False
    assert grade_boxed("\\boxed{}", "").reason == "no_truth"
    assert grade_boxed("\\boxed{12}", 12).correct is True  # a numeric truth is a truth
    assert grade_boxed("\\boxed{12.5}", 12.5).correct is True
    for truth in (None, [], {}, True):
        g = grade_boxed("\\boxed{12}", truth)
        assert g.correct is False and g.reason == "no_truth"
    for text in (None, 12, b"\\boxed{12}", ["\\boxed{12}"]):
        g = grade_boxed(text, "12")
        assert g.correct is False and g.reason == "not_text"


def _grade_in_worker(args):
    return grade_boxed(*args).correct


def test_grade_boxed_works_in_a_pool_worker_and_a_script_without_main_guard(tmp_path):
    import multiprocessing
    import subprocess
    import sys

    with multiprocessing.get_context("spawn").Pool(2) as pool:
        assert pool.map(_grade_in_worker, [("\\boxed{\\frac{1}{2}}", "0.5"), ("\\boxed{3}", "4")]) == [True, False]
    script = tmp_path / "reward.py"  # a user's reward script: no `if __name__ == "__main__":`
    script.write_text("from vlrl_cli.rollout.rewards import grade_boxed\nprint(grade_boxed('\\\\boxed{\\\\sqrt{4}}', '2').correct)\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr[-2000:]


def test_geometry_multi_turn_tries():
    env = resolve_env("geometry3k")(tries=2)
    env.reset({"prompt": [], "env_class": "geometry3k", "reward_spec": {"method": "rule", "ground_truth": "5"}})
    r1 = env.step("\\boxed{4}")
    assert not r1.done and r1.reward == 0 and "incorrect" in r1.observation[0]["content"][0]["text"]
    r2 = env.step("\\boxed{5}")
    assert r2.done and r2.reward == 1 and not r2.info["first_try_correct"]


def test_colors_env_needs_exactly_one_colour():
    env = resolve_env("colors")()
    rec = {"prompt": [], "env_class": "colors", "reward_spec": {"method": "rule", "ground_truth": "red"},
           "extra_info": {"colors": ["red", "green", "blue", "yellow"]}}
    for text, reward in (("red", 1), ("Red.", 1), ("red or blue", 0), ("blue", 0), ("", 0)):
        env.reset(rec)
        assert env.step(text).reward == reward, text


def test_maze_rules():
    rec = {"prompt": [], "env_class": "maze2d", "reward_spec": {"method": "env"},
           "extra_info": {"seed": 3, "maze_size": 4, "max_steps": 30}}
    env = Maze2dEnv()
    first = env.reset(rec)
    img = image_from_uri(first[0]["content"][0]["image_url"]["url"])
    assert img.size[0] % 28 == 0
    assert make_maze(3, 4) == env.maze  # seeded: the same maze every time
    walls = [d for d in ("up", "left") if d not in env.maze[(0, 0)]]
    r = env.step(f"Move: {walls[0]}")  # the outer wall: no move, an observation with a new image
    assert env.agent == (0, 0) and not r.done and "wall" in r.observation[0]["content"][1]["text"]
    r = env.step("I think I will go somewhere")
    assert not r.info["format_ok"] and env.agent == (0, 0)
    for move in solve(env.maze, 4):
        r = env.step(f"thinking...\nMove: {move}")
    assert r.done and r.reward == 1.0 and r.info["done_reason"] == "goal"


def test_maze_runs_out_of_steps():
    env = Maze2dEnv()
    env.reset({"prompt": [], "env_class": "maze2d", "reward_spec": {"method": "env"},
               "extra_info": {"seed": 1, "maze_size": 5, "max_steps": 3}})
    results = [env.step("Move: up") for _ in range(3)]
    assert results[-1].done and results[-1].reward == 0 and results[-1].info["done_reason"] == "max_steps"


def test_maze_rows_carry_the_first_observation_and_the_move_choices(tmp_path):
    """A prepared maze row's prompt is exactly what the environment shows at reset (so validate counts real
    tokens and the SFT warm-up sees real mazes), at the requested cell size; the 2x2 demo mazes take 2 moves."""
    from vlrl_cli.data.prepare import PrepareOptions, prepare
    from vlrl_cli.data.records import load_records

    prepare(PrepareOptions(source="maze2d", out=tmp_path / "m", workers=1,
                           source_opts={"rows": 12, "val_rows": 4, "maze_size": 2, "max_steps": 2, "cell_px": 56}))
    rows = load_records(str(tmp_path / "m" / "train.parquet")) + load_records(str(tmp_path / "m" / "val.parquet"))
    shapes = set()
    for row in rows:
        env = Maze2dEnv()
        assert row["prompt"] == env.reset(row)
        assert image_from_uri(row["prompt"][0]["content"][0]["image_url"]["url"]).size == (112, 112)
        assert row["extra_info"]["choices"] == ["Move: up", "Move: down", "Move: left", "Move: right"]
        assert len(solve(env.maze, 2)) == 2  # the shortest path uses every allowed move
        shapes.add(frozenset((c, frozenset(d)) for c, d in env.maze.items()))
    assert len(shapes) > 1  # not one maze over and over


# ---- your own environments: one registry for every command ---------------------------------------------

PARITY = """
from vlrl_cli.rollout.envs.base import Env

class Parity(Env):
    def score(self, text):
        ok = len(text) % 2 == 0
        return float(ok), {"correct": ok, "format_ok": True}
"""


def _cli(*args, cwd=None, env_extra=None):
    return run_vlrl(*args, cwd=cwd, env_extra=env_extra)


def _parity_records(colors_data, out):
    import pyarrow.parquet as pq

    from vlrl_cli.data.records import write_rows

    rows = pq.read_table(colors_data / "train.parquet").to_pylist()[:8]
    for r in rows:
        r["env_class"] = "parity"
        r["extra_info"] = None
    write_rows(out, [{k: v for k, v in r.items() if v is not None} for r in rows])
    return out


def test_a_typo_in_a_recipes_envs_is_named_before_any_model_loads_and_a_retry_is_not_blocked(tmp_path, tiny_model, colors_data):
    import time

    import yaml

    (tmp_path / "myenvs.py").write_text(PARITY)
    data = _parity_records(colors_data, tmp_path / "parity.jsonl")
    recipe = tmp_path / "r.yaml"
    body = {"model": {"path": str(tiny_model)}, "data": {"train": str(data)},
            "rollout": {"n": 2, "prompts_per_step": 2, "max_new_tokens": 2}, "algorithm": {"name": "grpo"},
            "trainer": {"steps": 1, "lr": 1e-4, "save_final": False}, "run": {"dir": str(tmp_path / "runs")},
            "envs": {"parity": "myenvz:Parity"}}
    recipe.write_text(yaml.safe_dump(body))
    t = time.time()
    r = _cli("train", recipe, cwd=tmp_path.parent)  # run from elsewhere: the recipe's folder is importable
    assert r.returncode == 2 and "myenvz" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert time.time() - t < 60 and not (tmp_path / "runs" / "run" / "metrics.jsonl").exists()
    body["envs"] = {"parity": "myenvs:Parity"}  # fixed: the module next to the recipe, from another folder
    # a typo in one row's env_class: train's check of its data names the row, before any model loads
    from vlrl_cli.data.records import load_records, write_rows

    rows = load_records(str(data))
    write_rows(tmp_path / "typo.jsonl", rows[:3] + [dict(rows[3], env_class="partiy")] + rows[4:])
    recipe.write_text(yaml.safe_dump(dict(body, data={"train": str(tmp_path / "typo.jsonl")})))
    t = time.time()
    r = _cli("train", recipe, cwd=tmp_path.parent)
    assert r.returncode == 2 and "typo.jsonl:3: [unknown_env_class] env_class: 'partiy'" in r.stderr, r.stderr[-2000:]
    assert time.time() - t < 60 and not (tmp_path / "runs" / "run" / "metrics.jsonl").exists()
    r = _cli("train", recipe, "--env", "parity", cwd=tmp_path.parent)  # a malformed flag: exit 2 naming it
    assert r.returncode == 2 and "--env 'parity': expected NAME=module:Class" in r.stderr, r.stderr[-2000:]
    del body["envs"]  # the same environment from the command line, as eval and check-drift take it
    recipe.write_text(yaml.safe_dump(body))
    r = _cli("train", recipe, "--env", "parity=myenvs:Parity", cwd=tmp_path.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    saved = yaml.safe_load((tmp_path / "runs" / "run" / "recipe.yaml").read_text())
    assert saved["envs"] == {"parity": "myenvs:Parity"}  # the run records where its environment came from


def test_eval_and_check_drift_of_a_run_play_the_environments_its_recipe_registered(tmp_path, tiny_model, colors_data):
    """`vlrl eval runs/x DATA` without --env: the run's saved recipe says where its environments live. From a
    folder where that module cannot be imported, one line says so and what to do."""
    import yaml

    (tmp_path / "myenvs.py").write_text(PARITY)
    data = _parity_records(colors_data, tmp_path / "parity.jsonl")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"path": str(tiny_model)}, "data": {"train": str(data)},
        "rollout": {"n": 2, "prompts_per_step": 2, "max_new_tokens": 2}, "algorithm": {"name": "grpo"},
        "trainer": {"steps": 1, "lr": 1e-4, "save_final": True}, "run": {"dir": str(tmp_path / "runs")},
        "envs": {"parity": "myenvs:Parity"}}))
    assert _cli("train", recipe, cwd=tmp_path.parent).returncode == 0
    run = tmp_path / "runs" / "run"
    r = _cli("eval", run, data, "--out", tmp_path / "ev", "--limit", 2, "--max-new-tokens", 2, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    r = _cli("check-drift", run, data, "--samples", 2, "--max-new-tokens", 2, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (tmp_path / "elsewhere").mkdir()
    r = _cli("eval", run, data, "--out", tmp_path / "ev2", "--limit", 2, cwd=tmp_path / "elsewhere")
    assert r.returncode == 2 and "registers an environment that cannot be imported from here" in r.stderr, r.stderr[-2000:]
    assert "--env NAME=module:Class" in r.stderr and "Traceback" not in r.stderr
    # ... and --env of the same name wins over the run's, as the message says
    (tmp_path / "elsewhere" / "otherenvs.py").write_text(PARITY)
    r = _cli("eval", run, data, "--out", tmp_path / "ev3", "--limit", 2, "--max-new-tokens", 2,
             "--env", "parity=otherenvs:Parity", cwd=tmp_path / "elsewhere")
    assert r.returncode == 0, r.stderr[-2000:]
    # a checkpoint's hf/ folder is of the run too
    hf = next((run / "checkpoints").glob("step_*")) / "hf"
    r = _cli("eval", hf, data, "--out", tmp_path / "ev4", "--limit", 2, "--max-new-tokens", 2, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    # an environment that fails on every record: check-drift says so, not "no tokens"
    (tmp_path / "broken_envs.py").write_text(
        "from vlrl_cli.rollout.envs.base import Env\n\nclass Broken(Env):\n"
        "    def reset(self, record):\n        raise RuntimeError('no board today')\n\n"
        "    def score(self, text):\n        return 0.0, {}\n")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(data.read_text().replace('"env_class": "parity"', '"env_class": "broken_envs:Broken"'))
    r = _cli("check-drift", run, broken, "--samples", 2, "--max-new-tokens", 2, cwd=tmp_path)
    assert r.returncode == 2 and "every episode failed in its environment" in r.stderr, r.stderr[-2000:]
    assert "Broken.reset raised RuntimeError: no board today" in r.stderr


def test_prepare_and_validate_take_your_environment_by_name_from_env_flags(tmp_path, colors_data):
    """--env NAME=module:Class on prepare and validate, as train, eval and check-drift take it: the name becomes a
    valid env_class, the module is imported at once, and a bad one is exit 2 naming it before any row is read."""
    import json

    (tmp_path / "myenvs.py").write_text(PARITY)
    data = _parity_records(colors_data, tmp_path / "parity.jsonl")
    r = _cli("validate", data, cwd=tmp_path)  # nothing says what "parity" is
    assert r.returncode == 1 and "unknown_env_class" in r.stderr, r.stderr[-1500:]
    assert _cli("validate", data, "--env", "parity=myenvs:Parity", cwd=tmp_path).returncode == 0
    r = _cli("validate", data, "--env", "parity=myenvz:Parity", cwd=tmp_path)
    assert r.returncode == 2 and "myenvz" in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]

    from PIL import Image

    src = tmp_path / "mine.jsonl"  # a user's own dataset, scored by their environment
    for i in range(6):
        Image.new("RGB", (64, 64), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    src.write_text("".join(json.dumps({"id": f"r{i}", "image": f"{i}.png", "question": "Even or odd?", "answer": "even"})
                           + "\n" for i in range(6)))
    common = ["prepare", src, "--image-column", "image", "--question-column", "question", "--answer-column", "answer",
              "--env-class", "parity", "--split", "train=1.0"]
    r = _cli(*common, "--out", tmp_path / "p1", cwd=tmp_path)
    assert r.returncode == 2 and "'parity' is not a built-in environment" in r.stderr, r.stderr[-1500:]
    assert not (tmp_path / "p1").exists()
    r = _cli(*common, "--out", tmp_path / "p2", "--env", "parity=myenvs:Parity", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-1500:]
    from vlrl_cli.data.records import load_records

    rows = load_records(str(tmp_path / "p2" / "train.parquet"))
    assert len(rows) == 6 and {row["env_class"] for row in rows} == {"parity"}
    r = _cli(*common, "--out", tmp_path / "p3", "--env", "parity=myenvs:Nope", cwd=tmp_path)
    assert r.returncode == 2 and "Nope" in r.stderr and not (tmp_path / "p3").exists(), r.stderr[-1500:]


def test_installed_entry_points_and_env_flags_reach_validate_train_eval_and_check_drift(tmp_path, tiny_model, colors_data):
    """A package that registers `parity` under the entry-point group vlrl.envs: records naming it validate, train
    and evaluate with no envs: anywhere; an unregistered module works with --env NAME=module:Class."""
    import shutil

    import yaml

    site = tmp_path / "site"
    (site / "parity_pkg").mkdir(parents=True)
    (site / "parity_pkg" / "__init__.py").write_text(PARITY)
    dist = site / "parity_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: parity-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[vlrl.envs]\nparity = parity_pkg:Parity\n")
    env = {"PYTHONPATH": str(site)}
    data = _parity_records(colors_data, tmp_path / "parity.jsonl")
    assert _cli("validate", data, env_extra=env).returncode == 0
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"path": str(tiny_model)}, "data": {"train": str(data)},
                                      "rollout": {"n": 2, "prompts_per_step": 2, "max_new_tokens": 2},
                                      "trainer": {"steps": 1, "lr": 1e-4, "save_final": False},
                                      "run": {"dir": str(tmp_path / "runs")}}))
    r = _cli("train", recipe, env_extra=env)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _cli("eval", tiny_model, data, "--out", tmp_path / "ev", "--limit", "2", "--max-new-tokens", "2", env_extra=env)
    assert r.returncode == 0, r.stderr[-3000:]
    # not installed: a module in the current folder, named by --env
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "localenvs.py").write_text(PARITY)
    r = _cli("eval", tiny_model, data, "--out", tmp_path / "ev2", "--limit", "2", "--max-new-tokens", "2",
             "--env", "parity=localenvs:Parity", cwd=tmp_path / "work")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _cli("check-drift", tiny_model, data, "--samples", "2", "--max-new-tokens", "2", "--env", "parity=localenvs:Parity",
             cwd=tmp_path / "work")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _cli("eval", tiny_model, data, "--out", tmp_path / "ev3", "--env", "parity=nowhere:Parity", cwd=tmp_path / "work")
    assert r.returncode == 2 and "nowhere" in r.stderr and not (tmp_path / "ev3").exists(), r.stderr[-2000:]
    # an installed package whose module went away: its rows are errors at validate and at train's start
    shutil.rmtree(site / "parity_pkg")
    r = _cli("validate", data, env_extra=env)
    said = " ".join(r.stderr.split())  # the table wraps long lines
    assert r.returncode == 1 and "'parity' is registered as parity_pkg:Parity" in said and "cannot import" in said, said[-2000:]
    r = _cli("train", recipe, "--overwrite", env_extra=env)
    assert r.returncode == 2 and "cannot import 'parity_pkg'" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


# ---- any gymnasium environment ----------------------------------------------------------------------------

CORRIDOR = '''
import numpy as np
import gymnasium
from gymnasium import spaces


class Corridor(gymnasium.Env):
    """A 1-D corridor of 4 cells drawn as an image: start at 0, reward 1 on reaching 3."""
    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(self, render_mode=None, length=4):
        self.render_mode, self.length = render_mode, length
        self.action_space = spaces.Discrete(2)  # 0 left, 1 right
        self.observation_space = spaces.Discrete(length)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.pos = 0
        return self.pos, {}

    def step(self, action):
        self.pos = max(0, min(self.length - 1, self.pos + (1 if action == 1 else -1)))
        done = self.pos == self.length - 1
        return self.pos, float(done), done, False, {}

    def render(self):
        frame = np.full((28, 28 * self.length, 3), 255, dtype=np.uint8)
        frame[:, 28 * self.pos:28 * (self.pos + 1)] = (220, 30, 30)
        return frame


gymnasium.register(id="Corridor-v0", entry_point=Corridor)  # gymnasium.make("corridor_envs:Corridor-v0") imports, then finds it
'''


def test_a_gymnasium_env_that_renders_frames_is_a_multi_turn_image_environment(tmp_path, tiny_model, monkeypatch):
    from vlrl_cli.model.loading import load_processor
    from vlrl_cli.rollout.engines import Sampling
    from vlrl_cli.rollout.envs import resolve_env
    from vlrl_cli.rollout.episodes import collect, turn_limit

    (tmp_path / "corridor_envs.py").write_text(CORRIDOR)
    monkeypatch.syspath_prepend(str(tmp_path))
    record = {"id": "c0", "env_class": "gymnasium:corridor_envs:Corridor-v0", "prompt": [],
              "reward_spec": {"method": "env"},
              "extra_info": {"actions": ["left", "right"], "seed": 0, "max_steps": 5}}
    env = resolve_env(record["env_class"])()
    first = env.reset(record)
    assert first[0]["content"][0]["type"] == "image_url" and "left, right" in first[0]["content"][1]["text"]
    r = env.step("I will go Right")  # the last action named counts, in any case
    assert not r.done and r.observation[0]["content"][0]["type"] == "image_url" and r.info["format_ok"]
    assert not env.step("hmm").info["format_ok"]  # no action: the env stays, the turn counts
    env.step("right")
    done = env.step("left then RIGHT")
    assert done.done and done.reward == 1.0 and done.info["correct"] and done.info["done_reason"] == "terminated"
    assert turn_limit([record], None) == 5
    # end to end with the hf engine: frames accumulate in the context, turn after turn
    processor = load_processor(str(tiny_model))
    from vlrl_cli.rollout.engines.hf import HFEngine

    trajs = collect(HFEngine(str(tiny_model), processor), [record], processor, 2, Sampling(1.0, 1.0, 3, 0), None, 4096)
    for t in trajs:
        assert t.turns >= 2 or t.done_reason == "terminated"
        assert len(t.images) == t.turns + (0 if t.done_reason in ("terminated", "max_steps") else 1)


def test_the_example_environment_package_registers_itself_and_runs_everywhere(tmp_path, tiny_model):
    """examples/vlrl-corridor as pip would install it (its pyproject's entry point in a dist-info): records with
    env_class "corridor" validate and evaluate with no other setting, and its reward is its own."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "examples" / "vlrl-corridor"
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    site = tmp_path / "site"
    dist = site / "vlrl_corridor-0.1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    eps = project["entry-points"]["vlrl.envs"]
    (dist / "entry_points.txt").write_text("[vlrl.envs]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    env = {"PYTHONPATH": f"{site}:{root}"}
    data = tmp_path / "corridor"
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "vlrl_corridor", str(data)], capture_output=True, text=True,
                       env={**__import__("os").environ, **env})
    assert r.returncode == 0, r.stderr
    assert _cli("validate", data / "train.jsonl", data / "val.jsonl", env_extra=env).returncode == 0
    r = _cli("eval", tiny_model, data / "val.jsonl", "--out", tmp_path / "ev", "--limit", "3", "--max-new-tokens", "4",
             env_extra=env)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["turns_mean"] > 1  # the corridor's own move limit, with a new frame every move
    # its reward, played by hand: the key first, then the door
    sys.path.insert(0, str(root))
    try:
        from vlrl_corridor import Corridor, make_records

        rec = make_records(1, 0, "t")[0]
        e = Corridor()
        e.reset(rec)
        moves = ["Move: right"] * (rec["extra_info"]["length"] - 1)
        results = [e.step(m) for m in moves]
        assert results[-1].done and results[-1].reward == 1.0 and results[-1].info["correct"]
    finally:
        sys.path.remove(str(root))


def _grpo_recipe(tmp_path, tiny_model, train, envs: dict, steps: int = 1, prompts: int = 2, **run) -> Path:
    """A tiny GRPO recipe (hf engine, 2 samples of 2 tokens) whose `envs:` registers the given environments."""
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"path": str(tiny_model)}, "data": {"train": str(train)},
        "rollout": {"n": 2, "prompts_per_step": prompts, "max_new_tokens": 2}, "algorithm": {"name": "grpo"},
        "trainer": {"steps": steps, "save_final": False}, "run": {"dir": str(tmp_path / "runs"), **run},
        "envs": envs}))
    return recipe


def test_an_environment_that_raises_stops_the_run_with_one_line_naming_it_and_the_record(tmp_path, tiny_model, colors_data):
    (tmp_path / "badenvs.py").write_text(
        "from vlrl_cli.rollout.envs.base import Env\n\n"
        "class Bad(Env):\n"
        "    def score(self, text):\n"
        "        raise ValueError('my reward blew up')\n")
    recipe = _grpo_recipe(tmp_path, tiny_model, colors_data / "train.parquet", {"colors": "badenvs:Bad"})
    r = _cli("train", recipe)
    assert r.returncode == 2, r.stderr[-2000:]
    # the line also says where in the user's file it failed (line 5: the raise)
    assert "badenvs:Bad.step raised ValueError: my reward blew up at badenvs.py:5 (record" in r.stderr, r.stderr[-2000:]
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr



def test_one_records_failing_environment_drops_its_group_and_the_run_goes_on(tmp_path, tiny_model, colors_data):
    """One record whose environment cannot start and one whose step raises: each step trains the other record's
    group, counts the failed episodes (env_errors) and names both records in env_errors.jsonl; the run ends well."""
    import json

    import pyarrow.parquet as pq

    from vlrl_cli.data.records import write_rows

    rows = pq.read_table(colors_data / "train.parquet").to_pylist()[:3]
    write_rows(tmp_path / "three.parquet", rows)
    bad_reset, bad_step, good = (r["id"] for r in rows)
    (tmp_path / "flaky_envs.py").write_text(
        "from vlrl_cli.rollout.envs.colors import ColorsEnv\n\n"
        "class Flaky(ColorsEnv):\n"
        "    def reset(self, record):\n"
        f"        if record['id'] == {bad_reset!r}:\n"
        "            raise SystemExit(0)  # sys.exit() in a user's code: this record's failure, never a silent exit 0\n"
        "        return super().reset(record)\n\n"
        "    def step(self, text):\n"
        f"        if self.record['id'] == {bad_step!r}:\n"
        "            raise ValueError('blew up on this one')\n"
        "        return super().step(text)\n")
    recipe = _grpo_recipe(tmp_path, tiny_model, tmp_path / "three.parquet", {"colors": "flaky_envs:Flaky"}, steps=2,
                          prompts=3, name="flaky")
    r = _cli("train", recipe)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "warning: step 1: 4 of 6 episodes failed in their environment" in r.stderr, r.stderr[-2000:]
    run = tmp_path / "runs" / "flaky"
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(m["env_errors"], m["trained_sequences"]) for m in metrics] == [(4, 2), (4, 2)], metrics
    errors = [json.loads(x) for x in (run / "env_errors.jsonl").read_text().splitlines()]
    assert sorted((e["step"], e["record_id"], e["episodes"]) for e in errors) == \
        [(1, bad_reset, 2), (1, bad_step, 2), (2, bad_reset, 2), (2, bad_step, 2)], errors
    by_id = {e["record_id"]: e["error"] for e in errors}
    assert "flaky_envs:Flaky.reset raised SystemExit: 0" in by_id[bad_reset]
    assert "flaky_envs:Flaky.step raised ValueError: blew up on this one" in by_id[bad_step]
    assert good not in by_id
    # eval: the failed samples are scored as failed, each with its reason, and the others are evaluated
    write_rows(tmp_path / "three_flaky.jsonl", [dict(r, env_class="flaky_envs:Flaky") for r in rows])
    r = _cli("eval", tiny_model, tmp_path / "three_flaky.jsonl", "--out", tmp_path / "ev", "--max-new-tokens", 2,
             cwd=tmp_path)
    assert r.returncode == 0 and "2 of 3 samples ended in an error of their environment" in r.stderr, r.stderr[-2000:]
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["env_errors"] == 2
    rollouts = {x["record_id"]: x for x in map(json.loads, (tmp_path / "ev" / "rollouts.jsonl").read_text().splitlines())}
    assert "raised SystemExit" in rollouts[bad_reset]["env_error"] and "env_error" not in rollouts[good]


BAD_ENVS = """
from vlrl_cli.rollout.envs.base import Env, StepResult

class Steps(Env):
    max_turns = 3
    result = None
    def step(self, text):
        return self.result

def make(result):
    return type("E", (Steps,), {"result": result})

NanReward = make(StepResult([], float("nan"), True, {}))
NumpyReward = make(StepResult([], __import__("numpy").float32(0.5), True, {}))
InfReward = make(StepResult([], float("inf"), True, {}))
NoneReward = make(StepResult([], None, True, {}))
TextReward = make(StepResult([], "1.0", True, {}))
Tuple = make(([], 1.0, True, {}))
StringObservation = make(StepResult("just a string", 0.0, False, {}))
TextCorrect = make(StepResult([], 1.0, True, {"correct": "False"}))
BadImage = make(StepResult([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}]}], 0.0, False, {}))

ListDoneReason = make(StepResult([], 1.0, True, {"done_reason": ["a", object()]}))

class NeedsArgs(Env):
    def __init__(self, size):
        pass

class NoTurns(Env):
    max_turns = None

class TextTurns(Env):
    def __init__(self):
        self.max_turns = "3"

    def reset(self, record):
        return record["prompt"]

    def score(self, text):
        return 1.0, {}

class TurnsNeedAKey(Env):
    @classmethod
    def turn_limit(cls, record):
        return int(record["extra_info"]["max_steps"])

    def score(self, text):
        return 1.0, {}

class Duck:  # reset and step, no Env: nothing vlrl reads before an episode
    def reset(self, record):
        return record["prompt"]

    def step(self, text):
        return None

class HangsInStep(Env):  # a deadlocked simulator: the step never returns
    time_limit_s = 0.5

    def reset(self, record):
        return record["prompt"]

    def step(self, text):
        import threading
        threading.Event().wait()

class HangsInReset(HangsInStep):
    def reset(self, record):
        import time
        while True:
            time.sleep(0.05)

class TextLimit(Env):
    time_limit_s = "60"

    def score(self, text):
        return 1.0, {}

class Lazy(Env):  # neither step nor score: every episode would raise NotImplementedError
    pass

class Shouts(Env):  # an exception quoting model text: newlines and a terminal colour code
    def reset(self, record):
        return record["prompt"]

    def step(self, text):
        raise ValueError("line1\\nline2 \\x1b[31mRED " + text)
"""


@pytest.mark.parametrize("cls,message", [
    ("NanReward", "returned reward 'nan': a finite number is needed"),
    ("InfReward", "returned reward 'inf': a finite number is needed"),
    ("NoneReward", "returned reward 'None'"),
    ("TextReward", "returned reward '1.0': a finite number is needed"),
    ("Tuple", "returned tuple where a StepResult belongs"),
    ("StringObservation", "returned str where a list of messages belongs"),
    ("TextCorrect", "returned info['correct'] = 'False': true, false or absent"),
    ("BadImage", "returned an image that cannot be used"),
    ("TextTurns", "TextTurns.__init__ left max_turns = '3'; a whole number >= 1"),
    ("ListDoneReason", "returned info['done_reason'] = \"['a', <object object"),
    ("Shouts", "Shouts.step raised ValueError: line1\\nline2 \\x1b[31mRED "),
    ("HangsInStep", "HangsInStep.step did not return within 0.5 s (its time_limit_s)"),
    ("HangsInReset", "HangsInReset.reset did not return within 0.5 s (its time_limit_s)"),
    ("NumpyReward", ""),
])
def test_an_environment_that_returns_nonsense_is_named_with_the_record_never_trained_on(tmp_path, tiny_model,
                                                                                      colors_data, monkeypatch, cls, message):
    """A NaN reward trained silently (NaN in every weight by the next step) and a wrong type was an internal error:
    each is one line naming the environment, what it returned and the record, kept with the episode it ended."""
    import pyarrow.parquet as pq

    from vlrl_cli.model.loading import load_processor
    from vlrl_cli.rollout.engines import Sampling
    from vlrl_cli.rollout.engines.hf import HFEngine
    from vlrl_cli.rollout.episodes import collect

    (tmp_path / "nonsense_envs.py").write_text(BAD_ENVS)
    monkeypatch.syspath_prepend(str(tmp_path))
    record = dict(pq.read_table(colors_data / "val.parquet").to_pylist()[0], env_class=f"nonsense_envs:{cls}")
    processor = load_processor(str(tiny_model))
    engine = HFEngine(str(tiny_model), processor)
    if cls == "NumpyReward":  # a number, if not a Python one: accepted, and a plain float from then on
        [t] = collect(engine, [record], processor, 1, Sampling(1.0, 1.0, 2, 0), None, 4096)
        assert type(t.reward) is float and t.reward == 0.5
        return
    # the record's episode ends there, with the reason and no reward; the run goes on without it (train drops
    # its group: test_one_records_failing_environment_drops_its_group_and_the_run_goes_on)
    [t] = collect(engine, [record], processor, 1, Sampling(1.0, 1.0, 2, 0), None, 4096)
    why = t.info["env_error"]
    assert t.done_reason == "env_error" and t.reward == 0.0
    assert message in why and f"nonsense_envs:{cls}" in why and repr(record["id"]) in why, why
    assert "\n" not in why and "\x1b" not in why  # one printable line, whatever the env quoted


def test_a_rows_bad_maze_settings_and_a_gymnasium_record_without_a_prompt(tmp_path, monkeypatch):
    """extra_info.max_steps "four" was an internal error and maze_size 10**6 an endless reset: each is one line
    naming the record and the key. A gymnasium record's prompt may be empty (its reset draws the first frame),
    as the environments page shows it."""
    from vlrl_cli.errors import UserError
    from vlrl_cli.rollout.envs.maze2d import Maze2dEnv
    from vlrl_cli.tools.validate import ValidateOptions, check_row

    row = {"id": "m0", "env_class": "maze2d", "prompt": [{"role": "user", "content": "x"}],
           "reward_spec": {"method": "env"}, "extra_info": {"seed": 1, "maze_size": 3, "max_steps": "four"}}
    with pytest.raises(UserError, match="record 'm0': extra_info.max_steps must be an integer in 1..1000, got 'four'"):
        Maze2dEnv.turn_limit(row)
    row["extra_info"].update(max_steps=4, maze_size=10 ** 6)
    with pytest.raises(UserError, match="extra_info.maze_size must be an integer in 2..64"):
        Maze2dEnv().reset(row)
    (tmp_path / "corridor_envs.py").write_text(CORRIDOR)
    monkeypatch.syspath_prepend(str(tmp_path))
    gym = {"id": "g0", "env_class": "gymnasium:corridor_envs:Corridor-v0", "prompt": [],
           "reward_spec": {"method": "env"}, "extra_info": {"actions": ["left", "right"]}}
    assert not [p for p in check_row(gym, ValidateOptions()) if p[0] == "error"]
    # a typo in a gymnasium id's module or name is the row's error at validate, not a crash in the first rollout
    for typo, why in [("gymnasium:corridor_env:Corridor-v0", "cannot import 'corridor_env'"),
                      ("gymnasium:corridor_envs:Coridor-v0", "Did you mean: `Corridor`?")]:
        found = check_row(dict(gym, env_class=typo), ValidateOptions())
        assert [p for p in found if p[0] == "error" and why in p[2]], found
    assert any(p[1] == "empty_prompt" for p in check_row(dict(gym, env_class="colors"), ValidateOptions()))
    # an import path that cannot be imported is the row's error at validate, as it would be at train's start
    typo = check_row(dict(row, env_class="no_such_envs_module:Maze"), ValidateOptions())
    assert [p for p in typo if p[1] == "unknown_env_class" and "cannot import 'no_such_envs_module'" in p[2]], typo


def test_a_users_file_named_like_a_module_vlrl_uses_does_not_replace_it(tmp_path):
    """User environment folders go last on the path: a colorsys.py (or datasets.py, yaml.py) beside a recipe
    is not what `import colorsys` finds, while the user's own environment module still imports."""
    import subprocess
    import sys

    (tmp_path / "colorsys.py").write_text("raise SystemExit('the user file replaced a real module')\n")
    (tmp_path / "my_envs_mod.py").write_text("VALUE = 7\n")
    code = ("import sys; from vlrl_cli.rollout.envs import importable_from; importable_from(sys.argv[1]); "
            "import colorsys, my_envs_mod; print(colorsys.rgb_to_hsv(1, 0, 0), my_envs_mod.VALUE)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                       cwd=str(Path(__file__).resolve().parent.parent))
    assert r.returncode == 0 and r.stdout.split() == ["(0.0,", "1.0,", "1)", "7"], r.stdout + r.stderr


@pytest.mark.parametrize("cls,message", [
    ("NoTurns", "nonsense_envs:NoTurns.max_turns = 'None'; a whole number >= 1"),
    ("Duck", "nonsense_envs:Duck has no turn_limit(record); subclass vlrl_cli.rollout.envs.base.Env"),
    ("TurnsNeedAKey", "nonsense_envs:TurnsNeedAKey.turn_limit raised KeyError: 'max_steps'"),
    # what would fail every episode of the class: named once, at import, before any model loads
    ("NeedsArgs", "nonsense_envs:NeedsArgs needs constructor arguments (size); vlrl makes one environment per episode"),
    ("TextLimit", "nonsense_envs:TextLimit time_limit_s = '60'; a number of seconds > 0 or None"),
    ("Lazy", "nonsense_envs:Lazy implements neither step(text) nor score(text)"),
])
def test_what_vlrl_reads_from_an_environment_class_before_any_episode_is_checked(tmp_path, monkeypatch, cls, message):
    """The turn limit sizes the engine before any episode: a class without one, a max_turns that is no count,
    or a turn_limit that raises was an internal error (a TypeError comparing None) in train, eval and
    check-drift; each is one line naming the class (and the record, where one is being read)."""
    from vlrl_cli.errors import UserError
    from vlrl_cli.rollout.episodes import turn_limit

    (tmp_path / "nonsense_envs.py").write_text(BAD_ENVS)
    monkeypatch.syspath_prepend(str(tmp_path))
    record = {"id": "r7", "env_class": f"nonsense_envs:{cls}", "extra_info": {}}
    with pytest.raises(UserError) as e:
        turn_limit([record], None, None)
    assert message in str(e.value), e.value
    assert cls != "TurnsNeedAKey" or "(record 'r7'" in str(e.value)


def test_sys_exit_in_a_users_module_or_deep_in_a_command_is_never_a_silent_success(tmp_path, cli, monkeypatch):
    """A module that calls sys.exit(0) at import is the row's error at validate; a SystemExit anywhere else in a
    command is an internal error (exit 1, traceback logged), not exit 0 with nothing done."""
    import json

    (tmp_path / "exits_envs.py").write_text("import sys\nsys.exit(0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"id": "a", "env_class": "exits_envs:Env", "prompt": [{"role": "user", "content": "x"}],
                                "reward_spec": {"method": "env"}}) + "\n")
    r = cli("validate", rows, "--workers", 1)
    assert r.exit_code == 1 and "importing 'exits_envs' failed: SystemExit: 0" in r.output, r.output
    import vlrl_cli.tools.validate as validate

    monkeypatch.setattr(validate, "validate_paths", lambda *a, **k: __import__("sys").exit(0))
    r = cli("validate", rows, "--workers", 1)
    assert r.exit_code == 1 and "internal error: SystemExit" in r.output, r.output


def test_an_environment_call_past_its_time_limit_is_abandoned_and_never_holds_up_the_process(tmp_path):
    """A step that never returned hung the whole run (and Ctrl-C was the only way out): the call is given up
    after the environment's time_limit_s, later calls (the same environment or another) still run, and the
    stuck call does not keep the process from exiting."""
    script = tmp_path / "stuck.py"
    script.write_text(textwrap.dedent('''
        import threading, time
        from vlrl_cli.rollout.envs.base import Env, StepResult
        from vlrl_cli.rollout.episodes import EnvError, env_call

        class Sometimes(Env):
            time_limit_s = 0.3
            def reset(self, record):
                return record["prompt"]
            def step(self, text):
                if text == "hang":
                    threading.Event().wait()
                return StepResult([], 1.0, True, {})

        record = {"id": "r1", "env_class": "stuck:Sometimes", "prompt": [{"role": "user", "content": "hi"}]}
        env = env_call(Sometimes, "__init__", record)
        env_call(env, "reset", record, record)
        t = time.perf_counter()
        try:
            env_call(env, "step", record, "hang")
        except EnvError as e:
            print("ERR", round(time.perf_counter() - t, 1), e)
        print("NEXT", env_call(env, "step", record, "go").reward)
        print("THREADS", sum(th.name == "vlrl-env" for th in threading.enumerate()))
        import os
        pid = os.fork()  # a child forked after environment calls (a user's pool): its calls run, not time out
        if pid == 0:
            t = time.perf_counter()
            print("CHILD", env_call(env, "step", record, "go").reward, time.perf_counter() - t < 0.25, flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
    '''))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert r.returncode == 0, r.stderr[-2000:]
    err, nxt, threads, child = r.stdout.splitlines()
    assert child == "CHILD 1.0 True"
    assert err.startswith("ERR 0.3 environment __main__:Sometimes.step did not return within 0.3 s"), err
    assert "record 'r1'" in err
    assert nxt == "NEXT 1.0"
    assert threads == "THREADS 2"  # the stuck one, left behind, and the fresh one that served the next call
