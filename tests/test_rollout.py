"""Multi-turn rollouts on the CPU: masks, accumulated images, and trainer/engine agreement on every turn."""

import pytest
import torch

from vlrl_cli.rollout.engines import Sampling, placeholder_token_ids
from vlrl_cli.rollout.engines.hf import HFEngine
from vlrl_cli.model.loading import load_processor
from vlrl_cli.rollout.episodes import collect
from vlrl_cli.train.batches import make_batch, sequence_logprobs

pytestmark = pytest.mark.model  # also run on the oldest supported transformers (make test-floor)


def maze_record(seed, steps=3):
    return {"id": f"maze-{seed}", "prompt": [{"role": "user", "content": "stub"}], "env_class": "maze2d",
            "data_source": "maze2d", "reward_spec": {"method": "env"},
            "extra_info": {"seed": seed, "maze_size": 3, "max_steps": steps}}


def test_multi_turn_masks_images_and_logprobs(tiny_model):
    proc = load_processor(str(tiny_model))
    engine = HFEngine(str(tiny_model), proc)
    trajs = collect(engine, [maze_record(1), maze_record(2)], proc, 2, Sampling(1.0, 1.0, 6, 0), max_turns=3,
                    max_context=4096)
    assert len(trajs) == 4
    for t in trajs:
        assert t.turns == 3 and t.done_reason == "max_steps"  # a random model never reaches the goal
        assert len(t.token_ids) == len(t.loss_mask) == len(t.engine_logp)
        # generated tokens are trained; the prompt and every observation are masked out
        runs, prev = [], 0
        for i, m in enumerate(t.loss_mask):
            if m and not prev:
                runs.append(i)
            prev = m
        assert len(runs) == 3 and t.loss_mask[: t.prompt_len] == [0] * t.prompt_len
        # one image per turn so far (reset + 2 observations) and placeholders matching their grids
        grid = t.tensors["image_grid_thw"]
        assert grid.shape[0] == 3
        assert sum(1 for x in t.token_ids if x == proc.image_token_id) == int(grid.prod(-1).sum()) // 4
        assert all(tok not in placeholder_token_ids(proc) for tok, m in zip(t.token_ids, t.loss_mask) if m)
    # the trainer's forward on the whole multi-image sequence gives the engine's log-probs, turn after turn
    model = engine.model
    b = make_batch(trajs, proc, torch.device("cpu"))
    with torch.no_grad():
        lp = sequence_logprobs(model, b, 1.0, placeholder_token_ids(proc))
    diff = ((lp - b.engine_logp).abs() * b.loss_mask).max()
    assert diff < 1e-4, float(diff)


def test_context_full_ends_an_episode(tiny_model):
    proc = load_processor(str(tiny_model))
    engine = HFEngine(str(tiny_model), proc)
    [t] = collect(engine, [maze_record(3, steps=10)], proc, 1, Sampling(1.0, 1.0, 6, 0), max_turns=10, max_context=120)
    assert t.done_reason == "context_full" and len(t.token_ids) < 120


def test_prompts_over_the_limit_are_not_rolled_out(tiny_model, colors_data):
    from vlrl_cli.data.records import load_records

    proc = load_processor(str(tiny_model))
    engine = HFEngine(str(tiny_model), proc)
    records = load_records(str(colors_data / "val.parquet"), 2)
    long = dict(records[1], prompt=[{"role": "user", "content": "word " * 400}])
    trajs = collect(engine, [records[0], long], proc, 2, Sampling(1.0, 1.0, 4, 0), 1, 4096, max_prompt=200)
    assert [t.done_reason for t in trajs[2:]] == ["prompt_too_long"] * 2
    assert all(t.response_len == 0 for t in trajs[2:]) and all(t.response_len > 0 for t in trajs[:2])
