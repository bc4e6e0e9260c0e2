"""Model stage of `imgjobs label`: a Ray Data callable class that loads the checkpoint's model once per actor."""

from __future__ import annotations

import copy
import threading
import warnings

import numpy as np
import pyarrow as pa
import ray
import torch

from pipeline import checkpoint

OUTPUT_SCHEMA = pa.schema([
    ("path", pa.string()),
    ("label", pa.string()),
    ("label_index", pa.int32()),
    ("score", pa.float32()),
    ("topk_labels", pa.list_(pa.string())),
    ("topk_scores", pa.list_(pa.float32())),
    ("uncertain", pa.bool_()),
    ("error", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
])


def model_spec(state: dict) -> dict:
    """The part of a checkpoint the predictors need (no optimizer state), to put once in the object store."""
    return {key: state[key] for key in ("format", "model", "classes", "model_state")}


class Predictor:
    def __init__(self, spec_ref: list, precision: str, top_k: int, min_confidence: float, threads: int):
        # Ray caps the actor's OpenMP threads at its num_cpus, which is fractional here so read tasks keep a CPU.
        torch.set_num_threads(threads)
        spec = ray.get(spec_ref[0])
        self.classes = np.array(spec["classes"], dtype=object)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.bf16 = precision == "bf16"
        self.top_k = top_k
        self.min_confidence = min_confidence
        mean, std = (torch.tensor(spec["model"][k], dtype=torch.float32, device=self.device) for k in ("mean", "std"))
        self.mean, self.std = mean.view(1, 3, 1, 1), std.view(1, 3, 1, 1)
        # channels_last: oneDNN's convolutions run ~1.3x faster on CPU with the same fp32 arithmetic.
        self.model = checkpoint.build_from(spec).to(self.device, memory_format=torch.channels_last)
        # On CPU in fp32, a frozen copy gets built after the first batch (see _freeze).
        self.freeze_size = spec["model"]["input_size"] if self.device.type == "cpu" and not self.bf16 else None

    def _freeze(self, size: int) -> None:
        """Swap in a frozen copy: BatchNorm folded into the convolutions and oneDNN layouts fixed, ~1.15x faster
        fp32 on CPU with the same labels (scores move by ~1e-7). Built in a thread after the first batch, while
        the eager model goes on labeling, so freezing adds nothing to start-up."""
        example = torch.zeros(1, 3, size, size).contiguous(memory_format=torch.channels_last)
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, yet still the fastest here
            frozen = torch.jit.optimize_for_inference(torch.jit.trace(copy.deepcopy(self.model), example))
            frozen(example)  # the first call specialises the graph
        self.model = frozen

    @torch.inference_mode()
    def logits(self, pixels: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(pixels).to(self.device, non_blocking=True)
        # Same operations as ToTensor (float, /255) then Normalize (sub mean, div std): identical inputs.
        x = x.float().div_(255).sub_(self.mean).div_(self.std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(x).float()

    def __call__(self, batch: dict) -> pa.Table:
        ok = batch["error"] == ""
        n = len(ok)
        label_index = np.zeros(n, dtype=np.int32)
        scores = np.zeros((n, self.top_k), dtype=np.float32)
        indices = np.zeros((n, self.top_k), dtype=np.int64)
        if ok.any():
            probs = self.logits(batch["pixels"][ok]).softmax(dim=1)
            top = probs.topk(self.top_k, dim=1)
            if self.freeze_size:
                threading.Thread(target=self._freeze, args=(self.freeze_size,), daemon=True).start()
                self.freeze_size = None
            scores[ok], indices[ok] = top.values.cpu().numpy(), top.indices.cpu().numpy()
            label_index[ok] = indices[ok, 0]
        bad = ~ok
        score = scores[:, 0]
        k = self.top_k
        return pa.Table.from_arrays(
            [
                pa.array(batch["path"], pa.string()),
                pa.array(self.classes[label_index], pa.string(), mask=bad),
                pa.array(label_index, pa.int32(), mask=bad),
                pa.array(score, pa.float32(), mask=bad),
                _lists(pa.array(self.classes[indices].reshape(-1), pa.string()), k, bad),
                _lists(pa.array(scores.reshape(-1), pa.float32()), k, bad),
                pa.array(score < self.min_confidence, pa.bool_(), mask=bad),
                pa.array(batch["error"], pa.string(), mask=ok),
                pa.array(batch["width"], pa.int32(), mask=bad),
                pa.array(batch["height"], pa.int32(), mask=bad),
            ],
            schema=OUTPUT_SCHEMA,
        )


def _lists(values: pa.Array, k: int, null: np.ndarray) -> pa.Array:
    """Rows of k values each, null where the image has an error."""
    offsets = pa.array(np.arange(0, (len(null) + 1) * k, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, values, mask=pa.array(null))
