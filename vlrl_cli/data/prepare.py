"""`vlrl prepare`: a source's rows -> train/val(/test).parquet + rejects.jsonl + manifest.json.

Flow: the source yields cheap items in a fixed order; chunks of them go through a process pool (ordered
map, so output order never depends on timing); each result is a record (written to its split) or a
reject (written with its reason). Memory is bounded by one chunk. Every input row ends up in exactly one
output or in rejects.jsonl, and the counts are checked before the manifest is written.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .. import __version__
from .images import CanonicalSpec, ImageError, ImageLimits
from .pool import ordered_map, row_workers
from .records import SCHEMA_VERSION, RecordWriter
from .sources import ConvertContext, Item, Reject, get_source
from ..errors import UserError, stable_message

CHUNK = 128  # items per pool.map call: bounds memory (raw bytes + encoded images of one chunk)


@dataclass
class PrepareOptions:
    source: str  # geometry3k | colors | maze2d | a dataset path / hub id
    out: Path
    path: str | None = None  # where a named source reads from (geometry3k)
    split: str = "auto"  # auto | source | "train=0.9,val=0.1"
    limit: int | None = None  # at most this many rows per source split
    seed: int = 0
    workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    spec: CanonicalSpec = field(default_factory=CanonicalSpec)
    source_opts: dict = field(default_factory=dict)  # per-source options (colours, columns, template...)
    overwrite: bool = False  # replace an earlier prepare's outputs in `out`
    # the env_class names the caller's environment registry knows (the CLI passes them); None: not checked here
    env_classes: frozenset[str] | None = None


@dataclass
class PrepareResult:
    out: Path
    rows_in: int
    rows_out: dict[str, int]
    rejected: int
    manifest: dict


def parse_split(split: str) -> dict[str, float] | str:
    """"auto" / "source", or ratios like "train=0.9,val=0.1" (normalised to sum to 1)."""
    if split in ("auto", "source"):
        return split
    ratios = {}
    for part in split.split(","):
        name, _, value = part.partition("=")
        try:
            ratios[name.strip()] = float(value)
        except ValueError:
            raise UserError(f"--split {split!r}: expected auto, source or name=ratio pairs like train=0.9,val=0.1") from None
    if any(v < 0 for v in ratios.values()) or sum(ratios.values()) <= 0:
        raise UserError(f"--split {split!r}: ratios must be >= 0 and not all zero")
    total = sum(ratios.values())
    return {k: v / total for k, v in ratios.items()}


def assign_split(item: Item, split: dict | str, seed: int) -> str:
    """A source split when there is one (auto/source), else a bucket by a hash of the row id.

    Hashing the id (not shuffling) keeps a row in the same split when the dataset grows or is re-read.
    """
    if split == "source" and item.split is None:
        raise UserError(f"--split source: row {item.source_id} has no source split; give ratios instead")
    if isinstance(split, str) and item.split is not None:
        return item.split
    ratios = split if isinstance(split, dict) else {"train": 0.9, "val": 0.1}
    u = int.from_bytes(hashlib.sha256(f"{seed}:{item.source_id}".encode()).digest()[:8], "big") / 2**64
    acc = 0.0
    for name, r in ratios.items():
        acc += r
        if u < acc:
            return name
    return list(ratios)[-1]


def split_method(how: dict, split) -> str:
    """One sentence for the manifest and the CLI: where the rows' splits came from."""
    ratios = split if isinstance(split, dict) else {"train": 0.9, "val": 0.1}
    parts = []
    if how["source"]:
        parts.append(f"{how['source']} rows kept their source split")
    if how["hash"]:
        ids = "row position (no id column: rows move between splits if rows are inserted; give --id-column)" \
            if how["positional_ids"] else "row id"
        parts.append(f"{how['hash']} rows split by a hash of the {ids}, "
                     + ", ".join(f"{k}={v:g}" for k, v in ratios.items()))
    return "; ".join(parts) or "no rows"


# worker state: set once per process by the pool initializer (or directly when workers == 1)
_CONVERT: Callable | None = None
_CTX: ConvertContext | None = None


def _init_worker(source_name: str, ctx: ConvertContext) -> None:
    global _CONVERT, _CTX
    _CONVERT, _CTX = get_source(source_name).convert, ctx


def _convert_one(item: Item):
    try:
        record, images = _CONVERT(item, _CTX)
        return "ok", record, [(im.width, im.height, len(im.data)) for im in images]
    except Reject as e:
        return "reject", e.code, str(e)
    except ImageError as e:
        return "reject", e.code, str(e)
    except Exception as e:  # a bug or odd data: keep the row's reason, never take the run down
        return "reject", "error", f"{type(e).__name__}: {stable_message(e)}"


def _limited(items, limit):
    seen: dict = {}
    for item in items:
        seen[item.split] = seen.get(item.split, 0) + 1
        if limit is None or seen[item.split] <= limit:
            yield item


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _ImageStats:
    def __init__(self):
        self.n, self.bytes, self.w, self.h = 0, 0, [], []

    def add(self, w, h, nbytes):
        self.n += 1
        self.bytes += nbytes
        self.w.append(w)
        self.h.append(h)

    def summary(self, fmt: str) -> dict:
        if not self.n:
            return {"count": 0, "format": fmt}
        return {
            "count": self.n, "format": fmt, "bytes_total": self.bytes, "bytes_mean": round(self.bytes / self.n),
            "width": {"min": min(self.w), "max": max(self.w), "mean": round(sum(self.w) / self.n, 1)},
            "height": {"min": min(self.h), "max": max(self.h), "mean": round(sum(self.h) / self.n, 1)},
        }


def _previous_files(out: Path, overwrite: bool) -> list[str]:
    """The files of a dataset already in `out` (its manifest's, and the manifest), which --overwrite replaces only
    once the new dataset is whole: a failed or interrupted prepare leaves the previous one as it was."""
    old = out / "manifest.json"
    if not old.exists():
        return []
    if not overwrite:
        raise UserError(f"{out} already holds a prepared dataset (manifest.json); pass --overwrite to replace it")
    try:
        names = list(json.loads(old.read_text()).get("files", {}))
    except (json.JSONDecodeError, OSError):
        names = []
    return [Path(name).name for name in names] + ["manifest.json"]


def check_options(opts: PrepareOptions) -> None:
    """Every option that can be wrong, before a row is read (UserError naming the flag)."""
    sp, so = opts.spec, opts.source_opts
    if sp.factor < 1:
        raise UserError(f"--factor must be a positive integer (28 for Qwen2/2.5-VL, 32 for Qwen3-VL), got {sp.factor}")
    if sp.min_pixels < sp.factor * sp.factor:
        raise UserError(f"--min-pixels {sp.min_pixels} is below one {sp.factor}x{sp.factor} patch ({sp.factor * sp.factor})")
    if sp.max_pixels < sp.min_pixels:
        raise UserError(f"--max-pixels {sp.max_pixels} is below --min-pixels {sp.min_pixels}")
    for key in ("rows", "val_rows", "num_colors", "image_size", "maze_size", "max_steps", "min_moves", "max_moves"):
        if key in so and so[key] < (0 if key in ("rows", "val_rows") else 1):
            raise UserError(f"--{key.replace('_', '-')} must be {'>= 0' if key in ('rows', 'val_rows') else '>= 1'}, got {so[key]}")
    if "image_size" in so and so["image_size"] < 16:
        raise UserError(f"--image-size {so['image_size']} is too small to draw on (>= 16)")
    template = so.get("prompt_template")
    if template is not None and "{question}" not in template:
        raise UserError(f"--prompt-template {template!r} has no {{question}} placeholder: every row would get the same text")
    env = so.get("env_class")
    known = opts.env_classes
    if env is not None and known is not None and env not in known and ":" not in env:
        raise UserError(f"--env-class {env!r} is not a built-in environment ({', '.join(sorted(known))}); "
                        "for your own environment give its import path, e.g. mypkg.envs:MyEnv")
    if opts.workers < 1:
        raise UserError(f"--workers must be >= 1, got {opts.workers}")


def prepare(opts: PrepareOptions, progress: Callable[[int], None] | None = None) -> PrepareResult:
    """Run the whole conversion. `progress(n)` is called after each chunk with the rows done so far."""
    check_options(opts)
    source = get_source(opts.source)
    unused = sorted(set(opts.source_opts) - set(source.options))
    if unused:  # a flag this source does not read would be silently ignored
        flags = ", ".join("--" + k.replace("_", "-") for k in unused)
        reads = ", ".join("--" + k.replace("_", "-") for k in source.options) or "none of the source flags"
        raise UserError(f"{flags} do{'es' if len(unused) == 1 else ''} not apply to source {source.name} (it reads {reads})")
    split = parse_split(opts.split)
    path = opts.path if opts.path is not None else (None if source.name != "generic" else opts.source)
    source_opts = {**opts.source_opts, "seed": opts.seed, "path": path}
    ctx = ConvertContext(spec=opts.spec, limits=ImageLimits(), opts=source_opts)
    items = iter(source.items(path, source_opts))
    # sources check their options as they yield the first row: take it before the output folder is touched,
    # so a bad flag with --overwrite leaves the previous dataset as it was
    first = next(items, None)
    if first is None or opts.limit == 0:  # before the output folder is touched: a previous dataset stays as it was
        raise UserError(f"{path or source.name}: the source gave no rows{' (--limit 0)' if opts.limit == 0 else ''}; "
                        f"nothing was written to {opts.out}")
    items = _limited(itertools.chain([first] if first is not None else [], items), opts.limit)

    out = Path(opts.out)
    previous = _previous_files(out, opts.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    writers: dict[str, RecordWriter] = {}
    stats = _ImageStats()
    rows_in = rejected = 0
    how = {"source": 0, "hash": 0, "positional_ids": 0}  # how rows got their split (the manifest says)
    rejects_tmp = out / "rejects.jsonl.partial"

    try:
        with row_workers(opts.workers, _init_worker, (source.name, ctx)) as pool, \
                open(rejects_tmp, "w", encoding="utf-8") as rejects:
            for chunk, results in ordered_map(pool, _convert_one, items, CHUNK):
                for item, res in zip(chunk, results):
                    split_name = assign_split(item, split, opts.seed)
                    rows_in += 1
                    if res[0] == "reject":
                        rejected += 1
                        rejects.write(json.dumps({"source_id": item.source_id, "split": split_name,
                                                  "code": res[1], "reason": res[2]}, ensure_ascii=False) + "\n")
                        continue
                    # how the kept rows got their split (a rejected row's split decides nothing: a malformed
                    # line has no id, and must not make the manifest call the whole file positional)
                    how["source" if isinstance(split, str) and item.split is not None else "hash"] += 1
                    how["positional_ids"] += item.positional
                    record, sizes = res[1], res[2]
                    record = {"id": f"{record['data_source']}-{item.source_id}", "split": split_name, **record}
                    if split_name not in writers:
                        writers[split_name] = RecordWriter(out / f"{split_name}.parquet")
                    writers[split_name].write(record)
                    for w, h, nbytes in sizes:
                        stats.add(w, h, nbytes)
                if progress:
                    progress(rows_in)
    except BaseException:  # Ctrl-C or a failure: no *.partial file stays behind
        for w in writers.values():
            w.abort()
        rejects_tmp.unlink(missing_ok=True)
        raise
    # the splits asked for always exist (an empty file is clearer to downstream tools than a missing one):
    # train and val by default, exactly the named ones with --split ratios
    for name in split if isinstance(split, dict) else ("train", "val"):
        writers.setdefault(name, RecordWriter(out / f"{name}.parquet"))
    if rows_in and rejected == rows_in and previous:
        # nothing to replace the previous dataset with: it stays whole, and the reasons go beside it
        for w in writers.values():
            w.abort()
        kept = out.parent / f"{out.name}.rejects.jsonl"
        rejects_tmp.replace(kept)
        raise UserError(f"{path or source.name}: every row was rejected ({rows_in} of {rows_in}: "
                        f"{_commonest_codes(kept)}); {out} keeps its previous dataset, the reasons are in {kept}")
    for w in writers.values():
        w.close()
    rejects_tmp.replace(out / "rejects.jsonl")
    new_names = {w.path.name for w in writers.values()} | {"rejects.jsonl", "manifest.json"}
    for name in previous:  # the previous dataset's files this one does not replace (a split it lacks)
        if name not in new_names:
            (out / name).unlink(missing_ok=True)

    rows_out = {name: w.rows for name, w in sorted(writers.items())}
    if rows_in != sum(rows_out.values()) + rejected:  # the promise: no row disappears
        raise RuntimeError(f"row accounting is off: {rows_in} in, {sum(rows_out.values())} out, {rejected} rejected")
    manifest = {
        "vlrl_version": __version__,
        "schema_version": SCHEMA_VERSION,
        "source": opts.source if source.name == "generic" else source.name,
        "path": path,
        "options": {"split": opts.split, "limit": opts.limit, "seed": opts.seed, **asdict(opts.spec),
                    **{k: v for k, v in opts.source_opts.items() if k in source.options}},
        "counts": {"in": rows_in, "out": rows_out, "rejected": rejected},
        "split_method": split_method(how, split),
        "images": stats.summary(opts.spec.image_format),
        **({"summary": source.summary(source_opts)} if source.summary else {}),
        "files": {p.name: _sha256_file(p) for p in sorted([w.path for w in writers.values()] + [out / "rejects.jsonl"])},
    }
    tmp = out / "manifest.json.partial"
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(out / "manifest.json")
    if rows_in and not sum(rows_out.values()):  # an empty dataset is not a result: say why, keep the reasons
        raise UserError(f"{path or source.name}: every row was rejected ({rows_in} of {rows_in}: "
                        f"{_commonest_codes(out / 'rejects.jsonl')}); the reasons are in {out / 'rejects.jsonl'}")
    return PrepareResult(out, rows_in, rows_out, rejected, manifest)


def _commonest_codes(rejects: Path) -> str:
    codes = Counter(json.loads(line)["code"] for line in rejects.open(encoding="utf-8"))
    return ", ".join(f"{code} x{n}" for code, n in codes.most_common(3))
