"""Each distinct image of a forward encoded once by the vision tower (hooks on the tower, found by content)."""

from __future__ import annotations

import itertools

import torch

from .families import vision_tower


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
    visual = vision_tower(model)
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
    visual = vision_tower(model)
    return bool(visual is not None and visual.__dict__.get("_vlrl_share_hooks"))


def _starts(sizes: list[int]) -> list[int]:
    """Where each image's rows start in the concatenation of images of these sizes."""
    return [0, *itertools.accumulate(sizes[:-1])]


def _keep_distinct_images(module, args, kwargs):
    module._vlrl_copies = None
    pixels = args[0] if args else kwargs.get("hidden_states")
    grid = args[1] if len(args) > 1 else kwargs.get("grid_thw")
    # towers given packed patch rows and their grids only (Gemma 4's take padded per-image rows and positions)
    if pixels is None or grid is None or len(grid) < 2 or grid.dim() != 2:
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


