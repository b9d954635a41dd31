"""Packed rows through hybrid models: linear-attention layers run once per sequence.

A linear-attention layer (Qwen3.5's gated DeltaNet) carries a recurrent state and a short causal convolution
along the row. In a packed row (several sequences end to end, text positions restarting at 0) both would carry
the end of one sequence into the start of the next; the attention mask that keeps softmax attention within a
sequence does not reach them, and transformers' PyTorch path ignores the boundaries it is given. So each
decoder layer that holds linear attention runs its forward on each sequence's slice of the row and joins the
results: exact, since everything else in the layer (norms, MLP) works token by token.

The split is a replaced `forward` on the layer (bound to it, so a deep copy of the model - a KL reference -
gets its own), below transformers' activation checkpointing, so a recompute splits the same way.
"""

from __future__ import annotations

import types

import torch


def sequence_starts(position_ids: torch.Tensor | None, length: int) -> list[int] | None:
    """Where each sequence of a packed row starts ([0, s1, s2, ...]), from text positions [1, T] that restart
    at 0; None for anything else (a padded batch, one sequence, cached generation)."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1 or position_ids.shape[1] != length:
        return None
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    return starts if len(starts) > 1 and starts[0] == 0 else None


def _per_sequence_forward(self, hidden_states, *args, position_ids=None, cache=None, **kwargs):
    starts = sequence_starts(position_ids, hidden_states.shape[1]) if cache is None else None
    if starts is None:
        return type(self).forward(self, hidden_states, *args, position_ids=position_ids, cache=cache, **kwargs)
    ends = starts[1:] + [hidden_states.shape[1]]
    # linear-attention layers take no positions and build no mask from them; the recurrent-state mask is for
    # padding (there is none in a packed row)
    kwargs.pop("attention_mask", None)
    parts = [type(self).forward(self, hidden_states[:, a:b], *args, position_ids=position_ids[:, a:b], cache=None,
                                attention_mask=None, **kwargs) for a, b in zip(starts, ends)]
    return torch.cat(parts, dim=1)


def split_linear_attention_at_sequences(model, attribute: str) -> int:
    """Make every decoder layer with a linear-attention block (`attribute`, the family's declaration) run per
    sequence in packed rows. Returns how many layers."""
    layers = [m for m in model.modules() if getattr(m, attribute, None) is not None and hasattr(m, "mlp")]
    for layer in layers:
        layer.forward = types.MethodType(_per_sequence_forward, layer)
    return len(layers)


def check_linear_attention_kernels() -> None:
    """Refuse at start-up what would fail at the first backward. Where flash-linear-attention is installed,
    transformers runs the gated DeltaNet with its Triton kernels; on a Hopper GPU with Triton >= 3.4 and
    < 3.7.1 (torch 2.11 ships 3.6) those kernels compute wrong gradients, and flash-linear-attention raises in
    the backward unless tilelang is there to take over: a crash minutes in, after the engine started and the
    first rollouts ran. Without flash-linear-attention transformers' PyTorch path trains, slower and exact."""
    import importlib.util
    import re

    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        return
    if importlib.util.find_spec("fla") is None or importlib.util.find_spec("tilelang") is not None:
        return
    import triton

    from ..errors import UserError

    version = tuple(int(x) for x in re.findall(r"\d+", triton.__version__)[:3])
    if (3, 4, 0) <= version < (3, 7, 1):
        raise UserError(f"linear attention would train with flash-linear-attention on Triton {triton.__version__} on "
                        "this Hopper GPU, whose backward it refuses (wrong gradients below Triton 3.7.1): "
                        "`pip install tilelang`, or `pip uninstall flash-linear-attention fla-core` to train with "
                        "transformers' PyTorch path (slower), or a Triton >= 3.7.1")
