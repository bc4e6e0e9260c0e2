"""Self-describing checkpoints: everything needed to resume training or to label images.

A checkpoint is one `checkpoint.pt` file holding plain tensors, numbers, strings, lists and dicts,
and is always loaded with `weights_only=True`, so loading one can never run code.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from dataclasses import asdict, dataclass

import pyarrow.fs as pafs

from pipeline import storage
from pipeline.errors import UsageError

FILENAME = "checkpoint.pt"
FORMAT = "imgjobs.checkpoint/1"


@dataclass(frozen=True)
class ModelSpec:
    """What labeling needs to rebuild and feed a model: the `model` entry of every checkpoint (a plain dict in the
    file). The sizes and statistics come from the library that ships the weights (pipeline.models). Here, not in
    models.py: read workers unpickle it, and they never import torch."""

    arch: str
    head: str  # the classifier module that the new head replaced
    mean: list[float]
    std: list[float]
    resize_size: int
    input_size: int
    interpolation: str = "bilinear"  # checkpoints of imgjobs 0.1 have none: they resized bilinearly

# torch loads in seconds, so it is imported where a checkpoint is read or written: `find` answers a wrong path
# before that.


def find(path: str) -> str:
    """The checkpoint file `path` names: a checkpoint.pt, a folder holding one, or a training run's folder (which
    stands for its best checkpoint), local or URI."""
    fs, base = storage.resolve(path)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.File:
        return path
    if info.type == pafs.FileType.Directory:
        if fs.get_file_info(f"{base}/{FILENAME}").type == pafs.FileType.File:
            return storage.join(path, FILENAME)
        if fs.get_file_info(f"{base}/summary.json").type == pafs.FileType.File:
            return json.loads(storage.read_bytes(fs, f"{base}/summary.json"))["best_checkpoint"]
    raise UsageError(f"checkpoint {path} not found; pass a training run's folder or the best_checkpoint path from "
                     "its summary.json")


def save(state: dict, directory: str) -> str:
    import torch

    path = f"{directory}/{FILENAME}"
    torch.save({"format": FORMAT, **state, "model": asdict(state["model"])}, path)  # plain types: weights_only
    return path


def load(path: str) -> dict:
    """Load the checkpoint `path` names (see find)."""
    import torch

    from pipeline.models import known_arch

    fs, fs_path = storage.resolve(find(path))
    try:
        data = storage.read_bytes(fs, fs_path)
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).splitlines()[0] if "weights_only" in str(e) else "not a torch checkpoint"
        raise UsageError(f"checkpoint {path} refused: {reason}; only checkpoints written by imgjobs train "
                         "load") from None
    except Exception as e:
        raise UsageError(f"checkpoint {path} cannot be read ({type(e).__name__}); pass a checkpoint written by "
                         "imgjobs train") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UsageError(f"checkpoint {path} is not an imgjobs checkpoint; pass one written by imgjobs train")
    state["sha256"] = hashlib.sha256(data).hexdigest()  # of the file: `sha256sum checkpoint.pt` checks it
    try:
        state["model"] = ModelSpec(**state["model"])
    except TypeError as e:
        raise UsageError(f"checkpoint {path} has a model entry this imgjobs cannot read ({e}); pass a checkpoint "
                         "written by imgjobs train") from None
    arch = state["model"].arch
    if not known_arch(arch):
        raise UsageError(f"checkpoint {path} has unknown model.arch {arch!r}; this imgjobs cannot build it")
    return state


def build_from(state: dict):
    """The trained model of a checkpoint, in eval mode on the CPU."""
    from pipeline.models import build_model

    spec = state["model"]
    model, _ = build_model(spec.arch, len(state["classes"]), weights="none")
    try:
        model.load_state_dict(state["model_state"])
    except RuntimeError as e:
        raise UsageError(f"checkpoint weights do not fit model.arch {spec.arch!r} "
                         f"({str(e).splitlines()[0]}); pass a checkpoint written by imgjobs train") from None
    return model.eval()
