"""Image decoding shared by training and labeling: any PIL-readable file to an upright RGB image."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ORIENTATION = 0x0112  # the EXIF tag
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


def is_image_name(name: str) -> bool:
    dot = name.rfind(".")
    return dot >= 0 and name[dot:].lower() in IMAGE_EXTENSIONS


def is_hidden(name: str) -> bool:
    return name.startswith(".") and name not in (".", "..")


def decode_image(data: bytes, draft_size: int | None = None) -> Image.Image:
    """Decode bytes to RGB with EXIF orientation applied. Raises on anything that is not a whole image.

    `draft_size` lets JPEGs decode at a reduced DCT scale that still covers that many pixels on the
    short side: much faster for big photos, at a small cost in fidelity.
    """
    return decode_with_size(data, draft_size)[0]


def decode_with_size(data: bytes, draft_size: int | None = None) -> tuple[Image.Image, int, int]:
    """decode_image, and the upright image's full width and height, which a reduced decode (draft_size) hides."""
    if not data:
        raise ValueError("empty file")
    img = Image.open(io.BytesIO(data))  # raises DecompressionBombError past PIL's pixel limit
    width, height = upright_size(*img.size, img.getexif().get(ORIENTATION, 1))
    if draft_size and img.format == "JPEG":
        scale = draft_size / min(img.size)
        img.draft("RGB", tuple(int(side * scale) + 1 for side in img.size))
    img.load()  # decode now, so truncated files fail here and not later
    return to_rgb(ImageOps.exif_transpose(img)), width, height


def upright_size(width: int, height: int, orientation: int) -> tuple[int, int]:
    """The size that exif_transpose gives an image of this size and EXIF orientation: 5 to 8 turn it a quarter."""
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """(upright width, upright height, EXIF orientation 1-8) of a whole RGB or grayscale JPEG, which a GPU's
    nvjpeg decodes; None for anything else (other formats, CMYK, a missing end marker, past PIL's pixel limit),
    which the CPU decodes instead. Reads the header only."""
    if not (data.startswith(b"\xff\xd8") and data.endswith(b"\xff\xd9")):
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return None
            (width, height), orientation = img.size, img.getexif().get(ORIENTATION, 1)
    except Exception:  # a bad header: the CPU path gives it its error row
        return None
    if width * height > (Image.MAX_IMAGE_PIXELS or float("inf")):
        return None
    orientation = orientation if orientation in range(1, 9) else 1
    return (*upright_size(width, height, orientation), orientation)


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I"):  # 16/32-bit grayscale: scale to 8 bits instead of clipping at 255
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray((arr * (255.0 / peak)).clip(0, 255).astype(np.uint8), mode="L")
    elif img.mode == "P" or "transparency" in img.info:
        img = img.convert("RGBA")  # palette transparency goes through RGBA to avoid PIL's warning
    return img.convert("RGB")


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
