"""GPU tests (marked `gpu`): run on the device with the kit (vLLM + DeepSpeed), never in CI.

    . /tmp/kit/env.sh && python3 -m pytest -m gpu -q tests/test_gpu.py

Every family (model.families.FAMILIES): the vLLM engine against the trainer's forward (before and
after a weight update, on seen images), `vlrl check-drift --engine vllm --after-update`, and GRPO steps
with the vllm engine. Each writes its figures to $OUT/<test>-<family>.json when OUT is set.
"""

import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

pytestmark = pytest.mark.gpu

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def colour_records(n, seed=0):
    from vlrl_cli.data.sources import ConvertContext, Item
    from vlrl_cli.data.sources.colors import convert

    ctx = ConvertContext(opts={"seed": seed})
    return [convert(Item(str(i), None, {"index": i, "colors": ["red", "green", "blue", "yellow"],
                                        "shapes": ["circle", "square"]}), ctx)[0] for i in range(n)]


from vlrl_cli.model.families import FAMILIES  # noqa: E402


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def gpu_tiny(tmp_path_factory, family):
    from vlrl_cli.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("gpu") / f"tiny-{family}", family)


@pytest.fixture(scope="module")
def gpu_tiny_qwen2_5(tmp_path_factory):
    from vlrl_cli.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("gpu") / "tiny-qwen2_5_vl", "qwen2_5_vl")


def colours_data(tmp_path):
    """The colours task, 200 rows of 84-px images, prepared once per test folder."""
    data = tmp_path / "colors"
    if not data.exists():
        assert subprocess.run([sys.executable, "-m", "vlrl_cli", "prepare", "colors", "--out", str(data), "--rows", "200",
                               "--image-size", "84"], capture_output=True).returncode == 0
    return data


def vllm_grpo_sets(model, data, tmp_path, *extra: str) -> list[str]:
    """--set arguments of a colours GRPO run with the vllm engine in bf16 (plus `extra` key=value pairs)."""
    pairs = [f"model.path={model}", "rollout.engine=vllm", f"data.train={data / 'train.parquet'}",
             f"data.val={data / 'val.parquet'}", f"run.dir={tmp_path / 'runs'}", "model.dtype=bfloat16",
             "rollout.gpu_memory_utilization=0.2", *extra]
    return [a for kv in pairs for a in ("--set", kv)]


def run_logged(name: str, *args, timeout: int = 400) -> int:
    """`vlrl ARGS` with its output streamed to NAME.log under $OUT (or the temp folder), so a hang still
    leaves a log that comes back from the device; returns the exit status."""
    logs = os.environ.get("OUT") or tempfile.gettempdir()
    with open(os.path.join(logs, f"{name}.log"), "w") as f:
        return subprocess.run([sys.executable, "-m", "vlrl_cli", *map(str, args)], stdout=f, stderr=subprocess.STDOUT,
                              timeout=timeout).returncode


def record(name: str, family: str, figures: dict) -> None:
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, f"{name}-{family}.json"), "w") as f:
            json.dump({"family": family, **figures}, f, indent=2)
    print(name, family, json.dumps(figures))


def trainer_logprobs(model, trajs, processor):
    from vlrl_cli.rollout.engines import placeholder_token_ids
    from vlrl_cli.train.batches import make_batch, sequence_logprobs

    b = make_batch(trajs, processor, torch.device("cuda"))
    with torch.no_grad():
        lp = sequence_logprobs(model, b, 1.0, placeholder_token_ids(processor))
    m = b.loss_mask
    d = ((lp - b.engine_logp).abs() * m)
    return float(d.sum() / m.sum()), float(d.max())


@needs_gpu
def test_vllm_engine_end_to_end(gpu_tiny, family, tmp_path):
    """Generation, prompt-id agreement, log-probs vs the trainer, weight sync (seen image), sleep/wake."""
    from vlrl_cli.rollout.engines import Sampling
    from vlrl_cli.rollout.engines.vllm import VLLMEngine
    from vlrl_cli.model.loading import load_vlm
    from vlrl_cli.model.loading import load_processor
    from vlrl_cli.rollout.episodes import collect

    proc = load_processor(str(gpu_tiny))
    engine = VLLMEngine(str(gpu_tiny), proc, dtype="bfloat16", gpu_memory_utilization=0.2)
    model = load_vlm(str(gpu_tiny), torch.bfloat16).cuda().eval()
    seen, unseen = colour_records(8, seed=1), colour_records(8, seed=2)
    s = Sampling(1.0, 1.0, 16, 0)
    trajs = collect(engine, seen, proc, 4, s, 1, 4096)  # raises PromptMismatch if ids differ
    before = trainer_logprobs(model, trajs, proc)
    report = {"before_update": before}
    assert before[0] < 0.02 and before[1] < 0.3, before

    # a known weight change pushed through the training sync path; then the SEEN images again
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    engine.sleep()
    free_asleep = torch.cuda.mem_get_info()[0]
    engine.update_weights((n, p.detach()) for n, p in model.named_parameters())
    engine.wake()
    seen_after = trainer_logprobs(model, collect(engine, seen, proc, 4, s, 1, 4096), proc)
    unseen_after = trainer_logprobs(model, collect(engine, unseen, proc, 4, s, 1, 4096), proc)
    report.update(seen_after_update=seen_after, unseen_after_update=unseen_after,
                  free_gib_asleep=free_asleep / 2**30, free_gib_awake=torch.cuda.mem_get_info()[0] / 2**30)
    record("engine", family, report)
    del engine
    assert seen_after[0] < 0.03 and seen_after[0] < 3 * unseen_after[0] + 0.01, report
    assert report["free_gib_asleep"] > report["free_gib_awake"]


@needs_gpu
def test_grpo_steps_with_the_vllm_engine(tmp_path, gpu_tiny, family):
    """A few GRPO steps, vllm engine, bf16: finite metrics, small engine/trainer drift every step (the
    weights synced after each step reach the engine), a checkpoint at the end."""
    from vlrl_cli.train.runs import read_metrics

    data = colours_data(tmp_path)
    logs = os.environ.get("OUT") or str(tmp_path)
    with open(os.path.join(logs, f"grpo-{family}.log"), "w") as f:
        rc = subprocess.run([sys.executable, "-m", "vlrl_cli", "train", "recipes/colors-tiny.yaml",
                             *vllm_grpo_sets(gpu_tiny, data, tmp_path, "trainer.steps=5", "trainer.eval_every=5",
                                             "trainer.save_every=0")],
                            stdout=f, stderr=subprocess.STDOUT, timeout=400).returncode
    assert rc == 0
    m = read_metrics(tmp_path / "runs" / "colors-grpo")
    assert [x["step"] for x in m] == [1, 2, 3, 4, 5]
    record("grpo", family, {"steps": m})
    assert all(x["drift_abs_mean"] < 0.02 and 0.9 < x["is_ratio_mean"] < 1.1 for x in m), m
    assert "val_accuracy" in m[-1]
    assert (tmp_path / "runs" / "colors-grpo" / "checkpoints" / "step_5" / "hf" / "model.safetensors").exists()


@needs_gpu
def test_packed_grpo_with_a_kl_reference_starts_at_zero_kl(tmp_path, gpu_tiny, family):
    """Packed rows (the varlen kernel) with a KL reference, vllm engine, bf16: at step 1 the policy is the
    reference, so the logged KL must be ~0 (when the reference scored packed rows with plain causal attention
    across sequence boundaries it was 2.7e-3); and check-drift's packed mode agrees with the engine."""
    from vlrl_cli.train.runs import read_metrics

    data = colours_data(tmp_path)
    logs = os.environ.get("OUT") or str(tmp_path)
    with open(os.path.join(logs, f"packed-kl-{family}.log"), "w") as f:
        rc = subprocess.run([sys.executable, "-m", "vlrl_cli", "train", "recipes/colors-tiny.yaml",
                             *vllm_grpo_sets(gpu_tiny, data, tmp_path, "trainer.steps=2", "trainer.eval_every=0",
                                             "trainer.save_every=0", "trainer.save_final=false",
                                             "trainer.pack_tokens=4096", "algorithm.kl_coef=0.1")],
                            stdout=f, stderr=subprocess.STDOUT, timeout=400).returncode
    assert rc == 0
    m = read_metrics(tmp_path / "runs" / "colors-grpo")
    record("packed_kl", family, {"steps": m})
    assert m[0]["micro_batches"] < 256 // 64 and m[0]["kl"] < 1e-4, m[0]
    rc, report = _check_drift_cli(tmp_path, gpu_tiny, f"packed-drift-{family}", "--pack-tokens", "4096")
    assert rc == 0 and report["stats"]["overall"]["abs_diff"]["mean"] < 0.02, report["stats"]["overall"]


@needs_gpu
def test_grpo_with_vllm_learns_colours(tmp_path, gpu_tiny_qwen2_5):
    gpu_tiny = gpu_tiny_qwen2_5
    """SFT (format), then GRPO with the vllm engine: the reward must rise."""
    from vlrl_cli.train.runs import read_metrics

    data = tmp_path / "colors"
    # 84-px images as in the CPU demo: at 56 px the tiny vision tower confuses blue and red
    assert run_logged("prepare", "prepare", "colors", "--out", data, "--rows", "1200", "--image-size", "84") == 0
    # the recipes' own precision (fp32, vLLM too): in bf16 the same recipe never learned on the GPU
    # (held-out 0.0 at every evaluation over 80 steps, session of 2026-11-24)
    common = ["--set", f"data.train={data / 'train.parquet'}", "--set", f"run.dir={tmp_path / 'runs'}"]
    assert run_logged("sft", "train", "recipes/colors-tiny-sft.yaml", "--set", f"model.path={gpu_tiny}", *common) == 0
    sft = tmp_path / "runs" / "colors-sft" / "checkpoints" / "step_40" / "hf"
    assert run_logged("grpo", "train", "recipes/colors-tiny.yaml", "--set", f"model.path={sft}", "--set", "rollout.engine=vllm",
                      "--set", f"data.val={data / 'val.parquet'}", "--set", "trainer.steps=100", "--set", "trainer.eval_every=50",
                      "--set", "trainer.lr=1e-3", "--set", "trainer.warmup_steps=10", "--set", "trainer.lr_schedule=linear",
                      "--set", "rollout.prompts_per_step=32", *common, timeout=420) == 0
    m = read_metrics(tmp_path / "runs" / "colors-grpo")
    first = sum(x["reward_mean"] for x in m[:10]) / 10
    last = sum(x["reward_mean"] for x in m[-10:]) / 10
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_grpo_metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in m)
    assert last > first + 0.2, (first, last)
    # bf16 on both sides: small on average; single steps can spike (0.06 measured once on an H200)
    assert sum(x["drift_abs_mean"] for x in m) / len(m) < 0.02
    assert all(0.9 < x["is_ratio_mean"] < 1.1 for x in m)


@needs_gpu
def test_lora_grpo_with_vllm_learns_colours(tmp_path, gpu_tiny_qwen2_5):
    """The CPU demo's two stages on the GPU: format-only SFT, then recipes/colors-tiny-lora.yaml (adapters only)
    with the vllm engine in the recipes' fp32. Held-out greedy accuracy at the last evaluation must reach 0.85."""
    from vlrl_cli.train.runs import read_metrics

    data = tmp_path / "colors"
    assert run_logged("lora_prepare", "prepare", "colors", "--out", data, "--rows", "1200", "--image-size", "84") == 0
    common = ["--set", f"data.train={data / 'train.parquet'}", "--set", f"run.dir={tmp_path / 'runs'}"]
    assert run_logged("lora_sft", "train", "recipes/colors-tiny-sft.yaml", "--set", f"model.path={gpu_tiny_qwen2_5}", *common) == 0
    sft = tmp_path / "runs" / "colors-sft" / "checkpoints" / "step_40" / "hf"
    assert run_logged("lora_grpo", "train", "recipes/colors-tiny-lora.yaml", "--set", f"model.path={sft}",
                      "--set", "rollout.engine=vllm", "--set", f"data.val={data / 'val.parquet'}", *common,
                      timeout=900) == 0  # 150 steps: about 6 minutes on an H100
    m = read_metrics(tmp_path / "runs" / "colors-grpo-lora")
    record("lora_learns", "qwen2_5_vl", {"steps": m})
    vals = [x["val_accuracy"] for x in m if "val_accuracy" in x]
    assert vals[-1] >= 0.85, vals
    assert sum(x["drift_abs_mean"] for x in m) / len(m) < 0.02


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (nvidia-h200-x2)")
def test_two_gpu_zero3_grpo_with_one_vllm_engine_per_rank(tmp_path, gpu_tiny_qwen2_5):
    gpu_tiny = gpu_tiny_qwen2_5
    """Two ranks through the DeepSpeed launcher, ZeRO-3, each rank with its own colocated vLLM engine."""
    from vlrl_cli.train.runs import read_metrics

    data = tmp_path / "colors"
    logs = os.environ.get("OUT") or str(tmp_path)
    assert subprocess.run([sys.executable, "-m", "vlrl_cli", "prepare", "colors", "--out", str(data), "--rows", "400"],
                          capture_output=True).returncode == 0
    with open(os.path.join(logs, "grpo_2gpu.log"), "w") as f:
        rc = subprocess.run([sys.executable, "-m", "vlrl_cli", "train", "recipes/colors-tiny.yaml", "--gpus", "2",
                             *vllm_grpo_sets(gpu_tiny, data, tmp_path, "trainer.zero_stage=3", "trainer.steps=6",
                                             "trainer.eval_every=3", "trainer.zero3_persistence_threshold=0")],
                            stdout=f, stderr=subprocess.STDOUT, timeout=420).returncode
    assert rc == 0
    m = read_metrics(tmp_path / "runs" / "colors-grpo")
    assert [x["step"] for x in m] == list(range(1, 7))
    assert max(x["drift_abs_mean"] for x in m) < 0.05  # every rank's engine got the gathered ZeRO-3 weights
    assert (tmp_path / "runs" / "colors-grpo" / "checkpoints" / "step_6" / "hf" / "model.safetensors").exists()
    with open(os.path.join(logs, "grpo_2gpu_metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in m)


def _check_drift_cli(tmp_path, gpu_tiny, name, *extra):
    data = colours_data(tmp_path)
    logs = os.environ.get("OUT") or str(tmp_path)
    report = os.path.join(logs, f"{name}.json")
    with open(os.path.join(logs, f"{name}.log"), "w") as f:
        rc = subprocess.run([sys.executable, "-m", "vlrl_cli", "check-drift", str(gpu_tiny), str(data / "train.parquet"),
                             "--engine", "vllm", "--train-dtype", "bf16", "--samples", "32", "--max-new-tokens", "32",
                             "--after-update", "--max-mean", "0.02", "--json", report,
                             "--plot", os.path.join(logs, f"{name}.png"), *extra],
                            stdout=f, stderr=subprocess.STDOUT, timeout=400).returncode
    with open(report) as f:
        return rc, json.load(f)


@needs_gpu
def test_check_drift_with_vllm_including_after_update(tmp_path, gpu_tiny, family):
    rc, report = _check_drift_cli(tmp_path, gpu_tiny, f"drift_vllm-{family}")
    checks = {c["name"]: c for c in report["checks"]}
    record("check_drift", family, {"rc": rc, "token_abs_diff": report["token_abs_diff"],
                                   "after_update": {k: report["after_update"][k]["overall"]["abs_diff"]
                                                    for k in ("seen", "unseen")},
                                   "update_effect_abs_mean": report["after_update"]["update_effect_abs_mean"],
                                   "sync_seconds": report["after_update"]["sync_seconds"],
                                   "checks": {c["name"]: c["passed"] for c in report["checks"]}})
    for name in ("prompt_ids", "image_tensors", "image_token_counts", "after_update_seen_images", "update_visible"):
        assert checks[name]["passed"] is True, checks[name]
    assert rc == 0 and report["token_abs_diff"]["mean"] < 0.02


@needs_gpu
def test_check_drift_with_vllm_and_the_compiled_trainer(tmp_path, gpu_tiny, family):
    """The forward `vlrl train` runs on a GPU (model.compile auto: compiled blocks, ZeRO-2) against vLLM,
    before and after an update through the sync path, seen images included."""
    rc, report = _check_drift_cli(tmp_path, gpu_tiny, f"drift_vllm_compiled-{family}", "--zero-stage", "2", "--compile")
    checks = {c["name"]: c for c in report["checks"]}
    record("check_drift_compiled", family, {"rc": rc, "token_abs_diff": report["token_abs_diff"],
                                            "after_update": {k: report["after_update"][k]["overall"]["abs_diff"]
                                                             for k in ("seen", "unseen")}})
    for name in ("prompt_ids", "image_tensors", "image_token_counts", "after_update_seen_images", "update_visible"):
        assert checks[name]["passed"] is True, checks[name]
    assert rc == 0 and report["token_abs_diff"]["mean"] < 0.02


@needs_gpu
def test_check_drift_with_vllm_against_a_zero3_trainer(tmp_path, gpu_tiny_qwen2_5):
    rc, report = _check_drift_cli(tmp_path, gpu_tiny_qwen2_5, "drift_vllm_zero3", "--zero-stage", "3")
    checks = {c["name"]: c for c in report["checks"]}
    assert rc == 0, checks
    assert checks["after_update_seen_images"]["passed"] is True


@needs_gpu
def test_level2_sleep_drops_the_weights_keeps_the_buffers_and_a_sync_restores_them(gpu_tiny_qwen2_5):
    """GRPO puts vLLM to sleep at level 2 after generating (no copy of the weights to host memory), since
    the sync that follows overwrites every weight. The model's buffers (rotary tables) must survive it,
    and waking without that sync must fail loudly instead of sampling from freed memory."""
    from vlrl_cli.rollout.engines import Sampling
    from vlrl_cli.rollout.engines.vllm import VLLMEngine
    from vlrl_cli.model.loading import load_vlm
    from vlrl_cli.model.loading import load_processor
    from vlrl_cli.rollout.episodes import collect

    proc = load_processor(str(gpu_tiny_qwen2_5))
    engine = VLLMEngine(str(gpu_tiny_qwen2_5), proc, dtype="bfloat16", gpu_memory_utilization=0.2)
    model = load_vlm(str(gpu_tiny_qwen2_5), torch.bfloat16).cuda().eval()
    buffers = lambda: engine.llm.apply_model(lambda m: {n: b.detach().cpu().clone() for n, b in m.named_buffers()})  # noqa: E731
    before = buffers()[0]
    recs, s = colour_records(8, seed=3), Sampling(1.0, 1.0, 16, 0)
    drift_before = trainer_logprobs(model, collect(engine, recs, proc, 4, s, 1, 4096), proc)
    engine.sleep(discard_weights=True)
    with pytest.raises(RuntimeError, match="level 2"):
        engine.wake()
    engine.update_weights((n, p.detach()) for n, p in model.named_parameters())
    after = buffers()[0]
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), \
        [k for k in before if not torch.equal(before[k], after[k])]
    drift_after = trainer_logprobs(model, collect(engine, recs, proc, 4, s, 1, 4096), proc)
    record("sleep_level2", "qwen2_5_vl", {"buffers": len(before), "drift_before": drift_before, "drift_after": drift_after})
    assert drift_after[0] < 0.02 and drift_after[1] < 0.3, drift_after


@needs_gpu
def test_lora_grpo_and_check_drift_with_vllm(tmp_path, gpu_tiny_qwen2_5):
    """LoRA with the vllm engine: after every step the engine holds the merged adapters (small drift each
    step), and check-drift --lora-rank agrees before and after an adapter change."""
    from vlrl_cli.train.runs import read_metrics

    data = colours_data(tmp_path)
    logs = os.environ.get("OUT") or str(tmp_path)
    with open(os.path.join(logs, "grpo_lora.log"), "w") as f:
        rc = subprocess.run([sys.executable, "-m", "vlrl_cli", "train", "recipes/colors-tiny.yaml",
                             *vllm_grpo_sets(gpu_tiny_qwen2_5, data, tmp_path, "trainer.steps=5", "trainer.save_every=0",
                                             "model.lora.rank=8", "model.lora.vision=true", "trainer.lr=3e-3")],
                            stdout=f, stderr=subprocess.STDOUT, timeout=400).returncode
    assert rc == 0
    m = read_metrics(tmp_path / "runs" / "colors-grpo")
    record("grpo_lora", "qwen2_5_vl", {"steps": m})
    assert [x["step"] for x in m] == [1, 2, 3, 4, 5] and any(x["grad_norm"] for x in m)
    assert all(x["drift_abs_mean"] < 0.02 for x in m), [x["drift_abs_mean"] for x in m]
    ckpt = tmp_path / "runs" / "colors-grpo" / "checkpoints" / "step_5"
    assert (ckpt / "adapter" / "adapter_config.json").exists() and (ckpt / "hf" / "model.safetensors").exists()
    rc, report = _check_drift_cli(tmp_path, gpu_tiny_qwen2_5, "drift_vllm_lora", "--lora-rank", "8")
    checks = {c["name"]: c for c in report["checks"]}
    assert rc == 0 and checks["after_update_seen_images"]["passed"] and checks["update_visible"]["passed"], checks
    assert "adapter" in report["after_update"]["update"]


@needs_gpu
def test_maze_learns_with_vllm_and_drift_stays_small_on_every_turn(tmp_path, gpu_tiny_qwen2_5):
    """recipes/maze2d-tiny*.yaml with the vllm engine (the recipes' fp32): 2-turn episodes with a new image per move;
    held-out success must reach 0.8, and check-drift split by turn must show turn 2 (two images in
    context) as small as turn 1."""
    from vlrl_cli.train.runs import read_metrics

    data, logs = tmp_path / "maze", os.environ.get("OUT") or str(tmp_path)

    assert run_logged("maze_prepare", "prepare", "maze2d", "--out", data, "--rows", "400", "--val-rows", "40",
                      "--maze-size", "2", "--max-steps", "2", "--cell-px", "56") == 0
    # the recipes' own precision (fp32, vLLM too): in bf16 the same recipe never learned on the GPU
    # (held-out 0.0 at every evaluation over 80 steps, session of 2026-11-24)
    common = ["--set", f"data.train={data / 'train.parquet'}", "--set", f"run.dir={tmp_path / 'runs'}"]
    assert run_logged("maze_sft", "train", "recipes/maze2d-tiny-sft.yaml", "--set", f"model.path={gpu_tiny_qwen2_5}", *common) == 0
    sft = tmp_path / "runs" / "maze-sft" / "checkpoints" / "step_30" / "hf"
    assert run_logged("maze_grpo", "train", "recipes/maze2d-tiny.yaml", "--set", f"model.path={sft}", "--set", "rollout.engine=vllm",
                      "--set", "rollout.gpu_memory_utilization=0.2", "--set", f"data.val={data / 'val.parquet'}", *common,
                      timeout=1200) == 0  # 80 steps of about 7.5 s on an H100 (fp32, 2 turns): 400 s cut it at step 52
    m = read_metrics(tmp_path / "runs" / "maze-grpo")
    final = tmp_path / "runs" / "maze-grpo" / "checkpoints" / "step_80" / "hf"
    report = os.path.join(logs, "drift_maze_vllm.json")
    rc = run_logged("maze_drift", "check-drift", final, data / "val.parquet", "--engine", "vllm", "--train-dtype", "fp32",
                    "--samples", "32", "--max-new-tokens", "8", "--max-turns", "2", "--max-mean", "0.02", "--json", report)
    with open(report) as f:
        turns = {k: v["abs_diff"]["mean"] for k, v in json.load(f)["stats"]["by_turn"].items() if v.get("tokens")}
    vals = [x["val_accuracy"] for x in m if "val_accuracy" in x]
    record("maze_vllm", "qwen2_5_vl", {"val_accuracy": vals, "drift_by_turn": turns,
                                      "drift_per_step": [x["drift_abs_mean"] for x in m],
                                      "step_seconds": [x["time_step_s"] for x in m]})
    assert vals[-1] >= 0.8, vals
    assert rc == 0 and set(turns) == {"turn_1", "turn_2"} and max(turns.values()) < 0.02, turns


@needs_gpu
def test_twenty_turn_episodes_with_a_bounded_history_agree_with_vllm_turn_by_turn(tmp_path, gpu_tiny, family):
    """20-move mazes (a random policy walks all 20), the last three frames in context: vLLM generates every turn
    from a context the trainer rebuilds exactly (older frames as text stand-ins), so check-drift split by turn
    stays at bf16 rounding on every one of the 20 turns."""
    data, logs = tmp_path / "long-mazes", os.environ.get("OUT") or str(tmp_path)
    assert run_logged(f"long_maze_prepare-{family}", "prepare", "maze2d", "--out", data, "--rows", "8", "--val-rows", "8",
                      "--maze-size", "4", "--max-steps", "20") == 0
    report = os.path.join(logs, f"drift_history-{family}.json")
    rc = run_logged(f"drift_history-{family}", "check-drift", gpu_tiny, data / "val.parquet", "--engine", "vllm",
                    "--train-dtype", "bf16", "--samples", "8", "--max-new-tokens", "6", "--max-turns", "20",
                    "--history-images", "3", "--max-mean", "0.02", "--json", report)
    with open(report) as f:
        stats = json.load(f)["stats"]
    turns = {k: v["abs_diff"]["mean"] for k, v in stats["by_turn"].items() if v.get("tokens")}
    record("drift_history", family, {"rc": rc, "drift_by_turn": turns, "overall": stats["overall"]["abs_diff"]})
    assert rc == 0 and len(turns) == 20, sorted(turns)
    assert max(turns.values()) < 0.02, turns


def serve_process(model, state, *extra):
    from test_serve import serve_subprocess

    key = "tml-gpu-serve-test"
    log = os.path.join(os.environ.get("OUT") or str(state.parent), f"serve-{model.name}.log")
    proc, url = serve_subprocess(model, state, log, key, "--engine", "vllm", *extra)
    return proc, url, {**os.environ, "TINKER_API_KEY": key, "TINKER_TELEMETRY": "0"}


@needs_gpu
def test_serve_with_vllm_runs_the_cookbook_vlm_classifier_recipe(tmp_path):
    """`vlrl serve --engine vllm`: the unmodified cookbook vlm_classifier recipe (tiny Qwen3-VL, bf16)."""
    from vlrl_cli.model.tiny import build_tiny_model

    here = os.path.dirname(os.path.abspath(__file__))
    logs = os.environ.get("OUT") or str(tmp_path)
    q3 = build_tiny_model(tmp_path / "tiny-qwen3_vl", "qwen3_vl")
    work = tmp_path / "work"
    work.mkdir()
    subprocess.run([sys.executable, os.path.join(here, "tinker_client", "offline_setup.py"), str(work), str(q3),
                    "Qwen/Qwen3-VL-30B-A3B-Instruct"], check=True, capture_output=True)
    server, url, env = serve_process(q3, tmp_path / "state-q3")
    try:
        with open(os.path.join(logs, "serve_vlm_classifier.log"), "w") as f:
            rc = subprocess.run([sys.executable, "-m", "tinker_cookbook.recipes.vlm_classifier.train", f"base_url={url}",
                                 f"experiment_dir={tmp_path / 'exp'}", "dataset=caltech101", f"model_name={q3}",
                                 "renderer_name=qwen3_vl_instruct", "batch_size=4", "max_steps=6", "n_eval=4",
                                 "max_tokens=8", "save_every=3", "eval_every=3", "learning_rate=1e-3",
                                 "behavior_if_log_dir_exists=delete"], cwd=work, stdout=f, stderr=subprocess.STDOUT,
                                env={**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}, timeout=900).returncode
    finally:
        server.terminate()
        server.wait(60)
    assert rc == 0
    (run,) = [d for d in (tmp_path / "exp").iterdir() if d.is_dir()]
    nll = [json.loads(x)["train_mean_nll"] for x in open(run / "metrics.jsonl") if "train_mean_nll" in x]
    events = [json.loads(x) for x in open(tmp_path / "state-q3" / "requests.jsonl")]

    def secs(evs, op):
        return round(sum(e["seconds"] for e in evs if e["op"] == op) / max(1, sum(e["op"] == op for e in evs)), 4)

    record("serve_vllm_vlm_classifier", "qwen3_vl", {"nll": nll, "forward_backward_s": secs(events, "forward_backward"),
                                                     "sample_s": secs(events, "sample")})
    assert len(nll) == 6 and nll[-1] < nll[0], nll


@needs_gpu
def test_serve_with_vllm_colours_rl_example_learns(tmp_path):
    """examples/tinker_colors_rl.py against `vlrl serve --engine vllm --dtype fp32` (tiny Qwen2.5-VL, as the CPU
    demo); 160 RL steps (vLLM samples other tokens than the CPU's hf engine; 120 steps reached 0.83 there)."""
    from vlrl_cli.data.prepare import PrepareOptions, prepare
    from vlrl_cli.model.tiny import build_tiny_model

    here = os.path.dirname(os.path.abspath(__file__))
    logs = os.environ.get("OUT") or str(tmp_path)
    q25 = build_tiny_model(tmp_path / "tiny-qwen2_5_vl", "qwen2_5_vl")
    prepare(PrepareOptions(source="colors", out=tmp_path / "colors", workers=1,
                           source_opts={"rows": 1200, "num_colors": 4, "image_size": 84}))
    server, url, env = serve_process(q25, tmp_path / "state-q25", "--dtype", "fp32")
    try:
        with open(os.path.join(logs, "serve_colors_rl.log"), "w") as f:
            rc = subprocess.run([sys.executable, os.path.join(here, "..", "examples", "tinker_colors_rl.py"),
                                 "--base-url", url, "--model", str(q25), "--data", str(tmp_path / "colors"),
                                 "--steps", "160", "--out", str(tmp_path / "colors.json")], stdout=f, stderr=subprocess.STDOUT,
                                env=env, timeout=1500).returncode
    finally:
        server.terminate()
        server.wait(60)
    assert rc == 0
    out = json.load(open(tmp_path / "colors.json"))
    ev2 = [json.loads(x) for x in open(tmp_path / "state-q25" / "requests.jsonl")]

    def secs(evs, op):
        return round(sum(e["seconds"] for e in evs if e["op"] == op) / max(1, sum(e["op"] == op for e in evs)), 4)

    record("serve_vllm_colors_rl", "qwen2_5_vl", {
        "colors_accuracy_after_format_sft": out["accuracy_after_format_sft"],
        "colors_accuracy_after_rl": out["accuracy_after_rl"], "colors_seconds": out["seconds"],
        "colors_rl_step_s_median": sorted(h["seconds"] for h in out["history"])[len(out["history"]) // 2],
        "colors_forward_backward_s": secs(ev2, "forward_backward"), "colors_sample_s": secs(ev2, "sample")})
    assert out["accuracy_after_rl"] >= 0.85, out


@needs_gpu
def test_packed_rows_through_the_varlen_kernel_match_padded_batches(gpu_tiny, family):
    """trainer.pack_tokens on a GPU: the language model's attention over a packed row runs PyTorch's varlen
    flash kernel per sequence (model.attention.packed_text_attention); its log-probs match the padded batch's.
    Gemma 4 (images attended both ways) keeps sdpa with the packed row's own masks, on the GPU's kernels."""
    import test_packing

    from vlrl_cli.train.batches import make_batch, sequence_logprobs
    from vlrl_cli.model.loading import load_vlm
    from vlrl_cli.model.attention import use_packed_text_attention
    from vlrl_cli.model.loading import load_processor

    model = load_vlm(str(gpu_tiny), torch.bfloat16).cuda()
    from vlrl_cli.model.families import family_of

    assert use_packed_text_attention(model) == (not family_of(model.config).bidirectional_images)
    processor = load_processor(str(gpu_tiny))
    seqs = test_packing.sequences(processor)
    with torch.no_grad():
        padded = sequence_logprobs(model, make_batch(seqs, processor, "cuda"), 1.0, [processor.image_token_id])
        packed = sequence_logprobs(model, make_batch(seqs, processor, "cuda", packed_for=model), 1.0,
                                   [processor.image_token_id])
    valid = torch.zeros_like(padded, dtype=torch.bool)
    for i, s in enumerate(seqs):
        valid[i, 1:len(s.token_ids)] = True
    diff = (padded - packed).abs()[valid].float()
    record("packed_varlen", family, {"mean_abs_diff": float(diff.mean()), "max_abs_diff": float(diff.max())})
    assert diff.mean() < 5e-3 and diff.max() < 5e-2, (float(diff.mean()), float(diff.max()))


@needs_gpu
def test_load_vlm_shares_repeated_images_on_a_gpu(gpu_tiny_qwen2_5):
    """On a GPU every loaded model encodes a repeated image once (model.image_sharing.share_repeated_images)."""
    from vlrl_cli.model.loading import load_vlm
    from vlrl_cli.model.image_sharing import shares_images

    model = load_vlm(str(gpu_tiny_qwen2_5), torch.bfloat16).cuda()
    assert shares_images(model)
