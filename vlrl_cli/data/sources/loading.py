"""Reading any tabular image dataset with `datasets`, without decoding (or fetching) its images.

Accepts a dataset saved with `save_to_disk`, a folder of parquet/jsonl files or an imagefolder, a single
parquet/jsonl file, or a hub id (only when the machine is online). Image columns are cast to
`Image(decode=False)` so rows carry raw {bytes, path}: decoding happens once, in canonicalisation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from . import SPLIT_DIRS, Reject
from ..images import ImageError, decode_data_uri, is_remote_url
from ...errors import UserError


def load_dataset_dict(path: str):
    """A local dataset file or folder (or a hub id) as a DatasetDict; a local one `datasets` cannot read is a
    UserError naming it and the cause (a malformed line in a folder's JSONL, a corrupt parquet)."""
    import datasets

    p = Path(path)
    if not p.exists():
        return _load(path)
    try:
        return _load(path)
    except datasets.exceptions.DatasetGenerationError as e:
        cause = e.__cause__ or e
        raise UserError(f"{path}: cannot be read as a dataset ({type(cause).__name__}: {str(cause)[:200]}); a .jsonl "
                        "file given by itself has its malformed lines rejected one by one") from None


def _load(path: str):
    import datasets

    p = Path(path)
    if p.is_dir() and ((p / "dataset_dict.json").exists() or (p / "dataset_info.json").exists()):
        ds = datasets.load_from_disk(str(p))
        return ds if isinstance(ds, datasets.DatasetDict) else datasets.DatasetDict({"train": ds})
    if p.is_file():
        kind = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}.get(p.suffix)
        if kind is None:
            raise UserError(f"{p}: unsupported file type {p.suffix!r} (parquet, jsonl, json, csv)")
        return datasets.load_dataset(kind, data_files={"train": str(p)})
    if p.is_dir():
        return datasets.load_dataset(str(p))  # parquet/jsonl folders and imagefolder, by datasets' rules
    if p.exists() or path.startswith((".", "/")):
        raise UserError(f"{path}: not a dataset file or folder")
    return datasets.load_dataset(path)  # a hub id: works only online


def iter_dataset_rows(path: str, image_columns: list[str]) -> Iterator[tuple[str | None, int, dict]]:
    """(split, row index, row) for every row of every split, image columns left undecoded.

    split is None when the dataset has one split only (a single file, or a folder `datasets` calls
    "train"): that name is not a split anyone chose, so prepare splits such rows by a hash of their id.
    """
    import datasets

    if Path(path).is_file() and Path(path).suffix == ".jsonl":
        yield from _jsonl_rows(Path(path))
        return
    dd = load_dataset_dict(path)
    single = len(dd) == 1
    for split_name in dd:
        ds = dd[split_name]
        for col in image_columns:
            if col in ds.features:
                feat = ds.features[col]
                if isinstance(feat, datasets.Image):
                    ds = ds.cast_column(col, datasets.Image(decode=False))
                elif isinstance(getattr(feat, "feature", None), datasets.Image):
                    ds = ds.cast_column(col, datasets.List(datasets.Image(decode=False)))
        split = None if single else SPLIT_DIRS.get(split_name, split_name)
        base = Path(path).parent if Path(path).is_file() else Path(path)
        # a ClassLabel column stores class indices; the answer is the class's name (-1: no label)
        labels = {col: feat for col, feat in ds.features.items() if isinstance(feat, datasets.ClassLabel)}
        for i, row in enumerate(ds):
            row["_base_dir"] = str(base)
            for col, feat in labels.items():
                value = row.get(col)
                row[col] = feat.int2str(value) if isinstance(value, int) and value >= 0 else None
            yield split, i, row


def _jsonl_rows(path: Path) -> Iterator[tuple[None, int, dict]]:
    """A JSONL file line by line: a malformed line is a row of its own (`_bad_row`), rejected with its line
    number, instead of failing the whole file as a `datasets` load would."""
    from ..records import BadLine, jsonl_rows

    for line, row in jsonl_rows(path):
        row = {"_bad_row": row.error} if isinstance(row, BadLine) else row
        row["_base_dir"] = str(path.parent)
        yield None, line - 1, row


def image_bytes(value: Any, base_dir: str | None = None) -> bytes:
    """Raw bytes of one image cell: {bytes, path}, raw bytes, a data URI, or a local path. Never fetches."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        if is_remote_url(value):
            raise Reject("image_remote", f"remote image URL {value[:80]} (nothing is fetched)")
        if value.startswith("data:"):
            try:  # the one checked decoder: size limit before decoding, MIME must match the bytes
                return decode_data_uri(value)[1]
            except ImageError as e:
                raise Reject(e.code, str(e)) from None
        p = Path(value)
        if not p.is_absolute() and base_dir:
            p = Path(base_dir) / p
        if p.is_dir():
            raise Reject("image_unreadable", f"image path {value} is a directory, not an image file")
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise Reject("missing_file", f"image file {value} does not exist") from None
        except OSError as e:
            raise Reject("image_unreadable", f"image file {value} cannot be read: {e.strerror}") from None
        if not data:
            raise Reject("image_empty", f"image file {value} is empty (0 bytes)")
        return data
    raise Reject("missing_field", f"image cell of type {type(value).__name__} holds no image")
