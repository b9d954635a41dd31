"""Runs that would do nothing, or the wrong thing, say so instead of succeeding silently."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import terminal_sigint
from vlrl_process import run_vlrl


def recipe(tmp_path, tiny_model, colors_data, name, algo="grpo", **trainer_and_data):
    data = {"train": str(colors_data / "train.parquet"), "val": None}
    data.update(trainer_and_data.pop("data", {}))
    r = {"model": {"path": str(tiny_model)}, "data": data,
         "rollout": {"n": 2, "prompts_per_step": 2, "max_new_tokens": 3},
         "algorithm": {"name": algo, **({"sft_target": "ground_truth"} if algo == "sft" else {})},
         "trainer": {"steps": 2, "lr": 1e-3, **trainer_and_data}, "run": {"name": name, "dir": str(tmp_path / "runs")}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


@pytest.mark.parametrize("algo", ["grpo", "sft"])
def test_a_run_that_trains_on_nothing_is_an_error_and_saves_nothing(tmp_path, tiny_model, colors_data, algo):
    rec = recipe(tmp_path, tiny_model, colors_data, f"none-{algo}", algo, data={"max_prompt_tokens": 5})
    r = run_vlrl("train", rec)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "trained on nothing" in r.stderr and "max_prompt_tokens" in r.stderr
    assert "warning: step 1 trained on nothing" in r.stderr  # each empty step is said out loud too
    assert not (tmp_path / "runs" / f"none-{algo}" / "checkpoints").exists()


def test_an_old_run_directory_is_never_mixed_into(tmp_path, tiny_model, colors_data):
    rec = recipe(tmp_path, tiny_model, colors_data, "r", "sft")
    assert run_vlrl("train", rec).returncode == 0
    run = tmp_path / "runs" / "r"
    r = run_vlrl("train", rec)
    assert r.returncode == 2 and "already holds a run" in r.stderr and "--overwrite" in r.stderr
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2  # untouched
    r = run_vlrl("train", rec, "--overwrite", "--set", "trainer.steps=1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_1"]  # step_2 is gone

    # resume with another recipe: the changed key is named, and refused unless asked for
    r = run_vlrl("train", rec, "--resume")  # trainer.steps is 2 in the file, 1 in the run's recipe.yaml
    assert r.returncode == 2 and "trainer.steps: 1 -> 2" in r.stderr and "--allow-changes" in r.stderr
    r = run_vlrl("train", rec, "--resume", "--allow-changes")
    assert r.returncode == 0, r.stderr[-2000:]
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # a finished run, resumed: says so, exit 0, nothing loaded or written
    before = (run / "metrics.jsonl").read_text()
    r = run_vlrl("train", rec, "--resume")
    assert r.returncode == 0 and "already finished" in r.stderr and (run / "metrics.jsonl").read_text() == before
    r = run_vlrl("train", rec, "--overwrite", "--set", "trainer.steps=0")
    assert r.returncode == 2 and "trainer.steps is 0" in r.stderr


def test_bad_rows_are_named_before_any_model_loads(tmp_path, tiny_model, colors_data):
    rows = pq.read_table(colors_data / "train.parquet").to_pylist()[:6]
    rows[2]["reward_spec"]["ground_truth"] = ""
    rows[4]["prompt"][0]["role"] = "narrator"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run_vlrl("train", recipe(tmp_path, tiny_model, colors_data, "bad", data={"train": str(bad)}))
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"{bad}:2: [missing_ground_truth]" in r.stderr and f"{bad}:4:" in r.stderr and "narrator" in r.stderr
    assert "2 of 6 rows" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "runs" / "bad" / "metrics.jsonl").exists()


def test_eval_limit_zero_and_a_missing_vllm_are_clear_errors(tmp_path, tiny_model, colors_data):
    r = run_vlrl("eval", tiny_model, colors_data / "val.parquet", "--out", tmp_path / "e", "--limit", "0")
    assert r.returncode == 2 and "limit" in r.stderr.lower()
    import importlib.util

    assert importlib.util.find_spec("vllm") is None, "this test expects a machine without vLLM"
    r = run_vlrl("eval", tiny_model, colors_data / "val.parquet", "--out", tmp_path / "e", "--engine", "vllm")
    assert r.returncode == 2 and 'pip install "vlrl[vllm]"' in r.stderr and "Traceback" not in r.stderr
    rec = recipe(tmp_path, tiny_model, colors_data, "v")
    r = run_vlrl("train", rec, "--set", "rollout.engine=vllm")
    assert r.returncode == 2 and 'pip install "vlrl[vllm]"' in r.stderr
    r = run_vlrl("check-drift", tiny_model, colors_data / "val.parquet", "--engine", "vlm")
    assert r.returncode == 2 and "hf or vllm" in r.stderr


def test_a_mistyped_local_model_path_is_named_at_once(tmp_path, colors_data):
    (tmp_path / "models").mkdir()
    for args in (["eval", "models/typo", colors_data / "val.parquet", "--out", tmp_path / "e"],
                 ["validate", colors_data / "val.parquet", "--processor", "./models/typo"]):
        r = run_vlrl(*args, cwd=tmp_path, timeout=120)
        assert r.returncode == 2, r.stderr[-1500:]
        assert "models/typo" in r.stderr and "no such model folder" in r.stderr and "huggingface" not in r.stderr.lower()


def test_a_model_file_in_place_of_its_folder_is_named_with_the_folder(tmp_path, tiny_model, colors_data):
    """A user who points MODEL at the model's config.json (or a weights file) is told to pass its folder."""
    r = run_vlrl("eval", Path(tiny_model) / "config.json", colors_data / "val.parquet", "--out", tmp_path / "e")
    assert r.returncode == 2, r.stderr[-1500:]
    assert "config.json: a file, not a model folder" in r.stderr and f"({tiny_model})" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "e").exists()


def test_train_json_to_stdout_is_only_json_and_ctrl_c_ends_a_run_with_130(tmp_path, tiny_model, colors_data):
    import signal
    import time

    rec = recipe(tmp_path, tiny_model, colors_data, "j", "sft", steps=1)
    r = run_vlrl("train", rec, "--json", "-")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["step"] == 1  # DeepSpeed's own prints went to stderr

    rec = recipe(tmp_path, tiny_model, colors_data, "long", "grpo", steps=500)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("VLRL_RUN_CLAIMED", None)
    p = subprocess.Popen([sys.executable, "-m", "vlrl_cli", "train", str(rec)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
                         preexec_fn=terminal_sigint)
    metrics = tmp_path / "runs" / "long" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    t = time.time()
    _, err = p.communicate(timeout=60)
    assert time.time() - t < 15 and p.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    # what it left, and the command that goes on (no checkpoint yet: save_every is the recipe's default)
    assert f"stopped before its first checkpoint; `vlrl train {rec} --overwrite`" in err, err[-2000:]
    assert_curves(tmp_path / "runs" / "long")  # the steps that ran, plotted on the way out


def assert_curves(run_dir):
    """curves.png is a whole PNG image, newer than the last metrics line."""
    from PIL import Image

    png = run_dir / "curves.png"
    assert png.exists(), sorted(p.name for p in run_dir.iterdir())
    with Image.open(png) as im:
        im.verify()
    assert png.stat().st_mtime >= (run_dir / "metrics.jsonl").stat().st_mtime
    assert not list(run_dir.glob(".curves.*"))


def test_curves_plot_every_panel_that_has_data_and_skip_a_torn_line(tmp_path):
    from PIL import Image

    from vlrl_cli.train.curves import write_curves

    run = tmp_path / "r"
    run.mkdir()
    assert write_curves(run) is None  # no metrics yet: nothing, no error
    rows = [{"step": i, "reward_mean": i / 10, "accuracy": i / 10, "drift_abs_mean": 1e-3, "drift_abs_max": 1e-2,
             "entropy": 0.5, "time_generate_s": 1.0, "time_train_s": 2.0, **({"val_accuracy": 0.5} if i % 2 == 0 else {})}
            for i in range(1, 5)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "rew')
    png = write_curves(run)
    with Image.open(png) as im:
        w, h = im.size
    assert (w, h) == (1080, 864)  # 5 panels (no SFT loss) in 2 columns: 3 rows
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0, "time_train_s": 1.0}) + "\n")
    with Image.open(write_curves(run)) as im:  # SFT: loss and step time only
        assert im.size == (1080, 288)


def test_ctrl_c_before_an_eval_writes_anything_leaves_no_folder_behind(tmp_path, tiny_model, colors_data):
    """Ctrl-C while the model loads: exit 130 and no --out folder holding only a lock file."""
    import signal
    import time

    out = tmp_path / "ev"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-m", "vlrl_cli", "eval", str(tiny_model), str(colors_data / "val.parquet"),
                          "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True, preexec_fn=terminal_sigint)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / ".lock").exists():
        time.sleep(0.02)
    assert (out / ".lock").exists(), p.communicate()[1][-2000:]
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    # 130, or ended by the signal itself where it lands in the interpreter's own shutdown: a shell shows 130 for both
    assert p.returncode in (130, -signal.SIGINT), err[-2000:]
    assert not out.exists() or any(f.name != ".lock" for f in out.iterdir()), sorted(out.iterdir())
