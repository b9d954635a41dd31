"""LoRA (model.lora): adapters train, the engine samples from the merged policy, checkpoints load both ways."""

import json

import pytest
import torch
import yaml

from vlrl_cli.train.runs import read_metrics
from vlrl_process import run_vlrl

USER_ENV = """
from vlrl_cli.rollout.envs.base import Env

class ParityEnv(Env):
    def score(self, text):
        ok = len(text) % 2 == 0
        return float(ok), {"correct": ok, "format_ok": True}
"""


def lora_recipe(tmp_path, tiny_model, colors_data, name, lora=None, **trainer):
    r = {"model": {"path": str(tiny_model), "lora": lora if lora is not None else {"rank": 8, "alpha": 16}},
         "data": {"train": str(colors_data / "train.parquet")},
         "rollout": {"n": 4, "prompts_per_step": 4, "max_new_tokens": 4},
         "algorithm": {"name": "grpo"},
         "trainer": {"steps": 2, "lr": 1e-2, "micro_batch": 8, **trainer},
         "run": {"name": name, "dir": str(tmp_path / "runs")},
         "envs": {"colors": "userenvs:ParityEnv"}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_lora_grpo_trains_adapters_and_the_engine_gets_the_merged_policy(tmp_path, tiny_model, colors_data, stage,
                                                                         monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    (tmp_path / "userenvs.py").write_text(USER_ENV)
    rec = lora_recipe(tmp_path, tiny_model, colors_data, f"lora{stage}", zero_stage=stage, steps=3)
    r = run_vlrl("train", rec, env_extra={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-3000:]
    m = read_metrics(tmp_path / "runs" / f"lora{stage}")
    assert [x["step"] for x in m] == [1, 2, 3]
    assert any(x["grad_norm"] for x in m)
    # steps 2 and 3 sample from the engine after merged syncs: it holds exactly the trained policy (fp32)
    assert max(x["drift_abs_max"] for x in m) < 1e-4, [x["drift_abs_max"] for x in m]

    from vlrl_cli.train.recipe import load_recipe

    # the run's copy is a valid recipe, from the folder that holds its environment module
    monkeypatch.chdir(tmp_path)
    assert load_recipe(tmp_path / "runs" / f"lora{stage}" / "recipe.yaml").model.lora.rank == 8
    ckpt = tmp_path / "runs" / f"lora{stage}" / "checkpoints" / "step_3"
    assert (ckpt / "adapter" / "adapter_config.json").exists()
    base = AutoModelForImageTextToText.from_pretrained(tiny_model).eval()
    base_sd = {n: p.clone() for n, p in base.state_dict().items()}
    adapted = PeftModel.from_pretrained(base, str(ckpt / "adapter")).eval()
    merged = AutoModelForImageTextToText.from_pretrained(ckpt / "hf").eval()
    changed = [n for n, p in merged.state_dict().items() if not torch.equal(p, base_sd[n])]
    assert changed and all(any(k in n for k in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
                           and "language_model" in n for n in changed), changed  # vision tower and projector frozen
    ids = torch.tensor([[1, 5, 9, 12, 40, 41, 42]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_lora_resume_reproduces_an_uninterrupted_run(tmp_path, tiny_model, colors_data):
    (tmp_path / "userenvs.py").write_text(USER_ENV)
    env = {"PYTHONPATH": str(tmp_path)}
    full = lora_recipe(tmp_path, tiny_model, colors_data, "full", steps=4, save_every=2)
    assert run_vlrl("train", full, env_extra=env).returncode == 0
    part = lora_recipe(tmp_path, tiny_model, colors_data, "part", steps=2, save_every=2)
    assert run_vlrl("train", part, env_extra=env).returncode == 0
    r = run_vlrl("train", part, "--resume", "--allow-changes", "--set", "trainer.steps=4", env_extra=env)
    assert r.returncode == 0, r.stderr[-3000:]
    keys = ("step", "reward_mean", "grad_norm", "entropy", "drift_abs_mean")
    a = [{k: x[k] for k in keys} for x in read_metrics(tmp_path / "runs" / "full")]
    b = [{k: x[k] for k in keys} for x in read_metrics(tmp_path / "runs" / "part")]
    assert [x["step"] for x in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=1e-5, abs=1e-6), (x, y)


def test_lora_bad_input_is_named_before_any_work(tmp_path, tiny_model, colors_data):
    cases = [({"rank": 0}, "model.lora.rank"),
             ({"rank": 4, "target_modules": ["no_such_proj"]}, "model.lora.target_modules"),
             ({"rank": 4, "dropout": 2}, "model.lora.dropout")]
    (tmp_path / "userenvs.py").write_text(USER_ENV)  # found beside the recipes
    for i, (lora, key) in enumerate(cases):
        r = run_vlrl("train", lora_recipe(tmp_path, tiny_model, colors_data, f"bad{i}", lora=lora))
        assert r.returncode == 2 and key in r.stderr and "Traceback" not in r.stderr, (lora, r.stderr[-1500:])
    # a full fine-tune resumed as a LoRA run (and the reverse) is refused, even with --allow-changes
    full = lora_recipe(tmp_path, tiny_model, colors_data, "kind", lora={})
    text = yaml.safe_load(full.read_text())
    del text["model"]["lora"]
    full.write_text(yaml.safe_dump(text))
    (tmp_path / "userenvs.py").write_text(USER_ENV)
    assert run_vlrl("train", full, env_extra={"PYTHONPATH": str(tmp_path)}).returncode == 0
    r = run_vlrl("train", full, "--resume", "--allow-changes", "--set", "model.lora.rank=8")
    assert r.returncode == 2 and "LoRA" in r.stderr and "model.lora" in r.stderr


def test_check_drift_agrees_with_a_lora_policy_before_and_after_an_adapter_change(tmp_path, tiny_model, colors_data):
    report = tmp_path / "drift.json"
    r = run_vlrl("check-drift", tiny_model, colors_data / "train.parquet", "--lora-rank", "8", "--samples", "4",
                "--max-new-tokens", "6", "--after-update", "--perturb", "1.0", "--max-mean", "1e-4", "--json", report)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(report.read_text())
    checks = {c["name"]: c for c in rep["checks"]}
    assert checks["after_update_seen_images"]["passed"] and checks["update_visible"]["passed"], checks
    assert "adapter" in rep["after_update"]["update"]
    assert rep["after_update"]["seen"]["overall"]["abs_diff"]["max"] < 1e-4  # the engine holds the merged adapters


@pytest.mark.model
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "gemma4"])
def test_lora_vision_adapts_the_vision_tower_and_the_projector_of_every_family(family_models, family):
    """vision: false -> adapters in the language model only; vision: true -> also every vision block, the
    projector (merger; Qwen3-VL's deepstack mergers too) and the patch embedding (a Conv3d), never the head.
    With vision adapters trained (B != 0), the merged weights give the adapter model's logits on an image."""
    from vlrl_cli.train.recipe import LoraCfg
    from vlrl_cli.train.lora import wrap
    from vlrl_cli.model.loading import load_vlm

    from vlrl_cli.model.families import FAMILY

    tower = FAMILY[family].vision_tower
    # Qwen-VL: blocks, merger and patch_embed below the tower; Gemma 4: encoder layers and patch embedder below
    # it, its projector (embed_vision) beside it
    blocks, projector, patch = ((".encoder.layers.", "embed_vision.embedding_projection", "patch_embedder.input_proj")
                                if family == "gemma4" else (".blocks.", ".merger.", "patch_embed.proj"))
    for vision in (False, True):
        model = wrap(load_vlm(str(family_models[family]), torch.float32), LoraCfg(rank=4, alpha=8, vision=vision))
        adapted = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
        in_visual = [n for n in adapted if f".{tower}." in n or projector in n]
        assert any("language_model" in n for n in adapted)
        assert not any("lm_head" in n for n in adapted)
        if not vision:
            assert not in_visual
            continue
        assert any(blocks in n for n in in_visual) and any(projector in n for n in in_visual), in_visual
        assert any(n.endswith(patch) for n in in_visual), in_visual
        if family.startswith("qwen3_vl"):
            assert any("deepstack_merger_list" in n for n in in_visual)
        _assert_merged_equals_adapted(model, family_models[family])


@pytest.mark.model
def test_lora_on_routed_experts_adapts_attention_and_the_plan_counts_what_trains(family_models):
    """Qwen3-VL-MoE: the experts are 3-D weight tensors and the router a gate, not linear layers. The default
    targets adapt every layer's attention; experts and router stay frozen and reach the engine unchanged
    (merged names equal the plain model's), and the memory plan counts exactly the adapters that train."""
    from vlrl_cli.model.loading import load_vlm
    from vlrl_cli.train.lora import merged_model
    from vlrl_cli.train.plan import model_config, model_shape
    from vlrl_cli.train.recipe import LoraCfg
    from vlrl_cli.train.lora import wrap

    path = family_models["qwen3_vl_moe"]
    plain = load_vlm(str(path), torch.float32)
    names = dict(plain.named_parameters())
    model = wrap(load_vlm(str(path), torch.float32), LoraCfg(rank=4, alpha=8))
    adapted = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    layers = plain.config.text_config.num_hidden_layers
    assert sum(n.endswith("self_attn.q_proj") for n in adapted) == layers, adapted
    assert not any(".mlp." in n for n in adapted), adapted
    experts = [n for n, p in model.named_parameters() if ".experts." in n or ".mlp.gate." in n]
    assert experts and not any(p.requires_grad for n, p in model.named_parameters() if n in experts)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert model_shape(model_config(str(path)), LoraCfg(rank=4, alpha=8)).trainable == trainable
    _, merged = merged_model(model)
    assert set(merged) == set(names)
    for n in names:
        if ".experts." in n or ".mlp.gate." in n:
            assert torch.equal(merged[n], names[n]), n


def _assert_merged_equals_adapted(model, path):
    """Give every adapter a random B (PEFT starts B at 0), then compare the adapter model's logits on an image
    prompt with a plain model loaded with lora.merged_model's weights (linear and convolution merges)."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from vlrl_cli.data.images import to_data_uri
    from vlrl_cli.train.lora import merged_model
    from vlrl_cli.model.loading import load_processor
    from vlrl_cli.model.render import model_inputs, render_prompt
    import io

    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05)
    processor = load_processor(str(path))
    buf = io.BytesIO()
    Image.new("RGB", (84, 56), (200, 30, 30)).save(buf, "PNG")
    part = {"type": "image_url", "image_url": {"url": to_data_uri(buf.getvalue(), "image/png")}}
    rp = render_prompt(processor, [{"role": "user", "content": [part, {"type": "text", "text": "colour?"}]}])
    ids = torch.tensor([rp.input_ids])
    inputs = model_inputs(processor, ids, torch.ones_like(ids), rp.tensors, "cpu")
    model.eval()
    with torch.no_grad():
        adapted = model(**inputs).logits
        plain = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32).eval()
        _, merged = merged_model(model)
        missing, unexpected = plain.load_state_dict(merged, strict=False)
        assert not unexpected and not [k for k in missing if "lm_head" not in k], (missing, unexpected)
        base = plain(**inputs).logits
        untouched = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32).eval()(**inputs).logits
    assert not torch.allclose(adapted, untouched, atol=1e-3)  # the adapters change the output
    torch.testing.assert_close(base, adapted, rtol=1e-4, atol=1e-5)


def test_an_adapter_folder_given_as_a_model_names_its_checkpoint(tmp_path):
    from vlrl_cli.errors import UserError
    from vlrl_cli.model.loading import check_model_name

    adapter = tmp_path / "step_3" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match=f"not a model directory.*pass the checkpoint {tmp_path / 'step_3'}"):
        check_model_name(str(adapter))
