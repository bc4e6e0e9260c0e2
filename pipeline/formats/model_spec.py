"""The `model` entry of every checkpoint: what labeling needs to rebuild and feed a model, and the bounds it must
keep; and TrainedModel, that entry with the classes and weights a model is built from. Read workers unpickle the
spec, and they never import torch."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import UsageError


@dataclass(frozen=True)
class ModelSpec:
    """What labeling needs to rebuild and feed a model (a plain dict in the checkpoint file). The sizes and
    statistics come from the library that ships the weights (pipeline.models)."""

    arch: str
    head: str  # the classifier module that the new head replaced
    mean: list[float]
    std: list[float]
    resize_size: int
    input_size: int
    interpolation: str = "bilinear"  # checkpoints of imgjobs 0.1 have none: they resized bilinearly


@dataclass(frozen=True)
class TrainedModel:
    """What models.from_checkpoint builds a trained model from: a checkpoint's spec, classes and weights."""

    spec: ModelSpec
    classes: list[str]  # the head's outputs, in order
    weights: dict  # the state_dict, CPU tensors

    @classmethod
    def of(cls, state: dict) -> TrainedModel:
        """The trained model of a loaded checkpoint (pipeline.formats.checkpoint.load)."""
        return cls(state["model"], state["classes"], state["model_state"])


# What a checkpoint may ask of the machines that label with it: a tensor of input_size² pixels per image, each image
# resized to resize_size² first, a score per class. Past these bounds it is damaged, or made to exhaust them.
INPUT_SIZES = (8, 4096)
RESIZE_SIZES = (8, 8192)
CLASS_COUNTS = (2, 100_000)


def check_ranges(state: dict, path: str) -> None:
    spec, classes = state["model"], state.get("classes")
    for name, value, (low, high) in (("model.input_size", spec.input_size, INPUT_SIZES),
                                     ("model.resize_size", spec.resize_size, RESIZE_SIZES),
                                     ("classes", len(classes) if isinstance(classes, list) else None, CLASS_COUNTS)):
        if type(value) is not int or not low <= value <= high:  # not a bool either, which is an int
            shown = value if isinstance(value, int) else type(value).__name__
            raise UsageError(f"checkpoint {path} has {name} {shown}, outside {low}..{high}; pass a checkpoint "
                             "written by imgjobs train")
