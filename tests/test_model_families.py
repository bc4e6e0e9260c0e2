"""Every model family docs/training.md promises: its head, its own preprocessing, a training step, and labeling."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import ray
import torch
import torchvision

from jobs.cli import main
from pipeline.errors import UsageError
from pipeline.formats import checkpoint
from pipeline.formats.labels_file import RowRules
from pipeline.label.plan import model_payload
from pipeline.label.predictor import Predictor
from pipeline.models import TORCHVISION_HEADS, WithEmbedding, _family, build_model, from_checkpoint, torchvision_archs
from tests.helpers import make_image_folder, random_weight_state, write_config

CLASSES = ["a", "b", "c"]
# One small model of each family, at the smallest input each accepts (ViT's patch grid is fixed at 224; its 32-pixel
# patches make a quarter of the 16-pixel ones' tokens).
FAMILIES = {
    "resnet18": 64,
    "efficientnet_b0": 64,
    "mobilenet_v3_small": 64,
    "convnext_tiny": 64,
    "vit_b_32": 224,
    "inception_v3": 96,
    "googlenet": 64,
    "efficientnet_lite0": 64,
}


def test_every_torchvision_classifier_has_a_head_rule():
    """The head table names a 1000-class layer in every torchvision classification model (built on the meta
    device: no memory, no weights). RegNets compute their widths with real tensors, so two small ones stand in."""
    archs = torchvision_archs()
    assert len(archs) > 70
    for arch in archs:
        head = _family(arch, TORCHVISION_HEADS)
        assert head, arch
        if arch.startswith("regnet") and not arch.endswith("400mf"):
            continue
        quiet = {"init_weights": False} if arch in ("googlenet", "inception_v3") else {}
        with torch.device("cpu" if arch.startswith("regnet") else "meta"):
            layer = torchvision.models.get_model(arch, **quiet).get_submodule(head)
        assert getattr(layer, "out_features", None) or layer.out_channels == 1000, arch


@pytest.mark.parametrize("arch, input_size, resize_size, interpolation, mean", [
    ("resnet18", 224, 256, "bilinear", 0.485),
    ("inception_v3", 299, 342, "bilinear", 0.485),
    ("efficientnet_b3", 300, 320, "bicubic", 0.485),
    ("vit_b_16", 224, 256, "bilinear", 0.485),
    ("efficientnet_lite0", 224, 256, "bicubic", 0.5),
])
def test_preprocessing_is_the_model_s_own(arch, input_size, resize_size, interpolation, mean):
    _, spec = build_model(arch, 2, "none")
    assert (spec.input_size, spec.resize_size, spec.interpolation) == (input_size, resize_size, interpolation)
    assert spec.mean[0] == pytest.approx(mean)


@pytest.mark.parametrize("arch", FAMILIES)
def test_family_trains_a_step_and_labels(arch, ray_local):
    size = FAMILIES[arch]
    model, spec = build_model(arch, len(CLASSES), "none")
    head = model.get_submodule(spec.head)
    assert (getattr(head, "out_features", None) or head.out_channels) == len(CLASSES)

    # One SGD step in training mode: a plain logits tensor (no auxiliary outputs), and the head learns.
    model.train()
    before = head.weight.detach().clone()
    logits = model(torch.randn(2, 3, size, size))
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, len(CLASSES))
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.equal(head.weight, before)

    # Labeling: the predictor actor's code, with the payload the driver builds, gives the eager model's labels.
    state = random_weight_state(arch, CLASSES, input_size=size)
    eager = from_checkpoint(state)
    payload = model_payload(state, from_checkpoint(state), "fp32", gpu=False)
    predictor = Predictor([ray.put(payload)], RowRules(top_k=2), threads=2, batch_size=4)
    pixels = np.random.default_rng(0).integers(0, 256, (4, 3, size, size), dtype=np.uint8)
    batch = {"path": np.array([f"{i}.jpg" for i in range(4)], dtype=object), "pixels": pixels,
             "width": np.full(4, size), "height": np.full(4, size), "error": np.array([""] * 4, dtype=object),
             "error_kind": np.array([""] * 4, dtype=object)}
    table = predictor(batch)
    mean, std = (torch.tensor(k).view(1, 3, 1, 1) for k in (spec.mean, spec.std))
    with torch.inference_mode():
        expected = eager((torch.from_numpy(pixels).float() / 255 - mean) / std).softmax(1)
    assert table.column("label_index").to_pylist() == expected.argmax(1).tolist()
    np.testing.assert_allclose(table.column("score").to_numpy(), expected.max(1).values.numpy(), atol=1e-3)

    # --embeddings: the head's input, the same labels; a row that failed to decode has none.
    payload = model_payload(state, from_checkpoint(state), "fp32", gpu=False, embeddings=True)
    predictor = Predictor([ray.put(payload)], RowRules(top_k=2), threads=2, batch_size=4)
    batch["error"][2] = "broken"
    table = predictor(batch)
    with torch.inference_mode():
        features = WithEmbedding(eager, spec.head)((torch.from_numpy(pixels).float() / 255 - mean) / std)[0]
    embeddings = table.column("embedding")
    assert embeddings.type == pa.list_(pa.float32(), head.in_features) and embeddings.null_count == 1
    assert embeddings[2].as_py() is None
    assert [table.column("label_index")[i].as_py() for i in (0, 1, 3)] == expected.argmax(1)[[0, 1, 3]].tolist()
    np.testing.assert_allclose(np.array([embeddings[i].as_py() for i in (0, 1, 3)]), features[[0, 1, 3]].numpy(),
                               atol=1e-3 * features.abs().max().item())
    torch.jit.enable_onednn_fusion(False)  # the TorchScript path turns it on for the whole process


def test_embeddings_need_a_head_that_takes_a_feature_vector():
    """SqueezeNet classifies with a 1x1 convolution over a feature map: there is no pooled vector to give."""
    state = random_weight_state("squeezenet1_1", CLASSES, input_size=64)
    with pytest.raises(UsageError, match=r"--embeddings: this model's head \(classifier.1, Conv2d\) takes no pooled"):
        model_payload(state, from_checkpoint(state), "fp32", gpu=False, embeddings=True)


def test_a_family_with_auxiliary_heads_trains_end_to_end(ray_local, tmp_path):
    """googlenet returns auxiliary outputs in training mode unless imgjobs drops them: the job must finish."""
    root = make_image_folder(tmp_path / "data", train_per_class=4, val_per_class=2)
    config = write_config(tmp_path / "c.json", "googlenet", root, tmp_path / "runs",
                          model={"arch": "googlenet", "weights": "none"})
    assert main(["train", "-c", str(config)]) == 0
    summary = json.loads((tmp_path / "runs" / "googlenet" / "summary.json").read_text())
    state = checkpoint.load(summary["best_checkpoint"])
    assert state["model"].arch == "googlenet" and state["model"].input_size == 224
