"""Decode bombs: an image over --max-pixels is refused from its header, and any other image decodes within a bounded
amount of memory (wide formats through integer operations and reduced-scale decoding), checked under RLIMIT_AS by
tests/memory_limit.py. Every file is built here; the huge ones are crafted PNGs of a few hundred KB."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline import images
from pipeline.images import MAX_PIXELS, ImageTooLarge, decode_with_size, jpeg_header, to_rgb
from tests.corpus import decompression_bomb_png
from tests.memory_limit import BoundExceeded, bounded_json, run_bounded, usage

MiB = 2**20
MEMBER_CAP = 256 * MiB  # --max-member-mb's default
BOUND = MEMBER_CAP + 512 * MiB  # what a read task may hold: its member, and 512 MiB besides

# Builds the crafted PNG in the child's setup, where the bound does not apply yet.
PNG_SETUP = """
import io, json, struct, zlib
import numpy as np
from PIL import Image
from pipeline.images import ImageTooLarge, decode_with_size, resize_center_crop
from tests.test_decode_bombs import crafted_png, png_chunk
"""


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def crafted_png(width: int, height: int, bit_depth: int, color_type: int, first_row: bytes,
                extra_chunks: bytes = b"") -> bytes:
    """A PNG whose every row repeats `first_row`: filtered 'Up' after the first, they are all zero bytes, so a
    gigabyte of pixels compresses to a few hundred KB. One block of rows is deflated and its bytes repeated (each
    ends in a full flush, so each stands alone), which builds even that in a fraction of a second."""
    assert len(first_row) == -(-width * bit_depth * {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color_type] // 8)
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    same = b"\x02" + bytes(len(first_row))
    block = max(1, min(height - 1, 2**22 // len(same)))
    repeats, rest = divmod(height - 1, block)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw: the zlib header and checksum are written here
    first, rows = b"\x00" + first_row, same * block
    stream = [deflate.compress(first) + deflate.flush(zlib.Z_FULL_FLUSH)]
    stream += [deflate.compress(rows) + deflate.flush(zlib.Z_FULL_FLUSH)] * repeats
    stream += [deflate.compress(same * rest) + deflate.flush()]
    checksum = zlib.adler32(first)
    for _ in range(repeats):
        checksum = zlib.adler32(rows, checksum)
    checksum = zlib.adler32(same * rest, checksum)
    idat = b"\x78\xda" + b"".join(stream) + struct.pack(">I", checksum)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + extra_chunks + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def ramp16(width: int) -> np.ndarray:
    """16-bit grey values across a row, 0 to 64995: 8 bits would clip all but the first 52 columns."""
    return np.arange(width, dtype=np.uint32) * 5


def test_the_memory_limit_bites():
    """The helper's bound is real: twice the bound fails as a MemoryError, with a message saying so."""
    assert bounded_json("x = bytearray(32 * 2**20)\nprint(len(x))", 64 * MiB) == 32 * MiB
    result = run_bounded("x = bytearray(128 * 2**20)", 64 * MiB, check=False)
    assert result.returncode != 0 and usage(result) is None
    with pytest.raises(BoundExceeded, match=r"ran out of memory \(MemoryError\) under a bound of 64 MiB"):
        run_bounded("x = bytearray(128 * 2**20)", 64 * MiB)


def test_a_13000x13000_16_bit_png_decodes_within_the_bound():
    """The issue's 13,000 × 13,000 16-bit grey PNG of a few hundred KB: 338 MB as PIL decodes it, 1.5 GiB before in
    float64 copies. It decodes, reduced to fit the decode budget, and scales 16 bits to 8 rather than clipping."""
    result = run_bounded("""
        img, width, height = decode_with_size(data)
        row = np.asarray(img)[img.height // 2, :, 0]
        crop = resize_center_crop(img, 256, 224)  # as a read task goes on with it
        print(json.dumps([img.mode, img.size, width, height, row.tolist(), crop.size]))
    """, BOUND, setup=[PNG_SETUP, """
        side = 13000
        data = crafted_png(side, side, 16, 0, (np.arange(side) * 5).astype(">u2").tobytes())
        assert len(data) < 2 * 2**20, len(data)
    """])
    mode, size, width, height, row, crop = json.loads(result.stdout.splitlines()[-1])
    assert (mode, width, height, crop) == ("RGB", 13000, 13000, [224, 224])
    factor = -(-13000 // size[0])
    assert size == [-(-13000 // factor)] * 2 and factor > 1  # reduced: the full RGB image alone is 645 MiB
    eight_bits = ramp16(13000) // 257
    expected = [eight_bits[i:i + factor].mean() for i in range(0, 13000, factor)]
    assert np.abs(np.array(row) - expected).max() <= 1
    assert row[-1] >= 250  # scaled by 255 / 65535, not clipped at 255
    assert usage(result)["peak_rss"] < usage(result)["base_vm"] + BOUND


def test_headers_that_claim_more_than_max_pixels_are_refused_before_any_pixel():
    """PNG, GIF and JPEG headers that claim 60,000 × 60,000 pixels (10.8 GB as RGB) in a few hundred bytes get
    ImageTooLarge, of kind too_large, under a bound far below one row of pixels' worth of their full image; the
    JPEG does not go to a GPU either."""
    refused = bounded_json("""
        out = {}
        for name, data in files.items():
            try:
                decode_with_size(data)
                out[name] = "decoded"
            except ImageTooLarge as e:
                out[name] = [str(e), e.kind]
        out["gpu"] = jpeg_header(files["jpeg"])
        print(json.dumps(out))
    """, 16 * MiB, setup="""
        import io, json
        from PIL import Image
        from pipeline.images import ImageTooLarge, decode_with_size, jpeg_header
        from tests.test_decode_bombs import claiming_60000
        files = claiming_60000()
    """)
    message = "image of 60000×60000 pixels is over the 178,956,970-pixel cap (--max-pixels)"
    assert refused == {"png": [message, "too_large"], "gif": [message, "too_large"],
                       "jpeg": [message, "too_large"], "gpu": None}


def claiming_60000() -> dict[str, bytes]:
    """Small real images whose headers are rewritten to claim 60,000 × 60,000 pixels."""
    gif, jpeg = io.BytesIO(), io.BytesIO()
    Image.new("P", (8, 8)).save(gif, "GIF")
    Image.new("RGB", (8, 8), (200, 30, 30)).save(jpeg, "JPEG")
    gif = bytearray(gif.getvalue())
    gif[6:10] = struct.pack("<HH", 60000, 60000)  # the logical screen
    jpeg = bytearray(jpeg.getvalue())
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5:sof + 9] = struct.pack(">HH", 60000, 60000)  # SOF0's height and width
    return {"png": decompression_bomb_png(60000, 60000), "gif": bytes(gif), "jpeg": bytes(jpeg)}


def test_max_pixels_decides_rather_than_pil_limit():
    """The cap is max_pixels, at its boundary, whichever side of PIL's own limit it is; PIL's warning past half
    its limit stays quiet, and PIL's global is left as it was."""
    small = io.BytesIO()
    Image.new("L", (100, 100)).save(small, "PNG")
    assert decode_with_size(small.getvalue(), max_pixels=10_000)[1:] == (100, 100)
    with pytest.raises(ImageTooLarge, match=r"^image of 100×100 pixels is over the 9,999-pixel cap \(--max-pixels\)$"):
        decode_with_size(small.getvalue(), max_pixels=9_999)
    assert 2 * Image.MAX_IMAGE_PIXELS == MAX_PIXELS
    result = bounded_json("""
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # PIL's DecompressionBombWarning would fail it
            quiet = decode_with_size(over_warning)[1:]
        try:
            decode_with_size(over_error)
            refused = None
        except ImageTooLarge as e:
            refused = str(e)
        img, width, height = decode_with_size(over_error, max_pixels=200_000_000)
        print(json.dumps([quiet, refused, width, height, img.getextrema(), Image.MAX_IMAGE_PIXELS]))
    """, BOUND, setup=[PNG_SETUP, """
        import warnings
        over_warning = crafted_png(10_000, 9_000, 1, 0, bytes(1250))  # 90 Mpx: PIL warns past 89.5
        over_error = crafted_png(14_000, 14_000, 1, 0, bytes(1750))  # 196 Mpx: PIL refuses past 179
    """])
    assert result == [[10_000, 9_000], "image of 14000×14000 pixels is over the 178,956,970-pixel cap (--max-pixels)",
                      14_000, 14_000, [[0, 0]] * 3, MAX_PIXELS // 2]


def test_a_palette_image_with_transparency_converts_tile_by_tile_within_the_bound():
    """10,000 × 10,000 palette pixels with a transparent index: 95 MiB decoded, but 381 MiB more as RGBA and as
    much again as RGB if converted whole. Tiles make it fit, and the colours come through."""
    red, blue = (200, 30, 30), (20, 40, 220)
    size, samples, width, height = bounded_json("""
        img, width, height = decode_with_size(data)
        half = img.width // 2  # the colours' border, as the image came reduced
        print(json.dumps([img.size, np.asarray(img)[::500, [0, half - 1, half, -1]].tolist(), width, height]))
    """, BOUND, setup=[PNG_SETUP, f"""
        palette = png_chunk(b"PLTE", bytes({red + blue})) + png_chunk(b"tRNS", b"\\x00")
        data = crafted_png(10_000, 10_000, 8, 3, bytes(5000) + bytes([1]) * 5000, palette)
    """])
    assert (width, height) == (10_000, 10_000) and size[0] < 10_000  # reduced, to fit the budget
    samples = np.array(samples)
    assert (samples[:, :2] == red).all() and (samples[:, 2:] == blue).all()


def test_an_image_that_cannot_decode_within_the_budget_is_refused_before_it_decodes():
    """11,000 × 11,000 RGBA, under --max-pixels but 462 MiB as PIL stores it (4 bytes a pixel), and PNG cannot
    decode at a reduced scale: refused from its header, as too_large, under a bound of a few MiB."""
    result = bounded_json("""
        try:
            decode_with_size(data)
            print(json.dumps(None))
        except ImageTooLarge as e:
            print(json.dumps([str(e), e.kind]))
    """, 16 * MiB, setup=[PNG_SETUP, "data = crafted_png(11_000, 11_000, 8, 6, bytes(44_000))"])
    assert result == ["image of 11000×11000 RGBA pixels would take 461 MiB to decode, over the 448 MiB that a "
                      "decode may take", "too_large"]


def test_a_big_jpeg_decodes_at_a_reduced_dct_scale_within_the_bound():
    """12,000 × 12,000 grey JPEG: 137 MiB decoded, but 549 MiB more as full-size RGB. It decodes at half scale."""
    size, width, height = bounded_json("""
        img, width, height = decode_with_size(data)
        print(json.dumps([img.size, width, height]))
    """, BOUND, setup=[PNG_SETUP, """
        buf = io.BytesIO()
        Image.new("L", (12_000, 12_000), 90).save(buf, "JPEG", quality=50)
        data = buf.getvalue()
    """])
    assert (size, width, height) == ([6000, 6000], 12000, 12000)


def wide_images() -> dict[str, Image.Image]:
    """One small image of each wide or odd mode, made by PIL, with values across its range."""
    h, w = 37, 50
    grid = np.arange(h * w).reshape(h, w)
    out = {
        "I;16": Image.fromarray((grid * 35).astype(np.uint16)),
        "I;16B": Image.frombytes("I;16B", (w, h), (grid * 35).astype(">u2").tobytes()),
        "I past 255": Image.fromarray((grid * 60 - 500).astype(np.int32)),
        "I within 255": Image.fromarray((grid % 256).astype(np.int32)),
        "F": Image.fromarray((grid / 5 - 20).astype(np.float32)),
        "1": Image.fromarray(grid % 3 == 0),
        "LA": Image.fromarray(np.stack([grid % 256, grid % 7 * 30], -1).astype(np.uint8), "LA"),
        "RGBA": Image.fromarray(np.stack([grid % 256, grid % 13 * 19, grid % 5 * 60, grid % 7 * 30], -1)
                                .astype(np.uint8)),
    }
    out["CMYK"] = out["RGBA"].convert("RGB").convert("CMYK")
    palette = out["RGBA"].convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 3
    out["P with transparency"] = palette
    return out


@pytest.mark.parametrize("factor", [1, 3])
def test_wide_modes_convert_tile_by_tile_as_they_do_whole(monkeypatch, factor):
    """Tiles (here 8 pixels a side) give the very pixels that converting the whole image, then Image.reduce, gives;
    16 and 32-bit grey scale to 8 bits as before: v // 257 (the same as v * 255 / 65535, rounded down) for 16-bit
    images and 32-bit ones that pass 255, else as they are."""
    for name, img in wide_images().items():
        whole = to_rgb(img)
        monkeypatch.setattr(images, "TILE", 8)
        tiled = to_rgb(img, factor)
        monkeypatch.undo()
        reduced = whole.reduce(factor) if factor > 1 else whole
        assert tiled.mode == "RGB" and np.array_equal(np.asarray(tiled), np.asarray(reduced)), name
        grey = np.asarray(whole)[:, :, 0].astype(int)
        if name.startswith("I;16") or name == "I past 255":
            assert np.array_equal(grey, np.clip(np.asarray(img).astype(int), 0, 65535) // 257), name
        elif name == "I within 255":
            assert np.array_equal(grey, np.asarray(img)), name


def test_a_16_bit_png_keeps_its_range():
    """A small 16-bit PNG through decode_with_size: 8 bits from the top of each value, never clipped at 255."""
    buf = io.BytesIO()
    values = np.array([[0, 256, 257, 1000, 40000, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(buf, "PNG")
    img = decode_with_size(buf.getvalue())[0]
    assert np.asarray(img)[0, :, 0].tolist() == [0, 0, 1, 3, 155, 255]


def test_gpu_decoding_takes_no_jpeg_over_max_pixels():
    buf = io.BytesIO()
    Image.new("RGB", (100, 80)).save(buf, "JPEG")
    assert jpeg_header(buf.getvalue()) == (100, 80, 1)
    assert jpeg_header(buf.getvalue(), max_pixels=7_999) is None
