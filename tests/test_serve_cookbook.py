"""Unmodified tinker-cookbook 0.6.1 recipes, through the real tinker 0.38 SDK, against `vlrl serve` (the CLI, a
process of its own), offline: vlm_classifier (images, SFT) and rl_loop (text RL, stable_reinforce).

What they download is replaced by local stand-ins (tests/tinker_client/offline_setup.py): a caltech101-shaped
image dataset, a gsm8k-shaped one, and the tiny model's tokenizer cached under a hub name (rl_loop picks its
renderer by name). rl_loop needs rewards that differ within a group or it trains nothing: the served model is
the tiny Qwen3-VL taught to answer \\boxed{7} or \\boxed{8} (tests/tinker_client/boxed_model.py).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Not `model`: what transformers decides in serve (model inputs, scoring, sampling) is tested on the oldest
# supported release by tests/test_serve.py; these run the cookbook's own scripts end to end on the newest.
HERE = Path(__file__).resolve().parent / "tinker_client"
HUB_NAME = "Qwen/Qwen3-VL-30B-A3B-Instruct"
KEY = "tml-cookbook-test-key"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from vlrl_cli.model.tiny import build_tiny_model

    from test_serve import serve_subprocess

    root = tmp_path_factory.mktemp("cookbook")
    tiny = build_tiny_model(root / "tiny-qwen3_vl", "qwen3_vl")
    model = root / "boxed-qwen3_vl"
    subprocess.run([sys.executable, str(HERE / "boxed_model.py"), str(tiny), str(model)], check=True,
                   capture_output=True)
    work = root / "work"
    work.mkdir()
    subprocess.run([sys.executable, str(HERE / "offline_setup.py"), str(work), str(model), HUB_NAME], check=True,
                   capture_output=True)
    server, url = serve_subprocess(model, root / "state", root / "server.log", KEY, "--name", HUB_NAME)
    env = {**os.environ, "TINKER_API_KEY": KEY, "TINKER_TELEMETRY": "0", "HF_HOME": str(work / "hf"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    yield {"url": url, "model": model, "work": work, "env": env, "state": root / "state", "log": root / "server.log"}
    server.terminate()
    server.wait(30)


def run_recipe(served, module: str, *args: str) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", module, f"base_url={served['url']}", *args], cwd=served["work"],
                       env=served["env"], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"{module} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}\n" \
                              f"server log:\n{served['log'].read_text()[-3000:]}"
    return p


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def server_events(served, op: str) -> list[dict]:
    log = served["state"] / "requests.jsonl"  # written at the server's first request: none yet is no events
    return [e for e in metrics(log) if e["op"] == op] if log.exists() else []


def test_vlm_classifier_recipe_trains_on_images_and_its_nll_falls(served, tmp_path):
    run_recipe(served, "tinker_cookbook.recipes.vlm_classifier.train", f"experiment_dir={tmp_path}",
               "dataset=caltech101", f"model_name={served['model']}", "renderer_name=qwen3_vl_instruct",
               "batch_size=4", "max_steps=6", "n_eval=4", "max_tokens=8", "save_every=3", "eval_every=3",
               "learning_rate=1e-3", "behavior_if_log_dir_exists=delete")
    (run,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    rows = metrics(run / "metrics.jsonl")
    nll = [r["train_mean_nll"] for r in rows if "train_mean_nll" in r]
    assert len(nll) == 6 and all(math.isfinite(x) for x in nll)
    assert nll[-1] < nll[0], nll
    assert any("test/nll" in r and math.isfinite(r["test/nll"]) for r in rows)
    # the images reached the trainer as image chunks (one per datum), not as text
    fb = [e for e in server_events(served, "forward_backward") if e["loss_fn"] == "cross_entropy"]
    assert fb and all(math.isfinite(e["loss_sum"]) for e in fb)
    assert sum(e["images"] for e in fb) >= sum(e["datums"] for e in fb) > 0


def test_rl_loop_recipe_samples_and_trains_with_stable_reinforce(served, tmp_path):
    before = len(server_events(served, "optim_step"))
    run_recipe(served, "tinker_cookbook.recipes.rl_loop", f"model_name={HUB_NAME}", f"log_path={tmp_path / 'rl'}",
               "batch_size=2", "group_size=4", "max_tokens=16", "max_steps=3")
    rows = metrics(tmp_path / "rl" / "metrics.jsonl")
    assert len(rows) == 3 and all(math.isfinite(r["reward/total"]) for r in rows)
    trained = [r for r in rows if "grad_norm:mean" in r]
    assert trained and all(math.isfinite(r["grad_norm:mean"]) for r in trained)
    fb = [e for e in server_events(served, "forward_backward") if e["loss_fn"] == "stable_reinforce"]
    assert len(fb) == len(trained) and all(math.isfinite(e["loss_sum"]) for e in fb)
    assert len(server_events(served, "optim_step")) - before == len(trained)
