"""`vlrl validate`: check every row of record files and report every problem (never stop at the first).

Checks: the JSON schema; every image decodes within limits and is what its MIME type says; no remote
image URLs (nothing is ever fetched); a known env_class; rule rewards have a ground truth; at most K
images; and, with a processor, the exact prompt length after the chat template with image placeholders
expanded, and placeholder counts that agree with the image grids.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..rollout.envs import env_registry, known_env_classes
from ..data.images import ImageError, ImageLimits, decode_data_uri, is_remote_url, open_image
from ..data.pool import ordered_map, row_workers
from ..data.records import BadLine, RecordFileError, count_rows, ground_truths, image_urls, iter_rows, schema_errors
from ..errors import UserError

CHUNK = 64


@dataclass
class Problem:
    file: str
    row: int  # 0-based index of the record in its file
    severity: str  # error | warning
    code: str
    message: str


@dataclass
class ValidateOptions:
    processor: str | None = None  # local model dir or hub id: enables exact token counts
    max_prompt_tokens: int | None = None
    max_images: int | None = None
    allow_remote: bool = False  # remote URLs become warnings (still never fetched)
    env_classes: tuple[str, ...] = ()  # accepted besides the built-in environments
    workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    limits: ImageLimits = field(default_factory=ImageLimits)


@dataclass
class ValidationReport:
    files: list[str]
    rows: int
    problems: list[Problem]
    bad_rows: dict[str, set[int]]  # rows with at least one error, per file

    @property
    def errors(self) -> int:
        return sum(p.severity == "error" for p in self.problems)

    @property
    def warnings(self) -> int:
        return sum(p.severity == "warning" for p in self.problems)

    def by_code(self) -> Counter:
        return Counter((p.code, p.severity) for p in self.problems)

    def to_json(self) -> dict:
        return {"files": self.files, "rows": self.rows, "errors": self.errors, "warnings": self.warnings,
                "problems": [asdict(p) for p in self.problems]}


# --- checking one row -----------------------------------------------------------------------------

def _schema_code(field_path: str, message: str) -> str:
    if field_path == "prompt" and ("should be non-empty" in message or "is too short" in message):
        return "empty_prompt"
    if "is a required property" in message:
        return "missing_field"
    if "is not of type" in message:
        return "wrong_type"
    if "is not one of" in message or "was expected" in message:
        return "bad_value"
    return "schema"


_IMPORTS: dict[str, str | None] = {}  # env_class import path -> why it cannot be used (None: it can)


def _import_problem(path: str) -> str | None:
    """Why an env_class import path (module:Class) cannot be used here, as train would find at its start; a typo
    in a module or class name is the row's error now, not a surprise after a model loads. "" (no path): None."""
    if not path:
        return None
    if path not in _IMPORTS:
        from ..errors import UserError
        from ..rollout.envs import load_env_class

        try:
            load_env_class(path, path)
            _IMPORTS[path] = None
        except UserError as e:
            _IMPORTS[path] = str(e)
    return _IMPORTS[path]


def _env_record_problem(env: str, row: dict) -> str | None:
    """What the row's environment says of the row before any episode: its turn limit, read from extra_info (a
    maze's max_steps "3"), as train and eval find when they size the engine, and its check_record (a maze's
    size, seed, cell size, reward, variant), as its reset would find. None when fine or not resolvable
    here (a name registered only by --env: its class is checked when that command starts)."""
    path = env if ":" in env else env_registry().get(env, "")
    if not path or _import_problem(path):
        return None
    from ..errors import UserError
    from ..rollout.envs import load_env_class
    from ..rollout.envs.base import is_count
    from ..rollout.episodes import env_call

    try:  # through env_call: the user's code, so its exceptions, exits and hangs are this row's problem
        cls = load_env_class(env, path)
        turns = env_call(cls, "turn_limit", row, row)
        if callable(getattr(cls, "check_record", None)):  # an environment's other settings (a maze's size, seed)
            env_call(cls, "check_record", row, row)
    except UserError as e:
        return str(e)
    return None if is_count(turns, 1) else f"{env}: turn_limit(record) gave {str(turns)[:40]!r}, not a whole number >= 1"


_PROCESSORS: dict = {}  # loaded once per process, by name


def _get_processor(name: str | None):
    if name and name not in _PROCESSORS:
        from ..model.loading import load_processor

        _PROCESSORS[name] = load_processor(name)
    return _PROCESSORS.get(name) if name else None


def check_row(row, opts: ValidateOptions) -> list[tuple[str, str, str]]:
    """Problems of one row as (severity, code, message)."""
    if isinstance(row, BadLine):
        return [("error", "bad_json", row.error)]
    if not isinstance(row, dict):
        return [("error", "wrong_type", f"record is a {type(row).__name__}, not an object")]
    found = [("error", _schema_code(f, m), f"{f}: {m}") for f, m in schema_errors(row)]

    env = row.get("env_class")
    if isinstance(env, str) and env.startswith("gymnasium:") and row.get("prompt") == []:
        found = [f for f in found if f[1] != "empty_prompt"]  # its reset renders the first frame
    # an import path (module:Class) names its own class: prepare writes them, train resolves them
    if isinstance(env, str) and env and ":" not in env and env not in known_env_classes(opts.env_classes):
        found.append(("error", "unknown_env_class", f"env_class: {env!r} is not a known environment "
                      f"({', '.join(sorted(known_env_classes(opts.env_classes)))})"))
    elif isinstance(env, str) and ":" in env and (why := _import_problem(env)):
        found.append(("error", "unknown_env_class", f"env_class: {why}"))
    elif isinstance(env, str) and env not in opts.env_classes and (why := _import_problem(env_registry().get(env, ""))):
        # a name an installed package registers (entry point) whose module is gone or broken: found now, as for
        # an import path (a recipe's own envs: were imported when it loaded)
        found.append(("error", "unknown_env_class", f"env_class: {env!r} is registered as {env_registry()[env]}: {why}"))
    elif isinstance(env, str) and env and (why := _env_record_problem(env, row)):
        found.append(("error", "bad_env_setting", why))
    spec = row.get("reward_spec")
    if isinstance(spec, dict) and spec.get("method") == "rule" and not any(a.strip() for a in ground_truths(row)):
        found.append(("error", "missing_ground_truth", "reward_spec.ground_truth: a rule reward needs a ground truth"))

    urls = image_urls(row)
    if opts.max_images is not None and len(urls) > opts.max_images:
        found.append(("error", "too_many_images", f"prompt: {len(urls)} images, limit {opts.max_images}"))
    images_ok, decoded = True, []
    for i, url in enumerate(urls):
        if is_remote_url(url):
            sev = "warning" if opts.allow_remote else "error"
            found.append((sev, "image_remote", f"image {i}: remote URL {url[:80]} (never fetched)"))
            images_ok = False
            continue
        try:
            _, data = decode_data_uri(url, opts.limits)
            decoded.append(open_image(data, opts.limits))
        except ImageError as e:
            found.append(("error", e.code, f"image {i}: {e}"))
            images_ok = False

    processor = _get_processor(opts.processor)
    schema_ok = not any(code in ("missing_field", "wrong_type", "empty_prompt", "schema", "bad_value")
                        for _, code, _ in found)
    if processor is not None and images_ok and schema_ok and row.get("prompt"):
        found += _check_with_processor(row, processor, opts, decoded)
    return found


def _check_with_processor(row: dict, processor, opts: ValidateOptions, decoded: list) -> list[tuple[str, str, str]]:
    from ..model.render import image_factor, pixel_bounds, processor_size, render_prompt

    try:
        rendered = render_prompt(processor, row["prompt"], limits=opts.limits, decoded=decoded)
    except Exception as e:  # the processor refuses the prompt: that is this row's problem
        return [("error", "processor_error", f"prompt: the processor failed: {type(e).__name__}: {e}")]
    found = []
    if opts.max_prompt_tokens is not None and rendered.length > opts.max_prompt_tokens:
        found.append(("error", "prompt_too_long",
                      f"prompt: {rendered.length} tokens after the chat template, limit {opts.max_prompt_tokens}"))
    if rendered.num_image_tokens != rendered.expected_image_tokens:
        found.append(("error", "image_token_mismatch",
                      f"prompt: {rendered.num_image_tokens} image placeholder tokens, the image grids imply "
                      f"{rendered.expected_image_tokens}"))
    # a processor with a soft-token budget (Gemma 4) rescales every image to fill it, whatever its size: no
    # stored size avoids that, so there is nothing to warn about or to prepare
    budget = getattr(processor.image_processor, "max_soft_tokens", None)
    for i, img in enumerate([] if budget else rendered.images):
        w, h = img.size
        if processor_size(processor, w, h) != (w, h):
            W, H = processor_size(processor, w, h)
            found.append(("warning", "image_not_canonical",
                          f"image {i}: the processor resizes {w}x{h} to {W}x{H} (sides a multiple of "
                          f"{image_factor(processor)}, {pixel_bounds(processor)[1]} pixels at most); run it through "
                          "`vlrl prepare` to store the model's pixels"))
    return found


# --- whole files ----------------------------------------------------------------------------------

_OPTS: ValidateOptions | None = None


def _init_worker(opts: ValidateOptions) -> None:
    global _OPTS
    _OPTS = opts
    if opts.processor:
        import torch

        torch.set_num_threads(1)  # parallelism comes from the worker processes
    _get_processor(opts.processor)


def _check(row):
    try:
        return check_row(row, _OPTS)
    except Exception as e:  # never let one row take the run down
        return [("error", "internal_error", f"{type(e).__name__}: {e}")]


def total_rows(paths: list[str | Path]) -> int | None:
    counts = [count_rows(p) for p in paths]
    return None if None in counts else sum(counts)


def validate_paths(paths: list[str | Path], opts: ValidateOptions = ValidateOptions(),
                   progress: Callable[[int], None] | None = None, limit: int | None = None) -> ValidationReport:
    """Validate every row of every file (the first `limit` of each). Raises RecordFileError when a file cannot
    be read at all."""
    # open every file first: an unreadable file fails fast, before minutes of work on the others
    for p in paths:
        next(iter_rows(p), None)
    problems: list[Problem] = []
    bad_rows: dict[str, set[int]] = {str(p): set() for p in paths}
    rows = 0
    with row_workers(opts.workers, _init_worker, (opts,)) as pool:
        for p in paths:
            index = 0
            for chunk, results in ordered_map(pool, _check, itertools.islice(iter_rows(p), limit), CHUNK):
                for found in results:
                    for severity, code, message in found:
                        problems.append(Problem(str(p), index, severity, code, message))
                        if severity == "error":
                            bad_rows[str(p)].add(index)
                    index += 1
                rows += len(chunk)
                if progress:
                    progress(rows)
    if not rows:  # "ok: 0 rows" would read as a pass: there was nothing to check
        blank = len(paths) == 1 and Path(paths[0]).suffix == ".jsonl"
        raise RecordFileError(f"{', '.join(str(p) for p in paths)}: no rows{' (blank lines only)' if blank else ''}")
    return ValidationReport([str(p) for p in paths], rows, problems, bad_rows)


def check_run_data(paths: list[str], env_classes: tuple[str, ...] = (), show: int = 20, verb: str = "train",
                   limit: int | None = None) -> int:
    """The rows a run will use (the first `limit` of each file, where it reads no more), through validate's
    checks (schema, env_class, ground truth, every image).
    Raises UserError naming every bad row by file and row (the first `show`, and how many in all) before
    any model is loaded; returns the number of rows checked."""
    report = validate_paths([p for p in paths if p], ValidateOptions(env_classes=env_classes), limit=limit)
    if not report.errors:
        return report.rows
    bad = [p for p in report.problems if p.severity == "error"]
    rows = sum(len(v) for v in report.bad_rows.values())
    lines = [f"  {p.file}:{p.row}: [{p.code}] {p.message}" for p in bad[:show]]
    more = f"\n  ... {len(bad) - show} more (vlrl validate lists them all)" if len(bad) > show else ""
    raise UserError(f"{rows} of {report.rows} rows would not {verb} ({len(bad)} errors); fix them, or keep the good rows "
                    f"with `vlrl validate FILE --write-clean CLEAN`:\n" + "\n".join(lines) + more)


def write_clean(report: ValidationReport, out: str | Path) -> dict[str, int]:
    """Write each file's error-free rows, keeping its format and columns exactly.

    One input: `out` is the output file, in the format its extension names (.parquet, .jsonl, .json; the
    input's own format keeps its columns exactly, another is converted). Several: `out` is a folder that
    gets a file of the same name each.
    """
    import json

    import pyarrow.parquet as pq

    from ..data.records import KNOWN_SUFFIXES, write_rows

    out = Path(out)
    multi = len(report.files) > 1
    if not multi and out.suffix not in KNOWN_SUFFIXES:
        raise UserError(f"--write-clean {out}: the extension names the format to write: {', '.join(KNOWN_SUFFIXES)}")
    written = {}
    for f in report.files:
        src = Path(f)
        dest = out / src.name if multi else out
        if dest.resolve() == src.resolve():
            raise UserError(f"--write-clean {dest} would overwrite its input")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".partial")
        bad = report.bad_rows[f]
        if dest.suffix != src.suffix:  # another format: the rows, converted
            n = write_rows(dest, (r for i, r in enumerate(iter_rows(src)) if i not in bad)) if dest.suffix != ".json" \
                else _write_json_list(dest, [r for i, r in enumerate(iter_rows(src)) if i not in bad])
            written[str(dest)] = n
            continue
        if src.suffix == ".parquet":
            table = pq.read_table(src)
            keep = [i for i in range(table.num_rows) if i not in bad]
            pq.write_table(table.take(keep), tmp, compression="zstd")
            n = len(keep)
        else:
            rows = list(iter_rows(src))
            good = [r for i, r in enumerate(rows) if i not in bad]
            with open(tmp, "w", encoding="utf-8") as fh:
                if src.suffix == ".jsonl":
                    fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in good)
                else:
                    json.dump(good, fh, ensure_ascii=False)
            n = len(good)
        tmp.replace(dest)
        written[str(dest)] = n
    return written


def _write_json_list(dest: Path, rows: list) -> int:
    import json

    tmp = dest.with_name(dest.name + ".partial")
    tmp.write_text(json.dumps(rows, ensure_ascii=False))
    tmp.replace(dest)
    return len(rows)
