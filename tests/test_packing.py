"""Packed micro-batches (trainer.pack_tokens): sequences end to end in one row, no padding, no attention
across boundaries. Their log-probs (and gradients) must equal the padded batch's, on every family, with
text-only, one-image, and multi-image multi-turn sequences in the same pack."""

import dataclasses
import io

import pytest
import torch
from PIL import Image

from vlrl_cli.train.batches import make_batch, micro_batches, sequence_logprobs
from vlrl_cli.data.images import to_data_uri
from vlrl_cli.model.loading import load_processor
from vlrl_cli.model.render import render_prompt

pytestmark = pytest.mark.model
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "gemma4")


def image(w, h, colour):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    return {"type": "image_url", "image_url": {"url": to_data_uri(buf.getvalue(), "image/png")}}


class Seq:
    def __init__(self, processor, messages, answer):
        r = render_prompt(processor, messages)
        ans = processor.tokenizer.encode(answer, add_special_tokens=False)
        self.token_ids = r.input_ids + ans
        self.loss_mask = [0] * r.length + [1] * len(ans)
        self.engine_logp = [0.0] * len(self.token_ids)
        self.tensors = r.tensors


def sequences(processor):
    text = [{"role": "user", "content": "say something about colours"}]
    one = [{"role": "user", "content": [image(56, 84, (200, 20, 20)), {"type": "text", "text": "what colour?"}]}]
    multi = [{"role": "user", "content": [image(84, 56, (20, 200, 20)), {"type": "text", "text": "first frame"}]},
             {"role": "assistant", "content": "Move: right"},
             {"role": "user", "content": [image(56, 56, (20, 20, 200)), image(112, 56, (90, 90, 9)),
                                          {"type": "text", "text": "two more frames"}]}]
    return [Seq(processor, one, "red"), Seq(processor, text, "blue green"), Seq(processor, multi, "Move: down"),
            Seq(processor, one, "a much longer answer than the others")]


@pytest.mark.parametrize("family", FAMILIES + ("gemma4:causal",))
def test_packed_logprobs_and_gradients_equal_the_padded_ones(family_models, family):
    """gemma4:causal: Gemma 4 as its small released sizes configure it (E2B: use_bidirectional_attention unset),
    where transformers and vLLM keep an image's tokens causal: a packed row must too."""
    from vlrl_cli.model.loading import load_vlm

    family, _, variant = family.partition(":")
    model = load_vlm(str(family_models[family]), torch.float32)
    if variant == "causal":
        model.config.text_config.use_bidirectional_attention = None
    processor = load_processor(str(family_models[family]))
    seqs = sequences(processor)
    padded, packed = make_batch(seqs, processor, "cpu"), make_batch(seqs, processor, "cpu", packed_for=model)
    assert packed.input_ids.shape == (1, sum(len(s.token_ids) for s in seqs))  # no padding at all
    grads = []
    results = []
    for b in (padded, packed):
        model.zero_grad()
        lp = sequence_logprobs(model, b, 1.0, [processor.image_token_id])
        (-(lp * b.loss_mask).sum()).backward()
        results.append(lp.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    valid = torch.zeros_like(results[0], dtype=torch.bool)
    for i, s in enumerate(seqs):
        valid[i, 1:len(s.token_ids)] = True
    diff = (results[0] - results[1]).abs()[valid]
    assert results[0].shape == results[1].shape and diff.max() < 1e-5, float(diff.max())
    assert (results[1][~valid] == 0).all()
    # float rounding scales with the gradients' size (Gemma 4's embeddings are scaled by sqrt(width))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5 * max(1.0, float(grads[0].abs().max())), rtol=1e-4)
    # the controls: with no boundaries, later sequences attend to earlier ones and their log-probs change:
    # one running text position over the whole row, or (masks built per layer type) one causal mask over it
    T = packed.input_ids.shape[1]
    controls = []
    if isinstance(packed.inputs.get("attention_mask"), dict):
        masks = packed.inputs["attention_mask"]
        causal = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
        controls.append({**packed.inputs, "attention_mask": {k: causal for k in masks}})
        if variant != "causal":  # and an image's tokens attending to each other causally only, as a plain causal kernel would
            plain = {k: m & causal for k, m in masks.items()}
            controls.append({**packed.inputs, "attention_mask": plain})
    else:
        position_ids = packed.inputs["position_ids"].clone()
        position_ids[0, 0] = torch.arange(T)
        controls.append({**packed.inputs, "position_ids": position_ids})
    for inputs in controls:
        with torch.no_grad():
            leaky = sequence_logprobs(model, dataclasses.replace(packed, inputs=inputs), 1.0, [processor.image_token_id])
        assert (leaky - results[0]).abs()[valid].max() > 1e-3


def test_linear_attention_runs_per_sequence_in_packed_rows_also_under_recompute(family_models):
    """Qwen3.5's gated-DeltaNet layers carry a recurrent state and a convolution along the row. Packed ==
    padded with activation checkpointing too (the recompute splits the row as the forward did); the control:
    the layers' own forward, unsplit, carries one sequence into the next."""
    from vlrl_cli.model.families import family_of
    from vlrl_cli.model.loading import load_vlm

    path = str(family_models["qwen3_5"])
    model, processor = load_vlm(path, torch.float32), load_processor(path)
    linear = family_of(model.config).linear_attention
    seqs = sequences(processor)
    padded, packed = make_batch(seqs, processor, "cpu"), make_batch(seqs, processor, "cpu", packed_for=model)
    valid = torch.zeros(padded.input_ids.shape, dtype=torch.bool)
    for i, s in enumerate(seqs):
        valid[i, 1:len(s.token_ids)] = True
    model.gradient_checkpointing_enable()
    model.train()
    out = []
    for b in (padded, packed):
        model.zero_grad()
        lp = sequence_logprobs(model, b, 1.0, [processor.image_token_id])
        (-(lp * b.loss_mask).sum()).backward()
        out.append((lp.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    assert (out[0][0] - out[1][0]).abs()[valid].max() < 1e-5
    torch.testing.assert_close(out[0][1], out[1][1], atol=1e-5, rtol=1e-4)
    layers = [m for m in model.modules() if getattr(m, linear, None) is not None and "forward" in vars(m)]
    assert layers
    for m in layers:
        del m.forward  # the class's own forward: one state along the whole row
    with torch.no_grad():
        leaky = sequence_logprobs(model, packed, 1.0, [processor.image_token_id])
    assert (leaky - out[0][0]).abs()[valid].max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_at_the_loss_mask_only_equal_the_full_ones_with_their_gradients(family_models, family):
    """`only=loss_mask` (what training uses: the head and the log-softmax at the trained positions alone)
    gives the full computation's log-probs there, 0 elsewhere, and the same gradients; padded and packed.
    A chunk smaller than the positions checks that the chunks' gradients come back in the right places."""
    from vlrl_cli.model import logprobs
    from vlrl_cli.model.loading import load_vlm

    model = load_vlm(str(family_models[family]), torch.float32)
    processor = load_processor(str(family_models[family]))
    seqs = sequences(processor)
    for b in (make_batch(seqs, processor, "cpu"), make_batch(seqs, processor, "cpu", packed_for=model)):
        out = []
        for only in (None, b.loss_mask):
            model.zero_grad()
            lp = sequence_logprobs(model, b, 1.0, [processor.image_token_id], only=only)
            (-(lp * b.loss_mask).sum()).backward()
            out.append((lp.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
        (full, g_full), (sel, g_sel) = out
        trained = b.loss_mask > 0
        assert trained.sum() > 0 and (sel[~trained] == 0).all()
        torch.testing.assert_close(sel[trained], full[trained], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(g_sel, g_full, atol=1e-6, rtol=1e-5)
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 11, requires_grad=True)
    tokens = torch.randint(0, 11, (2, 7))
    whole = logprobs.token_logprobs(logits, tokens, 0.7, [3], chunk=10**6)
    chunked = logprobs.token_logprobs(logits, tokens, 0.7, [3], chunk=3)
    torch.testing.assert_close(chunked, whole)
    g_whole, = torch.autograd.grad(whole.sum(), logits)
    g_chunked, = torch.autograd.grad(chunked.sum(), logits)
    torch.testing.assert_close(g_chunked, g_whole)


def test_packing_groups_by_tokens_and_a_long_sequence_goes_alone():
    assert micro_batches([5, 5, 5, 5, 5], 2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert micro_batches([3, 4, 2, 9, 1, 1], 0, pack_tokens=8) == [range(0, 2), range(2, 3), range(3, 4), range(4, 6)]
    assert micro_batches([], 4, pack_tokens=8) == []
    # padded budget (vlrl serve): count x longest within the budget
    assert micro_batches([3, 4, 2, 9, 1], padded_tokens=8) == [range(0, 2), range(2, 3), range(3, 4), range(4, 5)]


def test_sft_and_grpo_runs_packed_reproduce_the_padded_runs(tmp_path, tiny_model, colors_data):
    """The same recipe with trainer.pack_tokens: the same losses and gradient norms, step by step."""
    from test_train import losses, write_recipe
    from vlrl_process import run_vlrl

    from vlrl_cli.train.runs import read_metrics

    out = {}
    for algo, extra in (("sft", {"sft_target": "ground_truth"}), ("grpo", {})):
        for name, trainer in (("padded", {"micro_batch": 3}), ("packed", {"pack_tokens": 1000})):
            run = f"{algo}-{name}"
            rec = write_recipe(tmp_path, tiny_model, colors_data, run, algorithm={"name": algo, **extra},
                               trainer={**trainer, "steps": 3 if algo == "sft" else 2})
            r = run_vlrl("train", rec)
            assert r.returncode == 0, r.stderr[-3000:]
            out[run] = read_metrics(tmp_path / "runs" / run)
    for algo in ("sft", "grpo"):  # the packed runs really packed: fewer, unpadded forwards
        assert all(m["padding_frac"] == 0 for m in out[f"{algo}-packed"])
        assert all(a["micro_batches"] < b["micro_batches"] for a, b in zip(out[f"{algo}-packed"], out[f"{algo}-padded"]))
    assert losses(tmp_path / "runs" / "sft-packed") == pytest.approx(losses(tmp_path / "runs" / "sft-padded"), rel=1e-4)
    for key in ("grad_norm", "reward_mean", "entropy", "drift_abs_mean"):
        assert [m[key] for m in out["grpo-packed"]] == pytest.approx([m[key] for m in out["grpo-padded"]], rel=1e-3,
                                                                     abs=1e-6), key


def test_packed_row_boundaries_are_read_once_per_position_tensor():
    """The varlen path's sequence boundaries come from the text positions (0 starts a sequence); every layer
    of a forward passes the same position tensor, so they are computed once (one host sync, not one per
    layer), and a changed tensor is re-read."""
    from vlrl_cli.model import attention

    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    cu, longest = attention._packed_rows(pos)
    assert cu.tolist() == [0, 3, 5, 9] and cu.dtype == torch.int32 and longest == 4
    assert attention._packed_rows(torch.arange(6)[None]) == (None, 0)  # one sequence: not packed
    calls = []

    def counting(t):
        calls.append(1)
        return attention._packed_rows(t)

    first = attention.per_tensor_plan("packed_rows", pos, pos.device, counting)
    assert attention.per_tensor_plan("packed_rows", pos, pos.device, counting) is first and len(calls) == 1
    pos[0, 5] = 7  # in place: the sequence starting at 5 merges into the one before
    cu2, longest2 = attention.per_tensor_plan("packed_rows", pos, pos.device, counting)
    assert len(calls) == 2 and cu2.tolist() == [0, 3, 9] and longest2 == 6


def test_the_varlen_kernel_is_never_given_a_family_whose_images_attend_both_ways(family_models):
    """The GPU's varlen kernel is plain causal per sequence: Gemma 4's packed rows keep sdpa with their own
    per-layer-type masks (batches.packed_masks), the Qwen-VL families go to the kernel."""
    from vlrl_cli.model.attention import PACKED, use_packed_text_attention
    from vlrl_cli.model.loading import load_vlm

    for family, expected in (("gemma4", False), ("qwen2_5_vl", True)):
        model = load_vlm(str(family_models[family]), torch.float32)
        assert use_packed_text_attention(model) is expected
        assert (model.config.text_config._attn_implementation == PACKED) is expected
