"""`vlrl train --plan`: parameter counts from the config alone, what fits where, and every shipped recipe fits
the GPU it names."""

import json
from pathlib import Path

import pytest
import yaml

from vlrl_cli.errors import UserError
from vlrl_cli.train.recipe import LoraCfg, load_recipe, with_overrides
from vlrl_cli.train.plan import GPUS, model_config, model_shape, parse_sized_for, plan_for, plan_memory, render_plan
from vlrl_process import run_vlrl

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def run_cli(*args, cwd=None):
    return run_vlrl(*args, env_extra={"HF_HUB_OFFLINE": "1"}, cwd=cwd, timeout=300)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_names_its_gpu_and_fits_it(recipe):
    rec = load_recipe(recipe, check_paths=False)
    assert "sized_for" in yaml.safe_load(recipe.read_text())["trainer"], f"{recipe.name}: trainer.sized_for missing"
    if rec.trainer.sized_for == "cpu":  # the CPU demo's recipes: a tiny model the demo builds
        assert "demo-out" in rec.model.path or "runs/" in rec.model.path
        return
    count, gpu = parse_sized_for(rec.trainer.sized_for)
    plan = plan_for(rec)
    assert (plan.gpus, plan.gpu, plan.gpu_gb) == (count, gpu, GPUS[gpu])
    assert plan.fits, render_plan(plan)


@pytest.mark.model
def test_parameter_counts_from_the_config_equal_the_loaded_model(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from vlrl_cli.train.lora import target_regex

    model = AutoModelForImageTextToText.from_pretrained(tiny_model)
    shape = model_shape(model_config(str(tiny_model)))
    assert shape.params == shape.trainable == sum(p.numel() for p in model.parameters())
    for vision in (False, True):
        lora = LoraCfg(rank=4, vision=vision)
        planned = model_shape(model_config(str(tiny_model)), lora).trainable
        peft = get_peft_model(AutoModelForImageTextToText.from_pretrained(tiny_model),
                              LoraConfig(r=4, target_modules=target_regex(None, vision, model.config)))
        assert planned == sum(p.numel() for p in peft.parameters() if p.requires_grad)


def bench_recipe(**changes):
    """The 3B GRPO step of bench/gpu_perf.py on one GPU: 8 x 541-token sequences per micro-batch."""
    rec = load_recipe(ROOT / "recipes" / "geometry3k.yaml", check_paths=False)
    sets = ["trainer.zero_stage=2", "trainer.micro_batch=8", "data.max_prompt_tokens=290",
            "rollout.max_new_tokens=256", "algorithm.kl_coef=0", "rollout.gpu_memory_utilization=0.2"]
    return with_overrides(rec, sets + [f"{k}={v}" for k, v in changes.items()])


def test_3b_full_fine_tune_on_one_h100_fits_only_with_a_small_vllm_pool_and_7b_needs_lora():
    fits = plan_memory(bench_recipe(), "H100-80GB", GPUS["H100-80GB"])
    # 16 bytes per trained parameter held (bf16 weights, fp32 master, two fp32 moments) + bf16 gradients
    assert sum(fits.resident.values()) == pytest.approx(fits.shape.params * 14 / 1e9)
    # bf16 .grad tensors plus ZeRO-2's partition buffer (both at the peak on one GPU)
    assert fits.training["gradients"] == pytest.approx(fits.shape.params * 4 / 1e9)
    assert fits.fits, render_plan(fits)
    big_pool = plan_memory(bench_recipe(**{"rollout.gpu_memory_utilization": 0.35}), "H100-80GB", 79.6)
    assert not big_pool.fits and any("gpu_memory_utilization=0.2" in a or "offload" in a for a in big_pool.advice)
    seven = bench_recipe(**{"model.path": "Qwen/Qwen2.5-VL-7B-Instruct"})
    full = plan_memory(seven, "H100-80GB", 79.6)
    # the bench recipe's 0.2 pool (15.9 GB) cannot hold the 7B's 16.6 GB of weights: no change fits without a
    # larger pool, and the advice pairs LoRA with the least pool that holds the weights and one episode
    assert not full.fits and any("model.lora.rank=64 --set rollout.gpu_memory_utilization=0.25" in a
                                 for a in full.advice), render_plan(full)
    assert not plan_memory(with_overrides(seven, ["model.lora.rank=64"]), "H100-80GB", 79.6).fits
    lora = plan_memory(with_overrides(seven, ["model.lora.rank=64", "rollout.gpu_memory_utilization=0.25"]),
                       "H100-80GB", 79.6)
    assert lora.fits and lora.shape.trainable < 0.02 * lora.shape.params
    # ZeRO-3 on 8 GPUs divides weights, master weights, moments and gradients by 8 (its gradients are one
    # partitioned bf16 copy; ZeRO-1/2 on one GPU hold two at the peak, measured)
    z3 = plan_memory(with_overrides(seven, ["trainer.zero_stage=3"]), "H100-80GB", 79.6, gpus=8)
    assert z3.resident["weights"] == pytest.approx(full.resident["weights"] / 8)
    assert z3.training["gradients"] == pytest.approx(full.shape.params * 2 / 8 / 1e9)  # bf16, one partitioned copy


def test_engine_ranks_take_the_vllm_pool_off_the_trainer_gpus_and_shard_over_trainers_only():
    """With rollout.engine_ranks the pool lives on GPUs of its own: a trainer GPU holds no engine, ZeRO shards
    over the trainer GPUs alone, and a placement with no trainer is refused like the launch refuses it."""
    split = ["rollout.engine_ranks=1", "trainer.eval_every=0", "trainer.zero_stage=3"]
    colocated = plan_memory(bench_recipe(**{"trainer.zero_stage": 3}), "H100-80GB", 79.6, gpus=4)
    rec = with_overrides(bench_recipe(), split)
    p = plan_memory(rec, "H100-80GB", 79.6, gpus=4)
    assert colocated.engine_gb == pytest.approx(0.2 * 79.6) and p.engine_gb == 0
    assert p.engine_card_gb == pytest.approx(0.2 * 79.6) and p.engine_ranks == 1
    assert p.generate_peak_gb == pytest.approx(sum(p.resident.values()))  # no pool beside the trainer
    assert p.resident["weights"] == pytest.approx(colocated.resident["weights"] * 4 / 3)  # 3 shards, not 4
    text = render_plan(p)
    assert "3 train, 1 only generate" in text and "engine GPUs hold" in text and "0.9" in text
    hf = plan_memory(with_overrides(rec, ["rollout.engine=hf"]), "H100-80GB", 79.6, gpus=4)
    assert "hf engine (model copy)" not in hf.resident and hf.engine_card_gb == pytest.approx(hf.shape.params * 2 / 1e9)
    with pytest.raises(UserError, match="no rank is left to train"):
        plan_memory(rec, "H100-80GB", 79.6, gpus=1)


def test_plan_cli_prints_the_table_and_json_and_names_bad_input(tmp_path, monkeypatch):
    """In-process (the CLI's own parser and error path, without a Python start-up per call)."""
    from typer.testing import CliRunner

    from vlrl_cli.cli import app

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)

    def cli(*args):
        return CliRunner().invoke(app, [str(a) for a in args])

    r = cli("train", ROOT / "recipes" / "geometry3k.yaml", "--plan", "--json", tmp_path / "plan.json")
    assert r.exit_code == 0, r.output[-2000:]
    assert "memory plan: Qwen/Qwen2.5-VL-3B-Instruct on 8 x H100-80GB" in r.stderr and "fits" in r.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["fits"] and plan["gpus"] == 8 and plan["shape"]["params"] > 3e9
    assert not (tmp_path / "runs").exists()  # planned, nothing started
    r = cli("train", ROOT / "recipes" / "geometry3k.yaml", "--plan", "--gpu", "1xH100-80GB",
            "--set", "model.path=Qwen/Qwen2.5-VL-7B-Instruct")
    assert r.exit_code == 0 and "DOES NOT FIT" in r.stderr and "changes that fit:" in r.stderr, r.stderr[-2000:]
    r = cli("train", ROOT / "recipes" / "geometry3k.yaml", "--plan", "--gpu", "H1OO")
    assert r.exit_code == 2 and "H1OO" in r.stderr and "H100-80GB" in r.stderr
    r = cli("train", ROOT / "recipes" / "colors-tiny.yaml", "--plan")
    assert r.exit_code == 2 and "sized for the CPU" in r.stderr
    r = cli("train", ROOT / "recipes" / "geometry3k.yaml", "--plan", "--set", "model.path=nobody/no-such-model")
    assert r.exit_code == 2 and "nobody/no-such-model" in r.stderr and "Traceback" not in r.output


def test_start_up_refuses_a_recipe_that_cannot_fit_this_gpu(monkeypatch):
    """On a GPU machine `vlrl train` checks the plan before any model loads (here: an 80 GB GPU described to
    torch, since this machine has none)."""
    import torch

    from vlrl_cli.cli import check_fits
    from vlrl_cli.errors import UserError

    class Props:
        name, total_memory = "NVIDIA H100 80GB HBM3", int(79.6e9)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props())
    check_fits(bench_recipe(), 1)  # fits: no error
    with pytest.raises(UserError, match="(?s)DOES NOT FIT.*ignore-plan"):
        check_fits(bench_recipe(**{"model.path": "Qwen/Qwen2.5-VL-7B-Instruct"}), 1)


def test_optimizer_groups_bound_the_step_copy_and_keep_every_parameter_in_order():
    import torch

    from vlrl_cli.train.policy import param_groups

    params = [torch.nn.Parameter(torch.zeros(n)) for n in (60, 50, 10, 120, 5, 5)]
    groups = param_groups(params, max_numel=100)
    assert [p for g in groups for p in g["params"]] == params  # all of them, model order
    assert [sum(p.numel() for p in g["params"]) for g in groups] == [60, 60, 120, 10]  # a bigger one stands alone


def test_fp32_gradient_accumulation_is_planned():
    """trainer.grad_accum_fp32: DeepSpeed's fp32 gradient buffers (4 bytes per trained parameter, held from
    the start) instead of the bf16 .grad pair and the step's fp32 group copy. A 3B full fine-tune on one
    H100 then no longer fits next to vLLM; on an H200 it does."""
    one = bench_recipe(**{"trainer.zero_stage": 1})
    acc = bench_recipe(**{"trainer.zero_stage": 1, "trainer.grad_accum_fp32": "true"})
    a, b = plan_memory(one, "H100-80GB", GPUS["H100-80GB"]), plan_memory(acc, "H100-80GB", GPUS["H100-80GB"])
    P = b.shape.params
    assert b.resident["fp32 gradient accumulation"] == pytest.approx(P * 4 / 1e9)
    assert b.training["gradients"] == pytest.approx(P * 2 / 1e9) and a.training["gradients"] == pytest.approx(P * 4 / 1e9)
    assert "optimizer step (fp32 grad copy)" not in b.training and "optimizer step (fp32 grad copy)" in a.training
    assert a.fits and not b.fits, render_plan(b)
    assert plan_memory(acc, "H200-141GB", GPUS["H200-141GB"]).fits


def test_every_released_size_has_its_published_parameter_count():
    """families.REAL_SIZES are the released configs: built on the meta device, each has the total its model
    card states (Qwen3-VL-30B-A3B: every expert counted, 3.3 B of them active per token)."""
    from vlrl_cli.model.families import REAL_SIZES, real_size_config

    # the model cards' totals (the 30B-A3B card rounds 31.07 to 31.1)
    published = {"qwen2_vl_2b": 2.21, "qwen2_vl_7b": 8.29, "qwen2_5_vl_3b": 3.75, "qwen2_5_vl_7b": 8.29, "qwen3_vl_2b": 2.13, "qwen3_vl_4b": 4.44,
                 "qwen3_vl_8b": 8.77, "qwen3_vl_30b_a3b": 31.07}
    for size, billions in published.items():
        assert model_shape(real_size_config(size)).params / 1e9 == pytest.approx(billions, abs=0.006), size
    # Qwen3.5 and Gemma 4 E2B: no total from a model card here; their totals sit by the size in the name (E2B:
    # 2 B "effective", 4.8 B with its per-layer embeddings, without the audio tower vlrl leaves out)
    named = {"qwen3_5_0_8b": 0.8, "qwen3_5_4b": 4.0, "qwen3_5_9b": 9.0, "gemma4_e2b": 4.8}
    assert set(published) | set(named) == set(REAL_SIZES)
    for size, billions in named.items():
        assert model_shape(real_size_config(size)).params / 1e9 == pytest.approx(billions, rel=0.15), size


def test_the_qwen3_5_and_gemma4_sizes_have_their_families_layer_layouts():
    """The released layouts, as the real-size benchmarks build them: Qwen3.5, three gated-DeltaNet layers to
    one full-attention layer with 256-wide heads; Gemma 4 E2B, four sliding-window layers to one global layer,
    the last 20 reusing earlier keys and values, per-layer input embeddings, tied embeddings."""
    from vlrl_cli.model.families import real_size_config

    for size in ("qwen3_5_0_8b", "qwen3_5_4b", "qwen3_5_9b"):
        text = real_size_config(size).text_config
        assert text.layer_types == (["linear_attention"] * 3 + ["full_attention"]) * (text.num_hidden_layers // 4), size
        assert text.head_dim == 256 and text.vocab_size == 248320
    gemma = real_size_config("gemma4_e2b")
    text = gemma.text_config
    assert text.layer_types == (["sliding_attention"] * 4 + ["full_attention"]) * 7
    assert text.num_kv_shared_layers == 20 and text.hidden_size_per_layer_input == 256 and gemma.tie_word_embeddings
    assert gemma.audio_config is None and gemma.vision_config.pooling_kernel_size == 3
    # the engine's KV cache per token: only layers that cache keys and values (bf16), widest head
    from vlrl_cli.train.plan import _kv_bytes_per_token

    assert _kv_bytes_per_token(real_size_config("qwen2_5_vl_7b").text_config) == 2 * 28 * 4 * 128 * 2
    assert _kv_bytes_per_token(real_size_config("qwen3_5_4b").text_config) == 2 * 8 * 4 * 256 * 2  # 8 full of 32
    assert _kv_bytes_per_token(text) == 2 * (35 - 20) * 1 * 512 * 2  # 20 layers reuse earlier K/V


def test_advice_plans_each_single_change_once_and_looks_no_further(monkeypatch):
    """A plan that does not fit tries single changes; their own plans must not search again (that recursion
    made `--plan` of a 7B full fine-tune on one GPU build hundreds of meta models: about a minute)."""
    import vlrl_cli.train.plan as plan_module

    calls = []
    real = plan_module.plan_memory

    def counting(*args, **kwargs):
        calls.append(kwargs.get("advise", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(plan_module, "plan_memory", counting)
    plan = plan_module.plan_for(bench_recipe(**{"model.path": "Qwen/Qwen2.5-VL-7B-Instruct"}), "1xH100-80GB")
    assert not plan.fits and plan.advice
    assert calls[0] is True and calls[1:] and not any(calls[1:]) and len(calls) <= 12, calls


def test_a_vllm_pool_that_cannot_hold_the_model_never_fits_and_is_never_advised():
    """A pool smaller than the weights (plus one episode's KV cache) fails at the engine's start: the plan says so,
    names the key, and never offers a pool that small as a fix."""
    rec = load_recipe(ROOT / "recipes" / "geometry3k-7b-lora.yaml", check_paths=False)
    tiny_pool = plan_memory(with_overrides(rec, ["rollout.gpu_memory_utilization=0.05"]), "H100-80GB", 79.6)
    assert not tiny_pool.fits and tiny_pool.engine_needs_gb > 16.6, render_plan(tiny_pool)
    assert "cannot hold the model's weights" in render_plan(tiny_pool)
    assert all(float(a.split("gpu_memory_utilization=")[1].split()[0]) * 79.6 >= tiny_pool.engine_needs_gb
               for a in tiny_pool.advice if "gpu_memory_utilization=" in a)
    assert plan_memory(rec, "H100-80GB", 79.6).fits  # as shipped: 0.55 of the card
    on_a100 = plan_memory(rec, "A100-40GB", GPUS["A100-40GB"])
    assert all("gpu_memory_utilization=0.15" not in a and "gpu_memory_utilization=0.2 " not in a
               for a in on_a100.advice), on_a100.advice


def test_a_gpu_count_out_of_range_and_an_unsupported_local_model_are_one_line(tmp_path):
    from vlrl_cli.errors import UserError
    from vlrl_cli.train.plan import plan_for

    rec = load_recipe(ROOT / "recipes" / "geometry3k-7b-lora.yaml", check_paths=False)
    for gpu in ("0xH100-80GB", "99999999999999999999xH100-80GB"):
        with pytest.raises(UserError, match="GPU count must be 1..1024"):
            plan_for(rec, gpu)
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(UserError, match="model type 'llama' is not supported"):
        plan_for(with_overrides(rec, [f"model.path={llama}"]), "H100-80GB")
    (llama / "config.json").write_text("{not json")
    with pytest.raises(UserError, match=r"cannot read the config of .*config.json \(\w+"):
        plan_for(with_overrides(rec, [f"model.path={llama}"]), "H100-80GB")
    with pytest.raises(UserError, match="no such model folder"):
        plan_for(with_overrides(rec, [f"model.path={tmp_path}/missing/model"]), "H100-80GB")


def test_every_known_hub_id_is_planned_with_no_network(tmp_path, monkeypatch):
    """The released sizes vlrl knows by hub id are planned offline, each with its own family's config class and
    counts (a user's `--plan` on a laptop with no hub access), through the CLI for one of each new family."""
    from typer.testing import CliRunner

    from vlrl_cli.cli import app
    from vlrl_cli.model.families import FAMILY, HUB_IDS, REAL_SIZES, family_of

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    seen = set()
    for hub_id, size in HUB_IDS.items():
        config = model_config(hub_id)
        assert family_of(config).name == REAL_SIZES[size][0], hub_id
        plan = plan_memory(bench_recipe(**{"model.path": hub_id}), "H100-80GB", GPUS["H100-80GB"])
        assert plan.shape.params == model_shape(config).params and plan.train_peak_gb > 0, hub_id
        seen.add(REAL_SIZES[size][0])
    assert seen == set(FAMILY), seen  # every family has a released size to plan
    data = tmp_path / "d.jsonl"
    data.write_text("")
    for hub_id in ("Qwen/Qwen3.5-4B", "google/gemma-4-e2b-it", "Qwen/Qwen3-VL-30B-A3B-Instruct", "Qwen/Qwen2-VL-2B-Instruct"):
        recipe = tmp_path / "r.yaml"
        recipe.write_text(yaml.safe_dump({"model": {"path": hub_id}, "data": {"train": str(data)}}))
        r = CliRunner().invoke(app, ["train", str(recipe), "--plan", "--gpu", "H100-80GB", "--json", str(tmp_path / "p.json")])
        assert r.exit_code == 0 and f"memory plan: {hub_id} on 1 x H100-80GB" in r.stderr, (hub_id, r.output[-1500:])
        assert json.loads((tmp_path / "p.json").read_text())["model"] == hub_id


def test_a_plan_with_room_to_spare_names_the_faster_settings_that_still_fit():
    """A recipe that fits with room left is told which of no recompute and a doubled micro-batch still fit
    (each measured faster on a GPU); a micro-batch never grows past the sequences a rank trains per step, and
    a plan with no room names nothing."""
    rec = load_recipe(ROOT / "recipes" / "geometry3k.yaml", check_paths=False)  # 3B, LoRA off, 8 x 2,300 tokens
    small = with_overrides(rec, ["trainer.micro_batch=2", "rollout.max_new_tokens=256", "rollout.gpu_memory_utilization=0.3"])
    plan = plan_memory(small, "H200-141GB", GPUS["H200-141GB"])
    assert plan.fits and len(plan.faster) == 3, render_plan(plan)
    assert "model.gradient_checkpointing=false --set trainer.micro_batch=4" in plan.faster[2]
    assert "room to train faster" in render_plan(plan)
    for advice in plan.faster:  # each one, applied, still fits
        sets = [s.split()[0] for s in advice.split("--set ")[1:]]
        assert plan_memory(with_overrides(small, sets), "H200-141GB", GPUS["H200-141GB"]).fits
    # 4 prompts x 2 samples = 8 sequences a step: a micro-batch of 8 is already all of them
    whole = with_overrides(small, ["trainer.micro_batch=8", "rollout.prompts_per_step=4", "rollout.n=2"])
    assert not any("micro_batch" in a for a in plan_memory(whole, "H200-141GB", GPUS["H200-141GB"]).faster)
    tight = plan_memory(bench_recipe(), "H100-80GB", GPUS["H100-80GB"])  # fits with 5 GB to spare
    assert tight.fits and tight.faster == [], render_plan(tight)
