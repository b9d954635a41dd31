"""Rollouts on ranks of their own: the placement, the staleness bound, the weight schedule, the trajectories'
wire format (no pickle), and two-process runs (gloo, hf engine) against one colocated process."""

import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import terminal_sigint
from vlrl_process import run_vlrl
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


# rewards that vary on a random tiny model's text, so every step has advantages and a gradient
LENGTH_ENV = """
from vlrl_cli.rollout.envs.base import Env

class LengthEnv(Env):
    def score(self, text):
        return (len(text) % 3) / 2, {"correct": len(text) % 3 == 2, "format_ok": True}
"""


def _train(tmp_path, tiny_model, colors_data, name, nprocs, lora=None, **rollout):
    body = {"model": {"path": str(tiny_model), **({"lora": lora} if lora else {})}, "data": {"train": str(colors_data / "train.parquet")},
            "rollout": {"n": 4, "prompts_per_step": 4, "max_new_tokens": 6, "temperature": 1.0, **rollout},
            "algorithm": {"name": "grpo"},
            "trainer": {"steps": 3, "lr": 1.0e-2, "micro_batch": 8, "zero_stage": 0, "save_every": 0},
            "run": {"name": name, "dir": str(tmp_path / "runs")}, "envs": {"colors": "lengthenv:LengthEnv"}}
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(body))
    r = run_vlrl("train", tmp_path / f"{name}.yaml", "--nprocs", nprocs, env_extra={"PYTHONPATH": tmp_path},
                 timeout=900)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    from vlrl_cli.train.runs import read_metrics

    return read_metrics(tmp_path / "runs" / name)


def test_split_ranks_train_like_one_colocated_process_and_keep_the_staleness_bound(tmp_path, tiny_model, colors_data):
    """s=0 on 2 processes (rank 1 generates, rank 0 trains) is the colocated run step for step: the same
    samples from the same weights, so the same rewards and losses. s=1 lets the engine run one update ahead:
    step 1 is still on the initial weights (the same rewards), later steps log staleness 1, never more."""
    (tmp_path / "lengthenv.py").write_text(LENGTH_ENV)
    colocated = _train(tmp_path, tiny_model, colors_data, "colocated", 1)
    s0 = _train(tmp_path, tiny_model, colors_data, "s0", 2, engine_ranks=1, max_staleness=0)
    s1 = _train(tmp_path, tiny_model, colors_data, "s1", 2, engine_ranks=1, max_staleness=1)
    assert [m["step"] for m in colocated] == [m["step"] for m in s0] == [m["step"] for m in s1] == [1, 2, 3]
    assert all(m["grad_norm"] > 0 for m in colocated), colocated  # a real update every step
    for a, b in zip(colocated, s0):
        assert b["reward_mean"] == a["reward_mean"] and b["trained_sequences"] == a["trained_sequences"], (colocated, s0)
        assert b["entropy"] == pytest.approx(a["entropy"], rel=1e-5), (colocated, s0)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (colocated, s0)
        assert b["drift_abs_max"] < 1e-4  # the engine rank holds exactly the weights the trainer scores with
    assert [m.get("rollout_staleness", 0) for m in colocated] == [m["rollout_staleness"] for m in s0] == [0, 0, 0]
    assert [m["rollout_staleness"] for m in s1] == [0, 1, 1]
    # the engine rank keeps what training cannot change: a full fine-tune sends every weight, LoRA only the
    # adapted layers (merged), and the engine still holds exactly the policy being trained
    lora = _train(tmp_path, tiny_model, colors_data, "lora", 2, lora={"rank": 4, "alpha": 8}, engine_ranks=1)
    full_mb = sum(p.stat().st_size for p in tiny_model.glob("*.safetensors")) / 2**20
    assert [m["weights_sent_mb"] for m in s0] == [pytest.approx(full_mb, rel=0.01)] * 2 + [0.0], (full_mb, s0)
    sent = [m["weights_sent_mb"] for m in lora]
    assert 0 < sent[0] == sent[1] < 0.7 * full_mb and sent[2] == 0.0, (full_mb, sent)
    assert any(m["grad_norm"] > 0 for m in lora) and max(m["drift_abs_max"] for m in lora) < 1e-4, lora
    assert s1[0]["reward_mean"] == colocated[0]["reward_mean"]
    assert s1[0]["grad_norm"] == pytest.approx(colocated[0]["grad_norm"], rel=1e-4)
    # one update behind, the behaviour policy is not the one being trained: the importance weights see it
    assert all(m["drift_abs_max"] > 1e-3 for m in s1[1:]), s1


def test_a_split_that_cannot_serve_its_trainers_is_refused_before_any_rank_starts(tmp_path, tiny_model, colors_data):
    body = {"model": {"path": str(tiny_model)}, "data": {"train": str(colors_data / "train.parquet")},
            "rollout": {"n": 2, "prompts_per_step": 2, "max_new_tokens": 2}, "algorithm": {"name": "grpo"},
            "trainer": {"steps": 1}, "run": {"name": "x", "dir": str(tmp_path / "runs")}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(body))
    for nprocs, k, why in ((3, 2, "each engine rank serves at least one trainer"), (2, 2, "no rank is left to train")):
        r = run_vlrl("train", tmp_path / "r.yaml", "--nprocs", nprocs, "--set", f"rollout.engine_ranks={k}", timeout=300)
        assert r.returncode == 2 and why in r.stderr and "internal error" not in r.stderr, r.stderr[-2000:]
        assert r.stderr.count("rollout.engine_ranks is") == 1  # from the command, not from every rank
        assert not (tmp_path / "runs" / "x").exists()  # nothing claimed, no lock left behind


def test_interrupting_a_multi_process_run_stops_every_rank_before_it_returns(tmp_path, tiny_model, colors_data):
    """Ctrl-C (or SIGTERM) to `vlrl train --nprocs 2` must not leave ranks training on: the parent holds the run
    directory's lock, and a rank that outlives it writes into a run that another process may claim."""
    import signal
    import time

    body = {"model": {"path": str(tiny_model)}, "data": {"train": str(colors_data / "train.parquet")},
            "rollout": {"n": 2, "prompts_per_step": 2, "max_new_tokens": 4}, "algorithm": {"name": "grpo"},
            "trainer": {"steps": 100000, "save_every": 0, "save_final": False},
            "run": {"name": "long", "dir": str(tmp_path / "runs")}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(body))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("VLRL_RUN_CLAIMED", None)
    # stderr to a file, not a pipe nobody reads while the run goes on: a full pipe would block every writer
    err = open(tmp_path / "stderr.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "vlrl_cli", "train", str(tmp_path / "r.yaml"), "--nprocs", "2",
                             "--set", "rollout.engine_ranks=1"], env=env, stdout=subprocess.DEVNULL,
                            stderr=err, text=True, preexec_fn=terminal_sigint)
    metrics = tmp_path / "runs" / "long" / "metrics.jsonl"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            time.sleep(0.5)
        assert metrics.exists(), (tmp_path / "stderr.log").read_text()[-2000:] if proc.poll() is not None else "no step in 240 s"
        proc.send_signal(signal.SIGINT)
        try:  # stop_group gives the ranks 15 s after SIGTERM, then SIGKILLs what is left
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            tree = subprocess.run(["ps", "-eo", "pid,ppid,pgid,stat,etime,args"], capture_output=True, text=True).stdout
            raise AssertionError("still running 120 s after Ctrl-C:\n" + "\n".join(
                line for line in tree.splitlines() if "vlrl" in line or "deepspeed" in line)
                + "\n" + (tmp_path / "stderr.log").read_text()[-2000:]) from None
        assert code == 130, (tmp_path / "stderr.log").read_text()[-2000:]
    finally:  # a failure here must not leave ranks training on in the test machine
        if proc.poll() is None:
            proc.kill()
        subprocess.run(["pkill", "-9", "-f", str(tmp_path / "r.yaml")])
    lines = metrics.read_text().count("\n")
    time.sleep(3)
    assert metrics.read_text().count("\n") == lines  # no rank trains on
    ranks = subprocess.run(["pgrep", "-f", str(tmp_path / "r.yaml")], capture_output=True, text=True).stdout.split()
    assert ranks == [], ranks
