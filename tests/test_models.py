"""Model factory: new heads (random, or from ImageNet's rows), freezing per mode, frozen BatchNorm, and where
ImageNet weights come from."""

import re

import pytest
import torch
import torchvision
from torch import nn

from pipeline.errors import UsageError
from pipeline.images import decode_image
from pipeline.models import build_model, configure_trainable, head_from_imagenet, set_train_mode
from pipeline.train.transforms import eval_transform
from tests.helpers import DEMO_DATA


def trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch, head", [("resnet18", "fc"), ("mobilenet_v3_small", "classifier.3"),
                                        ("efficientnet_lite0", "classifier")])
@pytest.mark.parametrize("num_classes", [2, 5])
def test_head_fits_the_classes(arch, head, num_classes):
    model, spec = build_model(arch, num_classes, "none")
    assert spec.head == head
    assert model.get_submodule(head).out_features == num_classes
    assert model.eval()(torch.zeros(1, 3, 224, 224)).shape == (1, num_classes)


def test_feature_extraction_trains_only_the_head_and_freezes_batchnorm():
    model, spec = build_model("resnet18", 2, "none")
    configure_trainable(model, spec.head, "feature_extraction", "all")
    assert trainable(model) == {"fc.weight", "fc.bias"}
    set_train_mode(model)
    assert model.fc.training
    batchnorms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert batchnorms and not any(m.training for m in batchnorms)
    before = model.bn1.running_mean.clone()
    model(torch.randn(4, 3, 64, 64))
    assert torch.equal(model.bn1.running_mean, before)  # ImageNet statistics untouched


def test_finetune_all_trains_everything():
    model, spec = build_model("resnet18", 2, "none")
    configure_trainable(model, spec.head, "finetune", "all")
    assert trainable(model) == {name for name, _ in model.named_parameters()}
    set_train_mode(model)
    assert all(m.training for m in model.modules())


def test_finetune_listed_layers_plus_the_new_head():
    model, spec = build_model("resnet18", 2, "none")
    configure_trainable(model, spec.head, "finetune", ["layer4"])
    names = trainable(model)
    assert names and all(n.startswith(("layer4.", "fc.")) for n in names) and "fc.weight" in names
    set_train_mode(model)
    assert model.layer4[0].bn1.training and not model.layer1[0].bn1.training


def test_imagenet_weights_come_from_the_torch_home_cache(tmp_path, monkeypatch):
    """Offline, torchvision finds ImageNet weights in $TORCH_HOME/hub/checkpoints: here a file we made ourselves."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = torchvision.models.resnet18()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / "resnet18-f37072fd.pth")
    model, _ = build_model("resnet18", 3, "imagenet")
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert model.fc.out_features == 3
    # head_from_imagenet: class 0 starts as ImageNet's "ant" (310), class 2 as "bee" (309), class 1 at random.
    rows = head_from_imagenet(["ants", "wasps", "bees"], {"ants": "ant", "bees": "bee"})
    assert rows == {0: 310, 2: 309}
    head = build_model("resnet18", 3, "imagenet", rows)[0].fc
    assert torch.equal(head.weight[[0, 2]], reference.fc.weight[[310, 309]])
    assert torch.equal(head.bias[[0, 2]], reference.fc.bias[[310, 309]])
    assert not any(torch.equal(head.weight[1], row) for row in reference.fc.weight)


@pytest.mark.parametrize("names, message", [
    ({"wasps": "ant"}, "'wasps' is not one of the data's classes (ants, bees); use those as its keys"),
    ({"ants": "ants"}, "ants: 'ants' is not an ImageNet class name; close ones: ant"),
    ({"ants": "xyzzy"}, "ants: 'xyzzy' is not an ImageNet class name; see torchvision's ImageNet category names"),
])
def test_head_from_imagenet_names_the_mistake(names, message):
    with pytest.raises(UsageError, match=re.escape(f"model.head_from_imagenet: {message}")):
        head_from_imagenet(["ants", "bees"], names)


def test_missing_imagenet_weights_offline_say_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    # Point the download at a closed local port so the test is offline everywhere.
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    monkeypatch.setattr(type(weights), "url", property(lambda self: "http://127.0.0.1:9/resnet18-f37072fd.pth"))
    with pytest.raises(UsageError, match=r"cannot get resnet18 weights .*set model.weights=/path/to/state_dict.pth"):
        build_model("resnet18", 2, "imagenet")


def test_weights_from_a_state_dict_file(tmp_path):
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), tmp_path / "w.pth")
    model, _ = build_model("resnet18", 2, str(tmp_path / "w.pth"))
    assert torch.equal(model.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "other.pth")
    with pytest.raises(UsageError, match="does not fit this architecture"):
        build_model("resnet18", 2, str(tmp_path / "other.pth"))


def test_offline_lite0_weights_are_real_imagenet_weights():
    """A head started from ImageNet's 'ant' and 'bee' rows sorts the ants/bees photos before any training."""
    classes = ["ants", "bees"]
    model, spec = build_model("efficientnet_lite0", 2, "imagenet", head_from_imagenet(classes, {"ants": "ant",
                                                                                               "bees": "bee"}))
    transform = eval_transform(spec)
    paths = [(path, target) for target, label in enumerate(classes)
             for path in sorted((DEMO_DATA / "val" / label).glob("*.jpg"))[:15]]
    with torch.no_grad():
        logits = model.eval()(torch.stack([transform(decode_image(path.read_bytes())) for path, _ in paths]))
    assert (logits.argmax(1) == torch.tensor([target for _, target in paths])).float().mean() >= 0.85
