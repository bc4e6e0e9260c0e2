"""Self-describing checkpoints: everything needed to resume training or to label images.

A checkpoint is one `checkpoint.pt` file holding plain tensors, numbers, strings, lists and dicts,
and is always loaded with `weights_only=True`, so loading one can never run code.
"""

from __future__ import annotations

import io
import pickle

import torch
from torch import nn

from pipeline import storage
from pipeline.errors import UsageError
from pipeline.train.models import build_model, known_arch

FILENAME = "checkpoint.pt"
FORMAT = "imgjobs.checkpoint/1"


def save(state: dict, directory: str) -> str:
    path = f"{directory}/{FILENAME}"
    torch.save({"format": FORMAT, **state}, path)
    return path


def load(path: str) -> dict:
    """Load a checkpoint file, or the checkpoint.pt inside a checkpoint folder, local or URI."""
    fs, fs_path = storage.resolve(path)
    info = fs.get_file_info(fs_path)
    if info.type.name == "Directory":
        fs_path = f"{fs_path}/{FILENAME}"
        info = fs.get_file_info(fs_path)
    if info.type.name != "File":
        raise UsageError(f"checkpoint {path} not found; pass the best_checkpoint path from a run's summary.json")
    try:
        data = storage.read_bytes(fs, fs_path)
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).splitlines()[0] if "weights_only" in str(e) else "not a torch checkpoint"
        raise UsageError(f"checkpoint {path} refused: {reason}; only checkpoints written by imgjobs train load") from None
    except Exception as e:
        raise UsageError(f"checkpoint {path} cannot be read ({type(e).__name__}); pass a checkpoint written by imgjobs train") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UsageError(f"checkpoint {path} is not an imgjobs checkpoint; pass one written by imgjobs train")
    arch = state["model"]["arch"]
    state["model"].setdefault("interpolation", "bilinear")  # checkpoints of imgjobs 0.1 resized bilinearly
    if not known_arch(arch):
        raise UsageError(f"checkpoint {path} has unknown model.arch {arch!r}; this imgjobs cannot build it")
    return state


def build_from(state: dict) -> nn.Module:
    """The trained model of a checkpoint, in eval mode on the CPU."""
    spec = state["model"]
    model, _ = build_model(spec["arch"], len(state["classes"]), weights="none")
    try:
        model.load_state_dict(state["model_state"])
    except RuntimeError as e:
        raise UsageError(f"checkpoint weights do not fit model.arch {spec['arch']!r} "
                         f"({str(e).splitlines()[0]}); pass a checkpoint written by imgjobs train") from None
    return model.eval()
