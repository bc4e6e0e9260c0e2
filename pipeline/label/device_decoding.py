"""GPU predictors' decoding. Read tasks only read bytes on the CPU (reading.encoded_rows); the predictor decodes
JPEGs in batches on its GPU with nvjpeg (torchvision.io.decode_jpeg), then applies EXIF orientation and the
checkpoint's resize and centre crop there. Other formats, and JPEGs nvjpeg rejects, are decoded on the actor's
CPU the way read tasks decode them (reading.Preprocess), with the same error rows.

It runs on any torch device: on a CPU, torchvision decodes with libjpeg-turbo instead, which is how the tests
check everything here but nvjpeg itself.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from pipeline.images import image_error
from pipeline.label.reading import Preprocess

MAX_DECODED_PIXELS = 400_000_000  # decoded at once: 33 photos of 12 MP, 1.2 GB of uint8


class DeviceDecoder:
    def __init__(self, spec: dict, exact_decode: bool, device: torch.device):
        self.cpu = Preprocess(spec, exact_decode)
        self.resize_size, self.input_size = spec["resize_size"], spec["input_size"]
        self.interpolation = InterpolationMode(spec["interpolation"])
        self.device = device

    def __call__(self, batch: dict) -> torch.Tensor:
        """N×3×S×S uint8 crops on the device, zeros for error rows. Rows the CPU decodes get their width and
        height in `batch`, and their error if they do not decode."""
        for key in ("width", "height", "error", "error_kind"):  # Ray Data's arrays may be read-only views
            batch[key] = batch[key].copy()
        n = len(batch["path"])
        crops = torch.zeros((n, 3, self.input_size, self.input_size), dtype=torch.uint8, device=self.device)
        ok = batch["error"] == ""
        on_device = np.flatnonzero(ok & (batch["orientation"] > 0))
        on_cpu = list(np.flatnonzero(ok & (batch["orientation"] == 0)))
        for chunk in self._chunks(on_device, batch):
            images = self._decode([batch["data"][i] for i in chunk])
            for i, image in zip(chunk, images):
                if image is None:
                    on_cpu.append(i)
                else:
                    crops[i] = self._crop(orient(image, int(batch["orientation"][i])))
        for i in on_cpu:
            try:
                pixels, batch["width"][i], batch["height"][i] = self.cpu(batch["data"][i])
            except Exception as e:  # the error row a read task would have made
                batch["error"][i], batch["error_kind"][i] = image_error(e), "decode"
            else:
                crops[i] = torch.tensor(pixels, device=self.device)
        return crops

    def _chunks(self, rows: np.ndarray, batch: dict):
        """Runs of rows whose decoded pixels stay under MAX_DECODED_PIXELS together."""
        chunk, pixels = [], 0
        for i in rows:
            size = int(batch["width"][i]) * int(batch["height"][i])
            if chunk and pixels + size > MAX_DECODED_PIXELS:
                yield chunk
                chunk, pixels = [], 0
            chunk.append(i)
            pixels += size
        if chunk:
            yield chunk

    def _decode(self, datas: list[bytes]) -> list[torch.Tensor | None]:
        """Decoded CHW uint8 images, None for those the decoder rejects. One bad file fails a whole batched call,
        so then each file is decoded by itself."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bytes are read-only buffers; torchvision.io's deprecation notice
            tensors = [torch.frombuffer(data, dtype=torch.uint8) for data in datas]
            try:
                return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:
                return [self._decode_one(t) for t in tensors]

    def _decode_one(self, tensor: torch.Tensor) -> torch.Tensor | None:
        try:
            return decode_jpeg(tensor, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return None

    def _crop(self, image: torch.Tensor) -> torch.Tensor:
        """torchvision's Resize (antialiased, as for PIL images) and CenterCrop, on the image's device."""
        image = F.resize(image, [self.resize_size], interpolation=self.interpolation, antialias=True)
        return F.center_crop(image, [self.input_size])


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
