"""Grouped vision attention (vlrl_cli/modeling.py) computes what transformers' per-segment path computes."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AttentionInterface, AutoModelForImageTextToText

from vlrl_cli import modeling
from vlrl_cli.images import to_data_uri
from vlrl_cli.render import load_processor, model_inputs, render_prompt

pytestmark = pytest.mark.model  # also run on the oldest supported transformers (make test-floor)


def _uri(rng, w: int, h: int) -> str:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return to_data_uri(buf.getvalue(), "image/png")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from vlrl_cli.tiny import build_tiny_model

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
    grouped = modeling.load_vlm(str(path), torch.float32)
    assert grouped.config.vision_config._attn_implementation == modeling.NAME
    assert grouped.config.text_config._attn_implementation == plain.config.text_config._attn_implementation

    calls = []
    real = modeling.grouped_segment_attention

    def counting(*args, **kw):
        calls.append(kw["cu_seq_lens_q"].tolist())
        return real(*args, **kw)

    AttentionInterface.register(modeling.NAME, counting)
    try:
        logits_g, grads_g = _forward_backward(grouped, rp, processor)
    finally:
        AttentionInterface.register(modeling.NAME, real)
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
        modeling.grouped_segment_attention(module, q, q, q, cu_seq_lens_q=cu, is_causal=True)
    with pytest.raises(ValueError, match="vision"):
        modeling.grouped_segment_attention(module, q, q, q, attention_mask=torch.ones(1, 1, 6, 6))
    out, _ = modeling.grouped_segment_attention(module, q, q, q, cu_seq_lens_q=cu, scaling=0.5)
    ref = torch.cat([torch.nn.functional.scaled_dot_product_attention(q[..., s:e, :], q[..., s:e, :], q[..., s:e, :], scale=0.5)
                     for s, e in ((0, 3), (3, 6))], dim=2)
    torch.testing.assert_close(out, ref.transpose(1, 2))
