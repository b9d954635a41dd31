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

import itertools

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


def use_packed_text_attention(model) -> None:
    """Route the language model's attention through packed_text_attention (its masks stay sdpa's)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED, packed_text_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED, sdpa_mask)
    text = getattr(model.config, "text_config", model.config)
    text._attn_implementation = PACKED


def check_model_name(name: str) -> str:
    """A model argument that looks local (starts with . / ~, or its first folder exists here) must exist:
    a typo is a one-line error naming it, not a hub lookup that retries online or blames huggingface.co."""
    from pathlib import Path

    from .errors import UserError

    p = Path(name).expanduser()
    if p.exists():
        if p.is_dir() and not (p / "config.json").exists():
            raise UserError(f"{name}: a folder without config.json (not a model directory)")
        return str(p)
    first = Path(name).parts[0] if Path(name).parts else ""
    if name.startswith((".", "/", "~")) or (first and Path(first).is_dir()) or name.count("/") != 1:
        raise UserError(f"{name}: no such model folder (and not a hub id of the form org/name)")
    return name


def from_pretrained(loader, name: str, **kwargs):
    """loader.from_pretrained(name) with a user's mistake (unknown hub id, offline, no weights) as a UserError."""
    from .errors import UserError

    name = check_model_name(name)
    try:
        return loader.from_pretrained(name, **kwargs)
    except OSError as e:  # transformers' "not a valid model identifier" / offline / missing files
        raise UserError(f"cannot load {name}: {str(e).strip().splitlines()[0]}") from None


def load_vlm(path: str, dtype: torch.dtype, attention: str = "auto"):
    """The model from a hub id or folder, on the CPU.

    attention "auto": transformers' default (sdpa) with the vision tower's attention grouped (see above);
    any other value is a transformers attn_implementation ("flash_attention_2" where flash-attn is
    installed, "sdpa", "eager") used as it is for the whole model. Either way, where a GPU is present, a
    repeated image is encoded once per forward (share_repeated_images).
    """
    from transformers import AutoModelForImageTextToText

    if attention != "auto":
        model = from_pretrained(AutoModelForImageTextToText, path, dtype=dtype, attn_implementation=attention)
    else:
        model = from_pretrained(AutoModelForImageTextToText, path, dtype=dtype)
        use_grouped_vision_attention(model)
    # on a GPU only, for now: sharing changes the rounding, and the CPU demo's GRPO run (tests/test_demo.py)
    # is sensitive to rounding - with sharing its exact run stalled at 3 of 4 colours (0.73) where the same
    # run without reached 1.0, with equal gradient norms to 1e-7 for steps 1-4 (see README, "Each distinct
    # image encoded once"). The CPU tests switch it on explicitly.
    if torch.cuda.is_available():
        share_repeated_images(model)
    return model


def share_repeated_images(model, enabled: bool = True):
    """Run the vision tower once per distinct image of a forward. A GRPO group's n samples carry the same
    prompt image, and their sequences share a micro-batch (trainer.micro_batch >= n, or a packed row), so
    the tower would otherwise encode that image n times, forward and backward. At Qwen2.5-VL-3B's size with
    448-px images that is about 30% of the trainer's FLOPs per sequence (1,024 patches through the 0.67 B
    tower against ~540 tokens through the 3.1 B language model); the GRPO step's training phase went from
    10.2 to 8.7 s on an H200 (two leases, bench/results/gpu_runs/share_2026_11_24). Every copy gets the distinct image's
    features (the gradients of the copies add up in backward, as through separate runs), so this changes
    rounding, never the result.

    Two forward hooks on the tower, found by content (equal grid and equal pixels: multi-turn episodes
    repeat their first frame without sharing tensors): the first drops the repeats from the input, the
    second expands the outputs back to every image in order. Hooks, not a replaced forward, so DeepSpeed's
    own hooks and a deepcopy of the model keep working. enabled=False takes the hooks off again (benchmarks
    compare both). Returns the visual module (None: no vision tower)."""
    visual = getattr(getattr(model, "model", None), "visual", None)
    if visual is None:
        return None
    hooks = visual.__dict__.pop("_vlrl_share_hooks", ())
    for h in hooks:
        h.remove()
    if enabled:
        visual._vlrl_share_hooks = (visual.register_forward_pre_hook(_keep_distinct_images, with_kwargs=True),
                                    visual.register_forward_hook(_expand_to_every_image))
    return visual


def shares_images(model) -> bool:
    """Whether share_repeated_images' hooks are on this model's vision tower (benchmarks record it)."""
    visual = getattr(getattr(model, "model", None), "visual", None)
    return bool(visual is not None and visual.__dict__.get("_vlrl_share_hooks"))


def _starts(sizes: list[int]) -> list[int]:
    """Where each image's rows start in the concatenation of images of these sizes."""
    return [0, *itertools.accumulate(sizes[:-1])]


def _keep_distinct_images(module, args, kwargs):
    module._vlrl_copies = None
    pixels = args[0] if args else kwargs.get("hidden_states")
    grid = args[1] if len(args) > 1 else kwargs.get("grid_thw")
    if pixels is None or grid is None or len(grid) < 2:
        return None
    sizes = grid.prod(-1).tolist()
    starts = _starts(sizes)
    # a cheap fingerprint per image (one host read; a reduction per image, so equal images sum equally),
    # confirmed by an exact comparison where two agree
    sums = torch.stack([pixels[a:a + n].detach().float().sum() for a, n in zip(starts, sizes)]).tolist()
    grids = [tuple(g) for g in grid.tolist()]
    first_of, distinct = [], []  # for each image, the position of its distinct image in `distinct`
    seen: dict[tuple, list[int]] = {}
    for i in range(len(sizes)):
        key = (grids[i], sums[i])
        match = next((u for u in seen.get(key, [])
                      if torch.equal(pixels[starts[i]:starts[i] + sizes[i]],
                                     pixels[starts[distinct[u]]:starts[distinct[u]] + sizes[distinct[u]]])), None)
        if match is None:
            match = len(distinct)
            distinct.append(i)
            seen.setdefault(key, []).append(match)
        first_of.append(match)
    if len(distinct) == len(sizes):
        return None
    keep = torch.cat([torch.arange(starts[i], starts[i] + sizes[i], device=pixels.device) for i in distinct])
    module._vlrl_copies = (first_of, [sizes[i] for i in distinct])
    new_pixels, new_grid = pixels[keep], grid[distinct]
    if len(args) > 1:
        return (new_pixels, new_grid, *args[2:]), kwargs
    if args:
        return (new_pixels, *args[1:]), {**kwargs, "grid_thw": new_grid}
    return args, {**kwargs, "hidden_states": new_pixels, "grid_thw": new_grid}


def _expand_to_every_image(module, args, output):
    copies, module._vlrl_copies = module._vlrl_copies, None
    if copies is None:
        return None
    first_of, sizes = copies
    merge = module.spatial_merge_size ** 2

    def expand(x, per_image):  # rows of the distinct images -> rows of every image, in order
        starts = _starts(per_image)
        index = torch.cat([torch.arange(starts[u], starts[u] + per_image[u], device=x.device) for u in first_of])
        return x.index_select(0, index)

    merged = [n // merge for n in sizes]
    if isinstance(output, torch.Tensor):  # a tower that returns the merged features only
        return expand(output, merged)
    if getattr(output, "pooler_output", None) is not None:
        output.pooler_output = expand(output.pooler_output, merged)
    if getattr(output, "last_hidden_state", None) is not None:
        output.last_hidden_state = expand(output.last_hidden_state, sizes)
    if getattr(output, "deepstack_features", None) is not None:  # Qwen3-VL: merged features of some blocks
        output.deepstack_features = [expand(f, merged) for f in output.deepstack_features]
    return output


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


def compile_layers(model, backend: str = "inductor") -> int:
    """torch.compile each transformer block of the model (language-model decoder layers and vision blocks)
    in place; returns how many. Why per block ("regional" compilation): the blocks of a model share one
    code object, so the compiler traces and codegens one block once and reuses it for all of them (seconds,
    not minutes, and no whole-model graph that breaks on the data-dependent image/placeholder logic between
    them). What it buys is fusion of the elementwise work around the matmuls (fp32 RMSNorm, rotary, SwiGLU,
    residual adds), which on a GPU took as much kernel time as the matmuls (bench/results/gpu_runs/pack_*).

    Gradient checkpointing composes: transformers checkpoints each block's forward, which is what is
    compiled. ZeRO-3 does not (its per-module parameter hooks); the caller refuses that combination."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for b in blocks:
        b.compile(backend=backend, dynamic=None)
    return len(blocks)
