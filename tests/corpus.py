"""A generated corpus of the files real collections contain: broken, odd and perfectly fine ones.

`make_corpus(folder)` writes it and returns {relative path: expectation}, where the expectation is
"ok" (decodes to an image) or "error" (must be skipped or reported, never crash a job).
Nothing binary is committed: every file is made here.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def decompression_bomb_png(width: int = 40000, height: int = 40000) -> bytes:
    """A few hundred bytes claiming 1.6 gigapixels: PIL must refuse it rather than allocate it."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(64)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def sample_image(seed: int = 0, size=(64, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def make_corpus(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    base = sample_image()
    files: dict[str, tuple[bytes, str]] = {}

    good_jpeg = _jpeg(base, quality=90)
    files["truncated.jpg"] = (good_jpeg[: len(good_jpeg) // 2], "error")
    files["zero_bytes.jpg"] = (b"", "error")
    files["text.jpg"] = (b"this is a text file, not a picture\n", "error")
    files["page.png"] = (b"<!doctype html><html><body>404 Not Found</body></html>", "error")
    files["bomb.png"] = (decompression_bomb_png(), "error")

    buf = io.BytesIO()
    base.convert("CMYK").save(buf, "JPEG")
    files["cmyk.jpg"] = (buf.getvalue(), "ok")
    buf = io.BytesIO()
    Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20).save(buf, "PNG")
    files["gray16.png"] = (buf.getvalue(), "ok")
    buf = io.BytesIO()
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(buf, "PNG", transparency=0)
    files["palette_transparent.png"] = (buf.getvalue(), "ok")
    buf = io.BytesIO()
    base.convert("RGBA").save(buf, "PNG")
    files["rgba.png"] = (buf.getvalue(), "ok")

    # EXIF orientation 6: the stored pixels are landscape, the upright picture is portrait.
    exif = Image.Exif()
    exif[0x0112] = 6
    files["rotated_exif.jpg"] = (_jpeg(Image.new("RGB", (80, 40), (200, 30, 30)), exif=exif), "ok")

    buf = io.BytesIO()
    frames = [sample_image(i) for i in range(3)]
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    files["animated.gif"] = (buf.getvalue(), "ok")
    for name, fmt in (("image.webp", "WEBP"), ("image.tiff", "TIFF"), ("image.bmp", "BMP")):
        buf = io.BytesIO()
        base.save(buf, fmt)
        files[name] = (buf.getvalue(), "ok")
    files["UPPER.JPG"] = (good_jpeg, "ok")
    files["a/b/c/d/e/f/deep.jpeg"] = (good_jpeg, "ok")
    files["with space é ü 日本.jpg"] = (good_jpeg, "ok")
    files["new\nline.jpg"] = (good_jpeg, "ok")
    files["one_pixel.png"] = (_encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), "ok")
    files["wide_20000x100.png"] = (_encode(Image.new("RGB", (20000, 100), (10, 120, 10)), "PNG"), "ok")

    for rel, (data, _) in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (folder / "x.jpg").mkdir()  # a directory with an image name: not a file to label
    os.symlink(".", folder / "loop")  # a symlink loop: listing must not recurse forever
    return {rel: expect for rel, (_, expect) in files.items()}


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()
