"""Records on disk: the JSON schema, the parquet layout, and reading/writing rows.

A record is the SkyRL VLM shape (see schemas/record.schema.json). In parquet every column is nested
natively. Arrow has no union type, so a message's `content` is always stored as a list of parts; a string
content read from JSONL (or written by other tools) is accepted everywhere and means one text part.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import UserError

SCHEMA_VERSION = 1
KNOWN_SUFFIXES = (".parquet", ".jsonl", ".json")


class RecordFileError(UserError):
    """A whole file cannot be read (missing, not parquet/JSONL, corrupt footer...)."""


# --- JSON schema ----------------------------------------------------------------------------------


def schema_dir() -> Path:
    """`schemas/` of the repo (editable installs) or the copy shipped inside the wheel."""
    package = Path(__file__).resolve().parent.parent  # vlrl_cli/
    for cand in (package / "schemas", package.parent / "schemas"):
        if (cand / "record.schema.json").exists():
            return cand
    raise FileNotFoundError("schemas/record.schema.json not found next to the vlrl_cli package")


@lru_cache(maxsize=None)
def load_schema(name: str = "record") -> dict:
    return json.loads((schema_dir() / f"{name}.schema.json").read_text())


@lru_cache(maxsize=None)
def _validator(name: str):
    import jsonschema

    schema = load_schema(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _field_path(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(record)"


def schema_errors(row: Any, name: str = "record") -> list[tuple[str, str]]:
    """All schema violations of one row as (field path, message); empty when valid."""
    import jsonschema

    errors = []
    for err in _validator(name).iter_errors(row):
        # oneOf/anyOf failures hide the useful message among their sub-errors
        best = jsonschema.exceptions.best_match(err.context) if err.context else err
        best = best or err
        msg = best.message
        if len(msg) > 200:
            msg = msg[:200] + "..."
        errors.append((_field_path(best.absolute_path), msg))
    return errors


# --- rows -----------------------------------------------------------------------------------------


def strip_nulls(value: Any) -> Any:
    """Drop None-valued keys that parquet structs add (a text part has image_url: None)."""
    if isinstance(value, dict):
        return {k: strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [strip_nulls(v) for v in value]
    return value


def content_parts(content: str | list) -> list[dict]:
    """A message's content as a list of parts, whichever form it was written in."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return content


def image_urls(row: dict) -> list[str]:
    """Every image URL in a record's prompt, in order."""
    urls = []
    for msg in row.get("prompt") or []:
        if not isinstance(msg, dict):
            continue
        for part in content_parts(msg.get("content") or []):
            if isinstance(part, dict) and part.get("type") == "image_url":
                url = (part.get("image_url") or {}).get("url")
                if isinstance(url, str):
                    urls.append(url)
    return urls


# --- reading --------------------------------------------------------------------------------------


@dataclass
class BadLine:
    """A JSONL line that is not JSON: reported at its row, never fatal for the file."""

    error: str


def _open(path: Path) -> pq.ParquetFile | None:
    """Check that a records file can be read at all; the ParquetFile for parquet, else None."""
    if path.is_dir():
        raise RecordFileError(f"{path}: a directory, not a record file (.parquet, .jsonl or .json)")
    if not path.exists():
        raise RecordFileError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise RecordFileError(f"{path}: an empty file (0 bytes)")
    if path.suffix not in KNOWN_SUFFIXES:
        raise RecordFileError(f"{path}: unknown file type (expected {', '.join(KNOWN_SUFFIXES)})")
    if path.suffix == ".parquet":
        try:
            return pq.ParquetFile(path)
        except Exception as e:
            raise RecordFileError(f"{path}: not a readable parquet file ({e})") from None
    return None


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict | BadLine]]:
    """Each non-blank line of a JSONL file with its 1-based line number: the object, or a BadLine saying why
    the line is not one (a malformed line is a row of its own, never the end of the file)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield i, BadLine(f"line {i} is not valid JSON: {e.msg} (column {e.colno})")
                continue
            yield i, row if isinstance(row, dict) else BadLine(f"line {i} is a JSON {type(row).__name__}, not an object")


def count_rows(path: str | Path) -> int | None:
    """Rows in a file (None for .json, known only once parsed). Raises RecordFileError."""
    path = Path(path)
    pf = _open(path)
    if pf is not None:
        return pf.metadata.num_rows
    if path.suffix == ".json":
        return None
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def iter_rows(path: str | Path, batch_size: int = 256) -> Iterator[dict | BadLine]:
    """Yield every row of a parquet / JSONL / JSON file as a plain dict (or BadLine), in file order."""
    path = Path(path)
    pf = _open(path)
    if pf is not None:
        for batch in pf.iter_batches(batch_size=batch_size):
            for row in batch.to_pylist():
                yield strip_nulls(row)
    elif path.suffix == ".jsonl":
        for _, row in jsonl_rows(path):
            yield row
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RecordFileError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, list):
            raise RecordFileError(f"{path}: a .json records file must hold a list of records")
        yield from data


# --- writing --------------------------------------------------------------------------------------

_PART = pa.struct([("type", pa.string()), ("text", pa.string()), ("image_url", pa.struct([("url", pa.string())]))])
_MESSAGE = pa.struct([("role", pa.string()), ("content", pa.list_(_PART))])
# a list ground truth ("any of these") is stored as ground_truth = its first answer (what SFT writes) and
# ground_truths = all of them
_REWARD = pa.struct([("method", pa.string()), ("ground_truth", pa.string()), ("ground_truths", pa.list_(pa.string()))])
BASE_FIELDS = [
    ("id", pa.string()),
    ("data_source", pa.string()),
    ("split", pa.string()),
    ("prompt", pa.list_(_MESSAGE)),
    ("env_class", pa.string()),
    ("reward_spec", _REWARD),
]


def normalize_for_parquet(row: dict) -> dict:
    """Content as a list of parts; ground truth as a string (what the parquet layout stores)."""
    row = dict(row)
    row["prompt"] = [{**m, "content": content_parts(m["content"])} for m in row["prompt"]]
    gt = row.get("reward_spec", {}).get("ground_truth")
    if isinstance(gt, list):
        answers = ground_truths(row)
        row["reward_spec"] = {**row["reward_spec"], "ground_truth": answers[0] if answers else None, "ground_truths": answers}
    elif gt is not None and not isinstance(gt, str):
        row["reward_spec"] = {**row["reward_spec"], "ground_truth": str(gt)}
    return row


def ground_truths(record: dict) -> list[str]:
    """Every answer a record accepts (a list ground truth means any of them), as text; [] for none."""
    spec = record.get("reward_spec") or {}
    answers = spec.get("ground_truths")
    if answers is None:
        gt = spec.get("ground_truth")
        answers = gt if isinstance(gt, list) else [] if gt is None else [gt]
    return [a if isinstance(a, str) else repr(a) if isinstance(a, float) else str(a) for a in answers
            if a is not None and not isinstance(a, (bool, dict, list))]


class RecordWriter:
    """Appends rows to one parquet file in row groups; the schema is fixed by the first rows written.

    `extra_info` is a struct whose fields each source chooses; a later row with a key the first rows
    did not have is a bug in that source and raises instead of being silently dropped.
    """

    def __init__(self, path: str | Path, row_group_size: int = 256):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".partial")
        self.row_group_size = row_group_size
        self.schema: pa.Schema | None = None
        self.writer: pq.ParquetWriter | None = None
        self.pending: list[dict] = []
        self.rows = 0

    def write(self, row: dict) -> None:
        self.pending.append(normalize_for_parquet(row))
        if len(self.pending) >= self.row_group_size:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        try:
            self._write_pending()
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:  # one row's text where the others hold numbers, etc.
            raise UserError(f"{self.path}: the rows cannot share one parquet table ({e}); make the field one type in "
                            "every row, or write .jsonl") from None

    def _write_pending(self) -> None:
        if self.schema is None:
            extra = pa.array([r.get("extra_info") or {} for r in self.pending]).type
            fields = BASE_FIELDS + ([("extra_info", extra)] if pa.types.is_struct(extra) and extra.num_fields else [])
            self.schema = pa.schema(fields, metadata={"vlrl_schema_version": str(SCHEMA_VERSION)})
            self.tmp.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(self.tmp, self.schema, compression="zstd")
        known = set(self.schema.names)
        extra_known = set(self.schema.field("extra_info").type.names) if "extra_info" in known else set()
        for r in self.pending:
            unknown = set(r) - known - {"extra_info"} | set(r.get("extra_info") or {}) - extra_known
            if unknown:
                raise UserError(f"{self.path}: row {r.get('id')} has fields {sorted(unknown)} the first rows lacked")
        self.writer.write_table(pa.Table.from_pylist(self.pending, schema=self.schema))
        self.rows += len(self.pending)
        self.pending = []

    def close(self) -> None:
        """Flush and move the file into place atomically (a crash never leaves a half-written output)."""
        self._flush()
        if self.writer is None:  # no rows: still write an empty, readable file
            self.schema = pa.schema(BASE_FIELDS, metadata={"vlrl_schema_version": str(SCHEMA_VERSION)})
            self.tmp.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(self.schema.empty_table(), self.tmp, compression="zstd")
        else:
            self.writer.close()
        self.tmp.replace(self.path)

    def abort(self) -> None:
        """Drop the partial file (an interrupted or failed run leaves no output behind)."""
        if self.writer is not None:
            self.writer.close()
        self.tmp.unlink(missing_ok=True)


def write_rows(path: str | Path, rows) -> int:
    """Write rows to .parquet or .jsonl (chosen by suffix); returns the count."""
    path = Path(path)
    if path.suffix == ".jsonl":
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        n = 0
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
        tmp.replace(path)
        return n
    w = RecordWriter(path)
    try:
        for row in rows:
            w.write(row)
        w.close()
    except BaseException:  # no half-written file stays behind
        w.abort()
        raise
    return w.rows


# --- records of a run -----------------------------------------------------------------------------


def load_records(path: str, limit: int | None = None) -> list[dict]:
    """The rows of a record file as dicts (at most `limit`), for training, eval and check-drift. A row without
    an `id` gets its place in the file as one (`<file>:<row>`): reports, rollouts and metrics name records by
    id, and an empty one would make every such row the same record."""
    rows = []
    for i, row in enumerate(iter_rows(path)):
        if isinstance(row, dict):
            if not isinstance(row.get("id"), str) or not row["id"]:
                row = {**row, "id": f"{Path(path).name}:{i}" if row.get("id") in (None, "") else str(row["id"])}
            rows.append(row)
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise UserError(f"{path}: no records")
    return rows


def prompts_for_step(n_records: int, step: int, per_step: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """Record indices of a step: a seeded permutation per epoch, so the order depends on the step alone
    (what makes --resume reproduce an uninterrupted run). Each rank takes its own slice."""
    import random

    out = []
    start = (step * world + rank) * per_step
    for k in range(start, start + per_step):
        epoch, pos = divmod(k, n_records)
        perm = list(range(n_records))
        random.Random(seed * 1_000_003 + epoch).shuffle(perm)
        out.append(perm[pos])
    return out
