"""Self-describing checkpoints: everything needed to resume training or to label images.

A checkpoint is one `checkpoint.pt` file holding plain tensors, numbers, strings, lists and dicts,
and is always loaded with `weights_only=True`, so loading one can never run code.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from dataclasses import asdict

import pyarrow.fs as pafs

from pipeline import storage
from pipeline.errors import UsageError
from pipeline.formats.model_spec import ModelSpec, check_ranges

FILENAME = "checkpoint.pt"
FORMAT = "imgjobs.checkpoint/1"


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
            return best_checkpoint(path, json.loads(storage.read_bytes(fs, f"{base}/summary.json")))
    raise UsageError(f"checkpoint {path} not found; pass a training run's folder or the best_checkpoint path from "
                     "its summary.json")


def best_checkpoint(run: str, summary: dict) -> str:
    """The best checkpoint of the run folder `run`: the summary's best_checkpoint, relative to the summary's run_dir,
    inside `run`. A summary.json is data (anyone's bucket may hold one), so it cannot point a job at a file elsewhere,
    nor at another endpoint; and a run folder that was moved or copied still finds its own checkpoint."""
    recorded, run_dir = (storage.split_query(str(summary.get(key) or ""))[0] for key in ("best_checkpoint", "run_dir"))
    prefix = run_dir.rstrip("/") + "/"
    parts = recorded[len(prefix):].split("/")
    if not run_dir or not recorded.startswith(prefix) or any(part in ("", ".", "..") for part in parts):
        raise UsageError(f"checkpoint {run}: its summary.json names a best_checkpoint outside the run's folder; pass "
                         "a checkpoint.pt itself, or a run folder that imgjobs train wrote")
    return storage.join(storage.absolute(run), *parts)


def save(state: dict, directory: str) -> str:
    import torch

    path = f"{directory}/{FILENAME}"
    torch.save({"format": FORMAT, **state, "model": asdict(state["model"])}, path)  # plain types: weights_only
    return path


def load(path: str) -> dict:
    """Load the checkpoint `path` names (see find)."""
    import torch

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
    check_ranges(state, path)
    return state
