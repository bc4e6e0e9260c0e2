"""Checkpoints never run code: loading is weights_only, and anything else is refused with one line."""

from dataclasses import replace

import pytest
import torch

from pipeline.errors import UsageError
from pipeline.formats import checkpoint
from pipeline.formats.model_spec import TrainedModel
from pipeline.models import build_model, from_checkpoint


class _Payload:
    """Unpickling this object would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_crafted_pickle_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "x": _Payload(marker)}, path)
    with pytest.raises(UsageError, match="refused"):
        checkpoint.load(str(path))
    assert not marker.exists()
    # Unpickled without weights_only, the same file does run its code: the check above is not vacuous.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_non_checkpoint_files_are_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UsageError, match="cannot be read"):
        checkpoint.load(str(tmp_path / "notes.txt"))
    torch.save({"some": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(UsageError, match="not an imgjobs checkpoint"):
        checkpoint.load(str(tmp_path / "other.pt"))
    with pytest.raises(UsageError, match="not found"):
        checkpoint.load(str(tmp_path / "absent.pt"))


def test_unknown_arch_is_refused(tmp_path):
    """The file format loads without torchvision's model list; building the model refuses the arch."""
    model, spec = build_model("resnet18", 2, "none")
    state = {"model": replace(spec, arch="resnet9000"), "classes": ["a", "b"], "model_state": model.state_dict()}
    checkpoint.save(state, str(tmp_path))
    loaded = checkpoint.load(str(tmp_path))
    with pytest.raises(UsageError, match="unknown model.arch 'resnet9000'"):
        from_checkpoint(loaded)


def test_round_trip_from_a_folder_or_file(tmp_path):
    model, spec = build_model("resnet18", 3, "none")
    state = {"model": spec, "classes": ["a", "b", "c"], "model_state": model.state_dict()}
    path = checkpoint.save(state, str(tmp_path))
    x = torch.randn(2, 3, 224, 224)
    for where in (str(tmp_path), path, f"file://{path}"):
        rebuilt = from_checkpoint(checkpoint.load(where))
        torch.testing.assert_close(rebuilt(x), model.eval()(x))
    # What predictors build from (their payload carries a TrainedModel's parts, not a checkpoint): the same model.
    trained = TrainedModel.of(checkpoint.load(path))
    assert (trained.spec, trained.classes) == (spec, ["a", "b", "c"])
    torch.testing.assert_close(from_checkpoint(trained)(x), model(x))
