import hashlib
import io
import json
import shutil

import pytest
from PIL import Image

from vlrl_cli.errors import UserError
from vlrl_cli.images import sniff_mime
from vlrl_cli.prepare import PrepareOptions, prepare
from vlrl_cli.records import iter_rows, schema_errors
from vlrl_cli.validate import ValidateOptions, validate_paths


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
    from vlrl_cli.images import image_from_uri
    from vlrl_cli.sources.colors import COLORS

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
    assert res.rows_in == 6 and res.rows_out["train"] == 4 and res.rejected == 2
    codes = [json.loads(x)["code"] for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert codes == ["image_remote", "missing_field"]
    r = rows_of(tmp_path / "out" / "train.parquet")[0]
    assert r["prompt"][0]["content"][1]["text"] == "How red is it? (0)\nAnswer in \\boxed{}."
    _, data = __import__("vlrl_cli.images", fromlist=["decode_data_uri"]).decode_data_uri(
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
