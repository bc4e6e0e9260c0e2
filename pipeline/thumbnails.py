"""Thumbnails for the review pages (the label output's and the audit's): images read by key, as the jobs read them,
shrunk and inlined as JPEG data: URIs, so that a page opens offline."""

from __future__ import annotations

import base64
import io

from pipeline.formats.keys import Reader
from pipeline.images import decode_image

THUMB_PX = 128


class Thumbnails:
    """JPEG data: URIs of the images the page shows, THUMB_PX on the long side, read the way labeling reads."""

    def __init__(self, reader: Reader):
        self.reader = reader
        self.count = 0

    def of(self, key: str) -> dict:
        """{"src": a data: URI, "error": None} or, for an image that cannot be read now, {"src": None, "error": why}."""
        try:
            image = decode_image(self.reader.read_key(key), draft_size=THUMB_PX)
        except Exception as e:  # moved, deleted, or in a compressed archive: the row still shows, without a picture
            return {"src": None, "error": str(e)[:200]}
        image.thumbnail((THUMB_PX, THUMB_PX))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=75)
        self.count += 1
        return {"src": f"data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}", "error": None}
