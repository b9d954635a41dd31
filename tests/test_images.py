import base64
import io
import random

import numpy as np
import pytest
from PIL import Image

from vlrl_cli.data.images import CanonicalSpec, ImageError, ImageLimits, canonicalize, decode_data_uri, fit_size, image_from_uri, open_image, sniff_mime, to_data_uri


def png_bytes(w=60, h=40, color=(200, 10, 10), mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def test_fit_size_agrees_with_qwen_processor_resize():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    rng = random.Random(0)
    for _ in range(500):
        w, h = rng.randint(10, 3000), rng.randint(10, 3000)
        if max(w, h) / min(w, h) > 200:
            continue
        for factor, lo, hi in ((28, 56 * 56, 28 * 28 * 1280), (32, 4096, 32 * 32 * 256), (28, 3136, 200_000)):
            assert fit_size(w, h, factor, lo, hi) == tuple(reversed(smart_resize(h, w, factor, lo, hi)))


def test_canonical_image_is_a_fixed_point_of_the_processor_resize():
    img = canonicalize(png_bytes(333, 251))
    assert img.width % 28 == 0 and img.height % 28 == 0
    assert fit_size(img.width, img.height) == (img.width, img.height)
    assert sniff_mime(img.data) == "image/png"
    again = canonicalize(img.data)
    assert again.data == img.data and again.sha256 == img.sha256  # idempotent, byte for byte


def test_pixel_bounds_and_jpeg():
    big = canonicalize(png_bytes(2000, 1500), CanonicalSpec(max_pixels=200_000, image_format="jpeg"))
    assert big.width * big.height <= 200_000 and big.mime == "image/jpeg"
    small = canonicalize(png_bytes(10, 12), CanonicalSpec(min_pixels=56 * 56))
    assert small.width * small.height >= 56 * 56


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (80, 40), (0, 0, 255))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert open_image(buf.getvalue()).size == (40, 80)


def test_transparent_png_composites_on_white():
    rgba = png_bytes(30, 30, (0, 0, 0, 0), mode="RGBA")
    assert open_image(rgba).getpixel((5, 5)) == (255, 255, 255)


def test_data_uri_round_trip_and_errors():
    data = png_bytes()
    mime, back = decode_data_uri(to_data_uri(data, "image/png"))
    assert (mime, back) == ("image/png", data)
    assert image_from_uri(to_data_uri(data, "image/png")).size == (60, 40)
    cases = {
        "image_mime_mismatch": to_data_uri(data, "image/jpeg"),
        "image_not_image": to_data_uri(b"hello world, not an image", "image/png"),
        "image_bad_base64": "data:image/png;base64," + base64.b64encode(data).decode()[:-7] + "!!",
        "image_remote": "https://example.com/a.png",
        "image_bad_uri": "data:text/plain;base64,aGk=",
    }
    for code, uri in cases.items():
        with pytest.raises(ImageError) as e:
            decode_data_uri(uri)
        assert e.value.code == code, (code, str(e.value))


def test_truncated_image_fails_to_decode():
    data = png_bytes(200, 200)
    with pytest.raises(ImageError) as e:
        open_image(data[: len(data) // 2])
    assert e.value.code == "image_decode"


def test_decompression_bomb_is_refused_before_decoding():
    # small PNGs whose headers claim huge sizes: refused from the header alone, nothing decoded
    import struct
    import zlib

    def claimed(w, h):
        small = png_bytes(8, 8)
        ihdr = b"IHDR" + struct.pack(">II", w, h) + small[24:29]
        return small[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + small[33:]

    for w, h in ((5000, 5000), (30000, 30000)):  # under and over PIL's own bomb limit
        with pytest.raises(ImageError) as e:
            open_image(claimed(w, h), ImageLimits(max_pixels=10_000_000))
        assert e.value.code == "image_too_large"
    data = claimed(5000, 5000)
    with pytest.raises(ImageError) as e:
        decode_data_uri(to_data_uri(data, "image/png"), ImageLimits(max_bytes=20))
    assert e.value.code == "image_too_large"


def _gradient(mode: str):
    """A left-to-right ramp over the mode's natural range, as a PIL image of that mode."""
    ramp = np.tile(np.linspace(0, 1, 112), (56, 1))
    if mode.startswith("I;16"):
        samples = (ramp * 65535).astype(">u2" if mode == "I;16B" else "<u2")
        return Image.frombytes(mode, (112, 56), samples.tobytes())
    if mode == "1":
        return Image.fromarray(ramp > 0.5)
    if mode == "I":
        return Image.fromarray((ramp * 65535).astype(np.int32))
    if mode == "F":
        return Image.fromarray(ramp.astype(np.float32))
    return Image.fromarray((ramp * 255).astype(np.uint8)).convert(mode)


@pytest.mark.parametrize("mode,fmt", [("I;16", "PNG"), ("I;16", "TIFF"), ("I", "TIFF"), ("F", "TIFF"), ("L", "PNG"),
                                      ("1", "PNG"), ("P", "PNG"), ("LA", "PNG"), ("RGB", "PNG"), ("RGBA", "PNG"),
                                      ("CMYK", "JPEG"), ("CMYK", "TIFF"), ("YCbCr", "JPEG"), ("I;16B", "TIFF"),
                                      ("I;16L", "TIFF")])
def test_every_mode_becomes_rgb_with_its_values_in_proportion(mode, fmt):
    """16-bit, 32-bit and float ramps keep their shape (PIL's own convert clips them to all-white or
    all-black); every 8-bit mode round-trips its ramp."""
    import io

    from vlrl_cli.data.images import CanonicalSpec, canonicalize, open_image

    buf = io.BytesIO()
    _gradient(mode).save(buf, fmt)
    rgb = np.asarray(open_image(buf.getvalue()), dtype=np.float64)
    assert rgb.shape == (56, 112, 3)
    row = rgb[28, :, :].mean(axis=1)
    if mode == "CMYK":  # a grey ramp through CMYK comes back as a (possibly inverted) ramp
        row = row if row[-1] > row[0] else 255 - row
    if mode == "1":
        assert row[:40].max() == 0 and row[-40:].min() == 255
    else:
        assert row[0] < 12 and row[-1] > 243, (mode, row[0], row[-1])
        assert np.all(np.diff(row) >= -3), mode  # monotonic up to codec noise
        assert abs(row[56] - 128) < 12, (mode, row[56])
    out = canonicalize(buf.getvalue(), CanonicalSpec())
    assert out.width == 112 and out.height == 56


def test_nonstandard_float_ranges_are_stretched_and_nan_is_rejected():
    from vlrl_cli.data.images import ImageError, to_rgb

    hdr = Image.fromarray(np.tile(np.linspace(-5, 900, 64), (8, 1)).astype(np.float32))
    row = np.asarray(to_rgb(hdr))[4, :, 0]
    assert row[0] == 0 and row[-1] == 255
    bad = np.zeros((8, 8), np.float32)
    bad[0, 0] = np.nan
    with pytest.raises(ImageError):
        to_rgb(Image.fromarray(bad))


def test_lab_is_colour_converted():
    from vlrl_cli.data.images import to_rgb

    red = to_rgb(Image.new("LAB", (4, 4), (136, 208, 195)))  # L 53, a +80, b +67: sRGB red
    r, g, b = red.getpixel((0, 0))
    assert r > 200 and g < 60 and b < 60, (r, g, b)


@pytest.mark.parametrize("colour", [(200, 30, 30), (30, 60, 220), (128, 128, 128)])
def test_png_of_a_flat_colour_image_is_about_pils_size(colour):
    """Sizes, not speed (speed lives in bench/): rows unfiltered with RLE made a flat non-grey colour 75x
    PIL's PNG; every filter tried keeps it near PIL's size."""
    import io

    from PIL import ImageDraw

    from vlrl_cli.data.images import CanonicalSpec, canonicalize

    im = Image.new("RGB", (448, 448), colour)
    ImageDraw.Draw(im).ellipse([100, 100, 300, 300], fill=(240, 220, 40))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    ours = canonicalize(im, CanonicalSpec()).data
    assert len(ours) <= 1.5 * len(buf.getvalue()), (len(ours), len(buf.getvalue()))
