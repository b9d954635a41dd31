"""Loading models and processors: a hub id or a local folder, the user's typos named before any hub lookup,
the trainer's attention kernels and image sharing switched on (attention.py, image_sharing.py), and the
transformer blocks compiled for training."""

from __future__ import annotations

import torch

from ..errors import UserError
from .attention import use_grouped_vision_attention
from .families import family_of
from .image_sharing import share_repeated_images
from .linear_attention import split_linear_attention_at_sequences


def check_model_name(name: str) -> str:
    """A model argument that looks local (starts with . / ~, or its first folder exists here) must exist:
    a typo is a one-line error naming it, not a hub lookup that retries online or blames huggingface.co.
    A hub id must be in the local cache when the hub cannot be reached (offline, or no network: found in
    seconds, not after minutes of retries)."""
    from pathlib import Path

    from ..errors import UserError

    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UserError(f"{name}: a file, not a model folder; pass the folder that holds the model's config.json"
                            + (f" ({p.parent})" if (p.parent / "config.json").exists() else ""))
        if p.is_dir() and not (p / "config.json").exists():
            hint = (f"; pass the checkpoint {p.parent} (vlrl merges its adapter)" if (p / "adapter_config.json").exists()
                    else "")
            raise UserError(f"{name}: a folder without config.json (not a model directory){hint}")
        if p.is_dir():
            check_weight_files(p)
        return str(p.resolve())  # what a saved adapter records as its base: usable from any folder
    first = Path(name).parts[0] if Path(name).parts else ""
    if name.startswith((".", "/", "~")) or (first and Path(first).is_dir()) or name.count("/") != 1:
        raise UserError(f"{name}: no such model folder (and not a hub id of the form org/name)")
    if not hub_usable() and not in_hub_cache(name):
        why = "HF_HUB_OFFLINE is set" if hub_offline() else f"the hub ({hub_host()}) cannot be reached"
        raise UserError(f"{name}: not in the local Hugging Face cache and {why}; download it on a machine with a "
                        "network (huggingface-cli download), or pass a local model folder")
    return name


def check_weight_files(folder, required: str | None = None, need_weights: bool = False) -> None:
    """Every safetensors file's header read (not its tensors), and every shard an index names present: a
    download or copy that stopped early, or a file deleted, is one line naming the file, not a crash in the
    middle of loading (or an export that copies the wreck on). `required`: a file that must be there (an
    adapter's weights); `need_weights`: a folder without any weight file is refused too (a processor alone is
    a folder `from_pretrained` may load, a model to export is not)."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    from ..errors import UserError

    folder = Path(folder)
    if required and not (folder / required).exists():
        raise UserError(f"{folder / required}: missing; the folder holds no weights")
    for index in sorted(folder.glob("*.index.json")):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{index}: not a weight index (no weight_map); a copy that stopped early?") from None
        missing = sorted(s for s in shards if not (folder / s).exists())
        if missing:
            raise UserError(f"{folder / missing[0]}: missing ({len(missing)} of the {len(shards)} shards {index.name} "
                            "names); fetch or copy the model again")
    if need_weights and not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise UserError(f"{folder}: no weight files (*.safetensors); a download or copy that stopped early?")
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt"):
                pass
        except Exception as e:  # noqa: BLE001 - safetensors' own error type, reported with the file
            raise UserError(f"{f}: not a complete safetensors file ({e}); a download or copy that stopped "
                            "early? fetch it again") from None


def hub_offline() -> bool:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_host() -> str:
    import os
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return f"{url.hostname}:{url.port or (443 if url.scheme == 'https' else 80)}"


_HUB_REACHABLE: dict[str, bool] = {}


def hub_usable(timeout: float = 3.0) -> bool:
    """Whether hub downloads can work now: not offline, and one quick connection to the hub succeeds (asked
    once per process; transformers would otherwise retry for minutes before saying there is no network)."""
    import socket

    if hub_offline():
        return False
    host = hub_host()
    if host not in _HUB_REACHABLE:
        name, _, port = host.rpartition(":")
        try:
            socket.create_connection((name, int(port)), timeout=timeout).close()
            _HUB_REACHABLE[host] = True
        except OSError:
            _HUB_REACHABLE[host] = False
    return _HUB_REACHABLE[host]


def in_hub_cache(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # noqa: BLE001 - a malformed id: not cached
        return False


def from_pretrained(loader, name: str, **kwargs):
    """loader.from_pretrained(name) with a user's mistake (unknown hub id, offline, no weights) as a UserError."""
    from ..errors import UserError

    name = check_model_name(name)
    if "/" in name and not __import__("pathlib").Path(name).exists() and not hub_usable():
        kwargs["local_files_only"] = True  # cached: no network round trips that would only time out
    try:
        return loader.from_pretrained(name, **kwargs)
    except OSError as e:  # transformers' "not a valid model identifier" / offline / missing files
        raise UserError(f"cannot load {name}: {str(e).strip().splitlines()[0]}") from None


def transformers_config(name: str):
    """The model's config built with transformers' own class for its model type, or None where transformers has
    none (the loader then picks as usual). Why not AutoConfig: another library in the process may register its
    own class for a model type with AutoConfig. vLLM does, for Qwen3.5, once it has parsed such a config; its
    class names the vision tower's heads differently, and transformers' model built from it failed in its vision
    rotary embedding. The trainer and a vLLM engine share one process (colocated runs, check-drift)."""
    import transformers
    from transformers import PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    from pathlib import Path

    local = {} if Path(name).exists() or hub_usable() else {"local_files_only": True}
    try:
        kind = PretrainedConfig.get_config_dict(name, **local)[0].get("model_type")
    except Exception:  # noqa: BLE001 - the model's own load names the problem
        return None
    own = getattr(transformers, CONFIG_MAPPING_NAMES.get(kind, ""), None)
    return own.from_pretrained(name, **local) if own is not None else None


def read_config(path: str):
    """The model's config from its config file alone (a local folder, or a released size vlrl knows offline);
    None where it cannot be read without the network."""
    from pathlib import Path

    from .families import known_config

    if not (Path(path) / "config.json").is_file():
        return known_config(path)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except Exception:  # noqa: BLE001 - the model's own load names the problem later
        return None


def check_supported(path: str) -> None:
    """Refuse, in one line, a model whose architecture vlrl does not support (before its weights or
    processor load, so not as a crash in the first forward); a config that cannot be read passes here."""
    config = read_config(path)
    if config is not None:
        try:
            family_of(config)
        except UserError as e:
            raise UserError(f"{path}: {e}") from None


def max_positions(path: str) -> int | None:
    """The language model's max_position_embeddings, from the config alone; None where it cannot be read
    without the network."""
    config = read_config(path)
    if config is None:
        return None
    text = config.get_text_config()
    return getattr(text, "max_position_embeddings", None)


def load_processor(name_or_path: str):
    from transformers import AutoProcessor

    check_supported(name_or_path)
    return from_pretrained(AutoProcessor, name_or_path)


def load_vlm(path: str, dtype: torch.dtype, attention: str = "auto"):
    """The model from a hub id or folder, on the CPU.

    attention "auto": transformers' default (sdpa) with the vision tower's attention grouped (see above);
    any other value is a transformers attn_implementation ("flash_attention_2" where flash-attn is
    installed, "sdpa", "eager") used as it is for the whole model. Either way, where a GPU is present, a
    repeated image is encoded once per forward (share_repeated_images).
    """
    from transformers import AutoModelForImageTextToText

    check_supported(path)
    config = transformers_config(check_model_name(path))
    kwargs = {"config": config} if config is not None else {}
    if attention != "auto":
        model = from_pretrained(AutoModelForImageTextToText, path, dtype=dtype, attn_implementation=attention, **kwargs)
    else:
        model = from_pretrained(AutoModelForImageTextToText, path, dtype=dtype, **kwargs)
        if family_of(model.config).grouped_vision_attention:
            use_grouped_vision_attention(model)
    # on a GPU only, for now: sharing changes the rounding, and the CPU demo's GRPO run (tests/test_demo.py)
    # is sensitive to rounding - with sharing its exact run stalled at 3 of 4 colours (0.73) where the same
    # run without reached 1.0, with equal gradient norms to 1e-7 for steps 1-4 (see README, "Each distinct
    # image encoded once"). The CPU tests switch it on explicitly.
    if torch.cuda.is_available():
        share_repeated_images(model)
    linear = family_of(model.config).linear_attention
    if linear is not None:  # hybrid models: packed rows must not carry a recurrent state across sequences
        split_linear_attention_at_sequences(model, linear)
    return model


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

    # transformers 5.25 sets a context variable (its collector of hidden states and attentions) inside each block's
    # forward; under activation checkpointing dynamo refuses to trace a forward whose side effect the recompute
    # would not replay, and the blocks stayed eager. vlrl never asks for those outputs: nothing to replay.
    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):  # (a newer torch's setting)
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    # Linear-attention blocks (Qwen3.5's gated DeltaNet) stay eager: their PyTorch path loops over chunks of
    # the sequence and the packed-row split reads sequence starts from the data, so every new length compiled
    # afresh (a tiny Qwen3.5 on the CPU: 26-47 s per length, never reusing a graph, where Qwen2.5-VL's blocks
    # reuse theirs from the third length on); on the GPU a GRPO step never got past its compiles.
    linear = family_of(model.config).linear_attention
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)
              and (linear is None or getattr(m, linear, None) is None)]
    for b in blocks:
        b.compile(backend=backend, dynamic=None)
    return len(blocks)


def save_model(model, out, state_dict: dict | None = None) -> None:
    """`save_pretrained`, with the weights vLLM loads that transformers' model has none of. Gemma 4's last
    `num_kv_shared_layers` layers reuse an earlier layer's keys and values, so transformers builds no k_norm for
    them; vLLM builds every layer alike and refuses a checkpoint without one ("weights were not initialized").
    The released checkpoints carry them and neither model uses them: the norm's scale is written as ones, at
    the layer's head size (its q_norm's), so an exported fine-tune or a random real-size model serves on vLLM."""
    state = dict(state_dict if state_dict is not None else model.state_dict())
    state.update(kv_shared_key_norms(model.config, state))
    model.save_pretrained(str(out), state_dict=state)


def kv_shared_key_norms(config, state: dict) -> dict:
    """name -> ones for the k_norm of each KV-shared language-model layer that `state` lacks (save_model)."""
    import re

    text = getattr(config, "text_config", config)
    shared = getattr(text, "num_kv_shared_layers", 0) or 0
    if not shared:
        return {}
    first = text.num_hidden_layers - shared
    extra = {}
    for name, q_norm in state.items():
        m = re.fullmatch(r"(.*language_model\.layers\.)(\d+)(\.self_attn\.)q_norm\.weight", name)
        if m and int(m.group(2)) >= first:
            k_name = f"{m.group(1)}{m.group(2)}{m.group(3)}k_norm.weight"
            if k_name not in state:
                extra[k_name] = torch.ones_like(q_norm, device="cpu")
    return extra
