"""What `vlrl serve` computes: training models, their optimizer steps and checkpoints, and sampling.

One `Service` owns the processor, every training model (a DeepSpeed policy each, from train/policy.py) and one
rollout engine (hf or vllm, from rollout/engines/) that serves whatever sampler weights were last asked for. All
methods run on the job worker's single thread (jobs.py), in each model's seq_id order, so nothing here
locks. Inputs go through model/render.py (`render_chunks`) and log-probs through train/batches.py: the same formula
as `vlrl train` and `check-drift`.

Bad input raises `UserError` (answered as a Tinker user error); anything else is a server error.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..train import batches, policy as pol
from ..rollout.engines import GenRequest, Sampling, make_engine, placeholder_token_ids
from ..rollout.episodes import Sequence
from ..data.images import ImageLimits
from ..model.loading import load_processor
from ..model.render import render_chunks
from . import losses, wire
from .store import Store


UserError = wire.WireError  # the client's fault: one class, whichever module finds it

MAX_SAMPLES = 256  # samples of one prompt per request
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
RECORDED_MAX = 200_000  # sampled sequences remembered for stable_reinforce's provenance check


def model_fingerprint(model_path: str) -> str:
    """A short hash naming one model's weights: its config and the names, sizes and times of its weight files
    (a folder), or its hub id and the cached snapshot's (a hub id). --state outlives restarts with another MODEL."""
    import hashlib

    p = Path(model_path)
    if not p.is_dir():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_path, "config.json")
        p = Path(cached).parent if isinstance(cached, str) else p
    h = hashlib.sha256(str(p.resolve() if p.exists() else model_path).encode())
    if p.is_dir():
        for f in sorted(p.iterdir()):
            if f.suffix in (".json", ".safetensors", ".bin"):
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
                if f.name == "config.json":
                    h.update(f.read_bytes())
    return h.hexdigest()[:16]


@dataclass
class TrainModel:
    model_id: str
    base_model: str
    lora_rank: int
    policy: object  # DeepSpeed engine
    steps: int = 0
    lora_parts: tuple[bool, bool] = (True, True)  # LoRA on (attention, MLP) projections


class Service:
    def __init__(self, model_path: str, state_dir: Path, engine: str = "hf", served_names: tuple[str, ...] = (),
                 dtype: str | None = None, gpu_memory_utilization: float = 0.3, lora_alpha: float = 32.0,
                 micro_batch_tokens: int = 8192):
        from ..train.distributed import device, init_distributed

        init_distributed()
        self.model_path = model_path
        self.names = {model_path, str(Path(model_path).resolve()) if Path(model_path).exists() else model_path,
                      Path(model_path).name, *served_names}
        self.state_dir = Path(state_dir)
        (self.state_dir / "models").mkdir(parents=True, exist_ok=True)
        self.store = Store(self.state_dir / "serve.sqlite")
        self.processor = load_processor(model_path)
        self.banned = placeholder_token_ids(self.processor)
        self.dtype = dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
        self.dev = device()
        self.engine_name = engine
        self.gpu_memory_utilization = gpu_memory_utilization
        self.lora_alpha = lora_alpha
        self.micro_batch_tokens = micro_batch_tokens  # padded positions per trainer forward
        self.models: dict[str, TrainModel] = {}
        self.engine = None
        self.engine_weights: str | None = None  # the sampler path the engine holds (None: the base model)
        self.limits = ImageLimits()
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model_path)
        self.vocab_size = int(getattr(getattr(cfg, "text_config", cfg), "vocab_size"))
        self.arch = cfg.model_type  # what get_info reports: the served model's own type (qwen2_5_vl, gemma4, ...)
        self.recorded: dict[str, np.ndarray] = {}  # sequence_id -> sampled log-probs (stable_reinforce)
        self._scorer, self._scorer_weights = None, None  # vllm engine: an hf copy for prompt log-probs
        self.log_path = self.state_dir / "requests.jsonl"  # one line per training / sampling call, for people

    def _log(self, **event) -> None:
        import json

        with open(self.log_path, "a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **event}) + "\n")

    # ---- models ---------------------------------------------------------------------------------------

    def check_base_model(self, base_model: str | None) -> str:
        if base_model is None or base_model in self.names:
            return base_model or self.model_path
        if Path(self.model_path).exists() and Path(base_model).exists() and \
                Path(base_model).resolve() == Path(self.model_path).resolve():  # the same folder, named another way
            return base_model
        raise UserError(f"base_model {base_model!r} is not served here; this server serves {sorted(self.names)}")

    def _build(self, lora_rank: int, seed: int | None, train_attn: bool = True, train_mlp: bool = True):
        from ..train.recipe import LoraCfg
        from ..train.lora import LM_PROJECTIONS

        if seed is not None:
            torch.manual_seed(seed)  # the adapters' initialisation (PEFT: A random, B zero)
        targets = [t for t in LM_PROJECTIONS if (train_attn and t.endswith(("q_proj", "k_proj", "v_proj", "o_proj")))
                   or (train_mlp and t in ("gate_proj", "up_proj", "down_proj"))]
        if lora_rank > 0 and not targets:
            raise UserError("lora_config: train_attn and train_mlp are both false: nothing would train")
        lora = LoraCfg(rank=lora_rank, alpha=self.lora_alpha, target_modules=targets) if lora_rank > 0 else None
        # ZeRO stage 0: one process, one model; every forward_backward is a complete accumulation step of
        # its own (boundary set), so gradients of any number of calls add up until optim_step
        return pol.build_policy(self.model_path, lr=1e-4, weight_decay=0.0, warmup=0, stage=0, offload=False,
                                grad_clip=0.0, dtype=self.dtype, lora=lora)

    def create_model(self, session_id: str, base_model: str, lora_rank: int = 0, seed: int | None = None,
                     model_id: str | None = None, train_attn: bool = True, train_mlp: bool = True) -> str:
        """A training model: LoRA of `lora_rank` on the language model's attention and/or MLP projections
        (Tinker's train_attn / train_mlp), or a full fine-tune at rank 0."""
        self.check_base_model(base_model)
        if lora_rank < 0:
            raise UserError(f"lora rank must be >= 0 (0 = full fine-tune), got {lora_rank}")
        model_id = model_id or f"m-{secrets.token_hex(6)}"
        policy = self._build(lora_rank, seed, train_attn, train_mlp)
        self.models[model_id] = TrainModel(model_id, base_model, lora_rank, policy, lora_parts=(train_attn, train_mlp))
        self.store.put_model(model_id, session_id, base_model, lora_rank)
        return model_id

    def model(self, model_id: str) -> TrainModel:
        m = self.models.get(model_id)
        if m is None:
            raise UserError(f"unknown model_id {model_id!r}" + (" (it was created before a restart: load a "
                            "checkpoint with create_training_client_from_state)" if self.store.get_model(model_id)
                            else ""))
        return m

    def unload(self, model_id: str) -> None:
        self.models.pop(model_id, None)

    # ---- training ------------------------------------------------------------------------------------

    def _render(self, datum_chunks) -> tuple[list[int], dict, list]:
        try:
            return render_chunks(self.processor, datum_chunks, self.limits, self.vocab_size)
        except ValueError as e:
            raise UserError(str(e)) from None

    def forward_backward(self, model_id: str, loss_fn: str, config: dict, data: list, forward_only: bool) -> bytes:
        """Accumulate the gradient of sum(loss over datums) (no step); returns ForwardBackwardOutput bytes."""
        m = self.model(model_id)
        t0 = time.perf_counter()
        rendered = []
        for i, d in enumerate(data):
            try:
                rendered.append(self._render(d.chunks))
            except UserError as e:
                raise UserError(f"datum {i}: {e}") from None
        losses.check_request(loss_fn, config, [d.inputs for d in data], lambda i: len(rendered[i][0]))
        if loss_fn == "stable_reinforce":
            for i, d in enumerate(data):
                if not d.sampled_ids:
                    raise UserError(f"datum {i}: stable_reinforce needs provenance (sampled sequence ids) on every datum")
                unknown = [s for s in d.sampled_ids if s not in self.recorded]
                if unknown:
                    raise UserError(f"datum {i}: sequence {unknown[0]!r} was not sampled here with record_stability_info")
        policy = m.policy
        policy.train()
        outputs, total = [], 0.0
        for idx in batches.micro_batches([len(r[0]) for r in rendered], padded_tokens=self.micro_batch_tokens):
            batch = batches.make_batch([Sequence.untrained(*rendered[i][:2]) for i in idx], self.processor, self.dev)
            T = batch.input_ids.shape[1]
            targets = torch.zeros((len(idx), T), dtype=torch.long)
            for j, i in enumerate(idx):
                t = data[i].inputs["target_tokens"].astype(np.int64)
                bad = t[(t < 0) | (t >= self.vocab_size)]
                if len(bad):  # as input tokens are: refused, never clipped to another token
                    raise UserError(f"datum {i}: target token {int(bad[0])} is outside the vocabulary "
                                    f"(0..{self.vocab_size - 1})")
                targets[j, :len(t)] = torch.from_numpy(t)
            with torch.set_grad_enabled(not forward_only):
                lp = batches.sequence_logprobs(policy, batch, 1.0, self.banned, targets=targets.to(self.dev))
                loss = lp.new_zeros(())
                for j, i in enumerate(idx):
                    n = len(rendered[i][0])
                    inputs = {k: torch.as_tensor(v, dtype=torch.float32, device=self.dev)
                              for k, v in data[i].inputs.items() if k != "target_tokens"}
                    loss = loss + losses.datum_loss(loss_fn, lp[j, :n], inputs, config)
                    outputs.append({"logprobs": lp[j, :n].detach().float().cpu().numpy()})
            if not forward_only and not torch.isfinite(loss):
                # gradients of a NaN loss would be NaN in every weight at the next optim_step: the
                # accumulated gradients are left as they were and the model keeps its weights
                raise UserError(f"the loss of datums {idx} is {float(loss.detach())}: their gradients were not applied "
                                "(check their loss_fn_inputs against the model's log-probs)")
            if not forward_only:
                pol.backward_step(policy, loss, last=True)
            total += float(loss.detach())
        self._log(op="forward" if forward_only else "forward_backward", model_id=model_id, loss_fn=loss_fn,
                  datums=len(data), positions=sum(len(r[0]) for r in rendered), loss_sum=total,
                  images=sum(isinstance(c, wire.ImageChunk) for d in data for c in d.chunks),
                  seconds=round(time.perf_counter() - t0, 4))
        return wire.fwdbwd_output(outputs, {"loss:sum": total})

    def optim_step(self, model_id: str, adam: dict) -> dict:
        """One AdamW step with the request's hyper-parameters on the gradients accumulated so far."""
        m = self.model(model_id)
        policy = m.policy
        def num(key, default, lo, hi):
            return float(wire.number(adam, key, default, lo, hi, where="adam_params"))

        big = 1e30  # finite: inf is no learning rate
        lr, eps = num("learning_rate", 1e-4, 0.0, big), num("eps", 1e-12, 1e-30, big)
        b1, b2 = num("beta1", 0.9, 0.0, 1 - 1e-12), num("beta2", 0.95, 0.0, 1 - 1e-12)
        wd, clip = num("weight_decay", 0.0, 0.0, big), num("grad_clip_norm", 0.0, 0.0, big)
        opt = policy.optimizer
        for g in opt.param_groups:
            g.update(lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
        if policy.lr_scheduler is not None:  # LambdaLR would reset lr to its base after the step
            policy.lr_scheduler.base_lrs = [lr] * len(policy.lr_scheduler.base_lrs)
        params = [p for p in policy.module.parameters() if p.requires_grad]
        if getattr(opt, "clip_grad", None) is not None:  # bf16: DeepSpeed's optimizer clips its fp32 grads
            opt.clip_grad = clip
            norm = None
        else:
            grads = [p.grad for p in params if p.grad is not None]
            norm = float(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))) if grads else 0.0
        policy.set_gradient_accumulation_boundary(True)
        policy.step()
        reported = policy.get_global_grad_norm()
        m.steps += 1
        grad_norm = float(reported if reported is not None else (norm or 0.0))
        self._log(op="optim_step", model_id=model_id, step=m.steps, learning_rate=lr, grad_norm=grad_norm)
        return {"metrics": {"grad_norm:mean": grad_norm, "learning_rate:mean": lr}}

    # ---- checkpoints ----------------------------------------------------------------------------------

    def _checkpoint_dir(self, model_id: str, kind: str, name: str) -> Path:
        if not NAME_RE.match(name) or ".." in name:
            raise UserError(f"checkpoint name {name!r}: use letters, digits, '.', '_', '-' (no paths)")
        return self.inside_state(self.state_dir / "models" / model_id / kind / name)

    def inside_state(self, path: Path) -> Path:
        """`path`, refused unless it resolves inside --state (every folder a client's ids name)."""
        root = self.state_dir.resolve()
        if not path.resolve().is_relative_to(root):
            raise UserError("a model or checkpoint id that names a place outside the server's state")
        return path

    def parse_path(self, path: str) -> tuple[str, str, str]:
        """tinker://<model_id>/<weights|sampler_weights>/<name> -> (model_id, kind, name), checked."""
        m = re.match(r"^tinker://([A-Za-z0-9_:-]+)/(weights|sampler_weights)/([^/]+)$", path or "")
        if not m:
            raise UserError(f"not a checkpoint path of this server: {path!r} (tinker://<model_id>/weights/<name>)")
        model_id, kind, name = m.groups()
        d = self._checkpoint_dir(model_id, kind, name)
        if not d.is_dir() or self.store.get_checkpoint(path) is None:
            raise UserError(f"no checkpoint {path!r} on this server")
        return model_id, kind, name

    def save_state(self, model_id: str, name: str | None) -> str:
        """Weights and optimizer state (DeepSpeed's checkpoint), for load_state / resume."""
        m = self.model(model_id)
        name = name or f"step-{m.steps:06d}"
        final = self._checkpoint_dir(model_id, "weights", name)
        tmp = final.with_name(final.name + ".partial")
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        m.policy.save_checkpoint(str(tmp), tag="state", client_state={"steps": m.steps})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        path = f"tinker://{model_id}/weights/{name}"
        self.store.put_checkpoint(path, model_id, "weights", str(final), {"lora_rank": m.lora_rank, "steps": m.steps,
                                                                         "base_model": m.base_model,
                                                                         "lora_parts": list(m.lora_parts)})
        return path

    def load_state(self, path: str, model_id: str | None, session_id: str | None, with_optimizer: bool,
                   new_model_id: str | None = None) -> str:
        """Load a `save_state` checkpoint into an existing model, or into a new one for this session."""
        src_model, kind, name = self.parse_path(path)
        if kind != "weights":
            raise UserError(f"{path} holds sampler weights only; load a checkpoint saved with save_state")
        meta = self.store.get_checkpoint(path)["meta"]
        if model_id is None:
            attn, mlp = meta.get("lora_parts", (True, True))
            model_id = self.create_model(session_id or "", meta["base_model"], meta["lora_rank"], model_id=new_model_id,
                                         train_attn=attn, train_mlp=mlp)
        m = self.model(model_id)
        if m.lora_rank != meta["lora_rank"] or list(m.lora_parts) != list(meta.get("lora_parts", (True, True))):
            raise UserError(f"{path} has LoRA rank {meta['lora_rank']} on {meta.get('lora_parts')}, model {model_id} "
                            f"has {m.lora_rank} on {list(m.lora_parts)} (attention, MLP)")
        _, client = m.policy.load_checkpoint(str(self._checkpoint_dir(src_model, kind, name)), tag="state",
                                             load_optimizer_states=with_optimizer, load_lr_scheduler_states=False)
        m.steps = int((client or {}).get("steps", 0))
        return model_id

    def _engine_weights(self, m: TrainModel):
        from ..train.weight_sync import export_weights

        return [(n, t.detach().to("cpu").clone()) for bucket in export_weights(m.policy) for n, t in bucket]

    def save_for_sampler(self, model_id: str, name: str | None) -> str:
        """The model's current weights as a sampler checkpoint (merged LoRA: what the engine loads)."""
        from safetensors.torch import save_file

        m = self.model(model_id)
        name = name or f"snapshot-{m.steps:06d}-{secrets.token_hex(3)}"
        final = self._checkpoint_dir(model_id, "sampler_weights", name)
        final.mkdir(parents=True, exist_ok=True)
        weights = self._engine_weights(m)
        tmp = final / "weights.safetensors.partial"
        save_file({n: t.contiguous() for n, t in weights}, str(tmp))
        tmp.replace(final / "weights.safetensors")
        path = f"tinker://{model_id}/sampler_weights/{name}"
        self.store.put_checkpoint(path, model_id, "sampler_weights", str(final), {"base_model": m.base_model,
                                                                                  "steps": m.steps})
        self._load_engine(path, weights)  # the next sample from this path needs no load
        return path

    # ---- sampling ------------------------------------------------------------------------------------

    def _load_engine(self, path: str | None, weights=None) -> None:
        """Make the engine hold `path`'s weights (None: the base model's)."""
        if self.engine is None:
            self.engine = make_engine(self.engine_name, self.model_path, self.processor, dtype=self.dtype,
                                      gpu_memory_utilization=self.gpu_memory_utilization)
            self.engine_weights = None
        if path == self.engine_weights:
            return
        if weights is None:
            weights = self._read_sampler(path)
        self.engine.update_weights(weights)
        self.engine_weights = path

    def _read_sampler(self, path: str | None):
        from safetensors.torch import load_file, save_file

        if path is None:  # the base model's weights, exported once from a fresh load, named for this model
            f = self.state_dir / f"base-{model_fingerprint(self.model_path)}.safetensors"
            if not f.exists():
                from ..model.loading import load_vlm

                base = load_vlm(self.model_path, getattr(torch, self.dtype))
                save_file({n: p.detach().contiguous() for n, p in base.named_parameters()}, str(f) + ".partial")
                Path(str(f) + ".partial").replace(f)
            return list(load_file(str(f)).items())
        model_id, kind, name = self.parse_path(path)
        if kind != "sampler_weights":
            raise UserError(f"{path} is a training-state checkpoint; sample from a save_weights_for_sampler path")
        return list(load_file(str(self._checkpoint_dir(model_id, kind, name) / "weights.safetensors")).items())

    def sample(self, model_path: str | None, chunks: list, params: dict, num_samples: int,
               prompt_logprobs: bool, sequence_ids: list[str] | None = None, record: bool = False) -> bytes:
        if not 1 <= num_samples <= MAX_SAMPLES:
            raise UserError(f"num_samples must be 1..{MAX_SAMPLES}, got {num_samples}")
        t0 = time.perf_counter()
        ids, tensors, images = self._render(chunks)
        if not ids:
            raise UserError("empty prompt")
        params = wire.sampling_params(params)
        self._load_engine(model_path)
        seed = params["seed"]
        s = Sampling(temperature=params["temperature"], top_p=params["top_p"], max_new_tokens=params["max_tokens"],
                     seed=seed if seed is not None else secrets.randbelow(2**31), top_k=max(params["top_k"], 0))
        gens = self.engine.generate([GenRequest(ids, tensors, n=num_samples, images=images)], s)[0]
        stop_tokens, stop_strings = self._stops(params["stop"])
        seqs = [self._apply_stop(g.token_ids, g.logprobs, g.finish_reason, stop_tokens, stop_strings) for g in gens]
        if record and sequence_ids:
            for sid, (_, lps, _) in zip(sequence_ids, seqs):
                self.recorded[sid] = np.asarray(lps, dtype=np.float32)
            while len(self.recorded) > RECORDED_MAX:  # the oldest go first (dicts keep insertion order)
                self.recorded.pop(next(iter(self.recorded)))
        plp = self.prompt_logprobs(ids, tensors) if prompt_logprobs else None
        self._log(op="sample", weights=model_path or "base", prompt_tokens=len(ids), samples=num_samples,
                  sampled_tokens=sum(len(t) for t, _, _ in seqs), seconds=round(time.perf_counter() - t0, 4))
        return wire.sample_output(seqs, plp)

    def _stops(self, stop) -> tuple[set[int], list[str]]:
        """(stop token ids, stop strings) of SamplingParams.stop; the engine stops at EOS by itself."""
        if stop is None:
            return set(), []
        if isinstance(stop, str):
            stop = [stop]
        return {int(t) for t in stop if isinstance(t, int)}, [t for t in stop if isinstance(t, str) and t]

    def _apply_stop(self, toks: list[int], lps: list[float], reason: str, stop_tokens: set[int],
                    stop_strings: list[str]) -> tuple[list[int], list[float], str]:
        """Cut a generation after its first stop token or stop string (sampling is causal, so the tokens
        before the cut are exactly what a sampler stopping there would have produced)."""
        for i, t in enumerate(toks):
            if t in stop_tokens:
                return toks[:i + 1], lps[:i + 1], "stop"
        if stop_strings:
            dec = self.processor.tokenizer.decode
            for i in range(len(toks)):
                text = dec(toks[:i + 1])
                if any(s in text for s in stop_strings):
                    return toks[:i + 1], lps[:i + 1], "stop"
        return toks, lps, reason

    @torch.no_grad()
    def prompt_logprobs(self, ids: list[int], tensors: dict) -> list[float]:
        """log p(token t | tokens < t) of the prompt under the sampler's weights; NaN at t = 0. The
        trainer's formula (batches.sequence_logprobs, temperature 1, placeholders banned: 0 there)."""
        model = getattr(self.engine, "model", None)
        if model is None:
            model = self._scoring_model()
        lp = batches.score_sequences(model, [Sequence.untrained(ids, tensors)], self.processor, 1.0, self.banned,
                                     next(model.parameters()).device)[0]
        return [float("nan")] + lp[1:].tolist()

    def _scoring_model(self):
        """vllm engine: an hf copy of the sampler's weights for prompt log-probs (loaded on first use)."""
        from ..model.loading import load_vlm

        if self._scorer is None or self._scorer_weights != self.engine_weights:
            if self._scorer is None:
                self._scorer = load_vlm(self.model_path, getattr(torch, self.dtype)).to(self.dev).eval()
            params = dict(self._scorer.named_parameters())
            for n, t in self._read_sampler(self.engine_weights):
                params[n].data.copy_(t.to(params[n].device, params[n].dtype))
            self._scorer_weights = self.engine_weights
        return self._scorer

    def info(self, model_id: str) -> dict:
        m = self.model(model_id)
        return {"model_id": model_id, "model_data": {"arch": self.arch, "model_name": m.base_model,
                                                     "tokenizer_id": m.base_model},
                "is_lora": m.lora_rank > 0, "lora_rank": m.lora_rank or None, "model_name": m.base_model,
                "type": "get_info"}

