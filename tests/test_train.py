"""End-to-end training on the CPU with the tiny model: ZeRO stages agree, two ranks run, resume is exact."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vlrl_cli.train.recipe import load_recipe
from vlrl_cli.train.runs import read_metrics
from vlrl_process import run_vlrl


def write_recipe(tmp_path, tiny_model, colors_data, name, **sections) -> Path:
    import yaml

    base = {
        "model": {"path": str(tiny_model)},
        "data": {"train": str(colors_data / "train.parquet"), "val": str(colors_data / "val.parquet"), "val_limit": 4},
        "rollout": {"n": 4, "prompts_per_step": 4, "max_new_tokens": 4},
        "algorithm": {"name": "grpo"},
        # tiny model: every parameter is under DeepSpeed's persistence threshold; 0 makes ZeRO-3 partition them all
        "trainer": {"steps": 3, "lr": 1.0e-3, "micro_batch": 8, "zero_stage": 0, "zero3_persistence_threshold": 0},
        "run": {"name": name, "dir": str(tmp_path / "runs")},
    }
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def losses(run_dir):
    return [m["loss"] for m in read_metrics(run_dir)]


def test_zero_stages_reproduce_zero0_sft_losses(tmp_path, tiny_model, colors_data):
    out = {}
    # "3" partitions every parameter; "3-whole" is vlrl's one-rank default: ZeRO-3 with every parameter whole
    configs = {"0": {"zero_stage": 0}, "2": {"zero_stage": 2}, "3": {"zero_stage": 3},
               "3-whole": {"zero_stage": 3, "zero3_persistence_threshold": None}}
    for name, trainer in configs.items():
        rec = write_recipe(tmp_path, tiny_model, colors_data, f"sft-z{name}", algorithm={"name": "sft", "sft_target": "ground_truth"},
                           trainer={**trainer, "steps": 3})
        r = run_vlrl("train", rec)
        assert r.returncode == 0, r.stderr[-3000:]
        out[name] = losses(tmp_path / "runs" / f"sft-z{name}")
    assert len(out["0"]) == 3 and out["0"][2] < out["0"][0]  # it learns
    for name in ("2", "3", "3-whole"):
        assert out[name] == pytest.approx(out["0"], rel=1e-4, abs=1e-5), (name, out)


def test_zero2_with_cpu_optimizer_offload_reproduces_zero0(tmp_path, tiny_model, colors_data):
    """ZeRO-2 with the optimizer offloaded gives the losses of the plain run. Without CUDA its step is torch's
    AdamW: nothing is compiled (DeepSpeed's CPU Adam, what a GPU machine gets, was a two-minute C++ build)."""
    ops = tmp_path / "torch_extensions"  # empty: anything built at first use lands here
    out = {}
    for name, trainer in (("plain", {"zero_stage": 0}), ("offload", {"zero_stage": 2, "offload": True})):
        rec = write_recipe(tmp_path, tiny_model, colors_data, name, algorithm={"name": "sft", "sft_target": "ground_truth"},
                           trainer={**trainer, "steps": 3})
        r = run_vlrl("train", rec, env_extra={"TORCH_EXTENSIONS_DIR": str(ops)}, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        out[name] = losses(tmp_path / "runs" / name)
    assert out["offload"] == pytest.approx(out["plain"], rel=1e-4, abs=1e-5), out
    assert not ops.exists() or not any(ops.iterdir()), sorted(p.name for p in ops.iterdir())


USER_ENV = """
from vlrl_cli.rollout.envs.base import Env

class ParityEnv(Env):
    # a user environment (loaded by import path from the recipe): reward 1 for an even-length answer,
    # so a random model gets mixed rewards and non-zero advantages
    def score(self, text):
        ok = len(text) % 2 == 0
        return float(ok), {"correct": ok, "format_ok": True}
"""


@pytest.mark.model
def test_grpo_run_writes_metrics_and_a_loadable_checkpoint(tmp_path, tiny_model, colors_data, monkeypatch):
    (tmp_path / "userenvs.py").write_text(USER_ENV)
    rec = write_recipe(tmp_path, tiny_model, colors_data, "grpo", trainer={"steps": 2, "eval_every": 2})
    with open(rec, "a") as f:
        f.write("envs: {colors: 'userenvs:ParityEnv'}\n")
    r = run_vlrl("train", rec, "--json", tmp_path / "final.json", env_extra={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "grpo"
    metrics = read_metrics(run)
    required = {"step", "reward_mean", "accuracy", "response_len_mean", "entropy", "kl", "clip_frac", "grad_norm",
                "drift_abs_mean", "drift_abs_max", "is_ratio_mean", "time_generate_s", "time_score_s",
                "time_train_s", "time_sync_s", "tokens_per_s"}
    assert [m["step"] for m in metrics] == [1, 2] and required <= set(metrics[0])
    assert 0 < metrics[0]["reward_mean"] < 1  # the user environment was used
    assert "val_accuracy" in metrics[1]
    # same weights on both sides (fp32, hf engine): rollout and trainer log-probs agree
    assert metrics[0]["drift_abs_max"] < 1e-4
    monkeypatch.syspath_prepend(str(tmp_path))  # its environment module, as the run had it
    assert load_recipe(run / "recipe.yaml").rollout.n == 4  # the resolved recipe is a valid recipe
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(run / "checkpoints" / "step_2" / "hf")
    base = AutoModelForImageTextToText.from_pretrained(tiny_model)
    changed = [n for (n, p), (_, q) in zip(model.named_parameters(), base.named_parameters()) if not torch.equal(p, q)]
    assert changed  # the checkpoint holds the trained weights
    assert json.loads((tmp_path / "final.json").read_text())["step"] == 2
    from test_honest import assert_curves

    assert_curves(run)
    assert f"curves: {run / 'curves.png'}" in r.stderr


ALWAYS_RIGHT_ENV = """
from vlrl_cli.rollout.envs.base import Env

class AlwaysRight(Env):
    # every answer counts as correct (held-out accuracy 1.0); the reward still varies, so steps train
    def score(self, text):
        return float(len(text) % 2 == 0), {"correct": True, "format_ok": True}
"""


def test_a_run_that_reaches_its_accuracy_target_stops_there_with_its_last_checkpoint(tmp_path, tiny_model, colors_data):
    """trainer.stop_at_val_accuracy: the first validation at or over it ends the run, and that step's checkpoint
    is the run's last (a LoRA run's merged export included); a recipe that never validates is refused."""
    (tmp_path / "rightenvs.py").write_text(ALWAYS_RIGHT_ENV)
    sections = dict(model={"path": str(tiny_model), "lora": {"rank": 4}}, envs={"colors": "rightenvs:AlwaysRight"})
    rec = write_recipe(tmp_path, tiny_model, colors_data, "target",
                       trainer={"steps": 6, "eval_every": 2, "stop_at_val_accuracy": 0.9}, **sections)
    r = run_vlrl("train", rec, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "target"
    assert [m["step"] for m in read_metrics(run)] == [1, 2] and read_metrics(run)[1]["val_accuracy"] == 1.0
    assert "step 2: held-out accuracy 1.000 reached trainer.stop_at_val_accuracy 0.9" in r.stderr
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_2"
    assert (ckpts / "step_2" / "adapter" / "adapter_config.json").exists() and (ckpts / "step_2" / "hf" / "config.json").exists()
    bad = write_recipe(tmp_path, tiny_model, colors_data, "target-no-eval",
                       trainer={"steps": 6, "eval_every": 0, "stop_at_val_accuracy": 0.9}, **sections)
    r = run_vlrl("train", bad, cwd=tmp_path)
    assert r.returncode == 2 and "trainer.stop_at_val_accuracy 0.9 needs a GRPO run that validates" in r.stderr, r.stderr


@pytest.mark.model
def test_grpo_under_zero3_with_a_kl_reference_and_the_hf_engine(tmp_path, tiny_model, colors_data):
    # ZeRO-3 partitions the policy at load time; the engine's copy and the KL reference must still load whole
    rec = write_recipe(tmp_path, tiny_model, colors_data, "z3grpo", trainer={"steps": 2, "zero_stage": 3},
                       algorithm={"name": "grpo", "kl_coef": 0.01})
    (tmp_path / "userenvs.py").write_text(USER_ENV)
    with open(rec, "a") as f:
        f.write("envs: {colors: 'userenvs:ParityEnv'}\n")  # mixed rewards, so step 1 changes the policy
    r = run_vlrl("train", rec, env_extra={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = read_metrics(tmp_path / "runs" / "z3grpo")
    assert [m["step"] for m in metrics] == [1, 2]
    assert metrics[1]["drift_abs_max"] < 1e-4  # the engine holds the gathered step-1 weights
    assert metrics[1]["kl"] is not None and metrics[1]["kl"] > 0  # the policy moved away from the reference


def test_tensorboard_gets_every_metric_of_every_step(tmp_path, tiny_model, colors_data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rec = write_recipe(tmp_path, tiny_model, colors_data, "tb", algorithm={"name": "sft", "sft_target": "ground_truth"},
                       trainer={"steps": 2}, run={"tensorboard": True})
    r = run_vlrl("train", rec)
    assert r.returncode == 0, r.stderr[-3000:]
    events = EventAccumulator(str(tmp_path / "runs" / "tb" / "tensorboard"))
    events.Reload()
    jsonl = read_metrics(tmp_path / "runs" / "tb")
    assert {"loss", "grad_norm", "lr"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [1, 2]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([m["loss"] for m in jsonl])


def test_kill_and_resume_reaches_the_same_metrics(tmp_path, tiny_model, colors_data):
    kw = dict(trainer={"steps": 6, "save_every": 2})
    full = write_recipe(tmp_path, tiny_model, colors_data, "full", **kw)
    assert run_vlrl("train", full).returncode == 0
    part = write_recipe(tmp_path, tiny_model, colors_data, "part", **kw)
    run = tmp_path / "runs" / "part"
    p = subprocess.Popen([sys.executable, "-m", "vlrl_cli", "train", str(part)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    latest = run / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and not latest.exists():
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)  # mid-training, right after its first checkpoint (on a busy machine a
    p.wait()                            # later one: resuming from any of them must give the same run)
    assert latest.read_text() in ("step_2", "step_4"), latest.read_text()
    r = run_vlrl("train", part, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    keys = ("step", "reward_mean", "accuracy", "response_len_mean", "grad_norm", "entropy")
    a = [{k: m[k] for k in keys} for m in read_metrics(tmp_path / "runs" / "full")]
    b = [{k: m[k] for k in keys} for m in read_metrics(run)]
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=1e-5, abs=1e-6), (x, y)


def test_two_rank_zero3_through_the_deepspeed_launcher(tmp_path, tiny_model, colors_data):
    rec = write_recipe(tmp_path, tiny_model, colors_data, "z3x2", algorithm={"name": "sft", "sft_target": "ground_truth"},
                       trainer={"zero_stage": 3, "steps": 2})
    r = run_vlrl("train", rec, "--nprocs", "2", timeout=900)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    metrics = read_metrics(tmp_path / "runs" / "z3x2")
    assert [m["step"] for m in metrics] == [1, 2]
    assert (tmp_path / "runs" / "z3x2" / "checkpoints" / "step_2" / "hf" / "model.safetensors").exists()


def uneven_colors(colors_data: Path, out: Path, long_rows: set[int]) -> Path:
    """The colours training data with prompts of varied length, and the rows `long_rows` made far too long."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(colors_data / "train.parquet")
    rows = table.to_pylist()
    for i, row in enumerate(rows):
        text = next(p for p in row["prompt"][0]["content"] if p["type"] == "text")
        text["text"] += " Think." * (i % 5) + (" This prompt is far too long." * 40 if i in long_rows else "")
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), out)
    return out


def test_two_ranks_train_the_loss_curve_of_one_rank_with_the_same_global_batch(tmp_path, tiny_model, colors_data):
    """SFT (ZeRO-2, gloo): 2 ranks x 4 prompts per step == 1 rank x 8, step for step. The ranks' batches
    differ on purpose: in step 1 one of rank 0's prompts is over data.max_prompt_tokens (3 sequences
    against 4: per-rank means averaged would weight them wrongly), and in step 2 all of rank 1's are (it
    must still join the gradient reduction, or rank 0 waits for ever)."""
    import pyarrow.parquet as pq

    from vlrl_cli.data.records import prompts_for_step

    n = pq.read_metadata(colors_data / "train.parquet").num_rows
    step1_rank0 = prompts_for_step(n, 0, 4, 0, rank=0, world=2)
    step2_rank1 = prompts_for_step(n, 1, 4, 0, rank=1, world=2)
    assert prompts_for_step(n, 0, 8, 0) == step1_rank0 + prompts_for_step(n, 0, 4, 0, rank=1, world=2)
    data = uneven_colors(colors_data, tmp_path / "train.parquet", {step1_rank0[0], *step2_rank1})
    sft = {"name": "sft", "sft_target": "ground_truth"}
    out = {}
    # a CPU run compiles no C++ op: DeepSpeed's shared-memory all-reduce took 30 s of every fresh environment's
    # first run (and a compiler); gloo reduces instead
    ops = tmp_path / "torch_extensions"
    for name, ranks, per_step in (("one", 1, 8), ("two", 2, 4)):
        rec = write_recipe(tmp_path, tiny_model, colors_data, name, algorithm=sft,
                           data={"train": str(data), "max_prompt_tokens": 100},
                           rollout={"prompts_per_step": per_step}, trainer={"zero_stage": 2, "steps": 3})
        r = run_vlrl("train", rec, "--nprocs", str(ranks), env_extra={"TORCH_EXTENSIONS_DIR": str(ops)}, timeout=900)
        assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
        out[name] = read_metrics(tmp_path / "runs" / name)
        assert not ops.exists() or not any(ops.iterdir()), sorted(p.name for p in ops.iterdir())
    one, two = out["one"], out["two"]
    assert [m["prompts_too_long"] for m in one] == [m["prompts_too_long"] for m in two] == [1, 4, 0]
    assert [m["tokens"] for m in one] == [m["tokens"] for m in two]
    assert one[2]["loss"] < one[0]["loss"]  # it learns
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (one, two)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (one, two)


def test_grpo_on_two_ranks_goes_on_when_one_rank_has_nothing_to_train(tmp_path, tiny_model, colors_data):
    """GRPO, 2 gloo ranks, ZeRO-2: in step 2 all of rank 1's prompts are over the limit (no rollouts at all)
    while rank 0 has two micro-batches. ZeRO-2 reduces in every backward, so rank 1 runs two zero-weight
    micro-batches (before: a collective size mismatch aborted the run) and the run goes on."""
    import pyarrow.parquet as pq

    from vlrl_cli.data.records import prompts_for_step

    n = pq.read_metadata(colors_data / "train.parquet").num_rows
    data = uneven_colors(colors_data, tmp_path / "train.parquet", set(prompts_for_step(n, 1, 4, 0, rank=1, world=2)))
    rec = write_recipe(tmp_path, tiny_model, colors_data, "grpo2", data={"train": str(data), "max_prompt_tokens": 100},
                       rollout={"prompts_per_step": 4, "n": 4}, trainer={"zero_stage": 2, "steps": 3})
    r = run_vlrl("train", rec, "--nprocs", "2", timeout=900)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    m = read_metrics(tmp_path / "runs" / "grpo2")
    assert [x["step"] for x in m] == [1, 2, 3]
    assert [x["prompts_too_long"] for x in m] == [0, 4, 0]
    assert [x["trained_sequences"] for x in m] == [32, 16, 32]


def test_placeholder_tokens_are_never_sampled(tiny_model, tmp_path):
    import shutil

    from transformers import AutoModelForImageTextToText

    from vlrl_cli.rollout.engines import GenRequest, Sampling, placeholder_token_ids
    from vlrl_cli.rollout.engines.hf import HFEngine
    from vlrl_cli.model.loading import load_processor
    from vlrl_cli.model.render import render_prompt

    # a model that wants nothing but image placeholders
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model, bad)
    model = AutoModelForImageTextToText.from_pretrained(bad)
    proc = load_processor(str(bad))
    banned = placeholder_token_ids(proc)
    with torch.no_grad():
        model.lm_head.weight[banned] *= 0
        model.lm_head.weight[banned] += 5.0
    model.save_pretrained(bad)
    engine = HFEngine(str(bad), proc)
    rp = render_prompt(proc, [{"role": "user", "content": "hello"}])
    gens = engine.generate([GenRequest(rp.input_ids, rp.tensors, n=8)], Sampling(1.0, 1.0, 16, 0))[0]
    sampled = {t for g in gens for t in g.token_ids}
    assert sampled and not (sampled & set(banned))
    assert all(abs(lp) < 1e9 for g in gens for lp in g.logprobs)


def _all_ranks_worker(rank, port, out):
    import torch.distributed as dist

    from vlrl_cli.train.distributed import all_ranks

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    out[rank] = (all_ranks({"a": rank + 1.0, "b": 10.0}), all_ranks({"m": float(rank * 5)}, op="max"))
    dist.destroy_process_group()


def test_step_metrics_are_over_all_ranks():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_all_ranks_worker, args=(port, out), nprocs=2)
    for rank in (0, 1):
        sums, maxes = out[rank]
        assert sums == {"a": 3.0, "b": 20.0} and maxes == {"m": 5.0}


def test_zero3_keeps_parameters_whole_on_one_rank_by_default(tiny_model):
    """persistence_for: every parameter whole on one rank (a one-rank partition is the whole model, and each
    partitioned parameter costs a fetch per pass); DeepSpeed's 100k on several; an explicit value wins."""
    from vlrl_cli.train import distributed, policy as pol

    assert pol.persistence_for(1, None) >= 10**12
    assert pol.persistence_for(2, None) == 100_000
    assert pol.persistence_for(1, 0) == 0
    distributed.init_distributed()
    kinds = {}
    for threshold in (None, 0):
        engine = pol.build_policy(str(tiny_model), lr=1e-3, weight_decay=0.0, warmup=0, stage=3, offload=False,
                                       grad_clip=1.0, dtype="float32", persistence_threshold=threshold)
        kinds[threshold] = {bool(p.ds_persist) for p in engine.module.parameters()}
    assert kinds == {None: {True}, 0: {False}}


@pytest.mark.model
def test_ppo_epochs_score_the_reference_once_per_step(tmp_path, tiny_model, colors_data, monkeypatch):
    """Two PPO epochs vs one, same seed: step 1's rollouts and drift (the sampler against the anchor) are the
    same in both runs; with one epoch step 1 starts from the reference's own weights (KL 0) and step 2 has
    moved (KL > 0). The reference forward runs once per micro-batch and step, not once per epoch. (What the
    later epochs add to the step's statistics: tests/test_shapes.py.)"""
    from vlrl_cli.train import batches
    from vlrl_cli.train.launch import run_training

    (tmp_path / "userenvs.py").write_text(USER_ENV)
    monkeypatch.syspath_prepend(str(tmp_path))
    real = batches.sequence_logprobs
    ref_calls = []

    def counting(model, b, *args, **kw):
        if not hasattr(model, "zero_optimization_stage"):  # not the DeepSpeed policy: the KL reference
            ref_calls.append(b.input_ids.shape[0])
        return real(model, b, *args, **kw)

    monkeypatch.setattr(batches, "sequence_logprobs", counting)
    out = {}
    for epochs in (1, 2):
        rec_path = write_recipe(tmp_path, tiny_model, colors_data, f"ppo{epochs}", trainer={"steps": 2, "micro_batch": 8},
                                algorithm={"name": "grpo", "kl_coef": 0.1, "ppo_epochs": epochs})
        with open(rec_path, "a") as f:
            f.write("envs: {colors: 'userenvs:ParityEnv'}\n")
        ref_calls.clear()
        run_training(load_recipe(rec_path))
        out[epochs] = read_metrics(tmp_path / "runs" / f"ppo{epochs}")
        assert ref_calls == [8, 8, 8, 8], ref_calls  # 16 sequences a step in micro-batches of 8, two steps
    assert out[1][0]["kl"] == pytest.approx(0.0, abs=1e-7), out[1][0]
    assert out[1][1]["kl"] > 1e-6 and out[2][1]["kl"] > 1e-6, (out[1][1], out[2][1])
    for key in ("drift_abs_mean", "reward_mean"):
        assert out[2][0][key] == pytest.approx(out[1][0][key], rel=1e-5, abs=1e-8), key


@pytest.mark.model
def test_the_next_steps_episodes_are_rendered_on_another_thread_while_this_step_trains(tmp_path, tiny_model,
                                                                                      colors_data, monkeypatch):
    """Issue 15.3: the generate phase only generates. Step k+1's episodes (resets, prompts with images) are built
    on the render thread once step k's training batches exist (not while they are built: both are Python work,
    and on an H200 the batch building got slower by what the rendering took), and step k+1's rollouts run on
    exactly those episodes, which hold step k+1's prompts."""
    import threading

    from vlrl_cli.train import batches, grpo
    from vlrl_cli.data.records import load_records, prompts_for_step
    from vlrl_cli.train.launch import run_training

    events = []
    real_start, real_run = grpo.start_episodes, grpo.run_episodes

    def start(records, processor, *args, **kw):
        events.append(("build", threading.current_thread().name, [r["id"] for r in records], processor))
        groups = real_start(records, processor, *args, **kw)
        events.append(("built", id(groups)))
        return groups

    def run(engine, groups, *args, **kw):
        events.append(("run", id(groups), [eps[0].record["id"] for eps in groups]))
        return real_run(engine, groups, *args, **kw)

    real_batch = batches.make_batch

    def batch(*args, **kw):
        events.append(("batch",))
        return real_batch(*args, **kw)

    monkeypatch.setattr(grpo, "start_episodes", start)
    monkeypatch.setattr(grpo, "run_episodes", run)
    monkeypatch.setattr(batches, "make_batch", batch)
    rec = load_recipe(write_recipe(tmp_path, tiny_model, colors_data, "render", trainer={"steps": 3}))
    run_training(rec)
    kinds = [e[0] for e in events]
    for k in (1, 2):  # step k's build starts after the last batch of step k - 1 and is done before its rollouts
        builds = [i for i, x in enumerate(kinds) if x == "build"]
        runs = [i for i, x in enumerate(kinds) if x == "run"]
        last_batch = max(i for i, x in enumerate(kinds[:runs[k]]) if x == "batch")
        assert runs[k - 1] < last_batch < builds[k], kinds
    events[:] = [e for e in events if e[0] != "batch"]
    assert [e[0] for e in events] == ["build", "built", "run"] * 3  # each step's build is done before its rollouts
    train = load_records(rec.data.train)
    for k in range(3):
        build, built, rollout = events[3 * k: 3 * k + 3]
        assert build[1].startswith("vlrl-render"), build[1]
        want = [train[i]["id"] for i in prompts_for_step(len(train), k, 4, rec.trainer.seed, 0, 1)]
        assert build[2] == rollout[2] == want and built[1] == rollout[1]
    processors = {id(e[3]) for e in events if e[0] == "build"}
    assert len(processors) == 1  # one processor of the render thread's own, reused
    assert [m["step"] for m in read_metrics(tmp_path / "runs" / "render")] == [1, 2, 3]


# A fault inside vlrl itself (not the user's recipe, data or environment), injected at interpreter start: the
# GRPO advantage computation raises.
INTERNAL_FAULT = """
import vlrl_cli.train.losses as losses

def group_advantages(*args, **kwargs):
    raise RuntimeError("advantage bookkeeping exploded")

losses.group_advantages = group_advantages
"""


def test_an_internal_error_exits_1_with_the_traceback_in_the_run_dir(tmp_path, tiny_model, colors_data):
    (tmp_path / "sitecustomize.py").write_text(INTERNAL_FAULT)
    rec = write_recipe(tmp_path, tiny_model, colors_data, "broken", trainer={"steps": 1})
    r = run_vlrl("train", rec, env_extra={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 1, r.stderr[-2000:]
    assert "internal error: RuntimeError: advantage bookkeeping exploded" in r.stderr
    assert "bad usage" not in r.stderr and "error: " not in r.stderr.replace("internal error: ", "")
    [log] = (tmp_path / "runs" / "broken").glob("vlrl-error-*.log")
    assert str(log) in r.stderr.replace("\n", "")
    text = log.read_text()
    assert "Traceback" in text and "advantage bookkeeping exploded" in text and "train" in text.splitlines()[0]
    # a usage error stays exit 2, one line naming the key
    r = run_vlrl("train", rec, "--set", "trainer.stepz=3")
    assert r.returncode == 2 and "trainer" in r.stderr and "stepz" in r.stderr and "Traceback" not in r.stderr


def test_a_rank_that_loses_its_peer_says_so_and_other_os_errors_still_leave_a_traceback(tmp_path, monkeypatch, capsys):
    """When one rank of a run dies, the others fail in a collective: that echo is named as such, not reported
    as vlrl's own bug. An OSError that is not the user's machine's (a refused connection) is an internal error
    with its traceback log, like any other exception."""
    import errno

    import typer

    from vlrl_cli import cli

    monkeypatch.setattr(cli.tempfile, "gettempdir", lambda: str(tmp_path))

    def run(exc):
        with pytest.raises(typer.Exit) as e:
            cli.guarded(lambda: (_ for _ in ()).throw(exc))()
        return e.value.exit_code, capsys.readouterr().err

    peer = RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:41235")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code, text = run(peer)
    assert code == 1 and "rank 0 lost contact with another rank" in text and "please include" not in text
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: no peer to lose, a real internal error
    code, text = run(peer)
    assert code == 1 and "internal error: RuntimeError" in text and "please include" in text
    code, text = run(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"))
    assert code == 1 and "internal error: ConnectionRefusedError" in text
    code, text = run(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x")))
    assert code == 2 and "no space left" in text
    assert len(list(tmp_path.glob("vlrl-error-*.log"))) == 3


def test_each_rank_on_a_machine_gets_its_share_of_the_cpu_threads(monkeypatch):
    """Two ranks on one machine must not each run as many CPU threads as it has cores (measured: the CPU
    phases of a GRPO step twice as slow on 2 x H200); OMP_NUM_THREADS, when given, wins."""
    from vlrl_cli.train.distributed import share_cpu_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LOCAL_SIZE", "2")
        monkeypatch.setattr(os, "cpu_count", lambda: 32)
        assert share_cpu_threads() == 16 and torch.get_num_threads() == 16
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert share_cpu_threads() == 0
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setenv("LOCAL_SIZE", "1")
        assert share_cpu_threads() == 0
    finally:
        torch.set_num_threads(before)


def test_fp32_gradient_accumulation_keeps_small_micro_batches_that_bf16_rounds_away(tiny_model):
    """bf16 training, ZeRO-1, 32 micro-batches of the same input: one with loss weight 1, then 31 with 0.002.
    The true accumulated gradient is 1.062x the first one's. bf16 .grad accumulation (DeepSpeed's default)
    rounds every small addition away (1 + 0.002 == 1 in bf16); trainer.grad_accum_fp32 keeps them."""
    from vlrl_cli.train import distributed, policy as pol

    distributed.init_distributed()
    x = torch.randint(0, 500, (2, 20), generator=torch.Generator().manual_seed(0))
    ratios = {}
    for fp32 in (False, True):
        engine = pol.build_policy(str(tiny_model), lr=0.0, weight_decay=0.0, warmup=0, stage=1, offload=False,
                                  grad_clip=1e9, dtype="bfloat16", grad_accum_fp32=fp32)
        assert type(engine.optimizer).__name__ == ("BF16_Optimizer" if fp32 else "DeepSpeedZeroOptimizer")

        def norm(weights):
            for i, w in enumerate(weights):
                pol.backward_step(engine, engine(input_ids=x).logits.float().pow(2).mean() * w, i == len(weights) - 1)
            return pol.optimizer_step(engine)

        ratios[fp32] = norm([1.0] + [0.002] * 31) / norm([1.0])
    expected = 1 + 31 * 0.002
    assert ratios[True] == pytest.approx(expected, rel=1e-3), ratios
    assert abs(ratios[False] - 1.0) < 0.01, ratios  # the bf16 sum lost all 31 small micro-batches


def test_grad_accum_fp32_trains_resumes_and_is_refused_where_deepspeed_cannot(tmp_path, tiny_model, colors_data):
    from vlrl_cli.train.recipe import RecipeError

    trainer = {"zero_stage": 1, "grad_accum_fp32": True, "steps": 3, "save_every": 1}
    rec = write_recipe(tmp_path, tiny_model, colors_data, "acc32", model={"dtype": "bfloat16"},
                       algorithm={"name": "sft", "sft_target": "ground_truth"}, trainer=trainer)
    r = run_vlrl("train", rec)
    assert r.returncode == 0, r.stderr[-3000:]
    full = losses(tmp_path / "runs" / "acc32")
    import shutil

    ckpts = tmp_path / "runs" / "acc32" / "checkpoints"
    shutil.rmtree(ckpts / "step_3")  # as if killed after step 2's checkpoint
    (ckpts / "latest").write_text("step_2")
    r = run_vlrl("train", rec, "--resume")  # from step 2, with BF16_Optimizer's state
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["step"] for m in read_metrics(tmp_path / "runs" / "acc32")] == [1, 2, 3]
    assert losses(tmp_path / "runs" / "acc32") == pytest.approx(full, rel=1e-3)
    for bad in ({"zero_stage": 2}, {"zero_stage": 1, "offload": True}):
        with pytest.raises(RecipeError, match="trainer.grad_accum_fp32 needs"):
            load_recipe(write_recipe(tmp_path, tiny_model, colors_data, "bad", model={"dtype": "bfloat16"},
                                     trainer={**trainer, **bad}))
    with pytest.raises(RecipeError, match="model.dtype bfloat16"):
        load_recipe(write_recipe(tmp_path, tiny_model, colors_data, "bad", trainer=trainer))


def test_two_multi_rank_runs_on_one_machine_get_their_own_port(monkeypatch, tmp_path):
    """DeepSpeed's launcher defaults every run to port 29500: a second run on the machine died with "address
    already in use". Each launch takes a free port (a MASTER_PORT the user set wins; a hostfile's nodes keep
    DeepSpeed's agreement)."""
    import socket

    from vlrl_cli.train.launch import launcher_command

    monkeypatch.delenv("MASTER_PORT", raising=False)
    ports = []
    for _ in range(2):
        cmd = launcher_command(tmp_path / "r.yaml", [], False, nprocs=2)
        ports.append(int(cmd[cmd.index("--master_port") + 1]))
        with socket.socket() as s:  # free now
            s.bind(("127.0.0.1", ports[-1]))
    with socket.socket() as held:  # a run holding its port: the next launch does not get it
        held.bind(("127.0.0.1", ports[0]))
        held.listen()
        cmd = launcher_command(tmp_path / "r.yaml", [], False, nprocs=2)
        assert int(cmd[cmd.index("--master_port") + 1]) != ports[0]
    monkeypatch.setenv("MASTER_PORT", "31234")
    cmd = launcher_command(tmp_path / "r.yaml", [], False, nprocs=2)
    assert cmd[cmd.index("--master_port") + 1] == "31234"
    assert "--master_port" not in launcher_command(tmp_path / "r.yaml", [], False, hostfile=tmp_path / "hosts")
