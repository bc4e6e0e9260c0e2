"""Rebuild data/hymenoptera from the full-resolution set: short side at most 256 px, same files and layout.

    python data/make_hymenoptera.py ../shared/data/hymenoptera data/hymenoptera
"""

import shutil
import sys
from pathlib import Path

from PIL import Image, ImageOps

MAX_SHORT_SIDE = 256


def main(src: Path, dst: Path) -> None:
    for path in sorted(src.rglob("*")):
        if not path.is_file():
            continue
        out = dst / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            img = Image.open(path)
        except OSError:
            img = None
        if img is None or img.format != "JPEG":
            shutil.copyfile(path, out)  # e.g. the placeholder GIF: keep it as real collections would
            continue
        img = ImageOps.exif_transpose(img)
        scale = MAX_SHORT_SIDE / min(img.size)
        if scale < 1:
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
        img.convert("RGB").save(out, "JPEG", quality=90)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
