"""Rollout engines, one interface (`RolloutEngine`): generate (ids + log-probs of sampled tokens), update
weights, sleep/wake.

- `hf`: transformers generation; runs anywhere (CPU tests, the demo).
- `vllm`: an in-process vLLM engine per GPU rank, colocated with the trainer (GPU only).
Both take exactly the token ids and image tensors the trainer will score (see model/render.py), so the
trainer never re-tokenises what the engine saw.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

from ...model.families import placeholder_token_ids  # noqa: F401 - the engines and their callers import it from here
from ...model.render import split_tower_input


@dataclass
class Sampling:
    """Decoding settings: the one type for training rollouts, validation, eval and check-drift."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int = 0
    top_k: int = 0  # 0 = off
    ignore_eos: bool = False  # always generate max_new_tokens (benchmarks)


@dataclass
class EngineLimits:
    """What an engine fixes when it starts, derived from the recipe it serves (train/recipe.engine_limits): the
    longest sequence it must hold and the most images one prompt may carry (vLLM refuses more of either)."""

    max_model_len: int = 8192
    max_images: int = 16


@dataclass
class GenRequest:
    input_ids: list[int]
    tensors: dict[str, Any] = field(default_factory=dict)  # pixel_values, image_grid_thw, ...
    n: int = 1
    messages: list[dict] | None = None  # the chat the ids were rendered from (vLLM needs the images)
    images: list | None = None  # or the prompt's decoded images themselves, in order (serve has no chat)
    max_new_tokens: int | None = None  # this request's own cap under Sampling's: the context an episode has left


def new_token_cap(request: GenRequest, sampling: Sampling) -> int:
    """The most tokens this request may generate: Sampling's, or fewer where the request's context runs out
    (at least one: an episode with no room left ends before it asks)."""
    cap = sampling.max_new_tokens
    return cap if request.max_new_tokens is None else max(1, min(cap, request.max_new_tokens))


@dataclass
class Generation:
    token_ids: list[int]
    logprobs: list[float]  # log p(token) under softmax(logits / temperature), engine side
    finish_reason: str  # stop | length


class RolloutEngine(Protocol):
    """What the rollout loop, eval and check-drift need from an engine.

    Sleep/wake: `sleep()` frees what generation holds (vllm: KV cache and weights) while the trainer
    works; `generate` on a sleeping engine wakes it first, so a caller can never hang on one.
    `update_weights` may be called asleep or awake, and drops every cache that could serve results of
    the old weights (prefix, multimodal, vision encoder).
    """

    last_prompt_ids: list[list[int]]  # the prompt ids generation started from, per request of the last call

    def generate(self, requests: list[GenRequest], sampling: Sampling) -> list[list[Generation]]: ...

    def update_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None: ...

    def sleep(self, discard_weights: bool = False) -> None:
        """discard_weights: the caller pushes every weight (update_weights) before the next generate, so the
        engine may drop its copy instead of keeping it (vllm: sleep level 2, no copy to host memory)."""

    def wake(self) -> None: ...

    def attach_vision_probe(self, probe: "VisionInputProbe") -> None: ...


def require_vllm() -> None:
    """The vllm engine needs the `vllm` package: say so (and how to install it) before any model loads."""
    import importlib.util

    from ...errors import UserError

    if importlib.util.find_spec("vllm") is None:
        raise UserError("the vllm engine needs vLLM, which is not installed here: pip install \"vlrl[vllm]\" "
                        "(GPU machines), or use the hf engine (rollout.engine=hf / --engine hf)")


def make_engine(name: str, model_path: str, processor, **kwargs) -> RolloutEngine:
    if name == "vllm":
        require_vllm()
    if name == "hf":
        from .hf import HFEngine

        return HFEngine(model_path, processor, **kwargs)
    if name == "vllm":
        from .vllm import VLLMEngine

        return VLLMEngine(model_path, processor, **kwargs)
    from ...errors import UserError

    raise UserError(f"unknown rollout engine {name!r} (hf or vllm)")


def collapse_placeholders(ids: list[int], pad_id: int, wrap: tuple[int, int] | None = None) -> list[int]:
    """One placeholder per image (how vLLM takes prompts): each run of `pad_id` becomes a single token; with
    `wrap` (the tokens the processor put around each image, families.image_wrap_ids), each wrapped run becomes
    one bare placeholder, so two images next to each other stay two."""
    out, i = [], 0
    while i < len(ids):
        t = ids[i]
        if wrap is not None and t == wrap[0] and i + 1 < len(ids) and ids[i + 1] == pad_id:
            j = i + 1
            while j < len(ids) and ids[j] == pad_id:
                j += 1
            out.append(pad_id)
            i = j + 1 if j < len(ids) and ids[j] == wrap[1] else j
            continue
        if not (t == pad_id and out and out[-1] == pad_id and wrap is None):
            out.append(t)
        i += 1
    return out


def expand_placeholders(ids: list[int], pad_id: int, counts: list[int], wrap: tuple[int, int] | None = None) -> list[int]:
    """The inverse: the i-th placeholder becomes counts[i] copies, inside `wrap` when given (what an engine's own
    processor does)."""
    out, k = [], 0
    for t in ids:
        if t == pad_id:
            run = [pad_id] * (counts[k] if k < len(counts) else 1)
            out += [wrap[0], *run, wrap[1]] if wrap is not None else run
            k += 1
        else:
            out.append(t)
    return out


class VisionInputProbe:
    """Records the pixel tensors an engine's vision encoder actually receives, one entry per image.

    A forward pre-hook on the model's vision tower (families.Family.vision_tower; the same name in transformers and vLLM); the
    tower's input is split per image (render.split_tower_input). check-drift compares these
    with the tensors the trainer scores, so a preprocessing difference on either side is named, not guessed.
    """

    def __init__(self):
        self.images: list[tuple[tuple[int, int, int], Any]] = []  # (grid, pixel rows)

    def __call__(self, module, args, kwargs):
        pixels = args[0] if args else kwargs.get("hidden_states", kwargs.get("x", kwargs.get("pixel_values")))
        # Qwen-VL towers take the grids; Gemma 4's the patch positions
        second = args[1] if len(args) > 1 else kwargs.get("grid_thw", kwargs.get("pixel_position_ids"))
        if pixels is None or second is None:
            return
        self.images += [(g, rows.detach().to("cpu")) for g, rows in split_tower_input(pixels, second)]
