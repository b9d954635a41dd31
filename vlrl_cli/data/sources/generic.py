"""Any image QA dataset: a datasets folder or file, parquet, jsonl, imagefolder or a hub id.

The user names the columns: --image-column (one image, a list of images, {bytes, path}, a local path or a
data URI), --question-column, --answer-column, plus --env-class and --prompt-template (with a
`{question}` placeholder; other braces, like \\boxed{}, are left alone).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from . import ConvertContext, Item, Reject, Source, canonical, interleave
from ...errors import UserError

DEFAULT_TEMPLATE = "{question}"


def items(path: str | None, opts: dict) -> Iterator[Item]:
    from .loading import iter_dataset_rows

    if path is None:
        raise UserError("a dataset path or hub id is needed")
    missing = [k for k in ("image_column", "question_column", "answer_column", "env_class") if not opts.get(k)]
    if missing:
        flags = ", ".join("--" + k.replace("_", "-") for k in missing)
        raise UserError(f"source {path!r} is not a named source ({', '.join(('geometry3k', 'colors', 'maze2d'))}); "
                         f"a generic dataset needs {flags}")
    cols = [opts["image_column"], opts["question_column"], opts["answer_column"]]
    id_col = opts.get("id_column")
    first, seen = True, set()
    for split, idx, row in iter_dataset_rows(path, image_columns=[opts["image_column"]]):
        if "_bad_row" in row:  # a malformed line: rejected with its reason, the rest goes on
            yield Item(source_id=f"line/{idx + 1}", split=split, payload={"_bad_row": row["_bad_row"]}, positional=True)
            continue
        if first:
            absent = [c for c in cols + ([id_col] if id_col else []) if c not in row]
            if absent:
                raise UserError(f"{path}: no column(s) {absent}; columns are {sorted(k for k in row if k != '_base_dir')}")
            if id_col is None and "id" in row:
                id_col = "id"  # a dataset's own ids: records keep them, and splits stay put when rows are added
            first = False
        payload = {c: row.get(c) for c in cols}
        payload["_base_dir"] = row.get("_base_dir")
        if id_col is not None:
            rid = row.get(id_col)
            source_id = "" if rid is None else str(rid).strip()
            if not source_id or source_id in seen:  # convert() rejects it, with this reason
                payload["_bad_id"] = f"column {id_col} is empty" if not source_id else f"duplicate id {source_id!r}"
                source_id = f"{split or 'row'}/{idx}"
            seen.add(source_id)
        else:  # no ids: the row's position (not stable if rows are inserted; the manifest says so)
            source_id = f"{split}/{idx}" if split else str(idx)
        yield Item(source_id=source_id, split=split, payload=payload, positional=id_col is None)


def convert(item: Item, ctx: ConvertContext) -> tuple[dict, list]:
    from .loading import image_bytes

    o, p = ctx.opts, item.payload
    if p.get("_bad_row"):
        raise Reject("bad_json", p["_bad_row"])
    if p.get("_bad_id"):
        raise Reject("bad_id", p["_bad_id"])
    question, answer, cell = p.get(o["question_column"]), p.get(o["answer_column"]), p.get(o["image_column"])
    if not isinstance(question, str) or not question.strip():
        raise Reject("missing_field", f"column {o['question_column']} is empty")
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise Reject("missing_field", f"column {o['answer_column']} is empty")
    truth = answer_text(answer)
    if truth is None:
        raise Reject("bad_answer", f"column {o['answer_column']}: {type(answer).__name__} {str(answer)[:40]!r} is not "
                                   "an answer (text, a number, or a list of them: any is correct)")
    cells = cell if isinstance(cell, list) else ([] if cell is None else [cell])
    if not cells:
        raise Reject("missing_field", f"column {o['image_column']} has no image")
    images = [canonical(image_bytes(c, p.get("_base_dir")), ctx) for c in cells]
    text = (o.get("prompt_template") or DEFAULT_TEMPLATE).replace("{question}", question.strip())
    record = {
        "data_source": o.get("data_source") or Path(str(o.get("path", "dataset"))).stem,
        "prompt": [{"role": "user", "content": interleave(text, images)}],
        "env_class": o["env_class"],
        "reward_spec": {"method": "rule", "ground_truth": truth},
        "extra_info": {"image_sha256": [im.sha256 for im in images]},
    }
    return record, images


def answer_text(answer) -> str | list[str] | None:
    """A row's answer as the record stores it: text, or a list of texts (any is correct); None for what is no
    answer (a bool, a dict, NaN, an empty list), which would otherwise become Python's text for it ("[]",
    "{'a': 1}", "nan") and be graded against silently."""
    import math
    import numbers

    def one(a):
        if isinstance(a, str):
            return a.strip() or None
        if isinstance(a, numbers.Number) and not isinstance(a, bool) and math.isfinite(a):
            return str(a)
        return None

    if isinstance(answer, (list, tuple)):
        texts = [one(a) for a in answer]
        return texts if texts and None not in texts else None
    return one(answer)


SOURCE = Source("generic", items, convert, ("image_column", "question_column", "answer_column", "env_class", "prompt_template",
                                           "data_source", "id_column"))
