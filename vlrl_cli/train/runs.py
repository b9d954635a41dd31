"""Run directories: the resolved recipe, metrics.jsonl, checkpoints (HF format + DeepSpeed state).

runs/<name>/
  recipe.yaml            the resolved recipe (after --set)
  metrics.jsonl          one JSON line per step
  checkpoints/step_N/    hf/ (loadable by transformers and vLLM; with LoRA the merged model) + ds/ (optimizer,
                         RNG, data cursor) + with LoRA adapter/ (PEFT's format: PeftModel.from_pretrained)
  checkpoints/latest     the name of the newest complete checkpoint
A checkpoint is written under a temporary name and renamed when complete, so a crash never leaves a
half checkpoint that `--resume` would pick up.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


class MetricsLog:
    def __init__(self, run_dir: Path, resume_from_step: int | None, tensorboard: bool = False, wandb: bool = False):
        self.path = run_dir / "metrics.jsonl"
        if resume_from_step is not None and self.path.exists():
            # drop lines past the checkpoint: they will be recomputed identically
            kept = [l for l in self.path.read_text().splitlines() if l and json.loads(l)["step"] <= resume_from_step]
            self.path.write_text("".join(l + "\n" for l in kept))
        elif resume_from_step is None:
            self.path.write_text("")
        self.tb = self.wb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                _not_installed("run.tensorboard", "tensorboard")
        if wandb:
            try:
                import wandb as wb

                self.wb = wb.init(project="vlrl", name=run_dir.name, dir=str(run_dir))
            except ImportError:
                _not_installed("run.wandb", "wandb")

    def write(self, metrics: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        nums = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb:
            for k, v in nums.items():
                self.tb.add_scalar(k, v, metrics["step"])
            self.tb.flush()  # a crashed run keeps its curves
        if self.wb:
            self.wb.log(nums, step=metrics["step"])


def _not_installed(key: str, package: str) -> None:
    print(f"warning: {key} is on but {package} is not installed (pip install {package}); "
          "metrics.jsonl has every metric", file=sys.stderr)


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def checkpoint_due(step: int, trainer_cfg) -> bool:
    """After optimizer step `step` (1-based): every `save_every` steps, and at the end (`save_final`)."""
    tr = trainer_cfg
    return bool(tr.save_every and step % tr.save_every == 0) or (step == tr.steps and tr.save_final)


def checkpoint_bytes(policy, export: bool) -> int:
    """What a checkpoint of this policy will take on disk (all ranks' files together): DeepSpeed's state (the
    trained weights, fp32 master copies and two Adam moments of each; LoRA: the adapters alone, the frozen base
    excluded), a LoRA adapter folder, and with `export` the whole model in transformers' format (hf/)."""
    from .lora import is_lora

    params = list(policy.module.parameters())
    numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731 - ZeRO-3 partitions hold a fraction
    width = max((p.element_size() for p in params), default=4)
    trained = sum(numel(p) for p in params if p.requires_grad)
    total = sum(numel(p) for p in params)
    lora = is_lora(policy.module)
    state = trained * (width + 8 + (4 if width == 2 else 0))
    adapter = trained * width if lora else 0
    hf = total * width if export else 0
    return int(state + adapter + hf)


def check_free_space(folder: Path, need: int, what: str, after: str = "") -> None:
    """Refuse to start writing `what` into `folder` when the disk cannot hold it (UserError, one line): a full
    disk half-way through would leave a wreck, and the last good checkpoint must survive."""
    from ..errors import UserError

    probe = folder
    while not probe.exists():
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    if usage.total == 0:  # /proc, /sys: no disk behind them, so "0 GB free" would send the user to free space
        raise UserError(f"{what}: {folder} is on a virtual file system ({probe}), not a disk; write it elsewhere")
    free = usage.free
    room = need * 1.05 + (64 << 20)  # 5% for what the estimate leaves out, and 64 MB that a full disk needs
    if free < room:
        raise UserError(f"{what} needs ~{room / 1e9:.2f} GB (with a 64 MB margin), {free / 1e9:.2f} GB free in "
                        f"{folder}; free some space{after}")


def writing(path: Path, what: str):
    """A context in which an error of the user's machine while writing (a full disk, no permission, a
    read-only folder) becomes a UserError naming the path, whichever library met it."""
    import contextlib

    from ..errors import ENVIRONMENT_ERRNOS, WRITE_ERRNOS, UserError, os_error_code

    @contextlib.contextmanager
    def guard():
        try:
            yield
        except Exception as e:  # noqa: BLE001 - re-raised unless it is the machine's
            code = os_error_code(e)
            if code in WRITE_ERRNOS:
                raise UserError(f"{what}: {ENVIRONMENT_ERRNOS[code]} ({path})") from None
            raise

    return guard()


def save_checkpoint(policy, processor, run_dir: Path, step: int, client_state: dict, rank: int,
                    export: bool = True) -> Path:
    """A checkpoint of step `step`, atomically: DeepSpeed's state (what --resume loads; a LoRA run's holds its
    adapters and their optimizer state only), a LoRA run's adapter/ (PEFT's format), and with `export` the
    model in transformers' format, hf/ (the merged model for LoRA). All ranks call this (ZeRO shards are saved
    per rank). A disk that cannot hold it stops the run before anything is written, the last good
    checkpoint intact."""
    import torch.distributed as dist

    from .distributed import all_ranks
    from ..model.loading import save_model
    from .lora import is_lora, merged_model

    root = run_dir / "checkpoints"
    final = root / f"step_{step}"
    tmp = root / f"step_{step}.partial"
    lora = is_lora(policy.module)
    need = checkpoint_bytes(policy, export)
    failed = None
    if rank == 0:
        try:
            check_free_space(root, need, f"checkpoint step_{step}", after=" (the last complete checkpoint is kept)"
                             if latest_checkpoint(run_dir) is not None else "")
            with writing(root, f"checkpoint step_{step}"):
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
        except Exception as e:  # noqa: BLE001 - every rank must hear of it before the next collective
            failed = e
    if all_ranks({"failed": float(failed is not None)}, op="max")["failed"]:
        if failed is not None:
            raise failed
        raise RuntimeError("rank 0 could not start the checkpoint")
    try:
        with writing(tmp, f"checkpoint step_{step}"):
            policy.save_checkpoint(str(tmp / "ds"), tag="state", client_state=client_state, exclude_frozen_parameters=lora)
            stage3 = policy.zero_optimization_stage() == 3
            # ZeRO-3: the partitions gathered on rank 0 (the adapters alone, unless the whole model is exported)
            state = policy._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=not export) \
                if stage3 and (export or lora) else None
            if rank == 0:
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()
                module = policy.module
                if lora:
                    module.save_pretrained(str(tmp / "adapter"), state_dict=state)
                    processor.save_pretrained(str(tmp / "adapter"))  # an adapter checkpoint exports on its own
                if export:
                    out, out_state = merged_model(module, state) if lora else (module, state)
                    save_model(out, tmp / "hf", out_state)
                    processor.save_pretrained(str(tmp / "hf"))
                shutil.rmtree(final, ignore_errors=True)
                tmp.rename(final)
                (root / "latest.partial").write_text(final.name)
                (root / "latest.partial").replace(root / "latest")
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # never a half checkpoint; the last good one stays
        raise
    dist.barrier()
    return final


def export_checkpoint(ckpt: Path, out: Path | None = None, progress=None, overwrite: bool = False) -> Path:
    """A checkpoint's model in transformers' format (what eval, check-drift and vLLM load): its hf/ folder, made
    from the adapter (merged into the base model it was trained on) when the run wrote adapters only.
    `out`: write the export there instead of the checkpoint's hf/; an existing folder there is replaced only
    with `overwrite`, and only when it is a model export itself (a user's folder, a run or a checkpoint never).
    The export is written beside its target and renamed into place: an interrupted or failed export leaves
    nothing that looks like a model, and of two exports to one place exactly one lands."""
    from ..errors import UserError
    from ..model.loading import check_weight_files

    ckpt = Path(ckpt)
    hf = ckpt / "hf"
    if (hf / "config.json").exists() and out is None:
        return hf
    adapter = ckpt / "adapter"
    lora = (adapter / "adapter_config.json").exists()
    if not lora and not (hf / "config.json").exists():
        raise UserError(f"{ckpt}: neither a model export (hf/) nor a LoRA adapter (adapter/): not a checkpoint")
    target = hf if out is None else _export_target(Path(out), ckpt, overwrite)
    what = f"export of {ckpt}"
    if not lora:  # a full fine-tune's export, copied where asked
        check_weight_files(hf, need_weights=True)
        check_free_space(target.parent, sum(f.stat().st_size for f in hf.rglob("*") if f.is_file()), what)
        return _land(target, lambda tmp: shutil.copytree(hf, tmp), what, replace=out is None or overwrite)
    import json

    import torch
    from peft import PeftModel

    from transformers import AutoProcessor

    from ..model.loading import load_vlm, save_model
    from .lora import merged_model

    try:
        base_path = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (ValueError, AttributeError):
        raise UserError(f"{adapter / 'adapter_config.json'}: not a JSON object (PEFT's adapter config)") from None
    if not base_path:
        raise UserError(f"{adapter}/adapter_config.json does not name its base model")
    check_weight_files(adapter, required="adapter_model.safetensors")
    try:  # the run's processor, saved with its adapter: read before the merge, not after minutes of it
        processor = AutoProcessor.from_pretrained(str(adapter))
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{adapter}: its processor files cannot be read ({str(e).strip().splitlines()[0]}); "
                        "copy them (tokenizer*, *processor*.json, chat_template*) from the base model") from None
    if progress:
        progress(f"merging the adapter of {ckpt} into {base_path}")
    base = load_vlm(base_path, torch.float32 if "float32" in str(_dtype_of(adapter)) else torch.bfloat16)
    model = PeftModel.from_pretrained(base, str(adapter))
    plain, state = merged_model(model)
    check_free_space(target.parent, sum(t.numel() * t.element_size() for t in state.values()), what)

    def write(tmp: Path) -> None:
        save_model(plain, tmp, state)
        processor.save_pretrained(str(tmp))

    return _land(target, write, what, replace=out is None or overwrite)


def _export_target(out: Path, ckpt: Path, overwrite: bool) -> Path:
    """Where `vlrl export --out OUT` may write (an absolute path), or a UserError saying why not."""
    from ..errors import UserError

    target, source = out.resolve(), ckpt.resolve()
    if target == source or source in target.parents or target in source.parents:
        raise UserError(f"--out {out}: the checkpoint {ckpt} is there (or it is inside the checkpoint); export to "
                        "a folder of its own")
    if target.exists() and not target.is_dir():
        raise UserError(f"--out {out}: a file; export to a folder")
    inside = next((p for p in target.parents if (p / "config.json").is_file()), None)
    if inside is not None:  # a model folder with a model inside it: loaders read the outer one, --overwrite refuses it
        raise UserError(f"--out {out}: inside the model folder {inside}; export to a folder of its own")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise UserError(f"--out {out}: not empty; export to a new folder, or pass --overwrite to replace an "
                            "earlier export there")
        subfolders = [p.name for p in target.iterdir() if p.is_dir()]
        if not (target / "config.json").exists() or subfolders:
            raise UserError(f"--out {out}: not a model export (--overwrite replaces only a folder holding a model "
                            "and no subfolders); export to a new folder")
    return target


def _land(target: Path, write, what: str, replace: bool) -> Path:
    """`write(tmp)` into a folder of this process's own beside `target`, then renamed onto it. With `replace`,
    a folder already at `target` gives way (renamed aside first, deleted after); without, a folder that
    appeared there meanwhile (another export) wins and this one is discarded."""
    import os

    from ..errors import UserError

    tmp = target.with_name(f"{target.name}.partial-{os.getpid()}")
    aside = target.with_name(f"{target.name}.replaced-{os.getpid()}")
    try:
        with writing(target.parent, what):
            shutil.rmtree(tmp, ignore_errors=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            write(tmp)
            if replace and target.exists():
                target.rename(aside)
            try:
                tmp.rename(target)
            except OSError as e:
                if target.exists() and not replace:
                    raise UserError(f"{target}: written by another export meanwhile; this one was discarded") from None
                raise e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside.exists() and not target.exists():
            aside.rename(target)  # the earlier export stays where it was
        raise
    shutil.rmtree(aside, ignore_errors=True)
    return target


def _dtype_of(adapter: Path) -> str:
    """The dtype the adapter was saved in (the run's model.dtype)."""
    from safetensors import safe_open

    files = list(adapter.glob("*.safetensors"))
    if not files:
        return "float32"
    with safe_open(str(files[0]), "pt") as f:
        keys = list(f.keys())
        return str(f.get_tensor(keys[0]).dtype) if keys else "float32"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint checkpoints/latest names; None before the first one. A marker that names no finished
    checkpoint (emptied, edited, its folder deleted) is a UserError naming it and the newest that is there."""
    import re

    from ..errors import UserError

    marker = Path(run_dir) / "checkpoints" / "latest"
    if not marker.exists():
        return None
    name = marker.read_text().strip()
    if re.fullmatch(r"step_\d+", name) and (marker.parent / name).is_dir():
        return marker.parent / name
    steps = sorted((p for p in marker.parent.glob("step_*") if re.fullmatch(r"step_\d+", p.name) and p.is_dir()),
                   key=lambda p: int(p.name[5:]))
    there = (f"the newest finished one there is {steps[-1].name}: to go on from it, `echo {steps[-1].name} > {marker}`"
             if steps else "there is no finished checkpoint there")
    raise UserError(f"{marker} names {name!r}, not a finished checkpoint; {there}")


def after_interrupt(run_dir: Path, recipe: Path, overrides: list[str]) -> str:
    """What a stopped run left and the command that goes on from it: printed when Ctrl-C ends `vlrl train`."""
    import shlex

    sets = "".join(f" --set {shlex.quote(o)}" for o in overrides)
    again = f"vlrl train {shlex.quote(str(recipe))}{sets}"
    try:
        ckpt = latest_checkpoint(run_dir)
    except Exception:  # noqa: BLE001 - a damaged marker (--resume names it and the way out): never --overwrite here
        return f"stopped; `{again} --resume` goes on from its last checkpoint"
    if ckpt is None:
        return f"stopped before its first checkpoint; `{again} --overwrite` starts {run_dir} again"
    return f"stopped; its last checkpoint is {ckpt}: `{again} --resume` goes on from it"


def resolve_checkpoint(model: str) -> Path | None:
    """A checkpoint folder for a checkpoint or a run directory (its latest); None for anything else."""
    from ..errors import UserError

    path = Path(model)
    if (path / "hf" / "config.json").exists() or (path / "adapter" / "adapter_config.json").exists():
        return path
    if (path / "checkpoints").is_dir():
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise UserError(f"{model}: a run directory without a finished checkpoint")
        return ckpt
    return None


def resolve_model(model: str, progress=None) -> str:
    """What `eval` and `check-drift` accept as MODEL: a hub id or model dir (unchanged), a checkpoint
    (runs/x/checkpoints/step_N -> its hf/ folder; a LoRA checkpoint's adapter merged into its base model once,
    into hf/) or a run directory (runs/x -> its latest checkpoint)."""
    ckpt = resolve_checkpoint(model)
    return str(export_checkpoint(ckpt, progress=progress)) if ckpt is not None else model


def load_checkpoint(policy, ckpt: Path) -> dict:
    """Resume from a checkpoint's DeepSpeed state (a LoRA run's holds the adapters only: the frozen base is
    the model as loaded)."""
    import zipfile

    from ..errors import UserError
    from .lora import is_lora

    # torch.save writes zip archives whose directory is at the end: a truncated or damaged file fails to open
    # here at once, named, instead of deep inside DeepSpeed's loader
    for f in sorted((ckpt / "ds").rglob("*.pt")):
        try:
            zipfile.ZipFile(f).close()
        except (zipfile.BadZipFile, OSError) as e:
            raise UserError(f"{f}: a damaged checkpoint file ({e}); resume from an earlier checkpoint "
                            f"(write its step_N into {ckpt.parent / 'latest'})") from None
    _, client_state = policy.load_checkpoint(str(ckpt / "ds"), tag="state",
                                             load_module_strict=not is_lora(policy.module))
    return client_state or {}


# --- starting (or resuming) a run -----------------------------------------------------------------


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) and v else {key: v})
    return out


def recipe_changes(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for every key whose value differs between two resolved recipes."""
    a, b = _flat(old), _flat(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


_LOCKS: dict[str, object] = {}  # run directory -> its open lock file, held until this process exits


def lock_run_dir(run_dir: Path, command: str = "vlrl train", other_name: str = "give this run another run.name") -> None:
    """Hold an exclusive lock on the run directory for this process's life: a second `vlrl train` writing
    the same run (the same run.name twice, or a run started twice) stops at once, naming the first's pid.
    The kernel drops the lock when the process ends, however it ends, so a crash never leaves it stale."""
    import fcntl
    import os

    from ..errors import UserError

    key = str(Path(run_dir).resolve())
    if key in _LOCKS:
        return
    if not Path(run_dir).exists():
        import atexit

        atexit.register(_drop_if_unused, Path(run_dir))
    with writing(Path(run_dir), "the run directory"):
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        f = open(Path(run_dir) / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "unknown"
        f.close()
        raise UserError(f"{run_dir} is being written by another {command} (pid {pid}); wait for it, or "
                        f"{other_name}") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    _LOCKS[key] = f


def _drop_if_unused(run_dir: Path) -> None:
    """At exit: a folder this process created and left holding only its lock (stopped, by Ctrl-C or an error,
    before it wrote anything) is removed, so no empty run or eval folder is left for the user to clean up."""
    try:
        if [p.name for p in run_dir.iterdir()] == [".lock"]:
            (run_dir / ".lock").unlink()
            run_dir.rmdir()
    except OSError:
        pass  # gone already, or not ours to clean: leave it


def claim_run_dir(recipe, resume: bool, overwrite: bool = False, allow_changes: bool = False) -> str | None:
    """Decide, before any work, what a run may do with its directory. Raises UserError when it must not
    start; returns a message when there is nothing to do (a finished run resumed), else None.

    New directory: fine. Old metrics or checkpoints without --resume: refused unless --overwrite (which
    removes them: metrics.jsonl, checkpoints/, tensorboard/, env_errors.jsonl), so two runs never mix in one
    directory.
    --resume: the recipe must equal the run's saved recipe.yaml unless --allow-changes.
    """
    import yaml

    from ..errors import UserError

    d, steps = recipe.run_dir, recipe.trainer.steps
    if steps == 0:
        raise UserError("trainer.steps is 0: nothing to train")
    if resume and overwrite:
        raise UserError("--resume continues a run and --overwrite replaces it: pass one of them")
    lock_run_dir(d)
    if resume:
        ckpt = latest_checkpoint(d)
        if ckpt is None:
            raise UserError(f"--resume: no checkpoint in {d}/checkpoints")
        saved = d / "recipe.yaml"
        if saved.exists():
            old_recipe = yaml.safe_load(saved.read_text()) or {}
            was_lora = ((old_recipe.get("model") or {}).get("lora") or {}).get("rank", 0) > 0
            if was_lora != (recipe.model.lora.rank > 0):
                raise UserError(f"--resume: {d} was trained {'with' if was_lora else 'without'} LoRA and this recipe "
                                f"is {'with' if not was_lora else 'without'} (model.lora); the checkpoint cannot "
                                "continue as the other kind: start a new run (model.path can be its hf/ folder)")
            changed = recipe_changes(old_recipe, recipe.to_dict())
            if changed and not allow_changes:
                raise UserError(f"--resume: the recipe differs from the one {d} was trained with: " + "; ".join(changed)
                                + " (pass --allow-changes to resume with these changes)")
        done = int(ckpt.name.rsplit("_", 1)[1])
        if done >= steps:
            return (f"{d} already finished: its last checkpoint is step {done} and trainer.steps is {steps}; nothing "
                    f"to do (to train further: --resume --set trainer.steps=N --allow-changes)")
        return None
    metrics = d / "metrics.jsonl"
    if metrics.exists() and metrics.stat().st_size == 0 and not (d / "checkpoints").exists():
        metrics.unlink()  # a start that failed before its first step: nothing to keep, nothing to mix with
    old = [name for name in ("metrics.jsonl", "checkpoints") if (d / name).exists()]
    if old and not overwrite:
        raise UserError(f"{d} already holds a run ({', '.join(old)}): --resume to continue it, --overwrite to "
                        f"replace it, or another run.name")
    if old:
        shutil.rmtree(d / "checkpoints", ignore_errors=True)
        shutil.rmtree(d / "tensorboard", ignore_errors=True)
        (d / "metrics.jsonl").unlink(missing_ok=True)
    (d / "env_errors.jsonl").unlink(missing_ok=True)  # a new run's log starts empty (--resume appends to its own)
    return None


@dataclass
class RunSetup:
    """What every training loop starts from (grpo.py, sft.py)."""

    rank: int
    world: int
    processor: object
    banned: list[int]  # token ids never sampled (image placeholders)
    policy: object  # the DeepSpeed engine of the policy
    dev: torch.device
    start: int  # first step to run (after --resume: the checkpoint's step)
    state: dict  # the checkpoint's client state ({} on a fresh run)
    log: MetricsLog | None  # rank 0 only

    def save(self, recipe, step: int, last: bool = False) -> None:
        """A checkpoint of optimizer step `step` (all ranks take part); `last`: the run ends with it. A LoRA run
        exports its merged model only then (`vlrl export` makes one of any other checkpoint): each would be the
        whole model's size."""
        from .lora import is_lora

        export = not is_lora(self.policy.module) or last
        save_checkpoint(self.policy, self.processor, recipe.run_dir, step, {"step": step, "rng": rng_state()}, self.rank,
                        export=export)

    def nothing_trained(self, recipe, step: int, why: str, trained_steps: int) -> None:
        """A step (1-based `step`) that trained on nothing: a loud warning; the last step of a run in which
        no step trained: an error, before any checkpoint of the untouched weights is written."""
        import sys

        from ..errors import UserError

        if step == recipe.trainer.steps and trained_steps == 0:
            raise UserError(f"the run trained on nothing in {step - self.start} step(s): {why}; no checkpoint written")
        if self.rank == 0:
            print(f"warning: step {step} trained on nothing: {why}", file=sys.stderr, flush=True)

    def record_env_errors(self, recipe, step: int, failed: list) -> Path:
        """This rank's episodes whose environment failed at step `step`, one line per record and message, to
        env_errors.jsonl in the run directory (every rank appends its own: one short line per write)."""
        import json

        from collections import Counter

        path = recipe.run_dir / "env_errors.jsonl"
        episodes = Counter((t.record_id, t.env_class, t.info["env_error"]) for t in failed)  # a group's n share one
        with writing(recipe.run_dir, "env_errors.jsonl"), open(path, "a", encoding="utf-8") as f:
            for (record_id, env_class, error), n in episodes.items():
                f.write(json.dumps({"step": step, "rank": self.rank, "record_id": record_id, "env_class": env_class,
                                    "episodes": n, "error": error}, ensure_ascii=False) + "\n")
                f.flush()
        return path

    def reached_target(self, recipe, step: int, accuracy: float) -> bool:
        """Whether validation at step `step` (1-based) reached trainer.stop_at_val_accuracy, the same answer on
        every rank (rank 0's: ranks that stopped apart would wait on each other forever)."""
        import sys

        from .distributed import all_ranks

        target = recipe.trainer.stop_at_val_accuracy
        if target is None:
            return False
        reached = all_ranks({"reached": float(accuracy >= target) if self.rank == 0 else 0.0})["reached"] > 0
        if reached and self.rank == 0:
            print(f"step {step}: held-out accuracy {accuracy:.3f} reached trainer.stop_at_val_accuracy {target}; "
                  "the run ends here", file=sys.stderr, flush=True)
        return reached

    def log_step(self, metrics: dict, on_step=None) -> None:
        """The step's metrics to metrics.jsonl (and TensorBoard / W&B), and to the progress callback."""
        if self.log:
            self.log.write(metrics)
        if on_step and self.rank == 0:
            on_step(metrics)


def setup_run(recipe, resume: bool) -> RunSetup:
    """Distributed init, seeds, processor, the DeepSpeed policy, --resume, the run directory and its log."""
    import yaml

    from .distributed import device, init_distributed, seed_everything
    from ..rollout.engines import placeholder_token_ids
    from ..errors import UserError
    from .policy import build_policy, compile_wanted
    from ..model.loading import load_processor

    tr, a = recipe.trainer, recipe.algorithm
    rank, world = init_distributed()
    seed_everything(tr.seed + rank)
    recipe.run_dir.mkdir(parents=True, exist_ok=True)
    processor = load_processor(recipe.model.path)
    total = tr.steps * (a.ppo_epochs if a.name == "grpo" else 1)  # optimizer steps, for the lr schedule
    policy = build_policy(recipe.model.path, tr.lr, tr.weight_decay, tr.warmup_steps, tr.zero_stage, tr.offload,
                          tr.grad_clip, recipe.model.dtype, recipe.model.gradient_checkpointing, total, tr.lr_schedule,
                          tr.zero3_persistence_threshold, recipe.model.attention, recipe.model.lora,
                          packed=tr.pack_tokens > 0, compile_blocks=compile_wanted(recipe.model.compile, tr.zero_stage),
                          grad_accum_fp32=tr.grad_accum_fp32, share_images=recipe.model.share_images)
    ckpt = latest_checkpoint(recipe.run_dir) if resume else None
    if resume and ckpt is None:
        raise UserError(f"--resume: no checkpoint in {recipe.run_dir}/checkpoints")
    state = load_checkpoint(policy, ckpt) if ckpt else {}
    if state.get("rng"):
        set_rng_state(state["rng"])
    start = state.get("step", 0)
    log = None
    if rank == 0:
        (recipe.run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        log = MetricsLog(recipe.run_dir, start if ckpt else None, recipe.run.tensorboard, recipe.run.wandb)
    return RunSetup(rank, world, processor, placeholder_token_ids(processor), policy, device(), start, state, log)
