"""The Tinker wire format <-> plain Python: model inputs, tensors, and the two protobuf results.

The message definitions are the official SDK's (`tinker.proto`, generated from its .proto file), so the
server and every client read the same schema. Everything here is pure conversion: no model, no state.
A malformed message is a `WireError` (a Tinker user error: the client sent it, the server keeps going).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np

from ..errors import UserError


class WireError(UserError):
    """The client's fault (a Tinker 'user' error): a malformed message, an unknown model, a bad input or loss.
    The server answers it and keeps going."""


def number(obj: dict, key: str, default, lo: float, hi: float, integer: bool = False, where: str = ""):
    """A number a client sent: the right kind (bool is not a number; an integer where one is meant), finite,
    within [lo, hi], or a WireError naming the field. `default` when the key is absent or null."""
    value = obj.get(key)
    if value is None:
        return default
    name = f"{where}.{key}" if where else key
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise WireError(f"{name} must be {'an integer' if integer else 'a number'}, got {str(value)[:40]!r}")
    if not (lo <= value <= hi):  # NaN fails this too
        raise WireError(f"{name} must be in {lo}..{hi}, got {str(value)[:40]}")
    return value


def sampling_params(params) -> dict:
    """SamplingParams as the client sent them, checked: each field the right kind and range, or a WireError
    naming it (a negative temperature or a seed over 64 bits is the client's mistake, not the server's)."""
    if not isinstance(params, dict):
        raise WireError("sampling_params must be an object")
    w = "sampling_params"
    stop = params.get("stop")
    if stop is not None and not isinstance(stop, (str, list)) or isinstance(stop, list) and not all(
            isinstance(t, str) or isinstance(t, int) and not isinstance(t, bool) for t in stop):
        raise WireError(f"{w}.stop must be a string or a list of strings and token ids")
    return {"max_tokens": number(params, "max_tokens", 16, 1, 1 << 20, integer=True, where=w),
            "temperature": float(number(params, "temperature", 1.0, 0.0, 1e4, where=w)),
            "top_p": float(number(params, "top_p", 1.0, 1e-9, 1.0, where=w)),
            "top_k": number(params, "top_k", -1, -1, 1 << 31, integer=True, where=w),
            "seed": number(params, "seed", None, 0, (1 << 63) - 1, integer=True, where=w),
            "stop": stop}


def finite_json(obj):
    """A result for json.dumps as strict JSON: NaN and inf (a metric of a diverged step) become null."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


@dataclass
class TextChunk:
    tokens: list[int]


@dataclass
class ImageChunk:
    data: bytes  # the encoded image (JPEG/PNG), decoded later by images.py's checked decoder
    format: str
    expected_tokens: int | None  # placeholder positions the client counted for it


Chunk = TextChunk | ImageChunk


@dataclass
class Datum:
    chunks: list[Chunk]
    inputs: dict[str, np.ndarray]  # loss_fn_inputs: target_tokens, weights, logprobs, advantages, ...
    sampled_ids: list[str]  # provenance: the sampled sequences this datum's tokens came from (stable_reinforce)


def pb():
    from tinker.proto import tinker_public_pb2

    return tinker_public_pb2


def chunk_length(chunk: Chunk) -> int:
    if isinstance(chunk, TextChunk):
        return len(chunk.tokens)
    if chunk.expected_tokens is None:
        raise WireError("an image chunk has no expected_tokens: the number of positions it stands for is needed")
    return chunk.expected_tokens


# ---- requests -------------------------------------------------------------------------------------------

def chunks_from_proto(chunks) -> list[Chunk]:
    out: list[Chunk] = []
    for c in chunks:
        kind = c.WhichOneof("chunk")
        if kind == "encoded_text":
            out.append(TextChunk(np.frombuffer(c.encoded_text.tokens, dtype=np.int32).astype(int).tolist()))
        elif kind == "image":
            im = c.image
            out.append(ImageChunk(bytes(im.data), im.format or "jpeg",
                                  im.expected_tokens if im.HasField("expected_tokens") else None))
        else:
            raise WireError(f"unsupported model_input chunk {kind!r} (text and image chunks are)")
    return out


def chunks_from_json(model_input: dict) -> list[Chunk]:
    if not isinstance(model_input, dict) or not isinstance(model_input.get("chunks"), list):
        raise WireError("prompt must be a ModelInput: {\"chunks\": [...]}")
    out: list[Chunk] = []
    for i, c in enumerate(model_input["chunks"]):
        kind = c.get("type") if isinstance(c, dict) else None
        if kind == "encoded_text":
            toks = c.get("tokens")
            if not isinstance(toks, list) or not all(isinstance(t, int) for t in toks):
                raise WireError(f"prompt chunk {i}: tokens must be a list of integers")
            out.append(TextChunk(toks))
        elif kind == "image":
            try:
                data = base64.b64decode(c["data"], validate=True)
            except Exception:
                raise WireError(f"prompt chunk {i}: image data is not base64") from None
            out.append(ImageChunk(data, c.get("format", "jpeg"), c.get("expected_tokens")))
        else:
            raise WireError(f"prompt chunk {i}: unsupported chunk type {kind!r} (encoded_text and image are)")
    return out


_NP = {1: np.float32, 2: np.int64, 3: np.int32}  # DType enum: FLOAT32, INT64, INT32 (bf16 below)


def tensor_from_proto(t) -> np.ndarray:
    """A Tensor message as a dense numpy array (sparse CSR densified)."""
    P = pb()
    if t.dtype == P.DTYPE_BFLOAT16:
        def read(b):
            return (np.frombuffer(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif t.dtype in _NP:
        def read(b):
            return np.frombuffer(b, dtype=_NP[t.dtype])
    else:
        raise WireError(f"unsupported tensor dtype {t.dtype}")
    shape = [int(s) for s in t.shape]
    if t.HasField("sparse_csr"):
        if len(shape) != 2:
            raise WireError("a sparse tensor must be 2-D")
        vals = read(t.sparse_csr.values)
        crow = np.frombuffer(t.sparse_csr.crow_indices, dtype=np.int64)
        col = np.frombuffer(t.sparse_csr.col_indices, dtype=np.int64)
        if len(crow) != shape[0] + 1 or len(col) != len(vals) or (len(col) and col.max() >= shape[1]):
            raise WireError("malformed sparse tensor")
        dense = np.zeros(shape, dtype=vals.dtype)
        for r in range(shape[0]):
            dense[r, col[crow[r]:crow[r + 1]]] = vals[crow[r]:crow[r + 1]]
        return dense
    arr = read(t.dense)
    if shape:
        if int(np.prod(shape)) != arr.size:
            raise WireError(f"tensor of shape {shape} has {arr.size} values")
        arr = arr.reshape(shape)
    return arr.copy()


def fwdbwd_request(body: bytes) -> dict:
    """A ForwardBackwardRequest (protobuf) as {model_id, seq_id, loss_fn, config, forward_only, data}."""
    msg = pb().ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except Exception as e:
        raise WireError(f"malformed ForwardBackwardRequest protobuf: {e}") from None
    config = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for k, v in msg.loss_fn_config_v2.items():  # v2 wins where both are set
        config[k] = v.text if v.WhichOneof("value") == "text" else float(v.number)
    data = []
    for i, d in enumerate(msg.data):
        try:
            chunks = chunks_from_proto(d.model_input)
            inputs = {k: tensor_from_proto(v) for k, v in d.loss_fn_inputs.items()}
        except WireError as e:
            raise WireError(f"datum {i}: {e}") from None
        sampled = [s.sampled_tokens.sequence_id for s in d.loss_fn_input_spans if s.HasField("sampled_tokens")]
        data.append(Datum(chunks, inputs, sampled))
    return {"model_id": msg.model_id, "seq_id": int(msg.seq_id), "loss_fn": msg.loss_fn, "config": config,
            "forward_only": bool(msg.forward_only), "data": data}


# ---- results --------------------------------------------------------------------------------------------

def _batched(arrays: list[np.ndarray], dtype) -> object:
    P = pb()
    proto_dtype = P.DTYPE_FLOAT32 if dtype == np.float32 else P.DTYPE_INT64
    parts = [np.ascontiguousarray(a, dtype=dtype).reshape(-1) for a in arrays]
    offsets = np.cumsum([0] + [p.nbytes for p in parts]).astype(np.int64)
    return P.BatchedTensor(data=b"".join(p.tobytes() for p in parts), offsets=offsets.tobytes(), dtype=proto_dtype)


def fwdbwd_output(outputs: list[dict[str, np.ndarray]], metrics: dict[str, float]) -> bytes:
    """ForwardBackwardOutput: one ArrayRecord holding every datum's output tensors (1-D each)."""
    P = pb()
    fields = {}
    if outputs:
        for name in outputs[0]:
            dtype = np.int64 if np.issubdtype(outputs[0][name].dtype, np.integer) else np.float32
            fields[name] = _batched([o[name] for o in outputs], dtype)
    record = P.ArrayRecord(type_tag="ArrayRecord", fields=fields, num_datums=len(outputs))
    return P.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", loss_fn_outputs=[record],
                                   metrics={k: float(v) for k, v in metrics.items()}).SerializeToString()


def sample_output(sequences: list[tuple[list[int], list[float], str]], prompt_logprobs: list[float] | None) -> bytes:
    """SampleResponse: (tokens, logprobs, stop_reason "stop"|"length") per sample, optional prompt log-probs."""
    P = pb()
    seqs = [P.SampledSequence(stop_reason=P.STOP_REASON_STOP if reason == "stop" else P.STOP_REASON_LENGTH,
                              tokens=np.asarray(toks, dtype=np.int32).tobytes(),
                              logprobs=np.asarray(lps, dtype=np.float32).tobytes())
            for toks, lps, reason in sequences]
    msg = P.SampleResponse(sequences=seqs)
    if prompt_logprobs is not None:
        msg.prompt_logprobs = np.asarray(prompt_logprobs, dtype=np.float32).tobytes()
    return msg.SerializeToString()
