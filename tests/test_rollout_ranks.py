"""Rollouts on ranks of their own: the placement, the staleness bound, the weight schedule and the trajectories'
wire format (no pickle). The two-process runs are in the closing evidence; these are the pure parts."""

import pytest
import torch

from vlrl_cli.train.rollout_ranks import (Placement, check_staleness, pack_trajectories, unpack_trajectories,
                                          weights_needed)


def test_placement_puts_engines_last_and_spreads_trainers_over_them():
    p = Placement(rank=0, world=5, engine_ranks=2)
    assert p.trainers == 3 and not p.is_engine and Placement(3, 5, 2).is_engine
    assert [p.engine_for(t) for t in range(3)] == [3, 4, 3]
    assert p.served_by(3) == [0, 2] and p.served_by(4) == [1]


@pytest.mark.parametrize("s", [0, 1, 2])
def test_the_engine_never_generates_with_weights_older_than_the_bound(s):
    steps = 6
    sent = [v + 1 for v in range(steps) if weights_needed(v, steps, s)]  # versions the trainers broadcast
    version, got = 0, []
    for step in range(steps):  # the engine rank's loop
        while version < step - s:
            version = sent.pop(0)
        got.append(check_staleness(step, version, s))
    assert got == [min(step, s) for step in range(steps)] and not sent  # every sent version was taken
    with pytest.raises(RuntimeError, match="max_staleness"):
        check_staleness(5, 5 - s - 1, s)


def test_trajectories_cross_without_pickle():
    from vlrl_cli.rollout.episodes import Sequence, Trajectory

    t = Trajectory([1, 2, 3], [0, 1, 1], [0.0, -0.5, -1.0], {"pixel_values": [torch.ones(2, 3)]}, record_id="r",
                   group=0, env_class="x", data_source="d", prompt_len=1, reward=1.0, info={"correct": True, "n": 2},
                   earlier=[Sequence([4, 5], [0, 1], [0.0, -0.1], {})])
    back, meta = unpack_trajectories(pack_trajectories([t], {"version": 3}))
    assert meta == {"version": 3}
    b = back[0]
    assert b.token_ids == t.token_ids and b.info == t.info and b.reward == 1.0
    assert torch.equal(b.tensors["pixel_values"][0], torch.ones(2, 3))
    assert b.earlier[0].token_ids == [4, 5]


def test_recipes_refuse_staleness_without_engine_ranks(tmp_path, tiny_model, colors_data):
    import yaml

    from vlrl_cli.errors import UserError
    from vlrl_cli.train.recipe import load_recipe

    base = {"model": {"path": str(tiny_model)}, "data": {"train": str(colors_data / "train.parquet")},
            "rollout": {"n": 2, "max_staleness": 1}, "run": {"dir": str(tmp_path)}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base))
    with pytest.raises(UserError, match="engine_ranks"):
        load_recipe(path)
    base["rollout"]["engine_ranks"] = 1
    base["trainer"] = {"eval_every": 2}
    path.write_text(yaml.safe_dump(base))
    with pytest.raises(UserError, match="eval_every"):
        load_recipe(path)
