"""Maze2D as a benchmark: variants, routes, filters, the blind-policy baseline and the progress reward."""

import json
from itertools import product

import pytest

from vlrl_cli.data.images import image_from_uri
from vlrl_cli.data.mazes import (MOVES, blind_policy_score, goal_distances, make_maze, shortest_moves, solves,
                                 step)
from vlrl_cli.data.prepare import PrepareOptions, prepare
from vlrl_cli.data.records import load_records
from vlrl_cli.errors import UserError
from vlrl_cli.rollout.envs.maze2d import Maze2dEnv


def passages(maze) -> int:
    return sum(len(d) for d in maze.values()) // 2


def connected(maze, size) -> bool:
    return len(goal_distances(maze, size)) == size * size


@pytest.mark.parametrize("size", [2, 3, 5, 8])
def test_hard_mazes_have_one_route_and_easy_ones_several(size):
    for seed in range(30):
        hard, easy = make_maze(seed, size), make_maze(seed, size, "easy")
        assert connected(hard, size) and passages(hard) == size * size - 1  # a tree: one route between any cells
        assert connected(easy, size) and passages(easy) == passages(hard) + max(1, (size - 1) ** 2 // 3)
        assert all(hard[c] <= easy[c] for c in hard)  # the easy maze is the hard one with walls opened
        assert make_maze(seed, size, "easy") == easy  # a seed names one maze per variant


def test_shortest_moves_are_the_breadth_first_distance_and_walk_to_the_goal():
    for seed, size, variant in product(range(40), (3, 4, 6), ("hard", "easy")):
        maze = make_maze(seed, size, variant)
        moves = shortest_moves(maze, size)
        assert len(moves) == goal_distances(maze, size)[(0, 0)] and solves(maze, size, moves)
        assert not solves(maze, size, moves[:-1])


def test_a_fixed_sequence_is_stopped_by_walls_and_ends_at_the_goal():
    maze = make_maze(3, 3)
    walls = [m for m in MOVES if m not in maze[(0, 0)]]
    assert step(maze, (0, 0), walls[0]) == (0, 0)
    route = shortest_moves(maze, 3)
    assert solves(maze, 3, route + ["up", "up"])  # reaching the goal ends the episode: later moves do not count


def test_the_blind_policy_score_is_the_best_fixed_sequence():
    mazes = [make_maze(s, 3) for s in range(60)]
    score, exact = blind_policy_score(mazes, 3, 4)
    brute = max(sum(solves(m, 3, seq) for m in mazes) for seq in product(MOVES, repeat=4)) / len(mazes)
    assert exact and score == brute and 0 < score < 1
    # with one maze a blind policy needs nothing but that maze's route
    assert blind_policy_score(mazes[:1], 3, 8) == (1.0, False)
    # more moves never make the blind policy worse
    assert blind_policy_score(mazes, 3, 6)[0] >= score


def maze_rows(tmp_path, name="m", seed=0, **opts):
    prepare(PrepareOptions(source="maze2d", out=tmp_path / name, workers=1, seed=seed,
                           source_opts={"rows": 40, "val_rows": 20, **opts}))
    return (load_records(str(tmp_path / name / "train.parquet")), load_records(str(tmp_path / name / "val.parquet")),
            json.loads((tmp_path / name / "manifest.json").read_text()))


def test_move_filters_keep_only_mazes_of_that_route_length_and_validation_seeds_stay_fixed(tmp_path):
    train, val, manifest = maze_rows(tmp_path, maze_size=3, min_moves=4, max_moves=4, max_steps=4)
    for row in train + val:
        env = Maze2dEnv()
        env.reset(row)
        assert goal_distances(env.maze, 3)[(0, 0)] == 4 == row["extra_info"]["shortest_moves"]
    # the same validation mazes whatever the training seed; training seeds never collide with them
    train2, val2, _ = maze_rows(tmp_path, "m2", maze_size=3, min_moves=4, max_moves=4, max_steps=4, seed=7)
    assert [r["extra_info"]["seed"] for r in val2] == [r["extra_info"]["seed"] for r in val]
    assert {r["extra_info"]["seed"] for r in train2}.isdisjoint(r["extra_info"]["seed"] for r in val)
    summary = manifest["summary"]
    assert summary["val"]["shortest_moves"] == {"4": 20} and summary["train"]["rows"] == 40
    # the manifest's blind score is the exact best fixed sequence on these validation mazes
    mazes = [make_maze(r["extra_info"]["seed"], 3) for r in val]
    assert summary["blind_policy_val_success"] == round(blind_policy_score(mazes, 3, 4)[0], 4) <= 0.3
    assert summary["val"]["distinct_layouts"] <= 8 and summary["val_layouts_seen_in_train"] >= 1


def test_without_filters_the_rows_are_the_ones_prepare_always_made(tmp_path):
    """Existing datasets and recipes keep their mazes: no filter, the hard variant, the same seeds."""
    import random

    train, val, _ = maze_rows(tmp_path, maze_size=5, seed=3)
    assert [r["extra_info"]["seed"] for r in val] == [1_000_000 + i for i in range(20)]
    rng = random.Random("maze2d:3")
    assert [r["extra_info"]["seed"] for r in train] == [rng.randrange(1_000_000) for _ in range(40)]
    assert all("variant" not in r["extra_info"] and "reward" not in r["extra_info"] for r in train + val)


def test_the_easy_variant_and_progress_reward_reach_the_environment(tmp_path):
    train, _, manifest = maze_rows(tmp_path, maze_size=4, variant="easy", reward="progress", max_steps=6)
    row = train[0]
    assert row["extra_info"]["variant"] == "easy" and row["extra_info"]["reward"] == "progress"
    env = Maze2dEnv()
    assert env.reset(row) == row["prompt"]  # the first frame is the easy maze's
    assert env.maze == make_maze(row["extra_info"]["seed"], 4, "easy")
    assert manifest["summary"]["variant"] == "easy"


def progress_env(seed=5, size=4, max_steps=3):
    env = Maze2dEnv()
    env.reset({"prompt": [], "env_class": "maze2d", "reward_spec": {"method": "env"},
               "extra_info": {"seed": seed, "maze_size": size, "max_steps": max_steps, "reward": "progress"}})
    return env


def test_the_progress_reward_is_the_share_of_the_route_covered():
    env = progress_env()
    route = shortest_moves(env.maze, 4)
    start = len(route)
    for move in route[:2]:
        r = env.step(f"Move: {move}")
    r = env.step("no move at all")
    assert r.done and r.reward == pytest.approx(1 - (start - 2) / start) and not r.info["correct"]
    env = progress_env(max_steps=len(route) + 2)
    for move in route:
        r = env.step(f"Move: {move}")
    assert r.done and r.reward == 1.0 and r.info["correct"] and r.info["done_reason"] == "goal"
    env = progress_env(max_steps=1)
    r = env.step("Move: left")  # into the outer wall: no progress
    assert r.done and r.reward == 0.0
    # walking away from the goal scores below zero (worse than standing still): easy maze 28 opens a way down
    env = Maze2dEnv()
    env.reset({"prompt": [], "extra_info": {"seed": 28, "maze_size": 4, "max_steps": 1, "variant": "easy",
                                            "reward": "progress"}})
    assert env.distance[step(env.maze, (0, 0), "down")] > env.distance[(0, 0)]
    assert env.step("Move: down").reward < 0


def test_a_bad_reward_mode_in_a_row_is_named():
    from vlrl_cli.errors import UserError

    env = Maze2dEnv()
    with pytest.raises(UserError, match="extra_info.reward must be one of goal, progress, got 'distance'"):
        env.reset({"prompt": [], "env_class": "maze2d", "extra_info": {"seed": 1, "reward": "distance"}})


@pytest.mark.parametrize("opts, flag", [
    ({"variant": "medium"}, "--variant"),
    ({"reward": "distance"}, "--reward"),
    ({"min_moves": 5, "max_moves": 4}, "--min-moves 5 is above --max-moves 4"),
    ({"maze_size": 3, "min_moves": 6, "max_steps": 4}, "--max-steps"),
    ({"maze_size": 3, "min_moves": 9, "max_steps": 12}, "widen the range"),
    ({"min_moves": 0}, "--min-moves"),
])
def test_bad_maze_options_are_named_before_the_output_folder_is_touched(tmp_path, opts, flag):
    out = tmp_path / "m"
    out.mkdir()
    (out / "train.parquet").write_text("an earlier dataset")
    with pytest.raises(UserError, match=flag):
        prepare(PrepareOptions(source="maze2d", out=out, workers=1, overwrite=True,
                               source_opts={"rows": 4, "val_rows": 2, **opts}))
    assert (out / "train.parquet").read_text() == "an earlier dataset"


def test_prepare_says_what_a_blind_policy_scores(tmp_path, cli):
    r = cli("prepare", "maze2d", "--out", tmp_path / "m", "--rows", "30", "--val-rows", "20", "--maze-size", "3",
            "--min-moves", "4", "--max-moves", "4", "--max-steps", "4", "--cell-px", "56")
    assert r.exit_code == 0, r.output
    assert "a blind policy (the best fixed move sequence) solves" in r.output and "of the val layouts also in train" in r.output
    row = load_records(str(tmp_path / "m" / "val.parquet"))[0]
    assert image_from_uri(row["prompt"][0]["content"][0]["image_url"]["url"]).size == (168, 168)


def test_the_3x3_demo_recipes_match_their_data_and_the_blind_policy_stays_below_0_3(tmp_path, monkeypatch):
    """`make demo-maze3` (about 35 minutes, so its learning run is recorded in docs/demo.md, not repeated
    here): the data the script prepares for size 3 is what its recipes read, and a blind policy fails it."""
    import re
    import shlex
    from pathlib import Path

    from vlrl_cli.train.recipe import load_recipe

    root = Path(__file__).resolve().parents[1]
    script = (root / "scripts" / "demo-maze.sh").read_text()
    common = re.search(r'prepare maze2d --out "\$OUT/\$TAG" (.*?) "\$\{PREPARE', script).group(1)
    size3 = re.search(r"PREPARE=\((--maze-size 3[^)]*)\)", script).group(1)
    args = ["--out", "demo-out/maze3", *shlex.split(common), *shlex.split(size3)]
    monkeypatch.chdir(tmp_path)
    from typer.testing import CliRunner

    from vlrl_cli.cli import app

    r = CliRunner().invoke(app, ["prepare", "maze2d", *args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "demo-out" / "maze3" / "manifest.json").read_text())["summary"]
    assert summary["val"]["shortest_moves"] == {"4": 40} and summary["blind_policy_val_success"] <= 0.3
    grpo = load_recipe(root / "recipes" / "maze3-tiny.yaml", check_paths=False)
    assert grpo.data.train == "demo-out/maze3/train.parquet" and grpo.rollout.history.max_images == 2
    assert grpo.rollout.max_turns == 4 and grpo.model.path == "runs/maze3-sft/checkpoints/step_30/hf"
    sft = load_recipe(root / "recipes" / "maze3-tiny-sft.yaml", check_paths=False)
    assert sft.run.name == "maze3-sft" and sft.trainer.steps == 30 and sft.data.train == grpo.data.train


@pytest.mark.model
def test_an_episode_shows_its_closing_frame_in_the_report_but_never_in_the_context(tmp_path, tiny_model):
    """The move that ends an episode has a frame too (the agent at the goal, or where the moves ran out): the
    report shows it under that move; the model never sees it, so the trained sequence ends with the answer."""
    from vlrl_cli.model.loading import load_processor
    from vlrl_cli.rollout.engines import Sampling
    from vlrl_cli.rollout.engines.hf import HFEngine
    from vlrl_cli.rollout.episodes import collect
    from vlrl_cli.tools.evaluate import summarize
    from vlrl_cli.tools.report import write_report

    train, _, _ = maze_rows(tmp_path, maze_size=3, max_steps=2, cell_px=28)
    processor = load_processor(str(tiny_model))
    trajs = collect(HFEngine(str(tiny_model), processor), train[:2], processor, 2, Sampling(1.0, 1.0, 6, 0), None, 4096)
    for t in trajs:
        assert t.done_reason in ("goal", "max_steps") and len(t.end_images) == 1
        assert t.texts[-1]["observation_images"] == 0
        assert len(t.images) == t.turns  # the first frame and one after each move but the last
        assert t.loss_mask[-1] == 1  # the sequence ends with the model's last answer: no closing frame in it
    html = write_report(tmp_path / "r.html", {**summarize(trajs, 2), "settings": {}}, trajs, {r["id"]: r for r in train[:2]}).read_text()
    assert html.count("<figcaption>end: ") == len(trajs)
