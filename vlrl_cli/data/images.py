"""The one image canonicalisation, used by prepare, validate, rollouts and training.

Why one function: Qwen-VL processors resize every image to a multiple of patch x merge size (28 for
Qwen2/2.5-VL, 32 for Qwen3-VL) inside [min_pixels, max_pixels]. If the stored image already has such a
size, every later consumer (vLLM's processor, the trainer's processor) leaves its pixels alone, so the
rollout engine and the trainer see the very same pixels. Resizing once, here, removes a whole class of
rollout/train mismatch.

Decoding is defensive: images come from datasets and from model-facing environments, so we bound bytes
and pixels before decoding (no decompression bombs) and check that a data URI's MIME type is what the
bytes really are.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import re
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps
from ..errors import UserError, stable_message

# Qwen's own processor defaults (min 56*56, max 28*28*1280): stored images then need no further resize.
DEFAULT_FACTOR = 28
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280


class ImageError(ValueError):
    """A bad image. `code` is a stable machine-readable kind (used in validate reports and rejects)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 32 * 1024 * 1024  # encoded size
    max_pixels: int = 64 * 1024 * 1024  # decoded width * height, checked from the header before decoding
    max_aspect: float = 200.0  # long side over short side: Qwen-VL's processors refuse more


@dataclass(frozen=True)
class CanonicalImage:
    data: bytes
    mime: str
    width: int
    height: int
    sha256: str

    @property
    def data_uri(self) -> str:
        return to_data_uri(self.data, self.mime)


# --- MIME sniffing -------------------------------------------------------------------------------

_MAGIC = [
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
]


def sniff_mime(data: bytes) -> str | None:
    """The image type the bytes really are, from their magic number (None when not a known image)."""
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


# --- data URIs ------------------------------------------------------------------------------------

_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)


def to_data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def is_remote_url(url: str) -> bool:
    return url.lower().startswith(("http://", "https://", "file://", "ftp://", "s3://", "gs://"))


def decode_data_uri(uri: str, limits: ImageLimits = ImageLimits()) -> tuple[str, bytes]:
    """Return (declared MIME, bytes) of a base64 image data URI, checking size and that MIME matches bytes.

    Never fetches anything: remote URLs are an error here (the caller decides whether that is fatal).
    """
    if is_remote_url(uri):
        raise ImageError("image_remote", f"remote image URL is not allowed (nothing is fetched): {uri[:80]}")
    m = _DATA_URI.match(uri)
    if not m:
        raise ImageError("image_bad_uri", f"not a data URI: {uri[:40]!r}")
    if not m.group("b64"):
        raise ImageError("image_bad_uri", "data URI is not base64-encoded")
    mime = (m.group("mime") or "").lower()
    if not mime.startswith("image/"):
        raise ImageError("image_bad_uri", f"data URI MIME type is {mime or 'missing'}, not image/*")
    payload = uri[m.end():]
    # base64 is 4/3 the size of the bytes: refuse before allocating
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise ImageError("image_too_large", f"image is {len(payload) * 3 // 4} bytes, limit {limits.max_bytes}")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError("image_bad_base64", f"base64 payload does not decode: {e}") from None
    real = sniff_mime(data)
    if real is None:
        raise ImageError("image_not_image", f"bytes are not a known image format (declared {mime})")
    declared = "image/jpeg" if mime == "image/jpg" else mime
    if real != declared:
        raise ImageError("image_mime_mismatch", f"URI says {mime} but the bytes are {real}")
    return mime, data


# --- decoding -------------------------------------------------------------------------------------


def open_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Fully decode image bytes within limits; EXIF-transposed and RGB."""
    if len(data) > limits.max_bytes:
        raise ImageError("image_too_large", f"image is {len(data)} bytes, limit {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size  # from the header: no pixels decoded yet
            if w * h > limits.max_pixels:
                raise ImageError("image_too_large", f"image is {w}x{h} = {w * h} pixels, limit {limits.max_pixels}")
            if min(w, h) >= 1 and max(w, h) / min(w, h) > limits.max_aspect:
                raise ImageError("image_aspect", f"image is {w}x{h}, an aspect ratio of {max(w, h) / min(w, h):.0f}:1, "
                                                 f"over the models' limit of {limits.max_aspect:.0f}:1")
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("image_too_large", str(e)) from None
    except Exception as e:  # PIL raises many types for corrupt data
        # PIL's messages name the in-memory file object, an address that differs between runs
        raise ImageError("image_decode", f"image does not decode: {type(e).__name__}: {stable_message(e)}") from None
    return to_rgb(ImageOps.exif_transpose(img))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode PIL opens -> 8-bit RGB, the values kept in proportion.

    PIL's own convert("RGB") clips wide samples: a 16-bit gradient becomes almost all white and a float
    image in [0, 1] all black. Here 16-bit samples are scaled by 255/65535, floats in [0, 1] by 255, and
    anything else outside 0-255 is stretched from its own min-max. Transparency is composited on white
    (transparent diagrams must not turn black); LAB goes through a real colour transform.
    """
    import numpy as np

    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I", "F") or mode.startswith("I;16"):
        a = np.asarray(img, dtype=np.float64)
        if not np.isfinite(a).all():
            raise ImageError("image_decode", f"a {mode} image with NaN or infinite samples")
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if mode.startswith("I;16") or (mode == "I" and lo >= 0 and 255 < hi <= 65535):
            a = a * (255 / 65535)
        elif mode == "F" and lo >= 0 and hi <= 1:
            a = a * 255
        elif lo < 0 or hi > 255:
            a = (a - lo) * (255 / (hi - lo))
        return Image.fromarray(np.round(a).clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "LAB":
        from PIL import ImageCms

        lab_to_srgb = ImageCms.buildTransformFromOpenProfiles(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
        return ImageCms.applyTransform(img, lab_to_srgb)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return img.convert("RGB")


# --- canonicalisation -----------------------------------------------------------------------------


def fit_size(width: int, height: int, factor: int = DEFAULT_FACTOR, min_pixels: int = DEFAULT_MIN_PIXELS,
             max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) rounded to multiples of `factor` with the pixel count in [min_pixels, max_pixels].

    Same rule as Qwen-VL's processors (round to the nearest multiple, then scale down/up keeping the aspect
    ratio), so a processor given the result computes the identity.
    """
    if min(width, height) < 1:
        raise ImageError("image_decode", f"image has no pixels ({width}x{height})")
    if max(width, height) / min(width, height) > 200:
        raise ImageError("image_aspect", f"aspect ratio {width}x{height} is over 200 (Qwen-VL refuses it)")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    if max(w, h) / min(w, h) > 200:  # rounding to the grid can push a long thin image over the limit
        raise ImageError("image_aspect", f"aspect ratio {width}x{height} becomes {w}x{h} on the model's grid, over "
                                         "200 (Qwen-VL refuses it)")
    return w, h


@dataclass(frozen=True)
class CanonicalSpec:
    """How images are stored: the model's resize factor, pixel bounds and the encoding."""

    factor: int = DEFAULT_FACTOR
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    image_format: str = "png"  # png (lossless) or jpeg
    jpeg_quality: int = 95
    png_compress_level: int = 1  # fast; higher levels shrink diagrams a few % at several times the time


def _cv2():
    import cv2

    cv2.setNumThreads(1)  # parallelism comes from worker processes; a thread pool per process only contends
    return cv2


def canonicalize(image: bytes | Image.Image, spec: CanonicalSpec = CanonicalSpec(),
                 limits: ImageLimits = ImageLimits()) -> CanonicalImage:
    """Decode, EXIF-transpose, RGB, resize to the model's grid, encode. The one place images change.

    PIL decodes (it knows every format, EXIF, palettes and transparency); OpenCV resizes and encodes PNG.
    PNG: every row filter tried (adaptive, as libpng chooses) with zlib's RLE strategy at level 1. Unfiltered
    RLE, the earlier choice, only compresses runs of one repeated byte: a flat non-grey colour (r, g, b,
    r, g, b, ...) came out 75x PIL's size. Measured against PIL's default PNG (bench/prepare_validate.py
    --png-only): about PIL's size on diagrams, flat colours and photo-like images, and faster to encode.
    """
    import numpy as np

    cv2 = _cv2()
    img = image if isinstance(image, Image.Image) else open_image(image, limits)
    if isinstance(image, Image.Image):
        img = to_rgb(ImageOps.exif_transpose(img))
    w, h = fit_size(img.width, img.height, spec.factor, spec.min_pixels, spec.max_pixels)
    bgr = cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2BGR)
    if (w, h) != img.size:
        # area averaging when shrinking a lot (no aliasing), bicubic otherwise (as Qwen's processors do)
        shrink = w * h < 0.5 * img.width * img.height
        bgr = cv2.resize(bgr, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
    if spec.image_format == "png":
        ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, spec.png_compress_level,
                                             cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_ALL_FILTERS,
                                             cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE])
        mime = "image/png"
    elif spec.image_format in ("jpeg", "jpg"):
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, spec.jpeg_quality])
        mime = "image/jpeg"
    else:
        raise UserError(f"unknown image format {spec.image_format!r} (png or jpeg)")
    if not ok:
        raise ImageError("image_encode", f"could not encode a {w}x{h} image as {spec.image_format}")
    data = buf.tobytes()
    return CanonicalImage(data, mime, w, h, hashlib.sha256(data).hexdigest())


def image_from_uri(uri: str, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Decode a data URI to an RGB PIL image (what rollouts and training feed the processor)."""
    _, data = decode_data_uri(uri, limits)
    return open_image(data, limits)
