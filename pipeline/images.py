"""Image decoding shared by training and labeling: any PIL-readable file to an upright RGB image."""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

ORIENTATION = 0x0112  # the EXIF tag
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


def is_image_name(name: str) -> bool:
    dot = name.rfind(".")
    return dot >= 0 and name[dot:].lower() in IMAGE_EXTENSIONS


def is_hidden(name: str) -> bool:
    return name.startswith(".") and name not in (".", "..")


# Decode bombs. An image over max_pixels gets ImageTooLarge before any pixel is decoded. The default is PIL's own
# error threshold (2 * Image.MAX_IMAGE_PIXELS), which PIL's global is left at: images are opened here without PIL's
# check (open_image), so this cap decides, whatever that global says, and PIL's warning past half of it stays quiet.
MAX_PIXELS = 178_956_970
# What one decode may hold: the image as PIL stores it (1 byte a pixel for L, P and 1; 2 for 16-bit grey; 4 for RGB,
# RGBA, CMYK, 32-bit and float) times what its decoder buffers besides, plus the RGB image made from it. Past that, a
# JPEG decodes at a reduced DCT scale and the rest convert to a reduced RGB image, tile by tile. With the tiles and
# the resize after it, a decode stays under 512 MiB: a read task, under the member cap (the encoded bytes) plus that.
DECODE_BUDGET = 448 * 2**20
# How many times its image a decoder holds at its peak, as measured on 4000×4000 images (Pillow 13): libwebp decodes
# to a buffer of its own that PIL then copies (4×); libtiff took 1.8× for a float TIFF. Formats not named here count
# twice their image: a guess that errs on the safe side.
DECODER_COPIES = {"JPEG": 1, "MPO": 1, "PNG": 1, "GIF": 1, "BMP": 1, "PPM": 1, "TIFF": 2, "WEBP": 4}
TILE = 1024  # the side, in source pixels, of the tiles that big images convert in
TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_90}  # what ImageOps.exif_transpose does for each EXIF orientation


class ImageTooLarge(ValueError):
    """An image whose decode would pass the pixel cap or the memory budget: refused before its pixels are decoded."""

    kind = "too_large"  # its rows' error_kind, as for archive members over --max-member-mb


def decode_image(data: bytes, draft_size: int | None = None, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode bytes to RGB with EXIF orientation applied. Raises on anything that is not a whole image, and
    ImageTooLarge for an image of more than `max_pixels` pixels.

    `draft_size` lets JPEGs decode at a reduced DCT scale that still covers that many pixels on the
    short side: much faster for big photos, at a small cost in fidelity. Images too big to decode whole within
    DECODE_BUDGET come out reduced as well, whatever `draft_size` says.
    """
    return decode_with_size(data, draft_size, max_pixels=max_pixels)[0]


def decode_with_size(data: bytes, draft_size: int | None = None, *,
                     max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, int, int]:
    """decode_image, and the upright image's full width and height, which a reduced decode (draft_size) hides."""
    if not data:
        raise ValueError("empty file")
    try:
        img = open_image(data)
        full = img.size
        check_pixels(*full, max_pixels)
        if img.format == "JPEG":
            scale = jpeg_scale(full, img.mode, draft_size, img.getexif().get(ORIENTATION, 1))
            if draft_size or scale > 1:
                img.draft("RGB", draft_request(full, draft_size, scale))
        held = decoded_bytes(img)
        if held > DECODE_BUDGET:
            raise ImageTooLarge(f"image of {full[0]}×{full[1]} {img.mode} pixels would take {held // 2**20} MiB to "
                                f"decode, over the {DECODE_BUDGET // 2**20} MiB that a decode may take")
        img.load()  # decode now, so truncated files fail here and not later
    except Image.DecompressionBombError as e:  # PIL's own checks inside some decoders (GIF frames, TIFF tiles)
        raise ImageTooLarge(" ".join(str(e).split())) from None
    orientation = img.getexif().get(ORIENTATION, 1)  # a PNG's may follow its pixels: read after load
    factor = reduction(img.size, held, needs_copy=img.mode != "RGB" or orientation in TRANSPOSE)
    if factor is None:
        raise ImageTooLarge(f"image of {full[0]}×{full[1]} {img.mode} pixels leaves no room to convert within the "
                            f"{DECODE_BUDGET // 2**20} MiB that a decode may take")
    rgb = to_rgb(img, factor)
    del img  # the decoded source goes before the turn copies the RGB image
    if orientation in TRANSPOSE:
        rgb = rgb.transpose(TRANSPOSE[orientation])
    return rgb, *upright_size(*full, orientation)


def open_image(data: bytes) -> ImageFile.ImageFile:
    """Image.open on bytes, without PIL's pixel limit (its DecompressionBombError, and its warning past half of
    it), so that the caller's cap decides and names the image's size. Reads the header only."""
    fp, prefix, tried = io.BytesIO(data), data[:16], set()
    for load in (Image.preinit, Image.init):  # the common plugins first, then all of them, as Image.open does
        load()
        for fmt in [f for f in Image.ID if f not in tried]:
            tried.add(fmt)
            factory, accept = Image.OPEN[fmt]
            accepted = not accept or accept(prefix)
            if not accepted or isinstance(accepted, str):  # a str is PIL's "looks like this format, but unsupported"
                continue
            fp.seek(0)
            try:
                return factory(fp, "")
            except (SyntaxError, IndexError, TypeError, struct.error):  # not this format: try the next, as PIL does
                continue
    raise UnidentifiedImageError("cannot identify image file")


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    if max(1, width) * max(1, height) > max_pixels:
        raise ImageTooLarge(f"image of {width}×{height} pixels is over the {max_pixels:,}-pixel cap (--max-pixels)")


def bytes_per_pixel(mode: str) -> int:
    """What PIL stores a pixel of this mode in: 3 and 2 bands take 4 bytes, as 32-bit and float do."""
    return 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4


def decoded_bytes(img: Image.Image) -> int:
    """The most that decoding this (opened, not loaded) image holds at once, at its (drafted) size."""
    return img.width * img.height * bytes_per_pixel(img.mode) * DECODER_COPIES.get(img.format, 2)


def rgb_bytes(size: tuple[int, int], factor: int) -> int:
    return 4 * -(-size[0] // factor) * -(-size[1] // factor)


def reduction(size: tuple[int, int], held: int, needs_copy: bool) -> int | None:
    """The smallest factor that the RGB image must be reduced by for it and the decoded source (`held` bytes) to
    fit DECODE_BUDGET; 1 for a source that is already the upright RGB image; None if no factor up to 16 will do."""
    if not needs_copy and held <= DECODE_BUDGET:
        return 1
    return next((k for k in range(1, 17) if held + rgb_bytes(size, k) <= DECODE_BUDGET), None)


def jpeg_scale(size: tuple[int, int], mode: str, draft_size: int | None, orientation: int) -> int:
    """The DCT scale (1, 2, 4 or 8) to decode a JPEG at: the one draft_size asks for (as Image.draft picks it),
    or a smaller one where the decode and its RGB image would not fit DECODE_BUDGET."""
    asked = 1
    if draft_size:
        request = draft_request(size, draft_size, 1)
        ratio = min(size[0] // request[0], size[1] // request[1])
        asked = next((s for s in (8, 4, 2, 1) if ratio >= s), 1)
    decoded = "L" if mode == "L" else "RGB"  # CMYK and YCbCr take RGB's 4 bytes too
    needs_copy = mode != "RGB" or orientation in TRANSPOSE
    for scale in (s for s in (1, 2, 4, 8) if s >= asked):
        held = -(-size[0] // scale) * -(-size[1] // scale) * bytes_per_pixel(decoded)
        if held + (rgb_bytes(size, scale) if needs_copy else 0) <= DECODE_BUDGET:
            return scale
    return 8


def draft_request(size: tuple[int, int], draft_size: int | None, scale: int) -> tuple[int, int]:
    """The size to ask Image.draft for: the draft_size one (as before), or one that gets `scale` exactly."""
    if draft_size:
        request = tuple(int(side * draft_size / min(size)) + 1 for side in size)
        if scale == 1 or min(size[0] // request[0], size[1] // request[1]) >= scale:
            return request
    return max(1, size[0] // scale), max(1, size[1] // scale)


def upright_size(width: int, height: int, orientation: int) -> tuple[int, int]:
    """The size that exif_transpose gives an image of this size and EXIF orientation: 5 to 8 turn it a quarter."""
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def jpeg_header(data: bytes, *, max_pixels: int = MAX_PIXELS) -> tuple[int, int, int] | None:
    """(upright width, upright height, EXIF orientation 1-8) of a whole RGB or grayscale JPEG, which a GPU's
    nvjpeg decodes; None for anything else (other formats, CMYK, a missing end marker, past PIL's pixel limit or
    `max_pixels`), which the CPU decodes instead (or refuses). Reads the header only."""
    if not (data.startswith(b"\xff\xd8") and data.endswith(b"\xff\xd9")):
        return None
    try:
        with open_image(data) as img:
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return None
            (width, height), orientation = img.size, img.getexif().get(ORIENTATION, 1)
    except Exception:  # a bad header: the CPU path gives it its error row
        return None
    if width * height > min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels):
        return None
    orientation = orientation if orientation in range(1, 9) else 1
    return (*upright_size(width, height, orientation), orientation)


def to_rgb(img: Image.Image, factor: int = 1) -> Image.Image:
    """The RGB image of a loaded image, reduced `factor` times as Image.reduce does. One of over TILE² pixels
    converts a tile at a time, so no full-size intermediate (RGBA of a palette image, 8 bits of 16) is ever made:
    it costs the RGB image and a few tiles."""
    if img.mode == "RGB" and factor == 1:
        return img
    peak = 0  # for 16 and 32-bit grayscale, what convert_rgb scales to 255
    if img.mode.startswith("I;16"):
        peak = 65535
    elif img.mode.startswith("I"):
        peak = 65535 if img.getextrema()[1] > 255 else 255  # over the whole image, so that every tile scales alike
    if img.width * img.height <= TILE * TILE:
        rgb = convert_rgb(img, peak)
        return rgb.reduce(factor) if factor > 1 else rgb
    step = max(factor, TILE // factor * factor)  # tiles of whole reduction blocks: they reduce as the whole would
    out = Image.new("RGB", (-(-img.width // factor), -(-img.height // factor)))
    for top in range(0, img.height, step):
        for left in range(0, img.width, step):
            tile = convert_rgb(img.crop((left, top, min(left + step, img.width), min(top + step, img.height))), peak)
            out.paste(tile.reduce(factor) if factor > 1 else tile, (left // factor, top // factor))
    return out


def convert_rgb(img: Image.Image, peak: int) -> Image.Image:
    """RGB of an image no bigger than a tile. 16/32-bit grayscale scales to 8 bits (v * 255 // peak, in integers)
    instead of clipping at 255; `peak` is 65535 for 16-bit images and 32-bit ones that pass 255, else 255."""
    if img.mode == "F" or not img.mode.startswith("I"):
        if img.mode == "P" or "transparency" in img.info:
            img = img.convert("RGBA")  # palette transparency goes through RGBA to avoid PIL's warning
        return img.convert("RGB")
    values = np.clip(np.asarray(img), 0, peak)
    if peak == 65535:
        values //= 257  # 65535 / 255: the same 8 bits as scaling by 255 / 65535, without a float copy
    return Image.fromarray(values.astype(np.uint8)).convert("RGB")


# torchvision's InterpolationMode values, as PIL filters (what torchvision's Resize uses on PIL images).
PIL_FILTERS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
               "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


def resize_center_crop(img: Image.Image, resize_size: int, crop_size: int,
                       interpolation: str = "bilinear") -> Image.Image:
    """torchvision's Resize(resize_size) then CenterCrop(crop_size) on a PIL image, pixel for pixel (the tests
    compare them), for resize_size >= crop_size. Without torch, so labeling's read workers need not import it."""
    w, h = img.size
    size = (resize_size, int(resize_size * h / w)) if w <= h else (int(resize_size * w / h), resize_size)
    if size != img.size:
        img = img.resize(size, PIL_FILTERS[interpolation])  # PIL always antialiases, as torchvision does for PIL
    left, top = round((img.width - crop_size) / 2), round((img.height - crop_size) / 2)
    return img.crop((left, top, left + crop_size, top + crop_size))


def image_error(exc: BaseException) -> str:
    """A one-line reason for a file that could not be decoded."""
    if isinstance(exc, UnidentifiedImageError):
        return "UnidentifiedImageError: not a recognised image format"  # PIL's text names a memory address
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]
