"""vlrl eval: metrics against a hand count, the pass@k estimator, and report.html in a real headless browser."""

import json
import re
import shutil
import subprocess

import pytest

from vlrl_cli.rollout.engines import Generation, Sampling
from vlrl_cli.tools.evaluate import EvalOptions, pass_at_k, run_eval


@pytest.mark.parametrize("n,c,k,expected", [
    (5, 2, 1, 0.4), (5, 2, 2, 0.7), (10, 3, 5, 1 - 21 / 252), (5, 0, 3, 0.0), (5, 5, 1, 1.0), (4, 1, 4, 1.0),
    (3, 1, 2, 2 / 3)])
def test_pass_at_k_known_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


class ScriptedEngine:
    """Answers sample j of record i with ANSWERS[(i + j) % 4]: correctness is known in advance."""

    ANSWERS = ["red", "green", "blue", "yellow"]

    def __init__(self, tokenizer):
        self.tok, self.calls = tokenizer, 0

    def generate(self, requests, sampling):
        out = []
        for req in requests:
            i, self.calls = self.calls, self.calls + 1
            gens = []
            for j in range(req.n):
                ids = self.tok.encode(f"The colour is {self.ANSWERS[(i + j) % 4]}.") + [self.tok.eos_token_id]
                gens.append(Generation(ids, [0.0] * len(ids), "stop"))
            out.append(gens)
        return out


def test_eval_metrics_match_a_hand_count(tmp_path, tiny_model, colors_data):
    from vlrl_cli.data.records import load_records
    from vlrl_cli.model.loading import load_processor

    records = load_records(str(colors_data / "val.parquet"), 8)
    engine = ScriptedEngine(load_processor(str(tiny_model)).tokenizer)
    m = run_eval(str(tiny_model), str(colors_data / "val.parquet"), tmp_path, EvalOptions(n=3, limit=8, sampling=Sampling(0.0, 1.0, 128, 7)),
                 engine=engine)
    # by hand: record i, sample j answers ANSWERS[(i + j) % 4]
    correct = [[ScriptedEngine.ANSWERS[(i + j) % 4] == r["reward_spec"]["ground_truth"] for j in range(3)]
               for i, r in enumerate(records)]
    flat = [x for row in correct for x in row]
    assert 0 < sum(flat) < len(flat)  # the data mixes right and wrong answers
    n = len(records)
    assert m["records"] == n and m["samples"] == 3 * n
    assert m["accuracy"] == pytest.approx(sum(flat) / (3 * n))
    assert m["format_rate"] == 1.0 and m["turns_mean"] == 1.0
    assert m["pass_at_k"]["1"] == pytest.approx(sum(flat) / (3 * n))
    assert m["pass_at_k"]["3"] == pytest.approx(sum(any(row) for row in correct) / n)
    assert m["by_env_class"]["colors"]["accuracy"] == m["accuracy"]
    assert m["settings"]["seed"] == 7 and m["settings"]["temperature"] == 0.0
    rows = [json.loads(line) for line in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in rows] == flat
    assert rows[0]["steps"][0]["response"].startswith("The colour is")
    assert json.loads((tmp_path / "metrics.json").read_text())["accuracy"] == m["accuracy"]


def chromium_dom(page, fragment=""):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    # CI installs Debian's chromium (.ci/run); a missing browser is a broken setup, not a reason to skip
    assert browser, "headless chromium is needed: apt-get install chromium"
    r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                        "--dump-dom", f"file://{page}{fragment}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def body_attrs(dom):
    body = re.search(r"<body([^>]*)>", dom).group(1)
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body))


def test_report_renders_in_headless_chromium_with_its_images(tmp_path, tiny_model):
    from vlrl_cli.data.prepare import PrepareOptions, prepare

    data = tmp_path / "maze"
    prepare(PrepareOptions(source="maze2d", out=data, workers=1, source_opts={"rows": 4, "val_rows": 3, "maze_size": 3}))
    out = tmp_path / "eval"
    m = run_eval(str(tiny_model), str(data / "val.parquet"), out,
                 EvalOptions(n=2, sampling=Sampling(1.0, 1.0, 6, 0), max_turns=3))
    page = out / "report.html"
    html = page.read_text()
    n_imgs = html.count("<img ")
    # per record one prompt image; per sample its start frame and one frame per observed move
    frames = sum(1 + sum(s["observation_images"] for s in json.loads(line)["steps"])
                 for line in (out / "rollouts.jsonl").read_text().splitlines())
    assert n_imgs == m["records"] + frames and frames > 2 * m["samples"]
    dom = chromium_dom(page)
    attrs = body_attrs(dom)
    assert attrs["images-ok"] == str(n_imgs) and attrs["images-broken"] == "0", attrs
    assert attrs["filter"] == "all" and dom.count('class="sample') == m["samples"]
    # the filter, selected from the URL: every shown sample is incorrect (a random model never reaches the goal)
    dom = chromium_dom(page, "#correct")
    assert body_attrs(dom)["filter"] == "correct"
    shown = re.findall(r'<div class="sample [a-z]+" data-correct="(\d)"(?! hidden)', dom)
    assert all(x == "1" for x in shown)
    assert len(shown) == round(m["accuracy"] * m["samples"])
    assert "pass@2" in html and "after turn 1" in html


def test_report_escapes_hostile_model_text(tmp_path):
    import torch

    from vlrl_cli.data.images import canonicalize
    from vlrl_cli.tools.report import write_report
    from vlrl_cli.rollout.episodes import Trajectory
    from PIL import Image

    uri = canonicalize(Image.new("RGB", (56, 56), "red")).data_uri
    hostile = '<script>document.body.dataset.pwned=1</script><img src="http://example.invalid/x.png">'
    t = Trajectory(token_ids=[1], loss_mask=[0], engine_logp=[0.0], tensors={"x": torch.zeros(1)}, record_id="r1", group=0,
                   env_class="colors", data_source="colors", prompt_len=1, reward=0.0, turns=1,
                   done_reason="answered", info={"correct": False},
                   texts=[{"response": hostile, "tokens": 3, "finish": "stop", "reward": 0.0, "observation": ""}],
                   images=[uri, "http://example.invalid/y.png"])
    metrics = {"records": 1, "samples": 1, "accuracy": 0.0, "reward_mean": 0.0, "format_rate": 0.0, "turns_mean": 1.0,
               "pass_at_k": {"1": 0.0}, "settings": {"model": "<b>m</b>"}}
    page = write_report(tmp_path / "report.html", metrics, [t], {"r1": {"id": "r1", "prompt": []}})
    html = page.read_text()
    assert "<script>document" not in html and "&lt;script&gt;" in html and "<b>m</b>" not in html
    assert 'src="http' not in html  # only inline data: images are ever embedded
    attrs = body_attrs(chromium_dom(page))
    assert "pwned" not in attrs and attrs["images-ok"] == "1" and attrs["images-broken"] == "0"


def test_eval_and_check_drift_refuse_bad_rows_and_unsafe_outputs_before_any_model_loads(tmp_path, tiny_model, colors_data, cli):
    """What a careless run would lose or get wrong is refused first, exit 2 with one line: a bad row (named by
    file and row), an output that would overwrite the data or write into the model, a previous eval's folder
    without --overwrite, a folder another eval is writing, non-finite numbers, flags that would be ignored."""
    import fcntl

    import pyarrow as pa
    import pyarrow.parquet as pq

    val = colors_data / "val.parquet"
    table = pq.read_table(val)
    rows = table.slice(0, 3).to_pylist()
    rows[1]["prompt"][0]["role"] = "wizard"
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), bad)
    for command in (["eval", tiny_model, bad, "--out", tmp_path / "e0"], ["check-drift", tiny_model, bad]):
        r = cli(*command)
        assert r.exit_code == 2 and "1 of 3 rows would not run" in r.output and "bad.parquet:1" in r.output, r.output
    assert not (tmp_path / "e0").exists()

    before = val.read_bytes()
    r = cli("eval", tiny_model, val, "--out", tmp_path / "e1", "--json", val)
    assert r.exit_code == 2 and "would write into DATA" in r.output and val.read_bytes() == before
    r = cli("eval", tiny_model, val, "--out", tiny_model)
    assert r.exit_code == 2 and "would write into MODEL" in r.output
    (tmp_path / "afile").write_text("x")
    r = cli("eval", tiny_model, val, "--out", tmp_path / "afile")
    assert r.exit_code == 2 and "a file, not a folder" in r.output
    r = cli("eval", tiny_model, val, "--out", tmp_path / "e1", "--temperature", "inf")
    assert r.exit_code == 2 and "--temperature inf: needs a finite number" in r.output

    run = ("eval", tiny_model, val, "--out", tmp_path / "e1", "--limit", "1", "--max-new-tokens", "2")
    assert cli(*run).exit_code == 0
    first = (tmp_path / "e1" / "metrics.json").read_text()
    r = cli(*run)
    assert r.exit_code == 2 and "holds a previous eval; pass --overwrite" in r.output
    assert (tmp_path / "e1" / "metrics.json").read_text() == first
    assert cli(*run, "--overwrite").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "e1").iterdir()) == [".lock", "metrics.json", "report.html", "rollouts.jsonl"]

    # another eval holds the folder's lock (a separate open of the lock file conflicts even in this process)
    busy = tmp_path / "e2"
    busy.mkdir()
    holder = open(busy / ".lock", "a+")
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    holder.write("4242")
    holder.flush()
    try:
        r = cli("eval", tiny_model, val, "--out", busy, "--limit", "1", "--max-new-tokens", "2")
        assert r.exit_code == 2 and "being written by another vlrl eval (pid 4242)" in r.output, r.output
        assert not (busy / "metrics.json").exists()
    finally:
        holder.close()

    # a run directory as MODEL: its checkpoint is protected, an eval folder beside the checkpoints is fine
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_model, run_dir / "checkpoints" / "step_1" / "hf")
    (run_dir / "checkpoints" / "latest").write_text("step_1")
    r = cli("eval", run_dir, val, "--out", run_dir / "checkpoints" / "step_1" / "hf" / "ev")
    assert r.exit_code == 2 and "would write into MODEL" in r.output
    r = cli("eval", run_dir, val, "--out", run_dir / "eval", "--limit", "1", "--max-new-tokens", "2")
    assert r.exit_code == 0, r.output

    r = cli("check-drift", tiny_model, val, "--plot", tmp_path / "p.txt")
    assert r.exit_code == 2 and "--plot" in r.output and ".png" in r.output
    r = cli("check-drift", tiny_model, val, "--perturb", "0.2")
    assert r.exit_code == 2 and "pass --after-update too" in r.output
    r = cli("check-drift", tiny_model, val, "--json", val)
    assert r.exit_code == 2 and "would write into DATA" in r.output and val.read_bytes() == before


def test_a_model_whose_weights_file_stopped_early_is_named_before_loading(tmp_path, tiny_model, colors_data, cli):
    """A half-finished download or copy: one line naming the file, from eval, check-drift and a recipe."""
    from vlrl_cli.errors import UserError
    from vlrl_cli.train.recipe import load_recipe

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    [weights] = model.glob("*.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    for command in (["eval", model, colors_data / "val.parquet", "--out", tmp_path / "e"],
                    ["check-drift", model, colors_data / "val.parquet"]):
        r = cli(*command)
        assert r.exit_code == 2 and f"{weights}: not a complete safetensors file" in r.output.replace("\n", ""), r.output
    (tmp_path / "r.yaml").write_text(f"model: {{path: {model}}}\ndata: {{train: {colors_data / 'train.parquet'}}}\n")
    with pytest.raises(UserError, match="not a complete safetensors file"):
        load_recipe(tmp_path / "r.yaml")
