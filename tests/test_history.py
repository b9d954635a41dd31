"""A bounded image history (rollout.history.max_images): long image episodes keep their last k frames, older
ones become a text stand-in, and the trainer scores every turn with exactly the context the engine generated it
from: no orphan placeholder, no sequence over the context limit, drift by turn at rounding level on 20-turn
episodes."""

import dataclasses

import pytest
from conftest import prepared_mazes

pytestmark = pytest.mark.model
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "gemma4")


@pytest.fixture(scope="module")
def long_mazes(tmp_path_factory):
    return prepared_mazes(tmp_path_factory, 4, 20)


def test_keep_last_images_replaces_whole_image_parts_only():
    from vlrl_cli.rollout.episodes import STAND_IN, keep_last_images

    img = lambda i: {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{i}"}}  # noqa: E731
    msgs = [{"role": "user", "content": [img(0), {"type": "text", "text": "go"}]},
            {"role": "assistant", "content": "Move: up"},
            {"role": "user", "content": [img(1), img(2), {"type": "text", "text": "moved"}]}]
    kept = keep_last_images(msgs, 2)
    parts = [p for m in kept if not isinstance(m["content"], str) for p in m["content"]]
    assert [p.get("image_url", {}).get("url", p.get("text"))[-1] for p in parts if p["type"] == "image_url"] == ["1", "2"]
    assert parts[0] == {"type": "text", "text": STAND_IN} and keep_last_images(msgs, None) is msgs
    assert msgs[0]["content"][0] == img(0)  # the caller's messages are left as they were


@pytest.mark.parametrize("family", FAMILIES)
def test_twenty_turn_episodes_with_three_frames_agree_turn_by_turn(family_models, long_mazes, family):
    from vlrl_cli.model.loading import load_processor
    from vlrl_cli.model.render import image_token_counts
    from vlrl_cli.rollout.engines import Sampling, placeholder_token_ids
    from vlrl_cli.rollout.engines.hf import HFEngine
    from vlrl_cli.rollout.episodes import collect, engine_limits
    from vlrl_cli.data.records import load_records
    from vlrl_cli.tools.drift import RecordingEngine, score, split_stats, token_rows

    model = str(family_models[family])
    processor = load_processor(model)
    records = load_records(str(long_mazes / "val.parquet"))[:2]
    engine = RecordingEngine(HFEngine(model, processor))
    max_context = 4096
    trajs = collect(engine, records, processor, 2, Sampling(1.0, 1.0, 6, 0), None, max_context, max_images=3)
    pad = processor.image_token_id
    for t in trajs:
        assert t.turns == 20 and t.earlier, (t.turns, t.done_reason)  # a random policy walks all 20 moves
        for seq in t.sequences():
            counts = image_token_counts(processor, seq.tensors)
            runs = sum(1 for k, x in enumerate(seq.token_ids) if x == pad and (k == 0 or seq.token_ids[k - 1] != pad))
            assert len(counts) <= 3 and runs == len(counts), (len(counts), runs)  # no orphan placeholder
            assert seq.token_ids.count(pad) == sum(counts)
            assert len(seq.token_ids) < max_context
    # every request the engine got is the start of one of the sequences the trainer scores
    sequences = [s.token_ids for t in trajs for s in t.sequences()]
    for sent, _ in engine.prompts:
        assert any(seq[:len(sent)] == sent for seq in sequences)
    assert engine_limits(records, max_context, None, None, 3).max_images == 3
    # check-drift's placeholder check covers every turn, and names a late turn that lost a placeholder
    from vlrl_cli.tools.drift import check_image_token_counts

    check = check_image_token_counts(trajs, engine.prompts, processor)
    segments = sum(len(t.sequences()) for t in trajs)
    assert check.passed and check.detail.startswith(f"{segments}/{segments} scored sequences") and segments > 2, check
    assert f"and {len(engine.prompts)} engine requests" in check.detail and len(engine.prompts) == 78, check  # 2 first prompts (n=2 each), then 4 x 19 turns
    late = trajs[1].sequences()[-1]
    late.token_ids.remove(pad)
    check = check_image_token_counts(trajs, engine.prompts, processor)
    assert check.passed is False and f"sequence {len(trajs[1].sequences())}: grids imply" in check.detail, check
    late.token_ids.insert(late.token_ids.index(pad), pad)
    # the trainer's scores of every segment against what the engine reported: turn by turn, rounding only
    from vlrl_cli.tools.drift import load_trainer

    trainer = load_trainer(model, "float32", None)
    banned = placeholder_token_ids(processor)  # what the engine bans, as every run's trainer does
    rows = token_rows(trajs, score(trainer, trajs, processor, 1.0, banned, 4), pad)
    by_turn = split_stats(rows)["by_turn"]
    assert len(by_turn) == 20, sorted(by_turn)
    assert max(s["abs_diff"]["max"] for s in by_turn.values()) < 1e-4, {k: s["abs_diff"]["max"] for k, s in by_turn.items()}


def test_grpo_trains_on_every_segment_of_a_cut_history(tmp_path, tiny_model, long_mazes):
    import yaml

    from vlrl_cli.train.launch import run_training
    from vlrl_cli.train.recipe import load_recipe
    from vlrl_cli.train.runs import read_metrics

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"path": str(tiny_model)}, "data": {"train": str(long_mazes / "train.parquet")},
        "rollout": {"n": 2, "prompts_per_step": 2, "max_new_tokens": 4, "max_turns": 6, "history": {"max_images": 2}},
        "algorithm": {"name": "grpo", "kl_coef": 0.1}, "trainer": {"steps": 1, "lr": 1e-4, "save_final": False},
        "run": {"name": "hist", "dir": str(tmp_path / "runs")}}))
    run_training(load_recipe(recipe))
    m = read_metrics(tmp_path / "runs" / "hist")[0]
    # 4 episodes of 6 turns with 2 frames kept: a segment a turn once the window is full
    assert m["trained_sequences"] > 4, m
    assert m["kl"] == pytest.approx(0.0, abs=1e-7) and m["drift_abs_max"] < 1e-4, m


def test_an_answer_never_takes_a_sequence_past_the_context_limit(tiny_model, long_mazes):
    """Each request asks for at most the context the episode has left: a long answer near the limit is cut there
    ("length"), so no trained sequence is longer than max_context_tokens, on the hf engine as on vLLM (whose model
    length is the same limit). The control drops the cap and goes over."""
    from vlrl_cli.data.records import load_records
    from vlrl_cli.model.loading import load_processor
    from vlrl_cli.rollout.engines import Sampling
    from vlrl_cli.rollout.engines.hf import HFEngine
    from vlrl_cli.rollout.episodes import Episode, collect, start_episodes

    processor = load_processor(str(tiny_model))
    records = load_records(str(long_mazes / "val.parquet"))[:2]
    engine = HFEngine(str(tiny_model), processor)
    prompt = max(eps[0].traj.prompt_len for eps in start_episodes(records, processor, 1, 10 ** 6))
    sampling = Sampling(1.0, 1.0, 64, 0, ignore_eos=True)  # every answer as long as it may be
    for room in (30, 90, 200):
        trajs = collect(engine, records, processor, 2, sampling, 6, prompt + room)
        lengths = [len(s.token_ids) for t in trajs for s in t.sequences()]
        assert max(lengths) <= prompt + room, (room, lengths)
        cut = [x for t in trajs for x in t.texts if x["tokens"] < 64]
        assert all(x["finish"] == "length" for x in cut), (room, [t.texts for t in trajs])
        assert cut or room > 64, room  # 30 tokens of room: every first answer is cut at 30
    request = Episode.request
    try:  # the control: the same run with the request's cap dropped
        Episode.request = lambda self, n=1: dataclasses.replace(request(self, n), max_new_tokens=None)
        trajs = collect(engine, records, processor, 2, sampling, 6, prompt + 30)
    finally:
        Episode.request = request
    assert max(len(s.token_ids) for t in trajs for s in t.sequences()) > prompt + 30


def test_check_drift_through_the_cli_splits_twenty_turn_episodes_by_turn(cli, tiny_model, long_mazes, tmp_path):
    """`check-drift --history-images 3` on 20-move mazes, as a user runs it: every turn of every segment is scored,
    the split by turn covers all 20, and the placeholder check counts each segment."""
    import json

    out = tmp_path / "drift.json"
    r = cli("check-drift", tiny_model, long_mazes / "val.parquet", "--samples", 2, "--max-new-tokens", 6,
            "--history-images", 3, "--max-abs", 1e-4, "--json", out)
    assert r.exit_code == 0, r.output[-2000:]
    report = json.loads(out.read_text())
    by_turn = report["stats"]["by_turn"]
    assert len(by_turn) == 20 and max(s["abs_diff"]["max"] for s in by_turn.values()) < 1e-4, sorted(by_turn)
    counts = {c["name"]: c for c in report["checks"]}["image_token_counts"]
    assert counts["passed"] and int(counts["detail"].split("/")[0]) > 2, counts  # more segments than episodes
