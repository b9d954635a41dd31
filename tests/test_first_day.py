"""A new user's first day: their own data, their typos, their machine. Every case ends in a correct result or
one clear line (exit 2, naming the file, row, key, flag or path): never a silent wrong result, a traceback
or a half-written file."""

import io
import json
import socket
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from vlrl_cli.data.images import to_data_uri
from vlrl_process import run_vlrl


def one_line_error(r, *needles):
    """Exit 2 with a one-line error naming every needle, no traceback."""
    out = r.stderr if hasattr(r, "stderr") else r.output
    code = r.returncode if hasattr(r, "returncode") else r.exit_code
    assert code == 2, (code, out[-2000:])
    assert "Traceback" not in out and "internal error" not in out, out[-2000:]
    for n in needles:
        assert n in out, (n, out[-2000:])


def png(w, h, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


# --- silent wrong results ----------------------------------------------------------------------------------


@pytest.mark.model
def test_records_without_ids_are_each_their_own_record_in_rollouts_and_the_report(tmp_path, tiny_model, cli):
    rows = []
    for i, colour in enumerate(("red", "green", "blue")):
        uri = to_data_uri(png(56, 56, (250 if colour == "red" else 0, 250 if colour == "green" else 0,
                                       250 if colour == "blue" else 0)), "image/png")
        rows.append({"prompt": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                             {"type": "text", "text": f"colour? ({colour})"}]}],
                     "env_class": "colors", "reward_spec": {"method": "rule", "ground_truth": colour}})
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = cli("eval", tiny_model, data, "--out", tmp_path / "ev", "--max-new-tokens", "2")
    assert r.exit_code == 0, r.output
    ids = [json.loads(x)["record_id"] for x in (tmp_path / "ev" / "rollouts.jsonl").read_text().splitlines()]
    assert len(set(ids)) == 3 and all(ids), ids
    report = (tmp_path / "ev" / "report.html").read_text()
    for colour in ("red", "green", "blue"):
        assert f"colour? ({colour})" in report and f"answer: {colour}" in report


def test_a_classlabel_answer_column_becomes_the_class_names(tmp_path):
    import datasets

    from vlrl_cli.data.prepare import PrepareOptions, prepare
    from vlrl_cli.data.records import load_records

    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["cat", "dog", "bird"])})
    ds = datasets.Dataset.from_dict({"image": [Image.new("RGB", (56, 56), (i * 60, 0, 0)) for i in range(6)],
                                     "question": ["what animal?"] * 6, "label": [0, 1, 2, 0, 1, 2]}, features=features)
    ds.save_to_disk(str(tmp_path / "ds"))
    prepare(PrepareOptions(source=str(tmp_path / "ds"), out=tmp_path / "out", workers=1, split="train=1", source_opts={
        "image_column": "image", "question_column": "question", "answer_column": "label", "env_class": "colors"}))
    truths = sorted(r["reward_spec"]["ground_truth"] for r in load_records(str(tmp_path / "out" / "train.parquet")))
    assert truths == ["bird", "bird", "cat", "cat", "dog", "dog"], truths


def test_a_list_ground_truth_means_any_of_them_everywhere(tmp_path):
    import random

    from vlrl_cli.data.records import load_records, write_rows
    from vlrl_cli.rollout.envs.colors import ColorsEnv
    from vlrl_cli.rollout.envs.geometry3k import Geometry3kEnv
    from vlrl_cli.tools.validate import ValidateOptions, validate_paths
    from vlrl_cli.train.sft import target_text

    uri = to_data_uri(png(56, 56), "image/png")
    prompt = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                           {"type": "text", "text": "How many sides?"}]}]
    rows = [{"id": "a", "prompt": prompt, "env_class": "geometry3k", "reward_spec": {"method": "rule", "ground_truth": ["5", "five"]}},
            {"id": "b", "prompt": prompt, "env_class": "colors", "reward_spec": {"method": "rule", "ground_truth": ["red", "crimson"]}}]
    for suffix in (".jsonl", ".parquet"):
        path = tmp_path / f"rows{suffix}"
        write_rows(path, rows)
        assert validate_paths([path], ValidateOptions(workers=1)).errors == 0
        geo, col = load_records(str(path))
        env = Geometry3kEnv()
        env.reset(geo)
        assert env.step("so it is \\boxed{five}").reward == 1.0
        env.reset(geo)
        assert env.step("\\boxed{5}").reward == 1.0
        env.reset(geo)
        assert env.step("\\boxed{6}").reward == 0.0
        env = ColorsEnv()
        env.reset(col)
        assert env.step("crimson").reward == 1.0
        # SFT learns one answer, in the env's format, never the list's text
        assert target_text(geo, "ground_truth", random.Random(0))[1] == "\\boxed{5}"


@pytest.mark.model
def test_eval_on_a_multi_turn_env_plays_the_envs_turns_unless_told_otherwise(tmp_path, tiny_model, cli):
    from vlrl_cli.data.prepare import PrepareOptions, prepare

    prepare(PrepareOptions(source="maze2d", out=tmp_path / "maze", workers=1,
                           source_opts={"rows": 0, "val_rows": 3, "maze_size": 3, "max_steps": 3}))
    r = cli("eval", tiny_model, tmp_path / "maze" / "val.parquet", "--out", tmp_path / "ev", "--max-new-tokens", "3")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["turns_mean"] == 3.0, m  # a random model never reaches the goal: every move allowed is played
    r = cli("eval", tiny_model, tmp_path / "maze" / "val.parquet", "--out", tmp_path / "ev1", "--max-new-tokens", "3",
            "--max-turns", "1")
    assert json.loads((tmp_path / "ev1" / "metrics.json").read_text())["turns_mean"] == 1.0


def test_prepare_honours_every_flag_it_is_given_and_writes_only_the_splits_asked_for(tmp_path, cli):
    from vlrl_cli.data.records import count_rows

    r = cli("prepare", "colors", "--out", tmp_path / "c", "--rows", "40", "--val-rows", "8")
    assert r.exit_code == 0, r.output
    assert count_rows(tmp_path / "c" / "val.parquet") == 8 and count_rows(tmp_path / "c" / "train.parquet") == 40
    r = cli("prepare", "colors", "--out", tmp_path / "s", "--rows", "40", "--split", "train=0.8,validation=0.2")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "s").glob("*.parquet")) == ["train.parquet", "validation.parquet"]
    one_line_error(cli("prepare", "colors", "--out", tmp_path / "x", "--maze-size", "3"), "--maze-size", "colors")
    assert not (tmp_path / "x" / "train.parquet").exists()


# --- crashes where a message belongs ------------------------------------------------------------------------


def test_eval_with_several_samples_and_greedy_decoding_says_what_to_set(tmp_path, tiny_model, colors_data):
    t = time.time()
    r = run_vlrl("eval", tiny_model, colors_data / "val.parquet", "--out", tmp_path / "ev", "--n", "4")
    one_line_error(r, "--temperature", "--n 4")
    assert time.time() - t < 60 and not (tmp_path / "ev").exists()  # before any model loads


def test_numbers_are_read_as_the_key_needs_them(tmp_path, tiny_model, colors_data):
    from vlrl_cli.train.recipe import RecipeError, load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(f"model: {{path: {tiny_model}}}\ndata: {{train: {colors_data / 'train.parquet'}}}\n"
                    "trainer: {steps: 2.0, lr: 1e-5, warmup_steps: 1e1}\n")
    rec = load_recipe(path)
    assert rec.trainer.steps == 2 and isinstance(rec.trainer.steps, int) and rec.trainer.lr == 1e-5
    assert rec.trainer.warmup_steps == 10 and isinstance(rec.trainer.warmup_steps, int)
    assert load_recipe(path, ["trainer.steps=1e3"]).trainer.steps == 1000
    assert load_recipe(path, ["run.name=001"]).run.name == "001"  # text keys keep what was typed
    with pytest.raises(RecipeError, match=r"trainer.steps: must be an integer; --set trainer.steps=2.5 gives the number 2.5$"):
        load_recipe(path, ["trainer.steps=2.5"])
    with pytest.raises(RecipeError, match=r"must be an integer; --set trainer.steps=abc gives the string 'abc'$"):
        load_recipe(path, ["trainer.steps=abc"])
    # a value YAML reads as a number where a string is wanted: the message says what it became
    with pytest.raises(RecipeError, match=r"envs.mine: must be a string; --set envs.mine=5 gives the integer 5$"):
        load_recipe(path, ["envs.mine=5"])


def test_an_image_the_processor_would_refuse_is_refused_by_prepare_and_validate(tmp_path, cli):
    from vlrl_cli.data.records import write_rows

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "banner.png").write_bytes(png(5620, 29))
    (tmp_path / "imgs" / "ok.png").write_bytes(png(300, 100))
    rows = [{"image": "imgs/banner.png", "q": "read it", "a": "x"}, {"image": "imgs/ok.png", "q": "read it", "a": "y"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = cli("prepare", tmp_path / "d.jsonl", "--out", tmp_path / "out", "--image-column", "image", "--question-column", "q",
            "--answer-column", "a", "--env-class", "geometry3k", "--split", "train=1")
    assert r.exit_code == 0, r.output
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 1 and "aspect" in json.dumps(rejects[0]), rejects
    # a record written by another tool with the banner as it is: validate names the row
    uri = to_data_uri(png(5628, 28), "image/png")
    write_rows(tmp_path / "theirs.jsonl", [{"id": "b", "prompt": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "read it"}]}],
        "env_class": "geometry3k", "reward_spec": {"method": "rule", "ground_truth": "x"}}])
    r = cli("validate", tmp_path / "theirs.jsonl")
    assert r.exit_code == 1 and "image_aspect" in r.output, r.output


def test_an_output_folder_that_cannot_be_written_is_one_line_naming_it(tmp_path, tiny_model, colors_data, cli):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"path": str(tiny_model)}, "data": {"train": str(colors_data / "train.parquet")},
                                      "run": {"dir": str(blocker / "runs")}}))
    for args in (("prepare", "colors", "--out", blocker / "data", "--rows", "4"),
                 ("tiny-model", blocker / "model"),
                 ("eval", tiny_model, colors_data / "val.parquet", "--out", blocker / "ev", "--limit", "1"),
                 ("train", recipe)):
        one_line_error(cli(*args), str(blocker))


def test_a_json_or_plot_path_that_cannot_be_written_is_refused_before_any_work(tmp_path, tiny_model, colors_data, cli):
    """Found at the end, an unwritable report path would throw away a whole check-drift, eval or training run."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"path": str(tiny_model)}, "data": {"train": str(colors_data / "train.parquet")},
                                      "run": {"dir": str(tmp_path / "runs")}}))
    data = colors_data / "val.parquet"
    commands = (("check-drift", tiny_model, data, "--samples", "2"), ("eval", tiny_model, data, "--out", tmp_path / "ev"),
                ("train", recipe), ("prepare", "colors", "--out", tmp_path / "d", "--rows", "4"), ("validate", data))
    for command in commands:
        for flag, target, needle in (("--json", blocker / "report.json", f"{blocker} is a file"),
                                     ("--json", tmp_path, "is a folder: name a file")):
            one_line_error(cli(*command, flag, target), flag, needle)
    one_line_error(cli(*commands[0], "--plot", blocker / "d.png"), "--plot", f"{blocker} is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "r.yaml"]  # nothing was started


def test_eval_and_check_drift_check_the_rows_they_read_not_the_whole_file(tmp_path, tiny_model, colors_data, cli):
    """A large file with a bad row far down must not stop `eval --limit 2` or a 2-sample check-drift, which never
    read it (on a real dataset, checking every image first would also take minutes); a run that reads it stops."""
    import pyarrow.parquet as pq

    rows = pq.read_table(colors_data / "val.parquet").to_pylist()[:4] + [{"id": "broken", "prompt": 7}]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = cli("eval", tiny_model, data, "--out", tmp_path / "ev", "--limit", 2, "--max-new-tokens", 4)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["records"] == 2
    r = cli("check-drift", tiny_model, data, "--samples", 2, "--max-new-tokens", 4)
    assert r.exit_code == 0, r.output
    one_line_error(cli("eval", tiny_model, data, "--out", tmp_path / "all"), f"{data}:4")


def test_serve_on_a_busy_port_says_so_before_loading_the_model(tmp_path, tiny_model):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        t = time.time()
        r = run_vlrl("serve", tiny_model, "--port", port, "--api-key", "tml-0123456789", "--state", tmp_path / "state")
    one_line_error(r, f"--port {port}")
    assert time.time() - t < 60 and not (tmp_path / "state").exists()


# --- slow or unclear -----------------------------------------------------------------------------------------


def test_a_hub_id_without_a_network_fails_in_seconds_and_creates_nothing(tmp_path, colors_data):
    env = {"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"}  # a port nothing listens on
    t = time.time()
    r = run_vlrl("eval", "some-org/some-model", colors_data / "val.parquet", "--out", tmp_path / "ev", env_extra=env)
    one_line_error(r, "some-org/some-model", "cannot be reached")
    assert time.time() - t < 60 and not (tmp_path / "ev").exists()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"path": "some-org/some-model"}, "data": {"train": str(colors_data / "train.parquet")},
                                      "run": {"dir": str(tmp_path / "runs")}}))
    one_line_error(run_vlrl("train", recipe, env_extra=env), "some-org/some-model")
    assert not (tmp_path / "runs").exists()


def test_resume_of_a_finished_run_still_writes_the_json_it_promises(tmp_path, tiny_model, colors_data):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"path": str(tiny_model)}, "data": {"train": str(colors_data / "train.parquet")},
        "rollout": {"prompts_per_step": 2}, "algorithm": {"name": "sft", "sft_target": "random_choice"},
        "trainer": {"steps": 1, "lr": 1e-4, "micro_batch": 2}, "run": {"name": "001", "dir": str(tmp_path / "runs")}}))
    assert run_vlrl("train", recipe).returncode == 0
    r = run_vlrl("train", recipe, "--resume", "--json", tmp_path / "out.json")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["finished"] is True and out["step"] == 1 and Path(out["run_dir"]).name == "001"


@pytest.mark.parametrize("args", [
    ("prepare", "colors", "--out", "", "--rows", "4"),
    ("tiny-model", ""),
    ("validate", ""),
    ("eval", "some-model", "", "--out", "ev"),
    ("eval", "some-model", "val.jsonl", "--out", ""),
    ("check-drift", "some-model", "val.jsonl", "--plot", ""),
    ("export", "runs/x", "--out", ""),
])
def test_an_empty_path_is_refused_never_read_as_the_working_folder(tmp_path, cli, monkeypatch, args):
    """`--out "$DIR"` with DIR unset was read as ".": prepare and eval wrote into the working folder, export
    merged a model into it. Every path flag and argument refuses an empty value, exit 2, before any work."""
    monkeypatch.chdir(tmp_path)
    r = cli(*args)
    assert r.exit_code == 2 and "an empty path" in r.output, r.output
    assert list(tmp_path.iterdir()) == []
