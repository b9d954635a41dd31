"""Dataset sources for `vlrl prepare`.

A source is two plain functions:
  items(path, opts) -> iterator of Item     (cheap: ids, paths or raw bytes, read in the main process)
  convert(item, ctx) -> (record, images)    (the real work, run in worker processes; raises Reject)
so prepare can stream items in bounded chunks through a process pool and keep the output order fixed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ..images import CanonicalImage, CanonicalSpec, ImageError, ImageLimits


SPLIT_DIRS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


class Reject(Exception):
    """An input row that cannot become a record. `code` is stable, the message says why."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Item:
    source_id: str  # stable id within the source (folder name, row index...)
    split: str | None  # the source's own split, when it has one
    payload: dict[str, Any]  # picklable: handed to convert() in a worker
    positional: bool = False  # source_id is only the row's position (no id in the data)


@dataclass
class ConvertContext:
    spec: CanonicalSpec = field(default_factory=CanonicalSpec)
    limits: ImageLimits = field(default_factory=ImageLimits)
    opts: dict[str, Any] = field(default_factory=dict)  # source options (prompt template, colours...)


@dataclass
class Source:
    name: str
    items: Callable[[str | None, dict], Iterator[Item]]
    convert: Callable[[Item, ConvertContext], tuple[dict, list[CanonicalImage]]]
    options: tuple[str, ...] = ()  # the source options it reads (recorded in the manifest)
    summary: Callable[[dict], dict] | None = None  # what the generated rows are like (the manifest's "summary")


def image_part(img: CanonicalImage) -> dict:
    return {"type": "image_url", "image_url": {"url": img.data_uri}}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def interleave(text: str, images: list[CanonicalImage], marker: str = "<image>") -> list[dict]:
    """Parts for a question whose text marks image positions with `marker`; unmarked images go first.

    The marker never survives into the prompt (it would be a stray token the model never saw in training).
    """
    pieces = text.split(marker)
    n_markers = len(pieces) - 1
    if n_markers > len(images):
        raise Reject("image_count", f"text has {n_markers} {marker} markers but the row has {len(images)} images")
    parts = [image_part(im) for im in images[: len(images) - n_markers]]
    for i, piece in enumerate(pieces):
        if piece.strip():
            parts.append(text_part(piece.strip()))
        if i < n_markers:
            parts.append(image_part(images[len(images) - n_markers + i]))
    return parts


def canonical(data, ctx: ConvertContext) -> CanonicalImage:
    """Canonicalise one image, turning image errors into rejects with the same code."""
    from ..images import canonicalize

    try:
        return canonicalize(data, ctx.spec, ctx.limits)
    except ImageError as e:
        raise Reject(e.code, str(e)) from None


def get_source(name: str) -> Source:
    from . import colors, generic, geometry3k, maze2d

    named = {"geometry3k": geometry3k.SOURCE, "colors": colors.SOURCE, "maze2d": maze2d.SOURCE}
    return named.get(name, generic.SOURCE)


NAMED_SOURCES = ("geometry3k", "colors", "maze2d")
