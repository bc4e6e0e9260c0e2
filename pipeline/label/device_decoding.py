"""GPU predictors' decoding. Read tasks only read bytes on the CPU (reading.encoded_rows); the predictor decodes
JPEGs in batches on its GPU with nvjpeg (torchvision.io.decode_jpeg), then applies EXIF orientation and the
checkpoint's resize and centre crop there. Everything nvjpeg is not trusted with (other formats, CMYK, JPEGs
whose structure plain_jpeg does not accept) and every file nvjpeg rejects is decoded on the actor's CPU the way
read tasks decode it (reading.Preprocess), with the same error rows. Every file decodes at full size, on either
path, so GPU actors' labels are those of `--exact-decode`.

It runs on any torch device: on a CPU, torchvision decodes with libjpeg-turbo instead, which is how the tests
check everything here but nvjpeg itself.
"""

from __future__ import annotations

import io
import re
import sys
import warnings

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from pipeline.errors import UsageError
from pipeline.formats.keys import content_kind, reason
from pipeline.formats.model_spec import ModelSpec
from pipeline.label.reading import Preprocess

# Device memory that the decoder's own tensors may take at once. The images of one chunk take DECODED_BYTES a
# pixel together: nvjpeg's RGB output, and as much again for its own colour planes. Cropping adds CROP_BYTES a
# pixel for one image at a time: the copy that orient() or a strided reshape makes, and the float32 copy that
# torchvision's resize makes on a GPU (it resizes uint8 images in float32 there). A chunk's images are freed
# before the next chunk is decoded, so a chunk's total is the peak; an image that alone would exceed the budget
# decodes on the CPU. An out-of-memory error lowers the budget to half of what the failed chunk needed.
MAX_DECODE_BYTES = 2 * 2**30
DECODED_BYTES, CROP_BYTES = 3 + 3, 3 + 12

# What a failed decode_jpeg call means when it is not the file's fault. Out of memory: torch's allocator, or
# nvjpeg's (status 5, NVJPEG_STATUS_ALLOCATOR_FAILURE, in torchvision's "Failed to ...: 5").
OUT_OF_MEMORY = re.compile(r"out of memory|Failed to [^:]*: 5\b")
# A device or an installation that fails every file: the actor stops instead of sending them all to its CPU.
NOT_THE_FILE = ("Couldn't load the image extension", "not compiled with nvJPEG", "CUDA error", "CUDA stream",
                "cudaError", "Failed to initialize nvjpeg", "Failed to create", "Expected a ")

# In entropy-coded data, 0xFF starts a marker unless it is a stuffed 0xFF (FF 00), a fill byte or a restart
# marker (RST0-7): the first other marker ends the scan. (A leading `\xff+` would make the search 20 times
# slower: the regex engine then tries every position.)
SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
SOF_MARKERS = (0xC0, 0xC1, 0xC2)  # baseline, extended and progressive Huffman: what nvjpeg and libjpeg both take
DHT, DQT, DRI, SOS, EOI, COM = 0xC4, 0xDB, 0xDD, 0xDA, 0xD9, 0xFE


class DeviceDecoder:
    def __init__(self, spec: ModelSpec, device: torch.device, synchronize: bool = True, log=None):
        """`synchronize=False` only measures what the synchronisation before each decode costs (gpu_check.sh):
        its output may be corrupt on a GPU."""
        self.cpu = Preprocess(spec, exact_decode=True)  # full size, as nvjpeg decodes
        self.resize_size, self.input_size = spec.resize_size, spec.input_size
        self.interpolation = InterpolationMode(spec.interpolation)
        self.device = device
        self.synchronize = synchronize
        self.max_bytes = MAX_DECODE_BYTES
        self.out_of_memory = False  # said once
        self.log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self._check_decoder()

    def _check_decoder(self) -> None:
        """A tiny JPEG decoded at start: a torchvision without its image extension or nvjpeg fails here, once,
        with one line, instead of on every file."""
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, "JPEG")
        try:
            self._decode_jpegs([torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)])
        except RuntimeError as e:
            raise UsageError(f"label: this actor cannot decode JPEGs on {self.device} with torchvision "
                             f"({first_line(e)}); install the torchvision that matches torch "
                             "(torchvision==0.29.1 beside torch==2.14.1)") from None

    def __call__(self, batch: dict) -> tuple[torch.Tensor, np.ndarray]:
        """N×3×S×S uint8 crops on the device, zeros for error rows, and which rows the CPU decoded. Rows the CPU
        decodes get their width and height in `batch`, and their error if they do not decode."""
        for key in ("width", "height", "error", "error_kind"):  # Ray Data's arrays may be read-only views
            batch[key] = batch[key].copy()
        n = len(batch["path"])
        crops = torch.zeros((n, 3, self.input_size, self.input_size), dtype=torch.uint8, device=self.device)
        ok = batch["error"] == ""
        area = batch["width"].astype(np.int64) * batch["height"]
        gpu = ok & (batch["orientation"] > 0) & (area * (DECODED_BYTES + CROP_BYTES) <= self.max_bytes)
        gpu[gpu] = [plain_jpeg(batch["data"][i]) for i in np.flatnonzero(gpu)]
        on_cpu = list(np.flatnonzero(ok & ~gpu))
        rows = list(np.flatnonzero(gpu))
        while rows:
            chunk, rows = self._next_chunk(rows, area)
            try:
                on_cpu += self._decode_and_crop(chunk, batch, crops)
            except RuntimeError as e:
                if not OUT_OF_MEMORY.search(str(e)):
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if len(chunk) == 1:  # too big for what is free beside the model: the CPU decodes it
                    on_cpu += chunk
                    continue
                # Half of what this chunk needed, so that its images go in smaller chunks from now on.
                self.max_bytes = self._bytes(chunk, area) // 2
                if not self.out_of_memory:
                    self.out_of_memory = True
                    self.log(f"label: out of GPU memory decoding {len(chunk)} images at once; this actor decodes at "
                             f"most {self.max_bytes / 2**30:.2f} GiB of them at a time from now on")
                rows = chunk + rows
        self._decode_on_cpu(on_cpu, batch, crops)
        cpu = np.zeros(n, dtype=bool)
        cpu[on_cpu] = True
        return crops, cpu

    def _decode_on_cpu(self, rows: list, batch: dict, crops: torch.Tensor) -> None:
        """Decodes and crops these rows on the CPU, as read tasks do, into `crops`; a file that does not decode gets
        the error row a read task would have made."""
        for i in rows:
            try:
                pixels, batch["width"][i], batch["height"][i] = self.cpu(batch["data"][i])
            except Exception as e:  # any bad file becomes an error row; the job goes on
                batch["error"][i], batch["error_kind"][i] = reason(e), content_kind(e)
            else:
                crops[i] = torch.tensor(pixels, device=self.device)

    def _next_chunk(self, rows: list, area: np.ndarray) -> tuple[list, list]:
        """The first rows whose decoding stays within max_bytes together (at least one), and the rest."""
        total = largest = 0
        for taken, i in enumerate(rows):
            total, largest = total + int(area[i]), max(largest, int(area[i]))
            if taken and total * DECODED_BYTES + largest * CROP_BYTES > self.max_bytes:  # as _bytes counts
                return rows[:taken], rows[taken:]
        return rows, []

    @staticmethod
    def _bytes(rows: list, area: np.ndarray) -> int:
        """The device memory that decoding these rows together takes at its peak (MAX_DECODE_BYTES)."""
        return int(area[rows].sum()) * DECODED_BYTES + int(area[rows].max()) * CROP_BYTES

    def _decode_and_crop(self, chunk: list, batch: dict, crops: torch.Tensor) -> list:
        """Decodes and crops the chunk's rows into `crops`; returns the rows nvjpeg rejected. The decoded images
        are freed on return, before the next chunk is decoded."""
        images = self._decode([batch["data"][i] for i in chunk])
        rejected = []
        for i, image in zip(chunk, images):
            if image is None:
                rejected.append(i)
            else:
                crops[i] = self._crop(orient(image, int(batch["orientation"][i])))
        return rejected

    def _decode(self, datas: list[bytes]) -> list[torch.Tensor | None]:
        """Decoded CHW uint8 images, None for those the decoder rejects. One bad file fails a whole batched call,
        so then each file is decoded by itself. Failures that are not a file's (out of memory, a missing
        extension, a CUDA error) raise."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bytes are read-only buffers; torchvision.io's deprecation notice
            tensors = [torch.frombuffer(data, dtype=torch.uint8) for data in datas]
        try:
            return self._decode_jpegs(tensors)
        except RuntimeError as e:
            self._raise_unless_files_fault(e)
        if len(tensors) == 1:
            return [None]
        images = []
        for tensor in tensors:
            try:
                images += self._decode_jpegs([tensor])
            except RuntimeError as e:
                self._raise_unless_files_fault(e)
                images.append(None)
        return images

    def _decode_jpegs(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.device.type == "cuda" and self.synchronize:
            # torchvision allocates nvjpeg's outputs on the current stream but decodes on a stream of its own. The
            # caching allocator hands out memory freed on the current stream (the previous chunk's images and
            # float32 copies) while kernels queued there may still use it, which nvjpeg's stream does not wait
            # for: without this, nvjpeg may overwrite what those kernels read, or they what nvjpeg wrote.
            torch.cuda.current_stream(self.device).synchronize()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision.io's notice, on every call
            return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device)

    def _raise_unless_files_fault(self, e: RuntimeError) -> None:
        if OUT_OF_MEMORY.search(str(e)):
            raise e
        if any(text in str(e) for text in NOT_THE_FILE):
            raise RuntimeError(f"label: decoding JPEGs on {self.device} failed, and not because of a file: "
                               f"{first_line(e)}") from e

    def _crop(self, image: torch.Tensor) -> torch.Tensor:
        """torchvision's Resize (antialiased, as for PIL images) and CenterCrop, on the image's device."""
        image = F.resize(image, [self.resize_size], interpolation=self.interpolation, antialias=True)
        return F.center_crop(image, [self.input_size])


def check_image_extension() -> None:
    """On the driver, before GPU actors start: torchvision's image extension loads here, or the job stops with
    one line (the actors would each fail on it)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            decode_jpeg(torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8))
    except RuntimeError as e:
        raise UsageError(f"label: GPU actors decode JPEGs with torchvision, which cannot here ({first_line(e)}); "
                         "install the torchvision that matches torch (torchvision==0.29.1 beside torch==2.14.1)"
                         ) from None


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def plain_jpeg(data: bytes) -> bool:
    """Whether a JPEG is well formed enough to trust nvjpeg's output of it. nvjpeg decodes some damaged files into
    garbage without an error (torchvision does not check its header status), so a file that fails this goes to
    the CPU path instead, where libjpeg decodes it or gives it its error row. It checks what libjpeg refuses a
    file for, short of decoding it: 8-bit baseline or progressive Huffman coding; each segment's length within the
    file and matching its contents; frame, tables and scans that libjpeg accepts; scan data that ends only at a
    marker; and the end marker last, after at least one scan."""
    end = len(data)
    if not (data.startswith(b"\xff\xd8") and data.endswith(b"\xff\xd9")):
        return False
    jpeg = _Structure()
    pos = 2
    while pos < end:
        if data[pos] != 0xFF:
            return False
        while pos < end and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos == end:
            return False
        marker, pos = data[pos], pos + 1
        if marker == EOI:
            return pos == end and jpeg.scans > 0
        length = int.from_bytes(data[pos:pos + 2], "big")
        if length < 2 or pos + length > end or not jpeg.segment_ok(marker, data[pos + 2:pos + length]):
            return False
        pos += length
        if marker == SOS:
            scan_end = SCAN_END.search(data, pos)
            if scan_end is None:
                return False
            pos = scan_end.start()
    return False


class _Structure:
    """What plain_jpeg has read of a JPEG's segments so far."""

    def __init__(self):
        self.components = None  # the frame's: id -> (horizontal sampling, vertical sampling, quantisation table)
        self.progressive = False
        self.tables = {"quantisation": set(), "dc": set(), "ac": set()}
        self.scans = 0

    def segment_ok(self, marker: int, body: bytes) -> bool:
        if marker in SOF_MARKERS:
            self.progressive = marker == 0xC2
            return self.components is None and self._frame_ok(body)
        if marker == DQT:
            return self._quantisation_ok(body)
        if marker == DHT:
            return self._huffman_ok(body)
        if marker == SOS:
            self.scans += 1
            return self._scan_ok(body)
        return marker == DRI and len(body) == 2 or 0xE0 <= marker <= 0xEF or marker == COM  # APPn, COM

    def _frame_ok(self, body: bytes) -> bool:
        """8-bit samples, a nonzero size, 1 or 3 distinct components with sampling factors 1-4 that divide the
        largest ones, at most 10 blocks in an MCU, quantisation tables 0-3."""
        if len(body) < 6 or body[0] != 8 or body[5] not in (1, 3) or len(body) != 6 + 3 * body[5]:
            return False
        self.components = {body[at]: (body[at + 1] >> 4, body[at + 1] & 15, body[at + 2])
                           for at in range(6, len(body), 3)}
        factors = self.components.values()
        h_max, v_max = max(h for h, _, _ in factors), max(v for _, v, _ in factors)
        return (int.from_bytes(body[1:3], "big") > 0 and int.from_bytes(body[3:5], "big") > 0
                and len(self.components) == body[5] and sum(h * v for h, v, _ in factors) <= 10
                and all(1 <= h <= 4 and 1 <= v <= 4 and h_max % h == 0 and v_max % v == 0 and q <= 3
                        for h, v, q in factors))

    def _quantisation_ok(self, body: bytes) -> bool:
        """Tables of 64 8-bit or 16-bit values, ids 0-3, that fill the segment exactly."""
        at = 0
        while at < len(body):
            precision, table = body[at] >> 4, body[at] & 15
            if precision > 1 or table > 3:
                return False
            self.tables["quantisation"].add(table)
            at += 1 + 64 * (precision + 1)
        return at == len(body)

    def _huffman_ok(self, body: bytes) -> bool:
        """DC or AC tables, ids 0-3, that fill the segment exactly, whose code lengths leave room for their codes
        (jdhuff.c's check), and whose DC symbols are at most 15."""
        at = 0
        while at + 17 <= len(body):
            kind, table, counts = body[at] >> 4, body[at] & 15, body[at + 1:at + 17]
            symbols = body[at + 17:at + 17 + sum(counts)]
            if kind > 1 or table > 3 or len(symbols) < sum(counts) or kind == 0 and any(s > 15 for s in symbols):
                return False
            code = 0
            for bits, count in enumerate(counts[:max((i for i, c in enumerate(counts) if c), default=-1) + 1], 1):
                code += count
                if code >= 1 << bits:
                    return False
                code <<= 1
            self.tables["ac" if kind else "dc"].add(table)
            at += 17 + len(symbols)
        return at == len(body)

    def _scan_ok(self, body: bytes) -> bool:
        """1-4 distinct components of the frame, whose quantisation tables are defined, with the Huffman tables the
        scan decodes with; for progressive scans, the spectral selection and successive approximation that
        libjpeg accepts."""
        count = body[0] if body else 0
        if self.components is None or not 1 <= count <= 4 or len(body) != 4 + 2 * count:
            return False
        ids, selectors = body[1:1 + 2 * count:2], body[2:2 + 2 * count:2]
        start, stop, approximation = body[1 + 2 * count:4 + 2 * count]
        high, low = approximation >> 4, approximation & 15
        if len(set(ids)) != count or not all(i in self.components for i in ids):
            return False
        if not {self.components[i][2] for i in ids} <= self.tables["quantisation"]:
            return False
        needs_dc, needs_ac = start == 0 and high == 0, stop > 0
        if needs_dc and not {t >> 4 for t in selectors} <= self.tables["dc"]:
            return False
        if needs_ac and not {t & 15 for t in selectors} <= self.tables["ac"]:
            return False
        if not self.progressive:
            return True
        if start == 0 and stop != 0 or start > 0 and (stop < start or stop > 63 or count != 1):
            return False
        return low <= 13 and (high == 0 or low == high - 1)


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A CHW image turned upright by its EXIF orientation, as PIL's ImageOps.exif_transpose does (nvjpeg ignores
    EXIF)."""
    if orientation in (5, 7):  # transposed, then like 1 and 3
        image, orientation = image.transpose(1, 2), orientation - 4
    if orientation == 2:
        return image.flip(2)
    if orientation == 3:
        return image.flip(1, 2)
    if orientation == 4:
        return image.flip(1)
    if orientation == 6:
        return image.rot90(-1, (1, 2))
    if orientation == 8:
        return image.rot90(1, (1, 2))
    return image
