"""`vlrl serve`: the Tinker wire format, the losses, the service on every family, ordering and retries, and
the real `tinker` SDK (0.38) against a live server: training, sampling, checkpoints, a restart, bad input.
The unmodified tinker-cookbook recipes run in tests/test_serve_cookbook.py."""

import io
import math
import socket
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from vlrl_cli.serve import losses, wire

pytestmark = pytest.mark.model
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "gemma4")
KEY = "tml-test-key-0123"


def jpeg(w=64, h=96, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="JPEG")
    return buf.getvalue()


def expected_tokens(processor, data: bytes) -> int:
    """What a Tinker client computes for an image chunk (the cookbook's image_to_chunk; for Gemma 4, its image
    processor's own resize to the token budget)."""
    ip = processor.image_processor
    w, h = Image.open(io.BytesIO(data)).size
    if hasattr(ip, "max_soft_tokens"):
        from transformers.models.gemma4.image_processing_gemma4 import get_aspect_ratio_preserving_size

        k = ip.pooling_kernel_size
        th, tw = get_aspect_ratio_preserving_size(height=h, width=w, patch_size=ip.patch_size,
                                                  max_patches=ip.max_soft_tokens * k * k, pooling_kernel_size=k)
        return (th // (ip.patch_size * k)) * (tw // (ip.patch_size * k))
    return ip.get_number_of_image_patches(h, w, {}) // ip.merge_size ** 2


def image_prompt(processor, data: bytes, question: str = "what colour is it?") -> list:
    """A user turn with the image, then the assistant's, in the model's chat format (Qwen's or Gemma 4's)."""
    tok = processor.tokenizer
    if tok.convert_tokens_to_ids("<|turn>") != tok.unk_token_id and "<|turn>" in tok.get_vocab():
        start, end = "<|turn>user\n<|image>", f"<image|>{question}<turn|>\n<|turn>model\n"
    else:
        start, end = "<|im_start|>user\n<|vision_start|>", f"<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
    before, after = tok.encode(start, add_special_tokens=False), tok.encode(end, add_special_tokens=False)
    return [wire.TextChunk(before), wire.ImageChunk(data, "jpeg", expected_tokens(processor, data)), wire.TextChunk(after)]


def sft_datum(processor, data: bytes, answer: str) -> wire.Datum:
    """Tinker's layout: model input = full[:-1], targets = full[1:], weights on the answer only."""
    chunks = image_prompt(processor, data)
    ans = processor.tokenizer.encode(answer, add_special_tokens=False) + [processor.tokenizer.eos_token_id]
    n_prompt = sum(wire.chunk_length(c) for c in chunks)
    last = chunks[-1].tokens + ans
    chunks = chunks[:-1] + [wire.TextChunk(last[:-1])]
    n = n_prompt + len(ans) - 1
    full_tail = ans  # targets: the prompt shifted by one (0 at image positions, never trained), then the answer
    targets = np.zeros(n, dtype=np.int64)
    targets[n - len(full_tail):] = full_tail
    weights = np.zeros(n, dtype=np.float32)
    weights[n - len(full_tail):] = 1.0
    return wire.Datum(chunks, {"target_tokens": targets, "weights": weights}, [])


# ---- wire format: the SDK's own converters on the other side --------------------------------------------

def test_forward_backward_request_and_results_round_trip_through_the_sdks_converters():
    import tinker
    from tinker import types
    from tinker.proto import request_conv, response_conv

    img = jpeg()
    sparse = types.TensorData(data=[1.5, -2.0], dtype="float32", shape=[2, 3], sparse_crow_indices=[0, 1, 2],
                              sparse_col_indices=[2, 0])
    datum = types.Datum(
        model_input=types.ModelInput(chunks=[types.EncodedTextChunk(tokens=[5, 6, 7]),
                                             types.ImageChunk(data=img, format="jpeg", expected_tokens=6)]),
        loss_fn_inputs={"target_tokens": types.TensorData(data=[1, 2, 3, 0, 0, 0, 0, 0, 0], dtype="int64", shape=[9]),
                        "weights": types.TensorData(data=[0.0] * 8 + [1.0], dtype="float32", shape=[9]),
                        "mask2d": sparse})
    req = types.ForwardBackwardRequest(forward_backward_input=types.ForwardBackwardInput(
        data=[datum], loss_fn="ppo", loss_fn_config={"clip_low_threshold": 0.7}), model_id="m1", seq_id=4)
    body = request_conv.forward_backward_request_to_proto(req).SerializeToString()
    got = wire.fwdbwd_request(body)
    assert (got["model_id"], got["seq_id"], got["loss_fn"]) == ("m1", 4, "ppo")
    assert got["config"] == {"clip_low_threshold": pytest.approx(0.7)}
    d = got["data"][0]
    assert d.chunks[0].tokens == [5, 6, 7] and d.chunks[1].data == img and d.chunks[1].expected_tokens == 6
    assert d.inputs["target_tokens"].tolist() == [1, 2, 3, 0, 0, 0, 0, 0, 0]
    assert d.inputs["mask2d"].tolist() == [[0, 0, 1.5], [-2.0, 0, 0]]

    out = response_conv.deserialize_forward_backward_output(wire.fwdbwd_output(
        [{"logprobs": np.array([-1.0, -2.0], np.float32)}, {"logprobs": np.array([-3.0], np.float32)}],
        {"loss:sum": 4.5}))
    assert out.metrics == {"loss:sum": 4.5}
    assert [o["logprobs"].tolist() for o in out.loss_fn_outputs] == [[-1.0, -2.0], [-3.0]]
    s = response_conv.deserialize_sample_response(wire.sample_output([([3, 4], [-0.5, -0.25], "stop"),
                                                                       ([9], [-1.0], "length")], [math.nan, -2.0]))
    assert [q.tokens for q in s.sequences] == [[3, 4], [9]] and [q.stop_reason for q in s.sequences] == ["stop", "length"]
    assert s.sequences[0].logprobs == [-0.5, -0.25] and s.prompt_logprobs[1] == -2.0
    assert tinker.__version__ == "0.38.0"


def test_malformed_protobuf_and_chunks_are_wire_errors():
    with pytest.raises(wire.WireError, match="malformed"):
        wire.fwdbwd_request(b"\xff\xff\xff\x07garbage")
    with pytest.raises(wire.WireError, match="base64"):
        wire.chunks_from_json({"chunks": [{"type": "image", "data": "not base64!!", "format": "jpeg"}]})
    with pytest.raises(wire.WireError, match="unsupported chunk type"):
        wire.chunks_from_json({"chunks": [{"type": "audio"}]})


# ---- losses ------------------------------------------------------------------------------------------

def test_each_loss_is_its_definition_with_the_right_gradient():
    logp = torch.tensor([-1.0, -0.5, -2.0], requires_grad=True)
    q = torch.tensor([0.0, -0.7, -1.5])
    adv = torch.tensor([0.0, 2.0, -1.0])  # position 0 is prompt (advantage 0)
    r = torch.exp(torch.tensor([0.0, 0.2, -0.5]))

    def val_grad(name, config=None, inputs=None):
        logp.grad = None
        loss = losses.datum_loss(name, logp, inputs or {"logprobs": q, "advantages": adv}, config or {})
        loss.backward()
        return loss.item(), logp.grad.clone()

    v, g = val_grad("cross_entropy", inputs={"weights": torch.tensor([0.0, 1.0, 1.0])})
    assert v == pytest.approx(2.5) and g.tolist() == [0.0, -1.0, -1.0]
    v, g = val_grad("importance_sampling")
    assert v == pytest.approx(float(-(r[1] * 2.0 - r[2]))) and g[1] == pytest.approx(float(-2.0 * r[1]))
    # PPO takes the pessimistic side: r1 = 1.22 > 1.2 with A > 0 and r2 = 0.61 < 0.8 with A < 0 are both
    # clipped (no gradient); with r2 = 0.9 (inside the range) position 2 keeps its gradient
    v, g = val_grad("ppo")
    assert v == pytest.approx(-(1.2 * 2.0 - 0.8)) and g[1] == 0.0 and g[2] == 0.0
    v, g = val_grad("ppo", inputs={"logprobs": torch.tensor([0.0, -0.7, -2.0 - math.log(0.9)]), "advantages": adv})
    assert g[2] == pytest.approx(0.9)
    v, g = val_grad("cispo")  # the clipped ratio is a constant weight on logp
    assert g.tolist() == pytest.approx([0.0, -1.2 * 2.0, 0.8])
    v, g = val_grad("stable_reinforce", {"kl_coeff": 0.0})
    assert g.tolist() == pytest.approx([0.0, float(-r[1] * 2.0), float(r[2])])
    with pytest.raises(wire.WireError, match="unknown loss_fn 'dpo'.*cross_entropy"):
        losses.check_request("dpo", {}, [], lambda i: 0)
    with pytest.raises(wire.WireError, match=r"needs loss_fn_inputs\['advantages'\]"):
        losses.check_request("ppo", {}, [{"target_tokens": np.zeros(3), "logprobs": np.zeros(3)}], lambda i: 3)
    with pytest.raises(wire.WireError, match="shape \\[2\\], the model input has 3"):
        losses.check_request("cross_entropy", {}, [{"target_tokens": np.zeros(3), "weights": np.zeros(2)}], lambda i: 3)
    with pytest.raises(wire.WireError, match="unknown key"):
        losses.check_request("ppo", {"clip_ratio": 0.1}, [], lambda i: 0)


# ---- jobs: order and retries ---------------------------------------------------------------------------

class _NoStore:
    def put_result(self, *a):
        pass

    def get_result(self, rid):
        return None


def test_jobs_run_in_seq_order_answer_retries_once_skip_a_gap_and_refuse_a_late_request():
    from vlrl_cli.serve.jobs import Jobs

    jobs = Jobs(_NoStore(), gap_timeout_s=0.5, log=lambda m: None)
    ran = []
    gate = threading.Event()

    def job(tag):
        def fn():
            gate.wait(5)
            ran.append(tag)
            return "text/plain", tag.encode()
        return fn

    ids = {s: jobs.submit(job(f"m{s}"), "m", s) for s in (3, 2)}
    assert jobs.submit(job("again"), "m", 2) == ids[2]  # a retry: the same future
    ids[1] = jobs.submit(job("m1"), "m", 1)
    gate.set()
    assert jobs.wait(ids[3], 5)[2] == b"m3"
    assert ran == ["m1", "m2", "m3"]
    gap = jobs.submit(job("m5"), "m", 5)  # seq 4 never comes
    assert jobs.wait(gap, 0.1) is None  # held while it might
    assert jobs.wait(gap, 5)[2] == b"m5"
    late = jobs.submit(job("m4"), "m", 4)  # it comes after all: refused, never applied out of order
    status, _, body = jobs.wait(late, 5)
    assert status == "user_error" and b"seq_id 4" in body and "m4" not in ran
    with pytest.raises(KeyError):
        jobs.wait("req-unknown", 0.1)
    jobs.stop()


# ---- the service on every family ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def services(family_models, tmp_path_factory):
    from vlrl_cli.serve.service import Service

    return {f: Service(str(p), tmp_path_factory.mktemp(f"state-{f}")) for f, p in family_models.items() if f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_image_chunks_train_and_sample_on_every_family(services, family):
    from tinker.proto import response_conv

    svc = services[family]
    mid = svc.create_model("s", svc.model_path, lora_rank=4, seed=1, model_id=f"s:train:{family}")
    data = [sft_datum(svc.processor, jpeg(colour=c), word) for c, word in (((200, 30, 30), "red"), ((30, 30, 200), "blue"))]
    first = response_conv.deserialize_forward_backward_output(svc.forward_backward(mid, "cross_entropy", {}, data, False))
    for _ in range(5):  # a rate every family descends at (5e-2 overshoots on Qwen3.5 and Gemma 4)
        svc.optim_step(mid, {"learning_rate": 5e-3})
        out = response_conv.deserialize_forward_backward_output(svc.forward_backward(mid, "cross_entropy", {}, data, False))
    n0, n1 = first.metrics["loss:sum"], out.metrics["loss:sum"]
    assert math.isfinite(n0) and n1 < 0.9 * n0, (n0, n1)
    # per-datum log-probs come back with one value per model-input position
    assert [len(o["logprobs"].tolist()) for o in out.loss_fn_outputs] == [len(d.inputs["weights"]) for d in data]

    path = svc.save_for_sampler(mid, "after")
    res = response_conv.deserialize_sample_response(
        svc.sample(path, image_prompt(svc.processor, jpeg()), {"max_tokens": 3, "temperature": 1.0, "seed": 3}, 2, False))
    assert len(res.sequences) == 2 and all(len(s.tokens) == len(s.logprobs) >= 1 for s in res.sequences)
    assert all(lp <= 0 for s in res.sequences for lp in s.logprobs)

    bad = image_prompt(svc.processor, jpeg())
    bad[1].expected_tokens += 1
    with pytest.raises(Exception, match=f"expected_tokens is {bad[1].expected_tokens} but the model's image processor "
                                        f"makes {bad[1].expected_tokens - 1}"):
        svc.sample(None, bad, {"max_tokens": 2}, 1, False)


@pytest.mark.parametrize("family", FAMILIES)
def test_compute_logprobs_equals_check_drifts_trainer_side(services, family_models, family):
    """The same ids and image through the service's prompt log-probs and check-drift's trainer scoring."""
    from tinker.proto import response_conv

    from vlrl_cli.tools import drift
    from vlrl_cli.model.render import render_chunks
    from vlrl_cli.rollout.episodes import Sequence
    from vlrl_cli.train.batches import score_sequences

    svc = services[family]
    chunks = image_prompt(svc.processor, jpeg(80, 48, (20, 160, 40)))
    res = response_conv.deserialize_sample_response(svc.sample(None, chunks, {"max_tokens": 1}, 1, True))
    served = np.array(res.prompt_logprobs[1:], dtype=np.float64)
    ids, tensors, _ = render_chunks(svc.processor, chunks)
    trainer = drift.load_trainer(str(family_models[family]), "float32", None)
    ref = score_sequences(trainer, [Sequence.untrained(ids, tensors)], svc.processor, 1.0, svc.banned, "cpu")[0][1:]
    assert len(served) == len(ref) == len(ids) - 1
    assert np.abs(served - ref).max() < 1e-5


def test_gradients_of_several_calls_add_up_until_the_step(services):
    """Two forward_backward calls of one datum each, then a step == one call of both, then a step."""
    svc = services["qwen2_5_vl"]
    data = [sft_datum(svc.processor, jpeg(colour=c), w) for c, w in (((200, 30, 30), "red"), ((30, 200, 30), "green"))]
    a = svc.create_model("s", svc.model_path, lora_rank=4, seed=7, model_id="s:train:split")
    b = svc.create_model("s", svc.model_path, lora_rank=4, seed=7, model_id="s:train:whole")
    svc.forward_backward(a, "cross_entropy", {}, data[:1], False)
    svc.forward_backward(a, "cross_entropy", {}, data[1:], False)
    svc.forward_backward(b, "cross_entropy", {}, data, False)
    for m in (a, b):
        svc.optim_step(m, {"learning_rate": 1e-2, "grad_clip_norm": 1.0})
    pa = dict(svc.model(a).policy.module.named_parameters())
    pb = dict(svc.model(b).policy.module.named_parameters())
    changed = [n for n in pa if ".lora_B." in n and pa[n].abs().sum() > 0]
    assert changed, "the step changed no adapter"
    for n in pa:
        torch.testing.assert_close(pa[n], pb[n], atol=1e-6, rtol=1e-5)
    # forward_only computes the same log-probs and accumulates nothing
    before = {n: p.detach().clone() for n, p in pa.items()}
    svc.forward_backward(a, "cross_entropy", {}, data, True)
    svc.optim_step(a, {"learning_rate": 1e-2})
    assert all(torch.equal(before[n], p) for n, p in svc.model(a).policy.module.named_parameters()
               if p.requires_grad), "a forward-only call left gradients behind"


def test_a_nan_in_a_datum_or_its_loss_never_reaches_the_weights(services):
    """NaN (or inf) loss inputs are refused before any forward; a loss that comes out non-finite anyway is
    refused before its backward. Either way the next step sees finite gradients and the model keeps working."""
    svc = services["qwen2_5_vl"]
    mid = svc.create_model("s", svc.model_path, lora_rank=4, seed=3, model_id="s:train:nan")
    good = sft_datum(svc.processor, jpeg(), "red")
    bad = sft_datum(svc.processor, jpeg(), "red")
    bad.inputs["weights"] = np.full_like(bad.inputs["weights"], np.nan)
    with pytest.raises(Exception, match=r"datum 0: loss_fn_inputs\['weights'\] holds NaN or inf"):
        svc.forward_backward(mid, "cross_entropy", {}, [bad], False)
    ok = dict(good.inputs, logprobs=np.zeros(len(good.inputs["weights"]), np.float32),
              advantages=good.inputs["weights"].astype(np.float32))
    ok["logprobs"][ok["advantages"] == 0] = -np.inf  # where it counts for nothing: allowed
    pg = lambda: [wire.Datum(good.chunks, {k: v for k, v in ok.items() if k != "weights"}, [])]  # noqa: E731
    svc.forward_backward(mid, "importance_sampling", {}, pg(), True)
    ok["logprobs"][-1] = -np.inf  # where it counts: refused
    with pytest.raises(Exception, match=r"loss_fn_inputs\['logprobs'\] holds NaN or inf"):
        svc.forward_backward(mid, "importance_sampling", {}, pg(), False)
    huge = sft_datum(svc.processor, jpeg(), "red")
    huge.inputs["weights"] = np.full_like(huge.inputs["weights"], 3e38)  # finite, but the loss overflows
    with pytest.raises(Exception, match="their gradients were not applied"):
        svc.forward_backward(mid, "cross_entropy", {}, [huge], False)
    svc.forward_backward(mid, "cross_entropy", {}, [good], False)
    svc.optim_step(mid, {"learning_rate": 1e-2})
    params = [p for p in svc.model(mid).policy.module.parameters() if p.requires_grad]
    assert all(torch.isfinite(p).all() for p in params)
    with pytest.raises(Exception, match=r"adam_params.learning_rate must be in"):
        svc.optim_step(mid, {"learning_rate": float("inf")})


# ---- the real SDK against a live server ----------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hostile_numbers_from_a_client_are_user_errors_naming_the_field(family_models, tmp_path):
    """Every number a client sends is checked for kind and range before any work: a huge num_samples once hung
    the server building its sequence ids, a string was a 500, top_p 5 was accepted, a LoRA rank of 1e9 tried
    to allocate 500 GB. The SDK's telemetry is accepted (a 404 printed a traceback in every client)."""
    import httpx

    live = LiveServer(family_models["qwen2_5_vl"], tmp_path / "state")
    hdr = {"X-API-Key": KEY}
    try:
        prompt = {"chunks": [{"type": "encoded_text", "tokens": [10, 11]}]}
        base = {"base_model": str(family_models["qwen2_5_vl"]), "prompt": prompt}
        cases = [({"num_samples": 1e30}, "num_samples must be an integer"),
                 ({"num_samples": 10 ** 12}, "num_samples must be in 1..256"),
                 ({"num_samples": "abc"}, "num_samples must be an integer"),
                 ({"num_samples": 0}, "num_samples must be in 1..256"),
                 ({"sampling_params": {"max_tokens": -5}}, "sampling_params.max_tokens must be in"),
                 ({"sampling_params": {"temperature": "abc"}}, "sampling_params.temperature must be a number"),
                 ({"sampling_params": {"temperature": -1}}, "sampling_params.temperature must be in"),
                 ({"sampling_params": {"seed": 2 ** 70}}, "sampling_params.seed must be in"),
                 ({"sampling_params": {"top_p": 5}}, "sampling_params.top_p must be in"),
                 ({"sampling_params": {"stop": {"a": 1}}}, "sampling_params.stop must be")]
        for extra, message in cases:
            r = httpx.post(f"{live.url}/api/v1/asample", json={**base, **extra}, headers=hdr, timeout=30)
            assert r.status_code == 400 and message in r.json()["error"], (extra, r.status_code, r.text)
        session = httpx.post(f"{live.url}/api/v1/create_session", json={}, headers=hdr).json()["session_id"]
        r = httpx.post(f"{live.url}/api/v1/create_model", headers=hdr, json={
            "session_id": session, "model_seq_id": 0, "base_model": base["base_model"], "lora_config": {"rank": 10 ** 9}})
        assert r.status_code == 400 and "lora_config.rank must be in 0..1024" in r.json()["error"], r.text
        r = httpx.post(f"{live.url}/api/v1/telemetry", json={"events": []}, headers=hdr)
        assert r.status_code == 200 and r.json() == {"status": "accepted"}
        assert httpx.get(f"{live.url}/api/v1/healthz", headers=hdr, timeout=5).status_code == 200  # still serving
    finally:
        live.stop()


def serve_subprocess(model, state, log_path, key: str, *extra: str):
    """`vlrl serve MODEL` as a process of its own, once it answers: (process, base url)."""
    import subprocess
    import sys

    import httpx

    url = f"http://127.0.0.1:{free_port()}"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "vlrl_cli", "serve", str(model), "--port", url.rsplit(":", 1)[1],
                             "--api-key", key, "--state", str(state), *extra], stdout=log, stderr=subprocess.STDOUT)
    for _ in range(600):
        try:
            if httpx.get(f"{url}/api/v1/healthz", headers={"X-API-Key": key}).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert proc.poll() is None, f"vlrl serve exited {proc.returncode}: {open(log_path).read()[-3000:]}"
        time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"vlrl serve did not answer in 300 s: {open(log_path).read()[-3000:]}")


class LiveServer:
    def __init__(self, model, state):
        import uvicorn

        from vlrl_cli.serve.app import make_app
        from vlrl_cli.serve.service import Service

        self.port = free_port()
        self.app = make_app(Service(str(model), state), KEY, log=lambda m: None, poll_hold_s=2.0)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(100):
            if self.server.started:
                break
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.app.jobs.stop()


@pytest.fixture
def sdk_env(monkeypatch):
    monkeypatch.setenv("TINKER_API_KEY", KEY)
    monkeypatch.setenv("TINKER_TELEMETRY", "0")


def test_the_tinker_sdk_trains_samples_checkpoints_and_survives_a_restart(family_models, tmp_path, sdk_env):
    import tinker
    from tinker import types

    model = family_models["qwen3_vl"]
    live = LiveServer(model, tmp_path / "state")
    try:
        sc = tinker.ServiceClient(base_url=live.url)
        tc = sc.create_lora_training_client(base_model=str(model), rank=4, seed=0).result()
        info = tc.get_info()
        assert info.lora_rank == 4 and info.model_data.tokenizer_id == str(model) and info.model_data.arch == "qwen3_vl"
        from vlrl_cli.model.loading import load_processor

        proc = load_processor(str(model))
        img = jpeg()
        d = sft_datum(proc, img, "red")
        sdk_datum = types.Datum(
            model_input=types.ModelInput(chunks=[
                types.EncodedTextChunk(tokens=d.chunks[0].tokens),
                types.ImageChunk(data=img, format="jpeg", expected_tokens=d.chunks[1].expected_tokens),
                types.EncodedTextChunk(tokens=d.chunks[2].tokens)]),
            loss_fn_inputs={"target_tokens": d.inputs["target_tokens"], "weights": d.inputs["weights"]})
        losses_seen = []
        for _ in range(4):
            fb = tc.forward_backward([sdk_datum], "cross_entropy").result()
            tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
            losses_seen.append(fb.metrics["loss:sum"])
        assert losses_seen[-1] < losses_seen[0]
        sampler = tc.save_weights_and_get_sampling_client(name="s1").result()
        prompt = types.ModelInput(chunks=sdk_datum.model_input.chunks[:2] + [
            types.EncodedTextChunk(tokens=d.chunks[2].tokens[:-2])])
        res = sampler.sample(prompt, num_samples=3, sampling_params=types.SamplingParams(max_tokens=4, seed=1)).result()
        assert len(res.sequences) == 3 and all(s.logprobs and len(s.logprobs) == len(s.tokens) for s in res.sequences)
        lps = sampler.compute_logprobs(prompt).result()
        assert lps[0] is None and all(math.isfinite(x) for x in lps[1:])
        state_path = tc.save_state("ckpt-a").result().path
        assert state_path.startswith("tinker://") and state_path.endswith("/weights/ckpt-a")

        # bad input: each a user error, and the server keeps serving
        with pytest.raises(tinker.RequestFailedError) as e:
            tc.forward_backward([sdk_datum], "dpo").result()
        assert "unknown loss_fn 'dpo'" in str(e.value)
        with pytest.raises(Exception, match="checkpoint name"):
            tc.save_state("../../escape").result()
        assert not (tmp_path / "escape").exists()
        import httpx

        r = httpx.post(f"{live.url}/api/v1/get_info", json={"model_id": info.model_id}, headers={"X-API-Key": "tml-wrong"})
        assert r.status_code == 401
        r = httpx.post(f"{live.url}/api/v1/forward_backward", content=b"\xff\xff\xff\x07junk",
                       headers={"X-API-Key": KEY, "Content-Type": "application/x-protobuf"})
        assert r.status_code == 400 and r.json()["category"] == "user"
        r = httpx.post(f"{live.url}/api/v1/optim_step", json={"model_id": "s-none:train:0", "adam_params": {}},
                       headers={"X-API-Key": KEY})
        assert r.status_code == 400 and "unknown model_id" in r.json()["error"]
        r = httpx.post(f"{live.url}/api/v1/optim_step", json={"model_id": info.model_id, "seq_id": 0,
                       "adam_params": {}}, headers={"X-API-Key": KEY})
        assert r.status_code == 400 and "seq_id must be an integer >= 1" in r.json()["error"]
        # a retried request (same model, same seq_id) is one future, applied once
        from tinker.proto import request_conv

        body = request_conv.forward_backward_request_to_proto(types.ForwardBackwardRequest(
            forward_backward_input=types.ForwardBackwardInput(data=[sdk_datum], loss_fn="cross_entropy"),
            model_id=info.model_id, seq_id=10_000)).SerializeToString()
        hdr = {"X-API-Key": KEY, "Content-Type": "application/x-protobuf"}
        first, again = (httpx.post(f"{live.url}/api/v1/forward_backward", content=body, headers=hdr).json()
                        for _ in range(2))
        assert first["request_id"] == again["request_id"]
        # an image bomb is refused by the checked decoder before any pixel is decoded
        import vlrl_cli.serve.app as app_module

        bomb = io.BytesIO()
        Image.new("1", (8_500, 8_500)).save(bomb, format="PNG")  # 72M pixels: over 64M, under PIL's own guard
        res = sampler.sample(types.ModelInput(chunks=[types.EncodedTextChunk(tokens=d.chunks[0].tokens),
                                                      types.ImageChunk(data=bomb.getvalue(), format="png", expected_tokens=4)]),
                             num_samples=1, sampling_params=types.SamplingParams(max_tokens=2))
        with pytest.raises(tinker.RequestFailedError, match="pixels, limit"):
            res.result()
        old_limit = app_module.MAX_BODY
        app_module.MAX_BODY = 1000
        try:
            r = httpx.post(f"{live.url}/api/v1/forward_backward", content=body, headers=hdr)
            assert r.status_code == 400 and "over the limit" in r.json()["error"]
        finally:
            app_module.MAX_BODY = old_limit
        # client ids never name places: a session id that is a path (or any id this server did not issue)
        for sid in ("../../x", "s-0000000000000000"):
            r = httpx.post(f"{live.url}/api/v1/create_model", headers={"X-API-Key": KEY}, json={
                "session_id": sid, "model_seq_id": 1, "base_model": str(model), "lora_config": {"rank": 4}})
            assert r.status_code == 400 and "unknown session_id" in r.json()["error"], r.text
        assert not (tmp_path / "x:train:1").exists() and not list(tmp_path.glob("**/x:train:1"))
        # out-of-vocabulary targets are refused, never clipped to another token
        bad = types.Datum(model_input=sdk_datum.model_input, loss_fn_inputs={
            "target_tokens": np.full(len(d.inputs["target_tokens"]), 10**7, dtype=np.int64), "weights": d.inputs["weights"]})
        with pytest.raises(tinker.RequestFailedError, match="outside the vocabulary"):
            tc.forward_backward([bad], "cross_entropy").result()
        fb = tc.forward_backward([sdk_datum], "cross_entropy").result()  # still serving
        assert math.isfinite(fb.metrics["loss:sum"])
        sc.close("success").result()  # finishes the session; stops the SDK's heartbeat thread
    finally:
        live.stop()

    # a new process on the same --state: the checkpoint's tinker:// path still loads, optimizer included
    live = LiveServer(model, tmp_path / "state")
    try:
        sc = tinker.ServiceClient(base_url=live.url)
        tc2 = sc.create_training_client_from_state_with_optimizer(state_path).result()
        fb2 = tc2.forward_backward([sdk_datum], "cross_entropy").result()
        assert fb2.metrics["loss:sum"] == pytest.approx(fb.metrics["loss:sum"], rel=1e-4)
        sc.close("success").result()
    finally:
        live.stop()


def test_serve_cli_refuses_bad_flags_before_loading_anything(cli, tmp_path):
    r = cli("serve", tmp_path / "nope", "--engine", "trt")
    assert r.exit_code == 2 and "--engine must be hf or vllm" in r.output
    r = cli("serve", tmp_path / "nope", "--api-key", "tml-1")
    assert r.exit_code == 2 and "too short" in r.output
    r = cli("serve", "--help")
    assert r.exit_code == 0 and "Tinker" in r.output and "--api-key" in r.output


def test_lora_config_train_attn_and_train_mlp_choose_the_adapted_projections(services):
    svc = services["qwen2_5_vl"]
    mid = svc.create_model("s", svc.model_path, lora_rank=4, model_id="s:train:attn-only", train_mlp=False)
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in svc.model(mid).policy.module.named_parameters()
               if ".lora_A." in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj"}
    with pytest.raises(Exception, match="nothing would train"):
        svc.create_model("s", svc.model_path, lora_rank=4, train_attn=False, train_mlp=False)


def test_a_zstd_body_is_bounded_whatever_size_it_declares():
    import zstandard

    from vlrl_cli.serve.app import bounded_zstd
    from vlrl_cli.serve.service import UserError

    small = zstandard.ZstdCompressor().compress(b"x" * 1000)
    assert bounded_zstd(small, 2000) == b"x" * 1000
    big = zstandard.ZstdCompressor().compress(b"\0" * 5_000_000)  # declares its 5 MB content size
    with pytest.raises(UserError, match="over the limit"):
        bounded_zstd(big, 1_000_000)
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 5_000_000)
    with pytest.raises(UserError, match="more than the limit"):
        bounded_zstd(unsized, 1_000_000)


def test_the_base_models_sampler_weights_are_named_for_the_model(family_models, tmp_path):
    """--state outlives a restart with another MODEL: "base" must serve that model's weights, not the first's."""
    import torch

    from vlrl_cli.model.loading import load_vlm
    from vlrl_cli.serve.service import Service

    state = tmp_path / "state"
    for family in ("qwen2_5_vl", "qwen3_vl"):  # one state folder, two models in turn
        svc = Service(str(family_models[family]), state)
        served = dict(svc._read_sampler(None))
        own = dict(load_vlm(str(family_models[family]), torch.float32).named_parameters())
        assert served.keys() == own.keys() and all(torch.equal(served[k], own[k].detach()) for k in own)
    assert len(list(state.glob("base-*.safetensors"))) == 2
