"""Grouped vision attention (vlrl_cli/model/attention.py) computes what transformers' per-segment path computes."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AttentionInterface, AutoModelForImageTextToText

from vlrl_cli.model import attention, image_sharing, loading
from vlrl_cli.data.images import to_data_uri
from vlrl_cli.model.loading import load_processor
from vlrl_cli.model.render import model_inputs, render_prompt

pytestmark = pytest.mark.model  # also run on the oldest supported transformers (make test-floor)


def _uri(rng, w: int, h: int) -> str:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return to_data_uri(buf.getvalue(), "image/png")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from vlrl_cli.model.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("families")
    return {f: build_tiny_model(root / f, f) for f in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")}


def _forward_backward(model, rp, processor):
    ids = torch.tensor([rp.input_ids])
    out = model(**model_inputs(processor, ids, torch.ones_like(ids), rp.tensors, "cpu"))
    out.logits.float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "visual" in n and p.grad is not None}
    return out.logits.detach(), grads


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_grouped_equals_per_segment(models, family):
    """Images of three sizes: segments (images, windows) of several lengths, so several groups and an
    inverse permutation that is not the identity. Logits and every vision gradient must match."""
    path = models[family]
    rng = np.random.default_rng(0)
    content = [{"type": "image_url", "image_url": {"url": _uri(rng, w, h)}} for w, h in ((112, 84), (200, 140), (56, 56))]
    processor = load_processor(path)
    rp = render_prompt(processor, [{"role": "user", "content": content + [{"type": "text", "text": "Which?"}]}])

    plain = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    assert "flash" not in (plain.config.vision_config._attn_implementation or "")
    grouped = loading.load_vlm(str(path), torch.float32)
    assert grouped.config.vision_config._attn_implementation == attention.NAME
    assert grouped.config.text_config._attn_implementation == plain.config.text_config._attn_implementation

    calls = []
    real = attention.grouped_segment_attention

    def counting(*args, **kw):
        calls.append(kw["cu_seq_lens_q"].tolist())
        return real(*args, **kw)

    AttentionInterface.register(attention.NAME, counting)
    try:
        logits_g, grads_g = _forward_backward(grouped, rp, processor)
    finally:
        AttentionInterface.register(attention.NAME, real)
    logits_p, grads_p = _forward_backward(plain, rp, processor)

    assert len(calls) == len(grouped.model.visual.blocks)  # the grouped function served every vision layer
    assert any(len({b - a for a, b in zip(c[:-1], c[1:])}) > 1 for c in calls)  # several segment lengths
    torch.testing.assert_close(logits_g, logits_p, rtol=1e-5, atol=1e-5)
    assert grads_g.keys() == grads_p.keys() and grads_g
    for name in grads_p:
        torch.testing.assert_close(grads_g[name], grads_p[name], rtol=1e-4, atol=1e-6, msg=name)


def test_grouped_rejects_causal_or_masked_use():
    q = torch.randn(1, 2, 6, 4)
    cu = torch.tensor([0, 3, 6])
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="vision"):
        attention.grouped_segment_attention(module, q, q, q, cu_seq_lens_q=cu, is_causal=True)
    with pytest.raises(ValueError, match="vision"):
        attention.grouped_segment_attention(module, q, q, q, attention_mask=torch.ones(1, 1, 6, 6))
    out, _ = attention.grouped_segment_attention(module, q, q, q, cu_seq_lens_q=cu, scaling=0.5)
    ref = torch.cat([torch.nn.functional.scaled_dot_product_attention(q[..., s:e, :], q[..., s:e, :], q[..., s:e, :], scale=0.5)
                     for s, e in ((0, 3), (3, 6))], dim=2)
    torch.testing.assert_close(out, ref.transpose(1, 2))


def test_segment_plan_is_reused_only_for_the_same_unchanged_tensor():
    """Every vision block of a forward passes the same cu_seqlens tensor: its plan is built once (one host
    sync), and a changed or different tensor never gets a stale plan."""
    q = torch.randn(1, 2, 9, 4)
    module = torch.nn.Module()

    def reference(bounds):
        parts = [torch.nn.functional.scaled_dot_product_attention(q[..., s:e, :], q[..., s:e, :], q[..., s:e, :])
                 for s, e in zip(bounds[:-1], bounds[1:])]
        return torch.cat(parts, dim=2).transpose(1, 2)

    cu = torch.tensor([0, 3, 6, 9])
    first = attention.segment_plan(cu, q.device)
    assert attention.segment_plan(cu, q.device) is first  # the same object: no rebuild
    torch.testing.assert_close(attention.grouped_segment_attention(module, q, q, q, cu_seq_lens_q=cu)[0], reference([0, 3, 6, 9]))
    cu[1:3] = torch.tensor([2, 7])  # changed in place: the version counter moves, the plan is rebuilt
    assert attention.segment_plan(cu, q.device) is not first
    torch.testing.assert_close(attention.grouped_segment_attention(module, q, q, q, cu_seq_lens_q=cu)[0], reference([0, 2, 7, 9]))
    other = torch.tensor([0, 4, 9])  # an equal-looking new tensor is planned from its own values
    torch.testing.assert_close(attention.grouped_segment_attention(module, q, q, q, cu_seq_lens_q=other)[0], reference([0, 4, 9]))
    with torch.inference_mode():  # no version counter: computed every time, still correct
        inf = torch.tensor([0, 5, 9])
        assert attention.segment_plan(inf, q.device) is not attention.segment_plan(inf, q.device)
        torch.testing.assert_close(attention.grouped_segment_attention(module, q, q, q, cu_seq_lens_q=inf)[0], reference([0, 5, 9]))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_compiled_blocks_give_the_eager_logprobs_and_gradients(models, family, on_floor):
    """model.compile (compile_layers) under gradient checkpointing in train mode, as `vlrl train` runs it on a
    GPU: two micro-batches of different shapes (the second recompiles with dynamic shapes), images of several
    sizes; log-probs and every gradient equal the eager model's.
    What vlrl and transformers decide (which blocks compile, what dynamo captures of each under checkpointing,
    the autograd graph) is the same with the aot_eager backend; inductor adds only its code generation, which is
    torch's and the same whatever transformers runs. So inductor compiles one family, the seeds' one, on the
    newest transformers, and the rest trace with aot_eager: a cold inductor compile of a tiny family took 35-70 s
    of one CPU core."""
    from vlrl_cli.train.batches import make_batch, sequence_logprobs

    from test_packing import sequences

    backend = "inductor" if family == "qwen3_vl" and not on_floor else "aot_eager"
    processor = load_processor(models[family])
    seqs = sequences(processor)
    results = []
    for compiled in (False, True):
        model = loading.load_vlm(str(models[family]), torch.float32)
        model.gradient_checkpointing_enable()
        model.train()
        if compiled:
            blocks = len(model.model.visual.blocks) + len(model.model.language_model.layers)
            assert loading.compile_layers(model, backend) == blocks
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
        per_batch = []
        for group in (seqs[:2], seqs[1:]):
            model.zero_grad()
            b = make_batch(group, processor, "cpu")
            lp = sequence_logprobs(model, b, 1.0, [processor.image_token_id], only=b.loss_mask)
            (-(lp * b.loss_mask).sum()).backward()
            per_batch.append((lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        results.append(per_batch)
        if compiled:  # the blocks really ran compiled: frames were converted into graphs
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    for (lp_e, g_e), (lp_c, g_c) in zip(*results):
        torch.testing.assert_close(lp_c, lp_e, rtol=1e-4, atol=1e-5)
        assert g_e.keys() == g_c.keys() and any("visual" in n for n in g_e)
        for n in g_e:
            torch.testing.assert_close(g_c[n], g_e[n], rtol=1e-3, atol=1e-5, msg=n)


def test_compile_setting_resolves_and_zero3_is_refused(tmp_path, tiny_model):
    from vlrl_cli.train.recipe import RecipeError, load_recipe
    from vlrl_cli.train.policy import compile_wanted

    assert compile_wanted("auto", 2, on_gpu=True) and compile_wanted("auto", 0, on_gpu=True)
    assert not compile_wanted("auto", 3, on_gpu=True) and not compile_wanted("auto", 1, on_gpu=False)
    assert compile_wanted(True, 1, on_gpu=False) and not compile_wanted(False, 2, on_gpu=True)
    data = tmp_path / "d.jsonl"
    data.write_text("")
    base = ["model.path=" + str(tiny_model), f"data.train={data}"]
    assert load_recipe(None, base).model.compile == "auto"
    with pytest.raises(RecipeError, match="model.compile needs trainer.zero_stage"):
        load_recipe(None, base + ["model.compile=true", "trainer.zero_stage=3"])
    assert load_recipe(None, base + ["model.compile=auto", "trainer.zero_stage=3"]).model.compile == "auto"
    with pytest.raises(RecipeError, match="model.compile"):
        load_recipe(None, base + ["model.compile=fast"])


def test_model_share_images_decides_the_trainers_tower_hooks(tiny_model, tmp_path):
    """model.share_images: true / false as given; auto is load_vlm's choice (on where a GPU is present)."""
    from vlrl_cli.train.recipe import RecipeError, load_recipe
    from vlrl_cli.train.policy import prepare_model

    data = tmp_path / "d.jsonl"
    data.write_text("")
    base = ["model.path=" + str(tiny_model), f"data.train={data}"]
    assert load_recipe(None, base).model.share_images == "auto"
    assert load_recipe(None, base + ["model.share_images=true"]).model.share_images is True
    with pytest.raises(RecipeError, match="model.share_images"):
        load_recipe(None, base + ["model.share_images=yes please"])
    on_gpu = torch.cuda.is_available()
    for setting, expected in ((True, True), (False, False), ("auto", on_gpu)):
        assert image_sharing.shares_images(prepare_model(str(tiny_model), "float32", share_images=setting)) is expected
    lora = load_recipe(None, base + ["model.lora.rank=4", "model.share_images=true"]).model.lora
    # the adapters wrap the model after the hooks are on, and the hooks stay on the tower
    wrapped = prepare_model(str(tiny_model), "float32", lora=lora, share_images=True)
    assert image_sharing.shares_images(wrapped.base_model.model)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_repeated_images_are_encoded_once_with_the_same_logprobs_and_gradients(models, family):
    """share_repeated_images (load_vlm installs it on a GPU): the first and last sequences carry the same image (as a
    GRPO group's samples do) and the multi-turn one three distinct frames. The tower must see each distinct
    image once, and log-probs and every gradient must equal the model that encodes every copy, padded and
    packed (Qwen3-VL's deepstack features are expanded too)."""
    from vlrl_cli.train.batches import make_batch, sequence_logprobs

    from test_packing import sequences

    processor = load_processor(models[family])
    seqs = sequences(processor)
    every = sum(int(s.tensors["image_grid_thw"].prod(-1).sum()) for s in seqs if s.tensors)
    repeated = int(seqs[0].tensors["image_grid_thw"].prod(-1).sum())
    plain = AutoModelForImageTextToText.from_pretrained(models[family], dtype=torch.float32)
    attention.use_grouped_vision_attention(plain)
    shared = loading.load_vlm(str(models[family]), torch.float32)
    image_sharing.share_repeated_images(shared)  # load_vlm switches it on where a GPU is present
    assert image_sharing.shares_images(shared) and not image_sharing.shares_images(plain)
    rows = []
    shared.model.visual.patch_embed.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    for packed in (False, True):
        results = []
        for model in (plain, shared):
            model.zero_grad()
            b = make_batch(seqs, processor, "cpu", packed_for=model if packed else None)
            lp = sequence_logprobs(model, b, 1.0, [processor.image_token_id], only=b.loss_mask)
            (-(lp * b.loss_mask).sum()).backward()
            results.append((lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        (lp_p, g_p), (lp_s, g_s) = results
        torch.testing.assert_close(lp_s, lp_p, rtol=1e-4, atol=1e-5)
        assert g_p.keys() == g_s.keys() and any("visual" in n for n in g_p)
        for n in g_p:
            torch.testing.assert_close(g_s[n], g_p[n], rtol=1e-3, atol=1e-5, msg=n)
    assert rows == [every - repeated] * 2, (rows, every, repeated)  # the repeat was dropped, nothing else
    # nothing repeated: the tower's input is untouched
    rows.clear()
    with torch.no_grad():
        shared(**make_batch(seqs[1:3], processor, "cpu").inputs)
    assert rows == [int(seqs[2].tensors["image_grid_thw"].prod(-1).sum())]
    # switched off (benchmarks compare both): every copy is encoded again
    image_sharing.share_repeated_images(shared, enabled=False)
    assert not image_sharing.shares_images(shared)
    rows.clear()
    with torch.no_grad():
        shared(**make_batch(seqs, processor, "cpu").inputs)
    assert rows == [every]
