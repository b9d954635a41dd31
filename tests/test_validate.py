import io
import json
import struct
import zlib

import pytest
from PIL import Image

from vlrl_cli.data.images import to_data_uri
from vlrl_cli.data.records import RecordFileError, iter_rows, write_rows
from vlrl_cli.tools.validate import ValidateOptions, validate_paths, write_clean


def png(w=56, h=56, color=(0, 0, 255)):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def huge_png_header(w=9000, h=9000):
    small = png(8, 8)
    ihdr = b"IHDR" + struct.pack(">II", w, h) + small[24:29]
    return small[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + small[33:]


def record(*urls, text="What colour is the shape?", env="colors", gt="blue"):
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": text}]
    return {"prompt": [{"role": "user", "content": parts}], "env_class": env,
            "reward_spec": {"method": "rule", "ground_truth": gt}, "extra_info": {}}


GOOD = to_data_uri(png(), "image/png")
TRUNC_B64 = GOOD[: len(GOOD) - 3]
TRUNC_IMG = to_data_uri(png(200, 200)[:150], "image/png")


def bad_corpus():
    """(row, expected code) pairs: one row per kind of problem, plus good rows between them."""
    missing_env = record(GOOD)
    del missing_env["env_class"]
    mistyped = record(GOOD)
    mistyped["env_class"] = 5
    empty = record(GOOD)
    empty["prompt"] = []
    return [
        (record(GOOD), None),
        (record(TRUNC_B64), "image_bad_base64"),
        (record(TRUNC_IMG), "image_decode"),
        (record(to_data_uri(b"%PDF-1.4 not an image at all", "image/png")), "image_not_image"),
        (record(to_data_uri(png(), "image/jpeg")), "image_mime_mismatch"),
        (record(to_data_uri(huge_png_header(), "image/png")), "image_too_large"),
        (record("https://example.com/cat.png"), "image_remote"),
        (missing_env, "missing_field"),
        (mistyped, "wrong_type"),
        (empty, "empty_prompt"),
        (record(GOOD, GOOD, GOOD), "too_many_images"),
        (record(GOOD, text="word " * 300), "prompt_too_long"),
        (record(GOOD, env="no_such_env"), "unknown_env_class"),
        (record(GOOD, gt=""), "missing_ground_truth"),
        (record(GOOD, text="a literal <|image_pad|> in the text"), "processor_error"),
        (record(GOOD), None),
    ]


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(r) for r, _ in bad_corpus()]
    lines.insert(7, "{this is not json")  # row 7: a broken line, reported, not fatal
    path.write_text("\n".join(lines) + "\n")
    expected = [code for _, code in bad_corpus()]
    expected.insert(7, "bad_json")
    return path, expected


def test_every_bad_record_is_reported_at_its_row_with_its_code(corpus_file, tiny_model):
    path, expected = corpus_file
    opts = ValidateOptions(processor=str(tiny_model), max_prompt_tokens=200, max_images=2, workers=2)
    report = validate_paths([path], opts)
    assert report.rows == len(expected)
    errors = {}
    for p in report.problems:
        if p.severity == "error":
            errors.setdefault(p.row, set()).add(p.code)
    for row, code in enumerate(expected):
        if code is None:
            assert row not in errors, (row, errors.get(row))
        else:
            assert code in errors.get(row, set()), (row, code, errors.get(row))
    assert report.bad_rows[str(path)] == {i for i, c in enumerate(expected) if c}
    messages = {p.row: p.message for p in report.problems}
    assert "env_class" in messages[expected.index("missing_field")]  # names the field


def test_without_processor_no_token_checks_but_images_still_decoded(corpus_file):
    path, expected = corpus_file
    report = validate_paths([path], ValidateOptions(workers=1))
    codes = {p.code for p in report.problems}
    assert "prompt_too_long" not in codes and "processor_error" not in codes
    assert {"image_decode", "image_bad_base64", "image_mime_mismatch", "image_too_large"} <= codes


def test_allow_remote_turns_remote_urls_into_warnings(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(record("http://example.com/a.png")) + "\n")
    strict = validate_paths([path], ValidateOptions(workers=1))
    lenient = validate_paths([path], ValidateOptions(workers=1, allow_remote=True))
    assert [(p.severity, p.code) for p in strict.problems] == [("error", "image_remote")]
    assert [(p.severity, p.code) for p in lenient.problems] == [("warning", "image_remote")]


def test_non_canonical_images_are_flagged_with_a_processor(tmp_path, tiny_model):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(record(to_data_uri(png(101, 77), "image/png"))) + "\n")
    report = validate_paths([path], ValidateOptions(processor=str(tiny_model), workers=1))
    assert [(p.severity, p.code) for p in report.problems] == [("warning", "image_not_canonical")]


@pytest.mark.model
def test_a_processor_with_a_token_budget_is_never_told_to_prepare_its_images(tmp_path, family_models):
    """Gemma 4's processor rescales every image to its soft-token budget: no stored size avoids it, so validate
    does not send the user to `vlrl prepare` for it; odd sizes (wide, tall, 1 px) still count exactly."""
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(record(to_data_uri(png(w, h), "image/png"))) + "\n"
                            for w, h in ((101, 77), (2000, 20), (1, 1))))
    report = validate_paths([path], ValidateOptions(processor=str(family_models["gemma4"]), workers=1))
    assert report.problems == [], report.problems


def test_parquet_rows_are_numbered_like_the_file(tmp_path, colors_data):
    rows = list(iter_rows(colors_data / "train.parquet"))[:5]
    rows[3]["reward_spec"]["ground_truth"] = ""
    rows[1]["prompt"][0]["content"][0]["image_url"]["url"] = TRUNC_IMG
    path = tmp_path / "x.parquet"
    write_rows(path, rows)
    report = validate_paths([path], ValidateOptions(workers=1))
    assert sorted((p.row, p.code) for p in report.problems) == [(1, "image_decode"), (3, "missing_ground_truth")]
    clean = tmp_path / "clean.parquet"
    assert write_clean(report, clean) == {str(clean): 3}
    assert [r["id"] for r in iter_rows(clean)] == [rows[i]["id"] for i in (0, 2, 4)]


def test_cli_exit_codes_json_and_write_clean(cli, corpus_file, tiny_model, tmp_path, colors_data):
    path, expected = corpus_file
    ok = cli("validate", colors_data / "train.parquet", colors_data / "val.parquet")
    assert ok.exit_code == 0 and "0 errors" in ok.output
    report_file, clean = tmp_path / "report.json", tmp_path / "clean.jsonl"
    r = cli("validate", path, "--processor", tiny_model, "--max-prompt-tokens", 200, "--max-images", 2,
            "--json", report_file, "--write-clean", clean, "--workers", 1)
    assert r.exit_code == 1
    rep = json.loads(report_file.read_text())
    assert rep["files"] == [str(path)] and rep["rows"] == len(expected)
    assert {"file", "row", "severity", "code", "message"} <= set(rep["problems"][0])
    assert len(clean.read_text().splitlines()) == expected.count(None)
    assert "too_many_images" in r.output and "bad.jsonl:10" in r.output


def test_a_report_or_manifest_never_lands_on_the_data_it_describes(cli, tmp_path, colors_data):
    data = tmp_path / "mine.parquet"
    data.write_bytes((colors_data / "val.parquet").read_bytes())
    before = data.read_bytes()
    r = cli("validate", data, "--json", data)
    assert r.exit_code == 2 and "--json" in r.output and "would write into" in r.output, r.output
    r = cli("prepare", data, "--out", tmp_path / "prepared", "--json", data)
    assert r.exit_code == 2 and "would write into" in r.output, r.output
    assert data.read_bytes() == before and not (tmp_path / "prepared").exists()


def test_cli_unreadable_file_exits_2_without_traceback(cli, tmp_path):
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"this is not parquet")
    for target in (junk, tmp_path / "missing.parquet", tmp_path / "x.csv"):
        r = cli("validate", target)
        assert r.exit_code == 2, r.output
        assert "Traceback" not in r.output and target.name in r.output
    with pytest.raises(RecordFileError):
        validate_paths([junk])
    r = cli("validate", junk, "--max-prompt-tokens", 10)
    assert r.exit_code == 2 and "--processor" in r.output



def test_files_without_a_single_row_are_not_a_pass(cli, tmp_path, colors_data):
    """Blank lines, an empty JSON list: "ok: 0 rows" would read as valid data. One empty file beside real rows
    (prepare writes an empty val split when asked for none) is still checked as the rows it has."""
    blank, empty_list = tmp_path / "blank.jsonl", tmp_path / "empty.json"
    blank.write_text("\n \n\n")
    empty_list.write_text("[]")
    for target, needle in ((blank, "no rows (blank lines only)"), (empty_list, "no rows")):
        r = cli("validate", target)
        assert r.exit_code == 2 and needle in r.output and target.name in r.output, r.output
    assert cli("validate", colors_data / "train.parquet", blank).exit_code == 0

@pytest.mark.model
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "gemma4"])
def test_validate_counts_each_familys_prompt_tokens_with_its_own_processor(tmp_path, family_models, family):
    """`validate --processor` on every family: a two-image prompt is counted exactly as the trainer renders it
    (its own placeholders and grids), the token limit is applied to that count, and the family's own image
    placeholder typed as text is the row's error, not a crash."""
    from vlrl_cli.model.loading import load_processor
    from vlrl_cli.model.render import render_prompt

    model = str(family_models[family])
    processor = load_processor(model)
    placeholder = processor.tokenizer.convert_ids_to_tokens(processor.image_token_id)
    rows = [record(GOOD, to_data_uri(png(84, 56), "image/png")), record(GOOD, text=f"look: {placeholder}")]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    length = render_prompt(processor, rows[0]["prompt"]).length
    fits = validate_paths([path], ValidateOptions(processor=model, max_prompt_tokens=length, workers=1))
    assert {p.row for p in fits.problems if p.severity == "error"} == {1}, fits.problems
    tight = validate_paths([path], ValidateOptions(processor=model, max_prompt_tokens=length - 1, workers=1))
    too_long = [p for p in tight.problems if p.row == 0 and p.code == "prompt_too_long"]
    assert too_long and f"prompt: {length} tokens" in too_long[0].message, tight.problems


def test_a_rows_environment_settings_are_checked_as_train_reads_them(tmp_path, cli):
    """A maze's extra_info.max_steps "3" (text, not a number) is what train and eval refuse when they size the
    engine; validate names it at its row, with the environment's own words."""
    from vlrl_cli.data.prepare import PrepareOptions, prepare

    prepare(PrepareOptions(source="maze2d", out=tmp_path / "mz", workers=1,
                           source_opts={"rows": 4, "val_rows": 2, "maze_size": 3}))
    rows = list(iter_rows(tmp_path / "mz" / "train.parquet"))
    # what the maze's reset would refuse, found without starting an episode
    settings = [{"max_steps": "3"}, {"max_steps": 0}, {"seed": "7"}, {"maze_size": 0}, {"reward": "bogus"},
                {"variant": "x"}, {"cell_px": 0}, {"maze_size": 64, "cell_px": 512}]
    rows = [rows[0]] + [dict(rows[0], id=f"bad{i}", extra_info={**rows[0]["extra_info"], **change})
                        for i, change in enumerate(settings)]
    bad = tmp_path / "bad.jsonl"
    write_rows(bad, rows)
    report = validate_paths([bad], ValidateOptions(workers=1))
    found = sorted((p.row, p.code, p.message) for p in report.problems)
    assert [(r, c) for r, c, _ in found] == [(i, "bad_env_setting") for i in range(1, len(rows))], found
    assert "extra_info.max_steps must be an integer in 1..1000, got '3'" in found[0][2]
    assert "extra_info.reward must be one of goal, progress, got 'bogus'" in found[4][2]
    assert "draws frames 32768 px a side" in found[7][2]
    assert cli("validate", bad).exit_code == 1
    assert cli("validate", tmp_path / "mz" / "train.parquet").exit_code == 0
