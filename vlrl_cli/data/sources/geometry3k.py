"""Geometry3K, from its original layout or from the Hugging Face layout (hiyouga/geometry3k).

Original layout: one folder per problem with data.json (problem_text, choices, answer letter) and
img_diagram.png, optionally under train/ val/ test/. Hugging Face layout: columns `images` (list of
{bytes, path}), `problem` (text with an `<image>` marker) and `answer` (the value).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from . import SPLIT_DIRS, ConvertContext, Item, Reject, Source, canonical, interleave
from ...errors import UserError

INSTRUCTION = "Solve the problem step by step, then give the final answer inside \\boxed{}."
ENV_CLASS = "geometry3k"


def _problem_dirs(root: Path) -> Iterator[tuple[str | None, Path]]:
    splits = [d for d in sorted(root.iterdir()) if d.is_dir() and d.name in SPLIT_DIRS]
    if splits:
        for d in splits:
            for p in sorted((x for x in d.iterdir() if x.is_dir()), key=_numeric_key):
                yield SPLIT_DIRS[d.name], p
    else:
        for p in sorted((x for x in root.iterdir() if x.is_dir()), key=_numeric_key):
            yield None, p


def _numeric_key(p: Path):
    return (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name)


def is_original_layout(root: Path) -> bool:
    if not root.is_dir():
        return False
    return any((p / "data.json").exists() for _, p in _problem_dirs(root))


def items(path: str | None, opts: dict) -> Iterator[Item]:
    if path is None:
        raise UserError("geometry3k needs a path (a folder in the original layout, a local dataset, or a hub id)")
    root = Path(path)
    if is_original_layout(root):
        for split, d in _problem_dirs(root):
            yield Item(source_id=(f"{split}/" if split else "") + d.name, split=split, payload={"dir": str(d)})
    else:
        from .loading import iter_dataset_rows

        for split, idx, row in iter_dataset_rows(path, image_columns=["images"]):
            yield Item(source_id=f"{split}/{idx}", split=split, payload={"hf": row})


def convert(item: Item, ctx: ConvertContext) -> tuple[dict, list]:
    if "dir" in item.payload:
        return _convert_original(Path(item.payload["dir"]), ctx)
    return _convert_hf(item.payload["hf"], ctx)


def _record(parts: list[dict], answer: str, extra: dict) -> dict:
    return {
        "data_source": "geometry3k",
        "prompt": [{"role": "user", "content": parts}],
        "env_class": ENV_CLASS,
        "reward_spec": {"method": "rule", "ground_truth": answer},
        "extra_info": extra,
    }


def _convert_original(d: Path, ctx: ConvertContext) -> tuple[dict, list]:
    try:
        meta = json.loads((d / "data.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Reject("missing_file", f"{d}/data.json is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Reject("bad_json", f"{d}/data.json is not JSON: {e}") from None
    text, choices, letter = meta.get("problem_text"), meta.get("choices") or [], meta.get("answer")
    if not isinstance(text, str) or not text.strip():
        raise Reject("missing_field", f"{d}/data.json has no problem_text")
    if not isinstance(letter, str) or len(letter) != 1 or not ("A" <= letter <= "Z"):
        raise Reject("bad_answer", f"{d}/data.json answer {letter!r} is not a choice letter")
    idx = ord(letter) - ord("A")
    if idx >= len(choices):
        raise Reject("bad_answer", f"{d}/data.json answer {letter} but only {len(choices)} choices")
    try:
        raw = (d / "img_diagram.png").read_bytes()
    except FileNotFoundError:
        raise Reject("missing_file", f"{d}/img_diagram.png is missing") from None
    img = canonical(raw, ctx)
    parts = interleave(f"{text.strip()}\n{INSTRUCTION}", [img])
    extra = {
        "source_id": str(meta.get("id", d.name)),
        "choices": [str(c) for c in choices],
        "answer_letter": letter,
        "problem_type": [str(t) for t in meta.get("problem_type_graph") or []],
        "image_sha256": [img.sha256],
    }
    return _record(parts, str(choices[idx]).strip(), extra), [img]


def _convert_hf(row: dict, ctx: ConvertContext) -> tuple[dict, list]:
    from .loading import image_bytes

    problem, answer, images = row.get("problem"), row.get("answer"), row.get("images")
    if not isinstance(problem, str) or not problem.strip():
        raise Reject("missing_field", "column problem is empty")
    if answer is None or not str(answer).strip():
        raise Reject("missing_field", "column answer is empty")
    if not images:
        raise Reject("missing_field", "column images is empty")
    canon = [canonical(image_bytes(im), ctx) for im in images]
    parts = interleave(f"{problem.strip()}\n{INSTRUCTION}", canon)
    extra = {"source_id": "", "choices": [], "answer_letter": "", "problem_type": [],
             "image_sha256": [c.sha256 for c in canon]}
    return _record(parts, str(answer).strip(), extra), canon


SOURCE = Source("geometry3k", items, convert)
