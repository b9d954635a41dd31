import hashlib
import os
import io
import json
import shutil

import pytest
from PIL import Image

from vlrl_cli.errors import UserError
from vlrl_cli.data.images import sniff_mime
from vlrl_cli.data.prepare import PrepareOptions, prepare
from vlrl_cli.data.records import iter_rows, schema_errors
from vlrl_cli.tools.validate import ValidateOptions, validate_paths
from conftest import terminal_sigint


def rows_of(path):
    return list(iter_rows(path))


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_geometry3k_original_layout_validates_clean(geometry_sample, tiny_model, tmp_path):
    res = prepare(PrepareOptions(source="geometry3k", path=str(geometry_sample), out=tmp_path, workers=2))
    assert res.rows_in == 10 and res.rejected == 0 and sum(res.rows_out.values()) == 10
    rows = rows_of(tmp_path / "train.parquet") + rows_of(tmp_path / "val.parquet")
    by_src = {r["extra_info"]["source_id"]: r for r in rows}
    r11 = by_src["11"]
    assert r11["reward_spec"] == {"method": "rule", "ground_truth": "80"}  # answer D of 30/40/60/80
    assert r11["env_class"] == "geometry3k" and r11["id"] == "geometry3k-11"
    parts = r11["prompt"][0]["content"]
    assert parts[0]["type"] == "image_url" and parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    text = parts[1]["text"]
    assert "Find m \\widehat A B" in text and "\\boxed{}" in text and "<image>" not in text
    assert by_src["19"]["reward_spec"]["ground_truth"] == "\\frac { 2 \\sqrt { 2 } } { 5 }"
    for r in rows:
        assert schema_errors(r) == []
        assert len(r["extra_info"]["image_sha256"]) == 1
    report = validate_paths([tmp_path / "train.parquet", tmp_path / "val.parquet"],
                            ValidateOptions(processor=str(tiny_model), max_prompt_tokens=4096, workers=1))
    assert report.rows == 10 and report.problems == []
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["counts"] == {"in": 10, "out": res.rows_out, "rejected": 0}
    assert manifest["files"]["train.parquet"] == sha(tmp_path / "train.parquet")
    assert manifest["images"]["count"] == 10


def test_geometry3k_hf_layout(geometry_sample, tmp_path):
    datasets = pytest.importorskip("datasets")
    problems = sorted(p for p in geometry_sample.iterdir() if p.is_dir())
    cols = {"images": [], "problem": [], "answer": []}
    for d in problems:
        meta = json.loads((d / "data.json").read_text())
        cols["images"].append([{"bytes": (d / "img_diagram.png").read_bytes(), "path": None}])
        cols["problem"].append("<image>" + meta["problem_text"])
        cols["answer"].append(meta["choices"][ord(meta["answer"]) - 65])
    features = datasets.Features({"images": datasets.List(datasets.Image()), "problem": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(cols, features=features)
    hf_dir = tmp_path / "hf"
    datasets.DatasetDict({"train": ds.select(range(7)), "test": ds.select(range(7, 10))}).save_to_disk(str(hf_dir))
    pq_file = tmp_path / "geo.parquet"
    ds.to_parquet(str(pq_file))
    for src, expect_splits in ((hf_dir, {"train": 7, "test": 3}), (pq_file, None)):
        out = tmp_path / f"out-{src.name}"
        res = prepare(PrepareOptions(source="geometry3k", path=str(src), out=out, workers=1))
        assert res.rows_in == 10 and res.rejected == 0
        if expect_splits:
            assert {k: v for k, v in res.rows_out.items() if v} == expect_splits
        for r in rows_of(out / "train.parquet"):
            parts = r["prompt"][0]["content"]
            assert parts[0]["type"] == "image_url"  # the <image> marker became the image, in place
            assert all("<image>" not in p.get("text", "") for p in parts)
            assert schema_errors(r) == []


def test_same_seed_gives_byte_identical_outputs_whatever_the_workers(tmp_path):
    outs = []
    for i, workers in enumerate((1, 2, 2)):
        out = tmp_path / f"run{i}"
        prepare(PrepareOptions(source="colors", out=out, workers=workers, seed=7, source_opts={"rows": 300}))
        outs.append(out)
    for name in ("train.parquet", "val.parquet", "rejects.jsonl", "manifest.json"):
        assert len({sha(o / name) for o in outs}) == 1, name
    other = tmp_path / "other-seed"
    prepare(PrepareOptions(source="colors", out=other, workers=1, seed=8, source_opts={"rows": 300}))
    assert sha(other / "train.parquet") != sha(outs[0] / "train.parquet")


def test_colors_rows_carry_their_colour(colors_data):
    rows = rows_of(colors_data / "train.parquet") + rows_of(colors_data / "val.parquet")
    assert len(rows) == 60
    answers = {r["reward_spec"]["ground_truth"] for r in rows}
    assert answers == {"red", "green", "blue", "yellow"}
    from vlrl_cli.data.images import image_from_uri
    from vlrl_cli.data.sources.colors import COLORS

    for r in rows[:20]:  # the shape's pixels are nearest to the named colour
        img = image_from_uri(r["prompt"][0]["content"][0]["image_url"]["url"])
        bg = img.getpixel((0, 0))
        px = [p for p in img.getdata() if sum(abs(a - b) for a, b in zip(p, bg)) > 60]
        mean = tuple(sum(c) / len(px) for c in zip(*px))
        nearest = min(("red", "green", "blue", "yellow"), key=lambda n: sum((a - b) ** 2 for a, b in zip(COLORS[n], mean)))
        assert nearest == r["reward_spec"]["ground_truth"]


def test_maze2d_validation_seeds_are_fixed(tmp_path):
    a = prepare(PrepareOptions(source="maze2d", out=tmp_path / "a", seed=1, workers=1, source_opts={"rows": 20, "val_rows": 5}))
    b = prepare(PrepareOptions(source="maze2d", out=tmp_path / "b", seed=2, workers=1, source_opts={"rows": 20, "val_rows": 5}))
    assert a.rows_out == b.rows_out == {"train": 20, "val": 5}
    seeds = lambda out, split: [r["extra_info"]["seed"] for r in rows_of(out / f"{split}.parquet")]
    assert seeds(tmp_path / "a", "val") == seeds(tmp_path / "b", "val")
    assert seeds(tmp_path / "a", "train") != seeds(tmp_path / "b", "train")
    row = rows_of(tmp_path / "a" / "val.parquet")[0]
    assert row["env_class"] == "maze2d" and row["reward_spec"]["method"] == "env" and schema_errors(row) == []


def test_every_input_row_is_in_an_output_or_rejected(geometry_sample, tmp_path):
    src = tmp_path / "geo"
    shutil.copytree(geometry_sample, src)
    (src / "12" / "img_diagram.png").unlink()
    (src / "13" / "data.json").write_text("{not json")
    data = (src / "14" / "img_diagram.png").read_bytes()
    (src / "14" / "img_diagram.png").write_bytes(data[: len(data) // 3])
    meta = json.loads((src / "15" / "data.json").read_text())
    meta["answer"] = "G"
    (src / "15" / "data.json").write_text(json.dumps(meta))
    res = prepare(PrepareOptions(source="geometry3k", path=str(src), out=tmp_path / "out", workers=2))
    assert res.rows_in == 10 and res.rejected == 4 and sum(res.rows_out.values()) == 6
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert {r["source_id"]: r["code"] for r in rejects} == {
        "12": "missing_file", "13": "bad_json", "14": "image_decode", "15": "bad_answer"}
    assert all(r["reason"] for r in rejects)


def test_generic_jsonl_with_image_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(6):
        buf = io.BytesIO()
        Image.new("RGB", (90, 70), (i * 40, 0, 0)).save(buf, format="JPEG")
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(buf.getvalue())
        rows.append({"img": f"imgs/{i}.jpg", "q": f"<image> How red is it? ({i})", "a": str(i)})
    rows[4]["img"] = "https://example.com/x.png"  # never fetched: rejected
    rows[5]["a"] = ""  # no answer: rejected
    src = tmp_path / "qa.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = prepare(PrepareOptions(source=str(src), out=tmp_path / "out", workers=1, split="train=1", source_opts={
        "image_column": "img", "question_column": "q", "answer_column": "a", "env_class": "geometry3k",
        "prompt_template": "{question}\nAnswer in \\boxed{}."}))
    assert res.rows_in == 6 and res.rows_out == {"train": 4} and res.rejected == 2  # only the split asked for
    codes = [json.loads(x)["code"] for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert codes == ["image_remote", "missing_field"]
    r = next(r for split in ("train", "val") for r in rows_of(tmp_path / "out" / f"{split}.parquet") if r["id"].endswith("-0"))
    assert r["prompt"][0]["content"][1]["text"] == "How red is it? (0)\nAnswer in \\boxed{}."
    _, data = __import__("vlrl_cli.data.images", fromlist=["decode_data_uri"]).decode_data_uri(
        r["prompt"][0]["content"][0]["image_url"]["url"])
    assert sniff_mime(data) == "image/png"  # re-encoded once, canonically


def test_generic_source_names_missing_flags_and_columns(tmp_path):
    src = tmp_path / "qa.jsonl"
    src.write_text(json.dumps({"img": "x.png", "q": "?", "a": "1"}) + "\n")
    with pytest.raises(UserError, match="--image-column"):
        prepare(PrepareOptions(source=str(src), out=tmp_path / "o1", workers=1))
    with pytest.raises(UserError, match="no column"):
        prepare(PrepareOptions(source=str(src), out=tmp_path / "o2", workers=1, source_opts={
            "image_column": "image", "question_column": "q", "answer_column": "a", "env_class": "colors"}))


def test_refuses_to_overwrite_without_flag(tmp_path, cli):
    assert cli("prepare", "colors", "--out", tmp_path, "--rows", 10, "--workers", 1).exit_code == 0
    r = cli("prepare", "colors", "--out", tmp_path, "--rows", 10, "--workers", 1)
    assert r.exit_code == 2 and "--overwrite" in r.output
    r = cli("prepare", "colors", "--out", tmp_path, "--rows", 12, "--workers", 1, "--overwrite", "--json", "-")
    assert r.exit_code == 0 and "in = out + rejected: 12 = 12 + 0" in r.output


@pytest.mark.parametrize("flags, message", [
    (["--num-colors", "99"], "--num-colors"),
    (["--shapes", "hexagon"], "hexagon"),
    (["--image-column", "picture", "--question-column", "q", "--answer-column", "a", "--env-class", "colors"], "no column"),
])
def test_a_bad_flag_with_overwrite_leaves_the_previous_dataset_as_it_was(tmp_path, cli, flags, message):
    out = tmp_path / "data"
    assert cli("prepare", "colors", "--out", out, "--rows", 10, "--workers", 1).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    src = tmp_path / "qa.jsonl"
    src.write_text(json.dumps({"img": "x.png", "q": "?", "a": "1"}) + "\n")
    source = str(src) if "--image-column" in flags else "colors"
    r = cli("prepare", source, "--out", out, "--rows" if source == "colors" else "--workers", 10 if source == "colors" else 1,
            *flags, "--overwrite")
    assert r.exit_code == 2 and message in r.output, r.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _qa_rows(tmp_path, ids):
    img = tmp_path / "x.png"
    if not img.exists():
        Image.new("RGB", (64, 48), (200, 10, 10)).save(img)
    return [{"id": i, "img": "x.png", "q": f"question {i}", "a": "1"} for i in ids]


GENERIC = {"image_column": "img", "question_column": "q", "answer_column": "a", "env_class": "geometry3k"}


def _splits(out):
    return {split: {r["id"] for r in rows_of(out / f"{split}.parquet")} for split in ("train", "val")}


def test_a_single_file_is_hash_split_by_its_id_and_splits_survive_a_prepended_row(tmp_path):
    src = tmp_path / "qa.jsonl"
    rows = _qa_rows(tmp_path, [f"q{i}" for i in range(60)])
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = prepare(PrepareOptions(source=str(src), out=tmp_path / "a", workers=1, source_opts=GENERIC))
    before = _splits(tmp_path / "a")
    assert before["val"] and before["train"], res.rows_out  # a lone file is not all "train"
    assert "hash of the row id" in res.manifest["split_method"]
    assert all(i.startswith("qa-q") for i in before["train"] | before["val"])  # the source's ids are kept
    src.write_text("".join(json.dumps(r) + "\n" for r in _qa_rows(tmp_path, ["new"]) + rows))
    prepare(PrepareOptions(source=str(src), out=tmp_path / "b", workers=1, source_opts=GENERIC))
    after = _splits(tmp_path / "b")
    assert before["val"] <= after["val"] and before["train"] <= after["train"]  # nobody moved


def test_rows_without_ids_say_their_split_is_positional(tmp_path, cli):
    src = tmp_path / "noid.jsonl"
    src.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "id"}) + "\n" for r in _qa_rows(tmp_path, range(20))))
    r = cli("prepare", src, "--out", tmp_path / "o", "--workers", 1, "--image-column", "img", "--question-column", "q",
            "--answer-column", "a", "--env-class", "geometry3k")
    assert r.exit_code == 0, r.output
    assert "row position" in r.output and "--id-column" in r.output.replace("\n", " ")


def test_answers_that_are_lists_or_numbers_keep_their_meaning_and_non_answers_are_rejected(tmp_path):
    """A list answer means any of its answers, a number its text; a bool, a dict, NaN or an empty list is no
    answer: rejected with the reason, never stored as Python's text for it ("['4', 'four']", "nan", "{'a': 1}")."""
    from vlrl_cli.data.records import ground_truths

    answers = {"list": ["4", "four"], "int": 7, "float": 2.5, "text": " 9 ", "empty_list": [], "dict": {"a": 1},
               "nan": float("nan"), "bool": False, "nested": [["4"]]}
    rows = [{**_qa_rows(tmp_path, [k])[0], "a": v} for k, v in answers.items()]
    src = tmp_path / "qa.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = prepare(PrepareOptions(source=str(src), out=tmp_path / "o", workers=1, split="train=1",
                                 source_opts=GENERIC))
    kept = {r["id"].removeprefix("qa-"): ground_truths(r) for r in rows_of(tmp_path / "o" / "train.parquet")}
    assert kept == {"list": ["4", "four"], "int": ["7"], "float": ["2.5"], "text": ["9"]}, kept
    reasons = {x["source_id"]: x["code"] for x in map(json.loads, (tmp_path / "o" / "rejects.jsonl").read_text().splitlines())}
    assert reasons == {k: "bad_answer" for k in ("empty_list", "dict", "nan", "bool", "nested")}, reasons
    assert res.rows_in == len(answers) and res.rejected == 5


def test_a_source_that_yields_no_dataset_is_an_error_not_an_empty_success(tmp_path, cli):
    """Every row rejected: exit 2 naming the reasons, the rejects kept to read. No rows at all: exit 2 before the
    output folder is touched, so --overwrite leaves the previous dataset as it was."""
    flags = ["--workers", 1, "--image-column", "img", "--question-column", "q", "--answer-column", "a",
             "--env-class", "geometry3k"]
    src = tmp_path / "qa.jsonl"
    src.write_text("".join(json.dumps({**r, "a": []}) + "\n" for r in _qa_rows(tmp_path, ["a", "b", "c"])))
    r = cli("prepare", src, "--out", tmp_path / "o", *flags)
    assert r.exit_code == 2 and "every row was rejected (3 of 3: bad_answer x3)" in r.output, r.output
    assert len((tmp_path / "o" / "rejects.jsonl").read_text().splitlines()) == 3
    out = tmp_path / "prev"
    assert cli("prepare", "colors", "--out", out, "--rows", 10, "--workers", 1).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n")
    r = cli("prepare", blank, "--out", out, *flags, "--overwrite")
    assert r.exit_code == 2 and "the source gave no rows" in r.output, r.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # every row rejected with --overwrite: the previous dataset stays whole, the reasons go beside it
    r = cli("prepare", src, "--out", out, *flags, "--overwrite")
    assert r.exit_code == 2 and "keeps its previous dataset" in r.output, r.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert len((tmp_path / "prev.rejects.jsonl").read_text().splitlines()) == 3
    # and a good one replaces it, leaving none of the previous files behind
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in _qa_rows(tmp_path, ["x", "y", "z"])))
    assert cli("prepare", good, "--out", out, *flags, "--split", "train=1", "--overwrite").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "rejects.jsonl", "train.parquet"]


def test_duplicate_or_empty_ids_are_rejected_with_a_reason(tmp_path):
    src = tmp_path / "qa.jsonl"
    rows = _qa_rows(tmp_path, ["a", "b", "a", ""])
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = prepare(PrepareOptions(source=str(src), out=tmp_path / "o", workers=1, source_opts=GENERIC))
    assert res.rows_in == 4 and res.rejected == 2
    reasons = [json.loads(x) for x in (tmp_path / "o" / "rejects.jsonl").read_text().splitlines()]
    assert [x["code"] for x in reasons] == ["bad_id", "bad_id"]
    assert "duplicate id 'a'" in reasons[0]["reason"] and "empty" in reasons[1]["reason"]


def test_rejects_are_byte_identical_between_runs(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image at all" * 10)  # PIL: "cannot identify image file <BytesIO at 0x...>"
    src = tmp_path / "qa.jsonl"
    rows = _qa_rows(tmp_path, ["ok", "bad"])
    rows[1]["img"] = "broken.png"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("r1", "r2"):
        prepare(PrepareOptions(source=str(src), out=tmp_path / name, workers=1, source_opts=GENERIC))
    a, b = ((tmp_path / n / "rejects.jsonl").read_bytes() for n in ("r1", "r2"))
    assert a == b and b"0x" not in a and b"image_decode" in a
    m1, m2 = (json.loads((tmp_path / n / "manifest.json").read_text())["files"] for n in ("r1", "r2"))
    assert m1 == m2


def test_a_malformed_jsonl_line_is_a_reject_not_an_abort(tmp_path):
    src = tmp_path / "qa.jsonl"
    good = _qa_rows(tmp_path, ["a", "b"])
    src.write_text(json.dumps(good[0]) + "\n" + '{"id": "c", "img": "x.png", "q": oops}\n' + "[1, 2]\n" + json.dumps(good[1]) + "\n")
    res = prepare(PrepareOptions(source=str(src), out=tmp_path / "o", workers=1, source_opts=GENERIC))
    assert res.rows_in == 4 and res.rejected == 2 and sum(res.rows_out.values()) == 2
    reasons = [json.loads(x) for x in (tmp_path / "o" / "rejects.jsonl").read_text().splitlines()]
    assert [r["code"] for r in reasons] == ["bad_json", "bad_json"]
    assert "line 2" in reasons[0]["reason"] and "line 3" in reasons[1]["reason"]
    assert not list((tmp_path / "o").glob("*.partial"))
    assert "row id" in res.manifest["split_method"]  # the kept rows have ids: the bad lines change nothing
    report = validate_paths([src], ValidateOptions(workers=1))  # validate names the same lines
    assert [(p.code, p.message.split(" is ")[0]) for p in report.problems if p.code == "bad_json"] == \
        [("bad_json", "line 2"), ("bad_json", "line 3")]


def test_ctrl_c_during_prepare_ends_quickly_cleanly_and_with_130(tmp_path):
    """SIGINT to the whole process group (what a terminal's Ctrl-C does) while worker processes convert."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "o"
    p = subprocess.Popen([sys.executable, "-m", "vlrl_cli", "prepare", "colors", "--out", str(out), "--rows", "200000",
                          "--workers", "2", "--image-size", "224"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True,
                         preexec_fn=terminal_sigint)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("*.partial")):
        time.sleep(0.1)
    time.sleep(1.0)  # well inside the work
    os.killpg(p.pid, signal.SIGINT)
    t = time.time()
    _, stderr = p.communicate(timeout=30)
    assert time.time() - t < 10, "Ctrl-C must end prepare within seconds"
    assert p.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "interrupted" in stderr
    assert not list(out.glob("*.partial")) and not (out / "manifest.json").exists()


def test_flags_are_checked_before_any_row(tmp_path, cli):
    src = tmp_path / "qa.jsonl"
    src.write_text(json.dumps(_qa_rows(tmp_path, ["a"])[0]) + "\n")
    generic = ["--image-column", "img", "--question-column", "q", "--answer-column", "a"]
    cases = [
        (["colors", "--rows", "-3"], "--rows"),
        (["colors", "--image-size", "0"], "--image-size"),
        (["colors", "--factor", "0"], "--factor"),
        (["colors", "--min-pixels", "100", "--max-pixels", "50"], "--min-pixels"),
        (["colors", "--min-pixels", "10000", "--max-pixels", "5000"], "--max-pixels"),
        ([str(src), *generic, "--env-class", "geometry3K"], "--env-class"),
        ([str(src), *generic, "--env-class", "no_such_envs_mod:Blink"], "cannot import 'no_such_envs_mod'"),
        ([str(src), *generic, "--env-class", "vlrl_cli.rollout.envs.base:NoSuchClass"], "has no 'NoSuchClass'"),
        ([str(src), *generic, "--env-class", "geometry3k", "--prompt-template", "Solve it."], "{question}"),
    ]
    for args, flag in cases:
        out = tmp_path / f"o{len(flag)}"
        r = cli("prepare", *args, "--out", out, "--workers", 1)
        assert r.exit_code == 2 and flag in r.output, (args, r.output)
        assert not out.exists() or not any(out.iterdir()), args  # nothing written
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "keep.txt").write_text("mine")
    r = cli("tiny-model", tmp_path / "model")
    assert r.exit_code == 2 and "--overwrite" in r.output and (tmp_path / "model" / "keep.txt").exists()


def test_messages_name_the_real_cause(tmp_path, cli):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "adir.png").mkdir()
    rows = _qa_rows(tmp_path, ["a", "b", "c"])
    rows[0]["img"], rows[1]["img"], rows[2]["img"] = "empty.png", "adir.png", "gone.png"
    src = tmp_path / "qa.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match="every row was rejected"):  # the reasons are written all the same
        prepare(PrepareOptions(source=str(src), out=tmp_path / "o", workers=1, source_opts=GENERIC))
    reasons = {json.loads(x)["source_id"]: json.loads(x) for x in (tmp_path / "o" / "rejects.jsonl").read_text().splitlines()}
    assert reasons["a"]["code"] == "image_empty" and "empty" in reasons["a"]["reason"]
    assert reasons["b"]["code"] == "image_unreadable" and "directory" in reasons["b"]["reason"]
    assert reasons["c"]["code"] == "missing_file" and "does not exist" in reasons["c"]["reason"]
    (tmp_path / "empty.jsonl").write_text("")
    for target, words in ((tmp_path / "o", "a directory"), (tmp_path / "empty.jsonl", "empty file"), (tmp_path / "nope.jsonl", "no such file")):
        r = cli("validate", target)
        assert r.exit_code == 2 and words in r.output, (target, r.output)


def test_write_clean_writes_the_format_its_extension_names_and_json_stdout_is_only_json(tmp_path, colors_data):
    from vlrl_process import run_vlrl

    src = colors_data / "val.parquet"
    for ext in ("jsonl", "parquet", "json"):
        dest = tmp_path / f"clean.{ext}"
        r = run_vlrl("validate", src, "--write-clean", dest, "--json", "-", timeout=120)
        assert r.returncode == 0, r.stderr[-1500:]
        assert json.loads(r.stdout)["rows"] > 0  # stdout is exactly one JSON document
        n = len(rows_of(src))
        if ext == "json":
            assert len(json.loads(dest.read_text())) == n
        else:
            assert len(rows_of(dest)) == n
    r = run_vlrl("validate", src, "--write-clean", tmp_path / "clean.csv", timeout=120)
    assert r.returncode == 2 and ".parquet, .jsonl, .json" in r.stderr


def test_a_folder_that_datasets_cannot_read_and_rows_that_cannot_share_a_parquet_table_are_named(tmp_path, cli):
    """A malformed line in a folder's JSONL was an internal DatasetGenerationError; --write-clean to parquet of
    rows whose field is text in one and a number in another was an internal ArrowInvalid. Each is exit 2 naming
    the path, and no partial file stays."""
    folder = tmp_path / "src"
    folder.mkdir()
    rows = _qa_rows(folder, ["a", "b"])
    (folder / "data.jsonl").write_text(json.dumps(rows[0]) + "\nnot json\n" + json.dumps(rows[1]) + "\n")
    r = cli("prepare", folder, "--out", tmp_path / "o", "--workers", 1, "--image-column", "img", "--question-column",
            "q", "--answer-column", "a", "--env-class", "geometry3k")
    assert r.exit_code == 2 and "cannot be read as a dataset" in r.output and "src" in r.output, r.output
    good = {"env_class": "colors", "prompt": [{"role": "user", "content": "x"}],
            "reward_spec": {"method": "rule", "ground_truth": "1"}}
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"id": "a", **good, "extra_info": {"seed": "7"}}) + "\n"
                     + json.dumps({"id": "b", **good, "extra_info": {"seed": 7}}) + "\n")
    r = cli("validate", mixed, "--write-clean", tmp_path / "clean.parquet")
    assert r.exit_code == 2 and "cannot share one parquet table" in r.output and "write .jsonl" in r.output, r.output
    assert not list(tmp_path.glob("clean*"))
