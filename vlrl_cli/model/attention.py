"""Loading the VLM (trainer, hf engine, KL reference, check-drift), with its vision attention batched.

Qwen-VL vision towers attend within segments of a packed patch sequence (an image, or in Qwen2.5-VL a
112-px window of one). transformers hands those segments to flash-attention's varlen kernel when it is
installed; otherwise (sdpa, eager) it runs one attention call per segment. A 448-px image in Qwen2.5-VL is
16 windows, so a micro-batch of 8 images makes 128 calls per layer, about 3,600 per forward and again for
the recomputation and the backward. Measured on an H200 (3B-size model, 8 x 541 tokens): a training
micro-batch took 1.82 s that way and 1.40 s grouped (bench/results/gpu_runs/tp_*).

`grouped_segment_attention` computes the same attention with one sdpa call per distinct segment length
(almost always one or two): segments of equal length are stacked into a batch. No mask, no padding, and it
runs on the CPU too. It is registered with transformers' AttentionInterface under a name containing
"flash", because that is how the vision code decides to pass the segment boundaries (cu_seqlens) instead
of splitting; it is used for the vision config only, never the language model.
"""


from __future__ import annotations


import torch
import torch.nn.functional as F


NAME = "flash_grouped_sdpa"  # "flash": the vision code passes cu_seqlens to functions so named


@torch.compiler.disable  # data-dependent (segment lengths read on the host): always eager, also in compiled blocks
def grouped_segment_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                              cu_seq_lens_q=None, cu_seq_lens_k=None, is_causal=False, **_):
    """query/key/value [1, heads, N, dim] of N packed patches; segments given by cu_seq_lens_q.

    Returns [1, N, heads, dim], the layout transformers' attention functions return.
    """
    if cu_seq_lens_q is None or attention_mask is not None or is_causal:
        raise ValueError(f"{NAME} is for the vision tower's packed, non-causal segments only")
    if cu_seq_lens_k is not None and cu_seq_lens_k is not cu_seq_lens_q and not torch.equal(cu_seq_lens_q, cu_seq_lens_k):
        raise ValueError(f"{NAME}: query and key segments differ")
    q, k, v = query[0], key[0], value[0]  # [H, N, D]
    heads, n, dim = q.shape
    groups, inverse = segment_plan(cu_seq_lens_q, q.device)
    if not groups:
        return q.new_zeros(1, n, heads, dim), None
    outs = []
    for count, length, idx in groups:
        # [H, G*L, D] -> [G, H, L, D]: each segment is one batch row
        qg, kg, vg = (t.index_select(1, idx).reshape(heads, count, length, dim).transpose(0, 1) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qg, kg, vg, dropout_p=dropout, scale=scaling)
        outs.append(o.transpose(0, 1).reshape(heads, count * length, dim))
    packed = torch.cat(outs, dim=1)  # [H, N, D] in grouped order
    return packed.index_select(1, inverse).transpose(0, 1).unsqueeze(0), None


_PLANS: dict[tuple, tuple] = {}  # (kind, id(tensor), device) -> (weak reference, its version, plan)


def per_tensor_plan(kind: str, tensor: torch.Tensor, device, build):
    """build(tensor) once per tensor object: every block of one forward (and its recompute under gradient
    checkpointing) passes the same boundaries tensor, and building a plan from it reads it on the host, a
    GPU sync that stops the CPU from queueing work ahead of the GPU. A hit needs the very same tensor
    object, unmodified (its version counter); a dead or changed one is rebuilt. Inference-mode tensors keep
    no version counter and are never cached."""
    import weakref

    key = (kind, id(tensor), str(device))
    try:
        version = tensor._version
    except RuntimeError:
        return build(tensor)
    hit = _PLANS.get(key)
    if hit is not None and hit[0]() is tensor and hit[1] == version:
        return hit[2]
    plan = build(tensor)
    if len(_PLANS) >= 16:  # drop plans of tensors that are gone
        for k in [k for k, h in _PLANS.items() if h[0]() is None]:
            del _PLANS[k]
    _PLANS[key] = (weakref.ref(tensor), version, plan)
    return plan


def segment_plan(cu_seqlens: torch.Tensor, device) -> tuple[list[tuple[int, int, torch.Tensor]], torch.Tensor]:
    """Segments of equal length grouped: [(count, length, patch indices)], and the inverse permutation.

    Planned once per cu_seqlens tensor (per_tensor_plan): uncached, a compiled 3B training micro-batch (32 vision
    blocks x forward and recompute) made 224 stream syncs."""
    def build(cu):
        bounds = cu.tolist()
        by_length: dict[int, list[int]] = {}
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end > start:
                by_length.setdefault(end - start, []).append(start)
        groups, order = [], []
        for length, starts in by_length.items():
            idx = (torch.tensor(starts)[:, None] + torch.arange(length)).reshape(-1)
            groups.append((len(starts), length, idx))
            order.append(idx)
        inverse = torch.empty(bounds[-1] if bounds else 0, dtype=torch.long)
        if order:
            order_all = torch.cat(order)
            inverse[order_all] = torch.arange(order_all.numel())
        # built on the host, moved in one go per tensor
        return [(c, l, i.to(device, non_blocking=True)) for c, l, i in groups], inverse.to(device, non_blocking=True)

    return per_tensor_plan("segments", cu_seqlens, device, build)


PACKED = "vlrl_packed_text"  # the language model's attention when training on packed micro-batches


@torch.compiler.disable  # data-dependent (sequence starts read on the host): eager, also in compiled blocks
def packed_text_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                          position_ids=None, **kwargs):
    """The language model's attention for trainer.pack_tokens: a packed row (batch 1, several sequences end to
    end, text positions restarting at 0) on a GPU goes to PyTorch's variable-length flash kernel, one causal
    attention per sequence with no work on the blocks between them (sdpa with the block-diagonal mask
    computes every block: measured on an H100, 3B model, a 16k-token packed row was 0.67x the padded
    throughput that way). Anything else (padded batches, the CPU, cached generation) is transformers' sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    T = query.shape[2]
    if (query.is_cuda and query.shape[0] == 1 and position_ids is not None and key.shape[2] == T
            and position_ids.shape[-1] == T and dropout == 0.0):
        cu, longest = per_tensor_plan("packed_rows", position_ids, query.device, _packed_rows)  # once per forward
        if cu is not None:
            q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, heads, dim]
            return _varlen_causal(q, k, v, cu, longest, scaling).unsqueeze(0), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _packed_rows(position_ids: torch.Tensor):
    """(cu_seqlens int32, longest) of a packed row: a sequence starts wherever the text position is 0; or
    (None, 0) when the row holds one sequence (nothing packed)."""
    T = position_ids.shape[-1]
    starts = (position_ids.reshape(-1) == 0).nonzero().flatten()
    if len(starts) < 2 or int(starts[0]) != 0:
        return None, 0
    cu = torch.cat([starts, starts.new_tensor([T])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _varlen_causal(q, k, v, cu, longest: int, scale):
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters  # the causal flag changed name between releases
    kw = {"scale": scale, **({"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)})}
    if k.shape[1] != q.shape[1]:  # grouped-query attention
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    return varlen_attn(q, k, v, cu, cu, longest, longest, **kw)


def use_packed_text_attention(model) -> bool:
    """Route the language model's attention through packed_text_attention (its masks stay sdpa's). False
    (unchanged) for a family whose image tokens attend to each other both ways: the varlen kernel is plain
    causal, so its packed rows keep sdpa with the masks batches.packed_masks builds."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    from .families import family_of

    if family_of(model.config).bidirectional_images:
        return False
    AttentionInterface.register(PACKED, packed_text_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED, sdpa_mask)
    text = getattr(model.config, "text_config", model.config)
    text._attn_implementation = PACKED
    return True


def use_grouped_vision_attention(model) -> bool:
    """Switch the model's vision tower to grouped_segment_attention. False (unchanged) if the model has no
    vision config, or already uses a real flash-attention kernel there."""
    from transformers import AttentionInterface

    vision = getattr(model.config, "vision_config", None)
    if vision is None or "flash" in (vision._attn_implementation or ""):
        return False
    AttentionInterface.register(NAME, grouped_segment_attention)
    vision._attn_implementation = NAME
    return True


