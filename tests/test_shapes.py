"""Agreement and limits at the shapes users run: the sampler samples what it reports, settings that bias the
importance weights are refused, the engine's start-up limits follow the recipe, packed batches with a KL
reference, statistics of every PPO epoch, and LoRA checkpoints of the adapters alone."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from vlrl_cli.train.recipe import RecipeError, load_recipe
from vlrl_cli.train.runs import read_metrics
from vlrl_process import run_vlrl

ROOT = Path(__file__).resolve().parent.parent

USER_ENV = """
from vlrl_cli.rollout.envs.base import Env

class ParityEnv(Env):
    # reward 1 for an even-length answer: a random model gets mixed rewards and non-zero advantages
    def score(self, text):
        ok = len(text) % 2 == 0
        return float(ok), {"correct": ok, "format_ok": True}
"""


def write_recipe(tmp_path, model_path, colors_data, name, **sections) -> Path:
    base = {
        "model": {"path": str(model_path)},
        "data": {"train": str(colors_data / "train.parquet")},
        "rollout": {"n": 4, "prompts_per_step": 4, "max_new_tokens": 4},
        "algorithm": {"name": "grpo"},
        "trainer": {"steps": 2, "lr": 1.0e-3, "micro_batch": 8, "zero_stage": 0},
        "run": {"name": name, "dir": str(tmp_path / "runs")},
        "envs": {"colors": "userenvs:ParityEnv"},
    }
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


# --- 1. the sampler samples what it reports ---------------------------------------------------------------


@pytest.mark.model
def test_the_hf_engine_samples_the_distribution_whose_logprobs_it_reports(tiny_model, tmp_path):
    """A model whose own generation config sets repetition_penalty 2.0 (Qwen2.5-VL-Instruct ships 1.05): the
    engine must sample from the plain softmax it reports, not from the penalised one. 3,000 one-token samples
    of one prompt: the sampled frequencies match exp(engine log-prob)."""
    import shutil

    from transformers import GenerationConfig

    from vlrl_cli.model.loading import load_processor
    from vlrl_cli.model.render import render_prompt
    from vlrl_cli.rollout.engines import GenRequest, Sampling
    from vlrl_cli.rollout.engines.hf import HFEngine

    model = tmp_path / "penalised"
    shutil.copytree(tiny_model, model)
    gen = GenerationConfig.from_pretrained(model)
    gen.repetition_penalty, gen.top_k, gen.do_sample = 2.0, 5, True
    gen.save_pretrained(model)
    processor = load_processor(str(model))
    engine = HFEngine(str(model), processor)
    # a prompt that repeats a few tokens the model already likes, so the penalty would move their mass
    rp = render_prompt(processor, [{"role": "user", "content": "red red red blue green red"}])
    first = engine.generate([GenRequest(rp.input_ids, rp.tensors, n=1)], Sampling(1.0, 1.0, 1, 0))[0][0]
    liked = first.token_ids[0]
    ids = rp.input_ids[:-3] + [liked] * 6 + rp.input_ids[-3:]
    gens = engine.generate([GenRequest(ids, {}, n=3000)], Sampling(1.0, 1.0, 1, 1))[0]
    counts, logp = {}, {}
    for g in gens:
        counts[g.token_ids[0]] = counts.get(g.token_ids[0], 0) + 1
        logp[g.token_ids[0]] = g.logprobs[0]
    # every sampled token's frequency within 5 standard errors of its reported probability
    for tok, c in counts.items():
        p = float(torch.tensor(logp[tok]).exp())
        assert abs(c / 3000 - p) < 5 * (p * (1 - p) / 3000) ** 0.5 + 2e-3, (tok, c / 3000, p)
    assert len(counts) > 5  # no top-k of 5 from the model's config either


# --- 1. settings that bias the importance weights, refused at load -----------------------------------------


def test_grpo_refuses_truncated_sampling_and_groups_of_one(tmp_path, tiny_model, colors_data):
    (tmp_path / "userenvs.py").write_text(USER_ENV)  # the recipes' environment, beside them
    for sets, key in ((["rollout.top_p=0.9"], "rollout.top_p"), (["rollout.n=1"], "rollout.n"),
                      (["rollout.max_turns=3", "rollout.max_context_tokens=1000"], "rollout.max_context_tokens")):
        with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
            load_recipe(write_recipe(tmp_path, tiny_model, colors_data, "r"), sets)
    # SFT never samples from the rollout settings; eval keeps truncation (it scores nothing)
    load_recipe(write_recipe(tmp_path, tiny_model, colors_data, "s", algorithm={"name": "sft"}), ["rollout.top_p=0.9"])
    r = run_vlrl("train", write_recipe(tmp_path, tiny_model, colors_data, "cli"), "--set", "rollout.top_p=0.5")
    assert r.returncode == 2 and "rollout.top_p" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_an_episode_longer_than_the_models_positions_is_refused(tmp_path, tiny_model, colors_data):
    with pytest.raises(RecipeError, match="positions"):
        load_recipe(write_recipe(tmp_path, tiny_model, colors_data, "long"),
                    ["rollout.max_turns=4", "rollout.max_context_tokens=9000"])  # the tiny model has 8192


# --- 2. the engine fits the recipe ---------------------------------------------------------------------------


def test_every_shipped_recipe_gets_engine_limits_that_hold_its_longest_episode(tmp_path, geometry_sample):
    """Each shipped recipe against the limits its engine will get, with records of its own kind: sequences as
    long as its episodes can grow (within the model's positions) and as many images as one episode holds
    (Maze2D: a new frame every turn)."""
    from vlrl_cli.data.prepare import PrepareOptions, prepare
    from vlrl_cli.data.records import image_urls, load_records
    from vlrl_cli.model.loading import max_positions
    from vlrl_cli.rollout.engines.vllm import engine_args
    from vlrl_cli.rollout.episodes import turn_limit
    from vlrl_cli.train.recipe import engine_limits, episode_tokens

    data = {}
    for source, opts in (("colors", {"rows": 4, "val_rows": 0}), ("maze2d", {"rows": 4, "val_rows": 0, "max_steps": 20}),
                         ("geometry3k", {})):
        out = tmp_path / source
        prepare(PrepareOptions(source=source, out=out, workers=1, source_opts=opts,
                               path=str(geometry_sample) if source == "geometry3k" else None))
        data[source] = load_records(str(out / "train.parquet"))
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert len(recipes) >= 8
    for path in recipes:
        rec = load_recipe(path, check_paths=False)
        if rec.algorithm.name != "grpo":  # SFT runs no engine
            continue
        kind = next(k for k, key in (("geometry3k", "geo"), ("maze2d", "maze"), ("colors", "colors")) if key in rec.data.train)
        limits = engine_limits(rec, data[kind])
        longest = episode_tokens(rec, turn_limit(data[kind], rec.rollout.max_turns))
        assert limits.max_model_len == longest
        positions = max_positions(rec.model.path)
        if positions is not None:  # the hub ids vlrl knows offline; the demo's local models are built by it
            assert longest <= positions, path.name
        if kind == "maze2d":  # a frame a move, or as many as the bounded history keeps
            frames = turn_limit(data[kind], rec.rollout.max_turns)
            assert limits.max_images == min(frames, rec.rollout.history.max_images or frames), (path.name, limits)
        else:
            assert limits.max_images == max(len(image_urls(r)) for r in data[kind])
        args = engine_args(rec.model.path, rec.model.dtype, 0.3, 0, limits, True)
        assert args["max_model_len"] == longest and args["limit_mm_per_prompt"]["image"] >= limits.max_images
    every_frame = load_recipe(ROOT / "recipes" / "maze2d-qwen3vl.yaml", check_paths=False)
    assert engine_limits(every_frame, data["maze2d"]).max_images == 20 and episode_tokens(every_frame) == 16384
    last_four = load_recipe(ROOT / "recipes" / "maze2d.yaml", check_paths=False)
    assert engine_limits(last_four, data["maze2d"]).max_images == 4 and episode_tokens(last_four) == 16384


def test_vllm_gets_a_linear_attention_prefill_it_can_run(monkeypatch):
    """Qwen3.5's gated DeltaNet: vLLM's automatic choice on Hopper is FlashInfer's kernel, which fails at the
    first prefill where flashinfer is not installed; without it the engine asks for vLLM's own Triton kernel."""
    import importlib.util

    from vlrl_cli.rollout.engines import vllm

    real = importlib.util.find_spec
    monkeypatch.setattr(vllm.importlib.util, "find_spec", lambda name, *a: None if name == "flashinfer" else real(name, *a))
    assert vllm.engine_args("m", "bfloat16", 0.3, 0, None, False)["gdn_prefill_backend"] == "triton"
    monkeypatch.setattr(vllm.importlib.util, "find_spec", lambda name, *a: object() if name == "flashinfer" else real(name, *a))
    assert "gdn_prefill_backend" not in vllm.engine_args("m", "bfloat16", 0.3, 0, None, False)

@pytest.mark.model
def test_vllm_reads_gemma4_head_sizes_that_transformers_keeps_per_layer():
    """Gemma 4 E2B's released config has head_dim 256 on sliding layers and global_head_dim 512 on full ones.
    transformers (>= 5.17) keeps head_dim per layer and refuses a global read, the read vLLM 0.26's config
    converter makes: the engine did not start at the real size. The engine's hf_overrides give vLLM the flat
    form its Gemma 4 code reads (families whose layers agree get no override, and would pass unchanged)."""
    from vlrl_cli.model.families import FAMILY, real_size_config
    from vlrl_cli.rollout.engines import vllm

    view = vllm.engine_args("m", "bfloat16", 0.3, 0, None, False, FAMILY["gemma4"])["hf_overrides"]
    assert "hf_overrides" not in vllm.engine_args("m", "bfloat16", 0.3, 0, None, False, FAMILY["qwen2_5_vl"])
    text = real_size_config("gemma4_e2b").get_text_config()
    assert text.is_heterogeneous
    with pytest.raises(Exception, match="per-layer attribute"):
        getattr(text, "head_dim", 0)  # what vLLM met
    text = view(real_size_config("gemma4_e2b")).get_text_config()
    assert getattr(text, "head_dim", 0) == 256  # vLLM's converter
    assert getattr(text, "global_head_dim", text.head_dim) == 512  # vLLM's Gemma 4 layers: full attention
    assert [layer.head_dim for layer in text.per_layer_config][:5] == [256, 256, 256, 256, 512]  # the trainer's
    qwen = real_size_config("qwen2_5_vl_3b")
    assert view(qwen).to_dict() == real_size_config("qwen2_5_vl_3b").to_dict()


def test_vllm_gives_gemma4_images_the_trainers_soft_token_budget(family_models):
    """vLLM 0.26 sizes Gemma 4's prompt placeholders from the vision config's default_output_length unless told,
    while the pixels follow the processor's budget: a model whose two differ got 256 placeholders per image for
    64 embeddings and was refused at the first generate (a released size with the tiny processor's 70, on an
    H100). The engine tells vLLM the budget of the processor the trainer renders with; other families get no
    such argument. The released sizes vlrl builds pair the two as the releases do."""
    from vlrl_cli.model.families import FAMILY, real_size_config
    from vlrl_cli.model.loading import load_processor
    from vlrl_cli.model.tiny import _processor, build_tokenizer
    from vlrl_cli.rollout.engines import vllm

    gemma = load_processor(str(family_models["gemma4"]))
    assert gemma.image_processor.max_soft_tokens == 70  # the tiny model's, different from vLLM's default of 280
    args = vllm.engine_args("m", "bfloat16", 0.3, 0, None, False, FAMILY["gemma4"], gemma)
    assert args["mm_processor_kwargs"] == {"max_soft_tokens": 70}
    qwen = load_processor(str(family_models["qwen2_5_vl"]))
    assert "mm_processor_kwargs" not in vllm.engine_args("m", "bfloat16", 0.3, 0, None, False, FAMILY["qwen2_5_vl"], qwen)
    budget = real_size_config("gemma4_e2b").vision_config.default_output_length
    built = _processor("gemma4", build_tokenizer("gemma4"), None, None, soft_tokens=budget)
    assert built.image_processor.max_soft_tokens == budget == 280


@pytest.mark.model
def test_a_saved_gemma4_with_kv_shared_layers_carries_the_key_norms_vllm_loads(tmp_path):
    """Gemma 4 E2B's last 20 layers reuse earlier layers' keys and values: transformers' model has no k_norm
    there, vLLM 0.26's has one in every layer, and it refused the saved real-size model ("weights were not
    initialized from checkpoint"). save_model writes them (used by neither model: ones, at the layer's head
    size); transformers loads the result back unchanged, and a family without shared layers gains nothing."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlrl_cli.model.families import real_size_config
    from vlrl_cli.model.loading import kv_shared_key_norms, save_model
    from vlrl_cli.model.tiny import build_tiny_model

    with torch.device("meta"):  # the released E2B layout: exactly its shared layers, at each one's head size
        e2b = AutoModelForImageTextToText.from_config(real_size_config("gemma4_e2b"))
    extra = kv_shared_key_norms(e2b.config, e2b.state_dict())
    kinds = e2b.config.text_config.layer_types
    assert sorted(int(n.split(".")[3]) for n in extra) == list(range(15, 35))
    assert all(t.shape == ((512,) if kinds[int(n.split(".")[3])] == "full_attention" else (256,))
               for n, t in extra.items())

    cfg = AutoConfig.from_pretrained(build_tiny_model(tmp_path / "tiny", "gemma4"))
    cfg.text_config.num_hidden_layers = 3
    cfg.text_config.layer_types = ["sliding_attention", "full_attention", "full_attention"]
    cfg.text_config.num_kv_shared_layers = 1
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(cfg).eval()
    save_model(model, tmp_path / "saved")
    model.save_pretrained(tmp_path / "plain")  # the control: what transformers alone writes

    def k_norms(folder):
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            return {k for k in f.keys() if "language_model" in k and k.endswith("k_norm.weight")}

    assert len(k_norms(tmp_path / "plain")) == 2
    assert k_norms(tmp_path / "saved") == {f"model.language_model.layers.{i}.self_attn.k_norm.weight" for i in range(3)}
    ids = torch.tensor([[2, 10, 11, 12, 13]])
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
    qwen = real_size_config("qwen2_5_vl_3b")
    assert kv_shared_key_norms(qwen, {"model.language_model.layers.0.self_attn.q_norm.weight": torch.ones(4)}) == {}


# --- 1. packed rows with a KL reference; statistics of every epoch -------------------------------------------


@pytest.mark.model
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "gemma4"])
def test_packed_grpo_step_one_kl_is_zero(tmp_path, family_models, colors_data, family, monkeypatch):
    """At step 1 the policy is the reference: with packed rows (several sequences, images included, in one
    row) the reference must score exactly what the policy scores."""
    from vlrl_cli.train.launch import run_training

    (tmp_path / "userenvs.py").write_text(USER_ENV)
    monkeypatch.syspath_prepend(str(tmp_path))
    rec = write_recipe(tmp_path, family_models[family], colors_data, f"packed-{family}",
                       trainer={"steps": 1, "pack_tokens": 4096}, algorithm={"name": "grpo", "kl_coef": 0.1})
    run_training(load_recipe(rec))
    m = read_metrics(tmp_path / "runs" / f"packed-{family}")[0]
    assert m["micro_batches"] == 1 and m["kl"] is not None
    assert m["kl"] < 1e-6, m["kl"]


@pytest.mark.model
def test_clip_frac_kl_and_entropy_count_every_ppo_epoch(tmp_path, tiny_model, colors_data, monkeypatch):
    """Four PPO epochs: the first is on the anchor itself (nothing clipped, no KL at step 1), the later ones
    are not, and the step's statistics average over all four."""
    from vlrl_cli.train.launch import run_training

    (tmp_path / "userenvs.py").write_text(USER_ENV)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = {}
    for epochs in (1, 4):
        rec = write_recipe(tmp_path, tiny_model, colors_data, f"ppo{epochs}", trainer={"steps": 1, "lr": 3e-3},
                           algorithm={"name": "grpo", "kl_coef": 0.1, "ppo_epochs": epochs})
        run_training(load_recipe(rec))
        out[epochs] = read_metrics(tmp_path / "runs" / f"ppo{epochs}")[0]
    assert out[1]["clip_frac"] == 0.0 and out[1]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert out[4]["clip_frac"] > 0.0 and out[4]["kl"] > 1e-6, out[4]
    assert out[4]["drift_abs_mean"] == pytest.approx(out[1]["drift_abs_mean"], rel=1e-5, abs=1e-8)  # the sampler's
    assert out[4]["entropy"] != pytest.approx(out[1]["entropy"], rel=1e-6)


# --- 3. checkpoints at real sizes -------------------------------------------------------------------------


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_lora_checkpoints_hold_the_adapters_and_export_on_request(tmp_path, tiny_model, colors_data):
    """A LoRA run's checkpoints hold its adapters and their optimizer state, not the frozen base; the merged
    model is written at the end, and `vlrl export` / `vlrl eval` make it of any other checkpoint."""
    (tmp_path / "userenvs.py").write_text(USER_ENV)
    env = {"PYTHONPATH": str(tmp_path)}
    rec = write_recipe(tmp_path, tiny_model, colors_data, "lora", model={"path": str(tiny_model), "lora": {"rank": 4}},
                       trainer={"steps": 2, "save_every": 1, "zero_stage": 3, "zero3_persistence_threshold": 0})
    r = run_vlrl("train", rec, env_extra=env)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpts = tmp_path / "runs" / "lora" / "checkpoints"
    base = _size(Path(tiny_model))
    one, two = ckpts / "step_1", ckpts / "step_2"
    assert (one / "adapter" / "adapter_config.json").exists() and not (one / "hf").exists()
    assert _size(one / "ds") < base / 4, (_size(one / "ds"), base)  # no frozen weights in DeepSpeed's state
    assert (two / "hf" / "config.json").exists()  # the end of the run: the merged model
    out = tmp_path / "exported"
    r = run_vlrl("export", one, "--out", out, "--json", tmp_path / "export.json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "export.json").read_text())["model"] == str(out)
    from transformers import AutoModelForImageTextToText

    merged = AutoModelForImageTextToText.from_pretrained(out)
    assert sum(p.numel() for p in merged.parameters()) > 0
    # eval plays the run's own environment (its recipe's envs:), importable here as it was for train
    r = run_vlrl("eval", one, colors_data / "val.parquet", "--out", tmp_path / "ev", "--limit", "2", "--max-new-tokens", "2",
                 env_extra=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (one / "hf" / "config.json").exists()  # eval exported the adapter checkpoint once, in place


def test_a_checkpoint_the_disk_cannot_hold_stops_the_run_and_keeps_the_last_one(tmp_path, tiny_model, colors_data,
                                                                                cli, monkeypatch):
    from collections import namedtuple

    from vlrl_cli.train import runs

    (tmp_path / "userenvs.py").write_text(USER_ENV)
    monkeypatch.syspath_prepend(str(tmp_path))
    rec = write_recipe(tmp_path, tiny_model, colors_data, "full", trainer={"steps": 3, "save_every": 1})
    usage = namedtuple("usage", "total used free")
    saved = []
    real_save = runs.save_checkpoint

    def save(*args, **kw):
        saved.append(args[3])
        return real_save(*args, **kw)

    def disk_usage(path):  # room for one checkpoint, then the disk is full
        return usage(10**12, 10**12, 10**12 if len(saved) < 2 else 10**6)

    monkeypatch.setattr(runs, "save_checkpoint", save)
    monkeypatch.setattr(runs.shutil, "disk_usage", disk_usage)
    r = cli("train", rec)
    assert r.exit_code == 2, r.output
    assert "checkpoint step_2 needs" in r.output and "GB free" in r.output, r.output
    ckpts = tmp_path / "runs" / "full" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_1" and (ckpts / "step_1" / "hf" / "config.json").exists()
    assert not list(ckpts.glob("*.partial")) and not list((tmp_path / "runs" / "full").glob("vlrl-error-*"))


def test_two_trainings_cannot_write_one_run_directory(tmp_path, tiny_model, colors_data):
    (tmp_path / "userenvs.py").write_text(USER_ENV)  # the recipe's environment, imported from the working folder
    rec = write_recipe(tmp_path, tiny_model, colors_data, "busy")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from vlrl_cli.train.runs import lock_run_dir; "
                               f"lock_run_dir(__import__('pathlib').Path({str(tmp_path / 'runs' / 'busy')!r})); "
                               "print('locked', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = run_vlrl("train", rec, cwd=tmp_path)
        assert r.returncode == 2 and f"pid {holder.pid}" in r.stderr, r.stderr[-2000:]
    finally:
        holder.kill()
        holder.wait()
