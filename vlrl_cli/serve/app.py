"""The HTTP side of `vlrl serve`: Tinker's REST routes (as SDK 0.38 calls them) over `Service` and `Jobs`.

Long calls answer `{"request_id"}` at once and run as jobs; the client polls `retrieve_future`, which
holds the poll open up to POLL_HOLD_S before saying "try again". Every request needs the API key
(`X-API-Key`, compared in constant time); bodies are size-limited; a malformed request, an unknown model
or loss is a Tinker user error, and the server keeps serving everyone else.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import secrets

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import wire
from .jobs import Jobs
from .service import MAX_SAMPLES, Service, UserError

PROTO = "application/x-protobuf"
POLL_HOLD_S = 20.0  # the SDK's poll times out at 45 s client-side
MAX_BODY = 256 * 1024 * 1024
MAX_LORA_RANK = 1024  # beyond any adapter in use; a typo's rank would allocate the whole machine
SESSION_RE = re.compile(r"^s-[0-9a-f]{16}$")  # what create_session issues  # one forward_backward chunk is at most ~5 MB by the SDK's own limit


def user_error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message, "category": "user"}, status_code=status)


def parts(request) -> tuple[Service, Jobs]:
    """The service and its job queue, which every route reads from the app's state."""
    state = request.app.state
    return state.service, state.jobs


def future(jobs: Jobs, fn, scope=None, seq=None, ordered=True, **extra) -> JSONResponse:
    return JSONResponse({"request_id": jobs.submit(fn, scope, seq, ordered), **extra})


def as_json(fn):
    return lambda: ("application/json", json.dumps(wire.finite_json(fn())).encode())


async def body_json(request: Request) -> dict:
    raw = await read_body(request)
    try:
        data = json.loads(raw or b"{}")
    except ValueError:
        raise UserError("request body is not JSON") from None
    if not isinstance(data, dict):
        raise UserError("request body must be a JSON object")
    return data


async def read_body(request: Request) -> bytes:
    size = int(request.headers.get("content-length") or 0)
    if size > MAX_BODY:
        raise UserError(f"request body of {size} bytes is over the limit of {MAX_BODY}")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > MAX_BODY:
            raise UserError(f"request body is over the limit of {MAX_BODY} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if request.headers.get("content-encoding") == "zstd":
        raw = bounded_zstd(raw, MAX_BODY)
    return raw


def bounded_zstd(raw: bytes, limit: int) -> bytes:
    """A zstd body decompressed to at most `limit` bytes, whatever size its frame header declares (a declared
    size makes zstandard's one-shot decompress allocate it and ignore max_output_size)."""
    import io

    import zstandard

    try:
        declared = zstandard.frame_content_size(raw)
        if declared > limit:
            raise UserError(f"request body decompresses to {declared} bytes, over the limit of {limit}")
        out = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read(limit + 1)
    except zstandard.ZstdError as e:
        raise UserError(f"request body is not valid zstd: {e}") from None
    if len(out) > limit:
        raise UserError(f"request body decompresses to more than the limit of {limit} bytes")
    return out


def model_id_of(service: Service, data: dict) -> str:
    mid = data.get("model_id")
    if not isinstance(mid, str):
        raise UserError("model_id is missing")
    service.model(mid)  # unknown: a user error now, not a failed future later
    return mid


def session_of(service: Service, data: dict, what: str) -> str:
    """A client's session id: one this server issued (create_session), never a path or anything else."""
    sid = data.get("session_id")
    if not isinstance(sid, str) or not SESSION_RE.match(sid) or not service.store.has_session(sid):
        raise UserError(f"{what}: unknown session_id {str(sid)[:80]!r} (create a session first)")
    return sid


def seq_of(data: dict) -> int | None:
    seq = data.get("seq_id")
    if seq is not None and (not isinstance(seq, int) or seq < 1):
        raise UserError(f"seq_id must be an integer >= 1, got {seq!r}")
    return seq


# ---- session and client setup --------------------------------------------------------------------


async def client_config(request):
    return JSONResponse({"pjwt_auth_enabled": False, "use_pyqwest_transport": False,
                         "sample_use_retrieve_futures": False, "proto_compress_fwdbwd": False,
                         "custom_loss_server_side": False, "sample_join_sampling_session": False})


async def healthz(request):
    return JSONResponse({"status": "ok"})


async def telemetry(request):
    """The SDK reports its own telemetry here unless TINKER_TELEMETRY=0; a server of one's own keeps none,
    and a 404 would print a traceback in every client."""
    await read_body(request)  # bounded like any other body
    return JSONResponse({"status": "accepted"})


async def capabilities(request):
    service = parts(request)[0]
    return JSONResponse({"supported_models": [{"model_name": n, "trainable": True, "sampleable": True}
                                              for n in sorted(service.names)]})


async def create_session(request):
    service = parts(request)[0]
    await body_json(request)
    sid = f"s-{secrets.token_hex(8)}"
    service.store.put_session(sid)
    return JSONResponse({"type": "create_session", "session_id": sid})


async def heartbeat(request):
    return JSONResponse({"type": "session_heartbeat"})


async def finish_session(request):
    service = parts(request)[0]
    sid = request.path_params["session_id"]
    if not service.store.finish_session(sid):
        return user_error(f"unknown session {sid!r}", 404)
    return JSONResponse({})


# ---- models --------------------------------------------------------------------------------------


async def create_model(request):
    service, jobs = parts(request)
    data = await body_json(request)
    session_id, seq = session_of(service, data, "create_model"), data.get("model_seq_id")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise UserError("create_model needs an integer model_seq_id")
    service.check_base_model(data.get("base_model"))
    lora = data.get("lora_config") or {}
    if not isinstance(lora, dict):
        raise UserError("lora_config must be an object")
    rank = wire.number(lora, "rank", 0, 0, MAX_LORA_RANK, integer=True, where="lora_config")
    mid = f"{session_id}:train:{seq}"  # the SDK derives this id itself (load_weights path)

    def run():
        service.create_model(session_id, data["base_model"], rank, lora.get("seed"), model_id=mid,
                             train_attn=bool(lora.get("train_attn", True)), train_mlp=bool(lora.get("train_mlp", True)))
        return {"model_id": mid, "type": "create_model"}

    return future(jobs, as_json(run), scope=f"create:{session_id}", seq=seq, ordered=False, model_id=mid)


async def get_info(request):
    service = parts(request)[0]
    data = await body_json(request)
    return JSONResponse(service.info(model_id_of(service, data)))


async def unload_model(request):
    service, jobs = parts(request)
    data = await body_json(request)
    mid = model_id_of(service, data)
    return future(jobs, as_json(lambda: (service.unload(mid), {"model_id": mid, "type": "unload_model"})[1]))


async def training_run(request):
    service = parts(request)[0]
    mid = request.path_params["model_id"]
    row = service.store.get_model(mid)
    if row is None:
        return user_error(f"unknown training run {mid!r}", 404)
    ckpts = service.store.checkpoints(mid)

    def last(kind):
        c = [x for x in ckpts if x["kind"] == kind]
        return checkpoint_json(c[-1]) if c else None

    import datetime

    return JSONResponse({"training_run_id": mid, "base_model": row["base_model"], "model_owner": "vlrl",
                         "is_lora": row["lora_rank"] > 0, "lora_rank": row["lora_rank"] or None,
                         "last_request_time": datetime.datetime.fromtimestamp(row["created"]).isoformat(),
                         "last_checkpoint": last("weights"), "last_sampler_checkpoint": last("sampler_weights")})


def checkpoint_json(c: dict) -> dict:
    import datetime

    kind = "training" if c["kind"] == "weights" else "sampler"
    return {"checkpoint_id": c["path"].rsplit("/", 2)[-2] + "/" + c["path"].rsplit("/", 1)[-1],
            "checkpoint_type": kind, "time": datetime.datetime.fromtimestamp(c["created"]).isoformat(),
            "tinker_path": c["path"], "size_bytes": None, "public": False}


# ---- training ------------------------------------------------------------------------------------


async def forward_backward(request):
    service, jobs = parts(request)
    raw = await read_body(request)
    if PROTO in request.headers.get("content-type", ""):
        req = wire.fwdbwd_request(raw)
    else:
        raise UserError("forward_backward takes a protobuf body (application/x-protobuf), as SDK >= 0.25 sends")
    service.model(req["model_id"])

    def run():
        return PROTO, service.forward_backward(req["model_id"], req["loss_fn"], req["config"], req["data"],
                                               req["forward_only"])

    return future(jobs, run, scope=req["model_id"], seq=req["seq_id"] or None)


async def optim_step(request):
    service, jobs = parts(request)
    data = await body_json(request)
    mid = model_id_of(service, data)
    adam = data.get("adam_params", data.get("optim_params"))
    if not isinstance(adam, dict):
        raise UserError("optim_step needs adam_params (other optimizers are not supported)")
    return future(jobs, as_json(lambda: service.optim_step(mid, adam)), scope=mid, seq=seq_of(data))


async def save_weights(request):
    service, jobs = parts(request)
    data = await body_json(request)
    mid = model_id_of(service, data)
    name = data.get("path")
    return future(jobs, as_json(lambda: {"path": service.save_state(mid, name), "type": "save_weights"}),
                  scope=mid, seq=seq_of(data))


async def save_for_sampler(request):
    service, jobs = parts(request)
    data = await body_json(request)
    mid = model_id_of(service, data)
    name = data.get("path")

    def run():
        path = service.save_for_sampler(mid, name)
        out = {"path": path, "type": "save_weights_for_sampler"}
        if name is None:  # a snapshot: the client samples from it through a sampling session
            sampler = f"{service.store.get_model(mid)['session_id']}:sample:{data.get('sampling_session_seq_id')}"
            service.store.put_sampler(sampler, service.store.get_model(mid)["session_id"], None, path)
            out["sampling_session_id"] = sampler
        return out

    return future(jobs, as_json(run), scope=mid, seq=seq_of(data))


async def load_weights(request):
    service, jobs = parts(request)
    data = await body_json(request)
    path = data.get("path")
    if not isinstance(path, str):
        raise UserError("load_weights needs a path")
    service.parse_path(path)  # unknown or malformed: a user error now
    optimizer = bool(data.get("optimizer"))
    if data.get("model_id") is not None:
        mid = model_id_of(service, data)
        seq, scope, session = seq_of(data), mid, None
    else:
        session, mseq = session_of(service, data, "load_weights"), data.get("model_seq_id")
        if not isinstance(mseq, int) or isinstance(mseq, bool) or mseq < 0:
            raise UserError("load_weights needs model_id, or session_id and an integer model_seq_id")
        mid = f"{session}:train:{mseq}"
        scope, seq = f"create:{session}", mseq
    ordered = data.get("model_id") is not None

    def run():
        service.load_state(path, mid if data.get("model_id") is not None else None, session, optimizer,
                           new_model_id=None if data.get("model_id") is not None else mid)
        return {"path": path, "model_id": mid, "type": "load_weights"}

    return future(jobs, as_json(run), scope=scope, seq=seq, ordered=ordered, model_id=mid)


# ---- sampling ------------------------------------------------------------------------------------


async def create_sampling_session(request):
    service = parts(request)[0]
    data = await body_json(request)
    session, seq = session_of(service, data, "create_sampling_session"), data.get("sampling_session_seq_id")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise UserError("create_sampling_session needs an integer sampling_session_seq_id")
    path = data.get("model_path")
    if path is not None:
        service.parse_path(path)
    else:
        service.check_base_model(data.get("base_model"))
    sid = f"{session}:sample:{seq}"
    service.store.put_sampler(sid, session, data.get("base_model"), path)
    return JSONResponse({"type": "create_sampling_session", "sampling_session_id": sid})


async def get_sampler(request):
    service = parts(request)[0]
    sid = request.path_params["sampler_id"]
    row = service.store.get_sampler(sid)
    if row is None:
        return user_error(f"unknown sampler {sid!r}", 404)
    base = row["base_model"] or service.model_path
    if row["model_path"]:
        ck = service.store.get_checkpoint(row["model_path"])
        base = (ck or {}).get("meta", {}).get("base_model", base)
    return JSONResponse({"sampler_id": sid, "base_model": base, "model_path": row["model_path"]})


async def asample(request):
    service, jobs = parts(request)
    data = await body_json(request)
    path = data.get("model_path")
    sid = data.get("sampling_session_id")
    if sid is not None:
        row = service.store.get_sampler(sid)
        if row is None:
            raise UserError(f"unknown sampling_session_id {sid!r}")
        path = row["model_path"]
    elif path is not None:
        service.parse_path(path)
    else:
        service.check_base_model(data.get("base_model"))
    chunks = wire.chunks_from_json(data.get("prompt"))
    params = data.get("sampling_params") or {}
    n = wire.number(data, "num_samples", 1, 1, MAX_SAMPLES, integer=True)
    wire.sampling_params(params)  # checked here too: a bad field is answered now, not as a failed future
    ids = [f"seq-{secrets.token_hex(8)}" for _ in range(n)]
    record = bool(data.get("record_stability_info"))

    def run():
        return PROTO, service.sample(path, chunks, params, n, bool(data.get("prompt_logprobs")), ids, record)

    seq = data.get("seq_id") if sid is not None else None  # a retried sample is answered once
    return future(jobs, run, scope=f"sample:{sid}" if seq is not None else None, seq=seq, ordered=False,
                  sample_sequence_ids=ids)


# ---- futures -------------------------------------------------------------------------------------


async def retrieve_future(request):
    jobs = parts(request)[1]
    data = await body_json(request)
    rid = data.get("request_id")
    if not isinstance(rid, str):
        raise UserError("retrieve_future needs request_id")
    try:
        result = await asyncio.to_thread(jobs.wait, rid, request.app.state.poll_hold_s)
    except KeyError:
        return user_error(f"unknown request_id {rid!r}", 404)
    if result is None:
        return JSONResponse({"type": "try_again", "request_id": rid, "queue_state": "active"})
    status, ctype, body = result
    if status != "ok":
        return JSONResponse({"error": body.decode(errors="replace"),
                             "category": "user" if status == "user_error" else "server"})
    return Response(body, media_type=ctype)


ROUTES = [
    Route("/api/v1/client/config", client_config, methods=["POST", "GET"]),
    Route("/api/v1/healthz", healthz, methods=["POST", "GET"]),
    Route("/api/v1/telemetry", telemetry, methods=["POST"]),
    Route("/api/v1/get_server_capabilities", capabilities, methods=["POST", "GET"]),
    Route("/api/v1/create_session", create_session, methods=["POST"]),
    Route("/api/v1/session_heartbeat", heartbeat, methods=["POST"]),
    Route("/api/v1/sessions/{session_id}/finish", finish_session, methods=["POST"]),
    Route("/api/v1/create_model", create_model, methods=["POST"]),
    Route("/api/v1/get_info", get_info, methods=["POST"]),
    Route("/api/v1/unload_model", unload_model, methods=["POST"]),
    Route("/api/v1/training_runs/{model_id:path}", training_run, methods=["GET"]),
    Route("/api/v1/forward_backward", forward_backward, methods=["POST"]),
    Route("/api/v1/optim_step", optim_step, methods=["POST"]),
    Route("/api/v1/save_weights", save_weights, methods=["POST"]),
    Route("/api/v1/save_weights_for_sampler", save_for_sampler, methods=["POST"]),
    Route("/api/v1/load_weights", load_weights, methods=["POST"]),
    Route("/api/v1/create_sampling_session", create_sampling_session, methods=["POST"]),
    Route("/api/v1/samplers/{sampler_id:path}", get_sampler, methods=["GET"]),
    Route("/api/v1/asample", asample, methods=["POST"]),
    Route("/api/v1/retrieve_future", retrieve_future, methods=["POST"]),
]


class RequireKey:
    """Every request needs the API key (X-API-Key), compared in constant time."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"x-api-key", b"")
            if not hmac.compare_digest(given, self.expected):
                response = JSONResponse({"error": "missing or wrong API key (X-API-Key)", "category": "user"},
                                        status_code=401)
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


async def on_user_error(request, exc):
    return user_error(str(exc))


def make_app(service: Service, api_key: str, log=print, poll_hold_s: float = POLL_HOLD_S):
    """The ASGI app: the routes above over one service and its job queue, behind the API key."""
    app = Starlette(routes=ROUTES, exception_handlers={UserError: on_user_error})
    app.state.service, app.state.jobs, app.state.poll_hold_s = service, Jobs(service.store, log=log), poll_hold_s
    guarded = RequireKey(app, api_key)
    guarded.jobs = app.state.jobs
    return guarded
