"""A shipped recipe at its real shape on a GPU, with random weights of its model's released size.

Everything the recipe sets is kept: the model's real size (families.REAL_SIZES), max tokens, turns, images,
packing, KL, LoRA, ZeRO stage, the engine. Only the prompts per step may be cut (--prompts) so that a few
steps fit one device call, and the data are built here: Geometry3K from the real sample carried with the
run, Maze2D and colours generated at the recipe's own shape. --gpu-gb caps the run at a smaller GPU's memory
(the trainer's allocator and vLLM's share of the card), so an 80 GB recipe is proven on a 141 GB H200.

    python3 bench/recipe_shape.py recipes/geometry3k-7b-lora.yaml --prompts 8 --steps 2 --gpu-gb 80 \
        --work /tmp/shape --out $OUT/geometry3k-7b-lora.json

Writes one row: per step the phase times, the trainer's peak, the engine's pool, drift mean/max; the
checkpoint's size on disk (LoRA and tiny runs write one; a full fine-tune's is estimated, not written: a 3B
model's optimizer state alone is over 40 GB); passed = every step ran and the drift is small.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from any folder
GEOMETRY_SAMPLE = ROOT / "bench" / ".work" / "geometry3k-sample"  # copied there from ../shared to travel


def data_for(recipe, work: Path, rows: int) -> tuple[str, str | None]:
    """Records of the recipe's kind at its shape, on its model's image grid: (train, val)."""
    from vlrl_cli.data.images import CanonicalSpec
    from vlrl_cli.data.prepare import PrepareOptions, prepare
    from vlrl_cli.model.families import FAMILY, HUB_IDS, REAL_SIZES

    size = HUB_IDS.get(recipe.model.path.lower())
    family = FAMILY[REAL_SIZES[size][0]] if size else FAMILY["qwen2_5_vl"]
    factor = family.patch_size * family.merge_size  # the image grid the model's processor snaps to
    spec = CanonicalSpec(factor=factor)
    train = recipe.data.train
    out = work / "data"
    if "geo" in train:
        opts = PrepareOptions(source="geometry3k", out=out, path=str(GEOMETRY_SAMPLE), workers=4, split="train=1.0",
                              overwrite=True, spec=spec)
    elif "maze" in train:
        turns = recipe.rollout.max_turns or 20
        # the CPU demos' mazes (2x2 in two moves; 3x3 whose route takes four), else VisGym's 5x5 in 20 moves
        maze = ({"maze_size": 2, "cell_px": 56} if turns <= 2 else
                {"maze_size": 3, "cell_px": 56, "min_moves": 4, "max_moves": 4, "reward": "progress"} if turns <= 4 else
                {"maze_size": 5, "cell_px": factor})
        opts = PrepareOptions(source="maze2d", out=out, workers=4, overwrite=True, spec=spec, source_opts={
            "rows": rows, "val_rows": 8, "max_steps": turns, **maze})
    else:
        opts = PrepareOptions(source="colors", out=out, workers=4, overwrite=True, spec=spec,
                              source_opts={"rows": rows, "image_size": 84})
    prepare(opts)
    val = out / "val.parquet"
    return str(out / "train.parquet"), str(val) if val.exists() else None


def model_for(recipe, work: Path) -> tuple[str, str]:
    """A random model of the recipe's model at its released size (a tiny one for the CPU demo's recipes)."""
    from vlrl_cli.model.families import HUB_IDS
    from vlrl_cli.model.tiny import build_real_size_model, build_tiny_model

    size = HUB_IDS.get(recipe.model.path.lower())
    out = work / "models" / (size or "tiny-qwen2_5_vl")
    if not (out / "config.json").exists():
        if size:
            build_real_size_model(out, size)
        else:
            build_tiny_model(out, "qwen2_5_vl")
    return str(out), size or "tiny qwen2_5_vl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per step (default: the recipe's)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--gpu-gb", type=float, default=None, help="cap the run at this much GPU memory")
    ap.add_argument("--work", default="/tmp/shape")
    ap.add_argument("--out", required=True)
    ap.add_argument("--keep-model", action="store_true", help="keep the random model for the next recipe")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="change the recipe first (e.g. model.path=Qwen/Qwen3.5-4B: the recipe's shape on another "
                         "released size); the row is then named NAME@SIZE")
    ap.add_argument("--name", default=None, help="the row's name (default: the recipe's, @ the size when --set)")
    a = ap.parse_args()

    import torch
    import yaml

    from vlrl_cli.model.families import HUB_IDS
    from vlrl_cli.train.recipe import load_recipe, with_overrides

    recipe = load_recipe(a.recipe, check_paths=False)
    name = Path(a.recipe).stem
    if a.set:
        recipe = with_overrides(recipe, a.set)
        name = f"{name}@{HUB_IDS.get(recipe.model.path.lower(), 'changed')}"
    name = a.name or name
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, size = model_for(recipe, work)
    t_model = time.perf_counter() - t0
    prompts = a.prompts or recipe.rollout.prompts_per_step
    train, val = data_for(recipe, work / name.replace("@", "-"), max(prompts * a.steps, 16))
    gpu = torch.cuda.is_available()  # (the CPU runs the tiny recipes: a dry run of this script)
    total_gb = torch.cuda.get_device_properties(0).total_memory / 1e9 if gpu else 0.0
    scale = min(1.0, a.gpu_gb / total_gb) if a.gpu_gb and gpu else 1.0
    # a recipe sized for several GPUs keeps a whole optimizer state on one: its vLLM pool is what one of its GPUs
    # would give, its trainer is not capped (the per-GPU share of ZeRO-3 cannot be run on one GPU)
    from vlrl_cli.train.plan import parse_sized_for

    cap_trainer = recipe.trainer.sized_for == "cpu" or parse_sized_for(recipe.trainer.sized_for)[0] == 1
    lora = recipe.model.lora.rank > 0
    tiny = size.startswith("tiny")
    safe = name.replace("@", "-")  # a run's name and a file name
    data = at_shape(recipe, model=model, train=train, val=val, prompts=prompts, steps=a.steps, scale=scale,
                    write_checkpoints=lora or tiny, run_name=safe, run_dir=work / "runs")
    derived = work / f"{safe}.yaml"
    derived.write_text(yaml.safe_dump(data, sort_keys=False))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if a.gpu_gb and gpu and cap_trainer:
        env["VLRL_TRAINER_MEMORY_FRACTION"] = str(scale)  # read by the trainer process below (bench only)
    log = Path(a.out).with_suffix(".log")
    t1 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, str(Path(__file__).with_name("capped_train.py")), str(derived),
                              "--overwrite"], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
    wall = time.perf_counter() - t1
    run_dir = work / "runs" / safe
    from vlrl_cli.train.runs import read_metrics

    steps = read_metrics(run_dir)
    ckpt = run_dir / "checkpoints"
    du = lambda d: sum(p.stat().st_size for p in d.rglob("*") if p.is_file())  # noqa: E731
    per_checkpoint = {c.name: {part.name: du(part) for part in sorted(c.iterdir()) if part.is_dir()}
                      for c in sorted(ckpt.glob("step_*")) if c.is_dir()} if ckpt.exists() else {}
    written = du(ckpt) if ckpt.exists() else 0
    keys = ("step", "time_step_s", "time_generate_s", "time_score_s", "time_train_s", "time_sync_s", "trainer_mem_peak_gb",
            "trainer_mem_held_gb", "engine_mem_gb", "drift_abs_mean", "drift_abs_max", "kl", "micro_batches",
            "trained_sequences", "prompt_len_mean", "response_len_mean", "padding_frac", "reward_mean", "loss")
    row = {
        "name": name, "recipe": a.recipe, "sets": a.set, "model": recipe.model.path, "size": size, "device": torch.cuda.get_device_name(0) if gpu else "cpu",
        "gpu_gb_cap": a.gpu_gb, "trainer_capped": bool(a.gpu_gb and gpu and cap_trainer),
        "gpu_memory_utilization_run": data["rollout"]["gpu_memory_utilization"],
        "shape": {"prompts_per_step": prompts, "prompts_per_step_recipe": recipe.rollout.prompts_per_step,
                  "n": recipe.rollout.n, "max_new_tokens": recipe.rollout.max_new_tokens,
                  "max_turns": recipe.rollout.max_turns, "max_context_tokens": recipe.rollout.max_context_tokens,
                  "pack_tokens": recipe.trainer.pack_tokens, "kl_coef": recipe.algorithm.kl_coef,
                  "lora_rank": recipe.model.lora.rank, "zero_stage": recipe.trainer.zero_stage,
                  "engine": recipe.rollout.engine, "algorithm": recipe.algorithm.name},
        "returncode": rc, "wall_s": round(wall, 1), "model_build_s": round(t_model, 1),
        "steps": [{k: m.get(k) for k in keys if k in m} for m in steps],
        "checkpoint_bytes_written": written, "checkpoint_parts": per_checkpoint,
        "log_tail": log.read_text()[-2000:] if rc else "",
    }
    if not (lora or tiny):
        row["checkpoint_bytes_estimated"] = estimate_full_checkpoint(model, recipe)
    row["passed"] = passed(row, a.steps)
    Path(a.out).write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps({k: row[k] for k in ("recipe", "passed", "returncode", "wall_s")}))
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    if not a.keep_model and not tiny:
        shutil.rmtree(model, ignore_errors=True)


def at_shape(recipe, *, model: str, train: str, val: str | None, prompts: int, steps: int, scale: float,
             write_checkpoints: bool, run_name: str, run_dir: Path) -> dict:
    """The recipe as this script runs it: its own model size, data built here, fewer prompts per step, a few
    steps without validation, vLLM's pool scaled to the GPU named. Everything else as shipped."""
    data = recipe.to_dict()
    data["model"]["path"] = model
    data["data"].update(train=train, val=val)
    data["rollout"]["prompts_per_step"] = prompts
    data["rollout"]["gpu_memory_utilization"] = round(recipe.rollout.gpu_memory_utilization * scale, 4)
    # LoRA and tiny runs write their checkpoints (every step: a LoRA run's last one also holds the merged
    # model, the others its adapters alone); a full fine-tune's is estimated (a 3B one is over 50 GB).
    # No validation in a few steps, so nothing can stop on a held-out accuracy either.
    data["trainer"].update(steps=steps, eval_every=0, stop_at_val_accuracy=None,
                           save_every=1 if write_checkpoints else 0, save_final=write_checkpoints)
    data["run"].update(name=run_name, dir=str(run_dir))
    return data


def passed(row: dict, steps: int) -> bool:
    """The recipe ran at its shape: every step, and (capped) the trainer and the engine within the GPU named.
    Engine/trainer drift is reported beside it, not judged here: with random weights it says little of a trained
    model's (check-drift on real weights, and the GPU tests on the tiny models, hold drift to its bounds)."""
    if row["returncode"] != 0 or len(row["steps"]) != steps:
        return False
    cap = row.get("gpu_gb_cap") if row.get("trainer_capped") else None
    peak = max((m.get("trainer_mem_peak_gb") or 0.0) + (m.get("engine_mem_gb") or 0.0) for m in row["steps"])
    return cap is None or peak <= cap


def estimate_full_checkpoint(model: str, recipe) -> int:
    """A full fine-tune's checkpoint: bf16 weights, fp32 master weights and two Adam moments, and the hf/ export."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    with torch.device("meta"):
        m = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(model))
    params = sum(p.numel() for p in m.parameters())
    width = 2 if recipe.model.dtype == "bfloat16" else 4
    return params * (width + 8 + (4 if width == 2 else 0)) + params * width


if __name__ == "__main__":
    main()
