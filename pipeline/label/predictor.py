"""Model stage of `imgjobs label`: a Ray Data callable class that loads the checkpoint's model once per actor.

This module runs in every predictor actor, so it imports torch alone (see plan.model_payload)."""

from __future__ import annotations

import io
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
import torch

from pipeline.formats.labels_file import RowRules, output_schema
from pipeline.formats.model_spec import ModelSpec, TrainedModel
from pipeline.label.units import BOOKKEEPING

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # fp16: GPUs before sm_80
# GPU actors' output has one more column than the labels file: whether the actor's CPU decoded the row's file,
# not its GPU. The job sums it into its summary and drops it before writing.
CPU_DECODED = "cpu_decoded"
# A GPU actor says once when more than this share of its files decoded on its CPU (its one CPU then limits it),
# once it has seen CPU_NOTICE_AFTER files.
CPU_SHARE_NOTICE, CPU_NOTICE_AFTER = 0.05, 100


@dataclass(frozen=True)
class ModelPayload:
    """What predictors need of the checkpoint, built once by plan.model_payload and put once in the object store:
    the frozen TorchScript model that CPU actors run with torch alone, or else the weights to build it from."""

    spec: ModelSpec
    classes: list[str]
    precision: str  # a key of DTYPES
    device: str  # "cuda" or "cpu"
    embedding_size: int | None  # the model returns (embeddings, logits) when set (models.WithEmbedding)
    torchscript: bytes | None = None
    weights: dict | None = None  # where there is no TorchScript

    @property
    def trained(self) -> TrainedModel:
        """The model to build eagerly (models.from_checkpoint), from the weights."""
        return TrainedModel(self.spec, self.classes, self.weights)


class Predictor:
    def __init__(self, payload_ref: list, rules: RowRules, threads: int, batch_size: int, device_decode: bool = False):
        """`payload_ref`: [the payload's object ref] (or [the payload], outside Ray). With `device_decode`, batches
        hold encoded files (reading.encoded_rows) that the actor decodes on its device (device_decoding);
        otherwise decoded crops."""
        # Ray caps the actor's OpenMP threads at its num_cpus, which is fractional here so read tasks keep a CPU.
        torch.set_num_threads(threads)
        payload = payload_ref[0] if isinstance(payload_ref[0], ModelPayload) else ray.get(payload_ref[0])
        self.classes = np.array(payload.classes, dtype=object)
        self.device = torch.device(payload.device)
        self.top_k = rules.top_k
        self.min_confidence = rules.min_confidence
        self.thresholds = None if rules.thresholds is None else np.array(rules.thresholds, dtype=np.float32)
        self.batch_size = batch_size
        self.halved = False
        self.embedding_size = payload.embedding_size
        self.schema = output_schema(self.embedding_size, accepted=self.thresholds is not None)
        spec = payload.spec
        mean, std = (torch.tensor(k, dtype=torch.float32, device=self.device) for k in (spec.mean, spec.std))
        self.mean, self.std = mean.view(1, 3, 1, 1), std.view(1, 3, 1, 1)
        self.model = torchscript_model(payload, batch_size) if payload.torchscript else eager_model(payload)
        self.decode = None
        self.files = self.cpu_files = 0  # files this actor decoded, and those of them its CPU decoded
        self.noticed = False
        if device_decode:
            from pipeline.label.device_decoding import DeviceDecoder  # GPU actors only: it imports torchvision

            self.decode = DeviceDecoder(spec, self.device, log=self.log)
            self.schema = self.schema.append(pa.field(CPU_DECODED, pa.bool_()))

    @staticmethod
    def log(text: str) -> None:
        """A line for the job's console: Ray forwards actors' output to the driver."""
        print(text, file=sys.stderr, flush=True)

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(embeddings or None, logits) in float32, from N×3×S×S uint8 crops."""
        n = len(pixels)
        if self.embedding_size and n < self.batch_size:
            # Always one batch shape, so that kernels, and so embeddings, do not depend on a batch's other images.
            pixels = torch.cat([pixels, pixels.new_zeros((self.batch_size - n, *pixels.shape[1:]))])
        x = pixels.to(self.device, non_blocking=True)
        # Same operations as ToTensor (float, /255) then Normalize (sub mean, div std): identical inputs.
        x = x.float().div_(255).sub_(self.mean).div_(self.std).contiguous(memory_format=torch.channels_last)
        out = self.model(x)
        embeddings, logits = out if isinstance(out, tuple) else (None, out)
        return None if embeddings is None else embeddings[:n].float(), logits[:n].float()

    def __call__(self, batch: dict) -> pa.Table:
        """The batch's labels. On the GPU's first out-of-memory error, the actor halves its model batch (and its
        decoder's memory budget) and labels the batch again; on a second one, it fails."""
        while True:
            try:
                return self.label(dict(batch))  # a copy: decoding replaces columns, and a retry needs the originals
            except torch.OutOfMemoryError as e:
                if self.halved or self.batch_size == 1:
                    again = ", halved once already" if self.halved else ""
                    raise RuntimeError(f"label: out of GPU memory at batches of {self.batch_size} images{again}; "
                                       "pass a smaller --batch-size") from e
                self.halved, self.batch_size = True, max(1, self.batch_size // 2)
                if self.decode:
                    self.decode.max_bytes //= 2
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.log(f"label: out of GPU memory ({str(e).splitlines()[0][:120]}); this actor goes on with "
                         f"batches of {self.batch_size} images")

    def label(self, batch: dict) -> pa.Table:
        read = batch["error"] == ""
        crops, cpu_decoded = self.decode(batch) if self.decode else (None, None)  # decoding may add error rows
        ok = batch["error"] == ""
        n = len(ok)
        label_index = np.zeros(n, dtype=np.int32)
        scores = np.zeros((n, self.top_k), dtype=np.float32)
        indices = np.zeros((n, self.top_k), dtype=np.int64)
        embeddings = np.zeros((n, self.embedding_size or 0), dtype=np.float32)
        if ok.any():
            if crops is None:
                pixels = torch.from_numpy(batch["pixels"][ok])
            else:
                pixels = crops[torch.from_numpy(ok).to(self.device)]
            # A call may hold several model batches (CPU actors take whole read blocks, plan.dataset).
            chunks = [self.forward(pixels[i : i + self.batch_size]) for i in range(0, len(pixels), self.batch_size)]
            logits = torch.cat([c[1] for c in chunks])
            features = None if chunks[0][0] is None else torch.cat([c[0] for c in chunks])
            top = logits.softmax(dim=1).topk(self.top_k, dim=1)
            scores[ok], indices[ok] = top.values.cpu().numpy(), top.indices.cpu().numpy()
            label_index[ok] = indices[ok, 0]
            if features is not None:
                embeddings[ok] = features.cpu().numpy()
        bad = ~ok
        score = scores[:, 0]
        k = self.top_k
        columns = [
            pa.array(batch["path"], pa.string()),
            pa.array(self.classes[label_index], pa.string(), mask=bad),
            pa.array(label_index, pa.int32(), mask=bad),
            pa.array(score, pa.float32(), mask=bad),
            _lists(pa.array(self.classes[indices].reshape(-1), pa.string()), k, bad),
            _lists(pa.array(scores.reshape(-1), pa.float32()), k, bad),
            *self.marks(score, label_index, ok),
            pa.array(batch["error"], pa.string(), mask=ok),
            pa.array(batch["error_kind"], pa.string(), mask=ok),
            pa.array(batch["width"], pa.int32(), mask=bad),
            pa.array(batch["height"], pa.int32(), mask=bad),
        ]
        if self.embedding_size:
            columns.append(pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), self.embedding_size,
                                                             mask=pa.array(bad)))
        schema = self.schema
        if cpu_decoded is not None:
            columns.append(pa.array(cpu_decoded, pa.bool_()))
            self.count_cpu_decoded(int(read.sum()), int(cpu_decoded.sum()))
        for field in BOOKKEEPING:  # the read tasks' unit columns pass through to the writer
            if field.name in batch:
                columns.append(pa.array(batch[field.name], field.type))
                schema = schema.append(field)
        return pa.Table.from_arrays(columns, schema=schema)

    def marks(self, score: np.ndarray, label_index: np.ndarray, ok: np.ndarray) -> list[pa.Array]:
        """`uncertain` (null on error rows), and with thresholds `accepted` (false on error rows)."""
        marks = [pa.array(score < self.min_confidence, pa.bool_(), mask=~ok)]
        if self.thresholds is not None:
            marks.append(pa.array(ok & (score >= self.thresholds[label_index]), pa.bool_()))
        return marks

    def count_cpu_decoded(self, files: int, on_cpu: int) -> None:
        self.files, self.cpu_files = self.files + files, self.cpu_files + on_cpu
        if not self.noticed and self.files >= CPU_NOTICE_AFTER and self.cpu_files > CPU_SHARE_NOTICE * self.files:
            self.noticed = True
            self.log(f"label: a GPU actor decoded {self.cpu_files} of its first {self.files} files "
                     f"({self.cpu_files / self.files:.0%}) on its CPU, not with nvjpeg: other formats, CMYK or "
                     "damaged JPEGs, or JPEGs nvjpeg rejects; its one CPU may limit its rate")


def _lists(values: pa.Array, k: int, null: np.ndarray) -> pa.Array:
    """Rows of k values each, null where the image has an error."""
    offsets = pa.array(np.arange(0, (len(null) + 1) * k, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, values, mask=pa.array(null))


def example_batch(n: int, size: int, dtype: torch.dtype) -> torch.Tensor:
    """Zeros shaped like the model's input batches, for tracing and warm-up."""
    return torch.zeros(n, 3, size, size, dtype=dtype).contiguous(memory_format=torch.channels_last)


def torchscript_model(payload: ModelPayload, batch_size: int):
    """The frozen TorchScript model that CPU actors run. oneDNN Graph fuses its convolutions, biases and activations
    into single kernels on the first calls: faster than eager channels_last, with the same labels."""
    dtype = DTYPES[payload.precision]
    torch.jit.enable_onednn_fusion(True)
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore", FutureWarning)
        frozen = torch.jit.load(io.BytesIO(payload.torchscript))
        example = example_batch(batch_size, payload.spec.input_size, dtype)
        frozen(example), frozen(example)  # profiled, then fused: the first batch need not wait for it
    return lambda x: frozen(x.to(dtype))


def eager_model(payload: ModelPayload):
    """The eager model in channels_last (cuDNN's and oneDNN's fastest layout), under autocast for bf16 and fp16:
    what GPU actors run, and CPU actors for a model that TorchScript cannot freeze faithfully."""
    from pipeline.models import (
        from_checkpoint,  # here, not at the top: most CPU actors never import torchvision or timm
    )

    device = torch.device(payload.device)
    dtype = DTYPES[payload.precision]
    model = from_checkpoint(payload.trained)
    if payload.embedding_size:
        from pipeline.models import WithEmbedding  # torchvision, as above

        model = WithEmbedding(model, payload.spec.head)
    model = model.to(device, memory_format=torch.channels_last)

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return model(x)

    return forward
