"""Every family through every model-facing path: rendering, the trainer's forward, the hf engine, SFT, GRPO
and check-drift (the Qwen-VL families; qwen3_vl_moe: routed experts in the text model; qwen3_5: linear
attention; gemma4: sliding-window layers, 1-D positions, images attended both ways)."""

import io
import json
import math

import numpy as np
import pytest
from conftest import prepared_mazes
import torch
import yaml
from PIL import Image

from vlrl_cli.data.images import to_data_uri
from vlrl_cli.model.render import image_inputs, model_inputs, split_messages
from vlrl_cli.model.loading import load_processor
from vlrl_process import run_vlrl

pytestmark = pytest.mark.model
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "gemma4")


@pytest.fixture(scope="module")
def maze_data(tmp_path_factory):
    return prepared_mazes(tmp_path_factory, 3, 3)


def _uri(rng, w, h):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return to_data_uri(buf.getvalue(), "image/png")


def _image(url):
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.mark.parametrize("family", FAMILIES)
def test_model_inputs_equal_the_processors_own_on_a_multi_turn_multi_image_sequence(family_models, family):
    """The trainer scores prompt + response + observation (+ its image) as one sequence. The inputs vlrl
    builds for it (render.model_inputs) must be exactly what the processor makes of the whole conversation,
    mm_token_type_ids included, and give the same logits."""
    from vlrl_cli.model.loading import load_vlm

    path = family_models[family]
    processor = load_processor(path)
    rng = np.random.default_rng(1)
    messages = [
        {"role": "user", "content": [_image(_uri(rng, 112, 84)), _image(_uri(rng, 56, 84)), {"type": "text", "text": "Which?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "left"}]},
        {"role": "user", "content": [_image(_uri(rng, 84, 84)), {"type": "text", "text": "And now?"}]},
    ]
    template, images = split_messages(messages)
    text = processor.apply_chat_template(template, add_generation_prompt=True, tokenize=False)
    ref = processor(text=[text], images=images, return_tensors="pt")
    assert (ref["input_ids"] == processor.image_token_id).any()

    ours = model_inputs(processor, ref["input_ids"], ref["attention_mask"], image_inputs(ref), "cpu")
    assert set(ours) == set(ref.keys())
    for k in ref.keys():
        assert torch.equal(ours[k], ref[k]), k

    model = load_vlm(str(path), torch.float32).eval()
    with torch.no_grad():
        logits_ours = model(**ours).logits
        logits_ref = model(**dict(ref)).logits
        torch.testing.assert_close(logits_ours, logits_ref, rtol=0, atol=0)
        # what happened before: the per-token input dropped. Qwen2-VL / Qwen3-VL refuse; Qwen2.5-VL silently
        # falls back to 1-D positions, and Gemma 4 to causal attention among an image's tokens: other logits
        without = {k: v for k, v in ours.items() if k != "mm_token_type_ids"}
        if family in ("qwen2_5_vl", "gemma4"):
            assert (model(**without).logits - logits_ref).abs().max() > 1e-4
        else:
            with pytest.raises(ValueError, match="mm_token_type_ids"):
                model(**without)


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_engine_and_trainer_agree_on_every_family_multi_turn_and_after_an_update(family_models, maze_data, family):
    """check-drift's numbers for the hf engine (fp32 both sides): the engine's incremental decoding with a
    KV cache and the trainer's one forward over the whole multi-turn sequence agree to float rounding, on
    every turn (every turn adds a maze frame), before and after a weight update."""
    from vlrl_cli.tools.drift import DriftOptions, check_drift
    from vlrl_cli.rollout.engines import Sampling

    report = check_drift(str(family_models[family]), str(maze_data / "train.parquet"),
                         DriftOptions(samples=2, sampling=Sampling(1.0, 1.0, 6, 0), max_turns=3, after_update=True,
                                      perturb=0.3))
    checks = {c["name"]: c for c in report["checks"]}
    for name in ("prompt_ids", "image_tensors", "image_token_counts", "after_update_seen_images"):
        assert checks[name]["passed"] is True, checks[name]
    assert report["passed"]
    turns = report["stats"]["by_turn"]
    assert len(turns) >= 2, turns  # several turns, each with a new image in context
    for name, s in turns.items():
        assert s["abs_diff"]["max"] < 1e-4, (name, s["abs_diff"])
    assert report["after_update"]["seen"]["overall"]["abs_diff"]["max"] < 1e-4


def _run(args, timeout=600):
    return run_vlrl(*args, timeout=timeout)


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_grpo_and_check_drift_through_the_cli_on_every_family(tmp_path, family_models, colors_data, family):
    model = family_models[family]
    runs = tmp_path / "runs"
    base = {"model": {"path": str(model)},
            "data": {"train": str(colors_data / "train.parquet"), "val": str(colors_data / "val.parquet"), "val_limit": 4},
            "rollout": {"n": 4, "prompts_per_step": 4, "max_new_tokens": 4},
            "trainer": {"steps": 2, "lr": 1e-3, "micro_batch": 8, "eval_every": 2},
            "run": {"dir": str(runs)}}
    sft = {**base, "algorithm": {"name": "sft", "sft_target": "ground_truth"}, "run": {**base["run"], "name": "sft"}}
    grpo = {**base, "algorithm": {"name": "grpo", "ppo_epochs": 2, "kl_coef": 0.05}, "run": {**base["run"], "name": "grpo"}}
    for name, recipe in (("sft", sft), ("grpo", grpo)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
        r = _run(["train", tmp_path / f"{name}.yaml"])
        assert r.returncode == 0, r.stderr[-3000:]
        lines = [json.loads(l) for l in (runs / name / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in lines] == [1, 2]
        key = "loss" if name == "sft" else "drift_abs_max"
        assert all(math.isfinite(m[key]) for m in lines), lines
    sft_losses = [json.loads(l)["loss"] for l in (runs / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert sft_losses[1] < sft_losses[0]  # it learns
    grpo_metrics = [json.loads(l) for l in (runs / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert grpo_metrics[0]["drift_abs_max"] < 1e-4 and "val_accuracy" in grpo_metrics[1]
    assert grpo_metrics[0]["kl"] is not None and grpo_metrics[0]["kl"] >= 0
    # LoRA through the CLI: the reference is the base with the adapters off, so step 1's KL is zero
    lora = {**grpo, "model": {**base["model"], "lora": {"rank": 4}}, "data": {"train": base["data"]["train"]},
            "trainer": {**base["trainer"], "steps": 1, "eval_every": 0}, "run": {**base["run"], "name": "lora"}}
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(lora))
    r = _run(["train", tmp_path / "lora.yaml"])
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((runs / "lora" / "metrics.jsonl").read_text().splitlines()[0])
    assert m["kl"] == pytest.approx(0.0, abs=1e-7) and m["drift_abs_max"] < 1e-4, m

    report = tmp_path / "drift.json"
    r = _run(["check-drift", runs / "grpo", colors_data / "val.parquet", "--samples", "4", "--max-new-tokens", "6",
              "--after-update", "--max-mean", "1e-4", "--json", report])
    assert r.returncode == 0, r.stderr[-3000:]
    checks = {c["name"]: c["passed"] for c in json.loads(report.read_text())["checks"]}
    assert checks["image_tensors"] and checks["prompt_ids"] and checks["after_update_seen_images"], checks


def test_an_unsupported_architecture_is_refused_at_load_with_the_supported_list(tmp_path, colors_data):
    """A text-only Llama folder given to train and check-drift: exit 2 and one line listing the families,
    before any weights load (not a crash in the processor or the first forward)."""
    from transformers import LlamaConfig

    from vlrl_cli.model.families import FAMILIES

    model = tmp_path / "llama"
    LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=8192).save_pretrained(model)  # a config alone: nothing may read weights
    recipe = {"model": {"path": str(model)}, "data": {"train": str(colors_data / "train.parquet")},
              "rollout": {"n": 2, "prompts_per_step": 2, "max_new_tokens": 4},
              "run": {"dir": str(tmp_path / "runs"), "name": "llama"}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    for args in (["train", tmp_path / "r.yaml"], ["check-drift", model, colors_data / "val.parquet"]):
        r = _run(args)
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1, (args[0], r.stderr[-2000:])
        assert "'llama' is not supported" in err[0] and all(f in err[0] for f in FAMILIES), err


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma4"])
def test_engine_prompts_hold_one_placeholder_per_image_and_expand_back_exactly(family_models, family):
    """vLLM takes a prompt with one placeholder per image and expands it with its own processor: Qwen-VL's
    <|image_pad|> between the template's own vision delimiters; Gemma 4's <|image|> alone, its expansion adding
    <|image> and <image|> around the image tokens. Collapsing the trainer's ids must give exactly that, and
    expanding by the image processor's counts (the hf engine's own-preprocessing path) the trainer's ids."""
    from vlrl_cli.model.families import image_wrap_ids
    from vlrl_cli.model.render import image_token_counts, render_prompt
    from vlrl_cli.rollout.engines import collapse_placeholders, expand_placeholders

    processor = load_processor(family_models[family])
    rng = np.random.default_rng(0)
    # two images next to each other, then one after text
    messages = [{"role": "user", "content": [_image(_uri(rng, 112, 84)), _image(_uri(rng, 56, 56)),
                                             {"type": "text", "text": "and"}, _image(_uri(rng, 56, 84)),
                                             {"type": "text", "text": "Which?"}]}]
    r = render_prompt(processor, messages)
    pad, wrap = processor.image_token_id, image_wrap_ids(processor)
    short = collapse_placeholders(r.input_ids, pad, wrap)
    assert short.count(pad) == 3
    template, _ = split_messages(messages)
    text = processor.apply_chat_template(template, add_generation_prompt=True, tokenize=False)
    assert short == processor.tokenizer(text, add_special_tokens=False)["input_ids"]  # the unexpanded template
    if family == "gemma4":
        assert wrap is not None and not set(wrap) & set(short)
    else:
        assert wrap is None
    counts = image_token_counts(processor, r.tensors)
    assert expand_placeholders(short, pad, counts, wrap) == r.input_ids


def test_a_qwen3_5_config_class_registered_by_another_library_does_not_reach_the_trainers_model(family_models):
    """vLLM registers its own Qwen3_5Config with transformers' AutoConfig once it has parsed a Qwen3.5 config,
    and a trainer in the same process (colocated runs, check-drift) then got that class: its vision config
    names the heads num_heads only, and transformers' vision rotary embedding failed on it. A class like that
    is registered here; load_vlm still builds transformers' model, equal to the one built without it. The
    control: a plain AutoModel load in the same state fails or gets the foreign class."""
    import transformers
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from vlrl_cli.model.loading import load_vlm

    path = family_models["qwen3_5"]
    before = load_vlm(str(path), torch.float32)

    class Qwen3_5VisionConfig(transformers.PretrainedConfig):  # heads under another name; class names as transformers
        model_type = "qwen3_5"

        def __init__(self, num_attention_heads=None, **kw):
            super().__init__(**kw)
            self.num_heads = num_attention_heads

    class Qwen3_5Config(transformers.PretrainedConfig):  # the same class name as transformers' own
        model_type = "qwen3_5"
        sub_configs = {"vision_config": Qwen3_5VisionConfig, "text_config": transformers.Qwen3_5TextConfig}

        def __init__(self, vision_config=None, text_config=None, **kw):
            self.vision_config = Qwen3_5VisionConfig(**(vision_config or {}))
            self.text_config = transformers.Qwen3_5TextConfig(**(text_config or {}))
            super().__init__(**kw)

    AutoConfig.register("qwen3_5", Qwen3_5Config, exist_ok=True)
    try:
        assert type(AutoConfig.from_pretrained(path)) is Qwen3_5Config  # the registration took
        try:
            control = AutoModelForImageTextToText.from_pretrained(path)
            assert type(control.config) is Qwen3_5Config
        except (AttributeError, TypeError, ValueError, KeyError):
            pass  # the failure seen on the GPU machine
        after = load_vlm(str(path), torch.float32)
    finally:
        CONFIG_MAPPING._extra_content.pop("qwen3_5", None)
    assert type(after.config) is transformers.Qwen3_5Config
    assert type(after.config.vision_config) is transformers.Qwen3_5VisionConfig
    a, b = before.state_dict(), after.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_compiled_qwen3_5_keeps_its_linear_attention_eager_and_reuses_its_graphs_across_lengths(family_models):
    """model.compile on a hybrid model: the vision blocks and full-attention layers compile, the gated-DeltaNet
    layers stay eager (compiled, every new sequence length compiled them afresh: a GRPO step on the GPU never
    got past its compiles). New lengths after the second reuse the graphs; the logits equal the eager model's.
    Which layers compile and when dynamo captures a new graph are decided before any backend runs: aot_eager
    shows both without inductor's C++ code generation (tests/test_modeling.py compiles through inductor)."""
    from vlrl_cli.model import loading

    path = str(family_models["qwen3_5"])
    eager, model = loading.load_vlm(path, torch.float32), loading.load_vlm(path, torch.float32)
    layers = model.model.language_model.layers
    full = [l for l in layers if getattr(l, "linear_attn", None) is None]
    assert 0 < len(full) < len(layers)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert loading.compile_layers(model, "aot_eager") == len(model.model.visual.blocks) + len(full)
    gen = torch.Generator().manual_seed(0)
    graphs = []
    for length in (40, 57, 80, 123):
        ids = torch.randint(10, 100, (2, length), generator=gen)
        logits = model(input_ids=ids).logits
        logits.float().sum().backward()
        torch.testing.assert_close(logits, eager(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[1] == graphs[2] == graphs[3], graphs


def test_qwen3_5_training_where_its_linear_attention_kernels_break_is_refused_before_the_engine(family_models,
                                                                                               monkeypatch):
    """flash-linear-attention, where installed, runs Qwen3.5's gated DeltaNet; on a Hopper GPU with Triton
    >= 3.4 and < 3.7.1 it refuses its own backward (wrong gradients there). Seen on an H100 with the torch
    2.11 stack: a crash at the first training step, minutes in. The trainer refuses it as it builds the
    policy, naming the ways out; any other GPU, Triton, or tilelang or no flash-linear-attention, passes."""
    import importlib.util
    import sys
    import types

    from vlrl_cli.errors import UserError
    from vlrl_cli.model import linear_attention
    from vlrl_cli.train import policy

    installed = {"fla"}
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (object() if name in installed else None)
                        if name in ("fla", "tilelang") else real_find_spec(name, *a))
    triton = types.SimpleNamespace(__version__="3.6.0")
    monkeypatch.setitem(sys.modules, "triton", triton)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    with pytest.raises(UserError, match="tilelang.*flash-linear-attention"):
        linear_attention.check_linear_attention_kernels()
    for version in ("3.7.1", "3.3.0"):
        triton.__version__ = version
        linear_attention.check_linear_attention_kernels()
    triton.__version__ = "3.6.0"
    for change in (lambda: installed.add("tilelang"), lambda: installed.discard("fla")):
        change()
        linear_attention.check_linear_attention_kernels()
    installed.clear()
    installed.add("fla")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))  # an A100
    linear_attention.check_linear_attention_kernels()

    # the policy asks before DeepSpeed and before any engine starts, for the families with linear attention
    def refuse():
        raise UserError("kernels refused")

    monkeypatch.setattr(policy, "check_linear_attention_kernels", refuse)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="kernels refused"):
        policy.build_policy(str(family_models["qwen3_5"]), 1e-5, 0.0, 0, 0, False, 1.0, "float32")
